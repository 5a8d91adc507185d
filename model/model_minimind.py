"""MiniMind causal language model, weight- and logit-compatible with upstream: MiniMind2 (the default) and
MiniMind-3 (`lm_family="minimind3"`, built with `minimind3_config_kwargs`; the LM of minimind-3v).

Module and parameter names follow upstream exactly, so `state_dict()` keys match released `.pth` files:
`model.embed_tokens`, `model.layers.{i}.self_attn.{q,k,v,o}_proj`, `model.layers.{i}.mlp.{gate,up,down}_proj`,
`model.layers.{i}.{input,post_attention}_layernorm`, `model.norm`, `lm_head` (tied to the embedding);
MiniMind-3 adds `model.layers.{i}.self_attn.{q,k}_norm`.

Shapes: B batch, T new tokens, P cached tokens, H query heads, Hkv key/value heads, d head_dim.
The KV cache has one format, a transformers `Cache` (per layer [B, Hkv, P, d], keys stored after RoPE).
"""
import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .compat import GENERATE_CACHE_KWARG, OUTPUT_CACHE_FIELD

# Default YaRN settings upstream switches on with `inference_rope_scaling=True` (spec §1.1).
YARN_ROPE_SCALING = {
    "beta_fast": 32, "beta_slow": 1, "factor": 16,
    "original_max_position_embeddings": 2048, "attention_factor": 1.0, "type": "yarn",
}
# The FFN width rules (MiniMind2: 8/3 of the hidden size; MiniMind-3: pi times it) round up to a multiple of this.
FFN_WIDTH_MULTIPLE = 64
IGNORE_INDEX = -100


def round_up_to_ffn_multiple(width: float) -> int:
    return FFN_WIDTH_MULTIPLE * math.ceil(width / FFN_WIDTH_MULTIPLE)


@dataclass(frozen=True)
class LMFamily:
    """What a MiniMind generation's LM does differently, beyond the sizes in its config."""
    ffn_width: Callable[[int], int]  # intermediate_size from hidden_size, when the config leaves it None
    qk_norm: bool  # an RMSNorm over each head of q and k before RoPE (keys self_attn.{q,k}_norm.weight [head_dim])
    norm_scales_before_cast: bool  # RMSNorm multiplies by its weight in fp32, then casts (else casts, then scales)
    ffn_dropout: bool  # dropout on the FFN output
    renormalise_top1: bool  # norm_topk_prob applies at top-1 too: every routed weight is then 1.0
    aux_loss_per_token: bool  # without seq_aux, an expert's load counts top-k slots per token (else per slot)
    # Linear, embedding and router weights drawn from N(0, init_std) (MiniMind-3 calls post_init(), which applies
    # transformers' default init, std 0.02); None: the modules' own PyTorch init, as MiniMind2.
    init_std: float = None


LM_FAMILIES = {
    # int() before rounding: upstream's rule, which truncates 8/3*hidden first (512 -> 1408, 768 -> 2048).
    "minimind2": LMFamily(ffn_width=lambda hidden: round_up_to_ffn_multiple(int(hidden * 8 / 3)), qk_norm=False,
                          norm_scales_before_cast=False, ffn_dropout=True, renormalise_top1=False,
                          aux_loss_per_token=False),
    # 768 -> 2432, 256 -> 832.
    "minimind3": LMFamily(ffn_width=lambda hidden: round_up_to_ffn_multiple(hidden * math.pi), qk_norm=True,
                          norm_scales_before_cast=True, ffn_dropout=False, renormalise_top1=True,
                          aux_loss_per_token=True, init_std=0.02),
}
DEFAULT_LM_FAMILY = "minimind2"


class MiniMindConfig(PretrainedConfig):
    model_type = "minimind"

    def __init__(
        self,
        dropout: float = 0.0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        hidden_act: str = "silu",
        hidden_size: int = 512,
        intermediate_size: int = None,
        max_position_embeddings: int = 32768,
        num_attention_heads: int = 8,
        num_hidden_layers: int = 8,
        num_key_value_heads: int = 2,
        vocab_size: int = 6400,
        rms_norm_eps: float = 1e-05,
        rope_theta: float = 1000000.0,
        inference_rope_scaling: bool = False,
        flash_attn: bool = True,
        use_moe: bool = False,
        num_experts_per_tok: int = 2,
        n_routed_experts: int = 4,
        n_shared_experts: int = 1,
        scoring_func: str = "softmax",
        aux_loss_alpha: float = 0.01,
        seq_aux: bool = True,
        norm_topk_prob: bool = True,
        tie_word_embeddings: bool = True,
        head_dim: int = None,
        lm_family: str = DEFAULT_LM_FAMILY,
        **kwargs,
    ):
        if lm_family not in LM_FAMILIES:
            raise ValueError(f"unknown lm_family {lm_family!r}: choose one of {', '.join(LM_FAMILIES)}")
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)
        # Always stated: transformers 5 has no default for it (absent reads as False, which would leave lm_head
        # untied and uninitialised when loading a folder whose config.json, written by 4.x, omits the default).
        self.tie_word_embeddings = tie_word_embeddings
        self.dropout = dropout
        self.hidden_act = hidden_act
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.num_attention_heads = num_attention_heads
        self.num_hidden_layers = num_hidden_layers
        self.num_key_value_heads = num_key_value_heads
        # Width of one attention head (None: hidden_size / num_attention_heads, always so in MiniMind2).
        self.head_dim = hidden_size // num_attention_heads if head_dim is None else head_dim
        self.vocab_size = vocab_size
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.inference_rope_scaling = inference_rope_scaling
        # The YaRN settings (None: plain RoPE). `rope_parameters`, not upstream's `rope_scaling`: transformers 5 makes
        # `rope_scaling` a deprecated alias of it, and 4.x has neither, so this name reads the same on both.
        self.rope_parameters = dict(YARN_ROPE_SCALING) if inference_rope_scaling else None
        self.flash_attn = flash_attn
        self.use_moe = bool(use_moe)
        self.num_experts_per_tok = num_experts_per_tok
        self.n_routed_experts = n_routed_experts
        self.n_shared_experts = n_shared_experts
        self.scoring_func = scoring_func
        self.aux_loss_alpha = aux_loss_alpha
        self.seq_aux = seq_aux
        self.norm_topk_prob = norm_topk_prob
        # Which generation's LM: "minimind2" (MiniMind2 / MiniMind2-V) or "minimind3" (minimind-3 / minimind-3v).
        self.lm_family = lm_family


def lm_family_of(config: MiniMindConfig) -> LMFamily:
    return LM_FAMILIES[config.lm_family]


def minimind3_config_kwargs(hidden_size: int = 768, num_hidden_layers: int = 8, use_moe: bool = False) -> dict:
    """Every MiniMindConfig setting that upstream's MiniMind-3 config (minimind-3v, 9595617) implies for this size.

    The default size is minimind-3v's 768x8 (63.9M LM parameters; with use_moe, 4 experts of which each token
    uses 1). Upstream's names map onto this config's: num_experts -> n_routed_experts, router_aux_loss_coef ->
    aux_loss_alpha, moe_intermediate_size -> intermediate_size; it has no shared experts and its aux loss is the
    per-token one (seq_aux False).
    """
    num_attention_heads = 8
    return dict(
        lm_family="minimind3", hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, use_moe=bool(use_moe),
        num_attention_heads=num_attention_heads, num_key_value_heads=4, head_dim=hidden_size // num_attention_heads,
        intermediate_size=LM_FAMILIES["minimind3"].ffn_width(hidden_size), hidden_act="silu", dropout=0.0,
        vocab_size=6400, bos_token_id=1, eos_token_id=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_theta=1e6, inference_rope_scaling=False, flash_attn=True, tie_word_embeddings=True,
        n_routed_experts=4, num_experts_per_tok=1, n_shared_experts=0, norm_topk_prob=True, scoring_func="softmax",
        aux_loss_alpha=5e-4, seq_aux=False,
    )


def resolve_intermediate_size(config: MiniMindConfig) -> int:
    """FFN width: upstream computes it by the family's rule and writes it back into the config."""
    if config.intermediate_size is None:
        config.intermediate_size = lm_family_of(config).ffn_width(config.hidden_size)
    return config.intermediate_size


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, scale_before_cast: bool = False):
        super().__init__()
        self.eps = eps
        self.scale_before_cast = scale_before_cast
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32; then cast back and scale (MiniMind2), or scale in fp32 and cast (MiniMind-3): the
        # order each generation's weights were trained with (they differ under bf16/fp16).
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.scale_before_cast:
            return (self.weight * normed).type_as(x)
        return self.weight * normed.type_as(x)


def rms_norm_for(config: MiniMindConfig, dim: int) -> RMSNorm:
    """The RMSNorm of the config's family (eps and the order of scale and cast)."""
    return RMSNorm(dim, eps=config.rms_norm_eps, scale_before_cast=lm_family_of(config).norm_scales_before_cast)


def precompute_freqs_cis(dim: int, end: int, rope_base: float = 1e6, rope_scaling: dict = None):
    """RoPE tables cos/sin of shape [end, dim] (halves duplicated, rotate-half convention), optional YaRN."""
    inv_freq = 1.0 / (rope_base ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    attn_factor = 1.0
    if rope_scaling is not None:
        original_max = rope_scaling.get("original_max_position_embeddings", 2048)
        factor = rope_scaling.get("factor", 16)
        beta_fast, beta_slow = rope_scaling.get("beta_fast", 32.0), rope_scaling.get("beta_slow", 1.0)
        attn_factor = rope_scaling.get("attention_factor", 1.0)
        if end / original_max > 1.0:
            def correction_dim(beta):
                return dim * math.log(original_max / (beta * 2 * math.pi)) / (2 * math.log(rope_base))

            low = max(math.floor(correction_dim(beta_fast)), 0)
            high = min(math.ceil(correction_dim(beta_slow)), dim // 2 - 1)
            ramp = torch.clamp((torch.arange(dim // 2).float() - low) / max(high - low, 0.001), 0, 1)
            inv_freq = inv_freq * (1 - ramp + ramp / factor)
    angles = torch.outer(torch.arange(end, device=inv_freq.device).float(), inv_freq)  # [end, dim/2]
    freqs_cos = torch.cat([torch.cos(angles), torch.cos(angles)], dim=-1) * attn_factor  # [end, dim]
    freqs_sin = torch.cat([torch.sin(angles), torch.sin(angles)], dim=-1) * attn_factor  # [end, dim]
    return freqs_cos, freqs_sin


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x, cos, sin):
    """x [B, T, heads, d]; cos/sin [T, d] broadcast over batch and heads."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, d]
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


def apply_rotary_pos_emb(q, k, cos, sin):
    """q [B, T, H, d], k [B, T, Hkv, d]; cos/sin [T, d]."""
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


@torch.compiler.disable  # a data-dependent int: computed eagerly, torch.compile splits its graph here
def first_target_position(labels) -> int:
    """The first position whose next token is a target in any row of the batch (labels [B, T])."""
    columns = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero()
    return int(columns[0]) if len(columns) else labels.shape[1] - 1


def target_positions(labels):
    """(first_target_position, target_index): target_index [N] are the flat row-major indices into [B, T-1] of
    the positions whose next token is a target. The loss-only forward would find both on the device (each a
    device->host sync); the training collator computes them on the CPU and the batch carries them."""
    has_target = labels[:, 1:] != IGNORE_INDEX  # [B, T-1]
    return first_target_position(labels), has_target.flatten().nonzero().flatten()


def cached_length(cache) -> int:
    """Tokens already in a transformers Cache (0 for None)."""
    return 0 if cache is None else cache.get_seq_length()


class Attention(nn.Module):
    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_attention_heads {self.num_heads} must be a multiple of num_key_value_heads "
                             f"{self.num_kv_heads}")
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        # MiniMind-3's QK-norm, per head, before RoPE (MiniMind2: none, and no keys).
        qk_norm = lm_family_of(config).qk_norm
        self.q_norm = rms_norm_for(config, self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = rms_norm_for(config, self.head_dim) if qk_norm else nn.Identity()
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    def forward(self, x, position_embeddings, attn_mask=None, cache=None):
        """x [B, T, hidden] -> [B, T, hidden]; `cache` (a transformers Cache) gets this layer's keys and values
        appended and supplies the earlier ones; attn_mask: `attention_bias`'s [B, 1, T, P+T] mask, or None."""
        bsz, seq_len, _ = x.shape
        q = self.q_proj(x).view(bsz, seq_len, self.num_heads, self.head_dim)  # [B, T, H, d]
        k = self.k_proj(x).view(bsz, seq_len, self.num_kv_heads, self.head_dim)  # [B, T, Hkv, d]
        v = self.v_proj(x).view(bsz, seq_len, self.num_kv_heads, self.head_dim)  # [B, T, Hkv, d]
        q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, d]
        past_len = 0
        if cache is not None:
            past_len = cache.get_seq_length(self.layer_idx)
            k, v = cache.update(k, v, self.layer_idx)  # [B, Hkv, P+T, d]: cached keys (already rotated), then new
        if attn_mask is not None:
            attn_mask = attn_mask.to(q.dtype)  # built in the stream's dtype; q may be autocast's
        # Without a mask: causal from position 0 (training, a prefill), or the decoding step's one new token, which
        # sees every cached one. A plain bool (no SymBool under torch.compile), so SDPA stays in the graph.
        out = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None and past_len == 0, enable_gqa=self.num_heads != self.num_kv_heads,
        )  # [B, H, T, d]
        out = out.transpose(1, 2).reshape(bsz, seq_len, -1)  # [B, T, H*d]
        return self.resid_dropout(self.o_proj(out))

    def forward_from(self, x, position_embeddings, query_from: int):
        """The loss-only training path (no cache, no padding mask): outputs only for positions >= query_from,
        [B, T - query_from, hidden], which still attend to every earlier position. The causal mask is the
        cached-decoding one, with the first query_from positions in the role of the cache."""
        bsz, seq_len, _ = x.shape
        new_len = seq_len - query_from
        q = self.q_proj(x[:, query_from:]).view(bsz, new_len, self.num_heads, self.head_dim)  # [B, T', H, d]
        k = self.k_proj(x).view(bsz, seq_len, self.num_kv_heads, self.head_dim)  # [B, T, Hkv, d]
        v = self.v_proj(x).view(bsz, seq_len, self.num_kv_heads, self.head_dim)  # [B, T, Hkv, d]
        q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        q, k = apply_rotary(q, cos[query_from:], sin[query_from:]), apply_rotary(k, cos, sin)
        # The key/value heads repeated for every query head: on CUDA, SDPA with grouped-query attention runs only on
        # the flash or math kernels, and flash takes no mask; without GQA the fused memory-efficient kernel takes it.
        groups = self.num_heads // self.num_kv_heads
        k = k.transpose(1, 2).repeat_interleave(groups, dim=1)  # [B, H, T, d]
        v = v.transpose(1, 2).repeat_interleave(groups, dim=1)  # [B, H, T, d]
        mask = causal_mask(query_from, new_len, q.dtype, q.device)  # [T', T]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)  # [B, H, T', d]
        out = out.transpose(1, 2).reshape(bsz, new_len, -1)  # [B, T', H*d]
        return self.resid_dropout(self.o_proj(out))


def causal_mask(past_len, seq_len, dtype, device):
    """[T, P+T] additive mask: new token t (position P+t) sees positions up to its own."""
    query_pos = torch.arange(past_len, past_len + seq_len, device=device).unsqueeze(1)  # [T, 1]
    key_pos = torch.arange(past_len + seq_len, device=device).unsqueeze(0)  # [1, P+T]
    return torch.zeros(seq_len, past_len + seq_len, dtype=dtype, device=device).masked_fill(key_pos > query_pos,
                                                                                            float("-inf"))


def attention_bias(attention_mask, past_len: int, seq_len: int, dtype, device):
    """The [B, 1, T, P+T] additive mask for T new tokens after P cached ones, built once for every layer, or None
    where SDPA needs none: no padding, and either nothing cached (is_causal) or one new token (sees everything).

    attention_mask [B, P+T] 0/1 marks padding (checked on the host once per forward, not once per layer); a padded
    key gets finfo.min rather than -inf, so a row of padding only (a left-padded prompt's first rows) stays finite.
    """
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded and (past_len == 0 or seq_len == 1):
        return None
    total_len = past_len + seq_len
    mask = causal_mask(past_len, seq_len, dtype, device)[None, None]  # [1, 1, T, P+T]
    if padded:
        pad = (attention_mask[:, -total_len:] == 0).view(-1, 1, 1, total_len)  # [B, 1, 1, P+T]
        mask = mask.masked_fill(pad & (mask == 0), torch.finfo(dtype).min)  # [B, 1, T, P+T]
    return mask


class FeedForward(nn.Module):
    def __init__(self, config: MiniMindConfig):
        super().__init__()
        width = resolve_intermediate_size(config)
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.dropout = nn.Dropout(config.dropout) if lm_family_of(config).ffn_dropout else nn.Identity()
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.dropout(self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))


class MoEGate(nn.Module):
    def __init__(self, config: MiniMindConfig):
        super().__init__()
        if config.scoring_func != "softmax":
            raise NotImplementedError(f"unsupported MoE scoring function: {config.scoring_func}")
        self.top_k = config.num_experts_per_tok
        self.n_routed_experts = config.n_routed_experts
        self.alpha = config.aux_loss_alpha
        self.seq_aux = config.seq_aux
        self.norm_topk_prob = config.norm_topk_prob
        family = lm_family_of(config)
        self.renormalise_top1 = family.renormalise_top1
        self.aux_loss_per_token = family.aux_loss_per_token
        self.weight = nn.Parameter(torch.empty((self.n_routed_experts, config.hidden_size)))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, hidden_states):
        """hidden_states [B, T, hidden] -> top-k expert ids and weights [B*T, k], aux loss scalar."""
        bsz, seq_len, hidden = hidden_states.shape
        logits = F.linear(hidden_states.view(-1, hidden), self.weight)  # [B*T, E]
        scores = logits.softmax(dim=-1)
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.norm_topk_prob and (self.top_k > 1 or self.renormalise_top1):
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)

        aux_loss = scores.new_zeros(())
        if self.training and self.alpha > 0.0:
            idx_per_seq = topk_idx.view(bsz, -1)  # [B, T*k]
            if self.seq_aux:
                seq_scores = scores.view(bsz, seq_len, -1)  # [B, T, E]
                counts = torch.zeros(bsz, self.n_routed_experts, device=hidden_states.device)
                counts.scatter_add_(1, idx_per_seq, torch.ones_like(idx_per_seq, dtype=counts.dtype))
                counts = counts / (seq_len * self.top_k / self.n_routed_experts)
                aux_loss = (counts * seq_scores.mean(dim=1)).sum(dim=1).mean() * self.alpha
            else:
                one_hot = F.one_hot(idx_per_seq.view(-1), num_classes=self.n_routed_experts)
                fraction = one_hot.float().mean(0) * self.n_routed_experts
                if self.aux_loss_per_token:  # each token's k slots count in full: k times the per-slot share
                    fraction = fraction * self.top_k
                aux_loss = (scores.mean(0) * fraction).sum() * self.alpha
        return topk_idx, topk_weight, aux_loss


class MOEFeedForward(nn.Module):
    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.experts = nn.ModuleList([FeedForward(config) for _ in range(config.n_routed_experts)])
        self.gate = MoEGate(config)
        if config.n_shared_experts > 0:
            self.shared_experts = nn.ModuleList([FeedForward(config) for _ in range(config.n_shared_experts)])
        self.aux_loss = None

    def forward(self, x):
        """Each token goes to its top-k experts; outputs are weighted and summed (one pass per expert)."""
        bsz, seq_len, hidden = x.shape
        topk_idx, topk_weight, self.aux_loss = self.gate(x)
        flat_x = x.reshape(-1, hidden)  # [B*T, hidden]
        out = torch.zeros_like(flat_x)
        for expert_id, expert in enumerate(self.experts):
            token_idx, slot = torch.where(topk_idx == expert_id)
            if token_idx.numel() == 0:
                continue
            weight = topk_weight[token_idx, slot].unsqueeze(-1).to(flat_x.dtype)
            out = out.index_add(0, token_idx, (expert(flat_x[token_idx]) * weight).to(out.dtype))
        out = out.view(bsz, seq_len, hidden)
        for shared in getattr(self, "shared_experts", []):
            out = out + shared(x)
        return out


class MiniMindBlock(nn.Module):
    def __init__(self, layer_id: int, config: MiniMindConfig):
        super().__init__()
        self.self_attn = Attention(config, layer_id)
        self.input_layernorm = rms_norm_for(config, config.hidden_size)
        self.post_attention_layernorm = rms_norm_for(config, config.hidden_size)
        self.mlp = MOEFeedForward(config) if config.use_moe else FeedForward(config)

    def forward(self, hidden_states, position_embeddings, attn_mask=None, cache=None):
        """[B, T, hidden] -> [B, T, hidden]: pre-norm attention, then pre-norm FFN, each added to the stream."""
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), position_embeddings,
                                                       attn_mask=attn_mask, cache=cache)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))

    def forward_from(self, hidden_states, position_embeddings, query_from: int):
        """The loss-only path: the block's output only for positions >= query_from, [B, T - query_from, hidden]."""
        attn_out = self.self_attn.forward_from(self.input_layernorm(hidden_states), position_embeddings, query_from)
        hidden_states = hidden_states[:, query_from:] + attn_out
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class MiniMindModel(nn.Module):
    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([MiniMindBlock(i, config) for i in range(config.num_hidden_layers)])
        self.norm = rms_norm_for(config, config.hidden_size)
        self._register_rope_buffers()

    def _register_rope_buffers(self):
        # Non-persistent: never part of state_dict, rebuilt from the config (also after meta-device init).
        freqs_cos, freqs_sin = precompute_freqs_cis(
            self.config.head_dim, self.config.max_position_embeddings,
            self.config.rope_theta, self.config.rope_parameters)
        self.register_buffer("freqs_cos", freqs_cos, persistent=False)
        self.register_buffer("freqs_sin", freqs_sin, persistent=False)

    def forward(self, input_ids=None, attention_mask=None, cache=None, inputs_embeds=None):
        """Final normed hidden states [B, T, hidden] and the summed MoE aux loss.

        The new tokens sit at positions P..P+T-1, P = the tokens already in `cache` (upstream uses no
        position_ids: left padding shifts positions, in training and generation alike).
        """
        hidden_states = self._embed(input_ids, inputs_embeds)
        past_len, seq_len = cached_length(cache), hidden_states.shape[1]
        position_embeddings = self._rope(past_len, seq_len)
        attn_mask = attention_bias(attention_mask, past_len, seq_len, hidden_states.dtype, hidden_states.device)
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, attn_mask=attn_mask, cache=cache)
        hidden_states = self.norm(hidden_states)
        return hidden_states, self._moe_aux_loss(hidden_states)

    def forward_from(self, output_from: int, input_ids=None, inputs_embeds=None):
        """The loss-only training path (no cache, no padding mask): hidden states only for positions >=
        output_from, [B, T - output_from, hidden]; the last layer skips its query-side work before that."""
        hidden_states = self._embed(input_ids, inputs_embeds)
        position_embeddings = self._rope(0, hidden_states.shape[1])
        *earlier_layers, last_layer = self.layers
        for layer in earlier_layers:
            hidden_states = layer(hidden_states, position_embeddings)
        hidden_states = self.norm(last_layer.forward_from(hidden_states, position_embeddings, output_from))
        return hidden_states, self._moe_aux_loss(hidden_states)

    def _embed(self, input_ids, inputs_embeds):
        return self.dropout(self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds)

    def _rope(self, start: int, length: int):
        """cos, sin [length, d] for positions start..start+length-1."""
        return self.freqs_cos[start:start + length], self.freqs_sin[start:start + length]

    def _moe_aux_loss(self, hidden_states):
        """The MoE layers' load-balancing losses summed (a zero of hidden_states' dtype without MoE)."""
        aux_loss = hidden_states.new_zeros(())
        for layer in self.layers:
            if isinstance(layer.mlp, MOEFeedForward) and layer.mlp.aux_loss is not None:
                aux_loss = aux_loss + layer.mlp.aux_loss
        return aux_loss


class MiniMindForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MiniMindConfig
    base_model_prefix = "model"
    # {target: source} in 5.x; 4.x iterates it and reads the tied (output) names, the same statement. The output
    # must be the target: 4.x ties output to input embeddings, so the saved file has to keep the embedding.
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _supports_sdpa = True
    # generate() inputs that belong to the prompt, fed only on the step that starts from an empty cache.
    prefill_only_inputs = ()

    def __init__(self, config: MiniMindConfig = None):
        config = config or MiniMindConfig()
        super().__init__(config)
        self.model = MiniMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Tied as upstream does it: the embedding is the lm_head Parameter (init = Linear's init).
        self.model.embed_tokens.weight = self.lm_head.weight
        # transformers' bookkeeping (tied-weight keys) that from_pretrained relies on; runs _init_weights
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def _init_weights(self, module):
        # MiniMind2: weights come from the modules' own constructors (as upstream); only the RoPE tables need
        # rebuilding when transformers materialises the model from the meta device. MiniMind-3 draws its matrices
        # from N(0, init_std), as upstream's post_init() does.
        std = lm_family_of(self.config).init_std
        if std is not None and isinstance(module, (nn.Linear, nn.Embedding, MoEGate)) and \
                not getattr(module.weight, "_is_hf_initialized", False):  # not a weight transformers has loaded
            with torch.no_grad():
                module.weight.normal_(mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
        if isinstance(module, MiniMindModel):
            cos, sin = precompute_freqs_cis(module.config.head_dim, module.config.max_position_embeddings,
                                            module.config.rope_theta, module.config.rope_parameters)
            with torch.no_grad():
                if module.freqs_cos.device.type != "meta":
                    module.freqs_cos.copy_(cos)
                    module.freqs_sin.copy_(sin)

    def forward(self, input_ids=None, attention_mask=None, labels=None, past_key_values=None, use_cache=False,
                logits_to_keep=0, inputs_embeds=None, loss_only=False, return_dict=True, first_target=None,
                target_index=None):
        """Logits for input_ids [B, T] (or inputs_embeds [B, T, hidden]); with labels, the shifted cross-entropy.
        (Parameters in upstream's order, so positional calls mean the same.)

        past_key_values: a transformers Cache (e.g. DynamicCache) holding the earlier tokens, updated in place;
        use_cache=True without one starts a DynamicCache. The output carries it in the installed transformers'
        cache field (`compat.OUTPUT_CACHE_FIELD`). generate() reaches this through `prepare_inputs_for_generation`.
        loss_only=True (training, no cache, no padding mask): the same loss without logits where there is no
        target (`logits` is None); see `_loss_only_forward`. first_target, target_index: `target_positions(labels)`
        computed beforehand (on the CPU), so that this path makes no device->host sync; None: found here.
        return_dict: accepted because generate() passes it; the output is always a ModelOutput.
        """
        if loss_only and labels is not None and past_key_values is None and not use_cache and attention_mask is None:
            return self._loss_only_forward(input_ids, inputs_embeds, labels, first_target, target_index)
        cache = self._cache_for(past_key_values, use_cache)
        hidden_states, aux_loss = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache,
                                             inputs_embeds=inputs_embeds)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=logits, hidden_states=hidden_states,
                                         **{OUTPUT_CACHE_FIELD: cache})

    @staticmethod
    def _cache_for(past_key_values, use_cache: bool):
        """The one cache format: a transformers Cache (a new DynamicCache when use_cache asks for one)."""
        if past_key_values is None:
            return DynamicCache() if use_cache else None
        if not isinstance(past_key_values, Cache):
            raise TypeError(f"past_key_values must be a transformers Cache such as DynamicCache(), not "
                            f"{type(past_key_values).__name__} (lists of (k, v) pairs are not supported)")
        return past_key_values

    def _loss_only_forward(self, input_ids, inputs_embeds, labels, first_target=None, target_index=None):
        """forward's loss with the vocabulary projection applied only where a target exists. Positions before the
        first target of the batch feed the loss only through attention, so the last layer computes keys and values
        there but no outputs (not with MoE, whose aux loss sees every token)."""
        if first_target is None or target_index is None:
            first_target, target_index = target_positions(labels)
        first = 0 if self.config.use_moe else first_target
        if first:
            hidden_states, aux_loss = self.model.forward_from(first, input_ids=input_ids, inputs_embeds=inputs_embeds)
        else:
            hidden_states, aux_loss = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds)
        # Position t predicts token t + 1; hidden_states start at position `first`. Index tensors, not a boolean
        # mask: no device->host sync for the number of targets.
        rows, columns = target_index // (labels.shape[1] - 1), target_index % (labels.shape[1] - 1)
        logits = self.lm_head(hidden_states[rows, columns - first])  # [N targets, vocab]
        loss = F.cross_entropy(logits.float(), labels[rows, columns + 1])
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=None, hidden_states=hidden_states)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, use_cache=True, logits_to_keep=None,
                                      inputs_embeds=None, **kwargs):
        """One generate() step's forward inputs. The model owns this contract, so it holds on 4.57 and 5.x alike.

        The cache is the one generate() keeps under `compat.GENERATE_CACHE_KWARG`; only the tokens not yet in it
        are fed (every token without a cache), and `prefill_only_inputs` go with the step that starts from an
        empty cache. generate()'s other bookkeeping (cache_position, next_sequence_length, is_first_iteration)
        is not needed: the cache length says it all. (Named **kwargs: generate() then accepts any keyword that
        forward takes.)
        """
        if inputs_embeds is not None:
            raise ValueError("generate() from inputs_embeds is not supported: pass input_ids (and pixel_values)")
        cache = kwargs.get(GENERATE_CACHE_KWARG)
        past_len = cached_length(cache)
        model_inputs = dict(input_ids=input_ids[:, past_len:], attention_mask=attention_mask, past_key_values=cache,
                            use_cache=use_cache)
        if logits_to_keep is not None:
            model_inputs["logits_to_keep"] = logits_to_keep
        if past_len == 0:
            model_inputs.update({name: kwargs[name] for name in self.prefill_only_inputs
                                 if kwargs.get(name) is not None})
        return model_inputs


# --------------------------------------------------------------------------------------------------------------
# Legacy (Feb-2025, "LMConfig"/"MiniMindLM") checkpoints: renamed keys and interleaved-pair RoPE.

LEGACY_KEY_RENAMES = [
    ("tok_embeddings.", "model.embed_tokens."),
    ("output.", "lm_head."),
    ("norm.", "model.norm."),
]
LEGACY_LAYER_RENAMES = [
    ("attention.wq.", "self_attn.q_proj."),
    ("attention.wk.", "self_attn.k_proj."),
    ("attention.wv.", "self_attn.v_proj."),
    ("attention.wo.", "self_attn.o_proj."),
    ("attention_norm.", "input_layernorm."),
    ("ffn_norm.", "post_attention_layernorm."),
    ("feed_forward.w1.", "mlp.gate_proj."),
    ("feed_forward.w2.", "mlp.down_proj."),
    ("feed_forward.w3.", "mlp.up_proj."),
    ("feed_forward.", "mlp."),  # MoE: experts.{e}.w1 etc. are renamed by the pass below
]
LEGACY_EXPERT_RENAMES = [(".w1.", ".gate_proj."), (".w2.", ".down_proj."), (".w3.", ".up_proj.")]


def is_legacy_state_dict(state_dict) -> bool:
    return "tok_embeddings.weight" in state_dict or any(k.startswith("layers.") for k in state_dict)


def interleaved_to_half_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder each head's output rows [0,1,2,...,d-1] -> [0,2,4,...,d-2, 1,3,...,d-1].

    Legacy RoPE rotates pairs (x[2i], x[2i+1]); rotate-half RoPE rotates (x[i], x[i+d/2]). Permuting the
    projection rows this way makes the two conventions produce identical attention scores.
    """
    out_features, in_features = weight.shape
    head_dim = out_features // num_heads
    per_head = weight.view(num_heads, head_dim // 2, 2, in_features)  # [heads, d/2, pair, in]
    return per_head.transpose(1, 2).reshape(out_features, in_features)


def is_legacy_buffer(key: str) -> bool:
    """Non-persistent buffers some Feb-2025 saves contain (no weights)."""
    return key.endswith(".mask") or key == "mask" or "pos_cis" in key


def legacy_key_name(key: str) -> str:
    """The current name of a Feb-2025 key."""
    if not key.startswith("layers."):
        for old, new in LEGACY_KEY_RENAMES:
            if key.startswith(old):
                return new + key[len(old):]
        return key
    new_key = "model." + key
    for old, new in LEGACY_LAYER_RENAMES:
        if old in new_key:
            new_key = new_key.replace(old, new, 1)
            break
    if ".mlp.experts." in new_key or ".mlp.shared_experts." in new_key:
        for old, new in LEGACY_EXPERT_RENAMES:
            new_key = new_key.replace(old, new)
    if ".mlp.shared_experts." in new_key and not re.search(r"\.shared_experts\.\d+\.", new_key):
        # Legacy kept one shared FFN as an attribute; current code keeps a list of them.
        new_key = new_key.replace(".mlp.shared_experts.", ".mlp.shared_experts.0.")
    return new_key


def convert_legacy_state_dict(state_dict, config: MiniMindConfig):
    """Map a Feb-2025 MiniMind-V state_dict onto the current key names and RoPE layout (logits preserved)."""
    converted = {}
    for key, tensor in state_dict.items():
        if is_legacy_buffer(key):
            continue
        new_key = legacy_key_name(key)
        if new_key.endswith("self_attn.q_proj.weight"):
            tensor = interleaved_to_half_rows(tensor, config.num_attention_heads)
        elif new_key.endswith("self_attn.k_proj.weight"):
            tensor = interleaved_to_half_rows(tensor, config.num_key_value_heads)
        converted[new_key] = tensor
    # Legacy saves stored the tied embedding once when both names share storage; restore both names.
    if "lm_head.weight" in converted and "model.embed_tokens.weight" not in converted:
        converted["model.embed_tokens.weight"] = converted["lm_head.weight"]
    if "model.embed_tokens.weight" in converted and "lm_head.weight" not in converted:
        converted["lm_head.weight"] = converted["model.embed_tokens.weight"]
    return converted
