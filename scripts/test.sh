#!/usr/bin/env bash
# The test command: installs the test dependencies into .venv if needed, starts the throw-away services
# (scripts/services.sh), runs pytest with the given arguments, stops the services on exit; exits with pytest's code.
#
# Knobs: HOPFLOW_VENV (default .venv), HOPFLOW_BOOTSTRAP_PYTHON (makes a missing venv; default python3.11),
# HOPFLOW_SERVICES_DIR (default: a fresh /tmp/hopflow-services.XXXXXX per run; services already running there are
# reused and left running), HOPFLOW_TEST_TIMEOUT (pytest-timeout per test, seconds; default 600),
# HOPFLOW_STATIC_CHECKS (default 1: ruff and mypy run first and their failure fails the command; 0 skips them).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV=${HOPFLOW_VENV:-$ROOT/.venv}
BOOTSTRAP=${HOPFLOW_BOOTSTRAP_PYTHON:-python3.11}
EXTRAS="test,postgres,mlip"
SERVICES=$ROOT/scripts/services.sh

say() { printf '[test.sh] %s\n' "$*" >&2; }

if [[ ! -x $VENV/bin/python ]]; then
    say "creating $VENV with $BOOTSTRAP"
    "$BOOTSTRAP" -m venv "$VENV"
fi
PY=$VENV/bin/python

# Reinstall only when pyproject.toml changed since the last install or the project is not importable.
stamp=$VENV/.hopflow-test-deps
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $EXTRAS"
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]] || ! "$PY" -c 'import importlib.metadata as m; m.distribution("hopflow"); import pytest, psycopg' 2>/dev/null; then
    say "installing the project with [$EXTRAS] into $VENV"
    if ! "$PY" -m pip install --disable-pip-version-check -e ".[$EXTRAS]" >"$VENV/.hopflow-pip.log" 2>&1; then
        tail -n 40 "$VENV/.hopflow-pip.log" >&2
        say "ERROR: pip install failed (full log: $VENV/.hopflow-pip.log)"
        exit 1
    fi
    echo "$want" >"$stamp"
fi

export HOPFLOW_PYTHON=$PY

static_rc=0
if [[ ${HOPFLOW_STATIC_CHECKS:-1} != 0 ]]; then
    say "ruff check"
    "$PY" -m ruff check "$ROOT" || static_rc=1
    say "mypy (scripts/typecheck.sh)"
    bash "$ROOT/scripts/typecheck.sh" || static_rc=1
    ((static_rc == 0)) || say "ERROR: static checks failed (pytest runs all the same; the command fails)"
fi

stop_services=0
if [[ -z ${HOPFLOW_SERVICES_DIR:-} ]]; then
    HOPFLOW_SERVICES_DIR=$(mktemp -d /tmp/hopflow-services.XXXXXX)
    export HOPFLOW_SERVICES_DIR
    stop_services=1
elif ! bash "$SERVICES" status >/dev/null 2>&1; then
    stop_services=1
fi

cleanup() {
    if ((stop_services)); then
        bash "$SERVICES" stop || say "WARNING: stopping the services failed (state dir $HOPFLOW_SERVICES_DIR)"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

t0=$SECONDS
bash "$SERVICES" start
eval "$(bash "$SERVICES" env)"
say "services up in $((SECONDS - t0))s; running pytest"

set +e
"$PY" -m pytest --timeout="${HOPFLOW_TEST_TIMEOUT:-600}" --durations=15 "$@"
rc=$?
set -e
say "pytest exited with $rc after $((SECONDS - t0))s"
if ((rc == 0 && static_rc != 0)); then
    rc=1
fi
exit $rc
