"""The training dataset over prepared data, and how its samples become batches.

dataset/ reads one way: records.py (readers, checks, the encoder) <- prepared.py (the data checked, tokenised and
memory-mapped once) <- this module (samples as tensors, collate, the global batch sampler).
"""
import random
import signal

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from model.model_minimind import IGNORE_INDEX, target_positions
from model.model_vlm import image_token_positions

from .prepared import PreparedData, RecordView
from .processing import ImageError
from .records import DataError, load_image


class VLMDataset(Dataset):
    """The usable samples of prepared data (dataset/prepared.py) as token ids, labels and either the images'
    uint8 pixels, read and preprocessed per item, or, with a `feature_store` (trainer/feature_cache.py), their
    cached vision features."""

    def __init__(self, prepared: PreparedData, image_processor, feature_store=None, log=print):
        self.prepared = prepared
        self.source = prepared.images
        self.records = RecordView(prepared)
        self.encoder = prepared.encoder
        self.image_processor = image_processor  # dataset.processing.image_processor_for(model config)
        self.feature_store = feature_store
        self.log = log
        self.image_token_id = self.encoder.image_token_id
        self.image_tokens_per_image = self.encoder.image_tokens_per_image
        self.label_start_ids, self.label_end_ids = self.encoder.label_start_ids, self.encoder.label_end_ids
        pad_token_id = self.encoder.tokenizer.pad_token_id
        self.pad_token_id = pad_token_id if pad_token_id is not None else 0

    def __len__(self):
        return len(self.prepared)

    @property
    def lengths(self):
        """int32 [samples], memory-mapped: what length-grouped batching sorts by."""
        return self.prepared.lengths

    def token_ids(self, index):
        return self.prepared.token_ids(index)

    def load_pixels(self, index):
        """uint8 [N, 3, H, W] for the record's images (N may be 0); see load_image."""
        images = [load_image(self.source, ref, self.image_processor) for ref in self.records[index].images]
        return torch.stack(images) if images else torch.zeros((0,) + self.image_processor.pixel_shape,
                                                               dtype=torch.uint8)

    def __getitem__(self, index):
        # An image that fails to decode is reported once and replaced by the next good sample.
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            try:
                item = self.build_item(candidate)
            except ImageError as error:
                if self.log is not None:
                    self.log(f"warning: {self.records[candidate].origin}: {error}; using the next sample instead")
                continue
            item["replaced"] = offset
            return item
        raise DataError("no sample in the dataset has images that decode")

    def build_item(self, index):
        ids = self.token_ids(index)
        labels = np.where(self.encoder.label_mask(ids), ids, IGNORE_INDEX)
        item = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
        if self.feature_store is not None:
            item["image_features"] = self.feature_store.features_for(index)
        else:
            item["pixel_values"] = self.load_pixels(index)
        return item


def collate_batch(items, pad_token_id: int, pad_to: int = None, image_token_id: int = None,
                  image_run_length: int = None):
    """Right-pad to the longest sample (or to `pad_to`); images of the batch flattened in reading order.

    With `image_token_id` and `image_run_length` the batch also carries what the training forward would
    otherwise find on the device, each lookup a device->host sync (MiniMindVLM.forward): `image_positions`
    (the image tokens, checked against the images), `first_target` and `target_index` (target_positions).
    Images are then kept for a text-only batch too (M = 0), so that vision_proj runs on every step of every
    rank, as DDP without find_unused_parameters needs.
    """
    length = pad_to or max(len(item["input_ids"]) for item in items)
    input_ids = torch.full((len(items), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        input_ids[row, :n] = item["input_ids"]
        labels[row, :n] = item["labels"]
    batch = {"input_ids": input_ids, "labels": labels, "replaced": sum(item.get("replaced", 0) for item in items)}
    positions = image_token_id is not None
    for key in ("pixel_values", "image_features"):
        if key in items[0]:
            stacked = torch.cat([item[key] for item in items])  # [M, ...] in reading order
            batch[key] = stacked if len(stacked) or positions else None
            if positions:
                batch["image_positions"] = image_token_positions(
                    input_ids, image_token_id, image_run_length, images_per_sample=[len(item[key]) for item in items])
    if positions:
        batch["first_target"], batch["target_index"] = target_positions(labels)
    return batch


class Collator:
    """Picklable collate function for DataLoader workers; with the image token and run length, batches carry
    precomputed positions (collate_batch)."""

    def __init__(self, pad_token_id: int, pad_to: int = None, image_token_id: int = None,
                 image_run_length: int = None):
        self.pad_token_id = pad_token_id
        self.pad_to = pad_to
        self.image_token_id = image_token_id
        self.image_run_length = image_run_length

    def __call__(self, items):
        return collate_batch(items, self.pad_token_id, self.pad_to, self.image_token_id, self.image_run_length)


class GlobalBatchSampler(Sampler):
    """Batches of `batch_size` per rank, cut from global batches of `batch_size * world_size`.

    A global batch depends only on (seed, epoch, global batch size), so N processes with batch b see exactly
    what one process with batch N*b sees. With `group_by_length`, indices are shuffled, sorted by length
    inside windows of many batches, cut into batches, and the batch order is shuffled again: little padding,
    still random. `start_step` skips batches already trained on (resume).
    """

    WINDOW_BATCHES = 64  # batches per length-sorting window

    def __init__(self, lengths, batch_size, world_size=1, rank=0, seed=42, group_by_length=True):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.group_by_length = group_by_length
        self.epoch = 0
        self.start_step = 0

    @property
    def global_batch_size(self):
        return self.batch_size * self.world_size

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def global_batches(self, epoch):
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.lengths), generator=generator).numpy()
        size = self.global_batch_size
        if self.group_by_length:
            window = size * self.WINDOW_BATCHES
            chunks = [order[i:i + window] for i in range(0, len(order), window)]
            order = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks])
        batches = [order[i:i + size] for i in range(0, len(order), size)]
        if batches and len(batches[-1]) < self.world_size:
            batches.pop()  # every rank needs at least one sample, or DDP waits forever
        if self.group_by_length:
            shuffle = torch.randperm(len(batches), generator=generator).tolist()
            batches = [batches[i] for i in shuffle]
        return batches

    def __iter__(self):
        for global_batch in self.global_batches(self.epoch)[self.start_step:]:
            yield np.array_split(global_batch, self.world_size)[self.rank].tolist()  # this rank's slice

    def __len__(self):
        return max(len(self.global_batches(self.epoch)) - self.start_step, 0)

    def steps_per_epoch(self):
        full, rest = divmod(len(self.lengths), self.global_batch_size)
        return full + (1 if rest >= self.world_size else 0)


def init_worker(worker_id):
    """DataLoader workers: Ctrl-C is for the main process (it saves and stops); seed numpy/random."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)
