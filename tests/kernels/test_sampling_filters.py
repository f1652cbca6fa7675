"""The filtered samplers against their torch reference: the Triton kernel (forced; the interpreter runs it on
CPU) and the CPU candidate-list path.

Every case draws fresh random logits and settings. Rows are compared token for token except where a filter
boundary is within float rounding of the cut (a float64 check finds those rows: the strict and the loose
reading of the filters keep different sets); such rows must be rare, and even there the kernel may only
return a token that the loose reading keeps.
"""
from __future__ import annotations

import os

import torch

# Before triton is imported: without a GPU the kernels run in Triton's interpreter on CPU tensors. (Only then: on
# a GPU machine this would turn every kernel decorated afterwards into an interpreted one, gpu tests included.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402

from rayinfer.kernels.sampling import (  # noqa: E402
    counter_uniforms,
    counter_uniforms_triton,
    sample_filtered_reference,
    sample_filtered_triton,
)
from rayinfer.kernels import sampling_cpu  # noqa: E402
from rayinfer.kernels.sampling_cpu import sample_filtered_cpu  # noqa: E402
from rayinfer.kernels.triton_compat import HAS_TRITON  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed on this platform"),
    # splitmix64 multiplies wrap around on purpose; the interpreter's numpy scalars warn about it.
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
IMPLEMENTATIONS = {"triton": sample_filtered_triton, "cpu": sample_filtered_cpu}
each_implementation = pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))


@dataclasses.dataclass
class Batch:
    logits: torch.Tensor
    temperatures: torch.Tensor
    top_ks: torch.Tensor | None
    top_ps: torch.Tensor | None
    min_ps: torch.Tensor | None
    seeds: torch.Tensor
    positions: torch.Tensor

    def args(self) -> tuple:
        return (self.logits, self.temperatures, self.top_ks, self.top_ps, self.min_ps, self.seeds, self.positions)

    def row(self, i: int) -> Batch:
        pick = lambda t: None if t is None else t[i : i + 1]  # noqa: E731
        return Batch(*(pick(t) for t in self.args()))

    def permuted(self, perm: torch.Tensor) -> Batch:
        return Batch(*(None if t is None else t[perm] for t in self.args()))


def _random_batch(
    rng: random.Random,
    batch: int,
    vocab: int,
    *,
    top_k: bool,
    top_p: bool,
    min_p: bool,
    scale: float = 3.0,
    step: float | None = None,
    device: str = "cpu",
) -> Batch:
    """Random logits and per-row settings; each enabled filter is also switched off on some rows.

    `step` rounds the logits to multiples of it, so that many tokens share a logit (as bf16 logits do).
    """
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    logits = torch.randn(batch, vocab, generator=gen) * scale
    if step is not None:
        logits = (logits / step).round() * step
    temperatures = [rng.choice([0.3, 0.5, 0.8, 1.0, 1.3, 2.0]) for _ in range(batch)]
    ks = [rng.choice([1, 2, 5, 17, 50, max(1, vocab // 3), vocab, vocab + 7]) for _ in range(batch)]
    ps = [rng.choice([1.0, 0.95, 0.8, 0.5, 0.2, 1e-6, round(rng.uniform(0.05, 0.99), 3)]) for _ in range(batch)]
    mps = [rng.choice([0.0, 0.0, 0.01, 0.05, 0.2, 0.7]) for _ in range(batch)]
    seeds = [rng.choice([rng.randrange(INT64_MIN, INT64_MAX), 0, -1, INT64_MIN, INT64_MAX]) for _ in range(batch)]
    positions = [rng.choice([0, 1, rng.randrange(10_000)]) for _ in range(batch)]

    def t(values, dtype):
        return torch.tensor(values, dtype=dtype, device=device)

    return Batch(
        logits.to(device),
        t(temperatures, torch.float32),
        t(ks, torch.int64) if top_k else None,
        t(ps, torch.float32) if top_p else None,
        t(mps, torch.float32) if min_p else None,
        t(seeds, torch.int64),
        t(positions, torch.int64),
    )


def _kept_sets(b: Batch, p_tol: float = 2e-5, z_tol: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(strict, loose, near_tie): [B, V] masks of the filters read with the boundaries pulled in and pushed
    out by float rounding, in float64; near_tie [B] flags rows whose two best draw scores nearly tie."""
    temps = b.temperatures.cpu()
    z = (b.logits.cpu().float() / torch.where(temps > 0, temps, 1.0)[:, None]).double()
    batch, vocab = z.shape
    zs, order = z.sort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(vocab)[None, :].expand(batch, -1)
    strict = torch.ones(batch, vocab, dtype=torch.bool)
    loose = strict.clone()
    if b.top_ks is not None:
        # Equal logits rank by token id (stable sort) in both implementations: no slack at the top-k cut.
        kept = ranks < b.top_ks.cpu()[:, None]
        strict &= kept
        loose &= kept
    if b.top_ps is not None:
        p = b.top_ps.cpu().double()[:, None]
        probs = zs.masked_fill(~strict, float("-inf")).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        on = p < 1.0
        strict &= ~on | (mass_before < p - p_tol) | (ranks == 0)
        loose &= ~on | (mass_before < p + p_tol) | (ranks == 0)
    if b.min_ps is not None:
        threshold = zs[:, :1] + torch.log(b.min_ps.cpu().double())[:, None]
        margin = z_tol * (1 + threshold.abs())
        strict &= ~(zs < threshold + margin)
        loose &= ~(zs < threshold - margin)
    # Back to token order.
    strict = torch.empty_like(strict).scatter_(1, order, strict)
    loose = torch.empty_like(loose).scatter_(1, order, loose)
    u = counter_uniforms(b.seeds.cpu(), b.positions.cpu(), vocab).double()
    scores = (z - torch.log(-torch.log(u))).masked_fill(~loose, float("-inf"))
    top2 = scores.topk(min(2, vocab), dim=-1).values
    near_tie = (top2[:, 0] - top2[:, -1]).abs() < z_tol * (1 + top2[:, 0].abs()) if vocab > 1 else torch.zeros(batch)
    return strict, loose, near_tie.bool()


def _check_against_reference(b: Batch, max_ambiguous: int = 1, impl: str = "triton") -> torch.Tensor:
    expected = sample_filtered_reference(*b.args())
    got = IMPLEMENTATIONS[impl](*b.args())
    assert got.dtype == torch.int64 and got.shape == expected.shape
    strict, loose, near_tie = _kept_sets(b)
    got_cpu, expected_cpu = got.cpu(), expected.cpu()
    # Never a token the filters removed (read loosely: kernel and reference may round a boundary differently).
    assert loose.gather(1, got_cpu[:, None]).all(), "the kernel returned a filtered-out token"
    assert loose.gather(1, expected_cpu[:, None]).all(), "the reference returned a filtered-out token"
    ambiguous = (strict != loose).any(dim=-1) | near_tie
    clear = ~ambiguous
    mismatched = torch.nonzero(clear & (got_cpu != expected_cpu)).flatten().tolist()
    assert not mismatched, (
        f"rows {mismatched}: triton {got_cpu[mismatched].tolist()} != reference {expected_cpu[mismatched].tolist()}"
    )
    assert int(ambiguous.sum()) <= max_ambiguous, f"{int(ambiguous.sum())} rows sit on a filter boundary"
    return got


def test_uniforms_bit_identical_to_counter_uniforms() -> None:
    rng = random.Random(11)
    seeds = [0, 1, -1, INT64_MIN, INT64_MAX, 0xDEADBEEF] + [rng.randrange(INT64_MIN, INT64_MAX) for _ in range(2)]
    seeds = torch.tensor(seeds)
    positions = torch.tensor([0, 7, 1 << 40, 3, INT64_MAX - 1, 2, rng.randrange(1 << 20), 0])
    for vocab in (1, 257, 1000):
        expected = counter_uniforms(seeds, positions, vocab)
        got = counter_uniforms_triton(seeds, positions, vocab)
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32)), vocab


CASES = {
    "temperature-only": dict(top_k=False, top_p=False, min_p=False),
    "top-k": dict(top_k=True, top_p=False, min_p=False),
    "top-p": dict(top_k=False, top_p=True, min_p=False),
    "min-p": dict(top_k=False, top_p=False, min_p=True),
    "top-k+top-p": dict(top_k=True, top_p=True, min_p=False),
    "all": dict(top_k=True, top_p=True, min_p=True),
}


@pytest.mark.parametrize("vocab", [257, 1000])
@pytest.mark.parametrize("case", list(CASES))
@each_implementation
def test_matches_reference(case: str, vocab: int, impl: str) -> None:
    rng = random.Random(f"{case}-{vocab}")
    _check_against_reference(_random_batch(rng, 8, vocab, **CASES[case]), impl=impl)


@each_implementation
def test_matches_reference_on_flat_and_peaked_rows(impl: str) -> None:
    rng = random.Random(5)
    for scale in (0.5, 8.0):
        _check_against_reference(_random_batch(rng, 6, 300, top_k=True, top_p=True, min_p=True, scale=scale), impl=impl)


@pytest.mark.parametrize("step", [0.0625, 0.5])
@each_implementation
def test_equal_logits_rank_by_token_id(step: float, impl: str) -> None:
    """Logits rounded to a grid (as bf16 ones are) tie at the top-k and top-p cuts: both implementations keep
    the lowest token ids of a tied group, as a stable sort ranks them."""
    rng = random.Random(f"ties-{step}")
    _check_against_reference(_random_batch(rng, 8, 300, top_k=True, top_p=True, min_p=True, scale=1.5, step=step), impl=impl)


@each_implementation
def test_flat_row_keeps_the_first_ids(impl: str) -> None:
    """All logits equal: top-k 5 keeps ids 0-4; top-p keeps the ids whose mass before them (id / kept) is < p."""
    vocab, n = 300, 24
    flat = torch.zeros(n, vocab)
    flat[:, 0] = -0.0  # equal to +0.0, so it ties too
    seeds = torch.arange(n, dtype=torch.int64) * 104729 - 7
    base = Batch(flat, torch.ones(n), None, None, None, seeds, torch.zeros(n, dtype=torch.int64))
    for top_ks, top_ps, allowed in (
        (torch.full((n,), 5), None, set(range(5))),
        (None, torch.full((n,), 0.105), set(range(32))),  # 31/300 < 0.105 <= 32/300
        (torch.full((n,), 20), torch.full((n,), 0.52), set(range(11))),  # 10/20 < 0.52 <= 11/20
    ):
        b = dataclasses.replace(base, top_ks=top_ks, top_ps=top_ps)
        got = IMPLEMENTATIONS[impl](*b.args())
        assert torch.equal(got, sample_filtered_reference(*b.args()))
        assert set(got.tolist()) <= allowed and len(set(got.tolist())) > 3


@each_implementation
def test_tied_groups_spanning_tiles(impl: str) -> None:
    """A tied group cut by top-k or top-p and spread over several kernel tiles (vocab 5000 > the 2048 tile): the
    draw pass ranks the group's members across tiles, in token order."""
    vocab = 5000
    logits = torch.zeros(3, vocab)
    heavy = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))[:10]
    logits[1, heavy] = 2.0  # 10 likely tokens, then 4990 equal ones
    logits[2] = (torch.randn(vocab, generator=torch.Generator().manual_seed(1)) * 1.5 / 0.5).round() * 0.5
    # Row 1: the cut lands half-way through the 2459th member of the equal group (a step from any rounding).
    total = 10 * math.exp(2.0) + (vocab - 10)
    p1 = (10 * math.exp(2.0) + 2458.5) / total
    seeds_per_row = 4  # each row under a few seeds, so that a wrong kept set shows in some draw
    b = Batch(
        logits.repeat_interleave(seeds_per_row, dim=0),
        torch.ones(3 * seeds_per_row),
        torch.tensor([3000, vocab, 2500]).repeat_interleave(seeds_per_row),
        torch.tensor([1.0, p1, 0.9]).repeat_interleave(seeds_per_row),
        None,
        torch.arange(3 * seeds_per_row, dtype=torch.int64) * 7_777_777,
        torch.zeros(3 * seeds_per_row, dtype=torch.int64),
    )
    _check_against_reference(b, max_ambiguous=0, impl=impl)
    strict, _, _ = _kept_sets(b)
    assert strict.sum(dim=-1)[[0, seeds_per_row]].tolist() == [3000, 10 + 2459]


@each_implementation
def test_edge_settings(impl: str) -> None:
    """k = 1 and tiny p give the argmax of the logits; k >= vocab, p = 1 and min_p = 0 change nothing."""
    rng = random.Random(7)
    vocab = 257
    b = _random_batch(rng, 6, vocab, top_k=True, top_p=True, min_p=True)
    argmax = b.logits.argmax(dim=-1)
    batch = b.logits.shape[0]
    one = torch.ones(batch, dtype=torch.int64)
    for k, p in ((one, None), (None, torch.full((batch,), 1e-7))):
        narrow = dataclasses.replace(b, top_ks=k, top_ps=p, min_ps=None)
        assert torch.equal(_check_against_reference(narrow, impl=impl), argmax)
    off = dataclasses.replace(
        b,
        top_ks=torch.tensor([vocab, vocab + 1, vocab * 4, vocab, vocab, 2**40]),
        top_ps=torch.ones(batch),
        min_ps=torch.zeros(batch),
    )
    unfiltered = dataclasses.replace(b, top_ks=None, top_ps=None, min_ps=None)
    assert torch.equal(IMPLEMENTATIONS[impl](*off.args()), sample_filtered_reference(*unfiltered.args()))
    assert torch.equal(IMPLEMENTATIONS[impl](*off.args()), IMPLEMENTATIONS[impl](*unfiltered.args()))


@each_implementation
def test_banned_tokens_and_low_precision_input(impl: str) -> None:
    """-inf logits (banned ids) are never drawn, even when top-k reaches into them; bf16 input is upcast."""
    rng = random.Random(9)
    b = _random_batch(rng, 6, 300, top_k=True, top_p=True, min_p=True)
    banned = torch.rand(b.logits.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    banned[:, 0] = False
    b.logits[banned] = float("-inf")
    b.top_ks[:2] = torch.tensor([200, 299])  # more than the finite tokens
    got = _check_against_reference(b, impl=impl)
    assert not banned.gather(1, got[:, None]).any()
    half = dataclasses.replace(b, logits=b.logits.to(torch.bfloat16))
    _check_against_reference(half, impl=impl)


@each_implementation
def test_filtered_tokens_never_drawn_across_seeds(impl: str) -> None:
    """One row's logits under many seeds: every draw stays inside the kept set, and draws really vary."""
    torch.manual_seed(3)
    vocab, n = 300, 64
    logits = (torch.randn(vocab) * 2).expand(n, -1).contiguous()
    b = Batch(
        logits,
        torch.full((n,), 0.9),
        torch.full((n,), 20, dtype=torch.int64),
        torch.full((n,), 0.8),
        torch.full((n,), 0.03),
        torch.arange(n, dtype=torch.int64) * 7919,
        torch.zeros(n, dtype=torch.int64),
    )
    got = _check_against_reference(b, max_ambiguous=0, impl=impl)
    strict, _, _ = _kept_sets(b)
    assert set(got.tolist()) <= set(torch.nonzero(strict[0]).flatten().tolist())
    assert len(set(got.tolist())) >= 3  # really sampling, not collapsing to the argmax


@each_implementation
def test_row_does_not_depend_on_the_batch(impl: str) -> None:
    rng = random.Random(13)
    b = _random_batch(rng, 7, 257, top_k=True, top_p=True, min_p=True)
    together = IMPLEMENTATIONS[impl](*b.args())
    alone = torch.cat([IMPLEMENTATIONS[impl](*b.row(i).args()) for i in range(7)])
    assert torch.equal(together, alone)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(IMPLEMENTATIONS[impl](*b.permuted(perm).args()), together[perm])
    # A row with its filters off gives the same token whether the batch enables those filters or not.
    off = dataclasses.replace(
        b, top_ks=torch.full((7,), 257, dtype=torch.int64), top_ps=torch.ones(7), min_ps=torch.zeros(7)
    )
    unfiltered = dataclasses.replace(b, top_ks=None, top_ps=None, min_ps=None)
    assert torch.equal(IMPLEMENTATIONS[impl](*off.row(0).args()), IMPLEMENTATIONS[impl](*unfiltered.row(0).args()))


def test_sampler_takes_the_triton_path_when_forced(monkeypatch) -> None:
    from rayinfer.scheduler import SamplingParams
    from rayinfer.workers.step_plan import SampleRequest
    from rayinfer.workers.sampler import Sampler
    from rayinfer.workers.sampling_batch import build_sampling_tensors

    rng = random.Random(17)
    vocab = 300
    choices = [
        SamplingParams(),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_k=8),
        SamplingParams(top_p=0.7),
        SamplingParams(min_p=0.1, temperature=1.5),
        SamplingParams(top_k=20, top_p=0.9, min_p=0.02),
    ]
    rows = [SampleRequest(choices[i % len(choices)].sampling_options(), rng.randrange(2**63), [1], [2], []) for i in range(8)]
    logits = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(4)) * 3
    t = build_sampling_tensors(rows, vocab, "cpu")
    monkeypatch.setenv("RAYINFER_KERNEL_BACKEND", "torch")
    on_torch = Sampler()(logits, t)
    monkeypatch.setenv("RAYINFER_KERNEL_BACKEND", "triton")
    on_triton = Sampler()(logits, t)
    assert torch.equal(on_triton, on_torch)


def _peaked_batch(vocab: int, rows: int, seed: int) -> Batch:
    """Language-model-like rows: a few likely tokens, so top-p stops within a short candidate list."""
    rng = random.Random(seed)
    b = _random_batch(rng, rows, vocab, top_k=True, top_p=True, min_p=True, scale=6.0)
    b.top_ks = torch.tensor([rng.choice([5, 50, 100, 1000]) for _ in range(rows)])
    b.top_ps = torch.tensor([rng.choice([0.5, 0.9, 0.95]) for _ in range(rows)])
    return b


def test_cpu_path_draws_from_candidates_without_the_sort(monkeypatch) -> None:
    """Rows with top-k (within 2048), and greedy rows with their filters off, never reach the reference's sort."""
    b = _peaked_batch(5000, 16, seed=21)
    b.temperatures[:3] = 0.0  # greedy rows: their filters are off, and the caller discards their draws
    b.top_ks[:3], b.top_ps[:3] = 5000, 1.0
    expected = sample_filtered_reference(*b.args())

    def refuse(*args):
        raise AssertionError("fell back to the full sort")

    monkeypatch.setattr(sampling_cpu, "sample_filtered_reference", refuse)
    got = sample_filtered_cpu(*b.args())
    strict, loose, near_tie = _kept_sets(b)
    clear = ~((strict != loose).any(dim=-1) | near_tie)
    sampled = b.temperatures > 0
    assert torch.equal(got[clear & sampled], expected[clear & sampled])
    assert loose[sampled].gather(1, got[sampled, None]).all()


def test_cpu_path_leaves_unbounded_rows_to_the_reference(monkeypatch) -> None:
    """Rows with top-k off or longer than any list, or tied at the cut, are drawn by the reference, alone."""
    rng = random.Random(23)
    b = _random_batch(rng, 6, 5000, top_k=True, top_p=True, min_p=False, scale=3.0)
    b.temperatures[:] = 0.9
    b.top_ks = torch.tensor([5000, 4000, 40, 2048, 7, 129])
    b.logits[5, :200] = b.logits[5].max() + 1.0  # 200 equal best logits: the 128-list cut falls inside them
    expected = sample_filtered_reference(*b.args())
    referred = []
    real = sampling_cpu.sample_filtered_reference
    monkeypatch.setattr(sampling_cpu, "sample_filtered_reference", lambda *a: referred.append(a[0].shape[0]) or real(*a))
    got = sample_filtered_cpu(*b.args())
    assert referred == [2]  # rows 0 and 1; row 5 settles in the 2048 list
    strict, loose, near_tie = _kept_sets(b)
    clear = ~((strict != loose).any(dim=-1) | near_tie)
    assert torch.equal(got[clear], expected[clear]) and loose.gather(1, got[:, None]).all()


@pytest.mark.gpu
@pytest.mark.parametrize(("scale", "step"), [(1.0, None), (4.0, None), (3.0, 0.125)], ids=["flat", "peaked", "ties"])
def test_large_sweep_on_cuda(scale: float, step: float | None) -> None:
    """vocab 128k, batch 256, every filter mixed, on the GPU build (libdevice log, exp2-based exp). Near-flat rows
    put many tokens within rounding of the top-p cut: those rows are only held to the loose kept set."""
    vocab = 128 * 1024
    rng = random.Random(f"gpu-{scale}-{step}")
    for filters in (dict(top_k=True, top_p=True, min_p=True), dict(top_k=False, top_p=True, min_p=False)):
        b = _random_batch(rng, 256, vocab, scale=scale, step=step, device="cuda", **filters)
        got = _check_against_reference(b, max_ambiguous=256)
        alone = torch.cat([sample_filtered_triton(*b.row(i).args()) for i in range(0, 256, 37)])
        assert torch.equal(alone, got[::37])
    u = counter_uniforms_triton(b.seeds, b.positions, vocab)
    assert torch.equal(u.cpu(), counter_uniforms(b.seeds.cpu(), b.positions.cpu(), vocab))
    assert torch.equal(counter_uniforms(b.seeds, b.positions, vocab).cpu(), u.cpu())
