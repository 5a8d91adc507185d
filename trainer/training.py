"""The training loop: `train` runs the optimizer steps of a stage on what trainer/setup.py's `prepare_run` built;
`run_stage` is a stage from the command line to its last checkpoint (train_pretrain_vlm.py, train_sft_vlm.py).

Loss normalisation: every optimizer step averages the cross-entropy over all supervised tokens of the
global batch (all micro-batches, all ranks). One process with batch 2b and two processes with batch b
therefore take identical steps.
"""
import math
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from common import RunStopped, SaveError, atomic_save, format_duration, unwrap
from model.lora import adapter_path, lora_layers, merged_state_dict, save_adapter
from model.model_minimind import IGNORE_INDEX
from model.weights import write_architecture

from .config import TrainConfig, parse_stage_args
from .setup import (LoopSetup, RunContext, TrainState, all_reduce_sum, capture_rng, init_distributed, prepare_run,
                    run_then_close_group, save_resume, seed_everything)

# Cosine schedule from the base lr down to this fraction of it (upstream: lr·(0.1 + 0.45·(1 + cos))).
MIN_LR_RATIO = 0.1
# torch's DataLoader errors for a batch that will never come (a worker stopped, killed, or silent).
LOST_BATCH_MESSAGES = ("DataLoader timed out", "exited unexpectedly", "is killed by signal")


def optimizer_steps_per_epoch(sampler, accumulation_steps: int) -> int:
    """Optimizer steps in one epoch: the sampler's batches, `accumulation_steps` micro-batches a step."""
    return math.ceil(sampler.steps_per_epoch() / accumulation_steps)


def lr_at(step: int, total_steps: int, base_lr: float, min_ratio: float = MIN_LR_RATIO) -> float:
    """Cosine from base_lr (step 0) to min_ratio·base_lr (last step), no warmup."""
    progress = step / max(total_steps, 1)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def inference_state_dict(model):
    """Upstream's released format: LM + vision_proj (no CLIP), every tensor fp16 on the CPU; LoRA adapters merged
    into the LM's weights (model/lora.py merged_state_dict)."""
    return {k: v.detach().half().cpu() for k, v in merged_state_dict(unwrap(model)).items()}


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
class StepResult:
    """What one optimizer step did, summed over its micro-batches and over all ranks."""
    loss: float  # mean cross-entropy over the global batch's supervised tokens
    aux_loss: float  # MoE balance loss, mean over micro-batches and ranks (0 for dense models)
    lr: float  # the first AdamW group's (--learning_rate's)
    finite: bool  # False: the step was skipped (a non-finite loss on some rank)
    samples: int
    tokens: int  # non-padding tokens
    replaced_samples: int  # samples whose image failed to decode and were replaced by the next good one
    stop_requested: bool  # a rank received SIGINT/SIGTERM during the step
    overflow: bool = False  # fp16: the GradScaler found an inf/NaN gradient and skipped the step
    projector_lr: float = None  # the projector's group's, with --projector_lr (None: it is in the first group)

    @property
    def applied(self) -> bool:
        """The optimizer step was taken."""
        return self.finite and not self.overflow


def train_step(setup: LoopSetup, batches, lr_scale: float, grad_clip: float, stop_requested: bool) -> StepResult:
    """One optimizer step over `batches` (the micro-batches of this rank), each AdamW group at its base rate
    ("initial_lr") x `lr_scale` (the schedule's factor, lr_at with base 1); skipped if any rank's loss is not
    finite. Ranks agree on everything in the result (one all-reduce, the step's one device->host sync).

    The loss of each micro-batch is scaled so that the gradients add up to the mean over all supervised
    tokens of the global batch: mean CE x local tokens = summed CE, and DDP averages over ranks, hence the
    world size factor.
    """
    model, ctx = setup.model, setup.ctx
    # Positions whose next token is a target, counted on the CPU before the batches move to the device
    target_counts = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches]
    global_targets = all_reduce_sum([sum(target_counts)], ctx)[0]  # stays on the device: no sync here
    global_targets = global_targets.clamp(min=1.0).to(torch.float32)
    for group in setup.optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_scale
    loss_sum, aux_sum = 0.0, 0.0  # this rank's summed CE and aux loss, 0-dim tensors on the device
    for i, batch in enumerate(batches):
        batch = move_batch(batch, ctx.device, setup.loader.dataset.image_processor)
        # Gradient all-reduce only on the last micro-batch of the step.
        sync = nullcontext() if (not ctx.distributed or i == len(batches) - 1) else model.no_sync()
        with sync, setup.autocast():
            # loss_only: no logits where there is no target (same loss, less work and memory)
            out = model(input_ids=batch["input_ids"], labels=batch["labels"], pixel_values=batch.get("pixel_values"),
                        image_features=batch.get("image_features"), loss_only=True,
                        image_positions=batch.get("image_positions"), first_target=batch.get("first_target"),
                        target_index=batch.get("target_index"))
            ce_sum = out.loss * target_counts[i]
            loss = ce_sum * ctx.world_size / global_targets + out.aux_loss / len(batches)
        setup.scaler.scale(loss).backward()
        loss_sum = loss_sum + ce_sum.detach().float()
        aux_sum = aux_sum + out.aux_loss.detach().float()
    pad_id = setup.loader.collate_fn.pad_token_id
    totals = {
        "loss": loss_sum, "finite_ranks": torch.isfinite(loss_sum + aux_sum), "aux": aux_sum / ctx.world_size,
        "targets": sum(target_counts),  # summed: global_targets again, here as a number
        "stop": float(stop_requested), "samples": sum(len(b["input_ids"]) for b in batches),
        "tokens": sum(int((b["input_ids"] != pad_id).sum()) for b in batches),
        "replaced": sum(b["replaced"] for b in batches)}
    totals = dict(zip(totals, all_reduce_sum(list(totals.values()), ctx).tolist()))
    finite = int(totals["finite_ranks"]) == ctx.world_size
    overflow = False
    if finite:
        if grad_clip > 0:
            setup.scaler.unscale_(setup.optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
        scale = setup.scaler.get_scale()
        setup.scaler.step(setup.optimizer)
        setup.scaler.update()
        # fp16: a gradient overflowed on some rank (DDP averaged it into every rank's gradients), so the scaler
        # skipped optimizer.step() and lowered its scale; it never lowers the scale otherwise.
        overflow = setup.scaler.is_enabled() and setup.scaler.get_scale() < scale
    setup.optimizer.zero_grad(set_to_none=True)
    groups = setup.optimizer.param_groups
    return StepResult(loss=totals["loss"] / max(totals["targets"], 1.0), aux_loss=totals["aux"] / len(batches),
                      lr=groups[0]["lr"], finite=finite, samples=int(totals["samples"]), tokens=int(totals["tokens"]),
                      replaced_samples=int(totals["replaced"]), stop_requested=bool(totals["stop"]),
                      overflow=overflow, projector_lr=groups[-1]["lr"] if len(groups) > 1 else None)


def train(setup: LoopSetup, state: TrainState, log=print):
    """Epochs of optimizer steps from `state` on: log (a tqdm bar on a terminal, a line every --log_interval
    steps), skip a step whose loss is not finite (too many in a row end the run), save every --save_interval
    steps and at the end, stop on SIGINT/SIGTERM (after saving) or at --max_steps."""
    cfg, ctx = setup.cfg, setup.ctx
    steps_per_epoch = optimizer_steps_per_epoch(setup.sampler, cfg.accumulation_steps)
    total_steps = steps_per_epoch * cfg.epochs  # the cosine schedule's length
    last_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps  # where this run stops
    progress = tqdm(total=last_step, initial=state.global_step, unit="step", dynamic_ncols=True,
                    disable=not (ctx.is_main and sys.stderr.isatty()))
    if not progress.disable:
        log = progress.write  # log lines above the bar, not through it
    run_start, run_start_step = time.time(), state.global_step
    window_start, window_samples, window_tokens = time.time(), 0, 0  # throughput since the last log line
    setup.model.train()
    with StopSignal() as stop, progress:
        while state.epoch < cfg.epochs and state.global_step < last_step:
            setup.sampler.set_epoch(state.epoch, state.step_in_epoch * cfg.accumulation_steps)
            loader_iter = iter(setup.loader)
            while state.global_step < last_step and state.step_in_epoch < steps_per_epoch:
                batches = micro_batches(loader_iter, cfg.accumulation_steps, cfg.loader_timeout)
                if not batches:
                    break
                lr_scale = lr_at(state.global_step, total_steps, 1.0)  # each group's base rate times this
                # ------------------------------------------------------ the step (dev/bench.py times it)
                result = train_step(setup, batches, lr_scale, cfg.grad_clip, stop.received is not None)
                # ------------------------------------------------------------------------------------------
                state.global_step += 1
                state.step_in_epoch += 1
                state.replaced_samples += result.replaced_samples
                if result.applied:
                    state.bad_steps_in_row = 0
                else:  # skipped (a non-finite loss, or an fp16 gradient overflow): reported, and too many end it
                    state.skipped_steps += 1
                    state.bad_steps_in_row += 1
                    reason = ("non-finite loss" if not result.finite
                              else "fp16 gradient overflow (the GradScaler lowered its scale)")
                    log(f"warning: {reason} at step {state.global_step}; step skipped "
                        f"({state.bad_steps_in_row} in a row, {state.skipped_steps} in total)")
                    if state.bad_steps_in_row >= cfg.max_bad_steps:
                        raise RunStopped(f"stopped: {state.bad_steps_in_row} optimizer steps in a row were skipped "
                                         f"(non-finite loss or fp16 gradient overflow); the last saved checkpoint is "
                                         f"intact. Lower --learning_rate, try --dtype bfloat16, or check the data.", 1)
                progress.update(1)
                epoch_done = state.step_in_epoch >= steps_per_epoch
                if result.applied:
                    window_samples, window_tokens = window_samples + result.samples, window_tokens + result.tokens
                    progress.set_postfix(loss=f"{result.loss:.4f}", refresh=False)
                if result.applied and ctx.is_main and (state.global_step % cfg.log_interval == 0 or epoch_done
                                                       or state.global_step >= last_step):
                    steps_per_s = (state.global_step - run_start_step) / max(time.time() - run_start, 1e-9)
                    eta = (last_step - state.global_step) / max(steps_per_s, 1e-9)
                    elapsed = max(time.time() - window_start, 1e-9)
                    metrics = {"loss": result.loss, "aux_loss": result.aux_loss, "lr": result.lr,
                               "samples_per_s": window_samples / elapsed, "tokens_per_s": window_tokens / elapsed}
                    projector_lr = ""
                    if result.projector_lr is not None:
                        metrics["projector_lr"] = result.projector_lr
                        projector_lr = f" | projector lr {result.projector_lr:.3e}"
                    log(f"epoch {state.epoch + 1}/{cfg.epochs} step {state.step_in_epoch}/{steps_per_epoch} | "
                        f"loss {result.loss:.4f} | lr {result.lr:.3e}{projector_lr} | "
                        f"{metrics['samples_per_s']:.1f} samples/s | "
                        f"{metrics['tokens_per_s']:.0f} tokens/s | ETA {format_duration(eta)}")
                    setup.logger.log(metrics, step=state.global_step)
                    window_start, window_samples, window_tokens = time.time(), 0, 0
                # No save right after a skipped step: the last checkpoint stays the last good one.
                if result.applied and state.global_step % cfg.save_interval == 0 and state.global_step < last_step:
                    save_all(setup, state, log)
                if result.stop_requested:  # on some rank: save, then end with the exit code of that signal
                    save_all(setup, state, log)
                    signal_name = signal.Signals(stop.received or signal.SIGTERM).name
                    raise RunStopped(f"stopped by {signal_name} at step {state.global_step}; resume with the same "
                                     f"command plus --from_resume 1", 130 if signal_name == "SIGINT" else 143)
            if state.step_in_epoch >= steps_per_epoch:
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
            elif state.global_step < last_step:
                break  # the loader ran out early (cannot happen with GlobalBatchSampler; guards an endless loop)
    save_all(setup, state, log, final=True)
    if ctx.is_main:
        log(f"done: {state.global_step} optimizer steps, {state.skipped_steps} skipped (non-finite loss or fp16 "
            f"gradient overflow), "
            f"{state.replaced_samples} samples replaced (undecodable image); weights in {setup.weights_out}")


def save_all(setup: LoopSetup, state: TrainState, log=print, final=False):
    """Rank 0 writes the weights file and the resume checkpoint. A failed write is reported and training goes
    on with the previous files kept; only a failed final save ends the run with an error (on every rank, which
    all learn of it, so that no rank waits forever)."""
    cfg, ctx, failed = setup.cfg, setup.ctx, None
    # Every rank's random states, in rank order, on rank 0 (None on the other ranks): every rank takes part.
    rng_states = [capture_rng(ctx.device)]
    if ctx.distributed:
        gathered = [None] * ctx.world_size if ctx.is_main else None
        dist.gather_object(rng_states[0], gathered, dst=0)
        rng_states = gathered
    if ctx.is_main:
        model = unwrap(setup.model)
        was_training = model.training
        model.eval()
        try:
            atomic_save(inference_state_dict(model), setup.weights_out)
            write_architecture(setup.weights_out, model.config, cfg.preset, cfg.vision_model_path)
            if lora_layers(model):  # the adapter and the projector apart too (the weights file has them merged)
                save_adapter(model, adapter_path(setup.weights_out))
            save_resume(setup.resume_out, model, setup.optimizer, setup.scaler, state, ctx, cfg, rng_states)
            write_architecture(setup.resume_out, model.config, cfg.preset, cfg.vision_model_path)
        except SaveError as error:
            failed = error
            if not final:
                log(f"warning: {error}")
        model.train(was_training)
    if ctx.distributed and final:
        # Every rank ends as rank 0's final save did: all through the error path, or all through the closing barrier
        # of run_then_close_group (a rank waiting there for a rank 0 that left would fail on the lost connection).
        if all_reduce_sum([failed is not None], ctx)[0] and failed is None:
            raise SaveError("rank 0 could not write the final weights (its error says why)")
    elif ctx.distributed:
        dist.barrier()
    if failed is not None and final:
        raise failed


def run_stage(stage: str, description: str, argv=None):
    """A training stage from the command line to its last checkpoint (train_pretrain_vlm.py, train_sft_vlm.py)."""
    cfg = parse_stage_args(stage, argv, description)
    # Processes and device (torchrun: one per GPU; NCCL on CUDA, gloo on CPU); rank 0 alone talks
    ctx = init_distributed(cfg.device)
    seed_everything(cfg.seed + ctx.rank)
    log = print if ctx.is_main else (lambda *a, **k: None)
    run_then_close_group(ctx, lambda: prepare_and_train(cfg, stage, ctx, log))


def prepare_and_train(cfg: TrainConfig, stage: str, ctx: RunContext, log):
    """prepare_run, then train; the model, the data and the optimizer end with this call's frame."""
    setup, state = prepare_run(cfg, stage, ctx, log=log)
    try:
        train(setup, state, log=log)
    finally:
        setup.logger.finish()
