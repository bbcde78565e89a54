"""Data: deterministic shapes, loss masking, conversation files and their bad records."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_cfg
from vlm_finetune.config import model_settings
from vlm_finetune.data.conversations import build_conversation_datasets, load_conversations
from vlm_finetune.data.datamodule import Collator, EncodedDataset, StepWindowLoader
from vlm_finetune.data.images import load_rgb
from vlm_finetune.data.sample import Message, Sample
from vlm_finetune.data.shapes import ShapesDataset
from vlm_finetune.errors import DataError
from vlm_finetune.models.glm4v.processor import IGNORE_INDEX, SampleTooLong
from vlm_finetune.models.registry import get_family


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    cfg = compose_cfg([], tmp_path_factory.mktemp("p"))
    return get_family("glm4v").load_processor(model_settings(cfg.model), "truncate")


def test_shapes_deterministic_and_splits_differ():
    a, b = ShapesDataset("train", 50, seed=3), ShapesDataset("train", 50, seed=3)
    for i in (0, 7, 49):
        assert np.array_equal(np.asarray(a[i].images[0]), np.asarray(b[i].images[0]))
        assert a[i].messages == b[i].messages
    # access order does not matter
    assert np.array_equal(np.asarray(ShapesDataset("train", 50, seed=3)[49].images[0]), np.asarray(a[49].images[0]))
    val = ShapesDataset("val", 50, seed=3)
    assert sum(np.array_equal(np.asarray(a[i].images[0]), np.asarray(val[i].images[0])) for i in range(50)) == 0
    other_seed = ShapesDataset("train", 50, seed=4)
    assert not all(a[i].messages == other_seed[i].messages for i in range(10))


def test_shapes_answers_are_balanced_enough_for_low_chance():
    data = ShapesDataset("val", 600, seed=0)
    by_type: dict[str, dict[str, int]] = {}
    for i in range(len(data)):
        s = data[i]
        by_type.setdefault(s.meta["question_type"], {}).setdefault(s.messages[-1].content, 0)
        by_type[s.meta["question_type"]][s.messages[-1].content] += 1
    assert len(by_type) >= 3
    for answers in by_type.values():
        assert len(answers) >= 4
        # the majority answer of each question type stays near 1/4 (chance <= 0.25 up to sampling noise)
        assert max(answers.values()) / sum(answers.values()) < 0.35


def test_masking_supervises_only_the_assistant_reply(processor):
    sample = ShapesDataset("train", 4, seed=0)[0]
    enc = processor.encode(sample)
    ids, labels = enc.input_ids, enc.labels
    supervised = labels != IGNORE_INDEX
    # image positions and the prompt carry no loss
    assert not supervised[ids == processor.image_token_id].any()
    answer_ids = processor.tokenizer(sample.messages[-1].content, add_special_tokens=False)["input_ids"]
    assert labels[supervised].tolist() == answer_ids + [processor.eos_token_id]
    # the supervised span is the tail of the sequence
    assert supervised[-(len(answer_ids) + 1):].all() and not supervised[:-(len(answer_ids) + 1)].any()
    n_image_tokens = int((ids == processor.image_token_id).sum())
    grid = enc.image_inputs["image_grid_thw"][0]
    assert n_image_tokens == int(grid.prod()) // 4
    assert enc.num_supervised_tokens == len(answer_ids) + 1


def test_multi_turn_masks_every_user_turn(processor):
    img = Image.new("RGB", (64, 64), (10, 200, 30))
    sample = Sample([Message("system", "Be brief."), Message("user", "<image>\nWhat color?"),
                     Message("assistant", "green"), Message("user", "Sure?"), Message("assistant", "yes")], [img])
    enc = processor.encode(sample)
    sup = enc.labels[enc.labels != IGNORE_INDEX].tolist()
    tok = processor.tokenizer
    # a reply is supervised with the token that ends it: the next turn's role token, or the final <|endoftext|>
    # (GLM-4.1V's chat template puts nothing between a reply and the next turn; see test_glm41v_template.py)
    expected = (tok("green", add_special_tokens=False)["input_ids"] + [processor.special_ids["<|user|>"]]
                + tok("yes", add_special_tokens=False)["input_ids"] + [processor.eos_token_id])
    assert sup == expected


def test_generation_prompt_ends_before_the_answer(processor):
    sample = ShapesDataset("val", 2, seed=0)[1]
    full, prompt = processor.encode(sample), processor.encode(sample, for_generation=True)
    n = prompt.input_ids.numel()
    assert torch.equal(full.input_ids[:n], prompt.input_ids)  # same prefix, then the answer
    assert (prompt.labels == IGNORE_INDEX).all()


def test_truncate_and_drop(processor):
    sample = Sample([Message("user", "Tell me."), Message("assistant", "one two three four " * 20)])
    enc = processor.encode(sample, max_length=20)
    assert enc.input_ids.numel() == 20 and enc.truncated
    processor.truncation = "drop"
    try:
        with pytest.raises(SampleTooLong):
            processor.encode(sample, max_length=20)
        batch = Collator(processor)([EncodedDataset([sample], processor, 20)[0], processor.encode(sample)])
        assert batch["num_dropped_too_long"] == 1 and batch["input_ids"].shape[0] == 1
    finally:
        processor.truncation = "truncate"
    # an image span is never cut: such a sample is dropped even in truncate mode
    with pytest.raises(SampleTooLong):
        processor.encode(ShapesDataset("train", 1)[0], max_length=10)


def test_step_windows_carry_the_step_token_count(processor):
    samples = [Sample([Message("user", "q"), Message("assistant", "a " * (1 + 5 * i))]) for i in range(7)]
    loader = torch.utils.data.DataLoader(EncodedDataset(samples, processor, None), batch_size=2,
                                         collate_fn=Collator(processor))
    windows = StepWindowLoader(loader, accumulate=2)
    batches = list(windows)
    assert len(windows) == 4 and len(batches) == 4  # 4 micro-batches (last holds 1 sample), 2 windows
    for start in (0, 2):
        total = batches[start]["num_supervised_tokens"] + batches[start + 1]["num_supervised_tokens"]
        assert batches[start]["num_step_supervised_tokens"] == total == batches[start + 1]["num_step_supervised_tokens"]
        assert [b["last_in_step"] for b in batches[start:start + 2]] == [False, True]


# -- conversation files -----------------------------------------------------------------------------
def _write_images(folder, n):
    for i in range(n):
        Image.new("RGB", (56, 56), (40 * i % 255, 100, 200)).save(folder / f"img{i}.png")


def test_llava_and_messages_forms(tmp_path):
    _write_images(tmp_path, 2)
    records = [
        {"image": "img0.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "blue"}]},
        {"images": ["img1.png"], "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                                               {"role": "assistant", "content": "red"}]},
        {"conversations": [{"from": "human", "value": "No image here"}, {"from": "gpt", "value": "ok"}]},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    loaded, skipped = load_conversations(path, None)
    assert skipped == 0 and len(loaded) == 3
    assert loaded[1].messages[0].content == "<image>Colour?" and loaded[1].messages[1].role == "assistant"
    assert loaded[2].image_paths == []


@pytest.mark.parametrize("record,needle", [
    ({"image": "missing.png", "conversations": [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}]},
     "missing.png does not exist"),
    ({"image": "broken.png", "conversations": [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}]},
     "broken.png is corrupt"),
    ({"image": "img0.png", "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
     "0 '<image>' placeholder\\(s\\) but 1 image"),
    ({"image": "img0.png"}, "neither 'conversations'"),
    ({"conversations": [{"from": "human", "value": "x"}]}, "no assistant reply"),
    ({"conversations": [{"speaker": "human", "value": "x"}]}, "turn 0 lacks 'from'"),
    # issue 32: an image where the model is shown none, and images the processors refuse
    ({"image": "img0.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image> a"}]},
     "turn 1 \\(assistant\\) holds an '<image>' placeholder, where the model is shown no image"),
    ({"image": "strip.png", "conversations": [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}]},
     "strip.png is 1x300 pixels, an aspect ratio of 300:1 over the limit of 200:1"),
    ({"image": "bomb.png", "conversations": [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}]},
     "bomb.png is 10000x9000 = 90,000,000 pixels, over the limit of 89,478,485"),
])
def test_bad_record_names_file_and_index(tmp_path, record, needle):
    _write_images(tmp_path, 1)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    if "strip.png" in json.dumps(record):
        Image.new("RGB", (1, 300), (0, 0, 0)).save(tmp_path / "strip.png")
    if "bomb.png" in json.dumps(record):  # 1-bit pixels: 11 MB in memory, a few kB on disk
        Image.new("1", (10000, 9000)).save(tmp_path / "bomb.png")
    good = {"image": "img0.png", "conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]}
    path = tmp_path / "data.json"
    path.write_text(json.dumps([good, good, record]))
    with pytest.raises(DataError, match=rf"data.json: record 2 .*{needle}"):
        load_conversations(path, tmp_path)
    loaded, skipped = load_conversations(path, tmp_path, on_bad_record="skip")
    assert skipped == 1 and [r.index for r in loaded] == [0, 1]


def test_a_validation_record_that_cannot_be_evaluated_is_found_before_training(tmp_path):
    turn = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    (tmp_path / "train.json").write_text(json.dumps([{"conversations": turn}] * 4))
    # record 1 ends on a user turn: fine to train on, but no answer can be generated and scored for it
    (tmp_path / "val.json").write_text(json.dumps([{"conversations": turn},
                                                   {"conversations": turn + [{"from": "human", "value": "more?"}]}]))
    args = (tmp_path / "train.json", tmp_path / "val.json", tmp_path)
    with pytest.raises(DataError, match=r"val.json: record 1 \(validation\) ends with a user turn; an evaluated "
                                        r"conversation must end with the assistant reply"):
        build_conversation_datasets(*args, on_bad_record="error", val_fraction=0.5, seed=0)
    train_set, val_set, stats = build_conversation_datasets(*args, on_bad_record="skip", val_fraction=0.5, seed=0)
    assert len(train_set) == 4 and [r.index for r in val_set.records] == [0] and stats["skipped_bad_records"] == 1


def test_the_processor_refuses_what_the_up_front_check_refuses(processor, tmp_path):
    image = Image.new("RGB", (56, 56))
    in_reply = Sample([Message("user", "q"), Message("assistant", "<image> a")], [image])
    with pytest.raises(DataError, match=r"turn 1 \(assistant\) holds an '<image>' placeholder"):
        processor.encode(in_reply)
    ends_on_user = Sample([Message("user", "q"), Message("assistant", "a"), Message("user", "b")], [])
    processor.encode(ends_on_user)  # trains (the assistant reply is supervised) ...
    with pytest.raises(DataError, match="ends with a user turn"):  # ... but cannot be a generation prompt
        processor.encode(ends_on_user, for_generation=True)
    Image.new("RGB", (1, 300)).save(tmp_path / "strip.png")
    with pytest.raises(DataError, match=r"image .*strip.png is 1x300 pixels"):  # images go through the same rule
        load_rgb(tmp_path / "strip.png")
