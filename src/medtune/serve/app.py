"""The HTTP side of `medtune serve`: OpenAI-compatible routes on FastAPI, the web page, and what a deployment needs
(API key, body size limit, OpenAI-style 400s, a bounded queue, cancelling the generation of a client that left)."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
from importlib import resources

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from medtune.errors import MedtuneError
from medtune.serve.engine import Finished, SamplingOptions
from medtune.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    ReplyText,
    SamplingRequest,
    new_id,
    now,
    usage,
)

logger = logging.getLogger("medtune.serve")


class Service:
    """What the routes share: the engine, the chat template, the options, and the count of replies in flight."""

    def __init__(self, engine, template, model_name: str, args):
        self.engine, self.template, self.model_name, self.args = engine, template, model_name, args
        self.tokenizer = template.tokenizer
        self.in_flight = 0
        # running batch plus waiting room; without batching one reply runs at a time
        self.capacity = (args.max_batch_size if args.batching else 1) + args.max_queue

    def admit(self, replies: int) -> None:
        if replies > self.capacity:
            raise ApiError(400, f"n x prompts = {replies} is more than this server runs at once ({self.capacity})",
                           param="n")
        if self.in_flight + replies > self.capacity:
            raise ApiError(429, "the server is busy (its queue is full); retry later", code="queue_full",
                           kind="rate_limit_error")
        self.in_flight += replies

    def max_tokens(self, body: SamplingRequest) -> int:
        asked = body.max_completion_tokens or body.max_tokens
        cap = self.args.max_tokens_limit
        if asked is not None and asked > cap:
            raise ApiError(400, f"max_tokens={asked} is more than this server allows ({cap})", param="max_tokens")
        return asked or cap

    def authorised(self, authorization: bytes) -> bool:
        if not self.args.api_key:
            return True
        given = authorization.decode("latin-1").removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode(), self.args.api_key.encode())


def create_app(engine, template, model_name: str, args) -> FastAPI:
    """The app around a started-on-startup `engine` (BatchingEngine or the vLLM one) and `template`."""
    service = Service(engine, template, model_name, args)

    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="medtune serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    add_error_handlers(app)

    app.add_middleware(Gate, service=service)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("medtune.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "in_flight": service.in_flight,
                **dataclasses.asdict(engine.stats)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "medtune"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            prompt = template.prompt_ids(messages)
        except (MedtuneError, jinja2.TemplateError) as exc:  # e.g. a template that refuses a system message
            raise ApiError(400, f"messages: the chat template cannot render them: {exc}", param="messages") from None
        log_request(request, messages)
        return await complete(service, request, body, [prompt], chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        prompts = [service.tokenizer(text, add_special_tokens=body.add_special_tokens)["input_ids"] for text in texts]
        log_request(request, texts)
        return await complete(service, request, body, prompts, chat=False)

    def log_request(request: Request, content) -> None:
        if args.log_content:
            logger.info("%s %s content=%s", request.method, request.url.path, json.dumps(content, ensure_ascii=False))

    return app


async def complete(service: Service, request: Request, body: SamplingRequest, prompts: list[list[int]], chat: bool):
    """Generate `n` replies per prompt and answer in one body or as server-sent events."""
    started = time.monotonic()
    max_tokens = service.max_tokens(body)
    service.admit(len(prompts) * body.n)
    queue: asyncio.Queue = asyncio.Queue()
    stops = body.stop_strings()
    generations, replies = [], []
    for prompt in prompts:
        for k in range(body.n):
            seed = None if body.seed is None else body.seed + k
            options = SamplingOptions(max_tokens, body.temperature, body.top_p, seed)
            generations.append(service.engine.submit(prompt, options, queue, tag=len(generations)))
            replies.append(ReplyText(service.tokenizer, stops))
    run = ReplyRun(service, request, queue, generations, replies, sum(len(p) for p in prompts), started)
    reply_id = new_id("chatcmpl" if chat else "cmpl")
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        # the background task also runs when the client left before the stream started (close() is idempotent)
        return StreamingResponse(stream_events(run, reply_id, service.model_name, chat, include_usage),
                                 media_type="text/event-stream", background=BackgroundTask(run.close))
    run.watcher = asyncio.create_task(cancel_when_client_leaves(request, run))
    try:
        async for _ in run.events():
            pass
    finally:
        run.close()
    choices = [choice_body(chat, index, reply.text, run.finish[index]) for index, reply in enumerate(replies)]
    return {"id": reply_id, "object": "chat.completion" if chat else "text_completion", "created": now(),
            "model": service.model_name, "choices": choices, "usage": run.usage()}


class ReplyRun:
    """The replies of one request as their tokens arrive: text, token counts, finish reasons."""

    def __init__(self, service, request, queue, generations, replies, prompt_tokens: int, started: float):
        self.service, self.request, self.queue = service, request, queue
        self.generations, self.replies = generations, replies
        self.prompt_tokens, self.started = prompt_tokens, started
        self.tokens = [0] * len(generations)
        self.finish: list[str | None] = [None] * len(generations)
        self.closed = False
        self.watcher: asyncio.Task | None = None  # a non-streamed request's disconnect watch

    async def events(self):
        """Yield (index, text delta, finish reason or None) until every reply has finished or been cancelled."""
        ended = set()
        while len(ended) < len(self.generations):
            tag, item = await self.queue.get()
            reply = self.replies[tag]
            if isinstance(item, Exception):
                raise item
            if isinstance(item, Finished):
                ended.add(tag)
                if self.finish[tag] is None and item.reason != "cancelled":
                    self.finish[tag] = "stop" if item.reason == "stop" else "length"
                    yield tag, reply.delta(final=True), self.finish[tag]
                continue
            if self.finish[tag] is not None:
                continue  # generated after a stop string ended the reply, before the cancel took effect
            self.tokens[tag] += 1
            reply.add(item)
            if reply.stopped:
                self.generations[tag].cancel()
                self.finish[tag] = "stop"
                yield tag, reply.delta(final=True), "stop"
            else:
                yield tag, reply.delta(), None

    def usage(self) -> dict:
        return usage(self.prompt_tokens, sum(self.tokens))

    def close(self) -> None:
        """Cancel what is still generating (client gone) and log the request."""
        if self.closed:
            return
        self.closed = True
        if self.watcher is not None:
            self.watcher.cancel()
        for generation in self.generations:
            generation.cancel()
        self.service.in_flight -= len(self.generations)
        left = "" if all(self.finish) else " (client left: cancelled)"
        logger.info("%s %s prompt_tokens=%d completion_tokens=%d %.0f ms%s", self.request.method,
                    self.request.url.path, self.prompt_tokens, sum(self.tokens),
                    1000 * (time.monotonic() - self.started), left)
        if self.service.args.log_content:
            logger.info("reply content=%s", json.dumps([r.text for r in self.replies], ensure_ascii=False))


async def cancel_when_client_leaves(request: Request, run: ReplyRun) -> None:
    """A plain (non-streamed) request hears nothing from its client after the body; a disconnect message means
    the client left, and its replies are cancelled (their generations then end the wait)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for generation in run.generations:
        generation.cancel()


def choice_body(chat: bool, index: int, text: str, finish: str | None) -> dict:
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}


async def stream_events(run: ReplyRun, reply_id: str, model_name: str, chat: bool, include_usage: bool):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    created = now()

    def chunk(choices: list[dict], **extra) -> str:
        body = {"id": reply_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": model_name, "choices": choices, **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def choice(index: int, text: str, finish: str | None, first: bool = False) -> dict:
        if not chat:
            return choice_body(False, index, text, finish)
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return {"index": index, "delta": delta, "finish_reason": finish}

    try:
        if chat:
            yield chunk([choice(index, "", None, first=True) for index in range(len(run.generations))])
        async for index, text, finish in run.events():
            if text or finish:
                yield chunk([choice(index, text, finish)])
        if include_usage:
            yield chunk([], usage=run.usage())
        yield "data: [DONE]\n\n"
    except Exception as exc:  # headers are sent: the error becomes the last event
        logger.exception("generation failed")
        error = ApiError(500, f"generation failed: {type(exc).__name__}", kind="server_error")
        yield f"data: {json.dumps(error.body())}\n\n"
    finally:
        run.close()


def error_response(error: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.status == 429 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def add_error_handlers(app: FastAPI) -> None:
    """Every error is an OpenAI-style body; a bad request is a 400 naming the field, never a 422 or a traceback."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
        message = problem.get("msg", "invalid request").removeprefix("Value error, ")
        if problem.get("type") == "json_invalid":
            message, where = "the body is not valid JSON", None
        return error_response(ApiError(400, f"{where}: {message}" if where else message, param=where or None))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):
        logger.exception("%s %s failed", request.method, request.url.path)
        return error_response(ApiError(500, f"internal error ({type(exc).__name__})", kind="server_error"))


class Gate:
    """ASGI middleware in front of every route: an /v1/ request without the API key gets 401, a body over
    `max_body_bytes` gets 413, before any route reads it. (Plain ASGI rather than `@app.middleware`, which would
    hide a client's disconnect from the streaming replies.)"""

    def __init__(self, app, service: Service):
        self.app, self.service, self.limit = app, service, service.args.max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", []))
        if scope["path"].startswith("/v1/") and not self.service.authorised(headers.get(b"authorization", b"")):
            response = error_response(ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                               code="invalid_api_key"))
            return await response(scope, receive, send)
        declared = headers.get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.limit
        chunks, size, more = [], 0, not too_big
        while more:  # read a (possibly chunked) body up to the limit, then replay it to the app
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            too_big = size > self.limit
            more = more and not too_big
        if too_big:
            response = error_response(ApiError(413, f"request body larger than {self.limit} bytes",
                                               code="body_too_large"))
            return await response(scope, receive, send)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
