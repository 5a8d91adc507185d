"""Training flags and the typed config they become. `train_pretrain_vlm.py` and `train_sft_vlm.py` differ only in
the defaults they pass to `build_parser` (STAGE_DEFAULTS).
"""
import argparse
import os
from dataclasses import dataclass

from common import (DEFAULT_CHECKPOINT_DIR, DEFAULT_DATA_DIR, DEFAULT_SAVE_DIR, DTYPE_NAMES, MAX_SEED, bounded,
                    default_device, device_flag)
from model.lora import DEFAULT_LORA_DROPOUT, DEFAULT_LORA_RANK, DEFAULT_LORA_TARGET, LORA_ALPHA_PER_RANK
from model.model_vlm import (DEFAULT_NUM_QUERY_TOKENS, DEFAULT_QFORMER_HIDDEN_SIZE, DEFAULT_QFORMER_NUM_HEADS,
                             DEFAULT_QFORMER_NUM_LAYERS)
from model.presets import add_preset_flags, apply_preset

# Which parameters train; CLIP is always frozen. lora: the projector + LoRA adapters on the frozen LM (model/lora.py).
TRAINABLE_CHOICES = ("projector", "projector_last_layer", "projector_first_last_layers", "all", "lora")
# A batch takes well under a second to decode and collate; minutes of silence mean a worker lost it.
LOADER_TIMEOUT_S = 300.0
STAGE_SCRIPTS = {"pretrain": "train_pretrain_vlm.py", "sft": "train_sft_vlm.py"}
# Each stage's defaults (upstream's): train_pretrain_vlm.py and train_sft_vlm.py differ only in these.
STAGE_DEFAULTS = {
    "pretrain": dict(
        save_weight="pretrain_vlm",
        from_weight="llm",  # the MiniMind2 language model
        data_path=DEFAULT_DATA_DIR / "pretrain_i2t.parquet",
        images_path=DEFAULT_DATA_DIR / "pretrain_images",  # only for a .jsonl or LLaVA .json --data_path
        epochs=4,
        batch_size=16,
        learning_rate=4e-4,
        max_seq_len=640,
        log_interval=100,
        save_interval=1000,
        wandb_project="MiniMind-V-Pretrain",
    ),
    "sft": dict(
        save_weight="sft_vlm",
        from_weight="pretrain_vlm",  # stage 1's output
        data_path=DEFAULT_DATA_DIR / "sft_i2t.parquet",
        images_path=DEFAULT_DATA_DIR / "sft_images",  # only for a .jsonl or LLaVA .json --data_path
        epochs=2,
        batch_size=4,
        learning_rate=1e-6,
        max_seq_len=1536,
        log_interval=100,
        save_interval=1000,
        wandb_project="MiniMind-V-SFT",
    ),
}


# ----------------------------------------------------------------------------------------------------- flags

LAUNCH_RECIPES = """launching:
  one GPU:           python SCRIPT
  several GPUs:      torchrun --nproc_per_node 8 SCRIPT
  several machines:  torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr HOST --master_port 29500 \\
                         SCRIPT   (and --node_rank 1 on the second machine)
  CPU smoke run:     python SCRIPT --device cpu --hidden_size 64 --num_hidden_layers 2 --from_weight none \\
                         --batch_size 2 --max_steps 5 --num_workers 0
"""


def build_parser(description, script: str = "SCRIPT", **stage_defaults):
    """All training flags; each stage script passes its own defaults (shown in --help, with launch commands).

    Over 60 lines only because it is one flat list of flags, one line each, grouped as --help shows them.
    """
    d = stage_defaults
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=LAUNCH_RECIPES.replace("SCRIPT", script))
    io = p.add_argument_group("files")
    io.add_argument("--save_dir", default=str(DEFAULT_SAVE_DIR), help="where .pth weights are read and written")
    io.add_argument("--save_weight", default=d["save_weight"], help="output name: {save_weight}_{hidden}.pth")
    io.add_argument("--from_weight", default=d["from_weight"],
                    help="start from {save_dir}/{from_weight}_{hidden}.pth, a .pth path, or 'none'")
    io.add_argument("--data_path", default=str(d["data_path"]),
                    help="a .parquet file, a .jsonl file or a LLaVA-format .json file (one JSON array)")
    io.add_argument("--images_path", default=str(d["images_path"]),
                    help="image folder for a .jsonl or LLaVA .json dataset (LLaVA's `image` paths are relative to it)")
    io.add_argument("--vision_model_path", default=None,
                    help="vision encoder folder (default: the preset's, e.g. model/vision_model/clip-vit-base-patch16)")
    io.add_argument("--tokenizer_path", default=None,
                    help="folder with tokenizer.json (default: the preset's, or --language_model's)")
    io.add_argument("--language_model", default=None, metavar="PATH",
                    help="a transformers causal-LM folder (Qwen2, Llama, SmolLM2, ...) with its tokenizer as the "
                         "language model instead of MiniMind; with it, --from_weight llm (the pretrain default) "
                         "means that folder's weights")
    io.add_argument("--checkpoint_dir", default=str(DEFAULT_CHECKPOINT_DIR), help="resume checkpoints")
    io.add_argument("--from_resume", type=int, default=0, choices=[0, 1],
                    help="1: continue from {checkpoint_dir}/{save_weight}_{hidden}_resume.pth if present")
    io.add_argument("--skip_bad_samples", action="store_true",
                    help="leave malformed records out (counted) instead of refusing to start")
    io.add_argument("--prepared_dir", default=None,
                    help="where the checked, tokenised form of the data is cached (default: prepared/ beside "
                         "--data_path); built once, reused by every run, rank and scripts.check_data")
    io.add_argument("--prepare_workers", type=bounded(int, 1), default=os.cpu_count() or 1,
                    help="processes that prepare the data the first time (default: one per CPU core)")
    model = p.add_argument_group("model")
    add_preset_flags(model)
    model.add_argument("--use_moe", type=int, default=None, choices=[0, 1], help="MoE FFNs (default 0)")
    model.add_argument("--num_query_tokens", type=bounded(int, 1), default=None,
                       help=f"--projector qformer: learned queries, the tokens each image becomes (default "
                            f"{DEFAULT_NUM_QUERY_TOKENS}, as BLIP-2 and MiniGPT-4)")
    model.add_argument("--qformer_hidden_size", type=bounded(int, 1), default=None,
                       help=f"--projector qformer: the Q-Former's width (default {DEFAULT_QFORMER_HIDDEN_SIZE})")
    model.add_argument("--qformer_num_layers", type=bounded(int, 1), default=None,
                       help=f"--projector qformer: its layers, each cross-attending to the image (default "
                            f"{DEFAULT_QFORMER_NUM_LAYERS})")
    model.add_argument("--qformer_num_heads", type=bounded(int, 1), default=None,
                       help=f"--projector qformer: its attention heads (default {DEFAULT_QFORMER_NUM_HEADS})")
    model.add_argument("--qformer_init", default=None, metavar="DIR",
                       help="--projector qformer: start the Q-Former and its queries from a BLIP-2 folder "
                            "(Blip2Model / Blip2ForConditionalGeneration, safetensors); its size and query count "
                            "replace the flags above")
    model.add_argument("--max_seq_len", type=bounded(int, 2), default=d["max_seq_len"],
                       help="tokens per sample, at most")
    model.add_argument("--trainable", default=None, choices=TRAINABLE_CHOICES,
                       help="parameters that train: projector, projector + last LM layer, projector + first and "
                            "last LM layers (upstream's --freeze_llm 1), or projector + LM (default: the preset's "
                            "for this stage); lora: projector + LoRA adapters on the frozen LM (--lora_* flags)")
    model.add_argument("--lora_rank", type=bounded(int, 1), default=DEFAULT_LORA_RANK,
                       help="--trainable lora: rank of each adapter")
    model.add_argument("--lora_alpha", type=bounded(float, 0, low_open=True), default=None,
                       help=f"--trainable lora: the adapters' scale is lora_alpha / lora_rank (default: "
                            f"{LORA_ALPHA_PER_RANK} x rank)")
    model.add_argument("--lora_dropout", type=bounded(float, 0, 1), default=DEFAULT_LORA_DROPOUT,
                       help="--trainable lora: dropout on each adapter's input")
    model.add_argument("--lora_target", default=DEFAULT_LORA_TARGET,
                       help="--trainable lora: the LM modules that get adapters, a '|'-separated list of module names "
                            "(a module whose full name ends with one) or a regex over full module names; the "
                            "projector and embeddings never get one")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=bounded(int, 1), default=d["epochs"])
    opt.add_argument("--batch_size", type=bounded(int, 1), default=d["batch_size"],
                     help="samples per process per micro-step")
    opt.add_argument("--learning_rate", type=bounded(float, 0, low_open=True), default=d["learning_rate"])
    opt.add_argument("--projector_lr", type=bounded(float, 0, low_open=True), default=None,
                     help="the projector's learning rate, in a second AdamW group (default: --learning_rate); the "
                          "cosine schedule scales both")
    opt.add_argument("--accumulation_steps", type=bounded(int, 1), default=1, help="micro-batches per optimizer step")
    opt.add_argument("--grad_clip", type=bounded(float, 0), default=1.0)
    opt.add_argument("--max_steps", type=bounded(int, 0), default=0,
                     help="stop after this many optimizer steps (0: no limit)")
    opt.add_argument("--max_bad_steps", type=bounded(int, 1), default=10,
                     help="stop after this many optimizer steps in a row with a non-finite loss")
    opt.add_argument("--seed", type=bounded(int, 0, MAX_SEED), default=42)
    run = p.add_argument_group("runtime")
    run.add_argument("--device", type=device_flag, default=default_device())
    run.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES, help="autocast dtype on CUDA")
    run.add_argument("--num_workers", type=bounded(int, 0), default=8, help="DataLoader worker processes")
    run.add_argument("--loader_timeout", type=bounded(float, 0, low_open=True), default=LOADER_TIMEOUT_S,
                     help="seconds to wait for a batch from the DataLoader workers before stopping with an error "
                          "(a lost batch, e.g. /dev/shm full in a container, would otherwise hang the run)")
    run.add_argument("--use_compile", type=int, default=0, choices=[0, 1], help="1: torch.compile the model")
    run.add_argument("--no_length_grouping", action="store_true",
                     help="plain random batches instead of grouping samples of similar length")
    run.add_argument("--cache_vision_features", default=None, metavar="DIR",
                     help="compute each image's CLIP features once and reuse them (fp16, memory-mapped)")
    log = p.add_argument_group("logging and saving")
    log.add_argument("--log_interval", type=bounded(int, 1), default=d["log_interval"],
                     help="optimizer steps between logs")
    log.add_argument("--save_interval", type=bounded(int, 1), default=d["save_interval"],
                     help="optimizer steps between saves")
    log.add_argument("--use_wandb", action="store_true", help="log to Weights & Biases (WANDB_MODE=offline works)")
    log.add_argument("--wandb_project", default=d["wandb_project"])
    return p


@dataclass
class TrainConfig:
    """What a training run was asked for: build_parser's flags, with the preset's choices filled in
    (model.presets.apply_preset); setup.prepare_run resolves the architecture and trainable set of the start
    weights into the config the loop reads."""
    # files
    save_dir: str
    save_weight: str
    from_weight: str
    data_path: str
    images_path: str
    vision_model_path: str
    tokenizer_path: str
    language_model: str  # None: the preset's MiniMind LM
    checkpoint_dir: str
    from_resume: int
    skip_bad_samples: bool
    prepared_dir: str  # None: prepared/ beside data_path
    prepare_workers: int
    # model
    preset: str
    vision_encoder: str
    projector: str
    hidden_size: int
    num_hidden_layers: int
    use_moe: int
    num_query_tokens: int  # None: DEFAULT_NUM_QUERY_TOKENS (qformer only, as the four below)
    qformer_hidden_size: int  # None: DEFAULT_QFORMER_HIDDEN_SIZE
    qformer_num_layers: int  # None: DEFAULT_QFORMER_NUM_LAYERS
    qformer_num_heads: int  # None: DEFAULT_QFORMER_NUM_HEADS
    qformer_init: str  # None: a from-scratch Q-Former
    max_seq_len: int
    trainable: str  # one of TRAINABLE_CHOICES
    lora_rank: int
    lora_alpha: float  # None: model.lora.LORA_ALPHA_PER_RANK x lora_rank
    lora_dropout: float
    lora_target: str  # model.lora.lora_targets reads it
    # optimisation
    epochs: int
    batch_size: int
    learning_rate: float
    projector_lr: float  # None: learning_rate, one AdamW group
    accumulation_steps: int
    grad_clip: float
    max_steps: int  # 0: no limit
    max_bad_steps: int
    seed: int
    # runtime
    device: str
    dtype: str
    num_workers: int
    loader_timeout: float
    use_compile: int
    no_length_grouping: bool
    cache_vision_features: str  # None: no feature cache
    # logging and saving
    log_interval: int
    save_interval: int
    use_wandb: bool
    wandb_project: str
    # which choices the command line made (apply_preset), so that the start weights' architecture may fill the rest
    architecture_given: list
    vision_model_path_given: bool
    trainable_given: bool
    tokenizer_path_given: bool


def parse_stage_args(stage: str, argv=None, description: str = None) -> TrainConfig:
    """A stage's flags with the preset's choices filled in where no flag gave one."""
    parser = build_parser(description, STAGE_SCRIPTS[stage], **STAGE_DEFAULTS[stage])
    args = parser.parse_args(argv)
    args.tokenizer_path_given = args.tokenizer_path is not None
    if args.language_model is not None and args.tokenizer_path is None:
        args.tokenizer_path = args.language_model  # an LM folder holds its tokenizer
    return TrainConfig(**vars(apply_preset(args, stage)))
