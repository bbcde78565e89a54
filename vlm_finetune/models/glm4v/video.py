"""GLM-4.1V / GLM-4.5V video inputs, as the released processor (transformers' `Glm4vVideoProcessor` and
`Glm4vProcessor`) makes them, from a video given as its frames (a list of images taken at `fps` frames per
second) or as a video file (data/sample.VideoFile: its header's frame count and average rate, as transformers'
PyAV reader states them; only the sampled frames are decoded, data/videos.read_frames).

- frame sampling: the released `sample_frames` rule (2 frames per second of the video, at most 300 s; indices
  `ceil(i * fps / 2)`, duplicates dropped, an odd count made even by repeating the last frame); the video lasts
  `round((frames - 1) / fps) + 1` s when given as frames (no duration known, the released rule's fallback), and
  `frames / fps` s when read from a file (the duration transformers' `read_video_pyav` puts in its metadata);
- timestamps: each sampled frame's index / fps, one per temporal patch of 2 frames (`timestamps[::2]`), written
  as an integer number of seconds after each frame's image span;
- pixels: the frames resized together by the video `smart_resize` (sides multiples of 28 within the pixel
  budget, the frame count in it), bicubic with antialiasing on the uint8 frames, rounded back to uint8, rescaled
  and normalised with the CLIP mean and std, then cut into patches of 2 frames x 14 x 14 in the merge order of
  the released `patchify` (`pixel_values_videos`, `video_grid_thw` = (frames / 2, H / 14, W / 14)).

The settings are the released class defaults, overridden by a checkpoint folder's `video_preprocessor_config.json`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from vlm_finetune.data.sample import Video, VideoFile
from vlm_finetune.data.videos import read_frames
from vlm_finetune.errors import DataError

VIDEO_CONFIG = "video_preprocessor_config.json"


@dataclass(frozen=True)
class VideoSettings:
    """The released `Glm4vVideoProcessor`'s defaults (transformers 5.x class attributes)."""

    fps: float = 2.0  # frames sampled per second of video
    max_duration: int = 300  # seconds; longer videos are sampled evenly over their length
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 112 * 112  # size.shortest_edge
    max_pixels: int = 28 * 28 * 2 * 30000  # size.longest_edge
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @classmethod
    def from_folder(cls, folder: str | Path | None) -> VideoSettings:
        settings = cls()
        path = Path(folder) / VIDEO_CONFIG if folder is not None else None
        if path is None or not path.is_file():
            return settings
        config = json.loads(path.read_text())
        size = config.get("size") or {}
        changes = {k: config[k] for k in ("fps", "max_duration", "patch_size", "temporal_patch_size", "merge_size")
                   if config.get(k) is not None}
        if size.get("shortest_edge") is not None:
            changes["min_pixels"] = int(size["shortest_edge"])
        if size.get("longest_edge") is not None:
            changes["max_pixels"] = int(size["longest_edge"])
        for key, name in (("image_mean", "mean"), ("image_std", "std")):
            if config.get(key) is not None:
                changes[name] = tuple(float(v) for v in config[key])
        return replace(settings, **changes)


def sample_frames(total_frames: int, fps: float, settings: VideoSettings, duration: float | None = None) -> list[int]:
    """Indices of the frames the released processor keeps from a video of `total_frames` frames at `fps` lasting
    `duration` seconds (None: unknown, the released rule's fallback)."""
    last = total_frames - 1
    duration = duration or round(last / fps) + 1
    if duration <= settings.max_duration:
        count = max(int(math.floor(duration * settings.fps)), 1)
        indices = [min(last, int(math.ceil(i * fps / settings.fps))) for i in range(count)]
    else:
        count = int(settings.max_duration * settings.fps)
        if count >= total_frames:
            indices = list(range(total_frames))
        else:
            seconds = np.linspace(0, duration, count, endpoint=True)
            indices = [min(last, int(math.ceil(t * fps))) for t in seconds]
    kept = list(dict.fromkeys(indices))  # first occurrences, in order
    if len(kept) % 2:
        kept.append(kept[-1])
    return kept


def smart_resize(frames: int, height: int, width: int, settings: VideoSettings) -> tuple[int, int]:
    """(height, width) of the resized frames: the released video smart_resize."""
    factor, temporal = settings.patch_size * settings.merge_size, settings.temporal_patch_size
    if frames < temporal:
        raise DataError(f"a video needs at least {temporal} frames after sampling, found {frames}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise DataError(f"video frames of {width}x{height}: the aspect ratio must be below 200")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(frames / temporal) * temporal
    if t_bar * h_bar * w_bar > settings.max_pixels:
        beta = math.sqrt(frames * height * width / settings.max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < settings.min_pixels:
        beta = math.sqrt(settings.min_pixels / (frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def video_inputs(video: Video | VideoFile, settings: VideoSettings) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(pixel_values_videos, video_grid_thw of shape (1, 3), one integer timestamp per temporal patch)."""
    if isinstance(video, VideoFile):
        indices = sample_frames(video.num_frames, video.fps, settings, duration=video.duration)
        chosen = read_frames(video, indices)
    else:
        indices = sample_frames(len(video.frames), video.fps, settings)
        chosen = [video.frames[i] for i in indices]
    if len({frame.size for frame in chosen}) > 1:
        raise DataError(f"the frames of a video differ in size ({sorted({f.size for f in chosen})})")
    frames = torch.from_numpy(np.stack([np.asarray(frame.convert("RGB")) for frame in chosen]))
    frames = frames.permute(0, 3, 1, 2)  # (T, C, H, W), uint8
    height, width = smart_resize(len(indices), frames.shape[2], frames.shape[3], settings)
    resized = torch.nn.functional.interpolate(frames.float(), size=(height, width), mode="bicubic",
                                              align_corners=False, antialias=True)
    resized = resized.round().clamp(0, 255)  # back to uint8 levels, as a uint8 frame resize gives
    mean = torch.tensor(settings.mean).view(1, 3, 1, 1)
    std = torch.tensor(settings.std).view(1, 3, 1, 1)
    pixels = (resized / 255.0 - mean) / std
    patches, grid = _patchify(pixels, settings)
    timestamps = [int(i / video.fps) for i in indices][::settings.temporal_patch_size]
    return patches, grid, timestamps[:int(grid[0, 0])]


def _patchify(pixels: torch.Tensor, settings: VideoSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, C, H, W) frames -> (t * h * w, C * temporal * patch * patch) in the released merge order."""
    temporal, patch, merge = settings.temporal_patch_size, settings.patch_size, settings.merge_size
    frames, channels, height, width = pixels.shape
    if frames % temporal:
        pixels = torch.cat([pixels, pixels[-1:].expand(temporal - frames % temporal, -1, -1, -1)])
        frames = pixels.shape[0]
    grid_t, grid_h, grid_w = frames // temporal, height // patch, width // patch
    patches = pixels.reshape(grid_t, temporal, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = patches.reshape(grid_t * grid_h * grid_w, channels * temporal * patch * patch)
    return flat, torch.tensor([[grid_t, grid_h, grid_w]])


def tokens_per_frame_pair(grid: torch.Tensor, merge_size: int) -> int:
    """`<|image|>` tokens of each temporal patch of a video (its grid's h * w / merge^2)."""
    return int(grid[0, 1] * grid[0, 2]) // merge_size ** 2
