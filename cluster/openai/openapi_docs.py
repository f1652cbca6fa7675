"""What `/openapi.json` says each route returns: every status it can answer with and the body of each, so that a
client generated from the schema (or a fuzzer checking responses against it) meets no surprise.

FastAPI documents only the 200 of a route's return type and a 422 for bodies it cannot parse; the routes answer
malformed bodies with 400 instead (`errors.install_error_handlers`), so the 422s are removed and the errors the
routes, the middlewares and Serve's proxy give are added.
"""
from __future__ import annotations

from typing import Any, Optional

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from rayinfer.cluster.openai.response_models import ErrorResponse

_ERROR_DESCRIPTIONS = {
    400: "A malformed body or a refused field; `param` names the field or the limit",
    401: "Missing or wrong `Authorization: Bearer <api key>` (when the server has one)",
    404: "The model named is not the one this server serves",
    413: "The body is larger than max_request_body_bytes",
    500: "The engine failed the request",
}
_TEXT = {"text/plain": {"schema": {"type": "string"}}}
# Before Open API 3.2, an event stream's `schema` describes one event: its `data` is a chunk's JSON (an error's
# once a stream has started), and the last event's is `[DONE]`.
_EVENTS = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string", "description": "a chunk as JSON, an error body, or `[DONE]`"},
                   "event": {"type": "string"}}}}}
# Serve's HTTP proxy answers a full queue before any replica runs: a plain-text body and Retry-After.
_QUEUE_FULL = {503: {"description": "The queue in front of the replicas is full (max_queued_requests); retry after "
                                    "the Retry-After header's seconds", "content": _TEXT}}


class HealthStatus(BaseModel):
    status: str
    reason: Optional[str] = None


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[status]} for status in statuses}


def generation(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """A generation route: its JSON response, or with `stream: true` server-sent events; all its errors."""
    return {200: {"model": model, "content": _EVENTS, "description": "The response, or with `stream: true` its "
                                                                     "chunks as server-sent events"},
            **errors(400, 401, 404, 413, 500), **_QUEUE_FULL}


def body_route(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """A route with a JSON body that does not generate."""
    return {200: {"model": model}, **errors(400, 401, 404, 413, 500), **_QUEUE_FULL}


LISTING = {**errors(401, 500), **_QUEUE_FULL}
HEALTH = {200: {"model": HealthStatus}, 503: {"model": HealthStatus, "description": "The engine is failed, replacing "
                                                                                   "its workers, or stalled"}}
METRICS = {200: {"description": "Prometheus text exposition", "content": _TEXT}}


def install_openapi(app: FastAPI) -> None:
    """`app.openapi` without FastAPI's 422s (never sent: malformed bodies are 400)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
