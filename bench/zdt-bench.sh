#!/usr/bin/env bash
# The zero-downtime backfill on PostgreSQL (docs/benchmarks.md#zero-downtime-backfill):
# for each table size, one `UPDATE users SET display_name = full_name` of the whole
# table against `kiln worker` running the same change as a keyset backfill, each on a
# fresh table, while a live load (single-row updates at a fixed rate, open loop) runs
# beside it; plus the live load's latency on an idle database.
#
#   bench/zdt-bench.sh [ROWS ...]          default: 1000000 10000000
#
# Env: KILN (default target/release/kiln), PGLOAD (default: pgload next to KILN),
#      PG (admin URL, default postgres://postgres@127.0.0.1:5432/postgres),
#      RATE (live requests/s, default 200), BATCH (backfill batch, default 5000),
#      IDLE_SECS (default 10).
# Prints one line per measurement and a summary table.
set -euo pipefail
cd "$(dirname "$0")/.."
KILN=${KILN:-target/release/kiln}
PGLOAD=${PGLOAD:-$(dirname "$KILN")/pgload}
PG=${PG:-postgres://postgres@127.0.0.1:5432/postgres}
RATE=${RATE:-200}
BATCH=${BATCH:-5000}
IDLE_SECS=${IDLE_SECS:-10}
DB=kiln_zdt_bench
URL="${PG%/*}/$DB"
[[ -x $KILN && -x $PGLOAD ]] || { echo "build first: cargo build --release -p kiln -p kiln-chaos (KILN=$KILN, PGLOAD=$PGLOAD)" >&2; exit 2; }
ROWS=("$@"); [[ ${#ROWS[@]} -gt 0 ]] || ROWS=(1000000 10000000)
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mkdir -p "$work/migrations"
cat > "$work/migrations/0001_display_name.sql" <<SQL
-- kiln:expand
ALTER TABLE users ADD COLUMN display_name text;
-- kiln:backfill table=users key=id batch=$BATCH
UPDATE users SET display_name = full_name WHERE id BETWEEN :lo AND :hi AND display_name IS NULL;
-- kiln:rollback
ALTER TABLE users DROP COLUMN display_name;
SQL

fresh() {  # $1 rows
  psql -q "$PG" -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" >/dev/null
  psql -q "$URL" >/dev/null <<SQL
CREATE TABLE users (id bigserial PRIMARY KEY, full_name text, email text, created_at timestamptz NOT NULL DEFAULT now());
INSERT INTO users (full_name, email) SELECT 'user number ' || g, g || '@example.com' FROM generate_series(1, $1) g;
VACUUM ANALYZE users;
CHECKPOINT;
SQL
}

load_start() { rm -f "$work/stop"; "$PGLOAD" "$URL" --rate "$RATE" --clients 4 --max-id "$1" --stop-file "$work/stop" > "$work/load.json" & LOAD_PID=$!; sleep 1; }
# Not in $( ): `wait` works only in the shell that started the load.
load_stop() { touch "$work/stop"; wait "$LOAD_PID"; LOAD=$(cat "$work/load.json"); }
now() { date +%s.%N; }
field() { python3 -c "import json,sys; print(json.load(open('$1'))['$2'])"; }

summary=()
for n in "${ROWS[@]}"; do
  echo "== $n rows"
  fresh "$n"
  load_start "$n"; sleep "$IDLE_SECS"; load_stop; idle=$LOAD
  echo "idle live load: $idle"

  psql -q "$URL" -c "ALTER TABLE users ADD COLUMN display_name text" >/dev/null
  load_start "$n"
  t0=$(now); psql -q "$URL" -c "UPDATE users SET display_name = full_name" >/dev/null; t1=$(now)
  load_stop; upd=$LOAD
  upd_rate=$(python3 -c "print(round($n/($t1-$t0)))")
  echo "one UPDATE: $(python3 -c "print(round($t1-$t0,1))") s, $upd_rate rows/s; live load: $upd"

  fresh "$n"
  "$KILN" --url "$URL" --dir "$work/migrations" up >/dev/null
  load_start "$n"
  t0=$(now); /usr/bin/time -f '%M' -o "$work/rss" "$KILN" --url "$URL" --dir "$work/migrations" worker --once 2>"$work/worker.log"; t1=$(now)
  load_stop; bf=$LOAD
  bf_rate=$(python3 -c "print(round($n/($t1-$t0)))")
  rss=$(( $(tail -1 "$work/rss") / 1024 ))
  left=$(psql -qAt "$URL" -c "SELECT count(*) FROM users WHERE display_name IS DISTINCT FROM full_name")
  echo "kiln backfill: $(python3 -c "print(round($t1-$t0,1))") s, $bf_rate rows/s, worker max RSS $rss MB, rows left unconverted: $left; live load: $bf"
  echo "$idle" > "$work/i.json"; echo "$upd" > "$work/u.json"; echo "$bf" > "$work/b.json"
  summary+=("$(printf '%10s  %10s  %10s  %5s%%  %8s  %8s  %8s  %8s  %8s  %8s  %6s' "$n" "$upd_rate" "$bf_rate" \
    "$(python3 -c "print(round(100*$bf_rate/$upd_rate))")" \
    "$(field "$work/i.json" p50_ms)" "$(field "$work/i.json" p99_ms)" \
    "$(field "$work/u.json" p50_ms)" "$(field "$work/u.json" p99_ms)" \
    "$(field "$work/b.json" p50_ms)" "$(field "$work/b.json" p99_ms)" "$rss")")
done
psql -q "$PG" -c "DROP DATABASE IF EXISTS $DB" >/dev/null
echo
printf '%10s  %10s  %10s  %6s  %8s  %8s  %8s  %8s  %8s  %8s  %6s\n' rows "UPDATE r/s" "kiln r/s" ratio "idle p50" "idle p99" "upd p50" "upd p99" "bf p50" "bf p99" "RSS MB"
printf '%s\n' "${summary[@]}"
