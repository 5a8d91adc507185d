"""Training and generation throughput of this repo against an upstream-equivalent pipeline, on one machine.

    python -m dev.bench                               # 26M config (512 x 8), CPU fp32: about 7 min on 2 cores
    python -m dev.bench --quick                       # tiny smoke configuration, well under a minute
    python -m dev.bench --device cuda --samples 512 --upstream_steps 8
    python -m dev.bench --out out/bench.json          # where the JSON result goes (default shown)
    python -m dev.bench --preset minimind2-v minimind-3v       # both models side by side (196 vs 64 image tokens)

Every mode runs the same code: MiniMindVLM, the collate function, the GlobalBatchSampler, the loss
normalisation and AdamW step of trainer.training.train_step(), on the same synthetic data. The modes differ only
in what the issue asks to compare:

    upstream     upstream's trainers: every sample right-padded to max_seq_len (640 pretrain, 1536 SFT), plain
                 random batches, the CLIP forward on every step, each image turned into pixels alone by
                 transformers' PIL CLIP image processor (upstream's image2tensor), logits for every position
    ours         pad to the batch's longest sample, length-grouped batches, dataset.processing.preprocess_image,
                 logits only where there is a target (the training step's loss_only forward)
    ours_cache   ours plus --cache_vision_features (CLIP features read from the fp16 cache; the cache is built
                 once before timing, and its build time is reported and amortised separately)
    ours_compiled  ours plus --use_compile 1 (torch.compile, dynamic shapes; the compilation falls in the
                 warm-up step, reported as warmup_s; a step that compiled again would be timed as it is)

With --preset minimind-3v the model is a MiniMind-3 LM behind a random SigLIP (256 px, 32 px patches: 64 image
tokens) and an MLP projector, upstream's processor is transformers' SiglipImageProcessor, and upstream pads to its
3v max_seq_len (450 pretrain, 768 SFT).

Synthetic data (nothing is downloaded): 196-token images from a pool half the size of the set (the real
pretrain set has about two captions per image) plus texts whose token lengths are drawn log-uniformly,
stratified: pretrain captions 20-80 tokens, SFT questions 8-40 and answers 50-600. The CLIP is a randomly
initialised ViT-B/16 (hidden 768, 12 layers; timings do not depend on the weights).

Timing: each mode runs in its own process (so peak memory is its own), and the processes take turns one
optimizer step at a time, so that load from other programs falls on all modes alike. The first step of
each mode is a warm-up and is not counted. `ours` covers one full epoch; `upstream` steps all have the
same shape (batch x max_seq_len tokens, one image per sample), so a few of them give its per-epoch rate.

MFU: model FLOPs per step / step time / a matmul peak measured here (fp32 on CPU, bf16 on CUDA; the better
of a measurement before and one after the timed runs). Model
FLOPs count the work the step needs: each sample at its real length (causal attention pairs), logits only
where there is a target, backward as the trainable set requires, and the CLIP forward when the mode runs it.
`mfu_incl_padding` also counts what the mode computes on padding and, for upstream, on logits nobody reads
(for ours it counts the last layer in full, although that layer skips positions before the first target).
`other_load` is the share of the machine other programs used while a mode was timed (Linux only).
"""
if not __package__:  # started as a file: its folder, not the repo root, is on the import path
    raise SystemExit("run it from the repository root as: python -m dev.bench")

import argparse
import io
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from common import DEFAULT_SAVE_DIR, DTYPE_NAMES, MAX_SEED, bounded, default_device, device_flag
from model.model_vlm import CLIP_IMAGE_SIZE, CLIP_PATCH_SIZE, SIGLIP_PATCH_SIZE, VISION_ENCODERS
from model.presets import DEFAULT_PRESET
from model.presets import PRESETS as MODEL_PRESETS

DEFAULT_OUT = DEFAULT_SAVE_DIR / "bench.json"
STAGES = ("pretrain", "sft")
MODES = ("upstream", "ours", "ours_cache", "ours_compiled")
# Upstream 3v's trainers pad every sample to these (spec: upstream-notes.md 7.8); None: the stage script's default.
UPSTREAM_MAX_SEQ_LEN = {"minimind2-v": {"pretrain": None, "sft": None}, "minimind-3v": {"pretrain": 450, "sft": 768}}
GEN_PROMPT = "Describe the picture briefly."
# Attention backward in matmuls of the forward's size: flash kernels recompute the scores (1), then dV, dP,
# dQ, dK (4), against the forward's 2.
ATTENTION_BACKWARD = 2.5
# Epochs of the stage scripts' defaults, for the cache cost amortised over a whole stage.
STAGE_EPOCHS = {"pretrain": 4, "sft": 2}

# Text lengths in tokens: (low, high), drawn log-uniformly.
PRETRAIN_CAPTION_TOKENS = (20, 80)
SFT_QUESTION_TOKENS = (8, 40)
SFT_ANSWER_TOKENS = (50, 600)

PRESETS = {
    # 26M MiniMind2-V at the stage scripts' batch sizes (16 pretrain, 4 SFT): the default run. Four pretrain
    # and eight SFT steps an epoch; upstream's steps are slow and all alike, so fewer of them are timed.
    "full": dict(hidden_size=512, num_hidden_layers=8, clip_hidden_size=768, clip_layers=12, clip_heads=12,
                 pretrain_samples=64, sft_samples=32, pretrain_batch_size=16, sft_batch_size=4,
                 upstream_steps=3, gen_new_tokens=32, gen_repeats=7),
    "quick": dict(hidden_size=64, num_hidden_layers=2, clip_hidden_size=64, clip_layers=2, clip_heads=4,
                  pretrain_samples=4, sft_samples=4, pretrain_batch_size=2, sft_batch_size=2,
                  upstream_steps=1, gen_new_tokens=8, gen_repeats=2),
}


# ------------------------------------------------------------------------------------------ synthetic assets

def log_uniform_lengths(n, low, high, rng: np.random.Generator):
    """n integers in [low, high], log-uniform, stratified (one per n-quantile) so small sets match the shape."""
    u = (np.arange(n) + rng.random(n)) / n
    rng.shuffle(u)
    return np.round(np.exp(np.log(low) + u * (np.log(high) - np.log(low)))).astype(int)


class TextOfLength:
    """Plain English text of about n tokens: a window of a long tokenised text, decoded back."""

    def __init__(self, tokenizer, seed):
        from dev import synthetic as make_assets

        lines = make_assets.simple_english_lines(4000, seed)
        self.tokenizer = tokenizer
        chunks = [" ".join(lines[i:i + 100]) + " " for i in range(0, len(lines), 100)]
        self.ids = [i for ids in tokenizer(chunks, add_special_tokens=False).input_ids for i in ids]
        self.rng = np.random.default_rng(seed)

    def __call__(self, n):
        start = int(self.rng.integers(0, len(self.ids) - n))
        return self.tokenizer.decode(self.ids[start:start + n]).strip()


def write_parquet(path, conversations, image_blobs):
    """Upstream's parquet layout: conversations as a JSON string, the encoded image bytes inline."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"conversations": pa.array([json.dumps(c) for c in conversations], pa.string()),
                      "image_bytes": pa.array(image_blobs, pa.binary())})
    pq.write_table(table, path)


def build_assets(work_dir: Path, preset: dict, seed: int, tokenizer_path=None, model_preset=DEFAULT_PRESET) -> dict:
    """Tokenizer, a random vision encoder of the configured shape (CLIP, or SigLIP for minimind-3v), image pool,
    pretrain and SFT parquet files."""
    import random

    from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel
    from transformers.utils import logging as hf_logging

    from dataset.processing import IMAGE_MARKER
    from dev import synthetic as make_assets

    work_dir.mkdir(parents=True, exist_ok=True)
    minimind3 = MODEL_PRESETS[model_preset].lm_family == "minimind3"
    if tokenizer_path is None:
        build = make_assets.build_minimind3_tokenizer if minimind3 else make_assets.build_tokenizer
        tokenizer_path = build(work_dir / "tokenizer", make_assets.tokenizer_corpus(seed))
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))

    clip_dir = work_dir / "clip"
    width = preset["clip_hidden_size"]
    hf_logging.disable_progress_bar()
    if MODEL_PRESETS[model_preset].vision_encoder == "siglip":
        make_assets.build_tiny_siglip(clip_dir, width, preset["clip_layers"], seed, preset["clip_heads"],
                                      dtype=torch.float32)
    else:
        config = CLIPVisionConfig(hidden_size=width, intermediate_size=make_assets.CLIP_MLP_RATIO * width,
                                  num_hidden_layers=preset["clip_layers"], num_attention_heads=preset["clip_heads"],
                                  image_size=CLIP_IMAGE_SIZE, patch_size=CLIP_PATCH_SIZE, hidden_act="quick_gelu")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            CLIPVisionModel(config).save_pretrained(clip_dir)
        make_assets.make_clip_image_processor().save_pretrained(clip_dir)

    rng = random.Random(seed)
    pool = max(preset["pretrain_samples"] // 2, 1)
    blobs = []
    for _ in range(pool):
        buffer = io.BytesIO()
        make_assets.draw_scene(make_assets.random_scene(rng)).save(buffer, format="JPEG",
                                                                    quality=make_assets.JPEG_QUALITY)
        blobs.append(buffer.getvalue())

    lengths_rng = np.random.default_rng(seed)
    text = TextOfLength(tokenizer, seed)
    pretrain = [[{"role": "user", "content": f"{rng.choice(make_assets.CAPTION_REQUESTS)}\n{IMAGE_MARKER}"},
                 {"role": "assistant", "content": text(n)}]
                for n in log_uniform_lengths(preset["pretrain_samples"], *PRETRAIN_CAPTION_TOKENS, lengths_rng)]
    questions = log_uniform_lengths(preset["sft_samples"], *SFT_QUESTION_TOKENS, lengths_rng)
    answers = log_uniform_lengths(preset["sft_samples"], *SFT_ANSWER_TOKENS, lengths_rng)
    sft = [[{"role": "user", "content": f"{text(q)}\n{IMAGE_MARKER}"}, {"role": "assistant", "content": text(a)}]
           for q, a in zip(questions, answers)]
    # Every image is used twice in pretrain; SFT reuses pretrain's images (the real SFT set contains them).
    paths = {"tokenizer": Path(tokenizer_path), "clip": clip_dir, "pretrain": work_dir / "pretrain.parquet",
             "sft": work_dir / "sft.parquet"}
    write_parquet(paths["pretrain"], pretrain, [blobs[i % pool] for i in range(len(pretrain))])
    write_parquet(paths["sft"], sft, [blobs[rng.randrange(pool)] for _ in sft])
    return paths


# --------------------------------------------------------------------------------------------- FLOP counting

def train_step_flops(shape: dict, policy: str, lengths, pad_len: int, targets: int, images: int,
                     runs_clip: bool, logits_everywhere: bool, causal: bool = True,
                     attention_backward: float = ATTENTION_BACKWARD):
    """(needed, executed) FLOPs of one optimizer step; `shape` holds the model and CLIP sizes.

    needed: each sample at its real length, logits where there is a target. executed: every row at
    pad_len, logits at every position when `logits_everywhere` (what the mode really computes). Attention
    counts the causal (query, key) pairs, or all pairs with causal=False (as torch's FLOP counter does).
    """
    h, layers, vocab = shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    layer_params = 2 * h * h + 2 * h * kv + 3 * h * shape["intermediate_size"]  # q, o; k, v; gate, up, down
    # Backward multiples of the forward: dX always flows back to vision_proj; dW only where weights train.
    if policy == "all":
        layer_bwd, head_bwd = 2.0 * layers, 2.0  # tied embedding trains: lm_head gets dW too
    elif policy == "projector_last_layer":
        layer_bwd, head_bwd = (layers - 1) + 2.0, 1.0
    elif policy == "projector_first_last_layers":
        layer_bwd, head_bwd = (layers - 2) + 4.0, 1.0
    else:
        layer_bwd, head_bwd = float(layers), 1.0
    # Per image token. Linear: forward + dW of ve x h. MLP (ve x h, then h x h): forward, dW and dX of both, the
    # gradient flowing back to its trainable LayerNorm (LayerNorm and GELU are not matmuls).
    ve = shape["ve_hidden_size"]
    proj_macs = 3 * (ve * h + h * h) if shape["projector"] == "mlp" else 2 * ve * h
    proj = 2 * proj_macs * shape["image_tokens"] * images

    def lm(tokens, pairs, logit_positions):
        fwd_linear = 2 * layer_params * tokens
        fwd_attention = 4 * h * pairs  # QK^T and AV, per layer
        head = 2 * h * vocab * logit_positions
        return (fwd_linear * (layers + layer_bwd) + fwd_attention * layers * (1 + attention_backward)
                + head * (1 + head_bwd))

    def pairs(length):
        return length * (length + 1) / 2 if causal else length * length

    lengths = np.asarray(lengths, dtype=np.float64)
    needed = lm(lengths.sum(), pairs(lengths).sum(), targets) + proj
    padded_rows = len(lengths) * pad_len
    executed = lm(padded_rows, len(lengths) * pairs(pad_len), padded_rows if logits_everywhere else targets) + proj
    if runs_clip:
        clip = clip_forward_flops(shape) * images
        needed, executed = needed + clip, executed + clip
    return needed, executed


def clip_forward_flops(shape: dict) -> float:
    """ViT forward of one image (CLIP 224 px / SigLIP 256 px): patch embedding, then per layer q/k/v/o + MLP and
    attention over the patches (and CLIP's CLS)."""
    d, layers, patches = shape["clip_hidden_size"], shape["clip_layers"], shape["image_tokens"]
    tokens = patches + shape["encoder_leading_tokens"]
    patch = 2 * 3 * shape["patch_size"] * shape["patch_size"] * d * patches
    per_layer = 2 * tokens * (4 * d * d + 2 * d * 4 * d) + 4 * d * tokens * tokens
    return patch + layers * per_layer


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 4.0) -> float:
    """Best FLOP/s of square matmuls over a few sizes, the yardstick for MFU."""
    best = 0.0
    sizes = (1024, 2048) if device.type == "cpu" else (4096, 8192)
    deadline = time.perf_counter() + seconds
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up
        for _ in range(5):
            sync(device)
            start = time.perf_counter()
            a @ b
            sync(device)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - start))
            if time.perf_counter() > deadline:
                break
    return best


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else platform.machine()}, {os.cpu_count()} cores"


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated on CUDA; peak resident memory of this process elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10  # Linux reports KiB


# ------------------------------------------------------------------------------------ worker processes

def stage_args(spec: dict, extra=()):
    """The stage script's own parser and defaults (a TrainConfig), pointed at the synthetic assets."""
    from trainer.config import parse_stage_args

    out = Path(spec["work_dir"]) / "runs" / f"{spec['stage']}_{spec['mode']}"
    argv = ["--device", spec["device"], "--dtype", spec["dtype"], "--from_weight", "none",
            "--hidden_size", str(spec["hidden_size"]), "--num_hidden_layers", str(spec["num_hidden_layers"]),
            "--data_path", str(spec["data_path"]), "--tokenizer_path", str(spec["tokenizer_path"]),
            "--vision_model_path", str(spec["clip_path"]), "--save_dir", str(out), "--checkpoint_dir", str(out),
            "--batch_size", str(spec["batch_size"]), "--num_workers", str(spec["num_workers"]),
            "--epochs", "2", "--max_steps", str(spec.get("steps", 1)), "--log_interval", "1",
            "--save_interval", str(10 ** 9), "--seed", str(spec["seed"]), "--preset", spec["model_preset"], *extra]
    max_seq_len = UPSTREAM_MAX_SEQ_LEN[spec["model_preset"]][spec["stage"]]
    if max_seq_len is not None:
        argv += ["--max_seq_len", str(max_seq_len)]
    return parse_stage_args(spec["stage"], argv)


class FullLogits(torch.nn.Module):
    """Upstream's training forward around the model: logits at every position (the training step asks for them
    only where there is a target)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        return self.model(**{**inputs, "loss_only": False})


class UpstreamPixelsDataset:
    """Mixin for VLMDataset: each image preprocessed alone by transformers' PIL image processor of the encoder
    (CLIP's or SigLIP's), as upstream's image2tensor."""

    processor = None

    def load_pixels(self, index):
        from PIL import Image

        pixels = []
        for ref in self.records[index].images:
            image = Image.open(io.BytesIO(self.source.image_bytes(ref)))
            if image.mode in ("RGBA", "LA"):
                image = image.convert("RGB")
            pixels.append(self.processor(images=image, return_tensors="pt")["pixel_values"])  # [1, 3, H, W]
        return torch.cat(pixels) if pixels else torch.zeros((0,) + self.image_processor.pixel_shape)


def machine_busy_seconds():
    """CPU seconds every program on the machine has used since boot (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as handle:
            values = [int(v) for v in handle.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = values[3] + values[4]  # idle, iowait
    return (sum(values) - idle) / os.sysconf("SC_CLK_TCK")


def batch_facts(dataset, batches, pad_to):
    """Per optimizer step: the samples' real lengths, padded length, supervised targets and images."""
    from dataset.records import assistant_label_mask

    facts = []
    for batch in batches:
        lengths = [int(dataset.lengths[i]) for i in batch]
        targets = sum(int(assistant_label_mask(dataset.token_ids(i), dataset.label_start_ids,
                                               dataset.label_end_ids)[1:].sum()) for i in batch)
        facts.append({"lengths": lengths, "pad_len": pad_to or max(lengths), "targets": targets,
                      "images": sum(len(dataset.records[i].images) for i in batch)})
    return facts


def worker_main(conn, body, spec):
    """In the worker process: `body(conn, spec)`'s result, or its traceback, always goes back on the pipe (the
    parent waits on it)."""
    try:
        conn.send(("result", body(conn, spec)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))


def epochs_of_batches(setup, epochs: int):
    """The loader's batches, epoch after epoch, each epoch in the sampler's order for it."""
    for epoch in range(epochs):
        setup.sampler.set_epoch(epoch)
        yield from setup.loader


def train_worker(conn, spec):
    """One mode's training steps, timed one at a time when the parent gives the turn: the trainer's setup and
    training step; upstream's mode composes its own loader (upstream pixels, padding to max_seq_len, plain random
    batches) and forward (FullLogits) around them."""
    from dataclasses import replace

    from common import unwrap
    from dataset.lm_dataset import VLMDataset
    from dataset.processing import image_processor_for
    from model.compat import pil_image_processor_class
    from trainer.setup import RunContext, build_loader, prepare_run, seed_everything
    from trainer.training import lr_at, micro_batches, optimizer_steps_per_epoch, train_step

    started = time.perf_counter()
    quiet = lambda *a, **k: None  # noqa: E731
    mode = spec["mode"]
    extra = []
    if mode == "upstream":
        extra.append("--no_length_grouping")
    if mode == "ours_cache":
        extra += ["--cache_vision_features", str(spec["cache_dir"])]
    if mode == "ours_compiled":
        extra += ["--use_compile", "1"]
    ctx = RunContext(device=torch.device(spec["device"]))
    seed_everything(spec["seed"])
    setup, _ = prepare_run(stage_args(spec, extra), spec["stage"], ctx, log=quiet)
    cfg = setup.cfg
    pad_to = None
    if mode == "upstream":
        config = unwrap(setup.model).config
        dataset_class = type("UpstreamVLMDataset", (UpstreamPixelsDataset, VLMDataset), {})
        processor_class = pil_image_processor_class(VISION_ENCODERS[config.vision_encoder].image_processor_class)
        dataset_class.processor = processor_class.from_pretrained(str(cfg.vision_model_path))
        dataset = dataset_class(setup.loader.dataset.prepared, image_processor_for(config), log=None)
        pad_to = cfg.max_seq_len
        loader, sampler = build_loader(dataset, cfg, ctx, pad_to=pad_to)
        setup = replace(setup, model=FullLogits(setup.model), loader=loader, sampler=sampler)
    setup_s = time.perf_counter() - started
    conn.send(("ready", {"samples": len(setup.loader.dataset), "steps_per_epoch": setup.sampler.steps_per_epoch()}))

    # The training loop's schedule and step, one optimizer step per turn, timed from the parent's "go" to its end
    # (the batch is fetched in that time, as the loop fetches it).
    total_steps = optimizer_steps_per_epoch(setup.sampler, cfg.accumulation_steps) * cfg.epochs
    replaced = 0
    setup.model.train()
    batches = epochs_of_batches(setup, cfg.epochs)
    for step in range(cfg.max_steps):
        if (message := conn.recv()) != "go":
            raise RuntimeError(f"unexpected message {message!r}")
        wall, cpu, busy = time.perf_counter(), time.process_time(), machine_busy_seconds()
        result = train_step(setup, micro_batches(batches, cfg.accumulation_steps, cfg.loader_timeout),
                            lr_at(step, total_steps, 1.0), cfg.grad_clip, stop_requested=False)
        now_busy = machine_busy_seconds()
        conn.send(("step", {"seconds": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                            "machine_busy_s": None if busy is None else now_busy - busy, "loss": result.loss}))
        replaced += result.replaced_samples
    conn.recv()  # "finish": every mode is done

    batches = [list(b) for epoch in (0, 1) for b in setup.sampler.global_batches(epoch)][:cfg.max_steps]
    return {"facts": batch_facts(setup.loader.dataset, batches, pad_to), "peak_memory_mb": peak_memory_mb(ctx.device),
            "trainable": cfg.trainable, "max_seq_len": cfg.max_seq_len, "batch_size": cfg.batch_size,
            "replaced_samples": replaced, "setup_s": setup_s}


def cache_worker(conn, spec):
    """Build (or find) the feature cache as training would, timed; the training process then only opens it."""
    from dataset.processing import load_tokenizer
    from trainer.feature_cache import build_feature_store
    from trainer.setup import RunContext, autocast_for, build_dataset, build_model

    ctx = RunContext(device=torch.device(spec["device"]))
    model, cfg = build_model(stage_args(spec), spec["stage"], log=None)
    model.to(ctx.device)
    autocast, _ = autocast_for(ctx.device, cfg.dtype)
    dataset = build_dataset(cfg, load_tokenizer(cfg.tokenizer_path), model, ctx, autocast, log=None)
    start = time.perf_counter()
    store = build_feature_store(dataset.prepared, dataset.image_processor, model, spec["cache_dir"], ctx, autocast,
                                log=None)
    seconds = time.perf_counter() - start
    unique = len(set(zip(store.image_shard.tolist(), store.image_row.tolist())))
    return {"build_s": seconds, "images_encoded": store.computed, "unique_images": unique}


def _token_clock_class():
    from transformers.generation.streamers import BaseStreamer

    class TokenClock(BaseStreamer):
        """A generate() streamer that only notes when each piece arrives (the prompt first, then each token)."""

        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    return TokenClock


def generation_worker(conn, spec):
    """Prefill of a one-image prompt + greedy decode, in both modes, alternating; medians over repeats."""
    import pyarrow.parquet as pq
    from PIL import Image
    from dataset.processing import build_prompt, image_processor_for, open_image, preprocess_image, user_content
    from model.compat import pil_image_processor_class
    from model.model_vlm import MiniMindVLM
    from model.presets import vlm_config
    from dataset.processing import load_tokenizer
    from trainer.setup import autocast_for

    device = torch.device(spec["device"])
    torch.manual_seed(spec["seed"])
    model = MiniMindVLM(vlm_config(spec["model_preset"], spec["hidden_size"], spec["num_hidden_layers"]),
                        vision_model_path=spec["clip_path"]).to(device).eval()
    autocast, _ = autocast_for(device, spec["dtype"])
    tokenizer = load_tokenizer(spec["tokenizer_path"])
    prompt = build_prompt(tokenizer, [{"role": "user", "content": user_content(GEN_PROMPT, 1)}],
                          model.config.image_special_token, add_generation_prompt=True,
                          chat_format=model.config.chat_format)
    input_ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids], device=device)
    blobs = pq.read_table(spec["data_path"]).column("image_bytes").to_pylist()
    processor_class = pil_image_processor_class(VISION_ENCODERS[model.config.vision_encoder].image_processor_class)
    processor = processor_class.from_pretrained(str(spec["clip_path"]))
    image_processor = image_processor_for(model.config)
    TokenClock = _token_clock_class()  # noqa: N806

    def ours(blob):
        return preprocess_image(open_image(blob), image_processor)[None, None]  # [1, 1, 3, H, W]

    def upstream(blob):
        image = Image.open(io.BytesIO(blob)).convert("RGB")
        return processor(images=image, return_tensors="pt")["pixel_values"][None, None]  # [1, 1, 1, 3, H, W]

    def generate(prepare, blob, new_tokens):
        """(time to the first new token, total time) from the image bytes on, via a streamer's timestamps."""
        clock = TokenClock()
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode(), autocast():
            pixels = prepare(blob).to(device)
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixels,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 streamer=clock)
        assert out.shape[1] == input_ids.shape[1] + new_tokens
        return clock.times[1] - start, clock.times[-1] - start  # times[0]: the prompt, handed over first

    modes = {"upstream": upstream, "ours": ours}
    return time_generation_modes(generate, modes, blobs, spec["gen_new_tokens"], spec["gen_repeats"],
                                 prompt_tokens=input_ids.shape[1])


def time_generation_modes(generate, modes: dict, blobs, new_tokens: int, repeats: int, prompt_tokens: int) -> dict:
    """Alternate the modes over `repeats` images (no mode always first); medians per mode, and the share of the
    machine that other programs took meanwhile."""
    for prepare in modes.values():
        generate(prepare, blobs[0], 2)  # warm-up
    times = {name: [] for name in modes}
    busy, started, cpu_at_start = machine_busy_seconds(), time.perf_counter(), time.process_time()
    for repeat in range(repeats):
        order = list(modes) if repeat % 2 == 0 else list(reversed(modes))
        for name in order:
            times[name].append(generate(modes[name], blobs[repeat % len(blobs)], new_tokens))
    seconds = time.perf_counter() - started
    result = {}
    for name, runs in times.items():
        first, total = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        decode = statistics.median((new_tokens - 1) / (r[1] - r[0]) for r in runs)
        result[name] = {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "time_to_first_token_s": first,
                        "total_s": total, "tokens_per_s": new_tokens / total, "decode_tokens_per_s": decode}
    if busy is not None:
        other = machine_busy_seconds() - busy - (time.process_time() - cpu_at_start)
        for name in result:
            result[name]["other_load"] = max(other, 0.0) / (seconds * (os.cpu_count() or 1))
    return result


# ------------------------------------------------------------------------------------------ the parent side

# Workers fork from a server that has imported these once: each starts in a moment instead of re-importing.
# (A plain fork of this process is not safe once torch's thread pool has run the matmul peak.)
WORKER_PRELOAD = ["__main__", "torch", "transformers", "trainer.training"]


def worker_context():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)
    return context


class Worker:
    def __init__(self, name, target, spec, planned_steps=0):
        context = worker_context()
        self.conn, child_conn = context.Pipe()
        self.name, self.planned_steps = name, planned_steps
        self.process = context.Process(target=worker_main, args=(child_conn, target, spec))
        self.process.start()
        self.steps = []
        self.info = None

    def receive(self, expected):
        try:
            kind, payload = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"{self.name}: the worker process died (exit code {self.process.exitcode})") from None
        if kind == "error":
            raise RuntimeError(f"{self.name} failed:\n{payload}")
        if kind != expected:
            raise RuntimeError(f"{self.name}: expected {expected!r}, got {kind!r}")
        return payload

    def result(self):
        payload = self.receive("result")
        self.process.join()
        return payload


def run_alone(name, target, spec):
    return Worker(name, target, spec).result()


def run_in_turns(workers, log):
    """One optimizer step at a time, always the worker furthest behind its plan, until all are done."""
    for worker in workers:
        worker.info = worker.receive("ready")
    active = list(workers)
    while active:
        worker = min(active, key=lambda w: len(w.steps) / w.planned_steps)
        worker.conn.send("go")
        worker.steps.append(worker.receive("step"))
        log(f"  {worker.name}: step {len(worker.steps)}/{worker.planned_steps} {worker.steps[-1]['seconds']:.2f}s")
        if len(worker.steps) == worker.planned_steps:
            active.remove(worker)
    for worker in workers:
        worker.conn.send("finish")
    return {worker.name: worker.result() for worker in workers}


def summarise_mode(worker, result, shape, mode):
    """Throughput of the timed steps (all but the first) from the step times and the batches' facts."""
    steps = worker.steps[1:]
    facts = result["facts"][1:]
    seconds = sum(s["seconds"] for s in steps)
    cpu = sum(s["cpu_s"] for s in steps)
    busy = [s["machine_busy_s"] for s in steps]
    # CPU time other programs took while this mode was timed, as a share of the machine
    other_load = None if None in busy else max(sum(busy) - cpu, 0.0) / (seconds * (os.cpu_count() or 1))
    samples = sum(len(f["lengths"]) for f in facts)
    real = sum(sum(f["lengths"]) for f in facts)
    padded = sum(len(f["lengths"]) * f["pad_len"] for f in facts)
    needed = executed = 0.0
    for f in facts:
        n, e = train_step_flops(shape, result["trainable"], f["lengths"], f["pad_len"], f["targets"], f["images"],
                                runs_clip=mode != "ours_cache", logits_everywhere=mode == "upstream")
        needed, executed = needed + n, executed + e
    return {
        "steps_timed": len(steps), "samples": samples, "seconds": seconds,
        "samples_per_s": samples / seconds, "real_tokens_per_s": real / seconds,
        "padding_fraction": 1 - real / padded, "mean_padded_length": padded / samples,
        "mean_real_length": real / samples,
        "step_s_median": statistics.median(s["seconds"] for s in steps),
        "step_s": [round(s["seconds"], 4) for s in worker.steps],
        "peak_memory_mb": result["peak_memory_mb"], "cpu_s_per_sample": cpu / samples, "other_load": other_load,
        "model_tflop_per_sample": needed / samples / 1e12, "model_flop": needed, "executed_flop": executed,
        "batch_size": result["batch_size"], "max_seq_len": result["max_seq_len"], "trainable": result["trainable"],
        "setup_s": result["setup_s"], "warmup_s": worker.steps[0]["seconds"],
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model and CLIP, few samples: a smoke run")
    p.add_argument("--preset", nargs="+", choices=sorted(MODEL_PRESETS), default=[DEFAULT_PRESET],
                   help="the model(s) to time, each against its upstream-equivalent mode; several: side by side")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file")
    p.add_argument("--device", type=device_flag, default=default_device())
    p.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES,
                   help="autocast dtype on CUDA (CPU always runs fp32)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--no_generation", action="store_true", help="skip the generation benchmark")
    p.add_argument("--samples", type=bounded(int, 1), default=None, help="samples per synthetic set (both stages)")
    p.add_argument("--pretrain_batch_size", type=bounded(int, 1), default=None)
    p.add_argument("--sft_batch_size", type=bounded(int, 1), default=None)
    p.add_argument("--upstream_steps", type=bounded(int, 1), default=None, help="timed upstream steps per stage")
    p.add_argument("--hidden_size", type=bounded(int, 1), default=None)
    p.add_argument("--num_hidden_layers", type=bounded(int, 1), default=None)
    p.add_argument("--num_workers", type=bounded(int, 0), default=None,
                   help="DataLoader workers, every mode alike (default: 0 on CPU, where workers would only "
                        "take cores from the step being timed; 4 on CUDA)")
    p.add_argument("--work_dir", type=Path, default=None, help="keep the synthetic assets here (default: temp)")
    p.add_argument("--tokenizer_path", type=Path, default=None,
                   help="a tokenizer folder to use (default: a small one built locally)")
    p.add_argument("--seed", type=bounded(int, 0, MAX_SEED), default=0)
    return p.parse_args(argv)


def model_shape(spec_model: dict, model_preset: str = DEFAULT_PRESET) -> dict:
    from model.model_minimind import resolve_intermediate_size
    from model.presets import vlm_config

    config = vlm_config(model_preset, spec_model["hidden_size"], spec_model["num_hidden_layers"],
                        ve_hidden_size=spec_model["clip_hidden_size"])
    siglip = config.vision_encoder == "siglip"
    return {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
            "intermediate_size": resolve_intermediate_size(config), "vocab_size": config.vocab_size,
            "ve_hidden_size": config.ve_hidden_size, "clip_hidden_size": spec_model["clip_hidden_size"],
            "clip_layers": spec_model["clip_layers"], "projector": config.projector,
            "image_tokens": config.image_token_count, "patch_size": SIGLIP_PATCH_SIZE if siglip else CLIP_PATCH_SIZE,
            "encoder_leading_tokens": VISION_ENCODERS[config.vision_encoder].leading_tokens}


def format_table(report) -> str:
    rows = ["| stage | mode | samples/s | real tokens/s | padding | peak memory | MFU | speed-up | warm-up step |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for stage, modes in report["train"].items():
        for mode, r in modes.items():
            speedup = report["speedup"].get(stage, {}).get(mode)
            rows.append(f"| {stage} | {mode} | {r['samples_per_s']:.3f} | {r['real_tokens_per_s']:.0f} | "
                        f"{r['padding_fraction']:.0%} | {r['peak_memory_mb']:.0f} MB | {r['mfu']:.1%} | "
                        f"{'' if speedup is None else f'{speedup:.2f}x'} | {r['warmup_s']:.1f}s |")
    if report.get("generation"):
        rows += ["", "| generation | tokens/s (end to end) | decode tokens/s | time to first token |",
                 "|---|---:|---:|---:|"]
        for mode, r in report["generation"].items():
            rows.append(f"| {mode} | {r['tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.1f} | "
                        f"{r['time_to_first_token_s']:.2f}s |")
    return "\n".join(rows)


def time_stage(stage, preset, args, paths, work_dir, shape, log, elapsed, model_preset=DEFAULT_PRESET):
    """Build the stage's feature cache (if ours_cache is timed), then time the modes in turns."""
    batch_size, samples = preset[f"{stage}_batch_size"], preset[f"{stage}_samples"]
    base = dict(stage=stage, model_preset=model_preset, work_dir=str(work_dir), data_path=str(paths[stage]),
                tokenizer_path=str(paths["tokenizer"]), clip_path=str(paths["clip"]),
                hidden_size=preset["hidden_size"], num_hidden_layers=preset["num_hidden_layers"],
                batch_size=batch_size, device=args.device, dtype=args.dtype_name, num_workers=args.num_workers,
                cache_dir=str(work_dir / "feature_cache"), seed=args.seed)
    cache = None
    if "ours_cache" in args.modes:
        log(f"[{elapsed()}] {stage}: building the feature cache")
        cache = run_alone(f"{stage}/cache", cache_worker, dict(base, mode="ours_cache"))
    steps_per_epoch = -(-samples // batch_size)
    workers = []
    for mode in args.modes:
        # +1: the first step is a warm-up. ours: one whole epoch; upstream: a few steps, all of the same shape.
        timed = min(preset["upstream_steps"], steps_per_epoch) if mode == "upstream" else steps_per_epoch
        workers.append(Worker(f"{stage}/{mode}", train_worker, dict(base, mode=mode, steps=timed + 1), timed + 1))
    log(f"[{elapsed()}] {stage}: timing {', '.join(args.modes)} in turns")
    results = run_in_turns(workers, log)
    modes = {mode: summarise_mode(worker, results[worker.name], shape, mode)
             for mode, worker in zip(args.modes, workers)}
    if cache is not None:
        epochs, rate = STAGE_EPOCHS[stage], modes["ours_cache"]["samples_per_s"]
        modes["ours_cache"]["samples_per_s_amortised"] = epochs * samples / (epochs * samples / rate + cache["build_s"])
    return modes, cache


def settings_from_flags(args) -> dict:
    """The preset, with the flags that override it; fills in the device-dependent defaults of `args`."""
    preset = dict(PRESETS["quick" if args.quick else "full"])
    for key in ("pretrain_batch_size", "sft_batch_size", "upstream_steps", "hidden_size", "num_hidden_layers"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    if args.samples is not None:
        preset["pretrain_samples"] = preset["sft_samples"] = args.samples
    if args.num_workers is None:
        args.num_workers = 4 if torch.device(args.device).type == "cuda" else 0
    args.dtype_name = args.dtype if torch.device(args.device).type == "cuda" else "float32"
    return preset


def add_mfu(report, peak_flops: float):
    """Model FLOP utilisation of each timed mode against the measured matmul peak."""
    report["matmul_peak_tflops"] = peak_flops / 1e12
    for sub in report.get("by_preset", {}).values():
        add_mfu(sub, peak_flops)
    for modes in report["train"].values():
        for r in modes.values():
            r["mfu"] = r["model_flop"] / r["seconds"] / peak_flops
            r["mfu_incl_padding"] = r["executed_flop"] / r["seconds"] / peak_flops


def finish_report(report, args, started: float, log):
    """Other programs' load, wall time; write the JSON and print the table (one per model, then the models side
    by side)."""
    loads = []
    for sub in report.get("by_preset", {}).values() or [report]:
        loads += [r["other_load"] for modes in sub["train"].values() for r in modes.values()
                  if r.get("other_load") is not None]
        loads += [r["other_load"] for r in sub.get("generation", {}).values() if r.get("other_load") is not None]
    report["max_other_load"] = max(loads) if loads else None
    report["wall_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    if "by_preset" in report:
        for name, sub in report["by_preset"].items():
            log(f"\n{name} ({sub['model']['image_tokens']} image tokens)\n{format_table(sub)}")
        log("\n" + side_by_side_table(report["by_preset"]))
    else:
        log(format_table(report))
    if report["max_other_load"] is not None and report["max_other_load"] > 0.05:
        log(f"note: other programs used up to {report['max_other_load']:.0%} of the CPU while modes were timed; "
            f"the modes took turns, so ratios are fairer than absolute figures")
    log(f"written {args.out} ({report['wall_s']:.0f} s)")


def side_by_side_table(reports: dict) -> str:
    """samples/s (and the speed-up over its upstream-equivalent mode) of each stage and mode, a column per model."""
    names = list(reports)
    rows = ["| stage | mode | " + " | ".join(f"{n} samples/s" for n in names) + " |",
            "|---|---|" + "---:|" * len(names)]
    first = reports[names[0]]
    for stage, modes in first["train"].items():
        for mode in modes:
            cells = []
            for name in names:
                r = reports[name]["train"].get(stage, {}).get(mode)
                speedup = reports[name]["speedup"].get(stage, {}).get(mode)
                cells.append("" if r is None else f"{r['samples_per_s']:.3f}"
                             + ("" if speedup is None else f" ({speedup:.2f}x)"))
            rows.append(f"| {stage} | {mode} | " + " | ".join(cells) + " |")
    if all(r.get("generation") for r in reports.values()):
        rows.append("| generation | ours tokens/s | " + " | ".join(
            f"{reports[n]['generation']['ours']['tokens_per_s']:.1f}" for n in names) + " |")
    return "\n".join(rows)


def time_generation(args, preset, paths, model_preset=DEFAULT_PRESET) -> dict:
    return run_alone("generation", generation_worker, dict(
        model_preset=model_preset, device=args.device, dtype=args.dtype_name, seed=args.seed,
        hidden_size=preset["hidden_size"],
        num_hidden_layers=preset["num_hidden_layers"], clip_path=str(paths["clip"]),
        tokenizer_path=str(paths["tokenizer"]), data_path=str(paths["pretrain"]),
        gen_new_tokens=preset["gen_new_tokens"], gen_repeats=preset["gen_repeats"]))


def time_model(model_preset, preset, args, work_dir, log, elapsed) -> dict:
    """One model's report: its synthetic assets, each stage's modes in turns, generation."""
    log(f"[{elapsed()}] {model_preset}: building synthetic assets in {work_dir}")
    paths = build_assets(work_dir, preset, args.seed, args.tokenizer_path, model_preset)
    shape = model_shape(preset, model_preset)
    report = {"model_preset": model_preset, "model": shape, "train": {}, "cache": {}, "speedup": {}}
    for stage in args.stages:
        modes, cache = time_stage(stage, preset, args, paths, work_dir, shape, log, elapsed, model_preset)
        report["train"][stage] = modes
        if cache is not None:
            report["cache"][stage] = cache
        if "upstream" in modes:
            report["speedup"][stage] = {m: r["samples_per_s"] / modes["upstream"]["samples_per_s"]
                                        for m, r in modes.items() if m != "upstream"}
    if not args.no_generation:
        log(f"[{elapsed()}] {model_preset} generation: timing prefill + decode")
        gen = report["generation"] = time_generation(args, preset, paths, model_preset)
        report["speedup"]["generation"] = gen["ours"]["tokens_per_s"] / gen["upstream"]["tokens_per_s"]
    return report


def main(argv=None):
    args = parse_args(argv)
    if args.tokenizer_path is not None and len(args.preset) > 1:
        raise SystemExit("--tokenizer_path fits one model: time one --preset at a time with it")
    log = print
    started = time.perf_counter()

    def elapsed():
        return f"{time.perf_counter() - started:.0f}s"

    preset = settings_from_flags(args)
    device = torch.device(args.device)
    peak_seconds = 1.0 if args.quick else 4.0
    temporary = args.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="minimind-bench-")) if temporary else args.work_dir
    try:
        peak_flops = measure_matmul_peak(device, getattr(torch, args.dtype_name), seconds=peak_seconds)
        log(f"[{elapsed()}] matmul peak on {device}: {peak_flops / 1e12:.3f} TFLOP/s ({args.dtype_name})")
        common = {"device": str(device), "device_name": device_name(device), "threads": torch.get_num_threads(),
                  "torch": torch.__version__, "dtype": args.dtype_name, "preset": "quick" if args.quick else "full",
                  "settings": preset, "num_workers": args.num_workers}
        reports = {}
        for model_preset in args.preset:
            model_dir = work_dir if len(args.preset) == 1 else work_dir / model_preset
            reports[model_preset] = time_model(model_preset, preset, args, model_dir, log, elapsed)
        report = ({**common, **reports[args.preset[0]]} if len(args.preset) == 1 else
                  {**common, "train": {}, "by_preset": reports})
        # The peak again now that nothing else of ours runs: the better of the two is the yardstick.
        add_mfu(report, max(peak_flops, measure_matmul_peak(device, getattr(torch, args.dtype_name),
                                                            seconds=peak_seconds)))
    finally:
        if temporary:
            shutil.rmtree(work_dir, ignore_errors=True)
    finish_report(report, args, started, log)
    return report


if __name__ == "__main__":
    main()
