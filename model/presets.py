"""The presets: named models (an LM family and shape, a vision encoder, a projector, a placeholder run, a chat
format, the trainable sets), the one table every entry point reads with `--preset`.

    minimind2-v   MiniMind2-V (26M): MiniMind2 LM 512x8, CLIP ViT-B/16, Linear projector, 196 '@' (id 34)
    minimind-3v   upstream's minimind-3v (HEAD 9595617): MiniMind-3 LM 768x8, SigLIP2 p32-256, MLP projector,
                  64 `<|image_pad|>` (id 12), the MiniMind-3 chat format

A flag for a part (`--vision_encoder`, `--projector`, `--hidden_size`, ...) overrides the preset's choice.
"""
from dataclasses import dataclass
from pathlib import Path

from common import DEFAULT_TOKENIZER_PATH, REPO_ROOT, bounded

from .model_minimind import minimind3_config_kwargs
from .model_vlm import PROJECTORS, VISION_ENCODERS, VISION_MODEL_DIR, VLMConfig

DEFAULT_PRESET = "minimind2-v"


@dataclass(frozen=True)
class Preset:
    lm_family: str  # model_minimind's LM families: minimind2 | minimind3
    hidden_size: int
    num_hidden_layers: int
    vision_encoder: str  # a key of model_vlm.VISION_ENCODERS
    projector: str  # a key of model_vlm.PROJECTORS
    image_placeholder: str  # one placeholder token as text; a run of image_token_count stands for an image
    image_token_id: int  # its id in the preset's tokenizer
    image_token_count: int  # the encoder's features per image: the placeholder run of a per-feature projector
    chat_format: str  # dataset/processing.py CHAT_FORMATS
    tokenizer_path: Path  # where scripts/download.py puts the preset's tokenizer
    trainable: dict  # stage ("pretrain" | "sft") -> trainer.config TRAINABLE_CHOICES entry

    @property
    def vision_model_path(self) -> Path:
        return VISION_MODEL_DIR / VISION_ENCODERS[self.vision_encoder].folder


PRESETS = {
    "minimind2-v": Preset(
        lm_family="minimind2", hidden_size=512, num_hidden_layers=8, vision_encoder="clip", projector="linear",
        image_placeholder="@", image_token_id=34, image_token_count=196, chat_format="minimind2",
        tokenizer_path=DEFAULT_TOKENIZER_PATH, trainable={"pretrain": "projector_last_layer", "sft": "all"}),
    # upstream's --freeze_llm: 2 for pretraining (projector only), 1 for SFT (projector + first and last layers).
    "minimind-3v": Preset(
        lm_family="minimind3", hidden_size=768, num_hidden_layers=8, vision_encoder="siglip", projector="mlp",
        image_placeholder="<|image_pad|>", image_token_id=12, image_token_count=64, chat_format="minimind3",
        tokenizer_path=REPO_ROOT / "model" / "minimind3_tokenizer",
        trainable={"pretrain": "projector", "sft": "projector_first_last_layers"}),
}


def lm_config_kwargs(lm_family: str, hidden_size: int, num_hidden_layers: int, use_moe: bool) -> dict:
    """The LM fields of a VLMConfig for a family and shape (MiniMind-3's defaults are upstream's 3v ones)."""
    if lm_family == "minimind2":
        return dict(lm_family=lm_family, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, use_moe=use_moe)
    return minimind3_config_kwargs(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, use_moe=use_moe)


def vlm_config(preset: str = DEFAULT_PRESET, hidden_size: int = None, num_hidden_layers: int = None,
               use_moe: bool = False, vision_encoder: str = None, projector: str = None, lm_kwargs: dict = None,
               **extra) -> VLMConfig:
    """The VLMConfig of a preset, with any part given here instead of the preset's (None: the preset's);
    `lm_kwargs` replaces the LM part whole (weights.describe_state_dict's config_kwargs of a file). The placeholder
    run has as many tokens as the projector makes of the preset encoder's features (a qformer: num_query_tokens)."""
    chosen = PRESETS[preset]
    kwargs = dict(lm_kwargs) if lm_kwargs else lm_config_kwargs(
        chosen.lm_family, hidden_size or chosen.hidden_size, num_hidden_layers or chosen.num_hidden_layers,
        bool(use_moe))
    kwargs.update(extra)
    config = VLMConfig(vision_encoder=vision_encoder or chosen.vision_encoder, projector=projector or chosen.projector,
                       image_feature_count=chosen.image_token_count, chat_format=chosen.chat_format, **kwargs)
    run_length = config.projector_output_count()
    config.image_special_token = chosen.image_placeholder * run_length
    config.image_ids = [chosen.image_token_id] * run_length
    return config


def preset_for(lm_family: str, projector: str = None) -> str:
    """The preset of a file's LM family and projector (None: an LM-only file), as weights.describe_state_dict
    reads them; the default preset when none matches."""
    for name, preset in PRESETS.items():
        if preset.lm_family == lm_family and projector in (None, preset.projector):
            return name
    return DEFAULT_PRESET


def default_vision_model_path(config, trained_with=None) -> Path:
    """The encoder folder a model gets when none is given: the one it was trained with if it is still there, else
    where scripts/download.py puts its kind."""
    if trained_with is not None and (Path(trained_with) / "config.json").is_file():
        return Path(trained_with)
    return VISION_MODEL_DIR / VISION_ENCODERS[config.vision_encoder].folder


# The flags add_preset_flags and the trainer add that say what the model is (None: not given on the command line).
ARCHITECTURE_FLAGS = ("preset", "hidden_size", "num_hidden_layers", "use_moe", "vision_encoder", "projector",
                      "num_query_tokens", "qformer_hidden_size", "qformer_num_layers", "qformer_num_heads",
                      "qformer_init")


def add_preset_flags(parser_or_group, with_shape: bool = True):
    """--preset and the part flags that override it (defaults None: the preset's); `apply_preset` fills them."""
    group = parser_or_group
    group.add_argument("--preset", default=None, choices=sorted(PRESETS),
                       help=f"the model: {', '.join(sorted(PRESETS))} (default {DEFAULT_PRESET}; part flags "
                            f"override its choices)")
    group.add_argument("--vision_encoder", default=None, choices=sorted(VISION_ENCODERS),
                       help="vision encoder kind (default: the preset's)")
    group.add_argument("--projector", default=None, choices=sorted(PROJECTORS),
                       help="projector: linear (MiniMind2-V), mlp (minimind-3v, LLaVA-1.5) or qformer (BLIP-2's "
                            "Q-Former and a Linear, MiniGPT-4's; an image is --num_query_tokens tokens) (default: "
                            "the preset's)")
    if with_shape:
        group.add_argument("--hidden_size", type=bounded(int, 1), default=None, help="LM width (default: the preset's)")
        group.add_argument("--num_hidden_layers", type=bounded(int, 1), default=None,
                           help="LM depth (default: the preset's)")
    return parser_or_group


def apply_preset(args, stage: str = None, fill_tokenizer: bool = True):
    """Fill the flags left at None from args.preset: shape, parts, vision folder, tokenizer (unless the caller
    picks it itself), and the stage's trainable set. `args.architecture_given` lists the ARCHITECTURE_FLAGS given."""
    args.architecture_given = [name for name in ARCHITECTURE_FLAGS if getattr(args, name, None) is not None]
    args.vision_model_path_given = getattr(args, "vision_model_path", None) is not None
    args.trainable_given = getattr(args, "trainable", None) is not None
    if args.preset is None:
        args.preset = DEFAULT_PRESET
    chosen = PRESETS[args.preset]
    for name in ("hidden_size", "num_hidden_layers", "vision_encoder", "projector"):
        if getattr(args, name, chosen) is None:
            setattr(args, name, getattr(chosen, name))
    if getattr(args, "vision_model_path", "") is None:
        args.vision_model_path = str(VISION_MODEL_DIR / VISION_ENCODERS[args.vision_encoder].folder)
    if fill_tokenizer and getattr(args, "tokenizer_path", "") is None:
        args.tokenizer_path = str(chosen.tokenizer_path)
    if getattr(args, "use_moe", 0) is None:
        args.use_moe = 0
    if stage is not None and getattr(args, "trainable", "") is None:
        args.trainable = chosen.trainable[stage]
    return args
