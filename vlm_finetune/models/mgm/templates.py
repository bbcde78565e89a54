"""MGM's conversation templates (mgm/conversation.py in the MGM repository), rendered as text segments.

A conversation becomes a list of `(text, supervised)` segments whose concatenation is MGM's prompt string;
`Template.prompt` joins them into that string and the character spans of the supervised segments (each
assistant reply and its end marker). The processor tokenises the whole string once, as MGM does, and finds
the supervised tokens by their character offsets.
"""
from __future__ import annotations

from dataclasses import dataclass

from vlm_finetune.data.sample import IMAGE_PLACEHOLDER, Message
from vlm_finetune.errors import ConfigError, DataError

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAMA3_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                 "that the user provides, and assist the user with a variety of tasks using natural language.")
CHATML_SYSTEM = "Answer the questions."


@dataclass(frozen=True)
class Template:
    name: str
    default_system: str
    #: end-of-answer marker: generation stops at it
    stop: str
    #: tokens the tokenizer must hold as single tokens for this template (text such as Mixtral-v0.1's
    #: `[INST]`, which its tokenizer splits into pieces, is tokenised like any text)
    special_tokens: tuple[str, ...]

    def render(self, messages: list[Message], for_generation: bool = False) -> list[tuple[str, bool]]:
        system, turns = _split(messages, for_generation)
        return RENDERERS[self.name](self, system, turns, for_generation)

    def prompt(self, messages: list[Message], for_generation: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """(MGM's prompt string, [(start, end)] character spans of the supervised segments)."""
        text, spans = "", []
        for piece, supervised in self.render(messages, for_generation):
            if supervised and piece:
                spans.append((len(text), len(text) + len(piece)))
            text += piece
        return text, spans


def _split(messages: list[Message], for_generation: bool) -> tuple[str | None, list[tuple[str, str | None]]]:
    """(system text or None, [(user text, assistant text or None)]), with each message's images moved to its
    front as MGM's data loader does: the placeholders removed, the text stripped, `<image>\\n` put before it,
    and the result stripped again (an image-only message is `<image>`). Several images in one message keep one
    `<image>\\n` each, in order (MGM's loader would keep a single placeholder for them, which misaligns its
    images; see README)."""
    system = None
    rest = list(messages)
    if rest and rest[0].role == "system":
        system, rest = rest[0].content, rest[1:]
    turns: list[tuple[str, str | None]] = []
    i = 0
    while i < len(rest):
        if rest[i].role != "user":
            raise DataError(f"MGM templates alternate user and assistant messages; message {i} is {rest[i].role!r}")
        user = rest[i].content
        k = user.count(IMAGE_PLACEHOLDER)
        if k:
            user = ((IMAGE_PLACEHOLDER + "\n") * k + user.replace(IMAGE_PLACEHOLDER, "").strip()).strip()
        answer = None
        if i + 1 < len(rest):
            if rest[i + 1].role != "assistant":
                raise DataError(f"MGM templates alternate user and assistant messages; message {i + 1} is "
                                f"{rest[i + 1].role!r}")
            answer = rest[i + 1].content
        turns.append((user, answer))
        i += 2
    if not for_generation and (not turns or turns[-1][1] is None):
        raise DataError("a training conversation must end with an assistant message")
    return system, turns


def _vicuna(t: Template, system, turns, gen):
    segments = [((system if system is not None else t.default_system) + " ", False)]
    for user, answer in turns:
        segments.append((f"USER: {user} ASSISTANT:", False))
        if answer is not None:
            segments.append((f" {answer}</s>", True))
    return segments


def _fold_system(system, turns):
    """Templates without a system slot (gemma, mistral_instruct) put a given system text before the first question."""
    if system and turns:
        return [(f"{system}\n\n{turns[0][0]}", turns[0][1])] + list(turns[1:])
    return turns


def _gemma(t: Template, system, turns, gen):
    segments = []
    for user, answer in _fold_system(system, turns):
        segments.append((f"<start_of_turn>user\n{user}<end_of_turn>\n<start_of_turn>model\n", False))
        if answer is not None:
            segments.append((f"{answer}<end_of_turn>\n<eos>", True))
    return segments


def _llama3(t: Template, system, turns, gen):
    text = system if system is not None else t.default_system
    segments = [(f"<|start_header_id|>system<|end_header_id|>\n\n{text}<|eot_id|>", False)]
    for user, answer in turns:
        # MGM's llama_3 template heads assistant turns with the "system" role header; kept for compatibility
        # with the released MGM-8B-LLaMA-3 weights
        segments.append((f"<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
                         "<|start_header_id|>system<|end_header_id|>\n\n", False))
        if answer is not None:
            segments.append((f"{answer}<|eot_id|>", True))
    return segments


def _mistral(t: Template, system, turns, gen):
    segments = []
    for n, (user, answer) in enumerate(_fold_system(system, turns)):
        segments.append((("" if n == 0 else "<s>") + f"[INST] {user} [/INST]", False))
        if answer is not None:
            segments.append((f" {answer} </s>", True))
    return segments


def _chatml(t: Template, system, turns, gen):
    text = system if system is not None else t.default_system
    segments = [(f"<|im_start|>system\n{text}<|im_end|>", False)]
    for user, answer in turns:
        segments.append((f"<|im_start|>user\n{user}<|im_end|><|im_start|>assistant\n", False))
        if answer is not None:
            segments.append((f"{answer}<|im_end|>", True))
    return segments


def _plain(t: Template, system, turns, gen):
    # stage-1 pretraining: the image alone, then the caption
    segments = []
    for user, answer in turns:
        segments.append((IMAGE_PLACEHOLDER * user.count(IMAGE_PLACEHOLDER), False))
        if answer is not None:
            segments.append((f"{answer}\n", True))
    return segments


RENDERERS = {"vicuna_v1": _vicuna, "gemma": _gemma, "llama_3": _llama3, "mistral_instruct": _mistral,
             "chatml_direct": _chatml, "plain": _plain}

TEMPLATES = {
    "vicuna_v1": Template("vicuna_v1", VICUNA_SYSTEM, "</s>", ("<s>", "</s>")),
    "gemma": Template("gemma", "", "<end_of_turn>", ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>")),
    "llama_3": Template("llama_3", LLAMA3_SYSTEM, "<|eot_id|>",
                        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    # Mixtral-8x7B-Instruct-v0.1's tokenizer has no [INST] / [/INST] tokens: they are text
    "mistral_instruct": Template("mistral_instruct", "", "</s>", ("<s>", "</s>")),
    "chatml_direct": Template("chatml_direct", CHATML_SYSTEM, "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
    "plain": Template("plain", "", "\n", ()),
}


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ConfigError(f"MGM conversation template {name!r} is unknown; use one of {sorted(TEMPLATES)}") from None
