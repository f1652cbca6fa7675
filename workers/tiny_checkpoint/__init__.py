"""Built-in tiny checkpoints: a locally trained byte-level BPE tokenizer and random-weight models of every supported
family, built offline and deterministically (the same arguments give byte-identical files)."""

from rayinfer.workers.tiny_checkpoint.architectures import PARALLEL_RESIDUAL_TINY_ARCHS, SIZES, SUPPORTED_TINY_ARCHS
from rayinfer.workers.tiny_checkpoint.builder import (
    TINY_FORMAT_VERSION,
    build_tiny_checkpoint,
    default_tiny_model_dir,
    ensure_model_dir,
)
from rayinfer.workers.tiny_checkpoint.tokenizer import TINY_VOCAB_SIZE, build_tokenizer

__all__ = [
    "PARALLEL_RESIDUAL_TINY_ARCHS",
    "SIZES",
    "SUPPORTED_TINY_ARCHS",
    "TINY_FORMAT_VERSION",
    "TINY_VOCAB_SIZE",
    "build_tiny_checkpoint",
    "build_tokenizer",
    "default_tiny_model_dir",
    "ensure_model_dir",
]
