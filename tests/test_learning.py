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
    # Measured, with the image minus blind: 11.2 (issue 21's fresh clone) to 25.8 points; colour 91.7-94.2% where
    # it was read, about 76% implied by the 11.2 run (docs/demo.md). Two other SFT mixes that stayed at chance had
    # -2.7 and 0 points. 480 questions: one standard error is about 2.3 points.
    for mode, entry in results["pope"]["modes"].items():
        assert entry["metrics"]["accuracy"] > entry["blind"]["accuracy"] + 0.05, (mode, results["pope"])
        assert entry["metrics"]["category"]["colour"]["accuracy"] > 0.6, (mode, results["pope"])
