#!/usr/bin/env bash
# Fleet benchmark (#10): T PostgreSQL schemas × M migrations with `kiln up`,
# printing wall time, the sum of per-tenant times ÷ concurrency (what perfect
# overlap would give), their ratio (goal ≤ 1.3), and kiln's peak RSS.
#
# Usage: bench/fleet-bench.sh [T] [M]      (defaults 100 10)
#        CONCURRENCY (default 8), KILN (default target/release/kiln)
#        ENGINE=mongodb: T MongoDB databases (kfb_<tenant>) instead of schemas,
#        MONGO (default mongodb://127.0.0.1:27017), PYTHON with pymongo
#        (default .venv-test/bin/python) to drop them afterwards.
# Server: PostgreSQL on 127.0.0.1:5432, user postgres (trust). A database
# kiln_fleet_bench is dropped and created for the run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
T="${1:-100}"; M="${2:-10}"
CONCURRENCY="${CONCURRENCY:-8}"
KILN="${KILN:-$ROOT/target/release/kiln}"
PG="${PG:-postgres://postgres@127.0.0.1:5432}"
DB=kiln_fleet_bench
[[ -x "$KILN" ]] || (cd "$ROOT" && cargo build --release -p kiln)
W="$(mktemp -d /tmp/kiln-fleet.XXXXXX)"; trap 'rm -rf "$W"' EXIT
ENGINE="${ENGINE:-postgres}"
MONGO="${MONGO:-mongodb://127.0.0.1:27017}"
PYTHON="${PYTHON:-$ROOT/.venv-test/bin/python}"
mkdir -p "$W/migrations/tenant"
if [[ $ENGINE == mongodb ]]; then
  printf 'up:\n  - create: public_marker\n' > "$W/migrations/0001_public.yaml"
  for i in $(seq 2 $((M + 1))); do
    v=$(printf '%04d' "$i")
    printf 'up:\n  - create: t_%s\n  - createIndexes: t_%s\n    indexes: [ { key: { v: 1 }, name: v_1 } ]\n' "$v" "$v" > "$W/migrations/tenant/${v}_t_$v.yaml"
  done
else
  echo "CREATE TABLE IF NOT EXISTS public_marker (id int);" > "$W/migrations/0001_public.sql"
  for i in $(seq 2 $((M + 1))); do
    v=$(printf '%04d' "$i")
    echo "CREATE TABLE t_$v (id bigint primary key, v text);" > "$W/migrations/tenant/${v}_t_$v.sql"
  done
fi
drop_mongo() {
  "$PYTHON" - "$MONGO" <<'PY'
import sys, pymongo
c = pymongo.MongoClient(sys.argv[1] + "/?directConnection=true")
for d in c.list_database_names():
    if d.startswith("kfb_") or d == "kiln_fleet_bench":
        c.drop_database(d)
PY
}
{
  if [[ $ENGINE == mongodb ]]; then
    echo "url = \"$MONGO/$DB?directConnection=true\""
  else
    echo "url = \"$PG/$DB\""
  fi
  echo "[tenants]"
  printf 'list = ['; for i in $(seq 1 "$T"); do printf '"t%05d"%s' "$i" "$([[ $i -lt $T ]] && echo ,)"; done; echo ']'
  if [[ $ENGINE == mongodb ]]; then
    echo "url = \"$MONGO/kfb_{tenant}?directConnection=true\""
  else
    echo 'schema = "tenant_{tenant}"'
  fi
  echo "concurrency = $CONCURRENCY"
} > "$W/kiln.toml"
if [[ $ENGINE == mongodb ]]; then
  drop_mongo
else
  PGOPTIONS=--client-min-messages=warning psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" >/dev/null
fi
cd "$W"
/usr/bin/time -f '%M' -o "$W/rss" "$KILN" up --json > "$W/out.json"
python3 - "$W/out.json" "$W/rss" "$T" "$M" "$CONCURRENCY" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); rss = int(open(sys.argv[2]).read().split()[-1])
t, m, c = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
tenants = [x for x in r["targets"] if x["target"]["kind"] == "tenant"]
assert r["ok"] and len(tenants) == t, "fleet run failed"
assert all(len(x["report"]["steps"]) == m for x in tenants)
ideal = sum(x["duration_ms"] for x in tenants) / c
print(f"{t} tenants x {m} migrations, concurrency {c}: wall {r['duration_ms']} ms, "
      f"sum of tenant times / concurrency {ideal:.0f} ms, ratio {r['duration_ms'] / ideal:.2f}, peak RSS {rss / 1024:.1f} MiB")
PY
if [[ $ENGINE == mongodb ]]; then
  drop_mongo
else
  psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $DB" >/dev/null
fi
