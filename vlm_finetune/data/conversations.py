"""Conversation data from JSON / JSONL files, in the LLaVA/MGM form or the messages form.

LLaVA/MGM: `{"image": "a.jpg" | ["a.jpg", ...],
            "conversations": [{"from": "human"|"gpt"|"system", "value": "<image>\\n..."}]}`
messages:  `{"images": ["a.jpg", ...], "messages": [{"role": "user"|"assistant"|"system", "content": "<image>..."}]}`
(`content` may also be a list of `{"type": "text", "text": ...}` / `{"type": "image"}` parts); videos as in
data/videos.py.

Every record is checked when the file is read, before any weight loads: a bad record raises a
DataError naming the file and the record index, or with `on_bad_record="skip"` is counted and left out.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from vlm_finetune.data.grouping import IMAGE_WEIGHT, visual_items
from vlm_finetune.data.images import load_rgb, open_checked
from vlm_finetune.data.rules import generation_problem, placeholder_problem
from vlm_finetune.data.sample import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Message, Sample, Video, VideoFile
from vlm_finetune.data.videos import BadVideo, is_video_file, parse_videos, probe_video
from vlm_finetune.errors import DataError

log = logging.getLogger(__name__)

ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class ConversationRecord:
    messages: list[Message]
    image_paths: list[Path]
    index: int  # position in the source file, for error messages
    video_frames: list[list[Path] | VideoFile] = field(default_factory=list)  # each video's frame files, or its file
    video_fps: float = 2.0


class BadRecord(Exception):
    pass


class UnreadableLine(dict):
    """Stands in for a JSONL line that is not JSON: a bad record like any other (skipped under
    data.on_bad_record=skip, an error naming the line otherwise)."""


def read_records(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        raise DataError(f"data file {path} is a folder; set data.path (and data.val_path) to a JSON or JSONL file "
                        "(images go in data.image_root)")
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; set data.path (and data.val_path) to a JSON or JSONL file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a UTF-8 byte-order mark (Windows editors write one) is not content
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} is not UTF-8 (byte {err.start}: {raw[err.start:err.start + 1]!r}); "
                        "save the file as UTF-8") from None
    if path.suffix == ".jsonl":
        records = []
        for line_number, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    records.append(UnreadableLine(line=line_number + 1, error=str(err)))
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err}); JSON files hold a list of records, "
                        "JSONL files (.jsonl) one record per line") from None
    if not isinstance(data, list):
        raise DataError(f"{path} must hold a JSON list of records, found {type(data).__name__}")
    return data


def _content_text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append(str(part.get("text", "")))
            elif kind == "image":
                parts.append(IMAGE_PLACEHOLDER)
            elif kind == "video":
                parts.append(VIDEO_PLACEHOLDER)
            else:
                raise BadRecord(f"content part {part!r} is not {{'type': 'text'}}, {{'type': 'image'}} or "
                                "{'type': 'video'}")
        return "".join(parts)
    raise BadRecord(f"message content must be a string or a list of parts, found {type(content).__name__}")


def parse_record(raw: dict, index: int, image_root: Path) -> ConversationRecord:
    messages, images = messages_and_images(raw)
    try:
        videos, fps = parse_videos(raw, messages)
    except BadVideo as err:
        raise BadRecord(str(err)) from None
    frames: list[list[Path] | VideoFile] = []
    for position, video in enumerate(videos):
        if is_video_file(video):
            if not isinstance(video, str):
                raise BadRecord(f"video {position} must be a path to a video file or a list of frame paths")
            try:
                frames.append(probe_video(image_root / video, f"video {position}"))
            except BadVideo as err:
                raise BadRecord(str(err)) from None
        elif any(not isinstance(frame, str) for frame in video):
            raise BadRecord("video frames must be image paths")
        else:
            frames.append([image_root / frame for frame in video])
    paths = [image_root / str(p) for p in images]
    for p in paths + [f for video in frames if isinstance(video, list) for f in video]:
        if not p.is_file():
            raise BadRecord(f"image {p} does not exist (paths are relative to data.image_root={image_root})")
        try:
            with open_checked(p) as img:  # size limits the processors enforce
                img.verify()
        except DataError as err:
            raise BadRecord(str(err)) from None
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise BadRecord(f"image {p} is corrupt or not an image ({err})") from None
    return ConversationRecord(messages, paths, index, frames, fps)


def messages_and_images(raw: dict, image_entry: type | tuple[type, ...] = str) -> tuple[list[Message], list]:
    """A record's messages and its image entries (paths here; tables may also hold embedded bytes), checked for
    form and placeholder count but not opened."""
    if not isinstance(raw, dict):
        raise BadRecord(f"is a {type(raw).__name__}, not an object")
    if "conversations" in raw:
        turns = raw["conversations"]
        images = raw.get("image", raw.get("images", []))
        key_role, key_text = "from", "value"
    elif "messages" in raw:
        turns = raw["messages"]
        images = raw.get("images", raw.get("image", []))
        key_role, key_text = "role", "content"
    else:
        raise BadRecord("has neither 'conversations' (LLaVA/MGM form) nor 'messages'")
    if not isinstance(turns, list) or not turns:
        raise BadRecord("has an empty or non-list conversation")
    messages = []
    for turn_index, turn in enumerate(turns):
        if not isinstance(turn, dict) or key_role not in turn or key_text not in turn:
            raise BadRecord(f"turn {turn_index} lacks '{key_role}' or '{key_text}'")
        role = ROLE_ALIASES.get(str(turn[key_role]).lower())
        if role is None:
            raise BadRecord(f"turn {turn_index} has unknown role {turn[key_role]!r} "
                            f"(known: {sorted(ROLE_ALIASES)})")
        messages.append(Message(role, _content_text(turn[key_text])))
    if not any(m.role == "assistant" for m in messages):
        raise BadRecord("has no assistant reply to learn from")
    if images is None:
        images = []
    if isinstance(images, image_entry) and not isinstance(images, list):
        images = [images]
    if not isinstance(images, list):
        raise BadRecord("'image'/'images' must be a path or a list of paths")
    problem = placeholder_problem(messages, len(images))  # the processors' own rule (data/rules.py)
    if problem is not None:
        raise BadRecord(problem)
    return messages, images


def _bad(path, index: int, problem: str, on_bad_record: str) -> None:
    """A bad record: a DataError naming file, record and fix, or (skip) a warning; the caller counts it."""
    if on_bad_record == "error":
        raise DataError(f"{path}: record {index} {problem}. Fix or remove the record, "
                        "or set data.on_bad_record=skip to skip and count bad records")
    log.warning("skipping %s record %d: %s", path, index, problem)


def evaluable(records: list[ConversationRecord], source, on_bad_record: str) -> tuple[list[ConversationRecord], int]:
    """The validation records whose answer can be generated and scored (data/rules.generation_problem), checked
    here rather than at the first validation; returns (records kept, number skipped)."""
    kept = []
    for record in records:
        problem = generation_problem(record.messages)
        if problem is None:
            kept.append(record)
        else:
            _bad(source, record.index, f"(validation) {problem}", on_bad_record)
    return kept, len(records) - len(kept)


def load_conversations(path: str | Path, image_root: str | Path | None, on_bad_record: str = "error"
                       ) -> tuple[list[ConversationRecord], int]:
    """Parse and check every record; returns (records, number skipped)."""
    if on_bad_record not in ("error", "skip"):
        raise DataError(f"data.on_bad_record={on_bad_record!r}: use 'error' or 'skip'")
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    records, skipped = [], 0
    for index, raw in enumerate(read_records(path)):
        try:
            if isinstance(raw, UnreadableLine):
                raise BadRecord(f"(line {raw['line']}) is not valid JSON ({raw['error']})")
            records.append(parse_record(raw, index, root))
        except BadRecord as err:
            _bad(path, index, str(err), on_bad_record)
            skipped += 1
    if not records:
        raise DataError(f"{path}: no usable record ({skipped} skipped)")
    return records, skipped


class ConversationDataset(torch.utils.data.Dataset):
    def __init__(self, records: list[ConversationRecord], source: str):
        self.records = records
        self.source = source

    def __len__(self) -> int:
        return len(self.records)

    def image_counts(self) -> list[int]:
        return [len(r.image_paths) for r in self.records]

    def video_counts(self) -> list[int]:
        return [len(r.video_frames) for r in self.records]

    def lengths(self) -> list[int]:
        """data.group_by_length's proxy, from the records alone (no image is read): characters of the
        messages plus a fixed weight per image."""
        return [sum(len(m.content) for m in r.messages)
                + IMAGE_WEIGHT * visual_items(len(r.image_paths), r.video_frames) for r in self.records]

    def _load(self, record: ConversationRecord, path: Path) -> Image.Image:
        try:
            return load_rgb(path)
        except (OSError, SyntaxError, DataError) as err:  # changed or removed since the up-front check
            raise DataError(f"{self.source}: record {record.index}: image {path} cannot be read ({err})") from None

    def __getitem__(self, i: int) -> Sample:
        record = self.records[i]
        images = [self._load(record, p) for p in record.image_paths]
        # a video file is read by the family's processor, which decodes only the frames its sampling keeps
        videos = [video if isinstance(video, VideoFile) else
                  Video([self._load(record, p) for p in video], record.video_fps) for video in record.video_frames]
        return Sample(messages=record.messages, images=images, meta={"record": record.index}, videos=videos)


def build_conversation_datasets(path, val_path, image_root, on_bad_record: str, val_fraction: float, seed: int
                                ) -> tuple[ConversationDataset, ConversationDataset, dict]:
    train_records, skipped = load_conversations(path, image_root, on_bad_record)
    stats = {"skipped_bad_records": skipped}
    if val_path:
        val_records, val_skipped = load_conversations(val_path, image_root, on_bad_record)
        val_records, not_evaluable = evaluable(val_records, val_path, on_bad_record)
        if not val_records:
            raise DataError(f"{val_path}: no record can be evaluated ({val_skipped + not_evaluable} skipped)")
        stats["skipped_bad_records"] += val_skipped + not_evaluable
        return ConversationDataset(train_records, str(path)), ConversationDataset(val_records, str(val_path)), stats
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must lie in (0, 1) when data.val_path is not set")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_records), generator=generator).tolist()
    n_val = max(1, round(len(train_records) * val_fraction))
    if n_val >= len(train_records):
        raise DataError(f"{path} has {len(train_records)} usable record(s): too few to hold out a validation set; "
                        "add records or set data.val_path")
    val = [train_records[i] for i in sorted(order[:n_val])]
    train = [train_records[i] for i in sorted(order[n_val:])]
    val, not_evaluable = evaluable(val, path, on_bad_record)  # a held-out record that cannot be scored
    if not val:
        raise DataError(f"{path}: none of the {n_val} held-out validation record(s) can be evaluated; "
                        "set data.val_path to records that end with an assistant reply")
    stats["skipped_bad_records"] += not_evaluable
    return ConversationDataset(train, str(path)), ConversationDataset(val, str(path)), stats
