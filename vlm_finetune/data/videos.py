"""Videos in records, one `<video>` placeholder (or `{"type": "video"}` content part) each, in `"videos"`:

- as their frames: `["f0.jpg", "f1.jpg", ...]` (paths, or in tables embedded bytes), with an optional
  `"video_fps"`: the rate the listed frames were taken at (default 2, GLM's own sampling rate: the frames are
  then used as listed);
- as a video file: `"clip.mp4"` (a path relative to data.image_root, or in tables embedded bytes), read with
  PyAV (the optional extra: `pip install "vlm_finetune[video]"`) as transformers' `read_video_pyav` reads it:
  the frame count and average rate from the stream's header, the frames chosen from those by the family's
  processor's sampling rule (models/glm4v/video.py), and only those decoded, in one pass from the start.
  `"video_fps"` does not apply to a file (its header states its rate).

The family's processor samples either as the released processor does. Without PyAV a record naming a video file
is refused (a bad record), naming the extra to install.
"""
from __future__ import annotations

import importlib.util
import io
from pathlib import Path

from PIL import Image

from vlm_finetune.data.sample import VIDEO_PLACEHOLDER, Message, VideoFile
from vlm_finetune.errors import DataError

DEFAULT_VIDEO_FPS = 2.0
VIDEO_EXTRA = 'pip install "vlm_finetune[video]"'


class BadVideo(Exception):
    """A record's videos are malformed (the reader turns it into its BadRecord)."""


def is_video_file(entry) -> bool:
    """A `videos` entry naming a video file (a path, embedded bytes, or datasets' {bytes, path} struct) rather than
    a list of frames."""
    return isinstance(entry, (str, bytes, bytearray, memoryview, dict))


def have_video_reader() -> bool:
    return importlib.util.find_spec("av") is not None


def parse_videos(raw: dict, messages: list[Message]) -> tuple[list, float]:
    """(entries of each video: a list of frame entries, or a video file's entry; fps of listed frames) of a
    record, checked against its `<video>` placeholders."""
    videos = raw.get("videos")
    videos = [] if videos is None else videos
    placeholders = sum(m.content.count(VIDEO_PLACEHOLDER) for m in messages)
    if not isinstance(videos, list):
        raise BadVideo("'videos' must be a list of videos, each a video file or a list of frames")
    for position, video in enumerate(videos):
        if is_video_file(video):
            if not have_video_reader():
                shown = video if isinstance(video, str) else "embedded"
                raise BadVideo(f"video {position} is a video file ({shown}) and reading video files needs PyAV: "
                               f"{VIDEO_EXTRA}; or give its frames as a list of images, e.g. written by "
                               "`ffmpeg -i video.mp4 -vf fps=2 frame%04d.jpg`, with their rate in 'video_fps'")
            continue
        if not isinstance(video, list) or not video:
            raise BadVideo(f"video {position} must be a video file or a non-empty list of frames (images)")
    if placeholders != len(videos):
        raise BadVideo(f"has {placeholders} '{VIDEO_PLACEHOLDER}' placeholder(s) but {len(videos)} video(s)")
    fps = raw.get("video_fps")
    fps = DEFAULT_VIDEO_FPS if fps is None else fps
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise BadVideo(f"'video_fps' must be a positive number of frames per second, found {fps!r}")
    return videos, float(fps)


def _opened(source: Path | bytes):
    import av

    return av.open(str(source) if isinstance(source, Path) else io.BytesIO(source))


def _named(source: Path | bytes, label: str) -> str:
    return f"{label} {source}" if isinstance(source, Path) else f"embedded {label}"


def probe_video(source: Path | bytes, label: str = "video file") -> VideoFile:
    """The file's VideoFile from its header (nothing decoded); BadVideo naming the problem when it is missing,
    not a video, or does not state its frame count and rate."""
    import av

    what = _named(source, label)
    if isinstance(source, Path) and not source.is_file():
        raise BadVideo(f"{what} does not exist (paths are relative to data.image_root)")
    try:
        with _opened(source) as container:
            if not container.streams.video:
                raise BadVideo(f"{what} has no video stream")
            stream = container.streams.video[0]
            num_frames, rate = int(stream.frames), stream.average_rate
    except (av.FFmpegError, OSError, ValueError) as err:
        raise BadVideo(f"{what} cannot be read as a video ({err})") from None
    if not rate or rate <= 0:
        raise BadVideo(f"{what} does not state its frame rate")
    if num_frames <= 0:
        raise BadVideo(f"{what} does not state its frame count in its header (the released processor samples "
                       "by it); re-mux it into MP4, e.g. `ffmpeg -i in.webm -c:v libx264 out.mp4`")
    return VideoFile(source, num_frames, float(rate))


def read_frames(video: VideoFile, indices: list[int]) -> list[Image.Image]:
    """The RGB frames at `indices` (in their order, a repeated index repeated), decoded in one pass from the
    file's start as transformers' `read_video_pyav` decodes them."""
    import av

    wanted, last = set(indices), max(indices)
    decoded: dict[int, Image.Image] = {}
    count = 0
    try:
        with _opened(video.source) as container:
            for count, frame in enumerate(container.decode(video=0), start=1):
                if count - 1 in wanted:
                    decoded[count - 1] = frame.to_image()
                if count > last:
                    break
    except (av.FFmpegError, OSError, ValueError) as err:
        raise DataError(f"{_named(video.source, 'video file')} cannot be decoded ({err})") from None
    if len(decoded) < len(wanted):
        raise DataError(f"{_named(video.source, 'video file')} ends after {count} decoded frames; its header says "
                        f"{video.num_frames} (frame {max(wanted - decoded.keys())} was asked for)")
    return [decoded[i] for i in indices]
