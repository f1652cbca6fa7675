"""The `ray up` configs in configs/cluster/: Ray's own validation, and the layout rayinfer needs.

Every launcher config must pass what `ray up` runs before it talks to a cloud (Ray's JSON schema on the file as
written, `prepare_config` filling in the provider defaults, `validate_config` on the result), and keep the
layout the Serve app relies on: a head node that no CPU or GPU work is placed on, GPU worker types the
autoscaler can add when Serve adds engine replicas, rayinfer installed on every node, an idle timeout.
Nothing here contacts a cloud provider. `fake_multinode.yaml` is not a `ray up` config (the autoscaler reads it
as is) and has its own tests.
"""
from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="installed with the 'serve' extra (pyyaml)")
jsonschema = pytest.importorskip("jsonschema", reason="Ray's cluster-config schema check needs it (installed with ray)")
pytest.importorskip("ray", reason="Ray is installed with the 'serve' extra")

import ray.autoscaler  # noqa: E402
from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary  # noqa: E402
from ray.autoscaler._private.resource_demand_scheduler import (  # noqa: E402
    _default_utilization_scorer,
    get_bin_pack_residual,
    get_nodes_for,
)
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CLUSTER_DIR = REPO / "configs" / "cluster"
NOT_RAY_UP = {"fake_multinode.yaml"}
CONFIGS = sorted(p for p in CLUSTER_DIR.glob("*.yaml") if p.name not in NOT_RAY_UP)

# `pip install [-e] "<path>[serve]"` from a folder, or `pip install "rayinfer[serve] @ <url>"`.
_INSTALL_FROM_PATH = re.compile(r"""pip install (?:-e |--editable )?["']?(?P<path>(?:\$HOME|~)/[^\s"'\[]+)\[serve\]""")
_INSTALL_BY_NAME = re.compile(r"""pip install .*rayinfer\[serve\]""")


@functools.cache
def _schema() -> dict[str, Any]:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def load_cluster_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the file as written, the config `ray up` goes on with): raises what `ray up` would raise offline."""
    raw = yaml.safe_load(path.read_text())
    # The file itself, before defaults hide anything: the schema forbids unknown (misspelt) keys.
    jsonschema.validate(raw, _schema())
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return raw, prepared


def _gpu_types(config: dict[str, Any]) -> list[str]:
    head = config["head_node_type"]
    return [name for name, t in config["available_node_types"].items()
            if name != head and t.get("resources", {}).get("GPU", 0) >= 1]


def _installs_rayinfer(commands: list[str], file_mounts: dict[str, str], repo_root: Path) -> str | None:
    """None when one of `commands` installs rayinfer with its serve extra, else why not."""
    for cmd in commands:
        match = _INSTALL_FROM_PATH.search(cmd)
        if match:
            remote = match["path"].replace("$HOME", "~", 1)
            if remote not in file_mounts:
                return f"{cmd!r} installs from {remote}, which no file_mounts entry fills"
            local = repo_root / file_mounts[remote]  # `ray up` runs from the repository root
            pyproject = local / "pyproject.toml"
            if not pyproject.is_file() or 'name = "rayinfer"' not in pyproject.read_text():
                return f"file_mounts[{remote!r}] = {file_mounts[remote]!r} is not a rayinfer checkout"
            return None
        if _INSTALL_BY_NAME.search(cmd):
            return None
    return f"no command installs rayinfer[serve]: {commands}"


def layout_problems(raw: dict[str, Any], prepared: dict[str, Any], repo_root: Path = REPO) -> list[str]:
    """What keeps the config from serving rayinfer as intended; empty when nothing does."""
    problems = []
    if raw.get("idle_timeout_minutes") is None or raw["idle_timeout_minutes"] <= 0:
        problems.append("idle_timeout_minutes is not set to a positive number of minutes")

    types = prepared["available_node_types"]
    head_name = prepared["head_node_type"]
    head = types[head_name]["resources"]
    if head.get("CPU") != 0 or head.get("GPU", 0) != 0:
        problems.append(f"head node type {head_name!r} must advertise CPU: 0 and no GPU, not {head}")

    gpu_types = _gpu_types(prepared)
    if not gpu_types:
        problems.append("no worker node type advertises a GPU")
    for name in gpu_types:
        t = types[name]
        if not 0 <= t["min_workers"] <= t["max_workers"] or t["max_workers"] < 1:
            problems.append(f"{name}: need 0 <= min_workers <= max_workers and max_workers >= 1, "
                            f"got {t['min_workers']}..{t['max_workers']}")

    if not raw.get("setup_commands"):
        problems.append("setup_commands is empty: rayinfer would be installed on no node")
    mounts = prepared.get("file_mounts", {})
    # After prepare_config these hold setup_commands + the head's / workers' own; a node type's own
    # worker_setup_commands replace both for that type.
    node_commands = {head_name: prepared["head_setup_commands"]}
    node_commands.update({name: types[name].get("worker_setup_commands", prepared["worker_setup_commands"])
                          for name in gpu_types})
    for name, commands in node_commands.items():
        if (why := _installs_rayinfer(commands, mounts, repo_root)) is not None:
            problems.append(f"{name}: {why}")
    if "." in mounts.values() and ".gitignore" not in prepared.get("rsync_filter", []):
        problems.append("the checkout is mounted without rsync_filter: [.gitignore] (it would ship .venv)")

    def flat(cmds: list[str]) -> str:
        return " ".join(" ".join(cmds).split())

    head_start, worker_start = flat(prepared["head_start_ray_commands"]), flat(prepared["worker_start_ray_commands"])
    if "ray start --head" not in head_start or "--autoscaling-config=~/ray_bootstrap_config.yaml" not in head_start:
        problems.append(f"head_start_ray_commands do not start an autoscaling head: {head_start!r}")
    if "ray start --address=$RAY_HEAD_IP:6379" not in worker_start:
        problems.append(f"worker_start_ray_commands do not join the head: {worker_start!r}")

    image = prepared.get("docker", {}).get("image")
    if image:
        tag = re.fullmatch(r"rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)-py3(\d+)-(?:gpu|cu\d+)", image)
        if tag is None:
            problems.append(f"docker image {image!r} is not a version-pinned rayproject/ray GPU image")
        elif int(tag[2]) < 10:
            problems.append(f"docker image {image!r} has Python < 3.10 (rayinfer needs >= 3.10)")
    return problems


def test_the_cloud_configs_are_there() -> None:
    assert {"aws.yaml", "gcp.yaml", "aws-llama3-70b-pp.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_passes_ray_validation_and_keeps_rayinfer_layout(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # file_mounts' local side is relative to where `ray up` runs
    raw, prepared = load_cluster_config(path)
    assert path.stem.startswith(raw["provider"]["type"]), "each file is named after its provider"
    assert layout_problems(raw, prepared) == []


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_autoscaler_puts_engine_work_on_gpu_workers_only(path: Path) -> None:
    """Ray's own bin packing: nothing needing a CPU or GPU fits on the head, and GPU bundles (one per
    tensor-parallel rank of each engine replica) make the autoscaler add GPU worker nodes up to max_workers."""
    _, config = load_cluster_config(path)
    types, head = config["available_node_types"], config["head_node_type"]
    residual, _ = get_bin_pack_residual([types[head]["resources"]], [{"GPU": 1}, {"CPU": 1}])
    assert len(residual) == 2, "a GPU or CPU bundle fits on the head node"

    gpu = _gpu_types(config)[0]
    cap = min(types[gpu]["max_workers"], config["max_workers"])
    demands = [{"GPU": 1}] * (types[gpu]["resources"]["GPU"] * cap + 1)  # one replica more than fits
    scorer = functools.partial(_default_utilization_scorer,
                               node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))
    to_add, unplaced = get_nodes_for(types, {head: 1}, head, config["max_workers"], demands, scorer)
    assert dict(to_add) == {gpu: cap}
    assert unplaced == [{"GPU": 1}], "the replica beyond max_workers must stay pending"


def test_pipeline_config_keeps_one_tp4_x_pp2_replica_warm_on_two_nodes() -> None:
    """Llama-3-70B at TP=4 x PP=2: a stage's 4 GPUs on one node, the two stages on two nodes. Ray's bin packing
    must need exactly two of the GPU nodes for one replica, whether its 8 ranks ask for a GPU each or its two
    stages for 4 GPUs each, and min_workers must keep those two nodes up."""
    _, config = load_cluster_config(CLUSTER_DIR / "aws-llama3-70b-pp.yaml")
    types, head = config["available_node_types"], config["head_node_type"]
    (gpu,) = _gpu_types(config)
    assert types[gpu]["resources"]["GPU"] == 4
    assert types[gpu]["min_workers"] == 2
    assert config["max_workers"] % 2 == 0, "a replica takes two whole nodes"
    scorer = functools.partial(_default_utilization_scorer,
                               node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))
    for replica in ([{"GPU": 1}] * 8, [{"GPU": 4}] * 2):
        to_add, unplaced = get_nodes_for(types, {head: 1}, head, config["max_workers"], replica, scorer)
        assert (dict(to_add), unplaced) == ({gpu: 2}, []), replica


# ----------------------------------------------------------------------------- the checks catch broken files
def _misspell(old: str, new: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        assert re.search(rf"^\s*{old}:", text, flags=re.M), f"{old} not in the file"
        return re.sub(rf"^(\s*){old}:", rf"\1{new}:", text, count=1, flags=re.M)
    return edit


def _edit_data(change: Callable[[dict[str, Any]], None]) -> Callable[[str], str]:
    def edit(text: str) -> str:
        data = yaml.safe_load(text)
        change(data)
        return yaml.safe_dump(data, sort_keys=False)
    return edit


def _head(data: dict[str, Any]) -> dict[str, Any]:
    return data["available_node_types"][data["head_node_type"]]


def _gpu_worker(data: dict[str, Any]) -> dict[str, Any]:
    return data["available_node_types"][_gpu_types(data)[0]]


def _drop_install(data: dict[str, Any]) -> None:
    data["setup_commands"] = [c for c in data["setup_commands"] if "rayinfer" not in c] or ["true"]


# (what is broken, the edit, the error Ray raises or None, the layout problem reported or None)
BREAKAGES = [
    ("misspelt top-level key", _misspell("idle_timeout_minutes", "idle_timeout_minuts"),
     jsonschema.ValidationError, None),
    ("misspelt node-type key", _misspell("min_workers", "min_worker"), jsonschema.ValidationError, None),
    ("head type not defined", _edit_data(lambda d: d.update(head_node_type="no_such_type")), ValueError, None),
    ("min_workers over global max_workers",
     _edit_data(lambda d: (_gpu_worker(d).update(min_workers=1), d.update(max_workers=0))), ValueError, None),
    ("negative GPU count", _edit_data(lambda d: _gpu_worker(d)["resources"].update(GPU=-1)),
     jsonschema.ValidationError, None),
    ("head advertises CPUs", _edit_data(lambda d: _head(d)["resources"].update(CPU=4)), None, "head node type"),
    ("head without resources override", _edit_data(lambda d: _head(d).update(resources={})), None, "head node type"),
    ("no GPU worker", _edit_data(lambda d: _gpu_worker(d)["resources"].pop("GPU")), None, "advertises a GPU"),
    ("GPU min_workers above max_workers", _edit_data(lambda d: _gpu_worker(d).update(min_workers=3, max_workers=2)),
     None, "min_workers <= max_workers"),
    ("rayinfer not installed", _edit_data(_drop_install), None, "installs rayinfer"),
    ("checkout not mounted", _edit_data(lambda d: d.update(file_mounts={})), None, "no file_mounts entry"),
    ("no idle timeout", _edit_data(lambda d: d.pop("idle_timeout_minutes")), None, "idle_timeout_minutes"),
]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize(("what", "edit", "error", "problem"), BREAKAGES, ids=[b[0] for b in BREAKAGES])
def test_a_broken_copy_is_rejected(
    path: Path, what: str, edit: Callable[[str], str], error: type[Exception] | None, problem: str | None,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(REPO)
    broken = tmp_path / path.name
    broken.write_text(edit(path.read_text()))
    if error is not None:
        with pytest.raises(error):
            load_cluster_config(broken)
        return
    raw, prepared = load_cluster_config(broken)  # valid for Ray, wrong for rayinfer
    problems = layout_problems(raw, prepared)
    assert any(problem in p for p in problems), f"{what}: not reported in {problems}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_dashboard_on_loopback_and_token_auth_on_every_node(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    head, workers = " ".join(raw["head_start_ray_commands"]), " ".join(raw["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for commands in (head, workers):
        assert "export RAY_AUTH_MODE=token;" in commands
        assert commands.index("RAY_AUTH_MODE") < commands.index("ray start"), commands
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # one token for every node and client
