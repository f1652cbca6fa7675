"""Hub ids as models (`workers/model_source.py`): resolution through a Hugging Face cache laid out as
huggingface_hub writes it (no network here: offline, or with the Hub's API stood in), the refusal of pickled-only
repositories, errors that name the id and what to do, and the engine and server keeping the id as the model's
name while reading the snapshot's files."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from rayinfer.configs import EngineConfig
from rayinfer.workers.model_source import (
    ModelSourceError,
    check_model_source,
    checkpoint_dir,
    metadata_files,
    resolve_model_dir,
    safetensors_files,
    tokenizer_dir,
)

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def add_commit(cache: Path, repo_id: str, files: dict[str, bytes], commit: str, refs: tuple[str, ...] = ()) -> Path:
    """Writes one commit of a model repository into a Hub cache as huggingface_hub does (content-addressed blobs,
    a snapshot folder of relative symlinks, refs naming commits) and returns its snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def hub_cache(tmp_path: Path, llama_dir: Path) -> Path:
    """A cache holding org/tiny (main: the tiny Llama; tag v2: the same with another generation config), a
    pickled-only org/pickled, and org/sharded-partial whose index names a shard never fetched."""
    cache = tmp_path / "hub"
    files = folder_files(llama_dir)
    add_commit(cache, "org/tiny", files, COMMIT_A, refs=("main",))
    add_commit(cache, "org/tiny", files | {"generation_config.json": b'{"eos_token_id": 3}'}, COMMIT_B, refs=("v2",))
    add_commit(cache, "org/pickled", {"config.json": files["config.json"], "pytorch_model.bin": b"pickle"},
               COMMIT_A, refs=("main",))
    index = b'{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}'
    add_commit(cache, "org/sharded-partial", {"config.json": files["config.json"], "model.safetensors.index.json": index,
               "model-00001-of-00002.safetensors": b"x"}, COMMIT_A, refs=("main",))
    return cache


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, hub_cache: Path) -> Path:
    for var in ("HF_HOME", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    return hub_cache


def test_hub_id_resolves_to_its_cached_snapshot(offline: Path) -> None:
    snapshot = offline / "models--org--tiny" / "snapshots" / COMMIT_A
    assert resolve_model_dir("org/tiny") == snapshot
    config = EngineConfig(model="org/tiny")
    assert checkpoint_dir(config) == snapshot and tokenizer_dir(config) == snapshot
    assert config.model == "org/tiny"


def test_revision_picks_a_branch_tag_or_commit(offline: Path) -> None:
    snapshots = offline / "models--org--tiny" / "snapshots"
    assert resolve_model_dir("org/tiny", revision="v2") == snapshots / COMMIT_B
    assert resolve_model_dir("org/tiny", revision=COMMIT_B) == snapshots / COMMIT_B
    assert resolve_model_dir("org/tiny", revision="main") == snapshots / COMMIT_A
    with pytest.raises(ModelSourceError, match=r"org/tiny@v3 is not a local folder, and is not in the Hugging Face "
                                               r"cache .* HF_HUB_OFFLINE is set"):
        resolve_model_dir("org/tiny", revision="v3")


def test_download_dir_and_hf_home_choose_the_cache(offline: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ModelSourceError, match="not in the Hugging Face cache"):
        resolve_model_dir("org/tiny")
    assert resolve_model_dir("org/tiny", download_dir=str(offline)).parent.name == "snapshots"
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(offline.parent))  # the cache is $HF_HOME/hub
    assert resolve_model_dir("org/tiny") == offline / "models--org--tiny" / "snapshots" / COMMIT_A


def test_tokenizer_may_come_from_another_id(offline: Path, llama_dir: Path) -> None:
    snapshots = offline / "models--org--tiny" / "snapshots"
    assert tokenizer_dir(EngineConfig(model=str(llama_dir), tokenizer="org/tiny")) == snapshots / COMMIT_A
    config = EngineConfig(model=str(llama_dir), tokenizer="org/tiny", tokenizer_revision="v2")
    assert tokenizer_dir(config) == snapshots / COMMIT_B and checkpoint_dir(config) == llama_dir
    assert tokenizer_dir(EngineConfig(model="org/tiny", revision="v2")) == snapshots / COMMIT_B
    with pytest.raises(ModelSourceError, match="^tokenizer: org/none is not a local folder"):
        tokenizer_dir(EngineConfig(model=str(llama_dir), tokenizer="org/none"))


def test_pickled_only_repository_is_refused(offline: Path) -> None:
    with pytest.raises(ModelSourceError, match=r"org/pickled .* only pickled PyTorch weights \(pytorch_model\.bin\) "
                                               r"and no \*\.safetensors"):
        resolve_model_dir("org/pickled")


def test_partly_cached_sharded_checkpoint_names_what_is_missing(offline: Path) -> None:
    with pytest.raises(ModelSourceError, match="lacks 1 weight file.*model-00002-of-00002.safetensors"):
        resolve_model_dir("org/sharded-partial")


def test_missing_id_and_missing_path_say_which_they_are(offline: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError) as missing:
        resolve_model_dir("org/missing")
    message = str(missing.value)
    assert "org/missing" in message and "HF_HUB_OFFLINE" in message and "--download-dir" in message
    assert "Traceback" not in message and missing.value.__cause__ is None
    for path in ("./nope", str(tmp_path / "nope"), "~/nope/x", "a/b/c"):
        with pytest.raises(ModelSourceError, match=r"no such folder .* does not exist here"):
            resolve_model_dir(path)
    with pytest.raises(ModelSourceError, match="neither an existing local folder nor a Hugging Face Hub id"):
        resolve_model_dir("org/not valid!")


def test_local_folder_is_used_as_given(offline: Path, llama_dir: Path) -> None:
    assert resolve_model_dir(str(llama_dir)) == llama_dir
    assert resolve_model_dir(str(llama_dir), revision="v2") == llama_dir  # revisions are for Hub ids
    # Before Ray starts, a local path is not checked: it may exist only on the cluster's other nodes.
    check_model_source(EngineConfig(model=str(llama_dir / "missing")))


def test_file_choice_takes_config_tokenizer_and_safetensors_only() -> None:
    listing = [
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
        "special_tokens_map.json", "merges.txt", "chat_template.jinja", "README.md", ".gitattributes",
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
        "pytorch_model.bin", "pytorch_model.bin.index.json", "original/consolidated.00.pth", "original/params.json",
        "onnx/model.onnx",
    ]
    assert metadata_files(listing) == [
        "chat_template.jinja", "config.json", "generation_config.json", "merges.txt", "model.safetensors.index.json",
        "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
    ]
    assert safetensors_files(listing, "org/x") == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    with pytest.raises(ModelSourceError, match=r"only pickled .*model\.pt, pytorch_model\.bin"):
        safetensors_files(["config.json", "pytorch_model.bin", "model.pt"], "org/x")


class FakeHub:
    """Stands in for the Hub's API: a listing per repository, downloads copied from `files`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, listing: list[str], snapshot: Path | None = None,
                 error: BaseException | None = None) -> None:
        import huggingface_hub
        from huggingface_hub import constants

        self.listing, self.snapshot, self.error, self.fetched = listing, snapshot, error, None
        self.real_snapshot_download = huggingface_hub.snapshot_download
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: self)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self.snapshot_download)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", self.hf_hub_download)

    def model_info(self, repo_id: str, revision: str | None = None) -> SimpleNamespace:
        if self.error is not None:
            raise self.error
        return SimpleNamespace(sha=COMMIT_A, siblings=[SimpleNamespace(rfilename=name) for name in self.listing])

    def hf_hub_download(self, repo_id: str, filename: str, **kwargs: object) -> str:
        return str(self.snapshot / filename)

    def snapshot_download(self, repo_id: str, *, allow_patterns: list[str], local_files_only: bool = False,
                          **kwargs: object) -> str:
        if local_files_only:  # the cache is real
            return self.real_snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=True, **kwargs)
        self.fetched = allow_patterns
        return str(self.snapshot)


def test_online_fetch_asks_for_the_index_shards_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    snapshot = tmp_path / "snap"
    snapshot.mkdir()
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors.index.json").write_text('{"weight_map": {"w": "model-00001-of-00001.safetensors"}}')
    (snapshot / "model-00001-of-00001.safetensors").write_bytes(b"x")
    listing = ["config.json", "model.safetensors.index.json", "model-00001-of-00001.safetensors",
               "consolidated.safetensors", "pytorch_model.bin", "tokenizer.json", "original/params.json"]
    hub = FakeHub(monkeypatch, listing, snapshot)
    assert resolve_model_dir("org/online-sharded", download_dir=str(tmp_path / "cache")) == snapshot
    assert sorted(hub.fetched) == ["config.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json",
                                   "tokenizer.json"]


def test_online_pickled_only_is_refused_before_any_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hub = FakeHub(monkeypatch, ["config.json", "pytorch_model.bin", "tokenizer.json"])
    for check in (lambda: resolve_model_dir("org/online-pickled", download_dir=str(tmp_path)),
                  lambda: check_model_source(EngineConfig(model="org/online-pickled", download_dir=str(tmp_path)))):
        with pytest.raises(ModelSourceError, match="org/online-pickled has only pickled PyTorch weights"):
            check()
    assert hub.fetched is None


def test_online_errors_become_messages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub.utils import RepositoryNotFoundError

    not_found = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
    Exception.__init__(not_found, "404 Client Error")
    FakeHub(monkeypatch, [], error=not_found)
    with pytest.raises(ModelSourceError, match=r"no model 'org/gone' was found on the Hugging Face Hub; check the id"):
        resolve_model_dir("org/gone", download_dir=str(tmp_path))
    FakeHub(monkeypatch, [], error=ConnectionError("Failed to resolve huggingface.co"))
    with pytest.raises(ModelSourceError, match=r"the Hub could not be reached \(ConnectionError: Failed to resolve"):
        resolve_model_dir("org/unreachable", download_dir=str(tmp_path))


def test_unreachable_hub_falls_back_to_the_cache(monkeypatch: pytest.MonkeyPatch, hub_cache: Path) -> None:
    FakeHub(monkeypatch, [], error=ConnectionError("no network"))
    assert resolve_model_dir("org/tiny", revision="v2", download_dir=str(hub_cache)).name == COMMIT_B


# ------------------------------------------------------------------------------------------------ end to end
def test_llm_by_hub_id_generates_as_by_folder_and_keeps_the_id(offline: Path, llama_dir: Path) -> None:
    from rayinfer.cluster import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outputs = {}
    for model in (str(llama_dir), "org/tiny"):
        llm = LLM(model, dtype="float32", download_dir=str(offline))
        try:
            outputs[model] = [o.outputs[0].token_ids for o in llm.generate(["Hello world", "Once upon"], params,
                                                                            use_tqdm=False)]
            assert llm.engine.config.model == model
        finally:
            llm.shutdown()
    assert outputs["org/tiny"] == outputs[str(llama_dir)] and len(outputs["org/tiny"][0]) == 12
    with pytest.raises(ValueError, match="org/missing"):
        LLM("org/missing")


def test_cli_takes_hub_ids_and_fails_before_ray(offline: Path, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from rayinfer.cluster.cli import _served_apps, build_parser, main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--download-dir" in help_text and "--revision" in help_text and "or a Hub id (org/name)" in help_text
    ray = pytest.importorskip("ray", reason="Ray is installed with the 'serve' extra")
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started before the model was checked"))
    args = build_parser().parse_args(["serve", "--model", "org/tiny", "--revision", "v2"])
    _, _, apps = _served_apps(args)
    assert apps[0].args["model"] == "org/tiny" and apps[0].args["revision"] == "v2"
    assert main(["serve", "--model", "org/missing", "--ray-address", "local"]) == 2
    assert "org/missing" in capsys.readouterr().err
    assert main(["serve", "--model", "org/pickled"]) == 2
    assert "only pickled PyTorch weights" in capsys.readouterr().err
    assert main(["generate", "--model", "org/missing", "Hello"]) == 2
    assert "org/missing" in capsys.readouterr().err


def test_server_serves_the_id_and_reads_the_snapshot_tokenizer(offline: Path) -> None:
    pytest.importorskip("ray", reason="Ray is installed with the 'serve' extra")
    from rayinfer.cluster.openai.routes import LLMServer
    from rayinfer.cluster.serve_app import build_app

    app = build_app(EngineConfig(model="org/tiny", device="cpu"))
    config, served_name = app._bound_deployment.init_args
    assert served_name == "org/tiny"

    class NoEngine:
        def __init__(self, config: EngineConfig) -> None:
            pass

        def info(self) -> dict:
            return {"max_model_len": 64, "model": config.model}

        def shutdown(self) -> None:
            pass

    routes = LLMServer.func_or_class.__mro__[1]  # the class under Serve's ingress wrapper, whose __init__ is async
    server = routes(config, served_name, engine_factory=NoEngine)
    assert server.model_name == "org/tiny" and server.tokenizer.encode("Hello world")


@pytest.mark.parametrize("field", ["revision", "tokenizer_revision", "download_dir"])
def test_blank_hub_settings_are_refused(field: str) -> None:
    with pytest.raises(ValueError, match=f"{field} must be non-empty when given"):
        EngineConfig(model="org/tiny", **{field: " "})
