"""Engine arguments a user sets when starting an engine, checked at the edge.

Names and defaults follow vLLM's engine args so users can carry their settings over. Limits that depend
on the checkpoint (its maximum context length) are resolved later by `resolved_limits`, once the model's
`config.json` has been read.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

Dtype = Literal["auto", "float32", "bfloat16", "float16"]

# Short spellings users type on command lines; normalised so the rest of the engine sees four names.
DTYPE_ALIASES: dict[str, str] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
KV_CACHE_DTYPES = ("auto", "fp8", "int8")
KV_CACHE_DTYPE_ALIASES: dict[str, str] = {"fp8_e4m3": "fp8"}  # vLLM's spelling of the same format
# Token budget per step when chunked prefill is on and the user gave none.
DEFAULT_CHUNKED_MAX_NUM_BATCHED_TOKENS = 2048
MAX_BLOCK_SIZE = 256


class EngineConfig(BaseModel):
    """Engine arguments; a misspelt name is an error (extra="forbid") rather than silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # A local checkpoint folder, or a Hugging Face Hub id (`org/name`) fetched into the Hub cache
    # (rayinfer.workers.model_source); the name stays as given, and is the served model name by default.
    model: str
    tokenizer: str | None = None
    revision: str | None = Field(None, description="Hub revision of a model given by Hub id: branch, tag or commit "
                                 "hash (default: main)")
    tokenizer_revision: str | None = Field(None, description="Hub revision of the tokenizer (default: --revision "
                                           "when the tokenizer is the model's, else main)")
    download_dir: str | None = Field(None, description="Hugging Face cache folder that Hub models are fetched into "
                                     "and read from (default: HF_HUB_CACHE, else $HF_HOME/hub)")
    dtype: Dtype = "auto"
    # The checkpoint's quantisation (read from config.json's quantization_config); naming it only checks that the
    # checkpoint is in that format, as vLLM's --quantization does for these formats.
    quantization: Literal["awq", "gptq", "fp8", "compressed-tensors"] | None = Field(
        None, description="quantised checkpoint format (awq, gptq, fp8, compressed-tensors); default: as "
        "config.json's quantization_config says")
    max_model_len: int | None = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None
    kv_cache_dtype: Literal["auto", "fp8", "int8"] = Field(
        "auto", description="what the KV cache stores: auto (the model's dtype), fp8 (e4m3, alias fp8_e4m3) or int8, "
        "each with a scale per token and KV head: about 4x (float32 models) or 2x (bfloat16) the tokens in the same "
        "memory"
    )
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = False
    seed: int = 0
    tensor_parallel_size: int = 1
    # Pipeline stages, each a contiguous range of decoder layers on its own tensor-parallel group of workers
    # (tensor_parallel_size each); the layers split as evenly as they go unless pipeline_layer_partition says.
    pipeline_parallel_size: int = 1
    pipeline_layer_partition: list[int] | None = Field(
        None, description="decoder layers per pipeline stage, e.g. 21,19 (default: as even as they go)")
    distributed_executor_backend: Literal["uni", "ray"] | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Decode-only steps replay CUDA graphs of the forward (one launch instead of ~10 per layer) on a single-GPU
    # worker; True keeps every step eager, as vLLM's flag of the same name does.
    enforce_eager: bool = False
    max_logprobs: int = 20
    # How the Ray executor places its workers (Ray's placement-group strategies): all on one node (STRICT_PACK),
    # across nodes when needed (PACK), over as many nodes as possible (SPREAD), or each on a node of its own
    # (STRICT_SPREAD).
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = "STRICT_PACK"
    # How many times the Ray executor replaces a dead worker group before failing the engine's requests.
    max_worker_restarts: int = 3
    # Worker-group replacements allowed in any minute; past it the engine reports itself failed (Serve then replaces
    # the replica) rather than restarting in a loop.
    max_worker_restarts_per_minute: int = 6
    # A step whose workers have not answered in this long (a hung collective, a stuck device) counts as a lost
    # worker group; and a replica whose step loop has had work but finished no step for health_stall_timeout_s
    # answers /health with 503 (and Serve's health check fails, so Serve replaces it).
    step_timeout_s: float = 300.0
    health_stall_timeout_s: float = 120.0
    # Limits on what one request may carry, so that no client can make a request that costs the engine more than
    # an honest one could; each refusal is a 400 naming the field and the limit (413 for the body size).
    max_stop_strings: int = 32
    max_stop_string_length: int = 1024  # characters, per stop string
    max_prompts_per_request: int = 128  # items of one /v1/completions request's prompt list
    max_request_body_bytes: int = 16 * 2**20
    max_json_depth: int = 32  # nesting of arrays and objects in a request body
    # The key HTTP clients must send as `Authorization: Bearer <key>` (else RAYINFER_API_KEY, else none); a
    # SecretStr so that printing a config does not show it.
    api_key: SecretStr | None = None
    # How the server reads the model's own tool calls for tool_choice "auto" (vLLM's --tool-call-parser: hermes,
    # llama3_json, mistral, qwen); checked when the server starts. Without one, "auto" is refused.
    tool_call_parser: str | None = Field(None, description="parser of the model's tool calls for tool_choice "
                                         "'auto' (hermes, llama3_json, mistral, qwen; default: none, and 'auto' is "
                                         "refused)")

    @field_validator("model", "tokenizer")
    @classmethod
    def _non_empty_path(cls, value: str | None, info: Any) -> str | None:
        if value is not None and not value.strip():
            raise ValueError(
                f"{info.field_name} must be a non-empty path to a Hugging Face checkpoint folder, or a Hub id"
            )
        return value

    @field_validator("revision", "tokenizer_revision", "download_dir")
    @classmethod
    def _non_empty_name(cls, value: str | None, info: Any) -> str | None:
        if value is not None and not value.strip():
            raise ValueError(f"{info.field_name} must be non-empty when given")
        return value

    @field_validator("dtype", mode="before")
    @classmethod
    def _normalise_dtype(cls, value: Any) -> Any:
        if not isinstance(value, str):
            raise ValueError(f"dtype must be a string (got {value!r})")
        name = DTYPE_ALIASES.get(value.strip().lower(), value.strip().lower())
        allowed = ("auto", "float32", "bfloat16", "float16")
        if name not in allowed:
            raise ValueError(
                f"dtype must be one of {', '.join(allowed)} (or fp32, fp16, bf16) (got {value!r})"
            )
        return name

    @field_validator("kv_cache_dtype", mode="before")
    @classmethod
    def _normalise_kv_cache_dtype(cls, value: Any) -> Any:
        name = value.strip().lower() if isinstance(value, str) else None
        name = KV_CACHE_DTYPE_ALIASES.get(name, name)
        if name not in KV_CACHE_DTYPES:
            allowed = ", ".join(KV_CACHE_DTYPES)
            raise ValueError(f"kv_cache_dtype must be one of {allowed} (or fp8_e4m3) (got {value!r})")
        return name

    @field_validator(
        "max_model_len", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size", "pipeline_parallel_size",
        "max_stop_strings",
        "max_stop_string_length", "max_prompts_per_request", "max_request_body_bytes", "max_json_depth",
        "max_worker_restarts_per_minute",
    )
    @classmethod
    def _at_least_one(cls, value: int | None, info: Any) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"{info.field_name} must be >= 1 (got {value})")
        return value

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if not (1 <= value <= MAX_BLOCK_SIZE) or value & (value - 1):
            raise ValueError(f"block_size must be a power of two between 1 and {MAX_BLOCK_SIZE} (got {value})")
        return value

    @field_validator("gpu_memory_utilization")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if not (0.0 < value <= 1.0):  # also rejects NaN
            raise ValueError(f"gpu_memory_utilization must be in (0, 1] (got {value})")
        return value

    @field_validator("kv_cache_memory_bytes")
    @classmethod
    def _positive_bytes(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be > 0 (got {value})")
        return value

    @field_validator("seed")
    @classmethod
    def _non_negative_seed(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"seed must be >= 0 (got {value})")
        return value

    @field_validator("step_timeout_s", "health_stall_timeout_s")
    @classmethod
    def _positive_seconds(cls, value: float, info: Any) -> float:
        if not value > 0:  # also rejects NaN
            raise ValueError(f"{info.field_name} must be > 0 seconds (got {value})")
        return value

    @field_validator("max_worker_restarts")
    @classmethod
    def _non_negative_restarts(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"max_worker_restarts must be >= 0 (got {value})")
        return value

    @field_validator("max_logprobs")
    @classmethod
    def _logprob_cap(cls, value: int) -> int:
        if value < -1:
            raise ValueError(f"max_logprobs must be >= 0, or -1 for no cap (got {value})")
        return value

    @model_validator(mode="after")
    def _backend_fits_parallelism(self) -> EngineConfig:
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(self, name) > 1 and self.distributed_executor_backend == "uni":
                raise ValueError(
                    f"distributed_executor_backend 'uni' runs one process and cannot serve "
                    f"{name}={getattr(self, name)}; use 'ray' or leave it unset"
                )
        partition = self.pipeline_layer_partition
        if partition is not None and len(partition) != self.pipeline_parallel_size:
            raise ValueError(f"pipeline_layer_partition {partition} must give one layer count per pipeline stage "
                             f"(pipeline_parallel_size={self.pipeline_parallel_size})")
        return self

    @field_validator("pipeline_layer_partition", mode="before")
    @classmethod
    def _layer_counts(cls, value: Any) -> Any:
        if isinstance(value, str):  # the CLI's "21,19"
            try:
                value = [int(part) for part in value.split(",")]
            except ValueError:
                raise ValueError(f"pipeline_layer_partition must be layer counts like 21,19 (got {value!r})") from None
        if isinstance(value, list) and any(not isinstance(n, int) or n < 1 for n in value):
            raise ValueError(f"pipeline_layer_partition needs at least one layer per stage (got {value})")
        return value

    @property
    def executor_backend(self) -> Literal["uni", "ray"]:
        """The backend to run: the one asked for, else Ray only when tensor parallelism needs it."""
        if self.distributed_executor_backend is not None:
            return self.distributed_executor_backend
        return "ray" if self.tensor_parallel_size > 1 or self.pipeline_parallel_size > 1 else "uni"

    def resolved_limits(self, model_max_len: int) -> tuple[int, int]:
        """(max_model_len, max_num_batched_tokens) once the checkpoint's context length is known."""
        return resolved_limits(self, model_max_len)


def resolved_limits(config: EngineConfig, model_max_len: int) -> tuple[int, int]:
    """Resolve the length limits against the model's own limit; ValueError when they cannot work."""
    if model_max_len < 1:
        raise ValueError(f"the model's maximum length must be >= 1 (got {model_max_len})")
    max_model_len = model_max_len if config.max_model_len is None else config.max_model_len
    if max_model_len > model_max_len:
        raise ValueError(
            f"max_model_len ({max_model_len}) exceeds the model's maximum length ({model_max_len}); "
            f"lower max_model_len"
        )
    batched = config.max_num_batched_tokens
    if batched is None:
        batched = DEFAULT_CHUNKED_MAX_NUM_BATCHED_TOKENS if config.enable_chunked_prefill else max_model_len
    if not config.enable_chunked_prefill and batched < max_model_len:
        # Without chunking a whole prompt must fit one step, so the budget must cover the longest prompt.
        raise ValueError(
            f"max_num_batched_tokens ({batched}) must be >= max_model_len ({max_model_len}) when "
            f"enable_chunked_prefill is off; raise it, lower max_model_len, or enable chunked prefill"
        )
    return max_model_len, batched


__all__ = ["DEFAULT_CHUNKED_MAX_NUM_BATCHED_TOKENS", "EngineConfig", "resolved_limits"]
