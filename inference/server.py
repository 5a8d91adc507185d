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
"""
import asyncio
import base64
import binascii
import hmac
import json
import logging
import math
import re
import secrets
import threading
import time
import urllib.parse
import urllib.request
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from jinja2 import TemplateError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dataset.processing import IMAGE_MARKER, ImageError, build_prompt, open_image, preprocess_image

from .generation import GenerationSettings, stream_generation
from .loading import LoadedModel

log = logging.getLogger("minimind.server")

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"developer": "system"}  # newer OpenAI clients send system prompts as "developer"
MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
SEED_RANGE = (0, 2 ** 63 - 1)  # torch.Generator.manual_seed takes a 64-bit seed
REMOTE_IMAGE_TIMEOUT_S = 10.0
READ_CHUNK_BYTES = 1 << 16
SSE_DONE = "data: [DONE]\n\n"
# The line scripts.serve_openai_api logs once its socket listens, with the base URL clients use.
SERVING_ANNOUNCEMENT = re.compile(r"serving '.*' at (http://[\d.]+:\d+)/v1")
SERVER_POLL_S = 0.25
LOG_TAIL_CHARS = 2000
# lmms-eval's `openai` model sends this many requests at once (its num_concurrent default, lmms_eval/models/simple/
# openai.py in 0.7.3): the default queue takes them all while the default single slot is busy.
HARNESS_BURST = 32
# Retry-After, in whole seconds (HTTP's delay-seconds): at least 1; at most 60, the longest wait the `openai`
# client honours in 1.30, the oldest tests/requirements.txt allows (3.60 honours up to 120 s; longer: no retry).
RETRY_AFTER_S = (1, 60)
ANSWER_TIME_WEIGHT = 0.2  # weight of the newest answer in the running mean of answer times behind Retry-After


# ------------------------------------------------------------------------------------------------ settings

@dataclass
class ServerSettings:
    """What the server accepts and how much work it takes on (the serve_openai_api.py flags)."""
    model_id: str
    generation: GenerationSettings  # defaults for requests that leave temperature, top_p or max_tokens out
    max_seq_len: int  # prompt + answer tokens, at most
    api_key: str = None  # None: no key needed
    max_concurrency: int = 1
    max_queue: int = HARNESS_BURST
    max_request_bytes: int = 32 * 1024 * 1024
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    max_images: int = 8
    image_root: Path = None  # local image files are read only from under this folder
    allow_remote_images: bool = False


class APIError(Exception):
    """A request the server refuses: sent as {"error": {"message", "type", "param", "code"}} with `status`
    (and `headers`, such as a 429's Retry-After)."""

    def __init__(self, status: int, message: str, param: str = None, code: str = None,
                 error_type: str = "invalid_request_error", headers: dict = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.error_type = status, message, param, code, error_type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str = None, code: str = None) -> APIError:
    return APIError(400, message, param, code)


# ------------------------------------------------------------------------------------------ request parsing

@dataclass
class ChatRequest:
    """A checked chat request: messages with `<image>` markers where their image parts were, image sources."""
    messages: list  # {"role", "content"}
    images: list  # (param, url) per image, in marker order
    settings: GenerationSettings
    max_tokens_given: bool  # False: the server's default, shortened to fit the context
    stop: list
    stream: bool
    include_usage: bool


def parse_chat_request(body, settings: ServerSettings) -> ChatRequest:
    """Check an OpenAI chat request body; every problem is an APIError naming the field."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("you must provide a model parameter (see GET /v1/models)", "model")
    if model != settings.model_id:
        raise APIError(404, f"the model '{model}' does not exist; this server serves '{settings.model_id}'",
                       "model", "model_not_found")
    if body.get("n") not in (None, 1):
        raise bad_request("only n=1 is supported", "n")
    messages, images = parse_messages(body.get("messages"), settings.max_images)
    generation, max_tokens_given = parse_sampling(body, settings.generation)
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise bad_request("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    return ChatRequest(messages, images, generation, max_tokens_given, parse_stop(body.get("stop")), stream,
                       bool(options.get("include_usage")))


def parse_messages(messages, max_images: int):
    """OpenAI messages -> ([{"role", "content"}], [(param, image url)]); the last message must be the user's."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    parsed, images = [], []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise bad_request(f"{param} must be an object with role and content", param)
        role = ROLE_ALIASES.get(message.get("role"), message.get("role"))
        if role not in ROLES:
            raise bad_request(f"{param}.role {message.get('role')!r} is not supported: use one of "
                              f"{', '.join(ROLES)}", f"{param}.role")
        text, urls = parse_content(message.get("content"), role, f"{param}.content")
        parsed.append({"role": role, "content": text})
        images.extend(urls)
        if len(images) > max_images:
            raise bad_request(f"more than {max_images} images in the conversation (the server's --max_images)",
                              param, "too_many_images")
    if parsed[-1]["role"] != "user":
        raise bad_request("the last message must be the user's", f"messages[{len(parsed) - 1}].role")
    return parsed, images


def parse_content(content, role: str, param: str):
    """A message's content (a string or a list of text/image_url parts) -> (text with markers, image urls)."""
    if content is None and role == "assistant":
        return "", []
    if isinstance(content, str):
        return checked_text(content, param), []
    if not isinstance(content, list):
        raise bad_request(f"{param} must be a string or a list of content parts", param)
    pieces, urls = [], []
    for index, part in enumerate(content):
        part_param = f"{param}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(checked_text(part["text"], f"{part_param}.text"))
        elif kind == "image_url":
            if role != "user":
                raise bad_request(f"{part_param}: only user messages can carry images", part_param)
            urls.append((part_param, image_url_of(part, part_param)))
            pieces.append(IMAGE_MARKER)
        else:
            raise bad_request(f"{part_param} must be {{\"type\": \"text\", \"text\": ...}} or {{\"type\": "
                              f"\"image_url\", \"image_url\": {{\"url\": ...}}}}", part_param)
    # Parts on their own lines, so images first then the question read as in training ("<image>\nquestion").
    return "\n".join(pieces), urls


def image_url_of(part: dict, param: str) -> str:
    image_url = part.get("image_url")
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url:
        raise bad_request(f"{param}.image_url.url must be a data:, file or http(s) URL", f"{param}.image_url")
    return url


def checked_text(text: str, param: str) -> str:
    if IMAGE_MARKER in text:  # it would be read as an image position
        raise bad_request(f"{param} contains {IMAGE_MARKER!r}: send images as image_url parts", param)
    return text


def parse_sampling(body: dict, defaults: GenerationSettings):
    """temperature, top_p, max_tokens (or max_completion_tokens), seed -> (GenerationSettings, max_tokens given)."""
    temperature = number_field(body, "temperature", defaults.temperature, 0.0, MAX_TEMPERATURE)
    top_p = number_field(body, "top_p", defaults.top_p, 0.0, 1.0)
    if top_p <= 0:
        raise bad_request("top_p must be in (0, 1]", "top_p")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = integer_field(body, name, None, 1, None)
    seed = integer_field(body, "seed", None, *SEED_RANGE)
    if seed is None and temperature > 0:  # a private generator anyway: answers never share random numbers
        seed = secrets.randbits(63)
    settings = GenerationSettings(defaults.max_new_tokens if max_tokens is None else max_tokens, temperature, top_p,
                                  seed)
    return settings, max_tokens is not None


def number_field(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise bad_request(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}", name)
    return float(value)


def integer_field(body: dict, name: str, default, low: int, high) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        limit = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise bad_request(f"{name} must be an integer {limit}, got {value!r}", name)
    return value


def parse_stop(stop) -> list:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS or \
            not all(isinstance(s, str) and s for s in stops):
        raise bad_request(f"stop must be a non-empty string or a list of up to {MAX_STOP_STRINGS} of them", "stop")
    return stops


# -------------------------------------------------------------------------------------------------- images

def read_image_bytes(url: str, param: str, settings: ServerSettings) -> bytes:
    """The bytes behind an image URL: a data: URL, a file under --image_root, or (if allowed) http(s)."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "data":
        data = decode_data_url(url, param, settings.max_image_bytes)
    elif scheme in ("http", "https"):
        if not settings.allow_remote_images:
            raise bad_request(f"{param}: remote image URLs are refused (start the server with "
                              f"--allow_remote_images, or send the image as a data: URL)", param)
        data = fetch_remote_image(url, param, settings.max_image_bytes)
    else:
        data = read_local_image(url, param, settings.image_root, settings.max_image_bytes)
    if not data:
        raise bad_request(f"{param}: the image is empty", param, "invalid_image")
    return data


def too_large(param: str, size: int, limit: int) -> APIError:
    return bad_request(f"{param}: the image is {size} bytes, over the {limit} byte limit (--max_image_bytes)",
                       param, "image_too_large")


def decode_data_url(url: str, param: str, max_bytes: int) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise bad_request(f"{param}: a data URL must look like data:image/png;base64,...", param, "invalid_image")
    payload = "".join(payload.split())
    decoded_size = len(payload) * 3 // 4 - payload[-2:].count("=")  # known before decoding
    if decoded_size > max_bytes:
        raise too_large(param, decoded_size, max_bytes)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param}: the data URL is not valid base64", param, "invalid_image") from None


def read_local_image(url: str, param: str, image_root, max_bytes: int) -> bytes:
    if image_root is None:
        raise bad_request(f"{param}: local image files are refused (start the server with --image_root DIR, or "
                          f"send the image as a data: URL)", param)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("", "file"):
        raise bad_request(f"{param}: unsupported image URL scheme {parts.scheme!r} (use data:, file or http(s))",
                          param)
    root = Path(image_root).resolve()
    raw = urllib.parse.unquote(parts.path) if parts.scheme == "file" else url
    path = (root / raw).resolve()  # an absolute `raw` replaces root; resolve() follows symlinks and ".."
    if not path.is_relative_to(root):
        raise bad_request(f"{param}: {raw} is outside the image folder", param)
    if not path.is_file():
        raise bad_request(f"{param}: {raw}: no such file under the image folder", param, "invalid_image")
    size = path.stat().st_size
    if size > max_bytes:
        raise too_large(param, size, max_bytes)
    return path.read_bytes()


def fetch_remote_image(url: str, param: str, max_bytes: int) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=REMOTE_IMAGE_TIMEOUT_S) as response:
            data = response.read(max_bytes + 1)
    except (OSError, ValueError) as error:
        raise bad_request(f"{param}: could not fetch {url} ({error})", param, "invalid_image") from None
    if len(data) > max_bytes:
        raise too_large(param, len(data), max_bytes)
    return data


def load_request_images(images: list, settings: ServerSettings, image_processor):
    """[(param, url)] -> pixel values [1, N, 3, H, W] through the model's image processor, or None."""
    if not images:
        return None
    pixels = []
    for param, url in images:
        data = read_image_bytes(url, param, settings)
        try:
            pixels.append(preprocess_image(open_image(data, settings.max_image_pixels, name=param), image_processor))
        except ImageError as error:  # not an image, or over --max_image_pixels
            raise bad_request(str(error), param, "invalid_image") from None
    return torch.stack(pixels).unsqueeze(0)  # [1, N, 3, H, W]


def prepare_inputs(request: ChatRequest, loaded: LoadedModel, settings: ServerSettings):
    """(input_ids [1, T], pixel_values or None, generation settings fitted to the context); 400 if it cannot fit."""
    pixel_values = load_request_images(request.images, settings, loaded.image_processor)
    try:
        prompt = build_prompt(loaded.tokenizer, request.messages, loaded.model.config.image_special_token,
                              add_generation_prompt=True, chat_format=loaded.model.config.chat_format)
    except TemplateError as error:  # a template that raises on what it cannot render (a system message, say)
        raise bad_request(f"the model's chat template refused these messages: {error}", "messages") from None
    input_ids = loaded.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    room = settings.max_seq_len - input_ids.shape[1]
    generation = request.settings
    if room < 1 or (request.max_tokens_given and generation.max_new_tokens > room):
        asked = f" plus max_tokens {generation.max_new_tokens}" if request.max_tokens_given else ""
        raise bad_request(f"the prompt is {input_ids.shape[1]} tokens{asked}, over this model's context of "
                          f"{settings.max_seq_len} tokens (each image counts {loaded.model.image_token_count}); "
                          f"shorten the conversation", "messages", "context_length_exceeded")
    if generation.max_new_tokens > room:
        generation = replace(generation, max_new_tokens=room)
    return input_ids, pixel_values, generation


# ------------------------------------------------------------------------------------------ fair queueing

class SlotPool:
    """FIFO admission to generation slots. Used from the event loop thread only, so it needs no lock."""

    def __init__(self, slots: list, max_queue: int):
        self.free = deque(slots)
        self.size = len(slots)
        self.max_queue = max_queue
        self.waiting = deque()  # futures, oldest first
        self.answer_s = None  # running mean of the seconds an answer holds its slot; None before the first

    @property
    def running(self) -> int:
        return self.size - len(self.free)

    def reserve(self) -> asyncio.Future:
        """A future that gets a slot, in arrival order; 429 if the queue is full."""
        future = asyncio.get_running_loop().create_future()
        if self.free and not self.waiting:
            future.set_result(self.free.popleft())
        elif len(self.waiting) >= self.max_queue:
            raise queue_full(self)
        else:
            self.waiting.append(future)
        return future

    def give_up(self, future: asyncio.Future):
        """The request no longer wants its place (it left, or failed before generating)."""
        if future.done() and not future.cancelled():
            self.release(future.result())
        else:
            future.cancel()
            if future in self.waiting:
                self.waiting.remove(future)

    def release(self, slot, busy_s: float = None):
        """Hand `slot` to the oldest waiter, or free it; `busy_s`: how long a finished answer held it."""
        if busy_s is not None:
            self.answer_s = busy_s if self.answer_s is None else \
                (1 - ANSWER_TIME_WEIGHT) * self.answer_s + ANSWER_TIME_WEIGHT * busy_s
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_result(slot)
                return
        self.free.append(slot)

    def is_full(self) -> bool:
        return not self.free and len(self.waiting) >= self.max_queue

    def retry_after_s(self) -> int:
        """Whole seconds a refused request should wait: about the wait it would have had at the back of the queue
        (the waiting requests and it, answered `size` at a time). Retried then, it loses no time to the queue and
        finds it drained, where a shorter wait would spend the client's few retries on more 429s."""
        lowest, highest = RETRY_AFTER_S
        if self.answer_s is None:
            return lowest
        return min(highest, max(lowest, math.ceil(self.answer_s * (len(self.waiting) + 1) / self.size)))


def queue_full(pool: SlotPool) -> APIError:
    retry_after = pool.retry_after_s()
    return APIError(429, f"the server is busy ({pool.running} answering, {len(pool.waiting)} waiting): retry in "
                         f"{retry_after} s, or start it with a larger --max_queue", None, "queue_full",
                    "rate_limit_error", {"Retry-After": str(retry_after)})


# --------------------------------------------------------------------------------------------- generation

@dataclass
class Finished:
    """Event after the last piece: the generation's stats, or the error that ended it."""
    stats: object = None
    error: BaseException = None


class GenerationRun:
    """One answer generated on a slot in a worker thread; its text pieces arrive in an asyncio queue.

    The slot goes back to the pool when the thread ends, never before, so slots never overlap.
    """

    def __init__(self, slot: LoadedModel, input_ids, pixel_values, settings: GenerationSettings, release):
        self.loop = asyncio.get_running_loop()
        self.events = asyncio.Queue()
        self.stop_event = threading.Event()
        self.slot, self.release, self.settings = slot, release, settings
        self.args = (input_ids, pixel_values, settings)
        self.abandoned = False  # the client left before the end
        self.started = time.monotonic()
        threading.Thread(target=self._run, name="minimind-serve", daemon=True).start()

    def _run(self):
        finished = Finished()

        def record(_text, stats):
            finished.stats = stats

        try:
            for piece in stream_generation(self.slot, *self.args, self.stop_event, record):
                self.loop.call_soon_threadsafe(self.events.put_nowait, piece)
        except BaseException as error:  # handed to the request's task, which answers with an error
            finished.error = error
        self.loop.call_soon_threadsafe(self._finish, finished)

    def _finish(self, finished: Finished):
        if self.abandoned and finished.stats is not None:
            log.info(f"client left: generation stopped after {finished.stats.tokens} of "
                     f"{self.settings.max_new_tokens} tokens")
        answered = finished.stats is not None and not self.abandoned  # a stopped run says little about answer times
        self.release(self.slot, time.monotonic() - self.started if answered else None)
        self.events.put_nowait(finished)

    def stop(self):
        self.stop_event.set()


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


async def read_json_body(request: Request, max_bytes: int):
    """The request's JSON, read at most `max_bytes` (413 beyond); 400 if it is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise request_too_large(int(declared), max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise request_too_large(size, max_bytes)
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as error:  # RecursionError: nested too deeply to parse
        raise bad_request(f"the request body is not valid JSON ({error})", None, "invalid_json") from None


def request_too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the request body is over {limit} bytes (--max_request_bytes); got at least {size}",
                    None, "request_too_large")


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


def answers_health(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=5) as response:
            return response.status == 200
    except OSError:  # not listening yet, or refused
        return False


def wait_until_serving(process, log_path: Path, timeout_s: float) -> str:
    """The base URL of a server started as `process` (python -m scripts.serve_openai_api, its output in log_path)
    once the URL it announced answers /health; RuntimeError with the log's tail if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}):\n{log_path.read_text()[-LOG_TAIL_CHARS:]}")
        found = SERVING_ANNOUNCEMENT.search(log_path.read_text())
        if found and answers_health(found.group(1)):
            return found.group(1)
        time.sleep(SERVER_POLL_S)
    raise RuntimeError(f"the server did not start in {timeout_s} s ({log_path}):\n"
                       f"{log_path.read_text()[-LOG_TAIL_CHARS:]}")
