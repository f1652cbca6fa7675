"""Checks on a request body before any route reads it: its size (413), its JSON nesting, and numbers JSON has no
words for (`NaN`, `Infinity`, or a literal past float range such as `1e999`), each a 400 naming the limit or field.

Python's `json` accepts `NaN` and `Infinity` and parses `1e999` to infinity, and pydantic passes non-finite floats on
to fields that take a float; a body nested thousands of levels deep makes the parser raise `RecursionError`. So an
ASGI middleware reads the body once (refusing it as soon as it grows past the limit), parses it, walks it, and hands
the same bytes on to the app. After the body, `receive` is the server's again, so a route still hears the client
leave.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from rayinfer.cluster.openai.errors import send_error

_METHODS_WITH_BODIES = frozenset({"POST", "PUT", "PATCH"})


@dataclass
class BodyLimits:
    max_bytes: int = 16 * 2**20
    max_depth: int = 32


# Set by each `LLMServer` replica from its engine config when it starts (one replica per process).
LIMITS = BodyLimits()


def configure(max_bytes: int, max_depth: int) -> None:
    LIMITS.max_bytes, LIMITS.max_depth = max_bytes, max_depth


def body_problem(value: Any, max_depth: int) -> tuple[str, str] | None:
    """(param, reason) for the first thing wrong with a parsed body, else None: nesting deeper than `max_depth`
    arrays and objects, or a number that is not finite (its dotted path, e.g. `logit_bias.42`)."""
    stack: list[tuple[Any, str, int]] = [(value, "", 1)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return path or "body", f"{path or 'the body'} must be a finite number (got {item})"
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth > max_depth:
            return "body", f"the JSON body nests arrays and objects more than {max_depth} levels deep (max_json_depth)"
        children = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in children:
            if isinstance(child, (float, dict, list)):  # ints and strings need no look (most of a prompt's ids)
                stack.append((child, f"{path}.{key}" if path else str(key), depth + 1))
    return None


class BodyChecks:
    """ASGI middleware: refuses an oversized, too deeply nested or non-finite JSON body before the routes see it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in _METHODS_WITH_BODIES:
            await self.app(scope, receive, send)
            return
        limit = LIMITS.max_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await send_error(send, 413, _too_large(limit), param="body")
            return
        chunks, size, more, last = [], 0, True, None
        while more:
            last = await receive()
            if last["type"] != "http.request":  # the client left before sending its body
                break
            chunk = last.get("body", b"")
            size += len(chunk)
            if size > limit:
                await send_error(send, 413, _too_large(limit), param="body")
                return
            chunks.append(chunk)
            more = last.get("more_body", False)
        body = b"".join(chunks)
        problem = _json_problem(body, LIMITS.max_depth)
        if problem is not None:
            await send_error(send, 400, problem[1], param=problem[0])
            return
        await self.app(scope, _replay(body, last, receive), send)


def _json_problem(body: bytes, max_depth: int) -> tuple[str, str] | None:
    try:
        value = json.loads(body)
    except RecursionError:
        return "body", f"the JSON body nests arrays and objects more than {max_depth} levels deep (max_json_depth)"
    except ValueError:  # not JSON at all: the route's own parsing answers that with its 400
        return None
    return body_problem(value, max_depth)


def _replay(body: bytes, last: dict | None, receive: Any) -> Any:
    """`receive` that gives the app the body it was read from, then passes on to the server's own."""
    sent = False

    async def replayed() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            if last is not None and last["type"] != "http.request":
                return last  # the disconnect that cut the body short
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _too_large(limit: int) -> str:
    return f"the request body is larger than {limit} bytes (max_request_body_bytes)"

