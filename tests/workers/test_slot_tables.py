"""Slot tables: slots handed out lowest first, tables and id lists growing by doubling, the neutral slot 0 left
untouched, and the memory given back once no slot is taken."""
from __future__ import annotations

import torch

from rayinfer.workers.slot_tables import IdListTable, TokenCountTable

VOCAB = 48


def test_id_lists_grow_and_give_memory_back() -> None:
    table = IdListTable(pad=VOCAB, device=torch.device("cpu"), with_values=True)
    slots = [table.add(list(range(n + 1)), [float(n)] * (n + 1)) for n in range(12)]
    assert slots == list(range(1, 13)) and table.num_slots == 16 and table.width == 16  # both double
    assert table.gather(torch.tensor([0, 3])).tolist() == [[VOCAB] * 16, [0, 1, 2] + [VOCAB] * 13]
    assert table.gather_values(torch.tensor([2])).tolist() == [[1.0, 1.0] + [0.0] * 14]
    for slot in slots[:-1]:
        table.release(slot)
    assert table.ids is not None  # one slot still taken
    table.release(slots[-1])
    assert table.ids is None and table.values is None and table.width == 0
    assert table.add([5], [1.0]) == 1 and table.width == 1


def test_token_counts_follow_recorded_ids() -> None:
    counts = TokenCountTable(VOCAB, torch.device("cpu"))
    a, b = counts.add([4, 4, 6], [1, 1, 2]), counts.add(None, [])
    counts.record(torch.tensor([a, 0, b, 0]), torch.tensor([1, 3, 3, 3]))
    gathered = counts.gather_counts(torch.tensor([a, b, 0]))
    assert gathered[0, 1] == 3 and gathered[0, 2] == 1 and gathered[0].sum() == 4
    assert gathered[1, 3] == 1 and gathered[1].sum() == 1 and gathered[2].sum() == 0
    assert counts.gather_prompt_seen(torch.tensor([a, b])).nonzero().tolist() == [[0, 4], [0, 6]]
    counts.release(a)
    counts.release(b)
    assert counts.counts is None and counts.prompt_seen is None
