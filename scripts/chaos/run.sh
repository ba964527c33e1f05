#!/usr/bin/env bash
# kiln's fault harness: racing runners, kill -9, server restarts, frozen
# runners, up racing down, status during up, hostile names, the secrets corpus
# and parser fuzzing, on every engine, against the release binary. Prints a
# table engine x test x (trials, failures); exits 1 on any failure not
# explained by an open issue. See docs/reliability.md.
#
#   scripts/chaos/run.sh --quick          # CI: a few trials each, under 5 minutes
#   scripts/chaos/run.sh                  # full: 50 trials per engine per test, 1M fuzz executions per parser
#   scripts/chaos/run.sh --tests kill9,frozen --engines mysql --trials 10
#   scripts/chaos/run.sh --quick --debug  # as scripts/test.sh runs it, on the debug binaries
#
# Needs PostgreSQL on 127.0.0.1:5432 and MariaDB on 127.0.0.1:3306 (as the test
# suite does; they are never restarted: restart tests start private servers on
# free ports), and installs the MongoDB test server (SecantusDB) into .venv-test.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

# --debug: use the debug binaries that `cargo test --workspace --all-targets` has
# just built (scripts/test.sh does), instead of building the release ones; they
# are built only when missing.
profile=release
args=()
for a in "$@"; do
  if [[ $a == --debug ]]; then profile=debug; else args+=("$a"); fi
done

bash scripts/install-mongo-test-server.sh
if [[ $profile == release ]]; then
  cargo build --release --quiet -p kiln -p kiln-chaos
elif [[ ! -x $CARGO_TARGET_DIR/debug/kiln || ! -x $CARGO_TARGET_DIR/debug/kiln-chaos ]]; then
  cargo build --quiet -p kiln -p kiln-chaos
fi
exec .venv-test/bin/python scripts/chaos/chaos.py \
  --kiln "$CARGO_TARGET_DIR/$profile/kiln" --fuzzer "$CARGO_TARGET_DIR/$profile/kiln-chaos" \
  --artifacts "$CARGO_TARGET_DIR/chaos" "${args[@]}"
