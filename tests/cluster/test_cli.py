"""The `rayinfer` command: generate, serve (from flags or a Serve config file) and bench."""
from __future__ import annotations

from pathlib import Path

import pytest

from rayinfer.cluster.cli import main


def test_generate_prints_each_prompt(llama_dir: Path, capsys) -> None:
    code = main(["generate", "--model", str(llama_dir), "--max-tokens", "4", "--max-num-seqs", "2", "Hello", "World"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "--- prompt: 'Hello'" in printed and "--- prompt: 'World'" in printed
    assert printed.count("[4 tokens, finish_reason=length]") == 2


def test_generate_reads_prompts_file(llama_dir: Path, tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first line\n\nsecond line\n")
    assert main(["generate", "--model", str(llama_dir), "--max-tokens", "2", "--prompts-file", str(prompts)]) == 0
    assert capsys.readouterr().out.count("--- prompt:") == 2


def test_bad_engine_arg_is_a_clean_error(llama_dir: Path, capsys) -> None:
    assert main(["generate", "--model", str(llama_dir), "--block-size", "24", "Hello"]) == 2
    assert "block_size" in capsys.readouterr().err


DEMO_SERVE_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "serve" / "demo.yaml"


def test_serve_flags_override_the_config_file(llama_dir: Path) -> None:
    pytest.importorskip("ray.serve", reason="installed with the 'serve' extra")
    from rayinfer.cluster.cli import _served_apps, build_parser

    args = build_parser().parse_args(
        ["serve", str(DEMO_SERVE_CONFIG), "--model", str(llama_dir), "--port", "9100", "--max-num-seqs", "4"]
    )
    host, port, apps = _served_apps(args)
    assert (host, port) == ("127.0.0.1", 9100)  # host from the file, port from the flag
    assert apps[0].args["model"] == str(llama_dir) and apps[0].args["max_num_seqs"] == "4"
    assert apps[0].args.get("served_model_name") is None and apps[0].args["device"] == "cpu"
    assert apps[0].deployment_options["LLMServer"]["autoscaling_config"]["max_replicas"] == 2


def test_serve_refuses_bad_engine_args_before_starting_ray(capsys) -> None:
    assert main(["serve", str(DEMO_SERVE_CONFIG), "--block-size", "24"]) == 2
    assert "block_size" in capsys.readouterr().err


def test_bench_lists_and_runs_the_scripts(capsys) -> None:
    assert main(["bench"]) == 0
    listed = capsys.readouterr().out
    assert "step-overhead" in listed and "kernels" in listed
    assert main(["bench", "no-such-benchmark"]) == 2
    assert main(["bench", "step-overhead", "--help"]) == 0  # the script itself ran and parsed its arguments


def test_serve_answers_and_stops_cleanly_on_ctrl_c(llama_dir: Path, tmp_path: Path) -> None:
    import os
    import shutil
    import signal
    import socket
    import subprocess
    import sys
    import threading
    import time

    requests = pytest.importorskip("requests", reason="installed with the 'serve' extra")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    rayinfer = shutil.which("rayinfer", path=os.path.dirname(sys.executable))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        # A Ray instance of its own, never the test session's (nor any other on this machine).
        [rayinfer, "serve", str(DEMO_SERVE_CONFIG), "--model", str(llama_dir), "--port", str(port), "--ray-address", "local"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not any("is serving" in line for line in lines):  # printed once the whole app is up
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.5)
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
        body = {"model": str(llama_dir), "prompt": "Hello", "max_tokens": 3}  # served as --model was given
        reply = requests.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, "".join(lines)
        reader.join(timeout=10)
        output = "".join(lines)
        assert f"at http://127.0.0.1:{port}" in output and "curl" in output and "shutting down" in output
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
