"""Weight files: the one naming scheme, the one reader and the one strict loader every script uses.

Upstream loads with `strict=False`, so a wrong file loads silently and trains garbage. Here a file either
fits the model exactly (after converting legacy Feb-2025 keys), or the error names the keys that differ and
the flags that would fit the file.
"""
import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from common import SaveError, UserError

from .model_hf_vlm import TransformersVLMConfig
from .model_vlm import PROJECTORS, QFORMER_FIELDS, VLMConfig
from .model_minimind import (DEFAULT_LM_FAMILY, convert_legacy_state_dict, is_legacy_buffer, is_legacy_state_dict,
                             legacy_key_name)
from .presets import lm_config_kwargs, preset_for, vlm_config

VISION_PROJ_PREFIX = "vision_proj."
# The projector kinds, told apart by their keys (model_vlm.PROJECTORS: each class names its input weight).
PROJECTOR_INPUT_KEYS = {name: VISION_PROJ_PREFIX + projector.INPUT_WEIGHT for name, projector in PROJECTORS.items()}
# In the keys of a model with peft LoRA adapters (a --trainable lora run's resume checkpoint).
LORA_KEY_MARK = ".lora_A."
# Prefixes that wrappers add in front of every key: DDP, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class WeightsMismatchError(UserError):
    """A weight file does not fit the model; the message says which keys and which flags would fit."""


def weight_path(save_dir, weight_name: str, hidden_size: int, use_moe: bool) -> Path:
    """`{save_dir}/{weight_name}_{hidden}{_moe}.pth`, e.g. out/pretrain_vlm_512.pth (upstream's scheme)."""
    return Path(save_dir) / f"{weight_name}_{hidden_size}{'_moe' if use_moe else ''}.pth"


# ------------------------------------------------------------------ the architecture beside a weights file

ARCHITECTURE_FORMAT = 1  # bump when the sidecar's fields change meaning


def architecture_path(weight_file) -> Path:
    """The JSON that describes a weights file, beside it: out/sft_vlm_512.pth -> out/sft_vlm_512.json."""
    return Path(weight_file).with_suffix(".json")


def write_architecture(weight_file, config, preset: str, vision_model_path):
    """Write the sidecar of `weight_file`: the model config, the preset and the encoder folder it was made with
    (atomically: a reader sees the old file or the new one)."""
    path = architecture_path(weight_file)
    record = {"format": ARCHITECTURE_FORMAT, "preset": preset,
              "vision_model_path": None if vision_model_path is None else str(vision_model_path),
              "config": config.to_dict()}
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise SaveError(f"could not write {path} ({error.strerror or error})") from None


@dataclass
class Architecture:
    """What a weights file was made as: its config, the preset, the encoder folder, and where that was read."""
    config: object  # a model_vlm.VLMConfig
    preset: str
    vision_model_path: str  # None when unknown (read from keys)
    source: str  # "sidecar" or "keys"


def read_architecture(weight_file, state_dict=None) -> Architecture:
    """The architecture of a weights file: its sidecar if it has one, else recognised from its keys and shapes
    (upstream's releases: MiniMind2-V and minimind-3v alike) and completed from the preset of that family and
    projector. Raises WeightsMismatchError for a file that holds no MiniMind weights."""
    sidecar = architecture_path(weight_file)
    if sidecar.is_file():
        try:
            record = json.loads(sidecar.read_text(encoding="utf-8"))
            config_class = (TransformersVLMConfig if record["config"].get("model_type") ==
                            TransformersVLMConfig.model_type else VLMConfig)
            config = config_class.from_dict(record["config"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise WeightsMismatchError(f"{sidecar}: not a readable architecture file ({error}); delete it to "
                                       f"recognise {Path(weight_file).name} from its keys") from None
        return Architecture(config, record.get("preset"), record.get("vision_model_path"), "sidecar")
    state_dict = read_state_dict(weight_file) if state_dict is None else state_dict
    found = describe_state_dict(state_dict)
    if found["hidden_size"] is None:
        raise WeightsMismatchError(f"{weight_file}: no MiniMind weights in this file (no model.embed_tokens)")
    if found["projector"] == "qformer":  # the keys show its shapes, not its head count
        raise WeightsMismatchError(f"{weight_file}: a Q-Former model's weights need their architecture file "
                                   f"{sidecar.name} beside them (the training run writes it)")
    preset = preset_for(found["lm_family"], found["projector"])
    extra = {"ve_hidden_size": found["image_hidden_size"]} if found["image_hidden_size"] else {}
    config = vlm_config(preset, lm_kwargs=found["config_kwargs"], projector=found["projector"], **extra)
    return Architecture(config, preset, None, "keys")


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
    if any(LORA_KEY_MARK in key for key in state_dict):
        raise WeightsMismatchError(f"{path}: the resume checkpoint of a --trainable lora run (adapters not merged); "
                                   f"load the weights file that run wrote in its --save_dir (adapters merged, e.g. "
                                   f"{path.name.replace('_resume', '')})")
    return state_dict


def describe_state_dict(state_dict) -> dict:
    """The architecture a state_dict's keys and shapes imply: the one reading of a weight file's architecture.

    Recognises MiniMind2(-V) (G2), its Feb-2025 legacy keys (G1: `tok_embeddings`, read under their current
    names) and MiniMind-3 / minimind-3v (G3: `q_norm` keys). Returns
      generation ("G1", "G2" or "G3"), lm_family ("minimind2" for G1 and G2, "minimind3"), legacy (G1 keys),
      hidden_size (None: no MiniMind embedding in the file), num_hidden_layers, vocab_size, intermediate_size,
      head_dim, num_attention_heads, num_key_value_heads (G3 only; None for G1/G2, whose files do not show them),
      use_moe, n_routed_experts, n_shared_experts (0 without MoE),
      has_vision_proj, projector ("linear", "mlp", "qformer" or None), image_hidden_size (the projector's input
      width),
      config_kwargs: MiniMindConfig kwargs that build an LM these tensors fit (what the keys cannot show comes
      from the family, presets.lm_config_kwargs).
    """
    legacy = is_legacy_state_dict(state_dict)
    shapes = {(legacy_key_name(k) if legacy else k): tuple(v.shape) for k, v in state_dict.items()
              if not (legacy and is_legacy_buffer(k))}
    layer_ids = {int(m.group(1)) for k in shapes if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    embed = shapes.get("model.embed_tokens.weight", shapes.get("lm_head.weight"))
    layer0 = "model.layers.0."
    use_moe = any(".mlp.experts." in k for k in shapes)
    ffn = shapes.get(layer0 + ("mlp.experts.0.gate_proj.weight" if use_moe else "mlp.gate_proj.weight"))
    shared_ids = {m.group(1) for k in shapes if (m := re.match(r"model\.layers\.0\.mlp\.shared_experts\.(\d+)\.", k))}
    q_norm = shapes.get(layer0 + "self_attn.q_norm.weight")
    head_dim = q_norm[0] if q_norm else None
    projector = next((kind for kind, key in PROJECTOR_INPUT_KEYS.items() if key in shapes), None)
    info = {
        "generation": "G3" if q_norm else "G1" if legacy else "G2",
        "lm_family": "minimind3" if q_norm else DEFAULT_LM_FAMILY,
        "legacy": legacy,
        "hidden_size": embed[1] if embed else None,
        "num_hidden_layers": max(layer_ids) + 1 if layer_ids else 0,
        "vocab_size": embed[0] if embed else None,
        "intermediate_size": ffn[0] if ffn else None,
        "head_dim": head_dim,
        "num_attention_heads": _rows(shapes, layer0 + "self_attn.q_proj.weight", head_dim),
        "num_key_value_heads": _rows(shapes, layer0 + "self_attn.k_proj.weight", head_dim),
        "use_moe": use_moe,
        "n_routed_experts": shapes[layer0 + "mlp.gate.weight"][0] if layer0 + "mlp.gate.weight" in shapes else 0,
        "n_shared_experts": len(shared_ids),
        "has_vision_proj": any(k.startswith(VISION_PROJ_PREFIX) for k in shapes),
        "projector": projector,
        "image_hidden_size": shapes[PROJECTOR_INPUT_KEYS[projector]][-1] if projector else None,
    }
    info["config_kwargs"] = _config_kwargs(info)
    return info


def _rows(shapes: dict, key: str, head_dim):
    """Heads of a q/k projection: its output rows over head_dim (None where head_dim is not known)."""
    return shapes[key][0] // head_dim if head_dim and key in shapes else None


def _config_kwargs(info: dict) -> dict:
    """MiniMindConfig kwargs for a described file: its family's settings, overridden by what the file shows."""
    if info["hidden_size"] is None:
        return {}
    kwargs = lm_config_kwargs(info["lm_family"], info["hidden_size"], info["num_hidden_layers"], info["use_moe"])
    shown = ("vocab_size", "intermediate_size", "head_dim", "num_attention_heads", "num_key_value_heads")
    kwargs.update({name: info[name] for name in shown if info[name] is not None})
    if info["use_moe"]:
        kwargs.update(n_routed_experts=info["n_routed_experts"], n_shared_experts=info["n_shared_experts"])
    return kwargs


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
        hint = ""
        if info["projector"] == "qformer" and model.config.projector != "qformer":
            hint = "; the file holds a Q-Former: leave out the architecture flags, its architecture file gives them"
        elif info["hidden_size"]:  # the flags that build a model this file fits
            preset = "--preset minimind-3v " if info["lm_family"] == "minimind3" else ""
            hint = (f"; the file fits {preset}--hidden_size {info['hidden_size']} --num_hidden_layers "
                    f"{info['num_hidden_layers']} --use_moe {int(info['use_moe'])}")
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


# ------------------------------------------------------------------------------ a BLIP-2 folder's Q-Former

BLIP2_QFORMER_PREFIX = "qformer."  # Blip2Model / Blip2ForConditionalGeneration key names
BLIP2_QUERY_TOKENS = "query_tokens"


@dataclass
class Blip2QFormer:
    """What `--qformer_init` takes from a BLIP-2 folder: its Q-Former's config fields and query count, the width of
    the features its cross-attention reads, and the Q-Former's tensors (QFormerProjector key names)."""
    qformer_config: dict  # model_vlm.QFORMER_FIELDS
    num_query_tokens: int
    encoder_hidden_size: int
    state_dict: dict


def read_blip2_qformer(folder) -> Blip2QFormer:
    """The Q-Former of a BLIP-2 checkpoint folder (config.json with `qformer_config` and `num_query_tokens`,
    model.safetensors or its shards): only its `qformer.*` and `query_tokens` tensors are read, never the whole
    model (a BLIP-2 with its LM is gigabytes)."""
    from safetensors import safe_open
    from transformers import Blip2QFormerConfig

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        qformer_config, num_query_tokens = config["qformer_config"], int(config["num_query_tokens"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise WeightsMismatchError(f"--qformer_init {folder}: not a BLIP-2 folder (its config.json has no "
                                   f"qformer_config and num_query_tokens: {error})") from None
    index = folder / "model.safetensors.index.json"
    files = (sorted({folder / name for name in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()})
             if index.is_file() else [folder / "model.safetensors"])
    if not all(file.is_file() for file in files):
        raise WeightsMismatchError(f"--qformer_init {folder}: no model.safetensors (or one of its shards) there; "
                                   f"a BLIP-2 folder in safetensors format is needed")
    state_dict = {}
    for file in files:
        with safe_open(str(file), framework="pt") as tensors:
            for key in tensors.keys():
                if key == BLIP2_QUERY_TOKENS or key.startswith(BLIP2_QFORMER_PREFIX):
                    state_dict[key] = tensors.get_tensor(key)
    if BLIP2_QUERY_TOKENS not in state_dict:
        raise WeightsMismatchError(f"--qformer_init {folder}: no {BLIP2_QUERY_TOKENS} tensor in its weights")
    # Blip2QFormerConfig's defaults (BLIP-2's own Q-Former: 768 wide, reading EVA ViT-g's 1408-wide features) where
    # the folder's config leaves a field out
    full = {**Blip2QFormerConfig().to_dict(), **qformer_config}
    return Blip2QFormer({name: full[name] for name in QFORMER_FIELDS}, num_query_tokens,
                        int(full["encoder_hidden_size"]), state_dict)


def load_blip2_qformer(projector, blip2: Blip2QFormer, folder, log=print):
    """Copy a BLIP-2 folder's Q-Former and queries into a QFormerProjector built with its config fields and query
    count (its language_projection keeps its fresh init: it maps to this LM's width)."""
    encoder_width = projector.qformer.config.encoder_hidden_size
    if blip2.encoder_hidden_size != encoder_width:
        raise WeightsMismatchError(
            f"--qformer_init {folder}: its Q-Former cross-attends to {blip2.encoder_hidden_size}-wide encoder "
            f"features, but this vision encoder gives {encoder_width}; a Q-Former is trained for its encoder, so "
            f"train one from scratch (leave out --qformer_init) or use a BLIP-2 Q-Former of this encoder's width")
    expected = projector.state_dict()
    fresh = [key for key in expected if key not in blip2.state_dict]
    unexpected = [key for key in blip2.state_dict if key not in expected]
    wrong_shape = [key for key, tensor in blip2.state_dict.items()
                   if key in expected and tensor.shape != expected[key].shape]
    if unexpected or wrong_shape or any(not key.startswith("language_projection.") for key in fresh):
        key = (unexpected or wrong_shape or fresh)[0]
        raise WeightsMismatchError(f"--qformer_init {folder}: its Q-Former does not fit ({len(unexpected)} unexpected, "
                                   f"{len(wrong_shape)} of another shape, {len(fresh)} missing tensors, e.g. {key})")
    projector.load_state_dict(blip2.state_dict, strict=False)
    if log is not None:
        log(f"Q-Former initialised from {folder}: {len(blip2.state_dict)} tensors, {blip2.num_query_tokens} queries "
            f"(language_projection freshly initialised)")
