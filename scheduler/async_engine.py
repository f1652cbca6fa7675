"""`AsyncEngine`: the engine on a step thread of its own, with an asyncio face that streams each request's output
deltas. It runs inside a Serve replica (`rayinfer.cluster.engine_replica.EngineReplica`); nothing in it needs Ray.

Only the step thread touches the engine. Callers' `generate`/`abort` calls post commands to its inbox and
wait on asyncio futures, so the event loop stays free to stream tokens while a step runs, and the thread
sleeps when there is no work.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from rayinfer.configs import EngineConfig
from rayinfer.scheduler.engine import Engine
from rayinfer.scheduler.outputs import RequestOutput
from rayinfer.scheduler.request_errors import InvalidRequestError
from rayinfer.scheduler.sampling_params import SamplingParams
from rayinfer.workers.grammar import COMPILE_TIMEOUT_S

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    """The step thread's end of a request's stream: where its deltas go."""

    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue

    def push(self, output: RequestOutput) -> bool:
        """Hands a delta to the caller's event loop; False when that loop is gone (the caller with it)."""
        return self.call(self.outputs.put_nowait, output)

    def call(self, function: Any, *args: Any) -> bool:
        try:
            self.loop.call_soon_threadsafe(function, *args)
        except RuntimeError:  # the loop was closed
            return False
        return True


class RequestStream:
    """A request's output deltas as the engine makes them (`async for`); it ends after the delta that finishes the
    request. `cancel()` aborts the request, freeing its blocks at once; it may be called at any time, from the
    event loop the request was opened on."""

    def __init__(self, engine: AsyncEngine, request_id: str, outputs: asyncio.Queue) -> None:
        self.request_id = request_id
        self._engine = engine
        self._outputs = outputs
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        delta = await self._outputs.get()
        self.finished = delta.finished
        return delta

    def cancel(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine._post(("abort", self.request_id))


class AsyncEngine:
    def __init__(self, config: EngineConfig, engine_id: str | None = None) -> None:
        self.engine = Engine(config, engine_id=engine_id)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._stopped = False
        self._progress_at = time.monotonic()  # when the step loop last finished a step or found new work
        self._thread = threading.Thread(target=self._run, name="rayinfer-step-loop", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ called by clients (event loop thread)
    async def generate(
        self,
        request_id: str,
        prompt: str | None,
        params: SamplingParams,
        prompt_token_ids: list[int] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Streams the request's output deltas; a bad request raises InvalidRequestError before anything streams."""
        stream = await self.open(request_id, prompt, params, prompt_token_ids)
        try:
            async for delta in stream:
                yield delta
        finally:
            stream.cancel()  # the client went away (or nothing: it finished): free the request's blocks at once

    async def open(
        self,
        request_id: str,
        prompt: str | None,
        params: SamplingParams,
        prompt_token_ids: list[int] | None = None,
    ) -> RequestStream:
        """Adds the request and returns its stream; a bad request raises InvalidRequestError. A structured output's
        grammar is compiled first, on a thread of its own, so that the step loop never waits for it."""
        loop = asyncio.get_running_loop()
        structured = getattr(params, "structured_outputs", None)
        if structured is not None:
            spec = structured.spec()
            try:
                await asyncio.wait_for(asyncio.to_thread(self.engine.grammar_checks.check, spec), COMPILE_TIMEOUT_S)
            except asyncio.TimeoutError:
                raise InvalidRequestError.about(
                    f"structured_outputs.{spec.kind}", f"it did not compile within {COMPILE_TIMEOUT_S:.0f}s"
                ) from None
        outputs: asyncio.Queue = asyncio.Queue()
        accepted = loop.create_future()
        self._post(("add", request_id, prompt, params, prompt_token_ids, _Stream(loop, outputs), accepted))
        try:
            await accepted
        except asyncio.CancelledError:  # the caller left while the request was being added: take it back
            self._post(("abort", request_id))
            raise
        return RequestStream(self, request_id, outputs)

    async def abort(self, request_id: str) -> None:
        self._post(("abort", request_id))

    def stats(self) -> dict[str, Any]:
        return {**self.engine.stats(), "engine_id": self.engine.engine_id}

    def health_problem(self, include_recovery: bool = True) -> str | None:
        """Why this engine cannot serve now, or None: its workers are lost for good, it is replacing them (left
        out for Serve's own check: a replacement is not a reason to replace the replica), or it has had work and
        finished no step for `health_stall_timeout_s`."""
        engine = self.engine
        if engine.failure is not None:
            return f"the engine failed: {engine.failure}"
        if engine.recovering:
            return "the engine is replacing its worker group" if include_recovery else None
        idle_s = time.monotonic() - self._progress_at
        if engine.has_unfinished_requests() and idle_s > engine.config.health_stall_timeout_s:
            return (f"the engine has finished no step for {idle_s:.0f}s with {len(engine.requests)} requests "
                    f"(health_stall_timeout_s={engine.config.health_stall_timeout_s:g})")
        return None

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=30)
        self.engine.shutdown()

    def _post(self, command: tuple) -> None:
        self._inbox.put(command)
        self._wake.set()

    # ------------------------------------------------------------ the step thread
    def _run(self) -> None:
        while not self._stopped:
            self._drain_inbox()
            if not self.engine.has_unfinished_requests():
                self._wake.wait()
                self._wake.clear()
                self._progress_at = time.monotonic()
                continue
            try:
                outputs = self.engine.step()
                self._progress_at = time.monotonic()
            except Exception as exc:  # an engine bug must end requests with an error, not hang them
                logger.exception("engine step failed")
                outputs = self._fail_everything(f"{type(exc).__name__}: {exc}")
            for output in outputs:
                self._deliver(output)

    def _drain_inbox(self) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, request_id, prompt, params, token_ids, stream, accepted = command
                try:
                    self.engine.add_request(request_id, prompt, params, prompt_token_ids=token_ids)
                except Exception as exc:
                    stream.call(_settle, accepted, exc)
                    continue
                if stream.call(_settle, accepted, None):
                    self._streams[request_id] = stream
                else:  # the caller is gone already
                    self.engine.abort_request(request_id)
            else:
                output = self.engine.abort_request(command[1])
                if output is not None:
                    self._deliver(output)

    def _deliver(self, output: RequestOutput) -> None:
        stream = self._streams.get(output.request_id)
        if stream is None:
            return
        if output.finished:
            del self._streams[output.request_id]
        if not stream.push(output) and not output.finished:
            del self._streams[output.request_id]  # nobody is left to read it: free its blocks now
            self.engine.abort_request(output.request_id)

    def _fail_everything(self, message: str) -> list[RequestOutput]:
        outputs = []
        for request_id in list(self.engine.requests):
            output = self.engine.abort_request(request_id)
            output.error = message
            for completion in output.outputs:
                completion.finish_reason = "error"
            outputs.append(output)
        return outputs


def _settle(future: asyncio.Future, error: Exception | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
