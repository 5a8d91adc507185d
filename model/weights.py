"""Weight files: the one naming scheme, the one reader and the one strict loader every script uses.

Upstream loads with `strict=False`, so a wrong file loads silently and trains garbage. Here a file either
fits the model exactly (after converting legacy Feb-2025 keys), or the error names the keys that differ and
the flags that would fit the file.
"""
import re
from pathlib import Path

import torch

from common import UserError

from .model_minimind import convert_legacy_state_dict, is_legacy_state_dict

VISION_PROJ_PREFIX = "vision_proj."
# Prefixes that wrappers add in front of every key: DDP, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class WeightsMismatchError(UserError):
    """A weight file does not fit the model; the message says which keys and which flags would fit."""


def weight_path(save_dir, weight_name: str, hidden_size: int, use_moe: bool) -> Path:
    """`{save_dir}/{weight_name}_{hidden}{_moe}.pth`, e.g. out/pretrain_vlm_512.pth (upstream's scheme)."""
    return Path(save_dir) / f"{weight_name}_{hidden_size}{'_moe' if use_moe else ''}.pth"


def read_state_dict(path) -> dict:
    """Tensors of a `.pth` file, read with `weights_only=True` (a file from the internet cannot run code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors, truncated zip, code objects refused by weights_only
        raise WeightsMismatchError(f"{path}: not a loadable weights file ({type(error).__name__}: "
                                   f"{str(error).splitlines()[0] if str(error) else ''})") from error
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # a resume checkpoint
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsMismatchError(f"{path}: expected a dict of tensors (a state_dict)")
    state_dict = {}
    for key, tensor in obj.items():
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        state_dict[key] = tensor
    return state_dict


def describe_state_dict(state_dict) -> dict:
    """Architecture a (current-scheme) state_dict implies: hidden size, layer count, MoE, vision_proj."""
    layer_ids = {int(m.group(1)) for k in state_dict if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    embed = state_dict.get("model.embed_tokens.weight", state_dict.get("lm_head.weight"))
    return {
        "hidden_size": int(embed.shape[1]) if embed is not None else None,
        "num_hidden_layers": max(layer_ids) + 1 if layer_ids else 0,
        "use_moe": any(".mlp.experts." in k for k in state_dict),
        "has_vision_proj": any(k.startswith(VISION_PROJ_PREFIX) for k in state_dict),
    }


def fitting_flags(info: dict) -> str:
    return (f"--hidden_size {info['hidden_size']} --num_hidden_layers {info['num_hidden_layers']} "
            f"--use_moe {int(info['use_moe'])}")


def load_weights(model, source, *, allow_missing_vision_proj: bool = True, log=print) -> dict:
    """Load a `.pth` path (or a state_dict) into `model` strictly; returns what was found.

    Legacy keys are converted (q/k rows permuted for the RoPE layout). A language-model-only file (e.g.
    `llm_512.pth`) may go into a VLM: every LM key must match and `vision_proj` keeps its fresh init.
    """
    name = str(source) if not isinstance(source, dict) else "state_dict"
    state_dict = read_state_dict(source) if not isinstance(source, dict) else dict(source)
    legacy = is_legacy_state_dict(state_dict)
    if legacy:
        state_dict = convert_legacy_state_dict(state_dict, model.config)
    info = describe_state_dict(state_dict)
    info["legacy"] = legacy

    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    lm_only_file = bool(missing) and all(k.startswith(VISION_PROJ_PREFIX) for k in missing)
    if lm_only_file and allow_missing_vision_proj and not unexpected:
        missing = []
    wrong_shape = [k for k in state_dict if k in expected and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        problems = []
        if wrong_shape:
            k = wrong_shape[0]
            problems.append(f"{len(wrong_shape)} key(s) with another shape (e.g. {k}: file "
                            f"{tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)})")
        if missing:
            problems.append(f"{len(missing)} key(s) missing from the file (e.g. {missing[0]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s) (e.g. {unexpected[0]})")
        hint = f"; the file fits {fitting_flags(info)}" if info["hidden_size"] else ""
        raise WeightsMismatchError(f"{name} does not fit the model: {'; '.join(problems)}{hint}")

    model_keys = set(expected)
    to_load = {k: v for k, v in state_dict.items() if k in model_keys}
    model.load_state_dict(to_load, strict=not lm_only_file)
    info["vision_proj_initialised"] = lm_only_file
    if log is not None:
        note = " (legacy keys converted)" if legacy else ""
        note += "; vision_proj freshly initialised (language-model-only file)" if lm_only_file else ""
        log(f"loaded {name}: {len(to_load)} tensors{note}")
    return info
