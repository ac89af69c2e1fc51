#!/usr/bin/env bash
# Set up .venv (once; again when pyproject.toml changes) and run the main job or the tests.
#   bash tools/bootstrap.sh run [wisp generate args...]   main job on the embedded default
#   bash tools/bootstrap.sh test [pytest args...]         lint + the whole test suite (installs
#                                                         chromium via apt-get as root if missing)
# Environment: PYTHON (default python3, must be >= 3.11); WISP_TORCH_SPEC (default
# torch==2.13.0, the CPU wheel on the project machines; GPU users may name their own build).
set -euo pipefail
cd "$(dirname "$0")/.."

mode="${1:-}"
[ $# -gt 0 ] && shift
case "$mode" in run|test|setup) ;; *)
  echo "usage: bash tools/bootstrap.sh {run|test|setup} [args...]" >&2; exit 2;;
esac

python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "wisp needs Python >= 3.11 (found: $("$python" --version 2>&1)); set PYTHON=..." >&2
  exit 1
fi

venv=.venv
stamp="$venv/.wisp-installed"
want="$(cat pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
  echo "[bootstrap] creating $venv" >&2
  "$python" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
    spec="${WISP_TORCH_SPEC:-torch==2.13.0}"
    echo "[bootstrap] installing $spec" >&2
    # shellcheck disable=SC2086  # the spec may carry pip options
    "$venv/bin/pip" install --quiet $spec
  fi
  echo "[bootstrap] installing wisp and its dependencies" >&2
  "$venv/bin/pip" install --quiet -e '.[dev]'
  echo "$want" > "$stamp"
fi

# The dashboard test renders the metrics page in headless Chromium. Where apt-get can install
# it (Debian/Ubuntu, as root) it is installed; anywhere else that test skips and says how.
ensure_chromium() {
  local name
  [ -n "${WISP_CHROMIUM:-}" ] && return 0
  for name in chromium chromium-browser google-chrome; do
    command -v "$name" >/dev/null 2>&1 && return 0
  done
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "[bootstrap] chromium not found and no apt-get here: the dashboard test will skip" >&2
    return 0
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "[bootstrap] chromium not found and not root: the dashboard test will skip" \
      "(install it with: sudo apt-get install -y chromium)" >&2
    return 0
  fi
  echo "[bootstrap] installing chromium (apt-get) for the dashboard test" >&2
  local log
  log="$(mktemp)"
  if ! { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >"$log" 2>&1 \
         || { apt-get update -q >"$log" 2>&1 \
              && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >"$log" 2>&1; }; }
  then
    echo "[bootstrap] could not install chromium; the dashboard test will skip. apt-get said:" >&2
    tail -n 5 "$log" >&2
  fi
  rm -f "$log"
}

case "$mode" in
  setup) ;;
  run)
    if [ $# -eq 0 ]; then
      # The whole stack (embedded NATS + Redis, every service as its own process), one
      # generation per serving mode through the SDK, then a clean shutdown.
      set -- up --demo "def fibonacci(n):" --exit-after-demo
    fi
    exec "$venv/bin/wisp" "$@";;
  test)
    ensure_chromium
    "$venv/bin/ruff" check .
    exec "$venv/bin/python" -m pytest "$@";;
esac
