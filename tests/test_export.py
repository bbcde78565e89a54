"""`python -m vlm_finetune.export`: the adapter folder, and a merged folder that plain transformers loads
and that computes what base + adapter computes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

from vlm_finetune.config import model_settings
from vlm_finetune.data.datamodule import Collator, EncodedDataset
from vlm_finetune.data.shapes import ShapesDataset
from vlm_finetune.models.registry import get_family

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


def _export(*args, cache):
    return subprocess.run([sys.executable, "-m", "vlm_finetune.export", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, VLM_FINETUNE_CACHE=str(cache)))


def _logits(model, batch):
    with torch.no_grad():
        return model(**{k: batch[k] for k in KEYS}).logits


@pytest.mark.slow  # whole CLI runs: the quick suite stays within 5 minutes
def test_merged_export_matches_base_plus_adapter(shared_run, tmp_path, _asset_cache):
    cfg, _, objects = shared_run
    run_dir = objects["run_dir"]
    out = tmp_path / "merged"
    result = _export(f"run_dir={run_dir}", "merge=true", f"out={out}", cache=_asset_cache)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"merged model written to {out}" in result.stdout
    # a plain transformers folder: config, weights without any LoRA tensor, tokenizer, image processor
    weights = {}
    for file in out.glob("*.safetensors"):
        weights.update(load_file(str(file)))
    assert weights and not [k for k in weights if "lora_" in k or "modules_to_save" in k or "base_layer" in k]
    assert json.loads((out / "config.json").read_text())["model_type"] == "glm4v"
    AutoTokenizer.from_pretrained(out)
    AutoImageProcessor.from_pretrained(out)

    processor = objects["processor"]
    data = EncodedDataset(ShapesDataset("val", 4, seed=11), processor, None)
    batch = Collator(processor)([data[i] for i in range(4)])
    folder = get_family("glm4v").checkpoint_folder(model_settings(cfg.model))
    base = AutoModelForImageTextToText.from_pretrained(folder).eval()
    base_logits = _logits(base, batch)
    with_adapter = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    expected = _logits(with_adapter, batch)
    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    got = _logits(merged, batch)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert (expected - base_logits).abs().max() > 1e-2  # the trained weights are in there


@pytest.mark.slow  # the command line; the family contract's adapter export and reload stay quick
def test_adapter_export_is_the_peft_folder(shared_run, tmp_path, _asset_cache):
    run_dir = shared_run[2]["run_dir"]
    out = tmp_path / "adapter_only"
    result = _export(f"run_dir={run_dir}", f"out={out}", cache=_asset_cache)
    assert result.returncode == 0, result.stderr[-2000:]
    ours = load_file(str(out / "adapter_model.safetensors"))
    original = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == original.keys() and all(torch.equal(ours[k], original[k]) for k in ours)
    assert (out / "adapter_config.json").is_file() and (out / "tokenizer.json").is_file()


def test_export_of_a_folder_that_is_not_a_run_fails_clearly(tmp_path, capsys):
    """The command line's own function, in this process (the module entry is `sys.exit(main())`; the other
    export tests run it as `python -m vlm_finetune.export`)."""
    from vlm_finetune.export import main

    assert main([f"run_dir={tmp_path}", "merge=true"]) == 2
    stderr = capsys.readouterr().err
    assert "has no config.json" not in stderr and f"run_dir={tmp_path} has no config.yaml" in stderr
    assert main([f"run_dir={tmp_path}", "merge=maybe"]) == 2
    assert "merge='maybe': use true or false" in capsys.readouterr().err
