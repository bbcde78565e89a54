"""Packing (data.packing=true): the samples of a micro-batch share rows of exactly data.pack_length tokens,
each attending only to itself; the loss and the gradients are those of the padded batch (issue 15, points 1
and 3). Packed and padded runs draw the same samples for each step (packing changes the layout of a
micro-batch, not what is in it), so their adapters and logged losses are compared directly."""
from __future__ import annotations

import pytest
import torch
from test_accumulation import COMMON, _adapter, _losses

from conftest import compose_cfg, write_conversation_file
from vlm_finetune.data.packing import PADDING_MASK, SEGMENTS, collate_packed, first_fit_rows
from vlm_finetune.data.sample import IGNORE_INDEX
from vlm_finetune.errors import ConfigError
from vlm_finetune.train import check_config, train

ANSWER_WORDS = [1, 30, 3, 12, 2, 25, 6, 1, 18, 4, 9, 2]  # replies of very different lengths
PACK = 192


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    """12 conversations, every third text-only, the rest with one small image."""
    folder = tmp_path_factory.mktemp("packing")
    return write_conversation_file(folder, ANSWER_WORDS, lambda i: i % 3 == 2, colour=(20, 15))


def _overrides(data, model: str, packed: bool) -> list[str]:
    common = [o for o in COMMON if not o.startswith("data.max_length")]
    return common + [f"model={model}", f"data.path={data / 'train.json'}", f"data.val_path={data / 'val.json'}",
                     "data.max_length=128", "data.micro_batch_size=4", "trainer.accumulate_grad_batches=1",
                     "precision=32-true", f"data.packing={str(packed).lower()}", f"data.pack_length={PACK}"]


def test_first_fit_rows_keep_order_and_fill_earlier_rows():
    assert first_fit_rows([5, 4, 3, 2, 6], 8) == [[0, 2], [1, 3], [4]]  # 3 fits beside 5, 2 beside 4
    with pytest.raises(ValueError, match="does not fit"):
        first_fit_rows([9], 8)


# the family contract checks packed = padded for every family in the quick suite; whole runs for the others are slow
@pytest.mark.parametrize("model", ["tiny_glm41v"] + [pytest.param(m, marks=pytest.mark.slow)
                                                     for m in ("tiny_mgm", "tiny_mgm_moe", "tiny_glm4v")])
def test_packed_and_padded_runs_train_the_same_adapter(varied, tmp_path, model):
    runs = {}
    for packed in (False, True):
        run_dir = tmp_path / ("packed" if packed else "padded")
        metrics, objects = train(compose_cfg(_overrides(varied, model, packed), run_dir))
        runs[packed] = (run_dir, objects)
    (padded_dir, _), (packed_dir, packed_objects) = runs[False], runs[True]
    assert _losses(packed_dir) == pytest.approx(_losses(padded_dir), rel=1e-5) and len(_losses(packed_dir)) == 3
    before = _adapter(padded_dir)
    after = _adapter(packed_dir)
    assert before.keys() == after.keys() and before
    for key in before:
        scale = before[key].abs().max().item()
        assert (before[key] - after[key]).abs().max().item() <= 1e-4 * scale + 1e-7, key

    # every packed micro-batch has the fixed row length and holds its samples' tokens exactly once
    loader = packed_objects["datamodule"].train_dataloader()
    for batch in list(loader)[:3]:
        assert batch["input_ids"].shape[1] == PACK and "attention_mask" not in batch
        assert batch["input_ids"].shape[0] < 4  # 4 samples share fewer rows than padding needs
        real = int(batch[PADDING_MASK].sum())
        assert real == sum(length for row in batch[SEGMENTS] for length, _ in row)


def test_collate_packed_restarts_positions_and_masks_each_first_token():
    from vlm_finetune.data.sample import EncodedSample

    class Processor:
        pad_token_id = 0

        def collate(self, encoded):
            width = max(e.input_ids.numel() for e in encoded)
            ids = torch.zeros((len(encoded), width), dtype=torch.long)
            labels = torch.full((len(encoded), width), IGNORE_INDEX)
            mask = torch.zeros((len(encoded), width), dtype=torch.long)
            for row, e in enumerate(encoded):
                n = e.input_ids.numel()
                ids[row, :n], labels[row, :n], mask[row, :n] = e.input_ids, e.labels, 1
            return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    samples = [EncodedSample(torch.arange(1, n + 1), torch.arange(1, n + 1), {}, n - 1) for n in (3, 5, 2)]
    batch = collate_packed(Processor(), samples, 8)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 1, 2, 3, 4, 5], [1, 2, 0, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 0, 1, 2, 3, 4, 5]]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 2, 3, 4, 5]
    assert batch[SEGMENTS] == [[(3, 0), (5, 0)], [(2, 0)]]


def test_packing_is_checked_before_weights_load(tmp_path):
    with pytest.raises(ConfigError, match="must be at least data.max_length"):
        check_config(compose_cfg(["data.packing=true", "data.pack_length=64"], tmp_path))


def test_a_packed_length_grouped_run_stopped_at_step_5_resumes_to_the_uninterrupted_one(varied, tmp_path):
    """Across epochs (3 micro-batches per epoch): the grouped order of each epoch is rebuilt from the seed."""
    from test_resume import _logged_losses, stopped_and_resumed_equals_whole

    overrides = [o for o in _overrides(varied, "tiny_glm41v", True) if not o.startswith("trainer.max_steps")] + [
        "data.group_by_length=true", "trainer.max_steps=10", "checkpoint.every_n_steps=5",
        "trainer.val_every_n_steps=null"]
    stopped_and_resumed_equals_whole(overrides, tmp_path, stop_step=5, steps=10)
    part, whole = _logged_losses(tmp_path / "part"), _logged_losses(tmp_path / "full")
    assert [s for s, _ in part] == [s for s, _ in whole] == list(range(10))  # every step once
    assert [v for _, v in part] == pytest.approx([v for _, v in whole], abs=1e-6)
