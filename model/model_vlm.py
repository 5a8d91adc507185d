"""MiniMindVLM: the MiniMind LM plus a frozen CLIP ViT-B/16 whose patch features replace image placeholders.

Each image is written in the prompt as a run of exactly 196 placeholder tokens ('@', id 34). On the prefill
step every such run is overwritten by `vision_proj(CLIP patch features)` of that sample's next image, left
to right. The CLIP encoder is held outside the module tree, so `state_dict()` holds only the LM and
`vision_proj` (77 keys at 512x8): released upstream files load with `strict=True`.
"""
from pathlib import Path

import torch
from torch import nn

# Unused here, but needed: for a local exported folder, transformers 4.57 copies into its module cache only the
# files that this (the auto_map) file imports itself, not what model_minimind imports in turn.
from .compat import GENERATE_CACHE_KWARG  # noqa: F401
from .model_minimind import MiniMindConfig, MiniMindForCausalLM, cached_length

# Where scripts/download.py puts CLIP. This file is also shipped in exported transformers folders, so it imports
# nothing from the project beyond model_minimind.
DEFAULT_VISION_MODEL_PATH = Path(__file__).resolve().parent / "vision_model" / "clip-vit-base-patch16"
IMAGE_PLACEHOLDER_CHAR = "@"
IMAGE_PLACEHOLDER_ID = 34  # id of '@' in the MiniMind2 tokenizer
# openai/clip-vit-base-patch16: 224 px input, 16 px patches, width 768.
CLIP_IMAGE_SIZE = 224
CLIP_PATCH_SIZE = 16
CLIP_HIDDEN_SIZE = 768
IMAGE_TOKENS_PER_IMAGE = (CLIP_IMAGE_SIZE // CLIP_PATCH_SIZE) ** 2  # a 14x14 grid of patches: 196


class VLMConfig(MiniMindConfig):
    model_type = "minimind-v"

    def __init__(self, image_special_token: str = IMAGE_PLACEHOLDER_CHAR * IMAGE_TOKENS_PER_IMAGE,
                 image_ids: list = None, ve_hidden_size: int = CLIP_HIDDEN_SIZE, vision_model_subfolder: str = None,
                 **kwargs):
        self.image_special_token = image_special_token
        self.image_ids = list(image_ids) if image_ids is not None else [IMAGE_PLACEHOLDER_ID] * IMAGE_TOKENS_PER_IMAGE
        # Width of the vision features; set from the loaded encoder, 768 for CLIP ViT-B/16.
        self.ve_hidden_size = ve_hidden_size
        # A saved folder's own copy of the CLIP vision tower (scripts/convert_vlm.py writes one); None: not in it.
        self.vision_model_subfolder = vision_model_subfolder
        super().__init__(**kwargs)


class VisionProj(nn.Module):
    """Linear map (with bias, as upstream's code) from vision features to the LM width."""

    def __init__(self, ve_hidden_size: int = CLIP_HIDDEN_SIZE, hidden_size: int = 512):
        super().__init__()
        self.vision_proj = nn.Sequential(nn.Linear(ve_hidden_size, hidden_size))

    def forward(self, image_features):
        return self.vision_proj(image_features)


def load_vision_encoder(vision_model_path, subfolder: str = ""):
    """Frozen CLIP vision tower (eval mode) from a CLIP folder, or from `subfolder` of a local folder or hub repo
    (a saved MiniMind-V folder's own copy); a missing local folder says how to get one."""
    from transformers import CLIPVisionModel

    path = Path(vision_model_path)
    if subfolder and not path.is_dir():  # a hub repo id: transformers fetches the subfolder
        encoder = CLIPVisionModel.from_pretrained(str(vision_model_path), subfolder=subfolder)
        encoder.requires_grad_(False)
        return encoder.eval()
    path = path / subfolder
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"CLIP vision encoder not found at {path}: run `python -m scripts.download --what clip` "
            f"(or `git clone https://huggingface.co/openai/clip-vit-base-patch16 {path}`), "
            f"or pass --vision_model_path")
    encoder = CLIPVisionModel.from_pretrained(str(path))  # callers silence the "unused text tower" report
    encoder.requires_grad_(False)
    return encoder.eval()


def find_image_runs(input_ids, image_token_id: int):
    """Runs of consecutive image tokens: (batch index, start, length) tensors, in row-major order."""
    is_image = input_ids == image_token_id  # [B, T]
    previous = torch.nn.functional.pad(is_image[:, :-1], (1, 0), value=False)
    following = torch.nn.functional.pad(is_image[:, 1:], (0, 1), value=False)
    starts = (is_image & ~previous).nonzero()  # [R, 2] (row, col), row-major
    ends = (is_image & ~following).nonzero()  # [R, 2], the same runs in the same order
    return starts[:, 0], starts[:, 1], ends[:, 1] - starts[:, 1] + 1


def image_token_positions(input_ids, image_token_id: int, run_length: int, images_per_sample=None,
                          image_count: int = None):
    """Flat row-major indices [M * run_length] into input_ids [B, T] of every image token, after checking that
    each run of image tokens is exactly `run_length` long and that there are as many runs as images (per sample
    with `images_per_sample`, else `image_count` in total); ValueError otherwise. Every check reads data on the
    host: free on the CPU (the training collator), a device->host sync on a GPU (forward without positions)."""
    rows, starts, lengths = find_image_runs(input_ids, image_token_id)
    bad = (lengths != run_length).nonzero().flatten().tolist()
    if bad:
        run = bad[0]
        raise ValueError(f"sample {int(rows[run])}: a run of {int(lengths[run])} image tokens at position "
                         f"{int(starts[run])}; each image needs exactly {run_length} consecutive "
                         f"id-{image_token_id} tokens (was the prompt truncated, or '@' typed next to an image?)")
    runs_per_sample = torch.bincount(rows, minlength=input_ids.shape[0]).tolist()
    if images_per_sample is not None:
        for sample, (runs, images) in enumerate(zip(runs_per_sample, images_per_sample)):
            if runs != images:
                raise ValueError(f"sample {sample}: {runs} image placeholder(s) in the text but {images} "
                                 f"image(s) given")
    elif sum(runs_per_sample) != image_count:
        raise ValueError(f"{sum(runs_per_sample)} image placeholder(s) in the batch {runs_per_sample} but "
                         f"{image_count} image(s) given")
    return (input_ids.flatten() == image_token_id).nonzero().flatten()


def count_images_per_sample(pixel_values, batch_size):
    """Images per sample for batched pixel_values [B, N, (1,) 3, H, W]; None for a flat [M, 3, H, W] list."""
    if pixel_values.dim() == 4:
        return None
    if pixel_values.shape[0] != batch_size:
        raise ValueError(f"pixel_values has batch size {pixel_values.shape[0]} but input_ids has {batch_size}")
    return [pixel_values.shape[1]] * batch_size


def flatten_pixel_values(pixel_values):
    """[B, N, 1, 3, H, W] (upstream) or [B, N, 3, H, W] or a flat [M, 3, H, W] -> [M, 3, H, W]."""
    if pixel_values.dim() == 6:
        pixel_values = pixel_values.squeeze(2)  # [B, N, 3, H, W]
    if pixel_values.dim() == 5:
        return pixel_values.flatten(0, 1)  # [B*N, 3, H, W]
    if pixel_values.dim() == 4:
        return pixel_values
    raise ValueError(f"pixel_values must be [B, N, 3, H, W], [B, N, 1, 3, H, W] or [M, 3, H, W], "
                     f"got shape {tuple(pixel_values.shape)}")


class MiniMindVLM(MiniMindForCausalLM):
    config_class = VLMConfig
    prefill_only_inputs = ("pixel_values", "image_features")

    def __init__(self, config: VLMConfig = None, vision_model_path=DEFAULT_VISION_MODEL_PATH):
        config = config or VLMConfig()
        vision_encoder = load_vision_encoder(vision_model_path) if vision_model_path is not None else None
        if vision_encoder is not None:
            config.ve_hidden_size = vision_encoder.config.hidden_size
        super().__init__(config)
        # Stored outside nn.Module's registry: never in state_dict(), parameters() or the optimizer.
        self.__dict__["vision_encoder"] = vision_encoder
        self.vision_proj = VisionProj(config.ve_hidden_size, config.hidden_size)
        self.post_init()  # transformers' bookkeeping (tied-weight keys) that from_pretrained relies on

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, vision_model_path=None, **kwargs):
        """Load a saved folder with a CLIP encoder from `vision_model_path` if given, else the folder's own copy if
        it has one (config.vision_model_subfolder), else none (text only, or precomputed image_features).
        `vision_model_subfolder=None` skips the folder's copy."""
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, vision_model_path=None, **kwargs)
        if vision_model_path is not None:
            model.attach_vision_encoder(vision_model_path)
        elif model.config.vision_model_subfolder:
            model.attach_vision_encoder(pretrained_model_name_or_path, model.config.vision_model_subfolder)
        return model

    def attach_vision_encoder(self, vision_model_path, subfolder: str = ""):
        """Load a frozen CLIP encoder onto this model's device and dtype; its width must fit vision_proj."""
        encoder = load_vision_encoder(vision_model_path, subfolder)
        if encoder.config.hidden_size != self.config.ve_hidden_size:
            raise ValueError(f"{vision_model_path}: vision width {encoder.config.hidden_size}, but this model's "
                             f"vision_proj expects {self.config.ve_hidden_size}")
        self.__dict__["vision_encoder"] = encoder.to(device=self.device, dtype=self.dtype)

    @property
    def image_token_id(self) -> int:
        return self.config.image_ids[0]

    @property
    def image_token_count(self) -> int:
        return len(self.config.image_ids)

    def _apply(self, fn, *args, **kwargs):
        # .to()/.half()/.cuda() also move the (unregistered) vision encoder.
        super()._apply(fn, *args, **kwargs)
        if self.__dict__.get("vision_encoder") is not None:
            self.vision_encoder._apply(fn, *args, **kwargs)
        return self

    @torch.no_grad()
    def encode_images(self, pixel_values):
        """[M, 3, 224, 224] -> CLIP patch features [M, 196, ve_hidden] (pre-post_layernorm, CLS dropped)."""
        if self.vision_encoder is None:
            raise RuntimeError("this model was built without a vision encoder (vision_model_path=None)")
        if pixel_values.dtype == torch.uint8:
            raise ValueError("pixel_values are uint8: normalise them first (processing_minimind_v.normalize_pixels)")
        if len(pixel_values) == 0:  # a text-only training batch: no CLIP call, but vision_proj still runs
            return pixel_values.new_zeros(0, self.image_token_count, self.config.ve_hidden_size)
        encoder_dtype = next(self.vision_encoder.parameters()).dtype
        hidden = self.vision_encoder(pixel_values=pixel_values.to(encoder_dtype)).last_hidden_state
        return hidden[:, 1:, :]  # [M, 196, ve_hidden]

    def splice_image_features(self, input_ids, inputs_embeds, image_features, images_per_sample=None,
                              image_positions=None):
        """Overwrite every run of image tokens with the projected features of the sample's next image.

        input_ids [B, T]; inputs_embeds [B, T, hidden]; image_features [M, 196, ve_hidden] in reading order
        (sample 0's images left to right, then sample 1's, ...). image_positions: `image_token_positions`
        computed beforehand (the training collator does it on the CPU); None: found and checked here, which
        raises ValueError when a run is not exactly 196 tokens long or when the number of runs differs from the
        number of images (per sample if `images_per_sample` is given, else in total).
        """
        if image_positions is None:
            image_positions = image_token_positions(input_ids, self.image_token_id, self.image_token_count,
                                                    images_per_sample, image_features.shape[0])
        projected = self.vision_proj(image_features.to(self.vision_proj.vision_proj[0].weight.dtype))
        hidden = inputs_embeds.shape[-1]
        # Row-major order of the positions = sample by sample, image by image, patch by patch.
        spliced = inputs_embeds.reshape(-1, hidden).index_copy(
            0, image_positions, projected.reshape(-1, hidden).to(inputs_embeds.dtype))  # [B*T, hidden]
        return spliced.view_as(inputs_embeds)

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=False, logits_to_keep=0,
                labels=None, pixel_values=None, image_features=None, inputs_embeds=None, loss_only=False,
                return_dict=True, image_positions=None, first_target=None, target_index=None):
        """MiniMindForCausalLM.forward, with the prompt's images spliced into the embeddings first (parameters
        in upstream's order for the VLM, which differs from its LM's).

        pixel_values: [B, N, 3, 224, 224], upstream's [B, N, 1, 3, 224, 224], or a flat [M, 3, 224, 224] list in
        reading order; image_features: precomputed CLIP features [M, 196, ve_hidden] instead. Images belong to
        the prompt, spliced on the call whose cache is empty (our generate() passes them on that step only). Code
        written against upstream passes them on every decoding step: with a non-empty cache they are ignored while
        the new tokens hold no image placeholder, and a placeholder there raises (its image would go unseen).
        image_positions, first_target, target_index: positions the training collator computed on the CPU
        (dataset/lm_dataset.py collate_batch), so that a training step makes no device->host sync for them.
        """
        has_images = pixel_values is not None or image_features is not None
        if has_images and cached_length(past_key_values) > 0:
            if input_ids is not None and bool((input_ids == self.image_token_id).any()):
                raise ValueError("images go with the prompt: image placeholder tokens after the prompt (with a "
                                 "non-empty cache) cannot take pixel_values/image_features; start a new cache")
            has_images = False
        if has_images:
            images_per_sample = None
            if image_features is None:
                images_per_sample = count_images_per_sample(pixel_values, input_ids.shape[0])
                image_features = self.encode_images(flatten_pixel_values(pixel_values))
            if inputs_embeds is None:
                inputs_embeds = self.model.embed_tokens(input_ids)
            inputs_embeds = self.splice_image_features(input_ids, inputs_embeds, image_features, images_per_sample,
                                                       image_positions)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                               use_cache=use_cache, labels=labels, logits_to_keep=logits_to_keep,
                               inputs_embeds=inputs_embeds, loss_only=loss_only, first_target=first_target,
                               target_index=target_index)
