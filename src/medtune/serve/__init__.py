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


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to `host` (an IPv4 or IPv6 address, a name, or "" for every IPv4 interface) and `port` (0: the
    system picks a free one), NOT listening yet: binding first reports a busy port or a bad host before the model
    loads, while a client connecting during the load is refused rather than left hanging in the backlog. uvicorn
    serves a given socket through asyncio's `loop.create_server(sock=...)`, whose server calls `listen()` when it
    starts serving, after the app's startup."""
    from medtune.errors import ConfigError

    listener = None
    try:
        if host:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        else:  # getaddrinfo("") fails; "" binds the IPv4 wildcard, as uvicorn's host "" did before
            family = socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        # what socket.create_server sets: a restart may reuse a port left in TIME_WAIT; IPv6 means IPv6 only
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        listener.bind((host, port))
        return listener
    except OSError as exc:
        if listener is not None:
            listener.close()
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None


def server_url(listener: socket.socket) -> str:
    """http://HOST:PORT of a bound socket, an IPv6 address in brackets (http://[::1]:8000)."""
    host, port = listener.getsockname()[:2]
    return f"http://[{host}]:{port}" if listener.family == socket.AF_INET6 else f"http://{host}:{port}"


def run_serve(model_args, adapter_args, serve_args) -> None:
    import uvicorn

    from medtune.models.loader import resolve_model_path
    from medtune.serve.app import create_app

    model_args.model_name_or_path = resolve_model_path(model_args.model_name_or_path)
    listener = bind(serve_args.host, serve_args.port)  # a host or port it cannot use fails before the model loads
    try:
        engine, template = build_engine(model_args, adapter_args.adapter_name_or_path, serve_args)
    except BaseException:
        listener.close()
        raise
    name = serve_args.served_model_name or Path(model_args.model_name_or_path.rstrip("/")).name
    app = create_app(engine, template, name, serve_args)
    announcement = (f"listening on {server_url(listener)} (model {name}, "
                    f"{'API key required' if serve_args.api_key else 'no API key'})")

    class AnnouncingServer(uvicorn.Server):
        """Logs the URL once connections are accepted (scripts wait for that line), not before."""

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                logger.info("%s", announcement)

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    AnnouncingServer(config).run(sockets=[listener])
