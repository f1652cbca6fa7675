"""Hostile requests over HTTP against the tiny model's server: each gets a 4xx naming the field or the limit, and
honest requests running at the same time still finish with transformers' greedy text."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

requests = pytest.importorskip("requests", reason="installed with the 'serve' extra")

M = "tiny"
HUGE_ID = 1_000_000
DEFAULTS = {"max_prompts_per_request": 128, "max_stop_strings": 32, "max_stop_string_length": 1024}


def _completion(**fields) -> dict:
    return {"model": M, "prompt": "hi", "max_tokens": 4, **fields}


# (case, route, body as JSON text or dict, status, param, words the message must hold)
CASES = [
    ("stop id past the vocab", "/v1/completions", _completion(min_tokens=1, stop_token_ids=[HUGE_ID]), 400,
     "stop_token_ids", "token ids must be in [0,"),
    ("logit_bias id past the vocab", "/v1/completions", _completion(logit_bias={str(HUGE_ID): 5}), 400,
     "logit_bias", "token ids must be in [0,"),
    ("allowed id past the vocab", "/v1/completions", _completion(allowed_token_ids=[HUGE_ID]), 400,
     "allowed_token_ids", "token ids must be in [0,"),
    ("prompt id past the vocab", "/v1/completions", _completion(prompt=[5, HUGE_ID]), 400, "prompt", "[0,"),
    ("chat stop id past the vocab", "/v1/chat/completions",
     {"model": M, "messages": [{"role": "user", "content": "hi"}], "stop_token_ids": [HUGE_ID]}, 400,
     "stop_token_ids", "token ids must be in [0,"),
    ("n past max_num_seqs", "/v1/completions", _completion(n=100_000), 400, "n", "max_num_seqs"),
    ("best_of past max_num_seqs", "/v1/completions", _completion(n=1, best_of=100_000, temperature=1.0), 400,
     "best_of", "max_num_seqs"),
    ("logprobs past max_logprobs", "/v1/completions", _completion(logprobs=1000), 400, "logprobs", "max_logprobs"),
    ("too many prompts", "/v1/completions", _completion(prompt=["hi"] * 129), 400, "prompt",
     "max_prompts_per_request is 128"),
    ("too many stop strings", "/v1/completions", _completion(stop=[f"s{i}" for i in range(33)]), 400, "stop",
     "max_stop_strings is 32"),
    ("a stop string too long", "/v1/completions", _completion(stop=["x" * 1025]), 400, "stop",
     "max_stop_string_length is 1024"),
    ("NaN temperature", "/v1/completions", '{"model": "tiny", "prompt": "hi", "temperature": NaN}', 400,
     "temperature", "finite"),
    ("Infinity top_p", "/v1/completions", '{"model": "tiny", "prompt": "hi", "top_p": Infinity}', 400, "top_p",
     "finite"),
    ("1e999 in logit_bias", "/v1/completions", '{"model": "tiny", "prompt": "hi", "logit_bias": {"5": -1e999}}',
     400, "logit_bias.5", "finite"),
    ("nested 40 deep", "/v1/completions", '{"model": "tiny", "prompt": "hi", "user": ' + "[" * 40 + "]" * 40 + "}",
     400, "body", "more than 32 levels"),
    ("nested 100000 deep", "/v1/completions", "[" * 100_000 + "]" * 100_000, 400, "body", "more than 32 levels"),
    ("a tool message without its call id", "/v1/chat/completions",
     {"model": M, "messages": [{"role": "tool", "content": "42"}]}, 400, "messages.0", "tool_call_id"),
    ("a role the template refuses", "/v1/chat/completions",
     {"model": M, "messages": [{"role": "developer", "content": "42"}]}, 400, "messages",
     "chat template cannot take these messages"),
    ("an image for a text model", "/v1/chat/completions",
     {"model": M, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages.0.content.0.type", "'text'"),
    ("no messages", "/v1/chat/completions", {"model": M, "messages": []}, 400, "messages", "at least 1"),
    ("suffix", "/v1/completions", _completion(suffix="!"), 400, "suffix", "not supported"),
    ("tokenize a role the template refuses", "/tokenize", {"messages": [{"role": "developer", "content": "x"}]},
     400, "messages", "chat template cannot take these messages"),
    ("a body over 16 MiB", "/v1/completions", '{"model": "tiny", "prompt": "' + "a" * (16 * 2**20) + '"}', 413,
     "body", "larger than 16777216 bytes"),
]


@pytest.fixture(scope="module")
def honest_prompts_and_texts(llama_dir: Path, hf_llama) -> list[tuple[str, str]]:
    """Prompts and their greedy continuations by transformers (12 tokens, EOS ignored)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    pairs = []
    for prompt in ("Once upon a time", "The river runs", "In the morning the"):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = hf_llama.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        pairs.append((prompt, tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
    return pairs


def _send(server: str, route: str, body) -> requests.Response:
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(f"{server}{route}", data=data.encode(), headers={"Content-Type": "application/json"},
                         timeout=120)


def _honest(server: str, prompt: str) -> str:
    body = {"model": M, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "stream": True}
    text = ""
    with requests.post(f"{server}/v1/completions", json=body, stream=True, timeout=120) as reply:
        assert reply.status_code == 200, reply.text
        for line in reply.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                event = json.loads(line[6:])
                assert "error" not in event, event
                text += event["choices"][0]["text"]
    return text


def test_hostile_requests_are_4xx_and_honest_ones_still_finish(server: str, honest_prompts_and_texts) -> None:
    with ThreadPoolExecutor(max_workers=len(honest_prompts_and_texts) + 2) as pool:
        honest = [pool.submit(_honest, server, prompt) for prompt, _ in honest_prompts_and_texts * 2]
        hostile = [(case, pool.submit(_send, server, route, body), status, param, words)
                   for case, route, body, status, param, words in CASES]
        failures = []
        for case, future, status, param, words in hostile:
            reply = future.result()
            try:
                error = reply.json()["error"]
                ok = (reply.status_code == status and error["param"] == param and words in error["message"]
                      and error["code"] == status)
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                failures.append(f"{case}: {reply.status_code} {reply.text[:300]}")
        assert not failures, "\n".join(failures)
        expected = [text for _, text in honest_prompts_and_texts * 2]
        assert [future.result() for future in honest] == expected
    # And the server still serves.
    assert _send(server, "/v1/completions", _completion()).status_code == 200


def test_detokenize_refuses_ids_past_the_vocabulary(server: str) -> None:
    reply = _send(server, "/detokenize", {"tokens": [5, HUGE_ID]})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "tokens", reply.text
    assert _send(server, "/detokenize", {"tokens": [5, 6]}).status_code == 200
