"""What this project writes for MGM, read back the way MGM's own code (transformers 4.38) reads it.

MGM's loader (mgm/model/builder.py, mgm_arch.py `initialize_uni_modules`) as described, not run:
- config.json is read by a transformers-4 config class: `rope_theta` (top level; default 10000), `rope_scaling`,
  Gemma's `hidden_act` (exact GELU for "gelu"); `mm_use_im_patch_token` absent means true, and then a token is
  added and the embeddings grow; `optimize_vision_tower_aux` absent means false, and then the ConvNeXt comes
  from the `mm_vision_tower_aux` folder instead of the weights.
- model.safetensors.index.json is required: its weight_map names the shards that hold a key containing
  `vlm_uni`, `vision_fpn` or `vision_stages`; only those shards are read, and CLIP
  (`vision_tower.vision_tower.*`) is loaded from them strictly.
- the tokenizer comes from the checkpoint folder through transformers 4's AutoTokenizer.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import compose_cfg
from vlm_finetune.config import model_settings
from vlm_finetune.models.mgm import checkpoint, config_file
from vlm_finetune.models.mgm.assets import ensure_tokenizer_folder
from vlm_finetune.models.mgm.modeling import MgmForCausalLM
from vlm_finetune.models.registry import get_family

# reading and writing the released layout warns of nothing (transformers 5 would flag MGM's `"rope_scaling": null`)
pytestmark = pytest.mark.filterwarnings("error::FutureWarning")
MGM = get_family("mgm")
ROOT = Path(__file__).resolve().parent.parent
TRAINABLE = ("vlm_uni", "vision_fpn", "vision_stages")
# tokenizer classes transformers 4.38 knows (a name it lacks stops AutoTokenizer)
TRANSFORMERS4_TOKENIZERS = {"PreTrainedTokenizerFast", "LlamaTokenizer", "LlamaTokenizerFast", "GemmaTokenizer",
                            "GemmaTokenizerFast"}


def _model(name="tiny_mgm", overrides=(), seed=0) -> MgmForCausalLM:
    cfg = compose_cfg([f"model={name}", *overrides])
    torch.manual_seed(seed)
    return MgmForCausalLM(MGM.config_from_options(model_settings(cfg.model))).eval()


def mgm_loader_reads(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors MGM's initialize_uni_modules reads: those of the shards named for a trainable key."""
    from safetensors.torch import load_file

    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    shards = {f for k, f in weight_map.items() if any(m in k for m in TRAINABLE)}
    state = {}
    for shard in shards:
        state.update(load_file(str(folder / shard)))
    return state


@pytest.mark.parametrize("name", ["tiny_mgm", "tiny_mgm_moe"])
def test_index_always_written_and_each_tower_in_one_shard(name, tmp_path):
    model = _model(name, seed=1)
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    checkpoint.save_folder(model, single)
    checkpoint.save_folder(model, sharded, max_shard_bytes=200_000)
    index = json.loads((single / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index.values()) == {"model.safetensors"}
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 2
    state = model.state_dict()
    for prefix in ("model.vision_tower.vision_tower.", "model.vision_tower_aux.", "model.vlm_uni_"):
        assert len({f for k, f in weight_map.items() if k.startswith(prefix)}) == 1, prefix
    for folder in (single, sharded):  # MGM's strict CLIP load finds every CLIP key among the shards it reads
        read = mgm_loader_reads(folder)
        clip = {k for k in read if k.startswith("model.vision_tower.vision_tower.")}
        assert clip == {k for k in state if k.startswith("model.vision_tower.vision_tower.")}
        assert all(torch.equal(read[k], state[k]) for k in clip)
        assert {k for k in read if "vision_tower_aux." in k} == {k for k in state if "vision_tower_aux." in k}


def test_written_config_carries_what_mgms_loader_needs(tmp_path):
    model = _model("tiny_mgm_moe")
    checkpoint.save_folder(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["rope_theta"] == model.config.text_config.rope_parameters["rope_theta"]
    assert config["rope_scaling"] is None
    assert config["optimize_vision_tower_aux"] is True  # the ConvNeXt of the weights is used
    assert config["mm_use_im_patch_token"] is False and config["mm_use_im_start_end"] is False
    assert config["torch_dtype"] == "float32" and config["image_aspect_ratio"] == "pad"
    # generated configs name the towers by the local folder names MGM's builder accepts
    _, real = compose_cfg(["model=mgm_2b"]), MGM.config_from_options(model_settings(compose_cfg(["model=mgm_2b"]).model))
    assert "openai" in real.mm_vision_tower.lower()
    aux = real.mm_vision_tower_aux.lower()
    assert "openclip" in aux and "convnext" in aux and "large" in aux and "d-320" in aux


def test_optimize_vision_tower_aux_makes_mgm_use_a_changed_convnext(tmp_path):
    """A ConvNeXt changed by training: with `optimize_vision_tower_aux` false MGM would keep the tower from
    `mm_vision_tower_aux`; written here it is true and the changed weights are among what MGM reads."""
    model = _model(seed=2)
    with torch.no_grad():
        model.model.vision_tower_aux.vision_stages[1].blocks[0].gamma.add_(1.0)
    checkpoint.save_folder(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    read = mgm_loader_reads(tmp_path / "out")
    key = "model.vision_tower_aux.vision_stages.1.blocks.0.gamma"
    assert config["optimize_vision_tower_aux"] and torch.equal(read[key], model.state_dict()[key])


def _released_llama_config(theta: float) -> dict:
    return {
        "architectures": ["MGMLlamaForCausalLM"], "model_type": "mgm", "vocab_size": 400, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 512, "rope_theta": theta, "rope_scaling": None, "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16", "max_sequence_length": 4096, "transformers_version": "4.38.2",
        "mm_vision_tower": "model_zoo/OpenAI/clip-vit-large-patch14-336",
        "mm_vision_tower_aux": "model_zoo/OpenAI/openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup",
        "mm_hidden_size": 32, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
        "image_size_aux": 64, "image_grid": 1, "image_aspect_ratio": "pad", "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right", "optimize_vision_tower": False, "optimize_vision_tower_aux": False,
        "mm_projector_lr": None, "some_future_field": {"kept": True},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "image_size": 56, "patch_size": 14},
        "vision_aux_config": {"dims": [8, 8, 8, 8], "depths": [1, 1, 1, 1]},
    }


@pytest.mark.parametrize("theta", [5e5, 5e6])
def test_a_loaded_rope_theta_is_used_and_exported_again(theta, tmp_path):
    """LLaMA-3 MGM (5e5) and Yi-34B MGM (5e6): the theta of config.json computes the rotary frequencies and is
    written back at the top level, with every field this project does not own."""
    raw = _released_llama_config(theta)
    cfg = config_file.config_from_dict(raw)
    assert cfg.text_config.rope_parameters["rope_theta"] == theta
    with torch.device("meta"):
        model = MgmForCausalLM(cfg)
    model.to_empty(device="cpu")
    checkpoint._restore_buffers(model, "cpu")
    freq = model.model.rotary_emb.inv_freq
    head_dim = 64 // 4
    assert torch.allclose(freq, 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    written = config_file.config_to_dict(cfg)
    assert written["rope_theta"] == theta
    for key in ("max_sequence_length", "some_future_field", "tokenizer_model_max_length", "optimize_vision_tower",
                "mm_vision_tower", "mm_vision_tower_aux", "torch_dtype"):
        assert written[key] == raw[key], key
    assert config_file.config_from_dict(written).text_config.rope_parameters["rope_theta"] == theta


def test_gemma_gelu_follows_the_checkpoint():
    """Gemma's `hidden_act: gelu` is exact GELU in the code MGM was trained with; transformers 5 would compute
    the tanh approximation. The loaded model computes the exact one and writes both activation fields."""
    from transformers.activations import GELUActivation

    raw = {"architectures": ["MGMGemmaForCausalLM"], "model_type": "mgm_gemma", "vocab_size": 300, "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
           "head_dim": 32, "hidden_act": "gelu", "mm_hidden_size": 32, "image_size_aux": 64,
           "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                             "num_attention_heads": 2, "image_size": 56, "patch_size": 14},
           "vision_aux_config": {"dims": [8, 8, 8, 8], "depths": [1, 1, 1, 1]}}
    cfg = config_file.config_from_dict(raw)
    with torch.device("meta"):
        model = MgmForCausalLM(cfg)
    act = model.model.layers[0].mlp.act_fn
    x = torch.linspace(-3, 3, 101)
    assert isinstance(act, GELUActivation) and torch.equal(act(x), torch.nn.functional.gelu(x))
    written = config_file.config_to_dict(cfg)
    assert written["hidden_act"] == written["hidden_activation"] == "gelu"
    tiny = config_file.config_to_dict(MGM.config_from_options(model_settings(compose_cfg(["model=tiny_mgm"]).model)))
    assert tiny["hidden_act"] == tiny["hidden_activation"] == "gelu_pytorch_tanh"


def test_image_aspect_ratio_other_than_pad_resizes_and_crops(tmp_path):
    """MGM pads only for `image_aspect_ratio: pad`; any other value takes CLIP's path (shortest edge, centre crop),
    so a wide image's middle fills the whole square."""
    from PIL import Image

    from vlm_finetune.models.mgm.processor import MgmImages

    wide = Image.new("RGB", (96, 32), (0, 0, 255))
    wide.paste((255, 0, 0), (32, 0, 64, 32))  # red middle third
    padded = MgmImages(32, 16, aspect_ratio="pad")(wide)[1]
    cropped = MgmImages(32, 16, aspect_ratio="square")(wide)[1]
    red = (1.0 - 0.48145466) / 0.26862954
    assert abs(float(cropped[0].mean()) - red) < 1e-3  # all red
    assert float(padded[0, 0].abs().max()) < 0.02  # the top row is mean-colour padding


def _folder_with_tokenizer(tmp_path: Path, kind: str, legacy: bool) -> Path:
    """A tiny MGM folder in the released layout whose tokenizer is `kind` (SentencePiece: tokenizer.model only)."""
    from transformers import AutoTokenizer

    source = ensure_tokenizer_folder(os.environ["VLM_FINETUNE_CACHE"], 400, "vicuna_v1", kind, legacy)
    tokenizer = AutoTokenizer.from_pretrained(source)
    cfg = compose_cfg(["model=tiny_mgm", "model.template=vicuna_v1", "model.llm.model_type=llama"])
    config = MGM.config_from_options(model_settings(cfg.model), tokenizer)
    torch.manual_seed(0)
    folder = tmp_path / "MGM-7B-tiny"
    checkpoint.save_folder(MgmForCausalLM(config), folder)
    for item in source.iterdir():
        if item.name != "vlm_finetune.json":
            shutil.copyfile(item, folder / item.name)
    return folder


@pytest.mark.parametrize("kind,legacy", [("sentencepiece", False), ("sentencepiece", True), ("bpe", False)])
def test_export_copies_the_tokenizer_files_byte_for_byte(kind, legacy, tmp_path):
    folder = _folder_with_tokenizer(tmp_path, kind, legacy)
    files = {p.name: p.read_bytes() for p in folder.iterdir() if "token" in p.name}
    if kind == "sentencepiece":
        assert "tokenizer.model" in files and "tokenizer.json" not in files
    cfg = compose_cfg(["model=tiny_mgm", f"model.path={folder}", "model.template=vicuna_v1"], tmp_path / "run")
    processor = MGM.load_processor(model_settings(cfg.model), "truncate")  # a SentencePiece-only folder loads (the sentencepiece package)
    model = MGM.build_model(model_settings(cfg.model))
    out = tmp_path / "export"
    out.mkdir()
    MGM.save_merged(model, out, processor)
    for name, data in files.items():
        assert (out / name).read_bytes() == data, name
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] in TRANSFORMERS4_TOKENIZERS
    if kind == "sentencepiece":
        assert tokenizer_config["legacy"] is legacy
    else:
        merges = json.loads((out / "tokenizer.json").read_text())["model"]["merges"]
        assert all(isinstance(m, str) and len(m.split(" ")) == 2 for m in merges)  # tokenizers < 0.20 reads these
    reloaded = checkpoint.load_folder(out).eval()
    ids = torch.tensor([processor.tokenizer("A red circle").input_ids])
    with torch.no_grad():
        assert torch.equal(model.eval()(ids), reloaded(ids))


def test_sentencepiece_is_a_declared_dependency():
    text = (ROOT / "pyproject.toml").read_text()
    dependencies = text.split("dependencies = [", 1)[1].split("]", 1)[0]  # [project] dependencies, not extras
    assert re.search(r'^\s*"sentencepiece[>=<~ ]', dependencies, re.M)
