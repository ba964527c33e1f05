#!/usr/bin/env bash
# HTTP API benchmark (#12): `GET /migrations/status` of `kiln serve` under
# concurrent clients, with N migrations applied (30 tables with an index, the
# rest inserts), on SQLite or PostgreSQL.
#
# Usage: bench/api-bench.sh [sqlite|postgres] [N]      (defaults sqlite 300)
#        CLIENTS (default 50), DURATION (default 10s), KILN (default target/release/kiln)
# Needs wrk. PostgreSQL on 127.0.0.1:5432, user postgres (trust): a database
# kiln_api_bench is dropped and created for the run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENGINE="${1:-sqlite}"; N="${2:-300}"
CLIENTS="${CLIENTS:-50}"; DURATION="${DURATION:-10s}"
KILN="${KILN:-$ROOT/target/release/kiln}"
PG="${PG:-postgres://postgres@127.0.0.1:5432}"
DB=kiln_api_bench
command -v wrk >/dev/null || { echo "wrk is needed (apt-get install wrk)" >&2; exit 2; }
W="$(mktemp -d /tmp/kiln-api.XXXXXX)"
PID=""
cleanup() { [[ -n "$PID" ]] && kill "$PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT
mkdir -p "$W/migrations"
for i in $(seq 1 "$N"); do
  v=$(printf '%04d' "$i")
  if (( i <= 30 )); then
    printf 'CREATE TABLE t%d (id INTEGER PRIMARY KEY, v VARCHAR(50));\nCREATE INDEX t%d_v ON t%d (v);\n' "$i" "$i" "$i" > "$W/migrations/${v}_t$i.sql"
  else
    t=$(( i % 30 + 1 ))
    printf "INSERT INTO t%d (id, v) VALUES (%d, 'row %d');\n" "$t" "$i" "$i" > "$W/migrations/${v}_insert_$i.sql"
  fi
done
case "$ENGINE" in
  sqlite) URL="sqlite://$W/app.db" ;;
  postgres)
    PGOPTIONS=--client-min-messages=warning psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" >/dev/null
    URL="$PG/$DB" ;;
  *) echo "engine: sqlite or postgres" >&2; exit 2 ;;
esac
cd "$W"
"$KILN" up --url "$URL" --json > /dev/null
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
KILN_API_TOKEN=bench "$KILN" serve --url "$URL" --listen "127.0.0.1:$PORT" 2>/dev/null &
PID=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$PORT/migrations/status" | python3 -c "import json,sys; s=json.load(sys.stdin); assert s['summary']['applied']==$N, s['summary']"
wrk -t1 -c1 -d3s "http://127.0.0.1:$PORT/migrations/status" >/dev/null   # warm-up
OUT=$(wrk -t2 -c"$CLIENTS" -d"$DURATION" --timeout 10s --latency "http://127.0.0.1:$PORT/migrations/status")
echo "$OUT" >&2
python3 - "$OUT" "$ENGINE" "$N" "$CLIENTS" "$(cut -d' ' -f1 /proc/loadavg)" <<'PY'
import re, sys
out, engine, n, clients, load = sys.argv[1:]
def ms(s):
    v, u = re.match(r"([\d.]+)(us|ms|s)", s).groups()
    return float(v) * {"us": 0.001, "ms": 1, "s": 1000}[u]
p50 = ms(re.search(r"50%\s+(\S+)", out).group(1)); p99 = ms(re.search(r"99%\s+(\S+)", out).group(1))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
errs = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
print(f"{engine}, {n} migrations, {clients} clients: p50 {p50:.1f} ms, p99 {p99:.1f} ms, {rps:.0f} req/s"
      f"{', non-2xx ' + errs.group(1) if errs else ''}, load average {load}")
PY
