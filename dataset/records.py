"""Records: reading JSONL/parquet/LLaVA rows, checking them, and turning them into token ids.

The bottom layer of dataset/: prepared.py builds on these readers and the encoder, lm_dataset.py on both.

Formats (data_format: parquet by the file suffix; a .jsonl/.json file by its first non-whitespace byte):
  * JSONL + image folder: one object per line, `conversations` (list of {role, content}) and `image`
    (file names, comma-separated for several images), e.g. pretrain_vlm_data.jsonl + pretrain_images/.
  * LLaVA JSON + image folder (the file starts with `[`): one JSON array of {"id", "image", "conversations":
    [{"from": "human"/"gpt"/"system", "value"}]}, `image` a path relative to the folder (or a list of them; no
    `image` key: a text-only record), e.g. LLaVA-1.5's llava_v1_5_mix665k.json. Read as a stream
    (read_llava_array), never loaded whole.
  * parquet: `conversations` (JSON string of the same list) and `image_bytes` (binary, or a list of them).
Every `<image>` in the text becomes the 196-token placeholder run that the model overwrites with features.
"""
import codecs
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common import UserError

from .processing import (IMAGE_MARKER, ROLES_BY_PARITY, SYSTEM_ROLE, ImageError, assistant_turn_markers,
                         build_prompt, count_image_markers, is_placeholder_image, open_image, preprocess_image)

JSONL_SUFFIXES = (".jsonl", ".json")  # JSON lines, or a LLaVA array when the file starts with `[`
PARQUET_SUFFIXES = (".parquet",)
FORMAT_PARQUET, FORMAT_JSONL, FORMAT_LLAVA = "parquet", "jsonl", "llava"
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": SYSTEM_ROLE}  # LLaVA's `from` -> our role
LLAVA_READ_BYTES = 1 << 20  # bytes read at a time by read_llava_array (doubled while one record does not fit)
# A decode error this close to the end of the text read so far may be a record cut by the read, not bad JSON.
LLAVA_TRUNCATION_MARGIN = 16
RECORD_ID_CHARS = 40  # of a LLaVA record's `id`, in messages
JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")
NUMBER_CHARS = re.compile(r"[0-9.eE+-]*")  # what may follow the digits read so far in a JSON number
UTF8_BOM = b"\xef\xbb\xbf"


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
    images: list  # JSONL/LLaVA: image file paths; parquet: (row, slot) references; [] for a text-only row
    origin: str  # "file:line", "file:row N" or "file:record N (id X)", for messages


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


def data_format(path: Path) -> str:
    """FORMAT_PARQUET by the suffix; a .jsonl or .json file by its first byte after whitespace (and a UTF-8 BOM):
    `[` opens a LLaVA array (FORMAT_LLAVA), anything else is JSON lines (FORMAT_JSONL, as is an empty file)."""
    if path.suffix in PARQUET_SUFFIXES:
        return FORMAT_PARQUET
    with open(path, "rb") as handle:
        head = handle.read(len(UTF8_BOM))
        head = head[len(UTF8_BOM):] if head == UTF8_BOM else head
        while True:
            head = head.lstrip(b" \t\r\n")
            if head:
                return FORMAT_LLAVA if head.startswith(b"[") else FORMAT_JSONL
            head = handle.read(LLAVA_READ_BYTES)
            if not head:
                return FORMAT_JSONL


@dataclass
class LlavaElement:
    index: int  # 0-based position in the array
    start_byte: int  # where its text starts in the file
    stop_byte: int  # one past where it ends
    value: object  # the parsed JSON value
    bad_byte: int = None  # file offset of its first byte that is not UTF-8; None when its text is valid UTF-8


class LlavaStream:
    """The text of a JSON file from `start_byte` on, decoded as it is read (bytes that are not UTF-8 become
    surrogate escapes, so they are found per record), with the file offset of any position in it."""

    def __init__(self, path: Path, start_byte: int):
        self.path = Path(path)
        self.handle = open(self.path, "rb")
        self.handle.seek(start_byte)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self.text, self.pos, self.eof = "", 0, False
        self.mark_pos, self.mark_byte = 0, start_byte  # text[mark_pos] is at file offset mark_byte
        self.decoder = json.JSONDecoder()

    def close(self):
        self.handle.close()

    def byte_at(self, pos: int) -> int:
        """File offset of text[pos], for pos at or after the last one asked."""
        self.mark_byte += len(self.text[self.mark_pos:pos].encode("utf-8", "surrogateescape"))
        self.mark_pos = pos
        return self.mark_byte

    def read_more(self, size: int):
        """Drop the text before pos (done with), then decode `size` more bytes; sets eof at the end of the file."""
        self.byte_at(self.pos)
        self.text, self.pos, self.mark_pos = self.text[self.pos:], 0, 0
        chunk = self.handle.read(size)
        self.eof = not chunk
        self.text += self.utf8.decode(chunk, final=self.eof)

    def next_char(self) -> str:
        """The next character after whitespace (pos moves to it), or "" at the end of the file."""
        while True:
            self.pos = JSON_WHITESPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text) or self.eof:
                return self.text[self.pos:self.pos + 1]
            self.read_more(LLAVA_READ_BYTES)

    def element(self, index: int) -> LlavaElement:
        """The JSON value at pos (after next_char), read on until it is complete; a DataError where the file is
        not valid JSON there."""
        size = LLAVA_READ_BYTES
        while True:
            try:
                value, end = self.decoder.raw_decode(self.text, self.pos)
                # A number ending where the text read so far ends ("100." of "100.5") may go on in the next bytes.
                if NUMBER_CHARS.match(self.text, end).end() < len(self.text) or self.eof:
                    break
            except json.JSONDecodeError as error:
                unterminated = error.msg.startswith("Unterminated string")  # it runs to the end of the text
                if self.eof:
                    truncated = unterminated or error.pos >= len(self.text.rstrip())
                    raise self.invalid(index, error.pos, error.msg, truncated) from None
                if not (unterminated or error.pos >= len(self.text) - LLAVA_TRUNCATION_MARGIN):
                    raise self.invalid(index, error.pos, error.msg) from None
            except (ValueError, RecursionError) as error:  # an integer with too many digits, nesting too deep
                raise self.invalid(index, self.pos, f"{type(error).__name__}: {str(error)[:80]}") from None
            self.read_more(size)
            size *= 2
        text = self.text[self.pos:end]
        bad_byte = None
        if text.isascii():
            length = len(text)
        else:
            try:
                length = len(text.encode("utf-8"))
            except UnicodeEncodeError as error:  # a surrogate escape: a byte that is not UTF-8
                length = len(text.encode("utf-8", "surrogateescape"))
                bad_byte = self.byte_at(self.pos) + len(text[:error.start].encode("utf-8", "surrogateescape"))
        start_byte = self.byte_at(self.pos)
        self.mark_pos, self.mark_byte = end, start_byte + length
        self.pos = end
        return LlavaElement(index, start_byte, start_byte + length, value, bad_byte)

    def invalid(self, index: int, pos: int, reason: str, truncated: bool = False) -> "DataError":
        """The one-line error for invalid JSON at text[pos] inside element `index` (which starts at pos)."""
        start = self.byte_at(self.pos)
        if truncated:
            return DataError(f"{self.path}: the file ends inside record {index + 1} (which starts at byte {start}): "
                             f"truncated? A LLaVA file must be one complete JSON array")
        return DataError(f"{self.path}: invalid JSON in record {index + 1} at byte {self.byte_at(max(pos, self.pos))}"
                         f" ({reason}); a LLaVA file must be one JSON array")


def read_llava_array(path, start_byte: int = None, count: int = None, first_index: int = 0):
    """LlavaElement for each element of the JSON array in `path`, as a stream: memory holds the text read ahead
    (LLAVA_READ_BYTES) and one element, whatever the file's size.

    The whole file (start_byte None): `[`, the elements, `]` and nothing else, or a one-line DataError naming the
    file, the record and the byte. One unit of work: `count` elements from `start_byte` (where an element
    starts, as a whole-file pass found it), numbered from `first_index`.
    """
    stream = LlavaStream(path, start_byte or 0)
    name = Path(path).name
    try:
        index = first_index
        if start_byte is None:
            if stream.next_char() == "\ufeff":
                stream.pos += 1
            if stream.next_char() != "[":
                raise DataError(f"{path}: a LLaVA file must be one JSON array (it does not start with '[')")
            stream.pos += 1
            if stream.next_char() == "]":
                count = 0
        while count is None or index < first_index + count:
            stream.next_char()
            yield stream.element(index)
            index += 1
            if count is not None and index == first_index + count:
                break
            separator = stream.next_char()
            if separator == ",":
                stream.pos += 1
            elif separator == "]" and start_byte is None:
                break
            elif not separator:
                raise DataError(f"{path}: the file ends after record {index} (byte {stream.byte_at(stream.pos)}), "
                                f"before the closing ']': truncated? A LLaVA file must be one complete JSON array")
            else:
                raise DataError(f"{path}: expected ',' or ']' after record {index} at byte "
                                f"{stream.byte_at(stream.pos)}, found {separator!r} ({name} must be one JSON array)")
        if start_byte is None:
            stream.pos += 1  # the closing ']'
            if stream.next_char():
                raise DataError(f"{path}: text after the closing ']' of the array at byte "
                                f"{stream.byte_at(stream.pos)}; a LLaVA file must be one JSON array")
    finally:
        stream.close()


def llava_record_id(value):
    """A LLaVA record's `id` as one short line for messages (None where it has none): whitespace collapsed, no
    ': ' (which separates an origin from its reason), bytes that are not UTF-8 as backslash escapes."""
    record_id = value.get("id") if isinstance(value, dict) else None
    if record_id is None or isinstance(record_id, (dict, list)):
        return None
    shown = " ".join(str(record_id).split())[:RECORD_ID_CHARS].replace(": ", ":")
    return shown.encode("utf-8", "backslashreplace").decode("utf-8") or None


def llava_origin(name: str, number: int, record_id: str = None) -> str:
    """`file.json:record N (id X)`: the record's 1-based position in the array, and its id (llava_record_id)."""
    return f"{name}:record {number}" + (f" (id {record_id})" if record_id else "")


def llava_record(element: LlavaElement, name: str, images_path: Path):
    """One element of a LLaVA array -> (Record, None) or (None, DataProblem)."""
    obj = element.value
    origin = llava_origin(name, element.index + 1, llava_record_id(obj))
    if element.bad_byte is not None:
        return None, DataProblem(origin, f"not UTF-8 text (byte {element.bad_byte})", KIND_TEXT)
    if not isinstance(obj, dict):
        return None, DataProblem(origin, "a record must be a JSON object", KIND_JSON)
    names = obj.get("image")
    names = [] if names is None else [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None, DataProblem(origin, "'image' must be a file name (or a list of file names)", KIND_IMAGE_FIELD)
    names = [n.strip() for n in names if n.strip()]
    turns = obj.get("conversations")
    if not isinstance(turns, list) or not turns:
        return None, DataProblem(origin, "'conversations' must be a non-empty list of turns", KIND_CONVERSATIONS)
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return None, DataProblem(origin, f"turn {i} has no text 'value'", KIND_CONVERSATIONS)
        if not isinstance(turn.get("from"), str) or turn["from"] not in LLAVA_ROLES:
            return None, DataProblem(origin, f"turn {i} has 'from' {repr(turn.get('from'))[:40]}; expected one of "
                                             f"{', '.join(LLAVA_ROLES)}", KIND_ROLES)
    turns = [{"role": LLAVA_ROLES[turn["from"]], "content": turn["value"]} for turn in turns]
    messages, used, problem = check_record(turns, len(names))
    if problem:
        return None, DataProblem(origin, problem[1], problem[0])
    missing = [n for n in names if not is_file(images_path / n)]
    if missing:
        return None, DataProblem(origin, f"image file {missing[0]!r} not found in {images_path}", KIND_IMAGE_MISSING)
    return Record(messages, [str(images_path / n) for n in names[:used]], origin), None


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
