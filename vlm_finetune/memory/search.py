"""Searches over a size with a monotone fit: the largest size that fits (micro-batches; the GPU search of
`data.micro_batch_size=auto` uses it too) and the fewest checkpointed layers that fit."""
from __future__ import annotations

from typing import Any, Callable


def largest_size(fits: Callable[[int], bool], limit: int) -> int:
    """The largest size in 1..limit for which `fits(size)` holds, the sizes that fit being those below some
    bound: doubled from 1 until one does not fit (or passes `limit`), then bisected. 0 when even 1 does not
    fit."""
    if limit < 1 or not fits(1):
        return 0
    low, size = 1, 2
    while size <= limit and fits(size):
        low, size = size, size * 2
    high = min(size, limit + 1)  # `low` fits; `high` does not, or is past the limit
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


def largest_micro_batch(plan_for: Callable[[int], Any], limit: int = 256) -> int:
    """The largest micro-batch whose plan fits (1 when none does). A plan without a GPU budget fits."""
    return largest_size(lambda size: plan_for(size).fits is not False, limit) or 1


def fewest_checkpointed_layers(plan_for: Callable[[int], Any], num_layers: int) -> int:
    """The fewest checkpointed decoder layers whose plan fits the budget (all of them when none fits)."""
    low, high = 0, num_layers
    if plan_for(num_layers).fits is False:
        return num_layers
    while low < high:
        middle = (low + high) // 2
        if plan_for(middle).fits is False:
            low = middle + 1
        else:
            high = middle
    return low


def fastest_checkpointing(plan_for: Callable[[int, str], Any], num_layers: int, scopes: tuple[str, ...],
                          cost_per_layer: Callable[[str], float]) -> tuple[int, str]:
    """(layers, scope) of the plan that fits with the least recompute: for each scope the fewest layers that
    fit, then the scope whose layers x recompute cost is smallest (no layer at all costs nothing). When no
    plan fits: every layer, whole (the leanest)."""
    fitting = []
    for scope in scopes:
        layers = fewest_checkpointed_layers(lambda n, scope=scope: plan_for(n, scope), num_layers)
        if plan_for(layers, scope).fits is not False:
            fitting.append((layers * cost_per_layer(scope) if layers else 0.0, layers, scope))
    if not fitting:
        return num_layers, "layer" if "layer" in scopes else scopes[0]
    _, layers, scope = min(fitting, key=lambda item: item[0])
    return layers, ("layer" if layers == 0 and "layer" in scopes else scope)
