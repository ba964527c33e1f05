#!/usr/bin/env bash
# Start-up cost of an application that embeds 1,000 migrations, with nothing
# pending, on PostgreSQL: the time of `Kiln::up_at_startup` (connection
# included), of loading the embedded set from memory, of a bare connection,
# and the round trips counted through a delaying proxy.
#
#   bench/embed-startup.sh            # debug build (as `cargo test`)
#   PROFILE=release bench/embed-startup.sh
#
# Needs the PostgreSQL test server (KILN_TEST_POSTGRES_URL, default
# postgres://postgres@127.0.0.1:5432/postgres).
set -euo pipefail
cd "$(dirname "$0")/.."
flags=()
[[ "${PROFILE:-debug}" == release ]] && flags+=(--release)
nice cargo test "${flags[@]}" -q -p kiln --test embed startup_with_nothing_pending -- --nocapture 2>&1 | grep -E "embedded start-up|test result|panicked"
