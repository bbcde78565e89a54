"""Videos in records, as lists of frames: `"videos": [["f0.jpg", "f1.jpg", ...], ...]` (one `<video>` placeholder
per video, or a `{"type": "video"}` content part), frames as paths or (in tables) embedded bytes, and an optional
`"video_fps"`: the rate the listed frames were taken at (default 2, GLM's own sampling rate: the frames are then
used as listed). The family's processor samples them as the released processor does (models/glm4v/video.py).

A video file (a string instead of a list of frames) is refused: no video reader (PyAV, decord) is a dependency
of this project, so videos come as their frames (`ffmpeg -i v.mp4 -vf fps=2 f%04d.jpg` writes them)."""
from __future__ import annotations

from vlm_finetune.data.sample import VIDEO_PLACEHOLDER, Message

DEFAULT_VIDEO_FPS = 2.0


class BadVideo(Exception):
    """A record's videos are malformed (the reader turns it into its BadRecord)."""


def parse_videos(raw: dict, messages: list[Message]) -> tuple[list[list], float]:
    """(frame entries of each video, fps) of a record, checked against its `<video>` placeholders."""
    videos = raw.get("videos")
    videos = [] if videos is None else videos
    placeholders = sum(m.content.count(VIDEO_PLACEHOLDER) for m in messages)
    if not isinstance(videos, list):
        raise BadVideo("'videos' must be a list of videos, each a list of frames")
    for position, video in enumerate(videos):
        if isinstance(video, str):
            raise BadVideo(f"video {position} is a file ({video}); video files are not decoded here (no video reader "
                           "is a dependency): give its frames as a list of images, e.g. written by "
                           "`ffmpeg -i video.mp4 -vf fps=2 frame%04d.jpg`, with their rate in 'video_fps'")
        if not isinstance(video, list) or not video:
            raise BadVideo(f"video {position} must be a non-empty list of frames (images)")
    if placeholders != len(videos):
        raise BadVideo(f"has {placeholders} '{VIDEO_PLACEHOLDER}' placeholder(s) but {len(videos)} video(s)")
    fps = raw.get("video_fps")
    fps = DEFAULT_VIDEO_FPS if fps is None else fps
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise BadVideo(f"'video_fps' must be a positive number of frames per second, found {fps!r}")
    return videos, float(fps)
