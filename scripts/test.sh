#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian/Ubuntu machine, then runs it:
# lint (ruff), types (mypy --strict) and pytest (unit + integration on real Redis/Prometheus,
# the console in Debian's headless Chromium driven by Selenium, which the test extra installs).
# TOLLGATE_CONSOLE_SCREENSHOT=docs/console.png scripts/test.sh tests/browser renews the README's
# screenshot of the console.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_EXTRAS=test . scripts/venv.sh

need=()
for pair in redis-server:redis-server redis-cli:redis-tools prometheus:prometheus \
    promtool:prometheus /usr/sbin/nginx:nginx-light wrk:wrk openssl:openssl \
    /usr/bin/chromium:chromium /usr/bin/chromedriver:chromium-driver; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
# Only recommended by chromium (not installed with --no-install-recommends): legible screenshots.
[ -d /usr/share/fonts/truetype/liberation ] || need+=(fonts-liberation)
[ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"
# Debian starts the packaged services and enables them at boot; the tests run their own on
# free loopback ports, so stop them and keep them off after a reboot too.
if command -v systemctl >/dev/null 2>&1; then
  for service in redis-server prometheus nginx; do
    $SUDO systemctl disable --now "$service" >/dev/null 2>&1 || true
  done
fi

.venv/bin/ruff check proxy tests
.venv/bin/ruff format --check proxy tests
.venv/bin/mypy proxy
.venv/bin/pytest "$@"
