"""Shared fixtures: offline stand-ins for the hub assets, built once per test session (the repo root is on the
import path through pytest.ini)."""
from pathlib import Path

import pytest

from dev import synthetic

REPO_ROOT = Path(__file__).resolve().parents[1]

# The real MiniMind2 tokenizer lives outside the repo (it must never be copied in); tests that compare
# against it skip when it is absent.
REAL_TOKENIZER_DIR = REPO_ROOT.parent / "shared" / "fixtures" / "minimind2_tokenizer"
REAL_MINIMIND3_TOKENIZER_DIR = REPO_ROOT.parent / "shared" / "fixtures" / "minimind3_tokenizer"

ASSET_SEED = 0
# Small enough to build in about a second, large enough that every question kind and both image-marker
# positions occur.
SHAPES_DATA_SIZES = dict(n_pretrain=8, n_sft=12, n_eval=9, n_sft_multi=4)
TINY_CLIP_HIDDEN_SIZE = 64
TINY_CLIP_NUM_LAYERS = 2


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """MiniMind2-structured byte-level BPE tokenizer (specials 0-2, '@' = 34), loadable with AutoTokenizer."""
    out_dir = tmp_path_factory.mktemp("tiny_tokenizer")
    return synthetic.build_tokenizer(out_dir, synthetic.tokenizer_corpus(ASSET_SEED))


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """Random CLIPModel folder with ViT-B/16 geometry (197 tokens out) and openai's image preprocessing."""
    out_dir = tmp_path_factory.mktemp("tiny_clip")
    return synthetic.build_tiny_clip(out_dir, TINY_CLIP_HIDDEN_SIZE, TINY_CLIP_NUM_LAYERS, ASSET_SEED)


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory) -> Path:
    """Random SiglipVisionModel folder (fp16, as siglip2-base-p32-256-ve) with its geometry (64 tokens out) and
    preprocessing (256x256, bilinear, (x - 0.5) / 0.5): the minimind-3v encoder's stand-in."""
    out_dir = tmp_path_factory.mktemp("tiny_siglip")
    return synthetic.build_tiny_siglip(out_dir, TINY_CLIP_HIDDEN_SIZE, TINY_CLIP_NUM_LAYERS, ASSET_SEED)


@pytest.fixture(scope="session")
def tiny_blip2_dir(tmp_path_factory) -> Path:
    """Random Blip2ForConditionalGeneration folder (tiny Q-Former: 32 wide, 2 layers, 8 queries) whose Q-Former
    reads features of the tiny CLIP's width: what `--qformer_init` takes."""
    out_dir = tmp_path_factory.mktemp("tiny_blip2")
    return synthetic.build_tiny_blip2(out_dir, TINY_CLIP_HIDDEN_SIZE, ASSET_SEED)


@pytest.fixture(scope="session")
def tiny_minimind3_tokenizer_dir(tmp_path_factory) -> Path:
    """MiniMind-3-structured tokenizer (36 specials, `<|image_pad|>` = 12, the MiniMind-3 chat format)."""
    out_dir = tmp_path_factory.mktemp("tiny_minimind3_tokenizer")
    return synthetic.build_minimind3_tokenizer(out_dir, synthetic.tokenizer_corpus(ASSET_SEED))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    """Random Qwen2ForCausalLM (64x2, tied embeddings) with a ChatML tokenizer in one folder: --language_model."""
    out_dir = tmp_path_factory.mktemp("tiny_qwen2")
    return synthetic.build_tiny_causal_lm(out_dir, "qwen2", synthetic.tokenizer_corpus(ASSET_SEED), seed=ASSET_SEED)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """Random LlamaForCausalLM (64x2, untied) with a Llama-3-style tokenizer in one folder: --language_model."""
    out_dir = tmp_path_factory.mktemp("tiny_llama")
    return synthetic.build_tiny_causal_lm(out_dir, "llama", synthetic.tokenizer_corpus(ASSET_SEED), seed=ASSET_SEED)


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> dict:
    """Paths of the synthetic shapes dataset (keys as returned by synthetic.build_shapes_dataset)."""
    out_dir = tmp_path_factory.mktemp("shapes_data")
    return synthetic.build_shapes_dataset(out_dir, seed=ASSET_SEED, **SHAPES_DATA_SIZES)


@pytest.fixture(scope="session")
def real_tokenizer_dir() -> Path:
    if not REAL_TOKENIZER_DIR.is_dir():
        pytest.skip(f"real MiniMind2 tokenizer fixture not found at {REAL_TOKENIZER_DIR}")
    return REAL_TOKENIZER_DIR


@pytest.fixture(scope="session")
def real_minimind3_tokenizer_dir() -> Path:
    if not REAL_MINIMIND3_TOKENIZER_DIR.is_dir():
        pytest.skip(f"real MiniMind-3 tokenizer fixture not found at {REAL_MINIMIND3_TOKENIZER_DIR}")
    return REAL_MINIMIND3_TOKENIZER_DIR


@pytest.fixture(scope="session")
def tiny_vlm_save_dir(tmp_path_factory, tiny_clip_dir) -> Path:
    """A random tiny VLM (64x2) saved as upstream saves weights: {dir}/sft_vlm_64.pth in fp16."""
    import torch

    from model.model_vlm import MiniMindVLM, VLMConfig
    from model.weights import weight_path

    torch.manual_seed(0)
    model = MiniMindVLM(VLMConfig(hidden_size=64, num_hidden_layers=2), vision_model_path=tiny_clip_dir)
    out = tmp_path_factory.mktemp("tiny_vlm_out")
    torch.save({k: v.half() for k, v in model.state_dict().items()}, weight_path(out, "sft_vlm", 64, False))
    return out


@pytest.fixture(scope="session")
def tiny_vlm3_save_dir(tmp_path_factory, tiny_siglip_dir) -> Path:
    """A random tiny minimind-3v (MiniMind-3 LM 64x2, MLP projector on the tiny SigLIP) saved as upstream saves
    weights: {dir}/sft_vlm_64.pth in fp16, no architecture file (it is recognised from its keys)."""
    import torch

    from model.model_vlm import MiniMindVLM
    from model.presets import vlm_config
    from model.weights import weight_path

    torch.manual_seed(0)
    model = MiniMindVLM(vlm_config("minimind-3v", 64, 2), vision_model_path=tiny_siglip_dir)
    out = tmp_path_factory.mktemp("tiny_vlm3_out")
    torch.save({k: v.half() for k, v in model.state_dict().items()}, weight_path(out, "sft_vlm", 64, False))
    return out


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains or launches several processes (tens of seconds or more); "
                                       "`-m 'not slow'` gives a quick run")


def save_random_tiny_vlm(path: Path, clip_dir: Path, seed: int) -> Path:
    """A random tiny VLM (64x2) saved in fp32 (every key, both tied ones), so nothing is rounded on the way."""
    import torch

    from model.model_vlm import MiniMindVLM, VLMConfig

    torch.manual_seed(seed)
    model = MiniMindVLM(VLMConfig(hidden_size=64, num_hidden_layers=2), vision_model_path=clip_dir)
    torch.save(model.state_dict(), path)
    return path


def export_fp32_folder(pth: Path, folder: Path, tokenizer_dir: Path, clip_dir: Path) -> Path:
    """`python -m scripts.convert_vlm --to transformers ... --dtype float32`, in this process."""
    from scripts import convert_vlm

    convert_vlm.main(["--to", "transformers", "--torch_path", str(pth), "--transformers_dir", str(folder),
                      "--tokenizer_path", str(tokenizer_dir), "--vision_model_path", str(clip_dir),
                      "--dtype", "float32"])
    return folder
