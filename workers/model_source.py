"""Where a model's files are: a local checkpoint folder as given, or a Hugging Face Hub id (`org/name`) fetched into
the Hub cache and resolved to its snapshot folder.

Every place that reads the checkpoint (the model spec and tokenizer in the engine, the tokenizer in the OpenAI
routes, the weights in each worker) calls `checkpoint_dir(config)` / `tokenizer_dir(config)`, so `config.model`
stays the name the user gave (the served model name) and each process, on whichever node it runs, fetches into its
own cache. Only config, tokenizer and safetensors files are fetched, never pickled weights (`.bin`, `.pt`, ...):
unpickling runs code from the file, so a repository with only those is refused.

`revision`, `download_dir` (the cache folder), `HF_HOME` / `HF_HUB_CACHE` and `HF_HUB_OFFLINE` are honoured, the
environment read at each call (not when `huggingface_hub` was imported). Resolutions are cached per process.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rayinfer.configs import EngineConfig
from rayinfer.workers.demo_model import DEMO_MODEL_NAME, demo_model_dir

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Top-level files besides the weights: config.json, generation_config.json, the safetensors index, tokenizer files
# (tokenizer.json, tokenizer_config.json, special_tokens_map.json, vocab.json, merges.txt, tokenizer.model,
# *.tiktoken) and chat_template.jinja.
_METADATA_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja")
_REPO_ID = re.compile(r"^(?:[\w.-]{1,96}/)?[\w.-]{1,96}$")
_TRUE = {"1", "true", "yes", "on"}


class ModelSourceError(ValueError):
    """A model (or tokenizer) that cannot be found or fetched, with what to do about it."""


# ------------------------------------------------------------------------------------------------ public face
def checkpoint_dir(config: EngineConfig) -> Path:
    """The local folder holding the engine's checkpoint (fetching it first when `config.model` is a Hub id)."""
    return resolve_model_dir(config.model, config.revision, config.download_dir)


def tokenizer_dir(config: EngineConfig) -> Path:
    """The local folder holding the engine's tokenizer: the checkpoint's unless `config.tokenizer` names another."""
    if config.tokenizer is None or config.tokenizer == config.model:
        if config.tokenizer_revision in (None, config.revision):
            return checkpoint_dir(config)
        return resolve_model_dir(config.model, config.tokenizer_revision, config.download_dir, weights=False)
    try:
        return resolve_model_dir(config.tokenizer, config.tokenizer_revision, config.download_dir, weights=False)
    except ModelSourceError as exc:
        raise ModelSourceError("tokenizer: " + str(exc).removeprefix("model: ")) from None


def resolve_model_dir(
    name_or_path: str, revision: str | None = None, download_dir: str | None = None, *, weights: bool = True
) -> Path:
    """`name_or_path` itself when it is a local folder (or file) as today; else the snapshot folder of that Hub id,
    fetched if needed (with safetensors weights unless `weights` is False). `ModelSourceError` says why not."""
    if _is_local(name_or_path):
        return Path(name_or_path).expanduser()
    if name_or_path == DEMO_MODEL_NAME:  # the built-in model, inside this node's installed package
        return demo_model_dir()
    _check_hub_id(name_or_path)
    return _resolve_hub(name_or_path, revision, _cache_dir(download_dir), weights, _offline())


def check_model_source(config: EngineConfig) -> None:
    """What can be checked on this machine before starting Ray, without fetching weights: that a Hub id exists (at its
    revision) with safetensors weights, or, offline, is in this machine's cache. A local path is not checked here
    (it may exist only on the cluster's other nodes), as before Hub ids."""
    sources = [(config.model, config.revision, True)]
    if config.tokenizer is not None and config.tokenizer != config.model:
        sources.append((config.tokenizer, config.tokenizer_revision, False))
    for name, revision, weights in sources:
        if _is_local(name) or _looks_like_path(name) or name == DEMO_MODEL_NAME:
            continue
        _check_hub_id(name)
        cache_dir = _cache_dir(config.download_dir)
        if _offline():
            _cached_snapshot(name, revision, cache_dir, weights, reason=None)
            continue
        try:
            _listed_files(name, revision, cache_dir, weights)
        except _Unreachable as exc:
            _cached_snapshot(name, revision, cache_dir, weights, reason=str(exc))


# ------------------------------------------------------------------------------------------------ names
def _is_local(name: str) -> bool:
    return Path(name).expanduser().exists()


def _looks_like_path(name: str) -> bool:
    return (
        name in (".", "..")
        or name.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or os.path.isabs(name)
        or "\\" in name
        or name.count("/") > 1
    )


def _check_hub_id(name: str) -> None:
    if _looks_like_path(name):
        raise ModelSourceError(f"model: no such folder {name!r} (a local checkpoint path that does not exist here)")
    if not _REPO_ID.fullmatch(name) or "--" in name or ".." in name or name.endswith((".git", "/")):
        raise ModelSourceError(
            f"model: {name!r} is neither an existing local folder nor a Hugging Face Hub id (like 'org/name')"
        )


def _offline() -> bool:
    if any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cache_dir(download_dir: str | None) -> str:
    """The Hub cache to use: `download_dir`, else HF_HUB_CACHE, else $HF_HOME/hub, else huggingface_hub's own."""
    if download_dir:
        return str(Path(download_dir).expanduser())
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return str(Path(os.path.expandvars(os.environ[var])).expanduser())
    if os.environ.get("HF_HOME"):
        return str(Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub")
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _label(repo_id: str, revision: str | None) -> str:
    return repo_id if revision is None else f"{repo_id}@{revision}"


# ------------------------------------------------------------------------------------------------ choosing files
def metadata_files(files: Iterable[str]) -> list[str]:
    """The top-level config and tokenizer files of a repository listing (pickled weights' index files left out)."""
    return sorted(
        name for name in files
        if "/" not in name and name.endswith(_METADATA_SUFFIXES)
        and not (name.endswith(".index.json") and not name.endswith(".safetensors.index.json"))
    )


def safetensors_files(files: Iterable[str], label: str) -> list[str]:
    """The top-level safetensors weights of a listing; refuses a repository with only pickled weights."""
    files = list(files)
    weights = sorted(name for name in files if "/" not in name and name.endswith(".safetensors"))
    if weights:
        return weights
    pickled = sorted(name for name in files if name.endswith(PICKLED_SUFFIXES))
    if pickled:
        shown = ", ".join(pickled[:4]) + (", ..." if len(pickled) > 4 else "")
        raise ModelSourceError(
            f"model: {label} has only pickled PyTorch weights ({shown}) and no *.safetensors; rayinfer loads "
            f"safetensors only (unpickling can run arbitrary code): use a repository or revision with safetensors "
            f"weights, or convert these and pass the converted folder"
        )
    raise ModelSourceError(f"model: {label} has no *.safetensors weights; it is not a checkpoint rayinfer can load")


def shards_from_index(index_path: str | Path) -> list[str]:
    return sorted(set(json.loads(Path(index_path).read_text())["weight_map"].values()))


# ------------------------------------------------------------------------------------------------ the Hub
@functools.lru_cache(maxsize=None)
def _resolve_hub(repo_id: str, revision: str | None, cache_dir: str, weights: bool, offline: bool) -> Path:
    """The snapshot folder of `repo_id` at `revision`, downloaded when online (the cache otherwise). Only
    successes are cached, so a fixed problem (a login, the network) is retried on the next call."""
    if offline:
        return _cached_snapshot(repo_id, revision, cache_dir, weights, reason=None)
    from huggingface_hub import snapshot_download

    try:
        wanted = _listed_files(repo_id, revision, cache_dir, weights)
        logger.info("fetching %s (%d files) into %s", _label(repo_id, revision), len(wanted), cache_dir)
        folder = _hub_call(
            repo_id, revision,
            lambda: snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=wanted),
        )
    except _Unreachable as exc:  # no network, the Hub down: the cache may still have it
        logger.warning("could not reach the Hugging Face Hub for %s (%s); trying the local cache", repo_id, exc)
        return _cached_snapshot(repo_id, revision, cache_dir, weights, reason=str(exc))
    return _checked_folder(Path(folder), _label(repo_id, revision), weights)


class _Unreachable(Exception):
    """The Hub could not be asked (no network, offline mode, a server error): fall back to the cache."""


def _listed_files(repo_id: str, revision: str | None, cache_dir: str, weights: bool) -> list[str]:
    """The files to fetch, from the repository's listing (one API call, plus the safetensors index when sharded);
    raises `ModelSourceError` for a missing or gated repository or revision, or one with only pickled weights."""
    from huggingface_hub import HfApi, hf_hub_download

    label = _label(repo_id, revision)
    info = _hub_call(repo_id, revision, lambda: HfApi().model_info(repo_id, revision=revision))
    files = [sibling.rfilename for sibling in (info.siblings or [])]
    wanted = metadata_files(files)
    if weights:
        if "config.json" not in files:
            raise ModelSourceError(f"model: {label} on the Hugging Face Hub has no config.json; it is not a "
                                   f"Transformers checkpoint")
        if SAFETENSORS_INDEX in files:
            index = _hub_call(repo_id, revision, lambda: hf_hub_download(
                repo_id, SAFETENSORS_INDEX, revision=revision, cache_dir=cache_dir))
            wanted += shards_from_index(index)
        else:
            wanted += safetensors_files(files, label)
    return wanted


def _hub_call(repo_id: str, revision: str | None, call: Any) -> Any:
    """Runs a huggingface_hub call, turning its errors into `ModelSourceError` (what is wrong and what to do) or
    `_Unreachable` (try the cache)."""
    from huggingface_hub.utils import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    label = _label(repo_id, revision)
    try:
        return call()
    except GatedRepoError:  # before RepositoryNotFoundError: older huggingface_hub derives it from that
        raise ModelSourceError(
            f"model: {repo_id} is gated on the Hugging Face Hub: accept its terms at https://huggingface.co/{repo_id} "
            f"and give a token that may read it (HF_TOKEN, or `hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelSourceError(
            f"model: {repo_id!r} is not a local folder and no model {repo_id!r} was found on the Hugging Face Hub; "
            f"check the id (or the path), or set HF_TOKEN if it is private"
        ) from None
    except RevisionNotFoundError:
        raise ModelSourceError(
            f"model: {repo_id} has no revision {revision!r} on the Hugging Face Hub (a branch, tag or commit hash)"
        ) from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise ModelSourceError(f"model: the Hugging Face Hub refused access to {label} (HTTP {status}); set "
                                   f"HF_TOKEN to a token that may read it") from None
        raise _Unreachable(f"HTTP {status}: {_first_line(exc)}") from exc
    except (ConnectionError, TimeoutError, OSError) as exc:
        raise _Unreachable(f"{type(exc).__name__}: {_first_line(exc)}") from exc
    except Exception as exc:  # the HTTP client's own connection errors (requests or httpx, by version)
        if any(word in type(exc).__name__ for word in ("Connect", "Timeout", "Network", "Proxy")):
            raise _Unreachable(f"{type(exc).__name__}: {_first_line(exc)}") from exc
        raise


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _cached_snapshot(repo_id: str, revision: str | None, cache_dir: str, weights: bool, reason: str | None) -> Path:
    """The snapshot folder already in the cache (no network), checked for the files the engine reads."""
    from huggingface_hub import snapshot_download

    label = _label(repo_id, revision)
    why = "HF_HUB_OFFLINE is set" if reason is None else f"the Hub could not be reached ({reason})"
    try:
        # Only config.json is asked for: the cache's record of the repository lists files never fetched (pickled
        # weights, subfolders), which must not make the snapshot count as incomplete; the weights are checked below.
        folder = snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True,
            allow_patterns=["config.json"] if weights else [],
        )
    except Exception as exc:  # LocalEntryNotFoundError / IncompleteSnapshotError, by huggingface_hub version
        raise ModelSourceError(
            f"model: {label} is not a local folder, and is not in the Hugging Face cache at {cache_dir} while {why}; "
            f"fetch it once with network access (unset HF_HUB_OFFLINE), or point --download-dir (or HF_HUB_CACHE, "
            f"HF_HOME) at a cache that holds it ({type(exc).__name__})"
        ) from None
    return _checked_folder(Path(folder), label, weights, cached=True)


def _checked_folder(folder: Path, label: str, weights: bool, cached: bool = False) -> Path:
    """The folder, once it holds what the engine reads: config.json and every safetensors file of the checkpoint."""
    if not weights:
        return folder
    where = f"the cached snapshot of {label} ({folder})" if cached else label
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"model: {where} has no config.json; it is not a Transformers checkpoint")
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        missing = [name for name in shards_from_index(index) if not (folder / name).is_file()]
        if missing:
            raise ModelSourceError(
                f"model: {where} lacks {len(missing)} weight file(s) ({', '.join(missing[:3])}); fetch it again with "
                f"network access to complete it"
            )
        return folder
    names = [p.name for p in folder.iterdir()]
    if cached and not any(name.endswith((".safetensors",) + PICKLED_SUFFIXES) for name in names):
        raise ModelSourceError(
            f"model: {where} holds no *.safetensors weights (perhaps only part of the repository was fetched); "
            f"fetch it again with network access"
        )
    safetensors_files(names, where)
    return folder


__all__ = [
    "ModelSourceError",
    "check_model_source",
    "checkpoint_dir",
    "metadata_files",
    "resolve_model_dir",
    "safetensors_files",
    "tokenizer_dir",
]
