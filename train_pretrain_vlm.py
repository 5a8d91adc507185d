"""Stage 1, pretraining: teach vision_proj (and the last LM layer) to turn CLIP features into LM inputs.

`python train_pretrain_vlm.py --help` shows every flag and how to launch on one GPU, several GPUs (torchrun) or
several machines.

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
