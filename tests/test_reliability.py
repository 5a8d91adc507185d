"""Reliability and safety: corrupted input gives only the documented errors, no run loses its work.

(a) property tests (hypothesis): readers, prompt builder and image preprocessing on random/corrupted input;
(b) kill -9 during checkpoint saves; (c) SIGTERM / SIGINT then --from_resume 1, with real processes;
(d) non-finite losses; (e) failed saves; (f) weight files of the wrong shape or with code in them.
"""
import errno
import hashlib
import io
import json
import multiprocessing
import os
import queue
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import AutoTokenizer

import train_pretrain_vlm
from dataset.prepared import RecordView, prepare_dataset
from dataset.records import FORMAT_JSONL, DataError, SampleEncoder, data_format, load_image
from dataset.processing import (ImageError, ROLES_BY_PARITY, build_prompt, count_image_markers,
                                image_processor_for, open_image, preprocess_image)
from model.model_vlm import MiniMindVLM, VLMConfig
from common import run_cli
from common import UserError, atomic_save

REPO_ROOT = Path(__file__).resolve().parents[1]
CLIP_PROCESSOR = image_processor_for(VLMConfig())
PROPERTY_SETTINGS = settings(max_examples=50, deadline=None, database=None,
                             suppress_health_check=[HealthCheck.too_slow])
IMAGE_SPECIAL_TOKEN = VLMConfig().image_special_token
IMAGE_TOKEN_ID = VLMConfig().image_ids[0]
IMAGE_RUN = len(VLMConfig().image_ids)


def png_bytes(size=(8, 6), mode="RGB"):
    buffer = io.BytesIO()
    Image.new(mode, size, "red" if mode == "RGB" else 1).save(buffer, "PNG")
    return buffer.getvalue()


def image_runs(ids):
    """Lengths of the runs of image-placeholder ids."""
    is_image = np.concatenate([[False], np.asarray(ids) == IMAGE_TOKEN_ID, [False]])
    edges = np.flatnonzero(is_image[1:] != is_image[:-1])
    return (edges[1::2] - edges[0::2]).tolist()


# ======================================================================= (a) property tests: record readers

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8)
# Text with everything the pipeline treats specially: markers (whole and split), '@', its twin, newlines.
text_pieces = st.one_of(st.text(max_size=12), st.sampled_from(
    ["<image>", "<image>", "@", "@@", "\uff20", "<", "image", ">", "<im", "age>", "\n", " ", "<|im_end|>"]))
message_text = st.lists(text_pieces, max_size=6).map("".join)
turn = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", ""]),
                              "content": message_text | json_values})
image_field = st.sampled_from(["a.jpg", "a.jpg, a.jpg", "missing.jpg", "", " , ", "../a.jpg", "a" * 300]) | json_values
record_objects = st.fixed_dictionaries({}, optional={"conversations": st.lists(turn, max_size=4) | json_values,
                                                     "image": image_field})


@st.composite
def corrupted(draw, data: bytes):
    """`data` cut short, with bytes flipped, or with random bytes spliced in."""
    if not data:
        return data
    how = draw(st.sampled_from(["cut", "flip", "splice"]))
    at = draw(st.integers(0, len(data) - 1))
    if how == "cut":
        return data[:at]
    if how == "flip":
        return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    return data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]


@st.composite
def jsonl_lines(draw):
    kind = draw(st.sampled_from(["record", "record", "corrupted", "json", "bytes", "blank"]))
    if kind == "bytes":
        return draw(st.binary(max_size=40)).replace(b"\n", b"")
    if kind == "blank":
        return draw(st.sampled_from([b"", b"   ", b"\t", b"\x1c"]))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    line = json.dumps(draw(record_objects), ensure_ascii=draw(st.booleans())).encode()
    return draw(corrupted(line)).replace(b"\n", b"") if kind == "corrupted" else line


def expected_entries(raw_lines):
    """Lines the reader must account for (as a record or a problem): all but the blank ones."""
    count = 0
    for number, raw in enumerate(raw_lines, start=1):
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError:
            count += 1
            continue
        count += bool(text.strip())
    return count


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def prepare(path, tokenizer):
    """The data as training reads it (dataset/prepared.py), built in this process; no sample is cut."""
    return prepare_dataset(path, tokenizer, IMAGE_SPECIAL_TOKEN, IMAGE_TOKEN_ID, 100_000, workers=1, log=None)


def assert_well_formed(prepared, name, entries):
    """Every entry is a usable sample or a counted problem with a reason; each usable sample has one intact
    placeholder run per image (what the reader lets through is what the encoder needs)."""
    counts = prepared.manifest
    assert counts["records"] == entries == counts["usable"] + counts["malformed"]
    problems, malformed = prepared.problems()
    assert malformed == counts["malformed"] == len(problems)  # up to 8 entries: every problem is kept
    assert all(p.reason and p.kind for p in problems)
    records = RecordView(prepared)
    origins = [records[i].origin for i in range(len(records))] + [p.origin for p in problems]
    assert len(set(origins)) == len(origins) and all(o.startswith(f"{name}:") for o in origins)
    for index in range(len(records)):
        assert image_runs(prepared.token_ids(index)) == [IMAGE_RUN] * len(records[index].images)
    return records


@PROPERTY_SETTINGS
@given(lines=st.lists(jsonl_lines(), max_size=8))
def test_jsonl_reader_reports_problems_and_never_raises_anything_else(tiny_tokenizer, lines):
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "a.jpg").write_bytes(png_bytes())
        path = folder / "data.jsonl"
        raw = b"\n".join(lines) + b"\n"
        path.write_bytes(raw)
        # A first line that opens with '[' makes the file a LLaVA array (data_format), whatever its name: the LLaVA
        # reader's own property test covers those.
        assume(data_format(path) == FORMAT_JSONL)
        try:
            prepared = prepare(path, tiny_tokenizer)
        except DataError:
            return
        records = assert_well_formed(prepared, "data.jsonl", expected_entries(raw.split(b"\n")[:-1]))
        for index in range(len(records)):
            assert all(Path(image).is_file() for image in records[index].images)


image_blobs = st.one_of(st.none(), st.binary(max_size=30), st.just(png_bytes()),
                        st.just(png_bytes()).flatmap(corrupted))


@st.composite
def parquet_files(draw):
    rows = draw(st.integers(0, 5))
    conversations = [draw(st.one_of(st.none(), st.text(max_size=20),
                                    st.lists(turn, max_size=3).map(json.dumps),
                                    json_values.map(json.dumps))) for _ in range(rows)]
    if draw(st.booleans()):
        images = pa.array([draw(image_blobs) for _ in range(rows)], pa.binary())
    else:
        images = pa.array([draw(st.none() | st.lists(image_blobs, max_size=2)) for _ in range(rows)],
                          pa.list_(pa.binary()))
    buffer = io.BytesIO()
    pq.write_table(pa.table({"conversations": pa.array(conversations, pa.string()), "image_bytes": images}), buffer)
    data = buffer.getvalue()
    if draw(st.integers(0, 3)) == 0:
        data = draw(st.one_of(corrupted(data), st.binary(max_size=64)))
    return data, rows


@PROPERTY_SETTINGS
@given(parquet=parquet_files())
def test_parquet_reader_and_image_loading_raise_only_documented_errors(tiny_tokenizer, parquet):
    data, rows = parquet
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.parquet"
        path.write_bytes(data)
        try:
            prepared = prepare(path, tiny_tokenizer)
        except DataError:
            return
        records = assert_well_formed(prepared, "data.parquet", pq.ParquetFile(path).metadata.num_rows)
        for index in range(len(records)):
            for ref in records[index].images:
                try:
                    pixels = load_image(prepared.images, ref, CLIP_PROCESSOR)
                except ImageError:
                    continue
                assert pixels.shape == (3, 224, 224) and bool(pixels.isfinite().all())


# ===================================================================== (a) property tests: the prompt builder

@pytest.fixture(scope="module", params=["tiny", "real"])
def any_tokenizer(request, tiny_tokenizer_dir):
    if request.param == "real":
        return AutoTokenizer.from_pretrained(request.getfixturevalue("real_tokenizer_dir"))
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@PROPERTY_SETTINGS
@given(contents=st.lists(message_text, min_size=1, max_size=4), generation_prompt=st.booleans())
def test_prompt_has_one_placeholder_run_per_marker_and_no_stray_placeholder(any_tokenizer, contents,
                                                                              generation_prompt):
    messages = [{"role": ROLES_BY_PARITY[i % 2], "content": text} for i, text in enumerate(contents)]
    prompt = build_prompt(any_tokenizer, messages, IMAGE_SPECIAL_TOKEN, add_generation_prompt=generation_prompt)
    runs = image_runs(any_tokenizer(prompt, add_special_tokens=False).input_ids)
    # Each marker became one run of exactly 196 placeholder ids; a literal '@' never became id 34.
    assert runs == [IMAGE_RUN] * count_image_markers(messages)


@PROPERTY_SETTINGS
@given(contents=st.lists(message_text, min_size=2, max_size=4))
def test_a_record_that_fits_is_never_reported_as_cut(tiny_tokenizer_dir, contents):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    turns = [{"role": ROLES_BY_PARITY[i % 2], "content": text} for i, text in enumerate(contents)]
    encoder = SampleEncoder(tokenizer, IMAGE_SPECIAL_TOKEN, IMAGE_TOKEN_ID, max_seq_len=100_000)
    sample, = encoder.encode_chats([(turns, count_image_markers(turns))])
    assert sample.cut is None and sample.length == len(sample.ids)


# ===================================================================== (a) property tests: image preprocessing

PIL_MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I",
             "F", "I;16", "I;16B", "I;16L", "I;16N"]
IMAGE_FORMATS = [None, "PNG", "TIFF", "BMP", "GIF", "WEBP", "JPEG"]
MAGIC_PREFIXES = [b"", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"\xff\xd8\xff", b"RIFF"]


def assert_clip_input(pixels):
    assert pixels.shape == (3, 224, 224) and pixels.dtype == torch.float32
    assert bool(pixels.isfinite().all())


@PROPERTY_SETTINGS
@given(mode=st.sampled_from(PIL_MODES), width=st.integers(1, 40), height=st.integers(1, 40),
       seed=st.integers(0, 2 ** 32 - 1), image_format=st.sampled_from(IMAGE_FORMATS), data=st.data())
def test_images_of_every_mode_preprocess_or_raise_image_error(mode, width, height, seed, image_format, data):
    image = Image.new(mode, (width, height))
    image.frombytes(random.Random(seed).randbytes(len(image.tobytes())))
    if image_format is not None:
        buffer = io.BytesIO()
        try:
            image.save(buffer, image_format)
        except (OSError, ValueError, KeyError):
            image_format = None  # PIL cannot write this mode in this format: preprocess it from memory
        else:
            encoded = buffer.getvalue()
            if data.draw(st.booleans()):
                encoded = data.draw(corrupted(encoded))
            try:
                image = open_image(encoded)
            except ImageError:
                return
    try:
        pixels = preprocess_image(image, CLIP_PROCESSOR)
    except ImageError:
        return
    assert_clip_input(pixels)


@PROPERTY_SETTINGS
@given(prefix=st.sampled_from(MAGIC_PREFIXES), body=st.binary(max_size=200))
def test_random_bytes_open_or_raise_image_error(prefix, body):
    try:
        pixels = preprocess_image(open_image(prefix + body), CLIP_PROCESSOR)
    except ImageError:
        return
    assert_clip_input(pixels)


def png_header_only(width, height):
    """A PNG that claims width x height pixels and holds no pixel data."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width, height", [(100_000, 100_000), (8_000, 8_000)])
def test_oversized_header_is_refused_before_decoding(width, height, monkeypatch):
    from PIL import ImageFile

    def no_decoding(self):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageError, match="pixel"):
        open_image(png_header_only(width, height))


def test_extreme_aspect_ratio_is_refused_not_resized():
    buffer = io.BytesIO()
    Image.new("L", (1, 60_000)).save(buffer, "PNG")  # resized to 224 wide it would be 13 million pixels tall
    with pytest.raises(ImageError, match="aspect ratio"):
        preprocess_image(open_image(buffer.getvalue()), CLIP_PROCESSOR)


# ================================================================================ (b) kill -9 during saves

# Forks one saver per request (so each starts without paying the imports again); the test SIGKILLs it.
SAVER = r"""
import os, sys, torch
from common import atomic_save
path = sys.argv[1]
for line in sys.stdin:
    while True:  # reap the savers already killed
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
    pid = os.fork()
    if pid == 0:
        step = int(line)
        while True:
            step += 1
            atomic_save({"step": torch.tensor(step), "weights": torch.full((2_000_000,), float(step))}, path)
    print(pid, flush=True)
"""


def check_checkpoint(path):
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert set(state) == {"step", "weights"}
    assert bool((state["weights"] == float(state["step"])).all()), "a checkpoint mixes two saves"
    return int(state["step"])


def test_kill_9_during_saves_always_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "resume.pth"
    atomic_save({"step": torch.tensor(0), "weights": torch.full((2_000_000,), 0.0)}, path)
    saver = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], cwd=REPO_ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    rng = random.Random(0)
    steps, leftovers = [0], 0
    try:
        for round_ in range(1, 7):
            saver.stdin.write(f"{round_ * 1000}\n")
            saver.stdin.flush()
            pid = int(saver.stdout.readline())
            time.sleep(rng.uniform(0.3, 0.9))
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)  # let the kernel finish the kill before looking at the files
            steps.append(check_checkpoint(path))
            leftovers += (tmp_path / ".resume.pth.tmp").exists()
    finally:
        saver.stdin.close()
        saver.wait(timeout=60)
    # Saves went through between kills, and at least one kill hit a save half-way (its .tmp left behind).
    assert len(set(steps)) >= 3, steps
    assert leftovers >= 1
    # The next save is unaffected by a stale .tmp and cleans it up.
    atomic_save({"step": torch.tensor(-1), "weights": torch.full((2_000_000,), -1.0)}, path)
    assert check_checkpoint(path) == -1 and not (tmp_path / ".resume.pth.tmp").exists()


# ======================================================================== training runs: shared pieces

@pytest.fixture(scope="module")
def assets(tiny_tokenizer_dir, tiny_clip_dir, shapes_data):
    return {"tokenizer": tiny_tokenizer_dir, "clip": tiny_clip_dir, "data": shapes_data}


def train_args(assets, run_dir, *extra):
    return ["--device", "cpu", "--hidden_size", "64", "--num_hidden_layers", "2", "--from_weight", "none",
            "--num_workers", "0", "--batch_size", "2", "--log_interval", "1",
            "--data_path", str(assets["data"]["pretrain_jsonl"]),
            "--images_path", str(assets["data"]["pretrain_images"]),
            "--vision_model_path", str(assets["clip"]), "--tokenizer_path", str(assets["tokenizer"]),
            "--save_dir", str(run_dir / "out"), "--checkpoint_dir", str(run_dir / "ckpt"), *extra]


def train_in_process(argv, capsys):
    """train_pretrain_vlm.py's entry point in this process: (exit code, stdout, stderr)."""
    try:
        run_cli(train_pretrain_vlm.main, argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def weights_file(run_dir):
    return run_dir / "out" / "pretrain_vlm_64.pth"


def resume_file(run_dir):
    return run_dir / "ckpt" / "pretrain_vlm_64_resume.pth"


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ================================================================== (c) SIGTERM / SIGINT, then --from_resume 1

class Training:
    """train_pretrain_vlm.py as a real process, its stdout read line by line as it comes."""

    def __init__(self, argv):
        self.process = subprocess.Popen([sys.executable, str(REPO_ROOT / "train_pretrain_vlm.py"), *argv],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines = queue.Queue()
        self.stdout = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, text, timeout=240):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.stdout.append(line)
            if text in line:
                return line
        raise AssertionError(f"{text!r} never logged:\n{''.join(self.stdout)}{self.process.stderr.read()}")

    def finish(self, timeout=240):
        code = self.process.wait(timeout=timeout)
        while (line := self.lines.get(timeout=10)) is not None:
            self.stdout.append(line)
        return code, "".join(self.stdout), self.process.stderr.read()


def test_sigterm_and_sigint_save_and_resume_continues(assets, tmp_path):
    run_dir = tmp_path / "term"
    long_run = ("--epochs", "50", "--max_steps", "200", "--save_interval", "1000")
    # SIGTERM (a scheduler's kill) and SIGINT (Ctrl-C), two runs side by side.
    term = Training(train_args(assets, run_dir, *long_run))
    interrupt = Training(train_args(assets, tmp_path / "int", *long_run))
    term.wait_for(" | loss ")
    term.process.send_signal(signal.SIGTERM)
    interrupt.wait_for(" | loss ")
    interrupt.process.send_signal(signal.SIGINT)
    stopped_at = {}
    for run, code, name, folder in ((term, 143, "SIGTERM", run_dir), (interrupt, 130, "SIGINT", tmp_path / "int")):
        returncode, out, err = run.finish()
        assert returncode == code, out + err
        assert "Traceback" not in err
        message = err.strip().splitlines()[-1]
        assert message.startswith(f"stopped by {name} at step ") and message.endswith(
            "resume with the same command plus --from_resume 1")
        stopped_at[name] = int(message.split(" at step ")[1].split(";")[0])
        assert resume_step(resume_file(folder)) == stopped_at[name]  # the resume checkpoint of that very step
    stopped_at = stopped_at["SIGTERM"]

    # The same command plus --from_resume 1 goes on from that step and finishes.
    steps_per_epoch = 4  # 8 samples, batch 2
    code, out, err = Training(train_args(assets, run_dir, "--epochs", "50", "--max_steps", str(stopped_at + 2),
                                         "--from_resume", "1")).finish()
    assert code == 0, out + err
    assert f"resumed from {resume_file(run_dir)}" in out and f"{stopped_at} optimizer steps done" in out
    first_step = stopped_at + 1
    assert (f"epoch {(first_step - 1) // steps_per_epoch + 1}/50 step {(first_step - 1) % steps_per_epoch + 1}/"
            f"{steps_per_epoch} |") in out
    assert f"done: {stopped_at + 2} optimizer steps" in out
    assert resume_step(resume_file(run_dir)) == stopped_at + 2


def resume_step(path):
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


# ======================================================================================== (d) non-finite loss

@pytest.fixture
def nan_after(monkeypatch):
    """Make every training forward after the first `good` ones return a NaN loss (or only some of them)."""
    def install(good, bad=None):
        original = MiniMindVLM.forward
        calls = {"n": 0}

        def forward(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            if self.training and out.loss is not None:
                calls["n"] += 1
                if calls["n"] > good and (bad is None or calls["n"] <= good + bad):
                    out.loss = out.loss * float("nan")
            return out

        monkeypatch.setattr(MiniMindVLM, "forward", forward)
    return install


def test_non_finite_losses_are_skipped_then_stop_the_run(assets, tmp_path, capsys, nan_after):
    nan_after(good=2)
    code, out, err = train_in_process(train_args(assets, tmp_path, "--max_steps", "40", "--save_interval", "2",
                                                 "--max_bad_steps", "3"), capsys)
    assert code == 1, out + err
    for step, in_row in ((3, 1), (4, 2), (5, 3)):
        assert (f"warning: non-finite loss at step {step}; step skipped ({in_row} in a row, {in_row} in total)"
                in out)
    # (the data preparation's progress bar may come first on stderr)
    assert err.strip().splitlines()[-1] == ("stopped: 3 optimizer steps in a row were skipped (non-finite loss or fp16 gradient "
                           "overflow); the last saved checkpoint is intact. Lower --learning_rate, try --dtype "
                           "bfloat16, or check the data.")
    # The checkpoint saved after step 2 is still there, loadable and finite.
    assert resume_step(resume_file(tmp_path)) == 2
    weights = torch.load(weights_file(tmp_path), weights_only=True)
    assert all(bool(t.isfinite().all()) for t in weights.values())


def test_a_few_non_finite_losses_are_skipped_and_counted(assets, tmp_path, capsys, nan_after):
    nan_after(good=1, bad=2)
    code, out, err = train_in_process(train_args(assets, tmp_path, "--max_steps", "4", "--max_bad_steps", "3"),
                                      capsys)
    assert code == 0, out + err
    assert "done: 4 optimizer steps, 2 skipped (non-finite loss or fp16 gradient overflow)" in out


def cpu_fp16_with_scale(monkeypatch, init_scale):
    """fp16 autocast and a GradScaler on the CPU (the trainer uses them on CUDA only), starting at `init_scale`."""
    from trainer import setup

    def autocast_for(device, dtype_name):
        return (lambda: torch.autocast("cpu", dtype=torch.float16)), torch.amp.GradScaler("cpu", init_scale=init_scale)

    monkeypatch.setattr(setup, "autocast_for", autocast_for)


def test_fp16_overflow_steps_are_skipped_counted_and_stop_the_run(assets, tmp_path, capsys, monkeypatch):
    # A loss scale of 2^60 overflows every fp16 gradient: the GradScaler skips the step and halves the scale.
    cpu_fp16_with_scale(monkeypatch, 2.0 ** 60)
    code, out, err = train_in_process(train_args(assets, tmp_path, "--max_steps", "40", "--max_bad_steps", "3"),
                                      capsys)
    assert code == 1, out + err
    for step in (1, 2, 3):
        assert (f"warning: fp16 gradient overflow (the GradScaler lowered its scale) at step {step}; step skipped "
                f"({step} in a row, {step} in total)") in out
    assert err.strip().splitlines()[-1].startswith("stopped: 3 optimizer steps in a row were skipped")
    assert " | loss " not in out  # a skipped step is not logged as a trained one
    assert not resume_file(tmp_path).exists()  # no step was taken, so there was nothing to save


def test_fp16_overflow_steps_are_counted_in_the_summary(assets, tmp_path, capsys, monkeypatch):
    cpu_fp16_with_scale(monkeypatch, 2.0 ** 60)
    code, out, err = train_in_process(train_args(assets, tmp_path, "--max_steps", "2", "--max_bad_steps", "5"),
                                      capsys)
    assert code == 0, out + err
    assert "done: 2 optimizer steps, 2 skipped (non-finite loss or fp16 gradient overflow)" in out
    checkpoint = torch.load(resume_file(tmp_path), weights_only=True)
    assert checkpoint["scaler"]["scale"] == 2.0 ** 58 and checkpoint["skipped_steps"] == 2  # halved twice


# ======================================================================= (d') RNG states across device counts

class FakeCudaGenerators:
    """torch.cuda's RNG calls over `count` fake devices, each generator state a distinct byte tensor."""

    def __init__(self, monkeypatch, count):
        self.states = {i: torch.full((16,), i, dtype=torch.uint8) for i in range(count)}
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": self.states[self.index(device)].clone())
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_state)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [self.states[i].clone() for i in range(count)])

    def index(self, device):
        index = torch.device(device).index
        if index not in self.states:
            raise IndexError(f"no CUDA device {index}")  # what real CUDA does for an invisible device
        return index

    def set_state(self, state, device="cuda"):
        self.states[self.index(device)] = state.clone()


def test_resume_with_fewer_cuda_generators_restores_what_is_visible(monkeypatch):
    from trainer.setup import RunContext, capture_rng, restore_rng

    # A file of the former format from an 8-GPU box: rank 0's states plus all 8 generators (get_rng_state_all).
    saved_on_8 = FakeCudaGenerators(monkeypatch, 8)
    saved_on_8.states[0] = torch.full((16,), 42, dtype=torch.uint8)
    old_format = capture_rng(torch.device("cpu"))
    old_format["cuda"] = torch.cuda.get_rng_state_all()
    # Resumed under CUDA_VISIBLE_DEVICES=3: one generator, cuda:0.
    visible = FakeCudaGenerators(monkeypatch, 1)
    lines = []
    restore_rng(old_format, RunContext(device=torch.device("cuda:0")), log=lines.append)
    assert visible.states[0].tolist() == [42] * 16 and not lines

    # Today's format, per rank and per device: a 2-process run saved on cuda:0 and cuda:1 ...
    two = FakeCudaGenerators(monkeypatch, 2)
    per_rank = [capture_rng(torch.device(f"cuda:{rank}")) for rank in range(2)]
    assert [state["cuda"].tolist()[0] for state in per_rank] == [0, 1]
    # ... resumed on the same world size: each rank gets its own device's state back.
    two.states = {0: torch.zeros(16, dtype=torch.uint8), 1: torch.zeros(16, dtype=torch.uint8)}
    restore_rng(per_rank, RunContext(rank=1, local_rank=1, world_size=2, device=torch.device("cuda:1")), lines.append)
    assert two.states[1].tolist() == [1] * 16 and not lines
    # ... resumed by one process on one GPU: works, and says in one line what differs.
    one = FakeCudaGenerators(monkeypatch, 1)
    restore_rng(per_rank, RunContext(device=torch.device("cuda:0")), log=lines.append)
    assert one.states[0].tolist() == [0] * 16  # untouched: it starts from --seed
    assert lines == ["resume: saved by 2 process(es), resumed by 1: random states (dropout) start from --seed; "
                     "the data order goes on as saved"]
    # A CPU run resumed on a GPU: the CPU states are restored, the CUDA one starts from --seed.
    lines.clear()
    restore_rng([capture_rng(torch.device("cpu"))], RunContext(device=torch.device("cuda:0")), log=lines.append)
    assert len(lines) == 1 and "no saved CUDA random state for cuda:0" in lines[0]


TEARDOWN_RUNS = 60


def _closing_rank(rank, folder, reports):
    """TEARDOWN_RUNS short DDP runs on a fresh gloo group each, ended as the trainer ends them: a few steps, the
    final save's gather_object of the random states and barrier, then run_then_close_group's teardown."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from trainer.setup import RunContext, run_then_close_group

    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool

    def short_run():
        model = DistributedDataParallel(torch.nn.Linear(16, 16))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            model(torch.randn(4, 16)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        gathered = [None, None] if rank == 0 else None
        dist.gather_object({"cpu": torch.get_rng_state()}, gathered, dst=0)
        dist.barrier()

    for run in range(TEARDOWN_RUNS):
        dist.init_process_group("gloo", init_method=f"file://{folder}/init{run}", rank=rank, world_size=2)
        run_then_close_group(RunContext(rank=rank, local_rank=rank, world_size=2), short_run)
        reports.put((rank, run))


def test_distributed_runs_end_without_the_gloo_teardown_deadlock(tmp_path):
    """The group's end after a DDP run (run_then_close_group). Ended as the trainer ended it before (destroy the
    group, then let the DDP model go), the same loop hung a rank within 3 to 30 runs here, as one rank of a
    two-process test run hung at exit in CI: a gloo worker freeing the last barrier waits for the GIL that the
    group's destructor holds while it joins that worker."""
    context = multiprocessing.get_context("fork")
    reports = context.Queue()
    ranks = [context.Process(target=_closing_rank, args=(rank, tmp_path, reports)) for rank in range(2)]
    for process in ranks:
        process.start()
    try:
        done = [reports.get(timeout=60) for _ in range(2 * TEARDOWN_RUNS)]
    except queue.Empty:
        pytest.fail("a rank hung at the end of a distributed run")
    finally:
        for process in ranks:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    assert sorted(done) == sorted((rank, run) for rank in range(2) for run in range(TEARDOWN_RUNS))
    assert [process.exitcode for process in ranks] == [0, 0]


def test_torchrun_with_more_processes_than_gpus_is_one_line_before_any_process_group(monkeypatch):
    """torchrun --nproc_per_node 2 on a one-GPU machine: rank 1 would ask for cuda:1 (torch: 'invalid device
    ordinal'; NCCL refuses two ranks on one GPU). It is a user error naming the flag, raised before NCCL starts."""
    import torch.distributed as dist

    from trainer.setup import init_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("a process group was started"))
    for name, value in (("RANK", "1"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=r"^torchrun started local rank 1, but torch sees 1 CUDA GPU\(s\) on this "
                                        r"machine: use --nproc_per_node 1 \(one process per GPU\), or --device cpu$"):
        init_distributed("cuda")


def test_resume_restores_python_numpy_and_torch_states_per_rank():
    from trainer.setup import RunContext, capture_rng, restore_rng

    states = []
    for rank in range(2):  # two ranks seeded apart, as run_stage seeds them
        random.seed(rank), np.random.seed(rank), torch.manual_seed(rank)
        states.append(capture_rng(torch.device("cpu")))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())  # rank 1's next draws
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(states, RunContext(rank=1, world_size=2), log=print)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# ========================================================================================= (e) failed saves

def test_failed_save_is_reported_and_keeps_the_previous_checkpoint(assets, tmp_path, capsys, monkeypatch):
    real_replace = os.replace
    weights_writes = []
    kept = {}

    def replace(src, dst):
        # The disk is full when the second save writes the weights file (whatever else is written around it).
        if str(dst) == str(weights_file(tmp_path)):
            weights_writes.append(dst)
            if len(weights_writes) == 2:
                kept["at_failure"] = sha(dst)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_replace(src, dst)
        if str(dst) == str(weights_file(tmp_path)) and len(weights_writes) == 1:
            kept["first"] = sha(dst)

    monkeypatch.setattr(os, "replace", replace)
    code, out, err = train_in_process(train_args(assets, tmp_path, "--max_steps", "3", "--save_interval", "1"),
                                      capsys)
    assert code == 0, out + err
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: could not write {weights_file(tmp_path)} ([Errno {errno.ENOSPC}] "
                        f"{os.strerror(errno.ENOSPC)}); the previous file is kept"]
    assert kept["at_failure"] == kept["first"]  # the previous checkpoint was untouched by the failed save
    assert "done: 3 optimizer steps" in out  # training went on
    assert not list(tmp_path.rglob("*.tmp"))
    torch.load(weights_file(tmp_path), weights_only=True)


def test_unwritable_save_dir_warns_then_fails_the_final_save(assets, tmp_path, capsys):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the output folder should be")  # works as root too, unlike chmod
    argv = train_args(assets, tmp_path, "--max_steps", "2", "--save_interval", "1")
    argv[argv.index("--save_dir") + 1] = str(blocker / "out")
    code, out, err = train_in_process(argv, capsys)
    assert code == 2
    assert sum(line.startswith("warning: could not write") for line in out.splitlines()) == 1  # after step 1
    assert err.startswith(f"error: could not write {blocker / 'out' / 'pretrain_vlm_64.pth'}")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "done:" not in out


def test_two_process_run_whose_final_save_fails_ends_every_rank_with_one_line(assets, tmp_path):
    """Rank 0 alone writes; when its final save fails, every rank learns of it and ends in the error path (a rank
    left waiting at the closing barrier would fail on the lost connection instead)."""
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the output folder should be")
    argv = train_args(assets, tmp_path, "--max_steps", "2")
    argv[argv.index("--save_dir") + 1] = str(blocker / "out")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(REPO_ROOT / "train_pretrain_vlm.py"), *argv], capture_output=True, text=True,
                            timeout=600, cwd="/")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert sorted(errors) == sorted([f"error: could not write {blocker / 'out' / 'pretrain_vlm_64.pth'} "
                                     f"([Errno {errno.ENOTDIR}] Not a directory: '{blocker / 'out'}'); the previous "
                                     f"file is kept",
                                     "error: rank 0 could not write the final weights (its error says why)"]), \
        result.stderr[-3000:]
    # torchrun's own report of the failed children (after its first log line) has its traceback; the ranks none
    assert "Traceback" not in result.stderr.split("torch/distributed/elastic")[0] and "trainer/" not in result.stderr
    assert "FutureWarning" not in result.stderr  # DDP's buffer flag under the name this torch wants


# ================================================================================ (f) unsafe or wrong weights

class RunsCode:
    """Unpickling this creates a file: the kind of payload weights_only=True must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def test_wrong_shape_weights_name_keys_and_fitting_flags(assets, tmp_path, capsys):
    other = MiniMindVLM(VLMConfig(hidden_size=128, num_hidden_layers=1), vision_model_path=None)
    path = tmp_path / "other.pth"
    torch.save({k: v.half() for k, v in other.state_dict().items()}, path)
    argv = train_args(assets, tmp_path, "--max_steps", "1")
    argv[argv.index("--from_weight") + 1] = str(path)
    code, out, err = train_in_process(argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: {path} does not fit the model:")
    assert "model.embed_tokens.weight" in err and "model.layers.1." in err
    assert "the file fits --hidden_size 128 --num_hidden_layers 1 --use_moe 0" in err


@pytest.mark.parametrize("where", ["from_weight", "resume"])
def test_a_pickle_with_code_is_refused(assets, tmp_path, capsys, where):
    marker = tmp_path / "code_ran"
    argv = train_args(assets, tmp_path, "--max_steps", "1")
    if where == "from_weight":
        path = tmp_path / "evil.pth"
        argv[argv.index("--from_weight") + 1] = str(path)
    else:
        path = resume_file(tmp_path)
        argv += ["--from_resume", "1"]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model.embed_tokens.weight": RunsCode(marker)}, path)
    code, out, err = train_in_process(argv, capsys)
    assert not marker.exists(), "unpickling ran code"
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "UnpicklingError" in err and str(path) in err


# ==================================================================== (f) a container's 64 MB /dev/shm, with workers

def run_with_shm(assets, run_dir, shm_size, *extra):
    """train_pretrain_vlm.py with DataLoader workers, in a private mount namespace whose /dev/shm is a tmpfs of
    `shm_size` (what `docker run` gives without --ipc=host / --shm-size)."""
    command = [sys.executable, str(REPO_ROOT / "train_pretrain_vlm.py"),
               *train_args(assets, run_dir, "--num_workers", "2", "--batch_size", "4", *extra)]
    script = f"mount -t tmpfs -o size={shm_size} tmpfs /dev/shm && exec \"$@\""
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *command], capture_output=True, text=True,
                          timeout=600, cwd="/")


def private_shm_supported():
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not private_shm_supported(), reason="needs root and mount namespaces (unshare -m)")
def test_a_64mb_dev_shm_trains_with_workers_and_a_full_one_fails_fast(assets, tmp_path):
    roomy = run_with_shm(assets, tmp_path / "64m", "64m", "--max_steps", "3")
    assert roomy.returncode == 0, roomy.stdout + roomy.stderr
    assert "done: 3 optimizer steps" in roomy.stdout and "/dev/shm" not in roomy.stdout
    # Too small for even one batch (4 images of 147 KB): warned at start, then one line instead of a hang.
    started = time.monotonic()
    full = run_with_shm(assets, tmp_path / "300k", "300k", "--max_steps", "3", "--loader_timeout", "15")
    assert full.returncode == 1, full.stdout + full.stderr
    assert "warning: /dev/shm has 0 MB free" in full.stdout and "--shm-size" in full.stdout
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith("stopped: no batch from the DataLoader workers") and "--ipc=host" in last
    assert time.monotonic() - started < 120
