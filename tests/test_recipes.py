"""scripts.demo's recipes (RECIPES): each entry builds its stand-ins and runs its stages for a step at a tiny size
through the real training scripts, and --recipe / --preset refuse what they cannot mean. Whether each recipe learns
is the demo's own check (python -m scripts.demo --recipe R --blank_control: minutes per recipe)."""
import pytest
import torch

from scripts import demo
from trainer.config import STAGE_SCRIPTS, TRAINABLE_CHOICES, parse_stage_args

TINY = ["--n_train", "4", "--n_language", "4", "--n_eval", "2", "--hidden_size", "32", "--num_hidden_layers", "1", "--batch_size", "2",
        "--max_steps", "1", "--num_workers", "0", "--language_epochs", "1", "--pretrain_epochs", "1",
        "--sft_epochs", "1"]
# What the trainer's start-up line names as the trainable set (`... trainable (projector)`, `(lora: rank ...`).
TRAINABLE_IN_LOG = {"all": "trainable (all)", "projector": "trainable (projector)", "lora": "trainable (lora: rank"}


def test_default_recipe_and_preset_alias():
    assert demo.parse_args([]).recipe == "minimind2-v"
    assert demo.parse_args(["--preset", "minimind-3v"]).recipe == "minimind-3v"
    assert demo.parse_args(["--preset", "minimind-3v", "--recipe", "minimind-3v"]).recipe == "minimind-3v"
    assert demo.parse_args(["--recipe", "minigpt4"]).recipe == "minigpt4"


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "llava"], "invalid choice: 'llava'"),
    (["--preset", "minigpt4"], "invalid choice: 'minigpt4'"),  # --preset names only the MiniMind recipes
    (["--preset", "minimind-3v", "--recipe", "minigpt4"], "--preset minimind-3v is the recipe minimind-3v, not "
                                                         "--recipe minigpt4"),
])
def test_recipe_flag_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        demo.parse_args(argv)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name", list(demo.RECIPES))
def test_recipe_entry_is_well_formed(name, tmp_path, monkeypatch):
    """Every stage names a real script, data and trainable set, and its flags parse as the trainer's own; the
    demo's --device reaches the training and scoring scripts (a GPU faked: the flag checks what torch sees)."""
    import eval_vlm

    recipe = demo.RECIPES[name]
    assert (recipe.preset is None) != (recipe.language_model is None), "a MiniMind preset or a transformers LM"
    assert (recipe.tokenizer is None) == (recipe.preset is None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert demo.parse_args(["--recipe", name]).device == "cpu"  # the README's figures are CPU ones
    args = demo.parse_args(["--recipe", name, "--device", "cuda"])
    assert eval_vlm.parse_args([*demo.scoring_flags(recipe, {"vision": tmp_path / "vision", "tokenizer": tmp_path},
                                                    args), "--weight", "w.pth"]).device == "cuda"
    assets = {"vision": tmp_path / "vision", "tokenizer": tmp_path / "tokenizer", "language_model": tmp_path / "lm"}
    for stage in recipe.stages:
        assert stage.script in STAGE_SCRIPTS and stage.data in ("pretrain", "sft")
        assert stage.trainable in TRAINABLE_CHOICES
        cfg = parse_stage_args(stage.script, [*demo.training_flags(recipe, assets, args), "--trainable",
                                              stage.trainable, *stage.flags])
        assert cfg.trainable == stage.trainable and cfg.device == "cuda"
        if recipe.language_model:
            assert cfg.language_model == str(tmp_path / "lm")
        else:
            assert cfg.preset == recipe.preset and cfg.language_model is None


def lm_weights(path):
    return {key: value for key, value in torch.load(path, weights_only=True).items()
            if not key.startswith("vision_proj.")}


@pytest.mark.parametrize("name", list(demo.RECIPES))
def test_recipe_stages_run(name, tmp_path):
    """The recipe's stand-ins, then its stages (after the language stage for a transformers LM) for one step each:
    each writes its weights, with the trainable set the table names; a frozen LM comes out unchanged."""
    recipe = demo.RECIPES[name]
    args = demo.parse_args(["--recipe", name, "--out_dir", str(tmp_path), *TINY])
    assets = demo.build_assets(recipe, tmp_path, args)
    run_dir = tmp_path / "run"
    weight = "none"
    stages = ((demo.LANGUAGE_STAGE,) if recipe.language_model else ()) + recipe.stages
    for stage in stages:
        start = weight
        weight, (title, epochs, seconds) = demo.run_stage(run_dir, stage, "llm" if stage.data == "language" else
                                                          weight, recipe, assets, assets["data"], args)
        assert weight.is_file() and title == demo.STAGE_TITLES[stage.data] and epochs == 1 and seconds > 0
        assert TRAINABLE_IN_LOG[stage.trainable] in (run_dir / f"{stage.data}.log").read_text()
        if stage.trainable == "projector":  # MiniGPT-4: the LM stays as the language stage left it
            before, after = lm_weights(start), lm_weights(weight)
            assert before.keys() == after.keys()
            assert all(torch.equal(before[key], after[key]) for key in before)
