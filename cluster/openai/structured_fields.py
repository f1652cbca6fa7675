"""The shape a completions or chat request asks its output to take, as the engine's `StructuredOutputsParams`, and
which of the request's fields to blame when the engine refuses it.

A request names its constraint in one of several ways, as vLLM's server accepts them: OpenAI's `response_format`
(`json_object`, or `json_schema` with its `schema`), vLLM's `structured_outputs` (`json`, `regex`, `choice`,
`grammar`, `json_object`), or vLLM's older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`. A chat
request's `tool_choice` of "required" or a named function is a constraint too: a JSON schema built from `tools`
(`tool_parsers.required_tools_schema`, `named_tool_schema`), so the calls' arguments always validate. At most one
may be given. The engine refuses a constraint that does not compile naming `structured_outputs.<kind>`, which
`constraint_renames` maps back to the field the client sent.
"""
from __future__ import annotations

from typing import Any, Optional, Union

from rayinfer.cluster.openai.request_models import ChatCompletionRequest, NamedToolChoice, SamplingRequest
from rayinfer.cluster.openai.tool_parsers import named_tool_schema, required_tools_schema
from rayinfer.scheduler.request_errors import InvalidRequestError
from rayinfer.scheduler.structured_outputs import StructuredOutputsParams

# The engine's names for a refused constraint: the whole, and each kind.
ENGINE_FIELDS = ("structured_outputs", *(f"structured_outputs.{kind}" for kind in
                                         ("json", "regex", "choice", "grammar", "json_object")))
# vLLM's older fields, each with the StructuredOutputsParams argument it sets.
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}
# A chat request's constraint from its tools is blamed on them: a schema that does not compile is a tool's parameters.
TOOLS_FIELD = "tools"


def forced_tool_choice(body: SamplingRequest) -> Union[str, NamedToolChoice, None]:
    """"required", or the named function, when a chat request forces a call; None when its output may be text."""
    if not isinstance(body, ChatCompletionRequest):
        return None
    choice = body.effective_tool_choice
    return None if choice in ("none", "auto") else choice


def constraint_fields(body: SamplingRequest) -> list[str]:
    """The request's fields that constrain its output, in the order they are documented."""
    fields = []
    if body.response_format is not None and body.response_format.type != "text":
        fields.append("response_format")
    if body.structured_outputs is not None:
        fields.append("structured_outputs")
    fields += [name for name in GUIDED_FIELDS if getattr(body, name) is not None]
    if forced_tool_choice(body) is not None:
        fields.append("tool_choice")
    return fields


def constraint_field(body: SamplingRequest) -> Optional[str]:
    """The one field that constrains the output (None: none does); more than one is refused, naming them."""
    fields = constraint_fields(body)
    if len(fields) <= 1:
        return fields[0] if fields else None
    if "tool_choice" in fields:
        others = ", ".join(f for f in fields if f != "tool_choice")
        forced = forced_tool_choice(body)
        what = "'required'" if forced == "required" else f"the function {forced.function.name!r}"
        raise InvalidRequestError(
            f"tool_choice: a forced tool call ({what}) constrains the output to the calls' arguments and cannot be "
            f"combined with {others}; use tool_choice 'auto' or 'none' with it",
            "tool_choice",
        )
    raise InvalidRequestError(
        f"{fields[1]}: give at most one of response_format, structured_outputs, "
        f"{', '.join(GUIDED_FIELDS)} (got {' and '.join(fields)})",
        fields[1],
    )


def constraint_renames(body: SamplingRequest) -> dict[str, str]:
    """Engine field name (`structured_outputs`, `structured_outputs.<kind>`) -> the field of this request it came
    from; `structured_outputs` itself keeps the engine's names, which are its own. (Read while blaming another
    refusal, so it raises nothing: with several constraints there is none to rename to.)"""
    fields = constraint_fields(body)
    if len(fields) != 1 or fields[0] == "structured_outputs":
        return {}
    client_name = TOOLS_FIELD if fields[0] == "tool_choice" else fields[0]
    return {name: client_name for name in ENGINE_FIELDS}


def structured_outputs_of(body: SamplingRequest) -> Optional[StructuredOutputsParams]:
    """The engine's constraint for `body`, None when its output is free. Raises `InvalidRequestError` naming the
    engine's field (`structured_outputs.<kind>`, which `constraint_renames` maps to the client's) for a constraint
    that is wrong on its face, and naming `tool_choice` for a function not among `tools`."""
    field = constraint_field(body)
    if field is None:
        return None
    return StructuredOutputsParams(**_constraint_arguments(body, field))


def _constraint_arguments(body: SamplingRequest, field: str) -> dict[str, Any]:
    if field == "response_format":
        response_format = body.response_format
        if response_format.type == "json_object":
            return {"json_object": True}
        return {"json": response_format.json_schema.json_schema}
    if field == "structured_outputs":
        given = body.structured_outputs
        return {"json": given.json_, "regex": given.regex, "choice": given.choice, "grammar": given.grammar,
                "json_object": given.json_object}
    if field in GUIDED_FIELDS:
        return {GUIDED_FIELDS[field]: getattr(body, field)}
    return {"json": _tool_schema(body)}


def _tool_schema(body: ChatCompletionRequest) -> dict[str, Any]:
    """The JSON schema a forced tool call must follow: an array of calls for 'required', the named function's
    arguments otherwise."""
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools or []]
    forced = forced_tool_choice(body)
    try:
        if forced == "required":
            return required_tools_schema(tools, body.parallel_tool_calls)
        return named_tool_schema(tools, forced.function.name)
    except ValueError as exc:  # tools whose schemas clash, or a function not among them
        raise InvalidRequestError.about(TOOLS_FIELD if forced == "required" else "tool_choice", str(exc)) from None
