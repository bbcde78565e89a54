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


def eva_block_bytes_per_patch(dims: dict, act_bytes: int, full: bool, lora_linears: tuple[str, ...],
                              lora_rank: int, eager: bool, patches_per_image: int, norm_bytes: int = 4) -> float:
    """Bytes an EVA2-CLIP block (GLM-4V-9B's tower: fused query_key_value, dense, post-sublayer LayerNorms,
    fc1 -> exact GELU -> fc2) keeps per patch when the tower trains. Both LayerNorms keep their input and its
    mean and rstd at `norm_bytes` (4: CUDA autocast runs layer_norm in float32; CPU autocast keeps bf16, 2);
    GELU keeps its input. A linear keeps its input when it
    trains (all of them when `full`, else those LoRA adapts, plus rank values of lora_A's output). SDPA
    keeps q, k, v, its output and a float32 logsumexp per head; the eager path (`attn_implementation=eager`)
    keeps q, k, v and the attention matrix of every head over the image's patches twice: the float32
    softmax output and its bf16 copy that multiplies v."""
    hidden, intermediate, heads = dims["vision_hidden"], dims["vision_intermediate"], dims["vision_heads"]
    widths = {"attention.query_key_value": hidden, "attention.dense": hidden, "mlp.fc1": hidden,
              "mlp.fc2": intermediate}
    trained = list(widths) if full else [name for name in widths if name in lora_linears]
    linear_inputs = sum(widths[name] for name in trained) * act_bytes
    lora = 0 if full else len([name for name in widths if name in lora_linears]) * lora_rank * act_bytes
    norms = 2 * (hidden + 2) * norm_bytes
    if eager:
        attention = 3 * hidden * act_bytes + heads * patches_per_image * (4 + act_bytes)
    else:
        attention = 4 * hidden * act_bytes + 4 * heads
    return linear_inputs + lora + norms + attention + intermediate * act_bytes


def eager_attention_matrix_bytes(dims: dict, patches_per_image: int, act_bytes: int) -> int:
    """One head-stacked (heads x L x L) vision attention matrix of one image at `act_bytes` per element."""
    return int(dims["vision_heads"]) * patches_per_image ** 2 * act_bytes


def trained_vision_rows(dims: dict, act_bytes: int, full: bool, lora_linears: tuple[str, ...], lora_rank: int,
                        images: int, checkpointed: bool) -> list[tuple[str, int]]:
    """(label, bytes) of what a trained vision tower holds at the LLM's backward for `images` images: every
    block's saved activations, or (checkpointed) each block's input plus one block's recompute. The eager
    attention matrices get a row of their own, so that a plan shows them."""
    per_image = int(dims["vision_patches_per_image"])
    patches = per_image * images
    eager = bool(dims.get("vision_eager_attention"))
    if dims.get("vision_post_norm"):  # EVA2-CLIP blocks (GLM-4V-9B)
        block = eva_block_bytes_per_patch(dims, act_bytes, full, lora_linears, lora_rank, eager, per_image) * patches
    else:
        block = vision_block_bytes_per_patch(dims, act_bytes, full) * patches
    # the eager attention matrices: the float32 softmax output and its copy in the compute dtype
    matrices = eager_attention_matrix_bytes(dims, per_image, 4 + act_bytes) * images if eager else 0
    depth = int(dims["vision_layers"])
    if checkpointed:
        vision, held = depth * patches * dims["vision_hidden"] * act_bytes + block - matrices, 1
        label = f"ViT trained: {depth} block boundaries + one block recompute, {patches} patches"
    else:
        vision, held = depth * (block - matrices), depth
        label = f"ViT trained: {depth} blocks saved, {patches} patches"
    rows = [(label, int(vision))]
    if matrices:
        one = eager_attention_matrix_bytes(dims, per_image, 2) / 2**30
        rows.append((f"ViT eager attention: {held} x {images} matrices of {one:.2f} GiB (bf16) + fp32 softmax",
                     int(held * matrices)))
    return rows
