"""`python -m vlm_finetune.bench ...`: the benchmark's command line (vlm_finetune/bench/cli.py)."""
import sys

from vlm_finetune.bench.cli import main

if __name__ == "__main__":
    outcome = main()
    sys.exit(outcome if isinstance(outcome, int) else 0)
