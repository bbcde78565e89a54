"""GLM-4V-9B's tokenizer as released: `tokenizer.model` (tiktoken ranks: one `base64(bytes) rank` per line) and
`tokenizer_config.json` (`added_tokens_decoder`: the special tokens and their ids), turned into a fast tokenizer
with transformers' tiktoken converter. The folder's `tokenization_chatglm.py` is never imported or run."""
from __future__ import annotations

import base64
import json
from pathlib import Path

from vlm_finetune.errors import ConfigError
from vlm_finetune.models.glm4v_orig.modeling import SPECIAL_TOKENS

RANK_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"
# the pre-tokeniser regex of the released tokenizer (cl100k-style)
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")


def read_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as err:
            raise ConfigError(f"{path}:{number} is not a tiktoken rank line (base64 token, rank): {err}") from err
    return ranks


def write_ranks(ranks: dict[bytes, int], path: Path) -> None:
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in sorted(ranks.items(), key=lambda x: x[1])]
    Path(path).write_text("\n".join(lines) + "\n")


def special_tokens(folder: Path) -> dict[int, str]:
    """{id: token} from tokenizer_config.json's added_tokens_decoder."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{folder} has no {CONFIG_FILE} (the special tokens and their ids)")
    decoder = json.loads(path.read_text()).get("added_tokens_decoder") or {}
    tokens = {int(i): (t["content"] if isinstance(t, dict) else str(t)) for i, t in decoder.items()}
    missing = [t for t in SPECIAL_TOKENS if t not in tokens.values()]
    if missing:
        raise ConfigError(f"{path}: added_tokens_decoder lacks {missing}; is this GLM-4V-9B's tokenizer?")
    return tokens


def load_tokenizer(folder: Path):
    """A PreTrainedTokenizerFast equal in ids to the released tiktoken tokenizer (ranks = ids, special tokens at
    their configured ids, never split)."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    folder = Path(folder)
    rank_path = folder / RANK_FILE
    if not rank_path.is_file():
        raise ConfigError(f"{folder} has no {RANK_FILE} (GLM-4V-9B's tiktoken rank file)")
    ranks = read_ranks(rank_path)
    specials = special_tokens(folder)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ConfigError(f"{rank_path}: ranks are not 0..{len(ranks) - 1} without gaps")

    class _Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(_url):  # the rank file read above (no `tiktoken` package needed)
            return ranks

    backend = _Converter(vocab_file=str(rank_path), pattern=PATTERN).converted()
    for token_id in sorted(specials):
        if token_id != backend.get_vocab_size():
            raise ConfigError(f"{folder}: special token {specials[token_id]!r} has id {token_id}, but the ranks "
                              f"end at {backend.get_vocab_size() - 1}: ids must follow the ranks without gaps")
        backend.add_special_tokens([AddedToken(specials[token_id], special=True, normalized=False)])
    backend.post_processor = _released_prefix(backend)
    return _released_decode_class(PreTrainedTokenizerFast)(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>", padding_side="left",
        clean_up_tokenization_spaces=False)


def _released_prefix(backend):
    """The released `build_inputs_with_special_tokens`: `[gMASK]<sop>` before the text of a direct call
    (`tokenizer(text)`, `encode(text)`; `add_special_tokens=False` adds nothing, as the processor asks). A pair
    gets `[gMASK]<sop> A B <|endoftext|>`: the released code appends its eos there by the name "<eos>", which its
    vocabulary lacks (that call fails there); <|endoftext|> is its eos token."""
    from tokenizers import processors

    ids = {name: backend.token_to_id(name) for name in ("[gMASK]", "<sop>", "<|endoftext|>")}
    return processors.TemplateProcessing(single="[gMASK] <sop> $A", pair="[gMASK] <sop> $A $B <|endoftext|>",
                                         special_tokens=list(ids.items()))


def _released_decode_class(base: type) -> type:
    """The tokenizer class whose `decode` drops the special tokens, as the released one's does (its
    `convert_tokens_to_string` keeps only byte tokens: every special token is a string there), whatever
    `skip_special_tokens` says."""

    class ChatGLM4TokenizerFast(base):
        def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None, **kwargs):
            return super()._decode(token_ids, skip_special_tokens=True,
                                   clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    return ChatGLM4TokenizerFast


def tokenizer_config(num_ranks: int, image_size: int) -> dict:
    """tokenizer_config.json as the released folder has it (special ids after the ranks; the class names the
    folder's own Python tokenizer, which this project never runs)."""
    return {
        "added_tokens_decoder": {str(num_ranks + i): {"content": t, "lstrip": False, "normalized": False,
                                                      "rstrip": False, "single_word": False, "special": True}
                                 for i, t in enumerate(SPECIAL_TOKENS)},
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]},
        "clean_up_tokenization_spaces": False, "do_lower_case": False, "eos_token": "<|endoftext|>",
        "image_size": image_size, "model_max_length": 8192, "pad_token": "<|endoftext|>", "padding_side": "left",
        "remove_space": False, "tokenizer_class": "ChatGLM4Tokenizer",
    }
