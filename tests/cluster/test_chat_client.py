"""`rayinfer chat` and `rayinfer complete` (`cluster/chat_client.py`) against the tiny model's server: what they
print is the streamed answer, equal to a plain request's at temperature 0; chat sends the conversation so far with
each turn (read off the HTTP requests the `openai` client really sent); failures are one line and a non-zero exit."""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from rayinfer.cluster.cli import build_parser

openai = pytest.importorskip("openai", reason="installed with the 'serve' extra")


class Recorder:
    """An HTTP client for the `openai` client (its httpx one) that keeps each request it sends: (method, path, JSON
    body)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, object]] = []
        self.http = openai.DefaultHttpxClient(timeout=120, event_hooks={"request": [self._keep]})

    def _keep(self, request) -> None:
        body = json.loads(request.content) if request.content else None
        self.requests.append((request.method, request.url.path, body))

    def bodies(self, path: str) -> list:
        return [body for _, p, body in self.requests if p == path]


class Writes(io.StringIO):
    """A stdout that counts its writes (a streamed answer is written piece by piece)."""

    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def _run(argv: list[str], stdin=None, http=None) -> tuple[int, str, int]:
    """The command in this process: (exit status, what it printed, how many writes that took)."""
    args = build_parser().parse_args(argv)
    out = Writes()
    code = args.handler(args, stdin=stdin if stdin is not None else io.StringIO(""), stdout=out, http_client=http)
    return code, out.getvalue(), out.writes


def _command() -> list[str]:
    script = shutil.which("rayinfer", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "rayinfer.cluster.cli"]


@pytest.fixture(scope="module")
def api(server: str) -> str:
    return f"{server}/v1"


@pytest.fixture(scope="module")
def client(api: str):
    return openai.OpenAI(base_url=api, api_key="unused", max_retries=0, timeout=120)


def test_quick_chat_prints_the_streamed_answer(api: str, client) -> None:
    messages = [{"role": "user", "content": "Hello there"}]
    expected = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0
                                              ).choices[0].message.content
    recorder = Recorder()
    code, printed, writes = _run(["chat", "--url", api, "--quick", "Hello there", "--max-tokens", "12",
                                  "--temperature", "0"], http=recorder.http)
    assert code == 0 and printed == expected + "\n"
    assert writes > 3  # piece by piece as the tokens came, not one lump
    assert [(method, path) for method, path, _ in recorder.requests] == [
        ("GET", "/v1/models"), ("POST", "/v1/chat/completions")]  # the model: the first one the server lists
    assert recorder.bodies("/v1/chat/completions") == [
        {"model": "tiny", "messages": messages, "stream": True, "max_tokens": 12, "temperature": 0.0}]


def test_quick_complete_from_the_command_line(api: str, client) -> None:
    expected = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0
                                         ).choices[0].text
    done = subprocess.run([*_command(), "complete", "--url", api, "--model", "tiny", "-q", "Once upon a time",
                           "--max-tokens", "12", "--temperature", "0"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected + "\n" and done.stderr == ""


def test_chat_sends_the_conversation_so_far(api: str, client) -> None:
    recorder = Recorder()
    code, printed, _ = _run(["chat", "--url", api, "--model", "tiny", "--system-prompt", "Be brief.",
                             "--max-tokens", "8", "--temperature", "0"],
                            stdin=io.StringIO("Hi there\n\nAnd then?\n"), http=recorder.http)
    assert code == 0
    first_turn, second_turn = recorder.bodies("/v1/chat/completions")  # the empty line sent nothing
    system, hi = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}
    assert first_turn["messages"] == [system, hi]

    def answer(messages: list) -> str:
        return client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0
                                              ).choices[0].message.content

    first = answer([system, hi])
    assert second_turn["messages"] == [system, hi, {"role": "assistant", "content": first},
                                       {"role": "user", "content": "And then?"}]
    assert printed == first + "\n" + answer(second_turn["messages"]) + "\n"


def test_complete_reads_prompts_until_eof(api: str, client) -> None:
    code, printed, _ = _run(["complete", "--url", api, "--model", "tiny", "--max-tokens", "6", "--temperature", "0"],
                            stdin=io.StringIO("The river runs\nIn the morning the"))
    expected = [client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0).choices[0].text
                for p in ("The river runs", "In the morning the")]
    assert code == 0 and printed == "".join(text + "\n" for text in expected)


def test_server_down_is_one_line_and_a_failure() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed when the block ends: nobody listens there
    done = subprocess.run([*_command(), "chat", "--url", f"http://127.0.0.1:{port}/v1", "--quick", "hi"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"rayinfer chat: cannot reach the server at http://127.0.0.1:{port}/v1: ")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_unknown_model_is_one_line_and_a_failure(api: str, capsys) -> None:
    code, printed, _ = _run(["chat", "--url", api, "--model", "nope", "--quick", "hi"])
    err = capsys.readouterr().err
    assert code == 1 and printed == ""
    assert err.startswith("rayinfer chat: the server answered 404: The model `nope` does not exist")
    assert err.count("\n") == 1


class Refuses(BaseHTTPRequestHandler):
    """A server that wants another key: 401 with OpenAI's error body, keeping the Authorization headers it saw."""

    seen: list = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        type(self).seen.append(self.headers.get("Authorization"))
        body = json.dumps({"error": {"message": "Unauthorized", "type": "invalid_request_error", "param": None,
                                     "code": 401}}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args) -> None:
        pass


def test_a_wrong_key_is_one_line_naming_the_flag(monkeypatch, capsys) -> None:
    monkeypatch.setenv("RAYINFER_API_KEY", "from-rayinfer-env")
    monkeypatch.setenv("OPENAI_API_KEY", "from-openai-env")
    httpd = HTTPServer(("127.0.0.1", 0), Refuses)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_port}/v1"
        assert _run(["complete", "--url", url, "-q", "hi"])[:2] == (1, "")
        assert _run(["chat", "--url", url, "--model", "m", "--api-key", "flag", "-q", "hi"])[:2] == (1, "")
    finally:
        httpd.shutdown()
        httpd.server_close()
    err = capsys.readouterr().err.splitlines()
    assert err == ["rayinfer complete: the server answered 401: Unauthorized (give the server's key with --api-key "
                   "or $RAYINFER_API_KEY)", "rayinfer chat: the server answered 401: Unauthorized (give the server's "
                   "key with --api-key or $RAYINFER_API_KEY)"]
    assert set(Refuses.seen) == {"Bearer from-rayinfer-env", "Bearer flag"}  # the flag, else $RAYINFER_API_KEY


def test_ctrl_c_ends_cleanly(capsys) -> None:
    class Interrupted(io.StringIO):
        def readline(self, *args) -> str:
            raise KeyboardInterrupt

    assert _run(["chat", "--url", "http://127.0.0.1:9/v1", "--model", "m"], stdin=Interrupted())[:2] == (130, "")
    assert capsys.readouterr().err == "\n"
