#!/usr/bin/env bash
# The README's test command: set up ./.venv if needed, then run the test suite
# (kernel interpreter tests and compile checks included; benchmarks excluded).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pytest tests/ "$@"
