-- order-monitor: uninstall (schema version 3)
--
-- Removes every object any version created on "public"."product_orders": the triggers and
-- trigger functions, the inbox, the write functions and the index.
-- Keeps the column "provider_referans" and every row: nothing the application wrote is lost.
-- Apply with psql, not inside a transaction (DROP INDEX CONCURRENTLY):
--     psql "$DSN" -v ON_ERROR_STOP=1 -f sql/uninstall.sql

-- Every name this file resolves comes from pg_catalog first: a role that
-- may CREATE in a schema on the default path (public, before PostgreSQL
-- 15) could otherwise put its own lower(varchar) in front of ours, and it
-- would run as whoever runs this file. Restored at the end.
SET search_path = pg_catalog, pg_temp;

-- See install.sql.
SET lock_timeout = '3s';

-- Triggers first, every version's: from here on the application's writes
-- announce nothing.
DO $om$
BEGIN
    -- DROP TRIGGER IF EXISTS takes ACCESS EXCLUSIVE even when there is
    -- nothing to drop: ask the catalog first, then lock once for all four.
    IF EXISTS (SELECT FROM pg_catalog.pg_trigger
                WHERE tgrelid = pg_catalog.to_regclass('"public"."product_orders"') AND tgname::text IN ('order_monitor_insert_v2', 'order_monitor_update_v2', 'order_monitor_insert_v1', 'order_monitor_update_v1')) THEN
        LOCK TABLE "public"."product_orders" IN ACCESS EXCLUSIVE MODE;
        DROP TRIGGER IF EXISTS "order_monitor_insert_v2" ON "public"."product_orders";
        DROP TRIGGER IF EXISTS "order_monitor_update_v2" ON "public"."product_orders";
        DROP TRIGGER IF EXISTS "order_monitor_insert_v1" ON "public"."product_orders";
        DROP TRIGGER IF EXISTS "order_monitor_update_v1" ON "public"."product_orders";
    END IF;
END
$om$;

-- The trigger functions of versions 2 and 1.
DROP FUNCTION IF EXISTS "public"."order_monitor_product_orders_notify_v2"();

DROP FUNCTION IF EXISTS "public"."order_monitor_product_orders_notify_v1"();

-- Order ids still waiting in it are orders in flight: the table keeps them
-- and the partial index finds them.
DROP TABLE IF EXISTS "public"."order_monitor_product_orders_inbox_v2";

-- From here on the daemon cannot write results (this version's write
-- function, and that of versions 1 and 2).
DROP FUNCTION IF EXISTS "public"."order_monitor_product_orders_write_v2"(uuid[], text[], text[], text[], text[], text[], text[]);

DROP FUNCTION IF EXISTS "public"."order_monitor_product_orders_write_v1"(uuid[], text[], text[], text[], text[], text[], text[]);

-- CONCURRENTLY: dropping the index does not block the application's writes.
DROP INDEX CONCURRENTLY IF EXISTS "public"."order_monitor_product_orders_inflight_v1";

-- The provider reference column and every row stay: they are the
-- application's data now.
RESET lock_timeout;

RESET search_path;
