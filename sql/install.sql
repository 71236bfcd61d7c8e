-- order-monitor: install (schema version 2)
--
-- What it does, on the orders table "public"."product_orders":
--   * adds the column "provider_referans" (if missing; no rewrite, data untouched);
--   * builds a small partial index of the orders in flight, CONCURRENTLY;
--   * adds a trigger that announces an order when it enters flight or gets a
--     new provider reference: with NOTIFY order_monitor while the daemon is idle,
--     through a small UNLOGGED inbox table while it is busy (a NOTIFY per
--     order would serialise the application's commits; see the table's comment);
--   * replaces version 1's triggers, which NOTIFYed always, in one transaction;
--   * creates the function through which the daemon writes results (and
--     nothing else): done sets 'done', failed 'failed', gave_up 'manual_required', status is never written.
-- An order is "in flight" when "provider_referans" is set, lower("externalStatus") is one of
-- (sent, processing, queued, pending, unknown) and lower("status") is not one of (approved, rejected).
--
-- Apply with psql, as the table's owner, NOT inside a transaction
-- (CREATE INDEX CONCURRENTLY refuses to run in one):
--     psql "$DSN" -v ON_ERROR_STOP=1 -f sql/install.sql
-- or, for a non-default layout: order-monitor sql install
-- Running it again is harmless: every statement is idempotent.
-- Upgrading from version 1: upgrade the daemon first (it runs on either
-- version, and holds the lock the new trigger looks for), then run this.

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

-- Why not a NOTIFY per order: a transaction that has NOTIFYed takes one
-- lock for the whole cluster at COMMIT and holds it through its WAL flush,
-- so notifying commits run one at a time and lose group commit (pgbench
-- on 2 cores: a quarter of the application's dispatch throughput). So the
-- trigger NOTIFYs only while the daemon is idle enough to want it; while
-- it is busy, order ids wait here and the daemon reads them every few
-- milliseconds, and the application's commits take no lock of ours.
-- UNLOGGED: no WAL for the application to write; after a crash it is
-- empty, and the daemon sweeps the whole table on every reconnect anyway.
-- No index: the daemon takes whatever is here, oldest pages first.
CREATE UNLOGGED TABLE IF NOT EXISTS "public"."order_monitor_product_orders_inbox_v2" (
    order_id uuid NOT NULL,
    queued_at timestamptz NOT NULL DEFAULT now()
);

-- Announces an order: by NOTIFY on the channel named by the trigger's
-- argument while the daemon holds its idle lock, else through the inbox.
-- Either way the daemon sees the order only once it is committed.
-- SECURITY DEFINER: the application's roles need no grant on the inbox.
CREATE OR REPLACE FUNCTION "public"."order_monitor_product_orders_notify_v2"() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $om$
BEGIN
    -- The daemon holds this lock (exclusively, for its session) while it
    -- wants a NOTIFY per order: the shared try then fails at once, never
    -- waits. While it does not hold it (busy, or not running), every
    -- order goes to the inbox instead, and this transaction keeps the
    -- shared lock until it ends: the daemon cannot take the lock back, and
    -- so cannot stop reading the inbox, before this row is committed.
    IF pg_try_advisory_xact_lock_shared(6769325586509180928) THEN
        INSERT INTO "public"."order_monitor_product_orders_inbox_v2" (order_id) VALUES (NEW."id");
    ELSE
        -- The payload is the id alone: far below NOTIFY's 8000-byte
        -- limit, and the daemon reads the committed row itself.
        PERFORM pg_notify(TG_ARGV[0], NEW."id"::text);
    END IF;
    RETURN NULL;
END
$om$;

-- The triggers are swapped in one transaction: every application commit
-- sees either the version 1 triggers or these, never both, never neither.
BEGIN;

-- A new row that is already in flight (it has a provider reference).
CREATE OR REPLACE TRIGGER "order_monitor_insert_v2"
    AFTER INSERT ON "public"."product_orders"
    FOR EACH ROW
    WHEN (NEW."provider_referans" IS NOT NULL AND lower(NEW."externalStatus") IN ('sent', 'processing', 'queued', 'pending', 'unknown') AND lower(NEW."status") NOT IN ('approved', 'rejected'))
    EXECUTE FUNCTION "public"."order_monitor_product_orders_notify_v2"('order_monitor');

-- A row that becomes in flight, or gets a new provider reference while in
-- flight. Every other update (including the daemon's own result writes,
-- which take the row out of flight) is kept out by UPDATE OF and WHEN,
-- so it costs the application nothing.
CREATE OR REPLACE TRIGGER "order_monitor_update_v2"
    AFTER UPDATE OF "provider_referans", "externalStatus", "status" ON "public"."product_orders"
    FOR EACH ROW
    WHEN (NEW."provider_referans" IS NOT NULL AND lower(NEW."externalStatus") IN ('sent', 'processing', 'queued', 'pending', 'unknown') AND lower(NEW."status") NOT IN ('approved', 'rejected')
          AND (OLD."provider_referans" IS DISTINCT FROM NEW."provider_referans"
               OR NOT coalesce(OLD."provider_referans" IS NOT NULL AND lower(OLD."externalStatus") IN ('sent', 'processing', 'queued', 'pending', 'unknown') AND lower(OLD."status") NOT IN ('approved', 'rejected'), false)))
    EXECUTE FUNCTION "public"."order_monitor_product_orders_notify_v2"('order_monitor');

-- Version 1's triggers, which NOTIFYed for every order.
DROP TRIGGER IF EXISTS "order_monitor_insert_v1" ON "public"."product_orders";

DROP TRIGGER IF EXISTS "order_monitor_update_v1" ON "public"."product_orders";

COMMIT;

-- Version 1's trigger function: no trigger uses it any more.
DROP FUNCTION IF EXISTS "public"."order_monitor_product_orders_notify_v1"();

-- The daemon's only way to write: one call applies a batch of results, each
-- guarded (same reference and provider, row still in flight), skipping rows
-- another transaction holds locked (returned as 'locked', to try again),
-- and announces the finished ones on the result channel in the same
-- transaction while the cluster's NOTIFY queue is less than half full.
-- SECURITY DEFINER: it runs with the rights of its owner (install as the
-- table's owner, not as a superuser), so the daemon's role needs no UPDATE
-- on the table and cannot touch a row that is not in flight. What each
-- outcome writes is fixed here, from the settings at install time.
CREATE OR REPLACE FUNCTION "public"."order_monitor_product_orders_write_v2"(
    p_ids uuid[],
    p_references text[],
    p_provider_ids text[],
    p_kinds text[],
    p_pins text[],
    p_provider_messages text[],
    p_last_messages text[]
) RETURNS TABLE (order_id uuid, outcome text, announced boolean)
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $om$
BEGIN
RETURN QUERY
WITH v AS (
    -- ROWS FROM, since a multi-argument unnest() is grammar that only the
    -- unqualified name gets: every call here is schema-qualified.
    SELECT * FROM ROWS FROM (pg_catalog.unnest(p_ids),
                 pg_catalog.unnest(p_references),
                 pg_catalog.unnest(p_provider_ids),
                 pg_catalog.unnest(p_kinds),
                 pg_catalog.unnest(p_pins),
                 pg_catalog.unnest(p_provider_messages),
                 pg_catalog.unnest(p_last_messages))
        AS v(id, ref, provider_id, kind, pin, provider_message, last_message)
    WHERE v.kind IN ('done', 'failed', 'gave_up', 'pending')
), target AS (
    -- The guard: the same reference and provider as when the daemon read
    -- the row, and the row still in flight. A result that lost a race
    -- (an operator finished the order, the application re-sent it) is
    -- not written, and a finished row, its PIN included, is out of reach.
    -- A row another transaction holds locked is skipped, not waited for:
    -- one idle-in-transaction session must not stop every other result.
    -- NO KEY UPDATE is the lock the UPDATE below takes, so a row that is
    -- merely referenced by a foreign key being inserted is not skipped.
    SELECT "o"."id" AS id FROM "public"."product_orders" AS o JOIN v ON "o"."id" = v.id
    WHERE "o"."provider_referans" = v.ref
      AND "o"."providerId"::text IS NOT DISTINCT FROM v.provider_id
      AND o."provider_referans" IS NOT NULL AND lower(o."externalStatus") IN ('sent', 'processing', 'queued', 'pending', 'unknown') AND lower(o."status") NOT IN ('approved', 'rejected')
    FOR NO KEY UPDATE OF o SKIP LOCKED
), written AS (
    UPDATE "public"."product_orders" AS o SET
        "externalStatus" = CASE v.kind
                WHEN 'done' THEN 'done'
                WHEN 'failed' THEN 'failed'
                WHEN 'gave_up' THEN 'manual_required'
                ELSE "o"."externalStatus" END,
        "pinCode" = CASE WHEN v.kind = 'done' THEN coalesce(v.pin, "o"."pinCode") ELSE "o"."pinCode" END,
        "providerMessage" = coalesce(v.provider_message, "o"."providerMessage"),
        "lastMessage" = coalesce(v.last_message, "o"."lastMessage"),
        "lastSyncAt" = pg_catalog.now(),
        "completedAt" = CASE WHEN v.kind <> 'pending' THEN pg_catalog.now() ELSE "o"."completedAt" END,
        "durationMs" = CASE WHEN v.kind = 'pending' THEN "o"."durationMs"
            WHEN pg_catalog.isfinite(coalesce("o"."sentAt", "o"."createdAt")) THEN
                greatest(0, least(
                    extract(epoch FROM pg_catalog.now() - coalesce("o"."sentAt", "o"."createdAt")) * 1000,
                    2147483647))::integer
            END
    FROM v
    WHERE "o"."id" = v.id
      AND "o"."id" IN (SELECT target.id FROM target)
      AND "o"."provider_referans" = v.ref
      AND "o"."providerId"::text IS NOT DISTINCT FROM v.provider_id
      AND o."provider_referans" IS NOT NULL AND lower(o."externalStatus") IN ('sent', 'processing', 'queued', 'pending', 'unknown') AND lower(o."status") NOT IN ('approved', 'rejected')
    RETURNING "o"."id" AS id, v.kind AS kind, "o"."provider_referans" AS ref,
        "o"."externalStatus" AS external_status, "o"."status" AS status
), gate AS (
    -- The announcement is a hint (the application re-reads the row before
    -- acting on it), the row is the truth: above half of the cluster's
    -- NOTIFY queue, a listener somewhere is stuck and a full queue would
    -- fail our COMMIT, the written rows with it. Half, not nearly full,
    -- because the usage is read now and the notifications queue up at
    -- COMMIT, in every session of the cluster at once, and because the
    -- application's own dispatches NOTIFY too and must keep room to commit.
    SELECT pg_catalog.pg_notification_queue_usage() < 0.5 AS has_room
), locked AS (
    -- Rows the guard still matches in this statement's snapshot but that
    -- were not written: another transaction holds them (or changed them
    -- while this ran: the daemon's retry then finds them stale).
    SELECT v.id, v.kind FROM v JOIN "public"."product_orders" AS o ON "o"."id" = v.id
    WHERE "o"."provider_referans" = v.ref
      AND "o"."providerId"::text IS NOT DISTINCT FROM v.provider_id
      AND o."provider_referans" IS NOT NULL AND lower(o."externalStatus") IN ('sent', 'processing', 'queued', 'pending', 'unknown') AND lower(o."status") NOT IN ('approved', 'rejected')
      AND NOT EXISTS (SELECT FROM written WHERE written.id = v.id)
)
SELECT written.id, written.kind,
    CASE WHEN written.kind <> 'pending' AND gate.has_room THEN
        -- pg_notify returns void; cast to text, it is '' (never NULL).
        pg_catalog.pg_notify('order_monitor_result', pg_catalog.json_build_object(
            'id', written.id, 'outcome', written.kind, 'reference', written.ref,
            'externalStatus', written.external_status, 'status', written.status
        )::text)::text IS NOT NULL
    ELSE false END
FROM written CROSS JOIN gate
UNION ALL
SELECT DISTINCT locked.id, 'locked', false FROM locked;
END
$om$;

-- Functions are executable by PUBLIC by default: this one only by the
-- roles granted it (sql/role.sql).
REVOKE ALL ON FUNCTION "public"."order_monitor_product_orders_write_v2"(uuid[], text[], text[], text[], text[], text[], text[]) FROM PUBLIC;

RESET lock_timeout;
