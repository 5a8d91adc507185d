"""Everything a training run needs before its first step: processes and precision, the model (built, loaded,
frozen), the data (prepared, checked, optionally its vision features cached) and its loader, the optimizer, resume
files and the run logger. trainer/training.py holds the loop that runs on what `prepare_run` returns.
"""
import datetime
import gc
import inspect
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from common import RunStopped, UserError, atomic_save, count_parameters, quiet_transformers, torch_dtype, unwrap
from dataset.lm_dataset import Collator, GlobalBatchSampler, VLMDataset, init_worker
from dataset.prepared import prepare_dataset, prepared_root
from dataset.processing import check_tokenizer_matches, chat_template_warning, image_processor_for, load_tokenizer
from model.lora import PROJECTOR_MODULE, add_lora, lora_summary
from model.model_hf_vlm import TransformersVLM, TransformersVLMConfig
from model.model_vlm import DEFAULT_NUM_QUERY_TOKENS, MiniMindVLM, qformer_settings
from model.presets import PRESETS, default_vision_model_path, vlm_config
from model.weights import (WeightsMismatchError, architecture_path, load_blip2_qformer, load_weights,
                           read_architecture, read_blip2_qformer, weight_path)

from .config import TRAINABLE_CHOICES, TrainConfig
from .feature_cache import build_feature_store

STAGE_NAMES = {"pretrain": "Pretrain", "sft": "SFT"}  # in log lines and wandb run names
# How long ranks may wait in a collective while the prepared data is built (init_distributed).
PREPARE_TIMEOUT = datetime.timedelta(hours=2)
# Batches each DataLoader worker keeps ready (torch's default): with uint8 pixels, 8 workers at batch 16 keep
# about 40 MB in /dev/shm per process.
PREFETCH_BATCHES = 2
SHARED_MEMORY_PATH = Path("/dev/shm")  # where DataLoader workers hand batches to the main process (Linux)


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
    if use_cuda and local_rank >= torch.cuda.device_count():
        # NCCL cannot put two ranks on one GPU: one process per GPU
        raise UserError(f"torchrun started local rank {local_rank}, but torch sees {torch.cuda.device_count()} CUDA "
                        f"GPU(s) on this machine: use --nproc_per_node {torch.cuda.device_count()} (one process per "
                        f"GPU), or --device cpu")
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    # device_id binds the NCCL communicator to this rank's GPU at once (no guessing, no extra context).
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=PREPARE_TIMEOUT,
                            device_id=device if use_cuda else None)
    return RunContext(rank, local_rank, world_size, device)


def run_then_close_group(ctx: RunContext, work):
    """Call `work()` (a whole run: the model, its DDP wrapper and the data live in its frames), then end the process
    group, without the gloo deadlock at exit.

    A collective's work object lives until a gloo worker thread lets go of it, just after the call returns; a
    later barrier keeps the earlier ones (gather_object's tensors among them) until the barrier itself is freed;
    freeing a tensor that Python has seen needs the GIL; and the group's destructor joins the worker threads while
    holding the GIL. A worker still freeing the last barrier then waits forever: one rank of a 2-process CPU run
    hung so at exit, about once in a few runs, and a loop of such runs hung within 3 to 30. So this thread holds
    the last barrier's work until the group is gone (its last reference is the DDP model's, freed with `work`'s
    frames; gc for any cycle through it): the workers have nothing left to free, and the tensors go here.

    A run that every rank stopped at the same step (RunStopped: the stop flag and the loss are all-reduced) ends
    the same way; any other error ends the group without the barrier, which the other ranks may never reach."""
    if not ctx.distributed:
        return work()
    stopped = None
    try:
        work()
    except RunStopped as stop:
        stopped = RunStopped(str(stop), stop.exit_code)  # no traceback: its frames would keep the model alive
    except BaseException:
        dist.destroy_process_group()
        raise
    last_barrier = dist.barrier(async_op=True)
    last_barrier.wait()
    dist.destroy_process_group()
    gc.collect()
    del last_barrier
    if stopped is not None:
        raise stopped


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


# ------------------------------------------------------------------------------------------------ the model

QFORMER_FLAGS = ("num_query_tokens", "qformer_hidden_size", "qformer_num_layers", "qformer_num_heads", "qformer_init")


def qformer_fields(cfg: TrainConfig, blip2=None) -> dict:
    """The VLMConfig fields of the Q-Former the flags ask for: a BLIP-2 folder's (--qformer_init, read as `blip2`)
    or a from-scratch one's; {} for another projector, which the Q-Former flags do not fit."""
    if cfg.projector != "qformer":
        given = [name for name in QFORMER_FLAGS if getattr(cfg, name) is not None]
        if given:
            raise UserError(f"--{given[0]} is for --projector qformer (this run's projector: {cfg.projector})")
        return {}
    if blip2 is None:
        shape = dict(hidden_size=cfg.qformer_hidden_size, num_layers=cfg.qformer_num_layers,
                     num_heads=cfg.qformer_num_heads)
        try:
            settings = qformer_settings(**{name: value for name, value in shape.items() if value is not None})
        except ValueError as error:
            raise UserError(str(error)) from None
        return dict(num_query_tokens=cfg.num_query_tokens or DEFAULT_NUM_QUERY_TOKENS, qformer_config=settings)
    for flag, value in (("num_query_tokens", blip2.num_query_tokens),
                        ("qformer_hidden_size", blip2.qformer_config["hidden_size"]),
                        ("qformer_num_layers", blip2.qformer_config["num_hidden_layers"]),
                        ("qformer_num_heads", blip2.qformer_config["num_attention_heads"])):
        if getattr(cfg, flag) not in (None, value):
            raise UserError(f"--{flag} {getattr(cfg, flag)} differs from the {value} of --qformer_init "
                            f"{cfg.qformer_init}: leave it out")
    return dict(num_query_tokens=blip2.num_query_tokens, qformer_config=blip2.qformer_config)


def build_model(cfg: TrainConfig, stage: str, log=print):
    """(model, cfg): the model the flags describe, or, when the start weights have an architecture file and no
    architecture flag was given (SFT after pretraining), the start weights' architecture, written into the
    returned cfg with the stage's trainable set of its preset (unless --trainable was given); the start weights
    are loaded strictly. With --language_model, the LM is that transformers folder's (model_hf_vlm.py): its
    shape names the weight files, and `--from_weight llm` starts from the folder's own weights."""
    if cfg.language_model is not None:
        text_config = read_language_model_config(cfg.language_model)
        cfg = replace(cfg, hidden_size=text_config.hidden_size, num_hidden_layers=text_config.num_hidden_layers,
                      use_moe=0)
    source = None  # --from_weight: a name in --save_dir, a .pth path, or none
    if cfg.from_weight != "none" and not (cfg.language_model is not None and cfg.from_weight == "llm"):
        source = (Path(cfg.from_weight) if cfg.from_weight.endswith(".pth") or os.sep in cfg.from_weight
                  else weight_path(cfg.save_dir, cfg.from_weight, cfg.hidden_size, cfg.use_moe))
    if source is not None and not source.is_file():
        raise FileNotFoundError(f"{source} not found: download the weights (`python -m scripts.download --what "
                                f"llm`), train the previous stage first, or pass --from_weight none")
    blip2 = read_blip2_qformer(cfg.qformer_init) if cfg.qformer_init and cfg.projector == "qformer" else None
    config = None  # with --language_model and no start file: built from the LM folder below
    if cfg.language_model is None:
        config = vlm_config(cfg.preset, cfg.hidden_size, cfg.num_hidden_layers, bool(cfg.use_moe), cfg.vision_encoder,
                            cfg.projector, max_seq_len=cfg.max_seq_len, **qformer_fields(cfg, blip2))
    architecture = read_architecture(source) if source is not None and architecture_path(source).is_file() else None
    # A transformers LM's file is rebuilt from its own file whatever flag named it (no flag makes it a MiniMind).
    if architecture is not None and (not cfg.architecture_given or
                                     isinstance(architecture.config, TransformersVLMConfig)):
        config = architecture.config
        config.max_seq_len = cfg.max_seq_len
        cfg = replace(cfg, preset=architecture.preset, hidden_size=config.hidden_size,
                      num_hidden_layers=config.num_hidden_layers, use_moe=int(config.use_moe),
                      vision_encoder=config.vision_encoder, projector=config.projector)
        if isinstance(config, TransformersVLMConfig):
            cfg = replace(cfg, language_model=config.language_model)
            if not cfg.tokenizer_path_given:
                cfg = replace(cfg, tokenizer_path=config.language_model)
        if not cfg.vision_model_path_given:
            cfg = replace(cfg, vision_model_path=str(default_vision_model_path(config,
                                                                              architecture.vision_model_path)))
        log(f"architecture of {source.name} ({architecture_path(source).name}): "
            f"{config.language_model if isinstance(config, TransformersVLMConfig) else cfg.preset}, "
            f"{config.hidden_size}x{config.num_hidden_layers}{' MoE' if config.use_moe else ''}, "
            f"{config.vision_encoder} + {config.projector} projector, {config.image_token_count} tokens per image")
    if not cfg.trainable_given:  # the preset's, which the start weights' architecture may have changed
        cfg = replace(cfg, trainable=PRESETS[cfg.preset].trainable[stage])
    with quiet_transformers():
        if isinstance(config, TransformersVLMConfig):
            model = TransformersVLM(config, vision_model_path=cfg.vision_model_path)
        elif config is None:  # the LM folder's own weights, a fresh projector
            model = TransformersVLM.from_language_model(
                cfg.language_model, load_tokenizer(cfg.tokenizer_path), cfg.vision_model_path,
                vision_encoder=cfg.vision_encoder, projector=cfg.projector, max_seq_len=cfg.max_seq_len,
                **qformer_fields(cfg, blip2))
            log(f"language model: {cfg.language_model} ({type(model.language_model).__name__}, "
                f"{cfg.hidden_size}x{cfg.num_hidden_layers}), image placeholder id {model.image_token_id} "
                f"x{model.image_token_count}")
        else:
            model = MiniMindVLM(config, vision_model_path=cfg.vision_model_path)
    if blip2 is not None:  # before the start weights: a file with a vision_proj replaces it
        load_blip2_qformer(model.vision_proj, blip2, cfg.qformer_init, log=log)
    if source is not None:
        load_weights(model, source, log=log)
    return model, cfg


def read_language_model_config(folder):
    """The transformers config of a --language_model folder, or a one-line error naming the flag."""
    from transformers import AutoConfig

    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"--language_model {folder}: no config.json there (pass a transformers causal-LM "
                                f"folder, e.g. a Qwen2.5 or Llama checkout)")
    return AutoConfig.from_pretrained(str(folder))


def set_trainable(model, policy: str, **lora_options):
    """projector: vision_proj only; projector_last_layer: + the last LM block; projector_first_last_layers: + the
    first and last LM blocks (upstream 3v's --freeze_llm 1); all: + the whole LM (a transformers LM's blocks:
    model_hf_vlm.decoder_layers); lora: + LoRA adapters injected into the frozen LM (model/lora.py add_lora, given
    lora_options: rank, alpha, dropout, target, base_weights)."""
    if policy not in TRAINABLE_CHOICES:
        raise ValueError(f"unknown trainable policy {policy!r}; choose from {TRAINABLE_CHOICES}")
    if policy == "lora":
        add_lora(model, **lora_options)
        return
    model.requires_grad_(policy == "all")
    model.vision_proj.requires_grad_(True)
    layers = model.decoder_layers if isinstance(model, TransformersVLM) else model.model.layers
    if policy in ("projector_last_layer", "projector_first_last_layers"):
        layers[-1].requires_grad_(True)
    if policy == "projector_first_last_layers":
        layers[0].requires_grad_(True)


def optimizer_groups(model, learning_rate: float, projector_lr: float = None) -> list:
    """AdamW parameter groups over the trainable parameters: one at `learning_rate`, or, with `projector_lr`, the LM's
    (possibly none) at `learning_rate` and the projector's at `projector_lr`. Each group keeps its base rate in
    "initial_lr"; the schedule scales it (trainer/training.py train_step)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if projector_lr is None:
        return [{"params": trainable, "lr": learning_rate, "initial_lr": learning_rate}]
    projector = {id(p) for p in model.get_submodule(PROJECTOR_MODULE).parameters()}
    return [{"params": [p for p in trainable if id(p) not in projector], "lr": learning_rate,
             "initial_lr": learning_rate},
            {"params": [p for p in trainable if id(p) in projector], "lr": projector_lr, "initial_lr": projector_lr}]


def inductor_options() -> dict:
    """Inductor settings of every compiled training step. Triton's memory-coalescing analysis off: on torch 2.11 it
    fails the compile of the training step on CUDA (an AssertionError in tiling_utils.get_pw_red_splits, seen on an
    H200; the assertion of pytorch issue 197077), and inductor's own notes say it does not apply to dynamic shapes,
    which the step always has. Where a torch has no such setting, nothing is passed."""
    import torch._inductor.config as inductor_config

    return ({"triton.coalesce_tiling_analysis": False}
            if hasattr(inductor_config.triton, "coalesce_tiling_analysis") else {})


def compile_model(model, backend: str = "inductor"):
    """torch.compile with dynamic shapes from the first step: batches vary in length (and the first target's
    position), and a new length then reuses the compiled graphs instead of compiling another set."""
    options = inductor_options() if backend == "inductor" else {}
    return torch.compile(model, dynamic=True, backend=backend, options=options or None)


# ------------------------------------------------------------------------------------------------- the data

def prepared_folder_is_shared(cfg: TrainConfig, ctx: RunContext) -> bool:
    """True when every machine of the run sees the same prepared-data folder (a shared filesystem): rank 0 leaves
    a marker file there and every rank looks for it. One machine: True without looking."""
    if not ctx.distributed or int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size)) == ctx.world_size:
        return True
    root = prepared_root(cfg.data_path, cfg.prepared_dir)
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


def build_dataset(cfg: TrainConfig, tokenizer, model: MiniMindVLM, ctx: RunContext, autocast,
                  log=print) -> VLMDataset:
    """The training dataset: its prepared data built once per prepared folder (by global rank 0 when every
    machine shares the folder, else by each machine's local rank 0; the build lock keeps it to one builder either
    way; the other ranks wait for it, then all memory-map it) and checked; then, with --cache_vision_features,
    every image's features computed once (the model is on ctx.device). Rank 0 prints the start-up summary."""
    main_log = log if ctx.is_main else None
    warning = chat_template_warning(tokenizer, model.config.chat_format)
    if warning and main_log is not None:
        main_log(warning)
    started = time.time()
    config = model.config
    prepared = prepare_dataset(cfg.data_path, tokenizer, config.image_special_token, config.image_ids[0],
                               cfg.max_seq_len, images_path=cfg.images_path, cache_dir=cfg.prepared_dir,
                               workers=cfg.prepare_workers, log=main_log, chat_format=config.chat_format,
                               may_build=ctx.is_main if prepared_folder_is_shared(cfg, ctx) else ctx.local_rank == 0)
    stats = prepared.check(cfg.skip_bad_samples, log=main_log)
    if main_log is not None:
        main_log(f"data ready in {time.time() - started:.1f}s: {len(prepared)} samples "
                 f"({stats.text_only} text-only), prepared data in {prepared.folder}")
    image_processor = image_processor_for(config)
    store = None
    if cfg.cache_vision_features:
        store = build_feature_store(prepared, image_processor, model, cfg.cache_vision_features, ctx, autocast,
                                    log=log)
    return VLMDataset(prepared, image_processor, feature_store=store, log=main_log)


def shared_memory_warning(cfg: TrainConfig, pixel_shape: tuple, shm_path: Path = SHARED_MEMORY_PATH):
    """A warning line when /dev/shm has less room than the DataLoader workers of this machine's processes may keep
    there (uint8 pixels, one image a sample; a container's default is 64 MB), else None."""
    if cfg.num_workers == 0 or not shm_path.is_dir():
        return None
    image_bytes = math.prod(pixel_shape)  # uint8
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    needed = processes * cfg.num_workers * PREFETCH_BATCHES * cfg.batch_size * image_bytes
    free = shutil.disk_usage(shm_path).free
    if free >= needed:
        return None
    return (f"warning: {shm_path} has {free / 2 ** 20:.0f} MB free, but the DataLoader workers may keep about "
            f"{needed / 2 ** 20:.0f} MB of batches there; in a container run with --ipc=host or --shm-size=2g, or "
            f"lower --num_workers (a lost batch stops the run after --loader_timeout)")


def build_loader(dataset: VLMDataset, cfg: TrainConfig, ctx: RunContext, pad_to=None):
    """Batches with uint8 pixels (normalised on the device, move_batch) and the positions the forward needs
    precomputed (collate_batch); a worker that loses a batch ends the run after --loader_timeout."""
    sampler = GlobalBatchSampler(dataset.lengths, cfg.batch_size, ctx.world_size, ctx.rank, seed=cfg.seed,
                                 group_by_length=not cfg.no_length_grouping)
    workers = cfg.num_workers > 0
    # Each iter(loader) draws its workers' base seed from `generator`: from torch's global generator it would take one
    # draw more on a resumed run (a new iterator mid-epoch) and so change every dropout mask after it (LoRA dropout).
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
        collate_fn=Collator(dataset.pad_token_id, pad_to, dataset.image_token_id, dataset.image_tokens_per_image),
        pin_memory=ctx.device.type == "cuda", worker_init_fn=init_worker, persistent_workers=False,
        prefetch_factor=PREFETCH_BATCHES if workers else None, timeout=cfg.loader_timeout if workers else 0,
        generator=torch.Generator().manual_seed(cfg.seed))
    return loader, sampler


# ------------------------------------------------------------------------------------------------ resume files

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


def capture_rng(device: torch.device):
    """This process's RNG states (Python, numpy, torch CPU, and the CUDA generator of the device it trains on)
    as tensors, ints and tuples only, so that resume files load with weights_only=True."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(saved, ctx: RunContext, log=print):
    """Restore this rank's states from `saved` (every rank's capture_rng() in rank order; a dict in files written
    before per-rank states: rank 0's, with every visible GPU's CUDA state). Another world size, or a CUDA state
    that does not fit this process's device, is said in one line and that part starts from --seed instead."""
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


def save_resume(path, model, optimizer, scaler, state: TrainState, ctx: RunContext, cfg: TrainConfig, rng_states):
    atomic_save({
        "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "epoch": state.epoch, "step": state.step_in_epoch, "global_step": state.global_step,
        "skipped_steps": state.skipped_steps, "replaced_samples": state.replaced_samples,
        "world_size": ctx.world_size, "batch_size": cfg.batch_size,
        "accumulation_steps": cfg.accumulation_steps, "wandb_id": state.wandb_id, "rng": rng_states,
    }, path)


def load_resume(path, model, optimizer, scaler, ctx: RunContext, cfg: TrainConfig, log=print) -> TrainState:
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
    base_lrs = [group["initial_lr"] for group in optimizer.param_groups]  # this run's flags'
    saved_groups = len(checkpoint["optimizer"]["param_groups"])
    if saved_groups != len(base_lrs):
        raise WeightsMismatchError(f"{path}: its optimizer has {saved_groups} parameter group(s), this run's "
                                   f"{len(base_lrs)}: resume with the interrupted run's --projector_lr (given or not)")
    optimizer.load_state_dict(checkpoint["optimizer"])
    for group, base_lr in zip(optimizer.param_groups, base_lrs):  # --learning_rate / --projector_lr as given now
        group["initial_lr"] = base_lr
    scaler.load_state_dict(checkpoint["scaler"])
    state = TrainState(epoch=checkpoint["epoch"], step_in_epoch=checkpoint["step"],
                       global_step=checkpoint["global_step"], skipped_steps=checkpoint["skipped_steps"],
                       replaced_samples=checkpoint["replaced_samples"], wandb_id=checkpoint["wandb_id"])
    old_global_batch = checkpoint["world_size"] * checkpoint["batch_size"] * checkpoint["accumulation_steps"]
    new_global_batch = ctx.world_size * cfg.batch_size * cfg.accumulation_steps
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


# ------------------------------------------------------------------------------------------------- assembly

@dataclass
class LoopSetup:
    """What the loop (trainer/training.py train) runs on."""
    cfg: TrainConfig  # with the start weights' architecture and the trainable set resolved (build_model)
    model: torch.nn.Module  # possibly DDP- or compile-wrapped
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: object  # a function returning the autocast context (autocast_for)
    loader: torch.utils.data.DataLoader
    sampler: GlobalBatchSampler
    ctx: RunContext
    logger: object  # NullLogger or WandbLogger
    weights_out: Path
    resume_out: Path


def prepare_run(cfg: TrainConfig, stage: str, ctx: RunContext, log=print):
    """(LoopSetup, TrainState) of a stage ("pretrain" or "sft"): model, data, optimizer, resume state, compile/DDP
    wrappers, loader and logger."""
    # Model with the vision encoder frozen, start weights loaded strictly; its tokenizer; what trains
    model, cfg = build_model(cfg, stage, log=log)
    tokenizer = load_tokenizer(cfg.tokenizer_path, model.config)
    if isinstance(model, TransformersVLM):  # the placeholder it was built with is the one added
        check_tokenizer_matches(tokenizer, model.config)
    set_trainable(model, cfg.trainable, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                  target=cfg.lora_target, base_weights=None if cfg.from_weight == "none" else cfg.from_weight)
    # Data: every record checked and tokenised; with --cache_vision_features, every image encoded once
    autocast, scaler = autocast_for(ctx.device, cfg.dtype)
    model.to(ctx.device)
    dataset = build_dataset(cfg, tokenizer, model, ctx, autocast, log=log)
    end_long_waits(ctx)  # every rank has its data (and features): back to the default collective timeout
    total, trainable = count_parameters(model)
    log(f"{STAGE_NAMES[stage]}: {total / 1e6:.3f}M parameters without the vision encoder, {trainable / 1e6:.3f}M "
        f"trainable ({lora_summary(model) if cfg.trainable == 'lora' else cfg.trainable})")
    # Optimizer (AdamW, torch defaults: weight decay 0.01) over the trainable parameters only, the projector in a
    # group of its own with --projector_lr; resume state
    optimizer = torch.optim.AdamW(optimizer_groups(model, cfg.learning_rate, cfg.projector_lr))
    weights_out = weight_path(cfg.save_dir, cfg.save_weight, cfg.hidden_size, cfg.use_moe)
    resume_out = weight_path(cfg.checkpoint_dir, cfg.save_weight, cfg.hidden_size, cfg.use_moe)
    resume_out = resume_out.with_name(f"{resume_out.stem}_resume.pth")  # {save_weight}_{hidden}{_moe}_resume.pth
    state = TrainState()
    if cfg.from_resume:
        if resume_out.is_file():
            state = load_resume(resume_out, model, optimizer, scaler, ctx, cfg, log=log)
        else:
            log(f"no resume checkpoint at {resume_out}; starting from the beginning")
    # Wrappers, loader, logger
    wrapped = compile_model(model) if cfg.use_compile else model
    if ctx.distributed:
        # Every step uses every trainable parameter on every rank (a text-only batch still runs vision_proj on
        # its zero images, collate_batch), so DDP need not search the graph for unused ones, except with MoE,
        # whose experts may get no token on a rank, and with a projector that cannot run on zero images (the
        # Q-Former). The only buffers are the constant RoPE tables: no broadcast before each forward (the flag's
        # name since torch 2.13, whose old name warns; the new one still syncs the equal tables once, at the start).
        ddp = torch.nn.parallel.DistributedDataParallel
        buffer_flag = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
                       else "broadcast_buffers")
        find_unused = bool(cfg.use_moe) or not model.vision_proj.uses_all_parameters_without_images
        wrapped = ddp(wrapped, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
                      find_unused_parameters=find_unused, **{buffer_flag: False})
    loader, sampler = build_loader(dataset, cfg, ctx)
    if ctx.local_rank == 0 and (warning := shared_memory_warning(cfg, dataset.image_processor.pixel_shape)):
        (log if ctx.is_main else print)(warning)  # each machine's own /dev/shm
    logger = NullLogger()  # wandb on rank 0 with --use_wandb, continuing the resumed run's
    if cfg.use_wandb and ctx.is_main:
        logger = WandbLogger(cfg.wandb_project, f"MiniMind-V-{STAGE_NAMES[stage]}-Epoch-{cfg.epochs}-BatchSize-"
                             f"{cfg.batch_size}-LearningRate-{cfg.learning_rate}", state.wandb_id, asdict(cfg))
    state.wandb_id = logger.run_id
    return LoopSetup(cfg, wrapped, optimizer, scaler, autocast, loader, sampler, ctx, logger, weights_out,
                     resume_out), state
