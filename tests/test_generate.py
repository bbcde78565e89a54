"""`python -m vlm_finetune.generate`: one image, one question, the trained adapter's answer."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vlm_finetune.data.datamodule import Collator, EncodedDataset
from vlm_finetune.data.shapes import ShapesDataset
from vlm_finetune.generate import answer

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # whole CLI runs: the quick suite stays within 5 minutes
def test_answer_is_what_validation_generates(shared_run, tmp_path, _asset_cache):
    """The command's answer for a validation image equals the answer the trained module generates for it
    in validation, and a command-line call prints the same."""
    cfg, _, objects = shared_run
    module, processor = objects["module"], objects["processor"]
    sample = ShapesDataset("val", 3, image_size=int(cfg.data.image_size), seed=0)[2]
    image = tmp_path / "shape.png"
    sample.images[0].save(image)
    question = sample.messages[0].content
    batch = Collator(processor, evaluation=True)([EncodedDataset([sample], processor, None, True)[0]])
    module.eval()
    module.max_new_tokens = 6
    expected = module.generate(batch["generation"])[0]

    got = answer(image, question, run_dir=objects["run_dir"], max_new_tokens=6)
    assert got == expected and got  # a non-empty answer, the same tokens
    result = subprocess.run([sys.executable, "-m", "vlm_finetune.generate", "model=tiny_glm41v",
                             f"adapter={objects['run_dir'] / 'adapter'}", f"image={image}", f"prompt={question}",
                             "max_new_tokens=6"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, VLM_FINETUNE_CACHE=str(_asset_cache)))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == expected


def test_bad_inputs_fail_with_the_fix(tmp_path, capsys):
    """The command line's own function, in this process (test_answer_is_what_validation_generates runs the
    module entry, `python -m vlm_finetune.generate`)."""
    from vlm_finetune.generate import main

    (tmp_path / "not_an_image.png").write_text("hello")
    assert main(["model=tiny_glm41v", f"image={tmp_path / 'not_an_image.png'}", "prompt=what?"]) == 2
    assert "cannot be read as an image" in capsys.readouterr().err
    assert main(["model=nope", "image=x.png", "prompt=a"]) == 2
    assert "model='nope' is not a model config; use one of" in capsys.readouterr().err
    # issue 32: more placeholders than images was an IndexError inside the processor, after the model was built
    Image.new("RGB", (56, 56)).save(tmp_path / "one.png")
    assert main(["model=tiny_glm41v", f"image={tmp_path / 'one.png'}", "prompt=<image><image>same?"]) == 2
    assert "has 2 '<image>' placeholder(s) but 1 image(s): generate takes one image" in capsys.readouterr().err
    Image.new("RGB", (1, 300)).save(tmp_path / "strip.png")
    assert main(["model=tiny_glm41v", f"image={tmp_path / 'strip.png'}", "prompt=what?"]) == 2
    assert "strip.png is 1x300 pixels, an aspect ratio of 300:1" in capsys.readouterr().err


def test_caption_metrics_are_logged_per_validation(tmp_path):
    """eval.caption_metrics=true logs BLEU-4 and ROUGE-L F1 of the generated answers at every validation."""
    import csv

    from conftest import FAST, compose_cfg
    from vlm_finetune.train import train

    cfg = compose_cfg(FAST + ["eval.caption_metrics=true", "trainer.val_every_n_steps=2", "trainer.max_steps=4"],
                      tmp_path)
    metrics, objects = train(cfg)
    assert 0.0 <= metrics["val_bleu"] <= 1.0 and 0.0 <= metrics["val_rougeL"] <= 1.0
    with open(tmp_path / "csv" / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("val_rougeL")]
    assert len(rows) == 2  # steps 2 and 4
    module = objects["module"]
    # the metric objects themselves: a perfect caption scores 1; "a red circle" against "a red square"
    # shares the 2-word subsequence "a red" out of 3 words each, so ROUGE-L F1 = 2/3
    module.val_rouge.reset()
    module.val_rouge.update(["a red circle"], ["a red square"])
    assert abs(float(module.val_rouge.compute()["rougeL_fmeasure"]) - 2 / 3) < 1e-6
    module.val_bleu.reset()
    module.val_bleu.update(["two blue squares on the left"], [["two blue squares on the left"]])
    assert abs(float(module.val_bleu.compute()) - 1.0) < 1e-6
