"""Device tables for the sampling features only some sequences use, one row per user, found by slot number.

Penalty counts, banned ids, allowed ids and logit biases must not cost memory for every live sequence: a table
holds a row for each sequence that uses its feature, and slot 0 is a neutral row (no ids, zero counts) that
every other sequence points at. One gather by slot then gives a whole step its rows, and the neutral row leaves
a row's logits as they were. Tables grow by doubling and are dropped once no slot is taken, so a burst of
requests with, say, long allowed_token_ids lists gives its memory back when they end.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor


class SlotTable(ABC):
    """Hands out slots 1.. of a table whose storage the subclass keeps, growing it when they run out."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.num_slots = 0  # rows allocated, the neutral slot 0 included; 0 while the table is dropped
        self._free: list[int] = []

    def _take(self) -> int:
        if not self._free:
            old = self.num_slots
            new = max(8, 2 * old)
            self._resize(new)
            self._free = list(range(new - 1, max(old, 1) - 1, -1))  # popped lowest first
            self.num_slots = new
        return self._free.pop()

    def release(self, slot: int) -> None:
        self._free.append(slot)
        if len(self._free) == self.num_slots - 1:  # none taken: give the memory back
            self.num_slots = 0
            self._free = []
            self._resize(0)

    @abstractmethod
    def _resize(self, num_slots: int) -> None:
        """Reallocates the storage for `num_slots` rows (0: drop it), keeping the rows it had; new rows are
        neutral."""


def _resized(table: Tensor | None, rows: int, width: int, fill: float | int | bool, dtype: torch.dtype,
             device: torch.device) -> Tensor | None:
    """`table` as [rows, width], its old contents in the top-left corner, the rest `fill`; None for 0 rows."""
    if rows == 0:
        return None
    out = torch.full((rows, width), fill, dtype=dtype, device=device)
    if table is not None:
        kept_rows, kept_width = min(rows, table.shape[0]), min(width, table.shape[1])
        out[:kept_rows, :kept_width] = table[:kept_rows, :kept_width]
    return out


class IdListTable(SlotTable):
    """Per slot a list of token ids, and with `with_values` a float per id: banned, allowed or biased ids. Rows are
    padded to the table's width (doubled when a longer list arrives) with `pad` = vocab_size, a column the
    sampler's masks drop, and values with 0."""

    def __init__(self, pad: int, device: torch.device, with_values: bool = False) -> None:
        super().__init__(device)
        self.pad = pad
        self.with_values = with_values
        self.width = 0
        self.ids: Tensor | None = None  # [num_slots, width] int64
        self.values: Tensor | None = None  # [num_slots, width] float32, with_values only

    def add(self, ids: list[int], values: list[float] | None = None) -> int:
        slot = self._take()
        if len(ids) > self.width:
            self._widen(max(len(ids), 2 * self.width))
        padding = self.width - len(ids)
        self.ids[slot] = torch.tensor(ids + [self.pad] * padding, dtype=torch.int64, device=self.device)
        if self.with_values:
            self.values[slot] = torch.tensor(values + [0.0] * padding, dtype=torch.float32, device=self.device)
        return slot

    def gather(self, slots: Tensor) -> Tensor:
        return self.ids.index_select(0, slots)

    def gather_values(self, slots: Tensor) -> Tensor:
        return self.values.index_select(0, slots)

    def _widen(self, width: int) -> None:
        self.width = width
        self._resize(self.num_slots)

    def _resize(self, num_slots: int) -> None:
        self.width = max(self.width, 1) if num_slots else 0
        self.ids = _resized(self.ids, num_slots, self.width, self.pad, torch.int64, self.device)
        if self.with_values:
            self.values = _resized(self.values, num_slots, self.width, 0.0, torch.float32, self.device)


class TokenCountTable(SlotTable):
    """Per slot, for the penalties: how many times each id was drawn (float32, the factor the frequency penalty
    multiplies) and which ids the prompt holds (for the repetition penalty). Counts are updated on the device
    from each step's drawn ids, never rebuilt from the output lists."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        super().__init__(device)
        self.vocab_size = vocab_size
        self.counts: Tensor | None = None  # [num_slots, vocab] float32
        self.prompt_seen: Tensor | None = None  # [num_slots, vocab] bool

    def add(self, prompt_ids: list[int] | None, output_ids: list[int]) -> int:
        """A slot counting `output_ids`; with `prompt_ids` (None: the row has no repetition penalty) marking them."""
        slot = self._take()
        counts = self.counts[slot]
        counts.zero_()
        if output_ids:
            ids = torch.tensor(output_ids, dtype=torch.int64, device=self.device)
            counts.index_add_(0, ids, torch.ones(len(output_ids), device=self.device))
        seen = self.prompt_seen[slot]
        seen.zero_()
        if prompt_ids:
            seen[torch.tensor(prompt_ids, dtype=torch.int64, device=self.device)] = True
        return slot

    def record(self, slots: Tensor, token_ids: Tensor) -> None:
        """Counts each row's drawn id; rows at the neutral slot add 0, which leaves it zero."""
        self.counts.index_put_((slots, token_ids), (slots > 0).to(torch.float32), accumulate=True)

    def gather_counts(self, slots: Tensor) -> Tensor:
        return self.counts.index_select(0, slots)

    def gather_prompt_seen(self, slots: Tensor) -> Tensor:
        return self.prompt_seen.index_select(0, slots)

    def _resize(self, num_slots: int) -> None:
        self.counts = _resized(self.counts, num_slots, self.vocab_size, 0.0, torch.float32, self.device)
        self.prompt_seen = _resized(self.prompt_seen, num_slots, self.vocab_size, False, torch.bool, self.device)
