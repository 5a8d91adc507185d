"""scripts/convert_vlm.py: .pth <-> transformers folder, exact in fp32, loadable with the Auto classes."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoProcessor, AutoTokenizer

from dataset.processing import image_processor_for, load_pixel_values, load_tokenizer, open_image
from model.model_vlm import IMAGE_PLACEHOLDER_ID, IMAGE_TOKENS_PER_IMAGE, MiniMindVLM, VLMConfig
from model.weights import load_weights
from scripts import convert_vlm
from inference.generation import GenerationSettings, answer_once
from inference.loading import load_model
from common import run_cli
from conftest import export_fp32_folder, save_random_tiny_vlm

CLIP_PROCESSOR = image_processor_for(VLMConfig())

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_SEED = 3


@pytest.fixture(scope="module")
def fp32_pth(tmp_path_factory, tiny_clip_dir):
    return save_random_tiny_vlm(tmp_path_factory.mktemp("convert") / "sft_vlm_64.pth", tiny_clip_dir, MODEL_SEED)


@pytest.fixture(scope="module")
def fp32_folder(fp32_pth, tiny_tokenizer_dir, tiny_clip_dir):
    return export_fp32_folder(fp32_pth, fp32_pth.parent / "MiniMind2-V-tiny", tiny_tokenizer_dir, tiny_clip_dir)


def native_model(pth, clip_dir):
    model = MiniMindVLM(VLMConfig(hidden_size=64, num_hidden_layers=2), vision_model_path=clip_dir)
    load_weights(model, pth, log=None)
    return model.eval()


def test_round_trip_is_bit_exact_in_fp32(fp32_pth, fp32_folder, tmp_path):
    back = tmp_path / "back.pth"
    convert_vlm.main(["--to", "torch", "--transformers_dir", str(fp32_folder), "--torch_path", str(back),
                      "--dtype", "float32"])
    original, restored = torch.load(fp32_pth, weights_only=True), torch.load(back, weights_only=True)
    assert list(restored) == list(original) and len(restored) == 23
    for key, tensor in original.items():
        assert restored[key].dtype == torch.float32 and torch.equal(restored[key], tensor), key


def test_folder_layout(fp32_folder):
    names = {p.name for p in fp32_folder.iterdir()}
    assert {"config.json", "model.safetensors", "model_vlm.py", "model_minimind.py", "compat.py", "tokenizer.json",
            "tokenizer_config.json", "preprocessor_config.json", "processor_config.json"} <= names
    assert {"processing_minimind_v.py", "chat_template.json", "vision_model"} <= names  # processor and CLIP
    config = json.loads((fp32_folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "model_vlm.VLMConfig", "AutoModelForCausalLM": "model_vlm.MiniMindVLM",
                                  "AutoModelForImageTextToText": "model_vlm.MiniMindVLM"}
    # transformers 4.x leaves out of config.json the values equal to the default (True here)
    assert config["model_type"] == "minimind-v" and config.get("tie_word_embeddings", True) is True
    assert (config["hidden_size"], config["num_hidden_layers"], config["ve_hidden_size"]) == (64, 2, 64)
    for name in ("model_vlm.py", "model_minimind.py", "compat.py"):
        assert (fp32_folder / name).read_text() == (REPO_ROOT / "model" / name).read_text()
    processing = "processing_minimind_v.py"
    assert (fp32_folder / processing).read_text() == (REPO_ROOT / "model" / processing).read_text()
    assert config["vision_model_subfolder"] == "vision_model"
    assert json.loads((fp32_folder / "vision_model" / "config.json").read_text())["hidden_size"] == 64


def test_auto_model_gives_the_same_logits(fp32_pth, fp32_folder, tiny_clip_dir):
    native = native_model(fp32_pth, tiny_clip_dir)
    converted = AutoModelForCausalLM.from_pretrained(fp32_folder, trust_remote_code=True,
                                                     vision_model_path=str(tiny_clip_dir))
    assert type(converted).__name__ == "MiniMindVLM" and converted.vision_encoder is not None
    ids = torch.tensor([[1, 5, 6] + [IMAGE_PLACEHOLDER_ID] * IMAGE_TOKENS_PER_IMAGE + [7, 8, 2]])
    pixels = torch.randn(1, 1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(converted(ids, pixel_values=pixels).logits, native(ids, pixel_values=pixels).logits)
    with_own_clip = AutoModelForCausalLM.from_pretrained(fp32_folder, trust_remote_code=True)
    with torch.no_grad():  # the folder's copy of CLIP is the one it was exported with
        assert torch.equal(with_own_clip(ids, pixel_values=pixels).logits, native(ids, pixel_values=pixels).logits)
    text_only = AutoModelForCausalLM.from_pretrained(fp32_folder, trust_remote_code=True, vision_model_subfolder=None)
    assert text_only.vision_encoder is None
    assert text_only.lm_head.weight is text_only.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(text_only(ids[:, :3]).logits, native(ids[:, :3]).logits)


def test_tokenizer_and_image_processing_load_from_the_folder(fp32_folder, shapes_data):
    tokenizer = AutoTokenizer.from_pretrained(fp32_folder, trust_remote_code=True)
    assert tokenizer("@" * IMAGE_TOKENS_PER_IMAGE).input_ids == [IMAGE_PLACEHOLDER_ID] * IMAGE_TOKENS_PER_IMAGE
    image_path = shapes_data["eval_images"] / "000000.jpg"
    ours = load_pixel_values([image_path], CLIP_PROCESSOR)
    image_processor = AutoImageProcessor.from_pretrained(fp32_folder, trust_remote_code=True)
    theirs = image_processor(images=[open_image(image_path)], return_tensors="pt").pixel_values
    assert torch.equal(theirs, ours)  # the same function (model/processing_minimind_v.py), not a look-alike
    processor = AutoProcessor.from_pretrained(fp32_folder, trust_remote_code=True)
    both = processor(text=["<image>\nWhat is it?"], images=[open_image(image_path)], return_tensors="pt")
    assert both.input_ids.shape[0] == 1 and torch.equal(both.pixel_values, ours)


def test_tokenizer_of_a_folder_loads_without_asking_to_run_its_code(fp32_folder, monkeypatch):
    """The folder's config.json maps AutoModel to the folder's own code; loading only its (stock) tokenizer must
    not stop at transformers' "run custom code?" question (eval_vlm.py --load 1 in a terminal)."""
    questions = []
    monkeypatch.setattr("builtins.input", lambda prompt="": questions.append(prompt) or "no")
    tokenizer = load_tokenizer(fp32_folder)
    assert questions == []
    assert tokenizer("@" * IMAGE_TOKENS_PER_IMAGE).input_ids == [IMAGE_PLACEHOLDER_ID] * IMAGE_TOKENS_PER_IMAGE


def test_chat_plumbing_reads_the_folder(fp32_pth, fp32_folder, tiny_tokenizer_dir, tiny_clip_dir, shapes_data):
    """`--load 1` (tokenizer from the folder) answers exactly as `--load 0` with the same weights."""
    settings = GenerationSettings(max_new_tokens=10, temperature=0.0)
    image = [shapes_data["eval_images"] / "000003.jpg"]
    from_folder = load_model(fp32_folder, True, None, tiny_clip_dir, "cpu", log=None)
    from_pth = load_model(fp32_pth, False, tiny_tokenizer_dir, tiny_clip_dir, "cpu", log=None)
    assert answer_once(from_folder, "What colour?", image, settings)[0] == \
        answer_once(from_pth, "What colour?", image, settings)[0]


def test_script_defaults_bfloat16_folder_and_float16_pth(fp32_pth, tiny_tokenizer_dir, tiny_clip_dir, tmp_path):
    folder = tmp_path / "bf16"
    command = [sys.executable, "-m", "scripts.convert_vlm", "--to", "transformers",
               "--torch_path", str(fp32_pth), "--transformers_dir", str(folder),
               "--tokenizer_path", str(tiny_tokenizer_dir), "--vision_model_path", str(tmp_path / "no_clip_here")]
    # From another folder: no path may resolve from the current directory.
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(folder / "model.safetensors", "pt") as weights:
        assert all(weights.get_tensor(k).dtype == torch.bfloat16 for k in weights.keys())
    # without a CLIP folder the folder has no vision tower, and says so; the processor is written all the same
    assert "no CLIP at" in result.stdout and not (folder / "vision_model").exists()
    assert json.loads((folder / "config.json").read_text())["vision_model_subfolder"] is None
    assert json.loads((folder / "preprocessor_config.json").read_text())["image_size"] == 224
    back = tmp_path / "back.pth"
    convert_vlm.main(["--to", "torch", "--transformers_dir", str(folder), "--torch_path", str(back)])
    restored, original = torch.load(back, weights_only=True), torch.load(fp32_pth, weights_only=True)
    assert list(restored) == list(original) and all(v.dtype == torch.float16 for v in restored.values())
    assert all(torch.allclose(restored[k].float(), original[k], atol=1e-2, rtol=1e-2) for k in original)


def test_missing_input_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(convert_vlm.main, ["--to", "torch", "--transformers_dir", str(tmp_path / "nothing"),
                                   "--torch_path", str(tmp_path / "x.pth")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: no transformers model in")


def test_folder_without_tie_flag_loads_tied(fp32_pth, fp32_folder, tiny_clip_dir, tmp_path):
    """transformers 4.x leaves `tie_word_embeddings` (default True) out of config.json; 5.x reads a missing flag
    as False. A folder written by either major must load with lm_head tied to the saved embedding."""
    folder = tmp_path / "MiniMind2-V-no-tie-flag"
    shutil.copytree(fp32_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("tie_word_embeddings", None)
    (folder / "config.json").write_text(json.dumps(config))
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, native_model(fp32_pth, tiny_clip_dir)(ids).logits)
