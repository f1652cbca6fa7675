"""Every live sequence's sampling settings, kept on the device across steps: one row per sequence.

A sequence's sampling options never change and its output grows by one token a step, so its row is written
once, when the sequence arrives (`NewSequence`), and afterwards only updated in place from the step's drawn ids,
on the device: its output position and, with a penalty, the drawn id's count. Each step gathers the rows of its
sampling chunks with one index tensor instead of building every tensor from Python lists.

Scalars live in two column-major tables, [fields, capacity] float32 and int64, so one index_select per table
gathers a step and each field comes out contiguous. What only some sequences use (penalty counts, banned,
allowed and biased ids) lives in slot tables (`slot_tables.py`) that a row's int columns point into. Which
filters a step runs is decided on the host from per-row feature bits OR-ed over the step's rows, so the sampler
skips what no row uses without reading the device.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rayinfer.workers.sampler import RowSettings, SamplingTensors
from rayinfer.workers.sampling_options import SamplingOptions
from rayinfer.workers.slot_tables import IdListTable, TokenCountTable
from rayinfer.workers.step_plan import NewSequence, SampleRequest, StepPlan

# Columns of the float table, then of the int table; a *_SLOT column is the row's slot in that slot table
# (0: the neutral row, for a sequence that does not use the feature).
TEMPERATURE, TOP_P, MIN_P, PRESENCE, FREQUENCY, REPETITION = range(6)
TOP_K, SEED, POSITION, COUNTS_SLOT, BANNED_SLOT, ALLOWED_SLOT, BIAS_SLOT = range(7)

# A row's feature bits: a step runs a filter, or gathers a slot table, when any of its rows has the bit.
SAMPLED, USES_TOP_K, USES_TOP_P, USES_MIN_P, USES_PENALTY, USES_REPETITION, BANNING, RESTRICTED, BIASED = (
    1 << i for i in range(9)
)


@dataclass
class StepRows:
    """The batch rows of one step's sampling chunks, in the step's order."""

    rows: list[int]
    index: Tensor  # [B] int64 on the batch's device: the rows again, to gather with
    features: int  # the OR of the rows' feature bits
    version: int  # the batch's version when made: reusable while the batch has not changed since


class SamplingBatch:
    """A row of sampling state per live sequence, kept current by the steps' plans and drawn ids."""

    def __init__(self, vocab_size: int, device: torch.device | str, capacity: int = 256) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._row_of: dict[int, int] = {}  # seq_id -> row
        self._free: list[int] = []
        self._floats = torch.zeros(6, 0, dtype=torch.float32, device=self.device)
        self._ints = torch.zeros(7, 0, dtype=torch.int64, device=self.device)
        self._features: list[int] = []  # per row
        self._slots: list[tuple[int, int, int, int]] = []  # per row: its (counts, banned, allowed, bias) slots
        self._banning: dict[int, int] = {}  # row -> tokens still to draw before its stop ids are allowed
        self._counts = TokenCountTable(vocab_size, self.device)
        self._banned = IdListTable(vocab_size, self.device)
        self._allowed = IdListTable(vocab_size, self.device)
        self._bias = IdListTable(vocab_size, self.device, with_values=True)
        self._ones = torch.ones(0, dtype=torch.int64, device=self.device)  # [capacity]: a step's increments
        self._version = 0
        self._last_step: StepRows | None = None
        self._grow(max(1, capacity))

    def __len__(self) -> int:
        return len(self._row_of)

    def apply(self, plan: StepPlan) -> None:
        """Frees the rows of the plan's finished sequences, then writes one for each new sequence; a sequence
        sent again (see `NewSequence`) starts over in its row."""
        for seq_id in plan.finished_seq_ids:
            row = self._row_of.pop(seq_id, None)
            if row is not None:
                self._clear(row)
                self._free.append(row)
                self._version += 1
        if plan.new_sequences:
            self._add(plan.new_sequences)
            self._version += 1

    def step_rows(self, seq_ids: Sequence[int]) -> StepRows:
        """The rows of these sequences, in this order, with the features they use."""
        rows = [self._row_of[seq_id] for seq_id in seq_ids]
        last = self._last_step
        if last is not None and last.version == self._version and last.rows == rows:
            return last  # a steady decode samples the same rows step after step
        features = 0
        for row in rows:
            features |= self._features[row]
        step = StepRows(rows, torch.tensor(rows, dtype=torch.int64, device=self.device), features, self._version)
        self._last_step = step
        return step

    def tensors(self, step: StepRows) -> SamplingTensors:
        """The step's rows, gathered: what `Sampler` reads."""
        f = self._floats.index_select(1, step.index)
        i = self._ints.index_select(1, step.index)
        uses = step.features
        allowed, biased = bool(uses & RESTRICTED), bool(uses & BIASED)
        return SamplingTensors(
            temperatures=f[TEMPERATURE],
            top_ks=i[TOP_K],
            top_ps=f[TOP_P],
            min_ps=f[MIN_P],
            presence_penalties=f[PRESENCE],
            frequency_penalties=f[FREQUENCY],
            repetition_penalties=f[REPETITION],
            seeds=i[SEED],
            output_positions=i[POSITION],
            prompt_seen=self._counts.gather_prompt_seen(i[COUNTS_SLOT]) if uses & USES_REPETITION else None,
            output_counts=self._counts.gather_counts(i[COUNTS_SLOT]) if uses & USES_PENALTY else None,
            banned_token_ids=self._banned.gather(i[BANNED_SLOT]) if uses & BANNING else None,
            allowed_token_ids=self._allowed.gather(i[ALLOWED_SLOT]) if allowed else None,
            restricted_rows=i[ALLOWED_SLOT] > 0 if allowed else None,
            logit_bias_ids=self._bias.gather(i[BIAS_SLOT]) if biased else None,
            logit_bias_values=self._bias.gather_values(i[BIAS_SLOT]) if biased else None,
            all_greedy=not (uses & SAMPLED),
            any_top_k=bool(uses & USES_TOP_K),
            any_top_p=bool(uses & USES_TOP_P),
            any_min_p=bool(uses & USES_MIN_P),
            any_penalty=bool(uses & USES_PENALTY),
        )

    def record(self, step: StepRows, token_ids: Tensor) -> None:
        """Each row of the step drew `token_ids[i]` (on the device): one more output, counted for penalties."""
        self._ints[POSITION].index_add_(0, step.index, self._ones[: len(step.rows)])
        if step.features & USES_PENALTY:
            self._counts.record(self._ints[COUNTS_SLOT].index_select(0, step.index), token_ids)
        if self._banning:
            for row in step.rows:
                left = self._banning.get(row)
                if left is not None:
                    self._banning[row] = left - 1
                    if left == 1:  # min_tokens reached: its stop ids are allowed from now on
                        self._stop_banning(row)

    # ------------------------------------------------------------ writing and freeing rows
    def _add(self, new_sequences: list[NewSequence]) -> None:
        rows, floats, ints = [], [], []
        for new in new_sequences:
            row = self._row_of.get(new.seq_id)
            if row is None:
                if not self._free:
                    self._grow(2 * len(self._features))
                row = self._row_of[new.seq_id] = self._free.pop()
            else:
                self._clear(row)
            s = RowSettings.of(new.sampling, self.vocab_size)
            slots = self._take_slots(row, new.sampling)
            self._slots[row] = slots
            self._features[row] = self._feature_bits(s, new.sampling.params, banning=row in self._banning)
            rows.append(row)
            floats.append((s.temperature, s.top_p, s.min_p, s.presence_penalty, s.frequency_penalty,
                           s.repetition_penalty))
            ints.append((s.top_k, s.seed, len(new.sampling.output_token_ids), *slots))
        index = torch.tensor(rows, dtype=torch.int64, device=self.device)
        self._floats.index_copy_(1, index, torch.tensor(floats, dtype=torch.float32, device=self.device).T)
        self._ints.index_copy_(1, index, torch.tensor(ints, dtype=torch.int64, device=self.device).T)

    def _take_slots(self, row: int, request: SampleRequest) -> tuple[int, int, int, int]:
        p = request.params
        counts = banned = allowed = bias = 0
        if p.any_penalty:
            prompt = request.prompt_token_ids if p.repetition_penalty != 1.0 else None
            counts = self._counts.add(prompt, request.output_token_ids)
        still_to_draw = p.min_tokens - len(request.output_token_ids)
        if request.stop_ids_for_min_tokens and still_to_draw > 0:
            banned = self._banned.add(list(request.stop_ids_for_min_tokens))
            self._banning[row] = still_to_draw
        if p.allowed_token_ids:
            allowed = self._allowed.add(list(p.allowed_token_ids))
        if p.logit_bias:
            bias = self._bias.add(list(p.logit_bias), list(p.logit_bias.values()))
        return counts, banned, allowed, bias

    def _feature_bits(self, s: RowSettings, p: SamplingOptions, banning: bool) -> int:
        return (
            (SAMPLED if s.temperature != 0.0 else 0)
            | (USES_TOP_K if s.top_k < self.vocab_size else 0)
            | (USES_TOP_P if s.top_p < 1.0 else 0)
            | (USES_MIN_P if s.min_p > 0.0 else 0)
            | (USES_PENALTY if p.any_penalty else 0)
            | (USES_REPETITION if p.repetition_penalty != 1.0 else 0)
            | (BANNING if banning else 0)
            | (RESTRICTED if p.allowed_token_ids else 0)
            | (BIASED if p.logit_bias else 0)
        )

    def _stop_banning(self, row: int) -> None:
        del self._banning[row]
        counts, banned, allowed, bias = self._slots[row]
        self._banned.release(banned)
        self._slots[row] = (counts, 0, allowed, bias)
        self._ints[BANNED_SLOT, row] = 0
        self._features[row] &= ~BANNING
        self._version += 1

    def _clear(self, row: int) -> None:
        """Gives back the slots the row holds; its columns are rewritten when the row is next taken."""
        self._banning.pop(row, None)
        for table, slot in zip((self._counts, self._banned, self._allowed, self._bias), self._slots[row]):
            if slot:
                table.release(slot)
        self._slots[row] = (0, 0, 0, 0)
        self._features[row] = 0

    def _grow(self, capacity: int) -> None:
        old = len(self._features)
        floats = torch.zeros(6, capacity, dtype=torch.float32, device=self.device)
        ints = torch.zeros(7, capacity, dtype=torch.int64, device=self.device)
        floats[:, :old] = self._floats
        ints[:, :old] = self._ints
        self._floats, self._ints = floats, ints
        self._ones = torch.ones(capacity, dtype=torch.int64, device=self.device)
        self._features += [0] * (capacity - old)
        self._slots += [(0, 0, 0, 0)] * (capacity - old)
        self._free += range(capacity - 1, old - 1, -1)  # popped lowest first


def build_sampling_tensors(
    requests: Sequence[SampleRequest], vocab_size: int, device: torch.device | str
) -> SamplingTensors:
    """Row i from `requests[i]`, through a batch made for the occasion (what tests of the sampler need); the engine
    keeps one batch across steps instead."""
    if not requests:
        raise ValueError("build_sampling_tensors needs at least one request")
    batch = SamplingBatch(vocab_size, device, capacity=len(requests))
    new = [NewSequence(i, len(request.prompt_token_ids), request) for i, request in enumerate(requests)]
    batch.apply(StepPlan(chunks=[], new_sequences=new))
    return batch.tensors(batch.step_rows(range(len(requests))))
