"""Stage 2, supervised fine-tuning: train vision_proj and the whole LM on image-grounded conversations.

`python train_sft_vlm.py --help` shows every flag and how to launch on one GPU, several GPUs (torchrun) or
several machines.

Starts from out/pretrain_vlm_512.pth (stage 1's output). Writes out/sft_vlm_512.pth and
checkpoints/sft_vlm_512_resume.pth. Multi-image data: --data_path dataset/sft_vlm_data_multi.jsonl.
"""
from common import run_cli
from trainer.training import run_stage


def main(argv=None):
    run_stage("sft", __doc__, argv)


if __name__ == "__main__":
    run_cli(main)
