"""Convert MiniMind-V weights between a native .pth file and a transformers folder, both ways.

.pth -> folder:   python -m scripts.convert_vlm --to transformers --torch_path out/sft_vlm_512.pth \
                      --transformers_dir MiniMind2-V
folder -> .pth:   python -m scripts.convert_vlm --to torch --transformers_dir MiniMind2-V \
                      --torch_path out/sft_vlm_512.pth
Bit-exact copy:   add --dtype float32 (default: bfloat16 in a folder, as upstream; float16 in a .pth, as released)

The model's shape (hidden size, layers, MoE) is read off the .pth file. The folder holds config.json (with
`auto_map`), the model code (model_vlm.py, model_minimind.py), model.safetensors, the tokenizer, and CLIP's
preprocessor_config.json with a processor_config.json naming CLIPProcessor, so that

    model = AutoModelForCausalLM.from_pretrained("MiniMind2-V", trust_remote_code=True,
                                                 vision_model_path="model/vision_model/clip-vit-base-patch16")
    tokenizer = AutoTokenizer.from_pretrained("MiniMind2-V", trust_remote_code=True)
    image_processor = AutoImageProcessor.from_pretrained("MiniMind2-V")
    processor = AutoProcessor.from_pretrained("MiniMind2-V", trust_remote_code=True)  # CLIP images + tokenizer

work. CLIP itself is not copied into the folder: without `vision_model_path` the model has no vision encoder
(text only, or precomputed `image_features`). `python eval_vlm.py --load 1 --transformers_dir MiniMind2-V` chats
with the folder.
"""
import argparse
import json
import shutil
from pathlib import Path

import torch

from common import (DEFAULT_SAVE_DIR, DEFAULT_TOKENIZER_PATH, DEFAULT_TRANSFORMERS_DIR, DTYPES, REPO_ROOT, atomic_save,
                    quiet_transformers, run_cli)
from dataset.processing import CLIP_IMAGE_SIZE, CLIP_MEAN, CLIP_STD
from inference.loading import read_checkpoint
from model.model_vlm import CLIP_HIDDEN_SIZE, DEFAULT_VISION_MODEL_PATH, MiniMindVLM, VLMConfig
from model.weights import VISION_PROJ_PREFIX, describe_state_dict, load_weights

DEFAULT_DTYPE = {"transformers": "bfloat16", "torch": "float16"}
DEFAULT_TORCH_PATH = DEFAULT_SAVE_DIR / "sft_vlm_512.pth"
MODEL_CODE_FILES = ("model_vlm.py", "model_minimind.py", "compat.py")  # imported relatively, in this order
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"
BICUBIC = 3  # PIL's resample code, as in openai/clip-vit-base-patch16's preprocessor_config.json


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--to", required=True, choices=("transformers", "torch"), help="the format to write")
    parser.add_argument("--torch_path", default=str(DEFAULT_TORCH_PATH), help="the .pth file (read or written)")
    parser.add_argument("--transformers_dir", default=str(DEFAULT_TRANSFORMERS_DIR),
                        help="the transformers folder (written or read)")
    parser.add_argument("--tokenizer_path", default=str(DEFAULT_TOKENIZER_PATH),
                        help="tokenizer copied into the folder (--to transformers)")
    parser.add_argument("--vision_model_path", default=str(DEFAULT_VISION_MODEL_PATH),
                        help="CLIP folder whose preprocessor_config.json is copied (openai's settings if absent)")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES),
                        help="dtype written (default: bfloat16 for --to transformers, float16 for --to torch)")
    return parser.parse_args(argv)


def config_for(state_dict) -> VLMConfig:
    """The VLMConfig a (current-scheme) state_dict was made with; the embedding is tied as in every MiniMind."""
    found = describe_state_dict(state_dict)
    projection = state_dict.get(VISION_PROJ_PREFIX + "vision_proj.0.weight")
    # tie_word_embeddings makes save_pretrained store the shared matrix once and from_pretrained re-tie it.
    return VLMConfig(hidden_size=found["hidden_size"], num_hidden_layers=found["num_hidden_layers"],
                     use_moe=found["use_moe"], tie_word_embeddings=True,
                     ve_hidden_size=projection.shape[1] if projection is not None else CLIP_HIDDEN_SIZE)


def write_image_processing(out_dir: Path, vision_model_path: Path):
    """CLIP's image preprocessing, so that AutoImageProcessor loads from the folder, and AutoProcessor gives a
    CLIPProcessor made of it and the MiniMind tokenizer (upstream issue #110: the processor was not saved)."""
    (out_dir / PROCESSOR_CONFIG).write_text(json.dumps({"processor_class": "CLIPProcessor"}) + "\n", encoding="utf-8")
    source = Path(vision_model_path) / PREPROCESSOR_CONFIG
    if source.is_file():
        shutil.copyfile(source, out_dir / PREPROCESSOR_CONFIG)
        return
    settings = {  # the same steps as dataset/processing.py's preprocess_image
        "image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True,
        "do_resize": True, "size": {"shortest_edge": CLIP_IMAGE_SIZE}, "resample": BICUBIC,
        "do_center_crop": True, "crop_size": {"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE},
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": CLIP_MEAN.tolist(), "image_std": CLIP_STD.tolist(),
    }
    (out_dir / PREPROCESSOR_CONFIG).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def copy_tokenizer(tokenizer_path: Path, out_dir: Path):
    """The tokenizer files as they are (any transformers version reads them as before)."""
    tokenizer_path = Path(tokenizer_path)
    if not (tokenizer_path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"tokenizer not found in {tokenizer_path}: pass --tokenizer_path")
    for name in TOKENIZER_FILES:
        if (tokenizer_path / name).is_file():
            shutil.copyfile(tokenizer_path / name, out_dir / name)


def torch_to_transformers(torch_path, out_dir, tokenizer_path, vision_model_path, dtype: torch.dtype, log=print):
    """Write the folder: config.json with auto_map, model code, weights, tokenizer, CLIP preprocessing."""
    state_dict = read_checkpoint(torch_path)
    model = MiniMindVLM(config_for(state_dict), vision_model_path=None)
    load_weights(model, state_dict, log=None)
    model = model.to(dtype)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # config.json gets auto_map {AutoConfig: model_vlm.VLMConfig, AutoModelForCausalLM: model_vlm.MiniMindVLM}
    # and save_pretrained copies the classes' source files beside it.
    VLMConfig.register_for_auto_class()
    MiniMindVLM.register_for_auto_class("AutoModelForCausalLM")
    with quiet_transformers():
        model.save_pretrained(out_dir)
    for name in MODEL_CODE_FILES:  # save_pretrained's copies, made sure of
        shutil.copyfile(REPO_ROOT / "model" / name, out_dir / name)
    copy_tokenizer(tokenizer_path, out_dir)
    write_image_processing(out_dir, vision_model_path)
    config = model.config
    log(f"wrote {out_dir} ({config.hidden_size}x{config.num_hidden_layers}{' MoE' if config.use_moe else ''}, "
        f"{str(dtype).removeprefix('torch.')}) from {torch_path}")


def transformers_to_torch(folder, torch_path, dtype: torch.dtype, log=print):
    """Write the .pth the training scripts write: LM + vision_proj, both tied keys, no CLIP."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no transformers model in {folder} (config.json missing)")
    with quiet_transformers():  # this repo's class: nothing from the folder is executed
        model = MiniMindVLM.from_pretrained(str(folder), dtype=dtype)
    state_dict = {k: v.detach().to(dtype).cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_save(state_dict, torch_path)
    log(f"wrote {torch_path} ({len(state_dict)} tensors, {str(dtype).removeprefix('torch.')}) from {folder}")


def main(argv=None):
    args = parse_args(argv)
    dtype = DTYPES[args.dtype or DEFAULT_DTYPE[args.to]]
    if args.to == "transformers":
        torch_to_transformers(args.torch_path, args.transformers_dir, args.tokenizer_path, args.vision_model_path,
                              dtype)
    else:
        transformers_to_torch(args.transformers_dir, args.torch_path, dtype)


if __name__ == "__main__":
    run_cli(main)
