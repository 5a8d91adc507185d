"""eval_vlm.py and the shared chat plumbing (the inference package), on a random tiny model and the offline assets.

The scripts run as users run them (a subprocess from another folder, a pexpect terminal); the session logic
(history, truncation, stopping, scoring) is checked in-process, where it is fast.
"""
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pexpect
import pytest
import torch

import eval_vlm
from dataset.processing import IMAGE_MARKER, build_prompt
from model.model_vlm import IMAGE_PLACEHOLDER_ID, IMAGE_TOKENS_PER_IMAGE
from model.weights import weight_path
from common import run_cli
from inference.generation import ChatSession, GenerationSettings, answer_once, fit_prompt
from inference.loading import InferenceError, inference_dtype, load_model
from inference.scoring import QuestionScore, is_correct, score_questions

REPO_ROOT = Path(__file__).resolve().parents[1]
GREEDY = GenerationSettings(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def cli_flags(tiny_vlm_save_dir, tiny_tokenizer_dir, tiny_clip_dir):
    return ["--device", "cpu", "--hidden_size", "64", "--num_hidden_layers", "2", "--save_dir",
            str(tiny_vlm_save_dir),
            "--tokenizer_path", str(tiny_tokenizer_dir), "--vision_model_path", str(tiny_clip_dir)]


@pytest.fixture(scope="module")
def loaded(tiny_vlm_save_dir, tiny_tokenizer_dir, tiny_clip_dir):
    return load_model(weight_path(tiny_vlm_save_dir, "sft_vlm", 64, False), False, tiny_tokenizer_dir,
                      tiny_clip_dir, "cpu",
                      log=None)


def eval_command(cli_flags, *extra):
    return [sys.executable, str(REPO_ROOT / "eval_vlm.py"), *cli_flags, *extra]


def run_eval(cli_flags, *extra, tmp_path):
    """eval_vlm.py from an unrelated folder: nothing may depend on the working directory."""
    return subprocess.run(eval_command(cli_flags, *extra), capture_output=True, text=True, timeout=300, cwd=tmp_path)


# ------------------------------------------------------------------------------------------- as users run it

def test_minimind3v_checkpoint_answers_with_no_preset_flag(tiny_vlm3_save_dir, tiny_minimind3_tokenizer_dir,
                                                          tiny_siglip_dir, shapes_data, tmp_path):
    flags = ["--device", "cpu", "--weight", str(weight_path(tiny_vlm3_save_dir, "sft_vlm", 64, False)),
             "--tokenizer_path", str(tiny_minimind3_tokenizer_dir), "--vision_model_path", str(tiny_siglip_dir)]
    image = shapes_data["eval_images"] / "000000.jpg"
    result = run_eval(flags, "--image", str(image), "--prompt", "What shape is in the picture?",
                      "--max_new_tokens", "12", "--temperature", "0", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "tokens/s" in result.stderr and "Traceback" not in result.stderr
    loaded = load_model(weight_path(tiny_vlm3_save_dir, "sft_vlm", 64, False), False, tiny_minimind3_tokenizer_dir,
                        tiny_siglip_dir, "cpu", log=None)
    expected, _ = answer_once(loaded, "What shape is in the picture?", [image], GREEDY)
    assert loaded.model.config.chat_format == "minimind3" and expected in result.stdout


def test_single_shot_answers_in_bfloat16_on_cpu(cli_flags, shapes_data, tmp_path):
    """--dtype reaches the model: the load line names it, and a bf16 model answers (fp32 is the CPU default)."""
    image = shapes_data["eval_images"] / "000000.jpg"
    result = run_eval(cli_flags, "--image", str(image), "--prompt", "What shape is in the picture?", "--dtype",
                      "bfloat16", "--max_new_tokens", "6", "--temperature", "0", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "bfloat16 on cpu" in result.stderr and result.stdout.strip()


def test_inference_dtype_defaults(monkeypatch):
    assert inference_dtype("cpu") == torch.float32 and inference_dtype("cpu", "bfloat16") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert inference_dtype("cuda:1") == torch.bfloat16 and inference_dtype("cuda", "float32") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert inference_dtype("cuda") == torch.float16


def test_loaded_model_and_its_encoder_take_the_dtype(tiny_vlm_save_dir, tiny_tokenizer_dir, tiny_clip_dir):
    loaded = load_model(weight_path(tiny_vlm_save_dir, "sft_vlm", 64, False), False, tiny_tokenizer_dir,
                        tiny_clip_dir, "cpu", log=None, dtype_name="bfloat16")
    assert loaded.model.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.model.vision_encoder.parameters()} == {torch.bfloat16}


def test_single_shot_answers_and_exits(cli_flags, shapes_data, tmp_path):
    image = shapes_data["eval_images"] / "000000.jpg"
    result = run_eval(cli_flags, "--image", str(image), "--prompt", "What shape is in the picture?",
                      "--max_new_tokens", "12", "--temperature", "0", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "no answer printed"
    assert "tokens/s" in result.stderr and "Traceback" not in result.stderr


def test_interactive_session_through_a_terminal(cli_flags, shapes_data, tmp_path):
    """Ask about an image, stop the answer with Ctrl-C, attach another image, ask again, /clear, /quit."""
    images = shapes_data["eval_images"]
    # Answers could run to 4000 tokens; each one is cut short by Ctrl-C, which must not end the program.
    command = eval_command(cli_flags, "--image", str(images / "000000.jpg"), "--max_new_tokens", "4000",
                           "--temperature", "0")
    # A terminal's foreground program starts with Ctrl-C at its default; a runner started in the background
    # (nohup, `&`) would hand down an ignored SIGINT, and the prompt's Ctrl-C would then do nothing.
    child = pexpect.spawn(command[0], command[1:], cwd=str(tmp_path), encoding="utf-8",
                          codec_errors="replace", timeout=120,  # the tty echoes ^C between any two bytes
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        child.expect_exact("1 image(s) attached to your first question")
        child.expect_exact(eval_vlm.USER_PROMPT)
        child.sendline("What shape is in the picture?")
        child.expect_exact(eval_vlm.MODEL_PROMPT)
        child.expect(r"\S")  # the answer is streaming
        child.sendintr()
        child.expect(r"\[Speed\]: [\d.]+ tokens/s \(\d+ tokens in [\d.]+ s, stopped\)")
        child.expect_exact(eval_vlm.USER_PROMPT)
        child.sendintr()  # Ctrl-C at the prompt drops the line, nothing else
        child.expect_exact(eval_vlm.USER_PROMPT)
        child.sendline(f"/image {images / '000001.jpg'}")
        child.expect_exact("[1 image(s) attached to your next question]")
        child.sendline("/image " + str(tmp_path / "missing.jpg"))
        child.expect_exact("file not found")
        child.sendline("And this one?")
        child.expect_exact(eval_vlm.MODEL_PROMPT)
        child.expect(r"\S")
        child.sendintr()
        child.expect(r"tokens/s \(\d+ tokens in [\d.]+ s, stopped\)")
        child.sendline("/clear")
        child.expect_exact("[conversation cleared]")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


def test_batch_captioning_prints_tokens_per_s(cli_flags, shapes_data, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("000000.jpg", "000001.jpg", "000002.jpg"):
        (folder / name).write_bytes((shapes_data["eval_images"] / name).read_bytes())
    (folder / "broken.png").write_bytes(b"not a picture")
    (folder / "notes.txt").write_text("ignored")
    result = run_eval(cli_flags, "--caption", "--image_dir", str(folder), "--max_new_tokens", "6", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("[Speed]: ") == 3 and result.stdout.count(" tokens/s") == 3
    assert "[Image]: 000000.jpg" in result.stdout and "notes.txt" not in result.stdout
    assert "broken.png: skipped" in result.stdout


def test_missing_weights_is_one_line_error(cli_flags, tmp_path):
    result = run_eval(cli_flags, "--save_dir", str(tmp_path / "nowhere"), "--prompt", "hi", tmp_path=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: weights not found:") and "sft_vlm_64.pth" in result.stderr


@pytest.mark.parametrize("case", ["wrong_shape", "not_an_image", "prompt_too_long"])
def test_bad_input_is_one_line_error(case, cli_flags, tiny_vlm_save_dir, shapes_data, tmp_path, capsys):
    extra = {
        "wrong_shape": ["--weight", str(weight_path(tiny_vlm_save_dir, "sft_vlm", 64, False)),
                        "--hidden_size", "128"],
        "not_an_image": ["--image", str(tmp_path / "fake.jpg")],
        "prompt_too_long": ["--image", str(shapes_data["eval_images"] / "000000.jpg"), "--max_total_tokens", "150",
                            "--max_new_tokens", "20"],
    }[case]
    (tmp_path / "fake.jpg").write_text("plain text")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(eval_vlm.main, [*cli_flags, *extra, "--prompt", "hi"])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert {"wrong_shape": "--hidden_size 64 --num_hidden_layers 2", "not_an_image": "not a readable image",
            "prompt_too_long": "raise --max_total_tokens"}[case] in errors[0]


def test_question_file_prints_accuracy(cli_flags, shapes_data, capsys):
    eval_vlm.main([*cli_flags, "--questions", str(shapes_data["eval_jsonl"]), "--max_new_tokens", "4"])
    out = capsys.readouterr().out
    assert "accuracy " in out and "/9 = " in out and "chance" in out


# --------------------------------------------------------------------------------------------- the session

def test_history_and_images_are_fed_back_in_order(loaded, shapes_data):
    images = shapes_data["eval_images"]
    session = ChatSession(loaded, max_total_tokens=2048)
    session.attach_images([images / "000000.jpg"])
    first = "".join(session.ask("What shape is in the picture?", GREEDY))
    session.attach_images([images / "000001.jpg", images / "000002.jpg"])
    second = "".join(session.ask("Are they the same?", GREEDY))
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert session.messages[1]["content"] == first and session.messages[3]["content"] == second
    assert session.messages[2]["content"].count(IMAGE_MARKER) == 2 and len(session.images) == 3
    assert session.last_stats.tokens == GREEDY.max_new_tokens and session.last_stats.tokens_per_s > 0
    # what the model saw for the second answer: the whole conversation, three image runs
    prompt = build_prompt(loaded.tokenizer, session.messages[:3], loaded.model.config.image_special_token, True)
    ids = loaded.tokenizer(prompt, add_special_tokens=False).input_ids
    assert ids.count(IMAGE_PLACEHOLDER_ID) == 3 * IMAGE_TOKENS_PER_IMAGE
    session.clear()
    assert session.messages == [] and session.images == [] and session.pending_images == []


def test_truncation_drops_oldest_turns_never_part_of_an_image(loaded, shapes_data):
    session = ChatSession(loaded, max_total_tokens=700)
    for turn in range(4):
        session.attach_images([shapes_data["eval_images"] / f"00000{turn}.jpg"])
        "".join(session.ask("What colour is it?", GenerationSettings(max_new_tokens=8, temperature=0.0)))
    assert len(session.messages) == 8 and session.history_dropped > 0
    special = loaded.model.config.image_special_token
    for budget in range(230, 700, 37):
        ids, dropped, images_dropped = fit_prompt(loaded.tokenizer, session.messages[:7], special, budget)
        assert ids.shape[1] <= budget and dropped % 2 == 0
        assert (ids[0] == IMAGE_PLACEHOLDER_ID).sum() == IMAGE_TOKENS_PER_IMAGE * (4 - images_dropped)
    with pytest.raises(InferenceError, match="the question alone"):
        fit_prompt(loaded.tokenizer, session.messages[:7], special, 100)


def test_stop_ends_the_answer_and_keeps_it(loaded):
    session = ChatSession(loaded, max_total_tokens=8192)
    answer = session.ask("Tell me a long story.", GenerationSettings(max_new_tokens=8000, temperature=0.0))
    threading.Timer(0.5, session.stop).start()
    text = "".join(answer)
    assert session.last_stats.stopped and session.last_stats.tokens < 8000
    assert session.messages[-1] == {"role": "assistant", "content": text, "stats": session.last_stats}


def test_leaving_the_stream_early_stops_generation(loaded):
    session = ChatSession(loaded, max_total_tokens=8192)
    answer = session.ask("Tell me a long story.", GenerationSettings(max_new_tokens=8000, temperature=0.0))
    next(answer)
    answer.close()  # what a browser rerun or an exception in the consumer does
    assert session.last_stats.stopped and session.last_stats.tokens < 8000
    assert [m["role"] for m in session.messages] == ["user", "assistant"]


def test_markers_must_match_attached_images(loaded, shapes_data):
    session = ChatSession(loaded)
    session.attach_images([shapes_data["eval_images"] / "000000.jpg"])
    with pytest.raises(InferenceError, match="2 <image> marker"):
        session.ask("Compare <image> with <image>", GREEDY)
    "".join(session.ask("Look: <image> what is it?", GREEDY))
    assert session.messages[0]["content"] == "Look: <image> what is it?"


def test_scoring_rule_and_score(loaded, shapes_data):
    choices = ["circle", "square", "triangle", "star"]
    assert is_correct("It is a star.", "star", choices)
    assert not is_correct("A star or a circle", "star", choices)
    assert not is_correct("starry night", "star", choices) and is_correct("STAR!", "star", choices)
    seen = []
    score = score_questions(loaded, shapes_data["eval_jsonl"], max_new_tokens=4,
                            log=lambda record, answer, correct: seen.append((record, answer, correct)))
    assert isinstance(score, QuestionScore) and score.total == len(seen) == 9
    # The score is the scoring rule applied to each answer, counted overall and per kind.
    judged = [is_correct(answer, record["answer"], record["choices"]) for record, answer, _ in seen]
    assert [correct for _, _, correct in seen] == judged
    assert score.correct == sum(judged) and score.accuracy == sum(judged) / 9
    for kind, (correct, total) in score.by_kind.items():
        assert (correct, total) == (sum(j for (r, _, _), j in zip(seen, judged) if r["kind"] == kind),
                                    sum(r["kind"] == kind for r, _, _ in seen))
    assert set(score.by_kind) == {"shape", "colour", "background"}
    assert 0.25 < score.chance < 0.5
