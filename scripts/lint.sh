#!/usr/bin/env bash
# Lint (what CI runs before the tests; scripts/test.sh calls it): ruff over the whole tree and mypy
# over the public API, both configured in pyproject.toml ([tool.ruff], [tool.mypy]). Exits non-zero
# on any finding.
#
#   bash scripts/lint.sh          # ruff check . && mypy
#   ruff check --fix .            # apply ruff's safe fixes (never `ruff format`: no mass reformatting)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then
  . .venv/bin/activate
fi
ruff check .
mypy
