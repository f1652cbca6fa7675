"""Tool-call parsers on hand-written model outputs: the final parse, every prefix parsed as a stream (each must
only append to the last), and `ToolCallStream` fed the output in many chunkings (every split into two, one character
at a time, seeded random ones), whose joined deltas must give the final content and arguments.

A case is (parser, output, content, calls as (name, arguments dict), orphan): `orphan` names a call that a stream
lists before the final parse finds it broken; it stays as sent, after the good calls.
"""
from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Optional

import pytest

from rayinfer.cluster.openai.tool_parsers import (
    NamedToolCallParser,
    ParsedText,
    RequiredToolCallParser,
    ToolCallParser,
    ToolCallStream,
    get_tool_call_parser,
)

Calls = list[tuple[str, dict]]

TRICKY = {
    "path": "a}b{.txt",
    "text": 'say "hi" </tool_call> <tool_call> [TOOL_CALLS] \\ }] ünïcødé 🌍\n\t',
    "nested": {"list": [1, -2.5e3, None, True, False, {"k": "v"}], "empty": {}, "": []},
}
TRICKY_RAW = json.dumps(TRICKY, ensure_ascii=False)
TRICKY_ASCII = json.dumps(TRICKY)  # \uXXXX escapes, kept as written
WEATHER = {"city": "Paris", "unit": "celsius"}


def hermes(name: str, args: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


def qwen(name: str, *params: tuple[str, str]) -> str:
    body = "".join(f"<parameter={key}>\n{value}\n</parameter>\n" for key, value in params)
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


CODE = 'print("a</tool_call>b")\nif x < 3: pass'
QWEN_VALUES = qwen(
    "run", ("code", CODE), ("config", '{"a": [1, 2], "b": "x"}'), ("flag", "true"), ("n", "-1.5"),
    ("none", "null"), ("quoted", '"hi"'), ("zip", "01234"), ("spaced", "  two lines\n"), ("nan", "NaN"))
QWEN_VALUES_ARGS = {
    "code": CODE, "config": {"a": [1, 2], "b": "x"}, "flag": True, "n": -1.5, "none": None, "quoted": '"hi"',
    "zip": "01234", "spaced": "  two lines\n", "nan": "NaN"}

H, L, M, Q = (lambda n=n: get_tool_call_parser(n) for n in ("hermes", "llama3_json", "mistral", "qwen"))
CASES: dict[str, tuple[Callable[[], ToolCallParser], str, str, Calls, Optional[str]]] = {
    # hermes
    "hermes-single": (H, hermes("get_weather", json.dumps(WEATHER)), "", [("get_weather", WEATHER)], None),
    "hermes-two-with-content": (
        H, "Let me check both.\n" + hermes("a", '{"x": 1}') + "\n" + hermes("b", "{}") + "\n",
        "Let me check both.\n", [("a", {"x": 1}), ("b", {})], None),
    "hermes-tricky": (H, hermes("write", TRICKY_RAW), "", [("write", TRICKY)], None),
    "hermes-ascii-escapes": (H, hermes("write", TRICKY_ASCII), "", [("write", TRICKY)], None),
    "hermes-args-first-content-after": (
        H, '<tool_call>{"arguments": {"a": [1]}, "name": "f"}</tool_call> Done.', " Done.", [("f", {"a": [1]})],
        None),
    "hermes-no-end-tag": (H, 'Ok <tool_call>{"name": "f", "arguments": {}}\n</tool', "Ok ", [("f", {})], None),
    "hermes-plain": (H, "Hello! 1 < 2, and <tool is fine; so is <tool_call", "Hello! 1 < 2, and <tool is fine; so is "
                     "<tool_call", [], None),
    "hermes-not-json": (H, "A <tool_call>not json</tool_call> B", "A <tool_call>not json</tool_call> B", [], None),
    "hermes-no-name": (H, '<tool_call>\n{"nam": "f"}\n</tool_call>', '<tool_call>\n{"nam": "f"}\n</tool_call>', [],
                       None),
    "hermes-unclosed-object": (
        H, '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>', [], "f"),
    "hermes-truncated": (H, 'Sure.<tool_call>{"name": "f", "arguments": {"a": "x',
                         'Sure.<tool_call>{"name": "f", "arguments": {"a": "x', [], "f"),
    "hermes-good-then-broken": (
        H, hermes("f", '{"a": 1}') + '\n<tool_call>{"name": "g", "arguments": 5}</tool_call>',
        '\n<tool_call>{"name": "g", "arguments": 5}</tool_call>', [("f", {"a": 1})], "g"),
    # llama3_json
    "llama3-single": (L, '{"name": "get_weather", "parameters": ' + json.dumps(WEATHER) + "}", "",
                      [("get_weather", WEATHER)], None),
    "llama3-tag-two": (L, ' <|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "arguments": {"y": '
                       '"2"}}', "", [("a", {"x": 1}), ("b", {"y": "2"})], None),
    "llama3-tricky": (L, '\n{"name": "write", "parameters": ' + TRICKY_ASCII + "}", "", [("write", TRICKY)], None),
    "llama3-content-after": (L, '{"name": "f", "parameters": {}}\nDone', "\nDone", [("f", {})], None),
    "llama3-plain": (L, "The weather is nice; {really}.", "The weather is nice; {really}.", [], None),
    "llama3-markup-content": (L, "<b>bold</b>", "<b>bold</b>", [], None),
    "llama3-json-not-call": (L, '{"answer": 42}', '{"answer": 42}', [], None),
    "llama3-truncated": (L, '<|python_tag|>{"name": "f", "parameters": {"a": 1',
                         '<|python_tag|>{"name": "f", "parameters": {"a": 1', [], "f"),
    # mistral
    "mistral-array": (M, '[TOOL_CALLS][{"name": "get_weather", "arguments": ' + json.dumps(WEATHER) + "}]", "",
                      [("get_weather", WEATHER)], None),
    "mistral-array-two": (M, 'Checking.[TOOL_CALLS] [{"name": "a", "arguments": {"x": 1}}, {"name": "b", '
                          '"arguments": {}, "id": "abc123xyz"}]', "Checking.", [("a", {"x": 1}), ("b", {})], None),
    "mistral-array-unclosed": (M, '[TOOL_CALLS][{"name": "a", "arguments": {"x": [1]}}', "", [("a", {"x": [1]})],
                               None),
    "mistral-v11-two": (M, '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{"tz": "CET"}',
                        "", [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})], None),
    "mistral-call-id": (M, 'Hm. [TOOL_CALLS]f[CALL_ID]a1b2c3d4e[ARGS]{"a": 1}', "Hm. ", [("f", {"a": 1})], None),
    "mistral-name-then-object": (M, '[TOOL_CALLS]f{"a": 1}', "", [("f", {"a": 1})], None),
    "mistral-tricky": (M, "[TOOL_CALLS]write[ARGS]" + TRICKY_RAW, "", [("write", TRICKY)], None),
    "mistral-plain": (M, "Use [brackets], [TOOL_CALL] and [TOOL_CALLS", "Use [brackets], [TOOL_CALL] and [TOOL_CALLS",
                      [], None),
    "mistral-broken-value": (M, '[TOOL_CALLS]f[ARGS]{"a": tru}', '[TOOL_CALLS]f[ARGS]{"a": tru}', [], "f"),
    "mistral-array-broken-second": (
        M, '[TOOL_CALLS][{"name": "a", "arguments": {}}, {"name": "b", "arguments": [1]}]',
        ', {"name": "b", "arguments": [1]}]', [("a", {})], "b"),
    # qwen (Qwen3-Coder XML)
    "qwen-single": (Q, qwen("get_weather", ("city", "Paris"), ("days", "3")), "",
                    [("get_weather", {"city": "Paris", "days": 3})], None),
    "qwen-two-with-content": (Q, "I'll run both.\n\n" + qwen("a", ("x", "1")) + "\n" + qwen("now"),
                              "I'll run both.\n\n", [("a", {"x": 1}), ("now", {})], None),
    "qwen-values": (Q, QWEN_VALUES, "", [("run", QWEN_VALUES_ARGS)], None),
    "qwen-plain": (Q, "a < b, <function=x> and <tool", "a < b, <function=x> and <tool", [], None),
    "qwen-missing-function-end": (
        Q, "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</tool_call>",
        "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</tool_call>", [], "f"),
    # forced calls: the output of the JSON-schema grammar
    "required-two": (RequiredToolCallParser, '[{"name": "a", "parameters": {"x": "}"}},\n {"parameters": {}, '
                     '"name": "b"}]', "", [("a", {"x": "}"}), ("b", {})], None),
    "required-tricky": (RequiredToolCallParser, ' [{"name": "w", "parameters": ' + TRICKY_RAW + "}]", "",
                        [("w", TRICKY)], None),
    "required-truncated": (RequiredToolCallParser, '[{"name": "a", "parameters": {"x": 1', '[{"name": "a", '
                           '"parameters": {"x": 1', [], "a"),
    "named": (lambda: NamedToolCallParser("get_weather"), " " + json.dumps(WEATHER), "",
              [("get_weather", WEATHER)], None),
    "named-truncated": (lambda: NamedToolCallParser("f"), '{"a": [1, 2', '{"a": [1, 2', [], "f"),
}


def check_final(parsed: ParsedText, content: str, calls: Calls) -> None:
    assert parsed.content == content
    assert [(call.name, json.loads(call.arguments)) for call in parsed.tool_calls] == calls


def check_extends(before: ParsedText, after: ParsedText, orphan_allowed: bool = False) -> None:
    """`after` only appends to `before` (at the final parse, `before`'s last call may have broken)."""
    assert after.content.startswith(before.content), (before.content, after.content)
    earlier = before.tool_calls
    if orphan_allowed and len(after.tool_calls) < len(earlier):
        earlier = earlier[:-1]
    assert len(after.tool_calls) >= len(earlier)
    for old, new in zip(earlier, after.tool_calls):
        assert new.name == old.name and new.arguments.startswith(old.arguments), (old, new)


def stream(parser: ToolCallParser, chunks: list[str]) -> tuple[str, list[dict], ToolCallStream]:
    """Feeds `chunks` and finishes; returns the joined content and each call as its deltas assemble it."""
    tool_stream = ToolCallStream(parser)
    text, content, calls = "", "", []
    steps = [tool_stream.feed(text := text + chunk) for chunk in chunks] + [tool_stream.finish(text)]
    for delta in steps:
        content += delta.content
        for piece in delta.tool_calls:
            index = piece["index"]
            if index == len(calls):  # a call's first piece names it, once
                assert piece["type"] == "function" and piece["id"].startswith("chatcmpl-tool-")
                calls.append({"id": piece["id"], "name": piece["function"]["name"], "arguments": ""})
            else:
                assert set(piece) == {"index", "function"} and set(piece["function"]) == {"arguments"}
                assert piece["function"]["arguments"]
            calls[index]["arguments"] += piece["function"]["arguments"]
    return content, calls, tool_stream


def chunkings(text: str) -> list[list[str]]:
    splits = [[text[:k], text[k:]] for k in range(len(text) + 1)]
    singles = [list(text)]
    randoms = []
    for seed in range(5):
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
        randoms.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])
    return splits + singles + randoms


@pytest.mark.parametrize("case", list(CASES))
def test_final_parse(case: str) -> None:
    make_parser, text, content, calls, _ = CASES[case]
    check_final(make_parser().parse(text), content, calls)


@pytest.mark.parametrize("case", list(CASES))
def test_streaming_parses_only_append(case: str) -> None:
    make_parser, text, _, _, orphan = CASES[case]
    parser = make_parser()
    previous = ParsedText("", [])
    for k in range(len(text) + 1):
        parsed = parser.parse(text[:k], final=False)
        check_extends(previous, parsed)
        previous = parsed
    final = parser.parse(text)
    check_extends(previous, final, orphan_allowed=orphan is not None)
    assert [call.name for call in previous.tool_calls[len(final.tool_calls):]] == ([orphan] if orphan else [])


@pytest.mark.parametrize("case", list(CASES))
def test_stream_deltas_join_to_the_final_parse(case: str) -> None:
    make_parser, text, content, calls, orphan = CASES[case]
    final = make_parser().parse(text)
    for chunks in chunkings(text):
        joined, streamed, tool_stream = stream(make_parser(), chunks)
        assert joined == (content if content.strip() else ""), chunks
        assert [call["name"] for call in streamed] == [name for name, _ in calls] + ([orphan] if orphan else [])
        for call, sent, (_, arguments) in zip(final.tool_calls, streamed, calls):
            assert sent["arguments"] == call.arguments and json.loads(sent["arguments"]) == arguments
        assert len({call["id"] for call in streamed}) == len(streamed)
        assert tool_stream.tool_calls == [
            {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}
            for call in streamed]


def test_qwen_arguments_are_json_dumps_text() -> None:
    (call,) = get_tool_call_parser("qwen").parse(QWEN_VALUES).tool_calls
    assert call.arguments == json.dumps(QWEN_VALUES_ARGS, ensure_ascii=False)


def test_arguments_are_the_raw_text_as_written() -> None:
    text = '<tool_call>{"name": "f", "arguments": {"b" :1.50,"a":"\\u00e9"}}</tool_call>'
    (call,) = get_tool_call_parser("hermes").parse(text).tool_calls
    assert call.arguments == '{"b" :1.50,"a":"\\u00e9"}'


@pytest.mark.parametrize("name", ["hermes", "qwen"])
def test_partial_start_tag_is_held_back_while_streaming(name: str) -> None:
    parser = get_tool_call_parser(name)
    assert parser.parse("Checking <tool_", final=False).content == "Checking "
    assert parser.parse("Checking <tool_", final=True).content == "Checking <tool_"
    assert parser.parse("Checking <tool_x", final=False).content == "Checking <tool_x"


def test_whitespace_only_content_waits_in_a_stream() -> None:
    tool_stream = ToolCallStream(get_tool_call_parser("hermes"))
    assert tool_stream.feed("\n\n").content == ""
    assert tool_stream.feed("\n\nHi").content == "\n\nHi"
