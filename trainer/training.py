"""The shared training module: flags, distributed setup, model and data assembly, freezing, optimizer,
schedule, the loop, and checkpoint I/O. `train_pretrain_vlm.py` and `train_sft_vlm.py` differ only in the
defaults they pass to `build_parser`.

Loss normalisation: every optimizer step averages the cross-entropy over all supervised tokens of the
global batch (all micro-batches, all ranks). One process with batch 2b and two processes with batch b
therefore take identical steps.
"""
import argparse
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from common import (DEFAULT_CHECKPOINT_DIR, DEFAULT_DATA_DIR, DEFAULT_SAVE_DIR,
                    DTYPE_NAMES, MAX_SEED, RunStopped, SaveError, atomic_save, bounded, count_parameters,
                    format_duration, quiet_transformers, torch_dtype, unwrap)
from dataset.lm_dataset import IGNORE_INDEX, Collator, GlobalBatchSampler, VLMDataset, init_worker
from dataset.processing import chat_template_warning, image_processor_for
from model.model_vlm import MiniMindVLM, VLMConfig
from dataset.processing import load_tokenizer
from model.presets import PRESETS, add_preset_flags, apply_preset, config_from_args, default_vision_model_path
from model.weights import (WeightsMismatchError, architecture_path, load_weights, read_architecture, weight_path,
                           write_architecture)

# Cosine schedule from the base lr down to this fraction of it (upstream: lr·(0.1 + 0.45·(1 + cos))).
MIN_LR_RATIO = 0.1
# Which parameters train; CLIP is always frozen.
TRAINABLE_CHOICES = ("projector", "projector_last_layer", "projector_first_last_layers", "all")
STAGE_NAMES = {"pretrain": "Pretrain", "sft": "SFT"}  # in log lines and wandb run names
STAGE_SCRIPTS = {"pretrain": "train_pretrain_vlm.py", "sft": "train_sft_vlm.py"}
# Each stage's defaults (upstream's): train_pretrain_vlm.py and train_sft_vlm.py differ only in these.
STAGE_DEFAULTS = {
    "pretrain": dict(
        save_weight="pretrain_vlm",
        from_weight="llm",  # the MiniMind2 language model
        data_path=DEFAULT_DATA_DIR / "pretrain_i2t.parquet",
        images_path=DEFAULT_DATA_DIR / "pretrain_images",  # only for a .jsonl --data_path
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
        images_path=DEFAULT_DATA_DIR / "sft_images",  # only for a .jsonl --data_path
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
    io.add_argument("--data_path", default=str(d["data_path"]), help="a .parquet file or a .jsonl file")
    io.add_argument("--images_path", default=str(d["images_path"]), help="image folder for a .jsonl dataset")
    io.add_argument("--vision_model_path", default=None,
                    help="vision encoder folder (default: the preset's, e.g. model/vision_model/clip-vit-base-patch16)")
    io.add_argument("--tokenizer_path", default=None, help="folder with tokenizer.json (default: the preset's)")
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
    model.add_argument("--max_seq_len", type=bounded(int, 2), default=d["max_seq_len"],
                       help="tokens per sample, at most")
    model.add_argument("--trainable", default=None, choices=TRAINABLE_CHOICES,
                       help="parameters that train: projector, projector + last LM layer, projector + first and "
                            "last LM layers (upstream's --freeze_llm 1), or projector + LM (default: the preset's "
                            "for this stage)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=bounded(int, 1), default=d["epochs"])
    opt.add_argument("--batch_size", type=bounded(int, 1), default=d["batch_size"],
                     help="samples per process per micro-step")
    opt.add_argument("--learning_rate", type=bounded(float, 0, low_open=True), default=d["learning_rate"])
    opt.add_argument("--accumulation_steps", type=bounded(int, 1), default=1, help="micro-batches per optimizer step")
    opt.add_argument("--grad_clip", type=bounded(float, 0), default=1.0)
    opt.add_argument("--max_steps", type=bounded(int, 0), default=0,
                     help="stop after this many optimizer steps (0: no limit)")
    opt.add_argument("--max_bad_steps", type=bounded(int, 1), default=10,
                     help="stop after this many optimizer steps in a row with a non-finite loss")
    opt.add_argument("--seed", type=bounded(int, 0, MAX_SEED), default=42)
    run = p.add_argument_group("runtime")
    run.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    run.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES, help="autocast dtype on CUDA")
    run.add_argument("--num_workers", type=bounded(int, 0), default=8, help="DataLoader worker processes")
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


def parse_stage_args(stage: str, argv=None, description: str = None):
    """A stage's flags with the preset's choices filled in where no flag gave one."""
    return apply_preset(build_parser(description, STAGE_SCRIPTS[stage], **STAGE_DEFAULTS[stage]).parse_args(argv),
                        stage)


# ------------------------------------------------------------------------------------- processes and precision

@dataclass
class RunContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def init_distributed(device_arg: str) -> RunContext:
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE: NCCL on CUDA, gloo on CPU. Otherwise one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if "RANK" not in os.environ or world_size == 1:
        return RunContext(device=torch.device(device_arg))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.device(device_arg).type == "cuda" and torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return RunContext(rank, local_rank, world_size, device)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_for(device: torch.device, dtype_name: str):
    """bf16/fp16 autocast on CUDA; fp32 elsewhere. The GradScaler only acts for fp16."""
    dtype = torch_dtype(dtype_name)
    use_autocast = device.type == "cuda" and dtype != torch.float32
    context = (lambda: torch.autocast(device_type="cuda", dtype=dtype)) if use_autocast else nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=use_autocast and dtype == torch.float16)
    return context, scaler


def all_reduce_sum(values, ctx: RunContext) -> torch.Tensor:
    tensor = torch.tensor(values, dtype=torch.float64 if ctx.device.type == "cpu" else torch.float32,
                          device=ctx.device)
    if ctx.distributed:
        dist.all_reduce(tensor)
    return tensor


def all_reduce_dict(values: dict, ctx: RunContext) -> dict:
    """Sum each named number over all ranks (one all-reduce); plain floats back."""
    return dict(zip(values, all_reduce_sum(list(values.values()), ctx).tolist()))


# ------------------------------------------------------------------------------------------------ model setup

def resolve_from_weight(from_weight: str, save_dir, hidden_size, use_moe):
    if from_weight == "none":
        return None
    if from_weight.endswith(".pth") or os.sep in from_weight:
        return Path(from_weight)
    return weight_path(save_dir, from_weight, hidden_size, use_moe)


def build_model(args, log=print) -> MiniMindVLM:
    """The model the flags describe, or, when the start weights have an architecture file and no architecture
    flag was given (SFT after pretraining), the start weights' architecture; then the start weights, strictly."""
    source = resolve_from_weight(args.from_weight, args.save_dir, args.hidden_size, args.use_moe)
    if source is not None and not source.is_file():
        raise FileNotFoundError(f"{source} not found: download the weights (`python -m scripts.download --what "
                                f"llm`), train the previous stage first, or pass --from_weight none")
    config = config_from_args(args, max_seq_len=args.max_seq_len)
    if source is not None and architecture_path(source).is_file() and not args.architecture_given:
        architecture = read_architecture(source)
        config = architecture.config
        config.max_seq_len = args.max_seq_len
        args.preset, args.hidden_size, args.num_hidden_layers = architecture.preset, config.hidden_size, \
            config.num_hidden_layers
        args.use_moe, args.vision_encoder, args.projector = int(config.use_moe), config.vision_encoder, config.projector
        if not args.vision_model_path_given:
            args.vision_model_path = str(default_vision_model_path(config, architecture.vision_model_path))
        log(f"architecture of {source.name} ({architecture_path(source).name}): {args.preset}, "
            f"{config.hidden_size}x{config.num_hidden_layers}{' MoE' if config.use_moe else ''}, "
            f"{config.vision_encoder} + {config.projector} projector")
    with quiet_transformers():
        model = MiniMindVLM(config, vision_model_path=args.vision_model_path)
    if source is not None:
        load_weights(model, source, log=log)
    return model


def set_trainable(model: MiniMindVLM, policy: str):
    """projector: vision_proj only; projector_last_layer: + the last LM block; projector_first_last_layers: + the
    first and last LM blocks (upstream 3v's --freeze_llm 1); all: + the whole LM."""
    if policy not in TRAINABLE_CHOICES:
        raise ValueError(f"unknown trainable policy {policy!r}; choose from {TRAINABLE_CHOICES}")
    model.requires_grad_(policy == "all")
    model.vision_proj.requires_grad_(True)
    if policy in ("projector_last_layer", "projector_first_last_layers"):
        model.model.layers[-1].requires_grad_(True)
    if policy == "projector_first_last_layers":
        model.model.layers[0].requires_grad_(True)


def build_optimizer(model, lr: float):
    """AdamW with torch defaults (weight decay 0.01) over the trainable parameters only."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def lr_at(step: int, total_steps: int, base_lr: float, min_ratio: float = MIN_LR_RATIO) -> float:
    """Cosine from base_lr (step 0) to min_ratio·base_lr (last step), no warmup."""
    progress = step / max(total_steps, 1)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------------------------------ checkpoint files

def inference_state_dict(model):
    """Upstream's released format: LM + vision_proj (no CLIP), every tensor fp16 on the CPU."""
    return {k: v.detach().half().cpu() for k, v in unwrap(model).state_dict().items()}


def resume_path(checkpoint_dir, save_weight, hidden_size, use_moe) -> Path:
    """`{checkpoint_dir}/{save_weight}_{hidden}{_moe}_resume.pth`."""
    weights = weight_path(checkpoint_dir, save_weight, hidden_size, use_moe)
    return weights.with_name(f"{weights.stem}_resume.pth")


def capture_rng():
    """RNG states as tensors, ints and tuples only, so that resume files load with weights_only=True."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state):
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainState:
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in `epoch`
    global_step: int = 0  # optimizer steps done in total
    bad_steps_in_row: int = 0
    skipped_steps: int = 0
    replaced_samples: int = 0
    wandb_id: str = None
    extra: dict = field(default_factory=dict)


def save_resume(path, model, optimizer, scaler, state: TrainState, ctx: RunContext, args):
    atomic_save({
        "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "epoch": state.epoch, "step": state.step_in_epoch, "global_step": state.global_step,
        "skipped_steps": state.skipped_steps, "replaced_samples": state.replaced_samples,
        "world_size": ctx.world_size, "batch_size": args.batch_size,
        "accumulation_steps": args.accumulation_steps, "wandb_id": state.wandb_id, "rng": capture_rng(),
    }, path)


def load_resume(path, model, optimizer, scaler, ctx: RunContext, args, log=print) -> TrainState:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, not a checkpoint, or a pickle that would run code
        raise WeightsMismatchError(f"{path}: not a loadable resume checkpoint ({type(error).__name__}: "
                                   f"{str(error).splitlines()[0] if str(error) else ''}); delete it or run "
                                   f"without --from_resume") from error
    try:
        load_weights(unwrap(model), checkpoint["model"], allow_missing_vision_proj=False, log=None)
    except WeightsMismatchError as error:
        raise WeightsMismatchError(f"{path}: {error}") from None
    optimizer.load_state_dict(checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint["scaler"])
    state = TrainState(epoch=checkpoint["epoch"], step_in_epoch=checkpoint["step"],
                       global_step=checkpoint["global_step"], skipped_steps=checkpoint["skipped_steps"],
                       replaced_samples=checkpoint["replaced_samples"], wandb_id=checkpoint["wandb_id"])
    old_global_batch = checkpoint["world_size"] * checkpoint["batch_size"] * checkpoint["accumulation_steps"]
    new_global_batch = ctx.world_size * args.batch_size * args.accumulation_steps
    if old_global_batch != new_global_batch:
        # Same samples seen, counted in the new step size (the epoch's order changes with the batch size).
        state.step_in_epoch = state.step_in_epoch * old_global_batch // new_global_batch
        log(f"resume: global batch {old_global_batch} -> {new_global_batch}; continuing at step "
            f"{state.step_in_epoch} of epoch {state.epoch + 1}")
    if checkpoint["world_size"] == ctx.world_size:
        restore_rng(checkpoint["rng"])
    log(f"resumed from {path}: epoch {state.epoch + 1}, step {state.step_in_epoch}, "
        f"{state.global_step} optimizer steps done")
    return state


# ----------------------------------------------------------------------------------------------- run logging

class NullLogger:
    run_id = None

    def log(self, metrics, step):
        pass

    def finish(self):
        pass


class WandbLogger:
    def __init__(self, project, name, run_id, config):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=project, name=name, id=run_id, resume="allow", config=config)
        self.run_id = self.run.id

    def log(self, metrics, step):
        self.wandb.log(metrics, step=step)

    def finish(self):
        self.wandb.finish()


class StopSignal:
    """SIGINT/SIGTERM ask for a clean stop: the current step finishes, a resume checkpoint is written."""

    def __init__(self):
        self.received = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------------- data

def build_dataset(args, tokenizer, config: VLMConfig, ctx: RunContext, log=print) -> VLMDataset:
    """The prepared dataset: each machine's local rank 0 builds the cache once (a file lock serialises several
    on one machine), the other ranks wait for it, then all memory-map it. Rank 0 prints the start-up summary."""
    main_log = log if ctx.is_main else None
    warning = chat_template_warning(tokenizer, config.chat_format)
    if warning and main_log is not None:
        main_log(warning)
    started = time.time()
    dataset = VLMDataset(args.data_path, tokenizer, config.image_special_token, config.image_ids[0],
                         args.max_seq_len, images_path=args.images_path, skip_bad_samples=args.skip_bad_samples,
                         log=main_log, prepared_dir=args.prepared_dir, prepare_workers=args.prepare_workers,
                         may_build=ctx.local_rank == 0, image_processor=image_processor_for(config),
                         chat_format=config.chat_format)
    if main_log is not None:
        main_log(f"data ready in {time.time() - started:.1f}s: {len(dataset)} samples "
                 f"({dataset.stats.text_only} text-only), prepared data in {dataset.prepared.folder}")
    return dataset


def build_loader(dataset: VLMDataset, args, ctx: RunContext, pad_to=None):
    sampler = GlobalBatchSampler(dataset.lengths, args.batch_size, ctx.world_size, ctx.rank, seed=args.seed,
                                 group_by_length=not args.no_length_grouping)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=args.num_workers, collate_fn=Collator(dataset.pad_token_id,
                                                                                          pad_to),
        pin_memory=ctx.device.type == "cuda", worker_init_fn=init_worker,
        persistent_workers=False, prefetch_factor=4 if args.num_workers > 0 else None)
    return loader, sampler


# ------------------------------------------------------------------------------------------------- the loop

def move_batch(batch, device):
    moved = {}
    for key, value in batch.items():
        moved[key] = value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
    return moved


def micro_batches(loader_iter, count):
    batches = []
    for _ in range(count):
        batch = next(loader_iter, None)
        if batch is None:
            break
        batches.append(batch)
    return batches


@dataclass
class LoopSetup:
    model: torch.nn.Module  # possibly DDP- or compile-wrapped
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: object
    loader: torch.utils.data.DataLoader
    sampler: GlobalBatchSampler
    ctx: RunContext
    logger: object
    weights_out: Path
    resume_out: Path
    # False: logits at every position, as upstream computes them (scripts/bench.py times that baseline).
    loss_only: bool = True


@dataclass
class StepResult:
    """What one optimizer step did, summed over its micro-batches and over all ranks."""
    loss: float  # mean cross-entropy over the global batch's supervised tokens
    aux_loss: float  # MoE balance loss, mean over micro-batches (0 for dense models)
    lr: float
    finite: bool  # False: the step was skipped (a non-finite loss on some rank)
    samples: int
    tokens: int  # non-padding tokens
    replaced_samples: int  # samples whose image failed to decode and were replaced by the next good one
    stop_requested: bool  # a rank received SIGINT/SIGTERM during the step


def supervised_targets(batch) -> int:
    """Positions whose next token is a target (counted on the CPU, before the batch moves to the device)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def backward_micro_batches(setup: LoopSetup, batches, target_counts, global_targets: float):
    """Forward and backward over the micro-batches; returns (summed CE, summed aux loss) of this rank.

    The loss of each micro-batch is scaled so that the gradients add up to the mean over all supervised
    tokens of the global batch: mean CE x local tokens = summed CE, and DDP averages over ranks, hence the
    world size factor.
    """
    model, ctx = setup.model, setup.ctx
    loss_sum, aux_sum = 0.0, 0.0
    for i, batch in enumerate(batches):
        batch = move_batch(batch, ctx.device)
        # Gradient all-reduce only on the last micro-batch of the step.
        sync = nullcontext() if (not ctx.distributed or i == len(batches) - 1) else model.no_sync()
        with sync, setup.autocast():
            # loss_only: no logits where there is no target (same loss, less work and memory)
            out = model(input_ids=batch["input_ids"], labels=batch["labels"], pixel_values=batch.get("pixel_values"),
                        image_features=batch.get("image_features"), loss_only=setup.loss_only)
            ce_sum = out.loss * target_counts[i]
            loss = ce_sum * ctx.world_size / max(global_targets, 1.0) + out.aux_loss / len(batches)
        setup.scaler.scale(loss).backward()
        loss_sum += float(ce_sum.detach())
        aux_sum += float(out.aux_loss.detach())
    return loss_sum, aux_sum


def train_step(setup: LoopSetup, batches, lr: float, grad_clip: float, stop_requested: bool) -> StepResult:
    """One optimizer step over `batches` (the micro-batches of this rank); skipped if any rank's loss is not
    finite. Ranks agree on everything in the result (one all-reduce)."""
    target_counts = [supervised_targets(b) for b in batches]
    global_targets = float(all_reduce_sum([sum(target_counts)], setup.ctx)[0])
    for group in setup.optimizer.param_groups:
        group["lr"] = lr
    loss_sum, aux_sum = backward_micro_batches(setup, batches, target_counts, global_targets)
    pad_id = setup.loader.collate_fn.pad_token_id
    totals = all_reduce_dict({
        "loss": loss_sum, "finite_ranks": float(math.isfinite(loss_sum + aux_sum)),
        "stop": float(stop_requested), "samples": sum(len(b["input_ids"]) for b in batches),
        "tokens": sum(int((b["input_ids"] != pad_id).sum()) for b in batches),
        "replaced": sum(b["replaced"] for b in batches)}, setup.ctx)
    finite = int(totals["finite_ranks"]) == setup.ctx.world_size
    if finite:
        if grad_clip > 0:
            setup.scaler.unscale_(setup.optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in setup.model.parameters() if p.requires_grad], grad_clip)
        setup.scaler.step(setup.optimizer)
        setup.scaler.update()
    setup.optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=totals["loss"] / max(global_targets, 1.0), aux_loss=aux_sum / len(batches), lr=lr,
                      finite=finite, samples=int(totals["samples"]), tokens=int(totals["tokens"]),
                      replaced_samples=int(totals["replaced"]), stop_requested=bool(totals["stop"]))


def record_step(state: TrainState, result: StepResult, max_bad_steps: int, log):
    """Count the step in `state`; a skipped step is reported, and too many in a row end the run."""
    state.global_step += 1
    state.step_in_epoch += 1
    state.replaced_samples += result.replaced_samples
    if result.finite:
        state.bad_steps_in_row = 0
        return
    state.skipped_steps += 1
    state.bad_steps_in_row += 1
    log(f"warning: non-finite loss at step {state.global_step}; step skipped "
        f"({state.bad_steps_in_row} in a row, {state.skipped_steps} in total)")
    if state.bad_steps_in_row >= max_bad_steps:
        raise RunStopped(f"stopped: {state.bad_steps_in_row} optimizer steps in a row had a non-finite loss; the "
                         f"last saved checkpoint is intact. Lower --learning_rate or check the data.", 1)


class ThroughputWindow:
    """Samples and tokens per second since the last log line."""

    def __init__(self):
        self.start, self.samples, self.tokens = time.time(), 0, 0

    def add(self, result: StepResult):
        self.samples += result.samples
        self.tokens += result.tokens

    def rates(self) -> dict:
        elapsed = max(time.time() - self.start, 1e-9)
        return {"samples_per_s": self.samples / elapsed, "tokens_per_s": self.tokens / elapsed}


def optimizer_steps_per_epoch(sampler: GlobalBatchSampler, accumulation_steps: int) -> int:
    return math.ceil(sampler.steps_per_epoch() / accumulation_steps)


@dataclass
class Schedule:
    steps_per_epoch: int
    total_steps: int  # over all epochs: the cosine schedule's length
    last_step: int  # where this run stops (--max_steps may end it early)


def make_schedule(sampler: GlobalBatchSampler, args) -> Schedule:
    steps_per_epoch = optimizer_steps_per_epoch(sampler, args.accumulation_steps)
    total_steps = steps_per_epoch * args.epochs
    return Schedule(steps_per_epoch, total_steps, min(total_steps, args.max_steps) if args.max_steps else total_steps)


def log_step(setup: LoopSetup, args, state: TrainState, result: StepResult, window: ThroughputWindow, eta: float,
             schedule: Schedule, log):
    """One log line and the logger's metrics (rank 0 only)."""
    metrics = {"loss": result.loss, "aux_loss": result.aux_loss, "lr": result.lr, **window.rates()}
    log(f"epoch {state.epoch + 1}/{args.epochs} step {state.step_in_epoch}/{schedule.steps_per_epoch} | "
        f"loss {result.loss:.4f} | lr {result.lr:.3e} | {metrics['samples_per_s']:.1f} samples/s | "
        f"{metrics['tokens_per_s']:.0f} tokens/s | ETA {format_duration(eta)}")
    setup.logger.log(metrics, step=state.global_step)


def stop_for_signal(setup: LoopSetup, args, state: TrainState, received, log):
    """Save, then end the run with the exit code of the signal that asked for it."""
    save_all(setup, args, state, log)
    signal_name = signal.Signals(received or signal.SIGTERM).name
    raise RunStopped(f"stopped by {signal_name} at step {state.global_step}; resume with the same command plus "
                     f"--from_resume 1", 130 if signal_name == "SIGINT" else 143)


def train(setup: LoopSetup, args, state: TrainState, log=print, on_step=None):
    """Epochs of optimizer steps: log (a tqdm bar on a terminal, a line every --log_interval steps), save every
    --save_interval steps and at the end, stop on signals / repeated non-finite losses / --max_steps.

    `on_step(state, result)`, if given, runs after every optimizer step (scripts/bench.py times steps with it).
    """
    schedule = make_schedule(setup.sampler, args)
    is_main = setup.ctx.is_main
    progress = tqdm(total=schedule.last_step, initial=state.global_step, unit="step", dynamic_ncols=True,
                    disable=not (is_main and sys.stderr.isatty()))
    if not progress.disable:
        log = progress.write  # log lines above the bar, not through it
    window, run_start, run_start_step = ThroughputWindow(), time.time(), state.global_step
    setup.model.train()
    with StopSignal() as stop, progress:
        while state.epoch < args.epochs and state.global_step < schedule.last_step:
            setup.sampler.set_epoch(state.epoch, state.step_in_epoch * args.accumulation_steps)
            loader_iter = iter(setup.loader)
            while state.global_step < schedule.last_step and state.step_in_epoch < schedule.steps_per_epoch:
                batches = micro_batches(loader_iter, args.accumulation_steps)
                if not batches:
                    break
                lr = lr_at(state.global_step, schedule.total_steps, args.learning_rate)
                result = train_step(setup, batches, lr, args.grad_clip, stop.received is not None)
                record_step(state, result, args.max_bad_steps, log)
                progress.update(1)
                if on_step is not None:
                    on_step(state, result)
                epoch_done = state.step_in_epoch >= schedule.steps_per_epoch
                if result.finite:
                    window.add(result)
                    progress.set_postfix(loss=f"{result.loss:.4f}", refresh=False)
                if result.finite and is_main and (state.global_step % args.log_interval == 0 or epoch_done
                                                  or state.global_step >= schedule.last_step):
                    steps_per_s = (state.global_step - run_start_step) / max(time.time() - run_start, 1e-9)
                    eta = (schedule.last_step - state.global_step) / max(steps_per_s, 1e-9)
                    log_step(setup, args, state, result, window, eta, schedule, log)
                    window = ThroughputWindow()
                # No save right after a skipped step: the last checkpoint stays the last good one.
                if (result.finite and state.global_step % args.save_interval == 0
                        and state.global_step < schedule.last_step):
                    save_all(setup, args, state, log)
                if result.stop_requested:
                    stop_for_signal(setup, args, state, stop.received, log)
            if state.step_in_epoch >= schedule.steps_per_epoch:
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
            elif state.global_step < schedule.last_step:
                break  # the loader ran out early (cannot happen with GlobalBatchSampler; guards an endless loop)
    save_all(setup, args, state, log, final=True)
    if is_main:
        log(f"done: {state.global_step} optimizer steps, {state.skipped_steps} skipped (non-finite loss), "
            f"{state.replaced_samples} samples replaced (undecodable image); weights in {setup.weights_out}")


def save_all(setup: LoopSetup, args, state: TrainState, log=print, final=False):
    """Rank 0 writes the weights file and the resume checkpoint. A failed write is reported and training goes
    on with the previous files kept; only a failed final save ends the run with an error (after the barrier,
    so that no rank waits forever)."""
    failed = None
    if setup.ctx.is_main:
        model = unwrap(setup.model)
        was_training = model.training
        model.eval()
        try:
            atomic_save(inference_state_dict(model), setup.weights_out)
            write_architecture(setup.weights_out, model.config, args.preset, args.vision_model_path)
            save_resume(setup.resume_out, model, setup.optimizer, setup.scaler, state, setup.ctx, args)
            write_architecture(setup.resume_out, model.config, args.preset, args.vision_model_path)
        except SaveError as error:
            failed = error
            if not final:
                log(f"warning: {error}")
        model.train(was_training)
    if setup.ctx.distributed:
        dist.barrier()
    if failed is not None and final:
        raise failed


# ------------------------------------------------------------------------------------------------- assembly

def make_logger(ctx: RunContext, args, stage: str, run_id: str = None):
    """wandb on rank 0 with --use_wandb (continuing `run_id` when resuming); otherwise a no-op logger."""
    if not (args.use_wandb and ctx.is_main):
        return NullLogger()
    name = f"MiniMind-V-{stage}-Epoch-{args.epochs}-BatchSize-{args.batch_size}-LearningRate-{args.learning_rate}"
    return WandbLogger(args.wandb_project, name, run_id, vars(args))


def prepare_run(model: MiniMindVLM, dataset: VLMDataset, args, ctx: RunContext, stage: str, log=print):
    """Device, feature cache, optimizer, resume state, compile/DDP wrappers, loader and logger."""
    autocast, scaler = autocast_for(ctx.device, args.dtype)
    model.to(ctx.device)
    if args.cache_vision_features:
        from dataset.feature_cache import attach_feature_cache

        attach_feature_cache(dataset, model, args.cache_vision_features, ctx, autocast, log=log)
    total, trainable = count_parameters(model)
    log(f"{stage}: {total / 1e6:.3f}M parameters without the vision encoder, {trainable / 1e6:.3f}M trainable "
        f"({args.trainable})")
    optimizer = build_optimizer(model, args.learning_rate)
    resume_out = resume_path(args.checkpoint_dir, args.save_weight, args.hidden_size, args.use_moe)
    state = TrainState()
    if args.from_resume:
        if resume_out.is_file():
            state = load_resume(resume_out, model, optimizer, scaler, ctx, args, log=log)
        else:
            log(f"no resume checkpoint at {resume_out}; starting from the beginning")
    wrapped = model
    if args.use_compile:
        wrapped = torch.compile(wrapped)
    if ctx.distributed:
        # A batch without images leaves vision_proj unused on that rank; DDP must not wait for its gradient.
        wrapped = torch.nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
            find_unused_parameters=True)
    loader, sampler = build_loader(dataset, args, ctx)
    logger = make_logger(ctx, args, stage, run_id=state.wandb_id)
    state.wandb_id = logger.run_id
    weights_out = weight_path(args.save_dir, args.save_weight, args.hidden_size, args.use_moe)
    return LoopSetup(wrapped, optimizer, scaler, autocast, loader, sampler, ctx, logger, weights_out,
                     resume_out), state


def run_stage(stage: str, description: str, argv=None):
    """A training stage from the command line to its last checkpoint (train_pretrain_vlm.py, train_sft_vlm.py)."""
    args = parse_stage_args(stage, argv, description)
    # 1. Processes and device (torchrun: one per GPU; NCCL on CUDA, gloo on CPU); rank 0 alone talks
    ctx = init_distributed(args.device)
    seed_everything(args.seed + ctx.rank)
    log = print if ctx.is_main else (lambda *a, **k: None)
    # 2. Tokenizer; model with CLIP frozen, start weights loaded strictly; what trains
    tokenizer = load_tokenizer(args.tokenizer_path)
    model = build_model(args, log=log)
    if not args.trainable_given:  # the preset's, which the start weights' architecture may have changed
        args.trainable = PRESETS[args.preset].trainable[stage]
    set_trainable(model, args.trainable)
    # 3. Data: every record checked and tokenised
    dataset = build_dataset(args, tokenizer, model.config, ctx, log=log)
    # 4. Optimizer, resume state, DDP, loader, logger
    setup, state = prepare_run(model, dataset, args, ctx, stage=STAGE_NAMES[stage], log=log)
    # 5. Train
    try:
        train(setup, args, state, log=log)
    finally:
        finish_run(setup)


def finish_run(setup: LoopSetup):
    setup.logger.finish()
    if setup.ctx.distributed:
        dist.destroy_process_group()
