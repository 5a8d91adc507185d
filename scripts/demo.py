"""The whole pipeline, offline, in a few minutes on a CPU: tiny assets -> pretrain -> SFT -> held-out accuracy
-> a POPE-format benchmark score card (scripts.eval_bench) of the trained model on held-out pictures.

    python -m scripts.demo --install        # pip-install the requirements first, then run
    python -m scripts.demo                  # outputs under out/demo/
    python -m scripts.demo --blank_control  # also train on blank images: accuracy should stay near chance
    python -m scripts.demo --recipe minigpt4  # another system (RECIPES below; the README's "Recipes")

It builds a randomly initialised CLIP (224 px, 16 px patches, so still 196 image tokens), a tokenizer with
MiniMind2's special tokens and chat template, and a synthetic shapes-and-colours dataset in upstream's JSONL
+ image-folder format, then runs the real `train_pretrain_vlm.py`, `train_sft_vlm.py` and `eval_vlm.py`.
There is no pretrained language model offline, so both stages here train the whole LM (--trainable all)
from random weights; with the real assets the stages keep their upstream defaults.

`--recipe` picks the system (RECIPES). The recipes with a transformers LM (basic-vlm-*, minigpt4) freeze it or
train only LoRA adapters on it, and a random LM so treated cannot learn to answer: their tiny random Qwen2 / Llama
stand-in first gets its language from a text-only stage on the demo's own texts (every picture replaced by its
description), standing in for the pretrained LLM a real user brings; then the recipe's stages run as a user
runs them.
"""
if not __package__:  # started as a file: its folder, not the repo root, is on the import path
    raise SystemExit("run it from the repository root as: python -m scripts.demo")

import argparse
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# This script installs the requirements itself (--install): at module level it imports only the standard
# library and common.py (torch-free); the project modules are imported inside the functions, after the install.
from common import DEFAULT_SAVE_DIR, MAX_SEED, REPO_ROOT, bounded, device_flag

REQUIREMENTS_FILE = REPO_ROOT / "requirements.txt"
ACCURACY_LINE = re.compile(r"accuracy (\d+)/(\d+) = ([\d.]+)% \(chance ([\d.]+)%")
BLANK_GREY = (128, 128, 128)


@dataclass(frozen=True)
class Stage:
    """One run of a training script in a recipe."""
    script: str  # trainer.config STAGE_SCRIPTS key: "pretrain" | "sft" (it also names the output, e.g. sft_vlm)
    data: str  # "pretrain" (captions), "sft" (questions and descriptions), "language" (text only, LANGUAGE_STAGE)
    trainable: str  # trainer.config TRAINABLE_CHOICES entry
    flags: tuple = ()  # further trainer flags, after the demo's own (so they win: argparse keeps the last)


@dataclass(frozen=True)
class Recipe:
    """A system the project builds, at the demo's size: its parts and its training stages, in order."""
    summary: str
    vision: str  # the vision encoder stand-in (a dev.synthetic asset part): "clip" | "siglip"
    stages: tuple  # Stage, in order; a MiniMind LM starts from random weights, a transformers LM from LANGUAGE_STAGE
    preset: str = None  # a MiniMind recipe: model.presets entry (its tokenizer stand-in below)
    tokenizer: str = None  # a MiniMind recipe: its tokenizer stand-in (asset part)
    language_model: str = None  # a transformers-LM recipe: dev.synthetic TINY_LM_FAMILIES entry (random stand-in)
    part_flags: tuple = ()  # trainer flags for the vision stack
    # The LM's (hidden size, layers) at the demo's size (a transformers-LM recipe's stand-in is built so). MiniMind2-V's
    # is 3 layers of 96: a yes/no answer compares the asked word with the picture, which 2 layers (128x2) learnt late
    # or not at all (chance on some seeds); 3 layers of 96 learn it on every seed tried (docs/demo.md).
    lm_shape: tuple = (128, 2)
    # SFT epochs at the demo's size. MiniMind2-V's 96x3 learns its yes/no answers in 4 (seeds 0-2: POPE card 19.6 to
    # 26.3 points above blind), which buys back the time its third layer costs per step (docs/demo.md).
    sft_epochs: int = 5


# Basic-Vision-Language-Model's LoRA: dropout 0.1, every linear layer of the LM's blocks (its `c_attn|w1|w2` on
# Qwen-7B), the projector with its own rate (--projector_lr). Rank 32 at the demo's 128-wide LM (its 128 at 4096).
# At the demo's size the projector's rate is the adapters' own: 3x (Basic-VLM's 1e-4 vs 3e-5) left the tiny Qwen2
# guessing colours (55.8% held-out), as did rank 16 on seed 1 (67.5%); docs/demo.md has the runs.
BASIC_VLM_LORA = Stage("sft", "sft", "lora", (
    "--lora_rank", "32", "--lora_dropout", "0.1", "--lora_target",
    "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj", "--learning_rate", "1e-3", "--projector_lr", "1e-3"))
RECIPES = {
    "minimind2-v": Recipe("MiniMind2-V: MiniMind LM + CLIP + Linear projector, pretrain then SFT", "clip",
                          (Stage("pretrain", "pretrain", "all"), Stage("sft", "sft", "all")),
                          preset="minimind2-v", tokenizer="tokenizer", lm_shape=(96, 3), sft_epochs=4),
    "minimind-3v": Recipe("minimind-3v: MiniMind-3 LM + SigLIP + MLP projector, pretrain then SFT", "siglip",
                          (Stage("pretrain", "pretrain", "all"), Stage("sft", "sft", "all")),
                          preset="minimind-3v", tokenizer="minimind3_tokenizer"),
    "basic-vlm-qwen2": Recipe("Basic-VLM: a Qwen2 LM + SigLIP + MLP projector, LoRA on the LM, one stage", "siglip",
                              (BASIC_VLM_LORA,), language_model="qwen2",
                              part_flags=("--vision_encoder", "siglip", "--projector", "mlp")),
    "basic-vlm-llama": Recipe("Basic-VLM: a Llama LM + SigLIP + MLP projector, LoRA on the LM, one stage", "siglip",
                              (BASIC_VLM_LORA,), language_model="llama",
                              part_flags=("--vision_encoder", "siglip", "--projector", "mlp")),
    "minigpt4": Recipe("MiniGPT-4: a frozen Llama LM + CLIP + Q-Former and Linear; captions, then descriptions",
                       "clip", (Stage("pretrain", "pretrain", "projector", ("--learning_rate", "2e-3")),
                                Stage("sft", "sft", "projector", ("--learning_rate", "2e-3"))),
                       language_model="llama",
                       part_flags=("--vision_encoder", "clip", "--projector", "qformer", "--num_query_tokens", "32",
                                   "--qformer_hidden_size", "64", "--qformer_num_layers", "2",
                                   "--qformer_num_heads", "4")),
}
DEFAULT_RECIPE = "minimind2-v"
# The text-only stage that gives a random stand-in LM its language (the whole LM trains; its own weights first).
LANGUAGE_STAGE = Stage("pretrain", "language", "all")
STAGE_TITLES = {"language": "language", "pretrain": "pretrain", "sft": "SFT"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default=None, help="where assets, weights and logs go (default: out/demo, "
                                                   "out/demo-RECIPE for the other recipes)")
    p.add_argument("--recipe", default=None, choices=tuple(RECIPES),
                   help="the system to build: " + "; ".join(f"{name}: {recipe.summary}"
                                                            for name, recipe in RECIPES.items())
                        + f" (default {DEFAULT_RECIPE})")
    p.add_argument("--preset", default=None, choices=tuple(name for name, recipe in RECIPES.items() if recipe.preset),
                   help="the MiniMind recipes by their preset name: the same as --recipe")
    p.add_argument("--install", action="store_true",
                   help="pip install -r requirements.txt first (and torch if missing: see the README)")
    p.add_argument("--n_train", type=bounded(int, 1), default=1500, help="records per training stage")
    p.add_argument("--n_eval", type=bounded(int, 1), default=120, help="held-out questions")
    p.add_argument("--hidden_size", type=bounded(int, 1), default=None,
                   help="LM width (default: the recipe's demo LM, Recipe.lm_shape)")
    p.add_argument("--num_hidden_layers", type=bounded(int, 1), default=None,
                   help="LM depth (default: the recipe's demo LM, Recipe.lm_shape)")
    p.add_argument("--n_language", type=bounded(int, 1), default=3000,
                   help="text-only records of the stage that gives a transformers-LM recipe's random LM its language")
    p.add_argument("--language_epochs", type=bounded(int, 1), default=4, help="epochs of that stage")
    p.add_argument("--pretrain_epochs", type=bounded(int, 1), default=2)
    # Yes/no answers are learnt late: the POPE-format accuracy is near chance for the first few hundred SFT steps
    # and climbs over the next thousand (docs/demo.md).
    p.add_argument("--sft_epochs", type=bounded(int, 1), default=None,
                   help="SFT epochs (default: the recipe's, Recipe.sft_epochs)")
    p.add_argument("--batch_size", type=bounded(int, 1), default=16)
    p.add_argument("--pretrain_lr", type=bounded(float, 0, low_open=True), default=1e-3)
    p.add_argument("--sft_lr", type=bounded(float, 0, low_open=True), default=1e-3)
    p.add_argument("--num_workers", type=bounded(int, 0), default=1)
    # CPU by default: the README's figures are CPU ones, the same on every machine; a GPU trains under bf16 autocast
    # and scores in bf16, which moves them a little.
    p.add_argument("--device", type=device_flag, default="cpu",
                   help="where the stages train and the scoring runs (cuda: bf16 autocast; default cpu)")
    p.add_argument("--seed", type=bounded(int, 0, MAX_SEED), default=0)
    p.add_argument("--max_steps", type=bounded(int, 0), default=0,
                   help="stop each training stage after this many optimizer steps (0: no limit; for quick checks)")
    p.add_argument("--blank_control", action="store_true",
                   help="repeat the run with every training image blank (the image path must carry the answer)")
    args = p.parse_args(argv)
    if args.recipe and args.preset and args.recipe != args.preset:
        p.error(f"--preset {args.preset} is the recipe {args.preset}, not --recipe {args.recipe}: give one of them")
    args.recipe = args.recipe or args.preset or DEFAULT_RECIPE
    hidden_size, num_hidden_layers = RECIPES[args.recipe].lm_shape
    args.hidden_size = args.hidden_size or hidden_size
    args.num_hidden_layers = args.num_hidden_layers or num_hidden_layers
    args.sft_epochs = args.sft_epochs or RECIPES[args.recipe].sft_epochs
    return args


def install_requirements():
    try:
        import torch  # noqa: F401  (only: is it installed?)
    except ImportError:
        print("-- torch is missing: installing PyPI's default build (on Linux a CUDA build of several GB; for a "
              "CPU-only machine stop here and first run: pip install torch --index-url "
              "https://download.pytorch.org/whl/cpu)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "torch"], check=True)
    print(f"-- pip install -r {REQUIREMENTS_FILE}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS_FILE)], check=True)


def run_step(title, command, log_path):
    """Run one real script, its output into a log file; stop the demo with the log's tail on failure."""
    start = time.time()
    print(f"-- {title} ...", flush=True)
    with open(log_path, "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    text = Path(log_path).read_text()
    if result.returncode != 0:
        tail = "\n".join(text.splitlines()[-15:])
        raise SystemExit(f"{title} failed (exit {result.returncode}); log {log_path}:\n{tail}")
    print(f"   done in {time.time() - start:.0f} s (log: {log_path})", flush=True)
    return text


def blank_copy(data, out_dir):
    """The same records with every image replaced by one flat grey picture."""
    import shutil

    from PIL import Image

    blank = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for key in ("pretrain_jsonl", "sft_jsonl"):
        target = out_dir / Path(data[key]).name
        shutil.copy(data[key], target)
        blank[key] = target
    for key in ("pretrain_images", "sft_images"):
        folder = out_dir / Path(data[key]).name
        folder.mkdir(parents=True, exist_ok=True)
        for image in Path(data[key]).iterdir():
            Image.new("RGB", Image.open(image).size, BLANK_GREY).save(folder / image.name)
        blank[key] = folder
    return blank


def training_flags(recipe, assets, args):
    """The trainer flags that say what the model is and where its assets are, common to a recipe's stages."""
    flags = ["--device", args.device, "--vision_model_path", str(assets["vision"]), *recipe.part_flags]
    if recipe.preset:
        return [*flags, "--preset", recipe.preset, "--hidden_size", str(args.hidden_size), "--num_hidden_layers",
                str(args.num_hidden_layers), "--tokenizer_path", str(assets["tokenizer"])]
    return [*flags, "--language_model", str(assets["language_model"])]


def scoring_flags(recipe, assets, args):
    """eval_vlm.py / scripts.eval_bench flags besides --weight (a transformers-LM file's architecture file names
    its LM folder and tokenizer)."""
    flags = ["--device", args.device, "--vision_model_path", str(assets["vision"])]
    if recipe.preset:
        return [*flags, "--preset", recipe.preset, "--hidden_size", str(args.hidden_size), "--num_hidden_layers",
                str(args.num_hidden_layers), "--tokenizer_path", str(assets["tokenizer"])]
    return flags


STAGE_WEIGHTS = {"language": "language_lm", "pretrain": "pretrain_vlm", "sft": "sft_vlm"}  # Stage.data -> output


def stage_epochs_and_lr(stage, args):
    return {"language": (args.language_epochs, args.pretrain_lr), "pretrain": (args.pretrain_epochs, args.pretrain_lr),
            "sft": (args.sft_epochs, args.sft_lr)}[stage.data]


def run_stage(run_dir, stage, from_weight, recipe, assets, data, args, title=None):
    """One stage through its real training script; returns its weights file and (title, epochs, seconds)."""
    from trainer.config import STAGE_SCRIPTS

    epochs, learning_rate = stage_epochs_and_lr(stage, args)
    images = data["sft_images" if stage.data == "language" else f"{stage.data}_images"]  # text only: any folder
    title = title or STAGE_TITLES[stage.data]
    run_dir.mkdir(parents=True, exist_ok=True)  # the language stage runs before train_and_score
    started = time.time()
    run_step(title, [
        sys.executable, STAGE_SCRIPTS[stage.script], *training_flags(recipe, assets, args),
        "--save_dir", str(run_dir), "--checkpoint_dir", str(run_dir / "checkpoints"),
        "--save_weight", STAGE_WEIGHTS[stage.data], "--from_weight", str(from_weight),
        "--trainable", stage.trainable, "--batch_size", str(args.batch_size), "--num_workers", str(args.num_workers),
        "--log_interval", "20", "--seed", str(args.seed), "--max_steps", str(args.max_steps),
        "--cache_vision_features", str(run_dir / "vision_features"),  # the encoder is frozen: run it once
        "--epochs", str(epochs), "--learning_rate", str(learning_rate),
        "--data_path", str(data[f"{stage.data}_jsonl"]), "--images_path", str(images), *stage.flags],
        run_dir / f"{stage.data}.log")
    return run_dir / f"{STAGE_WEIGHTS[stage.data]}_{args.hidden_size}.pth", (
        STAGE_TITLES[stage.data], epochs, time.time() - started)


def train_and_score(run_dir, recipe, assets, data, args, score_every_stage=True, start_weight=None):
    """The recipe's stages through the real scripts, from random weights (a MiniMind LM) or from `start_weight`
    (a transformers LM after LANGUAGE_STAGE); held-out accuracy before and after each stage (or only after the
    last), and each stage's (title, epochs, seconds)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    scores, times = {}, []
    if score_every_stage:
        if start_weight is None:
            start_weight_name = run_dir / f"untrained_{args.hidden_size}.pth"
            write_untrained_weights(start_weight_name, recipe, assets, args)
            scores["untrained"] = score(start_weight_name, recipe, assets, args)
        else:
            scores["language only"] = score(start_weight, recipe, assets, args)
    weight = start_weight or "none"
    for index, stage in enumerate(recipe.stages):
        weight, timing = run_stage(run_dir, stage, weight, recipe, assets, data, args)
        times.append(timing)
        if score_every_stage or index == len(recipe.stages) - 1:
            scores[f"after {STAGE_TITLES[stage.data]}"] = score(weight, recipe, assets, args)
    return scores, times


def write_untrained_weights(path, recipe, assets, args):
    import torch

    from common import atomic_save, quiet_transformers
    from model.model_vlm import MiniMindVLM
    from model.presets import vlm_config
    from model.weights import write_architecture
    from trainer.training import inference_state_dict

    torch.manual_seed(args.seed)
    with quiet_transformers():  # CLIP's unused text tower would print a load report
        model = MiniMindVLM(vlm_config(recipe.preset, args.hidden_size, args.num_hidden_layers),
                            vision_model_path=assets["vision"])
    atomic_save(inference_state_dict(model), path)
    write_architecture(path, model.config, recipe.preset, assets["vision"])


def score(weight, recipe, assets, args):
    weight = Path(weight)
    log_path = weight.parent / f"eval_{weight.stem}.log"
    text = run_step(f"score {weight.stem}", [
        sys.executable, "eval_vlm.py", *scoring_flags(recipe, assets, args), "--weight", str(weight),
        "--questions", str(assets["data"]["eval_jsonl"])], log_path)
    match = ACCURACY_LINE.search(text)
    if not match:
        raise SystemExit(f"no accuracy line in {log_path}")
    return {"correct": int(match[1]), "total": int(match[2]), "accuracy": float(match[3]) / 100,
            "chance": float(match[4]) / 100}


def benchmark_pope(run_dir, recipe, assets, args):
    """The model after the recipe's last stage on the held-out POPE-format file through scripts.eval_bench;
    RESULT.json is checked against the metrics recomputed from PRED.jsonl."""
    from inference.bench_run import read_predictions, recompute_result

    result_path, predictions_path = run_dir / "pope_result.json", run_dir / "pope_predictions.jsonl"
    last_weight = run_dir / f"{STAGE_WEIGHTS[recipe.stages[-1].data]}_{args.hidden_size}.pth"
    run_step("POPE-format benchmark", [
        sys.executable, "-m", "scripts.eval_bench", "--bench", "pope", "--data_path",
        str(assets["data"]["eval_pope_parquet"]), "--weight", str(last_weight), *scoring_flags(recipe, assets, args),
        "--out", str(result_path), "--predictions", str(predictions_path), "--no_progress"],
        run_dir / "bench_pope.log")
    result = json.loads(result_path.read_text())
    if recompute_result(result, read_predictions(predictions_path)) != result["modes"]:
        raise SystemExit(f"the metrics recomputed from {predictions_path} differ from {result_path}")
    return result


def print_pope_card(result):
    from inference.bench_run import score_card

    print(f"\nPOPE-format benchmark of the last stage's model on {result['samples']} held-out yes/no questions "
          f"(python -m scripts.eval_bench; metrics recomputed from PRED.jsonl equal RESULT.json)\n")
    print(score_card(result))
    for mode, entry in result["modes"].items():
        gain = entry["metrics"]["accuracy"] - entry["blind"]["accuracy"]
        print(f"{mode}: accuracy {entry['metrics']['accuracy']:.1%} with the image, {entry['blind']['accuracy']:.1%} "
              f"without ({gain:+.1%})")


def main(argv=None):
    return main_with_args(parse_args(argv))


def build_assets(recipe, out_dir, args):
    """The recipe's offline stand-ins and the shapes data; a transformers-LM recipe's tiny random LM is as wide
    and deep as the demo's MiniMind LM (--hidden_size, --num_hidden_layers), with its text-only language data."""
    from dev import synthetic

    print(f"-- building offline assets in {out_dir / 'assets'} ...", flush=True)
    parts = (recipe.vision, "data", *((recipe.tokenizer,) if recipe.tokenizer else ()))
    paths = synthetic.build_all(out_dir / "assets", n_pretrain=args.n_train, n_sft=args.n_train,
                                n_eval=args.n_eval, seed=args.seed, parts=parts)
    assets = {"vision": Path(paths[recipe.vision]), "data": paths}
    if recipe.tokenizer:
        assets["tokenizer"] = Path(paths[recipe.tokenizer])
    if recipe.language_model:
        assets["language_model"] = synthetic.build_tiny_causal_lm(
            out_dir / "assets" / recipe.language_model, recipe.language_model, synthetic.tokenizer_corpus(args.seed),
            hidden_size=args.hidden_size, num_layers=args.num_hidden_layers, seed=args.seed)
        paths["language_jsonl"] = synthetic.write_language_jsonl(out_dir / "assets" / "language" / "language.jsonl",
                                                                 args.n_language, args.seed)
    return assets


def main_with_args(args, score_every_stage=True):
    if args.install:
        install_requirements()

    started = time.time()
    recipe = RECIPES[args.recipe]
    out_dir = Path(args.out_dir or DEFAULT_SAVE_DIR / ("demo" if args.recipe == DEFAULT_RECIPE
                                                       else f"demo-{args.recipe}"))
    print(f"-- recipe {args.recipe}: {recipe.summary}", flush=True)
    assets = build_assets(recipe, out_dir, args)
    start_weight, times = None, {}
    if recipe.language_model:
        print(f"-- the {recipe.language_model} LM here is random; a text-only stage on the demo's own texts (every "
              f"picture replaced by its description) gives it its language, standing in for the pretrained LLM a "
              f"real user brings; then the recipe's stages run as a user runs them", flush=True)
        start_weight, timing = run_stage(out_dir / "run", LANGUAGE_STAGE, "llm", recipe, assets, assets["data"], args,
                                         title="language (text only, whole LM: the stand-in for a pretrained LLM)")
        times["language"] = [timing]
    results = {}
    results["real images"], times["real images"] = train_and_score(out_dir / "run", recipe, assets, assets["data"],
                                                                   args, score_every_stage, start_weight)
    pope = benchmark_pope(out_dir / "run", recipe, assets, args)
    if args.blank_control:
        blank = blank_copy(assets["data"], out_dir / "blank_data")
        results["blank images"], times["blank images"] = train_and_score(
            out_dir / "blank_run", recipe, assets, blank, args, score_every_stage, start_weight)
    print(f"\nheld-out accuracy of {args.recipe} (greedy answers naming exactly the right choice)")
    print(f"{'run':<14}{'model':<18}{'accuracy':>10}{'chance':>9}")
    for run_name, scores in results.items():
        for model_name, s in scores.items():
            print(f"{run_name:<14}{model_name:<18}{s['accuracy']:>10.1%}{s['chance']:>9.1%}")
    print(f"\ntraining time\n{'run':<14}{'stage':<12}{'epochs':>7}{'seconds':>9}{'s/epoch':>9}")
    for run_name, stages in times.items():
        for title, epochs, seconds in stages:
            print(f"{run_name:<14}{title:<12}{epochs:>7}{seconds:>9.0f}{seconds / epochs:>9.0f}")
    print_pope_card(pope)
    print(f"\ntotal {time.time() - started:.0f} s; weights and logs in {out_dir}")
    results["pope"] = pope
    results["times"] = times
    return results


if __name__ == "__main__":
    main()
