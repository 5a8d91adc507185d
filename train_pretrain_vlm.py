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
from trainer.training import run_stage


def main(argv=None):
    run_stage("pretrain", __doc__, argv)


if __name__ == "__main__":
    run_cli(main)
