"""`python -m vlm_finetune.plan [--seq N] [--image PX] [--images N] [--video-frames N] <training overrides>`: the
predicted peak GPU memory of a training configuration, with the changes that make it fit (`--help` tells what is
exact and what is modelled: the docstring of vlm_finetune.memory.planner)."""
from __future__ import annotations

import argparse
import sys

from vlm_finetune.config import settings_for
from vlm_finetune.errors import ConfigError
from vlm_finetune.memory import planner, suggest
from vlm_finetune.memory.report import MemoryPlan


def visual_items(images: int, video_frames: int = 0) -> int:
    """Images plus a video's temporal patches: the released GLM-4.1V processor keeps frames sampled at its own
    2 fps as they are, pads an odd count with the last frame and puts two frames in each temporal patch, which
    (at a side within the video pixel budget) has the tokens and the patches of one image of that side."""
    return int(images) + (int(video_frames) + int(video_frames) % 2) // 2


def plan_memory(overrides: list[str], seq: int | None = None, image_px: int | None = None,
                images: int = 1) -> MemoryPlan:
    """The memory plan of the training run these overrides configure (no suggestions)."""
    return planner.plan_run(settings_for(overrides), list(overrides), seq, image_px, images)


def plan_with_suggestions(overrides: list[str], seq: int | None = None, image_px: int | None = None,
                          images: int = 1) -> MemoryPlan:
    """The plan of these overrides with, when it does not fit, the changes that make it fit."""
    return suggest.plan_with_suggestions(settings_for(overrides), list(overrides), settings_for, seq, image_px,
                                         images)


def compare(overrides: list[str], candidates: list[str], seq: int | None = None, image_px: int | None = None,
            images: int = 1) -> str:
    """One table of the candidates (each a space-separated set of overrides added to `overrides`): memory per GPU,
    bytes each rank sends per optimizer step and their seconds at the profile's link; those that fit first, least
    communication first."""
    plans = [(candidate, plan_memory([*overrides, *candidate.split()], seq, image_px, images))
             for candidate in candidates]
    plans.sort(key=lambda item: (item[1].fits is False, item[1].communication_bytes))
    lines = [f"vlm_finetune.plan --compare: {' '.join(overrides) or '(defaults)'}",
             f"{'candidate':<54} {'verdict':<13} {'peak GiB/GPU':>12} {'comm GiB/step':>13} {'comm s/step':>11}"]
    for candidate, plan in plans:
        time = plan.communication_seconds
        lines.append(f"{candidate:<54} {plan.verdict:<13} {plan.peak_bytes / 2**30:>12.2f} "
                     f"{plan.communication_bytes / 2**30:>13.3f} {'-' if time is None else f'{time:.3f}':>11}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m vlm_finetune.plan", description=planner.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=None, help="tokens per sample (default: data.max_length)")
    parser.add_argument("--image", type=int, default=None, help="image side in pixels (default: model.max_image_size)")
    parser.add_argument("--images", type=int, default=1, help="images per sample (default 1)")
    parser.add_argument("--compare", nargs="+", default=None, metavar="CANDIDATE",
                        help="plan each candidate (quoted overrides, e.g. 'trainer=zero3 precision=bf16-mixed' "
                             "'trainer=ddp trainer.expert_parallel=4') on top of the other overrides; one table")
    parser.add_argument("--video-frames", type=int, default=0,
                        help="frames of a video per sample, as sampled (GLM-4.1V/4.5V; default 0): each two frames "
                             "take the tokens and patches of one --image px image")
    args, overrides = parser.parse_known_args(argv)
    try:
        images = visual_items(args.images, args.video_frames)
        if args.compare:
            print(compare(overrides, args.compare, args.seq, args.image, images), flush=True)
            return 0
        plan = plan_with_suggestions(overrides, args.seq, args.image, images)
    except ConfigError as err:
        print(f"vlm_finetune.plan: error: {err}", file=sys.stderr, flush=True)
        return 2
    print(plan.render(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
