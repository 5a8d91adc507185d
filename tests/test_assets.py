"""The offline assets from dev/make_assets.py: tokenizer parity with MiniMind2, tiny CLIP, shapes dataset."""
import filecmp
import io
import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, CLIPProcessor, CLIPVisionModel

from conftest import SHAPES_DATA_SIZES
from dev import synthetic as make_assets
from dataset.processing import is_placeholder_image
from model.model_minimind import MiniMindConfig
from dev import make_assets as make_assets_script

IMAGE_TOKENS = make_assets.clip_num_patches()  # 196 placeholders per image
PLACEHOLDER_ID = 34  # id of '@' in MiniMind2, which the VLM searches for
NEWLINE_ID = 201  # id of '\n' ('Ċ') in MiniMind2

# Conversations rendered by both chat templates; (messages, add_generation_prompt).
CHAT_CASES = [
    ([{"role": "user", "content": "U1"}], True),
    ([{"role": "user", "content": "U1"}], False),
    ([{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"}], False),
    ([{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
      {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}], True),
    ([{"role": "user", "content": "What colour is it?\n" + "@" * IMAGE_TOKENS},
      {"role": "assistant", "content": "Red."}, {"role": "user", "content": "And the shape?"},
      {"role": "assistant", "content": "A circle."}], False),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "多行\n文本"}], True),
    # a system message that is not the first one is rendered as an ordinary turn
    ([{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
      {"role": "system", "content": "S2"}, {"role": "user", "content": "U2"}], False),
]


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def image_names(record: dict) -> list:
    return [name.strip() for name in record["image"].split(",") if name.strip()]


def marker_count(conversations: list) -> int:
    return sum(turn["content"].count(make_assets.IMAGE_MARKER) for turn in conversations)


# ---------------------------------------------------------------------------------------------- tokenizer

@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_special_tokens_and_settings(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.convert_tokens_to_ids(list(make_assets.SPECIAL_TOKENS)) == [0, 1, 2]
    assert (tok.pad_token, tok.unk_token, tok.bos_token, tok.eos_token) == (
        "<|endoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 0, 1, 2)
    assert tok.model_max_length == make_assets.MODEL_MAX_LENGTH == 32768
    assert tok.padding_side == tok.truncation_side == "right"
    # As many entries as the model's embedding (MiniMind2's 6400): every id a model samples decodes.
    assert len(tok) == MiniMindConfig().vocab_size == 6400
    assert all(tok.decode([token_id]) for token_id in range(len(tok) - 10, len(tok)))
    # The fillers after the trained entries are unreachable: text is encoded with the trained merges only.
    assert max(tok("abc xyz the cat sees a red ball today")["input_ids"]) < make_assets.DEFAULT_VOCAB_SIZE
    # nothing is added automatically
    assert tok("hello")["input_ids"] == tok.convert_tokens_to_ids(tok.tokenize("hello"))
    assert tok("<|im_start|>assistant\n")["input_ids"][0] == 1
    assert tok("<|im_end|>\n")["input_ids"] == [2, NEWLINE_ID]
    assert tok.decode(tok("A red circle.\nYes")["input_ids"]) == "A red circle.\nYes"


def test_saved_files_have_minimind2_structure(tiny_tokenizer_dir):
    tokenizer_json = json.loads((tiny_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert tokenizer_json["normalizer"] is None
    assert tokenizer_json["post_processor"] is None
    assert tokenizer_json["pre_tokenizer"] == {"type": "ByteLevel", "add_prefix_space": False,
                                               "trim_offsets": True, "use_regex": True}
    assert tokenizer_json["decoder"]["type"] == "ByteLevel"
    assert tokenizer_json["model"]["type"] == "BPE"
    config = json.loads((tiny_tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    assert config["chat_template"] == make_assets.CHAT_TEMPLATE
    assert sorted(path.name for path in tiny_tokenizer_dir.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


def test_no_merge_contains_the_placeholder(tiny_tokenizer_dir):
    model = json.loads((tiny_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    assert model["vocab"]["@"] == PLACEHOLDER_ID
    assert [token for token in model["vocab"] if "@" in token] == ["@"]
    assert not [merge for merge in model["merges"] if "@" in "".join(merge)]


@pytest.mark.parametrize("prefix, suffix", [("", ""), ("图:\n", ""), (" ", ""), ("x", "x"), ("Look:\n", "\nWhat?"),
                                            ("<|im_start|>user\n", "<|im_end|>")])
@pytest.mark.parametrize("which", ["tiny", "real"])
def test_placeholder_run_encodes_to_196_single_ids(which, prefix, suffix, request):
    tokenizer_dir = request.getfixturevalue(f"{which}_tokenizer_dir")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)

    def encode(text):
        return tok(text)["input_ids"] if text else []

    ids = encode(prefix + "@" * IMAGE_TOKENS + suffix)
    assert ids == encode(prefix) + [PLACEHOLDER_ID] * IMAGE_TOKENS + encode(suffix)


def test_byte_alphabet_ids_match_real(tiny_tokenizer_dir, real_tokenizer_dir):
    """Specials and all 256 byte tokens sit at the same ids as in MiniMind2 ('@' 34, '\\n' 201, ' ' 223)."""
    def low_ids(tokenizer_dir):
        vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
        return {index: token for token, index in vocab.items() if index < 3 + 256}

    tiny_ids, real_ids = low_ids(tiny_tokenizer_dir), low_ids(real_tokenizer_dir)
    real_specials = {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>"}  # added tokens, not in vocab
    assert {**real_specials, **real_ids} == {**{i: t for i, t in enumerate(make_assets.SPECIAL_TOKENS)},
                                             **tiny_ids}
    assert tiny_ids[PLACEHOLDER_ID] == "@" and tiny_ids[NEWLINE_ID] == "Ċ" and tiny_ids[223] == "Ġ"


@pytest.mark.parametrize("messages, add_generation_prompt", CHAT_CASES)
def test_chat_template_renders_like_real(tiny_tokenizer, real_tokenizer_dir, messages, add_generation_prompt):
    real = AutoTokenizer.from_pretrained(real_tokenizer_dir)
    ours = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    theirs = real.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs


def test_chat_template_enable_thinking_false_like_real(tiny_tokenizer, real_tokenizer_dir):
    real = AutoTokenizer.from_pretrained(real_tokenizer_dir)
    messages = [{"role": "user", "content": "U1"}]
    kwargs = dict(tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert tiny_tokenizer.apply_chat_template(messages, **kwargs) == real.apply_chat_template(messages, **kwargs)


def test_chat_template_spec_strings(tiny_tokenizer):
    """The rendered strings written down in the spec (§4.1); runs without the real fixture."""
    def render(messages, add_generation_prompt):
        return tiny_tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    system = "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
    user, assistant = {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"}
    assert render([user, assistant], False) == (
        system + "<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n")
    assert render([user], True) == system + "<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\n"
    assert render([user], False) == system + "<|im_start|>user\nU1<|im_end|>\n"
    with_system = [{"role": "system", "content": "S"}, user, assistant, {"role": "user", "content": "U2"}]
    assert render(with_system, True) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\n")


def test_corpus_with_placeholder_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="must not contain"):
        make_assets.build_tokenizer(tmp_path, ["an email@example.com line"])


def test_corpus_has_no_placeholder():
    assert not [text for text in make_assets.tokenizer_corpus(seed=3) if "@" in text]


# ---------------------------------------------------------------------------------------------- CLIP

def test_tiny_clip_vision_tower_outputs_patches_plus_cls(tiny_clip_dir, shapes_data):
    vision = CLIPVisionModel.from_pretrained(tiny_clip_dir).eval()
    processor = AutoImageProcessor.from_pretrained(tiny_clip_dir)
    image = Image.open(shapes_data["pretrain_images"] / "000000.jpg")
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, make_assets.CLIP_IMAGE_SIZE, make_assets.CLIP_IMAGE_SIZE)
    assert pixel_values.dtype == torch.float32
    with torch.no_grad():
        hidden = vision(pixel_values=pixel_values).last_hidden_state
    assert hidden.shape == (1, IMAGE_TOKENS + 1, vision.config.hidden_size)
    assert IMAGE_TOKENS == 196 and vision.config.hidden_size == 64
    assert torch.isfinite(hidden).all()


def test_tiny_clip_is_a_full_clip_folder(tiny_clip_dir):
    files = {path.name for path in tiny_clip_dir.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= files
    config = json.loads((tiny_clip_dir / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "clip" and config["architectures"] == ["CLIPModel"]
    assert config["vision_config"]["image_size"] == 224 and config["vision_config"]["patch_size"] == 16
    assert config["text_config"]["hidden_size"] == 64
    processor = CLIPProcessor.from_pretrained(tiny_clip_dir)  # how upstream loads it
    encoded = processor(text=["a red circle"], images=Image.new("RGB", (128, 128)), return_tensors="pt")
    assert encoded["pixel_values"].shape == (1, 3, 224, 224)
    assert encoded["input_ids"].max() < config["text_config"]["vocab_size"]


def test_tiny_clip_uses_openai_preprocessing(tiny_clip_dir):
    settings = json.loads((tiny_clip_dir / "preprocessor_config.json").read_text(encoding="utf-8"))
    assert settings["size"] == {"shortest_edge": 224}
    assert settings["crop_size"] == {"height": 224, "width": 224}
    assert settings["resample"] == Image.Resampling.BICUBIC
    assert settings["do_center_crop"] and settings["do_convert_rgb"] and settings["do_normalize"]
    assert settings["rescale_factor"] == pytest.approx(1 / 255)
    assert settings["image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert settings["image_std"] == pytest.approx([0.26862954, 0.26130258, 0.27577711])


# ---------------------------------------------------------------------------------------------- data

@pytest.mark.parametrize("jsonl_key, images_key, images_per_record", [
    ("pretrain_jsonl", "pretrain_images", 1), ("sft_jsonl", "sft_images", 1),
    ("sft_multi_jsonl", "sft_multi_images", 2)])
def test_jsonl_records(shapes_data, jsonl_key, images_key, images_per_record):
    records = read_jsonl(shapes_data[jsonl_key])
    assert records
    for record in records:
        assert set(record) == {"conversations", "image"}
        roles = [turn["role"] for turn in record["conversations"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and len(roles) % 2 == 0
        names = image_names(record)
        if not names and jsonl_key == "sft_jsonl":  # a text-only SFT row: no image, no marker
            assert marker_count(record["conversations"]) == 0
            continue
        assert len(names) == images_per_record == marker_count(record["conversations"])
        for name in names:
            with Image.open(shapes_data[images_key] / name) as image:
                assert image.format == "JPEG" and image.mode == "RGB"
                assert image.size == (make_assets.DATA_IMAGE_SIZE, make_assets.DATA_IMAGE_SIZE)
        # the marker is only in user turns, and only in the first one
        assert all(make_assets.IMAGE_MARKER not in turn["content"] for turn in record["conversations"][1:])


def test_sft_covers_question_kinds_and_marker_positions(shapes_data):
    first_turns = [record["conversations"][0]["content"] for record in read_jsonl(shapes_data["sft_jsonl"])]
    assert any(text.startswith(make_assets.IMAGE_MARKER) for text in first_turns)
    assert any(text.endswith(make_assets.IMAGE_MARKER) for text in first_turns)
    questions = [text.replace(make_assets.IMAGE_MARKER, "").strip() for text in first_turns]
    for kind, phrasings in make_assets.QUESTIONS.items():
        assert any(question in phrasings for question in questions), kind


@pytest.mark.parametrize("parquet_key, jsonl_key, images_key", [
    ("pretrain_parquet", "pretrain_jsonl", "pretrain_images"), ("sft_parquet", "sft_jsonl", "sft_images"),
    ("sft_multi_parquet", "sft_multi_jsonl", "sft_multi_images")])
def test_parquet_matches_jsonl(shapes_data, parquet_key, jsonl_key, images_key):
    table = pq.read_table(shapes_data[parquet_key])
    assert table.column_names == ["conversations", "image_bytes"]
    records = read_jsonl(shapes_data[jsonl_key])
    rows = table.to_pylist()
    assert len(rows) == len(records)
    for row, record in zip(rows, records):
        conversations = json.loads(row["conversations"])
        assert conversations == record["conversations"]
        blobs = row["image_bytes"] if isinstance(row["image_bytes"], list) else [row["image_bytes"]]
        if not image_names(record):  # text-only: the placeholder image of the unified release, no marker
            assert marker_count(conversations) == 0 and is_placeholder_image(blobs[0])
            continue
        assert len(blobs) == marker_count(conversations)
        assert blobs == [(shapes_data[images_key] / name).read_bytes() for name in image_names(record)]
        assert Image.open(io.BytesIO(blobs[0])).size == (128, 128)


def test_sft_extra_records_teach_yes_no(shapes_data):
    """The SFT file's yes/no questions are balanced and right about their pictures; single-word answers name the
    picture's attribute; text-only questions name their own answer; text-only yes/no questions are right about
    the fact they state."""
    records = read_jsonl(shapes_data["sft_jsonl"])
    answers_yes_no = [r["conversations"][1]["content"] in make_assets.POPE_ANSWERS.values() for r in records]
    yes_no = [r for r, is_yes_no in zip(records, answers_yes_no) if is_yes_no and image_names(r)]
    text_yes_no = [r for r, is_yes_no in zip(records, answers_yes_no) if is_yes_no and not image_names(r)]
    single_word = [r for r in records if r["image"].startswith("short_")]
    text_only = [r for r, is_yes_no in zip(records, answers_yes_no) if not is_yes_no and not image_names(r)]
    n_sft = SHAPES_DATA_SIZES["n_sft"]
    assert len(yes_no) == round(n_sft * make_assets.POPE_SFT_FRACTION)
    assert len(single_word) == round(n_sft * make_assets.SHORT_ANSWER_SFT_FRACTION)
    assert len(text_only) == round(n_sft * make_assets.TEXT_ONLY_SFT_FRACTION)
    assert len(text_yes_no) == round(n_sft * make_assets.TEXT_YES_NO_SFT_FRACTION)
    for answers in (yes_no, text_yes_no):
        assert {r["conversations"][1]["content"] for r in answers} == set(make_assets.POPE_ANSWERS.values())
    for record in text_yes_no:
        question, answer = (turn["content"] for turn in record["conversations"])
        fact, asked = question.split("\n", 1)
        stated = next(value for kind in make_assets.POPE_QUESTIONS for value in make_assets.ATTRIBUTE_CHOICES[kind]
                      if fact == make_assets.single_answer(kind, value))
        assert (answer == make_assets.POPE_ANSWERS[True]) == (f" {stated} " in asked)
    for record in single_word + text_only:
        question, answer = (turn["content"] for turn in record["conversations"])
        assert make_assets.SHORT_ANSWER_SUFFIX in question and " " not in answer
        asked = question.replace(make_assets.IMAGE_MARKER, "").strip()
        if record in text_only:
            assert f" {answer.lower()}" in asked
        else:  # the answer is a value of the kind asked about
            kind = next(k for k, phrasings in make_assets.QUESTIONS.items()
                        if asked.removesuffix(make_assets.SHORT_ANSWER_SUFFIX) in phrasings)
            assert answer.lower() in make_assets.ATTRIBUTE_CHOICES[kind]


def test_eval_questions(shapes_data):
    records = read_jsonl(shapes_data["eval_jsonl"])
    assert len(records) == 9
    for record in records:
        assert set(record) == {"image", "question", "answer", "choices", "kind"}
        assert record["answer"] in record["choices"] and len(record["choices"]) >= 2
        assert record["choices"] == list(make_assets.ATTRIBUTE_CHOICES[record["kind"]])
        assert make_assets.IMAGE_MARKER not in record["question"]
        assert (shapes_data["eval_images"] / record["image"]).is_file()
    assert {record["kind"] for record in records} == set(make_assets.QUESTIONS)


def test_multi_image_answers_compare_both_pictures(shapes_data):
    answers = [record["conversations"][1]["content"] for record in read_jsonl(shapes_data["sft_multi_jsonl"])]
    assert all(answer.startswith(("Yes, both", "No, the first")) for answer in answers)


@pytest.mark.parametrize("scene_seed", range(12))
def test_drawn_image_shows_its_label(scene_seed):
    """The pixel at the shape's centre has the labelled colour and a corner has the labelled background."""
    scene = make_assets.random_scene(random.Random(scene_seed))
    image = make_assets.draw_scene(scene)
    size = image.size[0]
    centre = image.getpixel((int(scene.center[0] * size), int(scene.center[1] * size)))
    nearest = min(make_assets.COLOURS, key=lambda name: sum(
        (a - b) ** 2 for a, b in zip(make_assets.COLOURS[name], centre)))
    assert nearest == scene.colour
    corner_grey = sum(image.getpixel((0, 0))) / 3
    low, high = make_assets.BACKGROUNDS[scene.background]
    assert low - make_assets.BACKGROUND_TINT <= corner_grey <= high + make_assets.BACKGROUND_TINT


# ---------------------------------------------------------------------------------------------- build / CLI

def _tree(root: Path) -> list:
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file())


def test_build_is_deterministic(tmp_path):
    sizes = dict(n_pretrain=3, n_sft=4, n_eval=3, n_sft_multi=2)
    make_assets.build_all(tmp_path / "first", seed=7, **sizes)
    make_assets.build_all(tmp_path / "second", seed=7, **sizes)
    make_assets.build_all(tmp_path / "other_seed", seed=8, parts=("data",), **sizes)
    first, second = _tree(tmp_path / "first"), _tree(tmp_path / "second")
    assert first == second and len(first) > 20
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "first", tmp_path / "second", first, shallow=False)
    assert mismatch == [] and errors == []
    assert (tmp_path / "first/data/sft_vlm_data.jsonl").read_bytes() != (
        tmp_path / "other_seed/data/sft_vlm_data.jsonl").read_bytes()


def test_cli_builds_requested_parts(tmp_path, capsys):
    make_assets_script.main(["--out_dir", str(tmp_path), "--only", "data", "--n_pretrain", "2", "--n_sft", "2",
                      "--n_eval", "2", "--n_sft_multi", "1"])
    printed = capsys.readouterr().out
    assert "pretrain_jsonl" in printed and "tokenizer" not in printed
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data"]
    assert len(read_jsonl(tmp_path / "data" / make_assets.PRETRAIN_JSONL)) == 2
    with pytest.raises(SystemExit):
        make_assets_script.parse_args(["--only", "weights"])
