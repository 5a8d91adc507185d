"""The one image preprocessing function and the one prompt builder, shared by training, CLI chat, web demo, API
and benchmarks.

Keeping a single path is the point: a model answers well only on inputs prepared exactly as in training.
`open_image`, `preprocess_image`, `expand_image_markers` and the chat templates live in
model/processing_minimind_v.py, which exported transformers folders ship as their processor: the folder prepares
inputs with the very same code. Here they get the project's ImageError (one line at the command line).
"""
import functools
import io
from pathlib import Path

import torch
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from PIL import Image

from common import UserError
from model import processing_minimind_v
from model.model_hf_vlm import TOKENIZER_CHAT_FORMAT
from model.processing_minimind_v import (CHAT_TEMPLATES, IMAGE_MARKER, MAX_IMAGE_PIXELS, MiniMindVImageProcessor,
                                         expand_image_markers)

ROLES_BY_PARITY = ("user", "assistant")
# minimind2: MiniMind2's template; minimind3: MiniMind-3's (minimind-3v); tokenizer: the LM tokenizer's own
# chat template (a transformers LM, model/model_hf_vlm.py).
CHAT_FORMATS = tuple(CHAT_TEMPLATES) + (TOKENIZER_CHAT_FORMAT,)
# The answer of the probe conversation that finds a template's assistant-turn markers (assistant_turn_markers).
PROBE_ANSWER = "A"
SYSTEM_ROLE = "system"
# lmms-eval's request after a yes/no or short-answer question (POPE, MME); the demo's synthetic data asks the same.
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
# Bump whenever a chat template's output changes: prepared token caches (dataset/prepared.py) are then rebuilt.
PROMPT_FORMAT_VERSION = 1
# A text-only row of the published parquet data carries one tiny (8x8 black) image and no `<image>` marker.
PLACEHOLDER_MAX_SIDE = 16
PLACEHOLDER_MAX_BYTES = 4096


class ImageError(UserError):
    """An image that cannot be used: unreadable, not an image, or too large."""


def open_image(source, max_pixels: int = MAX_IMAGE_PIXELS, name: str = None) -> Image.Image:
    """A path, bytes or file object as a decoded PIL image (model/processing_minimind_v.py open_image), refusing
    oversized or broken files with ImageError (a UserError: one line at the command line). `name` is how error
    messages call the image (default: the path, or "image")."""
    try:
        return processing_minimind_v.open_image(source, max_pixels, name)
    except ValueError as error:
        raise ImageError(str(error)) from None


def image_processor_for(config) -> MiniMindVImageProcessor:
    """The one image processor of a model config (its encoder folder's preprocessing)."""
    return MiniMindVImageProcessor(image_processing=config.image_processing)


def preprocess_image(image: Image.Image, image_processor: MiniMindVImageProcessor,
                     normalize: bool = True) -> torch.Tensor:
    """PIL image (any mode) -> encoder input [3, H, W] float32 (image_processor_for(config)), or uint8 pixels with
    normalize=False (for `image_processor.normalize` on the device), with the project's ImageError (a UserError:
    one line at the command line) for an unusable image."""
    try:
        return image_processor.pixels(image, normalize)
    except ValueError as error:  # an image mode PIL cannot convert, an aspect ratio too extreme to resize
        raise ImageError(str(error)) from None


def load_pixel_values(sources, image_processor: MiniMindVImageProcessor,
                      max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Paths/bytes of images -> [N, 3, H, W]."""
    return torch.stack([preprocess_image(open_image(s, max_pixels), image_processor) for s in sources])


def user_content(text: str, num_images: int) -> str:
    """A chat message with its images first, each marker on its own line, then the question."""
    return "".join(f"{IMAGE_MARKER}\n" for _ in range(num_images)) + text


def refuse_to_render(message: str):
    """`raise_exception` inside a chat template, as transformers provides it."""
    raise TemplateError(message)


@functools.lru_cache(maxsize=None)
def compiled_chat_template(chat_format: str):
    """The chat format's template (model/processing_minimind_v.py CHAT_TEMPLATES), compiled once in the sandbox
    transformers renders chat templates in, so a prompt here and one from an exported folder are the same text."""
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"unknown chat format {chat_format!r}; choose from {CHAT_FORMATS}")
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = refuse_to_render
    return environment.from_string(CHAT_TEMPLATES[chat_format])


def render_chat(messages, turn_start: str, turn_end: str, add_generation_prompt: bool,
                chat_format: str = "minimind2") -> str:
    """`messages` ({"role", "content"}) in the LM's chat format (CHAT_FORMATS), rendered from its one template
    rather than whatever tokenizer_config.json was downloaded; turn_start / turn_end are the tokenizer's bos and
    eos tokens."""
    return compiled_chat_template(chat_format).render(messages=messages, bos_token=turn_start, eos_token=turn_end,
                                                      add_generation_prompt=add_generation_prompt)


def render_prompt(tokenizer, messages, add_generation_prompt: bool, chat_format: str = "minimind2") -> str:
    """`messages` in `chat_format`: render_chat for the MiniMind formats, the tokenizer's own chat template for
    TOKENIZER_CHAT_FORMAT."""
    if chat_format == TOKENIZER_CHAT_FORMAT:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return render_chat(messages, tokenizer.bos_token, tokenizer.eos_token, add_generation_prompt, chat_format)


def build_prompt(tokenizer, messages, image_special_token: str, add_generation_prompt: bool,
                 chat_format: str = "minimind2") -> str:
    """Chat text of `messages` (render_prompt) with every `<image>` expanded to its placeholder run."""
    expanded = [{"role": m["role"], "content": expand_image_markers(m["content"], image_special_token)}
                for m in messages]
    return render_prompt(tokenizer, expanded, add_generation_prompt, chat_format)


def assistant_turn_markers(tokenizer, chat_format: str = "minimind2") -> tuple:
    """(start, end): the text right before each assistant answer and right after it; training supervises the
    answer and `end`. The MiniMind formats: `<|im_start|>assistant\n` and `<|im_end|>\n` (upstream's span, so
    MiniMind-3's think block is trained). The tokenizer's own template: found by rendering a probe chat, the user
    turn with and without the generation prompt (start = what the prompt adds), then with an answer (end = what
    follows it); a template that does not render a turn as prompt + answer + end gets a one-line error."""
    if chat_format != TOKENIZER_CHAT_FORMAT:
        return f"{tokenizer.bos_token}assistant\n", f"{tokenizer.eos_token}\n"
    question = [{"role": "user", "content": "Q"}]
    without = render_prompt(tokenizer, question, False, chat_format)
    prompt = render_prompt(tokenizer, question, True, chat_format)
    full = render_prompt(tokenizer, question + [{"role": "assistant", "content": PROBE_ANSWER}], False, chat_format)
    if not prompt.startswith(without) or not full.startswith(prompt + PROBE_ANSWER) or \
            len(full) == len(prompt + PROBE_ANSWER) or prompt == without:
        raise UserError(f"{tokenizer.name_or_path}: its chat template does not render an assistant turn as the "
                        f"generation prompt + the answer + an end marker, so the answers to train on cannot be "
                        f"found; use an LM whose tokenizer has such a template (ChatML, Llama 3, ...)")
    return prompt[len(without):], full[len(prompt) + len(PROBE_ANSWER):]


def chat_template_warning(tokenizer, chat_format: str = "minimind2"):
    """A one-line warning when the tokenizer's own chat template renders chats unlike render_chat, else None
    (always None for TOKENIZER_CHAT_FORMAT: that template is the format)."""
    if chat_format == TOKENIZER_CHAT_FORMAT:
        return None
    chat = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "R"}]
    probes = [(chat, False), (chat, True), ([{"role": SYSTEM_ROLE, "content": "S"}] + chat, True)]
    for messages, add_generation_prompt in probes:
        ours = render_chat(messages, tokenizer.bos_token, tokenizer.eos_token, add_generation_prompt, chat_format)
        try:
            theirs = tokenizer.apply_chat_template(messages, tokenize=False,
                                                   add_generation_prompt=add_generation_prompt)
        except Exception:  # noqa: BLE001 - no template, or a broken one: either way it differs
            theirs = None
        if theirs != ours:
            return (f"warning: the tokenizer's chat template renders chats differently from the {chat_format} "
                    f"format; training and chat use that format (dataset/processing.py render_chat) regardless")
    return None


def is_placeholder_image(data) -> bool:
    """True for the tiny stand-in image of a text-only row (at most PLACEHOLDER_MAX_SIDE pixels a side)."""
    if not isinstance(data, (bytes, bytearray)) or len(data) > PLACEHOLDER_MAX_BYTES:
        return False
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            return max(image.size) <= PLACEHOLDER_MAX_SIDE
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def count_image_markers(messages) -> int:
    return sum(m["content"].count(IMAGE_MARKER) for m in messages)


def load_tokenizer(tokenizer_path, config=None):
    """A tokenizer folder (tokenizer.json + tokenizer_config.json), with a hint on how to get a missing one. For a
    model `config` that reads the tokenizer's own chat template (a transformers LM), with the model's image
    placeholder token added where the tokenizer lacks it (processing_minimind_v.add_image_placeholder)."""
    from transformers import AutoTokenizer

    if not (Path(tokenizer_path) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"tokenizer not found in {tokenizer_path}: run `python -m scripts.download --what "
                                f"tokenizer` (with --preset minimind-3v for MiniMind-3's) or pass --tokenizer_path")
    # trust_remote_code=False: an exported folder's config.json maps AutoModel to its own code, and transformers
    # 5.x would stop to ask whether to run it; the tokenizer itself is a stock class.
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path), trust_remote_code=False)
    if config is not None and config.chat_format == TOKENIZER_CHAT_FORMAT:
        processing_minimind_v.add_image_placeholder(
            tokenizer, processing_minimind_v.placeholder_unit(config.image_special_token))
    return tokenizer


def check_tokenizer_matches(tokenizer, config):
    """The tokenizer must encode the model's image placeholder run as the ids the model looks for."""
    ids = tokenizer(config.image_special_token, add_special_tokens=False).input_ids
    if ids != config.image_ids:
        raise ValueError(f"the tokenizer encodes the image placeholder as {ids[:3]}... (x{len(ids)}), the model "
                         f"expects id {config.image_ids[0]} x{len(config.image_ids)}: use the tokenizer the model was "
                         f"trained with (MiniMind2's for minimind2-v, MiniMind-3's for minimind-3v)")
