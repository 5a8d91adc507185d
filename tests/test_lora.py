"""--trainable lora (peft adapters on the frozen LM, the projector in full) and --projector_lr (the projector's own
AdamW group): what trains, the schedule of both groups, the merged weights file and the adapter folder, exact resume,
the next stage from a LoRA output, DDP, and the one-line errors."""
import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_sft_vlm
from common import UserError, run_cli
from conftest import save_random_tiny_vlm
from model.lora import (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, DEFAULT_LORA_TARGET, PROJECTOR_WEIGHTS_FILE,
                        add_lora, adapter_path, lora_layers, merged_state_dict)
from model.model_vlm import MiniMindVLM, VLMConfig
from trainer.config import parse_stage_args
from trainer.setup import optimizer_groups, set_trainable

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=64, num_hidden_layers=2, ve_hidden_size=64)  # the tiny CLIP is 64 wide
TINY_MODEL_FLAGS = ["--device", "cpu", "--hidden_size", "64", "--num_hidden_layers", "2", "--num_workers", "0"]
LM_PROJECTIONS = set(DEFAULT_LORA_TARGET.split("|"))


@pytest.fixture(scope="module")
def assets(tiny_tokenizer_dir, tiny_clip_dir, shapes_data):
    return {"tokenizer": tiny_tokenizer_dir, "clip": tiny_clip_dir, "data": shapes_data}


def sft_flags(assets, out_dir, *extra):
    return [*TINY_MODEL_FLAGS, "--data_path", str(assets["data"]["sft_jsonl"]),
            "--images_path", str(assets["data"]["sft_images"]), "--vision_model_path", str(assets["clip"]),
            "--tokenizer_path", str(assets["tokenizer"]), "--save_dir", str(out_dir / "out"),
            "--checkpoint_dir", str(out_dir / "ckpt"), "--log_interval", "1", *extra]


def sft_command(assets, out_dir, *extra, launcher=None):
    """The command line a user types (for what needs processes of its own: torchrun)."""
    return [*(launcher or [sys.executable]), str(REPO_ROOT / "train_sft_vlm.py"), *sft_flags(assets, out_dir, *extra)]


def train_here(capsys, assets, out_dir, *extra) -> str:
    """train_sft_vlm.py's main in this process (no interpreter start-up per run); its stdout."""
    capsys.readouterr()
    train_sft_vlm.main(sft_flags(assets, out_dir, *extra))
    return capsys.readouterr().out


def run(command):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd="/", env=env)
    assert result.returncode == 0, f"{command}\nSTDOUT:\n{result.stdout}\nSTDERR:\n{result.stderr}"
    return result


def logged(stdout, field):
    """The values after `field` (e.g. 'loss ', 'projector lr ') in the step log lines."""
    return [float(line.split(field)[1].split()[0]) for line in stdout.splitlines() if "| loss " in line]


def resume_state(out_dir, name="sft_vlm_64"):
    return torch.load(out_dir / "ckpt" / f"{name}_resume.pth", map_location="cpu", weights_only=True)


def tiny_lora_model(seed=0, **lora_options):
    torch.manual_seed(seed)
    model = MiniMindVLM(VLMConfig(**TINY), vision_model_path=None)
    set_trainable(model, "lora", **lora_options)
    return model


def randomise_adapters(model, seed=1):
    """peft starts lora_B at zero (the adapters add nothing): give every adapter weight a value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def logits_of(model, input_ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


# -------------------------------------------------------------------------------------------- what trains

def test_only_adapters_and_projector_train_and_the_adapters_sit_in_the_lm():
    model = tiny_lora_model()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or name.startswith("vision_proj.") for name in trainable)
    assert {name for name, p in model.vision_proj.named_parameters()} == \
        {name.removeprefix("vision_proj.") for name in trainable if name.startswith("vision_proj.")}
    adapted = lora_layers(model)
    # every attention and MLP projection of both layers, nothing else (not the projector, embeddings or head)
    assert len(adapted) == 2 * len(LM_PROJECTIONS)
    assert {name.rsplit(".", 1)[1] for name in adapted} == LM_PROJECTIONS
    assert all(name.startswith("model.layers.") for name in adapted)


ALL_PROJECTIONS = {f"model.layers.{i}.{m}" for i in (0, 1) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
    "mlp.down_proj")}


@pytest.mark.parametrize("target, expected", [
    ("q_proj|v_proj", {f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")}),
    (r"model\.layers\.1\.mlp\..*_proj", {f"model.layers.1.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")}),
    # the projector's and the embeddings' names match too, yet they stay plain
    (".*(_proj|embed_tokens|lm_head)", ALL_PROJECTIONS),
    ("all-linear", ALL_PROJECTIONS),  # peft's own shorthand
])
def test_lora_target_is_a_name_list_or_a_regex_and_never_reaches_projector_or_embeddings(target, expected):
    model = tiny_lora_model(target=target)
    assert set(lora_layers(model)) == expected  # ".*": the projector, embeddings and head stay plain


def test_projector_gets_its_own_group_for_every_trainable_set():
    for policy in ("projector", "projector_last_layer", "all", "lora"):
        torch.manual_seed(0)
        model = MiniMindVLM(VLMConfig(**TINY), vision_model_path=None)
        set_trainable(model, policy)
        groups = optimizer_groups(model, 1e-3, 5e-3)
        projector = {id(p) for p in model.vision_proj.parameters()}
        assert [g["initial_lr"] for g in groups] == [1e-3, 5e-3]
        assert {id(p) for p in groups[1]["params"]} == projector
        assert not projector & {id(p) for p in groups[0]["params"]}
        assert len(groups[0]["params"]) + len(groups[1]["params"]) == \
            sum(p.requires_grad for p in model.parameters())
        assert len(optimizer_groups(model, 1e-3)) == 1  # no --projector_lr: one group, as before


# ------------------------------------------------------------------------------- the merged file and the adapter

def test_merged_weights_give_the_lora_models_logits_as_peft_merges_them():
    from peft import PeftModel

    torch.manual_seed(0)
    base = MiniMindVLM(VLMConfig(**TINY), vision_model_path=None)
    lora = copy.deepcopy(base)
    add_lora(lora, rank=4, dropout=0.0)
    randomise_adapters(lora)
    input_ids = torch.randint(3, 200, (2, 24))
    expected = logits_of(lora, input_ids)

    merged = merged_state_dict(lora)
    assert merged.keys() == base.state_dict().keys()
    plain = copy.deepcopy(base)
    plain.load_state_dict(merged, strict=True)
    assert (logits_of(plain, input_ids) - expected).abs().max() < 1e-5
    # peft's own merge_and_unload of the same adapter gives the same weights
    reference = PeftModel(copy.deepcopy(base), copy.deepcopy(lora.peft_config["default"]))
    reference.load_state_dict({f"base_model.model.{k}": v for k, v in lora.state_dict().items()}, strict=True)
    adapter_parameters = sum(p.numel() for name, p in lora.named_parameters() if "lora_" in name)
    assert reference.get_nb_trainable_parameters()[0] == adapter_parameters  # peft counts the adapters alike
    unloaded = reference.merge_and_unload().state_dict()
    assert all(torch.equal(unloaded[k], merged[k]) for k in merged)
    assert lora.model.layers[0].self_attn.q_proj.base_layer.weight.data_ptr() != merged[
        "model.layers.0.self_attn.q_proj.weight"].data_ptr()  # the training model's base weights stay as they were


def test_lora_run_writes_merged_upstream_weights_and_a_peft_adapter_folder(assets, tmp_path, capsys):
    """A LoRA SFT run from saved start weights: only the adapters and the projector change; the weights file is the
    plain format (strict load, every loader) with the adapters merged; the adapter folder, read by peft's
    PeftModel.from_pretrained onto the start weights, gives the trained model's logits; export to a transformers
    folder reads the merged file; the next stage starts from it."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from conftest import export_fp32_folder
    from inference.loading import load_native_model, load_transformers_model

    start = save_random_tiny_vlm(tmp_path / "start.pth", assets["clip"], seed=3)
    stdout = train_here(capsys, assets, tmp_path, "--from_weight", str(start), "--trainable", "lora",
                        "--max_steps", "6", "--batch_size", "3", "--learning_rate", "1e-2", "--projector_lr", "2e-2")
    assert "trainable (lora: rank 8 adapters on 14 modules (0.019M) + the projector (0.004M))" in stdout
    losses = logged(stdout, "loss ")
    assert len(losses) == 6 and losses[-1] < losses[0]

    # Only adapters and the projector moved: the base weights in the training state are the start weights.
    start_state = torch.load(start, weights_only=True)
    trained = resume_state(tmp_path)["model"]
    for key, value in start_state.items():
        trained_key = key.replace(".weight", ".base_layer.weight") if any(
            f".{m}." in key for m in LM_PROJECTIONS) else key
        same = torch.equal(trained[trained_key], value)
        assert same != key.startswith("vision_proj."), key
    assert all(not torch.equal(v, torch.zeros_like(v)) for k, v in trained.items() if "lora_B" in k)

    # The weights file: the plain format, adapters merged (fp16 as upstream), no adapter keys.
    weights = tmp_path / "out" / "sft_vlm_64.pth"
    merged_file = torch.load(weights, weights_only=True)
    assert merged_file.keys() == start_state.keys() and all(v.dtype == torch.float16 for v in merged_file.values())
    lora_model = MiniMindVLM(VLMConfig(**TINY), vision_model_path=None)
    add_lora(lora_model)
    lora_model.load_state_dict(trained, strict=True)
    input_ids = torch.randint(3, 200, (2, 24))
    expected = logits_of(lora_model, input_ids)
    native = load_native_model(weights, assets["clip"], "cpu", log=None)
    rounded = MiniMindVLM(VLMConfig(**TINY), vision_model_path=None)
    rounded.load_state_dict({k: v.half().float() for k, v in merged_state_dict(lora_model).items()}, strict=True)
    assert torch.equal(logits_of(native, input_ids), logits_of(rounded, input_ids))  # the merge, rounded to fp16
    assert (logits_of(native, input_ids) - expected).abs().max() < 0.05  # fp16 rounding only

    # The adapter folder: peft reads it onto the start weights, the projector beside it.
    folder = adapter_path(weights)
    assert {p.name for p in folder.iterdir()} == {ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, PROJECTOR_WEIGHTS_FILE}
    base = MiniMindVLM(VLMConfig(**TINY), vision_model_path=None)
    base.load_state_dict(start_state, strict=True)
    projector = load_file(folder / PROJECTOR_WEIGHTS_FILE)
    assert set(projector) == {k for k in start_state if k.startswith("vision_proj.")}
    base.load_state_dict(projector, strict=False)
    assert torch.equal(logits_of(PeftModel.from_pretrained(base, folder), input_ids), expected)

    # The resume checkpoint (adapters unmerged) is not a weights file: loading it says which file to load.
    with pytest.raises(UserError, match="sft_vlm_64.pth"):
        load_native_model(tmp_path / "ckpt" / "sft_vlm_64_resume.pth", assets["clip"], "cpu", log=None)

    # Export to a transformers folder reads the merged file unchanged.
    exported = export_fp32_folder(weights, tmp_path / "hf", assets["tokenizer"], assets["clip"])
    hf = load_transformers_model(exported, assets["clip"], "cpu", log=None)
    assert torch.equal(logits_of(hf, input_ids), logits_of(native, input_ids))

    # The next stage starts from the LoRA output like from any weights file (here a fresh LoRA on top).
    following = train_here(capsys, assets, tmp_path / "next", "--from_weight", str(weights), "--trainable", "lora",
                           "--max_steps", "1", "--batch_size", "2")
    assert f"loaded {weights}: " in following and "done: 1 optimizer steps" in following


# ------------------------------------------------------------------------------- schedule, resume, DDP, errors

def test_schedule_scales_both_groups_and_resume_is_bitwise_exact(assets, tmp_path, capsys):
    common = ("--from_weight", "none", "--trainable", "lora", "--batch_size", "3", "--learning_rate", "1e-3",
              "--projector_lr", "4e-3", "--lora_dropout", "0.1")  # dropout: the resumed masks must match too
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    whole = train_here(capsys, assets, straight, *common, "--max_steps", "4")
    lrs, projector_lrs = logged(whole, "| lr "), logged(whole, "projector lr ")
    assert lrs[0] == 1e-3 and projector_lrs[0] == 4e-3 and lrs[-1] < lrs[0]
    assert all(p == pytest.approx(4 * lr, rel=1e-3) for lr, p in zip(lrs, projector_lrs))  # the log's 4 digits

    train_here(capsys, assets, resumed, *common, "--max_steps", "2")
    second = train_here(capsys, assets, resumed, *common, "--max_steps", "4", "--from_resume", "1")
    assert "2 optimizer steps done" in second
    assert logged(second, "loss ") == logged(whole, "loss ")[2:]
    a, b = resume_state(straight), resume_state(resumed)
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in a["optimizer"]["param_groups"]] == [1e-3, 4e-3]
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    for name in ("out/sft_vlm_64.pth", f"out/sft_vlm_64_lora/{ADAPTER_WEIGHTS_FILE}",
                 f"out/sft_vlm_64_lora/{PROJECTOR_WEIGHTS_FILE}"):
        assert (straight / name).read_bytes() == (resumed / name).read_bytes(), name

    # Resuming with the projector folded back into one group is refused, in one line.
    with pytest.raises(UserError, match="parameter group") as refused:
        train_here(capsys, assets, resumed, *common[:-4], "--max_steps", "6", "--from_resume", "1")
    assert "--projector_lr" in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.slow
def test_two_process_lora_run_equals_one_process_with_the_global_batch(assets, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    common = ("--from_weight", "none", "--trainable", "lora", "--max_steps", "3", "--learning_rate", "1e-3",
              "--projector_lr", "3e-3", "--lora_dropout", "0")
    ddp = run(sft_command(assets, tmp_path / "ddp", *common, "--batch_size", "2", launcher=torchrun))
    single = run(sft_command(assets, tmp_path / "single", *common, "--batch_size", "4"))
    losses = logged(single.stdout, "loss ")
    assert len(set(losses)) == 3 and logged(ddp.stdout, "loss ") == losses
    ddp_state, single_state = resume_state(tmp_path / "ddp")["model"], resume_state(tmp_path / "single")["model"]
    assert ddp_state.keys() == single_state.keys()
    for key, value in single_state.items():  # AdamW's normalised steps lift reduction-order rounding to ~1e-5
        assert torch.allclose(ddp_state[key], value, atol=5e-5), key


def test_bad_lora_flags_are_one_line_errors(assets, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_stage_args("sft", ["--trainable", "lora", "--lora_rank", "0"])
    assert exit_info.value.code == 2
    assert "argument --lora_rank: must be an integer >= 1, got 0" in capsys.readouterr().err
    for target in ("no_such_module", "vision_proj.*"):  # nothing, or only what is never adapted
        with pytest.raises(UserError, match=f"--lora_target '{re.escape(target)}' does not fit the language model"):
            tiny_lora_model(target=target)
    # As the script says it (run_cli, as `python train_sft_vlm.py` runs): one line, exit 2.
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_sft_vlm.main, sft_flags(assets, tmp_path, "--from_weight", "none", "--trainable", "lora",
                                              "--lora_target", "no_such_module"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: --lora_target 'no_such_module' does not fit the language model")
