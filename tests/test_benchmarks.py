"""Benchmarks: readers on small parquet files with the real schemas, lmms-eval prompts and parsing, metrics
against hand-computed values, prefix reuse against full prefills, and the eval_bench CLI end to end."""
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dev import synthetic
from inference import benchmarks as bm
from inference.bench_run import read_predictions, recompute_result, run_benchmark
from inference.loading import load_model
from model.weights import weight_path
from scripts import eval_bench

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def jpeg(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_parquet(path, columns: dict, types: dict = None):
    types = types or {}
    table = pa.table({name: pa.array(values, types.get(name)) for name, values in columns.items()})
    pq.write_table(table, path)
    return path


def image_cells(colours):
    return [{"bytes": jpeg(colour), "path": f"{colour}.jpg"} for colour in colours]


def record(answer, parsed, category="c", group=None, l2=None, id="0"):
    return {"id": id, "answer": answer, "parsed": parsed, "correct": parsed == answer, "category": category,
            "group": group if group is not None else id, "l2_category": l2}


# ------------------------------------------------------------------------------------------------- POPE

def test_pope_reader_prompt_and_metrics(tmp_path):
    path = write_parquet(tmp_path / "test-00000-of-00001.parquet", {
        "id": ["0", "1", "2"], "question_id": ["10", "11", "12"],
        "question": ["Is there a dog in the image? ", "Is there a cat in the image?", "Is there a car in the image?"],
        "answer": ["yes", "no", "yes"], "image_source": ["a", "a", "b"],
        "image": image_cells(["red", "red", "blue"]), "category": ["adversarial", "adversarial", "random"]},
        {"image": IMAGE_TYPE})
    questions, images = bm.read_benchmark("pope", tmp_path)  # a folder of shards
    assert len(questions) == 3 and len(images) == 2  # the two rows of image "a" share one stored image
    assert questions[0].text == "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    assert questions[0].image == questions[1].image != questions[2].image
    assert (questions[1].id, questions[1].answer, questions[1].labels) == ("11", "no", ("yes", "no"))
    assert bm.read_benchmark("pope", path)[0] == questions  # a single file reads the same

    # answers yes yes no no, predictions yes no yes other: TP 1, FN 1, FP 1
    records = [record("yes", "yes", "x"), record("yes", "no", "x"), record("no", "yes", "y"), record("no", "other", "y")]
    metrics = bm.pope_metrics(records)
    assert metrics["accuracy"] == 0.25
    assert (metrics["precision"], metrics["recall"], metrics["f1"]) == (0.5, 0.5, 0.5)
    assert metrics["yes_ratio"] == 0.5  # of the predictions: 2 of 4 say yes (the labels' ratio would also be 0.5)
    assert metrics["category"]["x"] == {"accuracy": 0.5, "precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3),
                                        "yes_ratio": 0.5}
    assert metrics["category"]["y"]["precision"] == 0.0 and metrics["category"]["y"]["yes_ratio"] == 0.5
    assert bm.parse_pope(" Yes\n", questions[0]) == "yes" and bm.parse_pope("Yes.", questions[0]) == "yes."


# ------------------------------------------------------------------------------------------------- MME

def test_mme_pairs_and_scores(tmp_path):
    write_parquet(tmp_path / "test-00000-of-00004.parquet", {
        "question_id": ["existence/1.png", "existence/1.png"],
        "image": image_cells(["red", "red"]),
        "question": ["Is there a dog in this image? Please answer yes or no.",
                     "Is there a cat in this image? Please answer yes or no."],
        "answer": ["Yes", "No"], "category": ["existence", "existence"]}, {"image": IMAGE_TYPE})
    questions, images = bm.read_benchmark("mme", tmp_path)
    assert len(images) == 1 and questions[0].group == questions[1].group == "existence/1.png"
    assert questions[0].text == "Is there a dog in this image?\nAnswer the question using a single word or phrase."
    assert [q.answer for q in questions] == ["yes", "no"] and questions[0].id != questions[1].id

    records = [record("yes", "yes", "existence", "i1", id="0"), record("no", "no", "existence", "i1", id="1"),
               record("yes", "yes", "existence", "i2", id="2"), record("no", "yes", "existence", "i2", id="3"),
               record("yes", "no", "count", "i3", id="4"), record("no", "yes", "count", "i3", id="5"),
               record("yes", "yes", "code_reasoning", "i4", id="6"), record("no", "no", "code_reasoning", "i4", id="7")]
    metrics = bm.mme_metrics(records)
    # existence: image 1 acc 100 + acc+ 100, image 2 acc 50 + acc+ 0 -> (200 + 50) / 2 = 125; count: 0
    assert metrics["subtask"] == {"code_reasoning": 200.0, "count": 0.0, "existence": 125.0}
    assert (metrics["perception"], metrics["cognition"]) == (125.0, 200.0)
    assert bm.chance_levels("mme", questions) == {"perception": 75.0, "cognition": 0.0}
    for text, parsed in (("Yes", "yes"), ("no.", "no"), ("y", "yes"), ("N", "no"), ("Yes, there is.", "yes"),
                         ("There is no dog", "other"), ("x", "other")):
        assert bm.parse_mme(text, questions[0]) == parsed, text


# ------------------------------------------------------------------------------------------------- MMStar

def test_mmstar_l2_average(tmp_path):
    write_parquet(tmp_path / "mmstar.parquet", {
        "index": [0, 1], "question": ["Which animal?\nOptions: A: cat, B: dog, C: cow, D: fox", "How many?"],
        "image": image_cells(["red", "blue"]), "answer": ["B", "D"], "category": ["coarse perception", "math"],
        "l2_category": ["image emotion", "geometry"], "meta_info": [{"source": "x"}, {"source": "y"}]},
        {"image": IMAGE_TYPE})
    questions, _ = bm.read_benchmark("mmstar", tmp_path / "mmstar.parquet")
    assert questions[0].text.endswith("D: fox\nAnswer with the option's letter from the given choices directly")
    assert questions[0].labels == ("A", "B", "C", "D")

    records = [record("A", "A", "p", l2="l1", id="0"), record("B", "C", "p", l2="l1", id="1"),
               record("C", "C", "p", l2="l2", id="2"), record("D", "A", "q", l2="l3", id="3")]
    metrics = bm.mmstar_metrics(records)
    assert metrics["l2_category"] == {"l1": 0.5, "l2": 1.0, "l3": 0.0}
    assert metrics["average"] == 0.5  # (0.5 + 1 + 0) / 3, not the 2/4 of the questions
    assert metrics["category"] == {"p": 0.75, "q": 0.0}
    for text, parsed in (("B", "B"), ("b) a dog", "B"), ("(C) cow", "C"), ("Option d", "D"),
                         ("The answer is A.", "A"), ("", "other")):
        assert bm.parse_mmstar(text, questions[0]) == parsed, text


# ------------------------------------------------------------------------------------------------- MMBench

def mmbench_rows():
    """Question 7 (three options, D null) in three circular copies, and question 8 (two options) in two."""
    return {
        "index": [7, 8, 1000007, 1000008, 2000007],
        "question": ["What colour is it?", "Is it big?", "What colour is it?", "Is it big?", "What colour is it?"],
        "hint": ["A plain picture.", None, "A plain picture.", None, "A plain picture."],
        "A": ["red", "yes", "green", "no", "blue"], "B": ["green", "no", "blue", "yes", "red"],
        "C": ["blue", None, "red", None, "green"], "D": [None, None, None, None, None],
        "answer": ["A", "A", "C", "B", "B"],
        "category": ["colour", "size", "colour", "size", "colour"],
        "L2-category": ["attribute", "attribute", "attribute", "attribute", "attribute"],
        "image": image_cells(["red"] * 5), "source": ["s"] * 5, "split": ["dev"] * 5,
        "comment": [None] * 5,
    }


def test_mmbench_prompt_null_option_and_circular_score(tmp_path):
    write_parquet(tmp_path / "dev-00000-of-00001.parquet", mmbench_rows(),
                  {"image": IMAGE_TYPE, "C": pa.string(), "D": pa.string(), "comment": pa.string()})
    questions, images = bm.read_benchmark("mmbench_en", tmp_path)
    assert len(images) == 1
    assert questions[0].text == ("A plain picture. What colour is it? There are several options:\nA. red\nB. green\n"
                                 "C. blue\n\nAnswer with the option's letter from the given choices directly.")
    assert questions[1].text.startswith("Is it big? There are several options:\nA. yes\nB. no\n\n")
    assert questions[0].labels == ("A", "B", "C") and questions[1].labels == ("A", "B")  # null options left out
    assert [q.group for q in questions] == ["7", "8", "7", "8", "7"]
    cn, _ = bm.read_benchmark("mmbench_cn", tmp_path)
    assert "有如下几个选项：\nA. red" in cn[0].text and cn[0].text.endswith("\n\n请直接使用所提供的选项字母作为答案回答。")

    predictions = ["A", "A", "C", "A", "B"]  # question 7: all three copies right; question 8: second copy wrong
    records = [record(q.answer, p, q.category, q.group, id=q.id) for q, p in zip(questions, predictions)]
    metrics = bm.mmbench_metrics(records)
    assert metrics == {"overall": 0.5, "category": {"colour": 1.0, "size": 0.0}}
    # guessing: question 7 (1/3)^3, question 8 (1/2)^2
    assert bm.chance_levels("mmbench_en", questions)["overall"] == pytest.approx(((1 / 3) ** 3 + 0.25) / 2)
    for text, parsed in (("A", "A"), ("The answer is (C).", "C"), ("B. green", "B"), ("It is blue", "C"),
                         ("A dog is in a box", "other"), ("red or green", "other")):
        assert bm.parse_mmbench(text, questions[0]) == parsed, text


# ------------------------------------------------------------------------------------------------- ScienceQA

def test_scienceqa_hint_choices_and_accuracy(tmp_path):
    write_parquet(tmp_path / "test.parquet", {
        "image": image_cells(["red", "blue", "green"]),
        "question": ["Which is a mammal?", "Which is hot?", "Pick one."],
        "choices": [["cat", "snake"], ["ice", "fire", "snow"], ["x", "y"]], "answer": [0, 1, 1],
        "hint": ["Look at the picture.", "", ""], "task": ["c"] * 3, "grade": ["g"] * 3, "subject": ["s"] * 3,
        "topic": ["t"] * 3, "category": ["biology", "physics", "physics"], "skill": ["k"] * 3,
        "lecture": [""] * 3, "solution": [""] * 3}, {"image": IMAGE_TYPE})
    questions, _ = bm.read_benchmark("scienceqa_img", tmp_path / "test.parquet")
    assert questions[0].text == ("Context: Look at the picture.\nWhich is a mammal?\nA. cat\nB. snake\n"
                                 "Answer with the option's letter from the given choices directly.")
    assert questions[1].text.startswith("Which is hot?\nA. ice\nB. fire\nC. snow\n")
    assert [q.answer for q in questions] == ["A", "B", "B"] and questions[1].labels == ("A", "B", "C")
    assert [q.category for q in questions] == ["biology", "physics", "physics"]
    records = [record("A", bm.parse_scienceqa("A", questions[0])), record("B", bm.parse_scienceqa("B. fire", questions[1])),
               record("B", bm.parse_scienceqa("fire", questions[2]))]
    assert bm.scienceqa_metrics(records) == {"accuracy": pytest.approx(2 / 3)}
    assert bm.chance_levels("scienceqa_img", questions)["accuracy"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)


def test_wrong_file_is_a_one_line_error(tmp_path):
    path = write_parquet(tmp_path / "x.parquet", {"question": ["q"], "answer": ["yes"]})
    with pytest.raises(bm.BenchmarkDataError, match=r"x.parquet: missing column\(s\) \['question_id', 'image', "
                                                    r"'category'\]"):
        bm.read_benchmark("pope", path)
    with pytest.raises(FileNotFoundError, match="--data_path"):
        bm.read_benchmark("pope", tmp_path / "absent")


def test_limit_keeps_groups_whole():
    questions = [bm.Question(id=str(i), text="t", image="k", answer="yes", labels=bm.YES_NO, category="c",
                             group=str(i // 2)) for i in range(10)]
    sample = bm.sample_questions(questions, 3, seed=1)
    assert len(sample) == 4 and all(sum(q.group == s.group for q in sample) == 2 for s in sample)
    assert sample == bm.sample_questions(questions, 3, seed=1)  # fixed seed


# ------------------------------------------------------------------------------------------------- scoring

@pytest.fixture(scope="module")
def tiny_loaded(tiny_vlm_save_dir, tiny_clip_dir, tiny_tokenizer_dir):
    return load_model(weight_path(tiny_vlm_save_dir, "sft_vlm", 64, False), False, tiny_tokenizer_dir,
                      tiny_clip_dir, "cpu", log=None)


@pytest.fixture(scope="module")
def pope_file(tmp_path_factory):
    """Three shape pictures with 18 yes/no questions each, in the POPE schema."""
    return synthetic.write_pope_parquet(tmp_path_factory.mktemp("pope") / "pope.parquet", 3, all_questions=True)


def test_synthetic_pope_file_has_the_lmms_lab_schema(pope_file):
    """The dataset card's features: every column a string except the image, struct<bytes, path>."""
    schema = pq.read_schema(pope_file)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert [(field.name, field.type) for field in schema] == [
        ("id", pa.string()), ("question_id", pa.string()), ("question", pa.string()), ("answer", pa.string()),
        ("image_source", pa.string()), ("image", image), ("category", pa.string())]


def test_synthetic_pope_file_carries_the_datasets_image_feature(pope_file):
    """The schema metadata `datasets` writes and reads (b"huggingface" -> info.features), as in the Hub's files:
    `datasets` takes a feature only where its arrow type is the column's, so each must match."""
    schema = pq.read_schema(pope_file)
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    string = {"dtype": "string", "_type": "Value"}
    assert features == {"id": string, "question_id": string, "question": string, "answer": string,
                        "image_source": string, "image": {"_type": "Image"}, "category": string}
    arrow_type = {"Value": pa.string(), "Image": IMAGE_TYPE}
    assert all(schema.field(name).type == arrow_type[feature["_type"]] for name, feature in features.items())


def test_datasets_decodes_the_synthetic_pope_images(pope_file):
    """What lmms-eval's POPE task does with the file: load it with `datasets` and call .convert on each image."""
    datasets = pytest.importorskip("datasets")
    rows = datasets.Dataset.from_parquet(str(pope_file))
    table = pq.read_table(pope_file)
    assert len(rows) == table.num_rows and isinstance(rows.features["image"], datasets.Image)
    first = rows[0]
    assert first["image"].convert("RGB").size == Image.open(io.BytesIO(table["image"][0]["bytes"].as_py())).size
    assert first["id"] == table["id"][0].as_py() and isinstance(first["question_id"], str)


@pytest.fixture(scope="module")
def tiny_loaded_3v(tiny_vlm3_save_dir, tiny_siglip_dir, tiny_minimind3_tokenizer_dir):
    return load_model(weight_path(tiny_vlm3_save_dir, "sft_vlm", 64, False), False, tiny_minimind3_tokenizer_dir,
                      tiny_siglip_dir, "cpu", log=None)


@pytest.mark.parametrize("preset", ["minimind2-v", "minimind-3v"])
def test_prefix_reuse_scores_equal_full_prefill(preset, request, pope_file):
    tiny_loaded = request.getfixturevalue("tiny_loaded" if preset == "minimind2-v" else "tiny_loaded_3v")
    questions, images = bm.read_benchmark("pope", pope_file)
    shared, _ = run_benchmark("pope", tiny_loaded, questions, images, batch_size=4, max_new_tokens=3,
                              progress=False)
    full, _ = run_benchmark("pope", tiny_loaded, questions, images, batch_size=4, max_new_tokens=3,
                            share_prefix=False, progress=False)
    assert len(shared) == 54
    for a, b in zip(shared, full):
        for key in ("generate", "generate_blind"):
            assert a["prediction"][key] == b["prediction"][key]
        for key in ("likelihood", "likelihood_blind"):
            for label, value in a["label_logprobs"][key].items():
                assert value == pytest.approx(b["label_logprobs"][key][label], abs=1e-4)


def test_label_scores_are_the_spellings_log_probabilities(tiny_loaded, pope_file):
    """"yes" = log(P(Yes) + P(yes)) after the prompt, each spelling's tokens scored one by one."""
    questions, images = bm.read_benchmark("pope", pope_file)
    question = questions[0]
    records, _ = run_benchmark("pope", tiny_loaded, [question], images, modes=("likelihood",), blind=True,
                               progress=False)
    tokenizer, model = tiny_loaded.tokenizer, tiny_loaded.model
    prompt = synthetic_blind_prompt(tokenizer, model, question.text)

    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids

    def spelling_logprob(spelling):
        spelling_ids = tokenizer(spelling, add_special_tokens=False).input_ids
        ids = torch.tensor([prompt_ids + spelling_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)  # [T, V]
        return sum(float(logprobs[t - 1, ids[0, t]]) for t in range(len(prompt_ids), ids.shape[1]))

    expected = torch.logsumexp(torch.tensor([spelling_logprob("Yes"), spelling_logprob("yes")]), dim=0)
    assert records[0]["label_logprobs"]["likelihood_blind"]["yes"] == pytest.approx(float(expected), abs=1e-4)


def synthetic_blind_prompt(tokenizer, model, text):
    from dataset.processing import build_prompt

    return build_prompt(tokenizer, [{"role": "user", "content": text}], model.config.image_special_token, True)


def test_eval_bench_cli_writes_result_and_predictions(tmp_path, tiny_vlm_save_dir, tiny_clip_dir,
                                                      tiny_tokenizer_dir, pope_file, capsys):
    flags = ["--weight", str(weight_path(tiny_vlm_save_dir, "sft_vlm", 64, False)), "--hidden_size", "64",
             "--num_hidden_layers", "2", "--vision_model_path", str(tiny_clip_dir), "--tokenizer_path",
             str(tiny_tokenizer_dir), "--device", "cpu", "--max_new_tokens", "2", "--no_progress"]
    out, pred = tmp_path / "r.json", tmp_path / "p.jsonl"
    eval_bench.main(["--bench", "pope", "--data_path", str(pope_file), "--limit", "20", "--out", str(out),
                     "--predictions", str(pred), *flags])
    card = capsys.readouterr().out
    assert "| pope | likelihood | accuracy |" in card and "| 50.0% |" in card
    result = json.loads(out.read_text())
    assert set(result) == {"bench", "samples", "modes", "chance", "checkpoint", "seconds"}
    assert result["samples"] == 20 and set(result["modes"]) == {"generate", "likelihood"}
    assert set(result["modes"]["generate"]["metrics"]) == {"accuracy", "precision", "recall", "f1", "yes_ratio",
                                                           "category"}
    records = read_predictions(pred)
    assert len(records) == 20
    assert set(records[0]["prediction"]) == {"generate", "generate_blind", "likelihood", "likelihood_blind"}
    assert recompute_result(result, records) == result["modes"]

    eval_bench.main(["--bench", "pope", "--data_path", str(pope_file), "--limit", "20", "--out",
                     str(tmp_path / "b.json"), "--modes", "likelihood", "--no_blind", *flags])
    capsys.readouterr()
    eval_bench.main(["--compare", str(out), str(tmp_path / "b.json")])
    table = capsys.readouterr().out
    assert "| pope | likelihood | accuracy |" in table and "| pope | generate | accuracy |" in table
    assert "A blind" in table and "B image" in table


def test_eval_bench_scores_a_minimind3v_checkpoint(tmp_path, tiny_vlm3_save_dir, tiny_siglip_dir,
                                                  tiny_minimind3_tokenizer_dir, pope_file, capsys):
    out, pred = tmp_path / "r.json", tmp_path / "p.jsonl"
    eval_bench.main(["--bench", "pope", "--data_path", str(pope_file), "--limit", "6", "--out", str(out),
                     "--predictions", str(pred), "--weight", str(weight_path(tiny_vlm3_save_dir, "sft_vlm", 64, False)),
                     "--vision_model_path", str(tiny_siglip_dir), "--tokenizer_path", str(tiny_minimind3_tokenizer_dir),
                     "--device", "cpu", "--max_new_tokens", "2", "--no_progress"])
    assert "| pope | likelihood | accuracy |" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["samples"] == 6 and recompute_result(result, read_predictions(pred)) == result["modes"]
