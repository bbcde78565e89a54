#!/usr/bin/env bash
# Fetch the wheels the lent GPU machine lacks into .whl/ (ignored by git), for Python 3.12 on x86-64 Linux.
# That machine has torch, transformers, peft, lightning, torchmetrics, safetensors, tokenizers, sentencepiece,
# matplotlib and tensorboard, but no DeepSpeed, Hydra/OmegaConf or Liger. Install them there with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# then run: python3 -m vlm_finetune.bench suite
# --with-bitsandbytes adds bitsandbytes (about 60 MB of the 64 MB a device call may carry).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platform=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# binary or pure-Python wheels published on PyPI (no dependencies pulled: the machine has the rest)
python3 -m pip download -q --no-deps "${platform[@]}" -d .whl \
    hydra-core==1.3.2 omegaconf==2.3.0 liger-kernel hjson py-cpuinfo pydantic pydantic-core annotated-types \
    typing-inspection
if [[ "${1:-}" == "--with-bitsandbytes" ]]; then
    python3 -m pip download -q --no-deps "${platform[@]}" -d .whl bitsandbytes
fi
# published as source only: built here into pure-Python wheels (DeepSpeed without prebuilt ops, as it runs here)
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3 \
    "deepspeed==$(python3 -c 'from importlib.metadata import version; print(version("deepspeed"))' 2>/dev/null || echo 0.19.8)"
ls -l .whl && du -sh .whl
