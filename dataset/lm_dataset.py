"""Image-text records -> tensors: reading JSONL/parquet, validation, tokenisation, loss masks, batching.

Formats (the format follows from the file suffix):
  * JSONL + image folder: one object per line, `conversations` (list of {role, content}) and `image`
    (file names, comma-separated for several images), e.g. pretrain_vlm_data.jsonl + pretrain_images/.
  * parquet: `conversations` (JSON string of the same list) and `image_bytes` (binary, or a list of them).
Every `<image>` in the text becomes the 196-token placeholder run that the model overwrites with features.
"""
import json
import random
import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from common import UserError
from model.model_minimind import IGNORE_INDEX

from .processing import (CLIP_IMAGE_SIZE, IMAGE_MARKER, ImageError, build_prompt, count_image_markers, open_image,
                         preprocess_image, roles_by_parity)

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
# How many problems to spell out before summarising the rest.
PROBLEMS_SHOWN = 10


class DataError(UserError):
    """The dataset has problems that stop training; the message lists them (file, line, reason)."""


@dataclass
class Record:
    conversations: list  # [{"role", "content"}], roles reassigned by position
    images: list  # JSONL: image file paths; parquet: (row, slot) references into the table
    origin: str  # "file:line" or "file:row", for messages


@dataclass
class DataProblem:
    origin: str
    reason: str

    def __str__(self):
        return f"{self.origin}: {self.reason}"


def check_conversations(conversations):
    """None if `conversations` is a usable list of turns, else the reason it is not."""
    if not isinstance(conversations, list) or not conversations:
        return "'conversations' must be a non-empty list of turns"
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            return f"turn {i} has no text 'content'"
        if not turn["content"].isascii():
            try:
                turn["content"].encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate ("\\ud800" in the JSON): the tokenizer refuses it
                return f"turn {i} has text that is not valid Unicode (an unpaired surrogate)"
    if len(conversations) < 2:
        return "no assistant turn to learn from"
    return None


def check_image_count(conversations, num_images):
    """None if the text has one `<image>` marker per image, else the reason."""
    markers = count_image_markers(conversations)
    if markers != num_images:
        return f"{markers} {IMAGE_MARKER} marker(s) but {num_images} image(s)"
    return None


def parse_json(text):
    """(object, None) or (None, reason): any malformed text gives a reason, never an exception."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as error:
        return None, f"invalid JSON ({error.msg} at column {error.colno})"
    except (ValueError, RecursionError) as error:  # an integer with too many digits, nesting too deep
        return None, f"invalid JSON ({type(error).__name__}: {str(error)[:80]})"


def is_file(path):
    try:
        return path.is_file()
    except OSError:  # a name too long for the file system
        return False


class JsonlSource:
    """`conversations` + comma-separated `image` names relative to an image folder."""

    def __init__(self, data_path, images_path):
        self.data_path = Path(data_path)
        self.images_path = Path(images_path) if images_path else self.data_path.parent

    def read(self):
        """(records that pass every check, a DataProblem for each line that does not), in file order."""
        records, problems = [], []
        with open(self.data_path, "rb") as handle:  # bytes: a line that is not UTF-8 is one problem, not a crash
            for line_no, raw in enumerate(handle, start=1):
                origin = f"{self.data_path.name}:{line_no}"
                try:
                    line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
                except UnicodeDecodeError as error:
                    problems.append(DataProblem(origin, f"not UTF-8 text (byte {error.start + 1})"))
                    continue
                if not line.strip():
                    continue
                obj, reason = parse_json(line)
                if reason:
                    problems.append(DataProblem(origin, reason))
                    continue
                if not isinstance(obj, dict):
                    problems.append(DataProblem(origin, "a line must be a JSON object"))
                    continue
                reason = check_conversations(obj.get("conversations"))
                if reason:
                    problems.append(DataProblem(origin, reason))
                    continue
                names = obj.get("image", "")
                if not isinstance(names, str):
                    problems.append(DataProblem(origin, "'image' must be a string of comma-separated file names"))
                    continue
                paths = [self.images_path / name.strip() for name in names.split(",") if name.strip()]
                reason = check_image_count(obj["conversations"], len(paths))
                if reason:
                    problems.append(DataProblem(origin, reason))
                    continue
                missing = [p.name for p in paths if not is_file(p)]
                if missing:
                    problems.append(DataProblem(origin, f"image file {missing[0]!r} not found in {self.images_path}"))
                    continue
                records.append(Record(obj["conversations"], [str(p) for p in paths], origin))
        return records, problems

    def image_bytes(self, ref):
        return Path(ref).read_bytes()

    def image_name(self, ref):
        return Path(ref).name


UNREADABLE = object()  # a parquet value that cannot be converted to Python


class ParquetSource:
    """`conversations` as a JSON string, `image_bytes` as one binary or a list of binaries per row."""

    def __init__(self, data_path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.data_path = Path(data_path)
        try:
            self.table = pq.read_table(self.data_path, memory_map=True)
            columns = self.table.column_names
        except (pa.ArrowException, OSError, UnicodeDecodeError) as error:
            raise DataError(f"{self.data_path}: not a readable parquet file ({error})") from None
        for column in ("conversations", "image_bytes"):
            if column not in columns:
                raise DataError(f"{self.data_path}: no '{column}' column (has {columns})")
        self.images = self.table.column("image_bytes")

    def read(self):
        records, problems = [], []
        for row, text in enumerate(self.column_values("conversations")):
            origin = f"{self.data_path.name}:row {row}"
            if text is UNREADABLE:
                problems.append(DataProblem(origin, "'conversations' is not readable (not UTF-8 text)"))
                continue
            turns, reason = parse_json(text) if isinstance(text, str) else (text, None)
            if reason:
                problems.append(DataProblem(origin, f"'conversations': {reason}"))
                continue
            reason = check_conversations(turns)
            if reason:
                problems.append(DataProblem(origin, reason))
                continue
            value = self.images[row]
            count = 0 if not value.is_valid else (len(value) if hasattr(value, "values") else 1)
            reason = check_image_count(turns, count)
            if reason:
                problems.append(DataProblem(origin, reason))
                continue
            records.append(Record(turns, [(row, slot) for slot in range(count)], origin))
        return records, problems

    def column_values(self, name):
        """The column as Python values; a value that does not convert (bad UTF-8 in a string) is UNREADABLE."""
        import pyarrow as pa

        column = self.table.column(name)
        try:
            return column.to_pylist()
        except (UnicodeDecodeError, pa.ArrowException):  # look at each value only when the fast path fails
            values = []
            for row in range(len(column)):
                try:
                    values.append(column[row].as_py())
                except (UnicodeDecodeError, pa.ArrowException):
                    values.append(UNREADABLE)
            return values

    def image_bytes(self, ref):
        row, slot = ref
        value = self.images[row]
        return (value[slot] if hasattr(value, "values") else value).as_py()

    def image_name(self, ref):
        return f"image_bytes[{ref[1]}]"


def open_source(data_path, images_path=None):
    path = Path(data_path)
    if not path.is_file():
        raise DataError(f"dataset file not found: {path} (download it with `python -m scripts.download --what data`"
                        f" or pass --data_path)")
    if path.suffix in PARQUET_SUFFIXES:
        return ParquetSource(path)
    if path.suffix in JSONL_SUFFIXES:
        return JsonlSource(path, images_path)
    raise DataError(f"{path}: unknown dataset format; expected {JSONL_SUFFIXES + PARQUET_SUFFIXES}")


def find_subsequence(ids: np.ndarray, pattern, start: int) -> int:
    """First index >= start where `pattern` occurs in `ids`, or -1."""
    first = pattern[0]
    for pos in np.flatnonzero(ids[start:] == first) + start:
        if pos + len(pattern) <= len(ids) and list(ids[pos:pos + len(pattern)]) == pattern:
            return int(pos)
    return -1


def assistant_label_mask(ids: np.ndarray, start_ids, end_ids) -> np.ndarray:
    """True on each assistant answer's tokens plus its closing `<|im_end|>\\n` (cut at the end of `ids`)."""
    mask = np.zeros(len(ids), dtype=bool)
    pos = find_subsequence(ids, start_ids, 0)
    while pos >= 0:
        begin = pos + len(start_ids)
        end = find_subsequence(ids, end_ids, begin)
        stop = len(ids) if end < 0 else min(end + len(end_ids), len(ids))
        mask[begin:stop] = True
        pos = find_subsequence(ids, start_ids, stop)
    return mask


def image_runs_intact(ids: np.ndarray, image_token_id: int, run_length: int, num_images: int) -> bool:
    """Exactly `num_images` runs of image tokens, each `run_length` long (truncation cut none)."""
    is_image = np.concatenate([[False], ids == image_token_id, [False]])
    edges = np.flatnonzero(is_image[1:] != is_image[:-1])  # run starts and ends, alternating
    lengths = edges[1::2] - edges[0::2]
    return len(lengths) == num_images and bool(np.all(lengths == run_length))


def load_image(source, ref) -> torch.Tensor:
    """One image of a record as the CLIP input [3, 224, 224]; ImageError if it cannot be read or decoded."""
    name = source.image_name(ref)
    try:
        data = source.image_bytes(ref)
    except OSError as error:
        raise ImageError(f"{name}: cannot be read ({error.strerror or error})") from None
    if not isinstance(data, (bytes, bytearray)):
        raise ImageError(f"{name}: no image bytes (found {type(data).__name__})")
    image = open_image(data, name=name)
    try:
        return preprocess_image(image)
    except ImageError as error:
        raise ImageError(f"{name}: {error}") from None


# Why max_seq_len leaves a sample out (EncodedSample.cut).
CUT_IMAGE = "image"
CUT_ANSWER = "answer"


@dataclass
class EncodedSample:
    ids: np.ndarray  # token ids after the chat template, cut to max_seq_len
    length: int  # tokens before the cut
    cut: str = None  # None: usable; CUT_IMAGE: an image run does not fit; CUT_ANSWER: no answer token is left


class SampleEncoder:
    """Records -> token ids under the chat template, and which samples max_seq_len would spoil.

    The one tokenisation path: VLMDataset trains on its output and scripts/check_data.py reports it.
    """

    def __init__(self, tokenizer, image_special_token, image_token_id, max_seq_len):
        self.tokenizer = tokenizer
        self.image_special_token = image_special_token
        self.image_token_id = image_token_id
        self.max_seq_len = max_seq_len
        self.image_tokens_per_image = len(tokenizer(image_special_token).input_ids)
        self.label_start_ids = tokenizer(f"{tokenizer.bos_token}assistant\n").input_ids
        self.label_end_ids = tokenizer(f"{tokenizer.eos_token}\n").input_ids

    def encode(self, records) -> list:
        """One EncodedSample per record, in order."""
        prompts = [build_prompt(self.tokenizer, roles_by_parity(r.conversations), self.image_special_token,
                                add_generation_prompt=False) for r in records]
        encoded = self.tokenizer(prompts, add_special_tokens=False).input_ids if prompts else []
        samples = []
        for record, full_ids in zip(records, encoded):
            ids = np.asarray(full_ids[:self.max_seq_len], dtype=np.int64)
            cut = None
            if not image_runs_intact(ids, self.image_token_id, self.image_tokens_per_image, len(record.images)):
                cut = CUT_IMAGE
            elif not self.label_mask(ids).any():
                cut = CUT_ANSWER
            samples.append(EncodedSample(ids, len(full_ids), cut))
        return samples

    def label_mask(self, ids: np.ndarray) -> np.ndarray:
        return assistant_label_mask(ids, self.label_start_ids, self.label_end_ids)

    def cut_reason(self, sample: EncodedSample) -> str:
        what = "an image does not fit" if sample.cut == CUT_IMAGE else "the answer is cut entirely"
        return f"{what} at max_seq_len {self.max_seq_len} ({sample.length} tokens)"


@dataclass
class DatasetStats:
    records: int = 0
    bad_records: int = 0
    image_cut_by_max_seq_len: int = 0
    answer_cut_by_max_seq_len: int = 0
    problems: list = field(default_factory=list)
    cut: list = field(default_factory=list)  # DataProblem per sample left out at max_seq_len

    @property
    def usable(self):
        return self.records - self.bad_records - self.image_cut_by_max_seq_len - self.answer_cut_by_max_seq_len

    def summary(self):
        return (f"{self.usable} usable samples of {self.records}; left out: {self.bad_records} malformed, "
                f"{self.image_cut_by_max_seq_len} whose image does not fit max_seq_len, "
                f"{self.answer_cut_by_max_seq_len} whose answer is cut entirely")


def listed(problems, limit=PROBLEMS_SHOWN):
    """Indented lines, one per problem, the rest summarised."""
    shown = "\n".join(f"  {p}" for p in problems[:limit])
    return shown + (f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else "")


def problems_message(source_name, problems):
    return (f"{source_name}: {len(problems)} malformed record(s):\n{listed(problems)}\n"
            f"Fix them (check with `python -m scripts.check_data`), or pass --skip_bad_samples to leave them out.")


class VLMDataset(Dataset):
    """Tokenises every record up front (lengths for batching, truncation checks); images load per item."""

    def __init__(self, data_path, tokenizer, image_special_token, image_token_id, max_seq_len,
                 images_path=None, skip_bad_samples=False, log=print):
        self.source = open_source(data_path, images_path)
        self.max_seq_len = max_seq_len
        self.image_token_id = image_token_id
        self.encoder = SampleEncoder(tokenizer, image_special_token, image_token_id, max_seq_len)
        self.image_tokens_per_image = self.encoder.image_tokens_per_image
        self.label_start_ids, self.label_end_ids = self.encoder.label_start_ids, self.encoder.label_end_ids
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.log = log
        self.feature_store = None  # set by the vision-feature cache: items then carry features, not pixels
        self.decode_failures = 0

        records, problems = self.source.read()
        self.stats = DatasetStats(records=len(records) + len(problems), problems=problems,
                                  bad_records=len(problems))
        if problems and not skip_bad_samples:
            raise DataError(problems_message(self.source.data_path.name, problems))

        self.records, token_rows = [], []
        for record, sample in zip(records, self.encoder.encode(records)):
            if sample.cut is not None:
                self.stats.cut.append(DataProblem(record.origin, self.encoder.cut_reason(sample)))
                if sample.cut == CUT_IMAGE:
                    self.stats.image_cut_by_max_seq_len += 1
                else:
                    self.stats.answer_cut_by_max_seq_len += 1
                continue
            self.records.append(record)
            token_rows.append(sample.ids)
        self.lengths = np.array([len(ids) for ids in token_rows], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.tokens = np.concatenate(token_rows) if token_rows else np.zeros(0, dtype=np.int64)
        if log is not None:
            log(f"{self.source.data_path.name}: {self.stats.summary()}")
            if self.stats.cut:
                log(f"left out at max_seq_len {max_seq_len} ({len(self.stats.cut)}):\n{listed(self.stats.cut)}")
        if not self.records:
            raise DataError(f"{self.source.data_path}: no usable sample ({self.stats.summary()})")

    def __len__(self):
        return len(self.records)

    def token_ids(self, index):
        return self.tokens[self.offsets[index]:self.offsets[index + 1]]

    def load_pixels(self, index):
        """[N, 3, 224, 224] for the record's images (N may be 0)."""
        images = [load_image(self.source, ref) for ref in self.records[index].images]
        return torch.stack(images) if images else torch.zeros(0, 3, CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE)

    def __getitem__(self, index):
        # An image that fails to decode is reported once and replaced by the next good sample.
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            try:
                item = self.build_item(candidate)
            except ImageError as error:
                self.decode_failures += 1
                if self.log is not None:
                    self.log(f"warning: {self.records[candidate].origin}: {error}; using the next sample instead")
                continue
            item["replaced"] = offset
            return item
        raise DataError("no sample in the dataset has images that decode")

    def build_item(self, index):
        ids = self.token_ids(index)
        labels = np.where(self.encoder.label_mask(ids), ids, IGNORE_INDEX)
        item = {"input_ids": torch.from_numpy(ids.copy()), "labels": torch.from_numpy(labels)}
        if self.feature_store is not None:
            item["image_features"] = self.feature_store.features_for(self, index)
        else:
            item["pixel_values"] = self.load_pixels(index)
        return item


def collate_batch(items, pad_token_id: int, pad_to: int = None):
    """Right-pad to the longest sample (or to `pad_to`); images of the batch flattened in reading order."""
    length = pad_to or max(len(item["input_ids"]) for item in items)
    input_ids = torch.full((len(items), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        input_ids[row, :n] = item["input_ids"]
        labels[row, :n] = item["labels"]
    batch = {"input_ids": input_ids, "labels": labels, "replaced": sum(item.get("replaced", 0) for item in items)}
    for key in ("pixel_values", "image_features"):
        if key in items[0]:
            stacked = torch.cat([item[key] for item in items])  # [M, ...] in reading order
            batch[key] = stacked if len(stacked) else None
    return batch


class Collator:
    """Picklable collate function for DataLoader workers."""

    def __init__(self, pad_token_id: int, pad_to: int = None):
        self.pad_token_id = pad_token_id
        self.pad_to = pad_to

    def __call__(self, items):
        return collate_batch(items, self.pad_token_id, self.pad_to)


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

    def rank_slice(self, global_batch):
        return np.array_split(global_batch, self.world_size)[self.rank].tolist()

    def __iter__(self):
        for global_batch in self.global_batches(self.epoch)[self.start_step:]:
            yield self.rank_slice(global_batch)

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
