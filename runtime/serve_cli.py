"""`inferforge serve`: the command-line entry of the OpenAI-compatible server (`runtime/serve.py`).

`inferforge/cli.py` registers it with `add_serve_parser(sub, fmt)`. fastapi, uvicorn and
prometheus_client are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import socket
import sys
from pathlib import Path

from inferforge.errors import UserInputError


def add_serve_parser(sub, fmt) -> None:
    """Add the `serve` command to the subparsers `sub` (argparse formatter class `fmt`)."""
    p = sub.add_parser("serve", formatter_class=fmt, help="serve a Llama-family model over an OpenAI-compatible API",
                       description="Load a Hugging Face Llama / Mistral / Qwen2 directory or a causal-LM artifact "
                                   "(tokenizer included) and serve it over HTTP: POST /v1/completions, POST "
                                   "/v1/chat/completions (streaming as server-sent events), GET /v1/models, GET "
                                   "/health, GET /metrics (Prometheus). Requests from all clients share one engine "
                                   "with continuous batching. Ctrl-C stops the server.",
                       epilog="example:\n  inferforge serve ./Llama-3.2-1B --port 8000\n"
                              "  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\\n"
                              "       -d '{\"model\": \"Llama-3.2-1B\", \"prompt\": \"The capital of France is\", "
                              "\"max_tokens\": 16}'")
    p.add_argument("model", help="Hugging Face decoder directory (config.json, *.safetensors, tokenizer files), or "
                                 "a causal-LM artifact (quantize --config)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default 8000)")
    p.add_argument("--max-num-seqs", type=int, default=8, help="most sequences batched together (default 8)")
    p.add_argument("--max-context", type=int, help="context limit per request (default: the model's window; a "
                                                    "larger value is capped at the window, with a note on stderr)")
    p.add_argument("--max-step-tokens", type=int, default=256,
                   help="token budget of one engine step: decodes plus prompt chunks (default 256)")
    p.add_argument("--kv-cache-dtype", choices=["fp32", "fp16", "bf16", "fp8"],
                   help="KV cache dtype (default: the model's dtype)")
    from inferforge.runtime.kv_budget import add_memory_flags

    add_memory_flags(p)
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the model id clients send and /v1/models lists (default: the directory's name)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)


def _check_flags(args) -> None:
    for flag, value, ok, want in (
            ("--port", args.port, 0 <= args.port <= 65535, "in [0, 65535]"),
            ("--max-num-seqs", args.max_num_seqs, args.max_num_seqs >= 1, ">= 1"),
            ("--max-step-tokens", args.max_step_tokens, args.max_step_tokens >= 1, ">= 1"),
            ("--max-context", args.max_context, args.max_context is None or args.max_context >= 1, ">= 1")):
        if not ok:
            raise UserInputError(f"{flag} must be {want}, got {value}")
    from inferforge.runtime.kv_budget import memory_kwargs

    memory_kwargs(args)


def _serving_engine(args):
    from inferforge.runtime.kv_budget import memory_kwargs
    from inferforge.runtime.load import load_engine

    return load_engine(args.model, command="serve", kv_cache_dtype=args.kv_cache_dtype,
                       max_num_seqs=args.max_num_seqs, max_context=args.max_context,
                       max_step_tokens=args.max_step_tokens, **memory_kwargs(args))


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound here so that a port in use is one clear line (and --port 0 works)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UserInputError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserInputError(f"port {port} on {host} is already in use; stop that server or pick another "
                                 "--port") from None
        raise UserInputError(f"cannot listen on {host}:{port} ({e.strerror}); check --host and --port") from None
    return sock


async def _serve(server, sock: socket.socket, ready_line: str) -> None:
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        print(ready_line, flush=True)
    await task


def cmd_serve(args) -> int:
    _check_flags(args)
    sock = _bind(args.host, args.port)      # first: a port in use fails before the model loads
    try:
        return _serve_on(sock, args)
    finally:
        sock.close()


def _serve_on(sock: socket.socket, args) -> int:
    from inferforge.runtime.kv_budget import CPU_LAYOUT_FLAGS

    engine = _serving_engine(args)
    if args.max_context is not None and args.max_context > engine.max_context:
        print(f"note: --max-context {args.max_context} is capped at the model's context window "
              f"({engine.max_context} tokens)", file=sys.stderr, flush=True)
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as e:
        raise UserInputError(f"{args.model}: cannot load a tokenizer from the model directory ({e})") from None
    import uvicorn

    from inferforge.runtime.async_engine import AsyncEngine
    from inferforge.runtime.serve import create_app

    name = args.served_model_name or Path(args.model).resolve().name
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    app = create_app(AsyncEngine(engine), tokenizer, model_name=name)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
    layout = (getattr(engine, "cpu_linears", None) or {}).get("layout")
    cpu = f", --cpu-linears {CPU_LAYOUT_FLAGS[layout]}" if layout and engine.model.device.type == "cpu" else ""
    ready = (f"serving {name} at {url}/v1 (max_model_len {engine.max_context}, --max-num-seqs {args.max_num_seqs}"
             f"{cpu}); Ctrl-C stops")
    try:
        asyncio.run(_serve(server, sock, ready))
    except KeyboardInterrupt:     # uvicorn shut down gracefully, then re-raised the signal
        pass
    print("server stopped", file=sys.stderr)
    return 0
