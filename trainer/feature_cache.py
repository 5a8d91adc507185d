"""Frozen-CLIP feature cache: each image's patch features are computed once and reused from disk.

CLIP never trains, so the features of an image are a pure function of (image bytes, encoder weights,
preprocessing, compute precision). `--cache_vision_features DIR` computes them once per image, stores them
as fp16 in memory-mapped numpy shards, and from then on training reads [N, features, hidden] features instead of
decoding, resizing and encoding pixels on every step of every epoch.

Layout under DIR:

    {fingerprint}/                one folder per encoder + preprocessing + precision (see `cache_fingerprint`)
        fingerprint.json          what the folder name was derived from, for people
        shard-{id}.npy            fp16 [n, 196, hidden] features, read with np.load(mmap_mode="r")
        shard-{id}.keys.npy       the n image keys (16-byte BLAKE2b digests of the image file bytes)

An image is keyed by the hash of its bytes, so the same picture in the pretrain and the SFT set, or in two
epochs, or in two runs, is encoded once. A changed encoder, preprocessing version or precision gives a new
fingerprint and so a fresh folder; old folders are never read again (delete them to free the space).

Crash safety: a shard is written to a temporary name, fsynced and renamed, and only then is its keys file
written the same way. The keys file is what makes a shard visible, so a crash at any point leaves either a
complete shard or files that are ignored (and recomputed next time). There is no shared index file to corrupt;
the index is rebuilt from the keys files at each start.

Under DDP every rank hashes all images (the same list on every rank, no communication), encodes its
`rank::world_size` share of the missing ones into its own shards, waits at a barrier, then opens all shards.

Building the store runs the model's vision encoder (under the run's autocast, with DDP collectives), so it lives
with the trainer; the dataset only reads the store it is handed (VLMDataset(..., feature_store=store)).
"""
import hashlib
import json
import os
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from common import unwrap
from dataset.prepared import PreparedData, RecordView
from dataset.processing import ImageError
from dataset.records import load_image
from model.model_vlm import VISION_ENCODERS
from model.processing_minimind_v import CLIP_IMAGE_PROCESSING, output_size

# Bump whenever dataset.processing.preprocess_image (or what it is fed) changes: old caches are then unused.
PREPROCESS_VERSION = 1
FEATURE_DTYPE = np.float16
KEY_DTYPE = "S16"  # BLAKE2b-128 digest of the image file's bytes
KEY_BYTES = 16
# Images per shard file: 2048 x 196 x 768 x 2 bytes = 617 MB; a crash loses at most one shard of work.
SHARD_IMAGES = 2048
ENCODE_BATCH_SIZE = 64
PROGRESS_EVERY_S = 1.0  # seconds between progress bar updates
SHARD_SUFFIX = ".npy"
KEYS_SUFFIX = ".keys.npy"


def cache_fingerprint(encoder, vlm_config, device: torch.device, autocast) -> dict:
    """Everything the cached features depend on besides the image bytes (`vlm_config`: for its encoder
    kind and preprocessing; CLIP's fingerprint keeps the fields it had before encoders were a choice)."""
    encoder_config = {k: v for k, v in encoder.config.to_dict().items()
                      if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")}
    # The weights as loaded: BLAKE2b of every parameter and buffer (name, dtype, shape, bytes).
    weights = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(encoder.state_dict().items()):
        flat = tensor.detach().reshape(-1).contiguous().cpu()
        weights.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        weights.update(flat.view(torch.uint8).numpy().tobytes())
    # The dtype the encoder really computes in: the autocast dtype when autocast is on, else its weights'.
    precision = str(next(encoder.parameters()).dtype)
    with autocast():
        if torch.is_autocast_enabled(device.type):
            precision = str(torch.get_autocast_dtype(device.type))
    fingerprint = {
        "encoder_class": type(encoder).__name__,
        "encoder_config": encoder_config,
        "encoder_weights_blake2b": weights.hexdigest(),
        "preprocess_version": PREPROCESS_VERSION,
        "image_size": output_size(vlm_config.image_processing)[0],
        "precision": precision.replace("torch.", ""),
        "features": f"{VISION_ENCODERS[vlm_config.vision_encoder].features}, stored as float16",
    }
    if vlm_config.image_processing != CLIP_IMAGE_PROCESSING:
        fingerprint["image_processing"] = vlm_config.image_processing
    return fingerprint


def _fsync_replace(tmp: Path, final: Path):
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)


# ------------------------------------------------------------------------------------------ the store on disk

def list_shards(folder: Path):
    """(stem, keys) of every complete shard: a keys file plus a features file of the matching shape."""
    shards = []
    for keys_path in sorted(folder.glob(f"shard-*{KEYS_SUFFIX}")):
        stem = keys_path.name[:-len(KEYS_SUFFIX)]
        features_path = folder / f"{stem}{SHARD_SUFFIX}"
        try:
            keys = np.load(keys_path, allow_pickle=False)
            features = np.load(features_path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            continue  # unreadable: recomputed as if missing
        if keys.dtype != np.dtype(KEY_DTYPE) or features.dtype != FEATURE_DTYPE or features.ndim != 3 \
                or features.shape[0] != len(keys):
            continue
        shards.append((stem, keys))
    return shards


class FeatureStore:
    """Per-sample CLIP features of one prepared data file, read from memory-mapped fp16 shards.

    Picklable for DataLoader workers: only paths and small index arrays travel; each process opens the
    memory maps itself on first use.
    """

    def __init__(self, folder: Path, shard_stems, image_offsets, image_shard, image_row, tokens, hidden):
        self.folder = Path(folder)
        self.shard_stems = list(shard_stems)
        self.image_offsets = image_offsets  # [usable samples + 1] into the two arrays below
        self.image_shard = image_shard  # [images] shard number, -1: the image could not be decoded
        self.image_row = image_row  # [images] row in that shard
        self.tokens, self.hidden = tokens, hidden
        self.computed = 0  # images encoded by this process when the store was built
        self._maps = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def features_for(self, index) -> torch.Tensor:
        """fp16 [N_images, 196, hidden] for usable sample `index`, images in reading order."""
        start, stop = int(self.image_offsets[index]), int(self.image_offsets[index + 1])
        if stop == start:
            return torch.zeros(0, self.tokens, self.hidden, dtype=torch.float16)
        shards = self.image_shard[start:stop]
        if (shards < 0).any():
            raise ImageError("an image could not be decoded when the feature cache was built")
        rows = []
        for shard, row in zip(shards.tolist(), self.image_row[start:stop].tolist()):
            if shard not in self._maps:  # each process maps a shard on first use
                path = self.folder / f"{self.shard_stems[shard]}{SHARD_SUFFIX}"
                self._maps[shard] = np.load(path, mmap_mode="r", allow_pickle=False)
            rows.append(self._maps[shard][row])
        return torch.from_numpy(np.stack(rows))  # copies out of the memory map


# --------------------------------------------------------------------------------------- computing features

class _PixelsToEncode(torch.utils.data.Dataset):
    """(index, uint8 pixels [3, H, W], decoded ok) for each image reference; decoding runs in loader workers."""

    def __init__(self, source, refs, image_processor):
        self.source, self.refs, self.image_processor = source, refs, image_processor

    def __len__(self):
        return len(self.refs)

    def __getitem__(self, i):
        try:
            return i, load_image(self.source, self.refs[i], self.image_processor), True
        except ImageError:
            return i, torch.zeros(self.image_processor.pixel_shape, dtype=torch.uint8), False


def _encode_shard(model, loader, keys, folder: Path, ctx, autocast, progress) -> int:
    """Encode one shard's images, write the features then the keys atomically; returns the count encoded.

    An image that does not decode keeps a zero row under the empty key, which no lookup ever matches.
    """
    stem = f"shard-{uuid.uuid4().hex[:12]}"
    tmp = folder / f".{stem}.tmp"
    stored_keys = keys.copy()
    features = None
    try:
        for indices, pixels, decoded in loader:
            with autocast():
                pixels = loader.dataset.image_processor.normalize(pixels.to(ctx.device))
                batch = model.encode_images(pixels)  # [n, image_feature_count, hidden]
            if features is None:
                features = np.lib.format.open_memmap(tmp, mode="w+", dtype=FEATURE_DTYPE,
                                                     shape=(len(keys),) + tuple(batch.shape[1:]))
            features[indices.numpy()] = batch.to(torch.float16).cpu().numpy()
            stored_keys[indices.numpy()[~decoded.numpy()]] = b""
            progress.update(len(indices))
        decoded_count = int((stored_keys != b"").sum())
        if features is None or decoded_count == 0:
            return 0  # nothing worth a shard (the finally clause removes the temporary file)
        features.flush()
        del features
        _fsync_replace(tmp, folder / f"{stem}{SHARD_SUFFIX}")
        keys_tmp = folder / f".{stem}{KEYS_SUFFIX}.{uuid.uuid4().hex[:8]}.tmp"
        with open(keys_tmp, "wb") as handle:
            np.save(handle, stored_keys, allow_pickle=False)
        _fsync_replace(keys_tmp, folder / f"{stem}{KEYS_SUFFIX}")  # now the shard is visible
    finally:
        tmp.unlink(missing_ok=True)
    return decoded_count


def _progress(total, log, label):
    """A tqdm bar (count, rate, ETA) on stderr; none when `log` is None (ranks other than 0, tests)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="img", disable=log is None, mininterval=PROGRESS_EVERY_S,
                dynamic_ncols=True)


def lookup(keys, shard_keys):
    """(shard number, row) of each key in the shards' key lists; shard -1 where none holds it."""
    shard_of = np.full(len(keys), -1, dtype=np.int32)
    row_of = np.zeros(len(keys), dtype=np.int64)
    if not shard_keys or not sum(len(k) for k in shard_keys):
        return shard_of, row_of
    all_keys = np.concatenate(shard_keys)
    all_shard = np.concatenate([np.full(len(k), n, dtype=np.int32) for n, k in enumerate(shard_keys)])
    all_row = np.concatenate([np.arange(len(k), dtype=np.int64) for k in shard_keys])
    order = np.argsort(all_keys, kind="stable")  # a key in two shards (two runs at once): the first shard wins
    sorted_keys = all_keys[order]
    position = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    found = (sorted_keys[position] == keys) & (keys != b"")  # the empty key marks an image that did not decode
    shard_of[found] = all_shard[order[position[found]]]
    row_of[found] = all_row[order[position[found]]]
    return shard_of, row_of


def check_undecodable(refs, source, image_processor, folder: Path):
    """Images missing from the cache after encoding must be ones that do not decode; anything else means
    another rank's shards are invisible here (multi-node runs need DIR on a shared filesystem)."""
    for ref in refs:
        try:
            load_image(source, ref, image_processor)
        except ImageError:
            continue
        raise RuntimeError(f"feature cache {folder}: image {ref!r} decodes but has no cached features; with "
                           f"several machines --cache_vision_features must be a folder all of them share")


def open_cache_folder(cache_dir, fingerprint: dict) -> Path:
    """The folder for this encoder and precision, created with its fingerprint.json on first use."""
    folder = Path(cache_dir) / hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "fingerprint.json").is_file():
        tmp = folder / f".fingerprint.{uuid.uuid4().hex[:8]}.tmp"
        tmp.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
        os.replace(tmp, folder / "fingerprint.json")
    return folder


def key_images(prepared: PreparedData, log):
    """Every image reference of every usable sample in order, the samples' offsets into that list, and each
    image's key: the BLAKE2b digest of its file bytes, or the empty key for an unreadable file (never cached,
    reported as undecodable)."""
    records = RecordView(prepared)
    refs, counts = [], np.zeros(len(records), dtype=np.int64)
    for index in range(len(records)):
        images = records[index].images
        refs += images
        counts[index] = len(images)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    keys = []
    with _progress(len(refs), log, "hashing images") as hashing:
        for ref in refs:
            hashing.update(1)
            try:
                keys.append(hashlib.blake2b(prepared.images.image_bytes(ref), digest_size=KEY_BYTES).digest())
            except OSError:
                keys.append(b"")
    return refs, offsets, np.array(keys, dtype=KEY_DTYPE)


def build_feature_store(prepared: PreparedData, image_processor, model, cache_dir, ctx, autocast, log=print,
                        batch_size: int = ENCODE_BATCH_SIZE, num_workers: int = None) -> FeatureStore:
    """The feature store of `prepared`'s usable samples (VLMDataset's feature_store): the missing features are
    computed first.

    model: the MiniMindVLM (its frozen `vision_encoder` runs on ctx.device under `autocast`, as in training);
    image_processor: the model's (dataset.processing.image_processor_for); ctx: the RunContext (rank, world_size,
    device). `store.computed` counts the images this process encoded.
    """
    vlm = unwrap(model)
    encoder = vlm.vision_encoder
    if encoder is None:
        raise RuntimeError("--cache_vision_features needs the vision encoder (the model was built without one)")
    folder = open_cache_folder(cache_dir, cache_fingerprint(encoder, vlm.config, ctx.device, autocast))
    # 1. Key every image of every sample by its content hash (same list on every rank)
    started = time.time()
    refs, offsets, keys = key_images(prepared, log)

    # 2. Which unique images are not cached yet; this rank encodes its share of them
    cached = list_shards(folder)
    cached_keys = np.concatenate([k for _, k in cached]) if cached else np.zeros(0, dtype=KEY_DTYPE)
    unique_keys, first_ref = np.unique(keys, return_index=True)
    todo = np.flatnonzero(~np.isin(unique_keys, cached_keys) & (unique_keys != b""))
    if log is not None:
        log(f"feature cache {folder}: {len(refs)} images ({len(unique_keys)} unique), "
            f"{len(unique_keys) - len(todo)} cached, {len(todo)} to encode (hashed in {time.time() - started:.1f}s)")
    if ctx.distributed:
        torch.distributed.barrier()  # all ranks listed the same shards before any rank writes new ones
    mine = todo[ctx.rank::ctx.world_size]
    computed = 0
    if len(mine):
        if num_workers is None:
            num_workers = min(4, max((os.cpu_count() or 1) - 1, 0))
        label = f"encoding images with {vlm.config.vision_encoder.upper()}"
        label += f" (rank {ctx.rank})" if ctx.distributed else ""
        with _progress(len(mine), log, label) as progress:
            for start in range(0, len(mine), SHARD_IMAGES):
                part = mine[start:start + SHARD_IMAGES]
                source = _PixelsToEncode(prepared.images, [refs[first_ref[i]] for i in part], image_processor)
                loader = torch.utils.data.DataLoader(source, batch_size=batch_size, num_workers=num_workers)
                computed += _encode_shard(vlm, loader, unique_keys[part], folder, ctx, autocast, progress)
    if ctx.distributed:
        torch.distributed.barrier()  # every rank's shards are on disk before anyone builds its index

    # 3. Index every complete shard; map each sample's images to (shard, row)
    shards = list_shards(folder)
    image_shard, image_row = lookup(keys, [k for _, k in shards])
    missing = np.flatnonzero(image_shard < 0)
    if len(missing):
        check_undecodable([refs[i] for i in missing], prepared.images, image_processor, folder)
        if log is not None:
            log(f"warning: {len(missing)} image(s) could not be decoded; their samples are replaced by others")
    hidden = encoder.config.hidden_size
    store = FeatureStore(folder, [stem for stem, _ in shards], offsets, image_shard, image_row,
                         vlm.config.image_feature_count, hidden)
    store.computed = computed
    return store
