"""Build small offline stand-ins for the hub downloads: a tokenizer, a tiny CLIP and a synthetic dataset.

The tests and the offline demo use these instead of the real MiniMind2 tokenizer, openai/clip-vit-base-patch16
and the MiniMind-V image-text data. Everything is generated locally and seeded, so two builds with the same
arguments give byte-identical files.

    python -m dev.make_assets                                      # everything, into out/tiny_assets
    python -m dev.make_assets --out_dir /tmp/assets --only data --n_pretrain 2000 --n_sft 2000
    python -m dev.make_assets --only tokenizer clip --clip_hidden_size 128

Layout written under --out_dir:

    tokenizer/   tokenizer.json, tokenizer_config.json (chat template inside): AutoTokenizer.from_pretrained
    clip/        config.json, model.safetensors, preprocessor_config.json, processor_config.json,
                 tokenizer.json, tokenizer_config.json: CLIPModel / CLIPVisionModel / CLIPProcessor /
                 AutoImageProcessor.from_pretrained
    data/        pretrain_vlm_data.jsonl + pretrain_images/, sft_vlm_data.jsonl + sft_images/,
                 sft_vlm_data_multi.jsonl + sft_multi_images/, pretrain_i2t.parquet, sft_i2t.parquet,
                 sft_multi_i2t.parquet, sft_vlm_data_llava.json (the SFT records in LLaVA's layout, images as
                 sft_images/NAME: --images_path data/), eval_questions.jsonl + eval_images/, eval_pope.parquet
                 (held-out yes/no questions in the lmms-lab/POPE parquet schema, for scripts.eval_bench)

The dataset is "one coloured shape on a plain background": every answer (shape, colour, light or dark
background, same/different between two pictures) can only be known from the image, so a model that scores
above chance on eval_questions.jsonl has learnt to use its vision input. An eval record is
{"image", "question", "answer", "choices", "kind"}; the question carries no `<image>` marker (the caller puts
the image where its prompt format wants it) and chance accuracy is 1 / len(choices).

Besides its questions about the picture, the SFT file holds POPE-style yes/no questions, single-word answers and
text-only rows (`"image": ""` in JSONL, no `image` in LLaVA JSON, the 8x8 placeholder image in parquet), in
LLaVA-1.5's short-answer format: see POPE_SFT_FRACTION for why all three are needed.
"""
import io
import itertools
import json
import math
import os
import random
import string
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer, PreTrainedTokenizerFast

from model.compat import pil_clip_image_processor_class, pil_image_processor_class

from dataset.processing import IMAGE_MARKER, SHORT_ANSWER_SUFFIX
from dataset.records import LLAVA_ROLES
from model.model_minimind import MiniMindConfig
from model.model_vlm import (CLIP_IMAGE_SIZE, CLIP_PATCH_SIZE, IMAGE_PLACEHOLDER_CHAR, SIGLIP_IMAGE_SIZE,
                             SIGLIP_PATCH_SIZE)
from model.processing_minimind_v import (BOS_TOKEN, CHAT_TEMPLATE, CLIP_MEAN, CLIP_STD, DEFAULT_SYSTEM_PROMPT,
                                         EOS_TOKEN, MINIMIND3_CHAT_TEMPLATE)

ASSET_PARTS = ("tokenizer", "clip", "data", "siglip", "minimind3_tokenizer", "blip2", "qwen2", "llama")
DEFAULT_ASSET_PARTS = ("tokenizer", "clip", "data")  # MiniMind2-V's; siglip + minimind3_tokenizer: minimind-3v's;
# blip2: a BLIP-2 folder whose Q-Former `--qformer_init` reads; qwen2, llama: tiny transformers LMs (--language_model)

# ----------------------------------------------------------------------------------------------------------
# 1. Tokenizer: same structure and special tokens as the MiniMind2 tokenizer, trained on a small local corpus
# ----------------------------------------------------------------------------------------------------------

PAD_TOKEN = "<|endoftext|>"  # also the unk token, as in MiniMind2
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0, 1, 2 in this order
MODEL_MAX_LENGTH = 32768
# The VLM replaces each `<image>` by 196 copies of this character and finds the image slots by its id. With
# the byte alphabet placed right after the three special tokens '@' gets id 34, as in MiniMind2, and it stays
# a single-byte token only if no merge contains it, hence a corpus without it.
# MiniMind2 has 6400 entries; the small local corpus supports only about 600 merges (the trainer stops when no
# pair is left to merge), so BPE trains this many entries and unused fillers pad the vocabulary up to the
# model's size: every id a model can produce decodes, as with the real tokenizer.
DEFAULT_VOCAB_SIZE = 600
MODEL_VOCAB_SIZE = MiniMindConfig().vocab_size
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())  # specials + the byte alphabet
FILLER_LETTERS = string.ascii_lowercase
FILLER_LENGTH = 3  # 26^3 = 17,576 three-letter fillers: enough for any padding up to MODEL_VOCAB_SIZE


# The MiniMind-3 tokenizer's 36 special tokens (ids 0-35 in this order: `<|image_pad|>` 12, `<think>` 25), the
# minimind-3v stand-in's; its byte alphabet follows them, as in the real one ('@' 67, '\n' 234).
MINIMIND3_SPECIAL_TOKENS = (
    PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
    "<|video_pad|>", "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>", "<tts_pad>", "<tts_text_bos>",
    "<tts_text_eod>", "<tts_text_bos_single>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
    "<think>", "</think>", *(f"<|buffer{i}|>" for i in range(1, 10)))


def build_minimind3_tokenizer(out_dir, corpus_texts, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """A MiniMind-3-structured tokenizer (its special tokens and ids, the MiniMind-3 chat format) trained on
    `corpus_texts`: the offline stand-in for minimind-3v's."""
    return build_tokenizer(out_dir, corpus_texts, vocab_size + len(MINIMIND3_SPECIAL_TOKENS) - len(SPECIAL_TOKENS),
                           special_tokens=MINIMIND3_SPECIAL_TOKENS, chat_template=MINIMIND3_CHAT_TEMPLATE)


def build_tokenizer(out_dir, corpus_texts, vocab_size: int = DEFAULT_VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                    chat_template: str = CHAT_TEMPLATE, bos_token: str = BOS_TOKEN, eos_token: str = EOS_TOKEN,
                    pad_token: str = PAD_TOKEN, split_pattern: str = None) -> Path:
    """Train a byte-level BPE tokenizer on `corpus_texts` and save it for AutoTokenizer.from_pretrained.

    Structure as MiniMind2: specials at ids 0-2, the full 256-byte alphabet next (so '@' is id 34 and '\\n' is
    201), ByteLevel pre-tokenizer without prefix space, ByteLevel decoder, no normalizer and no
    post-processor (encoding adds nothing by itself). `split_pattern`: a pre-tokenizer regex applied before the
    byte-level step (as Qwen2's and Llama 3's tokenizers do) instead of GPT-2's.
    """
    out_dir = Path(out_dir)
    texts = list(corpus_texts)
    with_placeholder = [text for text in texts if IMAGE_PLACEHOLDER_CHAR in text]
    if with_placeholder:
        raise ValueError(f"corpus must not contain {IMAGE_PLACEHOLDER_CHAR!r} (a merge would swallow image "
                         f"placeholders); first offending text: {with_placeholder[0]!r}")
    min_vocab_size = len(special_tokens) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < min_vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is below the {min_vocab_size} specials + bytes")

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split_pattern is not None:
        bpe.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    # The trainer puts the special tokens first and the alphabet after them in code-point order, which is the
    # id layout of MiniMind2's ids 0..258.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    bpe = pad_vocabulary(bpe, MODEL_VOCAB_SIZE)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, unk_token=pad_token,
        add_bos_token=False, add_eos_token=False,
        model_max_length=MODEL_MAX_LENGTH, padding_side="right", truncation_side="right",
        clean_up_tokenization_spaces=False, chat_template=chat_template,
    )
    # save_jinja_files=False keeps the template inside tokenizer_config.json, where MiniMind2 has it.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    _restore_minimind2_file_layout(out_dir, bpe)
    return out_dir


def pad_vocabulary(bpe: Tokenizer, size: int) -> Tokenizer:
    """Append unreachable entries (no merge produces them) until the vocabulary has `size` entries.

    Fillers are three-letter lowercase strings, so an id a random model samples decodes to plain text.
    """
    spec = json.loads(bpe.to_str())
    vocab = spec["model"]["vocab"]
    fillers = ("".join(letters) for letters in itertools.product(FILLER_LETTERS, repeat=FILLER_LENGTH))
    for filler in fillers:
        if len(vocab) >= size:
            break
        vocab.setdefault(filler, len(vocab))
    return Tokenizer.from_str(json.dumps(spec))


def _restore_minimind2_file_layout(tokenizer_dir: Path, bpe: Tokenizer) -> None:
    """Undo what transformers 5 changes on save, so the files read like MiniMind2's in any transformers version.

    transformers 5 writes a pass-through TemplateProcessing post-processor into tokenizer.json, names the class
    "TokenizersBackend" (unknown to transformers 4) and leaves out add_bos_token / add_eos_token. Encoding is the
    same either way: on load transformers 5 installs the same pass-through post-processor for MiniMind2's own
    tokenizer too.
    """
    bpe.save(str(tokenizer_dir / "tokenizer.json"))  # identical to the saved file except post_processor: null
    config_path = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=False, add_eos_token=False)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False, sort_keys=True) + "\n",
                           encoding="utf-8")


_ENGLISH_SUBJECTS = ("the cat", "a small dog", "my friend", "the teacher", "a young girl", "the old man",
                     "our team", "the bird", "this robot", "the children", "a tall boy", "the farmer")
_ENGLISH_VERBS = ("sees", "likes", "draws", "finds", "paints", "holds", "wants", "looks at", "points to",
                  "picks up", "shows me", "talks about")
_ENGLISH_OBJECTS = ("a red ball", "the blue box", "a green leaf", "the yellow sun", "a round plate",
                    "the big picture", "a square card", "the bright star", "a dark cloud", "the white wall",
                    "a purple flower", "the small triangle", "a light lamp", "the old book")
_ENGLISH_ENDINGS = ("today", "in the garden", "on the table", "after lunch", "every morning",
                    "near the window", "with a smile", "again", "at school", "in the picture")
_ENGLISH_QUESTIONS = ("What can you see?", "Where is it?", "Can you help me?", "What is this?",
                      "Is it big or small?", "How many are there?", "Which one do you like?")
_ENGLISH_REPLIES = ("Yes, I can.", "No, it is not.", "I think so.", "It is on the left.", "It is on the right.",
                    "There is one.", "There are two.", "Thank you.", "Of course.")


def simple_english_lines(n_lines: int, seed: int) -> list[str]:
    """Short generated sentences, so that common English words get merges of their own."""
    rng = random.Random(f"english:{seed}")
    lines = []
    for _ in range(n_lines):
        form = rng.random()
        if form < 0.7:
            sentence = (f"{rng.choice(_ENGLISH_SUBJECTS)} {rng.choice(_ENGLISH_VERBS)} "
                        f"{rng.choice(_ENGLISH_OBJECTS)} {rng.choice(_ENGLISH_ENDINGS)}.")
            lines.append(sentence[0].upper() + sentence[1:])
        else:
            lines.append(f"{rng.choice(_ENGLISH_QUESTIONS)} {rng.choice(_ENGLISH_REPLIES)}")
    return lines


# ----------------------------------------------------------------------------------------------------------
# 1b. Tiny transformers causal LMs (Qwen2, Llama) with their tokenizer and chat template in one folder: the
#     stand-ins for `--language_model PATH` (model/model_hf_vlm.py)
# ----------------------------------------------------------------------------------------------------------

# Qwen2's and Llama 3's pre-tokenizer regex: newlines stay apart from the words after them.
LM_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                    r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2.5's ChatML, default system prompt included.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}")
# Llama 3's layout: headers, a blank line, trimmed content, <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + "
    "'<|eot_id|>' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}")


@dataclass(frozen=True)
class TinyLMFamily:
    config_class: str  # a transformers config class name
    special_tokens: tuple  # ids 0.. in this order
    bos_token: str
    eos_token: str  # the end of an assistant turn
    pad_token: str
    chat_template: str
    tie_word_embeddings: bool


TINY_LM_FAMILIES = {
    "qwen2": TinyLMFamily("Qwen2Config", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), "<|im_start|>",
                          "<|im_end|>", "<|endoftext|>", CHATML_TEMPLATE, True),
    "llama": TinyLMFamily("LlamaConfig", ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                          "<|end_header_id|>", "<|eot_id|>"), "<|begin_of_text|>", "<|eot_id|>",
                          "<|end_of_text|>", LLAMA3_TEMPLATE, False),
}


def build_tiny_causal_lm(out_dir, family: str, corpus_texts, hidden_size: int = 64, num_layers: int = 2,
                         seed: int = 0, num_heads: int = 4, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """A randomly initialised transformers causal LM of `family` (TINY_LM_FAMILIES) saved with its tokenizer
    (that family's special tokens, pre-tokenizer and chat template) in one folder, as a hub checkout has them:
    AutoModelForCausalLM / AutoTokenizer.from_pretrained(out_dir)."""
    import transformers

    chosen = TINY_LM_FAMILIES[family]
    out_dir = Path(out_dir)
    build_tokenizer(out_dir, corpus_texts, vocab_size + len(chosen.special_tokens) - len(SPECIAL_TOKENS),
                    special_tokens=chosen.special_tokens, chat_template=chosen.chat_template,
                    bos_token=chosen.bos_token, eos_token=chosen.eos_token, pad_token=chosen.pad_token,
                    split_pattern=LM_SPLIT_PATTERN)
    token_ids = {token: index for index, token in enumerate(chosen.special_tokens)}
    config = getattr(transformers, chosen.config_class)(
        vocab_size=MODEL_VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=CLIP_MLP_RATIO * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads // 2,
        max_position_embeddings=MODEL_MAX_LENGTH, tie_word_embeddings=chosen.tie_word_embeddings,
        bos_token_id=token_ids[chosen.bos_token], eos_token_id=token_ids[chosen.eos_token],
        pad_token_id=token_ids[chosen.pad_token])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------------------
# 2. Tiny CLIP: the openai/clip-vit-base-patch16 folder layout and geometry, with small random weights
# ----------------------------------------------------------------------------------------------------------

CLIP_MLP_RATIO = 4  # intermediate / hidden of ViT-B/16 (3072 / 768)
CLIP_TEXT_MAX_POSITIONS = 77
CLIP_START_TOKEN = "<|startoftext|>"
CLIP_END_TOKEN = "<|endoftext|>"


def clip_num_patches(image_size: int = CLIP_IMAGE_SIZE, patch_size: int = CLIP_PATCH_SIZE) -> int:
    return (image_size // patch_size) ** 2


def make_clip_text_tokenizer() -> CLIPTokenizer:
    """Character-level CLIP tokenizer (CLIP's vocab layout without its merges).

    Only there so the folder loads with CLIPProcessor.from_pretrained like a real CLIP checkout; the VLM
    never feeds text to CLIP. Written as vocab.json + merges.txt and read back: the one constructor that
    transformers 4.x (files) and 5.x (files or dicts) share.
    """
    byte_alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: index for index, char in enumerate(byte_alphabet)}
    # CLIP's BPE marks the last piece of a word with '</w>'.
    vocab.update({char + "</w>": len(byte_alphabet) + index for index, char in enumerate(byte_alphabet)})
    vocab[CLIP_START_TOKEN] = len(vocab)
    vocab[CLIP_END_TOKEN] = len(vocab)
    with tempfile.TemporaryDirectory() as work_dir:
        (Path(work_dir) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (Path(work_dir) / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(work_dir, model_max_length=CLIP_TEXT_MAX_POSITIONS)


def make_clip_image_processor():
    """The openai CLIP preprocessing, on the PIL backend (no torchvision needed)."""
    return pil_clip_image_processor_class()(
        do_convert_rgb=True,
        do_resize=True, size={"shortest_edge": CLIP_IMAGE_SIZE}, resample=Image.Resampling.BICUBIC,
        do_center_crop=True, crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE},
        do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=CLIP_MEAN.tolist(), image_std=CLIP_STD.tolist(),
    )


def build_tiny_clip(out_dir, hidden_size: int = 64, num_layers: int = 2, seed: int = 0,
                    num_heads: int = 4) -> Path:
    """Save a randomly initialised CLIPModel (vision and text towers) plus its processor into `out_dir`.

    Vision geometry is ViT-B/16's (224 px, 16 px patches -> last_hidden_state [N, 197, hidden_size]); only the
    widths and depths are small. Load it with CLIPVisionModel / CLIPModel / AutoImageProcessor /
    CLIPProcessor.from_pretrained(out_dir).
    """
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    out_dir = Path(out_dir)
    text_tokenizer = make_clip_text_tokenizer()
    tower_shape = dict(hidden_size=hidden_size, intermediate_size=CLIP_MLP_RATIO * hidden_size,
                       num_hidden_layers=num_layers, num_attention_heads=num_heads)
    config = CLIPConfig(
        vision_config=dict(image_size=CLIP_IMAGE_SIZE, patch_size=CLIP_PATCH_SIZE, **tower_shape),
        text_config=dict(vocab_size=len(text_tokenizer), max_position_embeddings=CLIP_TEXT_MAX_POSITIONS,
                         bos_token_id=text_tokenizer.bos_token_id, eos_token_id=text_tokenizer.eos_token_id,
                         pad_token_id=text_tokenizer.pad_token_id, **tower_shape),
        projection_dim=hidden_size,
    )
    # fork_rng: seed the weight init without changing the caller's global torch RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(out_dir)
    image_processor = make_clip_image_processor()
    # preprocessor_config.json is what openai's folder has and what older transformers look for;
    # the processor adds processor_config.json and the text tokenizer files.
    image_processor.save_pretrained(out_dir)
    CLIPProcessor(image_processor=image_processor, tokenizer=text_tokenizer).save_pretrained(out_dir)
    return out_dir


def build_tiny_siglip(out_dir, hidden_size: int = 64, num_layers: int = 2, seed: int = 0, num_heads: int = 4,
                      dtype: torch.dtype = torch.float16) -> Path:
    """Save a randomly initialised SiglipVisionModel plus its image processor into `out_dir`, the stand-in for
    siglip2-base-p32-256-ve: its geometry (256 px, 32 px patches -> last_hidden_state [N, 64, hidden_size]), its
    preprocessing (exactly 256x256, bilinear, (x - 0.5) / 0.5) and its fp16 weights; only widths and depths are
    small. Load it with SiglipVisionModel / AutoImageProcessor.from_pretrained(out_dir), as upstream does."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    out_dir = Path(out_dir)
    config = SiglipVisionConfig(image_size=SIGLIP_IMAGE_SIZE, patch_size=SIGLIP_PATCH_SIZE, hidden_size=hidden_size,
                                intermediate_size=CLIP_MLP_RATIO * hidden_size, num_hidden_layers=num_layers,
                                num_attention_heads=num_heads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SiglipVisionModel(config)
    model.to(dtype).save_pretrained(out_dir)
    pil_image_processor_class("SiglipImageProcessor")(
        do_resize=True, size={"height": SIGLIP_IMAGE_SIZE, "width": SIGLIP_IMAGE_SIZE},
        resample=Image.Resampling.BILINEAR, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(out_dir)
    return out_dir


# BLIP-2 stand-in: a tiny Q-Former (its real one is 768 wide, 12 deep, 32 queries) and tiny vision and OPT towers.
TINY_BLIP2_QFORMER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
TINY_BLIP2_NUM_QUERY_TOKENS = 8
TINY_BLIP2_TEXT = dict(model_type="opt", vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64)


def build_tiny_blip2(out_dir, vision_hidden_size: int = 64, seed: int = 0, num_heads: int = 4) -> Path:
    """Save a randomly initialised Blip2ForConditionalGeneration (the layout of Salesforce/blip2-* folders) into
    `out_dir`. Its Q-Former cross-attends to `vision_hidden_size`-wide features (Blip2Config sets that from the
    vision tower), so with the tiny CLIP's width it stands in for a Q-Former trained on this project's encoder."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    if vision_hidden_size % num_heads:
        raise ValueError(f"vision_hidden_size {vision_hidden_size} is not divisible by num_heads {num_heads}")
    config = Blip2Config(
        vision_config=dict(hidden_size=vision_hidden_size, intermediate_size=CLIP_MLP_RATIO * vision_hidden_size,
                           num_hidden_layers=1, num_attention_heads=num_heads, image_size=CLIP_IMAGE_SIZE,
                           patch_size=CLIP_PATCH_SIZE),
        qformer_config=TINY_BLIP2_QFORMER, text_config=TINY_BLIP2_TEXT, num_query_tokens=TINY_BLIP2_NUM_QUERY_TOKENS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Blip2ForConditionalGeneration(config)
        # transformers zeroes the queries (its checkpoints always hold trained ones): random ones show a real copy
        torch.nn.init.normal_(model.query_tokens, std=config.qformer_config.initializer_range)
    model.save_pretrained(out_dir)
    return Path(out_dir)


# ----------------------------------------------------------------------------------------------------------
# 3. Shapes dataset in upstream's file formats
# ----------------------------------------------------------------------------------------------------------

DATA_IMAGE_SIZE = 128  # upstream stores its images at 128 x 128; the CLIP processor upscales them
SUPERSAMPLE = 4  # draw at 4x and downscale, for smooth edges
JPEG_QUALITY = 90
SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {  # name -> base RGB; each image jitters it a little
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 30),
    "purple": (135, 55, 185),
}
BACKGROUNDS = {"light": (185, 245), "dark": (15, 70)}  # tone -> range of the grey level
COLOUR_JITTER = 20
BACKGROUND_TINT = 10
SHAPE_RADIUS_RANGE = (0.16, 0.36)  # circumradius as a fraction of the image side

ATTRIBUTE_CHOICES = {"shape": SHAPES, "colour": tuple(COLOURS), "background": tuple(BACKGROUNDS)}

CAPTION_REQUESTS = ("Describe the picture briefly.", "Give a short caption for this image.",
                    "What does the image show?", "Briefly describe what you see.")
QUESTIONS = {
    "shape": ("What shape is in the picture?", "Which shape can you see?", "What is the shape in the image?"),
    "colour": ("What colour is the shape?", "Which colour is the shape in the picture?",
               "What is the colour of the shape?"),
    "background": ("Is the background light or dark?", "Is the background of the picture light or dark?"),
}
FOLLOW_UP_QUESTIONS = {"shape": "And what shape is it?", "colour": "And what colour is it?",
                       "background": "Is the background light or dark?"}
COMPARE_QUESTIONS = {
    "shape": ("Do the two pictures show the same shape?", "Is the shape the same in both pictures?"),
    "colour": ("Do the two pictures show the same colour?", "Are the two shapes the same colour?"),
}
MULTI_TURN_FRACTION = 0.3  # share of single-image SFT records with a second question about the same image
# POPE-style yes/no questions ("Is there a red shape in the image?"), asked with lmms-eval's POPE suffix.
POPE_QUESTIONS = {"colour": ("Is there a {} shape in the image?", "Is there a {} shape in the picture?"),
                  "shape": ("Is there a {} in the image?", "Is there a {} in the picture?")}
POPE_ANSWERS = {True: "Yes", False: "No"}
# A yes/no answer needs the asked word and the image at once: the answer's first token is right only when the
# model compares them. Trained on yes/no records alone, a small LM learnt from scratch sits at chance (both the
# asked colour and the picture's colour are, on their own, unrelated to the answer, so gradients carry no signal
# until both are read). Two kinds of records, as in LLaVA-1.5's SFT mix, give each half its own signal first:
# single-word answers read from the picture, and text-only questions answered from their own words.
POPE_SFT_FRACTION = 1.0  # yes/no SFT records added, per single-image SFT record
SHORT_ANSWER_SFT_FRACTION = 0.5  # "What colour is the shape?" + the short-answer suffix -> "Red"
TEXT_ONLY_SFT_FRACTION = 0.5  # "What colour is the red ball?" + the short-answer suffix -> "Red", no image
# "The shape is red." + a POPE question about a colour -> "Yes"/"No", no image: the comparison of the asked word
# with a stated fact, learnt on words alone. Without these records the yes/no answers about pictures stay at chance
# for the first 55-75% of the demo's SFT steps; with them they leave chance earlier and end higher (docs/demo.md).
TEXT_YES_NO_SFT_FRACTION = 0.5
# What a text-only question names besides its answer: an object for a colour, a colour for a shape.
TEXT_ONLY_FILLERS = {"colour": ("ball", "box", "card", "cup", "kite", "hat"), "shape": tuple(COLOURS)}
PLACEHOLDER_SIDE = 8  # the unified parquet release gives text-only rows an 8x8 black placeholder image
POPE_EVAL_QUESTIONS_PER_KIND = 2  # held-out: per image and kind, one question answered yes and one no

PRETRAIN_JSONL = "pretrain_vlm_data.jsonl"
PRETRAIN_IMAGES = "pretrain_images"
SFT_JSONL = "sft_vlm_data.jsonl"
SFT_IMAGES = "sft_images"
SFT_MULTI_JSONL = "sft_vlm_data_multi.jsonl"
SFT_MULTI_IMAGES = "sft_multi_images"
PRETRAIN_PARQUET = "pretrain_i2t.parquet"
SFT_PARQUET = "sft_i2t.parquet"
SFT_MULTI_PARQUET = "sft_multi_i2t.parquet"  # image_bytes is list<binary> here, so it cannot share sft_i2t's
SFT_LLAVA_JSON = "sft_vlm_data_llava.json"  # the SFT records as LLaVA publishes data: one JSON array
EVAL_JSONL = "eval_questions.jsonl"
EVAL_IMAGES = "eval_images"
EVAL_POPE_PARQUET = "eval_pope.parquet"


@dataclass(frozen=True)
class Scene:
    """One picture: what it shows (shape, colour, background) and how it is drawn."""
    shape: str
    colour: str
    background: str
    fill_rgb: tuple
    background_rgb: tuple
    center: tuple  # (x, y) as fractions of the image side
    radius: float  # fraction of the image side
    rotation_deg: float

    def attribute(self, kind: str) -> str:
        return getattr(self, kind)


def _jitter_rgb(rgb, amount: int, rng: random.Random) -> tuple:
    return tuple(min(255, max(0, channel + rng.randint(-amount, amount))) for channel in rgb)


def random_scene(rng: random.Random, shape=None, colour=None) -> Scene:
    """Draw scene parameters; `shape` / `colour` pin those attributes (used for same/different pairs)."""
    shape = shape or rng.choice(SHAPES)
    colour = colour or rng.choice(tuple(COLOURS))
    background = rng.choice(tuple(BACKGROUNDS))
    grey = rng.randint(*BACKGROUNDS[background])
    radius = rng.uniform(*SHAPE_RADIUS_RANGE)
    if shape == "square":
        rotation = rng.uniform(-15, 15)  # more would make it read as a diamond
    elif shape == "circle":
        rotation = 0.0
    else:
        rotation = rng.uniform(0, 360)
    return Scene(
        shape=shape, colour=colour, background=background,
        fill_rgb=_jitter_rgb(COLOURS[colour], COLOUR_JITTER, rng),
        background_rgb=_jitter_rgb((grey, grey, grey), BACKGROUND_TINT, rng),
        center=(rng.uniform(radius, 1 - radius), rng.uniform(radius, 1 - radius)),
        radius=radius, rotation_deg=rotation,
    )


def _polygon(center, radii, rotation_deg: float) -> list:
    """Vertices evenly spaced in angle, starting straight up; `radii` cycles (one value = regular polygon)."""
    num_vertices = len(radii)
    vertices = []
    for index, radius in enumerate(radii):
        angle = math.radians(rotation_deg + 90 + 360 * index / num_vertices)
        vertices.append((center[0] + radius * math.cos(angle), center[1] - radius * math.sin(angle)))
    return vertices


def draw_scene(scene: Scene, image_size: int = DATA_IMAGE_SIZE) -> Image.Image:
    canvas_size = image_size * SUPERSAMPLE
    image = Image.new("RGB", (canvas_size, canvas_size), scene.background_rgb)
    draw = ImageDraw.Draw(image)
    center = (scene.center[0] * canvas_size, scene.center[1] * canvas_size)
    radius = scene.radius * canvas_size
    if scene.shape == "circle":
        draw.ellipse([center[0] - radius, center[1] - radius, center[0] + radius, center[1] + radius],
                     fill=scene.fill_rgb)
    elif scene.shape == "square":
        # rotation + 45 puts the corners on the diagonals, so rotation 0 is an upright square
        draw.polygon(_polygon(center, [radius] * 4, scene.rotation_deg + 45), fill=scene.fill_rgb)
    elif scene.shape == "triangle":
        draw.polygon(_polygon(center, [radius] * 3, scene.rotation_deg), fill=scene.fill_rgb)
    elif scene.shape == "star":
        star_inner_ratio = 0.45
        draw.polygon(_polygon(center, [radius, radius * star_inner_ratio] * 5, scene.rotation_deg),
                     fill=scene.fill_rgb)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return image.resize((image_size, image_size), Image.Resampling.LANCZOS)


def save_scene(scene: Scene, path: Path) -> None:
    draw_scene(scene).save(path, format="JPEG", quality=JPEG_QUALITY)


def caption_answer(scene: Scene) -> str:
    return f"A {scene.colour} {scene.shape} on a {scene.background} background."


def single_answer(kind: str, value: str) -> str:
    templates = {"shape": "It is a {}.", "colour": "The shape is {}.", "background": "The background is {}."}
    return templates[kind].format(value)


def compare_answer(kind: str, first: str, second: str) -> str:
    if kind == "shape":
        if first == second:
            return f"Yes, both pictures show a {first}."
        return f"No, the first picture shows a {first} and the second shows a {second}."
    if first == second:
        return f"Yes, both shapes are {first}."
    return f"No, the first shape is {first} and the second is {second}."


def _with_image_marker(question: str, rng: random.Random) -> str:
    """Upstream puts `<image>` after the question; put it before half of the time so both orders are seen."""
    return f"{IMAGE_MARKER}\n{question}" if rng.random() < 0.5 else f"{question}\n{IMAGE_MARKER}"


def _two_image_prompt(question: str, rng: random.Random) -> str:
    if rng.random() < 0.5:
        return f"{IMAGE_MARKER}\n{IMAGE_MARKER}\n{question}"
    return f"First picture: {IMAGE_MARKER}\nSecond picture: {IMAGE_MARKER}\n{question}"


def _turns(*contents: str) -> list:
    """Alternating user/assistant turns, starting with the user."""
    return [{"role": "user" if index % 2 == 0 else "assistant", "content": content}
            for index, content in enumerate(contents)]


def shape_dataset_texts() -> list[str]:
    """Every question and answer text the dataset can contain, without image markers (tokenizer corpus)."""
    texts = list(CAPTION_REQUESTS) + ["First picture:", "Second picture:"]
    for kind, questions in QUESTIONS.items():
        texts += list(questions) + [FOLLOW_UP_QUESTIONS[kind]]
        texts += [single_answer(kind, value) for value in ATTRIBUTE_CHOICES[kind]]
    for kind, questions in COMPARE_QUESTIONS.items():
        texts += list(questions)
        texts += [compare_answer(kind, first, second)
                  for first in ATTRIBUTE_CHOICES[kind] for second in ATTRIBUTE_CHOICES[kind]]
    texts += [f"A {colour} {shape} on a {background} background."
              for shape in SHAPES for colour in COLOURS for background in BACKGROUNDS]
    texts += [pope_question(kind, value, phrasing)
              for kind, phrasings in POPE_QUESTIONS.items() for value in ATTRIBUTE_CHOICES[kind]
              for phrasing in range(len(phrasings))]
    texts += list(POPE_ANSWERS.values())
    texts += [short_answer(value) for values in ATTRIBUTE_CHOICES.values() for value in values]
    texts += [text_only_question(kind, value, filler) for kind, fillers in TEXT_ONLY_FILLERS.items()
              for value in ATTRIBUTE_CHOICES[kind] for filler in fillers]
    return texts


def tokenizer_corpus(seed: int = 0, n_english_lines: int = 400) -> list[str]:
    """The dataset's texts, the chat role words and generated English: what the tokenizer is trained on."""
    # Role names (each right after a turn-start token, so without a leading space) and the default system
    # line appear in every rendered conversation; weight them like one dataset text each so they get merges.
    dataset_texts = shape_dataset_texts()
    chat_words = [f"system\n{DEFAULT_SYSTEM_PROMPT}\nuser\nassistant\n"] * len(dataset_texts)
    return dataset_texts + chat_words + simple_english_lines(n_english_lines, seed)


def _write_jsonl(path: Path, records: list) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def llava_layout(records: list, image_folder: str) -> list:
    """JSONL-layout records in LLaVA's layout: {"id", "image", "conversations": [{"from", "value"}]}, `image` the
    file's path under the image root (`image_folder/NAME`; a list for several images, no key for none)."""
    from_role = {role: llava_from for llava_from, role in LLAVA_ROLES.items()}
    converted = []
    for index, record in enumerate(records):
        llava = {"id": f"{index:06d}"}
        names = [f"{image_folder}/{name.strip()}" for name in record["image"].split(",") if name.strip()]
        if names:
            llava["image"] = names[0] if len(names) == 1 else names
        llava["conversations"] = [{"from": from_role[turn["role"]], "value": turn["content"]}
                                  for turn in record["conversations"]]
        converted.append(llava)
    return converted


def write_llava_json(path: Path, records: list, image_folder: str) -> None:
    """JSONL-layout records written as a LLaVA file (llava_layout), indented as LLaVA's releases are."""
    Path(path).write_text(json.dumps(llava_layout(records, image_folder), ensure_ascii=False, indent=2),
                          encoding="utf-8")


def _write_parquet(path: Path, records: list, images_dir: Path, multi_image: bool) -> None:
    """Parquet form of JSONL records: conversations as a JSON string, the image files' bytes inline."""
    conversations, image_bytes = [], []
    placeholder = placeholder_jpeg()  # a text-only record's image
    for record in records:
        conversations.append(json.dumps(record["conversations"], ensure_ascii=False))
        names = [name.strip() for name in record["image"].split(",") if name.strip()]
        blobs = [(images_dir / name).read_bytes() for name in names] or [placeholder]
        image_bytes.append(blobs if multi_image else blobs[0])
    bytes_type = pa.list_(pa.binary()) if multi_image else pa.binary()
    table = pa.table({"conversations": pa.array(conversations, pa.string()),
                      "image_bytes": pa.array(image_bytes, bytes_type)})
    pq.write_table(table, path)


def placeholder_jpeg() -> bytes:
    """The small black JPEG the unified parquet release stores in the image column of a text-only row."""
    buffer = io.BytesIO()
    Image.new("RGB", (PLACEHOLDER_SIDE, PLACEHOLDER_SIDE)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _scene_image(index: int, save, rng: random.Random, prefix: str = ""):
    """A random scene, handed to `save(scene, file name)` as `{prefix}{index:06d}.jpg`: (scene, file name)."""
    scene = random_scene(rng)
    name = f"{prefix}{index:06d}.jpg"
    save(scene, name)
    return scene, name


def _pretrain_records(n_records: int, save, rng: random.Random) -> list:
    records = []
    for index in range(n_records):
        scene, name = _scene_image(index, save, rng)
        prompt = f"{rng.choice(CAPTION_REQUESTS)}\n{IMAGE_MARKER}"
        records.append({"conversations": _turns(prompt, caption_answer(scene)), "image": name})
    return records


def _sft_records(n_records: int, save, rng: random.Random) -> list:
    records = []
    kinds = tuple(QUESTIONS)
    for index in range(n_records):
        scene, name = _scene_image(index, save, rng)
        kind = rng.choice(kinds)
        contents = [_with_image_marker(rng.choice(QUESTIONS[kind]), rng),
                    single_answer(kind, scene.attribute(kind))]
        if rng.random() < MULTI_TURN_FRACTION:
            second_kind = rng.choice([other for other in kinds if other != kind])
            contents += [FOLLOW_UP_QUESTIONS[second_kind], single_answer(second_kind, scene.attribute(second_kind))]
        records.append({"conversations": _turns(*contents), "image": name})
    return records


def pope_question(kind: str, value: str, phrasing: int = 0) -> str:
    """A POPE-style yes/no question with lmms-eval's POPE instruction after it."""
    return POPE_QUESTIONS[kind][phrasing].format(value) + SHORT_ANSWER_SUFFIX


def _pope_sft_records(n_records: int, save, rng: random.Random) -> list:
    """Yes/no questions about a colour or shape, half of them about the one in the picture (answer "Yes")."""
    records = []
    kinds = tuple(POPE_QUESTIONS)
    for index in range(n_records):
        scene, name = _scene_image(index, save, rng, prefix="pope_")
        kind = rng.choice(kinds)
        present = rng.random() < 0.5
        value = scene.attribute(kind) if present else rng.choice(
            [other for other in ATTRIBUTE_CHOICES[kind] if other != scene.attribute(kind)])
        question = pope_question(kind, value, rng.randrange(len(POPE_QUESTIONS[kind])))
        records.append({"conversations": _turns(_with_image_marker(question, rng), POPE_ANSWERS[present]),
                        "image": name})
    return records


def short_answer(value: str) -> str:
    """A single-word answer, capitalised like the yes/no answers ("Red", "Circle", "Light")."""
    return value.capitalize()


def _short_answer_records(n_records: int, save, rng: random.Random) -> list:
    """Questions about the picture asked with the short-answer suffix, answered in one word."""
    records = []
    kinds = tuple(QUESTIONS)
    for index in range(n_records):
        scene, name = _scene_image(index, save, rng, prefix="short_")
        kind = rng.choice(kinds)
        question = rng.choice(QUESTIONS[kind]) + SHORT_ANSWER_SUFFIX
        records.append({"conversations": _turns(_with_image_marker(question, rng),
                                                short_answer(scene.attribute(kind))), "image": name})
    return records


def text_only_question(kind: str, value: str, filler: str) -> str:
    """A question whose answer, `value`, is in its own words (no picture needed); `filler` from TEXT_ONLY_FILLERS."""
    if kind == "colour":
        return f"What colour is the {value} {filler}?"
    return f"What shape is the {filler} {value}?"


def _text_only_records(n_records: int, rng: random.Random) -> list:
    """Text-only rows (no image): the model learns to read the colour or shape a question names."""
    records = []
    kinds = tuple(POPE_QUESTIONS)
    for _ in range(n_records):
        kind = rng.choice(kinds)
        value = rng.choice(ATTRIBUTE_CHOICES[kind])
        question = text_only_question(kind, value, rng.choice(TEXT_ONLY_FILLERS[kind])) + SHORT_ANSWER_SUFFIX
        records.append({"conversations": _turns(question, short_answer(value)), "image": ""})
    return records


def _text_yes_no_records(n_records: int, rng: random.Random) -> list:
    """Text-only rows: a stated colour or shape ("The shape is red.") and a POPE question about it, half of them
    about the stated one (answer "Yes")."""
    records = []
    kinds = tuple(POPE_QUESTIONS)
    for _ in range(n_records):
        kind = rng.choice(kinds)
        truth = rng.choice(ATTRIBUTE_CHOICES[kind])
        present = rng.random() < 0.5
        asked = truth if present else rng.choice([v for v in ATTRIBUTE_CHOICES[kind] if v != truth])
        question = pope_question(kind, asked, rng.randrange(len(POPE_QUESTIONS[kind])))
        records.append({"conversations": _turns(f"{single_answer(kind, truth)}\n{question}", POPE_ANSWERS[present]),
                        "image": ""})
    return records


def _sft_extra_records(n_records: int, save, seed: int) -> list:
    """The yes/no, single-word and text-only SFT records, each kind from a seeded stream of its own (so the
    other splits stay unchanged), in proportion to the `n_records` single-image SFT records."""
    return (_pope_sft_records(round(n_records * POPE_SFT_FRACTION), save, random.Random(f"sft_pope:{seed}"))
            + _short_answer_records(round(n_records * SHORT_ANSWER_SFT_FRACTION), save,
                                    random.Random(f"sft_short:{seed}"))
            + _text_only_records(round(n_records * TEXT_ONLY_SFT_FRACTION), random.Random(f"sft_text:{seed}"))
            + _text_yes_no_records(round(n_records * TEXT_YES_NO_SFT_FRACTION),
                                   random.Random(f"sft_text_yes_no:{seed}")))


def _language_records(n_records: int, rng: random.Random) -> list:
    """Text-only records of the dataset's question forms, each picture replaced by its description ("A red circle
    on a dark background."): what a pretrained LLM already knows about such scenes put into words, for giving a
    random stand-in LM its language before a recipe that freezes or LoRA-adapts it (scripts.demo --recipe)."""
    records = []
    kinds = tuple(QUESTIONS)
    for _ in range(n_records):
        scene = random_scene(rng)
        kind = rng.choice(kinds)
        pope_kind = rng.choice(tuple(POPE_QUESTIONS))
        present = rng.random() < 0.5
        asked = scene.attribute(pope_kind) if present else rng.choice(
            [other for other in ATTRIBUTE_CHOICES[pope_kind] if other != scene.attribute(pope_kind)])
        question, answer = rng.choice((
            (rng.choice(CAPTION_REQUESTS), caption_answer(scene)),
            (rng.choice(QUESTIONS[kind]), single_answer(kind, scene.attribute(kind))),
            (rng.choice(QUESTIONS[kind]) + SHORT_ANSWER_SUFFIX, short_answer(scene.attribute(kind))),
            (pope_question(pope_kind, asked, rng.randrange(len(POPE_QUESTIONS[pope_kind]))), POPE_ANSWERS[present]),
        ))
        records.append({"conversations": _turns(f"{caption_answer(scene)}\n{question}", answer), "image": ""})
    return records


def write_language_jsonl(path, n_records: int, seed: int = 0) -> Path:
    """`n_records` _language_records as a JSONL file (no images: any --images_path reads it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_jsonl(path, _language_records(n_records, random.Random(f"language:{seed}")))
    return path


def pope_rows(scene: Scene, rng: random.Random, all_questions: bool) -> list:
    """(question, "yes"/"no", kind) about one picture: every colour and shape in every phrasing (18), or per
    kind POPE_EVAL_QUESTIONS_PER_KIND questions, balanced between yes and no."""
    rows = []
    for kind, phrasings in POPE_QUESTIONS.items():
        truth = scene.attribute(kind)
        if all_questions:
            asked = [(value, phrasing) for value in ATTRIBUTE_CHOICES[kind] for phrasing in range(len(phrasings))]
        else:
            absent = rng.sample([v for v in ATTRIBUTE_CHOICES[kind] if v != truth], POPE_EVAL_QUESTIONS_PER_KIND - 1)
            asked = [(value, rng.randrange(len(phrasings))) for value in [truth, *absent]]
        rows += [(POPE_QUESTIONS[kind][phrasing].format(value), "yes" if value == truth else "no", kind)
                 for value, phrasing in asked]
    return rows


def write_pope_parquet(path, n_images: int, seed: int = 0, all_questions: bool = False) -> Path:
    """Held-out yes/no questions about fresh pictures in the lmms-lab/POPE schema (id, question_id, question,
    answer, image_source, image struct<bytes, path>, category = the question's kind), with the `datasets` features
    of the Hub's files (all strings, `image` an Image).

    all_questions: 18 questions per picture (every colour and shape, two phrasings; POPE's 9,000 questions
    about 500 images is n_images=500), else 4 (balanced yes/no).
    """
    rng = random.Random(f"eval_pope:{seed}")
    columns = {name: [] for name in ("id", "question_id", "question", "answer", "image_source", "image", "category")}
    for image_index in range(n_images):
        scene = random_scene(rng)
        buffer = io.BytesIO()
        draw_scene(scene).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        source = f"pope_{image_index:06d}"
        for question, answer, kind in pope_rows(scene, rng, all_questions):
            number = str(len(columns["id"]))  # the dataset card types both ids as strings
            for name, value in (("id", number), ("question_id", number), ("question", question),
                                ("answer", answer), ("image_source", source),
                                ("image", {"bytes": buffer.getvalue(), "path": f"{source}.jpg"}),
                                ("category", kind)):
                columns[name].append(value)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({name: pa.array(values, image_type if name == "image" else pa.string())
                      for name, values in columns.items()})
    # The `datasets` feature record that files pushed to the Hub with `datasets` carry (its Features.arrow_schema):
    # with it `datasets`, and so lmms-eval's POPE task, decodes the image column into PIL images.
    features = {name: {"_type": "Image"} if name == "image" else {"dtype": "string", "_type": "Value"}
                for name in columns}
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def _sft_multi_records(n_records: int, save, rng: random.Random) -> list:
    records = []
    kinds = tuple(COMPARE_QUESTIONS)
    for index in range(n_records):
        kind = rng.choice(kinds)
        first = random_scene(rng)
        # Half "same" pairs; otherwise a random draw, which is mostly "different".
        pinned = {kind: first.attribute(kind)} if rng.random() < 0.5 else {}
        second = random_scene(rng, **pinned)
        names = [f"{index:06d}_a.jpg", f"{index:06d}_b.jpg"]
        for scene, name in zip((first, second), names):
            save(scene, name)
        prompt = _two_image_prompt(rng.choice(COMPARE_QUESTIONS[kind]), rng)
        answer = compare_answer(kind, first.attribute(kind), second.attribute(kind))
        records.append({"conversations": _turns(prompt, answer), "image": ", ".join(names)})
    return records


def _eval_records(n_records: int, save, rng: random.Random) -> list:
    records = []
    kinds = tuple(QUESTIONS)
    for index in range(n_records):
        scene, name = _scene_image(index, save, rng)
        kind = kinds[index % len(kinds)]  # cycle, so every kind is scored even on a small set
        records.append({"image": name, "question": QUESTIONS[kind][0], "answer": scene.attribute(kind),
                        "choices": list(ATTRIBUTE_CHOICES[kind]), "kind": kind})
    return records


def build_shapes_dataset(out_dir, n_pretrain: int, n_sft: int, n_eval: int, seed: int = 0,
                         n_sft_multi=None) -> dict:
    """Write the synthetic shapes dataset (JSONL + image folders, parquet, LLaVA JSON, eval set) under `out_dir`.

    `n_sft_multi` two-image SFT records (default: a quarter of n_sft, at least 1). Each split draws from its
    own seeded stream, so changing one split's size leaves the others unchanged. Returns name -> path.
    """
    out_dir = Path(out_dir)
    if n_sft_multi is None:
        n_sft_multi = max(1, n_sft // 4)
    paths = {
        "data_dir": out_dir,
        "pretrain_jsonl": out_dir / PRETRAIN_JSONL, "pretrain_images": out_dir / PRETRAIN_IMAGES,
        "sft_jsonl": out_dir / SFT_JSONL, "sft_images": out_dir / SFT_IMAGES,
        "sft_multi_jsonl": out_dir / SFT_MULTI_JSONL, "sft_multi_images": out_dir / SFT_MULTI_IMAGES,
        "pretrain_parquet": out_dir / PRETRAIN_PARQUET, "sft_parquet": out_dir / SFT_PARQUET,
        "sft_multi_parquet": out_dir / SFT_MULTI_PARQUET, "sft_llava": out_dir / SFT_LLAVA_JSON,
        "eval_jsonl": out_dir / EVAL_JSONL, "eval_images": out_dir / EVAL_IMAGES,
        "eval_pope_parquet": out_dir / EVAL_POPE_PARQUET,
    }
    for key, path in paths.items():
        if key.endswith("_images"):
            path.mkdir(parents=True, exist_ok=True)

    splits = (  # jsonl key, images key, parquet key (None: no parquet form), record maker, size, multi-image
        ("pretrain_jsonl", "pretrain_images", "pretrain_parquet", _pretrain_records, n_pretrain, False),
        ("sft_jsonl", "sft_images", "sft_parquet", _sft_records, n_sft, False),
        ("sft_multi_jsonl", "sft_multi_images", "sft_multi_parquet", _sft_multi_records, n_sft_multi, True),
        ("eval_jsonl", "eval_images", None, _eval_records, n_eval, False),
    )
    # Pictures are drawn and saved on a thread pool: Pillow's resize and JPEG encoder release the GIL, so the
    # thousands of a demo's dataset take about 1/cores the time, with the same bytes (the scenes come from the
    # seeded streams in order, only the drawing runs in parallel).
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        for jsonl_key, images_key, parquet_key, make_records, n_records, multi_image in splits:
            rng = random.Random(f"{jsonl_key}:{seed}")
            saves = []

            def save(scene, name, images_dir=paths[images_key], saves=saves):
                saves.append(pool.submit(save_scene, scene, images_dir / name))

            records = make_records(n_records, save, rng)
            if jsonl_key == "sft_jsonl":
                records += _sft_extra_records(n_records, save, seed)
            for saved in saves:
                saved.result()  # every file is written (or its error raised) before the parquet form reads them
            _write_jsonl(paths[jsonl_key], records)
            if parquet_key is not None:
                _write_parquet(paths[parquet_key], records, paths[images_key], multi_image)
            if jsonl_key == "sft_jsonl":  # LLaVA's layout: image paths under the data folder (--images_path data/)
                write_llava_json(paths["sft_llava"], records, SFT_IMAGES)
    write_pope_parquet(paths["eval_pope_parquet"], n_eval, seed)
    return paths


# ----------------------------------------------------------------------------------------------------------
# 4. Everything at once, and the CLI
# ----------------------------------------------------------------------------------------------------------

def build_all(out_dir, n_pretrain: int = 64, n_sft: int = 64, n_eval: int = 30, seed: int = 0,
              n_sft_multi=None, vocab_size: int = DEFAULT_VOCAB_SIZE, clip_hidden_size: int = 64,
              clip_num_layers: int = 2, parts=DEFAULT_ASSET_PARTS) -> dict:
    """Build the requested `parts` under out_dir/{tokenizer,clip,data,siglip,minimind3_tokenizer,blip2}; returns
    name -> path. The SigLIP stand-in gets the CLIP one's width and depth, the BLIP-2 one's Q-Former reads features
    of the CLIP one's width."""
    out_dir = Path(out_dir)
    unknown = set(parts) - set(ASSET_PARTS)
    if unknown:
        raise ValueError(f"unknown asset parts {sorted(unknown)}; choose from {ASSET_PARTS}")
    paths = {}
    if "tokenizer" in parts:
        paths["tokenizer"] = build_tokenizer(out_dir / "tokenizer", tokenizer_corpus(seed), vocab_size)
    if "clip" in parts:
        paths["clip"] = build_tiny_clip(out_dir / "clip", clip_hidden_size, clip_num_layers, seed)
    if "siglip" in parts:
        paths["siglip"] = build_tiny_siglip(out_dir / "siglip", clip_hidden_size, clip_num_layers, seed)
    if "minimind3_tokenizer" in parts:
        paths["minimind3_tokenizer"] = build_minimind3_tokenizer(out_dir / "minimind3_tokenizer",
                                                                 tokenizer_corpus(seed), vocab_size)
    if "blip2" in parts:
        paths["blip2"] = build_tiny_blip2(out_dir / "blip2", clip_hidden_size, seed)
    for family in TINY_LM_FAMILIES:
        if family in parts:
            paths[family] = build_tiny_causal_lm(out_dir / family, family, tokenizer_corpus(seed), seed=seed,
                                                 vocab_size=vocab_size)
    if "data" in parts:
        paths.update(build_shapes_dataset(out_dir / "data", n_pretrain, n_sft, n_eval, seed, n_sft_multi))
    return paths


def describe_path(path: Path) -> str:
    if path.is_dir():
        files = [child for child in path.rglob("*") if child.is_file()]
        return f"{len(files)} files, {sum(child.stat().st_size for child in files) / 1e6:.2f} MB"
    return f"{path.stat().st_size / 1e6:.3f} MB"
