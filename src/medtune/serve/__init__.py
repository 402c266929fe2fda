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


def run_serve(model_args, adapter_args, serve_args) -> None:
    import uvicorn

    from medtune.models.loader import resolve_model_path
    from medtune.serve.app import create_app

    model_args.model_name_or_path = resolve_model_path(model_args.model_name_or_path)
    engine, template = build_engine(model_args, adapter_args.adapter_name_or_path, serve_args)
    name = serve_args.served_model_name or Path(model_args.model_name_or_path.rstrip("/")).name
    app = create_app(engine, template, name, serve_args)
    listener = socket.create_server((serve_args.host, serve_args.port))  # port 0: the system picks a free one
    host, port = listener.getsockname()[:2]
    logger.info("listening on http://%s:%d (model %s, %s)", host, port, name,
                "API key required" if serve_args.api_key else "no API key")
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[listener])
