#!/usr/bin/env bash
# One entry point for people and CI: `./dev.sh demo` runs the demo, `./dev.sh test` runs every check.
# Each command installs what it needs first (a virtualenv with the package and its extras, and Debian's
# postgresql and chromium when they are missing), so both work on a fresh Debian machine with Python 3.11.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "need root (or sudo) to run: $*" >&2; exit 1; fi
}

apt_install() {
  log "installing Debian packages: $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

python_ok() {
  "$PYTHON" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

ensure_python() {
  if ! command -v "$PYTHON" >/dev/null || ! python_ok; then
    apt_install python3 python3-venv python3-pip
  fi
  python_ok || { echo "Python >= 3.11 with venv is required (found: $("$PYTHON" --version 2>&1))" >&2; exit 1; }
}

ensure_venv() {
  ensure_python
  local stamp="$VENV/.fhir-bridge-installed" want
  want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return; fi
  log "creating $VENV and installing fhir-bridge with its dev extra"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
}

ensure_system_test_deps() {
  local pkgs=()
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || pkgs+=(postgresql)
  [ -x /usr/bin/chromium ] || pkgs+=(chromium)
  command -v runuser >/dev/null || pkgs+=(util-linux)
  if [ ${#pkgs[@]} -gt 0 ]; then apt_install "${pkgs[@]}"; fi
}

cmd_test() {
  ensure_system_test_deps
  ensure_venv
  local bin="$VENV/bin"
  log "ruff check";          "$bin/ruff" check .
  log "ruff format --check"; "$bin/ruff" format --check .
  log "mypy --strict";       "$bin/mypy"
  log "pytest";              "$bin/pytest" "$@"
}

cmd_demo() {
  ensure_venv
  exec "$VENV/bin/fhir-bridge" demo "$@"
}

cmd_bench() {
  ensure_system_test_deps
  # wrk: the load generator of the request-rate rows (a Python one would take the server's cores).
  command -v wrk >/dev/null || apt_install wrk
  ensure_venv
  exec "$VENV/bin/python" -m bench "$@"
}

case "${1:-}" in
  test) shift; cmd_test "$@" ;;
  demo) shift; cmd_demo "$@" ;;
  bench) shift; cmd_bench "$@" ;;
  install) ensure_venv ;;
  *) echo "usage: ./dev.sh demo|test|bench|install [args...]" >&2; exit 2 ;;
esac
