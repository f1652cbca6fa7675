"""How the routes use their replica's engine: one stream of deltas per prompt (or beam), its first delta awaited
before the HTTP status is chosen, whole outputs assembled from deltas, several streams merged as their deltas
come, and streams cancelled (which aborts their requests) when the client goes away or one fails."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Optional, Union

from rayinfer.scheduler.outputs import RequestOutput
from rayinfer.scheduler.sampling_params import SamplingParams


def open_stream(
    engine: Any, request_id: str, prompt: Optional[str], params: SamplingParams, prompt_token_ids: list[int]
) -> Any:
    """The request's deltas from `engine` (an `EngineReplica`): an async iterator whose first step adds the request
    and whose `cancel()` aborts it."""
    return engine.stream(request_id, prompt, params, prompt_token_ids)


def cancel(streams: list) -> None:
    for stream in streams:
        stream.cancel()


async def first_deltas(streams: list) -> list[RequestOutput]:
    """Each stream's first delta; the first failure among them is raised once every stream is cancelled. The first
    delta decides the status: a refused, queued-out or failed request must not answer 200."""
    try:
        firsts = await asyncio.gather(*(anext(stream) for stream in streams), return_exceptions=True)
    except asyncio.CancelledError:  # the client left while the prompts were being prefilled
        cancel(streams)
        raise
    failure = next((first for first in firsts if isinstance(first, BaseException)), None)
    if failure is not None:
        cancel(streams)
        raise failure
    return firsts


async def whole_output(first: RequestOutput, stream: Any) -> RequestOutput:
    """The request's whole output: its deltas (`first`, then the rest of `stream`) added up once."""
    output = RequestOutput(first.request_id, first.prompt, list(first.prompt_token_ids or []))
    output.add(first)
    async for delta in stream:
        output.add(delta)
    return output


Merged = tuple[int, Union[RequestOutput, Exception]]


async def merged(firsts: list[RequestOutput], streams: list) -> AsyncIterator[Merged]:
    """(stream index, delta) as each delta arrives from any stream, beginning with the `firsts`; a stream that
    fails gives (index, its exception) and ends. Closing this iterator cancels every stream still running."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: Any) -> None:
        try:
            await queue.put((index, firsts[index]))
            async for delta in stream:
                await queue.put((index, delta))
        except Exception as exc:  # surfaced to the client as an error event
            await queue.put((index, exc))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    open_streams = len(streams)
    try:
        while open_streams:
            index, item = await queue.get()
            if item is None:
                open_streams -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        cancel(streams)  # a client that went away aborts its requests, which frees their blocks at once


async def all_or_none(coroutines: list[Awaitable]) -> list:
    """Runs the coroutines concurrently; their results in order, or the first failure once the others are
    cancelled (as they are when the caller is), so a failed or abandoned beam search stops at once."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    if not tasks:
        return []
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()
    return [task.result() for task in tasks]
