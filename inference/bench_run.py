"""A benchmark run end to end: questions -> answers in each mode (with and without the image) -> per-question
records (PRED.jsonl) -> metrics (RESULT.json) -> a markdown score card; and two RESULT.json side by side.

Mode keys in PRED.jsonl: "generate", "likelihood", and "generate_blind" / "likelihood_blind" for the same
prompts without the image.
"""
import json
import time

from .benchmarks import HEADLINE, LABEL_FORMS, METRICS, PARSERS, chance_levels
from .prefix_scoring import BLIND, WITH_IMAGE, PrefixScorer

MODES = ("generate", "likelihood")
BENCH_MAX_NEW_TOKENS = 16  # the parsers read the first word or letter; lmms-eval's MME/ScienceQA use 16 too
RECORD_FIELDS = ("id", "category", "l2_category", "group", "answer")


def mode_key(mode: str, variant: str) -> str:
    return mode if variant == WITH_IMAGE else f"{mode}_{BLIND}"


def run_benchmark(bench, loaded, questions, images, modes=MODES, blind=True, batch_size=32,
                  max_new_tokens=BENCH_MAX_NEW_TOKENS, share_prefix=True, progress=True):
    """Score every question; returns (PRED records, seconds)."""
    started = time.perf_counter()
    scorer = PrefixScorer(loaded, batch_size, max_new_tokens, generate="generate" in modes,
                          likelihood="likelihood" in modes, share_prefix=share_prefix)
    # The spellings a likelihood scorer adds up for each label: Yes/yes, No/no, or the option letter.
    answers = scorer.score(questions, images,
                           lambda question: {label: LABEL_FORMS.get(label, (label,)) for label in question.labels},
                           blind, progress)
    records = prediction_records(bench, questions, answers, modes, blind)
    return records, time.perf_counter() - started


def prediction_records(bench, questions, answers, modes, blind) -> list:
    """One PRED.jsonl record per question: what each mode predicted, the label it was parsed to, and whether
    that is the answer (likelihood records also keep the label log-probabilities)."""
    parse = PARSERS[bench]
    variants = (WITH_IMAGE, BLIND) if blind else (WITH_IMAGE,)
    records = []
    for index, question in enumerate(questions):
        record = {name: getattr(question, name) for name in RECORD_FIELDS if getattr(question, name) is not None}
        record.update(prediction={}, parsed={}, correct={})
        for mode in modes:
            for variant in variants:
                key = mode_key(mode, variant)
                answer = answers[(index, variant)]
                if mode == "generate":
                    prediction, parsed = answer.text, parse(answer.text, question)
                else:
                    parsed = prediction = max(answer.label_scores, key=answer.label_scores.get)
                    record.setdefault("label_logprobs", {})[key] = answer.label_scores
                record["prediction"][key] = prediction
                record["parsed"][key] = parsed
                record["correct"][key] = parsed == question.answer
        records.append(record)
    return records


def metrics_for(bench: str, records, key: str) -> dict:
    """The benchmark's metrics for one mode key, from PRED records (as written to, or read from, PRED.jsonl)."""
    flat = [{name: record.get(name) for name in RECORD_FIELDS} | {"parsed": record["parsed"][key],
                                                                  "correct": record["correct"][key]}
            for record in records]
    return METRICS[bench](flat)


def build_result(bench, records, questions, modes, blind, checkpoint, seconds) -> dict:
    result_modes = {}
    for mode in modes:
        result_modes[mode] = {"metrics": metrics_for(bench, records, mode_key(mode, WITH_IMAGE)),
                              "blind": metrics_for(bench, records, mode_key(mode, BLIND)) if blind else None}
    return {"bench": bench, "samples": len(records), "modes": result_modes, "chance": chance_levels(bench, questions),
            "checkpoint": str(checkpoint), "seconds": round(seconds, 2)}


def recompute_result(result: dict, records) -> dict:
    """RESULT.json's "modes" recomputed from PRED.jsonl records (must equal the file's)."""
    return {mode: {"metrics": metrics_for(result["bench"], records, mode_key(mode, WITH_IMAGE)),
                   "blind": metrics_for(result["bench"], records, mode_key(mode, BLIND))
                   if entry["blind"] is not None else None}
            for mode, entry in result["modes"].items()}


def read_predictions(path) -> list:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def format_value(bench: str, value) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if bench == "mme" else f"{100 * value:.1f}%"  # MME: points (out of 200 per subtask)


def card_rows(result: dict):
    """(benchmark, mode, metric, with image, blind, chance) per headline metric of each mode."""
    bench = result["bench"]
    for mode, entry in result["modes"].items():
        for metric in HEADLINE[bench]:
            blind = entry["blind"][metric] if entry["blind"] is not None else None
            yield (bench, mode, metric, format_value(bench, entry["metrics"][metric]), format_value(bench, blind),
                   format_value(bench, result["chance"].get(metric)))


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def score_card(result: dict) -> str:
    title = (f"**{result['bench']}**: {result['samples']} questions, {result['checkpoint']}, "
             f"{result['seconds']:.0f} s")
    table = markdown_table(("benchmark", "mode", "metric", "with image", "blind (no image)", "chance"),
                           card_rows(result))
    return f"{title}\n\n{table}"


def compare_cards(result_a: dict, result_b: dict, name_a: str = "A", name_b: str = "B") -> str:
    """Two RESULT.json side by side, row by row of their headline metrics (a row only one has shows "-")."""
    rows_a = {row[:3]: row[3:] for row in card_rows(result_a)}
    rows_b = {row[:3]: row[3:] for row in card_rows(result_b)}
    rows = []
    for key in list(rows_a) + [k for k in rows_b if k not in rows_a]:
        a, b = rows_a.get(key, ("-", "-", None)), rows_b.get(key, ("-", "-", None))
        rows.append((*key, a[0], a[1], b[0], b[1], a[2] if a[2] is not None else b[2]))
    header = ("benchmark", "mode", "metric", f"{name_a} image", f"{name_a} blind", f"{name_b} image",
              f"{name_b} blind", "chance")
    legend = (f"A = {result_a['checkpoint']} ({result_a['samples']} questions), "
              f"B = {result_b['checkpoint']} ({result_b['samples']} questions)")
    return f"{legend}\n\n{markdown_table(header, rows)}"
