"""Conversation records from Parquet files and `datasets.save_to_disk` folders, read through the `datasets`
library (Arrow, memory-mapped), in the LLaVA/MGM form or the messages form of data/conversations.py, with
images as paths (relative to data.image_root) or embedded bytes (the `datasets.Image` column type, a struct of
`bytes` and `path`, or a plain binary column).

Every record is checked when the data is opened, before any weight loads, exactly as JSON records are (the
same errors, naming the file and record index, or with data.on_bad_record=skip counted and left out). What the
check keeps is integer arrays (the usable rows, their length proxies, image and video counts, where each record
batch of the Arrow files lies): the records stay in the memory-mapped Arrow files and are parsed again when a
sample is drawn, reading only the record batch that holds it (data/arrow_rows.py), so a million records never
become a million Python objects, nor the whole file resident, in the parent or in a data worker (a worker
unpickles the arrays and the files' names).
"""
from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import tempfile
from array import array
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vlm_finetune.data.arrow_rows import BatchIndex, StreamRows, index_stream, stream_files
from vlm_finetune.data.conversations import BadRecord, ConversationDataset, load_conversations, messages_and_images
from vlm_finetune.data.grouping import IMAGE_WEIGHT, visual_items
from vlm_finetune.data.images import load_rgb
from vlm_finetune.data.sample import Sample, Video
from vlm_finetune.data.videos import BadVideo, is_video_file, parse_videos, probe_video
from vlm_finetune.errors import DataError

log = logging.getLogger(__name__)

PARQUET_SUFFIXES = (".parquet", ".pq")
# records converted to Python per read while checking: bounds the check's memory, whatever the table's size
CHECK_BATCH = 512


def is_table(path: str | Path) -> bool:
    """True for a Parquet file, a folder of Parquet shards or a `save_to_disk` folder (JSON/JSONL are not)."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() in PARQUET_SUFFIXES
    return path.is_dir() and (_is_saved_dataset(path) or bool(_parquet_shards(path)))


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()


def _parquet_shards(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in PARQUET_SUFFIXES and p.is_file())


def open_table(path: str | Path):
    """The records of `path` as an Arrow-formatted `datasets.Dataset` (rows come back as pyarrow tables: no
    column is decoded, embedded images stay bytes). Nothing is fetched from a hub."""
    import datasets

    path = Path(path)
    if path.is_dir() and _is_saved_dataset(path):
        try:
            table = datasets.load_from_disk(str(path))
        except Exception as err:  # noqa: BLE001 - datasets raises many kinds for a damaged folder
            raise DataError(f"{path}: cannot be read as a datasets.save_to_disk folder ({err})") from None
        if isinstance(table, datasets.DatasetDict):
            raise DataError(f"{path} holds several splits ({sorted(table)}); point data.path (and data.val_path) "
                            f"at one split's folder, e.g. {path}/{next(iter(table))}")
    else:
        files = [str(path)] if path.is_file() else _parquet_shards(path)
        if not files:
            raise DataError(f"{path} holds neither Parquet files nor a datasets.save_to_disk folder (state.json, "
                            "dataset_info.json); set data.path to a Parquet file or folder, a save_to_disk folder, "
                            "or a JSON/JSONL file")
        try:  # converted once into Arrow files in the datasets cache (HF_DATASETS_CACHE), then memory-mapped
            table = datasets.Dataset.from_parquet(files, cache_dir=os.environ.get("HF_DATASETS_CACHE"))
        except Exception as err:  # noqa: BLE001 - pyarrow and datasets raise many kinds for a bad file
            raise DataError(f"{path}: cannot be read as Parquet ({err})") from None
    return table.with_format("arrow")


def _image_bytes_or_path(entry, image_root: Path) -> bytes | Path:
    """An image entry as embedded bytes or a file path; BadRecord when it is neither."""
    if isinstance(entry, dict):  # datasets.Image's struct: bytes win, as datasets decodes it
        if entry.get("bytes") is not None:
            return bytes(entry["bytes"])
        entry = entry.get("path")
    if isinstance(entry, (bytes, bytearray, memoryview)):
        return bytes(entry)
    if isinstance(entry, str) and entry:
        return image_root / entry
    raise BadRecord(f"has an image entry that is neither a path nor embedded bytes ({type(entry).__name__})")


def _check_image(image: bytes | Path, label: str) -> None:
    """`label` says which (`image 0`, `frame 3 of video 1`), for the error."""
    what = f"{label} {image}" if isinstance(image, Path) else f"embedded {label}"
    if isinstance(image, Path) and not image.is_file():
        raise BadRecord(f"{what} does not exist (paths are relative to data.image_root)")
    try:
        with Image.open(image if isinstance(image, Path) else io.BytesIO(image)) as opened:
            opened.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise BadRecord(f"{what} is corrupt or not an image ({err})") from None


def _parse_row(raw: dict, image_root: Path, check_images: bool):
    """(messages, images, videos, video fps) of a row; images and frames as bytes or paths, a video file as its
    VideoFile (its header read, as it is whether or not `check_images`)."""
    messages, entries = messages_and_images(raw, image_entry=(str, dict, bytes))
    images = [_image_bytes_or_path(entry, image_root) for entry in entries]
    try:
        video_entries, fps = parse_videos(raw, messages)
        videos = [probe_video(_image_bytes_or_path(video, image_root), f"video {position}")
                  if is_video_file(video) else [_image_bytes_or_path(frame, image_root) for frame in video]
                  for position, video in enumerate(video_entries)]
    except BadVideo as err:
        raise BadRecord(str(err)) from None
    if check_images:
        for position, image in enumerate(images):
            _check_image(image, f"image {position}")
        for position, video in enumerate(videos):
            for number, frame in enumerate(video if isinstance(video, list) else []):
                _check_image(frame, f"frame {number} of video {position}")
    return messages, images, videos, fps


def _decode(image: bytes | Path):
    return load_rgb(image if isinstance(image, Path) else io.BytesIO(image))


class DatasetRows:
    """Row `i` of the table through datasets' own `Dataset` (opened when first read), for tables whose rows are
    not plain record batches of their files (data/arrow_rows.stream_files): opening it reads every batch header."""

    def __init__(self, path: str):
        self.path = path
        self._table = None

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.path, self._table = state["path"], None

    def row(self, i: int) -> dict:
        if self._table is None:
            self._table = open_table(self.path)
        return self._table[i].to_pylist()[0]


class TableConversations(torch.utils.data.Dataset):
    """Checked records of a memory-mapped table: row numbers, length proxies and counts are all that is held."""

    def __init__(self, table: StreamRows | DatasetRows, rows: np.ndarray, lengths: np.ndarray, images: np.ndarray,
                 videos: np.ndarray, source: str, image_root: Path):
        self.table = table
        self.rows = rows
        self._lengths = lengths
        self._images = images
        self._videos = videos
        self.source = source
        self.image_root = image_root

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, positions) -> TableConversations:
        positions = np.asarray(positions, dtype=np.int64)
        return TableConversations(self.table, self.rows[positions], self._lengths[positions],
                                  self._images[positions], self._videos[positions], self.source, self.image_root)

    def record_index(self, i: int) -> int:
        """The record's row in the source (what errors name)."""
        return int(self.rows[i])

    def image_counts(self) -> np.ndarray:
        return self._images

    def video_counts(self) -> np.ndarray:
        return self._videos

    def lengths(self) -> np.ndarray:
        """data.group_by_length's proxy, as ConversationDataset.lengths computes it."""
        return self._lengths

    def __getitem__(self, i: int) -> Sample:
        index = int(self.rows[i])
        raw = self.table.row(index)
        try:
            messages, images, videos, fps = _parse_row(raw, self.image_root, check_images=False)
            decoded = [_decode(image) for image in images]
            clips = [Video([_decode(frame) for frame in video], fps) if isinstance(video, list) else video
                     for video in videos]  # a VideoFile is read by the family's processor
        except (BadRecord, OSError, SyntaxError) as err:
            raise DataError(f"{self.source}: record {index}: {err}") from None
        return Sample(messages=messages, images=decoded, meta={"record": index}, videos=clips)


def load_table(path: str | Path, image_root: str | Path | None, on_bad_record: str = "error"
               ) -> tuple[TableConversations, int]:
    """Open and check every record of a table; returns (dataset, number skipped).

    The check runs in a short-lived process of its own (as does Parquet's one-time conversion into the datasets
    cache, which it starts): reading every record touches every page of the mapped file and leaves what the
    Arrow and Python allocators freed in the process that read (measured by `python -m vlm_finetune.bench
    tables`). This process gets the integer arrays and maps the table's files, reading none of them yet."""
    if on_bad_record not in ("error", "skip"):
        raise DataError(f"data.on_bad_record={on_bad_record!r}: use 'error' or 'skip'")
    path = Path(path)
    root = Path(image_root) if image_root else (path if path.is_dir() else path.parent)
    with tempfile.TemporaryDirectory(prefix="vlm_finetune_check_") as work:
        out = Path(work) / "checked.npz"
        code = "from vlm_finetune.data.sources import _check_child; _check_child()"
        done = subprocess.run([sys.executable, "-c", code, str(path), str(root), on_bad_record, str(out)],
                              capture_output=True, text=True, check=False)
        for line in done.stderr.splitlines():
            if line.startswith(CHILD_ERROR):
                raise DataError(line[len(CHILD_ERROR):].replace(NEWLINE, "\n"))
            if line.startswith("skipping "):
                log.warning("%s", line)
        if done.returncode != 0 or not out.is_file():
            raise DataError(f"{path}: checking the records failed:\n{done.stderr[-3000:]}")
        with np.load(out) as checked:
            arrays = [checked[name] for name in ("rows", "lengths", "images", "videos")]
            skipped = int(checked["skipped"])
            batches = BatchIndex.from_arrays(checked)
    table = StreamRows(batches) if batches is not None else DatasetRows(str(path))
    return TableConversations(table, *arrays, str(path), root), skipped


CHILD_ERROR = "vlm_finetune.DataError: "
NEWLINE = "\\n"


def _check_child() -> None:
    """`python -c` entry of load_table's checking process: argv = path, image root, on_bad_record, output."""
    import datasets

    datasets.disable_progress_bars()
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    path, root, on_bad_record, out = sys.argv[1:5]
    try:
        table = open_table(Path(path))
        arrays, skipped = check_table(table, Path(path), Path(root), on_bad_record)
    except DataError as err:
        print(CHILD_ERROR + str(err).replace("\n", NEWLINE), file=sys.stderr, flush=True)
        sys.exit(3)
    files = stream_files(table)
    batches = index_stream(files, len(table)) if files else None
    np.savez(out, skipped=skipped, **dict(zip(("rows", "lengths", "images", "videos"), arrays)),
             **(batches.arrays() if batches is not None else {}))


def check_table(table, path: Path, root: Path, on_bad_record: str) -> tuple[list[np.ndarray], int]:
    """Every record of `table` (open_table of `path`) checked: (rows, lengths, images, videos) of the usable ones,
    and the number skipped."""
    rows, lengths, images_per_row, videos_per_row = array("q"), array("q"), array("q"), array("q")  # machine ints
    skipped = 0
    for start in range(0, len(table), CHECK_BATCH):
        batch = table[start:start + CHECK_BATCH].to_pylist()
        for offset, raw in enumerate(batch):
            index = start + offset
            try:
                messages, images, videos, _ = _parse_row(raw, root, check_images=True)
            except BadRecord as err:
                if on_bad_record == "error":
                    raise DataError(f"{path}: record {index} {err}. Fix or remove the record, "
                                    "or set data.on_bad_record=skip to skip and count bad records") from None
                skipped += 1
                log.warning("skipping %s record %d: %s", path, index, err)
                continue
            rows.append(index)
            lengths.append(sum(len(m.content) for m in messages) + IMAGE_WEIGHT * visual_items(len(images), videos))
            images_per_row.append(len(images))
            videos_per_row.append(len(videos))
        del batch
    if not rows:
        raise DataError(f"{path}: no usable record ({skipped} skipped)")
    return [np.frombuffer(a, dtype=np.int64) for a in (rows, lengths, images_per_row, videos_per_row)], skipped


def _load(path, image_root, on_bad_record: str):
    if is_table(path):
        return load_table(path, image_root, on_bad_record)
    records, skipped = load_conversations(path, image_root, on_bad_record)
    return ConversationDataset(records, str(path)), skipped


def _subset(dataset, positions: np.ndarray):
    if isinstance(dataset, TableConversations):
        return dataset.subset(positions)
    return ConversationDataset([dataset.records[int(i)] for i in positions], dataset.source)


def build_table_datasets(path, val_path, image_root, on_bad_record: str, val_fraction: float, seed: int):
    """(train, val, stats) when data.path or data.val_path is a table (the other may be JSON/JSONL); the held-out
    split is drawn as build_conversation_datasets draws it, so a table and a JSON file of the same records give
    the same two sets."""
    train, skipped = _load(path, image_root, on_bad_record)
    stats = {"skipped_bad_records": skipped}
    if val_path:
        val, val_skipped = _load(val_path, image_root, on_bad_record)
        stats["skipped_bad_records"] += val_skipped
        return train, val, stats
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must lie in (0, 1) when data.val_path is not set")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).numpy()  # no Python ints
    n_val = max(1, round(len(train) * val_fraction))
    if n_val >= len(train):
        raise DataError(f"{path} has {len(train)} usable record(s): too few to hold out a validation set; "
                        "add records or set data.val_path")
    return _subset(train, np.sort(order[n_val:])), _subset(train, np.sort(order[:n_val])), stats
