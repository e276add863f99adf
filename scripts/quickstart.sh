#!/usr/bin/env bash
# Set up the environment (idempotent) and run the embedded default job:
# local Ray, a tiny from-scratch model, the scripted teacher behind its HTTP server.
# Extra arguments go to `tripost run` (e.g. -o iterations=1). Re-running resumes the run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
exec .venv/bin/tripost run jobs/quickstart.yaml "$@"
