#!/usr/bin/env bash
# The README's main job: set up ./.venv if needed, then run the synthetic end-to-end
# distillation demo (cached teacher, TransKD student, plain student) and print its report.
# Reruns take the teacher from runs/demo/cache/; the students' folders need --overwrite
# (start over, old runs moved aside) or --resume (skip finished runs). Extra arguments go to
# `transkd-fast demo` (`--quick`, `--seeds 0 1 2`, `--methods transkd_base transkd_gl`, `--help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/transkd-fast demo "$@"
