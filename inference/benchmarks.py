"""Standard VLM benchmarks read offline from their Hugging Face parquet files: one reader per benchmark, the
lmms-eval prompts and answer parsing, and the official metrics.

Every reader turns rows into `Question`s (the prompt text without the image, the answer as a label, the labels
a likelihood scorer chooses among) plus a table of unique images keyed by the hash of their bytes, so CLIP runs
once per image. Metrics are computed from per-question records (`id`, `category`, `answer`, `parsed`,
`correct`, ...), the same records PRED.jsonl holds, so RESULT.json can be recomputed from PRED.jsonl.

Facts from EvolvingLMMs-Lab/lmms-eval `lmms_eval/tasks/{pope,mme,mmstar,mmbench,scienceqa}`:
- POPE: question + "\\nAnswer the question using a single word or phrase."; a prediction is right when the
  lower-cased, stripped answer equals the label ("yes"/"no"); precision/recall/F1 with "yes" positive.
- MME: " Please answer yes or no." replaced by the POPE suffix; answers parsed as Otter's `parse_pred_ans`;
  per subtask the mean over images of acc (0/50/100) + acc+ (100 when both questions are right).
- MMStar: question + "\\nAnswer with the option's letter from the given choices directly"; the first letter
  (or "(X", "option X", "the answer is X") must be the answer; mean over the l2 categories.
- MMBench: "{hint} {question} {options}" + "\\n" + "\\nAnswer with the option's letter ..." (the CN post-prompt
  in Chinese); letters parsed by `can_infer` (option letter, then option text). lmms-eval asks GPT when that
  fails; offline an unparsed answer counts as wrong. Circular: a question scores only if all its copies do.
- ScienceQA-IMG: "Context: {hint}\\n" (if any) + question + "\\nA. ..." + "\\nAnswer with the option's letter
  from the given choices directly."; right when the answer is the letter or starts with "X.".
"""
import hashlib
import random
import string
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from common import UserError
from dataset.processing import SHORT_ANSWER_SUFFIX

BENCHMARKS = ("pope", "mme", "mmstar", "mmbench_en", "mmbench_cn", "scienceqa_img")
YES, NO = "yes", "no"
YES_NO = (YES, NO)
# What a likelihood scorer accepts as saying each label (the log-probabilities of the forms are summed).
LABEL_FORMS = {YES: ("Yes", "yes"), NO: ("No", "no")}
LETTER_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
MMSTAR_SUFFIX = "\nAnswer with the option's letter from the given choices directly"  # no final period there
MME_YES_NO_REQUEST = " Please answer yes or no."
MMBENCH_OPTIONS_INTRO = {"mmbench_en": "There are several options:", "mmbench_cn": "有如下几个选项："}
MMBENCH_POST_PROMPT = {"mmbench_en": LETTER_SUFFIX, "mmbench_cn": "\n请直接使用所提供的选项字母作为答案回答。"}
MMBENCH_LETTERS = "ABCD"  # the parquet's option columns
MMBENCH_PARSE_LETTERS = "ABCDE"  # lmms-eval's can_infer_option looks for five
MMBENCH_CIRCULAR_MODULUS = 1_000_000  # rows whose index agrees modulo this are shifted copies of one question
MMSTAR_LETTERS = "ABCD"  # every MMStar question has four options, written inline
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_FULL_MARKS = 100.0  # acc and acc+ are each out of 100
OTHER = "other"  # a generated answer that names no label
REQUIRED_COLUMNS = {
    "pope": ("question_id", "question", "answer", "image", "category"),
    "mme": ("question_id", "question", "answer", "image", "category"),
    "mmstar": ("index", "question", "answer", "image", "category", "l2_category"),
    "mmbench_en": ("index", "question", "hint", "answer", "category", "image", *MMBENCH_LETTERS),
    "mmbench_cn": ("index", "question", "hint", "answer", "category", "image", *MMBENCH_LETTERS),
    "scienceqa_img": ("question", "choices", "answer", "hint", "image"),
}
OPTIONAL_COLUMNS = {"scienceqa_img": ("category",)}  # read when the file has them


class BenchmarkDataError(UserError):
    """A benchmark file that does not have the expected columns or values."""


@dataclass
class Question:
    """One benchmark question, ready to be asked: `text` is the full lmms-eval prompt without the image."""
    id: str
    text: str
    image: str  # key into the image table (sha1 of the image bytes)
    answer: str  # a label: "yes"/"no" or an option letter
    labels: tuple  # the labels a likelihood scorer chooses among
    category: str
    group: str  # MME: the image; MMBench: the circular group; otherwise the question itself
    l2_category: str = None
    choices: dict = field(default_factory=dict)  # MMBench: letter -> option text (for parsing by text)


# --------------------------------------------------------------------------------------------------- reading

def parquet_files(data_path) -> list:
    """A parquet file, or every *.parquet under a folder (sorted, so shards keep their order)."""
    path = Path(data_path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if files:
            return files
        raise FileNotFoundError(f"no .parquet files under {path}")
    raise FileNotFoundError(f"benchmark data not found: {path} (fetch it with `python -m scripts.download "
                            f"--what bench_...`, or pass --data_path FILE_OR_DIR)")


def iter_rows(files, columns, optional_columns=()):
    """Rows as dicts, batch by batch (a full POPE shard never sits in memory as Python objects at once)."""
    import pyarrow.parquet as pq

    for path in files:
        parquet = pq.ParquetFile(path)
        names = set(parquet.schema_arrow.names)
        missing = [c for c in columns if c not in names]
        if missing:
            raise BenchmarkDataError(f"{path}: missing column(s) {missing}; has {sorted(names)} (is --bench right?)")
        wanted = list(columns) + [c for c in optional_columns if c in names]
        row_number = 0
        for batch in parquet.iter_batches(columns=wanted, batch_size=256):
            for row in batch.to_pylist():
                yield path, row_number, row
                row_number += 1


def image_bytes(cell, where: str) -> bytes:
    """The bytes of an image cell stored as struct<bytes: binary, path: string>."""
    data = cell.get("bytes") if isinstance(cell, dict) else None
    if not data:
        raise BenchmarkDataError(f"{where}: the image cell has no bytes (expected struct<bytes, path>)")
    return data


def is_missing(value) -> bool:
    """pandas-style missing: None, NaN, or the string "nan" lmms-eval also skips."""
    return value is None or (isinstance(value, float) and value != value) or value == "nan"


def yes_no_label(answer, where: str) -> str:
    label = str(answer).lower().strip().replace(".", "")
    if label not in YES_NO:
        raise BenchmarkDataError(f"{where}: answer {answer!r} is not yes/no")
    return label


def pope_question(row, where):
    text = row["question"].strip() + SHORT_ANSWER_SUFFIX
    return dict(id=str(row["question_id"]), text=text, answer=yes_no_label(row["answer"], where), labels=YES_NO,
                category=str(row["category"]), group=str(row["question_id"]))


def mme_question(row, where):
    text = row["question"].strip().replace(MME_YES_NO_REQUEST, "") + SHORT_ANSWER_SUFFIX
    return dict(id=None, text=text, answer=yes_no_label(row["answer"], where), labels=YES_NO,
                category=str(row["category"]), group=str(row["question_id"]))


def letter_answer(answer, letters, where) -> str:
    label = str(answer).strip()
    if label not in letters:
        raise BenchmarkDataError(f"{where}: answer {answer!r} is not one of the options {list(letters)}")
    return label


def mmstar_question(row, where):
    text = row["question"].strip().replace(MME_YES_NO_REQUEST, "") + MMSTAR_SUFFIX
    return dict(id=str(row["index"]), text=text, answer=letter_answer(row["answer"], MMSTAR_LETTERS, where),
                labels=tuple(MMSTAR_LETTERS), category=str(row["category"]), group=str(row["index"]),
                l2_category=str(row["l2_category"]))


def mmbench_question(bench):
    def make(row, where):
        choices = {letter: str(row[letter]) for letter in MMBENCH_LETTERS
                   if not is_missing(row[letter]) and row[letter] != ""}
        options = MMBENCH_OPTIONS_INTRO[bench] + "\n" + "\n".join(f"{k}. {v}" for k, v in choices.items())
        hint = row["hint"]
        query = f"{row['question']} {options}" if is_missing(hint) else f"{hint} {row['question']} {options}"
        index = int(row["index"])
        return dict(id=str(index), text=f"{query}\n{MMBENCH_POST_PROMPT[bench]}",
                    answer=letter_answer(row["answer"], tuple(choices), where), labels=tuple(choices),
                    category=str(row["category"]), group=str(index % MMBENCH_CIRCULAR_MODULUS), choices=choices)
    return make


def scienceqa_question(row, where):
    choices = list(row["choices"])
    letters = string.ascii_uppercase[:len(choices)]
    answer = int(row["answer"])
    if not 0 <= answer < len(choices):
        raise BenchmarkDataError(f"{where}: answer index {answer} but {len(choices)} choices")
    context = f"Context: {row['hint']}\n" if row["hint"] else ""
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters, choices))
    return dict(id=None, text=f"{context}{row['question']}\n{options}{LETTER_SUFFIX}", answer=letters[answer],
                labels=tuple(letters), category=str(row.get("category") or "all"), group=None)


QUESTION_MAKERS = {"pope": pope_question, "mme": mme_question, "mmstar": mmstar_question,
                   "mmbench_en": mmbench_question("mmbench_en"), "mmbench_cn": mmbench_question("mmbench_cn"),
                   "scienceqa_img": scienceqa_question}


def read_benchmark(bench: str, data_path):
    """(questions, images {sha1: bytes}) from a benchmark's parquet file(s); every image stored once."""
    make = QUESTION_MAKERS[bench]
    columns = REQUIRED_COLUMNS[bench]
    questions, images = [], {}
    rows = iter_rows(parquet_files(data_path), columns, OPTIONAL_COLUMNS.get(bench, ()))
    for number, (path, row_number, row) in enumerate(rows):
        where = f"{path.name} row {row_number}"
        blob = image_bytes(row["image"], where)
        key = hashlib.sha1(blob).hexdigest()
        images.setdefault(key, blob)
        fields = make(row, where)
        fields["id"] = fields["id"] if fields["id"] is not None else str(number)
        fields["group"] = fields["group"] if fields["group"] is not None else fields["id"]
        questions.append(Question(image=key, **fields))
    if not questions:
        raise BenchmarkDataError(f"{data_path}: no rows")
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        raise BenchmarkDataError(f"{data_path}: question ids repeat (a shard given twice?)")
    return questions, images


def sample_questions(questions, limit: int, seed: int):
    """A fixed-seed sample of about `limit` questions, whole groups at a time (MME image pairs and MMBench
    circular copies stay together), in file order."""
    if limit is None or limit >= len(questions):
        return questions
    by_group = defaultdict(list)
    for position, question in enumerate(questions):
        by_group[question.group].append(position)
    groups = list(by_group)
    random.Random(seed).shuffle(groups)
    kept = []
    for group in groups:
        if len(kept) >= limit:
            break
        kept.extend(by_group[group])
    return [questions[position] for position in sorted(kept)]


# --------------------------------------------------------------------------------------------------- parsing

def parse_pope(text: str, question: Question) -> str:
    return text.lower().strip()  # lmms-eval compares the whole answer with the label


def parse_mme(text: str, question: Question) -> str:
    """Otter's parse_pred_ans: exact yes/no, a single y/n, or yes/no within the first four characters."""
    answer = text.lower().strip().replace(".", "")
    if answer in YES_NO:
        return answer
    if len(answer) == 1:
        return {"y": YES, "n": NO}.get(answer, OTHER)
    prefix = answer[:4]
    return YES if YES in prefix else NO if NO in prefix else OTHER


def parse_mmstar(text: str, question: Question) -> str:
    """MMStar's exact_match, returning the letter it accepts (upper-cased) or "other"."""
    answer = text.lower().strip().replace("\n", " ")
    for prefix in ("(", "option ", "the answer is "):
        if answer.startswith(prefix) and len(answer) > len(prefix):
            return answer[len(prefix)].upper()
    return answer[0].upper() if answer else OTHER


def parse_mmbench(text: str, question: Question) -> str:
    """lmms-eval's can_infer: a lone option letter (bare or wrapped in punctuation), else a unique option text."""
    letters = MMBENCH_PARSE_LETTERS
    words = [word.strip() for word in text.strip().split()]

    def count(prefix="", suffix=""):
        return sum(prefix + letter + suffix in words for letter in letters)

    if count() == 1 and not ("A" in words and len(words) > 3):  # a lone "A" in a sentence may be the article
        return next(letter for letter in letters if letter in words)
    for prefix, suffix in (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
                           (":", ""), (":", ","), (":", "."), (":", ")"), (":", ").")):
        if count(prefix, suffix) == 1:
            return next(letter for letter in letters if prefix + letter + suffix in words)
    lowered = text.lower()
    named = [letter for letter, choice in question.choices.items() if choice.lower() in lowered]
    return named[0] if len(named) == 1 else OTHER


def parse_scienceqa(text: str, question: Question) -> str:
    """The letter alone, or "X. ..." (LLaVA's rule, kept by lmms-eval); whitespace around the answer stripped."""
    answer = text.strip()
    if answer in question.labels:
        return answer
    if len(answer) >= 2 and answer[0].isupper() and answer[1] == ".":
        return answer[0]
    return OTHER


PARSERS = {"pope": parse_pope, "mme": parse_mme, "mmstar": parse_mmstar, "mmbench_en": parse_mmbench,
           "mmbench_cn": parse_mmbench, "scienceqa_img": parse_scienceqa}


# --------------------------------------------------------------------------------------------------- metrics
# Each takes per-question records with "answer", "parsed", "correct", "category", "group" (and "l2_category").

def ratio(numerator, denominator) -> float:
    return numerator / denominator if denominator else 0.0


def pope_block(records) -> dict:
    """accuracy, precision, recall, F1 ("yes" positive) and yes_ratio: the share of *predictions* that are "yes"
    (lmms-eval's pope_yes_ratio counts the labels instead)."""
    true_pos = sum(r["answer"] == YES and r["parsed"] == YES for r in records)
    false_pos = sum(r["answer"] == NO and r["parsed"] == YES for r in records)
    false_neg = sum(r["answer"] == YES and r["parsed"] == NO for r in records)
    precision, recall = ratio(true_pos, true_pos + false_pos), ratio(true_pos, true_pos + false_neg)
    return {"accuracy": ratio(sum(r["correct"] for r in records), len(records)), "precision": precision,
            "recall": recall, "f1": ratio(2 * precision * recall, precision + recall),
            "yes_ratio": ratio(sum(r["parsed"] == YES for r in records), len(records))}


def by_key(records, key) -> dict:
    grouped = defaultdict(list)
    for record in records:
        grouped[record[key]].append(record)
    return dict(sorted(grouped.items()))


def pope_metrics(records) -> dict:
    metrics = pope_block(records)
    metrics["category"] = {name: pope_block(rows) for name, rows in by_key(records, "category").items()}
    return metrics


def mme_metrics(records) -> dict:
    """Per subtask: mean over images of acc + acc+ (out of 200); perception and cognition: sums over subtasks."""
    subtasks = {}
    for category, rows in by_key(records, "category").items():
        per_image = by_key(rows, "group").values()
        scores = [MME_FULL_MARKS * sum(r["correct"] for r in pair) / len(pair)
                  + MME_FULL_MARKS * all(r["correct"] for r in pair) for pair in per_image]
        subtasks[category] = sum(scores) / len(scores)
    return {"perception": sum(v for k, v in subtasks.items() if k in MME_PERCEPTION),
            "cognition": sum(v for k, v in subtasks.items() if k in MME_COGNITION), "subtask": subtasks}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def mmstar_metrics(records) -> dict:
    """average: unweighted mean over l2 categories; each category: the mean over its own l2 categories."""
    l2_scores = {name: mean(r["correct"] for r in rows) for name, rows in by_key(records, "l2_category").items()}
    categories = {name: mean(l2_scores[l2] for l2 in sorted({r["l2_category"] for r in rows}))
                  for name, rows in by_key(records, "category").items()}
    return {"average": mean(l2_scores.values()), "category": categories, "l2_category": l2_scores}


def mmbench_metrics(records) -> dict:
    """Circular: a question (all rows of one group) is a hit only when every copy is right; the category is
    that of the main copy (the lowest index, under 1,000,000)."""
    groups = list(by_key(records, "group").values())
    hits = [(min(rows, key=lambda r: int(r["id"]))["category"], all(r["correct"] for r in rows)) for rows in groups]
    categories = defaultdict(list)
    for category, hit in hits:
        categories[category].append(hit)
    return {"overall": mean(hit for _, hit in hits),
            "category": {name: mean(values) for name, values in sorted(categories.items())}}


def scienceqa_metrics(records) -> dict:
    return {"accuracy": mean(r["correct"] for r in records)}


METRICS = {"pope": pope_metrics, "mme": mme_metrics, "mmstar": mmstar_metrics, "mmbench_en": mmbench_metrics,
           "mmbench_cn": mmbench_metrics, "scienceqa_img": scienceqa_metrics}
# The numbers a score card shows (RESULT.json keeps everything).
HEADLINE = {"pope": ("accuracy", "f1"), "mme": ("perception", "cognition"), "mmstar": ("average",),
            "mmbench_en": ("overall",), "mmbench_cn": ("overall",), "scienceqa_img": ("accuracy",)}


def chance_levels(bench: str, questions) -> dict:
    """What guessing uniformly among the labels scores on these questions, for the headline metrics."""
    if bench == "pope":
        # A fair coin: precision = share of "yes" labels (s), recall = 1/2, so F1 = 2 s (1/2) / (s + 1/2).
        share = mean(q.answer == YES for q in questions)
        return {"accuracy": 0.5, "f1": ratio(share, share + 0.5)}
    if bench == "mme":
        # Per image pair: expected acc 50, acc+ 25.
        pair_score = MME_FULL_MARKS / 2 + MME_FULL_MARKS / 4
        present = {q.category for q in questions}
        return {"perception": pair_score * len(present & set(MME_PERCEPTION)),
                "cognition": pair_score * len(present & set(MME_COGNITION))}
    if bench in ("mmbench_en", "mmbench_cn"):
        groups = by_key([{"group": q.group, "n": len(q.labels)} for q in questions], "group").values()
        return {"overall": mean(mean(1 / r["n"] for r in rows) ** len(rows) for rows in groups)}
    key = HEADLINE[bench][0]
    return {key: mean(1 / len(q.labels) for q in questions)}

