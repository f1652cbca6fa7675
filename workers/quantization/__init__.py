"""Quantised checkpoints: which format a checkpoint is in (config), the parameters each format stores and how a
rank loads its shard of them (int_formats, fp8_formats), and the packed weight a linear computes with after
loading (quantized_weight)."""
