"""Check a dataset before training: every record, every image, every token length.

    python -m scripts.check_data dataset/pretrain_i2t.parquet
    python -m scripts.check_data dataset/sft_vlm_data.jsonl --images_path dataset/sft_images --stage sft
    python -m scripts.check_data llava_v1_5_mix665k.json --images_path data/ --stage sft     # LLaVA's layout
    python -m scripts.check_data DATA --tokenizer_path model --max_seq_len 1024 --workers 16

It runs the checks the trainers run at start-up, with the same code and the same prepared cache
(dataset/prepared.py: built here if missing, then reused by training), plus the one they cannot afford up front:
  1. every record parses and has `conversations` with alternating roles; for JSONL and LLaVA JSON, every image
     file exists;
  2. every record has as many `<image>` markers as images (a row with no marker and one tiny placeholder
     image is a text-only sample);
  3. every image decodes and preprocesses (in parallel processes; a trainer finds a broken image only when
     it loads it, and then trains on the next sample instead);
  4. the token length after the chat template: which samples max_seq_len leaves out because an image or
     the whole answer does not fit, and a histogram of the lengths.
Streaming and bounded memory for files of millions of rows: problems are counted per kind and the first
--show examples of each kind listed as `file:line: reason` (parquet: `file:row N: reason`; LLaVA JSON:
`file:record N (id X): reason`); samples left out
at max_seq_len are listed too but are not errors (the trainers skip and count them). Progress with rate and
ETA goes to stderr.

Exit status: 0 when no record has a problem, 1 when some record has one or no sample is usable, 2 when the
check cannot run (a missing file, no tokenizer, ...).
"""
if not __package__:  # started as a file: its folder, not the repo root, is on the import path
    raise SystemExit("run it from the repository root as: python -m scripts.check_data")

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from common import bounded, format_duration, run_cli
from dataset.prepared import (EXAMPLES_PER_KIND, STATUS_CUT_ANSWER, STATUS_CUT_IMAGE, STATUS_OK,
                              prepare_dataset, row_number)
from dataset.processing import (ImageError, chat_template_warning, check_tokenizer_matches, image_processor_for,
                                load_tokenizer)
from dataset.records import KIND_UNDECODABLE, DataError, DataProblem, check_data_path, load_image
from model.model_hf_vlm import language_model_config
from model.model_vlm import DEFAULT_NUM_QUERY_TOKENS, read_encoder_folder
from model.presets import add_preset_flags, apply_preset, vlm_config
from trainer.config import STAGE_DEFAULTS

STAGE_MAX_SEQ_LEN = {stage: defaults["max_seq_len"] for stage, defaults in STAGE_DEFAULTS.items()}
ROWS_PER_TASK = 256  # rows one worker decodes per task: few tasks, smooth progress
HISTOGRAM_BINS = 12
HISTOGRAM_WIDTH = 40  # characters of the longest bar


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="a .jsonl file, a LLaVA-format .json file (both with --images_path) or a .parquet "
                                "file")
    p.add_argument("--images_path", default=None,
                   help="image folder of a .jsonl or LLaVA .json dataset (default: its folder)")
    add_preset_flags(p, with_shape=False)
    p.add_argument("--num_query_tokens", type=bounded(int, 1), default=DEFAULT_NUM_QUERY_TOKENS,
                   help="with --projector qformer: the trainer's --num_query_tokens (the placeholder run of an image)")
    p.add_argument("--tokenizer_path", default=None,
                   help="folder with tokenizer.json (default: the preset's, or --language_model's)")
    p.add_argument("--language_model", default=None, metavar="PATH",
                   help="the transformers causal-LM folder the trainer gets (its tokenizer and chat template)")
    p.add_argument("--vision_model_path", default=None,
                   help="vision encoder folder whose preprocessing the trainer will use (default: the preset's; "
                        "its kind's standard preprocessing where the folder is absent)")
    p.add_argument("--stage", default="pretrain", choices=list(STAGE_MAX_SEQ_LEN),
                   help="whose default --max_seq_len to use ("
                        + ", ".join(f"{stage} {n}" for stage, n in STAGE_MAX_SEQ_LEN.items()) + ")")
    p.add_argument("--max_seq_len", type=bounded(int, 2), default=None,
                   help="tokens per sample, as given to the trainer")
    p.add_argument("--workers", type=bounded(int, 1), default=os.cpu_count() or 1,
                   help="processes preparing the data and decoding images")
    p.add_argument("--prepared_dir", default=None,
                   help="the trainers' --prepared_dir (default: prepared/ beside DATA)")
    p.add_argument("--show", type=bounded(int, 0, EXAMPLES_PER_KIND), default=5,
                   help="examples listed per kind of problem (0: none)")
    p.add_argument("--skip_images", action="store_true", help="leave out step 3 (decoding every image)")
    args = p.parse_args(argv)
    if args.max_seq_len is None:
        args.max_seq_len = STAGE_MAX_SEQ_LEN[args.stage]
    if args.language_model is not None and args.tokenizer_path is None:
        args.tokenizer_path = args.language_model  # an LM folder holds its tokenizer
    return apply_preset(args)


def check_rows(store, image_processor, rows, counts):
    """(rows checked' images, failed rows, their reasons) for one task: every image as the trainers load it."""
    failed, reasons, images = [], [], 0
    for row, count in zip(rows, counts):
        for ref in store.refs(int(row), int(count)):
            images += 1
            try:
                load_image(store, ref, image_processor)
            except ImageError as error:
                failed.append(int(row))
                reasons.append(f"image does not decode: {error}")
                break
    return images, failed, reasons


_STORE = None  # the image store of a pool worker process, set once by its initializer


def _init_worker(store, image_processor):
    global _STORE
    _STORE = (store, image_processor)


def _check_task(task):
    return check_rows(*_STORE, *task)


def check_images(prepared, image_processor, workers):
    """Rows (file order) of the well-formed rows with an image that does not decode, and (row, reason) for the
    first EXAMPLES_PER_KIND of them; decoded in parallel processes."""
    from tqdm import tqdm

    rows = np.flatnonzero(np.isin(np.asarray(prepared.status), [STATUS_OK, STATUS_CUT_IMAGE, STATUS_CUT_ANSWER]))
    counts = np.asarray(prepared.row_images)[rows]
    rows, counts = rows[counts > 0], counts[counts > 0]
    tasks = [(rows[i:i + ROWS_PER_TASK], counts[i:i + ROWS_PER_TASK]) for i in range(0, len(rows), ROWS_PER_TASK)]
    failed_rows, examples = [], []
    with tqdm(total=int(counts.sum()), desc="images", unit="img", mininterval=1.0, dynamic_ncols=True) as bar:
        if workers <= 1 or len(tasks) <= 1:
            results = (check_rows(prepared.images, image_processor, *task) for task in tasks)
            for images, failed, reasons in results:
                failed_rows += failed
                examples += list(zip(failed, reasons))[:EXAMPLES_PER_KIND - len(examples)]
                bar.update(images)
        else:
            import multiprocessing

            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            with multiprocessing.get_context(method).Pool(workers, initializer=_init_worker,
                                                          initargs=(prepared.images, image_processor)) as pool:
                for images, failed, reasons in pool.imap(_check_task, tasks):
                    failed_rows += failed
                    examples += list(zip(failed, reasons))[:EXAMPLES_PER_KIND - len(examples)]
                    bar.update(images)
    return failed_rows, examples


def nice_width(span, bins):
    """Smallest of 1, 2, 5, 10, 20, 50, ... that covers `span` in at most `bins` bins."""
    width, steps = 1, (2, 2.5, 2)  # 1 -> 2 -> 5 -> 10 -> ...
    i = 0
    while width * bins < span:
        width = int(width * steps[i % 3])
        i += 1
    return width


def length_histogram(lengths, max_seq_len, bins=HISTOGRAM_BINS, bar_width=HISTOGRAM_WIDTH):
    """Text bars of the token lengths (an int array) in round bins; the bin holding max_seq_len is split there."""
    lengths = np.asarray(lengths)
    if not len(lengths):
        return ["  (no sample to measure)"]
    low, high = int(lengths.min()), int(lengths.max())
    width = nice_width(high - low + 1, bins)
    edges = list(range(low // width * width, (high // width + 2) * width, width))  # bin i: edges[i] .. edges[i+1]-1
    if edges[0] < max_seq_len + 1 < edges[-1]:
        edges = sorted(set(edges) | {max_seq_len + 1})
    counts = np.bincount(np.searchsorted(edges, lengths, side="right") - 1, minlength=len(edges) - 1)
    peak = int(counts.max())
    label_width = len(str(edges[-1]))
    lines = []
    for start, stop, count in zip(edges, edges[1:], counts.tolist()):
        bar = "#" * round(bar_width * count / peak) or ("." if count else "")
        note = "  > max_seq_len" if start > max_seq_len else ""
        lines.append(f"  {start:>{label_width}}-{stop - 1:<{label_width}} {bar:<{bar_width}} {count}{note}")
    return lines


def table(rows):
    width = max(len(name) for name, _ in rows)
    return [f"  {name:<{width}}  {value}" for name, value in rows]


def listing(title, problems, total, show):
    """`title (total):`, then the examples given (already at most `show` per kind), then how many more."""
    if not total:
        return []
    lines = [f"{title} ({total}):"] + [f"  {p}" for p in problems]
    if total > len(problems):
        lines.append(f"  ... and {total - len(problems)} more (--show {EXAMPLES_PER_KIND} lists up to "
                     f"{EXAMPLES_PER_KIND} of each kind)")
    return lines


def first_per_kind(problems, show):
    """The first `show` problems of each kind, in file order."""
    taken, kept = {}, []
    for problem in problems:
        if taken.get(problem.kind, 0) < show:
            taken[problem.kind] = taken.get(problem.kind, 0) + 1
            kept.append(problem)
    return sorted(kept, key=lambda p: row_number(p.origin))


def checked_tokenizer(tokenizer_path, config):
    """The tokenizer, refused if it does not encode the image placeholder; a differing chat template is noted."""
    tokenizer = load_tokenizer(tokenizer_path)
    try:
        check_tokenizer_matches(tokenizer, config)
    except ValueError as error:
        raise DataError(f"{tokenizer_path}: {error}") from None
    warning = chat_template_warning(tokenizer, config.chat_format)
    if warning:
        print(warning, file=sys.stderr)
    return tokenizer


def problem_report(errors, per_kind, error_total, cut, cut_total, prepared, args) -> list:
    """The report's lines before the summary: examples and counts per kind, samples left out, lengths."""
    report = listing("errors", errors, error_total, args.show)
    if per_kind:
        report.append("errors by kind:")
        report += table(sorted(per_kind.items(), key=lambda item: -item[1]))
    report += listing(f"left out at max_seq_len {args.max_seq_len}", cut, cut_total, args.show)
    lengths = np.asarray(prepared.row_length)
    lengths = lengths[lengths >= 0]
    report.append(f"token lengths after the chat template ({len(lengths)} well-formed samples, "
                  f"max_seq_len {args.max_seq_len}):")
    return report + length_histogram(lengths, args.max_seq_len)


def main(argv=None) -> int:
    args = parse_args(argv)
    check_data_path(Path(args.data))
    if args.language_model is not None:  # the tokenizer gets the placeholder the trainer adds
        tokenizer = load_tokenizer(args.tokenizer_path)
        config = language_model_config(args.language_model, tokenizer, args.vision_model_path, args.vision_encoder,
                                       projector=args.projector, num_query_tokens=args.num_query_tokens)
    else:
        config = vlm_config(args.preset, vision_encoder=args.vision_encoder, projector=args.projector,
                            num_query_tokens=args.num_query_tokens)
        config.image_processing = read_encoder_folder(args.vision_model_path) or config.image_processing
        tokenizer = checked_tokenizer(args.tokenizer_path, config)
    started = time.time()

    # 1, 2 and 4. Records and token lengths: the trainers' prepared data (built now if missing)
    prepared = prepare_dataset(args.data, tokenizer, config.image_special_token, config.image_ids[0],
                               args.max_seq_len, images_path=args.images_path, cache_dir=args.prepared_dir,
                               workers=args.workers, log=lambda message: print(message, file=sys.stderr),
                               chat_format=config.chat_format)
    counts = prepared.manifest
    status, row_images = np.asarray(prepared.status), np.asarray(prepared.row_images)
    well_formed = counts["records"] - counts["malformed"]
    print(f"{prepared.data_path}: {counts['records']} records, {well_formed} well-formed, "
          f"{int(row_images.sum())} images", flush=True)
    # 3. Images, in parallel
    failed_rows, examples = ([], []) if args.skip_images else check_images(prepared, image_processor_for(config),
                                                                           args.workers)
    decode_examples = [DataProblem(prepared.origin(row), reason, KIND_UNDECODABLE) for row, reason in examples]
    malformed_examples, malformed = prepared.problems()
    decode_failed_usable = int((status[np.asarray(failed_rows, dtype=np.int64)] == STATUS_OK).sum())
    errors = first_per_kind(malformed_examples + decode_examples, args.show)
    cut = first_per_kind(prepared.cut(limit=args.show), args.show)
    cut_total = counts["cut_image"] + counts["cut_answer"]
    per_kind = {kind: count for kind, (count, _) in counts["problems"].items()}
    if failed_rows:
        per_kind[KIND_UNDECODABLE] = len(failed_rows)
    usable = counts["usable"] - decode_failed_usable

    report = problem_report(errors, per_kind, malformed + len(failed_rows), cut, cut_total, prepared, args)
    report.append("summary:")
    report += table([
        ("records", counts["records"]),
        ("malformed (training refuses them, or skips them)", malformed),
        ("image does not decode (trained on another sample)", "not checked" if args.skip_images
         else len(failed_rows)),
        ("image cut at max_seq_len (left out)", counts["cut_image"]),
        ("answer cut at max_seq_len (left out)", counts["cut_answer"]),
        ("usable", usable),
        ("text-only among the usable (no image)", counts["text_only"]),
        ("checked in", format_duration(time.time() - started)),
    ])
    print("\n".join(report))
    problem_count = malformed + len(failed_rows)
    if problem_count or not usable:
        reason = f"{problem_count} record(s) with problems" if problem_count else "no usable sample"
        print(f"FAILED: {reason}", file=sys.stderr)
        return 1
    print("OK: every record and image can be used" + (f" ({cut_total} left out at max_seq_len)" if cut_total else ""))
    return 0


if __name__ == "__main__":
    run_cli(lambda argv: sys.exit(main(argv)))
