"""The one image preprocessing function and the one prompt builder, shared by training, CLI chat and web demo.

Keeping a single path is the point: a model answers well only on inputs prepared exactly as in training.
"""
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import UserError

IMAGE_MARKER = "<image>"  # where an image goes in a conversation's text
CLIP_IMAGE_SIZE = 224
# openai/clip-vit-base-patch16 preprocessor_config.json: normalisation constants.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
# Decompression-bomb guard: refuse images with more pixels than this before decoding them.
MAX_IMAGE_PIXELS = 50_000_000
ROLES_BY_PARITY = ("user", "assistant")
SYSTEM_ROLE = "system"
# MiniMind2's chat template: the system turn it adds when a chat has none (no final period, as in MiniMind2).
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant"
# Bump whenever render_chat's output changes: prepared token caches (dataset/prepared.py) are then rebuilt.
PROMPT_FORMAT_VERSION = 1
# A text-only row of the published parquet data carries one tiny (8x8 black) image and no `<image>` marker.
PLACEHOLDER_MAX_SIDE = 16
PLACEHOLDER_MAX_BYTES = 4096
FULLWIDTH_TWIN = {"@": "\uff20"}  # '@' -> '＠' (U+FF20), which the tokenizer keeps apart from id 34


class ImageError(UserError):
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


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB. High-bit-depth greyscale is scaled down rather than clipped."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        if image.mode == "I" and array.max() <= 255:
            peak = 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "La":  # premultiplied alpha: PIL converts it only to LA
        image = image.convert("LA")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ImageError(f"{image.mode} image: {error}") from None


def preprocess_image(image: Image.Image, size: int = CLIP_IMAGE_SIZE) -> torch.Tensor:
    """PIL image (any mode) -> CLIP input [3, size, size] float32.

    Same steps as CLIPImageProcessor: RGB; shortest side to `size` (bicubic, long side truncated); centre
    crop; scale to [0, 1]; normalise with the CLIP mean/std.
    """
    image = to_rgb(image)
    width, height = image.size
    if width <= height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    if new_width * new_height > MAX_IMAGE_PIXELS:  # a 1 x 100000 strip would be resized to 224 x 22 million
        raise ImageError(f"{width}x{height} pixels: aspect ratio too extreme to resize")
    image = image.resize((new_width, new_height), resample=Image.BICUBIC)
    top, left = (new_height - size) // 2, (new_width - size) // 2
    pixels = np.asarray(image, dtype=np.float32)[top:top + size, left:left + size]  # [size, size, 3]
    pixels = (pixels * np.float32(1 / 255) - CLIP_MEAN) / CLIP_STD
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # [3, size, size]


def load_pixel_values(sources, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Paths/bytes of images -> [N, 3, 224, 224]."""
    return torch.stack([preprocess_image(open_image(s, max_pixels)) for s in sources])


def expand_image_markers(text: str, image_special_token: str) -> str:
    """Replace each `<image>` with the placeholder run (196 '@') the model overwrites with image features.

    A literal placeholder character in the text (an e-mail address, say) would merge into or mimic an image
    run, so it is written as its full-width twin first.
    """
    for char in set(image_special_token):
        text = text.replace(char, FULLWIDTH_TWIN.get(char, char))
    # Two markers side by side would make one run of twice the length; a newline keeps the images apart.
    text = text.replace(IMAGE_MARKER + IMAGE_MARKER, IMAGE_MARKER + "\n" + IMAGE_MARKER)
    text = text.replace(IMAGE_MARKER + IMAGE_MARKER, IMAGE_MARKER + "\n" + IMAGE_MARKER)  # chains of 3 or more
    return text.replace(IMAGE_MARKER, image_special_token)


def roles_by_parity(turns):
    """Training records: turn i is the user's when i is even, the assistant's when odd (stored roles ignored)."""
    return [{"role": ROLES_BY_PARITY[i % 2], "content": turn["content"]} for i, turn in enumerate(turns)]


def user_content(text: str, num_images: int) -> str:
    """A chat message with its images first, each marker on its own line, then the question."""
    return "".join(f"{IMAGE_MARKER}\n" for _ in range(num_images)) + text


def render_chat(messages, turn_start: str, turn_end: str, add_generation_prompt: bool) -> str:
    """MiniMind2's chat format, owned here rather than by whatever tokenizer_config.json was downloaded.

    A system turn (the first message when it is a system message, else DEFAULT_SYSTEM_PROMPT), then
    `{turn_start}{role}\\n{content}{turn_end}\\n` per message, then `{turn_start}assistant\\n` when asked to.
    """
    if messages and messages[0]["role"] == SYSTEM_ROLE:
        system, turns = messages[0]["content"], messages[1:]
    else:
        system, turns = DEFAULT_SYSTEM_PROMPT, messages
    parts = [f"{turn_start}{SYSTEM_ROLE}\n{system}{turn_end}\n"]
    parts += [f"{turn_start}{m['role']}\n{m['content']}{turn_end}\n" for m in turns]
    if add_generation_prompt:
        parts.append(f"{turn_start}assistant\n")
    return "".join(parts)


def build_prompt(tokenizer, messages, image_special_token: str, add_generation_prompt: bool) -> str:
    """Chat text of `messages` (render_chat) with every `<image>` expanded to its placeholder run."""
    expanded = [{"role": m["role"], "content": expand_image_markers(m["content"], image_special_token)}
                for m in messages]
    return render_chat(expanded, tokenizer.bos_token, tokenizer.eos_token, add_generation_prompt)


def chat_template_warning(tokenizer):
    """A one-line warning when the tokenizer's own chat template renders chats unlike render_chat, else None."""
    chat = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "R"}]
    probes = [(chat, False), (chat, True), ([{"role": SYSTEM_ROLE, "content": "S"}] + chat, True)]
    for messages, add_generation_prompt in probes:
        ours = render_chat(messages, tokenizer.bos_token, tokenizer.eos_token, add_generation_prompt)
        try:
            theirs = tokenizer.apply_chat_template(messages, tokenize=False,
                                                   add_generation_prompt=add_generation_prompt)
        except Exception:  # noqa: BLE001 - no template, or a broken one: either way it differs
            theirs = None
        if theirs != ours:
            return ("warning: the tokenizer's chat template renders chats differently from MiniMind2's format; "
                    "training and chat use MiniMind2's format (dataset/processing.py render_chat) regardless")
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
                                f"tokenizer` or pass --tokenizer_path")
    return AutoTokenizer.from_pretrained(str(tokenizer_path))


def check_tokenizer_matches(tokenizer, config):
    """The tokenizer must encode the model's image placeholder run as the ids the model looks for."""
    ids = tokenizer(config.image_special_token, add_special_tokens=False).input_ids
    if ids != config.image_ids:
        raise ValueError(f"the tokenizer encodes the image placeholder as {ids[:3]}... (x{len(ids)}), the model "
                         f"expects id {config.image_ids[0]} x{len(config.image_ids)}: use the MiniMind2 tokenizer")
