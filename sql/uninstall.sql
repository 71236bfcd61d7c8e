-- order-monitor: uninstall (schema version 6)
--
-- Removes every object any version created on "public"."product_orders": the triggers and
-- trigger functions (versions 1 to 6), the inbox of versions 2 to 4, the
-- write functions, the outbox and the
-- index. Keeps the column "provider_referans" and every row: nothing the application
-- wrote is lost. Refuses, changing nothing, while the outbox holds results
-- not yet delivered to the application, unless this session first says
--     SET order_monitor.drop_undelivered = on;
-- Apply with psql, not inside a transaction (DROP INDEX CONCURRENTLY):
--     psql "$DSN" -v ON_ERROR_STOP=1 -f sql/uninstall.sql

-- Every name this file resolves comes from pg_catalog first: a role that
-- may CREATE in a schema on the default path (public, before PostgreSQL
-- 15) could otherwise put its own lower(varchar) in front of ours, and it
-- would run as whoever runs this file. Restored at the end.
SET search_path = pg_catalog, pg_temp;

-- See install.sql.
SET lock_timeout = '3s';

-- Results written but not yet delivered to the application (an approval,
-- a refund) are in the outbox: this file refuses to drop them, before it
-- changes anything, unless told to in this session with
--     SET order_monitor.drop_undelivered = on;
-- (order-monitor sql uninstall --drop-undelivered). Dead letters count too.
DO $om$
DECLARE
    waiting bigint;
    dead bigint;
BEGIN
    IF pg_catalog.to_regclass('"public"."order_monitor_product_orders_outbox_v1"') IS NULL THEN
        RETURN;
    END IF;
    IF pg_catalog.lower(coalesce(pg_catalog.current_setting('order_monitor.drop_undelivered', true), '')) = 'on' THEN
        waiting := 0;
        dead := 0;
    ELSE
        SELECT pg_catalog.count(*) FILTER (WHERE dead_at IS NULL), pg_catalog.count(*) FILTER (WHERE dead_at IS NOT NULL)
          INTO waiting, dead FROM "public"."order_monitor_product_orders_outbox_v1";
    END IF;
    IF waiting + dead > 0 THEN
        RAISE EXCEPTION 'order-monitor: the outbox % still holds % deliveries not yet made and % dead letters: results written but never delivered to the application (approvals, refunds); nothing was dropped', '"public"."order_monitor_product_orders_outbox_v1"', waiting, dead
            USING HINT = 'let the daemon deliver them (order-monitor deliveries lists them), or drop them anyway: SET ' || 'order_monitor.drop_undelivered' || ' = on; before this file (order-monitor sql uninstall --drop-undelivered)';
    END IF;
END
$om$;

-- The logical decoding capture (decoding.sql), first: the slot (a slot left
-- behind keeps WAL forever), the publication and the slot's functions.
-- Needs a superuser when they exist. The decoder role stays (roles are per
-- cluster): DROP ROLE it yourself.
DO $om$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_publication WHERE pubname = 'order_monitor_product_orders_pub_v1')
       AND NOT EXISTS (SELECT FROM pg_catalog.pg_replication_slots WHERE slot_name = 'order_monitor_' || pg_catalog.left(pg_catalog.md5(pg_catalog.current_database() || ':' || '"public"."product_orders"'), 16))
       AND pg_catalog.to_regprocedure('"public"."order_monitor_product_orders_changes_v1"(integer)') IS NULL THEN
        RETURN;  -- decoding.sql never ran here
    END IF;
    IF NOT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
        RAISE EXCEPTION 'order-monitor: decoding.sql ran here: its slot, publication and functions need a superuser to drop; nothing was changed'
            USING HINT = 'run this file as a superuser';
    END IF;
    IF EXISTS (SELECT FROM pg_catalog.pg_replication_slots WHERE slot_name = 'order_monitor_' || pg_catalog.left(pg_catalog.md5(pg_catalog.current_database() || ':' || '"public"."product_orders"'), 16)) THEN
        PERFORM pg_catalog.pg_drop_replication_slot('order_monitor_' || pg_catalog.left(pg_catalog.md5(pg_catalog.current_database() || ':' || '"public"."product_orders"'), 16));
    END IF;
    DROP PUBLICATION IF EXISTS "order_monitor_product_orders_pub_v1";
    DROP FUNCTION IF EXISTS "public"."order_monitor_product_orders_changes_v1"(integer);
    DROP FUNCTION IF EXISTS "public"."order_monitor_product_orders_advance_v1"(pg_catalog.pg_lsn);
    DROP FUNCTION IF EXISTS "public"."order_monitor_product_orders_slot_v1"();
    DROP FUNCTION IF EXISTS "public"."order_monitor_product_orders_recreate_v1"();
END
$om$;

-- Triggers first, every version's: from here on the application's writes
-- announce nothing.
DO $om$
BEGIN
    -- DROP TRIGGER IF EXISTS takes ACCESS EXCLUSIVE even when there is
    -- nothing to drop: ask the catalog first, then lock once for all of them.
    IF EXISTS (SELECT FROM pg_catalog.pg_trigger
                WHERE tgrelid = pg_catalog.to_regclass('"public"."product_orders"') AND tgname::text IN ('order_monitor_insert_v3', 'order_monitor_update_v3', 'order_monitor_insert_v1', 'order_monitor_update_v1', 'order_monitor_insert_v2', 'order_monitor_update_v2')) THEN
        LOCK TABLE "public"."product_orders" IN ACCESS EXCLUSIVE MODE;
        DROP TRIGGER IF EXISTS "order_monitor_insert_v3" ON "public"."product_orders";
        DROP TRIGGER IF EXISTS "order_monitor_update_v3" ON "public"."product_orders";
        DROP TRIGGER IF EXISTS "order_monitor_insert_v1" ON "public"."product_orders";
        DROP TRIGGER IF EXISTS "order_monitor_update_v1" ON "public"."product_orders";
        DROP TRIGGER IF EXISTS "order_monitor_insert_v2" ON "public"."product_orders";
        DROP TRIGGER IF EXISTS "order_monitor_update_v2" ON "public"."product_orders";
    END IF;
END
$om$;

-- The trigger functions of versions 5 and 6 (one), 2 to 4, and 1.
DROP FUNCTION IF EXISTS "public"."order_monitor_product_orders_notify_v3"();

DROP FUNCTION IF EXISTS "public"."order_monitor_product_orders_notify_v2"();

DROP FUNCTION IF EXISTS "public"."order_monitor_product_orders_notify_v1"();

-- Versions 2 to 4's inbox. Order ids still waiting in it are orders in
-- flight: the table keeps them and the partial index finds them.
DROP TABLE IF EXISTS "public"."order_monitor_product_orders_inbox_v2";

-- From here on the daemon cannot write results (this version's write
-- function, and that of versions 1 and 2).
DROP FUNCTION IF EXISTS "public"."order_monitor_product_orders_write_v2"(uuid[], text[], text[], text[], text[], text[], text[]);

DROP FUNCTION IF EXISTS "public"."order_monitor_product_orders_write_v1"(uuid[], text[], text[], text[], text[], text[], text[]);

-- The outbox, now that nothing records into it: locked, checked again (a
-- result written since the check above is refused the same way: run this
-- file again once it is delivered), and dropped with its index, in one
-- transaction.
DO $om$
DECLARE
    waiting bigint;
    dead bigint;
BEGIN
    IF pg_catalog.to_regclass('"public"."order_monitor_product_orders_outbox_v1"') IS NULL THEN
        RETURN;
    END IF;
    LOCK TABLE "public"."order_monitor_product_orders_outbox_v1" IN ACCESS EXCLUSIVE MODE;
    IF pg_catalog.lower(coalesce(pg_catalog.current_setting('order_monitor.drop_undelivered', true), '')) = 'on' THEN
        waiting := 0;
        dead := 0;
    ELSE
        SELECT pg_catalog.count(*) FILTER (WHERE dead_at IS NULL), pg_catalog.count(*) FILTER (WHERE dead_at IS NOT NULL)
          INTO waiting, dead FROM "public"."order_monitor_product_orders_outbox_v1";
    END IF;
    IF waiting + dead > 0 THEN
        RAISE EXCEPTION 'order-monitor: the outbox % still holds % deliveries not yet made and % dead letters: results written but never delivered to the application (approvals, refunds); nothing was dropped', '"public"."order_monitor_product_orders_outbox_v1"', waiting, dead
            USING HINT = 'let the daemon deliver them (order-monitor deliveries lists them), or drop them anyway: SET ' || 'order_monitor.drop_undelivered' || ' = on; before this file (order-monitor sql uninstall --drop-undelivered)';
    END IF;
    DROP TABLE "public"."order_monitor_product_orders_outbox_v1";
END
$om$;

-- CONCURRENTLY: dropping the index does not block the application's writes.
DROP INDEX CONCURRENTLY IF EXISTS "public"."order_monitor_product_orders_inflight_v1";

-- The provider reference column and every row stay: they are the
-- application's data now.
RESET lock_timeout;

RESET search_path;
