"""The GPU path in one command: what a person (or a lent machine) runs to see that training and serving work on CUDA.

    python -m scripts.gpu_check                          # CUDA if present: 26M model, a few minutes on one GPU
    python -m scripts.gpu_check --device cpu --tiny      # the smoke run the tests do (CUDA-only rows: "no CUDA")
    python -m scripts.gpu_check --out out/gpu_check.json # where the JSON goes (default shown)

Rows (random weights and synthetic assets built here; nothing is downloaded):
    loss bf16 vs fp32      one batch's loss under the trainer's bf16 autocast and in fp32 (CUDA)
    steps/s eager          optimizer steps (loss-only forward, backward, AdamW) on collated batches of changing
                           lengths, timed over a second pass (every length seen once before)
    steps/s compiled       the same through the trainer's torch.compile; warm-up (compilation) time, graph breaks,
                           and the number of graphs after the warm-up and at the end (equal: no recompile per new
                           length)
    syncs per step         device->host synchronisations in one training step (torch.cuda.set_sync_debug_mode)
    attention kernels      the SDPA kernel of every attention call (LM and CLIP) in a training step and in
                           generation (flash_attention, efficient_attention, cudnn_attention: fused; math: not)
    peak memory            CUDA peak of a training step, beside the model-state estimate (16 bytes per
                           trainable parameter: weights, gradients and AdamW's two moments, plus CLIP's weights)
    generation             tokens/s of greedy generate() on an image prompt, in the inference dtype
    API                    scripts.serve_openai_api started with --device, one chat completion with an image
    torchrun 2 processes   train_pretrain_vlm.py under torchrun --nproc_per_node 2 (CUDA: needs 2 GPUs)
Prints one table and writes the JSON.
"""
if not __package__:  # started as a file: its folder, not the repo root, is on the import path
    raise SystemExit("run it from the repository root as: python -m scripts.gpu_check")

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path

import torch

from common import DEFAULT_SAVE_DIR, REPO_ROOT, bounded, default_device, device_flag, quiet_transformers

DEFAULT_OUT = DEFAULT_SAVE_DIR / "gpu_check.json"
NO_CUDA = "no CUDA"
# (LM hidden, LM layers, CLIP hidden, CLIP layers, CLIP heads, batch size, training steps, new tokens)
SIZES = {
    "full": dict(hidden_size=512, num_hidden_layers=8, clip_hidden_size=768, clip_layers=12, clip_heads=12,
                 batch_size=16, steps=6, new_tokens=64),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, clip_hidden_size=64, clip_layers=2, clip_heads=4,
                 batch_size=2, steps=2, new_tokens=8),
}
# Text around the image run of a pretrain-like sample: tokens before and after it (image: 196 more).
TEXT_LENGTHS = (30, 44, 58, 72)
SERVER_START_S = 600
DDP_PROCESSES = 2
SDPA_OP_PREFIX = "aten::_scaled_dot_product_"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", type=device_flag, default=default_device())
    p.add_argument("--tiny", action="store_true", help="a 64x2 model and tiny CLIP: a smoke run")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file")
    p.add_argument("--compile_backend", default="inductor",
                   help="torch.compile backend for the compiled row (aot_eager: no code generation, for CPU tests)")
    p.add_argument("--skip", nargs="*", default=[], choices=["api", "torchrun"], help="rows to leave out")
    p.add_argument("--seed", type=bounded(int, 0), default=0)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ assets

def build_assets(work_dir: Path, size: dict, seed: int) -> dict:
    """Tokenizer, a random CLIP of the size's geometry, a random VLM saved as .pth, and the tiny shapes data."""
    from dev import synthetic
    from model.model_vlm import MiniMindVLM, VLMConfig
    from model.weights import weight_path

    tokenizer = synthetic.build_tokenizer(work_dir / "tokenizer", synthetic.tokenizer_corpus(seed))
    clip = synthetic.build_tiny_clip(work_dir / "clip", size["clip_hidden_size"], size["clip_layers"], seed,
                                     num_heads=size["clip_heads"])
    torch.manual_seed(seed)
    with quiet_transformers():  # CLIP's unused text tower
        model = MiniMindVLM(VLMConfig(hidden_size=size["hidden_size"], num_hidden_layers=size["num_hidden_layers"]),
                            vision_model_path=clip)
    weights = weight_path(work_dir / "out", "sft_vlm", size["hidden_size"], False)
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), weights)
    data = synthetic.build_shapes_dataset(work_dir / "data", n_pretrain=8, n_sft=4, n_eval=2, seed=seed)
    return {"tokenizer": tokenizer, "clip": clip, "weights": weights, "model": model, "data": data}


def training_batch(model, batch_size: int, text_length: int, device, seed: int):
    """A pretrain-like batch through the trainer's collator: text, one 196-token image run, a caption to predict,
    with the image and target positions the collator computes on the host (so the step neither syncs nor breaks
    the compiled graph to find them). input_ids/labels [B, T], pixel_values [B, 3, 224, 224]."""
    from dataset.lm_dataset import collate_batch
    from model.model_minimind import IGNORE_INDEX

    generator = torch.Generator().manual_seed(seed)
    prefix = text_length // 2
    image_end = prefix + model.image_token_count
    ids = torch.randint(40, model.config.vocab_size, (batch_size, image_end + text_length - prefix),
                        generator=generator)
    ids[:, prefix:image_end] = model.image_token_id
    labels = ids.clone()
    labels[:, :image_end + 4] = IGNORE_INDEX
    pixels = torch.randn(batch_size, 1, 3, 224, 224, generator=generator)
    items = [{"input_ids": ids[row], "labels": labels[row], "pixel_values": pixels[row]} for row in range(batch_size)]
    batch = collate_batch(items, pad_token_id=0, image_token_id=model.image_token_id,
                          image_run_length=model.image_token_count)
    batch.pop("replaced")
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


# ------------------------------------------------------------------------------------------------ rows

def losses_bf16_vs_fp32(model, batch, device):
    from trainer.setup import autocast_for

    if device.type != "cuda":
        return NO_CUDA
    losses = {}
    with torch.no_grad():
        for name in ("bfloat16", "float32"):
            autocast, _ = autocast_for(device, name)
            with autocast():
                losses[name] = float(model(**batch, loss_only=True).loss)
    return {"bf16": losses["bfloat16"], "fp32": losses["float32"],
            "abs_diff": abs(losses["bfloat16"] - losses["float32"])}


def training_step(model, optimizer, autocast, batch):
    with autocast():
        loss = model(**batch, loss_only=True).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, batches, device, autocast, after_warmup=lambda: None):
    """Steps/s over a second pass of the batches, each length already seen once (what a shape costs on first use,
    such as a compilation or an attention kernel's plan, falls in the first pass), and the seconds of the very
    first step (the warm-up, compilation included), after which `after_warmup` runs."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    started = time.perf_counter()
    training_step(model, optimizer, autocast, batches[0])
    sync(device)
    warmup_s = time.perf_counter() - started
    after_warmup()
    for batch in batches[1:]:
        training_step(model, optimizer, autocast, batch)
    sync(device)
    started = time.perf_counter()
    for batch in batches:
        training_step(model, optimizer, autocast, batch)
    sync(device)
    return {"steps_per_s": len(batches) / (time.perf_counter() - started), "warmup_s": warmup_s,
            "steps_timed": len(batches)}


def compiled_steps(model, batches, device, autocast, backend):
    """time_steps through the trainer's torch.compile, with the graphs compiled by the end of the warm-up and by
    the end (the later batches have new lengths: equal counts mean no recompilation)."""
    from torch._dynamo.utils import counters

    from trainer.setup import compile_model

    torch._dynamo.reset()
    counters.clear()
    graphs = {}
    result = time_steps(compile_model(model, backend=backend), batches, device, autocast,
                        after_warmup=lambda: graphs.update(after_warmup=counters["stats"]["unique_graphs"]))
    result.update(graphs_after_warmup=graphs["after_warmup"], graphs_at_end=counters["stats"]["unique_graphs"],
                  graph_breaks=sum(counters["graph_break"].values()))
    torch._dynamo.reset()
    return result


def syncs_per_step(model, batch, device, autocast):
    if device.type != "cuda":
        return NO_CUDA
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    training_step(model, optimizer, autocast, batch)  # warm-up: lazy initialisations sync once
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            training_step(model, optimizer, autocast, batch)
            sync(device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    return {"count": len(syncs), "first": syncs[:3]}


def attention_kernels(call):
    """{SDPA kernel op: calls} during call() (e.g. flash_attention, efficient_attention, attention_math)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    kernels = {}
    for event in prof.events():
        if event.name.startswith(SDPA_OP_PREFIX) and "backward" not in event.name:
            name = event.name[len(SDPA_OP_PREFIX):]
            kernels[name] = kernels.get(name, 0) + 1
    return kernels


def peak_memory(model, batch, device, autocast):
    if device.type != "cuda":
        return NO_CUDA
    trainable = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    clip = sum(p.numel() * p.element_size() for p in model.vision_encoder.parameters())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    torch.cuda.reset_peak_memory_stats(device)
    training_step(model, optimizer, autocast, batch)
    sync(device)
    return {"peak_mib": torch.cuda.max_memory_allocated(device) / 2 ** 20,
            "model_state_estimate_mib": (16 * trainable + clip) / 2 ** 20}


def generation(assets, device, new_tokens: int):
    from inference.loading import load_model

    loaded = load_model(assets["weights"], False, assets["tokenizer"], assets["clip"], device, log=None)
    model = loaded.model
    ids = torch.tensor([[1, 5] + [model.image_token_id] * model.image_token_count + [6, 7, 2, 1, 8]], device=device)
    pixels = torch.randn(1, 1, 3, 224, 224, device=device)

    def run():
        with torch.no_grad():
            return model.generate(ids, pixel_values=pixels, max_new_tokens=new_tokens, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)

    run()  # warm-up
    started = time.perf_counter()
    run()
    sync(device)
    seconds = time.perf_counter() - started
    return {"dtype": str(model.dtype).removeprefix("torch."), "tokens_per_s": new_tokens / seconds,
            "kernels": attention_kernels(run)}


def api_check(assets, device, work_dir: Path):
    """The API server on this device answers one chat completion about an image."""
    from dev.serving import wait_until_serving

    log_path = work_dir / "server.log"
    command = [sys.executable, "-m", "scripts.serve_openai_api", "--device", str(device), "--port", "0",
               "--model_name", "minimind",
               "--weight", str(assets["weights"]), "--tokenizer_path", str(assets["tokenizer"]),
               "--vision_model_path", str(assets["clip"]), "--hidden_size", str(assets["model"].config.hidden_size),
               "--num_hidden_layers", str(assets["model"].config.num_hidden_layers), "--max_new_tokens", "8"]
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        base_url = wait_until_serving(server, log_path, SERVER_START_S)
        image = next(Path(assets["data"]["eval_images"]).iterdir()).read_bytes()
        body = {"model": "minimind", "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What shape is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(image).decode()}},
        ]}]}
        request = urllib.request.Request(f"{base_url}/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=300) as response:
            reply = json.load(response)
            status = response.status
        return {"status": status, "seconds": time.perf_counter() - started,
                "completion_tokens": reply["usage"]["completion_tokens"]}
    finally:
        server.terminate()
        server.wait(timeout=60)


def torchrun_check(assets, device, size, work_dir: Path):
    """Two training processes (the trainer's DDP: NCCL on CUDA, one GPU each; gloo on CPU)."""
    if device.type == "cuda" and torch.cuda.device_count() < DDP_PROCESSES:
        return f"needs {DDP_PROCESSES} GPUs, torch sees {torch.cuda.device_count()} (NCCL puts one process on each)"
    data = assets["data"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(DDP_PROCESSES),
               str(REPO_ROOT / "train_pretrain_vlm.py"), "--device", str(device), "--hidden_size",
               str(size["hidden_size"]), "--num_hidden_layers", str(size["num_hidden_layers"]), "--num_workers", "0",
               "--data_path", str(data["pretrain_jsonl"]), "--images_path", str(data["pretrain_images"]),
               "--vision_model_path", str(assets["clip"]), "--tokenizer_path", str(assets["tokenizer"]),
               "--save_dir", str(work_dir / "ddp_out"), "--checkpoint_dir", str(work_dir / "ddp_ckpt"),
               "--from_weight", "none", "--max_steps", "2", "--batch_size", "2", "--log_interval", "1"]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = (result.stdout + result.stderr).strip().splitlines()
    done = [line for line in output if line.startswith("done:")]
    return {"returncode": result.returncode, "seconds": time.perf_counter() - started,
            "result": (done or output or [""])[-1][:300]}


# ------------------------------------------------------------------------------------------------ report

def describe(value) -> str:
    if isinstance(value, str):
        return value
    return ", ".join(f"{key} {f'{v:.4g}' if isinstance(v, float) else v}" for key, v in value.items())


def format_table(report: dict) -> str:
    rows = ["| check | result |", "|---|---|"]
    rows += [f"| {name} | {describe(value)} |" for name, value in report["checks"].items()]
    return "\n".join(rows)


def run_checks(args, work_dir: Path) -> dict:
    from trainer.setup import autocast_for, set_trainable

    size = SIZES["tiny" if args.tiny else "full"]
    device = torch.device(args.device)
    assets = build_assets(work_dir, size, args.seed)
    model = assets["model"].to(device)
    set_trainable(model, "all")
    model.train()
    autocast, _ = autocast_for(device, "bfloat16")
    batches = [training_batch(model, size["batch_size"], TEXT_LENGTHS[i % len(TEXT_LENGTHS)], device, args.seed + i)
               for i in range(size["steps"] + 1)]
    checks = {"loss bf16 vs fp32": losses_bf16_vs_fp32(model, batches[0], device),
              "steps/s eager": time_steps(model, batches, device, autocast)}
    checks["steps/s compiled"] = compiled_steps(model, batches, device, autocast, args.compile_backend)
    checks["syncs per step"] = syncs_per_step(model, batches[0], device, autocast)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    checks["attention kernels (training)"] = attention_kernels(
        lambda: training_step(model, optimizer, autocast, batches[0]))
    checks["peak memory"] = peak_memory(model, batches[0], device, autocast)
    gen = generation(assets, device, size["new_tokens"])
    checks["attention kernels (generation)"] = gen.pop("kernels")
    checks["generation"] = gen
    if "api" not in args.skip:
        checks["API"] = api_check(assets, device, work_dir)
    if "torchrun" not in args.skip:
        checks["torchrun 2 processes"] = torchrun_check(assets, device, size, work_dir)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": str(device), "device_name": name, "torch": torch.__version__, "size": size,
            "checks": checks}


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="minimind-gpu-check-") as work_dir:
        report = run_checks(args, Path(work_dir))
    report["wall_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(format_table(report))
    print(f"written {args.out} ({report['wall_s']:.0f} s on {report['device_name']})")
    return report


if __name__ == "__main__":
    main()
