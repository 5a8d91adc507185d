"""MiniMindVLM: the MiniMind LM plus a frozen vision encoder whose patch features replace image placeholders.

Each image is written in the prompt as a run of placeholder tokens (MiniMind2-V: 196 '@', id 34; minimind-3v: 64
`<|image_pad|>`, id 12). On the prefill step every such run is overwritten by `vision_proj(encoder features)` of
that sample's next image, left to right. The encoder is held outside the module tree, so `state_dict()` holds only
the LM and `vision_proj` (77 keys at 512x8): released upstream files load with `strict=True`.

The vision stack is a part the config chooses: `vision_encoder` names an entry of VISION_ENCODERS (how the folder
is loaded, which features the LM sees), `projector` an entry of PROJECTORS, `image_processing` the preprocessing
(read from the encoder folder's preprocessor_config.json), `image_special_token`/`image_ids` the placeholder run.
A further encoder or projector is one more entry in those tables. The projector decides how many tokens an image
becomes (`output_count`): the linear and MLP projectors one per encoder feature, the Q-Former one per learned query.
"""
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# Unused here, but needed: for a local exported folder, transformers 4.57 copies into its module cache only the
# files that this (the auto_map) file imports itself, not what model_minimind imports in turn.
from .compat import GENERATE_CACHE_KWARG, NO_HUB_KERNELS  # noqa: F401
from .model_minimind import MiniMindConfig, MiniMindForCausalLM, cached_length
from .processing_minimind_v import (CLIP_IMAGE_PROCESSING, CLIP_IMAGE_SIZE, SIGLIP_PROCESSOR_DEFAULTS,
                                    read_image_processing)

VISION_MODEL_DIR = Path(__file__).resolve().parent / "vision_model"  # where scripts/download.py puts encoders
# openai/clip-vit-base-patch16: 224 px input (CLIP_IMAGE_SIZE), 16 px patches, width 768.
CLIP_PATCH_SIZE = 16
CLIP_HIDDEN_SIZE = 768
IMAGE_TOKENS_PER_IMAGE = (CLIP_IMAGE_SIZE // CLIP_PATCH_SIZE) ** 2  # a 14x14 grid of patches: 196
# siglip2-base-p32-256-ve (minimind-3v): 256 px input, 32 px patches (an 8x8 grid: 64 features), width 768.
SIGLIP_IMAGE_SIZE = 256
SIGLIP_PATCH_SIZE = 32
SIGLIP_HIDDEN_SIZE = 768
# Exactly 256x256, no crop, (x - 0.5) / 0.5; bilinear (PIL 2) as the SigLIP2 FixRes folders say (the folder's own
# preprocessor_config.json replaces this once it is there).
SIGLIP2_IMAGE_PROCESSING = {**SIGLIP_PROCESSOR_DEFAULTS, "size": [SIGLIP_IMAGE_SIZE, SIGLIP_IMAGE_SIZE], "resample": 2}


@dataclass(frozen=True)
class VisionEncoderKind:
    """One family of vision towers: the transformers class that loads its folder and which outputs the LM sees."""
    model_class: str  # a transformers class name, loaded with from_pretrained(folder)
    image_processor_class: str  # transformers' image processor of the family (what upstream preprocesses with)
    leading_tokens: int  # tokens of last_hidden_state before the patch features (CLIP's CLS); dropped
    folder: str  # the default checkout under VISION_MODEL_DIR (scripts/download.py fetches it)
    features: str  # what the LM sees, in words (feature-cache fingerprints, error messages)
    processing: dict  # the default checkout's preprocessing, until a folder's preprocessor_config.json says


VISION_ENCODERS = {
    # openai/clip-vit-base-patch16 (MiniMind2-V): last_hidden_state is the last layer's output before
    # post_layernorm (HF applies that to the pooled CLS only); the CLS token is dropped -> [M, 196, 768].
    "clip": VisionEncoderKind("CLIPVisionModel", "CLIPImageProcessor", 1, "clip-vit-base-patch16",
                              "last_hidden_state without the CLS token (before post_layernorm)",
                              CLIP_IMAGE_PROCESSING),
    # siglip2-base-p32-256-ve (minimind-3v), loaded as upstream does with SiglipVisionModel: last_hidden_state is
    # post_layernorm, no CLS, every token -> [M, 64, 768]. Not hidden_states[-1]: that differs between 4.57 and 5.x.
    "siglip": VisionEncoderKind("SiglipVisionModel", "SiglipImageProcessor", 0, "siglip2-base-p32-256-ve",
                                "last_hidden_state, every token (after post_layernorm)", SIGLIP2_IMAGE_PROCESSING),
}
DEFAULT_VISION_ENCODER = "clip"
DEFAULT_VISION_MODEL_PATH = VISION_MODEL_DIR / VISION_ENCODERS[DEFAULT_VISION_ENCODER].folder
IMAGE_PLACEHOLDER_CHAR = "@"
IMAGE_PLACEHOLDER_ID = 34  # id of '@' in the MiniMind2 tokenizer
DEFAULT_NUM_QUERY_TOKENS = 32  # BLIP-2's and MiniGPT-4's learned queries per image
# The Blip2QFormerConfig fields a VLMConfig keeps (its `qformer_config`): what shapes the Q-Former's weights and
# outputs. Its encoder_hidden_size is the encoder's width (VLMConfig.ve_hidden_size), not kept twice.
QFORMER_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "cross_attention_frequency", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
                  "layer_norm_eps", "initializer_range")
# A from-scratch Q-Former sized for a 26M LM (about 2.8M parameters on 768-wide features into a 512-wide LM):
# BLIP-2's is 768 wide and 12 deep (over 100M).
DEFAULT_QFORMER_HIDDEN_SIZE = 256
DEFAULT_QFORMER_NUM_LAYERS = 2
DEFAULT_QFORMER_NUM_HEADS = 4
QFORMER_MLP_RATIO = 4  # BERT's (and BLIP-2's) feed-forward width over the hidden width


def qformer_settings(hidden_size: int = DEFAULT_QFORMER_HIDDEN_SIZE, num_layers: int = DEFAULT_QFORMER_NUM_LAYERS,
                     num_heads: int = DEFAULT_QFORMER_NUM_HEADS) -> dict:
    """A from-scratch Q-Former's Blip2QFormerConfig fields: every layer cross-attends to the image (BLIP-2 does so
    every second layer of twelve; with two layers that would leave one), dropout and init as BLIP-2's defaults."""
    if hidden_size % num_heads:
        raise ValueError(f"the Q-Former width {hidden_size} is not divisible by its {num_heads} heads "
                         f"(--qformer_hidden_size, --qformer_num_heads)")
    return dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                intermediate_size=QFORMER_MLP_RATIO * hidden_size, cross_attention_frequency=1)


def qformer_config_for(projector: str, qformer_config: dict = None):
    """A config's `qformer_config`: for the qformer projector, the QFORMER_FIELDS of `qformer_config` over the
    from-scratch defaults (qformer_settings); None for another projector."""
    if projector != "qformer":
        return None
    given = {name: value for name, value in (qformer_config or {}).items() if name in QFORMER_FIELDS}
    return {**qformer_settings(), **given}


def encoder_feature_count(vision_config) -> int:
    """Patch features per image of a ViT config: (image_size / patch_size)^2 (CLIP 196, SigLIP2 p32-256 64)."""
    return (vision_config.image_size // vision_config.patch_size) ** 2


def set_vision_fields(config, image_special_token: str, image_ids: list, ve_hidden_size: int, vision_encoder: str,
                      projector: str, image_feature_count: int, image_processing: dict, chat_format: str,
                      vision_model_subfolder: str, num_query_tokens: int, qformer_config: dict):
    """Check and set the vision-stack fields that VLMConfig and model_hf_vlm.TransformersVLMConfig share, under the
    same names, so that data, training and inference read either config alike."""
    if vision_encoder not in VISION_ENCODERS:
        raise ValueError(f"unknown vision_encoder {vision_encoder!r}; choose from {sorted(VISION_ENCODERS)}")
    if projector not in PROJECTORS:
        raise ValueError(f"unknown projector {projector!r}; choose from {sorted(PROJECTORS)}")
    # The placeholder run the LM sees per image (its length is len(image_ids)).
    config.image_special_token = image_special_token
    config.image_ids = list(image_ids)
    config.vision_encoder = vision_encoder
    config.projector = projector
    # Width and count of the encoder's features per image; set from the loaded encoder.
    config.ve_hidden_size = ve_hidden_size
    config.image_feature_count = image_feature_count
    # The encoder folder's preprocessing (processing_minimind_v.read_image_processing); the kind's default.
    config.image_processing = dict(image_processing or VISION_ENCODERS[vision_encoder].processing)
    # The prompt format the LM was trained with (dataset/processing.py render_chat): minimind2 | minimind3 | tokenizer.
    config.chat_format = chat_format
    # A saved folder's own copy of the vision tower (scripts/convert_vlm.py writes one); None: not in it.
    config.vision_model_subfolder = vision_model_subfolder
    # The qformer projector's learned queries (its tokens per image) and its QFORMER_FIELDS; None: not a qformer.
    config.num_query_tokens = num_query_tokens
    config.qformer_config = qformer_config_for(projector, qformer_config)


class VLMConfig(MiniMindConfig):
    model_type = "minimind-v"

    def __init__(self, image_special_token: str = IMAGE_PLACEHOLDER_CHAR * IMAGE_TOKENS_PER_IMAGE,
                 image_ids: list = None, ve_hidden_size: int = CLIP_HIDDEN_SIZE, vision_model_subfolder: str = None,
                 vision_encoder: str = DEFAULT_VISION_ENCODER, projector: str = "linear",
                 image_feature_count: int = IMAGE_TOKENS_PER_IMAGE, image_processing: dict = None,
                 chat_format: str = "minimind2", num_query_tokens: int = DEFAULT_NUM_QUERY_TOKENS,
                 qformer_config: dict = None, **kwargs):
        image_ids = list(image_ids) if image_ids is not None else [IMAGE_PLACEHOLDER_ID] * IMAGE_TOKENS_PER_IMAGE
        set_vision_fields(self, image_special_token, image_ids, ve_hidden_size, vision_encoder, projector,
                          image_feature_count, image_processing, chat_format, vision_model_subfolder, num_query_tokens,
                          qformer_config)
        super().__init__(**kwargs)

    @property
    def image_token_count(self) -> int:
        """Placeholder tokens per image in the prompt (the projector's output count)."""
        return len(self.image_ids)

    def projector_output_count(self, feature_count: int = None) -> int:
        """Tokens per image the projector gives from `feature_count` encoder features (default: this config's)."""
        return PROJECTORS[self.projector].output_count(self, feature_count or self.image_feature_count)


class FeatureProjector(nn.Module):
    """A projector that maps each encoder feature to one LM input (the linear and MLP projectors): an image is as
    many tokens as the encoder gives features, and it runs on zero images too (a text-only batch)."""

    uses_all_parameters_without_images = True

    @classmethod
    def from_config(cls, config: "VLMConfig"):
        return cls(config.ve_hidden_size, config.hidden_size)

    @staticmethod
    def output_count(config: "VLMConfig", feature_count: int) -> int:
        return feature_count


class VisionProj(FeatureProjector):
    """MiniMind2-V's projector: one Linear (with bias, as upstream's code) from vision features to the LM width.
    Keys vision_proj.vision_proj.0.{weight,bias}."""

    INPUT_WEIGHT = "vision_proj.0.weight"  # [hidden, ve_hidden]: tells this kind's files apart, gives the input width

    def __init__(self, ve_hidden_size: int = CLIP_HIDDEN_SIZE, hidden_size: int = 512):
        super().__init__()
        self.vision_proj = nn.Sequential(nn.Linear(ve_hidden_size, hidden_size))

    def forward(self, image_features):
        return self.vision_proj(image_features)


class MLPVisionProj(FeatureProjector):
    """minimind-3v's (and LLaVA-1.5's) projector: LayerNorm, Linear, exact GELU, Linear.
    Keys vision_proj.mlp.{0,1,3}.* (index 2 is the parameter-free GELU)."""

    LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, as upstream builds it
    INPUT_WEIGHT = "mlp.0.weight"  # the LayerNorm's [ve_hidden]

    def __init__(self, ve_hidden_size: int = CLIP_HIDDEN_SIZE, hidden_size: int = 768):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(ve_hidden_size, eps=self.LAYER_NORM_EPS),
                                 nn.Linear(ve_hidden_size, hidden_size), nn.GELU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, image_features):
        return self.mlp(image_features)


class QFormerProjector(nn.Module):
    """MiniGPT-4's projector: BLIP-2's Q-Former (transformers' Blip2QFormerModel) whose learned queries cross-attend
    to the encoder's features, then a Linear into the LM width (BLIP-2's language_projection, MiniGPT-4's
    llama_proj): [M, n, ve_hidden] -> [M, num_query_tokens, hidden], whatever n. Keys vision_proj.query_tokens,
    vision_proj.qformer.* (Blip2Model's names after its `qformer.`), vision_proj.language_projection.*."""

    # [qformer_hidden, ve_hidden]: layer 0 always cross-attends (0 % cross_attention_frequency == 0)
    INPUT_WEIGHT = "qformer.encoder.layer.0.crossattention.attention.key.weight"
    # transformers 5.x's Q-Former cannot run on zero images: a text-only batch reaches only the queries and the
    # projection, and leaves the Q-Former without gradients
    uses_all_parameters_without_images = False

    def __init__(self, ve_hidden_size: int = CLIP_HIDDEN_SIZE, hidden_size: int = 512,
                 num_query_tokens: int = DEFAULT_NUM_QUERY_TOKENS, qformer_config: dict = None):
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        super().__init__()
        settings = {**qformer_settings(), **(qformer_config or {})}
        config = Blip2QFormerConfig(**settings, encoder_hidden_size=ve_hidden_size)
        # Drawn as BLIP-2's own training code draws them (transformers zeroes them: its checkpoints always have them)
        queries = torch.randn(1, num_query_tokens, config.hidden_size) * config.initializer_range
        self.query_tokens = nn.Parameter(queries)
        self.qformer = Blip2QFormerModel(config)
        self.language_projection = nn.Linear(config.hidden_size, hidden_size)

    @classmethod
    def from_config(cls, config: "VLMConfig"):
        return cls(config.ve_hidden_size, config.hidden_size, config.num_query_tokens, config.qformer_config)

    @staticmethod
    def output_count(config: "VLMConfig", feature_count: int) -> int:
        return config.num_query_tokens

    def forward(self, image_features):
        queries = self.query_tokens.expand(image_features.shape[0], -1, -1)  # [M, num_query_tokens, qformer_hidden]
        if image_features.shape[0] == 0:  # a text-only batch: [0, num_query_tokens, hidden], still on the graph
            return self.language_projection(queries)
        hidden = self.qformer(query_embeds=queries, encoder_hidden_states=image_features).last_hidden_state
        return self.language_projection(hidden.to(self.language_projection.weight.dtype))


# Projector name -> class; each maps [M, n, ve_hidden] -> [M, output_count(config, n), hidden], built from a
# VLMConfig by from_config (the linear and MLP projectors also take (ve_hidden_size, hidden_size)).
PROJECTORS = {"linear": VisionProj, "mlp": MLPVisionProj, "qformer": QFormerProjector}


def load_vision_encoder(vision_model_path, subfolder: str = "", kind: str = DEFAULT_VISION_ENCODER):
    """Frozen vision tower of `kind` (eval mode, fp32) from a folder, or from `subfolder` of a local folder or hub
    repo (a saved MiniMind-V folder's own copy); a missing local folder says how to get one.

    fp32 whatever the folder stores: transformers 5.x would keep siglip2's fp16, which moves the logits."""
    import transformers

    encoder_class = getattr(transformers, VISION_ENCODERS[kind].model_class)
    path = Path(vision_model_path)
    if subfolder and not path.is_dir():  # a hub repo id: transformers fetches the subfolder
        encoder = encoder_class.from_pretrained(str(vision_model_path), subfolder=subfolder, dtype=torch.float32,
                                                **NO_HUB_KERNELS)
        encoder.requires_grad_(False)
        return encoder.eval()
    path = path / subfolder
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{kind} vision encoder not found at {path}: run `python -m scripts.download --what "
            f"{'clip' if kind == DEFAULT_VISION_ENCODER else kind}`, or pass --vision_model_path")
    # callers silence the "unused text tower" report
    encoder = encoder_class.from_pretrained(str(path), dtype=torch.float32, **NO_HUB_KERNELS)
    encoder.requires_grad_(False)
    return encoder.eval()


def read_encoder_folder(vision_model_path, subfolder: str = "") -> dict:
    """The image preprocessing of an encoder folder (its preprocessor_config.json), or {} when it has none."""
    path = Path(vision_model_path) / subfolder
    return read_image_processing(path) if path.is_dir() else {}


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


def describe_encoder(config: VLMConfig, encoder, processing: dict):
    """Write a loaded encoder's facts into `config`: width, features per image, and its folder's preprocessing.
    The projector's tokens per image from these features must equal the placeholder run."""
    config.ve_hidden_size = encoder.config.hidden_size
    config.image_feature_count = encoder_feature_count(encoder.config)
    if processing:
        config.image_processing = processing
    check_placeholder_run(config, config.image_feature_count, f"the {config.vision_encoder} encoder")


def check_placeholder_run(config: VLMConfig, feature_count: int, encoder_name: str):
    """ValueError unless the projector turns `feature_count` features into as many tokens as the placeholder run."""
    tokens = config.projector_output_count(feature_count)
    if tokens == config.image_token_count:
        return
    if tokens == feature_count:  # a per-feature projector
        raise ValueError(f"{encoder_name} gives {feature_count} features per image, but the placeholder run is "
                         f"{config.image_token_count} tokens: choose the preset that fits the encoder (--preset), "
                         f"or its placeholder count")
    raise ValueError(f"the {config.projector} projector gives {tokens} tokens per image, but the placeholder run is "
                     f"{config.image_token_count} tokens: the run must have one placeholder per query")


class VisionStack:
    """What every VLM here does with images, whatever its LM: hold the frozen encoder outside the module tree, encode
    images, project them with `vision_proj` and splice them into the placeholder runs of the embeddings.

    Mixed into a transformers PreTrainedModel whose config has the vision fields of VLMConfig (vision_encoder,
    projector, ve_hidden_size, image_ids, image_processing) and which sets `self.vision_proj`: MiniMindVLM here,
    model_hf_vlm.TransformersVLM for any transformers causal LM.
    """

    @staticmethod
    def load_described_encoder(config, vision_model_path):
        """The frozen encoder of config's kind from `vision_model_path` (None: none), its facts written into config."""
        if vision_model_path is None:
            return None
        vision_encoder = load_vision_encoder(vision_model_path, kind=config.vision_encoder)
        describe_encoder(config, vision_encoder, read_encoder_folder(vision_model_path))
        return vision_encoder

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, vision_model_path=None, **kwargs):
        """Load a saved folder with its encoder from `vision_model_path` if given, else the folder's own copy if it
        has one (config.vision_model_subfolder), else none (text only, or precomputed image_features).
        `vision_model_subfolder=None` skips the folder's copy. (The class's __init__ takes vision_model_path.)
        No hub kernels unless the caller asks for them (NO_HUB_KERNELS): Auto classes and pipeline() come here too."""
        kwargs = {**NO_HUB_KERNELS, **kwargs}
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, vision_model_path=None, **kwargs)
        if vision_model_path is not None:
            model.attach_vision_encoder(vision_model_path)
        elif model.config.vision_model_subfolder:
            model.attach_vision_encoder(pretrained_model_name_or_path, model.config.vision_model_subfolder)
        return model

    def attach_vision_encoder(self, vision_model_path, subfolder: str = ""):
        """Load a frozen encoder of the config's kind onto this model's device (and its dtype, unless fp32 is kept
        for the encoder); its width must fit vision_proj, and the tokens vision_proj makes of its features the
        placeholder run."""
        encoder = load_vision_encoder(vision_model_path, subfolder, kind=self.config.vision_encoder)
        if encoder.config.hidden_size != self.config.ve_hidden_size:
            raise ValueError(f"{vision_model_path}: vision width {encoder.config.hidden_size}, but this model's "
                             f"vision_proj expects {self.config.ve_hidden_size}")
        check_placeholder_run(self.config, encoder_feature_count(encoder.config), str(vision_model_path))
        self.config.image_feature_count = encoder_feature_count(encoder.config)
        processing = read_encoder_folder(vision_model_path, subfolder if Path(vision_model_path).is_dir() else "")
        if processing:
            self.config.image_processing = processing
        self.__dict__["vision_encoder"] = encoder.to(device=self.device, dtype=self.dtype)

    @property
    def image_token_id(self) -> int:
        return self.config.image_ids[0]

    @property
    def image_token_count(self) -> int:
        return self.config.image_token_count

    def _apply(self, fn, *args, **kwargs):
        # .to()/.half()/.cuda() also move the (unregistered) vision encoder.
        super()._apply(fn, *args, **kwargs)
        if self.__dict__.get("vision_encoder") is not None:
            self.vision_encoder._apply(fn, *args, **kwargs)
        return self

    @torch.no_grad()
    def encode_images(self, pixel_values):
        """[M, 3, H, W] -> the encoder's features [M, image_feature_count, ve_hidden] (VISION_ENCODERS says which:
        CLIP [M, 196, 768] before post_layernorm without CLS; SigLIP2 [M, 64, 768] after it)."""
        if self.vision_encoder is None:
            raise RuntimeError("this model was built without a vision encoder (vision_model_path=None)")
        if pixel_values.dtype == torch.uint8:
            raise ValueError("pixel_values are uint8: normalise them first (processing_minimind_v.normalize_pixels)")
        if len(pixel_values) == 0:  # a text-only training batch: no CLIP call, but vision_proj still runs
            return pixel_values.new_zeros(0, self.config.image_feature_count, self.config.ve_hidden_size)
        encoder_dtype = next(self.vision_encoder.parameters()).dtype
        hidden = self.vision_encoder(pixel_values=pixel_values.to(encoder_dtype)).last_hidden_state
        return hidden[:, VISION_ENCODERS[self.config.vision_encoder].leading_tokens:, :]

    def splice_image_features(self, input_ids, inputs_embeds, image_features, images_per_sample=None,
                              image_positions=None):
        """Overwrite every run of image tokens with the projected features of the sample's next image.

        input_ids [B, T]; inputs_embeds [B, T, hidden]; image_features [M, n, ve_hidden] in reading order
        (sample 0's images left to right, then sample 1's, ...). image_positions: `image_token_positions`
        computed beforehand (the training collator does it on the CPU); None: found and checked here, which
        raises ValueError when a run is not exactly image_token_count tokens long or when the number of runs
        differs from the number of images (per sample if `images_per_sample` is given, else in total).
        """
        if image_positions is None:
            image_positions = image_token_positions(input_ids, self.image_token_id, self.image_token_count,
                                                    images_per_sample, image_features.shape[0])
        projected = self.vision_proj(image_features.to(next(self.vision_proj.parameters()).dtype))
        hidden = inputs_embeds.shape[-1]
        # Row-major order of the positions = sample by sample, image by image, patch by patch.
        spliced = inputs_embeds.reshape(-1, hidden).index_copy(
            0, image_positions, projected.reshape(-1, hidden).to(inputs_embeds.dtype))  # [B*T, hidden]
        return spliced.view_as(inputs_embeds)

    def embed_with_images(self, input_ids, inputs_embeds, pixel_values, image_features, past_key_values,
                          image_positions=None):
        """The input embeddings with the prompt's images spliced in, or `inputs_embeds` as given when there is
        nothing to splice (no images, or a decoding step after the prompt).

        pixel_values: [B, N, 3, H, W], upstream's [B, N, 1, 3, H, W], or a flat [M, 3, H, W] list in reading
        order; image_features: precomputed encoder features [M, image_feature_count, ve_hidden] instead. Images
        belong to the prompt, spliced on the call whose cache is empty (our generate() passes them on that step
        only). Code written against upstream passes them on every decoding step: with a non-empty cache they are
        ignored while the new tokens hold no image placeholder, and a placeholder there raises (its image would go
        unseen).
        """
        has_images = pixel_values is not None or image_features is not None
        if has_images and cached_length(past_key_values) > 0:
            if input_ids is not None and bool((input_ids == self.image_token_id).any()):
                raise ValueError("images go with the prompt: image placeholder tokens after the prompt (with a "
                                 "non-empty cache) cannot take pixel_values/image_features; start a new cache")
            has_images = False
        if not has_images:
            return inputs_embeds
        images_per_sample = None
        if image_features is None:
            images_per_sample = count_images_per_sample(pixel_values, input_ids.shape[0])
            image_features = self.encode_images(flatten_pixel_values(pixel_values))
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        return self.splice_image_features(input_ids, inputs_embeds, image_features, images_per_sample,
                                          image_positions)


class MiniMindVLM(VisionStack, MiniMindForCausalLM):
    config_class = VLMConfig
    prefill_only_inputs = ("pixel_values", "image_features")

    def __init__(self, config: VLMConfig = None, vision_model_path=DEFAULT_VISION_MODEL_PATH):
        config = config or VLMConfig()
        vision_encoder = self.load_described_encoder(config, vision_model_path)
        super().__init__(config)
        # Stored outside nn.Module's registry: never in state_dict(), parameters() or the optimizer.
        self.__dict__["vision_encoder"] = vision_encoder
        self.vision_proj = PROJECTORS[config.projector].from_config(config)
        self.post_init()  # transformers' bookkeeping (tied-weight keys) that from_pretrained relies on

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=False, logits_to_keep=0,
                labels=None, pixel_values=None, image_features=None, inputs_embeds=None, loss_only=False,
                return_dict=True, image_positions=None, first_target=None, target_index=None):
        """MiniMindForCausalLM.forward, with the prompt's images spliced into the embeddings first
        (VisionStack.embed_with_images; parameters in upstream's order for the VLM, which differs from its LM's).

        image_positions, first_target, target_index: positions the training collator computed on the CPU
        (dataset/lm_dataset.py collate_batch), so that a training step makes no device->host sync for them.
        """
        inputs_embeds = self.embed_with_images(input_ids, inputs_embeds, pixel_values, image_features,
                                               past_key_values, image_positions)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                               use_cache=use_cache, labels=labels, logits_to_keep=logits_to_keep,
                               inputs_embeds=inputs_embeds, loss_only=loss_only, first_target=first_target,
                               target_index=target_index)
