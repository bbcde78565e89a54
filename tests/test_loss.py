"""The chunked (sum, count) cross-entropy equals the plain full-logits loss, gradients included."""
from __future__ import annotations

import pytest
import torch

from vlm_finetune.loss import IGNORE_INDEX, cross_entropy_sum, full_logits_cross_entropy_sum


def _problem(seed=0, batch=3, seq=37, hidden=16, vocab=53, mask_rows=()):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=g, dtype=torch.float64).float().requires_grad_(True)
    w = torch.randn(vocab, hidden, generator=g).mul(0.3).requires_grad_(True)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[:, :5] = IGNORE_INDEX
    labels[1, 20:] = IGNORE_INDEX
    for r in mask_rows:
        labels[r] = IGNORE_INDEX
    return h, w, labels


def _reference(h, w, labels):
    return full_logits_cross_entropy_sum(h @ w.t(), labels)


@pytest.mark.parametrize("chunk", [1, 7, 16, 1024])  # 7 does not divide the supervised count
def test_chunked_matches_plain_with_gradients(chunk):
    h, w, labels = _problem()
    ref_sum, ref_count = _reference(h, w, labels)
    ref_sum.backward()
    ref_gh, ref_gw = h.grad.clone(), w.grad.clone()
    h.grad, w.grad = None, None
    total, count = cross_entropy_sum(h, w, labels, chunk_size=chunk)
    assert count == ref_count == int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert count % 7 != 0
    total.backward()
    torch.testing.assert_close(total, ref_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, ref_gw, rtol=1e-5, atol=1e-6)


def test_all_labels_masked_gives_zero_not_nan():
    h, w, labels = _problem(mask_rows=(0, 1, 2))
    total, count = cross_entropy_sum(h, w, labels, chunk_size=8)
    assert count == 0 and float(total) == 0.0
    total.backward()
    assert torch.equal(h.grad, torch.zeros_like(h)) and not torch.isnan(h.grad).any()


def test_some_rows_masked_match_reference():
    h, w, labels = _problem(mask_rows=(0,))
    ref_sum, ref_count = _reference(h, w, labels)
    total, count = cross_entropy_sum(h, w, labels, chunk_size=5)
    assert count == ref_count
    torch.testing.assert_close(total, ref_sum, rtol=1e-5, atol=1e-5)


def test_a_zero3_partitioned_frozen_head_is_gathered_for_the_loss(monkeypatch):
    """Under ZeRO-3 the head's weight is an empty placeholder outside its forward; the loss must read a
    gathered copy and never the placeholder. DeepSpeed's GatheredParameters is faked here to see the calls;
    real ZeRO-3 runs (every parameter partitioned) are in test_accumulation.py and test_zero_cpu.py."""
    import contextlib
    import sys
    import types

    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus  # the real enum, imported first

    from vlm_finetune.running_strategy import head_weight

    full = torch.randn(7, 4)
    head = torch.nn.Linear(4, 7, bias=False)
    head.weight.requires_grad_(False)
    with torch.no_grad():
        head.weight.data = torch.empty(0)  # what a partitioned parameter holds between gathers
    head.weight.ds_id = 3
    head.weight.ds_persist = False
    head.weight.ds_status = ZeroParamStatus.NOT_AVAILABLE
    gathered = []

    @contextlib.contextmanager
    def gathered_parameters(params, modifier_rank=None):
        gathered.append(params)
        saved = params[0].data
        params[0].data = full
        yield
        params[0].data = saved

    fake = types.SimpleNamespace(zero=types.SimpleNamespace(GatheredParameters=gathered_parameters))
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    weight = head_weight(head)
    assert torch.equal(weight, full) and gathered == [[head.weight]]
    assert head.weight.numel() == 0  # partitioned again after the gather
    # gathered already by an active module (a head tied to the embedding): a copy, no second gather
    head.weight.data, head.weight.ds_status = full.clone(), ZeroParamStatus.AVAILABLE
    copy = head_weight(head)
    assert torch.equal(copy, full) and copy.data_ptr() != head.weight.data_ptr() and len(gathered) == 1
    head.weight.ds_persist = True  # below the persistence threshold: always whole, used as it is
    assert head_weight(head).data_ptr() == head.weight.data_ptr() and len(gathered) == 1
    head.weight.ds_persist, head.weight.ds_status = False, ZeroParamStatus.NOT_AVAILABLE
    head.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="keep lm_head frozen"):
        head_weight(head)
    plain = torch.nn.Linear(4, 7, bias=False)
    assert head_weight(plain) is plain.weight  # no DeepSpeed: the parameter itself
