"""`--api-key` (or `RAYINFER_API_KEY`): the OpenAI routes, `/tokenize` and `/detokenize` need
`Authorization: Bearer <key>`, as in vLLM's server; `/health`, `/metrics` and the API schema stay open for probes and
scrapers. Anything else is 401 with an OpenAI-shaped body, answered before the body is read.

The key is compared with `hmac.compare_digest`, whose time does not depend on how much of a guess is right.
"""
from __future__ import annotations

import hmac
import os
from typing import Any

from rayinfer.cluster.openai.errors import send_error

ENV_VAR = "RAYINFER_API_KEY"
_PROTECTED = ("/v1/", "/tokenize", "/detokenize")


class _Key:
    expected: bytes | None = None  # the key; None: no key, every route open


# Set by each `LLMServer` replica when it starts (one replica per process).
KEY = _Key()


def configure(api_key: str | None) -> None:
    """The replica's key: the one given, else `RAYINFER_API_KEY` from its environment, else none."""
    key = api_key or os.environ.get(ENV_VAR) or None
    KEY.expected = key.encode() if key else None


def _route(scope: dict) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


class ApiKeyCheck:
    """ASGI middleware: refuses a protected route without the right bearer token."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        expected = KEY.expected
        if expected is None or scope["type"] != "http" or not _route(scope).startswith(_PROTECTED):
            await self.app(scope, receive, send)
            return
        given = next((value for name, value in scope.get("headers") or [] if name == b"authorization"), b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), expected):  # schemes ignore case
            await self.app(scope, receive, send)
            return
        reason = "is missing" if not given else "is not the right key"
        await send_error(send, 401, f"Authorization: this server needs 'Bearer <api key>'; the header {reason}",
                         param="Authorization", code="invalid_api_key", headers=((b"www-authenticate", b"Bearer"),))
