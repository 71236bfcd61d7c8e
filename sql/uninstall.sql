-- order-monitor: uninstall (schema version 2)
--
-- Removes the triggers and trigger functions (this version's and version 1's),
-- the inbox, the write function and the index from "public"."product_orders".
-- Keeps the column "provider_referans" and every row: nothing the application wrote is lost.
-- Apply with psql, not inside a transaction (DROP INDEX CONCURRENTLY):
--     psql "$DSN" -v ON_ERROR_STOP=1 -f sql/uninstall.sql

-- See install.sql.
SET lock_timeout = '5s';

-- Triggers first, this version's and version 1's: from here on the
-- application's writes announce nothing.
DROP TRIGGER IF EXISTS "order_monitor_insert_v2" ON "public"."product_orders";

DROP TRIGGER IF EXISTS "order_monitor_update_v2" ON "public"."product_orders";

DROP TRIGGER IF EXISTS "order_monitor_insert_v1" ON "public"."product_orders";

DROP TRIGGER IF EXISTS "order_monitor_update_v1" ON "public"."product_orders";

DROP FUNCTION IF EXISTS "public"."order_monitor_product_orders_notify_v2"();

DROP FUNCTION IF EXISTS "public"."order_monitor_product_orders_notify_v1"();

-- Order ids still waiting in it are orders in flight: the table keeps them
-- and the partial index finds them.
DROP TABLE IF EXISTS "public"."order_monitor_product_orders_inbox_v2";

-- From here on the daemon cannot write results.
DROP FUNCTION IF EXISTS "public"."order_monitor_product_orders_write_v2"(uuid[], text[], text[], text[], text[], text[], text[]);

-- CONCURRENTLY: dropping the index does not block the application's writes.
DROP INDEX CONCURRENTLY IF EXISTS "public"."order_monitor_product_orders_inflight_v1";

-- The provider reference column and every row stay: they are the
-- application's data now.
RESET lock_timeout;
