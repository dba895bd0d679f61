#!/usr/bin/env bash
# Write constraints/tested.txt from a venv the whole suite passed in (default .venv-latest, after
# 'bash scripts/test.sh --latest' passed), so that scripts/setup.sh installs those versions.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-latest}
{
  echo "# The versions the whole test suite passed with (pip freeze of the CI venv), used by scripts/setup.sh"
  echo "# so that the demo and CI install the same thing tomorrow. Refresh after 'bash scripts/test.sh --latest'"
  echo "# passes: bash scripts/freeze_constraints.sh. torch is the CPU wheel (pip install torch==2.13.0)."
  "$VENV/bin/pip" freeze --exclude-editable | grep -v '^hf.taskarith' | sed 's/^torch==\([0-9.]*\)+cpu$/torch==\1/'
} > constraints/tested.txt
echo "wrote constraints/tested.txt from $VENV"
