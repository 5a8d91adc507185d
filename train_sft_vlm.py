"""Stage 2, supervised fine-tuning: train vision_proj and the whole LM on image-grounded conversations.

One GPU:            python train_sft_vlm.py
Several GPUs:       torchrun --nproc_per_node 8 train_sft_vlm.py
Several machines:   torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr HOST --master_port 29500 \
                        train_sft_vlm.py             (and --node_rank 1 on the second machine)
CPU smoke run:      python train_sft_vlm.py --device cpu --hidden_size 64 --num_hidden_layers 2 \
                        --from_weight none --batch_size 2 --max_steps 5 --num_workers 0

Starts from out/pretrain_vlm_512.pth (stage 1's output). Writes out/sft_vlm_512.pth and
checkpoints/sft_vlm_512_resume.pth. Multi-image data: --data_path dataset/sft_vlm_data_multi.jsonl.
"""
from common import run_cli
from trainer.training import run_stage


def main(argv=None):
    run_stage("sft", __doc__, argv)


if __name__ == "__main__":
    run_cli(main)
