"""LoRA on the language model, through peft: adapters injected by module name into the VLM's language model (never
into the projector, which trains in full beside them, nor into the token embeddings and output head), merged back
for the weights file every loader reads, and kept apart in a peft adapter folder.

Nothing here knows MiniMind's layout: the targets are module names, the projector is the VLM's `vision_proj`, and the
embeddings are found through transformers' get_input_embeddings / get_output_embeddings, so any causal LM works.
"""
import re
from pathlib import Path

from common import SaveError, UserError, atomic_write

# Rank 8 (peft's default): about 2% of MiniMind2's 26M parameters at hidden 512. Basic-VLM's 128 is sized for a 7B
# LM (hidden 4096); at hidden 512 it would be a quarter of the width.
DEFAULT_LORA_RANK = 8
LORA_ALPHA_PER_RANK = 2  # alpha = 2 x rank unless given (LLaVA's LoRA recipe: rank 128, alpha 256): scale 2
DEFAULT_LORA_DROPOUT = 0.05  # LLaVA's and peft's examples'; Basic-VLM uses 0.1
# The attention and MLP projections by the names MiniMind, Qwen2, Llama, Mistral and SmolLM2 all give them.
DEFAULT_LORA_TARGET = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
ADAPTER_NAME = "default"  # peft's name for a model's only adapter
PROJECTOR_MODULE = "vision_proj"
# The adapter folder: peft's own file names (PeftModel.from_pretrained reads the first two), and the projector.
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PROJECTOR_WEIGHTS_FILE = "projector.safetensors"
# Keys in peft's adapter files are named from a PeftModel, whose tuner (base_model) holds the model as `.model`.
PEFT_FILE_PREFIX = "base_model.model."
# "q_proj|v_proj" (Basic-VLM's way) is a list of names; anything else (".*layers\.1\..*proj") is a regex.
NAME_LIST = re.compile(r"[\w.]+(\|[\w.]+)*")


def lora_targets(target: str):
    """peft's target_modules for --lora_target: a '|'-separated list of names becomes a list (a module is adapted
    when its full name is, or ends with, one of them), anything else stays a string, which peft matches as a regex
    against each module's full name (e.g. model.layers.0.self_attn.q_proj)."""
    return target.split("|") if NAME_LIST.fullmatch(target) else target


def modules_kept_whole(model) -> list:
    """Full names of the modules no adapter goes into: the projector and everything in it (it trains in full), and
    the input embeddings and output head (tied in MiniMind: an adapter on one would untie them in the merged file)."""
    embeddings = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    return [name for name, module in model.named_modules() if name == PROJECTOR_MODULE
            or name.startswith(PROJECTOR_MODULE + ".") or id(module) in embeddings]


def add_lora(model, rank: int = DEFAULT_LORA_RANK, alpha: float = None, dropout: float = DEFAULT_LORA_DROPOUT,
             target: str = DEFAULT_LORA_TARGET, base_weights: str = None):
    """Inject LoRA adapters (peft) into `model`'s language model in place and freeze every other parameter but the
    projector's. `alpha` None: LORA_ALPHA_PER_RANK x rank. `base_weights`
    is recorded in the adapter's config (what the adapter applies to). A target that adapts nothing is a UserError
    naming --lora_target."""
    from peft import LoraConfig, inject_adapter_in_model

    alpha = LORA_ALPHA_PER_RANK * rank if alpha is None else alpha
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_targets(target),
                        exclude_modules=modules_kept_whole(model), base_model_name_or_path=base_weights)
    model.requires_grad_(False)
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)  # marks the adapters trainable
    except ValueError as error:
        raise UserError(f"--lora_target {target!r} does not fit the language model ({str(error).splitlines()[0]}); "
                        f"give module names such as {DEFAULT_LORA_TARGET} or a regex over full module names "
                        f"(e.g. model.layers.0.self_attn.q_proj); the projector and embeddings are never adapted"
                        ) from None
    model.get_submodule(PROJECTOR_MODULE).requires_grad_(True)


def lora_layers(model) -> dict:
    """Full name -> peft LoRA layer of every adapted module (empty for a model without LoRA)."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def lora_summary(model) -> str:
    """What trains in a LoRA model, for the start-up log: 'lora: rank 8 adapters on 14 modules (0.012M) + the
    projector (0.004M)'."""
    layers = lora_layers(model)
    adapter = sum(p.numel() for name, p in model.named_parameters() if p.requires_grad
                  and not name.startswith(PROJECTOR_MODULE + "."))
    projector = sum(p.numel() for p in model.get_submodule(PROJECTOR_MODULE).parameters() if p.requires_grad)
    rank = model.peft_config[ADAPTER_NAME].r
    return f"lora: rank {rank} adapters on {len(layers)} modules ({adapter / 1e6:.3f}M) + the projector " \
           f"({projector / 1e6:.3f}M)"


def merged_state_dict(model) -> dict:
    """`model.state_dict()` with each LoRA layer's update (peft's get_delta_weight, what merge_and_unload adds) added
    to its base weight, under the base layer's own key and without adapter keys: the state_dict of the model without
    adapters, which every loader of the plain model reads. `model` itself is not changed (its base weights stay
    exactly as they are, for the next step and for an exact resume). A model without LoRA gives its state_dict."""
    state = model.state_dict()
    layers = lora_layers(model)
    if not layers:
        return state
    adapter_keys = {f"{name}.{key}" for name, layer in layers.items() for key in layer.state_dict()
                    if not key.startswith("base_layer.")}
    merged = {}
    for key, value in state.items():
        if key in adapter_keys:
            continue
        name, found, parameter = key.partition(".base_layer.")
        if found and name in layers:
            key = f"{name}.{parameter}"
            if parameter == "weight":
                value = value + layers[name].get_delta_weight(ADAPTER_NAME).detach()
        merged[key] = value
    return merged


def adapter_path(weight_file) -> Path:
    """The adapter folder beside a LoRA run's (merged) weights file: out/sft_vlm_512.pth -> out/sft_vlm_512_lora."""
    weight_file = Path(weight_file)
    return weight_file.with_name(f"{weight_file.stem}_lora")


def save_adapter(model, folder) -> Path:
    """Write the adapter (peft's adapter_config.json and adapter_model.safetensors: PeftModel.from_pretrained
    reads them onto the base weights) and the projector's weights (projector.safetensors, under their state_dict
    keys) into `folder`, the weights atomically; a failed write is a SaveError."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save

    folder = Path(folder)
    # save_embedding_layers=False: no adapter touches an embedding, and peft would otherwise look the base up online
    adapter = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME, save_embedding_layers=False)
    adapter = {PEFT_FILE_PREFIX + k: v for k, v in adapter.items()}
    projector = {k: v for k, v in model.state_dict().items() if k.startswith(PROJECTOR_MODULE + ".")}
    for name, tensors in ((ADAPTER_WEIGHTS_FILE, adapter), (PROJECTOR_WEIGHTS_FILE, projector)):
        payload = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        atomic_write(folder / name, lambda handle: handle.write(payload))
    try:
        model.peft_config[ADAPTER_NAME].save_pretrained(str(folder))  # adapter_config.json (a few hundred bytes)
    except OSError as error:
        raise SaveError(f"could not write {folder / ADAPTER_CONFIG_FILE} ({error})") from error
    return folder
