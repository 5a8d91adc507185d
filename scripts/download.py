"""Fetch the released MiniMind2-V assets and put them where the project expects them.

Sources: the Hugging Face Hub through huggingface_hub (default; honours HF_ENDPOINT and HF_TOKEN), or
ModelScope over plain HTTPS (`--source modelscope`; MODELSCOPE_ENDPOINT overrides https://www.modelscope.cn).

    python -m scripts.download                                   # clip, tokenizer, llm_512.pth, parquet data
    python -m scripts.download --what clip tokenizer llm         # everything but the dataset
    python -m scripts.download --what llm vlm --hidden_size 768  # llm_768.pth, pretrain_vlm_768.pth, sft_vlm_768.pth
    python -m scripts.download --preset minimind-3v              # SigLIP2, MiniMind-3 tokenizer, llm_768.pth, data
    python -m scripts.download --preset minimind-3v --what vlm   # minimind-3v's pretrain_vlm_768.pth, sft_vlm_768.pth
    python -m scripts.download --what data_jsonl                 # the older jsonl files + image zips, unzipped
    python -m scripts.download --source modelscope               # from ModelScope instead of the HF Hub
    HF_ENDPOINT=https://hf-mirror.com python -m scripts.download # through a Hub mirror
    python -m scripts.download --dry_run                         # show what is present and what would be fetched
    python -m scripts.download --what data --revision data=COMMIT  # the dataset as of one commit of its repo

Which data `main` serves now: the unified parquet release of jingyaogong/minimind-v_dataset,
pretrain_i2t.parquet (about 1.27M rows over about 640K images) and sft_i2t.parquet (about 2.9M rows: the
pretrain rows, instruction data, and about 230K text-only chats that carry an 8x8 black placeholder image and
no <image>), all images 256x256 JPEG. The MiniMind2-V-era files (128x128 images, the jsonl + zip release)
may no longer be at `main` under these names; to get another release, pin the dataset repo's commit with
`--revision data=COMMIT` (or data_jsonl=..., data_multi=...). A revision applies to the named asset only:
the CLIP, tokenizer and weight repos keep their default branch unless given their own (clip=..., llm=...).

Where things land (under --dest_root, default the repo root):
    clip        model/vision_model/clip-vit-base-patch16/   config.json, model.safetensors (or pytorch_model.bin), ...
    siglip      model/vision_model/siglip2-base-p32-256-ve/ config.json, model.safetensors, preprocessor_config.json
    tokenizer   model/                                      tokenizer.json, tokenizer_config.json (MiniMind2 only)
                model/minimind3_tokenizer/ with --preset minimind-3v (MiniMind-3's, from jingyaogong/minimind-3v)
    llm         out/                                        llm_{hidden_size}.pth
    vlm         out/                                        pretrain_vlm_{hidden_size}.pth, sft_vlm_{hidden_size}.pth
    data        dataset/                                    pretrain_i2t.parquet, sft_i2t.parquet
    data_jsonl  dataset/                                    pretrain/sft jsonl, pretrain_images/, sft_images/
    data_multi  dataset/                                    sft_vlm_data_multi.jsonl, sft_multi_images/
    bench_*     dataset/bench/{name}/                       benchmark parquet files for scripts.eval_bench
                (bench_pope, bench_mme, bench_mmstar, bench_mmbench_en, bench_mmbench_cn, bench_scienceqa_img)

Every file is downloaded into a hidden staging folder beside its destination, checked (size, the Hub's
sha256/git-sha1 where it gives one, and the content: weights load with the expected keys, configs and
tokenizers hold the expected values, parquet has the expected columns), and only then renamed into place.
Files already present are content-checked the same way (no network) and skipped, so an interrupted run can
simply be repeated; a file cut short starts over next run (current huggingface_hub discards partial files too).
Errors, an unreachable source included, end the run with one line on stderr and exit status 1.
"""

if not __package__:  # started as a file: its folder, not the repo root, is on the import path
    raise SystemExit("run it from the repository root as: python -m scripts.download")

import argparse
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch
from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import logging as hub_logging
from safetensors import safe_open
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from common import REPO_ROOT
from model.model_minimind import MiniMindConfig
from model.model_vlm import (CLIP_HIDDEN_SIZE, CLIP_IMAGE_SIZE, CLIP_PATCH_SIZE, IMAGE_PLACEHOLDER_CHAR,
                             IMAGE_PLACEHOLDER_ID, SIGLIP_HIDDEN_SIZE, SIGLIP_IMAGE_SIZE, SIGLIP_PATCH_SIZE)
from model.presets import DEFAULT_PRESET, PRESETS
from model.processing_minimind_v import BOS_TOKEN, EOS_TOKEN
from model.weights import VISION_PROJ_PREFIX

SOURCES = ("hf", "modelscope")
DEFAULT_REVISION = {"hf": "main", "modelscope": "master"}
HF_DEFAULT_ENDPOINT = "https://huggingface.co"
HF_MIRROR_EXAMPLE = "https://hf-mirror.com"
MODELSCOPE_DEFAULT_ENDPOINT = "https://www.modelscope.cn"
MODELSCOPE_ENDPOINT_ENV = "MODELSCOPE_ENDPOINT"
NETWORK_TIMEOUT_S = 30
CHUNK_BYTES = 1 << 20
STAGING_PREFIX = ".download-"
# Raised by our own code or a library misuse, never by the network: these must surface as tracebacks.
PROGRAMMING_ERRORS = (TypeError, AttributeError, NameError, ImportError, AssertionError)

# The MiniMind2 tokenizer; the Feb-2025 one had the same vocab but spelled ids 0-2 <unk>, <s>, </s>.
VOCAB_SIZE = MiniMindConfig().vocab_size
BOS_ID, EOS_ID = 1, 2  # of BOS_TOKEN, EOS_TOKEN
LEGACY_BOS_TOKEN = "<s>"
IMAGE_TOKEN, IMAGE_TOKEN_ID = IMAGE_PLACEHOLDER_CHAR, IMAGE_PLACEHOLDER_ID
TOKENIZER_MANUAL_URL = (
    "https://github.com/jingyaogong/minimind-v/tree/56ab6ebd1344d165bca69f54afc7401567093447/model"
)

CLIP_WIDTH = CLIP_HIDDEN_SIZE
CLIP_CONFIG_DEFAULTS = {"image_size": 224, "patch_size": 32}  # transformers' CLIPVisionConfig, for omitted keys
CLIP_PATCH_KEY = "vision_model.embeddings.patch_embedding.weight"  # SigLIP's has the same name
SIGLIP_CONFIG_DEFAULTS = {"image_size": 224, "patch_size": 16}  # transformers' SiglipVisionConfig, for omitted keys
MINIMIND3 = PRESETS["minimind-3v"]  # the MiniMind-3 tokenizer's placeholder: `<|image_pad|>` = 12
CLIP_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                        "special_tokens_map.json")

NEW_EMBED_KEY = "model.embed_tokens.weight"
LEGACY_EMBED_KEY = "tok_embeddings.weight"
PARQUET_COLUMNS = ("conversations", "image_bytes")
BENCH_PARQUET_COLUMNS = ("question", "image")  # every benchmark file has these; the readers check the rest
# Benchmark files (Hugging Face datasets, as lmms-eval reads them): asset -> (repo, files in the repo).
# The shard names with a hash suffix are those of the repos' current snapshots as other projects list them.
BENCH_FILES = {
    "bench_pope": ("lmms-lab/POPE", tuple(f"data/test-{i:05d}-of-00003.parquet" for i in range(3))),
    "bench_mme": ("lmms-lab/MME", tuple(f"data/test-{i:05d}-of-00004-{suffix}.parquet" for i, suffix in enumerate(
        ("a25dbe3b44c4fda6", "7d22c7f1aba6fca4", "594798fd3f5b029c", "53ae1794f93b1e35")))),
    "bench_mmstar": ("Lin-Chen/MMStar", ("mmstar.parquet",)),
    "bench_mmbench_en": ("lmms-lab/MMBench", ("en/dev-00000-of-00001.parquet",)),
    "bench_mmbench_cn": ("lmms-lab/MMBench", ("cn/dev-00000-of-00001.parquet",)),
    "bench_scienceqa_img": ("lmms-lab/ScienceQA", ("ScienceQA-IMG/test-00000-of-00001.parquet",)),
}

SHA256_RE = re.compile(r"[0-9a-f]{64}")
GIT_SHA1_RE = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class FileSpec:
    names: tuple[str, ...]  # names in the repo, preferred first; the first one the repo has is fetched
    check: str  # what verify_file() checks
    optional: bool = False  # a repo without it is fine
    unpack_to: str | None = None  # zip archives: folder under the destination to extract into


@dataclass(frozen=True)
class Asset:
    repos: dict[str, tuple[str, ...]]  # source -> repo ids; the next is tried when one lacks a file or has a wrong one
    repo_type: str  # "model" or "dataset"
    dest: str  # folder relative to --dest_root
    files: tuple[FileSpec, ...]


def build_assets(hidden_size, preset=DEFAULT_PRESET):
    """The table of downloadable assets; weight file names carry the hidden size, and the preset says whose
    tokenizer and weights `tokenizer`, `llm` and `vlm` are (MiniMind2-V's, or minimind-3v's as upstream's README
    names them)."""
    pytorch_repos = {"hf": ("jingyaogong/MiniMind2-V-PyTorch",), "modelscope": ("gongjy/MiniMind2-V-PyTorch",)}
    tokenizer = Asset(
        repos={"hf": ("jingyaogong/MiniMind2-V", "jingyaogong/MiniMind2"),
               "modelscope": ("gongjy/MiniMind2-V", "gongjy/MiniMind2")},
        repo_type="model",
        dest="model",
        files=(
            FileSpec(("tokenizer.json",), "tokenizer"),
            FileSpec(("tokenizer_config.json",), "tokenizer_config"),
        ),
    )
    if preset == "minimind-3v":
        pytorch_repos = {"hf": ("jingyaogong/minimind-3v-pytorch",), "modelscope": ("gongjy/minimind-3v-pytorch",)}
        tokenizer = Asset(
            repos={"hf": ("jingyaogong/minimind-3v",), "modelscope": ("gongjy/minimind-3v",)},
            repo_type="model",
            dest=str(PRESETS[preset].tokenizer_path.relative_to(REPO_ROOT)),
            files=(
                FileSpec(("tokenizer.json",), "tokenizer3"),
                FileSpec(("tokenizer_config.json",), "tokenizer_config"),
            ),
        )
    dataset_repos = {"hf": ("jingyaogong/minimind-v_dataset",), "modelscope": ("gongjy/minimind-v_dataset",)}
    return {
        "clip": Asset(
            repos={"hf": ("openai/clip-vit-base-patch16",), "modelscope": ("openai-mirror/clip-vit-base-patch16",)},
            repo_type="model",
            dest="model/vision_model/clip-vit-base-patch16",
            files=(
                FileSpec(("config.json",), "clip_config"),
                FileSpec(("model.safetensors", "pytorch_model.bin"), "clip_weights"),
                FileSpec(("preprocessor_config.json",), "json"),
                *(FileSpec((name,), "json" if name.endswith(".json") else "text", optional=True)
                  for name in CLIP_TOKENIZER_FILES),
            ),
        ),
        # minimind-3v's encoder, as upstream's README names it (its folder is fp16).
        "siglip": Asset(
            repos={"hf": ("jingyaogong/siglip2-base-p32-256-ve",), "modelscope": ("gongjy/siglip2-base-p32-256-ve",)},
            repo_type="model",
            dest=str(PRESETS["minimind-3v"].vision_model_path.relative_to(REPO_ROOT)),
            files=(
                FileSpec(("config.json",), "siglip_config"),
                FileSpec(("model.safetensors",), "siglip_weights"),
                FileSpec(("preprocessor_config.json",), "json"),
            ),
        ),
        "tokenizer": tokenizer,
        "llm": Asset(pytorch_repos, "model", "out", (FileSpec((f"llm_{hidden_size}.pth",), "lm_weights"),)),
        "vlm": Asset(pytorch_repos, "model", "out", (
            FileSpec((f"pretrain_vlm_{hidden_size}.pth",), "vlm_weights"),
            FileSpec((f"sft_vlm_{hidden_size}.pth",), "vlm_weights"),
        )),
        "data": Asset(dataset_repos, "dataset", "dataset", (
            FileSpec(("pretrain_i2t.parquet",), "parquet"),
            FileSpec(("sft_i2t.parquet",), "parquet"),
        )),
        "data_jsonl": Asset(dataset_repos, "dataset", "dataset", (
            FileSpec(("pretrain_data.jsonl", "pretrain_vlm_data.jsonl"), "jsonl"),
            FileSpec(("pretrain_images.zip",), "zip", unpack_to="pretrain_images"),
            FileSpec(("sft_data.jsonl", "sft_vlm_data.jsonl"), "jsonl"),
            FileSpec(("sft_images.zip",), "zip", unpack_to="sft_images"),
        )),
        "data_multi": Asset(dataset_repos, "dataset", "dataset", (
            FileSpec(("sft_vlm_data_multi.jsonl",), "jsonl"),
            FileSpec(("sft_multi_images_trans_image.zip",), "zip", unpack_to="sft_multi_images"),
        )),
        **{name: Asset({"hf": (repo,), "modelscope": ()}, "dataset", f"dataset/bench/{name.removeprefix('bench_')}",
                       tuple(FileSpec((path,), "bench_parquet") for path in paths))
           for name, (repo, paths) in BENCH_FILES.items()},
    }


ASSET_NAMES = tuple(build_assets(512))
DEFAULT_WHAT = {"minimind2-v": ("clip", "tokenizer", "llm", "data"),
                "minimind-3v": ("siglip", "tokenizer", "llm", "data")}


class DownloadError(Exception):
    """A problem the user can act on; main() prints it as one line."""


class SourceUnreachable(DownloadError):
    """No answer from the source (offline, DNS, refused, timeouts, 5xx); the message suggests other routes."""


class VerificationError(DownloadError):
    """A file that arrived (or was already there) but is not what it should be."""


class WrongContent(VerificationError):
    """A well-formed file that is the wrong thing (the old <s>/</s> tokenizer); another repo may have the right one."""


class FileMissing(Exception):
    """The repo has no file of that name."""


@dataclass(frozen=True)
class Fetched:
    path: Path
    expected_hash: str | None  # the Hub's ETag: sha256 for LFS files, git blob sha1 otherwise


# ---------------------------------------------------------------------------------------------------------------------
# Fetching one file from a source into a staging folder

def first_line(text, limit=200):
    line = next((part.strip() for part in str(text).splitlines() if part.strip()), "")
    return line[:limit]


def unreachable(source, endpoint, repo_id, filename, url, dest_dir, err):
    by_hand = f"download it by hand from {url} into {dest_dir}"
    if source == "hf":
        hint = f"try --source modelscope, a Hub mirror (HF_ENDPOINT={HF_MIRROR_EXAMPLE}), or {by_hand}"
    else:
        hint = f"try --source hf (or HF_ENDPOINT={HF_MIRROR_EXAMPLE} with it), or {by_hand}"
    reason = f"{type(err).__name__}: {first_line(err)}"
    return SourceUnreachable(f"cannot fetch {filename} from {repo_id} at {endpoint} ({reason}); {hint}")


def fetch_from_hf(repo_id, repo_type, filename, revision, staging):
    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or HF_DEFAULT_ENDPOINT
    url = hf_hub_url(repo_id, filename, repo_type=repo_type, revision=revision, endpoint=endpoint)
    try:
        # One HEAD without retries first: an offline machine fails here at once instead of after the
        # hub's ~20 s of back-off, and the ETag gives us a hash to check the download against.
        meta = get_hf_file_metadata(url, timeout=NETWORK_TIMEOUT_S, endpoint=endpoint)
        path = hf_hub_download(repo_id, filename, repo_type=repo_type, revision=revision, local_dir=staging,
                               endpoint=endpoint, etag_timeout=NETWORK_TIMEOUT_S)
    except (RepositoryNotFoundError, GatedRepoError) as err:
        raise DownloadError(f"{repo_id} is not accessible on {endpoint} ({first_line(err)})") from None
    except RevisionNotFoundError:
        raise DownloadError(f"revision {revision!r} does not exist in {repo_id}") from None
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        # A missing file is a 404 under either name huggingface_hub gives it (EntryNotFoundError in 0.x,
        # RemoteEntryNotFoundError from 1.0 on), so the status decides.
        if status == 404:
            raise FileMissing(filename) from None
        if status is not None and status < 500 and status != 429:
            raise DownloadError(f"{url}: HTTP {status} ({first_line(err)})") from None
        raise unreachable("hf", endpoint, repo_id, filename, url, staging.parent, err) from None
    except PROGRAMMING_ERRORS:
        raise
    except Exception as err:  # refused, DNS, timeouts, HF_HUB_OFFLINE, a cut transfer (httpx2 errors are no OSError)
        raise unreachable("hf", endpoint, repo_id, filename, url, staging.parent, err) from None
    return Fetched(Path(path), meta.etag)


def fetch_from_modelscope(repo_id, repo_type, filename, revision, staging):
    endpoint = os.environ.get(MODELSCOPE_ENDPOINT_ENV, "").rstrip("/") or MODELSCOPE_DEFAULT_ENDPOINT
    kind = "datasets" if repo_type == "dataset" else "models"
    url = f"{endpoint}/{kind}/{repo_id}/resolve/{revision}/{filename}"
    target = staging / filename
    partial = staging / f"{filename}.part"
    request = urllib.request.Request(url, headers={"User-Agent": "minimind-v-download"})
    try:
        with urllib.request.urlopen(request, timeout=NETWORK_TIMEOUT_S) as response:
            expected = int(response.headers.get("Content-Length") or 0) or None
            received = copy_with_progress(response, partial, expected, filename)
    except urllib.error.HTTPError as err:
        if err.code == 404:
            raise FileMissing(filename) from None
        if err.code < 500 and err.code != 429:
            raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
        raise unreachable("modelscope", endpoint, repo_id, filename, url, staging.parent, err) from None
    except (OSError, http.client.HTTPException) as err:  # URLError, refused, DNS, timeouts, resets
        raise unreachable("modelscope", endpoint, repo_id, filename, url, staging.parent, err) from None
    if expected is not None and received != expected:
        raise DownloadError(f"{filename} from {repo_id}: got {received} of {expected} bytes; run again to retry")
    partial.replace(target)
    return Fetched(target, None)


def copy_with_progress(response, path, total, label):
    received = 0
    with open(path, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=label, disable=None) as bar:
        while chunk := response.read(CHUNK_BYTES):
            out.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    return received


def fetch(source, repo_id, repo_type, filename, revision, staging):
    """Download one file into `staging` (a folder inside its destination folder); FileMissing if the repo lacks it."""
    if source == "hf":
        return fetch_from_hf(repo_id, repo_type, filename, revision, staging)
    return fetch_from_modelscope(repo_id, repo_type, filename, revision, staging)


@contextmanager
def staging_dir(dest_dir):
    """A hidden folder beside the destination (same filesystem, so the final rename is atomic), always removed."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=dest_dir))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------------
# Verification: each check returns a short description or raises VerificationError

def check_hash(path, expected_hash):
    """Compare with the Hub's ETag when it is a content hash; returns what was checked, or None."""
    if expected_hash is None:
        return None
    if SHA256_RE.fullmatch(expected_hash):
        digest, label = hashlib.sha256(), "sha256"
    elif GIT_SHA1_RE.fullmatch(expected_hash):
        digest, label = hashlib.sha1(), "git-sha1"
        digest.update(f"blob {path.stat().st_size}\0".encode())
    else:
        return None
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    if digest.hexdigest() != expected_hash:
        raise VerificationError(f"{label} {digest.hexdigest()[:12]}... differs from the hub's {expected_hash[:12]}...")
    return label


def load_json(path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise VerificationError(f"not valid JSON ({first_line(err)})") from None


def verify_json(path):
    data = load_json(path)
    if not isinstance(data, dict) or not data:
        raise VerificationError("expected a non-empty JSON object")
    return f"JSON, {len(data)} keys"


def verify_clip_config(path):
    config = load_json(path)
    vision = {**CLIP_CONFIG_DEFAULTS, **(config.get("vision_config") or {}), **(config.get("vision_config_dict") or {})}
    found = (vision["image_size"], vision["patch_size"])
    if found != (CLIP_IMAGE_SIZE, CLIP_PATCH_SIZE):
        raise VerificationError(
            f"vision image_size/patch_size {found}, expected ({CLIP_IMAGE_SIZE}, {CLIP_PATCH_SIZE})")
    return f"image_size {CLIP_IMAGE_SIZE}, patch_size {CLIP_PATCH_SIZE}"


def load_state_dict(path):
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):  # only the pre-zip serialisation lacks mmap support
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = f"{type(err).__name__}: {first_line(err)}"
        raise VerificationError(f"torch.load(weights_only=True) failed ({reason})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VerificationError("not a plain {name: tensor} state dict")
    return state


def verify_siglip_config(path):
    config = load_json(path)
    vision = {**SIGLIP_CONFIG_DEFAULTS, **config, **(config.get("vision_config") or {})}
    found = (vision["image_size"], vision["patch_size"])
    if found != (SIGLIP_IMAGE_SIZE, SIGLIP_PATCH_SIZE):
        raise VerificationError(
            f"vision image_size/patch_size {found}, expected ({SIGLIP_IMAGE_SIZE}, {SIGLIP_PATCH_SIZE})")
    return f"image_size {SIGLIP_IMAGE_SIZE}, patch_size {SIGLIP_PATCH_SIZE}"


def verify_clip_weights(path, width=CLIP_WIDTH, patch_size=CLIP_PATCH_SIZE):
    expected = (width, 3, patch_size, patch_size)
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt") as f:
                count = len(f.keys())
                shape = tuple(f.get_slice(CLIP_PATCH_KEY).get_shape()) if CLIP_PATCH_KEY in f.keys() else None
        except Exception as err:
            raise VerificationError(f"unreadable safetensors ({type(err).__name__}: {first_line(err)})") from None
    else:
        state = load_state_dict(path)
        count = len(state)
        shape = tuple(state[CLIP_PATCH_KEY].shape) if CLIP_PATCH_KEY in state else None
    if shape is None:
        raise VerificationError(f"no {CLIP_PATCH_KEY}")
    if shape != expected:
        raise VerificationError(f"{CLIP_PATCH_KEY} has shape {shape}, expected {expected}")
    return f"{count} tensors, patch embedding {'x'.join(map(str, shape))}"


def verify_lm_state(path, hidden_size, with_vision_proj):
    state = load_state_dict(path)
    if NEW_EMBED_KEY in state:
        embed, scheme = state[NEW_EMBED_KEY], "transformers-style keys"
    elif LEGACY_EMBED_KEY in state:
        embed, scheme = state[LEGACY_EMBED_KEY], "LEGACY keys (tok_embeddings.*): the loader must remap them"
    else:
        raise VerificationError(f"neither {NEW_EMBED_KEY} nor {LEGACY_EMBED_KEY}; not a MiniMind checkpoint")
    if tuple(embed.shape) != (VOCAB_SIZE, hidden_size):
        raise VerificationError(f"embedding shape {tuple(embed.shape)}, expected ({VOCAB_SIZE}, {hidden_size})")
    if with_vision_proj and not any(key.startswith(VISION_PROJ_PREFIX) for key in state):
        raise VerificationError(f"no {VISION_PROJ_PREFIX}* keys; not a VLM checkpoint")
    return f"{len(state)} tensors, hidden {hidden_size}, {scheme}"


def special_token(config, key):
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


def wrong_tokenizer(found):
    return WrongContent(
        f"this is the old MiniMind tokenizer ({found}); MiniMind2-V needs the one with bos {BOS_TOKEN} and eos "
        f"{EOS_TOKEN}; take model/tokenizer.json and model/tokenizer_config.json from {TOKENIZER_MANUAL_URL}"
    )


def verify_minimind3_tokenizer(path):
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:
        raise VerificationError(f"tokenizers cannot load it ({first_line(err)})") from None
    found = {
        "vocab": tokenizer.get_vocab_size(with_added_tokens=True),
        "bos": tokenizer.token_to_id(BOS_TOKEN),
        "eos": tokenizer.token_to_id(EOS_TOKEN),
        "image": tokenizer.encode(MINIMIND3.image_placeholder, add_special_tokens=False).ids,
    }
    expected = {"vocab": VOCAB_SIZE, "bos": BOS_ID, "eos": EOS_ID, "image": [MINIMIND3.image_token_id]}
    if found != expected:
        raise WrongContent(f"not the MiniMind-3 tokenizer: found {found}, expected {expected}")
    return (f"vocab {VOCAB_SIZE}, {BOS_TOKEN}={BOS_ID}, {EOS_TOKEN}={EOS_ID}, "
            f"'{MINIMIND3.image_placeholder}'={MINIMIND3.image_token_id}")


def verify_tokenizer(path):
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:
        raise VerificationError(f"tokenizers cannot load it ({first_line(err)})") from None
    if tokenizer.token_to_id(LEGACY_BOS_TOKEN) == BOS_ID:
        raise wrong_tokenizer(f"id {BOS_ID} is {LEGACY_BOS_TOKEN}")
    found = {
        "vocab": tokenizer.get_vocab_size(with_added_tokens=True),
        "bos": tokenizer.token_to_id(BOS_TOKEN),
        "eos": tokenizer.token_to_id(EOS_TOKEN),
        "image": tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False).ids,
    }
    expected = {"vocab": VOCAB_SIZE, "bos": BOS_ID, "eos": EOS_ID, "image": [IMAGE_TOKEN_ID]}
    if found != expected:
        raise WrongContent(f"not the MiniMind2 tokenizer: found {found}, expected {expected}")
    return f"vocab {VOCAB_SIZE}, {BOS_TOKEN}={BOS_ID}, {EOS_TOKEN}={EOS_ID}, '{IMAGE_TOKEN}'={IMAGE_TOKEN_ID}"


def verify_tokenizer_config(path):
    config = load_json(path)
    bos, eos = special_token(config, "bos_token"), special_token(config, "eos_token")
    if bos == LEGACY_BOS_TOKEN:
        raise wrong_tokenizer(f"bos_token {bos}")
    if (bos, eos) != (BOS_TOKEN, EOS_TOKEN):
        raise WrongContent(f"bos/eos are {bos}/{eos}, expected {BOS_TOKEN}/{EOS_TOKEN}")
    return f"bos {bos}, eos {eos}"


def read_parquet_metadata(path, columns, kind: str):
    """The file's parquet metadata, if it reads and has every one of `columns`."""
    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as err:
        raise VerificationError(f"unreadable parquet ({type(err).__name__}: {first_line(err)})") from None
    names = set(meta.schema.to_arrow_schema().names)
    missing = [column for column in columns if column not in names]
    if missing:
        raise VerificationError(f"{kind} lacks column(s) {missing}; has {sorted(names)}")
    return meta


def verify_jsonl(path):
    records = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            if records == 0:
                try:
                    first = json.loads(line)
                except json.JSONDecodeError as err:
                    raise VerificationError(f"first line is not JSON ({first_line(err)})") from None
                if "conversations" not in first:
                    raise VerificationError("first record has no 'conversations'")
            records += 1
    return f"{records:,} records"


def verify_zip(path):
    try:
        with zipfile.ZipFile(path) as archive:
            count = sum(not info.is_dir() for info in archive.infolist())
    except zipfile.BadZipFile as err:
        raise VerificationError(f"not a readable zip ({first_line(err)})") from None
    if count == 0:
        raise VerificationError("empty zip")
    return f"zip, {count:,} files"


def verify_file(path, check, hidden_size):
    if path.stat().st_size == 0:
        raise VerificationError("empty file")
    match check:
        case "text":
            return f"{path.stat().st_size:,} bytes"
        case "json":
            return verify_json(path)
        case "clip_config":
            return verify_clip_config(path)
        case "clip_weights":
            return verify_clip_weights(path)
        case "siglip_config":
            return verify_siglip_config(path)
        case "siglip_weights":
            return verify_clip_weights(path, SIGLIP_HIDDEN_SIZE, SIGLIP_PATCH_SIZE)
        case "tokenizer":
            return verify_tokenizer(path)
        case "tokenizer3":
            return verify_minimind3_tokenizer(path)
        case "tokenizer_config":
            return verify_tokenizer_config(path)
        case "lm_weights":
            return verify_lm_state(path, hidden_size, with_vision_proj=False)
        case "vlm_weights":
            return verify_lm_state(path, hidden_size, with_vision_proj=True)
        case "parquet":
            meta = read_parquet_metadata(path, PARQUET_COLUMNS, "parquet")
            return f"{meta.num_rows:,} rows, columns {', '.join(PARQUET_COLUMNS)}"
        case "bench_parquet":
            return f"{read_parquet_metadata(path, BENCH_PARQUET_COLUMNS, 'benchmark parquet').num_rows:,} rows"
        case "jsonl":
            return verify_jsonl(path)
        case "zip":
            return verify_zip(path)
    raise ValueError(f"unknown check {check!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Placing files

def format_size(num_bytes):
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000


def count_files(folder):
    return sum(path.is_file() for path in folder.rglob("*"))


def unpack_zip(archive_path, target):
    """Extract into a hidden folder first, then rename: a single top-level folder in the zip becomes `target`."""
    with staging_dir(target.parent) as scratch:
        unpacked = scratch / "unpacked"
        with zipfile.ZipFile(archive_path) as archive:
            archive.extractall(unpacked)
        entries = list(unpacked.iterdir())
        root = entries[0] if len(entries) == 1 and entries[0].is_dir() else unpacked
        if target.exists():
            shutil.rmtree(target)
        root.replace(target)
    return count_files(target)


def present_result(spec, dest_dir, hidden_size, keep_zips):
    """(file name, summary) for an already-present, verified copy, or None when it must be fetched."""
    if spec.unpack_to and (dest_dir / spec.unpack_to).is_dir() and any((dest_dir / spec.unpack_to).iterdir()):
        return spec.unpack_to, f"present ({count_files(dest_dir / spec.unpack_to):,} files), skipped"
    for name in spec.names:
        path = dest_dir / name
        if not path.is_file():
            continue
        try:
            detail = verify_file(path, spec.check, hidden_size)
        except VerificationError as err:
            print(f"  {path}: present but failed verification ({err}); fetching it again")
            return None
        if spec.unpack_to:
            count = unpack_zip(path, dest_dir / spec.unpack_to)
            if not keep_zips:
                path.unlink()
            return spec.unpack_to, f"unpacked {count:,} files from the present {name}"
        return name, f"present, verified ({detail}), skipped"
    return None


def download_file(spec, asset, source, dest_dir, revision, hidden_size, keep_zips):
    """Fetch the first name some repo has, verify it in staging, move it into place; returns (name, summary)."""
    problem = None
    for repo_id in asset.repos[source]:
        for name in spec.names:
            with staging_dir(dest_dir) as staging:
                try:
                    fetched = fetch(source, repo_id, asset.repo_type, name, revision, staging)
                except FileMissing:
                    continue
                origin = f"{source}:{repo_id}"
                try:
                    hashed = check_hash(fetched.path, fetched.expected_hash)
                    detail = verify_file(fetched.path, spec.check, hidden_size)
                except WrongContent as err:
                    problem = f"{name} from {origin}: {err}"
                    print(f"  {problem}")
                    break  # the next repo may carry the right file
                except VerificationError as err:
                    raise VerificationError(
                        f"{name} from {origin} failed verification and was discarded: {err}") from None
                size = format_size(fetched.path.stat().st_size)
                checked = f"{hashed}, {detail}" if hashed else detail
                if spec.unpack_to:
                    count = unpack_zip(fetched.path, dest_dir / spec.unpack_to)
                    if keep_zips:
                        fetched.path.replace(dest_dir / name)
                    summary = f"downloaded {name}, {size} from {origin} ({checked}), unpacked {count:,} files"
                    return spec.unpack_to, summary
                (dest_dir / name).parent.mkdir(parents=True, exist_ok=True)  # names like data/test-0.parquet
                fetched.path.replace(dest_dir / name)
                return name, f"downloaded {size} from {origin} ({checked})"
    if problem:
        raise VerificationError(f"refused {problem}")
    if spec.optional:
        return spec.names[0], "not in the repo (optional), skipped"
    raise DownloadError(f"{' / '.join(spec.names)} not found in {', '.join(asset.repos[source])} ({source})")


def fetch_asset(name, asset, source, dest_root, revision, hidden_size, keep_zips, force):
    dest_dir = dest_root / asset.dest
    for spec in asset.files:
        result = None if force else present_result(spec, dest_dir, hidden_size, keep_zips)
        if result is None:
            result = download_file(spec, asset, source, dest_dir, revision, hidden_size, keep_zips)
        file_name, summary = result
        print(f"[{name}] {Path(asset.dest) / file_name}: {summary}", flush=True)


def describe_plan(name, asset, source, dest_root, revision, hidden_size):
    """--dry_run: what is already in place and what would be fetched from where; no network, no writes."""
    for spec in asset.files:
        paths = [dest_root / asset.dest / n for n in spec.names]
        if spec.unpack_to:
            paths.insert(0, dest_root / asset.dest / spec.unpack_to)
        present = next((p for p in paths if p.exists()), None)
        status = "missing"
        if present is not None and present.is_dir():
            status = f"present ({count_files(present):,} files)"
        elif present is not None:
            try:
                status = f"present, verified ({verify_file(present, spec.check, hidden_size)})"
            except VerificationError as err:
                status = f"present but fails verification ({err})"
        shown = Path(asset.dest) / (present.name if present is not None else spec.names[0])
        repos = ", ".join(asset.repos[source])
        optional = " (optional)" if spec.optional else ""
        print(f"[{name}] {shown}{optional}: {status}; source {source}:{repos}@{revision}")


# ---------------------------------------------------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                        help="whose tokenizer and weights: minimind2-v (MiniMind2-V) or minimind-3v (upstream's "
                             "current model: SigLIP2 encoder, MiniMind-3 tokenizer, minimind-3v-pytorch weights)")
    parser.add_argument("--what", nargs="+", choices=ASSET_NAMES, default=None,
                        help="assets to fetch: clip (CLIP ViT-B/16), siglip (siglip2-base-p32-256-ve), tokenizer "
                             "(the preset's), llm (llm_{h}.pth), vlm (pretrain_vlm_{h}.pth + sft_vlm_{h}.pth), data "
                             "(parquet), data_jsonl / data_multi (older jsonl + image zips), bench_* (benchmark "
                             "parquet for scripts.eval_bench); default: "
                             + "; ".join(f"{p}: {' '.join(w)}" for p, w in DEFAULT_WHAT.items()))
    parser.add_argument("--source", choices=SOURCES, default="hf",
                        help="hf = Hugging Face Hub (set HF_ENDPOINT for a mirror), modelscope = ModelScope")
    parser.add_argument("--hidden_size", type=int, choices=(512, 768), default=None,
                        help="which weights: 512 = MiniMind2-Small-V (26M), 768 = MiniMind2-V (104M) or "
                             "minimind-3v (default: the preset's)")
    parser.add_argument("--dest_root", type=Path, default=REPO_ROOT,
                        help="root the model/, out/ and dataset/ folders are under (default: the repo root)")
    parser.add_argument("--revision", type=revision_for_asset, action="append", default=[], metavar="ASSET=REV",
                        help="branch, tag or commit for one asset's repos, e.g. data=<commit> (repeat for others; "
                             "default: main on hf, master on modelscope). main of the dataset repo now serves the "
                             "unified parquet release (pretrain_i2t 1.27M rows, sft_i2t 2.9M rows, 256x256 JPEG)")
    parser.add_argument("--keep_zips", action="store_true", help="keep image zips after unpacking them")
    parser.add_argument("--force", action="store_true", help="download again even if a verified copy is present")
    parser.add_argument("--dry_run", action="store_true", help="only report what is present and what would be fetched")
    args = parser.parse_args(argv)
    args.what = args.what or list(DEFAULT_WHAT[args.preset])
    args.hidden_size = args.hidden_size or PRESETS[args.preset].hidden_size
    args.revision = dict(args.revision)
    unused = sorted(set(args.revision) - set(args.what))
    if unused:
        parser.error(f"--revision for {', '.join(unused)}, which --what does not fetch ({' '.join(args.what)})")
    return args


def revision_for_asset(text):
    """argparse type of --revision: (asset, revision) from `ASSET=REV`; one asset, so that a dataset commit
    is never asked of the CLIP or weight repos."""
    name, separator, revision = text.partition("=")
    if not separator or name not in ASSET_NAMES or not revision:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ASSET=REVISION with ASSET one of "
                                         f"{', '.join(ASSET_NAMES)}, e.g. data=<commit of the dataset repo>")
    return name, revision


def main(argv=None):
    args = parse_args(argv)
    dest_root = args.dest_root.resolve()
    assets = build_assets(args.hidden_size, args.preset)
    what = list(dict.fromkeys(args.what))
    revisions = {name: args.revision.get(name, DEFAULT_REVISION[args.source]) for name in what}
    if args.dry_run:
        for name in what:
            describe_plan(name, assets[name], args.source, dest_root, revisions[name], args.hidden_size)
        return 0
    hub_verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()  # the hub's retry warnings would bury the one-line error below
    try:
        for name in what:
            fetch_asset(name, assets[name], args.source, dest_root, revisions[name], args.hidden_size,
                        args.keep_zips, args.force)
    except DownloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; partial downloads were removed", file=sys.stderr)
        return 130
    finally:
        hub_logging.set_verbosity(hub_verbosity)
    print(f"done: {', '.join(what)} in {dest_root}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind on `kill`, so staging folders get removed
    sys.exit(main())
