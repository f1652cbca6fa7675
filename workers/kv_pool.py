"""This worker's KV cache: per layer, K and V tensors of [num_blocks, block_size, num_kv_heads, head_dim]."""
from __future__ import annotations

import logging

import os

import torch

from rayinfer.configs import EngineConfig

logger = logging.getLogger(__name__)

# On CPU the pool lives in RAM next to everything else, so it takes a modest share by default.
CPU_DEFAULT_RAM_FRACTION = 0.1


def _total_ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element


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
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        # Zeroed, not empty: attention reads whole blocks and masks the tail, and 0 * NaN would still be NaN.
        self.layers = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]
        self.num_blocks = num_blocks
        self.block_size = block_size
        logger.info("KV pool: %d blocks of %d tokens per layer (%s, %s)", num_blocks, block_size, dtype, device)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copies whole blocks src -> dst in every layer's K and V (all pairs at once per tensor)."""
        src = torch.tensor([p[0] for p in pairs], dtype=torch.int64, device=self.layers[0][0].device)
        dst = torch.tensor([p[1] for p in pairs], dtype=torch.int64, device=src.device)
        for key, value in self.layers:
            key.index_copy_(0, dst, key.index_select(0, src))
            value.index_copy_(0, dst, value.index_select(0, src))
