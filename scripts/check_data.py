"""Check a dataset before training: every record, every image, every token length.

    python -m scripts.check_data dataset/pretrain_i2t.parquet
    python -m scripts.check_data dataset/sft_vlm_data.jsonl --images_path dataset/sft_images --stage sft
    python -m scripts.check_data DATA --tokenizer_path model --max_seq_len 1024 --workers 16

It runs the checks the trainers run at start-up, with the same code (dataset/lm_dataset.py), plus the one
they cannot afford up front:
  1. every record parses and has `conversations`; for JSONL, every image file exists;
  2. every record has as many `<image>` markers as images;
  3. every image decodes and preprocesses (in parallel; a trainer finds a broken image only when it loads
     it, and then trains on the next sample instead);
  4. the token length after the chat template: which samples max_seq_len leaves out because an image or
     the whole answer does not fit, and a histogram of the lengths.
Problems 1-3 are listed as `file:line: reason` (parquet: `file:row N: reason`); samples left out at
max_seq_len are listed too but are not errors (the trainers skip and count them).

Exit status: 0 when no record has a problem, 1 when some record has one or no sample is usable, 2 when the
check cannot run (a missing file, no tokenizer, ...).
"""
import argparse
import bisect
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import DEFAULT_TOKENIZER_PATH, bounded, format_duration, run_cli
from dataset.lm_dataset import CUT_IMAGE, DataError, DataProblem, SampleEncoder, load_image, open_source
from dataset.processing import ImageError, check_tokenizer_matches, load_tokenizer
from model.model_vlm import VLMConfig
from trainer.training import STAGE_DEFAULTS

STAGE_MAX_SEQ_LEN = {stage: defaults["max_seq_len"] for stage, defaults in STAGE_DEFAULTS.items()}
IMAGES_PER_TASK = 64  # images one worker decodes per task: few futures, smooth progress
PROGRESS_EVERY_S = {True: 0.2, False: 10.0}  # seconds between progress updates on a terminal / in a log file
HISTOGRAM_BINS = 12
HISTOGRAM_WIDTH = 40  # characters of the longest bar


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="a .jsonl file (with --images_path) or a .parquet file")
    p.add_argument("--images_path", default=None, help="image folder of a .jsonl dataset (default: its folder)")
    p.add_argument("--tokenizer_path", default=str(DEFAULT_TOKENIZER_PATH), help="folder with tokenizer.json")
    p.add_argument("--stage", default="pretrain", choices=list(STAGE_MAX_SEQ_LEN),
                   help="whose default --max_seq_len to use ("
                        + ", ".join(f"{stage} {n}" for stage, n in STAGE_MAX_SEQ_LEN.items()) + ")")
    p.add_argument("--max_seq_len", type=bounded(int, 2), default=None,
                   help="tokens per sample, as given to the trainer")
    p.add_argument("--workers", type=bounded(int, 1), default=os.cpu_count() or 1,
                   help="threads decoding images (PIL releases the GIL while decoding and resizing)")
    p.add_argument("--show", type=bounded(int, 0), default=100,
                   help="problems listed per kind before summarising (0: all)")
    args = p.parse_args(argv)
    if args.max_seq_len is None:
        args.max_seq_len = STAGE_MAX_SEQ_LEN[args.stage]
    return args


class Progress:
    """`label: done/total (pct) | rate/s | ETA` on stderr; rewritten in place on a terminal."""

    def __init__(self, label, total, stream=sys.stderr):
        self.label, self.total, self.stream = label, total, stream
        self.is_tty = stream.isatty()
        self.start = self.last = time.time()
        self.done = 0

    def update(self, count):
        self.done += count
        now = time.time()
        if now - self.last >= PROGRESS_EVERY_S[self.is_tty] or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            end = "\r" if self.is_tty and self.done < self.total else "\n"
            self.stream.write(f"{self.label}: {self.done}/{self.total} ({100 * self.done / max(self.total, 1):.1f}%)"
                              f" | {rate:.1f}/s | ETA {format_duration(eta)}{end}")
            self.stream.flush()


def check_images(source, records, workers):
    """A DataProblem for each record with an image that does not load the way the trainers load it."""
    refs = [(index, ref) for index, record in enumerate(records) for ref in record.images]
    tasks = [refs[i:i + IMAGES_PER_TASK] for i in range(0, len(refs), IMAGES_PER_TASK)]

    def check_task(task):
        failures = []
        for index, ref in task:
            try:
                load_image(source, ref)
            except ImageError as error:
                failures.append((index, f"image does not decode: {error}"))
        return failures

    failed = {}
    progress = Progress("images", len(refs))
    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        for task, failures in zip(tasks, pool.map(check_task, tasks)):
            for index, reason in failures:
                failed.setdefault(index, reason)  # the first broken image of a record
            progress.update(len(task))
    return [DataProblem(records[index].origin, reason) for index, reason in sorted(failed.items())]


def file_order(problem):
    """Sort key: the line or row number that ends every origin."""
    match = re.search(r"(\d+)$", problem.origin)
    return int(match.group(1)) if match else 0


def nice_width(span, bins):
    """Smallest of 1, 2, 5, 10, 20, 50, ... that covers `span` in at most `bins` bins."""
    width, steps = 1, (2, 2.5, 2)  # 1 -> 2 -> 5 -> 10 -> ...
    i = 0
    while width * bins < span:
        width = int(width * steps[i % 3])
        i += 1
    return width


def length_histogram(lengths, max_seq_len, bins=HISTOGRAM_BINS, bar_width=HISTOGRAM_WIDTH):
    """Text bars of the token lengths in round bins; the bin holding max_seq_len is split there."""
    if not lengths:
        return ["  (no sample to measure)"]
    low, high = min(lengths), max(lengths)
    width = nice_width(high - low + 1, bins)
    edges = list(range(low // width * width, (high // width + 2) * width, width))  # bin i: edges[i] .. edges[i+1]-1
    if edges[0] < max_seq_len + 1 < edges[-1]:
        edges = sorted(set(edges) | {max_seq_len + 1})
    counts = [0] * (len(edges) - 1)
    for length in lengths:
        counts[bisect.bisect_right(edges, length) - 1] += 1
    peak = max(counts)
    label_width = len(str(edges[-1]))
    lines = []
    for start, stop, count in zip(edges, edges[1:], counts):
        bar = "#" * round(bar_width * count / peak) or ("." if count else "")
        note = "  > max_seq_len" if start > max_seq_len else ""
        lines.append(f"  {start:>{label_width}}-{stop - 1:<{label_width}} {bar:<{bar_width}} {count}{note}")
    return lines


def table(rows):
    width = max(len(name) for name, _ in rows)
    return [f"  {name:<{width}}  {value}" for name, value in rows]


def listing(title, problems, show):
    if not problems:
        return []
    limit = show or len(problems)
    lines = [f"{title} ({len(problems)}):"] + [f"  {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more (--show 0 lists all)")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    if not Path(args.data).is_file():
        raise DataError(f"dataset file not found: {args.data}")
    source = open_source(args.data, args.images_path)
    tokenizer = load_tokenizer(args.tokenizer_path)
    config = VLMConfig()
    try:
        check_tokenizer_matches(tokenizer, config)
    except ValueError as error:
        raise DataError(f"{args.tokenizer_path}: {error}") from None
    started = time.time()

    # 1-2. Records: the trainers' reader and checks
    records, problems = source.read()
    total = len(records) + len(problems)
    print(f"{source.data_path}: {total} records, {len(records)} well-formed, "
          f"{sum(len(r.images) for r in records)} images", flush=True)
    # 3. Images, in parallel
    decode_problems = check_images(source, records, args.workers)
    # 4. Token lengths: the trainers' encoder
    encoder = SampleEncoder(tokenizer, config.image_special_token, config.image_ids[0], args.max_seq_len)
    samples = encoder.encode(records)
    cut = [DataProblem(r.origin, encoder.cut_reason(s)) for r, s in zip(records, samples) if s.cut is not None]
    errors = sorted(problems + decode_problems, key=file_order)
    spoiled = {p.origin for p in decode_problems} | {p.origin for p in cut}
    usable = sum(1 for r in records if r.origin not in spoiled)

    report = listing("errors", errors, args.show)
    report += listing(f"left out at max_seq_len {args.max_seq_len}", cut, args.show)
    lengths = [s.length for s in samples]
    report.append(f"token lengths after the chat template ({len(lengths)} well-formed samples, "
                  f"max_seq_len {args.max_seq_len}):")
    report += length_histogram(lengths, args.max_seq_len)
    image_cuts = sum(1 for s in samples if s.cut == CUT_IMAGE)
    report.append("summary:")
    report += table([
        ("records", total),
        ("malformed (training refuses them, or skips them)", len(problems)),
        ("image does not decode (trained on another sample)", len(decode_problems)),
        ("image cut at max_seq_len (left out)", image_cuts),
        ("answer cut at max_seq_len (left out)", len(cut) - image_cuts),
        ("usable", usable),
        ("checked in", format_duration(time.time() - started)),
    ])
    print("\n".join(report))
    if errors or not usable:
        reason = f"{len(errors)} record(s) with problems" if errors else "no usable sample"
        print(f"FAILED: {reason}", file=sys.stderr)
        return 1
    print("OK: every record and image can be used" + (f" ({len(cut)} left out at max_seq_len)" if cut else ""))
    return 0


if __name__ == "__main__":
    run_cli(lambda argv: sys.exit(main(argv)))
