"""The whole pipeline, offline, in a few minutes on a CPU: tiny assets -> pretrain -> SFT -> held-out accuracy
-> a POPE-format benchmark score card (scripts.eval_bench) of the trained model on held-out pictures.

    python -m scripts.demo --install        # pip-install the requirements first, then run
    python -m scripts.demo                  # outputs under out/demo/
    python -m scripts.demo --blank_control  # also train on blank images: accuracy should stay near chance

It builds a randomly initialised CLIP (224 px, 16 px patches, so still 196 image tokens), a tokenizer with
MiniMind2's special tokens and chat template, and a synthetic shapes-and-colours dataset in upstream's JSONL
+ image-folder format, then runs the real `train_pretrain_vlm.py`, `train_sft_vlm.py` and `eval_vlm.py`.
There is no pretrained language model offline, so both stages here train the whole LM (--trainable all)
from random weights; with the real assets the stages keep their upstream defaults.
"""
if not __package__:  # started as a file: its folder, not the repo root, is on the import path
    raise SystemExit("run it from the repository root as: python -m scripts.demo")

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

# This script installs the requirements itself (--install): at module level it imports only the standard
# library and common.py (torch-free); the project modules are imported inside the functions, after the install.
from common import DEFAULT_SAVE_DIR, MAX_SEED, REPO_ROOT, bounded

REQUIREMENTS_FILE = REPO_ROOT / "requirements.txt"
ACCURACY_LINE = re.compile(r"accuracy (\d+)/(\d+) = ([\d.]+)% \(chance ([\d.]+)%")
BLANK_GREY = (128, 128, 128)
# The demo LM's (hidden size, layers) per preset. MiniMind2-V's is 3 layers of 96: a yes/no answer compares the
# asked word with the picture, which 2 layers (128x2) learnt late or not at all (chance on some seeds); 3 layers of
# 96 learn it on every seed tried, with fewer weights per token (docs/demo.md).
DEMO_LM_SHAPES = {"minimind2-v": (96, 3), "minimind-3v": (128, 2)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default=None, help="where assets, weights and logs go (default: out/demo, "
                                                   "out/demo-minimind-3v for that preset)")
    p.add_argument("--preset", default="minimind2-v", choices=("minimind2-v", "minimind-3v"),
                   help="minimind2-v: tiny CLIP, Linear projector, 196 '@'; minimind-3v: tiny SigLIP, MLP projector, "
                        "64 <|image_pad|>, a MiniMind-3-style LM and tokenizer")
    p.add_argument("--install", action="store_true",
                   help="pip install -r requirements.txt first (and torch if missing: see the README)")
    p.add_argument("--n_train", type=bounded(int, 1), default=1500, help="records per training stage")
    p.add_argument("--n_eval", type=bounded(int, 1), default=120, help="held-out questions")
    p.add_argument("--hidden_size", type=bounded(int, 1), default=None,
                   help="LM width (default: the preset's demo LM, DEMO_LM_SHAPES)")
    p.add_argument("--num_hidden_layers", type=bounded(int, 1), default=None,
                   help="LM depth (default: the preset's demo LM, DEMO_LM_SHAPES)")
    p.add_argument("--pretrain_epochs", type=bounded(int, 1), default=2)
    # Yes/no answers are learnt late: the POPE-format accuracy is near chance for the first few hundred SFT steps
    # and climbs over the next thousand (docs/demo.md).
    p.add_argument("--sft_epochs", type=bounded(int, 1), default=5)
    p.add_argument("--batch_size", type=bounded(int, 1), default=16)
    p.add_argument("--pretrain_lr", type=bounded(float, 0, low_open=True), default=1e-3)
    p.add_argument("--sft_lr", type=bounded(float, 0, low_open=True), default=1e-3)
    p.add_argument("--num_workers", type=bounded(int, 0), default=1)
    p.add_argument("--seed", type=bounded(int, 0, MAX_SEED), default=0)
    p.add_argument("--blank_control", action="store_true",
                   help="repeat the run with every training image blank (the image path must carry the answer)")
    args = p.parse_args(argv)
    hidden_size, num_hidden_layers = DEMO_LM_SHAPES[args.preset]
    args.hidden_size = args.hidden_size or hidden_size
    args.num_hidden_layers = args.num_hidden_layers or num_hidden_layers
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


def model_and_asset_flags(assets, args):
    model_flags = ["--device", "cpu", "--preset", args.preset, "--hidden_size", str(args.hidden_size),
                   "--num_hidden_layers", str(args.num_hidden_layers)]
    asset_flags = ["--vision_model_path", str(assets["vision"]), "--tokenizer_path", str(assets["tokenizer"])]
    return model_flags, asset_flags


def train_and_score(run_dir, assets, data, args, score_every_stage=True):
    """Untrained -> pretrain -> SFT through the real scripts; held-out accuracy after each (or only at the end)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    model_flags, asset_flags = model_and_asset_flags(assets, args)
    train_flags = [*model_flags, *asset_flags, "--save_dir", str(run_dir), "--checkpoint_dir",
                   str(run_dir / "checkpoints"), "--trainable", "all", "--batch_size", str(args.batch_size),
                   "--num_workers", str(args.num_workers), "--log_interval", "20", "--seed", str(args.seed),
                   "--cache_vision_features", str(run_dir / "vision_features")]  # the encoder is frozen: run it once
    scores = {}
    if score_every_stage:
        write_untrained_weights(run_dir / f"untrained_{args.hidden_size}.pth", assets, args)
        scores["untrained"] = score(run_dir, "untrained", args, assets, model_flags, asset_flags)
    run_step("pretrain", [sys.executable, "train_pretrain_vlm.py", *train_flags, "--from_weight", "none",
                          "--epochs", str(args.pretrain_epochs), "--learning_rate", str(args.pretrain_lr),
                          "--data_path", str(data["pretrain_jsonl"]), "--images_path", str(data["pretrain_images"])],
             run_dir / "pretrain.log")
    if score_every_stage:
        scores["after pretrain"] = score(run_dir, "pretrain_vlm", args, assets, model_flags, asset_flags)
    run_step("SFT", [sys.executable, "train_sft_vlm.py", *train_flags, "--epochs", str(args.sft_epochs),
                     "--learning_rate", str(args.sft_lr), "--data_path", str(data["sft_jsonl"]),
                     "--images_path", str(data["sft_images"])], run_dir / "sft.log")
    scores["after SFT"] = score(run_dir, "sft_vlm", args, assets, model_flags, asset_flags)
    return scores


def write_untrained_weights(path, assets, args):
    import torch

    from common import atomic_save, quiet_transformers
    from model.model_vlm import MiniMindVLM
    from model.presets import vlm_config
    from model.weights import write_architecture
    from trainer.training import inference_state_dict

    torch.manual_seed(args.seed)
    with quiet_transformers():  # CLIP's unused text tower would print a load report
        model = MiniMindVLM(vlm_config(args.preset, args.hidden_size, args.num_hidden_layers),
                            vision_model_path=assets["vision"])
    atomic_save(inference_state_dict(model), path)
    write_architecture(path, model.config, args.preset, assets["vision"])


def score(run_dir, weight_name, args, assets, model_flags, asset_flags):
    text = run_step(f"score {weight_name}", [
        sys.executable, "eval_vlm.py", *model_flags, *asset_flags,
        "--weight", str(run_dir / f"{weight_name}_{args.hidden_size}.pth"),
        "--questions", str(assets["data"]["eval_jsonl"])], run_dir / f"eval_{weight_name}.log")
    match = ACCURACY_LINE.search(text)
    if not match:
        raise SystemExit(f"no accuracy line in {run_dir / f'eval_{weight_name}.log'}")
    return {"correct": int(match[1]), "total": int(match[2]), "accuracy": float(match[3]) / 100,
            "chance": float(match[4]) / 100}


def benchmark_pope(run_dir, assets, args):
    """The SFT model on the held-out POPE-format file through scripts.eval_bench; RESULT.json is checked
    against the metrics recomputed from PRED.jsonl."""
    from inference.bench_run import read_predictions, recompute_result

    model_flags, asset_flags = model_and_asset_flags(assets, args)
    result_path, predictions_path = run_dir / "pope_result.json", run_dir / "pope_predictions.jsonl"
    run_step("POPE-format benchmark", [
        sys.executable, "-m", "scripts.eval_bench", "--bench", "pope", "--data_path",
        str(assets["data"]["eval_pope_parquet"]), "--weight", str(run_dir / f"sft_vlm_{args.hidden_size}.pth"),
        *model_flags, *asset_flags, "--out", str(result_path), "--predictions", str(predictions_path),
        "--no_progress"], run_dir / "bench_pope.log")
    result = json.loads(result_path.read_text())
    if recompute_result(result, read_predictions(predictions_path)) != result["modes"]:
        raise SystemExit(f"the metrics recomputed from {predictions_path} differ from {result_path}")
    return result


def print_pope_card(result):
    from inference.bench_run import score_card

    print(f"\nPOPE-format benchmark of the SFT model on {result['samples']} held-out yes/no questions "
          f"(python -m scripts.eval_bench; metrics recomputed from PRED.jsonl equal RESULT.json)\n")
    print(score_card(result))
    for mode, entry in result["modes"].items():
        gain = entry["metrics"]["accuracy"] - entry["blind"]["accuracy"]
        print(f"{mode}: accuracy {entry['metrics']['accuracy']:.1%} with the image, {entry['blind']['accuracy']:.1%} "
              f"without ({gain:+.1%})")


def main(argv=None):
    return main_with_args(parse_args(argv))


def main_with_args(args, score_every_stage=True):
    if args.install:
        install_requirements()
    from dev import synthetic

    started = time.time()
    default_dir = DEFAULT_SAVE_DIR / ("demo" if args.preset == "minimind2-v" else f"demo-{args.preset}")
    out_dir = Path(args.out_dir or default_dir)
    print(f"-- building offline assets in {out_dir / 'assets'} ...", flush=True)
    vision, tokenizer = ("clip", "tokenizer") if args.preset == "minimind2-v" else ("siglip", "minimind3_tokenizer")
    paths = synthetic.build_all(out_dir / "assets", n_pretrain=args.n_train, n_sft=args.n_train,
                                n_eval=args.n_eval, seed=args.seed, parts=(tokenizer, vision, "data"))
    assets = {"vision": Path(paths[vision]), "tokenizer": Path(paths[tokenizer]), "data": paths}
    results = {"real images": train_and_score(out_dir / "run", assets, assets["data"], args, score_every_stage)}
    pope = benchmark_pope(out_dir / "run", assets, args)
    if args.blank_control:
        blank = blank_copy(assets["data"], out_dir / "blank_data")
        results["blank images"] = train_and_score(out_dir / "blank_run", assets, blank, args, score_every_stage)
    print("\nheld-out accuracy (greedy answers naming exactly the right choice)")
    print(f"{'run':<14}{'model':<16}{'accuracy':>10}{'chance':>9}")
    for run_name, scores in results.items():
        for model_name, s in scores.items():
            print(f"{run_name:<14}{model_name:<16}{s['accuracy']:>10.1%}{s['chance']:>9.1%}")
    print_pope_card(pope)
    print(f"\ntotal {time.time() - started:.0f} s; weights and logs in {out_dir}")
    results["pope"] = pope
    return results


if __name__ == "__main__":
    main()
