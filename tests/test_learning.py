"""The image path carries information: trained on shapes-and-colours images the model answers held-out
questions well above chance and POPE-style yes/no questions well above its blind baseline; the same run on blank
images stays near chance (scripts/demo.py, smaller)."""
import pytest

from scripts import demo


@pytest.fixture(scope="module")
def demo_results(tmp_path_factory):
    """One demo run at its own sizes, with the blank-image control, shared by the tests below."""
    out_dir = tmp_path_factory.mktemp("demo")
    args = demo.parse_args(["--out_dir", str(out_dir), "--blank_control", "--num_workers", "0"])
    return demo.main_with_args(args, score_every_stage=False)


@pytest.mark.slow
def test_answers_depend_on_the_image(demo_results):
    real, blank = demo_results["real images"]["after SFT"], demo_results["blank images"]["after SFT"]
    assert real["accuracy"] > real["chance"] + 0.25, demo_results
    assert blank["accuracy"] < blank["chance"] + 0.12, demo_results


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason="issue 21: the yes/no answers leave chance only near the end of SFT, and "
                                        "small numeric changes move that past the last step (docs/demo.md)")
def test_pope_yes_no_answers_beat_the_blind_baseline(demo_results):
    # Measured, with the image minus blind: 11.2 (issue 21's fresh clone) to 25.8 points; colour 91.7-94.2% where
    # it was read, about 76% implied by the 11.2 run; 0 points (chance, always "yes") on the tree that merged issue
    # 17 (docs/demo.md). 480 questions: one standard error is about 2.3 points.
    for mode, entry in demo_results["pope"]["modes"].items():
        assert entry["metrics"]["accuracy"] > entry["blind"]["accuracy"] + 0.05, (mode, demo_results["pope"])
        assert entry["metrics"]["category"]["colour"]["accuracy"] > 0.6, (mode, demo_results["pope"])
