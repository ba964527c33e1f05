#!/usr/bin/env bash
# Paired head-to-head timings on N generated migrations (default 1,000), each
# `CREATE TABLE t_NNNN (id bigint primary key, v text)`, with a fresh database
# before every timed run (../shared/bench/peers/paired.py alternates the two
# commands, so machine noise hits both alike):
#
#   apply   kiln vs the raw client   PostgreSQL: `psql -1 -f` (one transaction)
#                                    SQLite: `sqlite3` with the same history rows
#                                    MariaDB: `mariadb` with the same history rows
#   apply   kiln vs BEFORE           BEFORE=/path/to/an/older/kiln (optional)
#   no-op   kiln vs BEFORE           (`kiln up` with everything applied)
#   status  kiln vs BEFORE
#
# Usage: bench/paired-apply.sh [N]     PAIRS (default 4), DBS (default "pg sqlite mariadb")
# Servers: PostgreSQL 127.0.0.1:5432 (user postgres), MariaDB 127.0.0.1:3306 (root).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
N="${1:-${N:-1000}}"
PAIRS="${PAIRS:-4}"
DBS="${DBS:-pg sqlite mariadb}"
KILN="${KILN:-$ROOT/target/release/kiln}"
BEFORE="${BEFORE:-}"
PAIRED="${PAIRED:-$ROOT/../shared/bench/peers/paired.py}"
W="$(mktemp -d /tmp/kiln-paired.XXXXXX)"
trap 'rm -rf "$W"' EXIT

[[ -x "$KILN" ]] || (cd "$ROOT" && cargo build --release -p kiln)
[[ -f "$PAIRED" ]] || { echo "paired.py not found at $PAIRED (set PAIRED=)" >&2; exit 2; }

mkdir -p "$W/m"
: > "$W/all.sql"
for i in $(seq 1 "$N"); do
    v=$(printf '%04d' "$i")
    echo "CREATE TABLE t_$v (id bigint primary key, v text);" > "$W/m/${v}_create_t_$v.sql"
    echo "CREATE TABLE t_$v (id bigint primary key, v text);" >> "$W/all.sql"
done

# The raw client with a history row per migration, as kiln writes one (floor-hist).
hist() {  # dialect
    local now="CURRENT_TIMESTAMP"
    echo "CREATE TABLE kiln_floor_hist (version bigint primary key, name text, applied_at timestamp);"
    for i in $(seq 1 "$N"); do
        v=$(printf '%04d' "$i")
        echo "BEGIN;"
        echo "CREATE TABLE t_$v (id bigint primary key, v text);"
        echo "INSERT INTO kiln_floor_hist VALUES ($i, 'create_t_$v', $now);"
        echo "COMMIT;"
    done
}
hist > "$W/hist.sql"

row() { printf '| %s | %s | %s |\n' "$1" "$2" "$3"; }
pair() {  # label reset a b
    local out
    out=$(python3 "$PAIRED" "$PAIRS" "$2" "$3" "$4")
    row "$1" "$(echo "$out" | sed -n 's/^A median \([0-9.]*\)s.*/\1/p') / $(echo "$out" | sed -n 's/^B median \([0-9.]*\)s.*/\1/p') s" \
        "$(echo "$out" | sed -n 's/^paired ratio A\/B median \([0-9.]*\) (min \([0-9.]*\) max \([0-9.]*\)).*/\1 (\2–\3)/p')"
}

echo "N=$N, $PAIRS pairs each, $(date -u +%F)"
echo
echo "| comparison | medians A / B | paired ratio A/B (min–max) |"
echo "|---|---|---|"
for db in $DBS; do
    case $db in
        pg)
            url="postgres://postgres@127.0.0.1:5432/kiln_paired?sslmode=disable"
            reset="psql -qAt -h 127.0.0.1 -U postgres -d postgres -c 'DROP DATABASE IF EXISTS kiln_paired' -c 'CREATE DATABASE kiln_paired'"
            raw="psql -q -h 127.0.0.1 -U postgres -d kiln_paired -1 -f $W/all.sql >/dev/null"
            rawname="psql -1"
            ;;
        sqlite)
            url="sqlite://$W/k.db"
            reset="rm -f $W/k.db $W/k.db-kiln.lock $W/k.db-journal"
            raw="sqlite3 $W/k.db < $W/hist.sql"
            rawname="sqlite3 + history rows"
            ;;
        mariadb)
            url="mysql://root@127.0.0.1:3306/kiln_paired"
            reset="mariadb -h 127.0.0.1 -u root -e 'DROP DATABASE IF EXISTS kiln_paired; CREATE DATABASE kiln_paired'"
            raw="mariadb -h 127.0.0.1 -u root kiln_paired < $W/hist.sql"
            rawname="mariadb + history rows"
            ;;
    esac
    up="$KILN --url '$url' --dir $W/m up >/dev/null"
    pair "$db apply: kiln / $rawname" "$reset" "$up" "$raw"
    if [[ -n $BEFORE ]]; then
        before="$BEFORE --url '$url' --dir $W/m up >/dev/null"
        pair "$db apply: kiln / before" "$reset" "$up" "$before"
        applied="$reset; $KILN --url '$url' --dir $W/m up >/dev/null"
        eval "$applied"
        pair "$db no-op up: kiln / before" "true" "$up" "$before"
        pair "$db status: kiln / before" "true" "$KILN --url '$url' --dir $W/m status >/dev/null" "$BEFORE --url '$url' --dir $W/m status >/dev/null"
    fi
done
