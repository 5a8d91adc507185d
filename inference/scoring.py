"""Scoring a model on an `eval_questions.jsonl` file (the demo's held-out questions): greedy answers, counted."""
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .generation import GenerationSettings, answer_once
from .loading import DEFAULT_MAX_TOTAL_TOKENS, InferenceError, LoadedModel

SCORING_MAX_NEW_TOKENS = 32  # eval answers are one short sentence


def mentions(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text, flags=re.IGNORECASE) is not None


def is_correct(answer: str, right: str, choices) -> bool:
    """The answer names the right choice and no other choice."""
    return mentions(answer, right) and not any(mentions(answer, c) for c in choices if c != right)


@dataclass
class QuestionScore:
    correct: int = 0
    total: int = 0
    chance: float = 0.0  # expected accuracy of picking a choice at random
    by_kind: dict = field(default_factory=dict)  # kind -> [correct, total]

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def summary(self) -> str:
        kinds = ", ".join(f"{kind} {c}/{t}" for kind, (c, t) in sorted(self.by_kind.items()))
        return (f"accuracy {self.correct}/{self.total} = {self.accuracy:.1%} (chance {self.chance:.1%}; "
                f"{kinds})")


def read_questions(questions_file) -> list:
    questions_file = Path(questions_file)
    if not questions_file.is_file():
        raise FileNotFoundError(f"question file not found: {questions_file}")
    records = []
    for number, line in enumerate(questions_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records.append({key: record[key] for key in ("image", "question", "answer", "choices")} |
                           {"kind": record.get("kind", "all")})
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise InferenceError(f"{questions_file}:{number}: not a question record ({error!r}); expected "
                                 f"image, question, answer, choices") from None
    if not records:
        raise InferenceError(f"{questions_file}: no questions")
    return records


def score_questions(loaded: LoadedModel, questions_file, images_dir=None, max_new_tokens: int = SCORING_MAX_NEW_TOKENS,
                    max_total_tokens: int = DEFAULT_MAX_TOTAL_TOKENS, log=None) -> QuestionScore:
    """Ask every question of an eval_questions.jsonl file about its image (greedy) and count right answers.

    Images are looked up in `images_dir`, by default the eval_images/ folder beside the file. `log(record,
    answer, correct)` sees each answer.
    """
    records = read_questions(questions_file)
    images_dir = Path(images_dir) if images_dir is not None else Path(questions_file).parent / "eval_images"
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0)
    score = QuestionScore()
    for record in records:
        answer, _ = answer_once(loaded, record["question"], [images_dir / record["image"]], settings, max_total_tokens)
        correct = is_correct(answer, record["answer"], record["choices"])
        kind = score.by_kind.setdefault(record["kind"], [0, 0])
        kind[0] += correct
        kind[1] += 1
        score.correct += correct
        score.total += 1
        score.chance += 1 / len(record["choices"]) / len(records)
        if log is not None:
            log(record, answer, correct)
    return score
