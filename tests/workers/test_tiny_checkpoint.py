"""The built-in tiny checkpoints load with transformers, are deterministic, and generate varied text."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import rayinfer.workers.tiny_checkpoint as tiny_package
from rayinfer.workers.tiny_checkpoint import SUPPORTED_TINY_ARCHS, build_tiny_checkpoint, default_tiny_model_dir
from rayinfer.workers.tiny_checkpoint.architectures import make_config

PROMPTS = ["Hello, my name is", "The capital of France is", "日本語のテキスト 🙂", "A"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("llama"), arch="llama")


def _file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_folder_has_hf_checkpoint_files(llama_dir: Path) -> None:
    names = {p.name for p in llama_dir.iterdir()}
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json"):
        assert name in names
    config = json.loads((llama_dir / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (64, 2, 4)
    assert (config["num_key_value_heads"], config["intermediate_size"], config["vocab_size"]) == (2, 128, 512)
    assert config["tie_word_embeddings"] is False
    gen = json.loads((llama_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (0, 1, 2)


def test_tokenizer_specials_and_chat_template(llama_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(llama_dir)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert tok("hi").input_ids[0] == tok.bos_token_id
    text = "café naïve 日本語のテキスト 🙂🚀"
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi!</s>\n<|assistant|>\n"
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == tok.bos_token_id and ids[-2] == tok.convert_tokens_to_ids("<|assistant|>")
    assert tok.decode(ids) == rendered
    with pytest.raises(Exception, match="Unknown role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


def test_same_arguments_give_identical_bytes(llama_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_checkpoint(tmp_path / "again", arch="llama")
    assert _file_bytes(again) == _file_bytes(llama_dir)
    other_seed = build_tiny_checkpoint(tmp_path / "seed1", arch="llama", seed=1)
    assert _file_bytes(other_seed)["model.safetensors"] != _file_bytes(llama_dir)["model.safetensors"]


def test_sharded_checkpoint_has_index_and_same_weights(llama_dir: Path, tmp_path: Path) -> None:
    sharded = build_tiny_checkpoint(tmp_path / "sharded", arch="llama", max_shard_size="200KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((sharded / s).is_file() for s in shards)
    a = AutoModelForCausalLM.from_pretrained(llama_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(sharded).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", SUPPORTED_TINY_ARCHS)
def test_greedy_generation_is_varied_and_does_not_stop(arch: str, tmp_path: Path) -> None:
    path = build_tiny_checkpoint(tmp_path, arch=arch)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    outputs = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, do_sample=False, max_new_tokens=40)
        outputs.append(out[0, ids.shape[1]:].tolist())
    for gen in outputs:
        assert len(gen) == 40 and tok.eos_token_id not in gen  # the EOS row is shrunk: no early stop
        assert len(set(gen)) >= 15, gen  # not a loop of one or two tokens
    assert len({tuple(g) for g in outputs}) == len(PROMPTS)  # the prompt matters
    assert len({tok.decode(g) for g in outputs}) == len(PROMPTS)


def test_config_overrides_reach_the_model(tmp_path: Path) -> None:
    path = build_tiny_checkpoint(
        tmp_path, arch="llama", num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True,
        rope_scaling={"type": "linear", "factor": 2.0},
    )
    config = json.loads((path / "config.json").read_text())
    assert config["num_key_value_heads"] == 1 and config["tie_word_embeddings"] is True
    assert config["rope_parameters"]["rope_type"] == "linear" and config["rope_parameters"]["factor"] == 2.0
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0  # random, not zero: loading bugs show


def test_small_size_and_bad_arguments(tmp_path: Path) -> None:
    config = make_config("qwen2", "small", 512, {}, {"sliding_window": 8})
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (256, 4, 8)
    assert (config.num_key_value_heads, config.intermediate_size, config.sliding_window) == (4, 688, 8)
    with pytest.raises(ValueError, match="arch"):
        build_tiny_checkpoint(tmp_path, arch="mamba")
    with pytest.raises(ValueError, match="size"):
        build_tiny_checkpoint(tmp_path, size="huge")


def test_default_dir_is_built_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYINFER_CACHE_DIR", str(tmp_path))
    first = default_tiny_model_dir()
    assert first.parent == tmp_path and (first / "config.json").is_file()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert default_tiny_model_dir() == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp folder left behind


def test_script_writes_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "scripts" / "make_tiny_model.py"
    spec = importlib.util.spec_from_file_location("make_tiny_model", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--arch", "mistral", "--out", str(tmp_path / "m"), "--max-shard-size", "200KB"])
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()
    assert "wrote mistral/tiny" in capsys.readouterr().out


def test_package_imports_only_configs_from_rayinfer() -> None:
    # Workers own checkpoints; the front doors (cluster) and the scheduler sit above them, so no import may go up.
    allowed = ("rayinfer.configs", "rayinfer.workers.tiny_checkpoint")
    for source in sorted(Path(tiny_package.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{source.name}: relative import"
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert not name.startswith("rayinfer") or name.startswith(allowed), f"{source.name} imports {name}"
