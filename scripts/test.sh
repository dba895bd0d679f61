#!/usr/bin/env bash
# The whole test suite (what CI runs): lint (scripts/lint.sh: ruff + mypy), then pytest. Offline; CPU only.
#
#   bash scripts/test.sh [pytest args]            # in .venv (the pinned versions, scripts/setup.sh)
#   SKIP_LINT=1 bash scripts/test.sh tests/x.py   # pytest only (e.g. while iterating on one file)
#   bash scripts/test.sh --latest [pytest args]   # builds .venv-latest with today's newest releases
#                                                 # (scripts/setup.sh --latest), then runs the suite there
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--latest" ]; then
  shift
  bash scripts/setup.sh --latest
  . .venv-latest/bin/activate
elif [ -x .venv/bin/python ]; then
  . .venv/bin/activate
fi
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
if [ "${SKIP_LINT:-0}" != 1 ]; then
  bash scripts/lint.sh  # a lint finding fails CI before the tests run
fi
python -m pytest -q "$@"
