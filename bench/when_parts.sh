#!/usr/bin/env bash
# Which part of the trigger's WHEN costs the application (issue #21), apart
# from everything else bench/trigger.py measures: pgbench INSERTs of orders
# in flight (16 connections, 10 s a run, 3 rounds alternating) on a table
# with no trigger, or one AFTER INSERT trigger calling a function that does
# nothing, whose WHEN is
#   cond_false  the in-flight rule ours tests (lower() ... IN ...), AND false
#   cond_lock   that rule AND NOT pg_try_advisory_xact_lock_shared(key): ours
#               on a database with no daemon (the try succeeds: nothing is called)
#   lock_only   NOT pg_try_advisory_xact_lock_shared(key) alone: version 6's WHEN
#   ref_lock    NEW.provider_referans IS NOT NULL AND the try: the cheapest
#               narrowing, measured to know whether it costs
#
#   bash bench/when_parts.sh [host] [rounds]   # about a minute a round (3); needs pgbench and psql
set -euo pipefail
HOST="${1:-127.0.0.1}"
ROUNDS="${2:-3}"
DB=om_bench_when_parts
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SCRIPT="$(mktemp)"
trap 'rm -f "$SCRIPT"; psql -h "$HOST" -U postgres -qc "DROP DATABASE IF EXISTS $DB"' EXIT
psql -h "$HOST" -U postgres -qc "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB"
psql -h "$HOST" -U postgres -q -d $DB -f "$ROOT/order_monitor/product_orders.sql"
psql -h "$HOST" -U postgres -q -d $DB \
    -c 'ALTER TABLE product_orders ADD COLUMN provider_referans varchar(255)' \
    -c "CREATE FUNCTION nothing() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NULL; END'"
cat > "$SCRIPT" <<'S'
INSERT INTO product_orders ("providerId", "externalStatus", "sentAt", provider_referans) VALUES ('bench', 'sent', now(), md5(random()::text));
S
RULE="NEW.provider_referans IS NOT NULL AND pg_catalog.lower(NEW.\"externalStatus\") IN ('sent','processing','queued','pending','unknown') AND pg_catalog.lower(NEW.status) NOT IN ('approved','rejected')"
LOCK="NOT pg_catalog.pg_try_advisory_xact_lock_shared(6769325586509180928)"
declare -A WHEN=([none]="" [cond_false]="($RULE AND false)" [cond_lock]="($RULE AND $LOCK)" [lock_only]="($LOCK)" [ref_lock]="(NEW.provider_referans IS NOT NULL AND $LOCK)")
for round in $(seq "$ROUNDS"); do
    for variant in none cond_false cond_lock lock_only ref_lock; do
        psql -h "$HOST" -U postgres -q -d $DB -c "DROP TRIGGER IF EXISTS t ON product_orders" \
            -c "TRUNCATE product_orders" -c "CHECKPOINT" 2>/dev/null
        if [ -n "${WHEN[$variant]}" ]; then
            psql -h "$HOST" -U postgres -q -d $DB -c "CREATE TRIGGER t AFTER INSERT ON product_orders
                FOR EACH ROW WHEN ${WHEN[$variant]} EXECUTE FUNCTION nothing()"
        fi
        tps=$(pgbench -h "$HOST" -U postgres -n -M prepared -c 16 -j 2 -T 10 -f "$SCRIPT" $DB 2>/dev/null \
            | grep -oP 'tps = \K[0-9.]+' | head -1)
        printf 'round %s %-10s %8.0f tps\n' "$round" "$variant" "$tps"
    done
done
