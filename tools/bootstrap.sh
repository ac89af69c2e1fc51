#!/usr/bin/env bash
# Set up .venv (once; again when pyproject.toml changes) and run the main job or the tests.
#   bash tools/bootstrap.sh run [wisp generate args...]   main job on the embedded default
#   bash tools/bootstrap.sh test [pytest args...]         lint + the whole test suite
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
    "$venv/bin/ruff" check .
    exec "$venv/bin/python" -m pytest "$@";;
esac
