#!/usr/bin/env bash
# The zero-downtime backfill on MongoDB (docs/benchmarks.md#zero-downtime-backfill):
# N users documents {_id, fullName, email}; one `updateMany` with the pipeline
# [{$set: {displayName: "$fullName"}}] against `kiln worker` running the same
# change as a backfill walking _id, each on a freshly filled collection.
#
#   bench/zdt-mongo-bench.sh [N]        default 1000000
#
# Env: KILN (default target/release/kiln), MONGOFILL (default: next to KILN),
#      KILN_BENCH_MONGODB_URL (a server; default: a SecantusDB test server started
#      here, in memory), BATCH (default 1000).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
N=${1:-1000000}
KILN=${KILN:-$ROOT/target/release/kiln}
MONGOFILL=${MONGOFILL:-$(dirname "$KILN")/mongofill}
BATCH=${BATCH:-1000}
[[ -x $KILN && -x $MONGOFILL ]] || { echo "build first: cargo build --release -p kiln -p kiln-chaos" >&2; exit 2; }
WORK=$(mktemp -d); SERVER_PID=""
cleanup() { [[ -n $SERVER_PID ]] && kill "$SERVER_PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
BASE=${KILN_BENCH_MONGODB_URL:-}
if [[ -z $BASE ]]; then
  bash "$ROOT/scripts/install-mongo-test-server.sh"
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$ROOT/.venv-test/bin/secantusd-py" --host 127.0.0.1 --port "$PORT" --storage-path :memory: >"$WORK/server.log" 2>&1 &
  SERVER_PID=$!
  BASE="mongodb://127.0.0.1:$PORT/?directConnection=true"
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.2; done
  sleep 0.5
fi
url() { local q=""; [[ $BASE == *\?* ]] && q="?${BASE#*\?}"; local h=${BASE%%\?*}; echo "${h%/}/$1$q" | sed -E 's#(mongodb://[^/]*)/+#\1/#'; }
mkdir -p "$WORK/migrations"
cat > "$WORK/migrations/0001_display_name.yaml" <<YAML
expand: []
backfill:
  collection: users
  filter: { displayName: { \$exists: false } }
  update: [ { \$set: { displayName: "\$fullName" } } ]
  batch_size: $BATCH
rollback:
  - update: users
    updates: [ { q: {}, u: { \$unset: { displayName: "" } }, multi: true } ]
YAML

U1=$(url "zdt_update_$$"); U2=$(url "zdt_backfill_$$")
echo "fill $N (updateMany): $("$MONGOFILL" "$U1" fill "$N")"
upd=$("$MONGOFILL" "$U1" update); echo "one updateMany: $upd"
echo "fill $N (backfill): $("$MONGOFILL" "$U2" fill "$N")"
"$KILN" --url "$U2" --dir "$WORK/migrations" up >/dev/null
t0=$(date +%s.%N)
/usr/bin/time -f '%M' -o "$WORK/rss" "$KILN" --url "$U2" --dir "$WORK/migrations" worker --once 2>"$WORK/worker.log"
t1=$(date +%s.%N)
left=$("$MONGOFILL" "$U2" left)
usecs=$(python3 -c "import json; print(json.loads('$upd')['secs'])")
python3 - "$N" "$usecs" "$t0" "$t1" "$(tail -1 "$WORK/rss")" "$left" <<'PY'
import sys, json
n, us, t0, t1, rss, left = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), json.loads(sys.argv[6])
bs = t1 - t0
print(f"documents {n}: updateMany {us:.1f} s ({n/us:,.0f} docs/s); kiln backfill {bs:.1f} s ({n/bs:,.0f} docs/s, {100*us/bs:.0f}% of updateMany's rate); worker max RSS {rss//1024} MB; left unconverted: {left['left']}")
PY
