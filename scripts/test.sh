#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, clippy, unit tests, the
# engine tests and the conformance suite against real servers.
#
#   PostgreSQL   KILN_TEST_POSTGRES_URL  (default postgres://postgres@127.0.0.1:5432/postgres)
#   MariaDB      KILN_TEST_MYSQL_URL     (default mysql://root@127.0.0.1:3306/mysql)
#   MongoDB      KILN_TEST_MONGODB_URL   (default: a SecantusDB test server that the
#                                         harness installs from PyPI and starts itself)
#
# A server that cannot be reached fails the run; nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

pg_url=${KILN_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}
my_url=${KILN_TEST_MYSQL_URL:-mysql://root@127.0.0.1:3306/mysql}

# Fail early, with a clear message, when a server is down.
hostport() { local rest=${1#*://}; rest=${rest#*@}; rest=${rest%%/*}; echo "${rest%%\?*}"; }
check() {   # name url default-port how-to-start
  local hp host port
  hp=$(hostport "$2"); host=${hp%%:*}; port=${hp##*:}; [[ $port == "$hp" ]] && port=$3
  if ! (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then
    echo "error: $1 is not reachable at $host:$port ($4)" >&2
    exit 1
  fi
}
check PostgreSQL "$pg_url" 5432 "start it: pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main start, or set KILN_TEST_POSTGRES_URL"
check MariaDB "$my_url" 3306 "start it: start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd, or set KILN_TEST_MYSQL_URL"

# The MongoDB test server (SecantusDB, pinned) unless a real mongod is given.
if [[ -z ${KILN_TEST_MONGODB_URL:-} ]]; then
  bash scripts/install-mongo-test-server.sh
fi

# Hygiene first: formatting and lints are part of the suite.
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

cargo test --workspace --all-targets "$@"
scripts/chaos/run.sh --quick --debug   # the fault harness, short version: docs/reliability.md
