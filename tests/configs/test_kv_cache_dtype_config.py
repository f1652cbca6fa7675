"""EngineConfig.kv_cache_dtype: its values, vLLM's alias, the error for anything else, and the CLI flag that
reaches it (every EngineConfig field is a flag of `rayinfer generate` and `rayinfer serve`)."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from rayinfer.cluster.cli import _engine_kwargs, build_parser
from rayinfer.configs import EngineConfig


@pytest.mark.parametrize(
    ("given", "stored"),
    [("auto", "auto"), ("fp8", "fp8"), ("fp8_e4m3", "fp8"), (" INT8 ", "int8"), ("FP8_E4M3", "fp8")],
)
def test_accepted_values_and_aliases(given: str, stored: str) -> None:
    assert EngineConfig(model="m", kv_cache_dtype=given).kv_cache_dtype == stored


def test_default_is_auto() -> None:
    assert EngineConfig(model="m").kv_cache_dtype == "auto"


@pytest.mark.parametrize("bad", ["fp8_e5m2", "float16", "", 8, ["fp8"]])
def test_anything_else_is_an_error_naming_the_field(bad: object) -> None:
    with pytest.raises(ValidationError, match=r"kv_cache_dtype must be one of auto, fp8, int8"):
        EngineConfig(model="m", kv_cache_dtype=bad)


def test_the_cli_flag_reaches_the_config() -> None:
    args = build_parser().parse_args(["generate", "--kv-cache-dtype", "fp8_e4m3", "Hello"])
    assert EngineConfig(model="m", **_engine_kwargs(args)).kv_cache_dtype == "fp8"
