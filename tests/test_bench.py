"""dev/bench.py: the quick run writes its JSON, the synthetic lengths have the intended shape, and the FLOP
count behind MFU agrees with torch's own FLOP counter. No test here asserts a speed."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model.model_vlm import IMAGE_PLACEHOLDER_ID, MiniMindVLM, VLMConfig
from dev import bench
from trainer.setup import set_trainable

from common import REPO_ROOT


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    # without ours_compiled: its inductor compilation alone would take minutes on a small CPU
    subprocess.run([sys.executable, "-m", "dev.bench", "--quick", "--out", str(out), "--modes", "upstream", "ours",
                    "ours_cache"],
                   check=True, cwd=REPO_ROOT, timeout=300, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_quick_run_writes_every_figure(quick_report):
    report = quick_report
    assert report["device"] == "cpu" and report["matmul_peak_tflops"] > 0
    for stage in ("pretrain", "sft"):
        modes = report["train"][stage]
        assert set(modes) == {"upstream", "ours", "ours_cache"}
        for mode, r in modes.items():
            for key in ("samples_per_s", "real_tokens_per_s", "padding_fraction", "peak_memory_mb", "mfu",
                        "mfu_incl_padding", "step_s_median"):
                assert r[key] > 0 or (key == "padding_fraction" and r[key] >= 0), (stage, mode, key)
            assert r["steps_timed"] >= 1 and len(r["step_s"]) == r["steps_timed"] + 1  # + the warm-up step
            assert r["mfu_incl_padding"] >= r["mfu"]
        # upstream pads every row to max_seq_len; ours only to the longest sample of a length-sorted batch
        assert modes["upstream"]["mean_padded_length"] == modes["upstream"]["max_seq_len"]
        assert modes["upstream"]["padding_fraction"] > modes["ours"]["padding_fraction"]
        assert modes["ours"]["mean_real_length"] == pytest.approx(modes["upstream"]["mean_real_length"], rel=0.5)
        assert set(report["speedup"][stage]) == {"ours", "ours_cache"}
    # the pretrain cache build encodes every unique image; SFT's images are pretrain's, so it encodes none
    assert report["cache"]["pretrain"]["images_encoded"] == report["cache"]["pretrain"]["unique_images"] > 0
    assert report["cache"]["sft"]["images_encoded"] == 0
    assert "samples_per_s_amortised" in report["train"]["pretrain"]["ours_cache"]
    for mode in ("upstream", "ours"):
        gen = report["generation"][mode]
        assert gen["tokens_per_s"] > 0 and gen["decode_tokens_per_s"] > 0 and gen["time_to_first_token_s"] > 0
    assert report["speedup"]["generation"] > 0


def test_lengths_are_stratified_log_uniform():
    lengths = bench.log_uniform_lengths(1000, 50, 600, np.random.default_rng(0))
    assert lengths.min() >= 50 and lengths.max() <= 600
    # log-uniform: the median is the geometric mean of the bounds, the mean (b - a) / ln(b / a)
    assert np.median(lengths) == pytest.approx(np.sqrt(50 * 600), rel=0.02)
    assert lengths.mean() == pytest.approx(550 / np.log(12), rel=0.02)


# MiniMind2-V's vision side in bench.model_shape's terms: the Linear projector, 196 patches of 16 px after a CLS.
CLIP_SHAPE = dict(projector="linear", image_tokens=196, patch_size=16, encoder_leading_tokens=1)


def counted_flops(function):
    """torch's count of matmul FLOPs. Attention runs on the math backend: the counter does not see CPU flash
    attention, and math attention's backward is 4 matmuls (no recomputed scores), so attention_backward=2."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        function()
    return counter.get_total_flops()


@pytest.mark.parametrize("policy", ["projector_last_layer", "all"])
def test_step_flops_match_torch_flop_counter(policy):
    shape = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                 vocab_size=6400, ve_hidden_size=48, clip_hidden_size=48, clip_layers=1, **CLIP_SHAPE)
    torch.manual_seed(0)
    model = MiniMindVLM(VLMConfig(hidden_size=64, num_hidden_layers=3, ve_hidden_size=48), vision_model_path=None)
    shape["intermediate_size"] = model.config.intermediate_size
    set_trainable(model, policy)
    batch, length = 2, 230
    input_ids = torch.randint(40, 600, (batch, length))
    input_ids[:, 10:10 + 196] = IMAGE_PLACEHOLDER_ID
    labels = input_ids.clone()
    labels[:, :215] = -100
    features = torch.randn(batch, 196, 48)
    targets = int((labels[:, 1:] != -100).sum())

    def step(loss_only):
        model(input_ids, labels=labels, image_features=features, loss_only=loss_only).loss.backward()

    # Math attention computes every (query, key) pair: the "executed" count with causal=False.
    for loss_only in (False, True):
        _, executed = bench.train_step_flops(shape, policy, [length] * batch, length, targets, batch,
                                             runs_clip=False, logits_everywhere=not loss_only, causal=False,
                                             attention_backward=2.0)
        counted = counted_flops(lambda: step(loss_only))
        if not loss_only:
            assert counted == executed
        else:
            # The last layer also skips its query-side work before the first target: less than the formula,
            # but by less than that one layer's whole share (the other layers run in full).
            assert executed - executed / shape["num_hidden_layers"] < counted < executed


@pytest.mark.parametrize("policy", ["projector", "projector_first_last_layers"])
def test_minimind3v_step_flops_match_torch_flop_counter(policy):
    """The MLP projector and the MiniMind-3 LM (QK-norm is no matmul) behind 64 image tokens."""
    from model.presets import vlm_config

    torch.manual_seed(0)
    config = vlm_config("minimind-3v", 64, 3, ve_hidden_size=48)
    model = MiniMindVLM(config, vision_model_path=None)
    set_trainable(model, policy)
    shape = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=config.num_attention_heads,
                 num_key_value_heads=config.num_key_value_heads, vocab_size=config.vocab_size, ve_hidden_size=48,
                 intermediate_size=config.intermediate_size, projector="mlp", image_tokens=64)
    batch, length = 2, 100
    input_ids = torch.randint(40, 600, (batch, length))
    input_ids[:, 10:10 + 64] = config.image_ids[0]
    labels = input_ids.clone()
    labels[:, :85] = -100
    targets = int((labels[:, 1:] != -100).sum())
    features = torch.randn(batch, 64, 48)
    _, executed = bench.train_step_flops(shape, policy, [length] * batch, length, targets, batch, runs_clip=False,
                                         logits_everywhere=True, causal=False, attention_backward=2.0)
    assert counted_flops(lambda: model(input_ids, labels=labels, image_features=features).loss.backward()) == \
        executed


def test_clip_flops_match_torch_flop_counter(tiny_clip_dir):
    model = MiniMindVLM(VLMConfig(hidden_size=64, num_hidden_layers=1), vision_model_path=tiny_clip_dir)
    encoder = model.vision_encoder
    shape = dict(clip_hidden_size=encoder.config.hidden_size, clip_layers=encoder.config.num_hidden_layers,
                 **CLIP_SHAPE)
    assert counted_flops(lambda: model.encode_images(torch.randn(3, 3, 224, 224))) == \
        3 * bench.clip_forward_flops(shape)


# ------------------------------------------- the hot-path change the benchmark measures keeps per-sample results

@pytest.mark.parametrize("use_moe, policy", [(False, "projector_last_layer"), (False, "all"), (True, "all")])
def test_loss_only_gives_the_same_loss_and_gradients(use_moe, policy):
    """loss_only skips logits without a target and the last layer's outputs before the first target; the
    loss and every gradient must match the full forward to float rounding."""
    torch.manual_seed(0)
    model = MiniMindVLM(VLMConfig(hidden_size=64, num_hidden_layers=3, use_moe=use_moe), vision_model_path=None)
    set_trainable(model, policy)
    model.train()
    input_ids = torch.randint(40, 600, (3, 260))
    input_ids[:, 20:216] = IMAGE_PLACEHOLDER_ID
    input_ids[2, 250:] = 0  # right padding
    labels = input_ids.clone()
    labels[0, :230] = -100
    labels[1, :240] = -100
    labels[1, 245:252] = -100  # two answer spans (multi-turn)
    labels[2, :225] = -100
    labels[2, 250:] = -100
    features = torch.randn(3, 196, 768)
    results = []
    for loss_only in (False, True):
        model.zero_grad()
        out = model(input_ids, labels=labels, image_features=features, loss_only=loss_only)
        (out.loss + out.aux_loss).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (full, full_grads), (fast, fast_grads) = results
    assert fast.logits is None and full.logits.shape == (3, 260, 6400)
    assert torch.allclose(fast.loss, full.loss, rtol=1e-6) and torch.equal(fast.aux_loss, full.aux_loss)
    assert set(fast_grads) == set(full_grads)
    for name, grad in full_grads.items():
        assert torch.allclose(fast_grads[name], grad, rtol=1e-4, atol=1e-7), name


def test_loss_only_falls_back_where_it_does_not_apply():
    torch.manual_seed(0)
    model = MiniMindVLM(VLMConfig(hidden_size=64, num_hidden_layers=2), vision_model_path=None).eval()
    input_ids = torch.randint(40, 600, (2, 12))
    labels = input_ids.clone()
    labels[:, :6] = -100
    with torch.no_grad():
        masked = model(input_ids, attention_mask=torch.ones_like(input_ids), labels=labels, loss_only=True)
        plain = model(input_ids, labels=labels)
    assert masked.logits is not None and torch.allclose(masked.loss, plain.loss)
