#!/usr/bin/env bash
# What each part of the trigger costs the application's INSERT (issue #10):
# pgbench, 16 connections, full speed, no daemon, on a throwaway database.
#
#   bash bench/trigger_parts.sh [seconds per run, default 10]
#
# Needs psql and pgbench, and a superuser on the local server
# (PGHOST/PGUSER, default 127.0.0.1 / postgres). Variants, one enabled at a
# time, alternated over two rounds: no trigger; v2 as install.sql creates it
# (nobody holds the idle lock, so every row goes to the inbox); an empty
# PL/pgSQL function behind the same WHEN clause; the advisory-lock try moved
# into WHEN (so the function is never called while the lock is free); the
# lock try alone (its WHEN is always false).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-10}"
export PGHOST="${PGHOST:-127.0.0.1}" PGUSER="${PGUSER:-postgres}" PGOPTIONS="-c client_min_messages=warning"
db=om_trigger_parts
sql() { psql -q -X -v ON_ERROR_STOP=1 -d "$db" "$@"; }
script=$(mktemp)
trap 'rm -f "$script"; psql -q -X -d postgres -c "DROP DATABASE IF EXISTS $db" >/dev/null' EXIT
cat >"$script" <<'SQL'
INSERT INTO product_orders ("providerId","externalStatus","sentAt",provider_referans) VALUES ('p1','sent',now(),md5(random()::text));
SQL
psql -q -X -d postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
sql -f order_monitor/product_orders.sql >/dev/null
sql -f sql/install.sql >/dev/null 2>&1
key=$(grep -o 'pg_try_advisory_xact_lock_shared([0-9-]*)' sql/install.sql | head -1 | grep -o -- '-\?[0-9]\+')
when="NEW.\"provider_referans\" IS NOT NULL AND lower(NEW.\"externalStatus\") IN ('sent', 'processing', 'queued', 'pending', 'unknown') AND lower(NEW.\"status\") NOT IN ('approved', 'rejected')"
sql <<SQL
CREATE FUNCTION parts_empty() RETURNS trigger LANGUAGE plpgsql AS \$\$BEGIN RETURN NULL; END\$\$;
CREATE TRIGGER parts_empty AFTER INSERT ON product_orders FOR EACH ROW
    WHEN ($when) EXECUTE FUNCTION parts_empty();
CREATE TRIGGER parts_lock_in_when AFTER INSERT ON product_orders FOR EACH ROW
    WHEN ($when AND NOT pg_try_advisory_xact_lock_shared($key))
    EXECUTE FUNCTION order_monitor_product_orders_notify_v2('order_monitor');
CREATE TRIGGER parts_lock_alone AFTER INSERT ON product_orders FOR EACH ROW
    WHEN ($when AND pg_try_advisory_xact_lock_shared($key) AND false) EXECUTE FUNCTION parts_empty();
SQL
run() {
    sql -c "ALTER TABLE product_orders DISABLE TRIGGER USER" >/dev/null
    if [ "$1" != none ]; then sql -c "ALTER TABLE product_orders ENABLE TRIGGER $1" >/dev/null; fi
    sql -c "TRUNCATE product_orders" -c "TRUNCATE order_monitor_product_orders_inbox_v2" \
        -c "VACUUM product_orders" -c "CHECKPOINT" >/dev/null
    tps=$(pgbench -n -M prepared -c 16 -j 2 -T "$seconds" -f "$script" "$db" 2>/dev/null |
        sed -n 's/^tps = \([0-9.]*\).*/\1/p')
    printf '%-26s %8.0f tps\n' "$1" "$tps"
}
for round in 1 2; do
    echo "round $round"
    for variant in none order_monitor_insert_v2 parts_empty parts_lock_in_when parts_lock_alone; do
        run "$variant"
    done
done
