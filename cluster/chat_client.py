"""`rayinfer chat` and `rayinfer complete`: small interactive clients of a running server (rayinfer's, or any
OpenAI-compatible one), as `vllm chat` and `vllm complete` are.

Each answer is printed as its tokens arrive (a streamed request). `chat` keeps the conversation, its answers
included, and sends all of it with every turn; `complete` sends each line as a prompt of its own. `--quick TEXT`
sends one message, prints the answer and exits; otherwise lines are read from stdin until EOF (Ctrl-D) or Ctrl-C.
A failure (the server down, a wrong key, an unknown model, a refused request) is one line on stderr and a non-zero
exit, not a traceback; in an interactive session a refused message (400) is reported and the session goes on.
The `openai` package (the 'serve' extra) is imported only when a client runs.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any, Optional, TextIO

DEFAULT_URL = "http://127.0.0.1:8000/v1"


class ClientError(Exception):
    """A failure to report as one line."""


def add_arguments(parser: argparse.ArgumentParser, chat: bool) -> None:
    """The flags of `rayinfer chat` (`chat`) or `rayinfer complete`."""
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the server's OpenAI API base URL (default: {DEFAULT_URL})")
    parser.add_argument("--api-key", default=None,
                        help="the server's API key (default: $RAYINFER_API_KEY, else $OPENAI_API_KEY)")
    parser.add_argument("--model", "--model-name", dest="model", default=None,
                        help="the served model name (default: the first one GET /v1/models lists)")
    if chat:
        parser.add_argument("--system-prompt", default=None, help="a system message that starts the conversation")
    parser.add_argument("--max-tokens", type=int, default=None, help="most tokens per answer (default: the server's)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature (default: the server's; 0 is greedy)")
    text = "MESSAGE" if chat else "PROMPT"
    parser.add_argument("-q", "--quick", metavar=text, default=None,
                        help=f"send one {text.lower()}, print the answer and exit")


class Session:
    """One client's connection, model and (for chat) conversation so far."""

    def __init__(self, args: argparse.Namespace, chat: bool, http_client: Any = None) -> None:
        from openai import OpenAI

        key = args.api_key or os.environ.get("RAYINFER_API_KEY") or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.url = args.url
        self.chat = chat
        self.client = OpenAI(base_url=args.url, api_key=key, http_client=http_client)
        self.model = args.model or self._first_model()
        self.messages: list[dict[str, str]] = []
        if chat and args.system_prompt:
            self.messages.append({"role": "system", "content": args.system_prompt})
        self.sampling = {name: value for name, value in (("max_tokens", args.max_tokens),
                                                         ("temperature", args.temperature)) if value is not None}

    def _first_model(self) -> str:
        models = self.client.models.list().data
        if not models:
            raise ClientError(f"the server at {self.url} lists no model")
        return models[0].id

    def ask(self, text: str, out: TextIO) -> str:
        """Sends `text` (with the conversation so far, for chat), prints the answer as it arrives, returns it."""
        if self.chat:
            messages = [*self.messages, {"role": "user", "content": text}]
            stream = self.client.chat.completions.create(model=self.model, messages=messages, stream=True,
                                                         **self.sampling)
        else:
            stream = self.client.completions.create(model=self.model, prompt=text, stream=True, **self.sampling)
        pieces, ended = [], False
        try:
            with stream:  # leaving early (Ctrl-C) closes the connection, which aborts the request on the server
                for chunk in stream:
                    for choice in chunk.choices:
                        piece = choice.delta.content if self.chat else choice.text
                        if piece:
                            out.write(piece)
                            out.flush()
                            pieces.append(piece)
            ended = True
        finally:
            if ended or pieces:  # an answer cut short still ends its line
                out.write("\n")
                out.flush()
        answer = "".join(pieces)
        if self.chat:  # only a turn that was answered joins the conversation
            self.messages += [messages[-1], {"role": "assistant", "content": answer}]
        return answer


def _lines(stdin: TextIO, interactive: bool) -> Iterator[str]:
    """The lines typed (with line editing and a prompt when interactive) or piped in, until EOF."""
    while True:
        if interactive:
            try:
                line = input("> ")
            except EOFError:
                print()
                return
        else:
            line = stdin.readline()
            if not line:
                return
        yield line.rstrip("\r\n")


def _explain(exc: Exception, url: str) -> str:
    """One line for an `openai` error."""
    import openai

    if isinstance(exc, openai.APIConnectionError):  # refused, unreachable, timed out
        cause = str(exc.__cause__ or "") or exc.message
        return f"cannot reach the server at {url}: {cause}"
    if isinstance(exc, openai.APIStatusError):
        body = exc.body
        message = body.get("message") if isinstance(body, dict) else None
        message = message or exc.response.text.strip()[:300] or exc.message
        hint = " (give the server's key with --api-key or $RAYINFER_API_KEY)" if exc.status_code == 401 else ""
        return f"the server answered {exc.status_code}: {message}{hint}"
    return f"the server failed the request: {exc.message if isinstance(exc, openai.APIError) else exc}"


def run(args: argparse.Namespace, chat: bool, stdin: Optional[TextIO] = None, stdout: Optional[TextIO] = None,
        http_client: Any = None) -> int:
    """Runs `rayinfer chat` (`chat`) or `rayinfer complete`; returns the exit status. `stdin` and `stdout` default to
    the process's, `http_client` (for the `openai` client, e.g. an `openai.DefaultHttpxClient`) to openai's own."""
    name = "rayinfer chat" if chat else "rayinfer complete"
    stdin = stdin if stdin is not None else sys.stdin
    stdout = stdout if stdout is not None else sys.stdout
    try:
        import openai
    except ImportError:
        print(f"{name} needs the openai package: pip install 'rayinfer[serve]'", file=sys.stderr)
        return 2
    session, refused = None, False
    try:
        session = Session(args, chat, http_client)
        if args.quick is not None:
            session.ask(args.quick, stdout)
            return 0
        interactive = stdin is sys.stdin and stdin.isatty()
        if interactive:
            with contextlib.suppress(ImportError):  # line editing and history for input(), where the platform has it
                import readline  # noqa: F401
            print(f"{name}: {session.model} at {args.url} (Ctrl-D or Ctrl-C ends)", file=sys.stderr)
        for line in _lines(stdin, interactive):
            if not line.strip():
                continue
            try:
                session.ask(line, stdout)
            except openai.BadRequestError as exc:  # this message refused (too long, ...): the session goes on
                print(f"{name}: {_explain(exc, args.url)}", file=sys.stderr)
                refused = True
        return 1 if refused else 0
    except KeyboardInterrupt:
        print(file=sys.stderr)  # off the prompt's line
        return 130
    except ClientError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    except openai.APIError as exc:
        print(f"{name}: {_explain(exc, args.url)}", file=sys.stderr)
        return 1
    finally:
        if session is not None and http_client is None:
            session.client.close()
