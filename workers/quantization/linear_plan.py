"""Which linears of a model a quantised checkpoint quantises, read from its tensors, and their conversion.

A linear is quantised when the checkpoint stores its packed weight (`qweight`, `weight_packed`) or a weight scale
for it; every other linear keeps a float weight. That follows the checkpoint's own `modules_to_not_convert` or
`ignore` list without matching their patterns, and a quantised tensor this engine cannot place (an LM head, MoE
experts, a fused layout read by a loader of its own) is refused by name rather than loaded wrong.
"""
from __future__ import annotations

import torch
from torch import nn

from rayinfer.workers.layers.linear import ParallelLinear, RowParallelLinear
from rayinfer.workers.quantization.config import IntScheme, QuantScheme
from rayinfer.workers.quantization.fp8_formats import SCALE_NAMES, create_fp8_params, finish_fp8
from rayinfer.workers.quantization.int_formats import create_int_params, finish_int

_MARKERS = {"qweight", "weight_packed", *SCALE_NAMES}


class QuantizedLinears:
    """Puts the checkpoint format's parameters on each quantised linear of `model` (after construction under
    deferred_linear_weights) and materialises the others' float weights; `finish` converts after loading."""

    def __init__(self, model: nn.Module, scheme: QuantScheme, param_names: set[str]) -> None:
        self.scheme = scheme
        leaves: dict[str, set[str]] = {}
        for name in param_names:
            module_name, _, leaf = name.rpartition(".")
            leaves.setdefault(module_name, set()).add(leaf)
        quantized = {module for module, names in leaves.items() if names & _MARKERS}
        self.modules: list[tuple[str, ParallelLinear]] = []
        for name, module in model.named_modules():
            if not isinstance(module, ParallelLinear):
                continue
            if name not in quantized:
                module.materialize_weight()
                continue
            quantized.discard(name)
            if module.weight.weight_loader != module.default_weight_loader():
                raise ValueError(f"{name}: this architecture reads the layer's checkpoint layout with a loader of "
                                 f"its own, which quantised weights ({_kind(scheme)}) do not fit")
            self._create(name, module, leaves[name])
            self.modules.append((name, module))
        if quantized:
            raise ValueError(f"quantised tensors of {sorted(quantized)[:4]} are not supported: only the attention "
                             f"and MLP linear layers of dense models load quantised")

    def _create(self, name: str, module: ParallelLinear, leaves: set[str]) -> None:
        if isinstance(self.scheme, IntScheme):
            create_int_params(module, self.scheme, _full_in(module), name)
        else:
            scale = next((s for s in SCALE_NAMES if s in leaves), None)
            if scale is None:
                raise ValueError(f"{name}: an FP8 checkpoint needs a weight_scale or weight_scale_inv for it")
            create_fp8_params(module, self.scheme, scale, "input_scale" in leaves, name)

    def finish(self) -> None:
        for name, module in self.modules:
            if isinstance(self.scheme, IntScheme):
                module.quantized = finish_int(module, self.scheme, _full_in(module), name)
            else:
                module.quantized = finish_fp8(module, self.scheme)

    def held_bytes(self) -> int:
        return sum(module.quantized.held_bytes() for _, module in self.modules)

    def unquantized_bytes(self, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return sum(module.in_features * module.out_features * element for _, module in self.modules)


def _full_in(module: ParallelLinear) -> int:
    return module.in_features * (module.tp.size if isinstance(module, RowParallelLinear) else 1)


def _kind(scheme: QuantScheme) -> str:
    return f"{scheme.layout} {scheme.bits}-bit" if isinstance(scheme, IntScheme) else f"{scheme.layout} fp8"


