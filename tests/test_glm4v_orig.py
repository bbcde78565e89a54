"""The original GLM-4V-9B against references written here from the published facts alone
(shared/reference/glm4v_9b_original.md): the decoder on released-layout (fused) weights, one EVA2-CLIP layer,
the adapter with boi/eoi and the scaling, the shared image position, and the whole spliced forward."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlm_finetune.models.glm4v_orig import assets, checkpoint
from vlm_finetune.models.glm4v_orig.modeling import Glm4vOrigForCausalLM, image_positions

TINY = {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 96, "kv_channels": 16, "num_attention_heads": 4,
        "multi_query_group_num": 2, "padded_vocab_size": 128, "seq_length": 256, "layernorm_epsilon": 1e-5,
        "boi_token_id": 120, "eoi_token_id": 121, "pad_token_id": 100, "eos_token_id": [100, 107],
        "vision_config": {"num_hidden_layers": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 48,
                          "image_size": 56, "patch_size": 14, "scaling_factor": 8}}


def released_state(cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under every released name, at the released shapes (reference section 4)."""
    g = torch.Generator().manual_seed(seed)
    t, v = cfg.text_config, cfg.vision
    h, ffn, qkv = t.hidden_size, t.intermediate_size, (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim
    vh, grid = v.hidden_size, v.image_size // v.patch_size

    def r(*shape, mean=0.0, std=0.2):
        return mean + std * torch.randn(*shape, generator=g)

    s = {"transformer.embedding.word_embeddings.weight": r(t.vocab_size, h, std=1.0),
         "transformer.encoder.final_layernorm.weight": r(h, mean=1.0),
         "transformer.output_layer.weight": r(t.vocab_size, h)}
    for n in range(t.num_hidden_layers):
        p = f"transformer.encoder.layers.{n}."
        s.update({p + "input_layernorm.weight": r(h, mean=1.0), p + "post_attention_layernorm.weight": r(h, mean=1.0),
                  p + "self_attention.query_key_value.weight": r(qkv, h), p + "self_attention.query_key_value.bias": r(qkv),
                  p + "self_attention.dense.weight": r(h, h), p + "mlp.dense_h_to_4h.weight": r(2 * ffn, h),
                  p + "mlp.dense_4h_to_h.weight": r(h, ffn)})
    p = "transformer.vision."
    s.update({p + "patch_embedding.cls_embedding": r(1, vh), p + "patch_embedding.proj.weight": r(vh, 3, 14, 14, std=0.05),
              p + "patch_embedding.proj.bias": r(vh), p + "patch_embedding.position_embedding.weight": r(grid**2 + 1, vh),
              p + "conv.weight": r(h, vh, 2, 2), p + "conv.bias": r(h), p + "linear_proj.linear_proj.weight": r(h, h),
              p + "linear_proj.norm1.weight": r(h, mean=1.0), p + "linear_proj.norm1.bias": r(h),
              p + "linear_proj.gate_proj.weight": r(ffn, h), p + "linear_proj.dense_h_to_4h.weight": r(ffn, h),
              p + "linear_proj.dense_4h_to_h.weight": r(h, ffn), p + "boi": r(1, 1, h, std=1.0), p + "eoi": r(1, 1, h, std=1.0)})
    for m in range(v.num_hidden_layers):
        q = f"{p}transformer.layers.{m}."
        s.update({q + "input_layernorm.weight": r(vh, mean=1.0), q + "input_layernorm.bias": r(vh),
                  q + "attention.query_key_value.weight": r(3 * vh, vh), q + "attention.query_key_value.bias": r(3 * vh),
                  q + "attention.dense.weight": r(vh, vh), q + "attention.dense.bias": r(vh),
                  q + "mlp.fc1.weight": r(v.intermediate_size, vh), q + "mlp.fc1.bias": r(v.intermediate_size),
                  q + "mlp.fc2.weight": r(vh, v.intermediate_size), q + "mlp.fc2.bias": r(vh),
                  q + "post_attention_layernorm.weight": r(vh, mean=1.0), q + "post_attention_layernorm.bias": r(vh)})
    return s


@pytest.fixture(scope="module")
def loaded():
    cfg = checkpoint.config_from_dict(assets.released_config(TINY))
    state = released_state(cfg)
    with torch.device("meta"):
        model = Glm4vOrigForCausalLM(cfg)
    model.to_empty(device="cpu")
    from transformers.models.glm.modeling_glm import GlmRotaryEmbedding

    model.model.rotary_emb = GlmRotaryEmbedding(cfg.text_config)
    model.load_state_dict(checkpoint.from_released(state, cfg), strict=True)
    return cfg, state, model.eval()


# -- references, from the facts only -------------------------------------------------------------------
def ref_rmsnorm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def ref_rotary(x, positions):
    """GPT-J style on the first half of each head: pairs (x[2i], x[2i+1]) rotated by pos * 10000^(-2i/rot)."""
    rot = x.shape[-1] // 2
    theta = 10000.0 ** (-torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    angle = positions[:, None, :, None].double() * theta  # [b, 1, L, rot/2]
    cos, sin = angle.cos().float(), angle.sin().float()
    x0, x1 = x[..., 0:rot:2], x[..., 1:rot:2]
    rotated = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)
    return torch.cat([rotated, x[..., rot:]], dim=-1)


def ref_decoder(cfg, s, embeds, positions):
    t = cfg.text_config
    heads, groups, d, eps = t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.rms_norm_eps
    b, length, _ = embeds.shape
    causal = torch.full((length, length), float("-inf")).triu(1)
    h = embeds
    for n in range(t.num_hidden_layers):
        p = f"transformer.encoder.layers.{n}."
        x = ref_rmsnorm(h, s[p + "input_layernorm.weight"], eps)
        qkv = x @ s[p + "self_attention.query_key_value.weight"].T + s[p + "self_attention.query_key_value.bias"]
        q = qkv[..., : heads * d].view(b, length, heads, d).transpose(1, 2)
        k = qkv[..., heads * d: (heads + groups) * d].view(b, length, groups, d).transpose(1, 2)
        v = qkv[..., (heads + groups) * d:].view(b, length, groups, d).transpose(1, 2)
        q, k = ref_rotary(q, positions), ref_rotary(k, positions)
        k, v = k.repeat_interleave(heads // groups, 1), v.repeat_interleave(heads // groups, 1)  # group g: heads g*16..
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + causal, -1) @ v
        h = h + att.transpose(1, 2).reshape(b, length, -1) @ s[p + "self_attention.dense.weight"].T
        x = ref_rmsnorm(h, s[p + "post_attention_layernorm.weight"], eps)
        gate, up = (x @ s[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, -1)  # gate first
        h = h + (F.silu(gate) * up) @ s[p + "mlp.dense_4h_to_h.weight"].T
    h = ref_rmsnorm(h, s["transformer.encoder.final_layernorm.weight"], eps)
    return h @ s["transformer.output_layer.weight"].T


def ref_vit_layer(s, m, x, heads, eps=1e-6):
    p = f"transformer.vision.transformer.layers.{m}."
    b, length, c = x.shape
    qkv = (x @ s[p + "attention.query_key_value.weight"].T + s[p + "attention.query_key_value.bias"])
    q, k, v = qkv.view(b, length, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // heads), -1) @ v  # bidirectional
    att = att.transpose(1, 2).reshape(b, length, c) @ s[p + "attention.dense.weight"].T + s[p + "attention.dense.bias"]
    x = x + F.layer_norm(att, (c,), s[p + "input_layernorm.weight"], s[p + "input_layernorm.bias"], eps)
    mlp = F.gelu(x @ s[p + "mlp.fc1.weight"].T + s[p + "mlp.fc1.bias"]) @ s[p + "mlp.fc2.weight"].T + s[p + "mlp.fc2.bias"]
    return x + F.layer_norm(mlp, (c,), s[p + "post_attention_layernorm.weight"], s[p + "post_attention_layernorm.bias"],
                            eps)


def ref_adapter(s, patches, scaling):
    p = "transformer.vision."
    n, length, c = patches.shape
    side = math.isqrt(length)
    x = F.conv2d(patches.transpose(1, 2).reshape(n, c, side, side), s[p + "conv.weight"], s[p + "conv.bias"], stride=2)
    x = x.flatten(2).transpose(1, 2) @ s[p + "linear_proj.linear_proj.weight"].T
    x = F.gelu(F.layer_norm(x, (x.shape[-1],), s[p + "linear_proj.norm1.weight"], s[p + "linear_proj.norm1.bias"], 1e-5))
    x = (F.silu(x @ s[p + "linear_proj.gate_proj.weight"].T) * (x @ s[p + "linear_proj.dense_h_to_4h.weight"].T)
         ) @ s[p + "linear_proj.dense_4h_to_h.weight"].T
    x = torch.cat([s[p + "boi"].expand(n, -1, -1), x, s[p + "eoi"].expand(n, -1, -1)], dim=1)
    return x / scaling


def ref_vision(cfg, s, images):
    p = "transformer.vision.patch_embedding."
    x = F.conv2d(images, s[p + "proj.weight"], s[p + "proj.bias"], stride=cfg.vision.patch_size).flatten(2).transpose(1, 2)
    x = torch.cat([s[p + "cls_embedding"].expand(x.shape[0], 1, -1), x], 1) + s[p + "position_embedding.weight"]
    for m in range(cfg.vision.num_hidden_layers):
        x = ref_vit_layer(s, m, x, cfg.vision.num_heads)
    return ref_adapter(s, x[:, 1:], cfg.vision.scaling_factor)


# -- tests -----------------------------------------------------------------------------------------------
def test_fused_released_decoder_equals_the_reference(loaded):
    cfg, s, model = loaded
    ids = torch.randint(0, 100, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(ids)
        want = ref_decoder(cfg, s, s["transformer.embedding.word_embeddings.weight"][ids],
                           torch.arange(23).expand(2, -1))
    assert want.abs().max() > 1.0  # the comparison is not of near-zero numbers
    assert (got - want).abs().max() < 1e-5


def test_one_eva2_clip_layer_equals_the_reference(loaded):
    cfg, s, model = loaded
    x = torch.randn(2, cfg.vision.num_positions, cfg.vision.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model.vision.transformer.layers[1](x)
        model.set_attn_implementation("eager")
        eager = model.vision.transformer.layers[1](x)
        model.set_attn_implementation("sdpa")
    want = ref_vit_layer(s, 1, x, cfg.vision.num_heads)
    assert (got - want).abs().max() < 1e-5 and (eager - want).abs().max() < 1e-5


def test_adapter_with_boi_eoi_and_the_scaling_equals_the_reference(loaded):
    cfg, s, model = loaded
    patches = torch.randn(3, cfg.vision.grid**2, cfg.vision.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model.projector(patches)
    want = ref_adapter(s, patches, 8.0)
    assert got.shape == (3, cfg.vision.patch_tokens + 2, cfg.text_config.hidden_size) == (3, 6, 64)
    assert torch.allclose(got[:, 0], s["transformer.vision.boi"][0] / 8) and torch.allclose(got[:, -1], s["transformer.vision.eoi"][0] / 8)
    assert (got - want).abs().max() < 1e-5


def test_patch_rows_share_one_position_and_text_continues_after_three():
    boi, eoi, pad = 120, 121, 100
    ids = torch.tensor([[1, 2, 3, 4, boi, pad, pad, pad, pad, eoi, 7, 8], [1, boi, pad, pad, pad, pad, eoi, 7, 8, 9, 10, 11]])
    assert image_positions(ids, None, boi, eoi).tolist() == [[0, 1, 2, 3, 4, 5, 5, 5, 5, 6, 7, 8],
                                                             [0, 1, 2, 2, 2, 2, 3, 4, 5, 6, 7, 8]]
    left = torch.tensor([[pad, pad, 1, boi, pad, pad, eoi, 7]])  # left padding (generation) starts at 0
    assert image_positions(left, torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]]), boi, eoi).tolist() == [[0, 0, 0, 1, 2, 2, 3, 4]]


def test_spliced_forward_equals_the_reference_pipeline(loaded):
    """boi + 4 patch rows + eoi written over the span, the patch rows at one position: logits as the reference."""
    cfg, s, model = loaded
    rows = cfg.vision.patch_tokens
    ids = torch.tensor([[102, 104, 107, 50, 120, *[100] * rows, 121, 60, 61, 62, 108, 50]])
    images = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = model(ids, torch.ones_like(ids), images)
        features = ref_vision(cfg, s, images)
        embeds = s["transformer.embedding.word_embeddings.weight"][ids].clone()
        embeds[0, 4: 4 + rows + 2] = features[0]
        positions = torch.tensor([[0, 1, 2, 3, 4, *[5] * rows, 6, 7, 8, 9, 10, 11]])
        want = ref_decoder(cfg, s, embeds, positions)
    # the whole pipeline (conv, two ViT layers, adapter, decoder) in fp32: 1e-5 relative to the largest logit
    assert (got - want).abs().max() < 1e-5 * want.abs().max()
    with torch.no_grad():  # the image really matters
        assert (model(ids, torch.ones_like(ids), images + 1) - got).abs().max() > 1e-3


def test_greedy_generation_with_the_cache_follows_the_full_forward(loaded):
    cfg, s, model = loaded
    ids = torch.tensor([[100, 102, 104, 120, 100, 100, 100, 100, 121, 60, 108], [102, 104, 120, 100, 100, 100, 100, 121, 60, 61, 108]])
    mask = torch.tensor([[0] + [1] * 10, [1] * 11])
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(5))
    out = model.generate(ids, mask, images, max_new_tokens=4, eos_token_id=[], pad_token_id=100)
    with torch.no_grad():
        for step in range(4):
            seq = out[:, : ids.shape[1] + step]
            full = model(seq, torch.cat([mask, torch.ones(2, step, dtype=torch.long)], 1), images)
            assert torch.equal(full[:, -1].argmax(-1), out[:, ids.shape[1] + step])


def test_released_names_round_trip_and_fuse_back(loaded):
    cfg, s, model = loaded
    back = checkpoint.to_released(model.state_dict(), cfg)
    assert set(back) == set(s)
    assert all(torch.equal(back[k], s[k]) for k in s)


def test_checkpointing_recomputes_decoder_and_vit_layers_with_the_same_gradients():
    cfg = checkpoint.config_from_dict(assets.released_config(TINY))
    torch.manual_seed(0)
    model = Glm4vOrigForCausalLM(cfg).train()
    rows = cfg.vision.patch_tokens
    ids = torch.tensor([[102, 104, 107, 120, *[100] * rows, 121, 60, 61]])
    images = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(6))

    def grads():
        model.zero_grad()
        model(ids, torch.ones_like(ids), images).logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in [*model.vision.transformer.layers, *model.model.layers])
    recomputed = grads()
    assert plain.keys() == recomputed.keys() and "vision.transformer.layers.0.mlp.fc1.weight" in plain
    assert all(torch.allclose(plain[n], recomputed[n], atol=1e-6) for n in plain)
