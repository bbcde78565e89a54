"""The processor base every family extends (models/processor_base.py) and the shared LoRA-target resolution
(models/lora_targets.py): truncation policy, collate padding, decode, label counting, target precedence."""
from __future__ import annotations

import pytest
import torch

from conftest import compose_cfg
from vlm_finetune.config import model_settings
from vlm_finetune.data.sample import IGNORE_INDEX, Message, Sample, SampleTooLong
from vlm_finetune.data.shapes import ShapesDataset
from vlm_finetune.errors import ConfigError, DataError
from vlm_finetune.models.base import Part
from vlm_finetune.models.lora_targets import LoraTargets
from vlm_finetune.models.processor_base import LabelledIds, VLMProcessorBase
from vlm_finetune.models.registry import get_family
from vlm_finetune.settings import LoraSettings


class CharTokenizer:
    """One id per character (its code point): every expected id below can be written by hand."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


class CharProcessor(VLMProcessorBase):
    """The smallest family: `U` + user text, `A` + reply (supervised) + `$`; `[` ... `]` stands for an image."""

    image_keys = ("pixel_values",)

    def __init__(self, truncation="truncate"):
        super().__init__(CharTokenizer(), truncation)
        self.eos_token_id, self.pad_token_id, self.image_end_id = ord("$"), 0, ord("]")
        self.stop_token_ids = {ord("$"), ord("#")}

    def encode(self, sample, max_length=None, for_generation=False):
        seq = LabelledIds()
        for m in self._conversation(sample, for_generation):
            if m.role == "assistant":
                seq.prompt(self._text("A"))
                seq.supervised(self._text(m.content + "$"))
            else:
                seq.prompt(self._text("U" + m.content.replace("<image>", "[ii]")))
        images = {"pixel_values": torch.ones(1, 2)} if sample.images else {}
        return self._finish(seq.ids, seq.labels, images, max_length, for_generation)


def _ids(text):
    return [ord(c) for c in text]


def test_labelled_ids_and_supervised_count():
    enc = CharProcessor().encode(Sample([Message("user", "hi"), Message("assistant", "ok")]))
    assert enc.input_ids.tolist() == _ids("UhiAok$")
    assert enc.labels.tolist() == [IGNORE_INDEX] * 4 + _ids("ok$")
    assert enc.num_supervised_tokens == 3 and not enc.truncated
    # the first position is never predicted, so a supervised first token is not counted
    first = CharProcessor()._encoded(_ids("ab"), _ids("ab"), {}, False)
    assert first.num_supervised_tokens == 1


def test_truncate_drop_and_image_span():
    sample = Sample([Message("user", "hi"), Message("assistant", "abcdef")])
    cut = CharProcessor("truncate").encode(sample, max_length=6)
    assert cut.input_ids.tolist() == _ids("UhiAab") and cut.truncated
    assert cut.labels.tolist() == [IGNORE_INDEX] * 4 + _ids("ab")
    with pytest.raises(SampleTooLong, match="11 tokens > data.max_length=6"):
        CharProcessor("drop").encode(sample, max_length=6)
    with pytest.raises(SampleTooLong):  # a generation prompt is never cut (its end is what matters)
        CharProcessor("truncate").encode(sample, max_length=2, for_generation=True)
    image = Sample([Message("user", "<image>x"), Message("assistant", "abcdef")], images=[None])
    assert CharProcessor().encode(image, max_length=6).input_ids.tolist() == _ids("U[ii]x")
    with pytest.raises(SampleTooLong):  # the cut would leave the image span's end behind
        CharProcessor().encode(image, max_length=4)
    with pytest.raises(ValueError, match="use 'truncate' or 'drop'"):
        CharProcessor("clip")
    with pytest.raises(DataError, match="must end with the assistant reply"):
        CharProcessor().encode(Sample([Message("user", "hi")]), for_generation=True)


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_pads_on_the_given_side(side):
    p = CharProcessor()
    short = p.encode(Sample([Message("user", "h"), Message("assistant", "o")]))
    long = p.encode(Sample([Message("user", "<image>"), Message("assistant", "ok")], images=[None]))
    batch = p.collate([short, long], padding_side=side)
    pad = [0] * 5
    rows = [_ids("UhAo$"), _ids("U[ii]Aok$")]
    labels = [[IGNORE_INDEX] * 3 + _ids("o$"), [IGNORE_INDEX] * 6 + _ids("ok$")]
    if side == "right":
        assert batch["input_ids"].tolist() == [rows[0] + pad[:4], rows[1]]
        assert batch["labels"].tolist() == [labels[0] + [IGNORE_INDEX] * 4, labels[1]]
        assert batch["attention_mask"].tolist() == [[1] * 5 + [0] * 4, [1] * 9]
    else:
        assert batch["input_ids"].tolist() == [pad[:4] + rows[0], rows[1]]
        assert batch["labels"].tolist() == [[IGNORE_INDEX] * 4 + labels[0], labels[1]]
        assert batch["attention_mask"].tolist() == [[0] * 4 + [1] * 5, [1] * 9]
    assert list(batch) == ["input_ids", "attention_mask", "labels", "pixel_values"]
    assert batch["pixel_values"].shape == (1, 2)  # only the sample with an image contributes
    assert "pixel_values" not in p.collate([short])


def test_decode_stops_at_the_first_stop_token():
    p = CharProcessor()
    assert p.decode(torch.tensor(_ids(" ab#c$d"))) == "ab"
    assert p.decode(_ids("xyz ")) == "xyz"


@pytest.fixture(scope="module")
def family_processors(tmp_path_factory):
    out = {}
    for model in ("tiny_glm41v", "tiny_glm4v", "tiny_mgm"):
        cfg = compose_cfg([f"model={model}"], tmp_path_factory.mktemp(model))
        out[model] = get_family(cfg.model.family).load_processor(model_settings(cfg.model), "truncate")
    return out


@pytest.mark.parametrize("model", ["tiny_glm41v", "tiny_glm4v", "tiny_mgm"])
def test_each_family_truncates_or_drops_a_long_sample(family_processors, model):
    p = family_processors[model]
    sample = Sample([Message("user", "Tell me."), Message("assistant", "one two three four " * 20)])
    whole = p.encode(sample)
    # a limit 5 tokens into the reply: the cut keeps the prompt and exactly 5 supervised tokens
    limit = int((whole.labels != IGNORE_INDEX).nonzero()[0]) + 5
    assert whole.input_ids.numel() > limit
    p.truncation = "truncate"
    cut = p.encode(sample, max_length=limit)
    assert cut.truncated and cut.input_ids.numel() == limit and cut.num_supervised_tokens == 5
    assert torch.equal(cut.input_ids, whole.input_ids[:limit]) and torch.equal(cut.labels, whole.labels[:limit])
    p.truncation = "drop"
    try:
        with pytest.raises(SampleTooLong, match=f"{whole.input_ids.numel()} tokens > data.max_length={limit}"):
            p.encode(sample, max_length=limit)
        assert torch.equal(p.encode(sample).input_ids, whole.input_ids)  # no limit: kept whole
    finally:
        p.truncation = "truncate"
    with pytest.raises(SampleTooLong):  # an image span is never cut, even under truncate
        p.encode(ShapesDataset("train", 1)[0], max_length=10)
    # decode stops at the family's reply end: the first reply's text, without the template around it
    reply = whole.input_ids[whole.labels != IGNORE_INDEX]
    assert p.decode(reply) == ("one two three four " * 20).strip()


def _lora(llm_modules: str = "all", llm_target: str | None = None) -> LoraSettings:
    return LoraSettings(r=4, alpha=8.0, dropout=0.0, targets={"llm": llm_target, "vision": None},
                        llm_modules=llm_modules, expert_forward="per_expert")


def test_lora_targets_precedence_and_errors():
    lora = LoraTargets("Fam", "VIS", ("attention", "all"), "use attention or all")
    llm = {"attention": "ATT", "all": "ALL"}.get
    custom = _lora(llm_target="MINE")
    assert lora.pattern(Part.LLM, custom, llm) == "MINE"
    assert lora.pattern(Part.VISION, custom, llm) == "VIS"
    assert lora.pattern(Part.LLM, _lora(), llm) == "ALL"
    assert lora.pattern(Part.LLM, _lora("attention"), llm) == "ATT"
    with pytest.raises(ConfigError, match="train.projector=lora is not supported for Fam"):
        lora.pattern(Part.PROJECTOR, custom, llm)
    with pytest.raises(ConfigError, match="lora.llm_modules='mlp': use attention or all"):
        lora.pattern(Part.LLM, _lora("mlp"), llm)
    experts = ("e.gate", "e.down")
    assert lora.expert_parameters(Part.LLM, _lora(), lambda: True, experts) == list(experts)
    assert lora.expert_parameters(Part.LLM, _lora(), lambda: False, experts) == []
    assert lora.expert_parameters(Part.LLM, _lora("attention"), lambda: True, experts) == []
    assert lora.expert_parameters(Part.LLM, custom, lambda: True, experts) == []  # a custom regex replaces them
