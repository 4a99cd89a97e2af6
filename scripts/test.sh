#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian/Ubuntu machine, then runs it:
# lint (ruff), types (mypy --strict) and pytest (unit + integration on real Redis/Prometheus).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_EXTRAS=test . scripts/venv.sh

need=()
for pair in redis-server:redis-server redis-cli:redis-tools prometheus:prometheus \
    promtool:prometheus /usr/sbin/nginx:nginx-light wrk:wrk openssl:openssl; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
[ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"
# Debian starts the packaged services; the tests run their own on free loopback ports.
if command -v systemctl >/dev/null 2>&1; then
  systemctl stop redis-server prometheus nginx >/dev/null 2>&1 || true
fi

.venv/bin/ruff check proxy tests
.venv/bin/ruff format --check proxy tests
.venv/bin/mypy proxy
.venv/bin/pytest "$@"
