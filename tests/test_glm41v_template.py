"""GLM-4.1V: the ids the processor trains on are those of the chat template released with the checkpoint.

The template is tests/data/glm41v_chat_template.jinja, the `chat_template.jinja` of
zai-org/GLM-4.1V-9B-Thinking at Hub revision 3c1471e51dc811b589d4d12b1c1c7c1c941267c2 (model, tokenizer and
processor revision recorded with it). Its text was taken from the public record of that file in
github.com/Yangjunjie-Lin/vlm-synergy-qualification, reports/atomic_v2/renderer_validation.md (commit
9fb14f887e17248a234ea2421baa2a21193146fe), field `official_chat_template`, and is checked below against the
SHA-256 recorded there with it; the same template (indentation aside, which its `{%-` tags strip) is quoted
in sgl-project/sglang, test/srt/test_jinja_template_utils.py (commit 65cf1ed0b8b1cec4c51690b3294f3d2367e09ef8).

A copy of the tiny GLM-4.1V checkpoint folder gets that template as `chat_template.jinja` and the
`chat_template` of its `tokenizer_config.json`, as a released folder carries it. transformers renders it
(`apply_chat_template`) and tokenises the text once; each `<|image|>` is then expanded the way the HF
`Glm4vProcessor` does it (its own `replace_image_token`: grid.prod() // merge_size**2 copies). The
project's processor must give the same ids: the generation prompt exactly, a training sequence with the
one `<|endoftext|>` that ends the conversation appended, and labels exactly on the replies (each with
the token that ends it: the next role token, or that `<|endoftext|>`).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import compose_cfg
from vlm_finetune.config import model_settings
from vlm_finetune.data.sample import IGNORE_INDEX, IMAGE_PLACEHOLDER, Message, Sample
from vlm_finetune.models.registry import get_family

TEMPLATE = Path(__file__).parent / "data" / "glm41v_chat_template.jinja"
# recorded with the template text (sha256 of its JSON string literal, json.dumps of the text)
RECORDED_SHA256 = "5232dbe7ee947df4d2009f2b262b70a22d4f2d2f0590e2af4ef2a78096171e90"


def test_template_is_the_recorded_release():
    text = TEMPLATE.read_text(encoding="utf-8")
    assert hashlib.sha256(json.dumps(text).encode()).hexdigest() == RECORDED_SHA256


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(project processor, HF tokenizer, HF image processor) of a tiny GLM-4.1V folder carrying the template."""
    from transformers import AutoImageProcessor, AutoTokenizer

    family = get_family("glm4v")
    cfg = compose_cfg([], tmp_path_factory.mktemp("run"))
    folder = tmp_path_factory.mktemp("glm41v") / "checkpoint"
    shutil.copytree(family.checkpoint_folder(model_settings(cfg.model)), folder)
    template = TEMPLATE.read_text(encoding="utf-8")
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(config, chat_template=template), indent=2))
    processor = family.load_processor(model_settings(compose_cfg([f"model.path={folder}"], tmp_path_factory.mktemp("run")).model), "truncate")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template == template
    return processor, tokenizer, AutoImageProcessor.from_pretrained(folder)


def _hf_messages(sample: Sample) -> list[dict]:
    """The sample as chat-template messages: an image-holding user turn becomes a list of items."""
    out = []
    for m in sample.messages:
        if m.role == "user" and IMAGE_PLACEHOLDER in m.content:
            items = []
            for k, chunk in enumerate(m.content.split(IMAGE_PLACEHOLDER)):
                if k > 0:
                    items.append({"type": "image"})
                if chunk:
                    items.append({"type": "text", "text": chunk})
            out.append({"role": m.role, "content": items})
        else:
            out.append({"role": m.role, "content": m.content})
    return out


def _hf_ids(tokenizer, image_processor, sample: Sample, add_generation_prompt: bool):
    """What transformers gives: the template rendered, images expanded as `Glm4vProcessor` does, tokenised once."""
    from transformers import Glm4vProcessor

    messages = _hf_messages(sample)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    collapsed = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    collapsed = collapsed["input_ids"] if isinstance(collapsed, dict) or hasattr(collapsed, "keys") else collapsed
    n_images = text.count("<|image|>")
    image_inputs = image_processor(images=sample.images[:n_images], return_tensors="pt") if n_images else {}
    hf = types.SimpleNamespace(image_processor=image_processor, image_token="<|image|>")
    pieces = text.split("<|image|>")
    expanded = pieces[0] + "".join(Glm4vProcessor.replace_image_token(hf, image_inputs, k) + piece
                                   for k, piece in enumerate(pieces[1:]))
    ids = tokenizer(expanded, add_special_tokens=False)["input_ids"]
    return ids, collapsed, image_inputs


def _collapse(ids: list[int], image_id: int) -> list[int]:
    return [t for i, t in enumerate(ids) if t != image_id or i == 0 or ids[i - 1] != image_id]


IMG_A = Image.new("RGB", (64, 48), (10, 200, 30))
IMG_B = Image.new("RGB", (40, 90), (200, 20, 30))
CASES = {
    "single_turn_text": Sample([Message("user", "Tell me a colour."), Message("assistant", "green")]),
    "single_turn_image": Sample([Message("user", f"{IMAGE_PLACEHOLDER}\nWhat colour is the shape?"),
                                 Message("assistant", "red circle")], [IMG_A]),
    "multi_turn_text": Sample([Message("system", "Be brief."), Message("user", "Hi!"), Message("assistant", "Hello."),
                               Message("user", "  What is 2+2?\n"), Message("assistant", " 4\n\nDone")]),
    "multi_turn_images": Sample([Message("system", "You see shapes."),
                                 Message("user", f"Look: {IMAGE_PLACEHOLDER} and{IMAGE_PLACEHOLDER}"),
                                 Message("assistant", "two shapes"), Message("user", "Which is red?"),
                                 Message("assistant", "the second"),
                                 Message("user", f"{IMAGE_PLACEHOLDER}And this one?"), Message("assistant", "green")],
                                [IMG_A, IMG_B, IMG_A]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_training_ids_are_the_released_template(released, name):
    processor, tokenizer, image_processor = released
    sample = CASES[name]
    expected, collapsed, image_inputs = _hf_ids(tokenizer, image_processor, sample, add_generation_prompt=False)
    enc = processor.encode(sample)
    ids = enc.input_ids.tolist()
    assert ids == expected + [tokenizer.eos_token_id]
    # the same with every image as the template writes it (one `<|image|>` between begin/end of image)
    assert _collapse(ids, processor.image_token_id) == list(collapsed) + [tokenizer.eos_token_id]
    assert ids.count(processor.image_token_id) == sum(int(g.prod()) // 4 for g in image_inputs.get(
        "image_grid_thw", torch.zeros(0, 3)))
    for key, value in image_inputs.items():
        assert torch.equal(enc.image_inputs[key], value)


@pytest.mark.parametrize("name", list(CASES))
def test_generation_prompt_is_the_released_template(released, name):
    processor, tokenizer, image_processor = released
    sample = CASES[name]
    prompt = Sample(sample.messages[:-1], sample.images)
    expected, _, _ = _hf_ids(tokenizer, image_processor, prompt, add_generation_prompt=True)
    enc = processor.encode(sample, for_generation=True)
    assert enc.input_ids.tolist() == expected
    assert (enc.labels == IGNORE_INDEX).all()


@pytest.mark.parametrize("name", list(CASES))
def test_labels_are_exactly_the_replies(released, name):
    """Each supervised span is one reply's tokens (as they sit in the template's ids) plus the token that ends
    it; everything else, images and the `\\n` after `<|assistant|>` included, takes no loss."""
    processor, tokenizer, image_processor = released
    sample = CASES[name]
    enc = processor.encode(sample)
    ids, labels = enc.input_ids.tolist(), enc.labels.tolist()
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels))
    spans, start = [], None
    for i, label in enumerate(labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    replies = [m for m in sample.messages if m.role == "assistant"]
    assert len(spans) == len(replies)
    assistant_id, user_id = processor.special_ids["<|assistant|>"], processor.special_ids["<|user|>"]
    for (a, b), reply, is_last in zip(spans, replies, [False] * (len(replies) - 1) + [True]):
        # the reply follows `<|assistant|>` and its `\n`, and is what the template rendered for it
        head = tokenizer("\n", add_special_tokens=False)["input_ids"]
        assert ids[a - 1 - len(head):a] == [assistant_id] + head
        assert tokenizer.decode(ids[a:b - 1]) == reply.content
        assert ids[a:b - 1] == tokenizer("\n" + reply.content, add_special_tokens=False)["input_ids"][len(head):]
        assert ids[b - 1] == (tokenizer.eos_token_id if is_last else user_id)
    assert enc.num_supervised_tokens == sum(b - a for a, b in spans)
    # what generation stops at: the reply decodes up to (not including) the token that ends it
    a, b = spans[0]
    assert processor.decode(torch.tensor(ids[a:] + [7, 8])) == replies[0].content.strip()


def _whitespace_merging_tokenizer(chat_template: str):
    """A byte-level BPE with GLM-4V special tokens whose vocabulary merges runs of newlines and spaces (as the
    real GLM tokenizer does, and the tiny one does not): text cut in pieces then tokenises differently."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from vlm_finetune.models.glm4v.assets import SPECIAL_TOKENS

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["one\n\ntwo\n\n\nthree   four\n \n  five\n\n  six"] * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<pad>",
                                   chat_template=chat_template)


def test_text_between_special_tokens_is_tokenised_as_one_run(released):
    """`\\n` + text after a role token is one run of the rendered template: tokenised apart, `\\n\\n...` would
    split differently. Checked with a tokenizer that merges whitespace."""
    from vlm_finetune.models.glm4v.processor import Glm4vProcessor

    _, _, image_processor = released
    tokenizer = _whitespace_merging_tokenizer(TEMPLATE.read_text(encoding="utf-8"))
    nl = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert tokenizer("\n\n", add_special_tokens=False)["input_ids"] != nl + nl  # the merge exists
    processor = Glm4vProcessor(tokenizer, image_processor)
    sample = Sample([Message("system", "\ntwo"), Message("user", f"\n\none{IMAGE_PLACEHOLDER}\n\ntwo"),
                     Message("assistant", "\n\nthree   four"), Message("user", " \n  five"),
                     Message("assistant", "\n  six")], [IMG_A])
    expected, _, _ = _hf_ids(tokenizer, image_processor, sample, add_generation_prompt=False)
    enc = processor.encode(sample)
    assert enc.input_ids.tolist() == expected + [tokenizer.eos_token_id]
    prompt, _, _ = _hf_ids(tokenizer, image_processor, Sample(sample.messages[:-1], sample.images), True)
    assert processor.encode(sample, for_generation=True).input_ids.tolist() == prompt
    # a token that holds both the `\n` after `<|assistant|>` and the start of the reply is supervised with it
    ids, labels = enc.input_ids.tolist(), enc.labels.tolist()
    runs, current = [], []
    for token, label in zip(ids + [0], labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    replies = [m.content for m in sample.messages if m.role == "assistant"]
    assert [r[-1] for r in runs] == [processor.special_ids["<|user|>"], tokenizer.eos_token_id]
    for run, reply in zip(runs, replies):
        assert tokenizer.decode(run[:-1]) in (reply, "\n" + reply)
    assert any(tokenizer.decode(run[:-1]) == "\n" + reply for run, reply in zip(runs, replies))
