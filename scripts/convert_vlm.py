"""Convert MiniMind-V weights between a native .pth file and a transformers folder, both ways.

.pth -> folder:   python -m scripts.convert_vlm --to transformers --torch_path out/sft_vlm_512.pth \
                      --transformers_dir MiniMind2-V
folder -> .pth:   python -m scripts.convert_vlm --to torch --transformers_dir MiniMind2-V \
                      --torch_path out/sft_vlm_512.pth
Bit-exact copy:   add --dtype float32 (default: bfloat16 in a folder, as upstream; float16 in a .pth, as released)

The model's shape (hidden size, layers, MoE) is read off the .pth file. The folder is self-contained: config.json
(with `auto_map`), the model and processor code (model_vlm.py, model_minimind.py, processing_minimind_v.py),
model.safetensors, the CLIP vision tower in vision_model/, the tokenizer, and the processor's settings and chat
template, so that

    model = AutoModelForImageTextToText.from_pretrained("MiniMind2-V", trust_remote_code=True)  # CLIP included
    processor = AutoProcessor.from_pretrained("MiniMind2-V", trust_remote_code=True)
    pipe = pipeline("image-text-to-text", model="MiniMind2-V", trust_remote_code=True)

work (AutoModelForCausalLM, AutoTokenizer and AutoImageProcessor too). Without a CLIP folder at
--vision_model_path the folder has no vision tower, and loading it needs `vision_model_path=`.
`python eval_vlm.py --load 1 --transformers_dir MiniMind2-V` chats with the folder.
"""
if not __package__:  # started as a file: its folder, not the repo root, is on the import path
    raise SystemExit("run it from the repository root as: python -m scripts.convert_vlm")

import argparse
import json
import shutil
from pathlib import Path

import torch

from common import (DEFAULT_SAVE_DIR, DEFAULT_TRANSFORMERS_DIR, DTYPE_NAMES, REPO_ROOT,
                    atomic_save, quiet_transformers, run_cli, torch_dtype)
from inference.loading import read_checkpoint
from dataset.processing import image_processor_for, load_tokenizer
from model.model_hf_vlm import TOKENIZER_CHAT_FORMAT, VLM_CLASSES, TransformersVLMConfig
from model.model_vlm import MiniMindVLM, VLMConfig
from model.presets import PRESETS, default_vision_model_path, preset_for
from model.processing_minimind_v import CHAT_TEMPLATES, placeholder_unit, with_image_parts
from model.weights import WeightsMismatchError, load_weights, read_architecture, write_architecture

DEFAULT_DTYPE = {"transformers": "bfloat16", "torch": "float16"}
DEFAULT_TORCH_PATH = DEFAULT_SAVE_DIR / "sft_vlm_512.pth"
MODEL_CODE_FILES = ("model_vlm.py", "model_minimind.py", "compat.py")  # imported relatively, in this order
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"
# The processor's chat template. The legacy JSON name, which both transformers majors read for processors only, so
# the tokenizer keeps its own template (chat_template.jinja or tokenizer_config.json).
PROCESSOR_CHAT_TEMPLATE = "chat_template.json"
PROCESSOR_CODE_FILES = ("processing_minimind_v.py",)  # imports only compat.py of the project
VISION_SUBFOLDER = "vision_model"
MODEL_AUTO_MAP = {"AutoConfig": "model_vlm.VLMConfig", "AutoModelForCausalLM": "model_vlm.MiniMindVLM",
                  "AutoModelForImageTextToText": "model_vlm.MiniMindVLM"}
# A transformers LM's model (model_hf_vlm.py, shipped beside the MiniMind files it imports).
HF_LM_AUTO_MAP = {"AutoConfig": "model_hf_vlm.TransformersVLMConfig",
                  "AutoModelForCausalLM": "model_hf_vlm.TransformersVLM",
                  "AutoModelForImageTextToText": "model_hf_vlm.TransformersVLM"}
HF_LM_CODE_FILES = ("model_hf_vlm.py",)
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_minimind_v.MiniMindVProcessor"}
IMAGE_PROCESSOR_AUTO_MAP = {"AutoImageProcessor": "processing_minimind_v.MiniMindVImageProcessor",
                            **PROCESSOR_AUTO_MAP}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--to", required=True, choices=("transformers", "torch"), help="the format to write")
    parser.add_argument("--torch_path", default=str(DEFAULT_TORCH_PATH), help="the .pth file (read or written)")
    parser.add_argument("--transformers_dir", default=str(DEFAULT_TRANSFORMERS_DIR),
                        help="the transformers folder (written or read)")
    parser.add_argument("--tokenizer_path", default=None,
                        help="tokenizer copied into the folder (--to transformers; default: the model's preset's, "
                             "e.g. model/ for minimind2-v)")
    parser.add_argument("--vision_model_path", default=None,
                        help=f"vision encoder folder whose tower is copied into the folder's {VISION_SUBFOLDER}/ "
                             f"(--to transformers; default: the one the weights were trained with, else the "
                             f"preset's; if absent, the folder has no vision encoder)")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="whose tokenizer and encoder folder to ship by default (default: the weights' own, from "
                             "their architecture file or recognised from their keys)")
    parser.add_argument("--dtype", default=None, choices=DTYPE_NAMES,
                        help="dtype written (default: bfloat16 for --to transformers, float16 for --to torch)")
    return parser.parse_args(argv)


def architecture_for(torch_path, state_dict):
    """The architecture a .pth was made with (its sidecar, else its keys); the embedding is tied as in every
    MiniMind: save_pretrained then stores the shared matrix once and from_pretrained re-ties it."""
    architecture = read_architecture(torch_path, state_dict)
    if not isinstance(architecture.config, TransformersVLMConfig):  # a transformers LM ties as its config says
        architecture.config.tie_word_embeddings = True
    return architecture


def write_json(path: Path, settings: dict):
    path.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_processor_files(out_dir: Path, config: VLMConfig, tokenizer_path):
    """MiniMindVProcessor's settings, its image processor's and its chat template, so that AutoProcessor and
    AutoImageProcessor (trust_remote_code=True) build them from processing_minimind_v.py (upstream issue #110:
    the processor was not saved). A transformers LM's template is its tokenizer's, taught image parts."""
    write_json(out_dir / PROCESSOR_CONFIG, {
        "processor_class": "MiniMindVProcessor", "auto_map": PROCESSOR_AUTO_MAP,
        "image_placeholder": placeholder_unit(config.image_special_token), "image_seq_length": len(config.image_ids)})
    image_processor = image_processor_for(config)  # the one training used, as its settings
    write_json(out_dir / PREPROCESSOR_CONFIG, {
        "image_processor_type": "MiniMindVImageProcessor", "processor_class": "MiniMindVProcessor",
        "auto_map": IMAGE_PROCESSOR_AUTO_MAP, "image_size": image_processor.image_size,
        "image_processing": image_processor.image_processing})
    if config.chat_format == TOKENIZER_CHAT_FORMAT:
        chat_template = with_image_parts(load_tokenizer(tokenizer_path).chat_template)
    else:
        chat_template = CHAT_TEMPLATES[config.chat_format]
    write_json(out_dir / PROCESSOR_CHAT_TEMPLATE, {"chat_template": chat_template})


def copy_tokenizer(tokenizer_path: Path, out_dir: Path):
    """The tokenizer files as they are (any transformers version reads them as before)."""
    tokenizer_path = Path(tokenizer_path)
    if not (tokenizer_path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"tokenizer not found in {tokenizer_path}: pass --tokenizer_path")
    for name in TOKENIZER_FILES:
        if (tokenizer_path / name).is_file():
            shutil.copyfile(tokenizer_path / name, out_dir / name)


def attach_clip(model: MiniMindVLM, vision_model_path, log) -> bool:
    """Give the model the vision encoder to ship; False (with a note) when there is no encoder folder."""
    if not (Path(vision_model_path) / "config.json").is_file():
        log(f"note: no {model.config.vision_encoder.upper()} at {vision_model_path}: the folder gets no vision "
            f"encoder, so loading it needs vision_model_path= (pass --vision_model_path to include one)")
        return False
    with quiet_transformers():
        try:
            model.attach_vision_encoder(vision_model_path)
        except ValueError as error:  # an encoder of another width than the checkpoint's vision_proj
            raise WeightsMismatchError(str(error)) from None
    return True


def torch_to_transformers(torch_path, out_dir, tokenizer_path, vision_model_path, dtype: torch.dtype, log=print,
                          preset=None):
    """Write the folder: config.json with auto_map, code, weights, vision tower, tokenizer, processor."""
    state_dict = read_checkpoint(torch_path)
    architecture = architecture_for(torch_path, state_dict)
    transformers_lm = isinstance(architecture.config, TransformersVLMConfig)
    with quiet_transformers():
        model = VLM_CLASSES[architecture.config.model_type](architecture.config, vision_model_path=None)
    load_weights(model, state_dict, log=None)
    if vision_model_path is None:
        vision_model_path = (PRESETS[preset].vision_model_path if preset else
                             default_vision_model_path(model.config, architecture.vision_model_path))
    if tokenizer_path is None:
        tokenizer_path = (model.config.language_model if transformers_lm else
                          PRESETS[preset or architecture.preset].tokenizer_path)
    with_clip = attach_clip(model, vision_model_path, log)
    model = model.to(dtype)  # the CLIP encoder too
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.config
    config.vision_model_subfolder = VISION_SUBFOLDER if with_clip else None
    config.auto_map = dict(HF_LM_AUTO_MAP if transformers_lm else MODEL_AUTO_MAP)  # code copied below
    with quiet_transformers():
        model.save_pretrained(out_dir)  # the LM and vision_proj: CLIP is outside the module tree
        if with_clip:
            model.vision_encoder.save_pretrained(out_dir / VISION_SUBFOLDER)
    for name in (HF_LM_CODE_FILES if transformers_lm else ()) + MODEL_CODE_FILES + PROCESSOR_CODE_FILES:
        shutil.copyfile(REPO_ROOT / "model" / name, out_dir / name)
    copy_tokenizer(tokenizer_path, out_dir)
    write_processor_files(out_dir, config, tokenizer_path)
    log(f"wrote {out_dir} ({config.hidden_size}x{config.num_hidden_layers}{' MoE' if config.use_moe else ''}, "
        f"{str(dtype).removeprefix('torch.')}{f', with {config.vision_encoder.upper()}' if with_clip else ''}) from "
        f"{torch_path}")


def transformers_to_torch(folder, torch_path, dtype: torch.dtype, log=print):
    """Write the .pth the training scripts write: LM + vision_proj, both tied keys, no CLIP."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no transformers model in {folder} (config.json missing)")
    model_class = VLM_CLASSES[json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")]
    with quiet_transformers():  # this repo's class: nothing from the folder is executed; CLIP is not needed
        model = model_class.from_pretrained(str(folder), dtype=dtype, vision_model_subfolder=None)
    state_dict = {k: v.detach().to(dtype).cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_save(state_dict, torch_path)
    config = model.config
    write_architecture(torch_path, config, preset_for(config.lm_family, config.projector), None)
    log(f"wrote {torch_path} ({len(state_dict)} tensors, {str(dtype).removeprefix('torch.')}) from {folder}")


def main(argv=None):
    args = parse_args(argv)
    dtype = torch_dtype(args.dtype or DEFAULT_DTYPE[args.to])
    if args.to == "transformers":
        torch_to_transformers(args.torch_path, args.transformers_dir, args.tokenizer_path, args.vision_model_path,
                              dtype, preset=args.preset)
    else:
        transformers_to_torch(args.transformers_dir, args.torch_path, dtype)


if __name__ == "__main__":
    run_cli(main)
