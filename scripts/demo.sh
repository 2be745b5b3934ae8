#!/usr/bin/env bash
# The README's main job: set up ./.venv if needed, then run the synthetic end-to-end
# distillation demo (teacher, TransKD student, plain student) and print its report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/transkd-fast demo "$@"
