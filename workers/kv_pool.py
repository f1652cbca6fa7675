"""This worker's KV cache: per layer, K and V tensors of [num_blocks, block_size, num_kv_heads, head_dim].

With `kv_cache_dtype` fp8 or int8 they hold codes, and each has a float32 scale per (slot, KV head) beside it
([num_blocks, block_size, num_kv_heads], see kernels/kv_quant.py), so a block costs about a quarter (float32
models) or half (bfloat16) of the bytes and the same memory holds that many more tokens."""
from __future__ import annotations

import logging

import os

import torch

from rayinfer.configs import EngineConfig
from rayinfer.kernels.kv_quant import FP8_DTYPE, QUANT_MAX

logger = logging.getLogger(__name__)

# On CPU the pool lives in RAM next to everything else, so it takes a modest share by default.
CPU_DEFAULT_RAM_FRACTION = 0.1
# What EngineConfig.kv_cache_dtype stores the cache as; "auto" is the model's dtype.
KV_CACHE_DTYPES = {"fp8": FP8_DTYPE, "int8": torch.int8}
SCALE_DTYPE = torch.float32


def _total_ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def kv_cache_storage_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the pool stores K/V in: the model's for "auto", else the quantised codes'."""
    return KV_CACHE_DTYPES.get(kv_cache_dtype, model_dtype)


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one block in every layer's K and V, stored as `dtype` (with a scale per row and head if quantised)."""
    row = head_dim * dtype.itemsize + (SCALE_DTYPE.itemsize if dtype in QUANT_MAX else 0)
    return 2 * num_layers * block_size * num_kv_heads * row


def default_cpu_pool_bytes(block_bytes: int, block_size: int, max_num_seqs: int, max_model_len: int) -> int:
    """A fraction of RAM, but never more than max_num_seqs full-length sequences could use."""
    useful_blocks = max_num_seqs * -(-max_model_len // block_size)
    return min(int(_total_ram_bytes() * CPU_DEFAULT_RAM_FRACTION), useful_blocks * block_bytes)


def pool_bytes(config: EngineConfig, block_bytes: int, device: torch.device, max_model_len: int) -> int:
    """Bytes this worker gives its KV pool: as configured, else what the device can spare."""
    if config.kv_cache_memory_bytes is not None:
        return config.kv_cache_memory_bytes
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used_by_others = total - free
        # Leave room for activations of the largest step; a profiling forward refines this in the Ray runtime.
        reserve = int(0.05 * total)
        return max(0, int(total * config.gpu_memory_utilization) - used_by_others - reserve)
    return default_cpu_pool_bytes(block_bytes, config.block_size, config.max_num_seqs, max_model_len)


class KVPool:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        """`dtype`: what K/V are stored as (`kv_cache_storage_dtype`); fp8 or int8 adds the scale pools."""
        shape = (num_blocks, block_size, num_kv_heads, head_dim)

        def zeros(size: tuple[int, ...], element: torch.dtype) -> torch.Tensor:
            # Zeroed, not empty: attention reads whole blocks and masks the tail, and 0 * NaN would still be NaN.
            return torch.zeros(size, dtype=element, device=device)

        self.layers = [(zeros(shape, dtype), zeros(shape, dtype)) for _ in range(num_layers)]
        # Per layer (K scales, V scales), or None for a pool in the model's own dtype.
        self.scales: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if dtype in QUANT_MAX:
            self.scales = [(zeros(shape[:3], SCALE_DTYPE), zeros(shape[:3], SCALE_DTYPE)) for _ in range(num_layers)]
        self.num_blocks = num_blocks
        self.block_size = block_size
        logger.info("KV pool: %d blocks of %d tokens per layer (%s, %s)", num_blocks, block_size, dtype, device)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copies whole blocks src -> dst in every layer's K and V, and their scales (all pairs at once per tensor)."""
        src = torch.tensor([p[0] for p in pairs], dtype=torch.int64, device=self.layers[0][0].device)
        dst = torch.tensor([p[1] for p in pairs], dtype=torch.int64, device=src.device)
        tensors = [t for pair in self.layers + (self.scales or []) for t in pair]
        for tensor in tensors:
            if tensor.dtype == FP8_DTYPE:  # torch has no index_copy_ for float8: move the bytes
                tensor = tensor.view(torch.uint8)
            tensor.index_copy_(0, dst, tensor.index_select(0, src))
