"""Requests/s and time to first token of the API server (scripts/serve_openai_api.py) for 1, 4 and 8 clients.

    python -m dev.bench_serve                     # random 26M model (512 x 8) + random ViT-B/16 CLIP, on the CPU
    python -m dev.bench_serve --max_concurrency 1 4 --clients 1 4 8 --requests 4 --max_tokens 64
    python -m dev.bench_serve --server_flags "--weight out/sft_vlm_512.pth --device cuda"
    python -m dev.bench_serve --url http://127.0.0.1:8998 --model sft_vlm_512         # a server already running

Each client sends --requests streaming chat requests one after another, each with one image (a data URL) and
a question, greedy, answer length fixed at --max_tokens (the random model never ends its turn early; a trained
one may, so its figures count the tokens it wrote). Time to first token runs from sending the request to the
first text piece: queueing, image decoding, CLIP and prefill. Without --url the server is started here, once
per --max_concurrency value, and stopped afterwards. Figures depend on what else the machine runs: the load
average is printed with them.
"""
if not __package__:  # started as a file: its folder, not the repo root, is on the import path
    raise SystemExit("run it from the repository root as: python -m dev.bench_serve")

import argparse
import base64
import http.client
import io
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import torch

from common import DEFAULT_TOKENIZER_PATH, REPO_ROOT, bounded, run_cli
from dev import synthetic
from dev.serving import wait_until_serving

MODEL_SHAPE = dict(hidden_size=512, num_hidden_layers=8)  # MiniMind2-V, 26M
CLIP_SHAPE = dict(hidden_size=768, num_layers=12, num_heads=12)  # ViT-B/16
STARTUP_SECONDS = 300
QUESTION = "Describe this image in detail."


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=bounded(int, 1), nargs="+", default=[1, 4, 8], help="concurrent clients per round")
    parser.add_argument("--requests", type=bounded(int, 1), default=4, help="requests each client sends per round")
    parser.add_argument("--max_tokens", type=bounded(int, 1), default=64, help="answer length asked for")
    parser.add_argument("--max_concurrency", type=bounded(int, 1), nargs="+", default=[1],
                        help="server --max_concurrency values, one server each (not with --url)")
    parser.add_argument("--server_flags", default="", help="extra flags for serve_openai_api (model, device)")
    parser.add_argument("--tokenizer_path", default=str(DEFAULT_TOKENIZER_PATH),
                        help="tokenizer for the random model (default: the repo's; the synthetic one if missing)")
    parser.add_argument("--url", default=None, help="benchmark this running server instead of starting one")
    parser.add_argument("--model", default=None, help="model id for --url (default: the first of /v1/models)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results here as JSON")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------- server

def random_model_flags(work_dir: Path, tokenizer_path: Path) -> list:
    """Flags that serve a randomly initialised 26M MiniMind-V with a random full-size CLIP (timing only)."""
    from model.model_vlm import MiniMindVLM, VLMConfig

    clip_dir = synthetic.build_tiny_clip(work_dir / "clip", CLIP_SHAPE["hidden_size"], CLIP_SHAPE["num_layers"],
                                         num_heads=CLIP_SHAPE["num_heads"])
    if not (tokenizer_path / "tokenizer.json").is_file():
        print(f"no tokenizer in {tokenizer_path}: using the synthetic one", file=sys.stderr)
        tokenizer_path = synthetic.build_tokenizer(work_dir / "tokenizer", synthetic.tokenizer_corpus(0))
    torch.manual_seed(0)
    model = MiniMindVLM(VLMConfig(**MODEL_SHAPE), vision_model_path=None)
    weight = work_dir / "sft_vlm_512.pth"
    torch.save(model.state_dict(), weight)
    return ["--weight", str(weight), "--vision_model_path", str(clip_dir), "--tokenizer_path", str(tokenizer_path),
            "--hidden_size", str(MODEL_SHAPE["hidden_size"]), "--num_hidden_layers",
            str(MODEL_SHAPE["num_hidden_layers"])]


def start_server(flags: list, log_path: Path):
    """(process, base URL) of a server started with `flags` on a free loopback port."""
    command = [sys.executable, "-m", "scripts.serve_openai_api", "--port", "0", *flags]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        return process, wait_until_serving(process, log_path, STARTUP_SECONDS)
    except RuntimeError:
        process.terminate()
        raise


# -------------------------------------------------------------------------------------------------- clients

def http_json(url: str, method: str = "GET", body: dict = None):
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    connection.request(method, parts.path, body=None if body is None else json.dumps(body),
                       headers={"Content-Type": "application/json"})
    return connection, connection.getresponse()


def timed_request(base_url: str, body: dict) -> dict:
    """One streamed answer: seconds to the first text piece and in all, text pieces received."""
    started = time.perf_counter()
    connection, response = http_json(f"{base_url}/v1/chat/completions", "POST", body)
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    first, pieces = None, 0
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        for choice in json.loads(line[len(b"data: "):]).get("choices", []):
            if choice["delta"].get("content"):
                first = first or time.perf_counter()
                pieces += 1
    connection.close()
    return {"ttft": (first or time.perf_counter()) - started, "seconds": time.perf_counter() - started,
            "pieces": pieces}


def run_round(base_url: str, body: dict, clients: int, requests: int) -> dict:
    results, errors = [], []

    def client():
        for _ in range(requests):
            try:
                results.append(timed_request(base_url, body))
            except (OSError, RuntimeError) as error:
                errors.append(str(error))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed, e.g. {errors[0]}")
    ttfts = sorted(r["ttft"] for r in results)
    return {"clients": clients, "requests": len(results), "requests_per_s": len(results) / wall,
            "pieces_per_s": sum(r["pieces"] for r in results) / wall, "ttft_median_s": statistics.median(ttfts),
            "ttft_p90_s": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))], "wall_s": wall}


def request_body(model: str, max_tokens: int) -> dict:
    image = synthetic_image()
    return {"model": model, "stream": True, "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}},
                {"type": "text", "text": QUESTION}]}]}


def synthetic_image() -> str:
    """A 320x240 PNG with a few shapes, base64."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (320, 240), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 40, 140, 140), fill="red")
    draw.rectangle((180, 60, 280, 200), fill="blue")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def bench_server(base_url: str, model: str, args) -> list:
    body = request_body(model, args.max_tokens)
    timed_request(base_url, body)  # warm-up: first-call allocations are not counted
    rounds = []
    for clients in args.clients:
        result = run_round(base_url, body, clients, args.requests)
        print(f"  {clients} client(s): {result['requests_per_s']:.2f} requests/s, {result['pieces_per_s']:.0f} "
              f"text pieces/s, time to first token median {result['ttft_median_s'] * 1000:.0f} ms "
              f"(p90 {result['ttft_p90_s'] * 1000:.0f} ms)", flush=True)
        rounds.append(result)
    return rounds


def served_model(base_url: str) -> str:
    connection, response = http_json(f"{base_url}/v1/models")
    models = json.loads(response.read())
    connection.close()
    return models["data"][0]["id"]


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def main(argv=None):
    args = parse_args(argv)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average before: {load_average()}", flush=True)
    results = []
    if args.url is not None:
        base_url = args.url.rstrip("/").removesuffix("/v1")
        model = args.model or served_model(base_url)
        print(f"{base_url}, model {model}:")
        results.append({"url": base_url, "rounds": bench_server(base_url, model, args)})
    else:
        with tempfile.TemporaryDirectory(prefix="bench_serve_") as work_dir:
            work_dir = Path(work_dir)
            model_flags = shlex.split(args.server_flags)
            if "--weight" not in model_flags and "--load" not in model_flags:
                model_flags = random_model_flags(work_dir, Path(args.tokenizer_path)) + model_flags
            for concurrency in args.max_concurrency:
                flags = model_flags + ["--max_concurrency", str(concurrency), "--max_queue", str(max(args.clients)),
                                       "--max_new_tokens", str(args.max_tokens)]
                process, base_url = start_server(flags, work_dir / "server.log")
                try:
                    model = served_model(base_url)
                    print(f"server --max_concurrency {concurrency}, model {model}:", flush=True)
                    results.append({"max_concurrency": concurrency, "rounds": bench_server(base_url, model, args)})
                finally:
                    process.terminate()
                    process.wait(timeout=30)
    print(f"load average after: {load_average()}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"max_tokens": args.max_tokens, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    run_cli(main)
