"""Errors as the OpenAI API gives them: `{"error": {"message", "type", "param", "code"}}` bodies, as JSON responses
or as a stream's error event, and the status each failure answers with.

A refusal carries its field as data from where it is raised (`SamplingParams`, the engine's request checks, the
routes' own) to here: `InvalidRequestError` answers 400 with `param` its field, renamed to the client's name
for it (`sampling_fields.blame`); anything else 500. (A full queue is Serve's to answer, in front of the replicas:
503 with Retry-After, `routes.LLMServer`'s backpressure setting.)
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rayinfer.cluster.openai.request_models import SamplingRequest
from rayinfer.cluster.openai.response_models import ErrorInfo, ErrorResponse
from rayinfer.cluster.openai.sampling_fields import blame
from rayinfer.scheduler.request_errors import InvalidRequestError

logger = logging.getLogger(__name__)


def error_body(message: str, type_: str, param: Optional[str] = None, code: Union[int, str, None] = None) -> dict:
    """`{"error": {"message", "type", "param", "code"}}`, e.g. type_ "invalid_request_error", code 400."""
    return ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=code)).model_dump()


def error_response(
    status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
    headers: Optional[Mapping[str, str]] = None,
) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param=param, code=status), status_code=status, headers=headers)


def invalid_request(error: InvalidRequestError) -> JSONResponse:
    """400, naming the refused field (already the client's name for it)."""
    return error_response(400, str(error), param=error.field)


def engine_ended(reason: str) -> JSONResponse:
    """500 for a request the engine started and ended early (`RequestOutput.error`)."""
    return error_response(500, f"the engine failed this request: {reason}", type_="internal_error")


def engine_failure(
    exc: BaseException, body: Optional[SamplingRequest] = None, renames: Optional[Mapping[str, str]] = None
) -> JSONResponse:
    """The response for an engine request that raised: refused (400, blaming `body`'s field) or failed (500)."""
    if isinstance(exc, InvalidRequestError):
        return invalid_request(blame(body, exc, renames) if body is not None else exc)
    if isinstance(exc, ValueError):  # refused by a check that names no field
        return error_response(400, str(getattr(exc, "cause", None) or exc))
    logger.error("engine call failed: %s", exc)
    return error_response(500, f"the engine failed this request: {type(exc).__name__}", type_="internal_error")


async def send_error(send: Any, status: int, message: str, param: Optional[str] = None, code: Union[int, str, None] = None,
                     headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    """An error response sent straight over ASGI, by a middleware that answers before any route runs."""
    payload = JSONResponse(error_body(message, "invalid_request_error", param=param, code=code or status)).body
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), *headers]})
    await send({"type": "http.response.body", "body": payload})


def error_event(response: JSONResponse) -> str:
    """An error as a server-sent event: a stream's status line has been sent already."""
    return f"data: {response.body.decode()}\n\n"


# ------------------------------------------------------------------------------------- malformed bodies

_FIELD_SEGMENT = re.compile(r"^[a-z_][a-z0-9_]*$")
_UNION_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _field_path(loc: tuple) -> str:
    """Dotted path of an error location without pydantic's union tags (`list[int]`, `TextContentPart`)."""
    parts = [str(p) for p in loc if isinstance(p, int) or (_FIELD_SEGMENT.match(str(p)) and p not in _UNION_TAGS)]
    if parts and parts[0] in ("body", "query"):  # FastAPI's RequestValidationError locations
        parts = parts[1:]
    return ".".join(parts)


def validation_error_body(exc: Any) -> dict:
    """A 400 error body naming each bad field once, for a pydantic `ValidationError` or FastAPI's
    `RequestValidationError` (anything with `.errors()`); `param` is the first field's dotted path."""
    seen: dict[str, str] = {}
    for err in exc.errors():
        path = _field_path(tuple(err.get("loc", ())))
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        seen.setdefault(path, msg)
    # A union member that failed near the top ("content is not a str") hides nothing the deeper one doesn't say.
    seen = {p: m for p, m in seen.items() if not p or not any(q.startswith(p + ".") for q in seen)}
    items = [f"{path}: {msg}" if path else msg for path, msg in seen.items()]
    first = next(iter(seen), "")
    return error_body("Invalid request: " + "; ".join(items), "invalid_request_error", param=first or None, code=400)


def install_error_handlers(app: FastAPI) -> None:
    """Malformed bodies answer 400 naming their fields; what FastAPI or Starlette refuse themselves (a body that is
    not UTF-8, an unknown path, a wrong method) is OpenAI-shaped too."""

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_error_body(exc), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "internal_error" if exc.status_code >= 500 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), type_=type_, headers=exc.headers)
