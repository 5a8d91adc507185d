"""LLaVA-format data (one JSON array of {"id", "image", "conversations": [{"from", "value"}]}): read as a stream,
checked and prepared like JSONL, with the same problem reports; trained on by both stages."""
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from dataset import prepared as prepared_module
from dataset import records as records_module
from dataset.lm_dataset import VLMDataset
from dataset.prepared import RecordView, llava_units, prepare_dataset
from dataset.processing import image_processor_for
from dataset.records import (FORMAT_JSONL, FORMAT_LLAVA, KIND_IMAGE_COUNT, KIND_IMAGE_MISSING, KIND_JSON, KIND_ROLES,
                             KIND_TEXT, DataError, data_format, read_llava_array)
from dev.synthetic import SFT_IMAGES, SFT_MULTI_IMAGES, llava_layout, write_llava_json
from model.model_vlm import VLMConfig
from scripts import check_data

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = VLMConfig()
IMAGE_TOKEN_ID = CONFIG.image_ids[0]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def open_dataset(path, tokenizer, images_path, prepared_dir, skip_bad_samples=False, workers=1):
    """(dataset, stats) as the trainers open them: prepared, checked at start-up, read as training samples."""
    prepared = prepare_dataset(path, tokenizer, CONFIG.image_special_token, IMAGE_TOKEN_ID, 2048,
                               images_path=images_path, cache_dir=prepared_dir, workers=workers, log=None)
    stats = prepared.check(skip_bad_samples, log=None)
    return VLMDataset(prepared, image_processor_for(CONFIG), log=None), stats


def jsonl_records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def assert_same_samples(first, second):
    assert len(first) == len(second) > 0
    for index in range(len(first)):
        a, b = first[index], second[index]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert [Path(p).resolve() for p in first.records[index].images] == \
               [Path(p).resolve() for p in second.records[index].images]


def test_a_llava_file_trains_on_what_the_same_jsonl_gives(shapes_data, tokenizer, tmp_path):
    llava = json.loads(shapes_data["sft_llava"].read_text())
    assert isinstance(llava, list) and data_format(shapes_data["sft_llava"]) == FORMAT_LLAVA
    assert any("image" not in record for record in llava)  # a text-only record
    assert any(len(record["conversations"]) > 2 for record in llava)  # a multi-turn record
    from_jsonl, jsonl_stats = open_dataset(shapes_data["sft_jsonl"], tokenizer, shapes_data["sft_images"], tmp_path)
    from_llava, llava_stats = open_dataset(shapes_data["sft_llava"], tokenizer, shapes_data["data_dir"], tmp_path)
    assert_same_samples(from_jsonl, from_llava)
    assert llava_stats.text_only == jsonl_stats.text_only > 0
    assert from_llava.records[3].origin == "sft_vlm_data_llava.json:record 4 (id 000003)"
    # Several images per record: `image` a list, each resolved under --images_path.
    multi = tmp_path / "multi.json"
    write_llava_json(multi, jsonl_records(shapes_data["sft_multi_jsonl"]), SFT_MULTI_IMAGES)
    assert isinstance(json.loads(multi.read_text())[0]["image"], list)
    from_multi_jsonl, _ = open_dataset(shapes_data["sft_multi_jsonl"], tokenizer, shapes_data["sft_multi_images"],
                                       tmp_path)
    from_multi_llava, _ = open_dataset(multi, tokenizer, shapes_data["data_dir"], tmp_path)
    assert_same_samples(from_multi_jsonl, from_multi_llava)
    assert from_multi_llava[0]["pixel_values"].shape[0] == 2


def test_units_of_the_streaming_reader_give_what_json_load_gives(tmp_path, monkeypatch):
    records = [{"id": index, "text": "é ✓ 🚌 " * (index % 7) + "x" * (index * 13 % 300),
                "conversations": [{"from": "human", "value": "<image>\n[{\"not\": \"a boundary\"}]"}]}
               for index in range(200)] + [17, "a string", [1, 2.5, None], 123456789]
    path = tmp_path / "stream.json"
    path.write_text("\ufeff\n" + json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    monkeypatch.setattr(records_module, "LLAVA_READ_BYTES", 64)  # most records span several reads
    whole = list(read_llava_array(path))
    assert [element.value for element in whole] == json.loads(path.read_text(encoding="utf-8-sig"))
    raw = path.read_bytes()
    assert all(json.loads(raw[e.start_byte:e.stop_byte]) == e.value for e in whole)
    units = llava_units(path, unit_bytes=2000)
    assert len(units) > 5 and sum(unit.rows for unit in units) == len(records)
    from_units = [element for unit in units
                  for element in read_llava_array(path, unit.start_byte, unit.rows, unit.first_row)]
    assert [(e.index, e.value) for e in from_units] == list(enumerate(records))


def test_a_big_file_is_prepared_in_several_units_as_in_one(shapes_data, tokenizer, tmp_path, monkeypatch):
    path = tmp_path / "big.json"
    write_llava_json(path, jsonl_records(shapes_data["sft_jsonl"]) * 3, SFT_IMAGES)
    one_unit, _ = open_dataset(path, tokenizer, shapes_data["data_dir"], tmp_path / "one")
    monkeypatch.setattr(prepared_module, "JSONL_UNIT_BYTES", 2000)
    assert len(llava_units(path)) > 3
    several, _ = open_dataset(path, tokenizer, shapes_data["data_dir"], tmp_path / "several", workers=2)
    assert_same_samples(one_unit, several)
    assert [several.records[i].origin for i in range(len(several))] == \
           [one_unit.records[i].origin for i in range(len(one_unit))]


def write_defective_pair(shapes_data, tmp_path):
    """bad.jsonl and bad.json: the same 8 records, records 3-5 with a defect (a role that is not one, no `<image>`
    for the image, a missing image file), then a non-object element; the LLaVA file's 8th record also has text
    that is not UTF-8 (a byte in its id: a defect only raw bytes can have)."""
    rows = json.loads(json.dumps([r for r in jsonl_records(shapes_data["sft_jsonl"]) if r["image"]][:8]))
    rows[3]["conversations"][0]["content"] = rows[3]["conversations"][0]["content"].replace("<image>", "")
    rows[4]["image"] = "does_not_exist.jpg"
    llava = llava_layout(rows, SFT_IMAGES)
    rows[2]["conversations"][1]["role"] = "bot"
    llava[2]["conversations"][1]["from"] = "bot"
    llava[7]["id"] = "NOT_UTF8_HERE"
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows[:5]) + "42\n"
                     + "".join(json.dumps(row) + "\n" for row in rows[5:]))
    llava_path = tmp_path / "bad.json"
    text = json.dumps(llava[:5] + [42] + llava[5:], indent=1).encode()
    llava_path.write_bytes(text.replace(b"NOT_UTF8_HERE", b"id\xff"))
    return jsonl, llava_path


def test_bad_records_are_reported_and_skipped_as_jsonl_reports_them(shapes_data, tokenizer, tmp_path):
    jsonl, llava = write_defective_pair(shapes_data, tmp_path)
    with pytest.raises(DataError) as refused:
        open_dataset(llava, tokenizer, shapes_data["data_dir"], tmp_path / "p")
    lines = str(refused.value).splitlines()
    assert lines[0] == "bad.json: 5 malformed record(s):"
    assert lines[1] == ("  bad.json:record 3 (id 000002): turn 1 has 'from' 'bot'; expected one of human, gpt, "
                        "system")
    assert lines[2] == "  bad.json:record 4 (id 000003): 0 <image> marker(s) but 1 image(s)"
    assert lines[3] == (f"  bad.json:record 5 (id 000004): image file 'sft_images/does_not_exist.jpg' not found in "
                        f"{shapes_data['data_dir']}")
    assert lines[4] == "  bad.json:record 6: a record must be a JSON object"
    assert lines[5].startswith("  bad.json:record 9 (id id\\udcff): not UTF-8 text (byte ")
    byte = int(lines[5].rsplit(" ", 1)[1].rstrip(")"))
    assert llava.read_bytes()[byte:byte + 1] == b"\xff"

    from_llava, llava_stats = open_dataset(llava, tokenizer, shapes_data["data_dir"], tmp_path / "p",
                                           skip_bad_samples=True)
    from_jsonl, jsonl_stats = open_dataset(jsonl, tokenizer, shapes_data["sft_images"], tmp_path / "p",
                                           skip_bad_samples=True)
    assert llava_stats.records == jsonl_stats.records == 9
    assert llava_stats.bad_records == jsonl_stats.bad_records + 1 == 5  # + the record that is not UTF-8
    assert [from_llava.records[i].origin for i in range(len(from_llava))] == \
           [f"bad.json:record {n} (id {i:06d})" for n, i in ((1, 0), (2, 1), (7, 5), (8, 6))]
    assert [from_jsonl.records[i].origin for i in range(len(from_jsonl))] == [f"bad.jsonl:{n}" for n in (1, 2, 7, 8, 9)]
    for index in range(len(from_llava)):  # the records both keep are the same samples
        assert torch.equal(from_llava[index]["input_ids"], from_jsonl[index]["input_ids"])
    kinds = {kind: count for kind, (count, _) in from_llava.prepared.manifest["problems"].items()}
    jsonl_kinds = {kind: count for kind, (count, _) in from_jsonl.prepared.manifest["problems"].items()}
    assert kinds == {**jsonl_kinds, KIND_TEXT: 1} == {KIND_ROLES: 1, KIND_IMAGE_COUNT: 1, KIND_IMAGE_MISSING: 1,
                                                      KIND_JSON: 1, KIND_TEXT: 1}


def test_check_data_lists_llava_defects_by_record(shapes_data, tiny_tokenizer_dir, tmp_path, capsys):
    _, llava = write_defective_pair(shapes_data, tmp_path)
    code = check_data.main([str(llava), "--images_path", str(shapes_data["data_dir"]), "--tokenizer_path",
                            str(tiny_tokenizer_dir), "--workers", "1", "--prepared_dir", str(tmp_path / "p")])
    out = capsys.readouterr().out
    assert code == 1
    errors = out.split("errors (5):\n")[1].splitlines()[:5]
    assert [line.split(":")[1].split(" (")[0] for line in errors] == [f"record {n}" for n in (3, 4, 5, 6, 9)]
    assert "  bad.json:record 4 (id 000003): 0 <image> marker(s) but 1 image(s)\n" in out
    assert re.search(r"image does not decode \(trained on another sample\) +0\n", out)
    assert re.search(r"usable +4\n", out)


@pytest.mark.parametrize("cut", ["inside", "after"])
def test_a_truncated_array_is_one_line_naming_file_record_and_byte(shapes_data, tokenizer, tmp_path, cut):
    text = shapes_data["sft_llava"].read_text()
    records = json.loads(text)
    path = tmp_path / "truncated.json"
    path.write_text(text[:text.index(json.dumps(records[5]["id"])) + 3] if cut == "inside" else text.rstrip()[:-1])
    with pytest.raises(DataError) as refused:
        open_dataset(path, tokenizer, shapes_data["data_dir"], tmp_path / "p")
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{path}: the file ends ")
    if cut == "inside":
        assert "inside record 6 (which starts at byte " in message
    else:
        assert f"after record {len(records)} (byte " in message and "before the closing ']'" in message
    assert not list((tmp_path / "p").glob("*/tokens-*"))  # nothing prepared


@pytest.mark.parametrize("read_bytes", [7, 1 << 20])  # the error in a later read than its record's start, or in one
def test_invalid_json_inside_a_record_is_one_line(tmp_path, monkeypatch, read_bytes):
    monkeypatch.setattr(records_module, "LLAVA_READ_BYTES", read_bytes)
    path = tmp_path / "invalid.json"
    text = '[{"id": "é", "conversations": []},\n {"id": "b" "conversations": []}, {"id": "c"}]'
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as refused:
        list(read_llava_array(path))
    byte = len(text[:text.rindex('"conversations"')].encode())  # where the missing ',' was expected
    assert str(refused.value) == (f"{path}: invalid JSON in record 2 at byte {byte} (Expecting ',' delimiter); a "
                                  f"LLaVA file must be one JSON array")


def test_a_json_file_of_json_lines_is_still_read_as_jsonl(shapes_data, tokenizer, tmp_path):
    lines = tmp_path / "lines.json"
    shutil.copy(shapes_data["sft_jsonl"], lines)
    assert data_format(lines) == FORMAT_JSONL
    from_json, _ = open_dataset(lines, tokenizer, shapes_data["sft_images"], tmp_path)
    from_jsonl, _ = open_dataset(shapes_data["sft_jsonl"], tokenizer, shapes_data["sft_images"], tmp_path)
    assert_same_samples(from_jsonl, from_json)
    assert from_json.records[0].origin == "lines.json:1"


def run(command):
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd="/")
    assert result.returncode == 0, f"{command}\nSTDOUT:\n{result.stdout}\nSTDERR:\n{result.stderr}"
    return result


def test_both_stages_train_on_a_llava_file_with_the_feature_cache(shapes_data, tiny_tokenizer_dir, tiny_clip_dir,
                                                                  tmp_path):
    common = ["--device", "cpu", "--hidden_size", "64", "--num_hidden_layers", "2", "--num_workers", "0",
              "--data_path", str(shapes_data["sft_llava"]), "--images_path", str(shapes_data["data_dir"]),
              "--vision_model_path", str(tiny_clip_dir), "--tokenizer_path", str(tiny_tokenizer_dir),
              "--save_dir", str(tmp_path / "out"), "--checkpoint_dir", str(tmp_path / "ckpt"),
              "--prepared_dir", str(tmp_path / "prepared"), "--max_steps", "2", "--batch_size", "2"]
    pretrain = run([sys.executable, str(REPO_ROOT / "train_pretrain_vlm.py"), *common, "--from_weight", "none",
                    "--cache_vision_features", str(tmp_path / "features")])
    assert "sft_vlm_data_llava.json: 42 usable samples of 42" in pretrain.stdout
    assert "done: 2 optimizer steps" in pretrain.stdout
    assert list((tmp_path / "features").glob("*/shard-*.keys.npy"))
    sft = run([sys.executable, str(REPO_ROOT / "train_sft_vlm.py"), *common])
    assert "pretrain_vlm_64.pth" in sft.stdout and "done: 2 optimizer steps" in sft.stdout
    assert (tmp_path / "out" / "sft_vlm_64.pth").is_file()


llava_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6)
llava_text = st.lists(st.one_of(st.text(max_size=10), st.sampled_from(["<image>", "<image>\n", "\n", "é", "🚌"])),
                      max_size=4).map("".join)
llava_turn = st.fixed_dictionaries({}, optional={"from": st.sampled_from(["human", "gpt", "system", "user", ""])
                                                 | llava_values, "value": llava_text | llava_values})
usable_llava_records = st.builds(
    lambda image, question, answer, record_id: {
        "id": record_id, **({"image": image} if image else {}),
        "conversations": [{"from": "human", "value": ("<image>\n" if image else "") + question},
                          {"from": "gpt", "value": answer}]},
    st.sampled_from([None, "a.jpg", "sub/a.jpg"]), st.text(max_size=10).map(lambda t: t.replace("<image>", "")),
    st.text(max_size=10).map(lambda t: t.replace("<image>", "")), st.text(max_size=8))
any_llava_records = st.fixed_dictionaries({}, optional={
    "id": st.text(max_size=8) | st.integers() | llava_values,
    "image": st.sampled_from(["a.jpg", "sub/a.jpg", "missing.jpg", "", ["a.jpg", "sub/a.jpg"], []]) | llava_values,
    "conversations": st.lists(llava_turn, max_size=4) | llava_values})
llava_elements = st.one_of(usable_llava_records, usable_llava_records, any_llava_records, llava_values)


@st.composite
def llava_files(draw):
    """A LLaVA array of random elements, indented or not, sometimes cut short, with a byte flipped or spliced in."""
    data = json.dumps(draw(st.lists(llava_elements, max_size=6)), ensure_ascii=draw(st.booleans()),
                      indent=draw(st.sampled_from([None, 1]))).encode()
    how = draw(st.sampled_from(["intact", "intact", "cut", "flip", "splice"]))
    at = draw(st.integers(1, len(data) - 1))
    if how == "cut":
        return data[:at]
    if how == "flip":
        return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    return data[:at] + draw(st.binary(min_size=1, max_size=6)) + data[at:] if how == "splice" else data


@settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=llava_files(), read_bytes=st.sampled_from([5, 1 << 20]))
@example(data=b"[100.0]", read_bytes=5)  # "100." read first: the number goes on in the next read
@example(data=b'[{"conversations": [{"from": [], "value": "a"}, {"from": "gpt", "value": "b"}]}]', read_bytes=5)
def test_a_llava_file_is_one_valid_array_read_whole_or_one_line_error(tokenizer, data, read_bytes):
    """Exactly what json.loads reads as an array prepares, every element as a usable sample or a counted problem;
    anything else is one DataError line."""
    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as patch:
        patch.setattr(records_module, "LLAVA_READ_BYTES", read_bytes)
        folder = Path(folder)
        (folder / "sub").mkdir()
        for name in ("a.jpg", "sub/a.jpg"):
            (folder / name).write_bytes(b"not decoded here")
        path = folder / "data.json"
        path.write_bytes(data)
        if data_format(path) != FORMAT_LLAVA:  # a flipped '[': JSON lines, tested elsewhere
            return
        try:
            expected = json.loads(data.decode("utf-8", "surrogateescape"))
        except ValueError:
            expected = None
        try:
            prepared = prepare_dataset(path, tokenizer, CONFIG.image_special_token, IMAGE_TOKEN_ID, 100_000,
                                       images_path=folder, workers=1, log=None)
        except DataError as error:
            assert expected is None and "\n" not in str(error) and str(error).startswith(f"{path}: ")
            return
        counts = prepared.manifest
        assert isinstance(expected, list) and counts["records"] == len(expected)
        assert counts["records"] == counts["usable"] + counts["malformed"]
        problems, malformed = prepared.problems()
        assert len(problems) == malformed and all(p.origin.startswith("data.json:record ") for p in problems)
        records = RecordView(prepared)
        for index in range(len(records)):
            assert all(Path(image).is_file() for image in records[index].images)
