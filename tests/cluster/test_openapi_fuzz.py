"""The server against its own OpenAPI schema, fuzzed by schemathesis (valid and invalid bodies for every route): no
5xx, and every status, content type and JSON body is one the schema documents."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

requests = pytest.importorskip("requests", reason="installed with the 'serve' extra")
pytest.importorskip("schemathesis", reason="installed with the 'dev' extra")

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


@pytest.fixture(scope="module")
def fuzzed(serve_instance: str, llama_dir: Path) -> str:
    """The tiny model with small limits, so that whatever the fuzzer asks for runs in moments."""
    from ray import serve

    from rayinfer.cluster.serve_app import build_app
    from rayinfer.configs import EngineConfig

    config = EngineConfig(model=str(llama_dir), max_model_len=48, max_num_seqs=4, max_logprobs=3,
                          kv_cache_memory_bytes=4 * 2**20)
    serve.run(build_app(config, served_model_name="tiny"), name="fuzzed", route_prefix="/fuzzed")
    yield f"{serve_instance}/fuzzed"
    serve.delete("fuzzed")


def test_schema_documents_every_error_status(fuzzed: str) -> None:
    schema = requests.get(f"{fuzzed}/openapi.json", timeout=30).json()
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        responses = schema["paths"][path]["post"]["responses"]
        assert {"200", "400", "401", "404", "413", "500", "503"} <= set(responses) and "422" not in responses, path
        assert responses["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "text/event-stream" in schema["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]
    assert set(schema["paths"]["/health"]["get"]["responses"]) == {"200", "503"}
    assert "text/plain" in schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


def test_schemathesis_finds_nothing(fuzzed: str, tmp_path: Path) -> None:
    binary = shutil.which("schemathesis", path=os.path.dirname(sys.executable)) or shutil.which("schemathesis")
    command = [binary, "run", f"{fuzzed}/openapi.json", "--url", fuzzed, "--checks", CHECKS,
               "--max-examples", os.environ.get("RAYINFER_FUZZ_EXAMPLES", "25"), "--seed", "1",
               "--phases", "examples,coverage,fuzzing", "--request-timeout", "60", "--workers", "2",
               "--report", "junit", "--report-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
