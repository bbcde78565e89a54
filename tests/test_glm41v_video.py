"""GLM-4.1V video and several images (issue 31): frames sampled, resized and cut into patches by the released
rules, ids equal to the released chat template with `<|video|>` expanded by transformers' own
`Glm4vProcessor.replace_video_token`, the vision tower run once for images and videos together, and tiny_glm41v
training on two-image and four-frame-video records.

transformers' `Glm4vVideoProcessor` cannot be built here (it needs torchvision, which this project does not
install); its frame sampling, smart_resize and patchify are plain functions and are compared directly."""
from __future__ import annotations

import json
import types

import pytest
import torch
from PIL import Image
from test_accumulation import COMMON, _losses
from test_glm41v_template import _hf_messages, released  # noqa: F401 - the fixture is used by name

from conftest import compose_cfg
from vlm_finetune.data.sample import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Message, Sample, Video
from vlm_finetune.models.glm4v.video import VideoSettings, _patchify, sample_frames, smart_resize, video_inputs

FRAMES = [Image.new("RGB", (70, 50), (30 * i, 200 - 20 * i, 90)) for i in range(4)]
IMG_A = Image.new("RGB", (64, 48), (10, 200, 30))
IMG_B = Image.new("RGB", (40, 90), (200, 20, 30))


def test_frame_sampling_resize_and_patches_are_the_released_rules():
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor as cls
    from transformers.models.glm4v.video_processing_glm4v import smart_resize as released_smart_resize
    from transformers.video_utils import VideoMetadata

    settings = VideoSettings()
    assert (settings.fps, settings.max_duration, settings.patch_size, settings.temporal_patch_size,
            settings.merge_size) == (cls.fps, cls.max_duration, cls.patch_size, cls.temporal_patch_size, cls.merge_size)
    assert (settings.min_pixels, settings.max_pixels) == (cls.size["shortest_edge"], cls.size["longest_edge"])
    owner = types.SimpleNamespace(fps=cls.fps, max_duration=cls.max_duration)
    for total, fps in [(4, 2), (5, 2), (10, 4), (7, 1), (30, 30), (1, 2), (3, 24), (700, 2), (20000, 30)]:
        expected = cls.sample_frames(owner, VideoMetadata(total_num_frames=total, fps=fps)).tolist()
        assert sample_frames(total, fps, settings) == expected, (total, fps)
    for frames, height, width in [(4, 50, 70), (2, 20, 300), (16, 1080, 1920), (600, 720, 1280), (2, 28, 28)]:
        expected = released_smart_resize(frames, height, width, temporal_factor=2, factor=28,
                                         min_pixels=settings.min_pixels, max_pixels=settings.max_pixels)
        assert smart_resize(frames, height, width, settings) == expected
    pixels = torch.randn(6, 3, 56, 84)
    ours, grid = _patchify(pixels, settings)
    theirs, *their_grid = cls.patchify(None, pixels.unsqueeze(0), patch_size=14, merge_size=2, temporal_patch_size=2)
    assert torch.equal(ours, theirs[0]) and grid.tolist() == [their_grid]
    # uniform frames: every value of a channel is that colour normalised with the CLIP mean and std
    values, grid, timestamps = video_inputs(Video([Image.new("RGB", (56, 56), (255, 0, 128))] * 4, 2.0), settings)
    expected = [(level / 255 - m) / s for level, m, s in zip((255, 0, 128), settings.mean, settings.std)]
    per_channel = values.view(values.shape[0], 3, -1)
    assert torch.allclose(per_channel, torch.tensor(expected).view(1, 3, 1).expand_as(per_channel), atol=1e-6)
    assert grid.tolist() == [[2, 4, 4]] and timestamps == [0, 1]


def _hf_video_ids(tokenizer, image_processor, sample: Sample, processor) -> list[int]:
    """The released template rendered, each `<|image|>` expanded as Glm4vProcessor.replace_image_token does and
    each `<|video|>` as its replace_video_token does (frame indices and grid of our processor), tokenised once."""
    from transformers import Glm4vProcessor
    from transformers.video_utils import VideoMetadata

    messages = []
    for m in sample.messages:  # the video items too
        if m.role == "user" and VIDEO_PLACEHOLDER in m.content:
            items = []
            for k, chunk in enumerate(m.content.split(VIDEO_PLACEHOLDER)):
                if k > 0:
                    items.append({"type": "video"})
                items += _hf_messages(Sample([Message("user", chunk)]))[0]["content"] if IMAGE_PLACEHOLDER in chunk \
                    else ([{"type": "text", "text": chunk}] if chunk else [])
            messages.append({"role": m.role, "content": items})
        else:
            messages += _hf_messages(Sample([m]))
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    hf = types.SimpleNamespace(image_processor=image_processor, image_token="<|image|>",
                               video_processor=types.SimpleNamespace(merge_size=2))
    hf.replace_frame_token_id = lambda seconds, num_image_tokens=1: Glm4vProcessor.replace_frame_token_id(
        hf, seconds, num_image_tokens)
    images = image_processor(images=sample.images, return_tensors="pt") if sample.images else {}
    grids, metadata = [], []
    for video in sample.videos:
        indices = sample_frames(len(video.frames), video.fps, processor.video)
        grids.append(video_inputs(video, processor.video)[1])
        metadata.append(VideoMetadata(total_num_frames=len(video.frames), fps=video.fps, frames_indices=indices))
    video_data = {"video_grid_thw": torch.cat(grids), "video_metadata": metadata} if grids else {}
    out, image, video = "", 0, 0
    for piece in text.replace("<|video|>", "\0V\0").replace("<|image|>", "\0I\0").split("\0"):
        if piece == "I":
            out += Glm4vProcessor.replace_image_token(hf, images, image)
            image += 1
        elif piece == "V":
            out += Glm4vProcessor.replace_video_token(hf, video_data, video)
            video += 1
        else:
            out += piece
    return tokenizer(out, add_special_tokens=False)["input_ids"]


VIDEO_CASES = {
    "video": Sample([Message("user", f"{VIDEO_PLACEHOLDER}What changes?"), Message("assistant", "the colour")],
                    videos=[Video(FRAMES, 2.0)]),
    "odd_frames_at_4_fps": Sample([Message("user", f"Watch {VIDEO_PLACEHOLDER} now"), Message("assistant", "ok")],
                                  videos=[Video(FRAMES + FRAMES[:3], 4.0)]),
    "image_then_video_multi_turn": Sample(
        [Message("system", "Be brief."), Message("user", f"{IMAGE_PLACEHOLDER}and{VIDEO_PLACEHOLDER}Same?"),
         Message("assistant", "no"), Message("user", f"{IMAGE_PLACEHOLDER}{IMAGE_PLACEHOLDER}These?"),
         Message("assistant", "yes")], [IMG_A, IMG_B, IMG_A], videos=[Video(FRAMES, 1.0)]),
}


@pytest.mark.parametrize("name", list(VIDEO_CASES))
def test_video_ids_are_the_released_template_and_expansion(released, name):  # noqa: F811 - the fixture
    processor, tokenizer, image_processor = released
    sample = VIDEO_CASES[name]
    encoded = processor.encode(sample)
    assert encoded.input_ids.tolist() == _hf_video_ids(tokenizer, image_processor, sample, processor) + [
        tokenizer.eos_token_id]
    types_ = processor.collate([encoded])["mm_token_type_ids"][0]
    grid = encoded.image_inputs["video_grid_thw"]
    assert int((types_ == 2).sum()) == sum(int(g.prod()) // 4 for g in grid)  # every video token marked 2
    assert int((types_ == 1).sum()) == sum(int(g.prod()) // 4 for g in encoded.image_inputs.get(
        "image_grid_thw", torch.zeros(0, 3)))


def test_one_tower_run_equals_transformers_and_mixed_batches_equal_their_rows(released):  # noqa: F811
    from vlm_finetune.config import model_settings
    from vlm_finetune.models.glm4v.family import with_visual_embeddings
    from vlm_finetune.models.registry import get_family

    processor = released[0]
    family = get_family("glm4v")
    model = family.build_model(model_settings(compose_cfg(["model=tiny_glm41v"]).model)).eval()
    video = processor.encode(VIDEO_CASES["video"])
    image = processor.encode(Sample([Message("user", f"{IMAGE_PLACEHOLDER}Colour?"), Message("assistant", "green")],
                                    [IMG_A]))
    with torch.no_grad():
        batch = processor.collate([video, video])
        inputs = {k: v for k, v in batch.items() if k in family.input_keys}
        reference = model.model(**inputs, use_cache=False).last_hidden_state  # transformers' own video path
        ours = model.model(**with_visual_embeddings(model.model, inputs), use_cache=False).last_hidden_state
        assert torch.equal(ours, reference)
        mixed = family.hidden_states(model, processor.collate([video, image]))  # transformers' forward fails here
        for row, alone in enumerate((video, image)):
            single = family.hidden_states(model, processor.collate([alone]))[0]
            assert (mixed[row, :single.shape[0]] - single).abs().max().item() <= 1e-5


@pytest.fixture(scope="module")
def visual_records(tmp_path_factory):
    """JSON records: two images, a 4-frame video (frame files; record 5's as a video file when PyAV is there),
    an image and a video, text only."""
    import importlib.util

    folder = tmp_path_factory.mktemp("video")
    records = []
    for i in range(8):
        kind = i % 4
        for k in range(4):
            Image.new("RGB", (56, 56), (25 * i + 10 * k, 40 * k, 200 - 20 * i)).save(folder / f"{i}_{k}.png")
        answer = ["two pictures", "a moving square", "a picture and a clip", "just words"][kind] + f" {i}"
        question = ["<image><image>What are these?", "<video>What happens?", "<image>Look, then<video>compare.",
                    "Say something."][kind]
        record = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
        if kind in (0, 2):
            record["images"] = [f"{i}_0.png", f"{i}_1.png"][:2 if kind == 0 else 1]
        if kind in (1, 2):
            record["videos"] = [[f"{i}_{k}.png" for k in range(4)]]
        if i == 5 and importlib.util.find_spec("av") is not None:
            _write_video(folder / "5.mov", [(25 * i + 10 * k, 40 * k, 200 - 20 * i) for k in range(4)], fps=2)
            record["videos"] = ["5.mov"]
        records.append(record)
    (folder / "train.json").write_text(json.dumps(records))
    return folder


# one tiny run of 8 steps (31 s on the shared 2 cores); the quick suite checks ids and the tower run above
@pytest.mark.slow
def test_tiny_glm41v_trains_on_two_image_and_video_records(visual_records, tmp_path):
    from vlm_finetune.train import train

    overrides = COMMON + ["model=tiny_glm41v", "precision=32-true", f"data.path={visual_records / 'train.json'}",
                          f"data.val_path={visual_records / 'train.json'}", "data.micro_batch_size=4",
                          "trainer.accumulate_grad_batches=1", "trainer.max_steps=8"]
    metrics, objects = train(compose_cfg(overrides, tmp_path))
    losses = _losses(tmp_path)
    # two micro-batches per epoch: the first and the last epoch's mean loss are over the same 8 records
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert len(losses) == 8 and last < 0.75 * first, losses
    assert metrics["skipped_bad_records"] == 0
    batches = list(objects["datamodule"].train_dataloader())
    assert any("pixel_values_videos" in b and "pixel_values" in b for b in batches)


@pytest.mark.parametrize("images, frames", [(2, 3), (2, 0), (0, 4), (1, 8)])  # about 0.5 s each
def test_planner_counts_the_processors_image_tokens(released, images, frames):  # noqa: F811
    """The plan's LLM image-token row for a sample of `images` 112 px images and a video of `frames` 112 px frames
    (tiny_glm41v's image size) holds the processor's `<|image|>` tokens for that sample."""
    from vlm_finetune.plan import plan_memory, visual_items

    processor = released[0]
    question = IMAGE_PLACEHOLDER * images + (VIDEO_PLACEHOLDER if frames else "") + "What is it?"
    sample = Sample([Message("user", question), Message("assistant", "this")],
                    [Image.new("RGB", (112, 112), (9 * k, 90, 40)) for k in range(images)],
                    videos=[Video([Image.new("RGB", (112, 112), (30 * k, 9, 9)) for k in range(frames)], 2.0)]
                    if frames else [])
    tokens = processor.encode(sample).input_ids.tolist().count(processor.image_token_id)
    plan = plan_memory(["model=tiny_glm41v", "data.micro_batch_size=1", "hardware=cpu"], seq=512, image_px=112,
                       images=visual_items(images, frames))
    row = next(r for r in plan.rows if r.item.startswith("image tokens ("))
    assert row.item == f"image tokens ({tokens} into the LLM)" and tokens > 0


def test_packing_refuses_video_records_before_weights_load(visual_records, tmp_path, monkeypatch):
    import vlm_finetune.train as train_module
    from vlm_finetune.errors import ConfigError

    def no_weights(*args, **kwargs):
        raise AssertionError("a model was built before the data was checked")

    monkeypatch.setattr(train_module, "_model_builder", no_weights)
    cfg = compose_cfg(COMMON + ["model=tiny_glm41v", f"data.path={visual_records / 'train.json'}",
                                f"data.val_path={visual_records / 'train.json'}", "data.packing=true"], tmp_path)
    with pytest.raises(ConfigError, match="data.packing=true does not take records with videos yet"):
        train_module.train(cfg)


def test_generation_refuses_images_and_videos_in_one_batch_before_weights_load(visual_records, tmp_path, monkeypatch):
    import vlm_finetune.train as train_module
    from vlm_finetune.errors import ConfigError

    def no_weights(*args, **kwargs):
        raise AssertionError("a model was built before the data was checked")

    monkeypatch.setattr(train_module, "_model_builder", no_weights)
    cfg = compose_cfg(COMMON + ["model=tiny_glm41v", f"data.path={visual_records / 'train.json'}",
                                f"data.val_path={visual_records / 'train.json'}", "eval.generate=true"], tmp_path)
    with pytest.raises(ConfigError, match="eval.generate=true: a record holds both images and videos"):
        train_module.train(cfg)


COLOURS = [(30 * i, 200 - 20 * i, 90) for i in range(8)]


def _write_video(path, colours, fps: int, size: int = 56) -> None:
    """A video file of uniform frames of these colours (PNG frames in a QuickTime file: lossless, so the colours
    read back exactly), written with PyAV."""
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("png", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size, size, "rgb24"
        for colour in colours:
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), colour, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_a_video_file_is_read_as_the_released_reader_and_encodes_as_its_frames(released, tmp_path):  # noqa: F811
    """8 frames at 4 fps: the header, the sampled indices, the frames and the timestamps are those of transformers'
    read_video_pyav with the released sampling; a JSON record naming the file gives tiny_glm41v's processor the
    ids and pixels of a record listing the same frames (the sampled ones, at GLM's 2 fps)."""
    pytest.importorskip("av")
    import numpy as np
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor as cls
    from transformers.video_utils import read_video_pyav

    from vlm_finetune.data.conversations import ConversationDataset, load_conversations
    from vlm_finetune.data.grouping import visual_items
    from vlm_finetune.data.sample import VideoFile
    from vlm_finetune.data.videos import read_frames

    processor = released[0]
    _write_video(tmp_path / "clip.mov", COLOURS, fps=4)
    owner = types.SimpleNamespace(fps=cls.fps, max_duration=cls.max_duration)
    their_frames, metadata = read_video_pyav(str(tmp_path / "clip.mov"),
                                             lambda metadata, **_: cls.sample_frames(owner, metadata))
    sampled = [0, 2, 4, 6]  # duration 8 / 4 = 2 s at 2 frames per second
    for k in sampled:
        Image.new("RGB", (56, 56), COLOURS[k]).save(tmp_path / f"f{k}.png")
    turns = [{"role": "user", "content": "<video>What changes?"}, {"role": "assistant", "content": "the colour"}]
    records = [{"videos": ["clip.mov"], "messages": turns},
               {"videos": [[f"f{k}.png" for k in sampled]], "video_fps": 2, "messages": turns}]
    (tmp_path / "train.json").write_text(json.dumps(records))
    loaded, skipped = load_conversations(tmp_path / "train.json", tmp_path)
    from_file, from_frames = ConversationDataset(loaded, "train.json")[0], ConversationDataset(loaded, "")[1]
    video = from_file.videos[0]
    assert isinstance(video, VideoFile) and (video.num_frames, video.fps, video.duration) == (8, 4.0, 2.0)
    assert (metadata.total_num_frames, metadata.fps, metadata.duration) == (8, 4.0, 2.0)
    assert sample_frames(8, 4.0, processor.video, video.duration) == metadata.frames_indices.tolist() == sampled
    frames = read_frames(video, sampled)
    assert np.array_equal(np.stack([np.asarray(f) for f in frames]), their_frames)
    assert [f.getpixel((5, 5)) for f in frames] == [COLOURS[k] for k in sampled]
    _, grid, timestamps = video_inputs(video, processor.video)
    assert timestamps == [int(t) for t in metadata.timestamps[::2]][:int(grid[0, 0])] == [0, 1]
    ours, theirs = processor.encode(from_file), processor.encode(from_frames)
    assert ours.input_ids.tolist() == theirs.input_ids.tolist() == _hf_video_ids(
        released[1], released[2], from_frames, processor) + [released[1].eos_token_id]
    for key in ("pixel_values_videos", "video_grid_thw"):
        assert torch.equal(ours.image_inputs[key], theirs.image_inputs[key])
    assert skipped == 0 and visual_items(0, [video]) == visual_items(0, [from_frames.videos[0]]) == 2


def test_video_files_are_checked_up_front_and_refused_without_pyav(tmp_path, monkeypatch):
    pytest.importorskip("av")
    from vlm_finetune.data import videos
    from vlm_finetune.data.conversations import load_conversations
    from vlm_finetune.errors import DataError

    _write_video(tmp_path / "clip.mov", COLOURS[:2], fps=2)
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")
    turns = [{"role": "user", "content": "<video>What?"}, {"role": "assistant", "content": "x"}]
    records = [{"videos": [name], "messages": turns} for name in ("clip.mov", "broken.mp4", "gone.mp4")]
    (tmp_path / "train.json").write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"record 1 video 0 .*broken.mp4 cannot be read as a video"):
        load_conversations(tmp_path / "train.json", tmp_path)
    kept, skipped = load_conversations(tmp_path / "train.json", tmp_path, on_bad_record="skip")
    assert len(kept) == 1 and skipped == 2  # gone.mp4 does not exist
    # in a table (Parquet, save_to_disk) a video file may also come embedded, as datasets' {bytes, path} struct
    from vlm_finetune.data.conversations import BadRecord
    from vlm_finetune.data.sources import _parse_row

    embedded = {"bytes": (tmp_path / "clip.mov").read_bytes(), "path": None}
    _, _, parsed, _ = _parse_row({"videos": [embedded], "messages": turns}, tmp_path, check_images=True)
    assert (parsed[0].num_frames, parsed[0].fps) == (2, 2.0) and "embedded" in repr(parsed[0])
    assert [f.getpixel((0, 0)) for f in videos.read_frames(parsed[0], [0, 1, 1])] == [COLOURS[0], *COLOURS[1:2] * 2]
    with pytest.raises(BadRecord, match=r"embedded video 0 cannot be read as a video"):
        _parse_row({"videos": [b"junk"], "messages": turns}, tmp_path, check_images=True)
    monkeypatch.setattr(videos, "have_video_reader", lambda: False)
    with pytest.raises(DataError, match=r"record 0 video 0 is a video file \(clip.mov\) and reading video files "
                                        r"needs PyAV: pip install \"vlm_finetune\[video\]\""):
        load_conversations(tmp_path / "train.json", tmp_path)
