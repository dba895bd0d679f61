#!/usr/bin/env bash
# Build the checkpoints, run each YAML through `hf-taskarith merge`, and score the results.
# Usage: bash examples/merge_yaml/run.sh [--minilm]
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(cd ../.. && pwd)
[ -x "$ROOT/.venv/bin/python" ] && . "$ROOT/.venv/bin/activate"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python prepare_models.py "$@"
for cfg in task_arithmetic ties dare_ties negate; do
  hf-taskarith merge "$cfg.yml" "merged/$cfg" --overwrite --no-progress
done
python score.py models/base models/ft_a models/ft_b merged/task_arithmetic merged/ties merged/dare_ties merged/negate
