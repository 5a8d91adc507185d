"""Build the offline stand-ins for the hub downloads (tokenizer, tiny CLIP, shapes dataset): see dev/synthetic.py.

    python -m dev.make_assets                                      # everything, into out/tiny_assets
    python -m dev.make_assets --out_dir /tmp/assets --only data --n_pretrain 2000 --n_sft 2000
    python -m dev.make_assets --only tokenizer clip --clip_hidden_size 128
    python -m dev.make_assets --only siglip minimind3_tokenizer data       # minimind-3v's stand-ins
    python -m dev.make_assets --only blip2          # a tiny BLIP-2 folder for --qformer_init (CLIP's width)
    python -m dev.make_assets --only qwen2 llama    # tiny transformers LM folders for --language_model
"""
if not __package__:  # started as a file: its folder, not the repo root, is on the import path
    raise SystemExit("run it from the repository root as: python -m dev.make_assets")

import argparse
import time
from pathlib import Path

from common import DEFAULT_SAVE_DIR, MAX_SEED, bounded
from dev.synthetic import (ASSET_PARTS, DEFAULT_ASSET_PARTS, DEFAULT_VOCAB_SIZE, MIN_VOCAB_SIZE, build_all,
                               describe_path)

DEFAULT_OUT_DIR = DEFAULT_SAVE_DIR / "tiny_assets"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Build the offline tokenizer, tiny CLIP, shapes dataset and the "
                                                 "other stand-ins (SigLIP, MiniMind-3 tokenizer, BLIP-2).")
    parser.add_argument("--out_dir", type=Path, default=DEFAULT_OUT_DIR, help="where to write the assets")
    parser.add_argument("--only", nargs="+", choices=ASSET_PARTS, default=list(DEFAULT_ASSET_PARTS),
                        help=f"build only these parts (default: {' '.join(DEFAULT_ASSET_PARTS)}, MiniMind2-V's; "
                             f"siglip and minimind3_tokenizer are minimind-3v's; blip2 a BLIP-2 folder whose "
                             f"Q-Former --qformer_init reads; qwen2 and llama tiny transformers LM folders with "
                             f"their tokenizers, for --language_model)")
    parser.add_argument("--seed", type=bounded(int, 0, MAX_SEED), default=0,
                        help="seed for data, CLIP weights and English corpus")
    parser.add_argument("--n_pretrain", type=bounded(int, 1), default=64, help="pretrain image-caption records")
    parser.add_argument("--n_sft", type=bounded(int, 1), default=64, help="single-image SFT records")
    parser.add_argument("--n_sft_multi", type=bounded(int, 0), default=None,
                        help="two-image SFT records (default: a quarter of --n_sft)")
    parser.add_argument("--n_eval", type=bounded(int, 1), default=30, help="held-out eval questions")
    parser.add_argument("--vocab_size", type=bounded(int, MIN_VOCAB_SIZE), default=DEFAULT_VOCAB_SIZE,
                        help="upper bound on the tokenizer vocab (the small corpus may stop it earlier)")
    parser.add_argument("--clip_hidden_size", type=bounded(int, 1), default=64, help="width of both CLIP towers")
    parser.add_argument("--clip_num_layers", type=bounded(int, 1), default=2, help="depth of both CLIP towers")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    paths = build_all(args.out_dir, n_pretrain=args.n_pretrain, n_sft=args.n_sft, n_eval=args.n_eval,
                      seed=args.seed, n_sft_multi=args.n_sft_multi, vocab_size=args.vocab_size,
                      clip_hidden_size=args.clip_hidden_size, clip_num_layers=args.clip_num_layers,
                      parts=args.only)
    for name, path in paths.items():
        print(f"{name:18s} {path}  ({describe_path(path)})")
    print(f"built {', '.join(args.only)} in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
