"""The `rayinfer` command line."""
from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from pathlib import Path

from rayinfer.configs import EngineConfig


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    fields = EngineConfig.model_fields
    group = parser.add_argument_group("engine")
    group.add_argument("--model", default=None, help="a Hugging Face checkpoint folder, or a Hub id (org/name) "
                       "fetched with huggingface_hub (default: the built-in demo model, rayinfer-demo)")
    for name, info in fields.items():
        if name == "model":
            continue
        flag = "--" + name.replace("_", "-")
        if info.annotation is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None)
        else:
            group.add_argument(flag, dest=name, default=None, help=info.description)


def _engine_kwargs(args: argparse.Namespace) -> dict[str, object]:
    kwargs = {}
    for name in EngineConfig.model_fields:
        value = getattr(args, name, None)
        if name != "model" and value is not None:
            kwargs[name] = value
    return kwargs


def _generate(args: argparse.Namespace) -> int:
    from rayinfer.cluster.llm import LLM
    from rayinfer.scheduler.sampling_params import SamplingParams

    prompts = list(args.prompts)
    if args.prompts_file:
        prompts += [line for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        print("rayinfer generate: give prompts as arguments or with --prompts-file", file=sys.stderr)
        return 2
    llm = LLM(args.model, **_engine_kwargs(args))
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.sampling_seed
    )
    for output in llm.generate(prompts, params, use_tqdm=False):
        completion = output.outputs[0]
        print(f"--- prompt: {output.prompt!r}")
        print(f"{output.prompt}{completion.text}")
        print(f"[{len(completion.token_ids)} tokens, finish_reason={completion.finish_reason}]")
    return 0


def _served_apps(args: argparse.Namespace) -> tuple[str, int, list]:
    """The applications to deploy: the config file's (if given) with the command line's overrides on top."""
    from rayinfer.cluster.openai.tool_calls import check_tool_call_parser
    from rayinfer.cluster.serve_config import ServeConfig, ServedApp, load_serve_config
    from rayinfer.workers.model_source import check_model_source

    config = load_serve_config(args.config) if args.config else ServeConfig(apps=[ServedApp("rayinfer", "/", {})])
    overrides = _engine_kwargs(args)
    if "api_key" not in overrides and os.environ.get("RAYINFER_API_KEY"):  # replicas on other nodes lack our env
        overrides["api_key"] = os.environ["RAYINFER_API_KEY"]
    if args.model is not None:
        overrides["model"] = args.model
    if args.served_model_name is not None:
        overrides["served_model_name"] = args.served_model_name
    for app in config.apps:
        app.args.update(overrides)
        if app.args.get("model") is None:  # named here so the printed name and the replicas agree
            from rayinfer.workers.demo_model import DEMO_MODEL_NAME

            app.args["model"] = DEMO_MODEL_NAME
        engine_config = EngineConfig(**{k: v for k, v in app.args.items() if k != "served_model_name"})  # bad args
        check_model_source(engine_config)  # and a Hub id that is not there (or not cached, offline) fail before Ray
        check_tool_call_parser(engine_config.tool_call_parser)  # as does an unknown parser
    host = args.host if args.host is not None else config.host
    port = args.port if args.port is not None else config.port
    return host, port, config.apps


def _serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    import ray
    from ray import serve

    host, port, apps = _served_apps(args)
    if args.ray_address == "local":
        ray.init(include_dashboard=False, log_to_driver=False)
    else:
        try:  # a running cluster (`ray up`, `ray start`) if there is one
            ray.init(address=args.ray_address, log_to_driver=False)
        except ConnectionError:
            ray.init(log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    for app in apps:
        serve.run(app.build(), name=app.name, route_prefix=app.route_prefix)
        name = app.args.get("served_model_name") or app.args["model"]
        url = f"http://{host}:{port}{app.route_prefix.rstrip('/')}"
        print(f"rayinfer is serving {name!r} at {url}", flush=True)
        # The key itself is not printed: logs are read by more people than hold it.
        auth = " -H \"Authorization: Bearer $RAYINFER_API_KEY\"" if app.args.get("api_key") else ""
        print(
            f"  curl {url}/v1/completions -H 'Content-Type: application/json'{auth} "
            f"-d '{{\"model\": \"{name}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'",
            flush=True,
        )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("rayinfer: shutting down", flush=True)
    serve.shutdown()
    ray.shutdown()
    return 0


def _benchmark_scripts() -> dict[str, Path]:
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    return {p.stem[len("bench_"):].replace("_", "-"): p for p in sorted(scripts.glob("bench_*.py"))}


def _bench(args: argparse.Namespace) -> int:
    import subprocess

    scripts = _benchmark_scripts()
    if not scripts:
        print("rayinfer bench runs the benchmark scripts of a source checkout (scripts/bench_*.py); "
              "none is next to this installation", file=sys.stderr)
        return 2
    if args.name not in scripts:
        if args.name is not None:
            print(f"rayinfer bench: no benchmark {args.name!r}", file=sys.stderr)
        print("benchmarks (rayinfer bench NAME --help for each one's options):")
        for name, path in scripts.items():
            print(f"  {name:16s} {path}")
        return 0 if args.name is None else 2
    return subprocess.call([sys.executable, str(scripts[args.name]), *args.script_args])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayinfer", description="LLM inference and serving on Ray")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="offline generation for prompts given as arguments or in a file")
    generate.add_argument("prompts", nargs="*", help="prompts to complete")
    generate.add_argument("--prompts-file", help="a file with one prompt per line")
    generate.add_argument("--max-tokens", type=int, default=32)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--sampling-seed", dest="sampling_seed", type=int, default=None)
    _add_engine_args(generate)
    generate.set_defaults(handler=_generate)

    serve_cmd = commands.add_parser("serve", help="start the OpenAI-compatible server on Ray Serve")
    serve_cmd.add_argument("config", nargs="?", help="a Serve config file (configs/serve/*.yaml); flags override it")
    serve_cmd.add_argument("--host", default=None, help="HTTP host (default: the config's, else 127.0.0.1)")
    serve_cmd.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's, else 8000)")
    serve_cmd.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model as given)")
    serve_cmd.add_argument(
        "--ray-address",
        default="auto",
        help="Ray cluster to join ('auto': the running one, else a new local one; 'local': always a new local one)",
    )
    _add_engine_args(serve_cmd)
    serve_cmd.set_defaults(handler=_serve)

    bench = commands.add_parser("bench", help="run a benchmark script from scripts/ (no name: list them)")
    bench.add_argument("name", nargs="?", help="the benchmark, e.g. step-overhead")
    bench.add_argument("script_args", nargs=argparse.REMAINDER, help="passed to the script")
    bench.set_defaults(handler=_bench)

    from rayinfer.cluster import chat_client  # imports openai only when a client runs

    for name, help_ in (("chat", "chat with a running server (answers streamed, the conversation kept)"),
                        ("complete", "complete prompts with a running server (streamed)")):
        client_cmd = commands.add_parser(name, help=help_, description=help_)
        chat_client.add_arguments(client_cmd, chat=name == "chat")
        client_cmd.set_defaults(handler=functools.partial(chat_client.run, chat=name == "chat"))
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as exc:
        print(f"rayinfer: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
