"""Incremental detokenization matches a full decode; stop strings are found across token boundaries."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from rayinfer.scheduler.detokenizer import IncrementalDetokenizer
from rayinfer.scheduler.stop_strings import find_stop_string, stop_holdback
from rayinfer.workers.tiny_checkpoint import build_tokenizer

MULTIBYTE = "café naïve 日本語のテキスト 🙂🚀 done"


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def _stream(tok: Any, prompt: list[int], output: list[int], skip: bool = True) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    chunks = [detok.append(t) for t in output]
    assert detok.output_text == "".join(chunks)
    return chunks, detok.final_text()


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_match_full_decode(tok: Any, skip: bool) -> None:
    rng = random.Random(1234)
    vocab = len(tok)
    byte_heavy = [i for i in range(vocab) if "\ufffd" in tok.decode([i])]  # lone bytes of multi-byte chars
    assert byte_heavy
    for _ in range(300):
        pool = byte_heavy if rng.random() < 0.5 else range(vocab)
        output = [rng.choice(pool) if rng.random() < 0.7 else rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
        chunks, final = _stream(tok, prompt, output, skip)
        expected = tok.decode(output, skip_special_tokens=skip)
        assert "".join(chunks) == final or final.endswith("\ufffd")  # only a pending tail may be missing
        assert final == expected, (prompt, output)
        if "\ufffd" not in expected:
            assert all("\ufffd" not in c for c in chunks)


def test_split_multibyte_characters_are_never_emitted_half(tok: Any) -> None:
    ids = tok(MULTIBYTE, add_special_tokens=False).input_ids
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the text really splits characters across tokens
    prompt = tok("Say:").input_ids
    chunks, final = _stream(tok, prompt, ids)
    assert "".join(chunks) == final == MULTIBYTE
    assert all("\ufffd" not in c for c in chunks)
    assert "" in chunks  # some tokens completed no character


def test_byte_by_byte_emoji(tok: Any) -> None:
    byte_tokens = tok.convert_tokens_to_ids(tok.convert_ids_to_tokens(tok("🙂", add_special_tokens=False).input_ids))
    singles = [tok.convert_tokens_to_ids(ch) for ch in "".join(tok.convert_ids_to_tokens(byte_tokens))]
    chunks, final = _stream(tok, [], singles)  # 4 one-byte tokens
    assert chunks == ["", "", "", "🙂"] and final == "🙂"


def test_incomplete_tail_is_flushed_by_final_text(tok: Any) -> None:
    first_byte = tok.convert_tokens_to_ids("Ã")  # 0xC3, the lead byte of "é"
    hello = tok("hello", add_special_tokens=False).input_ids
    chunks, final = _stream(tok, [], hello + [first_byte])
    assert "".join(chunks) == "hello"
    assert final == tok.decode(hello + [first_byte]) == "hello\ufffd"


def test_prompt_context_gives_leading_space(tok: Any) -> None:
    prompt = tok("Hello").input_ids
    output = tok(" world", add_special_tokens=False).input_ids
    chunks, final = _stream(tok, prompt, output)
    assert "".join(chunks) == final == " world"


def test_special_tokens_skipped_or_shown(tok: Any) -> None:
    user = tok.convert_tokens_to_ids("<|user|>")
    text = tok("hi", add_special_tokens=False).input_ids
    output = [user, *text, tok.eos_token_id]
    chunks, final = _stream(tok, [tok.bos_token_id], output, skip=True)
    assert chunks[0] == "" and chunks[-1] == "" and final == "hi"
    chunks, final = _stream(tok, [tok.bos_token_id], output, skip=False)
    assert chunks[0] == "<|user|>" and final == "<|user|>hi</s>" == tok.decode(output)


def test_special_token_between_bytes_of_a_character(tok: Any) -> None:
    lead, cont = tok.convert_tokens_to_ids(["Ã", "©"])  # "é" = C3 A9
    output = [lead, tok.eos_token_id, cont]
    assert _stream(tok, [], output, skip=True)[1] == tok.decode(output, skip_special_tokens=True) == "é"
    assert _stream(tok, [], output, skip=False)[1] == tok.decode(output) == "\ufffd</s>\ufffd"


class _CountingTokenizer:
    """Wraps a tokenizer and records how many ids each decode call gets."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.lengths: list[int] = []
        self.all_special_ids = inner.all_special_ids
        self.added_tokens_decoder = inner.added_tokens_decoder

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.lengths.append(len(ids))
        return self.inner.decode(ids, **kwargs)


def test_cost_per_token_does_not_grow_with_length(tok: Any) -> None:
    counting = _CountingTokenizer(tok)
    ids = tok((MULTIBYTE + " and some plain words. ") * 40, add_special_tokens=False).input_ids
    assert len(ids) > 500
    detok = IncrementalDetokenizer(counting, tok("prompt text here").input_ids)
    text = "".join(detok.append(t) for t in ids)
    assert text == tok.decode(ids)
    assert max(counting.lengths) <= 8  # a few pending bytes plus context, never the whole sequence
    assert len(counting.lengths) <= 2 * len(ids) + 1


def test_metaspace_tokenizer_keeps_context_space() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "▁again": 3, "!": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    assert tok.decode([2, 3]) == "world again"  # a fresh decode drops the first "▁" as a space
    chunks, final = _stream(tok, [1], [2, 3, 4])
    assert chunks == [" world", " again", "!"] and final == " world again!"
    assert tok.decode([1, 2, 3, 4]) == "Hello" + final


def test_find_stop_string_across_token_boundaries() -> None:
    stop = ["STOP", "end"]
    text = ""
    hits = []
    for piece in ["abc S", "T", "O", "P tail"]:
        text += piece
        hits.append(find_stop_string(text, len(piece), stop))
    assert hits[:3] == [None, None, None] and hits[3] == ("STOP", 4)


def test_find_stop_string_earliest_wins_and_old_text_is_not_rescanned() -> None:
    assert find_stop_string("xx end STOP", 11, ["STOP", "end"]) == ("end", 3)
    assert find_stop_string("aXbcd", 2, ["bcd", "cd"]) == ("bcd", 2)  # both end in new text; earlier start wins
    assert find_stop_string("ab ab", 2, ["ab", "b"]) == ("ab", 3)  # the first "ab" ended in old text
    assert find_stop_string("STOP then more", 4, ["STOP"]) is None
    assert find_stop_string("abc", 0, ["c"]) is None
    assert find_stop_string("abc", 10, ["", "b"]) == ("b", 1)
    assert find_stop_string("abc", 1, []) is None


def test_stop_holdback() -> None:
    assert stop_holdback([]) == 0
    assert stop_holdback([""]) == 0
    assert stop_holdback(["a", "abcd"]) == 3


def test_streamed_stop_string_with_detokenizer(tok: Any) -> None:
    output = tok("The café is 日本語 now", add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tok, [])
    hit = None
    for t in output:
        new = detok.append(t)
        if new:
            hit = find_stop_string(detok.output_text, len(new), ["日本", "now"])
            if hit:
                break
    assert hit is not None and hit[0] == "日本"
    assert detok.output_text[: hit[1]] == "The café is "
