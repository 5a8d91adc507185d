"""Prepared data: a dataset file checked, tokenised and indexed once, then memory-mapped by every process.

The published files have millions of rows (sft_i2t.parquet: about 2.9M). Holding a Python object per row
costs tens of KB of RAM and tens of minutes of start-up in every training process, so instead the first run
(in parallel, with a progress bar) writes, beside the data file:

    prepared/{stem}-{data key}/           data key: the file's path, size and mtime (+ the image folder of a
                                          JSONL or LLaVA file)
        images/manifest.json              row ranges of the units below
        images/unit-{n:05d}.arrow         Arrow IPC, uncompressed, one per parquet row group (JSONL, LLaVA: per
                                          8 MB): the `image_bytes` column as stored (JSONL, LLaVA: the image file
                                          paths; LLaVA also each record's `id`, for messages)
        tokens-{token key}/               token key: tokenizer.json, its special tokens, the image placeholder,
                                          PROMPT_FORMAT_VERSION and max_seq_len
            manifest.json                 counts, problem counts per kind and the first examples of each
            status.npy     int8  [rows]   STATUS_* of each data row
            row_length.npy int32 [rows]   tokens after the chat template, before the cut (-1: not tokenised)
            samples.npy    int64 [usable] data row of each usable sample, in file order
            lengths.npy    int32 [usable] tokens of each usable sample after the cut
            offsets.npy    int64 [usable + 1] where each usable sample's ids start in tokens.bin
            row_images.npy int16 [rows]   images each well-formed row uses (0: text-only or malformed)
            tokens.bin     uint16 (or uint32 for a vocabulary over 65536) ids, cut to max_seq_len

Every later run, every epoch, every DDP rank and scripts/check_data.py open these with np.load(mmap_mode="r")
and pyarrow memory maps: start-up is milliseconds, a process holds a few bytes per row, and the pages are
shared between processes through the page cache. Parquet itself has no random access below a row group (often
100 MB and more), hence the one-time copy of the image column to uncompressed Arrow IPC.

Builders take a lock that works on any filesystem and across machines (`BuildLock`: an atomic mkdir with a
heartbeat, not flock, which NFS, Lustre and FUSE mounts may keep per machine or refuse), so concurrent
processes (DDP ranks, torchrun nodes sharing the folder) build once and the others wait. A folder is built
under a temporary name of its own builder and renamed when complete, so a crash leaves nothing that is ever
read, and two builders at once (where a lock does not hold) never touch each other's files: the first rename
wins, the second builder drops its copy. Only a builder whose lock went stale (it died) has its leftovers
deleted, by the process that takes the lock over. A changed data file, tokenizer, prompt format or max_seq_len gives a new key and
folder; old folders are not read again (delete `prepared/` to free the space).
"""
import hashlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .processing import PROMPT_FORMAT_VERSION, TOKENIZER_CHAT_FORMAT
from .records import (CUT_ANSWER, CUT_IMAGE, FORMAT_JSONL, FORMAT_LLAVA, FORMAT_PARQUET, DataError, DataProblem,
                      Record, SampleEncoder, check_data_path, column_values, data_format, image_at, jsonl_record,
                      llava_origin, llava_record, llava_record_id, open_parquet, parquet_record, read_llava_array)

# Bump whenever the files above change meaning: every prepared folder is then rebuilt.
LAYOUT_VERSION = 1
CACHE_FOLDER = "prepared"
STATUS_OK, STATUS_MALFORMED, STATUS_CUT_IMAGE, STATUS_CUT_ANSWER, STATUS_BLANK = range(5)
CUT_STATUS = {CUT_IMAGE: STATUS_CUT_IMAGE, CUT_ANSWER: STATUS_CUT_ANSWER}
EXAMPLES_PER_KIND = 20  # problems kept per kind: enough to list the first few of all kinds in file order
PROBLEMS_SHOWN = 10  # problems spelled out in a message before the rest is summarised
READ_BATCH_ROWS = 2048  # parquet rows decoded at a time inside a row group: bounded memory, big enough batches
JSONL_UNIT_BYTES = 8 << 20  # of a JSONL or LLaVA file, per unit of work
KEY_CHARS = 16
WAIT_POLL_S = 0.5  # how often a process waiting for another one's build looks for it
LOCK_HEARTBEAT_S = 10.0  # how often a builder renews its lock
# A lock whose heartbeat has not moved for this long, on the waiter's own clock, belongs to a builder that died.
LOCK_STALE_S = 120.0
MAX_UINT16_VOCAB = 1 << 16


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:KEY_CHARS]


def data_key(path: Path, images_path, kind: str) -> str:
    """The data file's identity: resolved path, size and modification time (and the image folder of a JSONL or
    LLaVA file)."""
    stat = path.stat()
    key = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
           "images_path": str(Path(images_path).resolve()) if images_path else None, "layout": LAYOUT_VERSION}
    if kind == FORMAT_LLAVA:  # not read as JSON lines (as .json files were before LLaVA's format was known)
        key["format"] = kind
    return digest(key)


def token_key(encoder: SampleEncoder) -> str:
    """What the token ids depend on: the vocabulary and merges (tokenizer.json as loaded) with the special tokens
    the prompts use, the image placeholder, max_seq_len, the prompt format and the chat format."""
    tokenizer = encoder.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    vocabulary = digest({"tokenizer": hashlib.sha256(text.encode()).hexdigest(), "bos": tokenizer.bos_token,
                         "eos": tokenizer.eos_token, "added": len(tokenizer)})
    key = {"tokenizer": vocabulary, "image_special_token": encoder.image_special_token,
           "image_token_id": encoder.image_token_id, "max_seq_len": encoder.max_seq_len,
           "prompt_format": PROMPT_FORMAT_VERSION, "layout": LAYOUT_VERSION}
    if encoder.chat_format != "minimind2":  # MiniMind2's caches keep their names
        key["chat_format"] = encoder.chat_format
    if encoder.chat_format == TOKENIZER_CHAT_FORMAT:  # the prompts are that template's
        key["chat_template"] = tokenizer.chat_template
    return digest(key)


class BuildLock:
    """The right to build in one prepared folder, for processes on one machine or many sharing the folder.

    Taking it is creating the folder `path` (mkdir is atomic on every filesystem, network ones included). The
    holder writes `heartbeat` (its token and a counter) there every LOCK_HEARTBEAT_S from a thread. A waiter
    that sees the heartbeat unchanged for LOCK_STALE_S by its own clock (no clocks compared across machines)
    takes the lock over and deletes the dead builder's temporary folders, found by its token, and nothing else.
    """

    def __init__(self, path: Path, cleanup_folder: Path):
        self.path, self.cleanup_folder = Path(path), Path(cleanup_folder)
        self.token = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        seen, seen_since = None, time.monotonic()
        while True:
            try:
                self.path.mkdir()
                break
            except FileExistsError:
                beat = self._read_heartbeat()
                if beat != seen:
                    seen, seen_since = beat, time.monotonic()
                elif time.monotonic() - seen_since > LOCK_STALE_S:
                    self._take_over(seen)
                    seen, seen_since = None, time.monotonic()
                time.sleep(WAIT_POLL_S)
            except OSError as error:
                raise DataError(f"cannot lock the prepared-data folder: creating {self.path} failed "
                                f"({error.strerror or error}); pass a writable folder with --prepared_dir") from None
        try:
            self._write_heartbeat(0)
        except OSError as error:
            self._remove(self.path)
            raise DataError(f"cannot lock the prepared-data folder: this filesystem refused to write and rename a "
                            f"file in {self.path} ({error.strerror or error}); pass a folder on another filesystem "
                            f"with --prepared_dir") from None
        self._thread = threading.Thread(target=self._beat, daemon=True, name="prepared-data lock heartbeat")
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        beat = self._read_heartbeat()
        if beat is not None and beat[0] == self.token:  # still ours (not taken over meanwhile)
            self._remove(self.path)

    def _beat(self):
        count = 0
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            count += 1
            try:
                self._write_heartbeat(count)
            except OSError:  # taken over, or the filesystem hiccupped: the build itself stays safe
                pass

    def _write_heartbeat(self, count: int):
        tmp = self.path / f".heartbeat-{self.token}"
        tmp.write_text(f"{self.token} {count}")
        os.replace(tmp, self.path / "heartbeat")

    def _read_heartbeat(self):
        """(owner token, counter), or None while there is none (just created, or being removed)."""
        try:
            token, count = (self.path / "heartbeat").read_text().split()
            return token, int(count)
        except (OSError, ValueError):
            return None

    def _take_over(self, stale_beat):
        """Move the stale lock aside (atomic: of several waiters, one succeeds) and delete what its owner left."""
        aside = self.path.with_name(f"{self.path.name}.stale-{self.token}")
        try:
            os.rename(self.path, aside)
        except OSError:  # another waiter took it over first
            return
        if stale_beat is not None:
            for leftover in self.cleanup_folder.glob(f".*-building-{stale_beat[0]}"):
                shutil.rmtree(leftover, ignore_errors=True)
        self._remove(aside)

    @staticmethod
    def _remove(folder: Path):
        aside = folder.with_name(f"{folder.name}.removed-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(folder, aside)
        except OSError:
            return
        shutil.rmtree(aside, ignore_errors=True)


def publish(tmp: Path, final: Path) -> bool:
    """Rename a complete temporary folder to its final name. False (and `tmp` deleted) when another builder
    published the same folder first."""
    try:
        os.rename(tmp, final)
        return True
    except OSError as error:
        if (final / "manifest.json").is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        if final.exists():
            raise DataError(f"{final} exists but is incomplete (no manifest.json): delete it and run again") from None
        raise DataError(f"cannot rename {tmp.name} to {final} ({error.strerror or error}): the prepared data needs "
                        f"a filesystem that renames folders; pass another with --prepared_dir") from None


# ----------------------------------------------------------------------------------------- units of work

@dataclass
class Unit:
    index: int
    first_row: int
    rows: int
    start_byte: int = 0  # JSONL and LLaVA only
    stop_byte: int = 0


def parquet_units(data_path: Path):
    """One unit per row group."""
    metadata = open_parquet(data_path).metadata
    units, first = [], 0
    for index in range(metadata.num_row_groups):
        rows = metadata.row_group(index).num_rows
        units.append(Unit(index, first, rows))
        first += rows
    return units


def jsonl_units(data_path: Path, unit_bytes: int = None):
    """Byte ranges of about `unit_bytes` (default JSONL_UNIT_BYTES), cut after a newline; rows are lines (blank
    ones included)."""
    unit_bytes = unit_bytes or JSONL_UNIT_BYTES
    units, first_row, start = [], 0, 0
    size = data_path.stat().st_size
    with open(data_path, "rb") as handle:
        while start < size:
            handle.seek(min(start + unit_bytes, size))
            handle.readline()  # to the end of the line the cut falls in
            stop = min(handle.tell(), size) if start + unit_bytes < size else size
            handle.seek(start)
            chunk = handle.read(stop - start)
            rows = chunk.count(b"\n") + (0 if chunk.endswith(b"\n") else 1)
            units.append(Unit(len(units), first_row, rows, start, stop))
            first_row, start = first_row + rows, stop
    return units


def llava_units(data_path: Path, unit_bytes: int = None):
    """Runs of whole records of about `unit_bytes` (default JSONL_UNIT_BYTES), found by one streaming pass over
    the array (which also refuses a file that is not one valid JSON array, before any worker starts); rows are
    the array's elements."""
    unit_bytes = unit_bytes or JSONL_UNIT_BYTES
    units = []
    for element in read_llava_array(data_path):
        if units and element.start_byte - units[-1].start_byte < unit_bytes:
            units[-1].rows += 1
            units[-1].stop_byte = element.stop_byte
        else:
            units.append(Unit(len(units), element.index, 1, element.start_byte, element.stop_byte))
    return units


# --------------------------------------------------------------------------------------- the worker side

@dataclass
class PrepareJob:
    """What every worker needs (inherited by forked workers, pickled for spawned ones)."""
    data_path: Path
    kind: str  # FORMAT_PARQUET, FORMAT_JSONL or FORMAT_LLAVA (dataset/records.py data_format)
    images_path: Path  # JSONL or LLaVA image folder
    encoder: SampleEncoder
    token_dtype: str
    images_dir: Path = None  # where to write the image units; None when they exist already


@dataclass
class UnitResult:
    unit: Unit
    status: np.ndarray  # int8 [rows]
    row_length: np.ndarray  # int32 [rows]
    row_images: np.ndarray  # int16 [rows]
    lengths: np.ndarray  # int32 [usable rows]
    tokens: np.ndarray  # token_dtype [sum of lengths]
    problems: dict = field(default_factory=dict)  # kind -> [count, [examples as "origin: reason"]]
    text_only: int = 0


class UnitBuilder:
    """Collects one unit's rows: checks now, tokenisation in batches."""

    def __init__(self, job: PrepareJob, unit: Unit):
        self.job, self.unit = job, unit
        self.status = np.full(unit.rows, STATUS_BLANK, dtype=np.int8)
        self.row_length = np.full(unit.rows, -1, dtype=np.int32)
        self.row_images = np.zeros(unit.rows, dtype=np.int16)
        self.pending = []  # (row offset in the unit, Record)
        self.problems = {}
        self.kept_lengths, self.kept_tokens = [], []
        self.text_only = 0

    def add(self, offset: int, record: Record, problem: DataProblem):
        if problem is not None:
            self.status[offset] = STATUS_MALFORMED
            entry = self.problems.setdefault(problem.kind, [0, []])  # [count, first examples as "origin: reason"]
            entry[0] += 1
            if len(entry[1]) < EXAMPLES_PER_KIND:
                entry[1].append(str(problem))
        elif record is not None:
            self.pending.append((offset, record))

    def encode_pending(self):
        samples = self.job.encoder.encode_chats([(r.conversations, len(r.images)) for _, r in self.pending],
                                                dtype=self.job.token_dtype)
        for (offset, record), sample in zip(self.pending, samples):
            self.row_length[offset] = sample.length
            self.row_images[offset] = len(record.images)
            if sample.cut is not None:
                self.status[offset] = CUT_STATUS[sample.cut]
                continue
            self.status[offset] = STATUS_OK
            self.kept_lengths.append(len(sample.ids))
            self.kept_tokens.append(sample.ids)
            self.text_only += not record.images
        self.pending = []

    def result(self) -> UnitResult:
        dtype = np.dtype(self.job.token_dtype)
        tokens = np.concatenate(self.kept_tokens) if self.kept_tokens else np.zeros(0, dtype=dtype)
        return UnitResult(self.unit, self.status, self.row_length, self.row_images,
                          np.array(self.kept_lengths, dtype=np.int32), tokens, self.problems, self.text_only)


def prepare_parquet_unit(job: PrepareJob, unit: Unit) -> UnitResult:
    import pyarrow as pa

    builder = UnitBuilder(job, unit)
    writer = None
    offset = 0
    try:
        for batch in read_row_group(job.data_path, unit.index):
            images = batch.column(1)
            for i, text in enumerate(column_values(batch.column(0))):
                record, problem = parquet_record(text, images[i], unit.first_row + offset + i, job.data_path.name)
                builder.add(offset + i, record, problem)
            builder.encode_pending()
            if job.images_dir is not None:
                if writer is None:
                    writer = pa.ipc.new_file(str(unit_file(job.images_dir, unit.index)),
                                             pa.schema([("image_bytes", images.type)]))
                writer.write_batch(pa.record_batch([images], names=["image_bytes"]))
            offset += batch.num_rows
    finally:
        if writer is not None:
            writer.close()
    if job.images_dir is not None and writer is None:  # an empty row group still gets its (empty) file
        write_ipc(unit_file(job.images_dir, unit.index), {"image_bytes": pa.array([], pa.binary())})
    return builder.result()


def read_row_group(data_path: Path, index: int):
    """Record batches of one row group; a file damaged there is a one-line DataError, not a traceback."""
    import pyarrow as pa

    batches = open_parquet(data_path).iter_batches(batch_size=READ_BATCH_ROWS, row_groups=[index],
                                                   columns=["conversations", "image_bytes"])
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as error:
            raise DataError(f"{data_path}: row group {index} cannot be read ({error})") from None
        yield batch


def prepare_jsonl_unit(job: PrepareJob, unit: Unit) -> UnitResult:
    import pyarrow as pa

    builder = UnitBuilder(job, unit)
    with open(job.data_path, "rb") as handle:
        handle.seek(unit.start_byte)
        lines = handle.read(unit.stop_byte - unit.start_byte).split(b"\n")[:unit.rows]
    paths = []
    for offset, raw in enumerate(lines):
        record, problem = jsonl_record(raw, unit.first_row + offset + 1, job.data_path.name, job.images_path)
        builder.add(offset, record, problem)
        paths.append(record.images if record is not None else [])
    builder.encode_pending()
    if job.images_dir is not None:
        write_ipc(unit_file(job.images_dir, unit.index), {"image_paths": pa.array(paths, pa.list_(pa.string()))})
    return builder.result()


def prepare_llava_unit(job: PrepareJob, unit: Unit) -> UnitResult:
    import pyarrow as pa

    builder = UnitBuilder(job, unit)
    paths, record_ids = [], []
    for element in read_llava_array(job.data_path, unit.start_byte, unit.rows, unit.first_row):
        record, problem = llava_record(element, job.data_path.name, job.images_path)
        builder.add(element.index - unit.first_row, record, problem)
        paths.append(record.images if record is not None else [])
        record_ids.append(llava_record_id(element.value))
    builder.encode_pending()
    if job.images_dir is not None:
        write_ipc(unit_file(job.images_dir, unit.index), {"image_paths": pa.array(paths, pa.list_(pa.string())),
                                                          "record_id": pa.array(record_ids, pa.string())})
    return builder.result()


def write_ipc(path: Path, columns: dict):
    """One Arrow IPC file of `columns` (name -> pyarrow array)."""
    import pyarrow as pa

    batch = pa.record_batch(list(columns.values()), names=list(columns))
    with pa.ipc.new_file(str(path), batch.schema) as writer:
        writer.write_batch(batch)


def unit_file(images_dir: Path, index: int) -> Path:
    return Path(images_dir) / f"unit-{index:05d}.arrow"


_WORKER_JOB = None  # the job of a pool worker process, set once by its initializer


def _init_worker(job):
    global _WORKER_JOB
    _WORKER_JOB = job


def _run_unit(unit):
    return FORMATS[_WORKER_JOB.kind].prepare_unit(_WORKER_JOB, unit)


@dataclass(frozen=True)
class DataFormat:
    units: object  # data path -> [Unit]
    prepare_unit: object  # (PrepareJob, Unit) -> UnitResult
    image_folder: bool  # images are files under --images_path (else bytes inside the data file)


FORMATS = {  # by dataset/records.py data_format
    FORMAT_PARQUET: DataFormat(parquet_units, prepare_parquet_unit, image_folder=False),
    FORMAT_JSONL: DataFormat(jsonl_units, prepare_jsonl_unit, image_folder=True),
    FORMAT_LLAVA: DataFormat(llava_units, prepare_llava_unit, image_folder=True),
}


# --------------------------------------------------------------------------------------- the parent side

def run_units(job: PrepareJob, units, workers: int):
    """UnitResults in unit order; `workers` processes (forked where possible), or this one for 1."""
    if workers <= 1 or len(units) <= 1:
        prepare = FORMATS[job.kind].prepare_unit
        for unit in units:
            yield prepare(job, unit)
        return
    import multiprocessing

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    # Each worker tokenises in its own thread; the Rust tokenizer's thread pool would only compete with them.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with multiprocessing.get_context(method).Pool(min(workers, len(units)), initializer=_init_worker,
                                                      initargs=(job,)) as pool:
            yield from pool.imap(_run_unit, units)
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def build_tokens(job: PrepareJob, units, out_dir: Path, workers: int, show_progress: bool) -> dict:
    """Run every unit, stream the token ids to tokens.bin, write the index arrays and the manifest."""
    from tqdm import tqdm

    statuses, row_lengths, row_images, lengths = [], [], [], []
    problems, text_only, token_count = {}, 0, 0
    with open(out_dir / "tokens.bin", "wb") as tokens_file, \
            tqdm(total=sum(u.rows for u in units), desc=f"preparing {job.data_path.name}", unit="rows",
                 unit_scale=True, disable=not show_progress, mininterval=1.0, dynamic_ncols=True) as bar:
        for result in run_units(job, units, workers):
            statuses.append(result.status)
            row_lengths.append(result.row_length)
            row_images.append(result.row_images)
            lengths.append(result.lengths)
            tokens_file.write(result.tokens.tobytes())
            token_count += len(result.tokens)
            text_only += result.text_only
            for kind, (count, examples) in result.problems.items():
                entry = problems.setdefault(kind, [0, []])
                entry[0] += count
                entry[1] += examples[:EXAMPLES_PER_KIND - len(entry[1])]
            bar.update(result.unit.rows)
    status = np.concatenate(statuses) if statuses else np.zeros(0, dtype=np.int8)
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int32)
    np.save(out_dir / "status.npy", status)
    np.save(out_dir / "row_length.npy", np.concatenate(row_lengths) if row_lengths else np.zeros(0, np.int32))
    np.save(out_dir / "samples.npy", np.flatnonzero(status == STATUS_OK).astype(np.int64))
    np.save(out_dir / "lengths.npy", lengths)
    np.save(out_dir / "offsets.npy", np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))
    np.save(out_dir / "row_images.npy", np.concatenate(row_images) if row_images else np.zeros(0, np.int16))
    return {"rows": int(len(status)), "records": int((status != STATUS_BLANK).sum()),
            "malformed": int((status == STATUS_MALFORMED).sum()),
            "cut_image": int((status == STATUS_CUT_IMAGE).sum()),
            "cut_answer": int((status == STATUS_CUT_ANSWER).sum()),
            "usable": int((status == STATUS_OK).sum()), "text_only": int(text_only), "tokens": int(token_count),
            "token_dtype": job.token_dtype, "problems": problems}


def prepare_dataset(data_path, tokenizer, image_special_token, image_token_id, max_seq_len, images_path=None,
                    cache_dir=None, workers=None, log=print, may_build=True,
                    chat_format="minimind2") -> "PreparedData":
    """The prepared form of `data_path` (module docstring): opened from the cache, or built first.

    log: where progress and the summary of a build go (None: quiet, as on every rank but 0).
    may_build: False makes this process wait for another one to build it (DDP ranks other than the one builder
    per prepared folder), so that the process that shows progress is the one doing the work.
    """
    path = Path(data_path)
    check_data_path(path)
    kind = data_format(path)
    images_path = (Path(images_path) if images_path else path.parent) if FORMATS[kind].image_folder else None
    data_dir = prepared_root(path, cache_dir) / f"{path.stem}-{data_key(path, images_path, kind)}"
    encoder = SampleEncoder(tokenizer, image_special_token, image_token_id, max_seq_len, chat_format)
    tokens_dir = data_dir / f"tokens-{token_key(encoder)}"
    if not may_build:
        while not (tokens_dir / "manifest.json").is_file():
            time.sleep(WAIT_POLL_S)
    if not (tokens_dir / "manifest.json").is_file():
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DataError(f"cannot create the prepared-data folder {data_dir} ({error.strerror or error}); "
                            f"pass a writable folder with --prepared_dir") from None
        with BuildLock(data_dir.with_name(data_dir.name + ".build-lock"), data_dir) as lock:
            if not (tokens_dir / "manifest.json").is_file():  # another process may have built it meanwhile
                build(path, kind, images_path, data_dir, tokens_dir, encoder, workers or os.cpu_count() or 1, log,
                      lock.token)
    return PreparedData(path, kind, data_dir, tokens_dir, encoder)


def prepared_root(data_path, cache_dir=None) -> Path:
    """Where the prepared folders of `data_path` go: --prepared_dir, else prepared/ beside the data file."""
    return Path(cache_dir) if cache_dir else Path(data_path).parent / CACHE_FOLDER


def build(path, kind, images_path, data_dir, tokens_dir, encoder: SampleEncoder, workers, log, builder: str):
    """Build tokens_dir (and the image units when data_dir has none yet) under temporary names of this
    `builder` (BuildLock.token), then rename them; another builder's files are never touched."""
    started, cpu_started = time.time(), cpu_seconds()
    units = FORMATS[kind].units(path)
    images_dir = data_dir / "images"
    images_tmp = None
    if not (images_dir / "manifest.json").is_file():
        images_tmp = data_dir / f".images-building-{builder}"
        images_tmp.mkdir()
    tokens_tmp = data_dir / f".{tokens_dir.name}-building-{builder}"
    tokens_tmp.mkdir()
    token_dtype = "uint16" if len(encoder.tokenizer) <= MAX_UINT16_VOCAB else "uint32"
    job = PrepareJob(path, kind, images_path, encoder, token_dtype, images_tmp)
    try:
        manifest = build_tokens(job, units, tokens_tmp, workers, log is not None)
        if images_tmp is not None:
            (images_tmp / "manifest.json").write_text(json.dumps(
                {"kind": kind, "units": [[u.first_row, u.rows] for u in units]}))
            publish(images_tmp, images_dir)
        elapsed = time.time() - started
        manifest.update(max_seq_len=encoder.max_seq_len, data_path=str(path), seconds=round(elapsed, 2),
                        rows_per_second=round(manifest["rows"] / max(elapsed, 1e-9), 1),
                        cpu_seconds=round(cpu_seconds() - cpu_started, 2), workers=workers)
        (tokens_tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        publish(tokens_tmp, tokens_dir)
    finally:
        for tmp in (images_tmp, tokens_tmp):
            if tmp is not None and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    if log is not None:
        log(f"prepared {path.name}: {manifest['rows']} rows in {elapsed:.1f}s ({manifest['rows_per_second']:.0f} "
            f"rows/s, {workers} worker(s), {manifest['cpu_seconds']:.1f} CPU-s) -> {tokens_dir}")


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool's workers), user + system."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# ---------------------------------------------------------------------------------------- reading it back

class ImageStore:
    """Image bytes by (row, slot) from the memory-mapped units. Picklable: each process maps files itself."""

    def __init__(self, data_path: Path, kind: str, images_dir: Path):
        self.data_path, self.kind, self.images_dir = Path(data_path), kind, Path(images_dir)
        units = json.loads((self.images_dir / "manifest.json").read_text())["units"]
        self.unit_first_rows = np.array([first for first, _ in units], dtype=np.int64)
        self._tables = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tables"] = {}
        return state

    def _value(self, row: int, column: int = 0):
        import pyarrow as pa

        unit = int(np.searchsorted(self.unit_first_rows, row, side="right")) - 1
        if unit not in self._tables:
            reader = pa.ipc.open_file(pa.memory_map(str(unit_file(self.images_dir, unit)), "r"))
            self._tables[unit] = reader.read_all()  # zero-copy over the memory map
        return self._tables[unit].column(column)[row - int(self.unit_first_rows[unit])]

    def refs(self, row: int, count: int) -> list:
        """The references of a row's `count` used images: file paths (JSONL, LLaVA) or (row, slot) (parquet)."""
        if FORMATS[self.kind].image_folder:
            return self._value(row).as_py()[:count]
        return [(row, slot) for slot in range(count)]

    def record_id(self, row: int):
        """A LLaVA record's `id` as text (None where it has none)."""
        return self._value(row, column=1).as_py()

    def image_bytes(self, ref):
        if isinstance(ref, str):
            return Path(ref).read_bytes()
        row, slot = ref
        return image_at(self._value(row), slot)

    def image_name(self, ref):
        return Path(ref).name if isinstance(ref, str) else f"image_bytes[{ref[1]}]"


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


def listed(problems, total: int, limit: int = PROBLEMS_SHOWN) -> str:
    """Indented lines, one per problem, the rest (of `total`) summarised."""
    shown = "\n".join(f"  {p}" for p in problems[:limit])
    return shown + (f"\n  ... and {total - min(limit, len(problems))} more" if total > limit else "")


class PreparedData:
    """The prepared folders of one data file, memory-mapped (module docstring), and the encoder that made them."""

    def __init__(self, data_path: Path, kind: str, data_dir: Path, tokens_dir: Path, encoder: SampleEncoder):
        self.opened_with = (data_path, kind, data_dir, tokens_dir, encoder)
        self.data_path, self.kind, self.folder = Path(data_path), kind, Path(tokens_dir)
        self.encoder = encoder
        self.manifest = json.loads((self.folder / "manifest.json").read_text())
        self.images = ImageStore(data_path, kind, Path(data_dir) / "images")

        def load(name):
            return np.load(self.folder / name, mmap_mode="r", allow_pickle=False)

        self.status, self.row_length = load("status.npy"), load("row_length.npy")
        self.samples, self.lengths, self.offsets = load("samples.npy"), load("lengths.npy"), load("offsets.npy")
        self.row_images = load("row_images.npy")
        token_file = self.folder / "tokens.bin"
        dtype = np.dtype(self.manifest["token_dtype"])
        self.tokens = (np.memmap(token_file, dtype=dtype, mode="r") if self.manifest["tokens"]
                       else np.zeros(0, dtype=dtype))

    def __getstate__(self):
        return {"opened_with": self.opened_with}  # spawned DataLoader workers map the files again, not copy them

    def __setstate__(self, state):
        self.__init__(*state["opened_with"])

    def __len__(self):
        return len(self.samples)

    def token_ids(self, index: int) -> np.ndarray:
        """int64 ids of usable sample `index` (a copy out of the memory map)."""
        return self.tokens[int(self.offsets[index]):int(self.offsets[index + 1])].astype(np.int64)

    def origin(self, row: int) -> str:
        name = self.data_path.name
        if self.kind == FORMAT_LLAVA:
            return llava_origin(name, row + 1, self.images.record_id(row))
        return f"{name}:row {row}" if self.kind == FORMAT_PARQUET else f"{name}:{row + 1}"

    def problems(self):
        """The kept examples of malformed rows as DataProblems, in file order, and the total count."""
        found = []
        for kind, (_, examples) in self.manifest["problems"].items():
            for example in examples:
                origin, _, reason = example.partition(": ")
                found.append(DataProblem(origin, reason, kind))
        return sorted(found, key=lambda p: row_number(p.origin)), self.manifest["malformed"]

    def cut(self, limit: int = EXAMPLES_PER_KIND):
        """DataProblems for the first `limit` samples of each kind left out at max_seq_len, in file order."""
        max_seq_len = self.manifest["max_seq_len"]
        found = []
        for status, what in ((STATUS_CUT_IMAGE, "an image does not fit"),
                             (STATUS_CUT_ANSWER, "the answer is cut entirely")):
            for row in np.flatnonzero(np.asarray(self.status) == status)[:limit]:
                found.append(DataProblem(self.origin(int(row)), f"{what} at max_seq_len {max_seq_len} "
                                                                f"({int(self.row_length[row])} tokens)"))
        return sorted(found, key=lambda p: row_number(p.origin))

    def check(self, skip_bad_samples: bool, log=print) -> DatasetStats:
        """Training's start-up check: malformed records stop it with a DataError listing them, unless
        skip_bad_samples leaves them out (counted); rank 0 (`log`) says what is usable and lists the samples left
        out at max_seq_len; no usable sample at all is a DataError."""
        counts = self.manifest
        problems, malformed = self.problems()
        stats = DatasetStats(records=counts["records"], bad_records=malformed,
                             image_cut_by_max_seq_len=counts["cut_image"],
                             answer_cut_by_max_seq_len=counts["cut_answer"], text_only=counts["text_only"],
                             problems=problems, cut=self.cut())
        name = self.data_path.name
        if malformed and not skip_bad_samples:
            raise DataError(f"{name}: {malformed} malformed record(s):\n{listed(problems, malformed)}\n"
                            f"Fix them (check with `python -m scripts.check_data`), or pass --skip_bad_samples to "
                            f"leave them out.")
        if log is not None:
            log(f"{name}: {stats.summary()}")
            cut_total = stats.image_cut_by_max_seq_len + stats.answer_cut_by_max_seq_len
            if cut_total:
                log(f"left out at max_seq_len {counts['max_seq_len']} ({cut_total}):\n{listed(stats.cut, cut_total)}")
        if not len(self):
            raise DataError(f"{self.data_path}: no usable sample ({stats.summary()})")
        return stats


def row_number(origin: str) -> int:
    """Sort key: the line, row or record number that ends every origin (before a LLaVA record's id)."""
    tail = origin.split(" (id ", 1)[0].rsplit(" ", 1)[-1].rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class RecordView:
    """`records[i]`: usable sample i as a Record without its text (origin, image references), made on demand from
    the prepared data."""

    def __init__(self, prepared: PreparedData):
        self.prepared = prepared

    def __len__(self):
        return len(self.prepared)

    def __getitem__(self, index):
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        row = int(self.prepared.samples[index])
        return Record(None, self.prepared.images.refs(row, int(self.prepared.row_images[row])),
                      self.prepared.origin(row))
