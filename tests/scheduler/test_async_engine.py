"""`AsyncEngine` (what a Serve engine replica runs) streams deltas, aborts at once, refuses a bad request alone,
and frees everything when a client goes away."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from rayinfer.cluster import LLM, SamplingParams
from rayinfer.configs import EngineConfig
from rayinfer.scheduler.async_engine import AsyncEngine
from rayinfer.scheduler.request_errors import InvalidRequestError

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(llama_dir: Path):
    engine = AsyncEngine(EngineConfig(model=str(llama_dir)))
    yield engine
    engine.shutdown()


async def _collect(stream) -> list:
    return [delta async for delta in stream]


def _wait_idle(engine: AsyncEngine, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if stats["num_running"] == 0 and stats["num_waiting"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.01)


def test_stream_of_deltas_adds_up_to_the_offline_output(engine: AsyncEngine, llama_dir: Path) -> None:
    params = SamplingParams(max_tokens=20, stop=["zzz-not-there"], **GREEDY)
    expected = LLM(str(llama_dir)).generate("Once upon a time", params, use_tqdm=False)[0]
    deltas = asyncio.run(_collect(engine.generate("s1", "Once upon a time", params)))
    assert len(deltas) > 1 and deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    assert deltas[0].prompt_token_ids == expected.prompt_token_ids and deltas[0].prompt == "Once upon a time"
    assert all(d.prompt_token_ids is None and d.prompt is None for d in deltas[1:])  # the prompt travels once
    assert sum((d.outputs[0].token_ids for d in deltas), []) == expected.outputs[0].token_ids
    assert "".join(d.outputs[0].text for d in deltas) == expected.outputs[0].text
    assert deltas[-1].outputs[0].finish_reason == "length"


def test_concurrent_streams(engine: AsyncEngine) -> None:
    async def run() -> list[list]:
        streams = [engine.generate(f"c{i}", "Hello", SamplingParams(max_tokens=5 + i, **GREEDY)) for i in range(4)]
        return await asyncio.gather(*(_collect(stream) for stream in streams))

    for i, deltas in enumerate(asyncio.run(run())):
        assert len(sum((d.outputs[0].token_ids for d in deltas), [])) == 5 + i


def test_bad_request_raises_without_disturbing_others(engine: AsyncEngine) -> None:
    async def run() -> list:
        good = asyncio.ensure_future(_collect(engine.generate("ok", "Hello", SamplingParams(max_tokens=8, **GREEDY))))
        with pytest.raises(InvalidRequestError, match="prompt: must not be empty") as refused:
            await _collect(engine.generate("bad", "", SamplingParams()))
        assert refused.value.field == "prompt"
        return await good

    assert len(sum((d.outputs[0].token_ids for d in asyncio.run(run())), [])) == 8


def test_abort_ends_the_stream_and_frees_blocks(engine: AsyncEngine) -> None:
    async def run() -> tuple:
        stream = engine.generate("long", "Hello", SamplingParams(max_tokens=400, **GREEDY))
        first = await anext(stream)
        await engine.abort("long")
        return first, await _collect(stream)

    first, rest = asyncio.run(run())
    assert not first.finished
    assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
    stats = _wait_idle(engine)
    assert stats["num_free_blocks"] == stats["num_blocks"]


def test_client_that_goes_away_frees_its_request(engine: AsyncEngine) -> None:
    aborted_before = engine.stats()["num_aborted_requests"]

    async def run() -> None:
        stream = engine.generate("gone", "Hello", SamplingParams(max_tokens=400, **GREEDY))
        await anext(stream)
        await stream.aclose()  # what Serve does when the HTTP client disconnects

    asyncio.run(run())
    stats = _wait_idle(engine)
    assert stats["num_aborted_requests"] == aborted_before + 1, "the request ran on instead of being aborted"
    assert stats["num_running"] == 0 and stats["num_free_blocks"] == stats["num_blocks"]




def _stalling_engine(llama_dir: Path, monkeypatch, **config):
    """An AsyncEngine whose steps hang until the returned gate is set (as a step stuck in a collective would), so
    that its step thread is busy while the test acts."""
    import threading

    from rayinfer.workers import executor

    gate, entered = threading.Event(), threading.Event()

    class StallingExecutor(executor.InProcessExecutor):
        def execute(self, plan):
            entered.set()
            gate.wait(30)
            return super().execute(plan)

    monkeypatch.setattr(executor, "default_executor_factory", lambda config: StallingExecutor)
    engine = AsyncEngine(EngineConfig(model=str(llama_dir), **config))
    engine.step_entered = entered  # set once the step thread is inside a step (and so not reading its inbox)
    return engine, gate


def test_a_client_that_leaves_before_its_request_is_accepted_leaves_nothing_running(llama_dir, monkeypatch) -> None:
    busy, gate = _stalling_engine(llama_dir, monkeypatch)

    async def run() -> None:
        first = await busy.open("first", "Hello", SamplingParams(max_tokens=2, **GREEDY))  # the step thread hangs
        await asyncio.get_running_loop().run_in_executor(None, busy.step_entered.wait, 30)
        adding = asyncio.ensure_future(busy.open("left", "Hello", SamplingParams(max_tokens=400, **GREEDY)))
        await asyncio.sleep(0.2)
        assert not adding.done()  # still in the inbox: the step thread is busy
        adding.cancel()  # the client disconnected
        with pytest.raises(asyncio.CancelledError):
            await adding
        gate.set()
        await _collect(first)

    try:
        asyncio.run(run())
        stats = _wait_idle(busy)
        assert "left" not in busy.engine.requests and stats["num_running"] == stats["num_waiting"] == 0
        assert stats["num_free_blocks"] == stats["num_blocks"]
    finally:
        gate.set()
        busy.shutdown()


def test_health_reports_failure_recovery_and_a_stalled_step_loop(llama_dir: Path, monkeypatch) -> None:
    stalling, gate = _stalling_engine(llama_dir, monkeypatch, health_stall_timeout_s=0.3)

    async def run() -> list:
        stream = await stalling.open("stuck", "Hello", SamplingParams(max_tokens=3, **GREEDY))
        deadline = time.monotonic() + 10
        while (problem := stalling.health_problem(include_recovery=False)) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert problem is not None and "finished no step for" in problem and "1 requests" in problem, problem
        gate.set()
        return await _collect(stream)

    try:
        assert stalling.health_problem() is None  # idle is healthy, however long
        assert sum(len(d.outputs[0].token_ids) for d in asyncio.run(run())) == 3
        assert stalling.health_problem() is None
        stalling.engine.recovering = True
        assert stalling.health_problem() == "the engine is replacing its worker group"
        assert stalling.health_problem(include_recovery=False) is None  # Serve leaves a recovering replica alone
        stalling.engine.recovering = False
        stalling.engine.failure = "the worker group failed and could not be replaced"
        assert stalling.health_problem(include_recovery=False) == (
            "the engine failed: the worker group failed and could not be replaced")
    finally:
        stalling.engine.failure = None
        gate.set()
        stalling.shutdown()


def test_a_slow_grammar_compile_delays_only_its_own_request(engine: AsyncEngine, monkeypatch) -> None:
    """A structured output's grammar compiles beside the step loop: while it compiles (held here until released),
    another request streams to its end; then the constrained one runs and obeys its regex."""
    import re
    import threading

    from rayinfer.cluster import StructuredOutputsParams

    executor, release = engine.engine.executor, threading.Event()
    compile_for_real = executor.prepare_grammar

    def slow_compile(spec):
        release.wait(timeout=30)
        return compile_for_real(spec)

    monkeypatch.setattr(executor, "prepare_grammar", slow_compile)
    constraint = StructuredOutputsParams(regex="[0-9]{4}-(slow|compile)")

    async def run() -> tuple[list, list]:
        constrained = asyncio.ensure_future(_collect(engine.generate(
            "constrained", "Hello", SamplingParams(max_tokens=30, temperature=1.0, structured_outputs=constraint))))
        plain = await _collect(engine.generate("plain", "Hello", SamplingParams(max_tokens=30, **GREEDY)))
        assert not constrained.done()  # still compiling: the plain request did not wait for it
        release.set()
        return plain, await constrained

    plain, constrained = asyncio.run(run())
    assert len(sum((d.outputs[0].token_ids for d in plain), [])) == 30
    assert re.fullmatch("[0-9]{4}-(slow|compile)", "".join(d.outputs[0].text for d in constrained))
    assert constrained[-1].outputs[0].finish_reason == "stop"


def test_a_grammar_that_does_not_compile_in_time_is_refused(engine: AsyncEngine, monkeypatch) -> None:
    import threading

    from rayinfer.cluster import StructuredOutputsParams
    from rayinfer.scheduler import async_engine

    never, executor = threading.Event(), engine.engine.executor
    monkeypatch.setattr(executor, "prepare_grammar", lambda spec: never.wait(timeout=5) and None)
    monkeypatch.setattr(async_engine, "COMPILE_TIMEOUT_S", 0.2)
    params = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(regex="[0-9]+(too|slow)"))
    with pytest.raises(InvalidRequestError, match="did not compile within") as refused:
        asyncio.run(_collect(engine.generate("slow-grammar", "Hello", params)))
    never.set()
    assert refused.value.field == "structured_outputs.regex" and "slow-grammar" not in engine.engine.requests
