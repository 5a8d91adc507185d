"""Any transformers causal LM as the language model (model/model_hf_vlm.py, --language_model): the composed
forward, the added image placeholder, the answer spans of the tokenizer's own chat template, both training stages,
loading the result back for the terminal chat and the API server."""
import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common import quiet_transformers
from dataset.processing import assistant_turn_markers, build_prompt, load_tokenizer, render_prompt
from dataset.records import SampleEncoder
from inference.generation import GenerationSettings, answer_once
from inference.loading import load_model
from model.model_hf_vlm import IMAGE_PLACEHOLDER, TOKENIZER_CHAT_FORMAT, TransformersVLM
from model.model_minimind import IGNORE_INDEX
from model.weights import read_architecture
from trainer.setup import set_trainable
from trainer.training import run_stage

REPO_ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What colour is the shape?"


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def lm_dir(request):
    return request.getfixturevalue(f"tiny_{request.param}_dir")


def composed(lm_dir, clip_dir, seed=0):
    """(model, tokenizer): the LM folder's weights with a fresh projector on the tiny CLIP."""
    tokenizer = load_tokenizer(lm_dir)
    torch.manual_seed(seed)
    with quiet_transformers():
        model = TransformersVLM.from_language_model(lm_dir, tokenizer, clip_dir)
    return model.eval(), tokenizer


def prompt_ids(model, tokenizer, text=QUESTION, images=1):
    messages = [{"role": "user", "content": "<image>\n" * images + text}]
    prompt = build_prompt(tokenizer, messages, model.config.image_special_token, True, model.config.chat_format)
    return tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids


def test_loaded_models_run_their_own_code_with_no_hub_kernels(lm_dir, tiny_clip_dir):
    """transformers 5.x's from_pretrained turns on hub kernels by default (the rotary embedding of Llama and Qwen2 is
    one): the first train()/eval() on a GPU then downloads them, a ValueError offline (seen on an H200). The LM and
    the encoder are loaded without them."""
    model, _ = composed(lm_dir, tiny_clip_dir)
    assert model.language_model.use_kernels is False and model.vision_encoder.use_kernels is False


def test_placeholder_token_is_added_and_the_embeddings_grow(tiny_qwen2_dir, tiny_clip_dir):
    plain = load_tokenizer(tiny_qwen2_dir)
    assert IMAGE_PLACEHOLDER not in plain.get_vocab()
    model, tokenizer = composed(tiny_qwen2_dir, tiny_clip_dir)
    assert len(tokenizer) == len(plain) + 1
    assert model.image_token_id == tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER) == len(plain)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.config.image_ids == [model.image_token_id] * 196 and model.config.chat_format == "tokenizer"
    # The inference side adds the same token with the same id from the config alone.
    again = load_tokenizer(tiny_qwen2_dir, model.config)
    assert again.convert_tokens_to_ids(IMAGE_PLACEHOLDER) == model.image_token_id
    run = again(model.config.image_special_token, add_special_tokens=False).input_ids
    assert run == model.config.image_ids


def test_forward_with_images_is_the_lm_on_the_spliced_embeddings(lm_dir, tiny_clip_dir):
    model, tokenizer = composed(lm_dir, tiny_clip_dir)
    torch.nn.init.normal_(model.vision_proj.vision_proj[0].weight)  # features far from any token embedding
    ids = prompt_ids(model, tokenizer)
    pixels = torch.randn(1, 1, 3, 224, 224)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits
        embeds = model.language_model.get_input_embeddings()(ids).clone()
        features = model.vision_proj(model.encode_images(pixels[0]))  # [1, 196, hidden]
        embeds[ids == model.image_token_id] = features.reshape(-1, embeds.shape[-1])
        expected = model.language_model(inputs_embeds=embeds).logits
        without_image = model(input_ids=ids).logits
    assert torch.allclose(logits, expected, atol=1e-6)
    assert not torch.allclose(logits, without_image, atol=1e-3)  # the image reached the LM


def test_loss_is_the_token_mean_cross_entropy_over_targets(lm_dir, tiny_clip_dir):
    model, tokenizer = composed(lm_dir, tiny_clip_dir)
    ids = prompt_ids(model, tokenizer).repeat(2, 1)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, -5:] = ids[0, -5:]
    labels[1, -9:-2] = ids[1, -9:-2]
    pixels = torch.randn(2, 1, 3, 224, 224)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits
        full = model(input_ids=ids, pixel_values=pixels, labels=labels)
        loss_only = model(input_ids=ids, pixel_values=pixels, labels=labels, loss_only=True)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=IGNORE_INDEX)
    assert torch.allclose(full.loss, expected, atol=1e-5) and torch.allclose(loss_only.loss, expected, atol=1e-5)
    assert loss_only.logits is None


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_labels_cover_exactly_the_assistant_answers_and_their_end(family, request):
    tokenizer = load_tokenizer(request.getfixturevalue(f"tiny_{family}_dir"))
    encoder = SampleEncoder(tokenizer, IMAGE_PLACEHOLDER * 4, 0, 4096, chat_format=TOKENIZER_CHAT_FORMAT)
    answers = ["It is a red circle.", "Yes"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is it?"},
                {"role": "assistant", "content": answers[0]}, {"role": "user", "content": "Is it red?"},
                {"role": "assistant", "content": answers[1]}]
    ids = encoder.encode_chats([(messages, 0)])[0].ids
    mask = encoder.label_mask(ids)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    spans = [tokenizer.decode(ids[start:stop]) for start, stop in zip(edges[::2], edges[1::2])]
    end = assistant_turn_markers(tokenizer, TOKENIZER_CHAT_FORMAT)[1]
    assert end == {"qwen2": "<|im_end|>\n", "llama": "<|eot_id|>"}[family]
    assert spans == [answer + end for answer in answers]


def test_template_without_an_answer_layout_is_one_line_error(tiny_qwen2_dir):
    tokenizer = load_tokenizer(tiny_qwen2_dir)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(Exception, match="chat template does not render an assistant turn"):
        assistant_turn_markers(tokenizer, TOKENIZER_CHAT_FORMAT)


def test_trainable_sets_find_the_lm_layers(tiny_llama_dir, tiny_clip_dir):
    model, _ = composed(tiny_llama_dir, tiny_clip_dir)
    set_trainable(model, "projector_last_layer")
    trained = {name.split(".")[0] if name.startswith("vision_proj") else ".".join(name.split(".")[:4])
               for name, p in model.named_parameters() if p.requires_grad}
    assert trained == {"vision_proj", "language_model.model.layers.1"}
    set_trainable(model, "all")
    assert all(p.requires_grad for p in model.parameters())


def stage_argv(lm_dir, clip_dir, data, out, data_key, images_key, *extra):
    return ["--device", "cpu", "--num_workers", "0", "--language_model", str(lm_dir), "--vision_model_path",
            str(clip_dir), "--data_path", str(data[data_key]), "--images_path", str(data[images_key]),
            "--save_dir", str(out / "out"), "--checkpoint_dir", str(out / "ckpt"), "--batch_size", "2",
            "--log_interval", "1", *extra]


@pytest.fixture(scope="module")
def trained_qwen2(tiny_qwen2_dir, tiny_clip_dir, shapes_data, tmp_path_factory):
    """Pretrain (2 steps) then SFT (2 steps) with the tiny Qwen2 as the LM, as users run the stage scripts."""
    out = tmp_path_factory.mktemp("hf_lm_run")
    run_stage("pretrain", "pretrain", stage_argv(tiny_qwen2_dir, tiny_clip_dir, shapes_data, out, "pretrain_jsonl",
                                                 "pretrain_images", "--max_steps", "2"))
    run_stage("sft", "sft", stage_argv(tiny_qwen2_dir, tiny_clip_dir, shapes_data, out, "sft_jsonl", "sft_images",
                                       "--max_steps", "2", "--learning_rate", "1e-3"))
    return out


def test_pretrain_then_sft_save_weights_that_load_back_exactly(trained_qwen2, tiny_qwen2_dir, tiny_clip_dir):
    pretrained, sft = (torch.load(trained_qwen2 / "out" / f"{name}_vlm_64.pth", weights_only=True)
                       for name in ("pretrain", "sft"))
    assert set(sft) == set(pretrained) and all(k.startswith(("language_model.", "vision_proj.")) for k in sft)
    assert not torch.equal(sft["language_model.model.layers.0.mlp.up_proj.weight"],
                           pretrained["language_model.model.layers.0.mlp.up_proj.weight"])  # SFT trains the LM
    architecture = read_architecture(trained_qwen2 / "out" / "sft_vlm_64.pth")
    assert architecture.config.language_model == str(tiny_qwen2_dir)
    # The inference loader rebuilds the model from the architecture file: its logits are those of the trained
    # weights (the resume checkpoint's, rounded to the .pth's fp16).
    loaded = load_model(trained_qwen2 / "out" / "sft_vlm_64.pth", False, None, tiny_clip_dir, "cpu", log=None)
    resume = torch.load(trained_qwen2 / "ckpt" / "sft_vlm_64_resume.pth", weights_only=False)["model"]
    with quiet_transformers():
        reference = TransformersVLM(architecture.config, vision_model_path=tiny_clip_dir).eval()
    reference.load_state_dict({k: v.half().float() for k, v in resume.items()})
    ids = prompt_ids(loaded.model, loaded.tokenizer)
    pixels = torch.randn(1, 1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids, pixel_values=pixels).logits,
                           reference(input_ids=ids, pixel_values=pixels).logits)


def test_greedy_generation_with_the_kv_cache_equals_recomputing_everything(trained_qwen2, tiny_clip_dir):
    loaded = load_model(trained_qwen2 / "out" / "sft_vlm_64.pth", False, None, tiny_clip_dir, "cpu", log=None)
    model, ids = loaded.model, prompt_ids(loaded.model, loaded.tokenizer)
    pixels = torch.randn(1, 1, 3, 224, 224)
    steps = 6
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                                max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                pad_token_id=loaded.tokenizer.pad_token_id)[0, ids.shape[1]:]
        sequence = ids
        for _ in range(steps):
            logits = model(input_ids=sequence, pixel_values=pixels).logits[:, -1]
            logits[:, loaded.tokenizer.eos_token_id] = -float("inf")  # as min_new_tokens does
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    assert cached.tolist() == sequence[0, ids.shape[1]:].tolist()


def test_terminal_chat_answers_with_the_trained_model(trained_qwen2, tiny_clip_dir, shapes_data):
    image = sorted(Path(shapes_data["eval_images"]).iterdir())[0]
    result = subprocess.run([sys.executable, "eval_vlm.py", "--device", "cpu", "--weight",
                             str(trained_qwen2 / "out" / "sft_vlm_64.pth"), "--vision_model_path", str(tiny_clip_dir),
                             "--image", str(image), "--prompt", QUESTION, "--temperature", "0",
                             "--max_new_tokens", "5"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    loaded = load_model(trained_qwen2 / "out" / "sft_vlm_64.pth", False, None, tiny_clip_dir, "cpu", log=None)
    answer, stats = answer_once(loaded, QUESTION, [image], GenerationSettings(5, 0.0, 1.0))
    assert stats.tokens >= 1 and answer in result.stdout


def test_llama_trains_a_step_and_resumes(tiny_llama_dir, tiny_clip_dir, shapes_data, tmp_path, capsys):
    from scripts import check_data

    # scripts.check_data with the same LM prepares the very data the trainer then reads (no second folder).
    assert check_data.main([str(shapes_data["pretrain_jsonl"]), "--images_path", str(shapes_data["pretrain_images"]),
                            "--language_model", str(tiny_llama_dir), "--vision_model_path", str(tiny_clip_dir),
                            "--prepared_dir", str(tmp_path / "prepared"), "--workers", "1"]) == 0
    assert "OK: every record and image can be used" in capsys.readouterr().out
    prepared_folders = sorted((tmp_path / "prepared").rglob("tokens-*"))
    argv = stage_argv(tiny_llama_dir, tiny_clip_dir, shapes_data, tmp_path, "pretrain_jsonl", "pretrain_images",
                      "--prepared_dir", str(tmp_path / "prepared"), "--max_steps", "1")
    run_stage("pretrain", "pretrain", argv)
    assert sorted((tmp_path / "prepared").rglob("tokens-*")) == prepared_folders and len(prepared_folders) == 1
    first = torch.load(tmp_path / "ckpt" / "pretrain_vlm_64_resume.pth", weights_only=False)
    assert first["global_step"] == 1 and "language_model.lm_head.weight" in first["model"]  # untied
    run_stage("pretrain", "pretrain", argv[:-1] + ["2", "--from_resume", "1"])
    second = torch.load(tmp_path / "ckpt" / "pretrain_vlm_64_resume.pth", weights_only=False)
    assert second["global_step"] == 2
    exported_logits_match(tmp_path / "out" / "pretrain_vlm_64.pth", tmp_path / "folder", tiny_clip_dir)


def test_api_server_answers_with_the_trained_model(trained_qwen2, tiny_clip_dir, shapes_data, tmp_path):
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from dev.serving import wait_until_serving

    image = sorted(Path(shapes_data["eval_images"]).iterdir())[0]
    weights = trained_qwen2 / "out" / "sft_vlm_64.pth"
    command = [sys.executable, "-m", "scripts.serve_openai_api", "--port", "0", "--device", "cpu", "--weight",
               str(weights), "--vision_model_path", str(tiny_clip_dir), "--max_new_tokens", "5", "--temperature",
               "0", "--api_key", "key"]
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = openai.OpenAI(base_url=f"{wait_until_serving(process, log_path, 120)}/v1", api_key="key",
                               max_retries=0, timeout=120)
        url = "data:image/jpeg;base64," + base64.b64encode(image.read_bytes()).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]
        response = client.chat.completions.create(model="sft_vlm_64", temperature=0,
                                                  messages=[{"role": "user", "content": content}])
    finally:
        process.terminate()
        process.wait(timeout=15)
    loaded = load_model(weights, False, None, tiny_clip_dir, "cpu", log=None)
    expected, stats = answer_once(loaded, QUESTION, [image], GenerationSettings(5, 0.0, 1.0))
    # (A tiny random model may answer with special tokens only: the text is then empty on both sides.)
    assert response.choices[0].message.content == expected
    assert response.usage.completion_tokens == stats.tokens == 5
    assert "Traceback" not in log_path.read_text()


def test_web_demo_answers_an_image_with_the_trained_model(trained_qwen2, tiny_clip_dir, shapes_data, monkeypatch):
    streamlit_testing = pytest.importorskip("streamlit.testing.v1")
    app_path = REPO_ROOT / "web_demo_vlm.py"
    monkeypatch.setattr(sys, "argv", [str(app_path), "--device", "cpu", "--save_dir", str(trained_qwen2 / "out"),
                                      "--hidden_size", "64", "--vision_model_path", str(tiny_clip_dir),
                                      "--max_new_tokens", "5", "--temperature", "0"])
    app = streamlit_testing.AppTest.from_file(str(app_path), default_timeout=120)
    app.run()
    assert not app.exception, app.exception
    image = sorted(Path(shapes_data["eval_images"]).iterdir())[0]
    app.chat_input[0].upload("shape.jpg", image.read_bytes(), "image/jpeg").set_value(QUESTION).run()
    assert not app.exception and not app.error
    session = app.session_state["chat"]
    assert session.loaded.model.config.chat_format == TOKENIZER_CHAT_FORMAT
    assert [m["role"] for m in session.messages] == ["user", "assistant"] and session.last_stats.tokens >= 1


def test_benchmark_harness_scores_the_trained_model(trained_qwen2, tiny_clip_dir, shapes_data, tmp_path, capsys):
    from scripts import eval_bench

    out = tmp_path / "result.json"
    eval_bench.main(["--bench", "pope", "--data_path", str(shapes_data["eval_pope_parquet"]), "--limit", "6",
                     "--out", str(out), "--weight", str(trained_qwen2 / "out" / "sft_vlm_64.pth"),
                     "--vision_model_path", str(tiny_clip_dir), "--device", "cpu", "--max_new_tokens", "2",
                     "--no_progress"])
    assert "| pope | likelihood | accuracy |" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["samples"] == 6 and set(result["modes"]) == {"generate", "likelihood"}


def exported_logits_match(weights, folder, clip_dir):
    """Export `weights` as an fp32 transformers folder; (folder's processor, native model) after checking that the
    folder read with AutoModelForImageTextToText gives the native model's logits on the processor's inputs."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from scripts import convert_vlm

    convert_vlm.main(["--to", "transformers", "--torch_path", str(weights), "--transformers_dir", str(folder),
                      "--vision_model_path", str(clip_dir), "--dtype", "float32"])
    with quiet_transformers():
        exported = AutoModelForImageTextToText.from_pretrained(str(folder), trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(str(folder), trust_remote_code=True)
    loaded = load_model(weights, False, None, clip_dir, "cpu", log=None)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == render_prompt(loaded.tokenizer, [{"role": "user", "content": "<image>\n" + QUESTION}], True,
                                 TOKENIZER_CHAT_FORMAT)  # the project's prompt, before the marker's expansion
    inputs = processor(images=[Image.new("RGB", (64, 64), (200, 30, 30))], text=text, return_tensors="pt")
    assert inputs["input_ids"].tolist() == prompt_ids(loaded.model, loaded.tokenizer).tolist()
    with torch.no_grad():
        assert torch.allclose(exported(**inputs).logits, loaded.model(**inputs).logits, atol=1e-5)
    return processor, loaded


def test_exported_folder_answers_through_pipeline_as_the_native_model(trained_qwen2, tiny_clip_dir, shapes_data,
                                                                      tmp_path):
    from transformers import pipeline

    weights = trained_qwen2 / "out" / "sft_vlm_64.pth"
    _, loaded = exported_logits_match(weights, tmp_path / "folder", tiny_clip_dir)
    image = sorted(Path(shapes_data["eval_images"]).iterdir())[0]
    with quiet_transformers():
        pipe = pipeline("image-text-to-text", model=str(tmp_path / "folder"), trust_remote_code=True)
    assert pipe.model.use_kernels is False and pipe.model.vision_encoder.use_kernels is False  # no hub kernels
    messages = [{"role": "user", "content": [{"type": "image", "image": str(image)},
                                             {"type": "text", "text": QUESTION}]}]
    answer = pipe(text=messages, max_new_tokens=5, do_sample=False)[0]["generated_text"][-1]["content"]
    expected, _ = answer_once(loaded, QUESTION, [image], GenerationSettings(5, 0.0, 1.0))
    assert answer == expected


def test_qformer_projector_sets_the_placeholder_run_of_a_transformers_lm(tiny_qwen2_dir, tiny_clip_dir, shapes_data,
                                                                         tmp_path):
    run_stage("pretrain", "pretrain", stage_argv(tiny_qwen2_dir, tiny_clip_dir, shapes_data, tmp_path, "pretrain_jsonl",
                                                 "pretrain_images", "--projector", "qformer", "--num_query_tokens", "8",
                                                 "--trainable", "projector", "--max_steps", "1"))
    weights = tmp_path / "out" / "pretrain_vlm_64.pth"
    config = read_architecture(weights).config
    assert config.projector == "qformer" and config.image_token_count == 8 and config.image_feature_count == 196
    loaded = load_model(weights, False, None, tiny_clip_dir, "cpu", log=None)
    ids = prompt_ids(loaded.model, loaded.tokenizer)
    assert int((ids == loaded.model.image_token_id).sum()) == 8
    with torch.no_grad():
        with_image = loaded.model(input_ids=ids, pixel_values=torch.randn(1, 1, 3, 224, 224)).logits
        blank = loaded.model(input_ids=ids, pixel_values=torch.zeros(1, 1, 3, 224, 224)).logits
    assert with_image.shape[1] == ids.shape[1] and not torch.allclose(with_image, blank)
