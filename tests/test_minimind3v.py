"""minimind-3v's vision side (spec: ../shared/spec/upstream-minimind-3v.md): SigLIP preprocessing and features,
the MLP projector, the 64-token placeholder run and MiniMind-3's chat format, checked against transformers' own
classes and an independent re-derivation of upstream's 3v forward; the presets; self-describing checkpoints and
recognising an upstream-format minimind-3v `.pth` from its keys alone."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessor, SiglipVisionModel

from dataset.processing import build_prompt, image_processor_for, render_chat
from inference.loading import load_model
from model.compat import pil_image_processor_class
from model.model_vlm import PROJECTORS, VISION_ENCODERS, MiniMindVLM, read_encoder_folder
from model.presets import PRESETS, vlm_config
from model.processing_minimind_v import (CLIP_IMAGE_PROCESSING, MINIMIND3_CHAT_TEMPLATE, output_size,
                                         read_image_processing)
from model.weights import (WeightsMismatchError, architecture_path, describe_state_dict, load_weights,
                           read_architecture, write_architecture)
from test_minimind3 import reference_hidden

PIXEL_TOLERANCE = 1e-5
LOGITS_TOLERANCE = 2e-4
NEW_TOKENS = 6
QUESTION = "What is in the picture?"
SIGLIP_TOKENS = 64  # 256 px / 32 px patches = an 8x8 grid (spec)


def photos(seed=0):
    """Random images of several sizes and modes, as users send them."""
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
              [(256, 256), (300, 200), (97, 411), (128, 128)]]
    images.append(Image.fromarray(rng.integers(0, 256, (180, 240), dtype=np.uint8), mode="L"))
    images.append(Image.fromarray(rng.integers(0, 256, (90, 60, 4), dtype=np.uint8), mode="RGBA"))
    return images


def tiny_3v(siglip_dir, seed, use_moe=False, hidden=64, layers=2):
    """A random minimind-3v (MiniMind-3 LM hidden x layers, MLP projector) on the tiny SigLIP, norm weights not all
    ones."""
    torch.manual_seed(seed)
    model = MiniMindVLM(vlm_config("minimind-3v", hidden, layers, use_moe), vision_model_path=siglip_dir).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.copy_(torch.rand_like(param) + 0.5)
            if name == "model.embed_tokens.weight":
                param.mul_(20)  # logits of a few units
    return model


# ----------------------------------------------------------------------------------------- the vision stack

def test_siglip_preprocessing_equals_transformers_processor(tiny_siglip_dir):
    processing = read_image_processing(tiny_siglip_dir)
    assert processing["resize"] == "exact" and output_size(processing) == (256, 256) and not processing["crop_size"]
    ours = image_processor_for(vlm_config("minimind-3v", 64, 2, image_processing=processing))
    theirs = pil_image_processor_class("SiglipImageProcessor").from_pretrained(tiny_siglip_dir)
    for image in photos():
        expected = theirs(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        got = ours.pixels(image)
        assert got.shape == (3, 256, 256) and got.dtype == torch.float32
        assert (got - expected).abs().max() <= PIXEL_TOLERANCE
        assert got.min() >= -1 and got.max() <= 1  # (x - 0.5) / 0.5


def test_clip_preprocessing_is_read_from_its_folder_and_unchanged(tiny_clip_dir):
    assert read_image_processing(tiny_clip_dir) == CLIP_IMAGE_PROCESSING
    ours = image_processor_for(vlm_config("minimind2-v"))
    theirs = pil_image_processor_class("CLIPImageProcessor").from_pretrained(tiny_clip_dir)
    assert isinstance(theirs, CLIPImageProcessor) or type(theirs).__name__.startswith("CLIPImageProcessor")
    for image in photos(1):
        expected = theirs(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        assert (ours.pixels(image) - expected).abs().max() <= PIXEL_TOLERANCE


def test_resample_comes_from_the_folder(tmp_path, tiny_siglip_dir):
    folder = tmp_path / "siglip"
    folder.mkdir()
    config = json.loads((tiny_siglip_dir / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**config, "resample": 3}))
    assert read_image_processing(tiny_siglip_dir)["resample"] == 2
    assert read_encoder_folder(folder)["resample"] == 3
    image = photos()[1]
    bicubic = image_processor_for(vlm_config("minimind-3v", image_processing=read_encoder_folder(folder)))
    bilinear = image_processor_for(vlm_config("minimind-3v", image_processing=read_encoder_folder(tiny_siglip_dir)))
    assert not torch.equal(bicubic.pixels(image), bilinear.pixels(image))


def test_siglip_features_are_fp32_last_hidden_state_every_token(tiny_siglip_dir):
    stored = json.loads((tiny_siglip_dir / "config.json").read_text())
    assert stored.get("dtype", stored.get("torch_dtype")) == "float16"  # as siglip2-base-p32-256-ve
    model = tiny_3v(tiny_siglip_dir, seed=1)
    assert next(model.vision_encoder.parameters()).dtype == torch.float32
    assert model.config.image_feature_count == model.config.image_token_count == SIGLIP_TOKENS
    pixels = torch.stack([image_processor_for(model.config).pixels(image) for image in photos()[:3]])
    reference = SiglipVisionModel.from_pretrained(tiny_siglip_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(pixel_values=pixels).last_hidden_state
    features = model.encode_images(pixels)
    assert features.shape == (3, SIGLIP_TOKENS, 64) and torch.equal(features, expected)


def test_mlp_projector_has_upstreams_keys_and_math():
    projector = PROJECTORS["mlp"](768, 256)
    shapes = {k: tuple(v.shape) for k, v in projector.state_dict().items()}
    assert shapes == {"mlp.0.weight": (768,), "mlp.0.bias": (768,), "mlp.1.weight": (256, 768), "mlp.1.bias": (256,),
                      "mlp.3.weight": (256, 256), "mlp.3.bias": (256,)}
    x = torch.randn(2, 5, 768)
    sd = projector.state_dict()
    expected = F.layer_norm(x, (768,), sd["mlp.0.weight"], sd["mlp.0.bias"], eps=1e-5)
    expected = F.linear(F.gelu(F.linear(expected, sd["mlp.1.weight"], sd["mlp.1.bias"])), sd["mlp.3.weight"],
                        sd["mlp.3.bias"])
    assert torch.allclose(projector(x), expected, atol=1e-6)
    linear_keys = set(PROJECTORS["linear"](768, 512).state_dict())
    assert linear_keys == {"vision_proj.0.weight", "vision_proj.0.bias"}


def test_presets_say_the_two_models():
    two, three = vlm_config("minimind2-v"), vlm_config("minimind-3v")
    assert (two.vision_encoder, two.projector, two.image_ids[0], two.image_token_count, two.chat_format,
            two.hidden_size, two.lm_family) == ("clip", "linear", 34, 196, "minimind2", 512, "minimind2")
    assert (three.vision_encoder, three.projector, three.image_ids[0], three.image_token_count, three.chat_format,
            three.hidden_size, three.lm_family) == ("siglip", "mlp", 12, 64, "minimind3", 768, "minimind3")
    assert three.image_special_token == "<|image_pad|>" * 64
    assert (three.num_key_value_heads, three.rms_norm_eps, three.tie_word_embeddings) == (4, 1e-6, True)
    assert set(VISION_ENCODERS) >= {"clip", "siglip"} and set(PROJECTORS) >= {"linear", "mlp"}
    assert PRESETS["minimind-3v"].trainable == {"pretrain": "projector", "sft": "projector_first_last_layers"}


def test_encoder_that_does_not_fit_the_placeholder_run_is_refused(tiny_clip_dir):
    with pytest.raises(ValueError, match="196 features per image, but the placeholder run is 64"):
        MiniMindVLM(vlm_config("minimind-3v", 64, 2, vision_encoder="clip"), vision_model_path=tiny_clip_dir)


# ------------------------------------------------------------------------- prompt and parity with the spec

def test_prompt_is_the_real_minimind3_template(real_minimind3_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(real_minimind3_tokenizer_dir)
    config = vlm_config("minimind-3v")
    chats = [
        [{"role": "user", "content": f"<image>\n{QUESTION}"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"<image>\n{QUESTION}"},
         {"role": "assistant", "content": "A red square."}, {"role": "user", "content": "And the background?"}],
    ]
    for chat in chats:
        for add_generation_prompt in (False, True):
            ours = build_prompt(tokenizer, chat, config.image_special_token, add_generation_prompt,
                                chat_format=config.chat_format)
            with_pads = [{**m, "content": m["content"].replace("<image>", config.image_special_token)} for m in chat]
            theirs = tokenizer.apply_chat_template(with_pads, tokenize=False,
                                                   add_generation_prompt=add_generation_prompt)
            assert ours == theirs
            assert tokenizer(ours).input_ids == tokenizer(theirs).input_ids
            assert tokenizer(ours).input_ids.count(12) == 64
    assert "You are a helpful assistant" not in ours and "<think>\n\n</think>\n\n" in ours
    # The exported folder's processor template renders list content (the real one drops it) the same way.
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    assert tokenizer.apply_chat_template(parts, chat_template=MINIMIND3_CHAT_TEMPLATE, tokenize=False,
                                         add_generation_prompt=True) == \
        render_chat([{"role": "user", "content": f"<image>\n{QUESTION}"}], tokenizer.bos_token, tokenizer.eos_token,
                    True, "minimind3")


def reference_3v_logits(model, siglip_dir, ids, images):
    """Upstream's 3v forward re-derived from the spec: SiglipImageProcessor pixels, SiglipVisionModel (fp32)
    last_hidden_state, LayerNorm-Linear-GELU-Linear, each run of id 12 overwritten by its image's features, then
    the MiniMind-3 LM (test_minimind3.reference_hidden) and the tied head."""
    processor = pil_image_processor_class("SiglipImageProcessor").from_pretrained(siglip_dir)
    pixels = processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]
    encoder = SiglipVisionModel.from_pretrained(siglip_dir, dtype=torch.float32).eval()
    sd = model.state_dict()
    with torch.no_grad():
        features = encoder(pixel_values=pixels).last_hidden_state
        x = F.layer_norm(features, features.shape[-1:], sd["vision_proj.mlp.0.weight"], sd["vision_proj.mlp.0.bias"])
        x = F.linear(F.gelu(F.linear(x, sd["vision_proj.mlp.1.weight"], sd["vision_proj.mlp.1.bias"])),
                     sd["vision_proj.mlp.3.weight"], sd["vision_proj.mlp.3.bias"])
        embeds = sd["model.embed_tokens.weight"][ids].clone()
        embeds[ids == 12] = x.reshape(-1, x.shape[-1])
        return reference_hidden(sd, ids, inputs_embeds=embeds) @ sd["lm_head.weight"].T, pixels


@pytest.mark.parametrize("use_moe", [False, True])
def test_3v_pixels_logits_and_greedy_tokens_match_the_spec(tiny_siglip_dir, real_minimind3_tokenizer_dir, use_moe):
    tokenizer = AutoTokenizer.from_pretrained(real_minimind3_tokenizer_dir)
    model = tiny_3v(tiny_siglip_dir, seed=3, use_moe=use_moe)
    image = photos(2)[1]
    prompt = build_prompt(tokenizer, [{"role": "user", "content": f"<image>\n{QUESTION}"}],
                          model.config.image_special_token, True, chat_format="minimind3")
    ids = torch.tensor([tokenizer(prompt).input_ids])
    pixels = image_processor_for(model.config).pixels(image)[None]
    expected, reference_pixels = reference_3v_logits(model, tiny_siglip_dir, ids, [image])
    assert (pixels - reference_pixels).abs().max() <= PIXEL_TOLERANCE
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels[None]).logits
    assert expected.abs().max() > 1 and (logits - expected).abs().max() <= LOGITS_TOLERANCE
    with torch.no_grad():
        generated = model.generate(input_ids=ids, pixel_values=pixels[None], max_new_tokens=NEW_TOKENS,
                                   do_sample=False, eos_token_id=None, pad_token_id=0)
    reference_ids = ids
    for _ in range(NEW_TOKENS):
        step, _ = reference_3v_logits(model, tiny_siglip_dir, reference_ids, [image])
        reference_ids = torch.cat([reference_ids, step[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert generated[0].tolist() == reference_ids[0].tolist()


@pytest.mark.slow
def test_real_shape_768x8_logits_match_the_spec(tmp_path, real_minimind3_tokenizer_dir):
    """The released shape: MiniMind-3 768x8 behind a SigLIP of width 768 (random, 1 layer: the LM is the point)."""
    from dev.synthetic import build_tiny_siglip

    siglip_dir = build_tiny_siglip(tmp_path / "siglip768", hidden_size=768, num_layers=1, num_heads=12)
    tokenizer = AutoTokenizer.from_pretrained(real_minimind3_tokenizer_dir)
    model = tiny_3v(siglip_dir, seed=4, hidden=768, layers=8)
    assert sum(p.numel() for p in model.parameters()) == 65_094_912  # the spec's minimind-3v size
    prompt = build_prompt(tokenizer, [{"role": "user", "content": f"<image>\n{QUESTION}"}],
                          model.config.image_special_token, True, chat_format="minimind3")
    ids = torch.tensor([tokenizer(prompt).input_ids])
    image = photos(4)[0]
    expected, pixels = reference_3v_logits(model, siglip_dir, ids, [image])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels[None]).logits
    assert (logits - expected).abs().max() <= LOGITS_TOLERANCE


# ------------------------------------------------------------------------------- self-describing checkpoints

def upstream_3v_file(path, siglip_dir, seed, use_moe=False):
    """A minimind-3v `.pth` as upstream's trainer writes it: fp16, LM + projector, both tied copies, no sidecar."""
    model = tiny_3v(siglip_dir, seed, use_moe)
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    return model


def test_upstream_3v_pth_loads_with_no_preset_flag(tmp_path, tiny_siglip_dir, tiny_minimind3_tokenizer_dir):
    path = tmp_path / "sft_vlm_64.pth"
    original = upstream_3v_file(path, tiny_siglip_dir, seed=5)
    assert not architecture_path(path).exists()
    architecture = read_architecture(path)
    assert (architecture.source, architecture.preset) == ("keys", "minimind-3v")
    config = architecture.config
    assert (config.lm_family, config.projector, config.vision_encoder, config.image_ids[0], config.image_token_count,
            config.chat_format, config.ve_hidden_size) == ("minimind3", "mlp", "siglip", 12, 64, "minimind3", 64)
    loaded = load_model(path, False, tiny_minimind3_tokenizer_dir, tiny_siglip_dir, "cpu", log=None)
    assert loaded.model.config.chat_format == "minimind3" and loaded.image_processor.pixel_shape == (3, 256, 256)
    state = loaded.model.state_dict()
    assert all(torch.equal(state[k], v.half().float()) for k, v in original.state_dict().items())


def test_sidecar_round_trip_and_it_wins_over_keys(tmp_path, tiny_siglip_dir):
    path = tmp_path / "weights.pth"
    model = upstream_3v_file(path, tiny_siglip_dir, seed=6, use_moe=True)
    write_architecture(path, model.config, "minimind-3v", tiny_siglip_dir)
    assert architecture_path(path) == tmp_path / "weights.json"
    architecture = read_architecture(path)
    assert architecture.source == "sidecar" and architecture.vision_model_path == str(tiny_siglip_dir)
    assert architecture.config.to_dict() == model.config.to_dict()
    assert architecture.config.image_processing == read_image_processing(tiny_siglip_dir)
    architecture_path(path).write_text("{not json")
    with pytest.raises(WeightsMismatchError, match="not a readable architecture file"):
        read_architecture(path)


def test_a_3v_file_in_a_minimind2_model_names_the_keys_that_differ(tmp_path, tiny_siglip_dir, tiny_clip_dir):
    path = tmp_path / "sft_vlm_64.pth"
    upstream_3v_file(path, tiny_siglip_dir, seed=7)
    assert describe_state_dict(torch.load(path))["projector"] == "mlp"
    model = MiniMindVLM(vlm_config("minimind2-v", 64, 2), vision_model_path=tiny_clip_dir)
    with pytest.raises(WeightsMismatchError) as error:
        load_weights(model, path, log=None)
    message = str(error.value)
    assert "missing from the file" in message and "unexpected key" in message and "--preset minimind-3v" in message


def test_loss_mask_is_upstream_g3s(real_minimind3_tokenizer_dir):
    """Trained: each answer with its think block, `<|im_end|>` and the newline after it (upstream G3's span
    after `<|im_start|>assistant\\n` through `<|im_end|>\\n`), nothing of the user's turns or the image."""
    from dataset.records import SampleEncoder

    tokenizer = AutoTokenizer.from_pretrained(real_minimind3_tokenizer_dir)
    config = vlm_config("minimind-3v")
    encoder = SampleEncoder(tokenizer, config.image_special_token, 12, 1024, chat_format="minimind3")
    chat = [{"role": "user", "content": f"<image>\n{QUESTION}"}, {"role": "assistant", "content": "A red square."},
            {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]
    sample, = encoder.encode_chats([(chat, 1)])
    trained = sample.ids[encoder.label_mask(sample.ids)].tolist()
    expected = tokenizer("<think>\n\n</think>\n\nA red square.<|im_end|>\n<think>\n\n</think>\n\nYes.<|im_end|>\n",
                         add_special_tokens=False).input_ids
    assert trained == expected and 12 not in trained
