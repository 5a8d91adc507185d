"""Records: reading JSONL/parquet rows, checking them, and turning them into token ids.

The bottom layer of dataset/: prepared.py builds on these readers and the encoder, lm_dataset.py on both.

Formats (the format follows from the file suffix):
  * JSONL + image folder: one object per line, `conversations` (list of {role, content}) and `image`
    (file names, comma-separated for several images), e.g. pretrain_vlm_data.jsonl + pretrain_images/.
  * parquet: `conversations` (JSON string of the same list) and `image_bytes` (binary, or a list of them).
Every `<image>` in the text becomes the 196-token placeholder run that the model overwrites with features.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common import UserError

from .processing import (IMAGE_MARKER, ROLES_BY_PARITY, SYSTEM_ROLE, ImageError, assistant_turn_markers,
                         build_prompt, count_image_markers, is_placeholder_image, open_image, preprocess_image)

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)


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


def resolve_roles(turns):
    """(messages, None) or (None, reason). Stored roles are used when every turn has one: an optional system
    turn first, then user and assistant alternating. Records without roles get them by position."""
    has_role = ["role" in turn for turn in turns]
    if not any(has_role):
        return [{"role": ROLES_BY_PARITY[i % 2], "content": turn["content"]} for i, turn in enumerate(turns)], None
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
    markers = count_image_markers(messages)
    if markers != num_images:
        return None, 0, (KIND_IMAGE_COUNT, f"{markers} {IMAGE_MARKER} marker(s) but {num_images} image(s)")
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
    # Images in one `image_bytes` value: a binary (1), a list of binaries (its length), or null (0).
    count = (len(image_value) if hasattr(image_value, "values") else 1) if image_value.is_valid else 0
    messages, used, problem = check_record(turns, count, lambda: is_placeholder_image(image_at(image_value, 0)))
    if problem:
        return None, DataProblem(origin, problem[1], problem[0])
    return Record(messages, [(row, slot) for slot in range(used)], origin), None


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
        self.image_tokens_per_image = len(tokenizer(image_special_token, add_special_tokens=False).input_ids)
        # The answer span: after the chat format's assistant header through its end-of-turn marker.
        label_start, label_end = assistant_turn_markers(tokenizer, chat_format)
        self.label_start_ids = tokenizer(label_start, add_special_tokens=False).input_ids
        self.label_end_ids = tokenizer(label_end, add_special_tokens=False).input_ids

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
                # Intact: exactly one run of image tokens per image, each image_tokens_per_image long.
                is_image = np.concatenate([[False], ids == self.image_token_id, [False]])
                edges = np.flatnonzero(is_image[1:] != is_image[:-1])  # run starts and ends, alternating
                runs = edges[1::2] - edges[0::2]
                if len(runs) != num_images or not np.all(runs == self.image_tokens_per_image):
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
