"""scripts/download.py against a local stand-in for the Hub / ModelScope: only the network is fake.

A tiny HTTP server on 127.0.0.1 answers the same URLs as huggingface.co (`/{repo}/resolve/{rev}/{file}`,
with the X-Repo-Commit / ETag headers huggingface_hub needs) or ModelScope (`/models|datasets/{repo}/resolve/...`),
so the real huggingface_hub and urllib code paths run. Payloads are built here: tiny tensors with the released
key names, a 6400-token tokenizer with MiniMind2's (or the old <s>/</s>) specials, a small parquet.
"""
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save as save_safetensors
from tokenizers import Tokenizer, models, pre_tokenizers

from scripts import download

from common import REPO_ROOT  # noqa: E402
HF_COMMIT = "0123456789abcdef0123456789abcdef01234567"
NEW_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
OLD_SPECIALS = ("<unk>", "<s>", "</s>")
CLIP_DIR = Path("model/vision_model/clip-vit-base-patch16")
TOKENIZER_REPOS = ("jingyaogong/MiniMind2-V", "jingyaogong/MiniMind2")
PYTORCH_REPO = "jingyaogong/MiniMind2-V-PyTorch"
DATASET_REPO = "jingyaogong/minimind-v_dataset"
# Facts of the released files (../shared/spec/upstream-minimind2-v.md), written out here rather than read from
# download.py, so that a wrong constant there fails these tests.
VOCAB_SIZE = 6400
IMAGE_TOKEN, IMAGE_TOKEN_ID = "@", 34
CLIP_WIDTH, CLIP_PATCH_SIZE = 768, 16
CLIP_PATCH_KEY = "vision_model.embeddings.patch_embedding.weight"
NEW_EMBED_KEY, LEGACY_EMBED_KEY = "model.embed_tokens.weight", "tok_embeddings.weight"
CLIP_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                        "special_tokens_map.json")
MODELSCOPE_ENDPOINT_ENV = "MODELSCOPE_ENDPOINT"  # documented in the README


# ---------------------------------------------------------------------------------------------------------------------
# Payloads

def torch_bytes(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def lm_state(hidden_size, legacy=False, vision_proj=False):
    embed_key = LEGACY_EMBED_KEY if legacy else NEW_EMBED_KEY
    state = {embed_key: torch.zeros(VOCAB_SIZE, hidden_size, dtype=torch.float16)}
    if vision_proj:
        state["vision_proj.vision_proj.0.weight"] = torch.zeros(hidden_size, CLIP_WIDTH, dtype=torch.float16)
        state["vision_proj.vision_proj.0.bias"] = torch.zeros(hidden_size, dtype=torch.float16)
    return torch_bytes(state)


def clip_patch_state():
    patch = torch.zeros(CLIP_WIDTH, 3, CLIP_PATCH_SIZE, CLIP_PATCH_SIZE, dtype=torch.float16)
    return {CLIP_PATCH_KEY: patch}


def tokenizer_files(specials):
    """A word-level stand-in with MiniMind2's layout: specials at ids 0-2, '@' at 34, 6400 tokens in all."""
    vocab = {f"tok{i}": i for i in range(VOCAB_SIZE)}
    vocab = {token: i for token, i in vocab.items() if i >= len(specials) and i != IMAGE_TOKEN_ID}
    vocab.update({token: i for i, token in enumerate(specials)})
    vocab[IMAGE_TOKEN] = IMAGE_TOKEN_ID
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=specials[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(list(specials))
    config = {"bos_token": specials[1], "eos_token": specials[2], "pad_token": specials[0],
              "tokenizer_class": "PreTrainedTokenizerFast"}
    return {"tokenizer.json": tokenizer.to_str().encode(), "tokenizer_config.json": json.dumps(config).encode()}


def parquet_bytes(rows=2):
    conversations = [json.dumps([{"role": "user", "content": "Describe.<image>"},
                                 {"role": "assistant", "content": f"Picture {i}."}]) for i in range(rows)]
    table = pa.table({"conversations": conversations, "image_bytes": [b"\xff\xd8fake-jpeg"] * rows})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def jsonl_bytes(records=3):
    line = json.dumps({"conversations": [{"role": "user", "content": "<image>"}], "image": "0.jpg"})
    return ("\n".join([line] * records) + "\n").encode()


def zip_bytes(names):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in names:
            archive.writestr(name, b"\xff\xd8fake-jpeg")
    return buffer.getvalue()


CLIP_CONFIG = json.dumps({"vision_config": {"image_size": 224, "patch_size": 16, "hidden_size": 768},
                          "vision_config_dict": {"patch_size": 16}}).encode()
PREPROCESSOR_CONFIG = json.dumps({"crop_size": 224, "image_mean": [0.48, 0.46, 0.41]}).encode()


# ---------------------------------------------------------------------------------------------------------------------
# The fake server

def git_blob_sha1(data):
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


class FakeHub:
    """Serves {(repo_type, repo_id, filename): bytes} the way huggingface.co ("hf") or ModelScope does."""

    HF_PATH = re.compile(r"^/(?:(?P<kind>datasets)/)?(?P<repo>[^/]+/[^/]+)/resolve/[^/]+/(?P<file>.+)$")
    MODELSCOPE_PATH = re.compile(r"^/(?P<kind>models|datasets)/(?P<repo>[^/]+/[^/]+)/resolve/[^/]+/(?P<file>.+)$")

    def __init__(self, flavor):
        self.flavor = flavor
        self.files = {}
        self.declared_hash = {}  # overrides the ETag, to fake a hash mismatch
        self.requests = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):
                hub.answer(self, send_body=False)

            def do_GET(self):
                hub.answer(self, send_body=True)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
        self.thread.start()

    def add(self, repo_id, filename, data, repo_type="model"):
        self.files[(repo_type, repo_id, filename)] = data

    def answer(self, handler, send_body):
        pattern = self.HF_PATH if self.flavor == "hf" else self.MODELSCOPE_PATH
        match = pattern.match(handler.path)
        if match is None:  # e.g. huggingface_hub's own /api/... calls
            handler.send_response(404)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        self.requests.append((handler.command, handler.path))
        repo_type = "dataset" if match["kind"] == "datasets" else "model"
        key = (repo_type, match["repo"], match["file"])
        data = self.files.get(key)
        if data is None:
            handler.send_response(404)
            if self.flavor == "hf":
                handler.send_header("X-Error-Code", "EntryNotFound")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        if self.flavor == "hf":
            # like the Hub: sha256 for LFS (large) files, the git blob sha1 for small text files
            etag = git_blob_sha1(data) if key[2].endswith(".json") else hashlib.sha256(data).hexdigest()
            handler.send_header("ETag", f'"{self.declared_hash.get(key, etag)}"')
            handler.send_header("X-Repo-Commit", HF_COMMIT)
        handler.end_headers()
        if send_body:
            handler.wfile.write(data)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hf_hub(monkeypatch):
    hub = FakeHub("hf")
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    yield hub
    hub.close()


@pytest.fixture
def modelscope_hub(monkeypatch):
    hub = FakeHub("modelscope")
    monkeypatch.setenv(MODELSCOPE_ENDPOINT_ENV, hub.url)
    yield hub
    hub.close()


def closed_port_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def staging_leftovers(root):
    return list(root.rglob(f"{download.STAGING_PREFIX}*"))


def add_clip(hub, repo_id, weights_name, optional_files):
    hub.add(repo_id, "config.json", CLIP_CONFIG)
    hub.add(repo_id, "preprocessor_config.json", PREPROCESSOR_CONFIG)
    if weights_name == "model.safetensors":
        hub.add(repo_id, weights_name, save_safetensors(clip_patch_state()))
    else:
        hub.add(repo_id, weights_name, torch_bytes(clip_patch_state()))
    for name in optional_files:  # CLIP's own tokenizer files
        hub.add(repo_id, name, b'{"a": 0}')


# ---------------------------------------------------------------------------------------------------------------------
# Tests

def test_hf_places_files_then_second_run_skips_them(hf_hub, tmp_path, capsys):
    add_clip(hf_hub, "openai/clip-vit-base-patch16", "model.safetensors", CLIP_TOKENIZER_FILES)
    tokenizer = tokenizer_files(NEW_SPECIALS)
    for name, data in tokenizer.items():
        hf_hub.add(TOKENIZER_REPOS[0], name, data)
    llm = lm_state(512)
    hf_hub.add(PYTORCH_REPO, "llm_512.pth", llm)
    for name in ("pretrain_i2t.parquet", "sft_i2t.parquet"):
        hf_hub.add(DATASET_REPO, name, parquet_bytes(), repo_type="dataset")

    argv = ["--what", "clip", "tokenizer", "llm", "data", "--dest_root", str(tmp_path)]
    assert download.main(argv) == 0
    out = capsys.readouterr().out

    clip = tmp_path / CLIP_DIR
    assert sorted(p.name for p in clip.iterdir()) == sorted(
        ["config.json", "model.safetensors", "preprocessor_config.json", *CLIP_TOKENIZER_FILES])
    assert (tmp_path / "model/tokenizer.json").read_bytes() == tokenizer["tokenizer.json"]
    assert (tmp_path / "model/tokenizer_config.json").read_bytes() == tokenizer["tokenizer_config.json"]
    assert (tmp_path / "out/llm_512.pth").read_bytes() == llm
    assert (tmp_path / "dataset/pretrain_i2t.parquet").is_file() and (tmp_path / "dataset/sft_i2t.parquet").is_file()
    assert staging_leftovers(tmp_path) == []
    # one summary line per file, with what was checked
    assert "[clip] model/vision_model/clip-vit-base-patch16/model.safetensors: downloaded" in out
    assert "sha256, 1 tensors, patch embedding 768x3x16x16" in out
    assert "git-sha1, image_size 224, patch_size 16" in out
    assert "'@'=34" in out and "2 rows, columns conversations, image_bytes" in out
    assert "transformers-style keys" in out

    hf_hub.requests.clear()
    assert download.main(argv) == 0
    out = capsys.readouterr().out
    assert hf_hub.requests == []  # everything present and verified: no network at all
    assert out.count("present, verified") == 3 + len(CLIP_TOKENIZER_FILES) + 2 + 1 + 2


def test_modelscope_uses_pytorch_bin_old_names_and_unpacks_zips(modelscope_hub, tmp_path, capsys):
    # no safetensors and only one of CLIP's optional tokenizer files there
    add_clip(modelscope_hub, "openai-mirror/clip-vit-base-patch16", "pytorch_model.bin", ["vocab.json"])
    modelscope_hub.add("gongjy/MiniMind2-V-PyTorch", "pretrain_vlm_768.pth", lm_state(768, vision_proj=True))
    modelscope_hub.add("gongjy/MiniMind2-V-PyTorch", "sft_vlm_768.pth", lm_state(768, vision_proj=True))
    repo = "gongjy/minimind-v_dataset"
    modelscope_hub.add(repo, "pretrain_vlm_data.jsonl", jsonl_bytes(3), repo_type="dataset")  # the G1 name
    modelscope_hub.add(repo, "sft_data.jsonl", jsonl_bytes(5), repo_type="dataset")
    modelscope_hub.add(repo, "pretrain_images.zip", zip_bytes(["pretrain_images/0.jpg", "pretrain_images/1.jpg"]),
                       repo_type="dataset")
    modelscope_hub.add(repo, "sft_images.zip", zip_bytes(["0.jpg", "1.jpg", "sub/2.jpg"]), repo_type="dataset")

    argv = ["--source", "modelscope", "--what", "clip", "vlm", "data_jsonl", "--hidden_size", "768",
            "--dest_root", str(tmp_path)]
    assert download.main(argv) == 0
    out = capsys.readouterr().out

    assert f"[clip] {CLIP_DIR}/pytorch_model.bin: downloaded" in out
    assert (tmp_path / CLIP_DIR / "pytorch_model.bin").is_file()
    assert not (tmp_path / CLIP_DIR / "model.safetensors").exists()
    assert (tmp_path / "out/pretrain_vlm_768.pth").is_file() and (tmp_path / "out/sft_vlm_768.pth").is_file()
    dataset = tmp_path / "dataset"
    assert (dataset / "pretrain_vlm_data.jsonl").is_file() and (dataset / "sft_data.jsonl").is_file()
    assert sorted(p.name for p in (dataset / "pretrain_images").iterdir()) == ["0.jpg", "1.jpg"]
    assert sorted(str(p.relative_to(dataset / "sft_images")) for p in (dataset / "sft_images").rglob("*.jpg")) == [
        "0.jpg", "1.jpg", "sub/2.jpg"]
    assert not list(dataset.glob("*.zip"))  # unpacked, then removed (no --keep_zips)
    assert staging_leftovers(tmp_path) == []
    assert "[data_jsonl] dataset/pretrain_images: downloaded pretrain_images.zip" in out
    assert "unpacked 2 files" in out and "unpacked 3 files" in out
    assert "3 records" in out and "hidden 768" in out
    assert "[clip] model/vision_model/clip-vit-base-patch16/merges.txt: not in the repo (optional), skipped" in out

    modelscope_hub.requests.clear()
    assert download.main(argv) == 0
    assert "present (2 files), skipped" in capsys.readouterr().out
    # only the optional files the repo lacks are asked for again
    absent = set(CLIP_TOKENIZER_FILES) - {"vocab.json"}
    assert sorted(path.rsplit("/", 1)[1] for _, path in modelscope_hub.requests) == sorted(absent)


@pytest.mark.parametrize("case", ["garbage_pth", "hash_mismatch", "wrong_hidden_size", "truncated_parquet"])
def test_bad_download_is_rejected_and_not_left_in_place(hf_hub, tmp_path, capsys, case):
    if case == "truncated_parquet":
        data = parquet_bytes()
        hf_hub.add(DATASET_REPO, "pretrain_i2t.parquet", data[: len(data) // 2], repo_type="dataset")
        what, target = "data", tmp_path / "dataset/pretrain_i2t.parquet"
    else:
        data = {"garbage_pth": b"this is not a checkpoint" * 100, "hash_mismatch": lm_state(512),
                "wrong_hidden_size": lm_state(64)}[case]
        hf_hub.add(PYTORCH_REPO, "llm_512.pth", data)
        if case == "hash_mismatch":  # the transfer went wrong: bytes differ from what the Hub announced
            hf_hub.declared_hash[("model", PYTORCH_REPO, "llm_512.pth")] = hashlib.sha256(b"other").hexdigest()
        what, target = "llm", tmp_path / "out/llm_512.pth"

    assert download.main(["--what", what, "--dest_root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "failed verification and was discarded" in err
    expected_reason = {"garbage_pth": "torch.load(weights_only=True) failed", "hash_mismatch": "sha256",
                       "wrong_hidden_size": "embedding shape (6400, 64), expected (6400, 512)",
                       "truncated_parquet": "unreadable parquet"}[case]
    assert expected_reason in err
    assert not target.exists()
    assert staging_leftovers(tmp_path) == []


def test_old_tokenizer_is_refused(hf_hub, tmp_path, capsys):
    for repo in TOKENIZER_REPOS:
        for name, data in tokenizer_files(OLD_SPECIALS).items():
            hf_hub.add(repo, name, data)

    assert download.main(["--what", "tokenizer", "--dest_root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "old MiniMind tokenizer (id 1 is <s>)" in err and "<|im_start|>" in err
    assert not (tmp_path / "model/tokenizer.json").exists()
    assert staging_leftovers(tmp_path) == []


def test_old_tokenizer_in_first_repo_falls_back_to_next_and_replaces_present_copy(hf_hub, tmp_path, capsys):
    old, new = tokenizer_files(OLD_SPECIALS), tokenizer_files(NEW_SPECIALS)
    for name in new:
        hf_hub.add(TOKENIZER_REPOS[0], name, old[name])
        hf_hub.add(TOKENIZER_REPOS[1], name, new[name])
    (tmp_path / "model").mkdir()
    (tmp_path / "model/tokenizer.json").write_bytes(old["tokenizer.json"])  # a stale copy from an old checkout

    assert download.main(["--what", "tokenizer", "--dest_root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "present but failed verification" in out
    assert f"from hf:{TOKENIZER_REPOS[0]}: this is the old MiniMind tokenizer" in out
    assert out.count(f"from hf:{TOKENIZER_REPOS[1]} (") == 2  # both files came from the second repo
    for name, data in new.items():
        assert (tmp_path / "model" / name).read_bytes() == data


def test_legacy_key_scheme_is_accepted_and_noted(hf_hub, tmp_path, capsys):
    hf_hub.add(PYTORCH_REPO, "llm_768.pth", lm_state(768, legacy=True))
    assert download.main(["--what", "llm", "--hidden_size", "768", "--dest_root", str(tmp_path)]) == 0
    assert "LEGACY keys (tok_embeddings.*)" in capsys.readouterr().out
    assert (tmp_path / "out/llm_768.pth").is_file()


def test_missing_file_names_the_repo(hf_hub, tmp_path, capsys):
    assert download.main(["--what", "vlm", "--dest_root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"error: pretrain_vlm_512.pth not found in {PYTORCH_REPO} (hf)"


@pytest.mark.parametrize("source", ["hf", "modelscope"])
def test_unreachable_source_gives_one_line_and_nonzero_exit(monkeypatch, tmp_path, capsys, source):
    endpoint = closed_port_url()
    monkeypatch.setenv("HF_ENDPOINT" if source == "hf" else MODELSCOPE_ENDPOINT_ENV, endpoint)
    assert download.main(["--source", source, "--what", "tokenizer", "--dest_root", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot fetch tokenizer.json from ")
    if source == "hf":
        assert "jingyaogong/MiniMind2-V" in lines[0] and "--source modelscope" in lines[0]
        assert "HF_ENDPOINT=https://hf-mirror.com" in lines[0]
        assert f"{endpoint}/jingyaogong/MiniMind2-V/resolve/main/tokenizer.json" in lines[0]
    else:
        assert "gongjy/MiniMind2-V" in lines[0] and "--source hf" in lines[0]
        assert f"{endpoint}/models/gongjy/MiniMind2-V/resolve/master/tokenizer.json" in lines[0]
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_offline_run_as_a_script_prints_one_line_and_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "scripts.download", "--what", "clip", "--dest_root", str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "openai/clip-vit-base-patch16" in lines[0] and "--source modelscope" in lines[0]
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_dry_run_reports_without_network_or_writes(hf_hub, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out/llm_512.pth").write_bytes(lm_state(512))
    assert download.main(["--what", "llm", "tokenizer", "--dry_run", "--dest_root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "[llm] out/llm_512.pth: present, verified" in out
    assert "[tokenizer] model/tokenizer.json: missing; source hf:" in out
    assert hf_hub.requests == []
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["llm_512.pth", "out"]


def test_real_minimind2_tokenizer_passes(real_tokenizer_dir):
    assert "'@'=34" in download.verify_file(real_tokenizer_dir / "tokenizer.json", "tokenizer", 512)
    assert download.verify_file(real_tokenizer_dir / "tokenizer_config.json", "tokenizer_config", 512) == (
        "bos <|im_start|>, eos <|im_end|>")


def test_revision_applies_to_its_asset_only(hf_hub, tmp_path, capsys):
    add_clip(hf_hub, "openai/clip-vit-base-patch16", "model.safetensors", ())
    for name in ("pretrain_i2t.parquet", "sft_i2t.parquet"):
        hf_hub.add(DATASET_REPO, name, parquet_bytes(), repo_type="dataset")
    commit = "0123456789abcdef0123456789abcdef01234567"
    argv = ["--what", "clip", "data", "--revision", f"data={commit}", "--dest_root", str(tmp_path)]
    assert download.main(argv) == 0
    fetched = [path for method, path in hf_hub.requests if method == "GET"]
    data_paths = [path for path in fetched if path.endswith(".parquet")]
    clip_paths = [path for path in fetched if "clip" in path]
    assert len(data_paths) == 2 and all(f"/resolve/{commit}/" in path for path in data_paths)
    assert clip_paths and all("/resolve/main/" in path for path in clip_paths)


@pytest.mark.parametrize("flag, message", [
    ("0123abc", "expected ASSET=REVISION"),
    ("weights=v1", "expected ASSET=REVISION"),
    ("llm=v1", "--revision for llm, which --what does not fetch"),
])
def test_revision_needs_an_asset_it_fetches(flag, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        download.parse_args(["--what", "data", "--revision", flag])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_help_says_what_main_serves_and_how_to_pin(capsys):
    with pytest.raises(SystemExit):
        download.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "sft_i2t.parquet (about 2.9M rows" in out and "--revision data=COMMIT" in out


def bench_parquet_bytes(columns):
    table = pa.table({name: [f"{name} 0"] for name in columns})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def test_benchmark_files_land_in_their_repo_folders_and_are_checked(hf_hub, tmp_path, capsys):
    for path in download.BENCH_FILES["bench_pope"][1]:
        hf_hub.add("lmms-lab/POPE", path, bench_parquet_bytes(["question_id", "question", "image"]), "dataset")
    hf_hub.add("Lin-Chen/MMStar", "mmstar.parquet", bench_parquet_bytes(["index", "answer"]), "dataset")
    assert download.main(["--what", "bench_pope", "--dest_root", str(tmp_path)]) == 0
    assert sorted(p.name for p in (tmp_path / "dataset/bench/pope/data").iterdir()) == [
        "test-00000-of-00003.parquet", "test-00001-of-00003.parquet", "test-00002-of-00003.parquet"]
    assert capsys.readouterr().out.count("(sha256, 1 rows)") == 3
    assert download.main(["--what", "bench_mmstar", "--dest_root", str(tmp_path)]) == 1  # no question/image columns
    assert "lacks column(s) ['question', 'image']" in capsys.readouterr().err
    assert not (tmp_path / "dataset/bench/mmstar/mmstar.parquet").exists() and staging_leftovers(tmp_path) == []


@pytest.fixture
def short_tmp_path():
    """A temporary folder with a short path: huggingface_hub 0.34 gives a file whose download path passes 255
    characters a Windows long-path prefix even on Linux, which then fails; this test's pytest folder plus the
    SigLIP2 folder name and the hub's cache file name comes close to that."""
    folder = Path(tempfile.mkdtemp(prefix="mm3v-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_minimind3v_preset_fetches_siglip2_minimind3_tokenizer_and_weights(hf_hub, short_tmp_path, capsys):
    """Names as upstream's README gives them: jingyaogong/siglip2-base-p32-256-ve, the MiniMind-3 tokenizer of
    jingyaogong/minimind-3v, minimind-3v-pytorch's weights; each checked for what makes it minimind-3v's."""
    tmp_path = short_tmp_path
    siglip_repo, tokenizer_repo, weights_repo = ("jingyaogong/siglip2-base-p32-256-ve", "jingyaogong/minimind-3v",
                                                 "jingyaogong/minimind-3v-pytorch")
    hf_hub.add(siglip_repo, "config.json", json.dumps({"model_type": "siglip_vision_model", "image_size": 256,
                                                       "patch_size": 32, "hidden_size": 768}).encode())
    patch = torch.zeros(768, 3, 32, 32, dtype=torch.float16)  # SigLIP2 B/32: width 768, 32 px patches
    hf_hub.add(siglip_repo, "model.safetensors", save_safetensors({CLIP_PATCH_KEY: patch}))
    hf_hub.add(siglip_repo, "preprocessor_config.json", json.dumps({"image_processor_type": "SiglipImageProcessor",
                                                                    "size": {"height": 256, "width": 256}}).encode())
    real = REPO_ROOT.parent / "shared" / "fixtures" / "minimind3_tokenizer"
    if not real.is_dir():
        pytest.skip(f"real MiniMind-3 tokenizer fixture not found at {real}")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        hf_hub.add(tokenizer_repo, name, (real / name).read_bytes())
    state = {NEW_EMBED_KEY: torch.zeros(VOCAB_SIZE, 768, dtype=torch.float16),
             "vision_proj.mlp.0.weight": torch.ones(768, dtype=torch.float16)}
    for name in ("pretrain_vlm_768.pth", "sft_vlm_768.pth"):
        hf_hub.add(weights_repo, name, torch_bytes(state))

    argv = ["--preset", "minimind-3v", "--what", "siglip", "tokenizer", "vlm", "--dest_root", str(tmp_path)]
    assert download.main(argv) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "model/vision_model/siglip2-base-p32-256-ve/model.safetensors").is_file()
    fetched = tmp_path / "model/minimind3_tokenizer/tokenizer.json"
    assert fetched.read_bytes() == (real / "tokenizer.json").read_bytes()
    assert (tmp_path / "out/sft_vlm_768.pth").is_file() and (tmp_path / "out/pretrain_vlm_768.pth").is_file()
    assert "image_size 256, patch_size 32" in out and "patch embedding 768x3x32x32" in out
    assert "'<|image_pad|>'=12" in out
    # The MiniMind2 tokenizer is not minimind-3v's: refused, and nothing lands.
    hf_hub.add(tokenizer_repo, "tokenizer.json", tokenizer_files(NEW_SPECIALS)["tokenizer.json"])
    assert download.main(["--preset", "minimind-3v", "--what", "tokenizer", "--force", "--dest_root",
                          str(tmp_path / "other")]) == 1
    assert "not the MiniMind-3 tokenizer" in capsys.readouterr().err
