"""The one image preprocessing function and the one prompt builder, shared by training, CLI chat and web demo.

Keeping a single path is the point: a model answers well only on inputs prepared exactly as in training.
`preprocess_image` and `expand_image_markers` live in model/processing_minimind_v.py, which exported transformers
folders ship as their processor: the folder prepares inputs with the very same code.
"""
import io
from pathlib import Path

import torch
from PIL import Image

from common import UserError
from model import processing_minimind_v
from model.processing_minimind_v import (DEFAULT_SYSTEM_PROMPT, IMAGE_MARKER, MAX_IMAGE_PIXELS,
                                         MiniMindVImageProcessor, expand_image_markers)

ROLES_BY_PARITY = ("user", "assistant")
CHAT_FORMATS = ("minimind2", "minimind3")  # MiniMind2's template; MiniMind-3's (minimind-3v)
THINK_START, THINK_END = "<think>", "</think>"
EMPTY_THINK_BLOCK = f"{THINK_START}\n\n{THINK_END}\n\n"  # MiniMind-3 opens every answer with it
SYSTEM_ROLE = "system"
# lmms-eval's request after a yes/no or short-answer question (POPE, MME); the demo's synthetic data asks the same.
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
# Bump whenever render_chat's output changes: prepared token caches (dataset/prepared.py) are then rebuilt.
PROMPT_FORMAT_VERSION = 1
# A text-only row of the published parquet data carries one tiny (8x8 black) image and no `<image>` marker.
PLACEHOLDER_MAX_SIDE = 16
PLACEHOLDER_MAX_BYTES = 4096


class ImageError(UserError, processing_minimind_v.ImageError):
    """An image that cannot be used: unreadable, not an image, or too large."""


def open_image(source, max_pixels: int = MAX_IMAGE_PIXELS, name: str = None) -> Image.Image:
    """Open a path, bytes or file object as a decoded PIL image, refusing oversized or broken files.

    `name` is how error messages call the image (default: the path, or "image").
    """
    name = name or (str(source) if isinstance(source, (str, Path)) else "image")
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(f"{name}: {width}x{height} pixels is over the {max_pixels} pixel limit")
        image.load()
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{name}: file not found") from None
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
        raise ImageError(f"{name}: not a readable image ({error})") from None
    return image


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
    except processing_minimind_v.ImageError as error:
        raise ImageError(str(error)) from None


def load_pixel_values(sources, image_processor: MiniMindVImageProcessor,
                      max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Paths/bytes of images -> [N, 3, H, W]."""
    return torch.stack([preprocess_image(open_image(s, max_pixels), image_processor) for s in sources])


def roles_by_parity(turns):
    """Training records: turn i is the user's when i is even, the assistant's when odd (stored roles ignored)."""
    return [{"role": ROLES_BY_PARITY[i % 2], "content": turn["content"]} for i, turn in enumerate(turns)]


def user_content(text: str, num_images: int) -> str:
    """A chat message with its images first, each marker on its own line, then the question."""
    return "".join(f"{IMAGE_MARKER}\n" for _ in range(num_images)) + text


def render_chat(messages, turn_start: str, turn_end: str, add_generation_prompt: bool,
                chat_format: str = "minimind2") -> str:
    """The LM's chat format (CHAT_FORMATS), owned here rather than by whatever tokenizer_config.json was
    downloaded.

    minimind2: a system turn (the first message when it is a system message, else DEFAULT_SYSTEM_PROMPT), then
    `{turn_start}{role}\\n{content}{turn_end}\\n` per message, then `{turn_start}assistant\\n` when asked to.
    minimind3 (the MiniMind-3 tokenizer's template without tools): no default system turn; an assistant turn
    is `{turn_start}assistant\\n<think>\\n{reasoning}\\n</think>\\n\\n{answer}{turn_end}\\n` (the reasoning is
    what a `</think>` in the content closes, usually empty); the generation prompt ends with an empty think block.
    """
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"unknown chat format {chat_format!r}; choose from {CHAT_FORMATS}")
    if messages and messages[0]["role"] == SYSTEM_ROLE:
        system, turns = messages[0]["content"], messages[1:]
    else:
        system, turns = (DEFAULT_SYSTEM_PROMPT if chat_format == "minimind2" else None), messages
    parts = [] if system is None else [f"{turn_start}{SYSTEM_ROLE}\n{system}{turn_end}\n"]
    for m in turns:
        content = m["content"]
        if chat_format == "minimind3" and m["role"] == "assistant":
            reasoning = ""
            if THINK_END in content:
                reasoning = content.split(THINK_END)[0].rstrip("\n").split(THINK_START)[-1].lstrip("\n")
                content = content.split(THINK_END)[-1].lstrip("\n")
            content = f"{THINK_START}\n{reasoning.strip(chr(10))}\n{THINK_END}\n\n{content.lstrip(chr(10))}"
        parts.append(f"{turn_start}{m['role']}\n{content}{turn_end}\n")
    if add_generation_prompt:
        parts.append(f"{turn_start}assistant\n")
        if chat_format == "minimind3":
            parts.append(EMPTY_THINK_BLOCK)
    return "".join(parts)


def build_prompt(tokenizer, messages, image_special_token: str, add_generation_prompt: bool,
                 chat_format: str = "minimind2") -> str:
    """Chat text of `messages` (render_chat) with every `<image>` expanded to its placeholder run."""
    expanded = [{"role": m["role"], "content": expand_image_markers(m["content"], image_special_token)}
                for m in messages]
    return render_chat(expanded, tokenizer.bos_token, tokenizer.eos_token, add_generation_prompt, chat_format)


def chat_template_warning(tokenizer, chat_format: str = "minimind2"):
    """A one-line warning when the tokenizer's own chat template renders chats unlike render_chat, else None."""
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


def load_tokenizer(tokenizer_path):
    """A tokenizer folder (tokenizer.json + tokenizer_config.json), with a hint on how to get a missing one."""
    from transformers import AutoTokenizer

    if not (Path(tokenizer_path) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"tokenizer not found in {tokenizer_path}: run `python -m scripts.download --what "
                                f"tokenizer` (with --preset minimind-3v for MiniMind-3's) or pass --tokenizer_path")
    return AutoTokenizer.from_pretrained(str(tokenizer_path))


def check_tokenizer_matches(tokenizer, config):
    """The tokenizer must encode the model's image placeholder run as the ids the model looks for."""
    ids = tokenizer(config.image_special_token, add_special_tokens=False).input_ids
    if ids != config.image_ids:
        raise ValueError(f"the tokenizer encodes the image placeholder as {ids[:3]}... (x{len(ids)}), the model "
                         f"expects id {config.image_ids[0]} x{len(config.image_ids)}: use the tokenizer the model was "
                         f"trained with (MiniMind2's for minimind2-v, MiniMind-3's for minimind-3v)")
