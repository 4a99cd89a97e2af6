#!/usr/bin/env bash
# Installs Tollgate into .venv and runs `tollgate demo`: in-process store, mock upstream,
# a demo key. Extra arguments go to the demo (e.g. --port 9090).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
exec .venv/bin/tollgate demo "$@"
