"""`medtune serve`: the trained model behind an OpenAI-compatible HTTP API and a chat page.

Split by concern: `protocol` (request and error bodies, reply text), `app` (routes and deployment guards),
`engine` (the batching scheduler on a local model), `vllm_engine` (the same interface on vLLM).
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

logger = logging.getLogger("medtune.serve")
DESCRIPTION = ("An OpenAI-compatible server (GET /v1/models, POST /v1/chat/completions and /v1/completions, "
               "streaming or not; GET /health) with a chat page at /, batching concurrent requests on the model.")


def build_engine(model_args, adapter, serve_args):
    """(engine, chat template): the vLLM engine, or the batching scheduler over the evaluation's LocalBackend (the
    same loading, tokenizer and template choice as evaluation)."""
    if serve_args.backend == "vllm":
        from medtune.serve.vllm_engine import VllmEngine

        return VllmEngine.create(model_args, adapter, serve_args)
    from medtune.eval.backends import LocalBackend
    from medtune.serve.engine import BatchingEngine

    backend = LocalBackend(model_args.model_name_or_path, adapter, model_args.template,
                           model_args.torch_dtype, model_args.trust_remote_code,
                           tokenizer_path=model_args.tokenizer_name_or_path,
                           attn_implementation=model_args.attn_implementation,
                           system_prompt=serve_args.system_prompt)
    size = serve_args.max_batch_size if serve_args.batching else 1
    return BatchingEngine(backend, max_batch_size=size, batch_wait_ms=serve_args.batch_wait_ms), backend.template


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on `host` (an IPv4 or IPv6 address or a name) and `port` (0: the system picks a free
    one)."""
    from medtune.errors import ConfigError

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None


def server_url(listener: socket.socket) -> str:
    """http://HOST:PORT of a listening socket, an IPv6 address in brackets (http://[::1]:8000)."""
    host, port = listener.getsockname()[:2]
    return f"http://[{host}]:{port}" if listener.family == socket.AF_INET6 else f"http://{host}:{port}"


def run_serve(model_args, adapter_args, serve_args) -> None:
    import uvicorn

    from medtune.models.loader import resolve_model_path
    from medtune.serve.app import create_app

    model_args.model_name_or_path = resolve_model_path(model_args.model_name_or_path)
    listener = listen(serve_args.host, serve_args.port)  # a host or port it cannot use fails before the model loads
    try:
        engine, template = build_engine(model_args, adapter_args.adapter_name_or_path, serve_args)
    except BaseException:
        listener.close()
        raise
    name = serve_args.served_model_name or Path(model_args.model_name_or_path.rstrip("/")).name
    app = create_app(engine, template, name, serve_args)
    logger.info("listening on %s (model %s, %s)", server_url(listener), name,
                "API key required" if serve_args.api_key else "no API key")
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[listener])
