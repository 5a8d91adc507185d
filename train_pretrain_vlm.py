"""Stage 1, pretraining: teach vision_proj (and the last LM layer) to turn CLIP features into LM inputs.

One GPU:            python train_pretrain_vlm.py
Several GPUs:       torchrun --nproc_per_node 8 train_pretrain_vlm.py
Several machines:   torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr HOST --master_port 29500 \
                        train_pretrain_vlm.py        (and --node_rank 1 on the second machine)
CPU smoke run:      python train_pretrain_vlm.py --device cpu --hidden_size 64 --num_hidden_layers 2 \
                        --from_weight none --batch_size 2 --max_steps 5 --num_workers 0

Needs out/llm_512.pth, model/tokenizer.json, model/vision_model/clip-vit-base-patch16 and the pretrain data
(`python -m scripts.download`). Writes out/pretrain_vlm_512.pth (fp16, loadable by upstream's code) and
checkpoints/pretrain_vlm_512_resume.pth (add --from_resume 1 to continue an interrupted run).
"""
from common import run_cli
from dataset.processing import load_tokenizer
from trainer.training import (STAGE_DEFAULTS, build_dataset, build_model, build_parser, finish_run,
                              init_distributed, prepare_run, seed_everything, set_trainable, train)


def main(argv=None):
    args = build_parser(__doc__, **STAGE_DEFAULTS["pretrain"]).parse_args(argv)
    # 1. Processes and device (torchrun: one per GPU; NCCL on CUDA, gloo on CPU); rank 0 alone talks
    ctx = init_distributed(args.device)
    seed_everything(args.seed + ctx.rank)
    log = print if ctx.is_main else (lambda *a, **k: None)
    # 2. Tokenizer; model with CLIP frozen, start weights loaded strictly; what trains
    tokenizer = load_tokenizer(args.tokenizer_path)
    model = build_model(args, log=log)
    set_trainable(model, args.trainable)
    # 3. Data: every record checked and tokenised up front
    dataset = build_dataset(args, tokenizer, model.config, ctx, log=log)
    # 4. Optimizer, resume state, DDP, loader, logger
    setup, state = prepare_run(model, dataset, args, ctx, stage="Pretrain", log=log)
    # 5. Train
    try:
        train(setup, args, state, log=log)
    finally:
        finish_run(setup)


if __name__ == "__main__":
    run_cli(main)
