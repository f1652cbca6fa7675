"""Autoscaling end to end on Ray's fake multi-node cluster (configs/cluster/fake_multinode.yaml).

Sustained HTTP load makes Serve ask for a second engine replica; its placement group fits nowhere on the
one-CPU head, so the autoscaler adds a (fake) GPU worker node. When the load stops, Serve goes back to one
replica and the idle node is removed. The head is started here with `ray start`, and everything it started
is killed by process id afterwards (never `ray stop`: it would stop every Ray instance on the machine).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="Ray is installed with the 'serve' extra")
pytest.importorskip("requests", reason="installed with the 'serve' extra")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "cluster" / "fake_multinode.yaml"
DRIVER = Path(__file__).with_name("autoscaling_driver.py")
GCS_PORT = 6379  # the fake provider's worker nodes always dial the head at this port
MARKER = "RAYINFER_FAKE_CLUSTER_TAG"  # inherited by every process the head starts; found again in /proc


def _port_busy(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the GCS does: TIME_WAIT is no obstacle
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _our_processes(tag: str) -> list[int]:
    """Pids whose command line or environment holds `tag` (the cluster's unique temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            text = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if tag.encode() in text:
            pids.append(int(entry.name))
    return pids


def _wait_gone(tag: str, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (pids := _our_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return pids


def _kill_cluster(head: subprocess.Popen, tag: str) -> list[str]:
    """SIGTERM the head's process group (a graceful stop, as `ray stop` does), then SIGKILL what is left.

    Returns the command lines of processes still there afterwards (there should be none).
    """
    try:
        os.killpg(head.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    for pid in _wait_gone(tag, 10):  # fake worker nodes and stragglers outside the process group
        print(f"SIGKILL {pid}: {_cmdline(pid)[:150]}")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    head.wait(timeout=30)
    return [_cmdline(pid) for pid in _wait_gone(tag, 10)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "(gone)"


def _tail(path: Path, lines: int = 60) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(missing)"
    return f"--- {path}\n" + "\n".join(text.splitlines()[-lines:])


def _auth_env() -> dict[str, str]:
    """Token authentication with a token of this test's own, so the test needs no ~/.ray/auth_token.

    Ray 2.60 turns token auth on for `ray start --head` when ~/.ray/auth_token exists, but a driver given an
    explicit address only uses a token when RAY_AUTH_MODE=token is set: both sides get it explicitly.
    """
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


@pytest.fixture
def fake_cluster():
    """A fake multi-node cluster's head with the autoscaler; yields (GCS address, temp dir, auth env)."""
    if _port_busy(GCS_PORT):
        pytest.skip(f"port {GCS_PORT} is in use (another Ray head?); the fake cluster needs it")
    import ray._private.services

    # Short path: Ray's unix sockets live under it, and socket paths must stay under 108 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rifm-", dir="/tmp")
    auth = _auth_env()
    env = {
        **os.environ, **auth, MARKER: temp_dir,
        "RAY_FAKE_CLUSTER": "1",  # the fake provider refuses to start without it
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",  # the autoscaler's loop runs every 5 s by default
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # on SIGTERM, stop at once (no 30 s node drain)
    }
    env.pop("RAY_ADDRESS", None)
    ray_cli = Path(sys.executable).with_name("ray")
    command = [
        str(ray_cli), "start", "--head", "--block", f"--port={GCS_PORT}", f"--temp-dir={temp_dir}",
        f"--autoscaling-config={CONFIG}", "--num-cpus=1", "--num-gpus=0", "--object-store-memory=200000000",
        "--include-dashboard=false", "--disable-usage-stats",
    ]
    head_log = open(Path(temp_dir) / "head.out", "w")  # closed in the finally below
    head = subprocess.Popen(command, env=env, stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, head_out = time.monotonic() + 45, Path(temp_dir) / "head.out"
        while "Ray runtime started" not in head_out.read_text(errors="replace"):
            assert head.poll() is None and time.monotonic() < deadline, f"head did not start:\n{_tail(head_out)}"
            time.sleep(0.5)
        yield f"{ray._private.services.get_node_ip_address()}:{GCS_PORT}", Path(temp_dir), auth
    finally:
        leftovers = _kill_cluster(head, temp_dir)
        head_log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftovers, f"processes of the fake cluster survived: {leftovers}"


def test_load_adds_replica_and_node_then_scales_back(fake_cluster) -> None:
    address, temp_dir, auth = fake_cluster
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **auth}
    command = [sys.executable, str(DRIVER), "--address", address, "--http-port", str(_free_port())]
    started = time.monotonic()
    # The driver's phase timeouts (150 + 90 + 60 s) end it before this does; phases normally take ~20, 10, 7 s.
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=340)
    print(result.stdout[-6000:], f"\n(driver took {time.monotonic() - started:.0f} s)")
    logs = temp_dir / "session_latest" / "logs"
    assert result.returncode == 0, (
        f"driver failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}\n"
        f"{_tail(temp_dir / 'head.out')}\n{_tail(logs / 'monitor.log')}"
    )
    summary = json.loads(result.stdout.split("SUMMARY ", 1)[1])
    assert summary["initial_replicas"] == 1
    assert summary["peak_replicas"] == 2
    assert summary["gpu_nodes_joined"] == 1
    assert summary["replica_pgs_on_new_node"] == 1, "the second replica should run on the autoscaled node"
    assert summary["requests_ok"] > 0
    assert summary["requests_failed"] == 0, summary["failure_samples"]
    assert summary["final_replicas"] == 1
    assert summary["node_removal_s"] is not None, "the idle GPU node was not removed"
