"""Score a checkpoint on a standard VLM benchmark, offline, in two modes, with and without the image.

    python -m scripts.eval_bench --bench pope --data_path dataset/bench/pope --weight out/sft_vlm_512.pth \\
        --out pope.json --predictions pope.jsonl
    python -m scripts.eval_bench --bench mme --data_path dataset/bench/mme --load 1 --limit 200
    python -m scripts.eval_bench --compare pope_a.json pope_b.json

Modes: `generate` (greedy answer, lmms-eval's prompt and parsing: comparable with published numbers) and
`likelihood` (the label, yes/no or an option letter, with the highest log-probability after the prompt). Each
is also run blind (the same prompt, no image) unless --no_blind; chance is printed beside each.
"""
if not __package__:  # started as a file: its folder, not the repo root, is on the import path
    raise SystemExit("run it from the repository root as: python -m scripts.eval_bench")

import argparse
import json
import sys

import torch

from common import UserError, atomic_write, bounded, run_cli
from inference.bench_run import (BENCH_MAX_NEW_TOKENS, MODES, build_result, compare_cards, run_benchmark,
                                 score_card)
from inference.benchmarks import BENCHMARKS, read_benchmark, sample_questions
from inference.loading import add_model_flags, load_model_from_flags


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--bench", choices=BENCHMARKS, help="which benchmark --data_path holds")
    bench.add_argument("--data_path", help="the benchmark's parquet file, or a folder of its shards")
    bench.add_argument("--out", default=None, metavar="RESULT.json", help="metrics of every mode (JSON)")
    bench.add_argument("--predictions", default=None, metavar="PRED.jsonl", help="one line per question")
    bench.add_argument("--limit", type=bounded(int, 1), default=None,
                       help="score a fixed-seed sample of about N questions (--seed; whole MME image pairs and "
                            "MMBench circular groups)")
    bench.add_argument("--batch_size", type=bounded(int, 1), default=32, help="questions (and images) per forward pass")
    bench.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    bench.add_argument("--no_blind", action="store_true", help="skip the no-image baseline (half the time)")
    bench.add_argument("--no_progress", action="store_true", help="no progress bar")
    bench.add_argument("--threads", type=bounded(int, 1), default=None,
                       help="CPU threads for torch (default: torch's choice); 1 is faster on a busy machine")
    bench.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                       help="print two RESULT.json files side by side and exit (no model is loaded)")
    return add_model_flags(parser)


def check_args(parser, args):
    if args.compare:
        return
    if args.bench is None or args.data_path is None:
        parser.error("--bench and --data_path are required (or --compare A.json B.json)")


def read_result(path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            result = json.load(handle)
    except OSError as error:
        raise FileNotFoundError(f"cannot read {path} ({error.strerror})") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not JSON ({error})") from None
    if not isinstance(result, dict) or not {"bench", "modes", "chance"} <= set(result):
        raise UserError(f"{path} is not a RESULT.json written by scripts.eval_bench")
    return result


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.compare:
        print(compare_cards(read_result(args.compare[0]), read_result(args.compare[1])))
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    questions, images = read_benchmark(args.bench, args.data_path)
    questions = sample_questions(questions, args.limit, args.seed)
    used_images = {q.image for q in questions}
    print(f"{args.bench}: {len(questions)} questions, {len(used_images)} images", file=sys.stderr)
    loaded = load_model_from_flags(args, log=lambda line: print(line, file=sys.stderr))
    modes = list(dict.fromkeys(args.modes))
    max_new_tokens = BENCH_MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens
    records, seconds = run_benchmark(args.bench, loaded, questions, {k: images[k] for k in used_images}, modes,
                                     not args.no_blind, args.batch_size, max_new_tokens,
                                     progress=not args.no_progress)
    result = build_result(args.bench, records, questions, modes, not args.no_blind, loaded.source, seconds)
    if args.out is not None:
        atomic_write(args.out, lambda handle: handle.write(json.dumps(result, indent=2, ensure_ascii=False).encode()))
    if args.predictions is not None:
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        atomic_write(args.predictions, lambda handle: handle.write(lines.encode()))
    print(score_card(result))
    return 0


if __name__ == "__main__":
    run_cli(main)
