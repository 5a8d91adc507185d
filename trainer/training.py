"""The shared training module: flags, distributed setup, model and data assembly, freezing, optimizer,
schedule, the loop, and checkpoint I/O. `train_pretrain_vlm.py` and `train_sft_vlm.py` differ only in the
defaults they pass to `build_parser`.

Loss normalisation: every optimizer step averages the cross-entropy over all supervised tokens of the
global batch (all micro-batches, all ranks). One process with batch 2b and two processes with batch b
therefore take identical steps.
"""
import argparse
import datetime
import math
import os
import random
import shutil
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
from dataset.prepared import prepared_root
from dataset.processing import chat_template_warning, image_processor_for, load_tokenizer
from model.model_vlm import MiniMindVLM, VLMConfig
from model.presets import PRESETS, add_preset_flags, apply_preset, config_from_args, default_vision_model_path
from model.weights import (WeightsMismatchError, architecture_path, load_weights, read_architecture, weight_path,
                           write_architecture)

# Cosine schedule from the base lr down to this fraction of it (upstream: lr·(0.1 + 0.45·(1 + cos))).
MIN_LR_RATIO = 0.1
# Which parameters train; CLIP is always frozen.
TRAINABLE_CHOICES = ("projector", "projector_last_layer", "projector_first_last_layers", "all")
STAGE_NAMES = {"pretrain": "Pretrain", "sft": "SFT"}  # in log lines and wandb run names
# How long ranks may wait in a collective while the prepared data is built (init_distributed).
PREPARE_TIMEOUT = datetime.timedelta(hours=2)
# A batch takes well under a second to decode and collate; minutes of silence mean a worker lost it.
LOADER_TIMEOUT_S = 300.0
# torch's DataLoader errors for a batch that will never come (a worker stopped, killed, or silent).
LOST_BATCH_MESSAGES = ("DataLoader timed out", "exited unexpectedly", "is killed by signal")
# Batches each DataLoader worker keeps ready (torch's default): with uint8 pixels, 8 workers at batch 16 keep
# about 40 MB in /dev/shm per process.
PREFETCH_BATCHES = 2
SHARED_MEMORY_PATH = Path("/dev/shm")  # where DataLoader workers hand batches to the main process (Linux)
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
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE: NCCL on CUDA, gloo on CPU. Otherwise one process.

    The process group starts with PREPARE_TIMEOUT, long enough for the ranks that wait while another one
    builds the prepared data (a cold build of the full SFT set takes up to half an hour); `end_long_waits`
    brings it back to torch's default once every rank has its data.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if "RANK" not in os.environ or world_size == 1:
        return RunContext(device=torch.device(device_arg))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.device(device_arg).type == "cuda" and torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    # device_id binds the NCCL communicator to this rank's GPU at once (no guessing, no extra context).
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=PREPARE_TIMEOUT,
                            device_id=device if use_cuda else None)
    return RunContext(rank, local_rank, world_size, device)


def end_long_waits(ctx: RunContext):
    """Every rank has its data: collectives get torch's default timeout again, so that a rank that dies in
    training is noticed in minutes, not hours (torch has no public setter; without it the long one stays)."""
    if not ctx.distributed:
        return
    dist.barrier()
    set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if set_timeout is not None:
        nccl_default = dist.constants.default_pg_nccl_timeout if ctx.device.type == "cuda" else None
        set_timeout(nccl_default or dist.constants.default_pg_timeout)


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
    """Sum each value (a number, or a 0-dim tensor on the device) over all ranks in one all-reduce; a tensor
    [len(values)] on the device. The numbers go to the device without waiting for it (non_blocking)."""
    dtype = torch.float64 if ctx.device.type == "cpu" else torch.float32
    tensor = torch.cat([v.to(dtype).reshape(1) if isinstance(v, torch.Tensor)
                        else torch.tensor([float(v)], dtype=dtype).to(ctx.device, non_blocking=True) for v in values])
    if ctx.distributed:
        dist.all_reduce(tensor)
    return tensor


def all_reduce_dict(values: dict, ctx: RunContext) -> dict:
    """Sum each named value over all ranks (one all-reduce); plain floats back (the step's one device->host
    sync)."""
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


def capture_rng(device: torch.device):
    """This process's RNG states (Python, numpy, torch CPU, and the CUDA generator of the device it trains on)
    as tensors, ints and tuples only, so that resume files load with weights_only=True."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def gather_rng(ctx: RunContext):
    """Every rank's capture_rng(), in rank order, on rank 0 (None on the other ranks)."""
    state = capture_rng(ctx.device)
    if not ctx.distributed:
        return [state]
    states = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(state, states, dst=0)
    return states


def restore_rng(saved, ctx: RunContext, log=print):
    """Restore this rank's states from `saved` (gather_rng's list; a dict in files written before per-rank
    states: rank 0's, with every visible GPU's CUDA state). Another world size, or a CUDA state that does not
    fit this process's device, is said in one line and that part starts from --seed instead."""
    if isinstance(saved, dict):
        saved = [saved] * ctx.world_size
    if len(saved) != ctx.world_size:
        log(f"resume: saved by {len(saved)} process(es), resumed by {ctx.world_size}: random states (dropout) "
            f"start from --seed; the data order goes on as saved")
        return
    state = saved[ctx.rank]
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    saved_cuda = state.get("cuda")
    if ctx.device.type != "cuda":
        return
    index = ctx.device.index if ctx.device.index is not None else torch.cuda.current_device()
    cuda = saved_cuda
    if isinstance(saved_cuda, (list, tuple)):  # older files: one state per GPU visible then
        cuda = saved_cuda[index] if index < len(saved_cuda) else None
    if cuda is None:
        where = f"{len(saved_cuda)} GPU(s) visible" if isinstance(saved_cuda, (list, tuple)) else "no GPU"
        log(f"resume: no saved CUDA random state for {ctx.device} (saved with {where}); it starts from --seed")
        return
    torch.cuda.set_rng_state(cuda, ctx.device)


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


def save_resume(path, model, optimizer, scaler, state: TrainState, ctx: RunContext, args, rng_states):
    atomic_save({
        "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "epoch": state.epoch, "step": state.step_in_epoch, "global_step": state.global_step,
        "skipped_steps": state.skipped_steps, "replaced_samples": state.replaced_samples,
        "world_size": ctx.world_size, "batch_size": args.batch_size,
        "accumulation_steps": args.accumulation_steps, "wandb_id": state.wandb_id, "rng": rng_states,
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
    restore_rng(checkpoint["rng"], ctx, log)
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

def prepared_folder_is_shared(args, ctx: RunContext) -> bool:
    """True when every machine of the run sees the same prepared-data folder (a shared filesystem): rank 0 leaves
    a marker file there and every rank looks for it. One machine: True without looking."""
    if not ctx.distributed or int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size)) == ctx.world_size:
        return True
    root = prepared_root(args.data_path, args.prepared_dir)
    names = [f".shared-probe-{os.getpid()}-{time.time_ns()}"]
    dist.broadcast_object_list(names, src=0)
    marker = root / names[0]
    if ctx.is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError:  # an unwritable folder: prepare_dataset says so in one line
            pass
    dist.barrier()
    seen = all_reduce_sum([float(marker.exists())], ctx)[0]
    dist.barrier()
    if ctx.is_main:
        marker.unlink(missing_ok=True)
    return int(seen) == ctx.world_size


def build_dataset(args, tokenizer, config: VLMConfig, ctx: RunContext, log=print) -> VLMDataset:
    """The prepared dataset, built once per prepared folder: by global rank 0 when every machine shares the
    folder, else by each machine's local rank 0 (the build lock keeps it to one builder either way); the other
    ranks wait for it, then all memory-map it. Rank 0 prints the start-up summary."""
    main_log = log if ctx.is_main else None
    warning = chat_template_warning(tokenizer, config.chat_format)
    if warning and main_log is not None:
        main_log(warning)
    started = time.time()
    dataset = VLMDataset(args.data_path, tokenizer, config.image_special_token, config.image_ids[0],
                         args.max_seq_len, images_path=args.images_path, skip_bad_samples=args.skip_bad_samples,
                         log=main_log, prepared_dir=args.prepared_dir, prepare_workers=args.prepare_workers,
                         may_build=ctx.is_main if prepared_folder_is_shared(args, ctx) else ctx.local_rank == 0,
                         image_processor=image_processor_for(config), chat_format=config.chat_format)
    if main_log is not None:
        main_log(f"data ready in {time.time() - started:.1f}s: {len(dataset)} samples "
                 f"({dataset.stats.text_only} text-only), prepared data in {dataset.prepared.folder}")
    return dataset


def shared_memory_warning(args, pixel_shape: tuple, shm_path: Path = SHARED_MEMORY_PATH):
    """A warning line when /dev/shm has less room than the DataLoader workers of this machine's processes may keep
    there (uint8 pixels, one image a sample; a container's default is 64 MB), else None."""
    if args.num_workers == 0 or not shm_path.is_dir():
        return None
    image_bytes = math.prod(pixel_shape)  # uint8
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    needed = processes * args.num_workers * PREFETCH_BATCHES * args.batch_size * image_bytes
    free = shutil.disk_usage(shm_path).free
    if free >= needed:
        return None
    return (f"warning: {shm_path} has {free / 2 ** 20:.0f} MB free, but the DataLoader workers may keep about "
            f"{needed / 2 ** 20:.0f} MB of batches there; in a container run with --ipc=host or --shm-size=2g, or "
            f"lower --num_workers (a lost batch stops the run after --loader_timeout)")


def build_loader(dataset: VLMDataset, args, ctx: RunContext, pad_to=None):
    """Batches with uint8 pixels (normalised on the device, move_batch) and the positions the forward needs
    precomputed (collate_batch); a worker that loses a batch ends the run after --loader_timeout."""
    sampler = GlobalBatchSampler(dataset.lengths, args.batch_size, ctx.world_size, ctx.rank, seed=args.seed,
                                 group_by_length=not args.no_length_grouping)
    workers = args.num_workers > 0
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=args.num_workers,
        collate_fn=Collator(dataset.pad_token_id, pad_to, dataset.image_token_id, dataset.image_tokens_per_image),
        pin_memory=ctx.device.type == "cuda", worker_init_fn=init_worker, persistent_workers=False,
        prefetch_factor=PREFETCH_BATCHES if workers else None, timeout=args.loader_timeout if workers else 0)
    return loader, sampler


# ------------------------------------------------------------------------------------------------- the loop

def move_batch(batch, device, image_processor):
    """Tensors to `device` (asynchronously from pinned memory); uint8 pixels are normalised there by the
    model's image processor."""
    moved = {}
    for key, value in batch.items():
        moved[key] = value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
    if moved.get("pixel_values") is not None and moved["pixel_values"].dtype == torch.uint8:
        moved["pixel_values"] = image_processor.normalize(moved["pixel_values"])
    return moved


def micro_batches(loader_iter, count, timeout: float):
    """Up to `count` batches; a lost batch (a DataLoader worker killed or out of shared memory) is one line."""
    batches = []
    for _ in range(count):
        try:
            batch = next(loader_iter, None)
        except RuntimeError as error:
            if not any(lost in str(error) for lost in LOST_BATCH_MESSAGES):
                raise
            raise RunStopped(
                f"stopped: no batch from the DataLoader workers ({str(error).splitlines()[0]}). Most often /dev/shm "
                f"is too small: in a container run with --ipc=host or --shm-size=2g; or lower --num_workers, "
                f"--batch_size, or raise --loader_timeout (now {timeout:g}s) for very slow storage.", 1) from None
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
    aux_loss: float  # MoE balance loss, mean over micro-batches and ranks (0 for dense models)
    lr: float
    finite: bool  # False: the step was skipped (a non-finite loss on some rank)
    samples: int
    tokens: int  # non-padding tokens
    replaced_samples: int  # samples whose image failed to decode and were replaced by the next good one
    stop_requested: bool  # a rank received SIGINT/SIGTERM during the step
    overflow: bool = False  # fp16: the GradScaler found an inf/NaN gradient and skipped the step

    @property
    def applied(self) -> bool:
        """The optimizer step was taken."""
        return self.finite and not self.overflow


def supervised_targets(batch) -> int:
    """Positions whose next token is a target (counted on the CPU, before the batch moves to the device)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def backward_micro_batches(setup: LoopSetup, batches, target_counts, global_targets):
    """Forward and backward over the micro-batches; returns (summed CE, summed aux loss) of this rank as 0-dim
    tensors on the device (read once per step, in train_step's all-reduce: no sync per micro-batch).

    The loss of each micro-batch is scaled so that the gradients add up to the mean over all supervised
    tokens of the global batch: mean CE x local tokens = summed CE, and DDP averages over ranks, hence the
    world size factor.
    """
    model, ctx = setup.model, setup.ctx
    loss_sum, aux_sum = 0.0, 0.0
    global_targets = global_targets.clamp(min=1.0).to(torch.float32)
    for i, batch in enumerate(batches):
        batch = move_batch(batch, ctx.device, setup.loader.dataset.image_processor)
        # Gradient all-reduce only on the last micro-batch of the step.
        sync = nullcontext() if (not ctx.distributed or i == len(batches) - 1) else model.no_sync()
        with sync, setup.autocast():
            # loss_only: no logits where there is no target (same loss, less work and memory)
            out = model(input_ids=batch["input_ids"], labels=batch["labels"], pixel_values=batch.get("pixel_values"),
                        image_features=batch.get("image_features"), loss_only=setup.loss_only,
                        image_positions=batch.get("image_positions"), first_target=batch.get("first_target"),
                        target_index=batch.get("target_index"))
            ce_sum = out.loss * target_counts[i]
            loss = ce_sum * ctx.world_size / global_targets + out.aux_loss / len(batches)
        setup.scaler.scale(loss).backward()
        loss_sum = loss_sum + ce_sum.detach().float()
        aux_sum = aux_sum + out.aux_loss.detach().float()
    return loss_sum, aux_sum


def train_step(setup: LoopSetup, batches, lr: float, grad_clip: float, stop_requested: bool) -> StepResult:
    """One optimizer step over `batches` (the micro-batches of this rank); skipped if any rank's loss is not
    finite. Ranks agree on everything in the result (one all-reduce)."""
    target_counts = [supervised_targets(b) for b in batches]
    global_targets = all_reduce_sum([sum(target_counts)], setup.ctx)[0]  # stays on the device: no sync here
    for group in setup.optimizer.param_groups:
        group["lr"] = lr
    loss_sum, aux_sum = backward_micro_batches(setup, batches, target_counts, global_targets)
    pad_id = setup.loader.collate_fn.pad_token_id
    totals = all_reduce_dict({
        "loss": loss_sum, "finite_ranks": torch.isfinite(loss_sum + aux_sum), "aux": aux_sum / setup.ctx.world_size,
        "targets": sum(target_counts),  # summed: global_targets again, here as a number
        "stop": float(stop_requested), "samples": sum(len(b["input_ids"]) for b in batches),
        "tokens": sum(int((b["input_ids"] != pad_id).sum()) for b in batches),
        "replaced": sum(b["replaced"] for b in batches)}, setup.ctx)
    finite = int(totals["finite_ranks"]) == setup.ctx.world_size
    overflow = False
    if finite:
        if grad_clip > 0:
            setup.scaler.unscale_(setup.optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in setup.model.parameters() if p.requires_grad], grad_clip)
        scale = setup.scaler.get_scale()
        setup.scaler.step(setup.optimizer)
        setup.scaler.update()
        # fp16: a gradient overflowed on some rank (DDP averaged it into every rank's gradients), so the scaler
        # skipped optimizer.step() and lowered its scale; it never lowers the scale otherwise.
        overflow = setup.scaler.is_enabled() and setup.scaler.get_scale() < scale
    setup.optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=totals["loss"] / max(totals["targets"], 1.0), aux_loss=totals["aux"] / len(batches),
                      lr=lr, finite=finite, samples=int(totals["samples"]), tokens=int(totals["tokens"]),
                      replaced_samples=int(totals["replaced"]), stop_requested=bool(totals["stop"]),
                      overflow=overflow)


def record_step(state: TrainState, result: StepResult, max_bad_steps: int, log):
    """Count the step in `state`; a skipped step (non-finite loss, or an fp16 gradient overflow) is reported,
    and too many in a row end the run."""
    state.global_step += 1
    state.step_in_epoch += 1
    state.replaced_samples += result.replaced_samples
    if result.applied:
        state.bad_steps_in_row = 0
        return
    state.skipped_steps += 1
    state.bad_steps_in_row += 1
    reason = "non-finite loss" if not result.finite else "fp16 gradient overflow (the GradScaler lowered its scale)"
    log(f"warning: {reason} at step {state.global_step}; step skipped "
        f"({state.bad_steps_in_row} in a row, {state.skipped_steps} in total)")
    if state.bad_steps_in_row >= max_bad_steps:
        raise RunStopped(f"stopped: {state.bad_steps_in_row} optimizer steps in a row were skipped (non-finite loss "
                         f"or fp16 gradient overflow); the last saved checkpoint is intact. Lower "
                         f"--learning_rate, try --dtype bfloat16, or check the data.", 1)


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
                batches = micro_batches(loader_iter, args.accumulation_steps, args.loader_timeout)
                if not batches:
                    break
                lr = lr_at(state.global_step, schedule.total_steps, args.learning_rate)
                result = train_step(setup, batches, lr, args.grad_clip, stop.received is not None)
                record_step(state, result, args.max_bad_steps, log)
                progress.update(1)
                if on_step is not None:
                    on_step(state, result)
                epoch_done = state.step_in_epoch >= schedule.steps_per_epoch
                if result.applied:
                    window.add(result)
                    progress.set_postfix(loss=f"{result.loss:.4f}", refresh=False)
                if result.applied and is_main and (state.global_step % args.log_interval == 0 or epoch_done
                                                  or state.global_step >= schedule.last_step):
                    steps_per_s = (state.global_step - run_start_step) / max(time.time() - run_start, 1e-9)
                    eta = (schedule.last_step - state.global_step) / max(steps_per_s, 1e-9)
                    log_step(setup, args, state, result, window, eta, schedule, log)
                    window = ThroughputWindow()
                # No save right after a skipped step: the last checkpoint stays the last good one.
                if (result.applied and state.global_step % args.save_interval == 0
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
        log(f"done: {state.global_step} optimizer steps, {state.skipped_steps} skipped (non-finite loss or fp16 "
            f"gradient overflow), "
            f"{state.replaced_samples} samples replaced (undecodable image); weights in {setup.weights_out}")


def save_all(setup: LoopSetup, args, state: TrainState, log=print, final=False):
    """Rank 0 writes the weights file and the resume checkpoint. A failed write is reported and training goes
    on with the previous files kept; only a failed final save ends the run with an error (after the barrier,
    so that no rank waits forever)."""
    failed = None
    rng_states = gather_rng(setup.ctx)  # every rank takes part
    if setup.ctx.is_main:
        model = unwrap(setup.model)
        was_training = model.training
        model.eval()
        try:
            atomic_save(inference_state_dict(model), setup.weights_out)
            write_architecture(setup.weights_out, model.config, args.preset, args.vision_model_path)
            save_resume(setup.resume_out, model, setup.optimizer, setup.scaler, state, setup.ctx, args, rng_states)
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


def compile_model(model, backend: str = "inductor"):
    """torch.compile with dynamic shapes from the first step: batches vary in length (and the first target's
    position), and a new length then reuses the compiled graphs instead of compiling another set."""
    return torch.compile(model, dynamic=True, backend=backend)


def prepare_run(model: MiniMindVLM, dataset: VLMDataset, args, ctx: RunContext, stage: str, log=print):
    """Device, feature cache, optimizer, resume state, compile/DDP wrappers, loader and logger."""
    autocast, scaler = autocast_for(ctx.device, args.dtype)
    model.to(ctx.device)
    if args.cache_vision_features:
        from dataset.feature_cache import attach_feature_cache

        attach_feature_cache(dataset, model, args.cache_vision_features, ctx, autocast, log=log)
    end_long_waits(ctx)  # every rank has its data (and features): back to the default collective timeout
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
        wrapped = compile_model(wrapped)
    if ctx.distributed:
        # Every step uses every trainable parameter on every rank (a text-only batch still runs vision_proj on
        # its zero images, collate_batch), so DDP need not search the graph for unused ones, except with MoE,
        # whose experts may get no token on a rank. The only buffers are the constant RoPE tables: no broadcast
        # before each forward.
        wrapped = torch.nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
            find_unused_parameters=bool(args.use_moe), broadcast_buffers=False)
    loader, sampler = build_loader(dataset, args, ctx)
    if ctx.local_rank == 0 and (warning := shared_memory_warning(args, dataset.image_processor.pixel_shape)):
        (log if ctx.is_main else print)(warning)  # each machine's own /dev/shm
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
