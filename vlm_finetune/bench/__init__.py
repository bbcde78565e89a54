"""The benchmark tools, one command: `python -m vlm_finetune.bench [suite | data | load] ...` (`__main__` -> `cli`).

- `cli`: the side-by-side benchmark (this project's step against the baseline recipe) and the sub-commands
- `suite`: every GPU check in one command (`bench suite`; `--dry-run` on the CPU)
- `measure`: measured steps, ours (`bench_ours`) and the baseline recipe's (`run_baseline`), report entries
- `load_compare`: the load's measured host and GPU memory compared with the planner's load rows (`bench load`)
- `data`: padded, length-grouped and packed micro-batches on the CPU (`bench data`)

Import the submodule you need; this package imports none of them.
"""
