"""Memory: what a training run will need before it starts, and what it uses while it runs.

- `count`: the model's parameters counted on the meta device (no weight read), by part, kind and dtype
- `activations`: bytes autograd saves per token in a decoder layer and per patch in a vision block
- `planner`: the predicted peak per GPU of a configuration, row by row (`python -m vlm_finetune.plan`)
- `load_plan`: the planner's predicted load rows (host memory per node, GPU memory per rank while the model loads)
- `load_measured`: the load each run measures (host growth, GPU peak when training starts; metrics.json)
- `suggest`: the cheapest changes that make a plan fit, and the searches over sizes
- `monitor`: peak memory per step and phase while training (memory.csv, memory.png, recurring spikes)
- `oom`: the out-of-memory report of a failed run

Import the submodule you need; this package imports none of them.
"""
