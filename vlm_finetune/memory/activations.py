"""The activation model: bytes autograd keeps for backward per token in one decoder layer and per patch in one
vision block (pure functions of the architecture sizes a family's `memory_dims` declares; checked against
`saved_tensors_hooks` on the CPU in tests/test_plan.py)."""
from __future__ import annotations


def decoder_layer_bytes_per_token(dims: dict, act_bytes: int, liger: bool, llm_trains: bool, moe_layer: bool,
                                  lora_rank: int = 0, lora_linears: int = 0, llm_full: bool = False,
                                  mlp_recomputed: bool = False, mlp_lora_linears: int = 0) -> float:
    """Bytes autograd keeps for backward per token in one decoder layer (pre-norm GLM-style layer: four
    RMSNorms, attention with q/k/v/o, gated MLP), at `act_bytes` per activation element.

    Attention (SDPA flash / memory-efficient kernels): q and k after rotary, v, the output, the output's
    contiguous copy into o_proj, and a float32 logsumexp per head. Linear inputs that LoRA or full training
    need (the normed input of q/k/v, of gate_up). The MLP keeps gate_up's output (SiLU's input), the
    activation and the product (down_proj's input); Liger's SwiGLU keeps only gate_up's output and
    recomputes the rest. HF's RMSNorm keeps a float32 copy of its input; Liger's keeps the input as is
    plus a float32 reciprocal RMS. A MoE layer replaces the MLP by the router (float32 logits), the
    top-k routed experts (each a copy of the token's input and its gated MLP) and the shared experts.
    Each LoRA-adapted linear keeps lora_A's output (rank values); rotary keeps its cos/sin per layer. A fully
    trained LLM (float32 norm weights under mixed precision) also keeps each norm's normalised input and
    casts the float32 norm output once per reading linear (q, k, v): six more hidden-sized tensors.
    With the MLP recomputed in backward (selective checkpointing, `speed.checkpoint_scope=mlp`) the layer
    keeps the MLP's input (the checkpoint's input; the same tensor as the MLP linears' input when the LLM
    trains), one more hidden-sized tensor at the checkpoint's boundary, and nothing from inside the MLP:
    neither its activations nor its LoRA linears' `lora_A` outputs."""
    hidden, q_dim, kv_dim = dims["hidden"], dims["q_dim"], dims["kv_dim"]
    heads = dims["heads"]
    if liger:
        norms = 4 * (hidden * act_bytes + 4)
    else:
        norms = 4 * (hidden * 4 + 4)
    # q_rot, out, k_rot, v; the logsumexp; o_proj's input copy
    attention = (2 * q_dim + 2 * kv_dim) * act_bytes + 4 * heads + q_dim * act_bytes
    attention += 2 * dims.get("rotary_dim", dims["q_dim"] // heads) * act_bytes
    lora = lora_linears * lora_rank * act_bytes
    linear_inputs = 2 * hidden * act_bytes if llm_trains else 0  # normed inputs of q/k/v and of the MLP
    if llm_full:
        linear_inputs += 6 * hidden * act_bytes

    def gated_mlp(width: int) -> float:
        # gate_up's output (2 x width) is SiLU's input; HF's MLP also keeps the activation, and the product
        # when down_proj trains; Liger's SwiGLU recomputes the activation
        kept = 2 * width + (0 if liger else width) + (width if llm_trains else 0)
        return kept * act_bytes

    if moe_layer:
        routed, experts = dims["experts_per_token"], dims["experts"]
        width, shared = dims["moe_intermediate"], dims.get("shared_experts", 0)
        mlp = 4 * experts + routed * (hidden * act_bytes + gated_mlp(width)) + shared * gated_mlp(width)
    else:
        mlp = gated_mlp(dims["intermediate"])
    if mlp_recomputed:
        # the checkpoint's input (counted in linear_inputs when the LLM trains) and one hidden-sized tensor
        # autograd saves at the checkpoint's boundary (seen with saved_tensors_hooks, tests/test_plan.py)
        mlp = (1 if llm_trains else 2) * hidden * act_bytes
        lora -= mlp_lora_linears * lora_rank * act_bytes
    return norms + attention + linear_inputs + mlp + lora


def mlp_bytes_per_token(dims: dict, act_bytes: int, liger: bool, llm_trains: bool, moe_layer: bool) -> float:
    """What one MLP (or MoE block) keeps per token: the working set of its recompute in backward."""
    full = decoder_layer_bytes_per_token(dims, act_bytes, liger, llm_trains, moe_layer)
    return full - decoder_layer_bytes_per_token(dims, act_bytes, liger, llm_trains, moe_layer, mlp_recomputed=True)


def recompute_flops_per_token(dims: dict, scope: str, seq: int, moe_layer: bool) -> float:
    """Forward FLOPs per token that one checkpointed layer runs again in backward: the whole layer (scope
    `layer`: projections, causal attention over `seq` tokens, MLP) or only its MLP (scope `mlp`). What
    `activation_checkpointing=auto` minimises among the plans that fit."""
    hidden, q_dim, kv_dim = dims["hidden"], dims["q_dim"], dims["kv_dim"]
    if moe_layer:
        width = (dims["experts_per_token"] + dims.get("shared_experts", 0)) * dims["moe_intermediate"]
        mlp = 6 * hidden * width + 2 * hidden * dims["experts"]
    else:
        mlp = 6 * hidden * dims["intermediate"]
    if scope == "mlp":
        return float(mlp)
    projections = 2 * hidden * (2 * q_dim + 2 * kv_dim)
    attention = 2 * q_dim * seq  # QK^T and AV, causal: half of 2 x 2 x seq x q_dim
    return float(projections + attention + mlp)


def vision_block_bytes_per_patch(dims: dict, act_bytes: int, full: bool = True) -> float:
    """Bytes a trained ViT block keeps per patch: two float32 RMSNorm inputs, qkv's output (v is a view of
    it), q and k after rotary, the attention output and its copy into proj, the gated MLP (gate output,
    up output, the activation, the product). With the block trained fully under mixed precision the norm
    weights are float32 masters, so each norm also keeps its normalised input for the weight gradient and
    its float32 output is cast to bf16 separately by every linear that reads it (qkv; gate and up); with
    LoRA (half-precision norms) one bf16 norm output feeds them all."""
    hidden, intermediate = dims["vision_hidden"], dims["vision_intermediate"]
    norm_side = (2 + 3) * hidden if full else 2 * hidden
    return (2 * (hidden * 4 + 4) + (norm_side + 3 * hidden + 2 * hidden + 2 * hidden) * act_bytes
            + 4 * dims["vision_heads"] + 4 * intermediate * act_bytes)
