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
from model.model_minimind import IGNORE_INDEX, target_positions
from model.model_vlm import image_token_positions

from .processing import (IMAGE_MARKER, ROLES_BY_PARITY, SYSTEM_ROLE, ImageError, build_prompt,
                         count_image_markers, is_placeholder_image, open_image, preprocess_image, roles_by_parity)

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
# How many problems to spell out before summarising the rest.
PROBLEMS_SHOWN = 10


class DataError(UserError):
    """The dataset has problems that stop training; the message lists them (file, line, reason)."""


# Kinds of malformed record, for counts per kind (DataProblem.kind).
KIND_TEXT = "text is not UTF-8"
KIND_JSON = "invalid JSON"
KIND_CONVERSATIONS = "bad conversations"
KIND_ROLES = "roles do not alternate"
KIND_IMAGE_FIELD = "bad image field"
KIND_IMAGE_COUNT = "markers and images differ"
KIND_IMAGE_MISSING = "image file not found"
KIND_UNDECODABLE = "image does not decode"


@dataclass
class Record:
    conversations: list  # [{"role", "content"}]: the stored roles, or roles by position when none are stored
    images: list  # JSONL: image file paths; parquet: (row, slot) references; [] for a text-only row
    origin: str  # "file:line" or "file:row", for messages


@dataclass
class DataProblem:
    origin: str
    reason: str
    kind: str = ""

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


def resolve_roles(turns):
    """(messages, None) or (None, reason). Stored roles are used when every turn has one: an optional system
    turn first, then user and assistant alternating. Records without roles get them by position."""
    has_role = ["role" in turn for turn in turns]
    if not any(has_role):
        return roles_by_parity(turns), None
    if not all(has_role):
        return None, f"turn {has_role.index(False)} has no 'role' (the other turns have one)"
    roles = [turn["role"] for turn in turns]
    first = 1 if roles[0] == SYSTEM_ROLE else 0
    for i in range(first, len(roles)):
        expected_role = ROLES_BY_PARITY[(i - first) % 2]
        if roles[i] != expected_role:
            return None, f"turn {i} has role {repr(roles[i])[:40]} where {expected_role!r} was expected"
    if "assistant" not in roles:
        return None, "no assistant turn to learn from"
    return [{"role": role, "content": turn["content"]} for role, turn in zip(roles, turns)], None


def check_record(turns, num_images, image_is_placeholder=lambda: False):
    """(messages, images used, None) or (None, 0, (kind, reason)).

    A row whose text has no `<image>` and whose one image is the tiny placeholder (image_is_placeholder()) is
    a text-only sample: it uses no image.
    """
    reason = check_conversations(turns)
    if reason:
        return None, 0, (KIND_CONVERSATIONS, reason)
    messages, reason = resolve_roles(turns)
    if reason:
        return None, 0, (KIND_ROLES, reason)
    if num_images == 1 and count_image_markers(messages) == 0 and image_is_placeholder():
        return messages, 0, None
    reason = check_image_count(messages, num_images)
    if reason:
        return None, 0, (KIND_IMAGE_COUNT, reason)
    return messages, num_images, None


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


def jsonl_record(raw: bytes, line_no: int, name: str, images_path: Path):
    """One JSONL line -> (Record, None), (None, DataProblem), or (None, None) for a blank line."""
    origin = f"{name}:{line_no}"
    try:
        line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
    except UnicodeDecodeError as error:  # bytes: a line that is not UTF-8 is one problem, not a crash
        return None, DataProblem(origin, f"not UTF-8 text (byte {error.start + 1})", KIND_TEXT)
    if not line.strip():
        return None, None
    obj, reason = parse_json(line)
    if reason:
        return None, DataProblem(origin, reason, KIND_JSON)
    if not isinstance(obj, dict):
        return None, DataProblem(origin, "a line must be a JSON object", KIND_JSON)
    names = obj.get("image", "")
    if not isinstance(names, str):
        return None, DataProblem(origin, "'image' must be a string of comma-separated file names", KIND_IMAGE_FIELD)
    paths = [images_path / n.strip() for n in names.split(",") if n.strip()]
    messages, used, problem = check_record(obj.get("conversations"), len(paths))
    if problem:
        return None, DataProblem(origin, problem[1], problem[0])
    missing = [p.name for p in paths if not is_file(p)]
    if missing:
        return None, DataProblem(origin, f"image file {missing[0]!r} not found in {images_path}", KIND_IMAGE_MISSING)
    return Record(messages, [str(p) for p in paths[:used]], origin), None


UNREADABLE = object()  # a parquet value that cannot be converted to Python


def parquet_record(text, image_value, row: int, name: str):
    """One parquet row (`conversations` value, `image_bytes` pyarrow scalar) -> (Record, None) or (None, problem)."""
    origin = f"{name}:row {row}"
    if text is UNREADABLE:
        return None, DataProblem(origin, "'conversations' is not readable (not UTF-8 text)", KIND_TEXT)
    turns, reason = parse_json(text) if isinstance(text, str) else (text, None)
    if reason:
        return None, DataProblem(origin, f"'conversations': {reason}", KIND_JSON)
    count = image_count(image_value)
    messages, used, problem = check_record(turns, count, lambda: is_placeholder_image(image_at(image_value, 0)))
    if problem:
        return None, DataProblem(origin, problem[1], problem[0])
    return Record(messages, [(row, slot) for slot in range(used)], origin), None


def image_count(value) -> int:
    """Images in one `image_bytes` value: a binary (1), a list of binaries (its length), or null (0)."""
    if not value.is_valid:
        return 0
    return len(value) if hasattr(value, "values") else 1


def image_at(value, slot):
    """The bytes of image `slot` of one `image_bytes` value (None for a null entry)."""
    return (value[slot] if hasattr(value, "values") else value).as_py()


def column_values(column):
    """A pyarrow column as Python values; a value that does not convert (bad UTF-8) is UNREADABLE."""
    import pyarrow as pa

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


class JsonlSource:
    """`conversations` + comma-separated `image` names relative to an image folder (read whole: small files;
    training reads through dataset/prepared.py)."""

    def __init__(self, data_path, images_path):
        self.data_path = Path(data_path)
        self.images_path = Path(images_path) if images_path else self.data_path.parent

    def read(self):
        """(records that pass every check, a DataProblem for each line that does not), in file order."""
        records, problems = [], []
        with open(self.data_path, "rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                record, problem = jsonl_record(raw, line_no, self.data_path.name, self.images_path)
                if record:
                    records.append(record)
                elif problem:
                    problems.append(problem)
        return records, problems

    def image_bytes(self, ref):
        return Path(ref).read_bytes()

    def image_name(self, ref):
        return Path(ref).name


def open_parquet(data_path):
    """pyarrow.parquet.ParquetFile with both columns present, or a one-line DataError."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(data_path, memory_map=True)
        columns = parquet.schema_arrow.names
    except (pa.ArrowException, OSError, UnicodeDecodeError) as error:
        raise DataError(f"{data_path}: not a readable parquet file ({error})") from None
    for column in ("conversations", "image_bytes"):
        if column not in columns:
            raise DataError(f"{data_path}: no '{column}' column (has {columns})")
    return parquet


class ParquetSource:
    """`conversations` as a JSON string, `image_bytes` as one binary or a list of binaries per row (read whole:
    small files; training reads through dataset/prepared.py)."""

    def __init__(self, data_path):
        import pyarrow as pa

        self.data_path = Path(data_path)
        try:
            self.table = open_parquet(self.data_path).read()
        except (pa.ArrowException, OSError) as error:
            raise DataError(f"{self.data_path}: not a readable parquet file ({error})") from None
        self.images = self.table.column("image_bytes")

    def read(self):
        records, problems = [], []
        for row, text in enumerate(column_values(self.table.column("conversations"))):
            record, problem = parquet_record(text, self.images[row], row, self.data_path.name)
            if record:
                records.append(record)
            else:
                problems.append(problem)
        return records, problems

    def image_bytes(self, ref):
        row, slot = ref
        return image_at(self.images[row], slot)

    def image_name(self, ref):
        return f"image_bytes[{ref[1]}]"


def open_source(data_path, images_path=None):
    path = Path(data_path)
    check_data_path(path)
    if path.suffix in PARQUET_SUFFIXES:
        return ParquetSource(path)
    return JsonlSource(path, images_path)


def check_data_path(path: Path):
    """A one-line DataError unless `path` is a dataset file of a known format."""
    if not path.is_file():
        raise DataError(f"dataset file not found: {path} (download it with `python -m scripts.download --what data`"
                        f" or pass --data_path)")
    if path.suffix not in PARQUET_SUFFIXES + JSONL_SUFFIXES:
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


def load_image(source, ref, image_processor) -> torch.Tensor:
    """One image of a record as uint8 pixels [3, H, W], resized and cropped for the encoder
    (image_processor.normalize finishes its input on the device); ImageError if it cannot be read or decoded."""
    name = source.image_name(ref)
    try:
        data = source.image_bytes(ref)
    except OSError as error:
        raise ImageError(f"{name}: cannot be read ({error.strerror or error})") from None
    if not isinstance(data, (bytes, bytearray)):
        raise ImageError(f"{name}: no image bytes (found {type(data).__name__})")
    image = open_image(data, name=name)
    try:
        return preprocess_image(image, image_processor, normalize=False)
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

    def __init__(self, tokenizer, image_special_token, image_token_id, max_seq_len, chat_format="minimind2"):
        self.tokenizer = tokenizer
        self.chat_format = chat_format  # dataset/processing.py CHAT_FORMATS
        self.image_special_token = image_special_token
        self.image_token_id = image_token_id
        self.max_seq_len = max_seq_len
        self.image_tokens_per_image = len(tokenizer(image_special_token).input_ids)
        # The answer span (upstream G2 and G3 alike): after `<|im_start|>assistant\n` (so minimind3's think block
        # is trained) through `<|im_end|>\n`.
        self.label_start_ids = tokenizer(f"{tokenizer.bos_token}assistant\n").input_ids
        self.label_end_ids = tokenizer(f"{tokenizer.eos_token}\n").input_ids

    def encode(self, records) -> list:
        """One EncodedSample per record, in order."""
        return self.encode_chats([(r.conversations, len(r.images)) for r in records])

    def encode_chats(self, chats, dtype=np.int64) -> list:
        """One EncodedSample per (messages, number of images), ids as `dtype`.

        Only a sample longer than max_seq_len is checked for a cut image run or a lost answer: a whole
        prompt has one intact run per image (expand_image_markers) and an answer span per assistant turn.
        """
        prompts = [build_prompt(self.tokenizer, messages, self.image_special_token, add_generation_prompt=False,
                                chat_format=self.chat_format) for messages, _ in chats]
        samples = []
        for (_, num_images), full_ids in zip(chats, self.token_ids(prompts)):
            ids = np.asarray(full_ids[:self.max_seq_len], dtype=dtype)
            cut = None
            if len(full_ids) > self.max_seq_len:
                if not image_runs_intact(ids, self.image_token_id, self.image_tokens_per_image, num_images):
                    cut = CUT_IMAGE
                elif not self.label_mask(ids).any():
                    cut = CUT_ANSWER
            samples.append(EncodedSample(ids, len(full_ids), cut))
        return samples

    def token_ids(self, prompts) -> list:
        """Token id lists of `prompts` (no special tokens added), batched in the Rust tokenizer."""
        if not prompts:
            return []
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:  # a slow (Python) tokenizer
            return self.tokenizer(prompts, add_special_tokens=False).input_ids
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: no character offsets
        return [encoding.ids for encoding in encode(prompts, add_special_tokens=False)]

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
    text_only: int = 0  # usable samples without an image
    problems: list = field(default_factory=list)  # DataProblem examples of malformed records, in file order
    cut: list = field(default_factory=list)  # DataProblem examples of samples left out at max_seq_len

    @property
    def usable(self):
        return self.records - self.bad_records - self.image_cut_by_max_seq_len - self.answer_cut_by_max_seq_len

    def summary(self):
        return (f"{self.usable} usable samples of {self.records}; left out: {self.bad_records} malformed, "
                f"{self.image_cut_by_max_seq_len} whose image does not fit max_seq_len, "
                f"{self.answer_cut_by_max_seq_len} whose answer is cut entirely; "
                f"{self.text_only} of the usable are text-only (no image)")


def listed(problems, limit=PROBLEMS_SHOWN, total=None):
    """Indented lines, one per problem, the rest (of `total`, default all given) summarised."""
    total = len(problems) if total is None else total
    shown = "\n".join(f"  {p}" for p in problems[:limit])
    return shown + (f"\n  ... and {total - min(limit, len(problems))} more" if total > limit else "")


def problems_message(source_name, problems, total=None):
    total = len(problems) if total is None else total
    return (f"{source_name}: {total} malformed record(s):\n{listed(problems, total=total)}\n"
            f"Fix them (check with `python -m scripts.check_data`), or pass --skip_bad_samples to leave them out.")


class VLMDataset(Dataset):
    """Samples of a prepared data file (dataset/prepared.py: checked and tokenised once, memory-mapped);
    images are read and preprocessed per item."""

    def __init__(self, data_path, tokenizer, image_special_token, image_token_id, max_seq_len, *, image_processor,
                 images_path=None, skip_bad_samples=False, log=print, prepared_dir=None, prepare_workers=None,
                 may_build=True, chat_format="minimind2"):
        from .prepared import RecordView, prepare_dataset  # prepared.py builds on this module's readers

        self.prepared = prepare_dataset(data_path, tokenizer, image_special_token, image_token_id, max_seq_len,
                                        images_path=images_path, cache_dir=prepared_dir, workers=prepare_workers,
                                        log=log, may_build=may_build, chat_format=chat_format)
        self.source = self.prepared.images
        self.records = RecordView(self.prepared)
        self.max_seq_len = max_seq_len
        self.image_token_id = image_token_id
        self.encoder = SampleEncoder(tokenizer, image_special_token, image_token_id, max_seq_len, chat_format)
        self.image_processor = image_processor  # dataset.processing.image_processor_for(model config)
        self.image_tokens_per_image = self.encoder.image_tokens_per_image
        self.label_start_ids, self.label_end_ids = self.encoder.label_start_ids, self.encoder.label_end_ids
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.log = log
        self.feature_store = None  # set by the vision-feature cache: items then carry features, not pixels
        self.decode_failures = 0

        counts = self.prepared.manifest
        problems, malformed = self.prepared.problems()
        self.stats = DatasetStats(records=counts["records"], bad_records=malformed,
                                  image_cut_by_max_seq_len=counts["cut_image"],
                                  answer_cut_by_max_seq_len=counts["cut_answer"], text_only=counts["text_only"],
                                  problems=problems, cut=self.prepared.cut())
        name = self.prepared.data_path.name
        if malformed and not skip_bad_samples:
            raise DataError(problems_message(name, problems, malformed))
        if log is not None:
            log(f"{name}: {self.stats.summary()}")
            cut_total = self.stats.image_cut_by_max_seq_len + self.stats.answer_cut_by_max_seq_len
            if cut_total:
                log(f"left out at max_seq_len {max_seq_len} ({cut_total}):\n"
                    f"{listed(self.stats.cut, total=cut_total)}")
        if not len(self.prepared):
            raise DataError(f"{self.prepared.data_path}: no usable sample ({self.stats.summary()})")

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
        item = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
        if self.feature_store is not None:
            item["image_features"] = self.feature_store.features_for(self, index)
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
