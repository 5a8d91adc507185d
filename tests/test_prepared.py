"""Prepared data (dataset/prepared.py) and today's published format: text-only rows, stored roles, the cache."""
import json
import os
import re
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from dataset import prepared as prepared_module
from dataset.lm_dataset import VLMDataset
from dataset.prepared import RecordView, prepare_dataset
from dataset.processing import chat_template_warning
from dataset.processing import image_processor_for
from dataset.records import DataError, SampleEncoder, column_values, jsonl_record, parquet_record
from dev.published_shape import write_published_shape
from dev.synthetic import placeholder_jpeg
from model.model_vlm import VLMConfig
from scripts import check_data

CONFIG = VLMConfig()
IMAGE_TOKEN_ID = CONFIG.image_ids[0]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A 300-row file shaped like sft_i2t.parquet, in 3 row groups (3 units of work)."""
    path = tmp_path_factory.mktemp("published") / "sft_i2t.parquet"
    facts = write_published_shape(path, rows=300, seed=1, text_only_fraction=0.1, row_group_rows=100, pool_size=4)
    assert facts["text_only"] > 0
    return path, facts


def open_dataset(path, tokenizer, max_seq_len=2048, skip_bad_samples=False, images_path=None, prepared_dir=None,
                 prepare_workers=None):
    """(dataset, stats) as the trainers open them: prepared, checked at start-up, then read as training samples."""
    prepared = prepare_dataset(path, tokenizer, CONFIG.image_special_token, IMAGE_TOKEN_ID, max_seq_len,
                               images_path=images_path, cache_dir=prepared_dir, workers=prepare_workers, log=None)
    stats = prepared.check(skip_bad_samples, log=None)
    return VLMDataset(prepared, image_processor_for(CONFIG), log=None), stats


def read_parquet_records(path):
    """(records, problems) of every row in file order, with the record reader the preparing workers use."""
    table = pq.read_table(path)
    images = table.column("image_bytes")
    records, problems = [], []
    for row, text in enumerate(column_values(table.column("conversations"))):
        record, problem = parquet_record(text, images[row], row, path.name)
        records += [record] if record else []
        problems += [problem] if problem else []
    return records, problems


def read_jsonl_records(path, images_path):
    """(records, problems) of every line in file order, with the record reader the preparing workers use."""
    records, problems = [], []
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            record, problem = jsonl_record(raw, line_no, path.name, images_path)
            records += [record] if record else []
            problems += [problem] if problem else []
    return records, problems


def test_published_shape_trains_as_is_and_counts_text_only_rows(published, tokenizer, tmp_path):
    path, facts = published
    dataset, stats = open_dataset(path, tokenizer, prepared_dir=tmp_path, prepare_workers=2)
    assert stats.bad_records == 0 and len(dataset) == facts["rows"]
    assert stats.text_only == facts["text_only"]
    assert f"{facts['text_only']} of the usable are text-only" in stats.summary()
    text_only = [i for i in range(len(dataset)) if not dataset.records[i].images]
    assert len(text_only) == facts["text_only"]
    item = dataset[text_only[0]]
    assert item["pixel_values"].shape == (0, 3, 224, 224)  # the 8x8 placeholder is not encoded
    assert not (item["input_ids"] == IMAGE_TOKEN_ID).any()
    with_image = dataset[next(i for i in range(len(dataset)) if dataset.records[i].images)]
    assert with_image["pixel_values"].shape == (1, 3, 224, 224)
    assert int((with_image["input_ids"] == IMAGE_TOKEN_ID).sum()) == 196


def test_parallel_build_equals_the_whole_file_reader(published, tokenizer, tmp_path):
    path, _ = published
    max_seq_len = 215  # cuts some images and answers: the left-out rows must match too
    dataset, _ = open_dataset(path, tokenizer, max_seq_len, prepared_dir=tmp_path, prepare_workers=2,
                              skip_bad_samples=True)
    records, problems = read_parquet_records(path)
    assert not problems
    encoder = SampleEncoder(tokenizer, CONFIG.image_special_token, IMAGE_TOKEN_ID, max_seq_len)
    samples = encoder.encode_chats([(record.conversations, len(record.images)) for record in records])
    kept = [(record, sample) for record, sample in zip(records, samples) if sample.cut is None]
    assert 0 < len(kept) < len(records)
    assert len(dataset) == len(kept)
    for index, (record, sample) in enumerate(kept):
        assert dataset.records[index].origin == record.origin and dataset.records[index].images == record.images
        assert np.array_equal(dataset.token_ids(index), sample.ids)
    assert np.array_equal(np.asarray(dataset.lengths), [len(s.ids) for _, s in kept])


def test_jsonl_in_several_units_equals_the_whole_file_reader(shapes_data, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(prepared_module, "JSONL_UNIT_BYTES", 700)  # a few lines per unit
    data = tmp_path / "data.jsonl"
    lines = shapes_data["sft_jsonl"].read_text().splitlines()
    data.write_text("\n".join(lines[:4] + ["", "{not json"] + lines[4:]))  # a blank line, a bad one, no final \n
    dataset, stats = open_dataset(data, tokenizer, images_path=shapes_data["sft_images"], prepared_dir=tmp_path / "p",
                                  prepare_workers=2, skip_bad_samples=True)
    assert len(prepared_module.jsonl_units(data)) > 2
    records, problems = read_jsonl_records(data, shapes_data["sft_images"])
    assert [p.origin for p in stats.problems] == [p.origin for p in problems] == ["data.jsonl:6"]
    assert stats.records == len(records) + 1
    assert [dataset.records[i].origin for i in range(len(dataset))] == [r.origin for r in records]
    assert [dataset.records[i].images for i in range(len(dataset))] == [r.images for r in records]


def test_the_cache_is_reused_and_keyed_by_file_tokenizer_and_max_seq_len(published, tokenizer, tmp_path):
    path, _ = published
    copy = tmp_path / "copy.parquet"
    copy.write_bytes(path.read_bytes())
    messages = []

    def prepare(max_seq_len=2048):
        return prepare_dataset(copy, tokenizer, CONFIG.image_special_token, IMAGE_TOKEN_ID, max_seq_len,
                               cache_dir=tmp_path / "cache", workers=1, log=messages.append)

    first = prepare()
    assert len(messages) == 1 and messages[0].startswith("prepared copy.parquet: 300 rows")
    assert prepare().folder == first.folder and len(messages) == 1  # opened, not rebuilt
    other_length = prepare(max_seq_len=1024)
    assert other_length.folder != first.folder and other_length.folder.parent == first.folder.parent
    assert len(messages) == 2  # new tokens, same image units (one data folder)
    os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns + 10 ** 9))  # the file changed
    assert prepare().folder.parent != first.folder.parent and len(messages) == 3
    assert not list((tmp_path / "cache").glob("*/.*building*"))  # no leftovers


def write_rows(path, conversations, images):
    pq.write_table(pa.table({"conversations": pa.array(conversations, pa.string()),
                             "image_bytes": pa.array(images, pa.binary())}), path)


def test_stored_roles_are_honoured_and_bad_ones_reported(real_tokenizer_dir, shapes_data, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(real_tokenizer_dir)
    jpeg = (shapes_data["pretrain_images"] / "000000.jpg").read_bytes()
    rows = [
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nWhat is it?"},
          {"role": "assistant", "content": "A circle."}], jpeg),
        ([{"role": "user", "content": "<image>Hi"}, {"role": "user", "content": "Again"},
          {"role": "assistant", "content": "No."}], jpeg),
        ([{"content": "<image>\nColour?"}, {"content": "Red."}], jpeg),  # no roles: by position
        ([{"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "Knock knock."}],
         placeholder_jpeg()),
        ([{"role": "user", "content": "No marker here."}, {"role": "assistant", "content": "Yes."}], jpeg),
    ]
    data = tmp_path / "data.parquet"
    write_rows(data, [json.dumps(turns) for turns, _ in rows], [image for _, image in rows])
    with pytest.raises(DataError) as refused:
        open_dataset(data, tokenizer)
    message = str(refused.value)
    assert message.startswith("data.parquet: 2 malformed record(s):")
    assert "data.parquet:row 1: turn 1 has role 'user' where 'assistant' was expected" in message
    assert "data.parquet:row 4: 0 <image> marker(s) but 1 image(s)" in message  # a real image needs its marker

    dataset, stats = open_dataset(data, tokenizer, skip_bad_samples=True)
    assert len(dataset) == 3 and stats.text_only == 1
    system = dataset[0]
    text = tokenizer.decode(system["input_ids"])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert tokenizer.decode(system["input_ids"][system["labels"] != -100]) == "A circle.<|im_end|>\n"
    by_position = dataset[1]
    assert "<|im_start|>system\nYou are a helpful assistant<|im_end|>" in tokenizer.decode(by_position["input_ids"])
    assert tokenizer.decode(by_position["input_ids"][by_position["labels"] != -100]) == "Red.<|im_end|>\n"
    text_only = dataset[2]
    assert text_only["pixel_values"].shape[0] == 0
    assert tokenizer.decode(text_only["input_ids"][text_only["labels"] != -100]) == "Knock knock.<|im_end|>\n"


def test_check_data_counts_problems_per_kind_with_examples(published, tiny_tokenizer_dir, tmp_path, capsys):
    path, facts = published
    table = pq.read_table(path)
    conversations = table.column("conversations").to_pylist()
    for row in (5, 17, 29):  # three non-alternating records
        turns = json.loads(conversations[row])
        conversations[row] = json.dumps([t for t in turns if t["role"] != "assistant"] + turns[-1:] * 2)
    data = tmp_path / "bad.parquet"
    write_rows(data, conversations, table.column("image_bytes").to_pylist())
    code = check_data.main([str(data), "--tokenizer_path", str(tiny_tokenizer_dir), "--max_seq_len", "2048",
                            "--workers", "2", "--show", "2", "--prepared_dir", str(tmp_path / "p")])
    out = capsys.readouterr().out
    assert code == 1
    errors = out.split("errors (3):\n")[1].splitlines()
    assert errors[0].startswith("  bad.parquet:row 5: turn ") and errors[1].startswith("  bad.parquet:row 17: turn ")
    assert errors[2] == "  ... and 1 more (--show 20 lists up to 20 of each kind)"
    assert "errors by kind:\n  roles do not alternate  3" in out
    assert re.search(rf"text-only among the usable \(no image\) +{facts['text_only']}\n", out)


def test_a_tokenizer_with_another_template_gets_a_warning(tokenizer):
    assert chat_template_warning(tokenizer) is None
    other = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    other.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    assert chat_template_warning(other).startswith("warning: the tokenizer's chat template renders chats differently")


def test_backend_token_ids_equal_the_tokenizer_call(tokenizer, published):
    path, _ = published
    records, _ = read_parquet_records(path)
    encoder = SampleEncoder(tokenizer, CONFIG.image_special_token, IMAGE_TOKEN_ID, 4096)
    from dataset.processing import build_prompt

    prompts = [build_prompt(tokenizer, r.conversations, CONFIG.image_special_token, False) for r in records[:20]]
    assert encoder.token_ids(prompts) == tokenizer(prompts, add_special_tokens=False).input_ids


def test_a_pickled_dataset_maps_the_files_again(published, tokenizer, tmp_path):
    import pickle

    path, _ = published
    dataset, _ = open_dataset(path, tokenizer, prepared_dir=tmp_path)
    blob = pickle.dumps(dataset)
    assert len(blob) < 200_000  # paths and small objects, not the token arrays (a spawned worker's copy)
    copy = pickle.loads(blob)
    assert len(copy) == len(dataset) and np.array_equal(copy.token_ids(7), dataset.token_ids(7))
    assert torch_equal(copy[3]["pixel_values"], dataset[3]["pixel_values"])


def torch_equal(a, b):
    return a.shape == b.shape and bool((a == b).all())


def test_a_damaged_row_group_is_a_one_line_error_and_leaves_nothing(tokenizer, tmp_path):
    data = tmp_path / "damaged.parquet"
    write_published_shape(data, 200, row_group_rows=100, pool_size=2)
    damaged = bytearray(data.read_bytes())
    damaged[200:3000] = b"\x5a" * 2800  # inside the first row group's compressed conversations
    data.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=r"damaged\.parquet: row group 0 cannot be read"):
        open_dataset(data, tokenizer, prepared_dir=tmp_path / "p", prepare_workers=2)
    assert not [p for p in (tmp_path / "p").rglob("*") if p.is_file() and not p.name.endswith(".lock")]


# ------------------------------------------------------------------------ builders on shared filesystems

def build_in_child(path, cache_dir, tokenizer, results, name, no_lock):
    """One builder process: flock does nothing here (NFS local_lock, Lustre localflock, FUSE); with `no_lock`
    the build lock does not exclude either, so both processes build at once."""
    import fcntl

    fcntl.flock = lambda *args, **kwargs: None
    if no_lock:
        prepared_module.BuildLock.__enter__ = lambda self: self
        prepared_module.BuildLock.__exit__ = lambda self, *exc: None
    run_units = prepared_module.run_units

    def slow_units(job, units, workers):  # a build long enough for the other builder to start meanwhile
        for result in run_units(job, units, workers):
            time.sleep(0.5)
            yield result

    prepared_module.run_units = slow_units
    try:
        data = prepare_dataset(path, tokenizer, CONFIG.image_special_token, IMAGE_TOKEN_ID, 2048, cache_dir=cache_dir,
                               workers=1, log=lambda message: results.put((name, "log", message)))
        ids = [data.token_ids(i).tolist() for i in range(len(data))]
        records = RecordView(data)
        results.put((name, "ok", (str(data.folder), ids, [records[i].images for i in range(len(data))])))
    except BaseException as error:  # noqa: BLE001 - the parent reports it
        results.put((name, "error", f"{type(error).__name__}: {error}"))


@pytest.mark.parametrize("no_lock", [False, True], ids=["lock", "no_lock"])
def test_two_builders_with_a_no_op_flock_on_one_folder_both_succeed(published, tokenizer, tmp_path, no_lock):
    import multiprocessing

    path, facts = published
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    builders = [context.Process(target=build_in_child, args=(path, tmp_path / "shared", tokenizer, results, name,
                                                             no_lock)) for name in ("a", "b")]
    for builder in builders:
        builder.start()
    outcomes, logs = {}, []
    while len(outcomes) < 2:
        name, kind, value = results.get(timeout=300)
        if kind == "log":
            logs.append((name, value))
        else:
            outcomes[name] = (kind, value)
    for builder in builders:
        builder.join(timeout=60)
    assert {kind for kind, _ in outcomes.values()} == {"ok"}, outcomes
    (folder_a, ids_a, images_a), (folder_b, ids_b, images_b) = outcomes["a"][1], outcomes["b"][1]
    assert folder_a == folder_b and ids_a == ids_b and images_a == images_b and len(ids_a) == facts["rows"]
    built = {name for name, message in logs if message.startswith("prepared ")}
    assert len(built) == (2 if no_lock else 1)  # with the lock one builds and the other reuses its files
    leftovers = [p.name for p in (tmp_path / "shared").rglob("*") if re.search(r"building|stale|removed|lock", p.name)]
    assert not leftovers


def test_a_dead_builders_lock_is_taken_over_and_only_its_leftovers_deleted(published, tokenizer, tmp_path,
                                                                          monkeypatch):
    path, facts = published
    monkeypatch.setattr(prepared_module, "LOCK_STALE_S", 1.0)
    monkeypatch.setattr(prepared_module, "WAIT_POLL_S", 0.1)
    cache = tmp_path / "cache"
    key = prepared_module.data_key(path, None, "parquet")
    data_dir = prepared_module.prepared_root(path, cache) / f"{path.stem}-{key}"
    data_dir.mkdir(parents=True)
    lock = data_dir.with_name(data_dir.name + ".build-lock")
    lock.mkdir()
    (lock / "heartbeat").write_text("deadhost-1-cafe 7")  # a builder that died: its heartbeat never moves
    (data_dir / ".images-building-deadhost-1-cafe").mkdir()
    (data_dir / ".images-building-otherhost-2-beef").mkdir()  # a live builder's: not ours to delete
    started = time.monotonic()
    data = prepare_dataset(path, tokenizer, CONFIG.image_special_token, IMAGE_TOKEN_ID, 2048, cache_dir=cache,
                           workers=1, log=None)
    assert time.monotonic() - started >= 1.0 and len(data) == facts["rows"]
    assert not (data_dir / ".images-building-deadhost-1-cafe").exists()
    assert (data_dir / ".images-building-otherhost-2-beef").is_dir()
    assert not lock.exists()


def test_a_filesystem_that_cannot_lock_is_one_line_naming_prepared_dir(published, tokenizer, tmp_path, monkeypatch):
    path, _ = published
    replace = os.replace

    def no_rename_into_the_lock(src, dst):
        if str(dst).endswith("heartbeat"):
            raise OSError(95, "Operation not supported")
        return replace(src, dst)

    monkeypatch.setattr(prepared_module.os, "replace", no_rename_into_the_lock)
    with pytest.raises(DataError) as error:
        prepare_dataset(path, tokenizer, CONFIG.image_special_token, IMAGE_TOKEN_ID, 2048, cache_dir=tmp_path,
                        workers=1, log=None)
    message = str(error.value)
    assert "\n" not in message and "--prepared_dir" in message and "Operation not supported" in message
    assert not list(tmp_path.rglob("*lock*"))  # the half-taken lock is gone again
