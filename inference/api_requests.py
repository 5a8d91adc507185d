"""The API server's requests: its settings and error type, an OpenAI chat request body checked field by field, the
images it names (data: URLs, files under --image_root, http(s) when allowed) and the model inputs they make.

Every problem is an APIError naming the field, answered as a 4xx with an OpenAI-style error body.
"""
import base64
import binascii
import json
import secrets
import urllib.parse
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from fastapi import Request
from fastapi.responses import JSONResponse
from jinja2 import TemplateError

from dataset.processing import IMAGE_MARKER, MAX_IMAGE_PIXELS, ImageError, build_prompt, open_image, preprocess_image

from .generation import GenerationSettings
from .loading import LoadedModel

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"developer": "system"}  # newer OpenAI clients send system prompts as "developer"
MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
SEED_RANGE = (0, 2 ** 63 - 1)  # torch.Generator.manual_seed takes a 64-bit seed
REMOTE_IMAGE_TIMEOUT_S = 10.0
# lmms-eval's `openai` model sends this many requests at once (its num_concurrent default, lmms_eval/models/simple/
# openai.py in 0.7.3): the default queue takes them all while the default single slot is busy.
HARNESS_BURST = 32
SERVER_LOGGER = "minimind.server"  # what the server logs (clients that leave, failed requests) goes here
MIB = 1024 * 1024


# ------------------------------------------------------------------------------------------------ settings

@dataclass
class ServerSettings:
    """What the server accepts and how much work it takes on (the serve_openai_api.py flags)."""
    model_id: str
    generation: GenerationSettings  # defaults for requests that leave temperature, top_p or max_tokens out
    max_total_tokens: int  # prompt + answer tokens, at most
    api_key: str = None  # None: no key needed
    max_concurrency: int = 1
    max_queue: int = HARNESS_BURST
    max_request_bytes: int = 32 * MIB
    max_image_bytes: int = 10 * MIB
    max_image_pixels: int = MAX_IMAGE_PIXELS
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
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not isinstance(url, str) or not url:
                raise bad_request(f"{part_param}.image_url.url must be a data:, file or http(s) URL",
                                  f"{part_param}.image_url")
            urls.append((part_param, url))
            pieces.append(IMAGE_MARKER)
        else:
            raise bad_request(f"{part_param} must be {{\"type\": \"text\", \"text\": ...}} or {{\"type\": "
                              f"\"image_url\", \"image_url\": {{\"url\": ...}}}}", part_param)
    # Parts on their own lines, so images first then the question read as in training ("<image>\nquestion").
    return "\n".join(pieces), urls


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
    room = settings.max_total_tokens - input_ids.shape[1]
    generation = request.settings
    if room < 1 or (request.max_tokens_given and generation.max_new_tokens > room):
        asked = f" plus max_tokens {generation.max_new_tokens}" if request.max_tokens_given else ""
        raise bad_request(f"the prompt is {input_ids.shape[1]} tokens{asked}, over this model's context of "
                          f"{settings.max_total_tokens} tokens (each image counts {loaded.model.image_token_count}); "
                          f"shorten the conversation", "messages", "context_length_exceeded")
    if generation.max_new_tokens > room:
        generation = replace(generation, max_new_tokens=room)
    return input_ids, pixel_values, generation
