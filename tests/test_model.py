"""The network: sizes, key names, numerics against an independent reference, cache, image splicing, loading."""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from model.model_minimind import MiniMindConfig, MiniMindForCausalLM, convert_legacy_state_dict
from model.model_vlm import IMAGE_PLACEHOLDER_ID, IMAGE_TOKENS_PER_IMAGE, MiniMindVLM, VLMConfig
from model.weights import WeightsMismatchError, load_weights, weight_path

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
IMG = [IMAGE_PLACEHOLDER_ID] * IMAGE_TOKENS_PER_IMAGE


def count_params(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- sizes and keys

def test_26m_parameter_counts_and_keys():
    lm = MiniMindForCausalLM(MiniMindConfig())
    assert count_params(lm) == 25_829_888
    assert len(lm.state_dict()) == 75
    vlm = MiniMindVLM(VLMConfig(), vision_model_path=None)
    assert count_params(vlm) == 26_223_616
    keys = list(vlm.state_dict())
    assert len(keys) == 77
    assert keys[-2:] == ["vision_proj.vision_proj.0.weight", "vision_proj.vision_proj.0.bias"]
    assert vlm.state_dict()["vision_proj.vision_proj.0.weight"].shape == (512, 768)
    assert vlm.config.intermediate_size == 1408
    assert vlm.lm_head.weight is vlm.model.embed_tokens.weight
    assert not any("freqs" in k for k in keys)


def test_104m_parameter_counts_and_keys():
    vlm = MiniMindVLM(VLMConfig(hidden_size=768, num_hidden_layers=16), vision_model_path=None)
    assert count_params(vlm) == 104_621_568
    assert len(vlm.state_dict()) == 149
    assert vlm.state_dict()["model.layers.0.self_attn.k_proj.weight"].shape == (192, 768)
    assert vlm.config.intermediate_size == 2048


def test_vlm_config_image_fields():
    config = VLMConfig()
    assert config.image_special_token == "@" * 196
    assert config.image_ids == [34] * 196
    assert config.model_type == "minimind-v"


# ---------------------------------------------------------------- independent reference (spec §2, manual path)

def reference_logits(state_dict, config, input_ids, attention_mask=None):
    """A plain re-derivation of upstream's math from the spec: manual attention, repeat_kv, fp32 softmax."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    d = config.hidden_size // heads
    eps = config.rms_norm_eps

    def rmsnorm(x, w):
        return w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x)

    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2).float() / d))
    ang = torch.outer(torch.arange(input_ids.shape[1]).float(), inv)
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None, :]

    def rope(x):
        rot = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
        return x * cos + rot * sin

    h = state_dict["model.embed_tokens.weight"][input_ids]
    B, T, _ = h.shape
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        x = rmsnorm(h, state_dict[p + "input_layernorm.weight"])
        q = rope((x @ state_dict[p + "self_attn.q_proj.weight"].T).view(B, T, heads, d))
        k = rope((x @ state_dict[p + "self_attn.k_proj.weight"].T).view(B, T, kv_heads, d))
        v = (x @ state_dict[p + "self_attn.v_proj.weight"].T).view(B, T, kv_heads, d)
        k = k.repeat_interleave(heads // kv_heads, dim=2)
        v = v.repeat_interleave(heads // kv_heads, dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)
        scores = scores + torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
        if attention_mask is not None:
            scores = scores + (1.0 - attention_mask[:, None, None, :].float()) * -1e9
        attn = F.softmax(scores.float(), dim=-1).type_as(q) @ v
        h = h + attn.transpose(1, 2).reshape(B, T, -1) @ state_dict[p + "self_attn.o_proj.weight"].T
        x = rmsnorm(h, state_dict[p + "post_attention_layernorm.weight"])
        gate = F.silu(x @ state_dict[p + "mlp.gate_proj.weight"].T)
        h = h + (gate * (x @ state_dict[p + "mlp.up_proj.weight"].T)) @ state_dict[p + "mlp.down_proj.weight"].T
    return rmsnorm(h, state_dict["model.norm.weight"]) @ state_dict["lm_head.weight"].T


def test_logits_match_reference_math():
    torch.manual_seed(0)
    config = MiniMindConfig(**TINY)
    model = MiniMindForCausalLM(config).eval()
    ids = torch.randint(3, 6400, (2, 23))
    with torch.no_grad():
        ours = model(ids).logits
        ref = reference_logits(model.state_dict(), config, ids)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


def test_left_padded_logits_match_reference_with_mask():
    torch.manual_seed(1)
    config = MiniMindConfig(**TINY)
    model = MiniMindForCausalLM(config).eval()
    ids = torch.randint(3, 6400, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        ref = reference_logits(model.state_dict(), config, ids, mask)
    assert torch.allclose(ours[0, 4:], ref[0, 4:], atol=1e-5)
    assert torch.allclose(ours[1], ref[1], atol=1e-5)


def test_loss_is_shifted_masked_cross_entropy():
    torch.manual_seed(2)
    model = MiniMindForCausalLM(MiniMindConfig(**TINY)).eval()
    ids = torch.randint(3, 6400, (2, 10))
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 6400), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert model(ids, logits_to_keep=1).logits.shape == (2, 1, 6400)


# --------------------------------------------------------------------------------------------------- KV cache

@pytest.mark.parametrize("use_moe", [False, True])
def test_cached_decoding_equals_full_recomputation(use_moe):
    torch.manual_seed(3)
    model = MiniMindForCausalLM(MiniMindConfig(**TINY, use_moe=use_moe)).eval()
    ids = torch.randint(3, 6400, (2, 16))
    cache = DynamicCache()
    with torch.no_grad():
        full = model(ids).logits
        steps = [model(ids[:, :10], past_key_values=cache, use_cache=True).logits[:, -1]]
        assert cache.get_seq_length() == 10
        for t in range(10, 16):
            steps.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[:, -1])
    assert torch.allclose(torch.stack(steps[:-1], 1), full[:, 9:15], atol=1e-5)


def record_attention_calls(monkeypatch):
    """Every SDPA call from now on, as (query length, key length, mask given, is_causal, grouped-query)."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **kwargs):
        calls.append((q.shape[2], k.shape[2], attn_mask is not None, is_causal, enable_gqa))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return calls


def test_masks_only_where_needed(monkeypatch):
    """Prefill and decoding without padding build no mask (a decoding step's one token sees every cached one);
    a chunk after cached tokens and a padded batch get one, and each still equals the full recomputation."""
    torch.manual_seed(4)
    model = MiniMindForCausalLM(MiniMindConfig(**TINY)).eval()
    ids = torch.randint(3, 6400, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        calls = record_attention_calls(monkeypatch)
        cache = DynamicCache()
        model(ids[:, :6], past_key_values=cache, use_cache=True)
        decoded = model(ids[:, 6:7], past_key_values=cache, use_cache=True).logits
        chunk = model(ids[:, 7:], past_key_values=cache, use_cache=True).logits
    layers = TINY["num_hidden_layers"]
    assert calls == [(6, 6, False, True, True)] * layers + [(1, 7, False, False, True)] * layers + \
        [(5, 12, True, False, True)] * layers
    assert torch.allclose(decoded[:, 0], full[:, 6], atol=1e-5) and torch.allclose(chunk, full[:, 7:], atol=1e-5)
    calls.clear()
    mask = torch.ones_like(ids)
    with torch.no_grad():
        model(ids, attention_mask=mask)  # all ones: no padding, no mask
        mask[0, :3] = 0
        model(ids, attention_mask=mask)
    assert [call[2] for call in calls] == [False] * layers + [True] * layers


@pytest.mark.parametrize("use_moe", [False, True])
def test_training_attention_fits_a_fused_cuda_kernel(monkeypatch, use_moe):
    """On CUDA, SDPA with grouped-query attention runs only on flash (no mask) or math: a training step's
    attention calls pass a mask only without grouped-query heads (the loss-only last layer), and the layers
    before it no mask at all."""
    torch.manual_seed(5)
    model = MiniMindForCausalLM(MiniMindConfig(**TINY, use_moe=use_moe)).train()
    ids = torch.randint(3, 6400, (2, 20))
    labels = ids.clone()
    labels[:, :12] = -100
    calls = record_attention_calls(monkeypatch)
    model(ids, labels=labels, loss_only=True).loss.backward()
    assert calls and not any(mask and gqa for _, _, mask, _, gqa in calls)
    *earlier, last = calls
    assert all(call == (20, 20, False, True, True) for call in earlier)
    # targets from position 12, so the last layer's queries start at 11 (MoE: every position, for the aux loss)
    assert last == ((20, 20, False, True, True) if use_moe else (9, 20, True, False, False))


def test_compile_reuses_its_graphs_for_new_lengths_and_gives_eager_losses():
    """The trainer's torch.compile: the plain forward is one graph (no break in attention), and after the first
    length two new ones compile nothing more, in both the plain and the loss-only path. (aot_eager: graph breaks
    and recompiles are dynamo's, decided before the backend; inductor would only add minutes of C++ here.)"""
    from torch._dynamo.utils import counters
    from trainer.setup import compile_model

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(7)
    model = MiniMindForCausalLM(MiniMindConfig(**TINY)).train()
    compiled = compile_model(model, backend="aot_eager")

    def losses(length, loss_only):
        ids = torch.randint(3, 6400, (2, length), generator=torch.Generator().manual_seed(length))
        labels = ids.clone()
        labels[:, :length // 3] = -100  # targets never as many as positions (dynamo would guard on that)
        compiled_loss = compiled(ids, labels=labels, loss_only=loss_only).loss
        compiled_loss.backward()
        return compiled_loss.detach(), model(ids, labels=labels, loss_only=loss_only).loss.detach()

    got, want = losses(23, loss_only=False)
    assert torch.allclose(got, want, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    got, want = losses(23, loss_only=True)
    graphs = counters["stats"]["unique_graphs"]
    for length in (30, 41):
        for loss_only in (False, True):
            got, want = losses(length, loss_only)
            assert torch.allclose(got, want, atol=1e-5), (length, loss_only)
    assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()


def test_only_a_transformers_cache_is_accepted():
    model = MiniMindForCausalLM(MiniMindConfig(**TINY)).eval()
    ids = torch.randint(3, 6400, (1, 4))
    legacy = [(torch.zeros(1, 2, 2, 16), torch.zeros(1, 2, 2, 16))] * 2
    with pytest.raises(TypeError, match="must be a transformers Cache"):
        model(ids, past_key_values=legacy, use_cache=True)
    with pytest.raises(TypeError):
        model(ids, cache=DynamicCache())  # an unknown keyword fails loudly instead of being ignored


def test_moe_aux_loss_only_in_training():
    torch.manual_seed(5)
    model = MiniMindForCausalLM(MiniMindConfig(**TINY, use_moe=True))
    ids = torch.randint(3, 6400, (2, 8))
    assert model.train()(ids).aux_loss.item() > 0
    assert model.eval()(ids).aux_loss.item() == 0
    keys = model.state_dict()
    assert "model.layers.0.mlp.gate.weight" in keys and "model.layers.0.mlp.experts.3.up_proj.weight" in keys
    assert "model.layers.0.mlp.shared_experts.0.gate_proj.weight" in keys


# ----------------------------------------------------------------------------------------------- image splicing

@pytest.fixture(scope="module")
def tiny_vlm(tiny_clip_dir):
    torch.manual_seed(6)
    return MiniMindVLM(VLMConfig(**TINY), vision_model_path=tiny_clip_dir).eval()


def expected_splice(vlm, ids, images_in_order):
    """Embeddings with each image's projected features written over its run, by explicit indexing."""
    embeds = vlm.model.embed_tokens(ids).clone()
    feats = vlm.vision_proj(vlm.encode_images(images_in_order))
    k = 0
    for b in range(ids.shape[0]):
        t = 0
        while t < ids.shape[1]:
            if ids[b, t] == IMAGE_PLACEHOLDER_ID:
                embeds[b, t:t + IMAGE_TOKENS_PER_IMAGE] = feats[k]
                k += 1
                t += IMAGE_TOKENS_PER_IMAGE
            else:
                t += 1
    return embeds


def test_splice_batch_of_one_with_two_images(tiny_vlm):
    ids = torch.tensor([[5, 6] + IMG + [7, 8] + IMG + [9]])
    pixels = torch.randn(1, 2, 3, 224, 224)
    with torch.no_grad():
        embeds = tiny_vlm.model.embed_tokens(ids)
        got = tiny_vlm.splice_image_features(ids, embeds, tiny_vlm.encode_images(pixels[0]), [2])
        want = expected_splice(tiny_vlm, ids, pixels[0])
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got[0, 2], embeds[0, 2])  # the placeholder really was replaced
    assert torch.equal(got[0, :2], embeds[0, :2]) and torch.equal(got[0, -1], embeds[0, -1])
    # image 2 lands on the second run, not the first
    assert torch.allclose(got[0, 2 + 196 + 2], tiny_vlm.vision_proj(tiny_vlm.encode_images(pixels[0, 1:]))[0, 0],
                          atol=1e-6)


def test_splice_batch_of_two_and_upstream_6d_layout(tiny_vlm):
    ids = torch.tensor([IMG + [5, 6, 7], [8] + IMG + [9, 10]])
    pixels = torch.randn(2, 1, 1, 3, 224, 224)  # upstream's collate layout
    with torch.no_grad():
        out6 = tiny_vlm(ids, pixel_values=pixels).logits
        out5 = tiny_vlm(ids, pixel_values=pixels.squeeze(2)).logits
        flat = tiny_vlm(ids, pixel_values=pixels.reshape(2, 3, 224, 224)).logits
        want = tiny_vlm(inputs_embeds=expected_splice(tiny_vlm, ids, pixels.reshape(2, 3, 224, 224)),
                        input_ids=ids).logits
    assert torch.allclose(out6, out5) and torch.allclose(out6, flat, atol=1e-6)
    assert torch.allclose(out6, want, atol=1e-5)


def test_text_only_input_is_untouched(tiny_vlm):
    ids = torch.randint(40, 6400, (2, 12))
    with torch.no_grad():
        assert torch.equal(tiny_vlm(ids).logits, MiniMindForCausalLM.forward(tiny_vlm, ids).logits)


@pytest.mark.parametrize("ids, pixels, message", [
    ([[5] + IMG + [6] + IMG], (1, 1), "2 image placeholder(s) in the text but 1 image"),
    ([[5] + IMG + [6]], (1, 2), "1 image placeholder(s) in the text but 2 image"),
    ([[5] + IMG[:-1] + [6]], (1, 1), "a run of 195 image tokens"),
    ([[5] + IMG + IMG[:1] + [6]], (1, 1), "a run of 197 image tokens"),
    ([[5, 6, 7]], (1, 1), "0 image placeholder(s) in the text but 1 image"),
])
def test_placeholder_image_mismatches_raise(tiny_vlm, ids, pixels, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_vlm(torch.tensor(ids), pixel_values=torch.randn(*pixels, 3, 224, 224))


def test_missing_clip_folder_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="scripts.download --what clip"):
        MiniMindVLM(VLMConfig(**TINY), vision_model_path=tmp_path / "nope")


def test_vision_encoder_is_frozen_and_outside_state_dict(tiny_vlm):
    assert not any(k.startswith("vision_encoder") for k in tiny_vlm.state_dict())
    assert all(not p.requires_grad for p in tiny_vlm.vision_encoder.parameters())
    assert not any(p is q for p in tiny_vlm.parameters() for q in tiny_vlm.vision_encoder.parameters())


# ------------------------------------------------------------------------------------------------ weight files

def released_style_file(model, path):
    """What upstream's trainer writes: state_dict without CLIP, every tensor .half(), tied keys as 2 copies."""
    torch.save({k: v.detach().half().clone() for k, v in model.state_dict().items()}, path)


def test_released_26m_file_loads_strictly(tmp_path):
    source = MiniMindVLM(VLMConfig(), vision_model_path=None)
    path = weight_path(tmp_path, "sft_vlm", 512, False)
    assert path.name == "sft_vlm_512.pth"
    released_style_file(source, path)
    state = torch.load(path, weights_only=True)
    assert len(state) == 77
    target = MiniMindVLM(VLMConfig(), vision_model_path=None)
    target.load_state_dict(state, strict=True)
    info = load_weights(target, path, log=None)
    assert not info["legacy"] and not info["vision_proj_initialised"]
    assert torch.equal(target.lm_head.weight, source.lm_head.weight.half().float())


def test_lm_only_file_goes_into_vlm_with_fresh_projection(tmp_path):
    lm = MiniMindForCausalLM(MiniMindConfig(**TINY))
    path = tmp_path / "llm_64.pth"
    released_style_file(lm, path)
    vlm = MiniMindVLM(VLMConfig(**TINY), vision_model_path=None)
    info = load_weights(vlm, path, log=None)
    assert info["vision_proj_initialised"]
    assert torch.equal(vlm.model.layers[1].mlp.up_proj.weight, lm.model.layers[1].mlp.up_proj.weight.half().float())


def test_wrong_shape_file_names_keys_and_fitting_flags(tmp_path):
    path = tmp_path / "sft_vlm_768.pth"
    released_style_file(MiniMindVLM(VLMConfig(hidden_size=96, num_hidden_layers=3, num_attention_heads=4),
                                    vision_model_path=None), path)
    with pytest.raises(WeightsMismatchError) as error:
        load_weights(MiniMindVLM(VLMConfig(**TINY), vision_model_path=None), path, log=None)
    message = str(error.value)
    assert "model.embed_tokens.weight" in message or "unexpected" in message
    assert "--hidden_size 96 --num_hidden_layers 3 --use_moe 0" in message


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weights": os.getcwd}, path)  # a reference to a callable: code a plain load would import
    with pytest.raises(WeightsMismatchError, match="not a loadable weights file"):
        load_weights(MiniMindForCausalLM(MiniMindConfig(**TINY)), path, log=None)


# ----------------------------------------------------------------------------- legacy (Feb-2025) checkpoints

LEGACY_NAMES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
}


def legacy_reference_logits(legacy, config, input_ids):
    """The Feb-2025 model's math: complex RoPE on interleaved pairs, legacy key names."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    d = config.hidden_size // heads
    eps = config.rms_norm_eps
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2).float() / d))
    pos_cis = torch.polar(torch.ones(input_ids.shape[1], d // 2), torch.outer(torch.arange(input_ids.shape[1]).float(),
                                                                             inv))

    def rope(x):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * pos_cis[None, :, None, :]).flatten(3).type_as(x)

    def rmsnorm(x, w):
        return w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x)

    h = legacy["tok_embeddings.weight"][input_ids]
    B, T, _ = h.shape
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        x = rmsnorm(h, legacy[p + "attention_norm.weight"])
        q = rope((x @ legacy[p + "attention.wq.weight"].T).view(B, T, heads, d))
        k = rope((x @ legacy[p + "attention.wk.weight"].T).view(B, T, kv_heads, d))
        v = (x @ legacy[p + "attention.wv.weight"].T).view(B, T, kv_heads, d)
        k, v = (t.repeat_interleave(heads // kv_heads, dim=2).transpose(1, 2) for t in (k, v))
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True)
        h = h + attn.transpose(1, 2).reshape(B, T, -1) @ legacy[p + "attention.wo.weight"].T
        x = rmsnorm(h, legacy[p + "ffn_norm.weight"])
        h = h + (F.silu(x @ legacy[p + "feed_forward.w1.weight"].T) * (x @ legacy[p + "feed_forward.w3.weight"].T)) \
            @ legacy[p + "feed_forward.w2.weight"].T
    return rmsnorm(h, legacy["norm.weight"]) @ legacy["output.weight"].T


def legacy_state_dict(config, seed):
    """A random Feb-2025-format VLM state_dict (as its trainer saved it: fp32, one tied copy, mask buffers)."""
    torch.manual_seed(seed)
    d_ff = MiniMindForCausalLM(MiniMindConfig(**TINY)).config.intermediate_size
    hidden, d = config.hidden_size, config.hidden_size // config.num_attention_heads
    sd = {"tok_embeddings.weight": torch.randn(6400, hidden) * 0.05, "norm.weight": torch.rand(hidden) + 0.5}
    sd["output.weight"] = sd["tok_embeddings.weight"]
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = torch.randn(config.num_attention_heads * d, hidden) * 0.1
        sd[p + "attention.wk.weight"] = torch.randn(config.num_key_value_heads * d, hidden) * 0.1
        sd[p + "attention.wv.weight"] = torch.randn(config.num_key_value_heads * d, hidden) * 0.1
        sd[p + "attention.wo.weight"] = torch.randn(hidden, config.num_attention_heads * d) * 0.1
        sd[p + "attention_norm.weight"] = torch.rand(hidden) + 0.5
        sd[p + "ffn_norm.weight"] = torch.rand(hidden) + 0.5
        sd[p + "feed_forward.w1.weight"] = torch.randn(d_ff, hidden) * 0.1
        sd[p + "feed_forward.w2.weight"] = torch.randn(hidden, d_ff) * 0.1
        sd[p + "feed_forward.w3.weight"] = torch.randn(d_ff, hidden) * 0.1
        sd[p + "attention.mask"] = torch.full((1, 1, 8, 8), float("-inf")).triu(1)
    sd["vision_proj.vision_proj.0.weight"] = torch.randn(hidden, 768) * 0.02
    sd["vision_proj.vision_proj.0.bias"] = torch.zeros(hidden)
    return sd


def test_legacy_checkpoint_converts_to_same_logits(tmp_path):
    config = VLMConfig(**TINY)
    legacy = legacy_state_dict(config, seed=7)
    path = tmp_path / "lm_64.pth"
    torch.save(legacy, path)
    model = MiniMindVLM(config, vision_model_path=None).eval()
    info = load_weights(model, path, log=None)
    assert info["legacy"]
    ids = torch.randint(3, 6400, (2, 14))
    with torch.no_grad():
        ours = model(ids).logits
        ref = legacy_reference_logits(legacy, config, ids)
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


def test_legacy_conversion_round_trip_is_a_pure_permutation():
    config = VLMConfig(**TINY)
    legacy = legacy_state_dict(config, seed=8)
    converted = convert_legacy_state_dict(legacy, config)
    assert set(converted) == set(MiniMindVLM(config, vision_model_path=None).state_dict())
    for new_name, old_name in LEGACY_NAMES.items():
        new = converted[f"model.layers.1.{new_name}.weight"]
        old = legacy[f"layers.1.{old_name}.weight"]
        if new_name in ("self_attn.q_proj", "self_attn.k_proj"):
            assert not torch.equal(new, old)
            heads = new.shape[0] // 16
            # inverse permutation: rows [evens, odds] of each head back to interleaved order
            back = new.view(heads, 2, 8, -1).transpose(1, 2).reshape(old.shape)
            assert torch.equal(back, old)
        else:
            assert torch.equal(new, old)


# ----------------------------------------------------------------------------------- the real MiniMind2 tokenizer

def test_real_tokenizer_placeholder_and_chat_template(real_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_tokenizer_dir)
    assert tokenizer("@" * 196).input_ids == [34] * 196
    assert tokenizer("图:\n" + "@" * 196 + "\n描述").input_ids.count(34) == 196
    assert tokenizer(VLMConfig().image_special_token).input_ids == VLMConfig().image_ids
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "U1"}, {"role": "assistant",
                                              "content": "A1"}], tokenize=False)
    assert rendered == ("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n"
                        "<|im_start|>assistant\nA1<|im_end|>\n")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "U1"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer("<|im_start|>assistant\n").input_ids == [1, 1078, 538, 501, 201]
