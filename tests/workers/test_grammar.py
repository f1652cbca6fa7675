"""workers/grammar.py: each kind of structured output compiles to a grammar whose masked draws, at temperature 1 on
random logits (noise unless constrained), always give output that `jsonschema`, `re.fullmatch` or the choice list
accept; bad schemas, regexes and grammars fail with a message naming the problem; compiles are cached."""
from __future__ import annotations

import json
import re

import pytest
import torch

from rayinfer.workers.demo_model import demo_model_dir
from rayinfer.workers.grammar import GrammarCompiler, GrammarError, GrammarSpec

xgrammar = pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1,
                                               "maxItems": 3}},
     "required": ["tags"]},
    {"type": "object", "properties": {"id": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                                      "kind": {"const": "point"},
                                      "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
                                      "inner": {"type": "object", "properties": {"ok": {"type": "boolean"}},
                                                "required": ["ok"]}},
     "required": ["id", "kind", "code", "inner"]},
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_dir())


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, vocab_size=len(tokenizer))


def _sample(compiler: GrammarCompiler, tokenizer, spec: GrammarSpec, seed: int, max_tokens: int = 400) -> str:
    """Draws at temperature 1 from random logits under the grammar's mask until the grammar ends (at EOS)."""
    matcher = compiler.matcher(spec)
    vocab = compiler.tokenizer_info.vocab_size
    mask = xgrammar.allocate_token_bitmask(1, vocab)
    generator = torch.Generator().manual_seed(seed)
    tokens: list[int] = []
    while not matcher.is_terminated():
        assert len(tokens) < max_tokens, tokenizer.decode(tokens)
        matcher.fill_next_token_bitmask(mask)
        logits = torch.randn(1, vocab, generator=generator)
        xgrammar.apply_token_bitmask_inplace(logits, mask)
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        assert matcher.accept_token(token)
        tokens.append(token)
    assert tokens[-1] == tokenizer.eos_token_id
    return tokenizer.decode(tokens[:-1])


@pytest.mark.parametrize("schema", SCHEMAS, ids=["object", "array-enum", "anyof-const-pattern-nested"])
def test_json_schema_outputs_validate(compiler, tokenizer, schema) -> None:
    spec = GrammarSpec.json_schema(schema)
    for seed in range(4):
        # json.loads is strict: a raw control character inside a string would fail it (see json_schema_ebnf).
        jsonschema.validate(json.loads(_sample(compiler, tokenizer, spec, seed)), schema)


def test_json_object_regex_choice_and_grammar(compiler, tokenizer) -> None:
    assert isinstance(json.loads(_sample(compiler, tokenizer, GrammarSpec("json_object"), 0, max_tokens=2000)), dict)
    pattern = r"[a-z]{3,6}-[0-9]{1,3}"
    for seed in range(3):
        assert re.fullmatch(pattern, _sample(compiler, tokenizer, GrammarSpec("regex", pattern), seed))
    options = ["yes", "no", "maybe (later)"]
    drawn = {_sample(compiler, tokenizer, GrammarSpec.choices(options), seed) for seed in range(8)}
    assert drawn <= set(options) and len(drawn) > 1
    grammar = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
    assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", _sample(compiler, tokenizer, GrammarSpec("grammar", grammar), 0))


@pytest.mark.parametrize(
    ("spec", "kind", "words"),
    [
        (lambda: GrammarSpec.json_schema({"type": "objectx"}), "json", "objectx"),
        (lambda: GrammarSpec.json_schema("{not json"), "json", "not valid JSON"),
        (lambda: GrammarSpec.json_schema([1, 2]), "json", "is an object"),
        (lambda: GrammarSpec("regex", "(ab"), "regex", "parenthesis"),
        (lambda: GrammarSpec("grammar", "root ::= foo"), "grammar", '"foo" is not defined'),
        (lambda: GrammarSpec.choices([]), "choice", "non-empty list"),
    ],
    ids=["unknown-type", "bad-json", "not-an-object", "regex", "grammar", "no-choices"],
)
def test_bad_constraints_say_what_is_wrong(compiler, spec, kind: str, words: str) -> None:
    with pytest.raises(GrammarError) as info:
        compiler.compile(spec())
    assert info.value.kind == kind and words in str(info.value)
    assert "/project/" not in str(info.value)  # xgrammar's C++ source location is left out


def test_compiles_are_cached_and_specs_compare_by_content(compiler) -> None:
    first = GrammarSpec.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}})
    same = GrammarSpec.json_schema('{"type": "object",  "properties": {"a": {"type": "integer"}}}')
    assert first == same and hash(first) == hash(same)
    assert compiler.compile(first) is compiler.compile(same)


def test_the_cache_is_bounded_by_entries_and_bytes(tokenizer) -> None:
    specs = [GrammarSpec("regex", f"[a-z]{{{n}}}x") for n in range(1, 6)]
    by_count = GrammarCompiler(tokenizer, len(tokenizer), max_cached=3)
    for spec in specs:
        by_count.compile(spec)
    assert list(by_count._compiled) == specs[-3:]
    assert by_count.compile(specs[-1]) is by_count.compile(specs[-1])
    one_byte = GrammarCompiler(tokenizer, len(tokenizer), max_cached_bytes=1)
    for spec in specs:
        one_byte.compile(spec)
    assert list(one_byte._compiled) == specs[-1:]  # the latest always stays: its sequences are about to use it


def test_choices_are_taken_literally_whatever_they_hold(compiler, tokenizer, capfd) -> None:
    """Quotes, backslashes, regex metacharacters, spaces, newlines and characters outside the BMP: each choice is
    drawn exactly as written, and the compile warns about nothing."""
    options = ['a "quoted" word', "back\\slash", "[x]*+?(y)", "new\nline", "emoji 😀 here", "δ (delta)"]
    spec = GrammarSpec.choices(options)
    compiler.compile(spec)
    assert "Warning" not in capfd.readouterr().err
    drawn = {_sample(compiler, tokenizer, spec, seed) for seed in range(16)}
    assert drawn <= set(options) and len(drawn) > 2
