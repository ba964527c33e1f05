#!/usr/bin/env bash
# MongoDB benchmark: N generated migrations (default 1,000), each a
# `createIndexes` on its own collection, run with the release binary:
#
#   1. apply all on a fresh database   (kiln up)
#   2. no-op up with everything applied (kiln up)
#   3. status                           (kiln status)
#
# Server: KILN_BENCH_MONGODB_URL, else KILN_TEST_MONGODB_URL (a URL without a
# database; a fresh database is used and dropped afterwards), else a SecantusDB
# server started here (installed by scripts/install-mongo-test-server.sh) and
# stopped on exit.
#
# With migrate-mongo installed (MIGRATE_MONGO=/path/to/bin/migrate-mongo, or
# found at /opt/migpeers/npm/migrate-mongo, see ../shared/bench/peers), it
# also applies the same N createIndex migrations with migrate-mongo and kiln,
# paired: every timed run starts on dropped databases and the two tools
# alternate, PAIRS times (default 5); prints both medians and the median of
# the per-pair ratios kiln / migrate-mongo. With KILN_BEFORE=/path/to/kiln (an
# older build), the same paired apply compares kiln with that binary.
#
# Usage: bench/mongo-bench.sh [N]       (hyperfine is used when installed)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
N="${1:-${N:-1000}}"
KILN="$ROOT/target/release/kiln"
RUNS="${RUNS:-10}"

if [[ ! -x "$KILN" ]]; then
    echo "building the release binary (cargo build --release -p kiln)…" >&2
    (cd "$ROOT" && cargo build --release -p kiln)
fi

WORK="$(mktemp -d -t kiln-mongo-bench.XXXXXX)"
SERVER_PID=""
cleanup() {
    if [[ -n "$SERVER_PID" ]]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

BASE="${KILN_BENCH_MONGODB_URL:-${KILN_TEST_MONGODB_URL:-}}"
if [[ -z "$BASE" ]]; then
    bash "$ROOT/scripts/install-mongo-test-server.sh"
    PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    "$ROOT/.venv-test/bin/secantusd-py" --host 127.0.0.1 --port "$PORT" --storage-path :memory: >"$WORK/server.log" 2>&1 &
    SERVER_PID=$!
    BASE="mongodb://127.0.0.1:$PORT/?directConnection=true"
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
        sleep 0.2
    done
    sleep 0.5
    SERVER_DESC="SecantusDB $(grep -o 'secantusdb==[^"]*' "$ROOT/scripts/install-mongo-test-server.sh" | head -1) (in memory)"
else
    SERVER_DESC="$(echo "$BASE" | sed -E 's#//[^/@]*@#//***@#')"
fi

# A fresh database on the server: the URL's path replaced, query kept.
DB="kiln_bench_$(date +%s)_$$"
case "$BASE" in
    *\?*) QUERY="?${BASE#*\?}"; HOSTPART="${BASE%%\?*}" ;;
    *) QUERY=""; HOSTPART="$BASE" ;;
esac
SCHEME="${HOSTPART%%://*}://"
REST="${HOSTPART#*://}"
URL="${SCHEME}${REST%%/*}/${DB}${QUERY}"

DIR="$WORK/migrations"
mkdir -p "$DIR"
echo "generating $N migrations…" >&2
for i in $(seq 1 "$N"); do
    printf 'up:\n  - createIndexes: bench_%d\n    indexes:\n      - key: { tenantId: 1, createdAt: -1 }\n        name: tenant_created\ndown:\n  - drop: bench_%d\n' "$i" "$i" \
        >"$DIR/$(printf '%06d' "$i")_index_bench_$i.yaml"
done

export KILN_LOG=warn
ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }

echo "server:     $SERVER_DESC" >&2
echo "migrations: $N (createIndexes, one collection each)" >&2

t0=$(date +%s%N)
"$KILN" up --url "$URL" --dir "$DIR" >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; exit 1; }
APPLY_MS=$(ms "$t0")
printf 'apply all (%d):  %d ms total, %.2f ms per migration\n' "$N" "$APPLY_MS" "$(echo "$APPLY_MS / $N" | bc -l)"

# Both must succeed (and the no-op must apply nothing) before they are timed.
"$KILN" up --url "$URL" --dir "$DIR" >"$WORK/noop.log" 2>&1 || { cat "$WORK/noop.log" >&2; exit 1; }
"$KILN" status --url "$URL" --dir "$DIR" >"$WORK/status.log" 2>&1 || { cat "$WORK/status.log" >&2; exit 1; }
APPLIED=$(grep -c 'applied' "$WORK/status.log" || true)
echo "status lists $APPLIED applied rows" >&2

if command -v hyperfine >/dev/null 2>&1; then
    hyperfine --warmup 1 --runs "$RUNS" -N --style basic \
        -n "no-op up ($N applied)" "$KILN up --url $URL --dir $DIR" \
        -n "status ($N applied)" "$KILN status --url $URL --dir $DIR"
else
    for what in up status; do
        total=0
        for _ in $(seq 1 "$RUNS"); do
            t0=$(date +%s%N)
            "$KILN" "$what" --url "$URL" --dir "$DIR" >/dev/null 2>&1
            total=$(( total + $(ms "$t0") ))
        done
        label=$([[ $what == up ]] && echo "no-op up" || echo "status")
        printf '%-10s %d ms mean over %d runs\n' "$label:" $(( total / RUNS )) "$RUNS"
    done
fi

# paired PAIRS LABEL_A CMD_A LABEL_B CMD_B DB...: alternate A and B, every run on
# dropped databases DB..., and print both medians and the median of the per-pair
# ratios A / B.
paired() {
    "$ROOT/.venv-test/bin/python" - "$BASE" "$@" <<'PY'
import statistics, subprocess, sys, time
import pymongo
base, pairs, la, a, lb, b, dbs = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7:]
client = pymongo.MongoClient(base)
def timed(cmd):
    for d in dbs:
        client.drop_database(d)
    t = time.monotonic()
    r = subprocess.run(cmd, shell=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if r.returncode:
        sys.exit(f"FAILED: {cmd}: {r.stderr.decode()[-300:]}")
    return time.monotonic() - t
xs, ys, ratios = [], [], []
for i in range(pairs):
    if i % 2 == 0:
        x = timed(a); y = timed(b)
    else:
        y = timed(b); x = timed(a)
    xs.append(x); ys.append(y); ratios.append(x / y)
for d in dbs:
    client.drop_database(d)
w = max(len(la), len(lb))
print(f"{la:<{w}} median {statistics.median(xs):.3f} s (min {min(xs):.3f}, max {max(xs):.3f})")
print(f"{lb:<{w}} median {statistics.median(ys):.3f} s (min {min(ys):.3f}, max {max(ys):.3f})")
print(f"{la} / {lb}, median of {pairs} paired ratios: {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")
PY
}

MM="${MIGRATE_MONGO:-/opt/migpeers/npm/migrate-mongo/node_modules/.bin/migrate-mongo}"
if [[ -x "$MM" && -x "$ROOT/.venv-test/bin/python" ]]; then
    PAIRS="${PAIRS:-5}"
    MMDIR="$WORK/migrate-mongo"
    mkdir -p "$MMDIR/migrations"
    for i in $(seq 1 "$N"); do
        printf "module.exports = {\n  async up(db) { await db.collection('bench_%d').createIndex({ tenantId: 1, createdAt: -1 }, { name: 'tenant_created' }); },\n  async down(db) { await db.collection('bench_%d').drop(); },\n};\n" "$i" "$i" \
            >"$MMDIR/migrations/$(printf '%06d' "$i")-index_bench_$i.js"
    done
    MMDB="${DB}_mm"
    KDB="${DB}_kiln"
    KURL="${SCHEME}${REST%%/*}/${KDB}${QUERY}"
    cat >"$MMDIR/migrate-mongo-config.js" <<CONFIG
module.exports = {
  mongodb: { url: "${BASE}", databaseName: "${MMDB}", options: {} },
  migrationsDir: "migrations",
  changelogCollectionName: "changelog",
  migrationFileExtension: ".js",
  useFileHash: false,
  moduleSystem: "commonjs",
};
CONFIG
    echo "migrate-mongo vs kiln: apply $N on a fresh database, $PAIRS alternating pairs" >&2
    paired "$PAIRS" "kiln up" "$KILN up --url $KURL --dir $DIR" "migrate-mongo" "cd $MMDIR && $MM up" "$KDB" "$MMDB"
else
    echo "migrate-mongo comparison skipped: set MIGRATE_MONGO (npm install migrate-mongo; see ../shared/bench/peers/install-peers.sh npm)" >&2
fi

if [[ -n "${KILN_BEFORE:-}" && -x "${KILN_BEFORE:-}" && -x "$ROOT/.venv-test/bin/python" ]]; then
    PAIRS="${PAIRS:-5}"
    KDB="${DB}_kiln"
    BDB="${DB}_before"
    BURL="${SCHEME}${REST%%/*}/${BDB}${QUERY}"
    KURL="${SCHEME}${REST%%/*}/${KDB}${QUERY}"
    echo "kiln vs KILN_BEFORE ($KILN_BEFORE): apply $N on a fresh database, $PAIRS alternating pairs" >&2
    paired "$PAIRS" "kiln up" "$KILN up --url $KURL --dir $DIR" "before up" "$KILN_BEFORE up --url $BURL --dir $DIR" "$KDB" "$BDB"
fi

if [[ -z "$SERVER_PID" ]]; then
    # An external server keeps running: drop the benchmark database.
    if [[ -x "$ROOT/.venv-test/bin/python" ]]; then
        "$ROOT/.venv-test/bin/python" -c 'import sys, pymongo; pymongo.MongoClient(sys.argv[1]).drop_database(sys.argv[2])' "$URL" "$DB" || true
    else
        echo "note: drop the benchmark database $DB by hand" >&2
    fi
fi
