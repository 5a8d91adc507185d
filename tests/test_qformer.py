"""The qformer projector (MiniGPT-4's design: transformers' BLIP-2 Q-Former, then a Linear into the LM width): an
image becomes num_query_tokens tokens, and the model trains, saves, loads, exports and starts from a BLIP-2 folder."""
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Blip2QFormerModel

import train_pretrain_vlm
import train_sft_vlm
from common import UserError, atomic_save
from conftest import export_fp32_folder
from dev.synthetic import TINY_BLIP2_NUM_QUERY_TOKENS, build_tiny_blip2
from inference.generation import GenerationSettings, answer_once
from inference.loading import load_model, load_native_model
from model.model_vlm import IMAGE_PLACEHOLDER_ID, PROJECTORS, MiniMindVLM, qformer_settings
from model.presets import vlm_config
from model.weights import (WeightsMismatchError, architecture_path, describe_state_dict, load_weights,
                           read_state_dict, write_architecture)
from scripts import convert_vlm
from trainer.config import parse_stage_args
from trainer.setup import build_model, qformer_fields
from trainer.training import inference_state_dict

TINY_QFORMER = qformer_settings(hidden_size=32, num_layers=2, num_heads=2)
QUERIES = 8
TINY_QFORMER_FLAGS = ["--projector", "qformer", "--num_query_tokens", str(QUERIES), "--qformer_hidden_size", "32",
                      "--qformer_num_heads", "2"]
PIXELS = torch.randn(1, 1, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def tiny_qformer_vlm(clip_dir, seed: int = 0) -> MiniMindVLM:
    torch.manual_seed(seed)
    config = vlm_config("minimind2-v", 64, 2, projector="qformer", num_query_tokens=QUERIES,
                        qformer_config=TINY_QFORMER)
    return MiniMindVLM(config, vision_model_path=clip_dir).eval()


def prompt_ids(run_length: int) -> torch.Tensor:
    return torch.tensor([[1, 5, 6] + [IMAGE_PLACEHOLDER_ID] * run_length + [7, 8, 2]])


def save_with_architecture(model: MiniMindVLM, path, clip_dir, state_dict=None):
    """As the trainer saves: the weights (fp16 unless given) and the architecture file beside them."""
    atomic_save(inference_state_dict(model) if state_dict is None else state_dict, path)
    write_architecture(path, model.config, "minimind2-v", clip_dir)
    return path


def train_flags(assets_dirs, tmp_path, data_key, images_key, *extra):
    tokenizer_dir, clip_dir, data = assets_dirs
    return ["--device", "cpu", "--num_workers", "0", "--data_path", str(data[data_key]),
            "--images_path", str(data[images_key]), "--vision_model_path", str(clip_dir),
            "--tokenizer_path", str(tokenizer_dir),
            "--save_dir", str(tmp_path / "out"), "--checkpoint_dir", str(tmp_path / "ckpt"), "--batch_size", "2",
            "--log_interval", "1", *extra]


# ------------------------------------------------------------------------------------------- the projector

def test_qformer_gives_one_token_per_query_whatever_the_feature_count():
    torch.manual_seed(0)
    projector = PROJECTORS["qformer"](64, 48, num_query_tokens=5, qformer_config=TINY_QFORMER).eval()
    assert isinstance(projector.qformer, Blip2QFormerModel)  # transformers' own, not a copy
    shapes = {k: tuple(v.shape) for k, v in projector.state_dict().items()}
    assert shapes["query_tokens"] == (1, 5, 32) and shapes["language_projection.weight"] == (48, 32)
    assert shapes[PROJECTORS["qformer"].INPUT_WEIGHT] == (32, 64)  # reads 64-wide features
    with torch.no_grad():
        for features in (196, 64, 3):
            assert projector(torch.randn(3, features, 64)).shape == (3, 5, 48)
        assert projector(torch.zeros(0, 196, 64)).shape == (0, 5, 48)  # a text-only batch
        image = torch.randn(1, 196, 64)
        assert not torch.allclose(projector(image), projector(torch.randn(1, 196, 64)))  # the queries read it


def test_tiny_vlm_splices_one_token_per_query_and_refuses_a_196_run(tiny_clip_dir):
    model = tiny_qformer_vlm(tiny_clip_dir)
    assert model.config.image_token_count == QUERIES and model.config.image_special_token == "@" * QUERIES
    assert model.config.image_feature_count == 196  # what the encoder gives (and the feature cache keeps)
    ids = prompt_ids(QUERIES)
    with torch.no_grad():
        features = model.encode_images(PIXELS[0])  # [1, 196, 64]
        spliced = model.splice_image_features(ids, model.model.embed_tokens(ids), features)
        assert torch.equal(spliced[0, 3:3 + QUERIES], model.vision_proj(features)[0])
        assert torch.equal(spliced[0, :3], model.model.embed_tokens(ids)[0, :3])
        assert model(ids, pixel_values=PIXELS).logits.shape == (1, ids.shape[1], model.config.vocab_size)
        with pytest.raises(ValueError, match=f"a run of 196 image tokens .* exactly {QUERIES} consecutive"):
            model(prompt_ids(196), pixel_values=PIXELS)


def test_per_feature_projectors_keep_the_encoders_count():
    two, three = vlm_config("minimind2-v"), vlm_config("minimind-3v")
    assert (two.image_token_count, three.image_token_count) == (196, 64)
    assert two.qformer_config is None and three.qformer_config is None
    assert (two.projector_output_count(64), vlm_config("minimind-3v", projector="qformer").image_token_count) == \
        (64, 32)  # the qformer default: BLIP-2's 32 queries
    with pytest.raises(UserError, match="--num_query_tokens is for --projector qformer"):
        qformer_fields(parse_stage_args("pretrain", ["--num_query_tokens", "8"]))
    with pytest.raises(UserError, match="not divisible by its 3 heads"):
        qformer_fields(parse_stage_args("pretrain", ["--projector", "qformer", "--qformer_num_heads", "3"]))


# ------------------------------------------------------------------------------------ --qformer_init

def test_qformer_init_copies_the_blip2_folders_qformer(tiny_blip2_dir, tiny_clip_dir, tiny_tokenizer_dir, tmp_path):
    flags = ["--projector", "qformer", "--qformer_init", str(tiny_blip2_dir), "--from_weight", "none",
             "--hidden_size", "64", "--num_hidden_layers", "2", "--vision_model_path", str(tiny_clip_dir),
             "--tokenizer_path", str(tiny_tokenizer_dir), "--save_dir", str(tmp_path)]
    lines = []
    model, _ = build_model(parse_stage_args("pretrain", flags), "pretrain", log=lines.append)
    blip2_config = json.loads((tiny_blip2_dir / "config.json").read_text())
    assert model.config.num_query_tokens == TINY_BLIP2_NUM_QUERY_TOKENS == model.config.image_token_count
    assert model.config.qformer_config["cross_attention_frequency"] == \
        blip2_config["qformer_config"]["cross_attention_frequency"] == 2  # the folder's, not the from-scratch 1
    ours = model.vision_proj.state_dict()
    with safe_open(str(tiny_blip2_dir / "model.safetensors"), framework="pt") as weights:
        copied = [k for k in weights.keys() if k == "query_tokens" or k.startswith("qformer.")]
        for key in copied:
            assert torch.equal(ours[key], weights.get_tensor(key)), key
    assert len(copied) == len(ours) - 2 and "Q-Former initialised from" in lines[-1]  # + language_projection

    with pytest.raises(UserError, match="--num_query_tokens 4 differs from the 8 of --qformer_init"):
        build_model(parse_stage_args("pretrain", flags + ["--num_query_tokens", "4"]), "pretrain", log=None)
    wide = build_tiny_blip2(tmp_path / "blip2_32", vision_hidden_size=32)
    with pytest.raises(WeightsMismatchError, match="cross-attends to 32-wide encoder features, but this vision "
                                                   "encoder gives 64"):
        build_model(parse_stage_args("pretrain", flags[:2] + ["--qformer_init", str(wide)] + flags[4:]), "pretrain",
                    log=None)
    with pytest.raises(WeightsMismatchError, match="not a BLIP-2 folder"):
        build_model(parse_stage_args("pretrain", flags[:2] + ["--qformer_init", str(tiny_clip_dir)] + flags[4:]),
                    "pretrain", log=None)


# ------------------------------------------------------------------------------ files: .pth and export

def test_saved_qformer_model_loads_strictly_with_the_same_logits(tiny_clip_dir, tmp_path):
    model = tiny_qformer_vlm(tiny_clip_dir, seed=1)
    model.load_state_dict(inference_state_dict(model))  # the fp16-rounded weights the file holds
    path = save_with_architecture(model, tmp_path / "sft_vlm_64.pth", tiny_clip_dir)
    found = describe_state_dict(read_state_dict(path))
    assert (found["projector"], found["image_hidden_size"]) == ("qformer", 64)
    loaded = load_native_model(path, None, "cpu", log=None)  # load_weights: strict
    assert loaded.config.to_dict() == model.config.to_dict()
    ids = prompt_ids(QUERIES)
    with torch.no_grad():
        assert torch.equal(loaded(ids, pixel_values=PIXELS).logits, model(ids, pixel_values=PIXELS).logits)
    linear = MiniMindVLM(vlm_config("minimind2-v", 64, 2), vision_model_path=tiny_clip_dir)
    with pytest.raises(WeightsMismatchError, match="holds a Q-Former: leave out the architecture flags"):
        load_weights(linear, path, log=None)
    architecture_path(path).unlink()
    with pytest.raises(WeightsMismatchError, match="need their architecture file sft_vlm_64.json"):
        load_native_model(path, tiny_clip_dir, "cpu", log=None)


def test_export_to_a_transformers_folder_and_back(tiny_clip_dir, tiny_tokenizer_dir, tmp_path):
    model = tiny_qformer_vlm(tiny_clip_dir, seed=2)
    pth = save_with_architecture(model, tmp_path / "sft_vlm_64.pth", tiny_clip_dir, state_dict=model.state_dict())
    folder = export_fp32_folder(pth, tmp_path / "folder", tiny_tokenizer_dir, tiny_clip_dir)
    config = json.loads((folder / "config.json").read_text())
    assert (config["projector"], config["num_query_tokens"], config["qformer_config"]) == ("qformer", QUERIES,
                                                                                           TINY_QFORMER)
    assert json.loads((folder / "processor_config.json").read_text())["image_seq_length"] == QUERIES
    exported = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = prompt_ids(QUERIES)
    with torch.no_grad():
        assert torch.equal(exported(ids, pixel_values=PIXELS).logits, model(ids, pixel_values=PIXELS).logits)
    back = tmp_path / "back.pth"
    convert_vlm.main(["--to", "torch", "--transformers_dir", str(folder), "--torch_path", str(back),
                      "--dtype", "float32"])
    restored, original = torch.load(back, weights_only=True), model.state_dict()
    assert set(restored) == set(original) and all(torch.equal(restored[k], original[k]) for k in original)


# ------------------------------------------------------------------------------------ training and chat

def test_pretrain_then_sft_with_a_frozen_lm_then_chat(tiny_tokenizer_dir, tiny_clip_dir, shapes_data, tmp_path):
    """Stage 1 builds the Q-Former from the flags; stage 2 takes its architecture from the file and, with the LM
    frozen (--trainable projector), changes only the Q-Former path and the projection (on the encoder features the
    cache keeps: 196 a CLIP image, whatever the queries); the result answers."""
    assets_dirs = (tiny_tokenizer_dir, tiny_clip_dir, shapes_data)
    train_pretrain_vlm.main(train_flags(assets_dirs, tmp_path, "pretrain_jsonl", "pretrain_images",
                                        "--hidden_size", "64", "--num_hidden_layers", "2", *TINY_QFORMER_FLAGS,
                                        "--from_weight", "none", "--max_steps", "2"))
    pretrained = tmp_path / "out" / "pretrain_vlm_64.pth"
    record = json.loads(architecture_path(pretrained).read_text())["config"]
    assert (record["projector"], record["num_query_tokens"], record["image_special_token"]) == \
        ("qformer", QUERIES, "@" * QUERIES)
    # No architecture flag: the start weights' architecture file says it all. Captioned images only (as
    # MiniGPT-4's stage 2 descriptions): a text-only batch would reach no Q-Former weight.
    train_sft_vlm.main(train_flags(assets_dirs, tmp_path, "pretrain_jsonl", "pretrain_images", "--from_weight",
                                   str(pretrained), "--trainable", "projector", "--learning_rate", "0.01",
                                   "--max_steps", "2", "--cache_vision_features", str(tmp_path / "features")))
    before, after = read_state_dict(pretrained), read_state_dict(tmp_path / "out" / "sft_vlm_64.pth")
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed == {key for key in before if key.startswith("vision_proj.")}
    assert {"vision_proj.query_tokens", "vision_proj.language_projection.weight"} <= changed

    loaded = load_model(tmp_path / "out" / "sft_vlm_64.pth", False, tiny_tokenizer_dir, None, "cpu", log=None)
    answer, stats = answer_once(loaded, "What colour?", [shapes_data["eval_images"] / "000003.jpg"],
                                GenerationSettings(max_new_tokens=4, temperature=0.0))
    assert loaded.model.image_token_count == QUERIES and isinstance(answer, str)
