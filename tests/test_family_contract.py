"""The contract every registered model family passes, run over the tiny model configs (`conf/model/tiny_*.yaml`,
found on disk, not listed here): a new family gets these checks by being registered and given a tiny config.

Quick (one 4-step run per tiny model, shared by the checks that read a finished run): the model builds with every
part and the block classes the family declares; a mixed batch (a text-only sample beside an image sample) encodes,
collates and runs; the first losses are pinned; a packed batch gives the padded batch's loss; nf4 stores the LLM
in 4 bits (or the family refuses it clearly, before any weight loads); the exported adapter reloads to the trained
model's logits. Slow: a run stopped by the preemption signal and resumed equals the uninterrupted run; two-rank
ZeRO-3 trains the adapter one process trains."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch

from conftest import FAST, TINY_MODELS, compose_cfg
from vlm_finetune.config import read_settings
from vlm_finetune.data.datamodule import Collator, EncodedDataset
from vlm_finetune.data.packing import pack_length
from vlm_finetune.data.sample import IGNORE_INDEX, Message, Sample
from vlm_finetune.data.shapes import ShapesDataset
from vlm_finetune.errors import ConfigError
from vlm_finetune.models.registry import FAMILIES, Part, get_family
from vlm_finetune.module import batch_loss_sum
from vlm_finetune.trainability import decoder_layers, unwrap

RUN = FAST + ["trainer.log_every_n_steps=1"]

# First train_loss values of the 4-step run of each tiny model (RUN; torch 2.13 CPU, fp32), the same before and
# after the settings refactor (checked on 474ae9d). A change in data, encoding, init, loss or optimisation moves them.
PINNED_FIRST_LOSSES = {
    "tiny_glm41v": [6.111869812011719, 5.618814945220947, 5.116453647613525, 4.769550800323486],
    "tiny_glm45v": [6.630892753601074, 5.886373043060303, 5.525181293487549, 4.8017578125],
    "tiny_glm4v": [6.573466777801514, 6.237995624542236, 5.011420249938965, 4.717100143432617],
    "tiny_mgm": [7.36199951171875, 6.4247894287109375, 5.3688764572143555, 5.105923175811768],
    "tiny_mgm_moe": [7.253612995147705, 5.647223472595215, 4.032890319824219, 4.301968097686768],
}


def _settings(model: str, tmp_path: Path, extra: list[str] = ()):
    return read_settings(compose_cfg([f"model={model}", *extra], tmp_path))


def _losses(run_dir: Path) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as handle:
        return [float(r["train_loss"]) for r in csv.DictReader(handle) if r.get("train_loss")]


@pytest.fixture(scope="module")
def finished_run(request, tmp_path_factory):
    """`run(model)`: the 4-step run of a tiny model, made once per test session (tiny_glm41v's is conftest's
    shared run, which has these settings)."""
    from vlm_finetune.train import train

    made: dict[str, tuple] = {}

    def run(model: str):
        if model not in made:
            if model == "tiny_glm41v":
                _, metrics, objects = request.getfixturevalue("shared_run")
            else:
                metrics, objects = train(compose_cfg(RUN + [f"model={model}"], tmp_path_factory.mktemp(model)))
            made[model] = (metrics, objects)
        return made[model]
    return run


def test_every_registered_family_has_a_tiny_model():
    covered = {compose_cfg([f"model={m}"]).model.family for m in TINY_MODELS}
    assert set(FAMILIES) <= covered, f"families without a conf/model/tiny_*.yaml: {set(FAMILIES) - covered}"
    assert set(PINNED_FIRST_LOSSES) == set(TINY_MODELS)  # a new tiny model pins its first losses


@pytest.mark.parametrize("model", TINY_MODELS)
def test_the_model_builds_with_every_part_and_the_declared_blocks(model, tmp_path):
    settings = _settings(model, tmp_path)
    family = get_family(settings.model.family)
    built = family.build_model(settings.model)
    names = dict(built.named_modules())
    parts = family.part_module_names(built)
    assert set(parts) == set(Part)
    for part, modules in parts.items():
        assert modules and all(name in names for name in modules), (part, modules)
        assert sum(p.numel() for name in modules for p in names[name].parameters()) > 0, part
    dims = family.memory_dims(settings.model, settings.model.image_size)
    assert len(decoder_layers(built, family)) == dims["layers"] > 0
    assert any(isinstance(m, tuple(family.vision_block_classes)) for m in built.modules())
    if "experts" in dims:  # an MoE LLM: ZeRO-3 gathers its MoE blocks whole
        assert sum(isinstance(m, tuple(family.zero3_leaf_classes)) for m in built.modules()) == dims["moe_layers"]
    assert family.checkpoint_folder(settings.model) is not None  # the tiny folder, in the released layout


@pytest.mark.parametrize("model", TINY_MODELS)
def test_a_mixed_batch_encodes_collates_and_runs(model, tmp_path):
    settings = _settings(model, tmp_path)
    family = get_family(settings.model.family)
    processor = family.load_processor(settings.model, settings.data.truncation)
    pictured = ShapesDataset("val", 1, image_size=settings.model.image_size, seed=3)[0]
    text_only = Sample([Message("user", "Say two colours."), Message("assistant", "red blue")])
    encoded = [processor.encode(text_only), processor.encode(pictured)]
    for sample in encoded:  # the prompt is never supervised, the reply is
        supervised = sample.labels != IGNORE_INDEX
        assert supervised.any() and not supervised[0] and int(supervised[1:].sum()) == sample.num_supervised_tokens
    batch = processor.collate(encoded)
    assert batch["input_ids"].shape == batch["labels"].shape and batch["input_ids"].shape[0] == 2
    assert all(key in batch for key in family.image_keys)  # the image sample's inputs, once
    model_ = family.build_model(settings.model).eval()
    with torch.no_grad():
        hidden = family.hidden_states(model_, batch)
        features = family.image_features(model_, batch)
    assert hidden.shape[:2] == batch["input_ids"].shape and torch.isfinite(hidden).all()
    assert features is None or (features.shape[-1] == hidden.shape[-1] and torch.isfinite(features).all())


@pytest.mark.parametrize("model", TINY_MODELS)
def test_first_losses_are_pinned(model, finished_run):
    metrics, objects = finished_run(model)
    assert metrics["global_step"] == 4
    torch.testing.assert_close(torch.tensor(_losses(objects["run_dir"])), torch.tensor(PINNED_FIRST_LOSSES[model]),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model", TINY_MODELS)
def test_a_packed_batch_gives_the_padded_batch_loss(model, finished_run, tmp_path):
    """The trained model's loss sum and supervised count over the same samples, packed into rows of
    data.max_length and padded; the loss of packed training runs equals padded runs (tests/test_packing.py)."""
    _, objects = finished_run(model)
    settings = _settings(model, tmp_path, ["data.packing=true"])
    family, processor, module = objects["family"], objects["processor"], objects["module"]
    samples = EncodedDataset(ShapesDataset("val", 6, image_size=settings.model.image_size, seed=11), processor,
                             settings.data.max_length)
    items = [samples[i] for i in range(len(samples))]
    padded, packed = Collator(processor)(items), Collator(processor, pack_length=pack_length(settings.data))(items)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # rows shared: packing did something
    module.model.eval()
    with torch.no_grad():
        padded_sum, padded_count = batch_loss_sum(family, module.model, padded, settings.loss)
        packed_sum, packed_count = batch_loss_sum(family, module.model, packed, settings.loss)
    assert packed_count == padded_count > 0
    torch.testing.assert_close(packed_sum, padded_sum, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", TINY_MODELS)
def test_nf4_stores_the_llm_in_4_bit_or_is_refused_before_weights_load(model, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    settings = _settings(model, tmp_path)
    family = get_family(settings.model.family)
    if not family.supports_nf4:
        with pytest.raises(ConfigError, match="nf4"):
            family.build_model(settings.model, dtype=torch.bfloat16, quantization="nf4")
        return
    whole = family.build_model(settings.model, dtype=torch.bfloat16)
    four_bit = family.build_model(settings.model, dtype=torch.bfloat16, quantization="nf4")
    layers = decoder_layers(four_bit, family)
    linear4 = [m for layer in layers for m in layer.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4 and not any(type(m) is torch.nn.Linear for layer in layers for m in layer.modules())

    def stored(layer_list) -> int:
        return sum(t.numel() * t.element_size() for layer in layer_list for t in [*layer.parameters(), *layer.buffers()])
    # 4 bits per weight and the absmax constants: well under half of bf16's 16 bits
    assert stored(layers) < 0.45 * stored(decoder_layers(whole, family))


@pytest.mark.parametrize("model", TINY_MODELS)
def test_the_exported_adapter_reloads_to_the_trained_logits(model, finished_run):
    from vlm_finetune.export import export, load_trained_model

    _, objects = finished_run(model)
    run_dir, family, processor = objects["run_dir"], objects["family"], objects["processor"]
    folder = export(run_dir)
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    reloaded, _, _ = load_trained_model(run_dir)
    trained = objects["module"].model.eval()
    items = EncodedDataset(ShapesDataset("val", 2, image_size=112, seed=4), processor, None)
    batch = Collator(processor)([items[i] for i in range(len(items))])
    with torch.no_grad():
        want = family.hidden_states(unwrap(trained), batch)
        got = family.hidden_states(unwrap(reloaded), batch)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    trained_lora = {n: p for n, p in trained.named_parameters() if "lora_B" in n}
    assert trained_lora and max(float(p.detach().abs().max()) for p in trained_lora.values()) > 0  # trained


# -- slow: exact resume and two-rank ZeRO-3, per family ---------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("model", TINY_MODELS)
def test_a_run_stopped_at_step_2_and_resumed_equals_the_uninterrupted_run(model, tmp_path):
    from test_resume import stopped_and_resumed_equals_whole

    overrides = RUN + [f"model={model}", "eval.generate=false", "trainer.val_every_n_steps=null",
                       "checkpoint.every_n_steps=null"]
    stopped_and_resumed_equals_whole(overrides, tmp_path, stop_step=2, steps=4)
    assert _losses(tmp_path / "part") == pytest.approx(_losses(tmp_path / "full"), abs=1e-6)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("model", TINY_MODELS)
def test_two_rank_zero3_trains_the_adapter_of_one_process(model, tmp_path):
    """Two CPU ranks under ZeRO-3 (every parameter partitioned; a family that builds partitioned holds half the base
    on each rank from the start) and one process, the same global batch (2 x 4 and 1 x 8 samples per step, SGD):
    the same trained adapter."""
    import re

    from safetensors.torch import load_file

    from conftest import run_cli
    from vlm_finetune.train import train

    common = [f"model={model}", "precision=32-true", "trainer.max_steps=3", "data.num_train=96", "data.num_val=4",
              "eval.generate=false", "trainer.val_every_n_steps=null", "lora.dropout=0.0", "optimizer=sgd",
              "optimizer.lr=0.2", "scheduler=constant", "trainer.enable_progress_bar=false", "hardware=cpu"]
    train(compose_cfg(common + ["trainer=single", "data.micro_batch_size=8"], tmp_path / "one"))
    zero3 = common + ["trainer=zero3", "hardware.devices=2", "data.micro_batch_size=4",
                      "trainer.stage3_param_persistence_threshold=0", f"hydra.run.dir={tmp_path / 'zero3'}"]
    result = run_cli(zero3, timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    settings = _settings(model, tmp_path)
    if get_family(settings.model.family).can_build_partitioned(settings.model):
        built = re.search(r"ZeRO-3: built partitioned; this rank holds ([\d,]+) of the base's ([\d,]+)", result.stdout)
        held, whole = (int(g.replace(",", "")) for g in built.groups())
        assert whole > 100_000 and whole / 2 <= held <= whole / 2 + 1000, (held, whole)  # and padding
    adapters = {name: load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))
                for name in ("one", "zero3")}
    one, zero3 = adapters["one"], adapters["zero3"]
    assert one.keys() == zero3.keys() and any("lora_B" in k for k in one)
    for key, value in one.items():
        assert zero3[key].shape == value.shape, key  # whole tensors, not ZeRO-3 slices
        assert float((zero3[key] - value).abs().max()) <= 1e-4 * max(float(value.abs().max()), 1e-8) + 1e-7, key
