"""The CLIP feature cache: hits and misses, reuse across datasets, invalidation, crash safety, workers, DDP,
and training with the cache against training without it."""
import json
import multiprocessing
import pickle
import re
import shutil
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import train_pretrain_vlm
from dataset.lm_dataset import VLMDataset
from dataset.prepared import prepare_dataset
from dataset.processing import ImageError, image_processor_for
from model.model_vlm import MiniMindVLM, VLMConfig
from trainer import feature_cache
from trainer.feature_cache import build_feature_store, list_shards
from trainer.setup import RunContext

TINY_LM = dict(hidden_size=64, num_hidden_layers=2)
# fp16 keeps 11 significant bits: rounding moves a value by at most 2**-11 of itself. The encoder also runs on
# batches of a different size here than when the cache was built, which moves fp32 results by ~1e-6.
FP16_RELATIVE = 2.0 ** -11


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


@pytest.fixture(scope="module")
def vlm(tiny_clip_dir):
    torch.manual_seed(0)
    return MiniMindVLM(VLMConfig(**TINY_LM), vision_model_path=tiny_clip_dir).eval()


def make_dataset(path, tokenizer, vlm, images_path=None, **prepare_kwargs):
    """The dataset without a feature store (pixels), over its prepared data."""
    prepared = prepare_dataset(path, tokenizer, vlm.config.image_special_token, vlm.image_token_id, 640,
                               images_path=images_path, log=None, **prepare_kwargs)
    return VLMDataset(prepared, image_processor_for(vlm.config), log=None)


def attach(dataset, model, cache_dir, log=None, ctx=None, **kwargs):
    """(store, the dataset's samples with that store): the features of `dataset`'s images, computed where missing."""
    store = build_feature_store(dataset.prepared, dataset.image_processor, model, cache_dir, ctx or RunContext(),
                                nullcontext, log=log, num_workers=0, **kwargs)
    return store, VLMDataset(dataset.prepared, dataset.image_processor, feature_store=store, log=None)


def assert_fp16_close(cached, reference):
    assert cached.dtype == torch.float16
    error = (cached.float() - reference).abs()
    assert bool((error <= reference.abs() * FP16_RELATIVE + 1e-5).all()), float(error.max())


def test_features_are_the_encoder_output_rounded_to_fp16(tmp_path, shapes_data, tokenizer, vlm):
    dataset = make_dataset(shapes_data["pretrain_parquet"], tokenizer, vlm)
    store, cached = attach(dataset, vlm, tmp_path)
    assert store.computed == len(dataset) and cached.feature_store is store
    for index in range(len(dataset)):
        item = cached[index]
        assert "pixel_values" not in item and item["image_features"].shape == (1, 196, 64)
        assert_fp16_close(item["image_features"], vlm.encode_images(dataset.image_processor.normalize(dataset.load_pixels(index))))


def test_minimind3v_features_are_sized_by_the_encoder(tmp_path, shapes_data, tiny_siglip_dir,
                                                      tiny_minimind3_tokenizer_dir):
    """The store holds the encoder's 64 SigLIP features per image (its own count, not the LM's placeholder run),
    made from the SigLIP preprocessing; a CLIP cache in the same folder is another fingerprint."""
    from model.presets import vlm_config

    torch.manual_seed(0)
    model = MiniMindVLM(vlm_config("minimind-3v", **TINY_LM), vision_model_path=tiny_siglip_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_minimind3_tokenizer_dir))
    dataset = make_dataset(shapes_data["pretrain_parquet"], tokenizer, model, chat_format=model.config.chat_format)
    assert dataset.load_pixels(0).shape == (1, 3, 256, 256) and dataset.load_pixels(0).dtype == torch.uint8
    store, cached = attach(dataset, model, tmp_path)
    assert store.tokens == model.config.image_feature_count == 64
    item = cached[0]
    assert item["image_features"].shape == (1, 64, 64)
    assert_fp16_close(item["image_features"], model.encode_images(dataset.image_processor.normalize(dataset.load_pixels(0))))
    fingerprint = json.loads((store.folder / "fingerprint.json").read_text())
    assert fingerprint["image_size"] == 256 and fingerprint["encoder_class"] == "SiglipVisionModel"
    assert "every token" in fingerprint["features"] and fingerprint["image_processing"]["resize"] == "exact"


def test_images_shared_by_two_datasets_and_two_runs_are_encoded_once(tmp_path, shapes_data, tokenizer, vlm):
    parquet = make_dataset(shapes_data["pretrain_parquet"], tokenizer, vlm)
    jsonl = make_dataset(shapes_data["pretrain_jsonl"], tokenizer, vlm, shapes_data["pretrain_images"])
    sft = make_dataset(shapes_data["sft_parquet"], tokenizer, vlm)
    store, parquet_cached = attach(parquet, vlm, tmp_path)
    assert store.computed == len(parquet)
    messages = []
    store, jsonl_cached = attach(jsonl, vlm, tmp_path, log=messages.append)
    assert store.computed == 0  # same images, other file format
    assert "8 cached, 0 to encode" in messages[0]
    assert attach(parquet, vlm, tmp_path)[0].computed == 0  # the next epoch or run
    sft_images = sum(len(record.images) for record in sft.records)  # its text-only rows have none
    assert 0 < sft_images < len(sft)
    assert attach(sft, vlm, tmp_path)[0].computed == sft_images  # other images: encoded
    assert attach(sft, vlm, tmp_path)[0].computed == 0
    for index in range(len(parquet)):
        assert torch.equal(parquet_cached[index]["image_features"], jsonl_cached[index]["image_features"])
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(list_shards(folder)) == 2  # one per build that encoded something


def test_changed_encoder_or_preprocessing_uses_a_fresh_folder(tmp_path, shapes_data, tokenizer, vlm, tiny_clip_dir,
                                                              monkeypatch):
    dataset = make_dataset(shapes_data["pretrain_parquet"], tokenizer, vlm)
    first, cached = attach(dataset, vlm, tmp_path)
    before = cached[0]["image_features"]

    changed = MiniMindVLM(VLMConfig(**TINY_LM), vision_model_path=tiny_clip_dir).eval()
    assert attach(dataset, changed, tmp_path)[0].computed == 0  # another model object, the same encoder
    with torch.no_grad():
        changed.vision_encoder.encoder.layers[0].mlp.fc1.weight.mul_(1.5)
    second, cached = attach(dataset, changed, tmp_path)
    assert second.computed == len(dataset) and second.folder != first.folder
    assert not torch.allclose(cached[0]["image_features"].float(), before.float(), atol=1e-2)
    assert_fp16_close(cached[0]["image_features"], changed.encode_images(dataset.image_processor.normalize(dataset.load_pixels(0))))

    monkeypatch.setattr(feature_cache, "PREPROCESS_VERSION", feature_cache.PREPROCESS_VERSION + 1)
    third, _ = attach(dataset, vlm, tmp_path)
    assert third.computed == len(dataset) and third.folder not in (first.folder, second.folder)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 3


def test_a_crash_mid_build_leaves_nothing_that_is_read(tmp_path, shapes_data, tokenizer, vlm, monkeypatch):
    dataset = make_dataset(shapes_data["pretrain_parquet"], tokenizer, vlm)
    calls = []
    real_encode = MiniMindVLM.encode_images

    def encode_then_crash(self, pixels):
        calls.append(len(pixels))
        if len(calls) == 2:
            raise KeyboardInterrupt("power cut")
        return real_encode(self, pixels)

    monkeypatch.setattr(MiniMindVLM, "encode_images", encode_then_crash)
    with pytest.raises(KeyboardInterrupt):
        attach(dataset, vlm, tmp_path, batch_size=4)
    monkeypatch.undo()
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert list_shards(folder) == [] and not list(folder.glob("shard-*"))
    assert not list(folder.glob(".*.tmp"))  # the half-written shard was removed on the way out
    # What a hard kill could leave: a features file whose keys file was never written, a truncated shard.
    np.save(folder / "shard-orphan.npy", np.zeros((2, 196, 64), dtype=np.float16))
    np.save(folder / "shard-short.npy", np.zeros((1, 196, 64), dtype=np.float16))
    np.save(folder / "shard-short.keys.npy", np.array([b"x" * 16, b"y" * 16], dtype="S16"))
    (folder / "shard-junk.keys.npy").write_bytes(b"not a numpy file")
    assert list_shards(folder) == []

    store, cached = attach(dataset, vlm, tmp_path)
    assert store.computed == len(dataset)
    assert_fp16_close(cached[2]["image_features"], vlm.encode_images(dataset.image_processor.normalize(dataset.load_pixels(2))))


def test_store_pickles_without_features_and_reopens_its_maps(tmp_path, shapes_data, tokenizer, vlm):
    dataset = make_dataset(shapes_data["pretrain_parquet"], tokenizer, vlm)
    store, _ = attach(dataset, vlm, tmp_path)
    expected = store.features_for(1)
    assert store._maps  # opened in this process
    payload = pickle.dumps(store)
    assert len(payload) < 10_000  # paths and index arrays only, not the 8 x 196 x 64 features
    copy = pickle.loads(payload)
    assert copy._maps == {}
    assert torch.equal(copy.features_for(1), expected)


def test_an_image_that_does_not_decode_is_reported_for_its_record(tmp_path, shapes_data, tokenizer, vlm):
    images = tmp_path / "images"
    shutil.copytree(shapes_data["pretrain_images"], images)
    broken = sorted(images.iterdir())[3]
    broken.write_bytes(b"not a jpeg")
    dataset = make_dataset(shapes_data["pretrain_jsonl"], tokenizer, vlm, images)
    messages = []
    store, cached = attach(dataset, vlm, tmp_path / "cache", log=messages.append)
    assert store.computed == len(dataset) - 1
    assert any("1 image(s) could not be decoded" in m for m in messages)
    broken_index = next(i for i, r in enumerate(dataset.records) if r.images[0].endswith(broken.name))
    with pytest.raises(ImageError, match="could not be decoded"):
        store.features_for(broken_index)
    warnings = []
    cached.log = warnings.append
    assert cached[broken_index]["replaced"] == 1  # the dataset's usual replacement, said once with the record
    assert warnings == [f"warning: {dataset.records[broken_index].origin}: an image could not be decoded when the "
                        f"feature cache was built; using the next sample instead"]
    assert attach(dataset, vlm, tmp_path / "cache")[0].computed == 0  # retried, still broken, nothing new stored


def _ddp_rank(rank, world_size, init_file, cache_dir, data, clip_dir, tokenizer_dir, results):
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size)
    try:
        torch.manual_seed(0)
        model = MiniMindVLM(VLMConfig(**TINY_LM), vision_model_path=clip_dir).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        dataset = make_dataset(data, tokenizer, model)
        store, cached = attach(dataset, model, cache_dir, ctx=RunContext(rank=rank, world_size=world_size))
        results.put((rank, store.computed, [cached[i]["image_features"].numpy() for i in range(len(cached))]))
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_split_the_work_and_both_read_everything(tmp_path, shapes_data, tiny_clip_dir,
                                                            tiny_tokenizer_dir):
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    args = (2, tmp_path / "init", tmp_path / "cache", shapes_data["pretrain_parquet"], tiny_clip_dir,
            tiny_tokenizer_dir, results)
    ranks = [context.Process(target=_ddp_rank, args=(rank,) + args) for rank in range(2)]
    for process in ranks:
        process.start()
    got = dict((rank, (computed, features)) for rank, computed, features in (results.get(timeout=60) for _ in ranks))
    for process in ranks:
        process.join(timeout=30)
        assert process.exitcode == 0
    assert got[0][0] + got[1][0] == 8 and got[0][0] == got[1][0] == 4
    for first, second in zip(got[0][1], got[1][1]):
        assert np.array_equal(first, second)


def test_world_size_one_context_never_waits_at_a_barrier(tmp_path, shapes_data, tokenizer, vlm, monkeypatch):
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: pytest.fail("barrier with one process"))
    dataset = make_dataset(shapes_data["pretrain_parquet"], tokenizer, vlm)
    assert attach(dataset, vlm, tmp_path, ctx=RunContext(rank=0, world_size=1))[0].computed == 8


# --------------------------------------------------------------------------- training with and without the cache

def run_pretrain(tmp_path, name, data, tokenizer_dir, clip_dir, capsys, extra=()):
    out = tmp_path / name
    train_pretrain_vlm.main([
        "--device", "cpu", "--hidden_size", "64", "--num_hidden_layers", "2", "--from_weight", "none",
        "--data_path", str(data), "--vision_model_path", str(clip_dir), "--tokenizer_path", str(tokenizer_dir),
        "--save_dir", str(out), "--checkpoint_dir", str(out), "--batch_size", "2", "--epochs", "2",
        "--num_workers", "0", "--log_interval", "1", "--learning_rate", "1e-3", *extra])
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", capsys.readouterr().out)]
    weights = torch.load(out / "pretrain_vlm_64_resume.pth", weights_only=True)["model"]
    return losses, weights


def distance(a, b):
    """Euclidean distance between two state dicts, all tensors together."""
    return sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5


def test_training_with_the_cache_equals_training_on_fp16_rounded_features(tmp_path, shapes_data, tiny_clip_dir,
                                                                          tiny_tokenizer_dir, capsys, monkeypatch):
    data = shapes_data["pretrain_parquet"]
    common = (data, tiny_tokenizer_dir, tiny_clip_dir, capsys)
    plain_losses, plain = run_pretrain(tmp_path, "plain", *common)
    cached_losses, cached = run_pretrain(tmp_path, "cached", *common,
                                         extra=("--cache_vision_features", str(tmp_path / "cache")))
    real_encode = MiniMindVLM.encode_images
    monkeypatch.setattr(MiniMindVLM, "encode_images", lambda self, pixels: real_encode(self, pixels).half().float())
    rounded_losses, rounded = run_pretrain(tmp_path, "rounded", *common)
    assert len(plain_losses) == len(cached_losses) == 8

    # Steps 2-8 move the weights this far; differences are measured against it, in norm: AdamW's first steps
    # are nearly lr * sign(gradient), so a weight whose gradient is ~0 may step either way on any perturbation.
    moved = distance(run_pretrain(tmp_path, "one_step", *common, extra=("--max_steps", "1"))[1], plain)
    # The rounded run sees the cache's numbers (up to a rare last-bit flip, see FP16_RELATIVE): same training.
    assert cached_losses == rounded_losses
    assert distance(cached, rounded) < 1e-3 * moved
    # Against full-precision features only the fp16 rounding (<= 2**-11 relative) differs: the losses agree to
    # the logged 4 decimals within 2 units, the weights to a small fraction of how far training moves them
    # (0.3% here).
    assert np.allclose(cached_losses, plain_losses, atol=2e-4)
    assert distance(cached, plain) < 2e-2 * moved
