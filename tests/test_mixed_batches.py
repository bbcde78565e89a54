"""Mixed text-only / image micro-batches under two-rank ZeRO-3: a rank whose micro-batch has no image runs
the vision path anyway (its parameters are gathered collectively), and the result is that of one process."""
from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image
from test_accumulation import COMMON, _adapter, _assert_same_updates, _losses
from torch.utils.data import DistributedSampler

from conftest import compose_cfg, run_cli
from vlm_finetune.config import model_settings, read_settings
from vlm_finetune.train import train

WORDS = "red green blue yellow circle square triangle diamond one two three four".split()
ANSWER_WORDS = [1, 120, 3, 40, 2, 60, 10, 25]
SEED = 0


def _first_micro_batches(n: int, micro: int) -> tuple[list[int], list[int]]:
    """The sample indices of rank 0's and rank 1's first micro-batch (the data module's sampler for 2 ranks)."""
    first = []
    for rank in (0, 1):
        sampler = DistributedSampler(range(n), num_replicas=2, rank=rank, shuffle=True, seed=SEED, drop_last=True)
        first.append(list(sampler)[:micro])
    return first[0], first[1]


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    """8 conversations of varied lengths; rank 0's first micro-batch text-only, rank 1's with images, the rest
    alternating."""
    folder = tmp_path_factory.mktemp("mixed")
    text_first, image_first = _first_micro_batches(len(ANSWER_WORDS), 2)
    records = []
    for i, n_words in enumerate(ANSWER_WORDS):
        answer = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n_words))
        text_only = i in text_first or (i not in image_first and i % 2 == 1)
        if text_only:
            records.append({"conversations": [{"from": "human", "value": f"Name {i} things."},
                                              {"from": "gpt", "value": answer}]})
            continue
        Image.new("RGB", (56, 56), (30 * i, 200 - 20 * i, 90)).save(folder / f"{i}.png")
        records.append({"image": f"{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\nDescribe picture {i}."}, {"from": "gpt", "value": answer}]})
    assert all("image" not in records[i] for i in text_first) and all("image" in records[i] for i in image_first)
    (folder / "train.json").write_text(json.dumps(records))
    # validation: rank 0 a text-only prompt, rank 1 one with an image (loss, then greedy generation)
    first_text = next(r for r in records if "image" not in r)
    first_image = next(r for r in records if "image" in r)
    (folder / "val.json").write_text(json.dumps([first_text, first_image]))
    return folder


def _overrides(data, micro: int, accumulate: int, steps: int, model: str = "tiny_glm41v") -> list[str]:
    common = [o for o in COMMON if not o.startswith("eval.generate")] + ["eval.generate=true", "eval.max_new_tokens=3"]
    return common + [f"model={model}", f"data.path={data / 'train.json'}", f"data.val_path={data / 'val.json'}",
                     f"data.micro_batch_size={micro}", f"trainer.accumulate_grad_batches={accumulate}",
                     f"trainer.max_steps={steps}", f"seed={SEED}"]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_glm41v", "tiny_mgm"])
def test_text_only_and_image_micro_batches_under_zero3_match_one_process(mixed_data, tmp_path, model):
    """4 steps of 2 ranks x 2 micro-batches x accumulation 2 under ZeRO-3 (every parameter partitioned) end
    with the adapter and the logged losses of one process with 8 x 1; the final validation (a text-only
    prompt on one rank, an image on the other; loss and generation) gives the same loss."""
    single = {}
    for name, steps in (("init", 0), ("8x1", 4)):
        single[name] = tmp_path / name
        train(compose_cfg(_overrides(mixed_data, 8, 1, steps, model), single[name]))
    run_dir = tmp_path / "zero3"
    args = _overrides(mixed_data, 2, 2, 4, model) + ["trainer=zero3", "hardware=cpu", "hardware.devices=2",
                                              "trainer.stage3_param_persistence_threshold=0",
                                              f"hydra.run.dir={run_dir}"]
    result = run_cli(args, timeout=240, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(_losses(run_dir)) == 4
    _assert_same_updates(_adapter(run_dir), _adapter(single["8x1"]), _adapter(single["init"]))
    torch.testing.assert_close(torch.tensor(_losses(run_dir)), torch.tensor(_losses(single["8x1"])),
                               rtol=1e-5, atol=1e-6)
    ranks, one = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, single["8x1"]))
    assert ranks["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    assert "val_accuracy" in ranks and "val_accuracy" in one  # generation ran on both ranks


@pytest.mark.parametrize("model,family_name", [("tiny_glm41v", "glm4v"), ("tiny_mgm", "mgm")])
def test_vision_in_every_step_runs_the_vision_path_and_leaves_loss_and_gradients_alone(tmp_path, model, family_name):
    """One process: on a text-only micro-batch the blank image goes through the vision tower and the projector,
    and the loss and every gradient are bit for bit those without it (the projector's are 0)."""
    from vlm_finetune.data.sample import Message, Sample
    from vlm_finetune.models.registry import get_family
    from vlm_finetune.module import VisionInEveryStep, batch_loss_sum

    cfg = compose_cfg([f"model={model}"], tmp_path)
    family = get_family(family_name)
    processor = family.load_processor(model_settings(cfg.model), "truncate")
    model_ = family.build_model(model_settings(cfg.model))
    samples = [Sample([Message("user", f"Name {n} colours."), Message("assistant", " ".join(WORDS[:n]))])
               for n in (2, 7)]
    batch = processor.collate([processor.encode(s) for s in samples])
    assert not any(k in batch for k in family.image_keys)
    loss = read_settings(cfg).loss
    calls = []
    vision_modules = [m for name, m in model_.named_modules() if name.endswith(("visual", "vision_tower", "mm_projector"))]
    assert vision_modules
    for module in vision_modules:
        module.register_forward_hook(lambda *_: calls.append(1))

    def run(with_vision: bool):
        model_.zero_grad(set_to_none=True)
        calls.clear()
        if with_vision:
            with VisionInEveryStep(family, processor).around(model_, batch):
                total, count = batch_loss_sum(family, model_, batch, loss)
        else:
            total, count = batch_loss_sum(family, model_, batch, loss)
        total.backward()
        grads = {n: p.grad.clone() for n, p in model_.named_parameters() if p.grad is not None}
        return float(total.detach()), count, grads, len(calls)

    plain_loss, plain_count, plain_grads, plain_calls = run(False)
    loss_, count, grads, vision_calls = run(True)
    assert plain_calls == 0 and vision_calls >= 1
    assert (loss_, count) == (plain_loss, plain_count)
    for name, grad in plain_grads.items():
        assert torch.equal(grad, grads[name]), name
    extra = set(grads) - set(plain_grads)  # the vision path's parameters: gradients of exactly 0
    assert extra and all(not grads[n].any() for n in extra)
