"""MiniMind-V's image preprocessing, image-marker expansion and chat format, plus the transformers processor.

The one home of `preprocess_image` and `expand_image_markers`: dataset/processing.py imports them for training,
chat, web demo and API, and scripts/convert_vlm.py ships this file in exported folders, where
`AutoProcessor.from_pretrained(dir, trust_remote_code=True)` builds `MiniMindVProcessor` from it. So a folder
prepares images and prompts with the same code as training. Shipped files are loaded without this repo, and
transformers 4.x copies only a remote module's direct relative imports: this one imports torch, numpy, PIL,
transformers and compat.py (which imports nothing of the project). The model's facts (image size, placeholder, run length) stay in model_vlm.py and reach the
folder's processor through processor_config.json and preprocessor_config.json.
"""
import os

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
# Decompression-bomb guard: refuse images with more pixels than this before decoding them.
MAX_IMAGE_PIXELS = 50_000_000
FULLWIDTH_TWIN = {"@": "\uff20"}  # '@' -> '＠' (U+FF20), which the tokenizer keeps apart from id 34
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant"  # MiniMind2's, when a chat has no system turn
REMOTE_IMAGE_PREFIXES = ("http://", "https://", "data:")

# MiniMind2's chat format (the tokenizer's template without tools) for messages whose content is a string or a
# list of {"type": "text", "text": ...} and {"type": "image"} parts. Parts are joined with newlines and each image
# part becomes IMAGE_MARKER, so [image, text] renders as "<image>\nWhat is it?", as the project's own chats do;
# MiniMindVProcessor.__call__ then expands each marker to the placeholder run.
CHAT_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{%- if part['type'] == 'image' -%}{{ '" + IMAGE_MARKER + "' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- else -%}{{ raise_exception('MiniMind-V reads text and image parts only, not ' + part['type']) }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_content = render_content(messages[0]['content']) -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_content = '" + DEFAULT_SYSTEM_PROMPT + "' -%}{%- set turns = messages -%}"
    "{%- endif -%}"
    "{{ bos_token + 'system\\n' + system_content + eos_token + '\\n' }}"
    "{%- for message in turns -%}"
    "{{ bos_token + message['role'] + '\\n' + render_content(message['content']) + eos_token + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ bos_token + 'assistant\\n' }}{%- endif -%}"
)


class ImageError(ValueError):
    """An image that cannot be used: unreadable, not an image, or too large."""


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


def preprocess_image(image: Image.Image, size: int, normalize: bool = True) -> torch.Tensor:
    """PIL image (any mode) -> CLIP input [3, size, size] float32.

    Same steps as CLIPImageProcessor: RGB; shortest side to `size` (bicubic, long side truncated); centre
    crop; scale to [0, 1]; normalise with the CLIP mean/std (`normalize_pixels`). normalize=False stops before
    the last two steps and returns the uint8 pixels [3, size, size]: training sends those between processes and
    to the device (a quarter of the bytes) and calls `normalize_pixels` there.
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
    pixels = np.asarray(image, dtype=np.uint8)[top:top + size, left:left + size]  # [size, size, 3]
    pixels = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # [3, size, size]
    return normalize_pixels(pixels) if normalize else pixels


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [..., 3, H, W] -> float32 CLIP input of the same shape, on the pixels' device: scaled to
    [0, 1] and normalised with the CLIP mean/std."""
    mean = torch.from_numpy(CLIP_MEAN).to(pixels.device).view(3, 1, 1)
    std = torch.from_numpy(CLIP_STD).to(pixels.device).view(3, 1, 1)
    return (pixels.to(torch.float32) * np.float32(1 / 255) - mean) / std


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


def flatten_images(images) -> list:
    """One image, a list of images or a per-sample list of lists -> a flat list in reading order."""
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        return [images]
    return [image for item in images for image in flatten_images(item)]


def load_image_source(source) -> Image.Image:
    """A PIL image as given; a local path opened as the project opens files (no EXIF rotation); an http(s) or
    base64 data URL through transformers' loader."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (str, os.PathLike)) and not str(source).startswith(REMOTE_IMAGE_PREFIXES):
        try:
            image = Image.open(source)
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ImageError(f"{source}: {image.width}x{image.height} pixels is over the {MAX_IMAGE_PIXELS} "
                                 f"pixel limit")
            image.load()
            return image
        except (OSError, SyntaxError, Image.DecompressionBombError) as error:
            raise ImageError(f"{source}: not a readable image ({error})") from None
    if isinstance(source, str):
        from transformers.image_utils import load_image

        return load_image(source)
    raise ImageError(f"an image must be a PIL image, a file path or an http(s)/data URL, not {type(source).__name__}")


class MiniMindVImageProcessor(BaseImageProcessor):
    """Images (PIL, paths or URLs; one, a list, or a list per sample) -> pixel_values [M, 3, 224, 224], made by
    `preprocess_image`, the function training uses."""

    model_input_names = ["pixel_values"]

    def __init__(self, image_size: int = None, **kwargs):
        if image_size is None:
            raise ValueError("MiniMindVImageProcessor needs image_size (the vision encoder's input size): "
                             "preprocessor_config.json is missing it")
        super().__init__(**kwargs)
        self.image_size = image_size

    def preprocess(self, images, return_tensors=None, **kwargs):
        sources = flatten_images(images)
        if not sources:
            raise ValueError("no images given")
        pixels = torch.stack([preprocess_image(load_image_source(s), self.image_size) for s in sources])
        return BatchFeature({"pixel_values": pixels}, tensor_type=return_tensors)


class MiniMindVProcessor(ProcessorMixin):
    """Tokenizer + MiniMindVImageProcessor. Text carries one `<image>` per image (the chat template writes one per
    {"type": "image"} part); each becomes the run of `image_seq_length` `image_placeholder` characters the model
    fills with that image's features (both from the model's config: scripts/convert_vlm.py writes them into
    processor_config.json). Returns input_ids, attention_mask and (with images) pixel_values [M, 3, 224, 224]."""

    attributes = ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_placeholder=None,
                 image_seq_length=None):
        if image_placeholder is None or image_seq_length is None:
            raise ValueError("MiniMindVProcessor needs image_placeholder and image_seq_length (the model config's "
                             "image_special_token): processor_config.json is missing them")
        self.image_placeholder = image_placeholder
        self.image_seq_length = image_seq_length
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
