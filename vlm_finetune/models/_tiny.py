"""What the locally made tokenizers and tiny checkpoints of every family share: the text their tokenizers
learn from, the fingerprint that names a cached folder, and the race-safe way such a folder is made once."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from vlm_finetune.data.shapes import corpus as shapes_corpus

# General text so that any conversation file tokenises into sensible pieces, not only the shapes corpus.
GENERAL_TEXT = (
    "The quick brown fox jumps over the lazy dog. What is shown in the image? Describe the picture. "
    "There is a person, a car, a cat, a dog, a table and a chair. How many objects are there? "
    "Answer the question using a single word or phrase. Yes. No. left right top bottom middle center "
    "red green blue yellow purple orange black white gray brown pink circle square triangle diamond "
    "one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9"
)


def corpus() -> list[str]:
    """Text a tiny tokenizer is trained on: the generated data's sentences and some general text."""
    return list(shapes_corpus()) + [GENERAL_TEXT] * 4


def fingerprint(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def cached_folder(target: Path, write: Callable[[Path], None]) -> Path:
    """The folder `target`, made once: written into a temporary sibling, then renamed (a crash never leaves
    a half-made folder; when another process wins the race, its complete folder is kept)."""
    if any((target / name).exists() for name in ("config.json", "tokenizer.json", "tokenizer_config.json")):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    from vlm_finetune.models._partitioned import unpartitioned

    try:
        with unpartitioned():  # asked for inside ZeRO-3's zero.Init: the weights written are whole ones
            write(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its folder is complete
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
