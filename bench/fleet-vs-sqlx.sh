#!/usr/bin/env bash
# Fleet benchmark (#10, part b): T PostgreSQL tenant schemas × M migrations,
# `kiln up` over the fleet against the way users do it today with a
# single-database tool: a shell loop running `sqlx migrate run` once per tenant
# schema (creating the schema first, search_path set in the URL).
# Rounds alternate (sqlx, kiln, sqlx, kiln, …) with a fresh database before
# each run, so the ratio holds on a noisy machine.
#
# Usage: bench/fleet-vs-sqlx.sh [T] [M] [ROUNDS]     (defaults 100 10 2)
#        CONCURRENCY (default 8), KILN (default target/release/kiln),
#        SQLX (default: sqlx on PATH; /work/shared/bench/peers/install-peers.sh cargo installs it)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
T="${1:-100}"; M="${2:-10}"; ROUNDS="${3:-2}"
CONCURRENCY="${CONCURRENCY:-8}"
KILN="${KILN:-$ROOT/target/release/kiln}"
SQLX="${SQLX:-$(command -v sqlx || true)}"
PG="${PG:-postgres://postgres@127.0.0.1:5432}"
DB=kiln_fleet_vs_sqlx
[[ -x "$KILN" ]] || { echo "no kiln at $KILN (cargo build --release -p kiln, or KILN=…)" >&2; exit 2; }
[[ -n "$SQLX" ]] || { echo "no sqlx on PATH (install it: /work/shared/bench/peers/install-peers.sh cargo)" >&2; exit 2; }
W="$(mktemp -d /tmp/kiln-fleet-sqlx.XXXXXX)"; trap 'rm -rf "$W"' EXIT
mkdir -p "$W/kiln/migrations/tenant" "$W/sqlx"
for i in $(seq 1 "$M"); do
  v=$(printf '%04d' "$i")
  sql="CREATE TABLE t_$v (id bigint primary key, v text);"
  echo "$sql" > "$W/kiln/migrations/tenant/${v}_t_$v.sql"
  echo "$sql" > "$W/sqlx/${v}_t_$v.sql"
done
{
  echo "url = \"$PG/$DB\""
  echo "[tenants]"
  printf 'list = ['; for i in $(seq 1 "$T"); do printf '"t%05d"%s' "$i" "$([[ $i -lt $T ]] && echo ,)"; done; echo ']'
  echo 'schema = "tenant_{tenant}"'
  echo "concurrency = $CONCURRENCY"
} > "$W/kiln/kiln.toml"
fresh() { PGOPTIONS=--client-min-messages=warning psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" >/dev/null; }
now() { date +%s.%N; }
sqlx_loop() {
  for i in $(seq 1 "$T"); do
    s=$(printf 'tenant_t%05d' "$i")
    psql -q "$PG/$DB" -c "CREATE SCHEMA IF NOT EXISTS $s" >/dev/null
    "$SQLX" migrate run --source "$W/sqlx" --database-url "$PG/$DB?options=-csearch_path%3D$s" >/dev/null
  done
}
kiln_run() { (cd "$W/kiln" && "$KILN" up --json >/dev/null); }
declare -a S K
for r in $(seq 1 "$ROUNDS"); do
  fresh; t0=$(now); sqlx_loop; t1=$(now); S+=("$(echo "$t1 - $t0" | bc)")
  fresh; t0=$(now); kiln_run; t1=$(now); K+=("$(echo "$t1 - $t0" | bc)")
  printf 'round %d: sqlx loop %.2f s, kiln %.2f s\n' "$r" "${S[-1]}" "${K[-1]}"
done
python3 - "$T" "$M" "${S[*]}" "${K[*]}" <<'PY'
import sys, statistics as st
t, m = sys.argv[1], sys.argv[2]
s = [float(x) for x in sys.argv[3].split()]; k = [float(x) for x in sys.argv[4].split()]
print(f"{t} schemas x {m} migrations: sqlx loop median {st.median(s):.2f} s, kiln median {st.median(k):.2f} s, "
      f"kiln is {st.median(s)/st.median(k):.1f}x faster (per round: {', '.join(f'{a/b:.1f}' for a, b in zip(s, k))})")
PY
fresh
