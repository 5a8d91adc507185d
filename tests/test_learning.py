"""The image path carries information: trained on shapes-and-colours images the model answers held-out
questions well above chance and POPE-style yes/no questions well above its blind baseline; the same run on blank
images stays near chance (scripts/demo.py, smaller)."""
import pytest

from scripts import demo


@pytest.mark.slow
def test_answers_depend_on_the_image(tmp_path):
    # The demo's own sizes: with fewer SFT steps the yes/no answers have not left chance yet (README, Benchmarks).
    args = demo.parse_args(["--out_dir", str(tmp_path), "--blank_control", "--num_workers", "0"])
    results = demo.main_with_args(args, score_every_stage=False)
    real, blank = results["real images"]["after SFT"], results["blank images"]["after SFT"]
    assert real["accuracy"] > real["chance"] + 0.25, results
    assert blank["accuracy"] < blank["chance"] + 0.12, results
    for mode, entry in results["pope"]["modes"].items():
        assert entry["metrics"]["accuracy"] > entry["blind"]["accuracy"] + 0.1, (mode, results["pope"])
        assert entry["metrics"]["category"]["colour"]["accuracy"] > 0.75, (mode, results["pope"])
