"""MGM's prompts tokenised as MGM tokenises them, for every template and both tokenizer kinds.

MGM (mgm/conversation.py, mgm/train/train.py, mgm/mm_utils.py) renders a conversation to one prompt string,
splits it at `<image>` and tokenises every piece whole with the tokenizer's own special tokens, keeping the
first piece's BOS and dropping the first token of each later piece when there is one (`tokenizer_image_token`);
a prompt without an image is tokenised once. The references below are written from that description: the
prompt string as MGM's Conversation builds it (`mgm_prompt`) and its ids (`mgm_ids`). Tokenizers: the byte-level
BPE made here, and a SentencePiece model trained here (byte fallback, dummy prefix; `[INST]` is pieces, as in
Mixtral-8x7B-Instruct-v0.1's tokenizer), with transformers' `legacy` flag off and on.
"""
from __future__ import annotations

import os

import pytest
from PIL import Image
from transformers import AutoTokenizer

from vlm_finetune.data.sample import IGNORE_INDEX, Message, Sample
from vlm_finetune.models.mgm.assets import ensure_tokenizer_folder
from vlm_finetune.models.mgm.modeling import IMAGE_TOKEN_INDEX
from vlm_finetune.models.mgm.processor import MgmImages, MgmProcessor
from vlm_finetune.models.mgm.templates import LLAMA3_SYSTEM, VICUNA_SYSTEM

TOKENS_PER_IMAGE = 4
TEMPLATES = ("vicuna_v1", "gemma", "llama_3", "mistral_instruct", "chatml_direct", "plain")
# (kind, legacy). legacy=true SentencePiece only with the templates whose special tokens are the model's own
# <s> / </s> (Vicuna, Mixtral): with user-defined pieces (<start_of_turn>, <|im_start|>) transformers 5 and 4
# already disagree among themselves under legacy=true, whatever this project does
KINDS = [("bpe", False), ("sentencepiece", False), ("sentencepiece", True)]
CASES = [(t, k, legacy) for t in TEMPLATES for k, legacy in KINDS
         if not (legacy and t not in ("vicuna_v1", "mistral_instruct", "plain"))]

ONE = [Message("user", "<image>What color are the shapes?"), Message("assistant", "red")]
MULTI = [Message("user", "What is it?\n<image>"), Message("assistant", "A red circle."),
         Message("user", "And its size?"), Message("assistant", "small")]
TEXT = [Message("user", "Say yes."), Message("assistant", "yes")]
IMAGE_ONLY = [Message("user", "<image>"), Message("assistant", "a blue square")]
CONVERSATIONS = {"one": ONE, "multi": MULTI, "text": TEXT, "image_only": IMAGE_ONLY}
# the end marker MGM supervises with each reply
REPLY = {"vicuna_v1": "{}</s>", "gemma": "{}<end_of_turn>\n<eos>", "llama_3": "{}<|eot_id|>",
         "chatml_direct": "{}<|im_end|>", "mistral_instruct": " {} </s>", "plain": "{}\n"}


def mgm_message(content: str) -> str:
    """MGM's preprocess_multimodal: the placeholder removed, the text stripped, `<image>\\n` before it, stripped."""
    if "<image>" in content:
        content = ("<image>\n" + content.replace("<image>", "").strip()).strip()
    return content


def mgm_prompt(name: str, messages: list[Message], for_generation: bool = False) -> str:
    """The prompt string of MGM's Conversation.get_prompt (preprocess_plain for `plain`); for generation an
    empty assistant message is appended, as MGM's inference does."""
    turns = [mgm_message(m.content) for m in messages] + ([None] if for_generation else [])
    if name == "plain":
        return "<image>" + (turns[1] + "\n" if turns[1] is not None else "")
    out = ""
    if name == "vicuna_v1":  # SeparatorStyle.TWO, sep " ", sep2 "</s>"
        out = VICUNA_SYSTEM + " "
        for i, m in enumerate(turns):
            role = ("USER", "ASSISTANT")[i % 2]
            out += f"{role}: {m}" + (" ", "</s>")[i % 2] if m is not None else f"{role}:"
    elif name == "gemma":  # SeparatorStyle.GEMMA, sep "", sep2 "<eos>"
        for i, m in enumerate(turns):
            out += f"<start_of_turn>{('user', 'model')[i % 2]}\n"
            out += m + "<end_of_turn>\n" + ("", "<eos>")[i % 2] if m is not None else ""
    elif name == "llama_3":  # the assistant's header names the "system" role, as MGM's conv_llama_3 does
        out = "<|start_header_id|>system<|end_header_id|>\n\n" + LLAMA3_SYSTEM + "<|eot_id|>"
        for i, m in enumerate(turns):
            out += f"<|start_header_id|>{('user', 'system')[i % 2]}<|end_header_id|>\n\n"
            out += m + "<|eot_id|>" if m is not None else ""
    elif name == "chatml_direct":  # SeparatorStyle.MPT
        out = "<|im_start|>system\nAnswer the questions.<|im_end|>"
        for i, m in enumerate(turns):
            out += f"<|im_start|>{('user', 'assistant')[i % 2]}\n" + (m + "<|im_end|>" if m is not None else "")
    elif name == "mistral_instruct":  # SeparatorStyle.LLAMA_2, sep "<s>", sep2 "</s>", empty system
        for i, m in enumerate(turns):
            if m is not None:
                out += f"<s>[INST] {m} [/INST]" if i % 2 == 0 else f" {m} </s>"
        out = out.lstrip("<s>")
    return out


def mgm_ids(tokenizer, prompt: str) -> list[int]:
    """MGM's tokenizer_image_token, each image position expanded to the image's token count."""
    pieces = [tokenizer(piece).input_ids for piece in prompt.split("<image>")]
    drop = 1 if pieces[0] and pieces[0][0] == tokenizer.bos_token_id else 0
    ids = list(pieces[0])
    for piece in pieces[1:]:
        ids += [IMAGE_TOKEN_INDEX] * TOKENS_PER_IMAGE + piece[drop:]
    return ids


def _processor(template: str, kind: str, legacy: bool) -> MgmProcessor:
    folder = ensure_tokenizer_folder(os.environ["VLM_FINETUNE_CACHE"], 400, template, kind, legacy)
    images = MgmImages(image_size_aux=32, clip_size=16)
    return MgmProcessor(AutoTokenizer.from_pretrained(folder), images, TOKENS_PER_IMAGE, template,
                        tokenizer_folder=folder)


def _runs(labels: list[int]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, label in enumerate(labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _squeeze(text: str) -> str:
    return "".join(text.split())


@pytest.mark.parametrize("template,kind,legacy", CASES)
def test_ids_labels_and_generation_prompt_are_mgms(template, kind, legacy):
    processor = _processor(template, kind, legacy)
    tokenizer = processor.tokenizer
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    names = ["one", "image_only"] if template == "plain" else list(CONVERSATIONS)
    for name in names:
        messages = CONVERSATIONS[name]
        sample = Sample(messages, [image] if any("<image>" in m.content for m in messages) else [])
        enc = processor.encode(sample)
        ids, labels = enc.input_ids.tolist(), enc.labels.tolist()
        assert ids == mgm_ids(tokenizer, mgm_prompt(template, messages)), (name, tokenizer.convert_ids_to_tokens(
            [i for i in ids if i >= 0]))
        # supervised: exactly the assistant replies with their end markers, one run each, labels = ids there
        replies = [m.content for m in messages if m.role == "assistant"]
        runs = _runs(labels)
        assert len(runs) == len(replies), (name, runs)
        for (a, b), reply in zip(runs, replies):
            assert labels[a:b] == ids[a:b]
            text = tokenizer.decode(ids[a:b], skip_special_tokens=False)
            assert _squeeze(text) == _squeeze(REPLY[template].format(reply)), (name, text)
        assert enc.num_supervised_tokens == sum(b - a for a, b in runs) - (labels[0] != IGNORE_INDEX)
        # the generation prompt: the prompt MGM's inference renders, tokenised once
        gen = processor.encode(sample, for_generation=True).input_ids.tolist()
        assert gen == mgm_ids(tokenizer, mgm_prompt(template, messages[:-1], for_generation=True)), name


@pytest.mark.parametrize("legacy", [False, True])
def test_vicuna_sentencepiece_ids_are_not_segment_by_segment(legacy):
    """Tokenising each template segment on its own (BOS, then the system prompt, `USER: ... ASSISTANT:`, the reply)
    gives other ids than MGM with a SentencePiece tokenizer: a dummy-prefix `▁` at every join. The processor's
    ids are MGM's; after `</s>` the next turn starts with `▁` only under legacy=true."""
    processor = _processor("vicuna_v1", "sentencepiece", legacy)
    tokenizer = processor.tokenizer
    sample = Sample(MULTI, [Image.new("RGB", (8, 8))])
    ids = processor.encode(sample).input_ids.tolist()
    by_segment = [tokenizer.bos_token_id]
    for text, _ in processor.template.render(MULTI):
        for k, chunk in enumerate(text.split("<image>")):
            by_segment += ([IMAGE_TOKEN_INDEX] * TOKENS_PER_IMAGE if k else []) + tokenizer(
                chunk, add_special_tokens=False).input_ids
    assert ids == mgm_ids(tokenizer, mgm_prompt("vicuna_v1", MULTI)) and ids != by_segment
    tokens = tokenizer.convert_ids_to_tokens([i for i in ids if i >= 0])
    assert tokens[tokens.index("</s>") + 1].startswith("▁") == legacy, tokens


def test_mixtral_v01_style_tokenizer_without_inst_tokens_is_accepted():
    processor = _processor("mistral_instruct", "sentencepiece", True)
    vocab = processor.tokenizer.get_vocab()
    assert "[INST]" not in vocab and "[/INST]" not in vocab
    assert len(processor.tokenizer("[INST]", add_special_tokens=False).input_ids) > 1  # pieces, as in Mixtral-v0.1
    assert processor.eos_token_id == processor.tokenizer.convert_tokens_to_ids("</s>")


def test_chatml_has_no_bos_as_yi():
    """Nous-Hermes-2-Yi-34B's tokenizer adds no BOS and MGM's chatml masking counts none: the ids start with
    `<|im_start|>`."""
    for kind, legacy in KINDS[:2]:
        processor = _processor("chatml_direct", kind, legacy)
        ids = processor.encode(Sample(TEXT, [])).input_ids.tolist()
        assert ids[0] == processor.tokenizer.convert_tokens_to_ids("<|im_start|>")
        assert processor.tokenizer.bos_token_id not in ids


def test_image_placement_as_mgm():
    """An image-only message is `<image>` without a newline; several images in one message keep one placeholder
    each, in order, at the front (a deliberate extension: MGM's loader keeps one placeholder for all)."""
    processor = _processor("gemma", "bpe", False)
    prompt, _ = processor.template.prompt(IMAGE_ONLY)
    assert "<start_of_turn>user\n<image><end_of_turn>" in prompt
    two = [Message("user", "Compare <image> with <image>, please."), Message("assistant", "same")]
    prompt, _ = processor.template.prompt(two)
    assert "<start_of_turn>user\n<image>\n<image>\nCompare  with , please.<end_of_turn>" in prompt
    enc = processor.encode(Sample(two, [Image.new("RGB", (8, 8))] * 2))
    assert enc.input_ids.tolist().count(IMAGE_TOKEN_INDEX) == 2 * TOKENS_PER_IMAGE
    assert enc.image_inputs["images_aux"].shape[0] == 2
