"""Length-grouped micro-batches: less padding than a random order, every sample once per epoch, an order drawn
from (seed, epoch) alone, ranks with disjoint length-homogeneous shares, and exact resume."""
from __future__ import annotations

import random

import pytest

from conftest import compose_cfg
from vlm_finetune.data.datamodule import EpochRandomSampler
from vlm_finetune.data.grouping import GROUP_MICRO_BATCHES, LengthGroupedSampler

LENGTHS = [random.Random(7).choice([5, 8, 40, 300, 900]) + i % 3 for i in range(1000)]


def _spread(batches: list[list[int]]) -> int:
    return sum(max(LENGTHS[i] for i in b) - min(LENGTHS[i] for i in b) for b in batches)


def test_grouped_batches_waste_far_less_on_padding_and_hold_every_sample_once():
    grouped = LengthGroupedSampler(LENGTHS, 8, seed=3)
    batches = grouped.micro_batches()
    plain = list(EpochRandomSampler(len(LENGTHS), 3))
    random_batches = [plain[k:k + 8] for k in range(0, len(plain), 8)]
    assert _spread(batches) < 0.1 * _spread(random_batches)
    assert sorted(i for b in batches for i in b) == list(range(1000))  # 1000 = 125 x 8: none dropped
    assert list(grouped) == [i for b in batches for i in b]  # micro-batch after micro-batch


def _reference_batches(lengths: list[int], size: int, seed: int, epoch: int, rank: int, world: int):
    """The grouped order as the sampler's docstring states it, in plain Python (the sampler computes it with
    numpy arrays): runs checkpointed before that change resume into the same order."""
    import torch

    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    batches = []
    for start in range(0, len(order), size * GROUP_MICRO_BATCHES):
        members = sorted(order[start:start + size * GROUP_MICRO_BATCHES], key=lambda i: -lengths[i])
        batches += [members[k:k + size] for k in range(0, len(members), size)]
    batches = [b for b in batches if len(b) == size]
    shuffled = [batches[k] for k in torch.randperm(len(batches), generator=generator).tolist()]
    return shuffled[:len(lengths) // size // world * world][rank::world]


def test_the_order_is_the_reference_order_with_an_incomplete_last_group():
    lengths = LENGTHS[:1000 - 3]  # 997: groups of 512, the last micro-batch incomplete (dropped)
    for rank, world, epoch in ((0, 1, 0), (1, 3, 2)):
        grouped = LengthGroupedSampler(lengths, 8, seed=5, rank=rank, world_size=world)
        grouped.set_epoch(epoch)
        assert grouped.micro_batches() == _reference_batches(lengths, 8, 5, epoch, rank, world)


def test_the_order_depends_on_seed_and_epoch_only_and_ranks_share_disjointly():
    first, again = LengthGroupedSampler(LENGTHS, 8, seed=3), LengthGroupedSampler(LENGTHS, 8, seed=3)
    assert list(first) == list(again)
    again.set_epoch(1)
    assert list(again) != list(first) and sorted(again) == sorted(first)
    shares = [LengthGroupedSampler(LENGTHS, 8, seed=3, rank=r, world_size=3) for r in range(3)]
    indices = [i for share in shares for i in share]
    assert len(indices) == len(set(indices)) == 3 * 41 * 8  # 125 micro-batches -> 41 per rank
    assert all(len(share) == 41 * 8 for share in shares)


@pytest.mark.slow
def test_a_grouped_run_stopped_and_resumed_equals_the_uninterrupted_run(tmp_path):
    from test_safety import TERM_RUN, TermAt

    from vlm_finetune.train import train

    overrides = TERM_RUN + ["data.group_by_length=true"]
    _, full = train(compose_cfg(overrides, tmp_path / "full"))
    stopped, _ = train(compose_cfg(overrides, tmp_path / "part"), callbacks=[TermAt(3)])
    assert stopped["global_step"] == 3
    _, resumed = train(compose_cfg(overrides, tmp_path / "part"))
    expected = {n: p for n, p in full["module"].named_parameters() if p.requires_grad}
    got = {n: p for n, p in resumed["module"].named_parameters() if p.requires_grad}
    assert max(float((expected[n] - got[n]).abs().max()) for n in expected) <= 1e-6
