"""`two_node_cluster`: a real two-node Ray cluster on this one machine, for tests of placement across nodes.

Each node is its own `ray start` (a head, then a second node joining it) with its own temp dir, free ports and a
custom resource naming it, so that a test can pin work to a node and nothing is shared with the session's local
Ray (`ray_session`) or any other Ray instance on the machine. A pytest process can be the driver of one Ray
cluster only, so tests drive this one from a subprocess (`TwoNodeCluster.run_driver`). Afterwards every process
the nodes started is killed by its id (each carries the cluster's marker in its environment), never with
`ray stop`, which stops every Ray instance on the machine.
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
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

MARKER = "RAYINFER_TWO_NODE_CLUSTER"  # inherited by every process the nodes start; found again in /proc
NODE_RESOURCES = ("node_a", "node_b")  # custom resource (1 unit) that only the head / only the second node has
NODE_CPUS = 2
# Ray's unix sockets live under the temp dir (<dir>/session_<date>_<pid>/sockets/plasma_store), and a socket path
# must stay under 108 bytes: a longer pytest tmp path falls back to a short dir under /tmp.
MAX_TEMP_DIR_LEN = 40
START_TIMEOUT_S = 90


@dataclass
class TwoNodeCluster:
    address: str  # the head's GCS, for ray.init(address=...)
    env: dict[str, str]  # the environment a driver needs: the cluster's auth token, no RAY_ADDRESS
    temp_dir: Path  # holds each node's temp dir (a/, b/) and the `ray start` output
    node_resources: tuple[str, str] = NODE_RESOURCES

    def run_driver(self, script: Path, *args: str, timeout_s: float = 150) -> dict:
        """Runs `script --address <head> *args` as a driver of this cluster; returns the JSON it printed on its last
        `RESULT ` line. Fails with its output and the nodes' logs when it exits non-zero."""
        command = [sys.executable, str(script), "--address", self.address, *args]
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout_s)
        lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
        assert result.returncode == 0 and lines, (
            f"driver exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}\n{self.logs()}"
        )
        return json.loads(lines[-1].removeprefix("RESULT "))

    def logs(self, lines: int = 30) -> str:
        """The tail of each node's `ray start` output and raylet log, for failure messages."""
        paths = sorted(self.temp_dir.glob("*.out")) + sorted(self.temp_dir.glob("*/session_latest/logs/raylet.out"))
        return "\n".join(f"--- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:]) for p in paths)


def _free_ports(count: int) -> list[int]:
    """`count` distinct ports free right now (all held open together, so none is handed out twice)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("", 0))
        return [sock.getsockname()[1] for sock in sockets]


def _node_ports() -> list[str]:
    """Every port a node would otherwise take at a fixed default (52365 for the dashboard agent, ...)."""
    names = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "runtime-env-agent-port", "metrics-export-port")
    # Workers' ports 0..0: each worker binds a port the OS picks, instead of Ray's shared 10002-19999 range.
    return [f"--{name}={port}" for name, port in zip(names, _free_ports(len(names)))] + [
        "--min-worker-port=0", "--max-worker-port=0"]


def _start_node(ray_cli: Path, node_args: list[str], resource: str, node_dir: Path, env: dict[str, str]) -> None:
    """Runs `ray start` (without --block: it returns once the node has registered with the head)."""
    command = [str(ray_cli), "start", *node_args, *_node_ports(), f"--temp-dir={node_dir}",
               f"--num-cpus={NODE_CPUS}", "--num-gpus=0", f"--resources={json.dumps({resource: 1})}",
               "--object-store-memory=100000000", "--disable-usage-stats"]
    # Output to a file, not a pipe: the daemons it leaves running would hold a pipe open.
    with open(node_dir.parent / f"{node_dir.name}.out", "w") as out:
        done = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                              timeout=START_TIMEOUT_S)
    output = (node_dir.parent / f"{node_dir.name}.out").read_text(errors="replace")
    assert done.returncode == 0, f"`ray start` for {resource} failed ({done.returncode}):\n{output[-3000:]}"


def _cluster_processes(tag: str) -> list[int]:
    """Pids whose environment holds the cluster's marker, or whose command line names a path in its temp dir `tag`."""
    marker, path = f"{MARKER}={tag}".encode(), f"{tag}/".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ, cmdline = (entry / "environ").read_bytes(), (entry / "cmdline").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if marker in environ.split(b"\0") or path in cmdline:
            pids.append(int(entry.name))
    return pids


def _executable(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:  # gone meanwhile
        return ""


def _terminate(tag: str, kind: Callable[[str], bool], grace_s: float) -> None:
    """SIGTERM the cluster's processes whose executable path `kind` accepts, then SIGKILL those still there after
    `grace_s`. Pids are looked up again each time, so a pid that exited and was reused is never signalled."""

    def targets() -> list[int]:
        return [pid for pid in _cluster_processes(tag) if kind(_executable(pid))]

    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in targets():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while targets() and time.monotonic() < deadline:
            time.sleep(0.1)


def stop_cluster(tag: str) -> list[int]:
    """Stops every process of the cluster in `ray stop`'s order: raylets, then the rest, then the GCS last (a raylet
    unregisters from the GCS as it stops, and hangs if the GCS went first). Returns the pids still there afterwards
    (there should be none)."""
    def is_raylet(path: str) -> bool:
        return path.endswith("/raylet")

    def is_gcs(path: str) -> bool:
        return path.endswith("/gcs_server")

    for kind in (is_raylet, lambda path: not (is_raylet(path) or is_gcs(path)), is_gcs):
        _terminate(tag, kind, grace_s=10.0)
    return _cluster_processes(tag)


# Module scope: starting the two nodes takes ~13 s, and the tests of a module can share them, each driving the
# cluster from its own driver process (whose engine gives its placement group back as it shuts down).
@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodeCluster]:
    """Starts the two nodes ({"node_a": 1} on the head, {"node_b": 1} on the other, 2 CPUs each); stops them after
    the module's last test that uses them, and fails it if any of their processes survive."""
    pytest.importorskip("ray", reason="Ray is installed with the 'serve' extra")
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists():
        ray_cli = Path(shutil.which("ray") or ray_cli)
        if not ray_cli.exists():
            pytest.skip("the `ray` CLI is not installed")
    base = tmp_path_factory.mktemp("rn")  # kept after the test (pytest's retention): `ray start` output, node logs
    short_dir_made = len(str(base)) > MAX_TEMP_DIR_LEN
    if short_dir_made:
        base = Path(tempfile.mkdtemp(prefix="rn-", dir="/tmp"))
    tag = str(base)
    # Token auth with a token of the cluster's own: Ray turns auth on for a head when ~/.ray/auth_token exists, but
    # a driver given an explicit address only sends a token with RAY_AUTH_MODE=token; both sides get it explicitly.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | auth
    node_env = env | {MARKER: tag, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # on SIGTERM, stop at once
    gcs_port, client_port = _free_ports(2)
    import ray._private.services

    address = f"{ray._private.services.get_node_ip_address()}:{gcs_port}"
    cluster = TwoNodeCluster(address, env, base)
    head_args = ["--head", f"--port={gcs_port}", f"--ray-client-server-port={client_port}", "--include-dashboard=false"]
    try:
        _start_node(ray_cli, head_args, NODE_RESOURCES[0], base / "a", node_env)
        _start_node(ray_cli, [f"--address={address}"], NODE_RESOURCES[1], base / "b", node_env)
        yield cluster
    finally:
        leftovers = stop_cluster(tag)
        if short_dir_made:
            shutil.rmtree(base, ignore_errors=True)
        assert not leftovers, f"processes of the two-node cluster survived: {leftovers}"
