#!/usr/bin/env bash
# The GPU session's checks in one run, most important first, each bounded so the whole fits a device lease:
#   smoke    tiny models on CUDA equal transformers (the Triton kernels compiled for real, not interpreted)
#   build    a random Llama-3-8B-shaped checkpoint in bfloat16, drawn on the GPU
#   thru     offline throughput, ShareGPT-like, 500 requests, rayinfer
#   decode   decode step time at batch 1 and 64 against the memory roofline (CUDA graphs and eager)
#   peer     the same throughput workload on transformers' generate_batch
#   kernels  scripts/bench_kernels.py (each kernel against copy bandwidth / SDPA)
#   quant    the quantised-weight matmul tests on CUDA, then scripts/bench_quant_matmul.py: W4A16 and FP8 against
#            bf16 on Llama-3-8B's projections at batch 1/8/64/512, with the W4A16 GEMV's share of --peak-tbps
#   struct   structured outputs: the grammar-mask tests on CUDA and scripts/bench_structured.py (batch 1 and 64);
#            needs xgrammar, from wheels in .whl (pip download xgrammar apache-tvm-ffi for the device's Python)
#   tests    the GPU-marked tests and the model-coverage tests on CUDA
#   pp       scripts/pp_stage_check.py: two pipeline stages as two processes sharing the GPU over NCCL give the
#            one-process tokens; the per-step hand-off cost (last: it proves a path rather than timing a feature)
# Usage: scripts/gpu_check.sh [BUDGET_SECONDS] [STAGES]  (default 520 s; stages comma-separated, default all).
# Logs and JSON go to $OUT (the device tool's output folder) or ./gpu-out. Needs no Ray or FastAPI: the engine
# runs in-process; pydantic comes from wheels in .whl when the machine lacks it.
set -u
cd "$(dirname "$0")/.."
BUDGET=${1:-520}
STAGES=${2:-smoke,build,thru,decode,peer,kernels,quant,struct,tests,pp}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
START=$(date +%s)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
MODEL=/tmp/llama3-8b-random

left() { echo $((BUDGET - ($(date +%s) - START))); }
# run NAME CAP CMD...: runs CMD with a limit of min(CAP, time left - 10 s), output to $OUT/NAME.log and the console.
run() {
    local name=$1 cap=$2
    shift 2
    local limit
    limit=$(($(left) - 10))
    [ "$limit" -gt "$cap" ] && limit=$cap
    if [ "$limit" -lt 20 ]; then
        echo "== $name: skipped, $(left) s left" | tee -a "$OUT/summary.txt"
        return 1
    fi
    echo "== $name (limit ${limit}s, $(left) s left)"
    local t0=$(date +%s)
    timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc=$rc in $(($(date +%s) - t0)) s" | tee -a "$OUT/summary.txt"
    grep -v -E "Warning|warn\(|^\s*$|it/s\]|Loading weights" "$OUT/$name.log" | tail -n 15
    return $rc
}
want() { [[ ",$STAGES," == *",$1,"* ]]; }

python3 -c "import pydantic" 2>/dev/null || {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
}
python3 -c "import rayinfer.cluster" 2>/dev/null ||
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || {
        echo "install failed"; tail -20 "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"

if want smoke; then
    run smoke 90 python3 -m pytest -q -p no:cacheprovider --timeout 60 -m gpu tests/e2e/test_hf_equivalence.py \
        tests/workers/test_cuda_graphs.py tests/kernels/test_moe_triton.py
fi
if want build || want thru || want decode || want peer; then
    [ -f "$MODEL/config.json" ] ||
        run build 150 python3 scripts/make_tiny_model.py --size llama3-8b --dtype bfloat16 --device cuda --out "$MODEL"
fi
if want thru; then
    run thru_rayinfer 150 python3 scripts/bench_throughput.py --model "$MODEL" --dataset sharegpt-like \
        --num-prompts 500 --engines rayinfer --max-num-batched-tokens 8192 --json "$OUT/thru_rayinfer.json" ||
        RAYINFER_KERNEL_BACKEND=torch run thru_rayinfer_torch_kernels 120 python3 scripts/bench_throughput.py \
            --model "$MODEL" --dataset sharegpt-like --num-prompts 500 --engines rayinfer \
            --max-num-batched-tokens 8192 --json "$OUT/thru_rayinfer_torch_kernels.json"
fi
if want decode; then
    run decode 130 python3 scripts/bench_decode.py --model "$MODEL" --batch-sizes 1,64 --context 1024 --steps 30 \
        --json "$OUT/decode.json"
fi
if want peer; then
    run thru_generate_batch 180 python3 scripts/bench_throughput.py --model "$MODEL" --dataset sharegpt-like \
        --num-prompts 500 --engines generate_batch --json "$OUT/thru_generate_batch.json"
fi
if want kernels; then
    run kernels 90 python3 scripts/bench_kernels.py --markdown --json "$OUT/kernels.json"
fi
if want quant; then
    run quant-tests 120 python3 -m pytest -q -p no:cacheprovider --timeout 100 -n 4 -m gpu \
        tests/kernels/test_quant_matmul.py tests/kernels/test_fp8_matmul.py
    peak=3.35  # TB/s, H100 SXM; an H200 reads 4.8
    nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && peak=4.8
    run quant-bench 180 python3 scripts/bench_quant_matmul.py --peak-tbps "$peak" --markdown \
        --json "$OUT/bench_quant_matmul.json"
fi
if want struct; then
    python3 -c "import xgrammar" 2>/dev/null || {
        mkdir -p /tmp/site && python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/xgrammar*.whl \
            .whl/apache_tvm_ffi*.whl >"$OUT/xgrammar-install.log" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; }
    run struct-tests 90 python3 -m pytest -q -p no:cacheprovider --timeout 60 -m gpu tests/workers/test_grammar_matchers.py
    run struct-bench 150 python3 scripts/bench_structured.py --repeats 5 --json "$OUT/bench_structured.json"
fi
if want tests; then
    # Triton compiles on the CPU: spread the test files over processes (pytest-xdist is on the GPU image).
    run tests 240 python3 -m pytest -q -p no:cacheprovider --timeout 120 -n 8 -m gpu tests/kernels \
        tests/workers/test_worker.py tests/workers/test_sampler.py
    run coverage 120 python3 -m pytest -q -p no:cacheprovider --timeout 120 -n 8 \
        tests/workers/models/test_model_coverage.py tests/workers/models/test_moe.py tests/e2e/test_triton_path.py
fi
if want pp; then
    # Both stages on the one GPU: NCCL before 2.30 refuses that ("Duplicate GPU detected", shown by NCCL_DEBUG=WARN);
    # the script sets NCCL_MULTI_RANK_GPU_ENABLE=1, which 2.30 and later need for it.
    run pp 150 env NCCL_DEBUG=WARN python3 scripts/pp_stage_check.py --device cuda --pp 2 --size llama-56m \
        --partition 5,3 --seqs 8 --prompt-len 120 --decode-steps 16 --p2p-tokens 1,512,2048,8192 --timeout 120 \
        --json "$OUT/pp_stage_check.json"
fi
echo "== done in $(($(date +%s) - START)) s"
cat "$OUT/summary.txt"
# The device tool returns at most 8 files: everything goes back in one archive.
(cd "$OUT" && tar czf all.tgz --exclude=all.tgz -- * && find . -type f ! -name all.tgz -delete)
