"""GLM-4V-9B's released layout and prompt format: a tiny folder (config.json, two shards + index, tokenizer.model,
tokenizer_config.json) loads to the logits of the module it was written from without running the folder's
Python files; missing / unexpected keys stop the load with their names; the merged export reloads equal; the
real size counts the parameters users report; prompt ids follow the released tokenizer (reference section 5)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FAST, compose_cfg
from vlm_finetune.config import model_settings
from vlm_finetune.data.sample import IGNORE_INDEX, Message, Sample
from vlm_finetune.errors import ConfigError, DataError
from vlm_finetune.models.glm4v_orig import assets, checkpoint
from vlm_finetune.models.registry import get_family

FAMILY = get_family("glm4v_orig")
TRAP = "raise SystemExit('the folder\\'s own Python must never run')\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A released-layout tiny folder with the architecture of tiny_glm4v, and the module it was written from."""
    path = tmp_path_factory.mktemp("glm-4v-9b")
    plain = model_settings(compose_cfg(["model=tiny_glm4v"]).model).as_dict()
    model = assets.write_tiny_folder(path, plain["config"], 400, seed=7, initializer_range=0.1, shards=2)
    for name in ("tokenization_chatglm.py", "modeling_chatglm.py", "configuration_chatglm.py", "visual.py"):
        (path / name).write_text(TRAP)
    return path, model


def _batch(processor, with_image=True):
    from vlm_finetune.data.shapes import ShapesDataset

    samples = [ShapesDataset("val", 3, 112)[i] for i in range(3)]
    if not with_image:
        samples = [Sample([Message("user", "Say yes."), Message("assistant", "yes")])]
    return processor.collate([processor.encode(s) for s in samples])


def test_released_folder_loads_to_the_logits_of_its_module(folder, tmp_path):
    path, written = folder
    files = sorted(p.name for p in path.iterdir())
    assert {"config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors", "tokenizer.model", "tokenizer_config.json"} <= set(files)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "chatglm" and config["vision_config"]["num_positions"] == 65
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["transformer.encoder.layers.0.self_attention.query_key_value.weight"].startswith("model-")
    assert len(set(index.values())) == 2
    cfg = compose_cfg(["model=tiny_glm4v", f"model.path={path}"], tmp_path)
    model, processor = FAMILY.build_model(model_settings(cfg.model)).eval(), FAMILY.load_processor(model_settings(cfg.model), "truncate")
    batch = _batch(processor)
    assert batch["pixel_values"].shape == (3, 3, 112, 112)
    keys = ("input_ids", "attention_mask", "pixel_values")
    with torch.no_grad():
        got, want = model(**{k: batch[k] for k in keys}), written(**{k: batch[k] for k in keys})
    assert torch.equal(got, want)
    text_only = _batch(processor, with_image=False)  # no dummy image needed
    assert "pixel_values" not in text_only
    with torch.no_grad():
        assert torch.equal(model(text_only["input_ids"]), written(text_only["input_ids"]))


def test_missing_and_unexpected_keys_stop_the_load_with_their_names(folder, tmp_path):
    path, _ = folder
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in path.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    missing = "transformer.vision.linear_proj.gate_proj.weight"
    shard = broken / index[missing]
    state = load_file(str(shard))
    del state[missing]
    state["transformer.rotary_pos_emb.inv_freq"] = torch.ones(8)  # present in some exports: ignored
    save_file(state, str(shard))
    with pytest.raises(ConfigError, match=r"1 missing key\(s\): transformer\.vision\.linear_proj\.gate_proj\.weight"):
        checkpoint.load_folder(broken)
    state[missing] = torch.zeros(256, 128)
    state["transformer.vision.extra.weight"] = torch.zeros(2)
    save_file(state, str(shard))
    with pytest.raises(ConfigError, match=r"1 unexpected key\(s\): transformer\.vision\.extra\.weight"):
        checkpoint.load_folder(broken)


def test_a_glm41v_config_is_refused_with_the_config_to_use(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "glm4v", "vision_config": {}}))
    with pytest.raises(ConfigError, match="model=glm41v_9b"):
        checkpoint.read_config(tmp_path)


def test_glm4v_9b_on_meta_counts_the_reported_parameters():
    model = FAMILY.build_model(model_settings(compose_cfg(["model=glm4v_9b"]).model), dtype=torch.bfloat16, device="meta")
    total = sum(p.numel() for p in model.parameters())
    decoder = sum(p.numel() for p in model.model.layers.parameters())
    vit = sum(p.numel() for p in model.vision.transformer.layers.parameters())
    assert (total, decoder, vit, total - decoder - vit) == (13_906_320_896, 8_158_433_280, 4_279_387_392,
                                                           1_468_500_224)  # zai-org/GLM-4#500
    assert all(p.device.type == "meta" for p in model.parameters())
    dims = FAMILY.memory_dims(model_settings(compose_cfg(["model=glm4v_9b"]).model), 1120)
    assert (dims["vision_patches_per_image"], dims["image_tokens_per_image"], dims["kv_heads"]) == (6401, 1602, 2)


def test_prompt_ids_follow_the_released_tokenizer(tmp_path):
    processor = FAMILY.load_processor(model_settings(compose_cfg(["model=tiny_glm4v"], tmp_path).model), "truncate")
    tok = processor.tokenizer
    first = tok.convert_tokens_to_ids("<|endoftext|>")
    # the released ids, relative to <|endoftext|> = 151329: [gMASK] 151331, <sop> 151333, <|user|> 151336, ...
    offsets = {"[gMASK]": 2, "<sop>": 4, "<|user|>": 7, "<|assistant|>": 8, "<|begin_of_image|>": 10,
               "<|end_of_image|>": 11}
    ids = {t: first + o for t, o in offsets.items()}
    assert all(tok.convert_tokens_to_ids(t) == i for t, i in ids.items())
    assert tok("\n", add_special_tokens=False)["input_ids"] == [198]  # as in the released rank file
    question = tok("What shape?", add_special_tokens=False)["input_ids"]
    from PIL import Image

    picture = Image.new("RGB", (50, 80), (255, 0, 0))
    sample = Sample([Message("user", "<image>\nWhat shape?"), Message("assistant", "circle")], [picture])
    prompt = processor.encode(sample, for_generation=True)
    span = [ids["<|begin_of_image|>"]] + [first] * 16 + [ids["<|end_of_image|>"]]
    # 151331 151333 151336 198 151339 151329 151340 <question> 151337: the placeholder as the released model
    # expands it (16 patch rows here, 1600 at 1120 px); a bare <|assistant|> ends the prompt
    assert prompt.input_ids.tolist() == [ids["[gMASK]"], ids["<sop>"], ids["<|user|>"], 198, *span, *question,
                                         ids["<|assistant|>"]]
    assert prompt.image_inputs["pixel_values"].shape == (1, 3, 112, 112)  # squashed, aspect ratio not kept
    encoded = processor.encode(sample)
    reply = tok("circle", add_special_tokens=False)["input_ids"]
    assert encoded.input_ids.tolist() == prompt.input_ids.tolist() + [198, *reply, ids["<|user|>"]]
    supervised = [t for t in encoded.labels.tolist() if t != IGNORE_INDEX]
    assert supervised == [198, *reply, ids["<|user|>"]]  # loss on the reply and its stop token only
    assert processor.decode(encoded.input_ids[len(prompt.input_ids):]) == "circle"


def test_multi_turn_history_is_the_released_format_and_one_image_per_conversation(tmp_path):
    processor = FAMILY.load_processor(model_settings(compose_cfg(["model=tiny_glm4v"], tmp_path).model), "truncate")
    tok, ids = processor.tokenizer, processor.ids
    sample = Sample([Message("user", "Hi"), Message("assistant", "yes"), Message("user", "Again"),
                     Message("assistant", "no")])
    encoded = processor.encode(sample)

    def text(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    # no token between a reply and the next <|user|>, which is the reply's supervised stop token
    assert encoded.input_ids.tolist() == [ids["[gMASK]"], ids["<sop>"], ids["<|user|>"], 198, *text("Hi"),
                                          ids["<|assistant|>"], 198, *text("yes"), ids["<|user|>"], 198,
                                          *text("Again"), ids["<|assistant|>"], 198, *text("no"), ids["<|user|>"]]
    assert [t for t in encoded.labels.tolist() if t != IGNORE_INDEX] == [198, *text("yes"), ids["<|user|>"], 198,
                                                                         *text("no"), ids["<|user|>"]]
    two = Sample([Message("user", "<image><image>Compare"), Message("assistant", "same")], [None, None])
    with pytest.raises(DataError, match="one image per conversation"):
        processor.encode(two)


def test_merged_export_is_a_released_folder_that_reloads_equal(tmp_path):
    from vlm_finetune.export import export, load_trained_model
    from vlm_finetune.train import train

    _, objects = train(compose_cfg(["model=tiny_glm4v", *FAST, "trainer.max_steps=3", "eval.generate=false",
                                    "optimizer.lr=0.01"], tmp_path / "run"))
    out = export(objects["run_dir"], merge=True, dtype="float32")
    assert json.loads((out / "config.json").read_text())["model_type"] == "chatglm"
    assert (out / "tokenizer.model").is_file() and (out / "model.safetensors.index.json").is_file()
    merged = checkpoint.load_folder(out).eval()
    with_adapter, _, _ = load_trained_model(objects["run_dir"])
    batch = next(iter(objects["datamodule"].val_dataloader()))
    keys = ("input_ids", "attention_mask", "pixel_values")
    with torch.no_grad():
        want = with_adapter.get_base_model()(**{k: batch[k] for k in keys})
        got = merged(**{k: batch[k] for k in keys})
        base = FAMILY.build_model(model_settings(compose_cfg(["model=tiny_glm4v"]).model)).eval()(**{k: batch[k] for k in keys})
    assert ((got - want).abs().max() / want.abs().max()) < 1e-5
    assert (base - got).abs().max() > 1e-3  # training changed what was merged (LoRA and the adapter)
    cfg = compose_cfg(["model=tiny_glm4v", f"model.path={out}"], tmp_path)
    reloaded = FAMILY.load_processor(model_settings(cfg.model), "truncate")
    tiny = FAMILY.load_processor(model_settings(compose_cfg(["model=tiny_glm4v"]).model), "truncate")
    assert reloaded.encode(Sample([Message("user", "Hi"), Message("assistant", "yes")])).input_ids[0] == \
        tiny.ids["[gMASK]"]


def _released_bpe(ranks: dict[bytes, int], text: str) -> list[int]:
    """The released tokenizer's `_tokenize` (tiktoken with no special tokens), written here from its rules: the
    cl100k-style pattern splits the text, and each piece's bytes merge pairwise, lowest rank first."""
    import regex

    from vlm_finetune.models.glm4v_orig.tokenizer import PATTERN

    ids = []
    for piece in regex.findall(PATTERN, text):
        parts = [bytes([b]) for b in piece.encode("utf-8")]
        while len(parts) > 1:
            pairs = [(ranks.get(parts[i] + parts[i + 1]), i) for i in range(len(parts) - 1)]
            pairs = [(rank, i) for rank, i in pairs if rank is not None]
            if not pairs:
                break
            _, i = min(pairs)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids += [ranks[part] for part in parts]
    return ids


def test_direct_calls_add_the_released_prefix_and_decode_drops_special_tokens(tmp_path):
    """`tokenizer(text)` and `encode(text)` give [gMASK] <sop> + the text's ids, as the released
    `build_inputs_with_special_tokens` does; special tokens written in the text are their ids; decode keeps only
    the byte tokens (the released `convert_tokens_to_string` drops every special token, which is a string there).
    The processor's ids do not change (it asks for no special tokens): test_prompt_ids_follow_the_released_tokenizer."""
    from vlm_finetune.models.glm4v_orig.tokenizer import read_ranks

    spec = model_settings(compose_cfg(["model=tiny_glm4v"], tmp_path).model)
    tok = FAMILY.load_processor(spec, "truncate").tokenizer
    ranks = read_ranks(FAMILY.tokenizer_folder(spec) / "tokenizer.model")
    special = {t: tok.convert_tokens_to_ids(t) for t in ("[gMASK]", "<sop>", "<|user|>", "<|endoftext|>")}
    assert special["[gMASK]"] == len(ranks) + 2 and special["<sop>"] == len(ranks) + 4  # 151331, 151333 released
    prefix = [special["[gMASK]"], special["<sop>"]]
    for text in ("What shape is it?", "a red circle\nand 3 squares", "Hi there!"):
        plain = _released_bpe(ranks, text)
        assert tok(text)["input_ids"] == prefix + plain
        assert tok.encode(text) == prefix + plain
        assert tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text, add_special_tokens=False) == plain
        assert tok.decode(prefix + plain + [special["<|endoftext|>"]]) == text
    mixed = tok.encode("Hi<|user|>yes")
    assert mixed == prefix + _released_bpe(ranks, "Hi") + [special["<|user|>"]] + _released_bpe(ranks, "yes")
    assert tok.decode(mixed) == tok.decode(mixed, skip_special_tokens=False) == "Hiyes"
    assert tok("Hi", "yes")["input_ids"] == prefix + _released_bpe(ranks, "Hi") + _released_bpe(ranks, "yes") + [
        special["<|endoftext|>"]]


def test_export_carries_the_source_folders_remote_code_byte_for_byte_and_runs_none(folder, tmp_path):
    """A released-layout source folder with its remote code (trap files that exit, and leave a mark, if ever
    imported) and auto_map trains, exports merged, and the export holds those files byte-equal, the tokenizer
    files byte-equal and the auto_map as it was; no trap ran."""
    import shutil

    from vlm_finetune.export import export
    from vlm_finetune.train import train

    source = tmp_path / "glm-4v-9b"
    shutil.copytree(folder[0], source)
    marks = tmp_path / "marks"
    auto_map = {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "auto_map": auto_map}, indent=2))
    carried = ("tokenization_chatglm.py", "modeling_chatglm.py", "configuration_chatglm.py", "visual.py")
    for name in carried:
        (source / name).write_text(f"# {name}: a trap\nimport pathlib, sys\npathlib.Path({str(marks)!r}).mkdir("
                                   f"exist_ok=True)\n(pathlib.Path({str(marks)!r}) / {name!r}).touch()\nsys.exit(3)\n")
    (source / "generation_config.json").write_text('{"eos_token_id": [151329, 151336, 151338], "do_sample": true}\n')
    _, objects = train(compose_cfg(["model=tiny_glm4v", f"model.path={source}", *FAST, "trainer.max_steps=1",
                                    "eval.generate=false"], tmp_path / "run"))
    out = export(objects["run_dir"], merge=True, dtype="float32")
    for name in (*carried, "generation_config.json", "tokenizer.model", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    assert json.loads((out / "config.json").read_text())["auto_map"] == auto_map
    assert not marks.exists()  # no trap was imported
    assert checkpoint.load_folder(out) is not None  # and the export still loads natively
