-- order-monitor: install (schema version 1)
--
-- What it does, on the orders table "public"."product_orders":
--   * adds the column "provider_referans" (if missing; no rewrite, data untouched);
--   * builds a small partial index of the orders in flight, CONCURRENTLY;
--   * adds a trigger that sends NOTIFY order_monitor with the order id when an
--     order enters flight or gets a new provider reference.
-- An order is "in flight" when "provider_referans" is set, lower("externalStatus") is one of
-- (sent, processing, queued, pending, unknown) and lower("status") is not one of (approved, rejected).
--
-- Apply with psql, as the table's owner, NOT inside a transaction
-- (CREATE INDEX CONCURRENTLY refuses to run in one):
--     psql "$DSN" -v ON_ERROR_STOP=1 -f sql/install.sql
-- or, for a non-default layout: order-monitor sql install
-- Running it again is harmless: every statement is idempotent.

-- Fail fast instead of queueing the application's writes behind us if the
-- table is busy: re-run later when this times out.
SET lock_timeout = '5s';

-- The provider's reference for an order. Nullable and without a default,
-- so adding it changes only the catalog: no table rewrite.
ALTER TABLE "public"."product_orders" ADD COLUMN IF NOT EXISTS "provider_referans" varchar(255);

-- The sweep's index: only orders in flight, keyed by id for keyset
-- pagination. Small (finished orders leave it) and built CONCURRENTLY, so
-- the application keeps writing while it builds. If a build is interrupted
-- it leaves an INVALID index: DROP INDEX CONCURRENTLY it and run this again
-- (`order-monitor doctor` reports it).
CREATE INDEX CONCURRENTLY IF NOT EXISTS "order_monitor_product_orders_inflight_v1" ON "public"."product_orders" ("id")
    WHERE "provider_referans" IS NOT NULL AND lower("externalStatus") IN ('sent', 'processing', 'queued', 'pending', 'unknown') AND lower("status") NOT IN ('approved', 'rejected');

-- Announces an order id on the channel named by the trigger's argument.
-- NOTIFY is delivered at COMMIT, so the daemon never sees uncommitted rows.
CREATE OR REPLACE FUNCTION "public"."order_monitor_product_orders_notify_v1"() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $om$
BEGIN
    -- The payload is the id alone: far below NOTIFY's 8000-byte limit,
    -- and the daemon reads the committed row itself.
    PERFORM pg_notify(TG_ARGV[0], NEW."id"::text);
    RETURN NULL;
END
$om$;

-- A new row that is already in flight (it has a provider reference).
CREATE OR REPLACE TRIGGER "order_monitor_insert_v1"
    AFTER INSERT ON "public"."product_orders"
    FOR EACH ROW
    WHEN (NEW."provider_referans" IS NOT NULL AND lower(NEW."externalStatus") IN ('sent', 'processing', 'queued', 'pending', 'unknown') AND lower(NEW."status") NOT IN ('approved', 'rejected'))
    EXECUTE FUNCTION "public"."order_monitor_product_orders_notify_v1"('order_monitor');

-- A row that becomes in flight, or gets a new provider reference while in
-- flight. A transaction that NOTIFYs takes a database-wide lock at COMMIT,
-- so every other update (including the daemon's own result writes, which
-- take the row out of flight) is kept out by UPDATE OF and WHEN.
CREATE OR REPLACE TRIGGER "order_monitor_update_v1"
    AFTER UPDATE OF "provider_referans", "externalStatus", "status" ON "public"."product_orders"
    FOR EACH ROW
    WHEN (NEW."provider_referans" IS NOT NULL AND lower(NEW."externalStatus") IN ('sent', 'processing', 'queued', 'pending', 'unknown') AND lower(NEW."status") NOT IN ('approved', 'rejected')
          AND (OLD."provider_referans" IS DISTINCT FROM NEW."provider_referans"
               OR NOT coalesce(OLD."provider_referans" IS NOT NULL AND lower(OLD."externalStatus") IN ('sent', 'processing', 'queued', 'pending', 'unknown') AND lower(OLD."status") NOT IN ('approved', 'rejected'), false)))
    EXECUTE FUNCTION "public"."order_monitor_product_orders_notify_v1"('order_monitor');

RESET lock_timeout;
