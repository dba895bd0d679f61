#!/usr/bin/env bash
# The GPU checks, in one run (for a machine with a CUDA device): the tests marked gpu (tangent rules
# under CUDA autocast, from_pretrained models of every family in fp32/bf16/fp16 on CUDA). Prints the
# device and versions first so the output can be pasted into docs as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && . .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
python -c "import torch, transformers; print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', '| torch', torch.__version__, '| transformers', transformers.__version__)"
python -m pytest -q -m gpu -rs "$@"
