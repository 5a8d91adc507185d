"""Loading a model for inference: from a native `.pth` (`--load 0`) or a transformers folder written by
scripts/convert_vlm.py (`--load 1`), with its tokenizer, on one device; the flags that choose it.

Shared by the terminal chat (eval_vlm.py), the web demo, the API server and the benchmark harness.
"""
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common import (DEFAULT_SAVE_DIR, DEFAULT_TOKENIZER_PATH, DEFAULT_TRANSFORMERS_DIR, DTYPE_NAMES, MAX_SEED,
                    REPO_ROOT, UserError, bounded, count_parameters, default_device, device_flag, quiet_transformers,
                    torch_dtype)
from dataset.processing import check_tokenizer_matches, image_processor_for, load_tokenizer
from model.model_hf_vlm import VLM_CLASSES, TransformersVLM, TransformersVLMConfig
from model.model_minimind import convert_legacy_state_dict, is_legacy_state_dict
from model.model_vlm import VISION_ENCODERS, MiniMindVLM, VLMConfig
from model.presets import DEFAULT_PRESET, PRESETS, add_preset_flags, default_vision_model_path, preset_for
from model.weights import (WeightsMismatchError, architecture_path, describe_state_dict, load_weights,
                           read_architecture, read_state_dict, weight_path)

MODEL_MODES = ("pretrain_vlm", "sft_vlm", "sft_vlm_multi")  # --model_mode 0, 1, 2: which stage's weights
# Upstream's inference defaults (eval_vlm.py / web demo); temperature 0 means greedy decoding here.
DEFAULT_TEMPERATURE = 0.65
DEFAULT_TOP_P = 0.85
DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_MAX_TOTAL_TOKENS = 8192  # prompt + answer (the training cut is the trainer's --max_seq_len)
DEFAULT_SEED = 2026  # upstream reseeds with this before every eval image


class InferenceError(UserError):
    """A request the model cannot serve as asked (the prompt does not fit, images and markers disagree)."""


def add_model_flags(parser):
    """The flags that say which model to load and how to sample from it (shared by both front ends)."""
    files = parser.add_argument_group("model files")
    files.add_argument("--load", type=int, default=0, choices=[0, 1],
                       help="0: native .pth weights; 1: a transformers folder (scripts/convert_vlm.py)")
    files.add_argument("--save_dir", default=str(DEFAULT_SAVE_DIR), help="folder of .pth weights")
    files.add_argument("--model_mode", type=int, default=1, choices=range(len(MODEL_MODES)),
                       help="weights {save_dir}/{mode}_{hidden}.pth: 0 pretrain_vlm, 1 sft_vlm, 2 sft_vlm_multi")
    files.add_argument("--weight", default=None, metavar="PATH", help="a .pth file instead of the --model_mode name")
    files.add_argument("--transformers_dir", default=str(DEFAULT_TRANSFORMERS_DIR),
                       help="the transformers folder read with --load 1")
    files.add_argument("--vision_model_path", default=None,
                       help="vision encoder folder (default: the one the weights were trained with if it is there, "
                            "else the preset's; with --load 1, only for a folder without its own vision_model/)")
    files.add_argument("--tokenizer_path", default=None,
                       help=f"folder with tokenizer.json (default: the model's preset's, e.g. "
                            f"{DEFAULT_TOKENIZER_PATH.relative_to(REPO_ROOT)}/, or the transformers folder with "
                            f"--load 1)")
    shape = parser.add_argument_group("model (--load 0; the weights' own architecture file or keys decide what is "
                                      "not given)")
    add_preset_flags(shape)
    shape.add_argument("--use_moe", type=int, default=None, choices=[0, 1])
    sampling = parser.add_argument_group("generation")
    sampling.add_argument("--max_new_tokens", type=bounded(int, 1), default=None,
                          help=f"answer length, at most (default {DEFAULT_MAX_NEW_TOKENS})")
    # --max_seq_len: upstream's eval_vlm.py / web demo name for it, kept so their commands still run.
    sampling.add_argument("--max_total_tokens", "--max_seq_len", dest="max_total_tokens", type=bounded(int, 2),
                          default=DEFAULT_MAX_TOTAL_TOKENS,
                          help="prompt + answer tokens, at most; the oldest turns are left out to fit "
                               "(--max_seq_len: the same, upstream's name)")
    sampling.add_argument("--temperature", type=bounded(float, 0), default=DEFAULT_TEMPERATURE,
                          help="0: greedy decoding")
    sampling.add_argument("--top_p", type=bounded(float, 0, 1, low_open=True), default=DEFAULT_TOP_P)
    sampling.add_argument("--seed", type=bounded(int, 0, MAX_SEED), default=DEFAULT_SEED)
    sampling.add_argument("--device", type=device_flag, default=default_device())
    sampling.add_argument("--dtype", default=None, choices=DTYPE_NAMES,
                          help="weights and activations (default: bfloat16 on a CUDA GPU that supports it, else "
                               "float16 on CUDA; float32 on CPU)")
    return parser


def inference_dtype(device, name: str = None) -> torch.dtype:
    """The dtype a model runs in for generation and scoring: `name` (one of DTYPE_NAMES) if given; else bf16 on
    CUDA where the GPU has it (fused attention kernels, half the memory), fp16 on older GPUs, fp32 on CPU."""
    if name is not None:
        return torch_dtype(name)
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def check_flags(parser, args):
    """Refuse generation flags that cannot work, through the parser (usage line plus one error line)."""
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        parser.error("--max_new_tokens must be at least 1")
    if args.temperature < 0:
        parser.error("--temperature must be >= 0 (0: greedy)")
    if not 0 < args.top_p <= 1:
        parser.error("--top_p must be in (0, 1]")
    max_new_tokens = DEFAULT_MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens
    if args.max_total_tokens <= max_new_tokens:
        parser.error(f"--max_total_tokens {args.max_total_tokens} leaves no room for a prompt before {max_new_tokens} "
                     f"new tokens")


@dataclass
class LoadedModel:
    """A model ready for generation, its tokenizer, and a lock: one generation at a time per model."""
    model: MiniMindVLM
    tokenizer: object
    device: torch.device
    source: str  # the file or folder the weights came from
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def image_processor(self):
        """The model config's image processor (dataset.processing.image_processor_for), built once."""
        if "_image_processor" not in self.__dict__:
            self.__dict__["_image_processor"] = image_processor_for(self.model.config)
        return self.__dict__["_image_processor"]

    @property
    def max_positions(self) -> int:
        return self.model.config.max_position_embeddings


def weight_file_from_flags(save_dir, weight, model_mode: int, hidden_size: int, use_moe: bool,
                           preset: str = None) -> Path:
    """`--weight` if given, else `{save_dir}/{pretrain_vlm|sft_vlm|sft_vlm_multi}_{hidden}{_moe}.pth` (hidden
    None: the preset's)."""
    if weight is not None:
        return Path(weight)
    hidden_size = hidden_size or PRESETS[preset or DEFAULT_PRESET].hidden_size
    return weight_path(save_dir, MODEL_MODES[model_mode], hidden_size, bool(use_moe))



def read_checkpoint(weight_file) -> dict:
    """The tensors of a .pth file (legacy keys converted), with a hint on how to get a missing one."""
    weight_file = Path(weight_file)
    if not weight_file.is_file():
        raise FileNotFoundError(f"weights not found: {weight_file} (download them with `python -m scripts.download "
                                f"--what vlm`, train them, or pass --weight PATH / --save_dir DIR)")
    state_dict = read_state_dict(weight_file)
    if is_legacy_state_dict(state_dict):
        state_dict = convert_legacy_state_dict(state_dict, VLMConfig())
    return state_dict


def load_native_model(weight_file, vision_model_path, device, hidden_size=None, num_hidden_layers=None,
                      use_moe=None, log=print, vision_encoder=None, projector=None,
                      dtype=torch.float32) -> MiniMindVLM:
    """MiniMindVLM with its vision encoder from a .pth file, in `dtype`: the architecture from the file's sidecar,
    or read off its keys (model/weights.py read_architecture); a shape given here overrides it."""
    state_dict = read_checkpoint(weight_file)
    architecture = read_architecture(weight_file) if architecture_path(weight_file).is_file() else None
    if architecture is not None and isinstance(architecture.config, TransformersVLMConfig):
        # A transformers LM's file: its architecture file says it all (the shape flags are MiniMind's).
        config = architecture.config
        with quiet_transformers():
            model = TransformersVLM(config, vision_model_path=vision_model_path or default_vision_model_path(
                config, architecture.vision_model_path))
        return finish_loading(model, state_dict, weight_file, device, dtype, log)
    found = describe_state_dict(state_dict)
    if found["hidden_size"] is None:
        raise WeightsMismatchError(f"{weight_file}: no MiniMind weights in this file")
    if not found["has_vision_proj"]:  # its projection would be random: the images would mean nothing
        raise WeightsMismatchError(f"{weight_file} has no vision_proj (a language-model-only file?): use "
                                   f"pretrain_vlm_* or sft_vlm_* weights")
    architecture = read_architecture(weight_file, state_dict)
    config = architecture.config
    flags = dict(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                 use_moe=None if use_moe is None else bool(use_moe), projector=projector)
    for name, value in flags.items():
        if value is not None:
            setattr(config, name, value)
    if vision_encoder is not None and vision_encoder != config.vision_encoder:
        config.vision_encoder, config.image_processing = vision_encoder, VISION_ENCODERS[vision_encoder].processing
    if vision_model_path is None:
        vision_model_path = default_vision_model_path(config, architecture.vision_model_path)
    with quiet_transformers():
        model = MiniMindVLM(config, vision_model_path=vision_model_path)
    return finish_loading(model, state_dict, weight_file, device, dtype, log)


def finish_loading(model, state_dict, weight_file, device, dtype, log):
    """`model` with `state_dict` (read from weight_file) loaded strictly, in eval mode on `device` in `dtype`."""
    try:
        load_weights(model, state_dict, log=None)
    except WeightsMismatchError as error:
        raise WeightsMismatchError(str(error).replace("state_dict", str(weight_file), 1)) from None
    if log is not None:
        log(f"loaded {weight_file}: {count_parameters(model)[0] / 1e6:.2f}M parameters (without the vision "
            f"encoder), {str(dtype).removeprefix('torch.')} on {device}")
    return model.eval().to(device=device, dtype=dtype)


def load_transformers_model(folder, vision_model_path, device, log=print, dtype=torch.float32) -> MiniMindVLM:
    """A folder written by scripts/convert_vlm.py, read with this repo's class (no remote code runs), with the
    folder's own CLIP (vision_model/) or, for a folder without one, CLIP from `vision_model_path`."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no transformers model in {folder} (write one with `python -m scripts.convert_vlm "
                                f"--to transformers`, or pass --transformers_dir DIR)")
    model_class = VLM_CLASSES.get(json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type"),
                                  MiniMindVLM)
    with quiet_transformers():
        model = model_class.from_pretrained(str(folder), dtype=torch.float32)
        try:
            if model.vision_encoder is None:
                model.attach_vision_encoder(vision_model_path or default_vision_model_path(model.config))
        except ValueError as error:  # a CLIP of another width than the folder's vision_proj
            raise WeightsMismatchError(str(error)) from None
    if log is not None:
        log(f"loaded {folder}: {count_parameters(model)[0] / 1e6:.2f}M parameters (without the vision encoder), "
            f"{str(dtype).removeprefix('torch.')} on {device}")
    return model.eval().to(device=device, dtype=dtype)


def load_model(source, load_transformers: bool, tokenizer_path, vision_model_path, device, hidden_size=None,
               num_hidden_layers=None, use_moe=None, log=print, vision_encoder=None, projector=None,
               dtype_name: str = None) -> LoadedModel:
    """Tokenizer first when given (a quick failure), then the model in `inference_dtype(device, dtype_name)`;
    without a tokenizer, the transformers folder's, else the model's preset's; checks the two agree on the image
    placeholder."""
    source = Path(source)
    if tokenizer_path is None and load_transformers and (source / "tokenizer.json").is_file():
        tokenizer_path = source
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path is not None else None
    device = torch.device(device)
    dtype = inference_dtype(device, dtype_name)
    if load_transformers:
        model = load_transformers_model(source, vision_model_path, device, log=log, dtype=dtype)
    else:
        model = load_native_model(source, vision_model_path, device, hidden_size, num_hidden_layers, use_moe, log=log,
                                  vision_encoder=vision_encoder, projector=projector, dtype=dtype)
    if isinstance(model, TransformersVLM):  # the LM folder's tokenizer, with the image placeholder the model uses
        tokenizer_path = tokenizer_path or model.config.language_model
        tokenizer = load_tokenizer(tokenizer_path, model.config)
    elif tokenizer is None:
        tokenizer_path = PRESETS[preset_for(model.config.lm_family, model.config.projector)].tokenizer_path
        tokenizer = load_tokenizer(tokenizer_path)
    try:
        check_tokenizer_matches(tokenizer, model.config)
    except ValueError as error:
        raise WeightsMismatchError(f"{tokenizer_path}: {error}") from None
    return LoadedModel(model, tokenizer, device, str(source))


def load_model_from_flags(args, log=print) -> LoadedModel:
    """`load_model` for the flags of `add_model_flags`: the shape flags apply to native weights only."""
    if args.load == 1:
        return load_model(args.transformers_dir, True, args.tokenizer_path, args.vision_model_path, args.device,
                          log=log, dtype_name=args.dtype)
    weight_file = weight_file_from_flags(args.save_dir, args.weight, args.model_mode, args.hidden_size,
                                         args.use_moe, args.preset)
    return load_model(weight_file, False, args.tokenizer_path, args.vision_model_path, args.device,
                      args.hidden_size, args.num_hidden_layers, args.use_moe, log=log,
                      vision_encoder=args.vision_encoder, projector=args.projector, dtype_name=args.dtype)


def is_transformers_folder(path: Path) -> bool:
    """A folder written by scripts/convert_vlm.py (a CLIP folder has a config.json too)."""
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type") in VLM_CLASSES
    except (OSError, ValueError):
        return False


def find_checkpoints(save_dir) -> list:
    """Loadable weights in a folder: its .pth files (resume checkpoints too) and transformers subfolders."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    files = sorted(p for p in save_dir.glob("*.pth") if p.is_file())
    folders = sorted(p for p in save_dir.iterdir() if p.is_dir() and is_transformers_folder(p))
    return files + folders
