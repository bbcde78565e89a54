"""The decoding loop the natively written families share (MGM, GLM-4V-9B): greedy or sampled tokens from the
last hidden state, finished rows padded, stop ids, and ranks kept in step under ZeRO-3."""
from __future__ import annotations

import inspect
from typing import Callable

import torch


def stop_ids(eos_token_id: int | list[int] | None, device: torch.device) -> torch.Tensor:
    return torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []),
                        device=device, dtype=torch.long)


def decode(last: torch.Tensor, lm_head: torch.nn.Module, step: Callable[[torch.Tensor], torch.Tensor],
           max_new_tokens: int, stops: torch.Tensor, pad_token_id: int, do_sample: bool = False,
           temperature: float = 1.0, generator: torch.Generator | None = None,
           synced_gpus: bool = False) -> torch.Tensor:
    """New tokens (batch, n) from the prompt's last hidden state `last`; `step(tokens)` runs the decoder on one
    new token per row (the caller's closure keeps the cache, mask and positions) and returns the next last
    hidden state. `synced_gpus`: every rank keeps decoding (padding finished rows) until all ranks are done,
    as DeepSpeed ZeRO-3 needs (each forward gathers parameters collectively)."""
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 when sampling; use do_sample=False for greedy")
    done = torch.zeros(last.shape[0], dtype=torch.bool, device=last.device)
    new = []
    for _ in range(max_new_tokens):
        logits = lm_head(last).float()
        if do_sample:
            token = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
        else:
            token = logits.argmax(-1)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        new.append(token)
        done |= torch.isin(token, stops)
        if _all_ranks_done(bool(done.all()), synced_gpus, done.device):
            break
        last = step(token)
    return torch.stack(new, dim=1)


def cache_argument(model: torch.nn.Module) -> str:
    """The keyword a transformers decoder takes and returns its KV cache by: `cache` in the transformers releases
    that renamed it (5.2x; `past_key_values` warns there and goes in 5.40), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cached_step(model: torch.nn.Module, cache, mask: torch.Tensor, position: torch.Tensor,
                cache_arg: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """`step` for `decode`: one new token per row through `model` (a decoder taking `inputs_embeds`), the mask
    grown by one column, the position advanced by one, the KV cache passed as `cache_arg` and read back from
    the output attribute of that name."""
    state = {"cache": cache, "mask": mask, "position": position}

    def step(token: torch.Tensor) -> torch.Tensor:
        state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(token.shape[0], 1)], dim=1)
        state["position"] = state["position"] + 1
        out = model(inputs_embeds=model.embed_tokens(token[:, None]), attention_mask=state["mask"],
                    position_ids=state["position"], use_cache=True, **{cache_arg: state["cache"]})
        state["cache"] = getattr(out, cache_arg)
        return out.last_hidden_state[:, -1]

    return step


def _all_ranks_done(done_here: bool, synced: bool, device: torch.device) -> bool:
    if not synced or not torch.distributed.is_initialized():
        return done_here
    pending = torch.tensor([0.0 if done_here else 1.0], device=device)
    torch.distributed.all_reduce(pending)
    return float(pending) == 0.0
