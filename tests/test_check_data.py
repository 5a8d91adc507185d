"""scripts/check_data.py and the trainers' start-up check on a dataset with exactly one of each defect.

Both must name the same records for the same reasons; only check_data.py decodes every image up front (the
trainers replace an undecodable image by the next sample when they load it, and count it).
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from dataset.prepared import prepare_dataset
from dataset.records import DataError
from model.model_vlm import VLMConfig
from scripts import check_data

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_SEQ_LEN = 300  # a good sample is about 230 tokens; FILLER alone is about 300
FILLER = "The cat sees a red ball in the garden. " * 30
ANSWER = "A red circle on a light background."

# (what the line holds, expected reason or None): the JSONL dataset, line by line.
JSONL_LINES = [
    ("good", None),
    ("bad_json", "invalid JSON"),
    ("good", None),
    ("no_conversations", "'conversations' must be a non-empty list of turns"),
    ("unknown_image", "image file 'nope.jpg' not found"),
    ("truncated_jpeg", "image does not decode: broken.jpg: not a readable image"),
    ("two_markers_one_image", "2 <image> marker(s) but 1 image(s)"),
    ("image_cut", "an image does not fit at max_seq_len 300"),
    ("answer_cut", "the answer is cut entirely at max_seq_len 300"),
    ("good", None),
]
# The parquet dataset, row by row (images inline, so no "file not found" kind).
PARQUET_ROWS = [
    ("good", None),
    ("bad_json", "'conversations': invalid JSON"),
    ("no_conversations", "'conversations' must be a non-empty list of turns"),
    ("not_an_image", "image does not decode: image_bytes[0]: not a readable image"),
    ("two_markers_one_image", "2 <image> marker(s) but 1 image(s)"),
    ("image_cut", "an image does not fit at max_seq_len 300"),
    ("answer_cut", "the answer is cut entirely at max_seq_len 300"),
    ("good", None),
]
DECODE_KINDS = {"truncated_jpeg", "not_an_image"}  # found by decoding only
CUT_KINDS = {"image_cut", "answer_cut"}  # left out, not errors


def turns(question):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": ANSWER}]


QUESTIONS = {
    "good": "Describe the picture.\n<image>",
    "truncated_jpeg": "What is this?\n<image>",
    "not_an_image": "What is this?\n<image>",
    "two_markers_one_image": "<image>\nCompare it with <image>.",
    "image_cut": FILLER + "<image>",
    "answer_cut": "<image>\n" + FILLER,
}


def jsonl_line(kind, index):
    image = {"unknown_image": "nope.jpg", "truncated_jpeg": "broken.jpg"}.get(kind, f"{index % 3:06d}.jpg")
    if kind == "bad_json":
        return '{"conversations": [{"role": "user", "content": "unterminated'
    if kind == "no_conversations":
        return json.dumps({"image": image})
    return json.dumps({"conversations": turns(QUESTIONS.get(kind, QUESTIONS["good"])), "image": image})


@pytest.fixture(scope="module")
def defect_data(tmp_path_factory, shapes_data, tiny_tokenizer_dir, tiny_clip_dir):
    out = tmp_path_factory.mktemp("defects")
    images = out / "images"
    images.mkdir()
    good_jpegs = []
    for index in range(3):
        name = f"{index:06d}.jpg"
        shutil.copy(shapes_data["pretrain_images"] / name, images / name)
        good_jpegs.append((images / name).read_bytes())
    (images / "broken.jpg").write_bytes(good_jpegs[0][:len(good_jpegs[0]) // 2])  # a truncated JPEG
    jsonl = out / "data.jsonl"
    jsonl.write_text("".join(jsonl_line(kind, i) + "\n" for i, (kind, _) in enumerate(JSONL_LINES)))

    conversations, blobs = [], []
    for index, (kind, _) in enumerate(PARQUET_ROWS):
        conversations.append({"bad_json": "[{\"role\": \"user\"", "no_conversations": None}.get(
            kind, json.dumps(turns(QUESTIONS.get(kind, QUESTIONS["good"])))))
        blobs.append(b"this is not an image" if kind == "not_an_image" else good_jpegs[index % 3])
    parquet = out / "data.parquet"
    pq.write_table(pa.table({"conversations": pa.array(conversations, pa.string()),
                             "image_bytes": pa.array(blobs, pa.binary())}), parquet)
    return {"jsonl": jsonl, "images": images, "parquet": parquet, "tokenizer": tiny_tokenizer_dir,
            "clip": tiny_clip_dir, "dir": out}


def expected(rows, origin_format, kinds):
    """origin -> reason for the rows of the given kinds (lines count from 1, parquet rows from 0)."""
    first = 1 if "{line}" in origin_format else 0
    return {origin_format.format(line=n, row=n): reason for n, (kind, reason) in enumerate(rows, start=first)
            if kind in kinds}


def jsonl_expected(kinds):
    return expected(JSONL_LINES, "data.jsonl:{line}", kinds)


def parquet_expected(kinds):
    return expected(PARQUET_ROWS, "data.parquet:row {row}", kinds)


JSONL_ERRORS = {kind for kind, reason in JSONL_LINES if reason} - CUT_KINDS
PARQUET_ERRORS = {kind for kind, reason in PARQUET_ROWS if reason} - CUT_KINDS


def assert_reasons(found, wanted):
    assert set(found) == set(wanted), f"found {sorted(found)}, wanted {sorted(wanted)}"
    for origin, reason in wanted.items():
        assert reason in found[origin], f"{origin}: {found[origin]!r} does not say {reason!r}"


def check_args(data, data_path):
    return [str(data_path), "--images_path", str(data["images"]), "--tokenizer_path", str(data["tokenizer"]),
            "--max_seq_len", str(MAX_SEQ_LEN), "--workers", "2"]


def train_command(data, *extra):
    return [sys.executable, str(REPO_ROOT / "train_pretrain_vlm.py"), "--device", "cpu", "--hidden_size", "64",
            "--num_hidden_layers", "2", "--from_weight", "none", "--num_workers", "0", "--max_steps", "1",
            "--data_path", str(data["jsonl"]), "--images_path", str(data["images"]),
            "--vision_model_path", str(data["clip"]), "--tokenizer_path", str(data["tokenizer"]),
            "--save_dir", str(data["dir"] / "out"), "--checkpoint_dir", str(data["dir"] / "ckpt"),
            "--max_seq_len", str(MAX_SEQ_LEN), *extra]


class Launched:
    """A command started now, its result collected when a test asks for it."""

    def __init__(self, command):
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
                                        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        self.completed = None

    def result(self):
        if self.completed is None:
            out, err = self.process.communicate(timeout=300)
            self.completed = subprocess.CompletedProcess(self.process.args, self.process.returncode, out, err)
        return self.completed


@pytest.fixture(scope="module")
def launched(defect_data):
    """The three real processes of this module, started side by side (each pays the torch import)."""
    runs = {
        "check_data": Launched([sys.executable, "-m", "scripts.check_data",
                                *check_args(defect_data, defect_data["jsonl"])]),
        "train": Launched(train_command(defect_data)),
        # Batch = every usable sample, so the one step loads the undecodable image too.
        "train_skipping": Launched(train_command(defect_data, "--skip_bad_samples", "--batch_size", "4")),
    }
    yield runs
    for run in runs.values():
        if run.completed is None:
            run.process.kill()
            run.process.communicate()


# ----------------------------------------------------------------------------------------------- check_data.py

def test_check_data_reports_each_jsonl_defect_exactly(launched):
    result = launched["check_data"].result()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    errors = parse_listing(result.stdout, "errors")
    cut = parse_listing(result.stdout, f"left out at max_seq_len {MAX_SEQ_LEN}")
    assert_reasons(errors, jsonl_expected(JSONL_ERRORS))
    assert_reasons(cut, jsonl_expected(CUT_KINDS))
    # The errors come in file order; progress with a rate and an ETA went to stderr.
    assert list(errors) == sorted(errors, key=lambda origin: int(origin.rsplit(":", 1)[1]))
    assert re.search(r"images: 100%.*\| 6/6 \[[\d:]+<[\d:]+, +[\d.]+img/s\]", result.stderr)  # tqdm: rate, ETA
    summary = summary_rows(result.stdout)
    assert summary["records"] == "10" and summary["malformed (training refuses them, or skips them)"] == "4"
    assert summary["image does not decode (trained on another sample)"] == "1"
    assert summary["image cut at max_seq_len (left out)"] == "1"
    assert summary["answer cut at max_seq_len (left out)"] == "1"
    assert summary["usable"] == "3"
    assert "> max_seq_len" in result.stdout  # the histogram marks the lengths past the limit
    assert "FAILED: 5 record(s) with problems" in result.stderr


def test_check_data_reports_each_parquet_defect_exactly(defect_data, capsys):
    assert check_data.main(check_args(defect_data, defect_data["parquet"])) == 1
    out = capsys.readouterr().out
    assert_reasons(parse_listing(out, "errors"), parquet_expected(PARQUET_ERRORS))
    assert_reasons(parse_listing(out, f"left out at max_seq_len {MAX_SEQ_LEN}"), parquet_expected(CUT_KINDS))


def test_check_data_passes_a_clean_dataset(shapes_data, tiny_tokenizer_dir, capsys):
    code = check_data.main([str(shapes_data["sft_multi_parquet"]), "--tokenizer_path", str(tiny_tokenizer_dir),
                            "--stage", "sft"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "max_seq_len 1536" in out and "OK: every record and image can be used" in out
    assert "errors" not in out


def test_check_data_with_the_minimind3v_preset(shapes_data, tiny_minimind3_tokenizer_dir, tiny_siglip_dir,
                                               tiny_tokenizer_dir, capsys):
    data = str(shapes_data["sft_parquet"])
    code = check_data.main([data, "--preset", "minimind-3v", "--tokenizer_path", str(tiny_minimind3_tokenizer_dir),
                            "--vision_model_path", str(tiny_siglip_dir), "--stage", "sft"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "OK: every record and image can be used" in out
    # The MiniMind2 tokenizer has no `<|image_pad|>`: refused in one line that says which tokenizer fits.
    with pytest.raises(DataError, match="MiniMind-3's for minimind-3v"):
        check_data.main([data, "--preset", "minimind-3v", "--tokenizer_path", str(tiny_tokenizer_dir)])


@pytest.mark.parametrize("flags, message", [
    (["missing.jsonl"], "dataset file not found: missing.jsonl"),
    (["{data}", "--tokenizer_path", "no_tokenizer_here"], "tokenizer not found in no_tokenizer_here"),
])
def test_check_data_cannot_run_is_one_line(defect_data, flags, message, capsys, monkeypatch):
    monkeypatch.chdir(defect_data["dir"])
    argv = [flag.format(data=defect_data["parquet"]) for flag in flags]
    with pytest.raises(SystemExit) as exit_info:
        check_data.run_cli(lambda args: sys.exit(check_data.main(args)), argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------- the trainers' start-up

def test_training_refuses_with_the_same_problems(launched):
    result = launched["train"].result()
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    # A slow machine may show the preparation progress bar first; the error starts on a line of its own.
    lines = result.stderr.strip().splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("error: ")):]
    assert lines[0] == "error: data.jsonl: 4 malformed record(s):"
    assert "--skip_bad_samples" in lines[-1]
    # One line per problem: exactly check_data.py's errors, less the undecodable image only decoding finds.
    assert_reasons(parse_problem_lines(lines[1:-1]), jsonl_expected(JSONL_ERRORS - DECODE_KINDS))


def test_training_start_up_on_parquet_lists_the_same_problems(defect_data):
    tokenizer = AutoTokenizer.from_pretrained(defect_data["tokenizer"])
    config = VLMConfig()
    prepared = prepare_dataset(defect_data["parquet"], tokenizer, config.image_special_token, config.image_ids[0],
                               MAX_SEQ_LEN, log=None)
    with pytest.raises(DataError) as error:
        prepared.check(skip_bad_samples=False, log=None)  # what the trainers run at start-up
    lines = str(error.value).splitlines()
    assert lines[0] == "data.parquet: 3 malformed record(s):"
    assert_reasons(parse_problem_lines(lines[1:-1]), parquet_expected(PARQUET_ERRORS - DECODE_KINDS))


def test_skip_bad_samples_trains_and_reports_the_counts(launched):
    result = launched["train_skipping"].result()
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert ("data.jsonl: 4 usable samples of 10; left out: 4 malformed, 1 whose image does not fit max_seq_len, "
            "1 whose answer is cut entirely") in out
    assert_reasons(parse_listing(out, f"left out at max_seq_len {MAX_SEQ_LEN}"), jsonl_expected(CUT_KINDS))
    assert re.search(r"warning: data\.jsonl:6: broken\.jpg: not a readable image .*; using the next sample", out)
    assert ("done: 1 optimizer steps, 0 skipped (non-finite loss or fp16 gradient overflow), 1 samples replaced "
            "(undecodable image)") in out


# ------------------------------------------------------------------------------------------------- parsing

def parse_problem_lines(lines):
    """`  file:line: reason` / `  file:row N: reason` lines -> {origin: reason}."""
    found = {}
    for line in lines:
        match = re.match(r"\s*(\S+?:(?:row )?\d+): (.*)$", line)
        assert match, f"not a problem line: {line!r}"
        found[match.group(1)] = match.group(2)
    return found


def parse_listing(output, title):
    """The problem lines under the heading `title (N):`; their count must match N."""
    lines = output.splitlines()
    heads = [i for i, line in enumerate(lines) if line.startswith(f"{title} (")]
    if not heads:
        return {}
    count = int(re.match(rf"{re.escape(title)} \((\d+)\):", lines[heads[0]]).group(1))
    body = []
    for line in lines[heads[0] + 1:]:
        if not line.startswith("  "):
            break
        body.append(line)
    found = parse_problem_lines(body)
    assert len(found) == count
    return found


def summary_rows(output):
    lines = output.splitlines()
    start = lines.index("summary:")
    rows = {}
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        name, value = re.match(r"\s+(.*?)\s{2,}(\S+)$", line).groups()
        rows[name] = value
    return rows
