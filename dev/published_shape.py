"""Parquet files shaped like today's published data (pretrain_i2t.parquet, sft_i2t.parquet), at any row count.

For dev/bench_data.py and the tests: `conversations` (JSON string of [{role, content}]) and `image_bytes`
(binary), 256x256 JPEGs of about 16 KB, answers of 30-300 words, a share of text-only rows that carry an 8x8
black JPEG and no `<image>` (about 230K of the 2.9M SFT rows), a share of records whose stored first turn is
a system prompt, and row groups of a fixed size. The JPEGs come from a pool of distinct pre-encoded pictures
reused across rows (the published SFT file, too, repeats each image in several rows); encoding one per row
would make generating a 300K-row file take longer than everything it measures.
"""
import io
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from .synthetic import draw_scene, placeholder_jpeg, random_scene

PUBLISHED_IMAGE_SIZE = 256
TEXT_ONLY_FRACTION = 230 / 2900  # about 230K text-only rows of about 2.9M
SYSTEM_FRACTION = 0.2  # records that open with a stored system turn
ANSWER_WORDS = (30, 300)
ROW_GROUP_ROWS = 10_000
IMAGE_POOL_SIZE = 256
JPEG_QUALITY = 90
NOISE_STD = 6.5  # grain that brings a drawn picture to the published files' JPEG size (about 16 KB)
QUESTIONS = ("Describe this image in detail.", "What is shown in the picture?", "What colour is the shape?",
             "Give a short caption for this image.", "What is in the background?")
TEXT_QUESTIONS = ("Write a short story about a cat.", "Explain how rain forms.", "Give three tips for sleeping well.")
SYSTEM_PROMPTS = ("You are a careful visual assistant.", "Answer briefly and precisely.")
WORDS = np.array(("the a an of to and in is it that on for with as was at by this be from or are image picture "
                  "shows red blue green yellow small large circle square triangle star left right top bottom "
                  "light dark background colour shape near far bright soft round sharp corner edge middle centre "
                  "there which looks like appears seems some many one two three several people street tree sky "
                  "water building car table window door wall floor grass road cloud sun shadow").split())


def image_pool(size: int, seed: int) -> list:
    """`size` distinct 256x256 JPEGs: a drawn shape on a background plus grain."""
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    pool = []
    for _ in range(size):
        pixels = np.asarray(draw_scene(random_scene(rng), PUBLISHED_IMAGE_SIZE), dtype=np.float32)
        pixels = np.clip(pixels + noise.normal(0, NOISE_STD, pixels.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        pool.append(buffer.getvalue())
    return pool


def answer_text(rng: np.random.Generator) -> str:
    return " ".join(WORDS[rng.integers(0, len(WORDS), rng.integers(*ANSWER_WORDS, endpoint=True))]) + "."


def conversation(rng: np.random.Generator, text_only: bool, with_system: bool) -> str:
    """JSON text of one record's turns, with stored roles."""
    question = (TEXT_QUESTIONS if text_only else QUESTIONS)[rng.integers(0, 3)]
    if not text_only:
        question = f"<image>\n{question}" if rng.integers(0, 2) else f"{question}\n<image>"
    turns = [{"role": "system", "content": SYSTEM_PROMPTS[rng.integers(0, 2)]}] if with_system else []
    turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer_text(rng)}]
    return json.dumps(turns, ensure_ascii=False)


def write_published_shape(path, rows: int, seed: int = 0, text_only_fraction: float = TEXT_ONLY_FRACTION,
                          system_fraction: float = SYSTEM_FRACTION, row_group_rows: int = ROW_GROUP_ROWS,
                          pool_size: int = IMAGE_POOL_SIZE, progress=None) -> dict:
    """Write `rows` rows to `path`; returns what was written (rows, text-only rows, bytes, mean image bytes).

    progress: called with the rows of each row group written (a tqdm bar's update, say).
    """
    rng = np.random.default_rng(seed)
    pool, placeholder = image_pool(pool_size, seed), placeholder_jpeg()
    schema = pa.schema([("conversations", pa.string()), ("image_bytes", pa.binary())])
    text_only_total = 0
    with pq.ParquetWriter(str(path), schema) as writer:
        for start in range(0, rows, row_group_rows):
            count = min(row_group_rows, rows - start)
            text_only = rng.random(count) < text_only_fraction
            with_system = rng.random(count) < system_fraction
            picks = rng.integers(0, len(pool), count)
            texts = [conversation(rng, bool(t), bool(s)) for t, s in zip(text_only, with_system)]
            images = [placeholder if t else pool[p] for t, p in zip(text_only, picks)]
            writer.write_table(pa.table({"conversations": pa.array(texts, pa.string()),
                                         "image_bytes": pa.array(images, pa.binary())}, schema=schema))
            text_only_total += int(text_only.sum())
            if progress is not None:
                progress(count)
    return {"rows": rows, "text_only": text_only_total, "bytes": Path(path).stat().st_size,
            "mean_image_bytes": round(float(np.mean([len(b) for b in pool])))}
