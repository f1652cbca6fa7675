"""`POST /v1/embeddings` on the live server: the `openai` client (base64 by default) and plain float JSON give the
offline engine's embeddings, with usage; bad inputs are 400s naming the field."""
from __future__ import annotations

import base64
import struct

import pytest
import requests
import torch

from rayinfer.cluster import LLM

openai = pytest.importorskip("openai", reason="installed with the 'dev' extra")

TEXTS = ["Hello world", "Paged attention stores the cache in fixed-size blocks."]


@pytest.fixture(scope="module")
def client(server: str):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def _close(a: list[float], b: list[float]) -> bool:
    return torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)


def test_openai_client_gets_the_offline_embeddings(client, offline: LLM) -> None:
    expected = offline.embed(TEXTS, use_tqdm=False)
    reply = client.embeddings.create(model="tiny", input=TEXTS)  # the client asks for base64 and decodes it
    assert [d.index for d in reply.data] == [0, 1]
    for data, want in zip(reply.data, expected):
        assert _close(data.embedding, want.outputs.embedding)
    assert reply.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in expected) == reply.usage.total_tokens
    assert reply.model == "tiny"


def test_float_and_base64_formats_and_token_ids(server: str, offline: LLM) -> None:
    ids = offline.get_tokenizer().encode(TEXTS[0])
    want = offline.embed({"prompt_token_ids": ids}, use_tqdm=False)[0].outputs.embedding
    plain = requests.post(f"{server}/v1/embeddings", json={"input": ids, "encoding_format": "float"}, timeout=60)
    assert plain.status_code == 200, plain.text
    body = plain.json()
    assert body["object"] == "list" and body["data"][0]["object"] == "embedding"
    assert _close(body["data"][0]["embedding"], want)
    packed = requests.post(f"{server}/v1/embeddings", json={"input": [ids, ids], "encoding_format": "base64"},
                           timeout=60).json()
    raw = base64.b64decode(packed["data"][1]["embedding"])
    assert _close(list(struct.unpack(f"<{len(raw) // 4}f", raw)), want)
    assert packed["usage"] == {"prompt_tokens": 2 * len(ids), "total_tokens": 2 * len(ids)}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": []}, "input"),
        ({"input": ""}, "input"),
        ({"input": ["fine", ""]}, "input"),
        ({"input": [10**9]}, "input"),
        ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "hi", "dimensions": 3}, "dimensions"),
        ({"input": "hi", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"input": [[1, 2]] * 129}, "input"),
        ({"input": [7] * 100_000}, "input"),
    ],
)
def test_bad_inputs_are_400_naming_the_field(server: str, body: dict, param: str) -> None:
    reply = requests.post(f"{server}/v1/embeddings", json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


def test_unknown_model_is_404(server: str) -> None:
    reply = requests.post(f"{server}/v1/embeddings", json={"input": "hi", "model": "nope"}, timeout=60)
    assert reply.status_code == 404 and reply.json()["error"]["param"] == "model"
