"""The MiniMind-3 LM (minimind-3v's): sizes and upstream's keys, numerics against an independent re-derivation of
upstream's G3 math (spec: ../shared/spec/upstream-minimind-3v.md, upstream-notes.md 2.5 and 3.10), cache,
generate(), the MoE aux loss, and recognising an upstream-format file from its keys alone."""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from model.model_minimind import MiniMindConfig, MiniMindForCausalLM, RMSNorm, minimind3_config_kwargs
from model.weights import WeightsMismatchError, describe_state_dict, load_weights, read_state_dict
from scripts import convert_vlm

# upstream's 9595617 MiniMindConfig defaults, restated from the spec (not read from the code under test)
HEADS, KV_HEADS, EXPERTS, TOP_K, EPS, THETA, AUX_COEF = 8, 4, 4, 1, 1e-6, 1e6, 5e-4
IMAGE_HIDDEN = 768  # SigLIP2 B/32 width: the MLP projector's input
LOGITS_TOLERANCE = 2e-4
NEW_TOKENS = 6
SHAPES = [(256, 2, False), (256, 2, True), (768, 8, False), (768, 8, True)]


def spec_shapes(hidden, layers, use_moe, vocab=6400):
    """Every key and shape of an upstream minimind-3v file, from the spec's key table."""
    d, ffn = hidden // HEADS, math.ceil(hidden * math.pi / 64) * 64
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (HEADS * d, hidden),
                       p + "self_attn.k_proj.weight": (KV_HEADS * d, hidden),
                       p + "self_attn.v_proj.weight": (KV_HEADS * d, hidden),
                       p + "self_attn.o_proj.weight": (hidden, HEADS * d),
                       p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
                       p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)})
        experts = [f"mlp.experts.{e}." for e in range(EXPERTS)] if use_moe else ["mlp."]
        if use_moe:
            shapes[p + "mlp.gate.weight"] = (EXPERTS, hidden)
        for e in experts:
            shapes.update({p + e + "gate_proj.weight": (ffn, hidden), p + e + "up_proj.weight": (ffn, hidden),
                           p + e + "down_proj.weight": (hidden, ffn)})
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden),
                   "vision_proj.mlp.0.weight": (IMAGE_HIDDEN,), "vision_proj.mlp.0.bias": (IMAGE_HIDDEN,),
                   "vision_proj.mlp.1.weight": (hidden, IMAGE_HIDDEN), "vision_proj.mlp.1.bias": (hidden,),
                   "vision_proj.mlp.3.weight": (hidden, hidden), "vision_proj.mlp.3.bias": (hidden,)})
    return shapes


def is_lm_key(key):
    return not key.startswith("vision_proj.")


def minimind3(hidden, layers, use_moe, seed, **overrides):
    """A random MiniMind-3 LM whose norm weights are not all ones (so q_norm/k_norm visibly count)."""
    torch.manual_seed(seed)
    config = MiniMindConfig(**{**minimind3_config_kwargs(hidden, layers, use_moe), **overrides})
    model = MiniMindForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.copy_(torch.rand_like(param) + 0.5)
    return model


# ------------------------------------------------------------------- upstream's G3 math, re-derived from the spec

def reference_hidden(sd, input_ids, attention_mask=None, aux=None, inputs_embeds=None):
    """Final normed hidden states by upstream's G3 math: QK-norm per head before RoPE, repeat_kv, manual attention
    with an fp32 softmax, a token-by-token top-1 MoE with a plain linear gate. `aux` (a list) gets each MoE
    layer's load-balancing loss, computed as in training. `inputs_embeds` replaces the embedding lookup (a VLM's
    prompt with its image features spliced in)."""
    hidden = sd["model.embed_tokens.weight"].shape[1]
    d = sd["model.layers.0.self_attn.q_norm.weight"].shape[0]
    heads = sd["model.layers.0.self_attn.q_proj.weight"].shape[0] // d
    kv_heads = sd["model.layers.0.self_attn.k_proj.weight"].shape[0] // d
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("model.layers."))

    def rmsnorm(x, w):  # G3 order: scale in fp32, then cast
        return (w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + EPS))).type_as(x)

    T = input_ids.shape[1]
    inv = 1.0 / (THETA ** (torch.arange(0, d, 2).float() / d))
    ang = torch.outer(torch.arange(T).float(), inv)
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None, :]

    def rope(x):
        return x * cos + torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1) * sin

    def repeat_kv(x):  # [B, T, KV, d] -> [B, T, H, d]: KV head j serves query heads j*n_rep ... j*n_rep+n_rep-1
        B, T_, kv, d_ = x.shape
        return x[:, :, :, None, :].expand(B, T_, kv, heads // kv, d_).reshape(B, T_, heads, d_)

    def swiglu(x, prefix):
        return (F.silu(x @ sd[prefix + "gate_proj.weight"].T) * (x @ sd[prefix + "up_proj.weight"].T)) \
            @ sd[prefix + "down_proj.weight"].T

    h = sd["model.embed_tokens.weight"][input_ids] if inputs_embeds is None else inputs_embeds
    B = h.shape[0]
    for i in range(layers):
        p = f"model.layers.{i}."
        x = rmsnorm(h, sd[p + "input_layernorm.weight"])
        q = (x @ sd[p + "self_attn.q_proj.weight"].T).view(B, T, heads, d)
        k = (x @ sd[p + "self_attn.k_proj.weight"].T).view(B, T, kv_heads, d)
        v = (x @ sd[p + "self_attn.v_proj.weight"].T).view(B, T, kv_heads, d)
        q, k = rope(rmsnorm(q, sd[p + "self_attn.q_norm.weight"])), rope(rmsnorm(k, sd[p + "self_attn.k_norm.weight"]))
        q, k, v = q.transpose(1, 2), repeat_kv(k).transpose(1, 2), repeat_kv(v).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)
        scores = scores + torch.full((T, T), float("-inf")).triu(1)
        if attention_mask is not None:
            scores = scores + (1.0 - attention_mask[:, None, None, :].float()) * -1e9
        attn = F.softmax(scores.float(), dim=-1).type_as(q) @ v
        h = h + attn.transpose(1, 2).reshape(B, T, -1) @ sd[p + "self_attn.o_proj.weight"].T
        x = rmsnorm(h, sd[p + "post_attention_layernorm.weight"])
        if p + "mlp.gate.weight" not in sd:
            h = h + swiglu(x, p + "mlp.")
            continue
        flat = x.reshape(-1, hidden)
        scores = F.softmax(flat @ sd[p + "mlp.gate.weight"].T, dim=-1)  # [N, E]
        weight, chosen = scores.topk(TOP_K, dim=-1)
        weight = weight / (weight.sum(-1, keepdim=True) + 1e-20)  # norm_topk_prob, also at top-1
        out = torch.stack([sum(weight[n, j] * swiglu(flat[n], f"{p}mlp.experts.{int(chosen[n, j])}.")
                               for j in range(TOP_K)) for n in range(flat.shape[0])])
        h = h + out.view_as(h)
        if aux is not None:
            experts = scores.shape[1]
            load = F.one_hot(chosen, experts).float().mean(0)  # [k, E]: share of tokens per expert, per slot
            aux.append((load * scores.mean(0)).sum() * experts * AUX_COEF)
    return rmsnorm(h, sd["model.norm.weight"])


def reference_logits(sd, input_ids, attention_mask=None):
    return reference_hidden(sd, input_ids, attention_mask) @ sd["lm_head.weight"].T


def reference_greedy(sd, input_ids, new_tokens):
    ids = input_ids
    for _ in range(new_tokens):
        ids = torch.cat([ids, reference_logits(sd, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def routed_experts(model, input_ids):
    """Which experts layer 0 picks for each token."""
    picked = []
    handle = model.model.layers[0].mlp.gate.register_forward_hook(lambda m, a, out: picked.append(out[0]))
    with torch.no_grad():
        model(input_ids)
    handle.remove()
    return picked[0]


# ------------------------------------------------------------------------------------------------ sizes and keys

@pytest.mark.parametrize("hidden, layers, use_moe, lm_params, file_keys", [
    (768, 8, False, 63_912_192, 97), (256, 2, False, None, 31), (256, 2, True, None, 51),
    (768, 8, True, 199_599_360 - 1_182_720, None),  # the spec gives the VLM total; its projector is 1,182,720
])
def test_keys_and_shapes_are_upstreams(hidden, layers, use_moe, lm_params, file_keys):
    model = MiniMindForCausalLM(MiniMindConfig(**minimind3_config_kwargs(hidden, layers, use_moe)))
    expected = {k: v for k, v in spec_shapes(hidden, layers, use_moe).items() if is_lm_key(k)}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    if file_keys is not None:
        assert len(spec_shapes(hidden, layers, use_moe)) == file_keys  # the spec's totals, projector included
    if lm_params is not None:
        assert sum(p.numel() for p in model.parameters()) == lm_params
    assert model.lm_head.weight is model.model.embed_tokens.weight
    config = model.config
    assert (config.head_dim, config.num_attention_heads, config.num_key_value_heads) == (hidden // 8, 8, 4)
    assert config.intermediate_size == {768: 2432, 256: 832}[hidden]
    assert (config.rms_norm_eps, config.rope_theta, config.max_position_embeddings) == (1e-6, 1e6, 32768)
    assert model.model.layers[0].self_attn.q_norm.eps == 1e-6


def test_minimind2_default_is_unchanged():
    config = MiniMindConfig()
    assert config.lm_family == "minimind2" and config.head_dim == 64
    keys = MiniMindForCausalLM(config).state_dict()
    assert len(keys) == 75 and not any("q_norm" in k or "k_norm" in k for k in keys)
    with pytest.raises(ValueError, match="unknown lm_family 'minimind4'"):
        MiniMindConfig(lm_family="minimind4")


def test_config_round_trip_and_explicit_head_dim(tmp_path):
    config = MiniMindConfig(**minimind3_config_kwargs(64, 2, True))
    config.save_pretrained(tmp_path)
    loaded = MiniMindConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert (loaded.lm_family, loaded.head_dim, loaded.n_shared_experts) == ("minimind3", 8, 0)
    # head_dim is a field of its own: heads x head_dim need not be the hidden size
    wide = minimind3(64, 1, False, seed=10, head_dim=16)
    assert wide.state_dict()["model.layers.0.self_attn.q_proj.weight"].shape == (8 * 16, 64)
    assert wide.model.freqs_cos.shape[1] == 16
    ids = torch.randint(3, 6400, (1, 7))
    with torch.no_grad():
        ours = wide(ids).logits
        ref = reference_logits(wide.state_dict(), ids)
    assert ours.abs().max() > 0.1 and (ours - ref).abs().max() <= LOGITS_TOLERANCE


def test_random_init_is_upstreams_post_init():
    """Upstream's MiniMind-3 calls post_init(): transformers' default init, N(0, 0.02) for every matrix."""
    model = MiniMindForCausalLM(MiniMindConfig(**minimind3_config_kwargs(64, 2, True)))
    layer = model.model.layers[0]
    for weight in (model.lm_head.weight, layer.self_attn.q_proj.weight, layer.mlp.experts[1].down_proj.weight,
                   layer.mlp.gate.weight):
        assert abs(weight.std().item() - 0.02) < 0.004 and abs(weight.mean().item()) < 0.004
    assert torch.equal(layer.self_attn.k_norm.weight, torch.ones(8))
    minimind2 = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=1))
    assert minimind2.model.layers[0].self_attn.q_proj.weight.std() > 0.05  # PyTorch's own init, as before


def test_save_pretrained_round_trip(tmp_path):
    model = minimind3(64, 2, True, seed=18)
    model.save_pretrained(tmp_path)
    loaded = MiniMindForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.lm_family == "minimind3" and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(3, 6400, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_rmsnorm_scales_before_cast_as_minimind3():
    x = torch.randn(2, 5, 16).bfloat16()
    weight = torch.rand(16) + 0.5
    g2, g3 = RMSNorm(16), RMSNorm(16, scale_before_cast=True)
    g2.weight.data.copy_(weight)
    g3.weight.data.copy_(weight)
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    assert g3(x).dtype == torch.bfloat16 and torch.equal(g3(x), (weight * normed).bfloat16())
    assert g2(x).dtype == torch.float32 and torch.equal(g2(x), weight * normed.bfloat16())


# ------------------------------------------------------------------------------------- numerics against the spec

@pytest.mark.parametrize("hidden, layers, use_moe", SHAPES)
def test_logits_and_greedy_tokens_match_reference(hidden, layers, use_moe):
    model = minimind3(hidden, layers, use_moe, seed=hidden + layers + use_moe)
    sd = model.state_dict()
    ids = torch.randint(3, 6400, (2, 13))
    with torch.no_grad():
        ours = model(ids).logits
        ref = reference_logits(sd, ids)
        generated = model.generate(ids[:1], max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)
        expected = reference_greedy(sd, ids[:1], NEW_TOKENS)
    assert ours.abs().max() > 0.1  # logits of a size the tolerance means something against
    assert (ours - ref).abs().max() <= LOGITS_TOLERANCE, (ours - ref).abs().max()
    assert torch.equal(generated, expected), (generated, expected)
    if use_moe:
        assert len(routed_experts(model, ids).unique()) > 1  # the routing really chose between experts


def test_left_padded_logits_match_reference_with_mask():
    model = minimind3(64, 2, True, seed=11)
    ids = torch.randint(3, 6400, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        ref = reference_logits(model.state_dict(), ids, mask)
    assert torch.allclose(ours[0, 4:], ref[0, 4:], atol=LOGITS_TOLERANCE)
    assert torch.allclose(ours[1], ref[1], atol=LOGITS_TOLERANCE)


def test_top1_routing_weight_is_exactly_one():
    """norm_topk_prob at top-1 divides each weight by itself: the gate only selects (spec section 1)."""
    model = minimind3(64, 2, True, seed=12)
    ids = torch.randint(3, 6400, (2, 9))
    picked = []
    handle = model.model.layers[1].mlp.gate.register_forward_hook(lambda m, a, out: picked.append(out[1]))
    with torch.no_grad():
        model(ids)
    handle.remove()
    assert picked[0].shape == (18, 1) and torch.equal(picked[0], torch.ones_like(picked[0]))


@pytest.mark.parametrize("use_moe", [False, True])
def test_cached_decoding_equals_full_recomputation(use_moe):
    model = minimind3(64, 2, use_moe, seed=13)
    ids = torch.randint(3, 6400, (2, 16))
    cache = DynamicCache()
    with torch.no_grad():
        full = model(ids).logits
        steps = [model(ids[:, :10], past_key_values=cache, use_cache=True).logits[:, -1]]
        for t in range(10, 16):
            steps.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[:, -1])
    assert cache.get_seq_length() == 16
    assert torch.allclose(torch.stack(steps[:-1], 1), full[:, 9:15], atol=1e-5)


def test_loss_only_path_equals_full_loss():
    model = minimind3(64, 2, False, seed=14)
    ids = torch.randint(3, 6400, (2, 14))
    labels = ids.clone()
    labels[:, :6] = -100
    with torch.no_grad():
        assert torch.allclose(model(ids, labels=labels, loss_only=True).loss, model(ids, labels=labels).loss,
                              atol=1e-6)


def test_moe_aux_loss_is_upstreams_in_training_only():
    """Upstream G3: per layer sum(load * mean score) * E * router_aux_loss_coef over all tokens, 0 in eval."""
    model = minimind3(64, 2, True, seed=15)
    ids = torch.randint(3, 6400, (2, 11))
    aux = []
    with torch.no_grad():
        reference_hidden(model.state_dict(), ids, aux=aux)
        trained = model.train()(ids).aux_loss
        evaluated = model.eval()(ids).aux_loss
    assert len(aux) == 2 and trained.item() > 0
    assert torch.allclose(trained, sum(aux), rtol=1e-5, atol=0), (trained, sum(aux))
    assert evaluated.item() == 0


def test_moe_gate_gets_gradient_only_from_aux_loss():
    """At top-1 the routed weight is exactly 1, so the language-model loss does not reach the gate (upstream's
    behaviour, up to rounding); the aux loss does."""
    model = minimind3(64, 1, True, seed=16).train()
    ids = torch.randint(3, 6400, (2, 9))
    out = model(ids, labels=ids)
    gate = model.model.layers[0].mlp.gate.weight
    (lm_grad,) = torch.autograd.grad(out.loss, gate, retain_graph=True)
    (aux_grad,) = torch.autograd.grad(out.aux_loss, gate)
    # d(s / (s + 1e-20))/ds is 0 up to rounding
    assert lm_grad.abs().max() < 1e-3 * aux_grad.abs().max(), (lm_grad.abs().max(), aux_grad.abs().max())


# ----------------------------------------------------------------------------------- an upstream-format .pth file

def upstream_file(path, hidden, layers, use_moe, seed):
    """A minimind-3v file as upstream's trainer writes it: fp16, LM + projector, the tied matrix as 2 copies."""
    generator = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in spec_shapes(hidden, layers, use_moe).items():
        if key.endswith("norm.weight") or "layernorm" in key:
            sd[key] = (torch.rand(shape, generator=generator) + 0.5).half()
        else:
            sd[key] = (torch.randn(shape, generator=generator) / math.sqrt(shape[-1])).half()
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    torch.save(sd, path)
    return sd


@pytest.mark.parametrize("hidden, layers, use_moe", [(256, 2, False), (256, 2, True), (768, 8, False)])
def test_upstream_file_is_recognised_and_loads_strictly(tmp_path, hidden, layers, use_moe):
    path = tmp_path / f"sft_vlm_{hidden}{'_moe' if use_moe else ''}.pth"
    saved = upstream_file(path, hidden, layers, use_moe, seed=hidden + use_moe)
    file_sd = read_state_dict(path)
    assert len(file_sd) == {(256, False): 31, (256, True): 51, (768, False): 97}[(hidden, use_moe)]
    found = describe_state_dict(file_sd)  # no flag: everything from the keys and shapes
    assert (found["generation"], found["lm_family"], found["projector"]) == ("G3", "minimind3", "mlp")
    assert (found["hidden_size"], found["num_hidden_layers"], found["use_moe"]) == (hidden, layers, use_moe)
    assert (found["head_dim"], found["num_attention_heads"], found["num_key_value_heads"]) == (hidden // 8, 8, 4)
    assert found["intermediate_size"] == math.ceil(hidden * math.pi / 64) * 64
    assert found["n_routed_experts"] == (4 if use_moe else 0) and found["n_shared_experts"] == 0
    assert found["image_hidden_size"] == IMAGE_HIDDEN
    model = MiniMindForCausalLM(MiniMindConfig(**found["config_kwargs"])).eval()
    lm_part = {k: v for k, v in file_sd.items() if is_lm_key(k)}
    model.load_state_dict(lm_part, strict=True)
    assert model.config.rms_norm_eps == 1e-6 and model.config.num_experts_per_tok == 1
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(3, 6400, (2, 10))
    fp32 = {k: v.float() for k, v in saved.items()}
    with torch.no_grad():
        ours = model(ids).logits
        ref = reference_logits(fp32, ids)
    assert ours.abs().max() > 1
    assert (ours - ref).abs().max() <= LOGITS_TOLERANCE, (ours - ref).abs().max()


def test_minimind3_lm_file_converts_with_no_flag(tmp_path):
    """An LM-only MiniMind-3 file: the converter's config is read off the keys, and the strict loader takes it."""
    saved = {k: v for k, v in upstream_file(tmp_path / "all.pth", 64, 2, True, seed=3).items() if is_lm_key(k)}
    path = tmp_path / "llm_64_moe.pth"
    torch.save(saved, path)
    config = convert_vlm.architecture_for(path, read_state_dict(path)).config
    assert (config.lm_family, config.hidden_size, config.use_moe, config.head_dim) == ("minimind3", 64, True, 8)
    model = MiniMindForCausalLM(config).eval()
    info = load_weights(model, path, log=None)
    assert info["generation"] == "G3" and not info["legacy"]
    with torch.no_grad():
        assert torch.equal(model.model.layers[1].self_attn.k_norm.weight,
                           saved["model.layers.1.self_attn.k_norm.weight"].float())


def test_minimind3_file_into_minimind2_model_names_keys_and_fitting_flags(tmp_path):
    path = tmp_path / "llm_64.pth"
    torch.save({k: v for k, v in upstream_file(tmp_path / "all.pth", 64, 2, False, seed=4).items()
                if is_lm_key(k)}, path)
    with pytest.raises(WeightsMismatchError) as error:
        load_weights(MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2)), path, log=None)
    message = str(error.value)
    assert "q_norm" in message and "--preset minimind-3v --hidden_size 64 --num_hidden_layers 2" in message


def test_each_generation_is_recognised_from_its_keys():
    """G2 (MiniMind2-V), G1 (its Feb-2025 keys, e.g. tok_embeddings, attention.wq) and a file of something else."""
    g2 = {k: v.half() for k, v in MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=3,
                                                                      use_moe=True)).state_dict().items()}
    g2["vision_proj.vision_proj.0.weight"], g2["vision_proj.vision_proj.0.bias"] = torch.zeros(64, 32), torch.zeros(64)
    found = describe_state_dict(g2)
    assert (found["generation"], found["lm_family"], found["legacy"]) == ("G2", "minimind2", False)
    assert (found["hidden_size"], found["num_hidden_layers"], found["intermediate_size"]) == (64, 3, 192)
    assert (found["use_moe"], found["n_routed_experts"], found["n_shared_experts"]) == (True, 4, 1)
    assert (found["projector"], found["image_hidden_size"], found["head_dim"]) == ("linear", 32, None)
    assert found["config_kwargs"] == dict(lm_family="minimind2", hidden_size=64, num_hidden_layers=3, use_moe=True,
                                          vocab_size=6400, intermediate_size=192, n_routed_experts=4,
                                          n_shared_experts=1)
    g1_names = [("model.embed_tokens.", "tok_embeddings."), ("lm_head.", "output."), ("model.norm.", "norm."),
                ("model.layers.", "layers."), ("self_attn.q_proj", "attention.wq"),
                ("input_layernorm", "attention_norm"), ("mlp.experts.", "feed_forward.experts."),
                ("mlp.gate.", "feed_forward.gate."), ("mlp.shared_experts.0.", "feed_forward.shared_experts."),
                ("gate_proj", "w1")]
    g1 = {}
    for key, tensor in g2.items():
        for new, old in g1_names:
            key = key.replace(new, old)
        g1[key] = tensor
    g1["layers.0.attention.mask"] = torch.zeros(1, 1, 4, 4)
    found = describe_state_dict(g1)
    assert (found["generation"], found["lm_family"], found["legacy"]) == ("G1", "minimind2", True)
    assert (found["hidden_size"], found["num_hidden_layers"], found["use_moe"]) == (64, 3, True)
    assert (found["intermediate_size"], found["n_routed_experts"], found["n_shared_experts"]) == (192, 4, 1)
    other = describe_state_dict({"encoder.weight": torch.zeros(3, 3)})
    assert other["hidden_size"] is None and other["config_kwargs"] == {}


# ------------------------------------------------------------------------------- the real MiniMind-3 tokenizer

def test_real_tokenizer_ids_and_prompt_through_the_model(real_minimind3_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_minimind3_tokenizer_dir)
    config = MiniMindConfig(**minimind3_config_kwargs(64, 2))
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert (config.bos_token_id, config.eos_token_id, config.vocab_size) == (1, 2, len(tokenizer))
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == 12
    assert tokenizer("<|image_pad|>" * 64).input_ids == [12] * 64
    assert tokenizer("<|im_start|>assistant\n").input_ids == [1, 1388, 570, 811, 234]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "<|image_pad|>" * 64 + "\nWhat is in the picture?"}],
        tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(prompt).input_ids])
    assert ids[0].tolist().count(12) == 64 and ids[0, 0] == 1
    model = minimind3(64, 2, False, seed=17)
    with torch.no_grad():
        ours = model(ids).logits
        ref = reference_logits(model.state_dict(), ids)
    assert (ours - ref).abs().max() <= LOGITS_TOLERANCE
