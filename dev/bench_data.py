"""Benchmark the data path at the published files' size: start-up time, memory per process, preparation rate.

    python -m dev.bench_data --rows 100000 300000 --tokenizer_path model --out /tmp/bench_data

For each row count it writes a parquet file shaped like sft_i2t.parquet (dev/published_shape.py: 256x256
JPEGs, answers of 30-300 words, about 8% text-only rows with an 8x8 placeholder, stored system turns), then
launches `train_sft_vlm.py --max_steps 1` as a user would, without --skip_bad_samples:
  cold 1 process     no prepared data yet: the run prepares it (in parallel) before its first step
  warm 1 process     prepared data present
  cold 2 processes   torchrun --nproc_per_node 2: rank 0 prepares, rank 1 waits, both map the same files
  warm 2 processes
and reports the time from launch to the first training step's log line, the peak RSS of the largest process
(trainer, DataLoader or preparation worker; VmHWM, polled), the preparation rate the run logged, and a linear projection
to the published files' 1.27M and 2.9M rows. The model is tiny (--hidden_size 64 --num_hidden_layers 2, a
random CLIP of ViT-B/16 geometry unless --vision_model_path names a real one) because what is measured is the
data path: reading, tokenising, decoding and preprocessing images. Generated files go under --out (about 17 KB
a row), not into the repo. The machine's load average is printed with every run: shared machines vary.
"""
if not __package__:  # started as a file: its folder, not the repo root, is on the import path
    raise SystemExit("run it from the repository root as: python -m dev.bench_data")

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import DEFAULT_TOKENIZER_PATH, REPO_ROOT, bounded, run_cli

PUBLISHED_ROWS = {"pretrain_i2t.parquet": 1_270_000, "sft_i2t.parquet": 2_900_000}
FIRST_STEP = re.compile(r"step 1/\d+ \| loss")
DATA_READY = re.compile(r"data ready in ([\d.]+)s")
PREPARED = re.compile(r"prepared \S+: (\d+) rows in ([\d.]+)s \((\d+) rows/s, (\d+) worker\(s\), ([\d.]+) CPU-s")
RUN_KINDS = (("cold", 1), ("warm", 1), ("cold", 2), ("warm", 2))
TINY_CLIP_HIDDEN, TINY_CLIP_LAYERS = 64, 2
KIB = 1024
RSS_POLL_S = 0.2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=bounded(int, 1), nargs="+", default=[100_000, 300_000], help="row counts to measure")
    p.add_argument("--out", type=Path, default=Path("/tmp/bench_data"), help="generated files and run outputs")
    p.add_argument("--tokenizer_path", default=str(DEFAULT_TOKENIZER_PATH), help="the MiniMind2 tokenizer folder")
    p.add_argument("--vision_model_path", default=None, help="a CLIP folder (default: a random tiny one)")
    p.add_argument("--num_workers", type=bounded(int, 0, 64), default=2,
                   help="DataLoader workers of each training process")
    p.add_argument("--prepare_workers", type=bounded(int, 1), default=os.cpu_count() or 1)
    p.add_argument("--batch_size", type=bounded(int, 1), default=4, help="global batch (split over 2 processes)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--runs", nargs="+", default=[f"{t}{n}" for t, n in RUN_KINDS],
                   choices=[f"{t}{n}" for t, n in RUN_KINDS], help="which runs (default: all four)")
    return p.parse_args(argv)


def generate(path: Path, rows: int) -> dict:
    """The published-shape file, written once per row count (reused by later benchmark runs)."""
    from tqdm import tqdm

    from dev.published_shape import write_published_shape

    facts_path = path.with_suffix(".json")
    if path.is_file() and facts_path.is_file():
        return json.loads(facts_path.read_text())
    started = time.time()
    with tqdm(total=rows, desc=f"writing {path.name}", unit="rows", unit_scale=True) as bar:
        facts = write_published_shape(path, rows, progress=bar.update)
    facts["seconds"] = round(time.time() - started, 1)
    facts_path.write_text(json.dumps(facts))
    return facts


def tiny_clip(out: Path) -> Path:
    from dev.synthetic import build_tiny_clip

    folder = out / "tiny_clip"
    if not (folder / "config.json").is_file():
        build_tiny_clip(folder, TINY_CLIP_HIDDEN, TINY_CLIP_LAYERS, seed=0)
    return folder


def train_command(args, data: Path, clip: Path, run_dir: Path, processes: int) -> list:
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    return [*launcher, str(REPO_ROOT / "train_sft_vlm.py"), "--device", "cpu", "--hidden_size", "64",
            "--num_hidden_layers", "2", "--from_weight", "none", "--max_steps", "1", "--log_interval", "1",
            "--batch_size", str(max(args.batch_size // processes, 1)), "--num_workers", str(args.num_workers),
            "--prepare_workers", str(args.prepare_workers), "--data_path", str(data),
            "--prepared_dir", str(data.parent / f"{data.stem}.prepared"), "--vision_model_path", str(clip),
            "--tokenizer_path", str(args.tokenizer_path), "--save_dir", str(run_dir / "out"),
            "--checkpoint_dir", str(run_dir / "ckpt")]


def peak_rss_bytes(pid: int) -> int:
    """VmHWM of a live process: its peak RSS since its exec (wait4's ru_maxrss would also count the pages of
    the parent it was forked from, before the exec)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * KIB
    except OSError:  # gone meanwhile
        pass
    return 0


def process_tree(root: int) -> list:
    """`root` and all its descendants, from /proc."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def measure(command, env) -> dict:
    """Launch `command`; the seconds to its first step line, its largest process's peak RSS, its output."""
    started = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    first_step, lines, peaks = None, [], {}

    def watch():  # the peak RSS of every process of the run (trainers, DataLoader and preparation workers)
        while process.returncode is None:
            for pid in process_tree(process.pid):
                peaks[pid] = max(peaks.get(pid, 0), peak_rss_bytes(pid))
            time.sleep(RSS_POLL_S)

    def read():
        nonlocal first_step
        for line in process.stdout:
            lines.append(line)
            if first_step is None and FIRST_STEP.search(line):
                first_step = time.time() - started

    reader, watcher = threading.Thread(target=read), threading.Thread(target=watch)
    reader.start()
    watcher.start()
    _, status, usage = os.wait4(process.pid, 0)  # usage: CPU time of this process and its waited-for descendants
    process.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    watcher.join()
    output = "".join(lines)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{output[-3000:]}")
    prepared = PREPARED.search(output)
    return {"first_step_s": round(first_step, 1) if first_step else None,
            "peak_rss_gb": round(max(peaks.values(), default=0) / 1e9, 2),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),  # the whole run, all its processes
            "prepare_rows_per_s": int(prepared.group(3)) if prepared else None,
            "prepare_s": float(prepared.group(2)) if prepared else None,
            # what the preparation would reach with every core to itself: rows per CPU-second x cores used
            "prepare_rows_per_s_idle": round(int(prepared.group(1)) / float(prepared.group(5))
                                             * min(int(prepared.group(4)), os.cpu_count() or 1))
            if prepared else None,
            "data_ready_s": float(DATA_READY.search(output).group(1)) if DATA_READY.search(output) else None,
            "summary": next((line.strip() for line in lines if "usable samples of" in line), None),
            "load_average": round(os.getloadavg()[0], 1)}


def bench_rows(args, rows: int, clip: Path) -> dict:
    data = args.out / f"published_{rows}.parquet"
    facts = generate(data, rows)
    print(f"{data.name}: {facts['rows']} rows ({facts['text_only']} text-only), {facts['bytes'] / 1e9:.2f} GB, "
          f"mean image {facts['mean_image_bytes'] / 1e3:.1f} KB; load average {os.getloadavg()[0]:.1f}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    results = {"rows": rows, "file_gb": round(facts["bytes"] / 1e9, 2), "text_only": facts["text_only"]}
    prepared_dir = data.parent / f"{data.stem}.prepared"
    for kind, processes in RUN_KINDS:
        name = f"{kind}{processes}"
        if name not in args.runs:
            continue
        if kind == "cold":
            shutil.rmtree(prepared_dir, ignore_errors=True)
        run_dir = args.out / f"run_{rows}_{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        results[name] = measure(train_command(args, data, clip, run_dir, processes), env)
        results[name]["prepared_gb"] = round(folder_bytes(prepared_dir) / 1e9, 2)
        print(f"  {kind} {processes} process(es): {json.dumps(results[name])}", flush=True)
    return results


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def projection(results: list) -> list:
    """Lines projecting to the published row counts: the preparation at the largest run's rates; the data's
    share of a warm start (opening the prepared data) and peak RSS linearly from the two largest runs (a slope
    below zero, which is noise, counts as flat). The rest of a start is fixed: imports, model, workers."""
    results = sorted(results, key=lambda r: r["rows"])
    lines = []
    cold = results[-1].get("cold1", {})
    for rate_name, label in (("prepare_rows_per_s", "as measured"), ("prepare_rows_per_s_idle", "idle cores")):
        if cold.get(rate_name):
            shown = ", ".join(f"{file} {n / cold[rate_name] / 60:.1f} min" for file, n in PUBLISHED_ROWS.items())
            lines.append(f"  preparation ({label}, {cold[rate_name]} rows/s): {shown}")
    if len(results) < 2:
        return lines
    small, large = results[-2:]
    for figure, unit in (("data_ready_s", "s"), ("peak_rss_gb", "GB")):
        for name in ("warm1", "warm2"):
            if small.get(name, {}).get(figure) is None or large.get(name, {}).get(figure) is None:
                continue
            a, b = small[name][figure], large[name][figure]
            slope = max((b - a) / (large["rows"] - small["rows"]), 0.0)
            shown = ", ".join(f"{file} {b + slope * (n - large['rows']):.1f} {unit}" for file, n in PUBLISHED_ROWS.items())
            lines.append(f"  {name} {figure}: {shown}")
    return lines


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    clip = Path(args.vision_model_path) if args.vision_model_path else tiny_clip(args.out)
    print(f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}; tokenizer {args.tokenizer_path}",
          flush=True)
    results = [bench_rows(args, rows, clip) for rows in sorted(args.rows)]
    print("projection to the published files (linear in rows from the two largest runs):")
    print("\n".join(projection(results)) or "  (needs two row counts)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    run_cli(main)
