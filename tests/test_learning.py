"""The image path carries information: trained on shapes-and-colours images the model answers held-out
questions well above chance; the same run on blank images stays near chance (scripts/demo.py, smaller)."""
import pytest

from scripts import demo


@pytest.mark.slow
def test_answers_depend_on_the_image(tmp_path):
    args = demo.parse_args(["--out_dir", str(tmp_path), "--n_train", "800", "--n_eval", "60", "--epochs", "3",
                            "--blank_control", "--num_workers", "0"])
    results = demo.main_with_args(args, score_every_stage=False)
    real, blank = results["real images"]["after SFT"], results["blank images"]["after SFT"]
    assert real["accuracy"] > real["chance"] + 0.25, results
    assert blank["accuracy"] < blank["chance"] + 0.12, results
