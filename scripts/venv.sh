# Sourced by scripts/demo.sh and scripts/test.sh: makes .venv with Tollgate installed.
# Usage: VENV_EXTRAS=test . scripts/venv.sh   (a sourced file sees its caller's arguments,
# so the extras come in a variable)
set -euo pipefail
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
apt_install() {
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@"
}
if ! python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  echo "Tollgate needs Python 3.11 or newer as python3" >&2; exit 1
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv 2>/dev/null || { rm -rf .venv; apt_install python3-venv; python3 -m venv .venv; }
fi
.venv/bin/pip install -q --upgrade pip
# setuptools announces every editable install with an "Editable installation." notice (its
# InformationOnly class: nothing wrong with the project), which pip prints as a warning. Only that
# notice is hidden; any real setuptools warning still shows (tests/test_packaging.py).
editable_notice="ignore:Editable installation"
if [ -n "${VENV_EXTRAS:-}" ]; then
  PYTHONWARNINGS="$editable_notice" .venv/bin/pip install -q -e ".[$VENV_EXTRAS]"
else
  PYTHONWARNINGS="$editable_notice" .venv/bin/pip install -q -e .
fi
