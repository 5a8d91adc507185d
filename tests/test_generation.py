"""generate() keeps its promise on every transformers release in the range (4.57.x to the newest 5.x).

Greedy `generate` with a KV cache must give exactly the tokens of greedy decoding by full recomputation (argmax
of a forward pass over the whole sequence, no cache, at every step), and must really use the cache: after the
prefill each step feeds the model one new token. Checked for the language model (MiniMind2 and MiniMind-3, dense
and MoE), the VLM loaded from a `.pth` file (one image, two images), left-padded batches, and the exported
transformers folder loaded with AutoModelForCausalLM.
"""
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from model.model_minimind import MiniMindConfig, MiniMindForCausalLM, minimind3_config_kwargs
from model.model_vlm import IMAGE_PLACEHOLDER_ID, IMAGE_TOKENS_PER_IMAGE, MiniMindVLM, VLMConfig
from model.weights import load_weights, weight_path
from scripts import convert_vlm

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
NEW_TOKENS = 10
PAD_ID = 0
IMG = [IMAGE_PLACEHOLDER_ID] * IMAGE_TOKENS_PER_IMAGE


def greedy_by_recomputation(model, input_ids, attention_mask, **images):
    """Reference decoding: each next token is the argmax of a cache-free forward over everything so far."""
    ids, mask = input_ids, attention_mask
    for _ in range(NEW_TOKENS):
        logits = model(ids, attention_mask=mask, **images).logits[:, -1]  # [B, vocab]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return ids


def fed_lengths_during(model, call):
    """Run `call()`; return how many positions each forward of the backbone got (prefill, then each step)."""
    lengths = []

    def note(module, args, kwargs):
        fed = kwargs.get("inputs_embeds")
        lengths.append((kwargs["input_ids"] if fed is None else fed).shape[1])

    handle = model.model.register_forward_pre_hook(note, with_kwargs=True)
    try:
        result = call()
    finally:
        handle.remove()
    return result, lengths


def assert_generate_equals_recomputation(model, input_ids, attention_mask=None, **images):
    with torch.no_grad():
        expected = greedy_by_recomputation(model, input_ids, attention_mask, **images)
        generated, lengths = fed_lengths_during(model, lambda: model.generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True,
            eos_token_id=None, pad_token_id=PAD_ID, **images))
    assert generated.shape == (input_ids.shape[0], input_ids.shape[1] + NEW_TOKENS)
    assert torch.equal(generated, expected), (generated[:, input_ids.shape[1]:], expected[:, input_ids.shape[1]:])
    assert lengths == [input_ids.shape[1]] + [1] * (NEW_TOKENS - 1)  # the cache was used


def left_pad(rows):
    """Token rows of different lengths -> input_ids and attention_mask [B, longest], padding on the left."""
    longest = max(len(row) for row in rows)
    input_ids = torch.tensor([[PAD_ID] * (longest - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (longest - len(row)) + [1] * len(row) for row in rows])
    return input_ids, attention_mask


# ------------------------------------------------------------------------------------------ the language model

@pytest.mark.parametrize("use_moe", [False, True])
def test_lm_generate_equals_recomputation(use_moe):
    torch.manual_seed(4)
    model = MiniMindForCausalLM(MiniMindConfig(**TINY, use_moe=use_moe)).eval()
    assert_generate_equals_recomputation(model, torch.randint(3, 6400, (1, 9)))


def test_lm_generate_left_padded_batch():
    torch.manual_seed(5)
    model = MiniMindForCausalLM(MiniMindConfig(**TINY)).eval()
    input_ids, attention_mask = left_pad([torch.randint(3, 6400, (11,)).tolist(),
                                          torch.randint(3, 6400, (6,)).tolist()])
    assert_generate_equals_recomputation(model, input_ids, attention_mask)


@pytest.mark.parametrize("use_moe", [False, True])
def test_minimind3_lm_generate_equals_recomputation(use_moe):
    torch.manual_seed(9)
    model = MiniMindForCausalLM(MiniMindConfig(**minimind3_config_kwargs(64, 2, use_moe))).eval()
    assert_generate_equals_recomputation(model, torch.randint(3, 6400, (1, 9)))
    input_ids, attention_mask = left_pad([torch.randint(3, 6400, (11,)).tolist(),
                                          torch.randint(3, 6400, (6,)).tolist()])
    assert_generate_equals_recomputation(model, input_ids, attention_mask)


# ----------------------------------------------------------------------------- the VLM from a .pth weight file

@pytest.fixture(scope="module")
def pth_vlm(tiny_vlm_save_dir, tiny_clip_dir):
    model = MiniMindVLM(VLMConfig(hidden_size=64, num_hidden_layers=2), vision_model_path=tiny_clip_dir)
    load_weights(model, weight_path(tiny_vlm_save_dir, "sft_vlm", 64, False), log=None)
    return model.eval()


def test_vlm_generate_with_one_image(pth_vlm):
    torch.manual_seed(6)
    input_ids = torch.tensor([[1, 5] + IMG + [6, 7, 2, 1, 8]])
    assert_generate_equals_recomputation(pth_vlm, input_ids, pixel_values=torch.randn(1, 1, 3, 224, 224))


def test_vlm_generate_with_two_images(pth_vlm):
    torch.manual_seed(7)
    input_ids = torch.tensor([[1, 5] + IMG + [6] + IMG + [7, 2, 1, 8]])
    assert_generate_equals_recomputation(pth_vlm, input_ids, pixel_values=torch.randn(1, 2, 3, 224, 224))


def test_vlm_generate_left_padded_batch(pth_vlm):
    torch.manual_seed(8)
    input_ids, attention_mask = left_pad([[1, 5, 9, 10] + IMG + [6, 7, 2, 1, 8], [1] + IMG + [6, 2, 1]])
    assert_generate_equals_recomputation(pth_vlm, input_ids, attention_mask,
                                         pixel_values=torch.randn(2, 1, 3, 224, 224))


def greedy_decode_loop(model, input_ids, pixel_values, images_every_step: bool):
    """Greedy decoding by hand with a KV cache: upstream-style code passes pixel_values on every step, ours on the
    prefill only. Returns the tokens and each step's logits."""
    cache, ids, steps = DynamicCache(), input_ids, []
    new_ids = input_ids
    for step in range(NEW_TOKENS):
        images = pixel_values if step == 0 or images_every_step else None
        logits = model(new_ids, past_key_values=cache, use_cache=True, pixel_values=images).logits[:, -1]
        steps.append(logits)
        new_ids = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, new_ids], dim=1)
    return ids, torch.stack(steps, dim=1)


@pytest.mark.parametrize("use_moe", [False, True])
def test_upstream_style_decode_loop_equals_prefill_only(use_moe, tiny_clip_dir):
    torch.manual_seed(10)
    model = MiniMindVLM(VLMConfig(**TINY, use_moe=use_moe), vision_model_path=tiny_clip_dir).eval()
    input_ids = torch.tensor([[1, 5] + IMG + [6, 7, 2, 1, 8]])
    pixels = torch.randn(1, 1, 3, 224, 224)
    with torch.no_grad():
        upstream_ids, upstream_logits = greedy_decode_loop(model, input_ids, pixels, images_every_step=True)
        ours_ids, ours_logits = greedy_decode_loop(model, input_ids, pixels, images_every_step=False)
        generated = model.generate(input_ids, pixel_values=pixels, max_new_tokens=NEW_TOKENS, do_sample=False,
                                   eos_token_id=None, pad_token_id=PAD_ID)
    assert torch.equal(upstream_logits, ours_logits) and torch.equal(upstream_ids, ours_ids)
    assert torch.equal(generated, ours_ids)
    # the image did count: the same prompt without it decodes differently
    with torch.no_grad():
        blind = model(input_ids).logits[:, -1]
    assert not torch.allclose(blind, ours_logits[:, 0])


def test_image_placeholders_after_the_prompt_raise(pth_vlm):
    cache = DynamicCache()
    pixels = torch.randn(1, 1, 3, 224, 224)
    with torch.no_grad():
        pth_vlm(torch.tensor([[1] + IMG + [6]]), pixel_values=pixels, past_key_values=cache, use_cache=True)
        pth_vlm(torch.tensor([[7]]), pixel_values=pixels, past_key_values=cache, use_cache=True)  # ignored
        assert cache.get_seq_length() == 1 + IMAGE_TOKENS_PER_IMAGE + 2
        with pytest.raises(ValueError, match="image placeholder tokens after the prompt"):
            pth_vlm(torch.tensor([[8] + IMG]), pixel_values=pixels, past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="image placeholder tokens after the prompt"):
            pth_vlm(torch.tensor([[8] + IMG]), image_features=torch.randn(1, IMAGE_TOKENS_PER_IMAGE, 64),
                    past_key_values=cache, use_cache=True)


# ---------------------------------------------------------- the exported folder, loaded with AutoModelForCausalLM

@pytest.fixture(scope="module")
def exported_vlm(tiny_vlm_save_dir, tiny_tokenizer_dir, tiny_clip_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("exported") / "MiniMind2-V-generation"
    convert_vlm.main(["--to", "transformers", "--torch_path", str(weight_path(tiny_vlm_save_dir, "sft_vlm", 64, False)),
                      "--transformers_dir", str(folder), "--tokenizer_path", str(tiny_tokenizer_dir),
                      "--vision_model_path", str(tiny_clip_dir), "--dtype", "float32"])
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, vision_model_path=str(tiny_clip_dir))
    assert type(model).__name__ == "MiniMindVLM" and type(model) is not MiniMindVLM  # the folder's own code
    return model.eval()


def test_exported_folder_generates_with_an_image(exported_vlm):
    torch.manual_seed(9)
    input_ids = torch.tensor([[1, 5] + IMG + [6, 7, 2, 1, 8]])
    assert_generate_equals_recomputation(exported_vlm, input_ids, pixel_values=torch.randn(1, 1, 3, 224, 224))


def test_exported_folder_generates_a_left_padded_text_batch(exported_vlm):
    torch.manual_seed(10)
    input_ids, attention_mask = left_pad([torch.randint(3, 6400, (12,)).tolist(), [1, 5, 6, 2, 1]])
    assert_generate_equals_recomputation(exported_vlm, input_ids, attention_mask)
