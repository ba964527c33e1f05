#!/usr/bin/env bash
# Installs the MongoDB-compatible test server (SecantusDB, pinned) into
# <repo>/.venv-test, for kiln's MongoDB test suite.
#
# Idempotent: when the pinned version is already installed it exits at once
# (a stamp file records what was installed), so the test harness can call it
# before every run. Set KILN_TEST_MONGODB_URL to test against a real mongod
# instead; then nothing here is needed.
set -euo pipefail

PIN="secantusdb==0.7.0b3"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${KILN_TEST_VENV:-$ROOT/.venv-test}"
STAMP="$VENV/.kiln-installed-$PIN"
BIN="$VENV/bin/secantusd-py"

if [[ -f "$STAMP" && -x "$BIN" ]]; then
    exit 0
fi

PYTHON="${PYTHON:-python3}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "install-mongo-test-server: $PYTHON not found; install Python 3.10+ (with venv) or set KILN_TEST_MONGODB_URL" >&2
    exit 1
fi

echo "install-mongo-test-server: installing $PIN into $VENV" >&2
if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$PIN"

if [[ ! -x "$BIN" ]]; then
    echo "install-mongo-test-server: $PIN installed but $BIN is missing" >&2
    exit 1
fi
# Older pins' stamps go, so a changed pin is installed on the next run.
rm -f "$VENV"/.kiln-installed-*
touch "$STAMP"
echo "install-mongo-test-server: ready: $BIN" >&2
