"""MiniMind-V's image opening and preprocessing, image-marker expansion and chat formats, plus the transformers
processor.

The one home of `open_image`, `preprocess_image`, `expand_image_markers` and the chat templates: dataset/processing.py
imports them for training, chat, web demo, API and benchmarks, and scripts/convert_vlm.py ships this file in exported
folders, where `AutoProcessor.from_pretrained(dir, trust_remote_code=True)` builds `MiniMindVProcessor` from it. So a
folder prepares images and prompts with the same code as training. Shipped files are loaded without this repo, and
transformers 4.x copies only a remote module's direct relative imports: this one imports torch, numpy, PIL,
transformers and compat.py (which imports nothing of the project). The model's facts (its preprocessing, placeholder,
run length) stay in its config and reach the folder's processor through processor_config.json and
preprocessor_config.json.
"""
import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ProcessorMixin

from .compat import PROCESSOR_CLASS_ATTRIBUTES

IMAGE_MARKER = "<image>"  # where an image goes in a conversation's text
# openai/clip-vit-base-patch16 preprocessor_config.json: normalisation constants.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
CLIP_IMAGE_SIZE = 224
PREPROCESSOR_CONFIG = "preprocessor_config.json"
# An image preprocessing, as a model config stores it (read_image_processing reads it off an encoder folder):
#   resize "shortest_edge" (size: int, the short side) or "exact" (size: [height, width]); crop_size [h, w] or
#   None (centre crop); resample a PIL filter number; rescale_factor; image_mean / image_std per channel.
CLIP_IMAGE_PROCESSING = {"resize": "shortest_edge", "size": CLIP_IMAGE_SIZE,
                         "crop_size": [CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE], "resample": int(Image.BICUBIC),
                         "rescale_factor": 1 / 255, "image_mean": CLIP_MEAN.tolist(), "image_std": CLIP_STD.tolist()}
# transformers' defaults for keys a folder's preprocessor_config.json leaves out, by image processor family.
SIGLIP_PROCESSOR_DEFAULTS = {"resize": "exact", "size": [224, 224], "crop_size": None, "resample": int(Image.BICUBIC),
                             "rescale_factor": 1 / 255, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
# Decompression-bomb guard: refuse images with more pixels than this before decoding them.
MAX_IMAGE_PIXELS = 50_000_000
FULLWIDTH_OFFSET = 0xFEE0  # printable ASCII -> its full-width twin: '@' -> '＠' (U+FF20), '<' -> '＜' (U+FF1C)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant"  # MiniMind2's, when a chat has no system turn
REMOTE_IMAGE_PREFIXES = ("http://", "https://", "data:")

# MiniMind's turn markers (both generations): its tokenizer's bos and eos tokens, ids 1 and 2.
BOS_TOKEN, EOS_TOKEN = "<|im_start|>", "<|im_end|>"

# The chat formats, the one home of each: dataset/processing.py render_chat renders them for training, chat, API
# and benchmarks, exported folders ship them (chat_template.json) and the offline tokenizer stand-ins carry them.
# Message content is a string or a list of {"type": "text", "text": ...} and {"type": "image"} parts; parts are
# joined with newlines and each image part becomes IMAGE_MARKER, so [image, text] renders as "<image>\nWhat is
# it?", as the project's own chats do (MiniMindVProcessor.__call__ then expands each marker to its placeholder run).
RENDER_PARTS_MACRO = (
    "{%- macro render_parts(parts) -%}{%- for part in parts -%}"
    "{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{%- if part['type'] == 'image' -%}{{ '" + IMAGE_MARKER + "' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- else -%}{{ raise_exception('MiniMind-V reads text and image parts only, not ' + part['type']) }}"
    "{%- endif -%}{%- endfor -%}{%- endmacro -%}"
)


def rendered_content(content: str) -> str:
    """Jinja expression of a message's content: a string as it is, parts through the macro (a macro call costs
    more than the rest of a turn: training renders every sample)."""
    return f"({content} if {content} is string else render_parts({content}))"


# MiniMind2's (its tokenizer's template without tools): a system turn (the first message when it is a system
# message, else DEFAULT_SYSTEM_PROMPT), then `{bos}{role}\n{content}{eos}\n` per message, then `{bos}assistant\n`
# for a generation prompt (followed by an empty think block when enable_thinking is passed as false, as in
# MiniMind2's own template).
CHAT_TEMPLATE = RENDER_PARTS_MACRO + (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_content = " + rendered_content("messages[0]['content']") + " -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_content = '" + DEFAULT_SYSTEM_PROMPT + "' -%}{%- set turns = messages -%}"
    "{%- endif -%}"
    "{{ bos_token + 'system\\n' + system_content + eos_token + '\\n' }}"
    "{%- for message in turns -%}"
    "{{ bos_token + message['role'] + '\\n' + " + rendered_content("message['content']") + " + eos_token + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ bos_token + 'assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}"
    "{%- endif -%}"
)
# MiniMind-3's (the MiniMind-3 tokenizer's template without tools, whose own template renders list-typed content
# as ''): no default system turn; an assistant turn opens with a think block (`<think>\n{reasoning}\n</think>\n\n`,
# the reasoning being what a `</think>` in the content closes, usually empty), and the generation prompt ends with
# an empty one.
MINIMIND3_CHAT_TEMPLATE = RENDER_PARTS_MACRO + (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{ bos_token + 'system\\n' + " + rendered_content("messages[0]['content']") + " + eos_token + '\\n' }}"
    "{%- set turns = messages[1:] -%}{%- else -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- set content = " + rendered_content("message['content']") + " -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- set reasoning = '' -%}"
    "{%- if '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{%- set content = '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') -%}"
    "{%- endif -%}"
    "{{ bos_token + message['role'] + '\\n' + content + eos_token + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ bos_token + 'assistant\\n<think>\\n\\n</think>\\n\\n' }}{%- endif -%}"
)


def with_image_parts(chat_template: str) -> str:
    """A transformers LM tokenizer's own chat template (which reads string content) that also takes content as
    image and text parts: each message's parts are first joined as the MiniMind formats join them (`<image>` per
    image part), then the template renders the messages as it always does."""
    return RENDER_PARTS_MACRO + (
        "{%- set flattened = namespace(messages=[]) -%}{%- for message in messages -%}"
        "{%- set flattened.messages = flattened.messages + [dict(message, content="
        + rendered_content("message['content']") + ")] -%}"
        "{%- endfor -%}{%- set messages = flattened.messages -%}") + chat_template


# A model config's chat_format -> its template.
CHAT_TEMPLATES = {"minimind2": CHAT_TEMPLATE, "minimind3": MINIMIND3_CHAT_TEMPLATE}


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
        raise ValueError(f"{image.mode} image: {error}") from None


def read_image_processing(folder) -> dict:
    """The preprocessing that an encoder folder's preprocessor_config.json describes (the fields of
    CLIP_IMAGE_PROCESSING), with transformers' defaults for what it leaves out; {} for a folder without one."""
    path = Path(folder) / PREPROCESSOR_CONFIG
    if not path.is_file():
        return {}
    config = json.loads(path.read_text(encoding="utf-8"))
    kind = config.get("image_processor_type", "")
    base = dict(SIGLIP_PROCESSOR_DEFAULTS if kind.lower().startswith("siglip") else CLIP_IMAGE_PROCESSING)
    size = config.get("size", base["size"] if base["resize"] == "shortest_edge" else None)
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if size is None:
        pass
    elif "shortest_edge" in size:
        base.update(resize="shortest_edge", size=int(size["shortest_edge"]))
    elif "height" in size and "width" in size:
        base.update(resize="exact", size=[int(size["height"]), int(size["width"])])
    else:
        raise ValueError(f"{path}: size {size} is neither a shortest edge nor a height and width")
    if "do_center_crop" in config or "crop_size" in config:
        crop = config.get("crop_size") if config.get("do_center_crop", True) else None
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        base["crop_size"] = [int(crop["height"]), int(crop["width"])] if crop else None
    if "resample" in config:
        base["resample"] = int(config["resample"])
    base["rescale_factor"] = float(config.get("rescale_factor", base["rescale_factor"])) \
        if config.get("do_rescale", True) else 1.0
    if config.get("do_normalize", True):
        base["image_mean"] = [float(v) for v in config.get("image_mean", base["image_mean"])]
        base["image_std"] = [float(v) for v in config.get("image_std", base["image_std"])]
    else:
        base["image_mean"], base["image_std"] = [0.0] * 3, [1.0] * 3
    return base


def output_size(processing: dict) -> tuple:
    """(height, width) of the pixels `preprocess_image` makes with `processing`."""
    if processing.get("crop_size"):
        return tuple(processing["crop_size"])
    if processing["resize"] == "exact":
        return tuple(processing["size"])
    raise ValueError("a shortest-edge resize without a crop gives images of varying shape")


def preprocess_image(image: Image.Image, processing: dict, normalize: bool = True) -> torch.Tensor:
    """PIL image (any mode) -> encoder input [3, H, W] float32, with the steps of transformers' PIL image
    processors (CLIPImageProcessor, SiglipImageProcessor) as `processing` configures them: RGB; resize, either
    the shortest side to `size` (long side truncated) or to exactly `size`; centre crop if `crop_size`; rescale;
    normalise with image_mean / image_std (`normalize_pixels`). normalize=False stops before the last two steps
    and returns the uint8 pixels [3, H, W]: training sends those between processes and to the device (a quarter
    of the bytes) and calls `normalize_pixels` there.
    """
    image = to_rgb(image)
    width, height = image.size
    if processing["resize"] == "exact":
        new_height, new_width = processing["size"]
    else:
        size = processing["size"]
        if width <= height:
            new_width, new_height = size, int(size * height / width)
        else:
            new_width, new_height = int(size * width / height), size
    if new_width * new_height > MAX_IMAGE_PIXELS:  # a 1 x 100000 strip would be resized to 224 x 22 million
        raise ValueError(f"{width}x{height} pixels: aspect ratio too extreme to resize")
    image = image.resize((new_width, new_height), resample=Image.Resampling(processing["resample"]))
    pixels = np.asarray(image, dtype=np.uint8)  # [h, w, 3]
    if processing.get("crop_size"):
        crop_height, crop_width = processing["crop_size"]
        top, left = (new_height - crop_height) // 2, (new_width - crop_width) // 2
        pixels = pixels[top:top + crop_height, left:left + crop_width]
    pixels = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # [3, H, W]
    return normalize_pixels(pixels, processing) if normalize else pixels


def normalize_pixels(pixels: torch.Tensor, processing: dict) -> torch.Tensor:
    """uint8 pixels [..., 3, H, W] -> float32 encoder input of the same shape, on the pixels' device: rescaled
    and normalised with `processing`'s image_mean / image_std."""
    mean = torch.tensor(processing["image_mean"], dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(processing["image_std"], dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    # In place on one fresh float copy: a third of the time of the four temporaries, the same values.
    normalized = pixels.to(torch.float32, copy=True)
    return normalized.mul_(np.float32(processing["rescale_factor"])).sub_(mean).div_(std)


def placeholder_unit(image_special_token: str) -> str:
    """The repeated piece of a placeholder run: '@' of 196 '@', `<|image_pad|>` of 64 of them."""
    for length in range(1, len(image_special_token) + 1):
        unit = image_special_token[:length]
        if len(image_special_token) % length == 0 and unit * (len(image_special_token) // length) == \
                image_special_token:
            return unit
    return image_special_token


def expand_image_markers(text: str, image_special_token: str) -> str:
    """Replace each `<image>` with the placeholder run (196 '@' or 64 `<|image_pad|>`) the model overwrites
    with image features.

    A literal placeholder in the text (an e-mail address's '@', a typed `<|image_pad|>`) would merge into or
    mimic an image run, so its first character is written as its full-width twin first.
    """
    unit = placeholder_unit(image_special_token)
    if unit[0].isascii() and unit[0].isprintable() and unit[0] != " ":
        text = text.replace(unit, chr(ord(unit[0]) + FULLWIDTH_OFFSET) + unit[1:])
    # Two markers side by side would make one run of twice the length; a newline keeps the images apart.
    text = text.replace(IMAGE_MARKER + IMAGE_MARKER, IMAGE_MARKER + "\n" + IMAGE_MARKER)
    text = text.replace(IMAGE_MARKER + IMAGE_MARKER, IMAGE_MARKER + "\n" + IMAGE_MARKER)  # chains of 3 or more
    return text.replace(IMAGE_MARKER, image_special_token)


def flatten_images(images) -> list:
    """One image, a list of images or a per-sample list of lists -> a flat list in reading order."""
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        return [images]
    return [image for item in images for image in flatten_images(item)]


def open_image(source, max_pixels: int = MAX_IMAGE_PIXELS, name: str = None) -> Image.Image:
    """The one image opener: a path, bytes or a file object -> a decoded PIL image (no EXIF rotation), refusing one
    of more than `max_pixels` pixels before decoding it. ValueError naming the image (`name`; default: the path,
    or "image") for a missing, unreadable or oversized one."""
    name = name or (str(source) if isinstance(source, (str, os.PathLike)) else "image")
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        too_large = image.width * image.height > max_pixels
        if not too_large:
            image.load()
    except FileNotFoundError:
        raise ValueError(f"{name}: file not found") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"{name}: not a readable image ({error})") from None
    if too_large:
        raise ValueError(f"{name}: {image.width}x{image.height} pixels is over the {max_pixels} pixel limit")
    return image


def load_image_source(source) -> Image.Image:
    """A PIL image as given; a local path through `open_image`; an http(s) or base64 data URL through
    transformers' loader."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (str, os.PathLike)) and not str(source).startswith(REMOTE_IMAGE_PREFIXES):
        return open_image(source)
    if isinstance(source, str):
        from transformers.image_utils import load_image

        return load_image(source)
    raise ValueError(f"an image must be a PIL image, a file path or an http(s)/data URL, not {type(source).__name__}")


class MiniMindVImageProcessor(BaseImageProcessor):
    """The one image processor: built from a model config's `image_processing` (the encoder folder's
    preprocessing), it serves training, chat, web, API, benchmarks, the feature cache and exported folders.
    Images (PIL, paths or URLs; one, a list, or a list per sample) -> pixel_values [M, 3, H, W], made by
    `preprocess_image`. An older exported folder gives only image_size: CLIP's preprocessing at that size."""

    model_input_names = ["pixel_values"]

    def __init__(self, image_size: int = None, image_processing: dict = None, **kwargs):
        if image_processing is None:
            if image_size is None:
                raise ValueError("MiniMindVImageProcessor needs image_processing (the vision encoder's "
                                 "preprocessing): preprocessor_config.json is missing it")
            image_processing = {**CLIP_IMAGE_PROCESSING, "size": image_size, "crop_size": [image_size, image_size]}
        super().__init__(**kwargs)
        self.image_processing = dict(image_processing)
        self.image_size = output_size(self.image_processing)[0]

    @property
    def pixel_shape(self) -> tuple:
        """(3, H, W) of one preprocessed image."""
        return (3,) + output_size(self.image_processing)

    def pixels(self, image: Image.Image, normalize: bool = True) -> torch.Tensor:
        """One PIL image -> [3, H, W] float32, or uint8 with normalize=False (then `normalize` on the device)."""
        return preprocess_image(image, self.image_processing, normalize)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels [..., 3, H, W] from pixels(normalize=False) -> the encoder's float32 input."""
        return normalize_pixels(pixels, self.image_processing)

    def preprocess(self, images, return_tensors=None, **kwargs):
        sources = flatten_images(images)
        if not sources:
            raise ValueError("no images given")
        pixels = torch.stack([self.pixels(load_image_source(s)) for s in sources])
        return BatchFeature({"pixel_values": pixels}, tensor_type=return_tensors)


def add_image_placeholder(tokenizer, token: str) -> int:
    """The id of the image placeholder `token` in `tokenizer`, added as a special token when the tokenizer lacks it
    (a transformers LM's tokenizer; it then goes right after the last entry, the same id on every load)."""
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([token], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(token)


class MiniMindVProcessor(ProcessorMixin):
    """Tokenizer + MiniMindVImageProcessor. Text carries one `<image>` per image (the chat template writes one per
    {"type": "image"} part); each becomes the run of `image_seq_length` `image_placeholder` characters the model
    fills with that image's features (both from the model's config: scripts/convert_vlm.py writes them into
    processor_config.json). Returns input_ids, attention_mask and (with images) pixel_values [M, 3, H, W]."""

    attributes = ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_placeholder=None,
                 image_seq_length=None):
        if image_placeholder is None or image_seq_length is None:
            raise ValueError("MiniMindVProcessor needs image_placeholder and image_seq_length (the model config's "
                             "image_special_token): processor_config.json is missing them")
        self.image_placeholder = image_placeholder
        self.image_seq_length = image_seq_length
        if tokenizer is not None:  # a transformers LM's tokenizer, shipped as its folder had it
            add_image_placeholder(tokenizer, image_placeholder)
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)

    @property
    def image_special_token(self) -> str:
        return self.image_placeholder * self.image_seq_length

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs):
        if videos is not None or audio is not None:
            raise ValueError("MiniMind-V reads images and text only")
        sources = flatten_images(images)
        return_tensors = kwargs.pop("return_tensors", None)
        image_kwargs = kwargs.pop("images_kwargs", {})
        text_kwargs = {**kwargs.pop("text_kwargs", {}), **kwargs}
        data = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            markers = sum(t.count(IMAGE_MARKER) for t in texts)
            if markers != len(sources):
                raise ValueError(f"{len(sources)} image(s) but {markers} {IMAGE_MARKER} marker(s) in the text: put "
                                 f"one {IMAGE_MARKER} where each image goes, or use the chat format with "
                                 f'{{"type": "image"}} parts')
            expanded = [expand_image_markers(t, self.image_special_token) for t in texts]
            # token_type_ids would reach the model's forward, which has no use for them.
            data.update(self.tokenizer(expanded, return_tensors=return_tensors, return_token_type_ids=False,
                                       **text_kwargs))
        if sources:
            data.update(self.image_processor(sources, return_tensors=return_tensors, **image_kwargs))
        return BatchFeature(data, tensor_type=return_tensors)


for _name, _value in PROCESSOR_CLASS_ATTRIBUTES.items():  # transformers 4.x only (model/compat.py)
    setattr(MiniMindVProcessor, _name, _value)
