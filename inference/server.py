"""An OpenAI-compatible chat API over one loaded model: `create_app(loaded, settings)` returns a FastAPI app.

    GET  /health                 liveness and load (no key needed)
    GET  /v1/models              the one model this process serves
    POST /v1/chat/completions    OpenAI chat messages with text and image parts; `stream` sends server-sent events

Requests are checked before they wait (every problem is a 4xx with an OpenAI-style error body), then wait for
one of `max_concurrency` generation slots in arrival order; when `max_queue` are already waiting the answer is
429 with a `Retry-After` (about the wait a queued request would have had, from recent answer times; the `openai`
client waits that long and retries). The default queue holds an evaluation harness's burst (HARNESS_BURST) while
the one slot answers. Each slot is a view of the same model (weights shared, one KV cache per generation), so
with the default of one slot the model answers one request at a time. A client that leaves mid-answer stops its
generation at the next token, which frees its slot.

The parts: api_requests.py checks a request and reads its images; slot_queue.py admits it to a slot and runs its
answer in a worker thread; this module is the app (routes, keys, errors, whole and streamed answers).
"""
import asyncio
import hmac
import json
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass, field, replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .api_requests import (SERVER_LOGGER, APIError, ChatRequest, ServerSettings, parse_chat_request, prepare_inputs,
                           read_json_body)
from .loading import LoadedModel
from .slot_queue import Finished, GenerationRun, SlotPool, queue_full

log = logging.getLogger(SERVER_LOGGER)

SSE_DONE = "data: [DONE]\n\n"
# The line scripts.serve_openai_api logs once its socket listens, with the base URL clients use.
SERVING_ANNOUNCEMENT = re.compile(r"serving '.*' at (http://[\d.]+:\d+)/v1")


# ------------------------------------------------------------------------------------------------ answers

class StopCutter:
    """Cuts a streamed answer before the first stop string to be completed, holding back text that may begin one."""

    def __init__(self, stops: list):
        self.stops = stops
        self.held = ""
        self.hit = False

    def feed(self, piece: str) -> str:
        """The text now safe to send (empty once a stop string is hit)."""
        if self.hit:
            return ""
        text = self.held + piece
        # (end, start) of each stop string's first occurrence: the one completed first wins, as it would if the
        # text came a character at a time.
        found = [(text.find(stop) + len(stop), text.find(stop)) for stop in self.stops if stop in text]
        if found:
            self.hit, self.held = True, ""
            return text[:min(found)[1]]
        keep = min(len(text), max((len(stop) - 1 for stop in self.stops), default=0))
        while keep and not any(stop.startswith(text[len(text) - keep:]) for stop in self.stops):
            keep -= 1  # the tail cannot begin any stop string: it is safe to send
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep] if keep else text

    def flush(self) -> str:
        held, self.held = self.held, ""
        return "" if self.hit else held


@dataclass
class Completion:
    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str = None

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


async def generate_text(run: GenerationRun, stops: list, completion: Completion):
    """Yield the answer's text (cut at a stop string); fill in `completion` at the end. Leaving early stops it."""
    cutter = StopCutter(stops)
    try:
        while True:
            event = await run.events.get()
            if isinstance(event, Finished):
                break
            text = cutter.feed(event)
            if text:
                yield text
            if cutter.hit:
                run.stop()
        if event.error is not None:
            raise event.error
        tail = cutter.flush()
        if tail:
            yield tail
        stats = event.stats
        completion.completion_tokens = stats.tokens
        ran_out = not cutter.hit and not stats.ended_by_eos and stats.tokens >= run.settings.max_new_tokens
        completion.finish_reason = "length" if ran_out else "stop"
    finally:
        run.abandoned = completion.finish_reason is None
        run.stop()  # no-op when the answer is complete; stops the thread when the client left


# ----------------------------------------------------------------------------------------------- the app

@dataclass
class ServerState:
    loaded: LoadedModel
    settings: ServerSettings
    pool: SlotPool
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(loaded: LoadedModel, settings: ServerSettings) -> FastAPI:
    """The API over `loaded`; `settings.max_concurrency` generation slots share its weights."""
    slots = [replace(loaded, lock=threading.Lock()) for _ in range(settings.max_concurrency)]
    state = ServerState(loaded, settings, SlotPool(slots, settings.max_queue))
    app = FastAPI(title="MiniMind-V OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    add_error_handlers(app)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_id, "running": state.pool.running,
                "waiting": len(state.pool.waiting), "max_concurrency": settings.max_concurrency,
                "max_queue": settings.max_queue}

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_api_key(request, settings.api_key)
        return {"object": "list", "data": [model_card(state)]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        check_api_key(request, settings.api_key)
        if model_id != settings.model_id:
            raise APIError(404, f"the model '{model_id}' does not exist", "model", "model_not_found")
        return model_card(state)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_api_key(request, settings.api_key)
        return await answer_chat(request, state)

    return app


def model_card(state: ServerState) -> dict:
    return {"id": state.settings.model_id, "object": "model", "created": state.created, "owned_by": "minimind-v"}


def check_api_key(request: Request, api_key: str):
    if api_key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer KEY'", None,
                       "invalid_api_key")


def add_error_handlers(app: FastAPI):
    @app.exception_handler(APIError)
    async def api_error(_request, error: APIError):
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error: StarletteHTTPException):  # unknown routes, wrong methods
        message = f"no route {request.method} {request.url.path}" if error.status_code in (404, 405) else \
            str(error.detail)
        return APIError(error.status_code, message, None, "not_found" if error.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def server_error(_request, error: Exception):  # a bug: the client gets one line, the log the traceback
        log.error("request failed", exc_info=error)
        return APIError(500, f"internal error ({type(error).__name__})", None, None, "server_error").response()


class Job:
    """A checked request waiting for its slot, then generating: its text pieces, and cleanup if it is dropped."""

    def __init__(self, state: ServerState, chat: ChatRequest, input_ids, pixel_values, generation):
        self.pool, self.stops = state.pool, chat.stop
        self.inputs = (input_ids, pixel_values, generation)
        self.completion = Completion(prompt_tokens=input_ids.shape[1])
        self.reservation = state.pool.reserve()  # 429 here when the queue is full
        self.started = False

    async def pieces(self):
        slot = await self.reservation
        self.started = True
        run = GenerationRun(slot, *self.inputs, self.pool.release)
        async for piece in generate_text(run, self.stops, self.completion):
            yield piece

    def abandon(self):
        """Give the place in the queue (or the slot not yet used) back; a started run stops itself."""
        if not self.started:
            self.pool.give_up(self.reservation)


async def answer_chat(request: Request, state: ServerState):
    body = await read_json_body(request, state.settings.max_request_bytes)
    chat = parse_chat_request(body, state.settings)
    if state.pool.is_full():  # refuse before decoding images for a request that could not wait anyway
        raise queue_full(state.pool)
    inputs = await asyncio.to_thread(prepare_inputs, chat, state.loaded, state.settings)
    job = Job(state, chat, *inputs)
    reply_id = f"chatcmpl-{secrets.token_hex(12)}"
    if chat.stream:
        events = sse_events(job, reply_id, state.settings.model_id, chat.include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        return await whole_answer(request, job, reply_id, state.settings.model_id)
    finally:
        job.abandon()


async def whole_answer(request: Request, job: Job, reply_id: str, model_id: str):
    """A `chat.completion`; a client that leaves before the end stops the generation (and gets nothing)."""
    collect = asyncio.ensure_future(join_pieces(job.pieces()))
    left = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait([collect, left], return_when=asyncio.FIRST_COMPLETED)
    finally:
        left.cancel()
        if not collect.done():  # the client left (or this handler was cancelled): stop generating
            collect.cancel()
            await asyncio.gather(collect, return_exceptions=True)
    if collect.cancelled():
        return JSONResponse({}, status_code=499)  # nobody reads it
    text = collect.result()
    return {"id": reply_id, "object": "chat.completion", "created": int(time.time()), "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": job.completion.finish_reason}],
            "usage": job.completion.usage()}


async def join_pieces(pieces) -> str:
    return "".join([piece async for piece in pieces])


async def wait_for_disconnect(request: Request):
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def sse_events(job: Job, reply_id: str, model: str, include_usage: bool):
    """`chat.completion.chunk` events: the role, the text pieces, the finish reason (and usage), then [DONE]."""
    created = int(time.time())

    def chunk(delta: dict, finish_reason=None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        data = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice]}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        try:
            async for piece in job.pieces():
                yield chunk({"content": piece})
        except Exception as error:  # the headers are sent: the error goes in the stream
            log.error("generation failed", exc_info=error)
            api_error = APIError(500, f"generation failed ({type(error).__name__})", None, None, "server_error")
            yield f"data: {json.dumps(api_error.body())}\n\n"
            return
        yield chunk({}, job.completion.finish_reason)
        if include_usage:
            usage = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [], "usage": job.completion.usage()}
            yield f"data: {json.dumps(usage)}\n\n"
        yield SSE_DONE
    finally:
        job.abandon()
