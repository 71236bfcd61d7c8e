-- order-monitor: install (schema version 6)
--
-- What it does, on the orders table "public"."product_orders":
--   * adds the column "provider_referans" (if missing; no rewrite, data untouched);
--   * builds a small partial index of the orders in flight, CONCURRENTLY;
--   * adds a trigger that announces an order when it enters flight or gets a
--     new provider reference, with NOTIFY order_monitor, while the daemon is idle;
--     while it is busy the trigger's WHEN is false (a NOTIFY per order would
--     serialise the application's commits) and the daemon reads the orders
--     that changed since its last read instead: nothing of ours runs in the
--     application's transaction but the WHEN, one try of an advisory lock
--     (see the triggers' comment);
--   * replaces older versions' triggers and trigger function in one
--     transaction (version 5's in place), and drops versions 1 to 4's
--     functions and versions 2 to 4's UNLOGGED inbox;
--   * creates the function through which the daemon writes results (and
--     nothing else): done sets 'done', failed 'failed', gave_up 'manual_required', status is never written, no result is recorded in the outbox (no action is configured);
--   * creates the outbox: the results an action of the providers file
--     delivers to the application (approve; reject and refund), recorded by
--     the write function in the transaction that writes them;
--   * leaves EXECUTE on its functions to the table's owner (and, once
--     role.sql has run, the write function to the daemon's role) only.
-- An order is "in flight" when "provider_referans" is set, lower("externalStatus") is one of
-- (sent, processing, queued, pending, unknown) and lower("status") is not one of (approved, rejected).
--
-- Apply with psql (it uses \if), as the table's owner or a superuser (it
-- then switches to the owner), NOT inside a transaction (CREATE INDEX
-- CONCURRENTLY refuses to run in one):
--     psql "$DSN" -v ON_ERROR_STOP=1 -f sql/install.sql
-- or, for a non-default layout: order-monitor sql install
-- Running it again is harmless: every step is idempotent, and a run that
-- finds nothing to change takes no lock on the table. If it stops on
-- "lock timeout" (the table was busy), run it again.
-- Upgrading from version 5: in place, with the daemons running, in any
-- order (daemons of both releases work on either install); the triggers and
-- their function change in one transaction, under SHARE ROW EXCLUSIVE.
-- Upgrading from version 4 (or 3): in place, with the daemons running, in
-- this order: first upgrade and restart every daemon (standbys included; a
-- daemon of this release works on the version 4 install as well), then run
-- this, then role.sql. A daemon of an earlier release does not look for the
-- orders this trigger leaves unannounced while it is busy: its sweep would
-- find them, minutes late.
-- Upgrading from version 1 or 2: stop every order-monitor instance (standbys
-- included), run this, then start the new version (it refuses to start on
-- an older schema, and an older one cannot write on this).

-- Every name this file resolves comes from pg_catalog first: a role that
-- may CREATE in a schema on the default path (public, before PostgreSQL
-- 15) could otherwise put its own lower(varchar) in front of ours, and it
-- would run as whoever runs this file. Restored at the end.
SET search_path = pg_catalog, pg_temp;

-- Wait at most this long for a lock on the orders table. While we wait,
-- the application's statements that conflict with the lock we asked for
-- queue behind our request, for at most that long; then this file stops
-- with "lock timeout", having changed nothing in that step: run it again
-- when the table is quieter (every step is idempotent). A re-run that has
-- nothing to change takes no lock on the orders table at all.
SET lock_timeout = '3s';

-- The rest runs as the table's owner: the SECURITY DEFINER functions
-- below run with their owner's rights, which must not be a superuser's.
-- Run by a superuser (or a member of the owner role), this switches to
-- the owner (SET ROLE, until the end of the file) and hands back any
-- function an earlier superuser install left; on a table a superuser
-- owns it goes on with a WARNING. Any other role is refused.
DO $om$
DECLARE
    table_owner name;
    owner_is_superuser boolean;
    item record;
BEGIN
    SELECT r.rolname, r.rolsuper INTO table_owner, owner_is_superuser
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_roles r ON r.oid = c.relowner
     WHERE c.oid = pg_catalog.to_regclass('"public"."product_orders"');
    IF table_owner IS NULL THEN
        RAISE EXCEPTION 'order-monitor: table % does not exist', '"public"."product_orders"';
    END IF;
    IF owner_is_superuser THEN
        -- Go on, but say it: our SECURITY DEFINER functions run as their
        -- owner, the table's, so with every right on the cluster.
        RAISE WARNING 'order-monitor: % is owned by the superuser %, so the SECURITY DEFINER functions this file creates run as a superuser', '"public"."product_orders"', table_owner
            USING HINT = 'give the table to an ordinary role (ALTER TABLE ... OWNER TO ...) and run this file again';
    ELSIF table_owner <> current_user THEN
        IF NOT pg_catalog.pg_has_role(table_owner, 'MEMBER') THEN
            RAISE EXCEPTION 'order-monitor: run this file as the owner of % (%), or as a role that may SET ROLE to it', '"public"."product_orders"', table_owner;
        END IF;
        -- An earlier install run by a superuser left functions (or the
        -- inbox, or the outbox) that are not the table owner's: give them back, or the
        -- owner could not replace them, and a superuser-owned SECURITY
        -- DEFINER function would keep running with every right.
        FOR item IN
            SELECT p.oid::pg_catalog.regprocedure AS f
              FROM pg_catalog.pg_proc p
              JOIN pg_catalog.pg_namespace s ON s.oid = p.pronamespace
             WHERE s.nspname = 'public' AND p.proname::text IN ('order_monitor_product_orders_notify_v3', 'order_monitor_product_orders_notify_v2', 'order_monitor_product_orders_notify_v1', 'order_monitor_product_orders_write_v2', 'order_monitor_product_orders_write_v1')
               AND p.proowner <> (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = table_owner)
        LOOP
            EXECUTE pg_catalog.format('ALTER FUNCTION %s OWNER TO %I', item.f, table_owner);
        END LOOP;
        FOR item IN
            SELECT i.oid::pg_catalog.regclass AS t FROM pg_catalog.pg_class i
             WHERE i.oid IN (pg_catalog.to_regclass('"public"."order_monitor_product_orders_inbox_v2"'), pg_catalog.to_regclass('"public"."order_monitor_product_orders_outbox_v1"'))
               AND i.relowner <> (SELECT r.oid FROM pg_catalog.pg_roles r
                                   WHERE r.rolname = table_owner)
        LOOP
            EXECUTE pg_catalog.format('ALTER TABLE %s OWNER TO %I', item.t, table_owner);
        END LOOP;
        -- For this session, until the RESET ROLE at the end of the file.
        PERFORM pg_catalog.set_config('role', table_owner, false);
    END IF;
END
$om$;

-- The provider's reference for an order. Nullable and without a default,
-- so adding it changes only the catalog: no table rewrite.
DO $om$
BEGIN
    -- ADD COLUMN IF NOT EXISTS takes ACCESS EXCLUSIVE on the table even when
    -- the column exists: ask the catalog (no lock) first.
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_attribute
                    WHERE attrelid = pg_catalog.to_regclass('"public"."product_orders"')
                      AND attname = 'provider_referans' AND NOT attisdropped) THEN
        ALTER TABLE "public"."product_orders" ADD COLUMN IF NOT EXISTS "provider_referans" varchar(255);
    END IF;
END
$om$;

-- The sweep's index: only orders in flight, keyed by id for keyset
-- pagination. Small (finished orders leave it) and built CONCURRENTLY, so
-- the application keeps writing while it builds. Built only when missing:
-- CREATE INDEX ... IF NOT EXISTS takes a lock on the table before it
-- finds the index there.
SELECT (pg_catalog.to_regclass('"public"."order_monitor_product_orders_inflight_v1"') IS NULL) AS needed \gset order_monitor_
\if :order_monitor_needed
CREATE INDEX CONCURRENTLY IF NOT EXISTS "order_monitor_product_orders_inflight_v1" ON "public"."product_orders" ("id")
    WHERE "provider_referans" IS NOT NULL AND pg_catalog.lower("externalStatus") IN ('sent', 'processing', 'queued', 'pending', 'unknown') AND pg_catalog.lower("status") NOT IN ('approved', 'rejected');
\endif

-- Stops here when the index is INVALID (a build interrupted, by a lock
-- timeout for one: DROP INDEX CONCURRENTLY it and run this file again) or
-- was built for another in-flight rule: the sweep could not use it.
-- Compared with the same index built on a temporary copy of the columns.
DO $om$
DECLARE
    probe_columns text;
    probe_drops text;
    existing record;
    wanted record;
BEGIN
    SELECT i.indisvalid AND i.indisready AS valid,
           i.indrelid = pg_catalog.to_regclass('"public"."product_orders"') AS on_table,
           (am.amname, i.indisunique, i.indnatts, i.indkey, i.indclass, i.indcollation,
            pg_catalog.regexp_replace(i.indexprs::text, ' :location -?[0-9]+', '', 'g'), pg_catalog.regexp_replace(i.indpred::text, ' :location -?[0-9]+', '', 'g'))::text AS shape, i.indpred
      INTO existing
      FROM pg_catalog.pg_index i
      JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
      JOIN pg_catalog.pg_am am ON am.oid = c.relam
     WHERE i.indexrelid = pg_catalog.to_regclass('"public"."order_monitor_product_orders_inflight_v1"');
    IF NOT FOUND THEN
        RAISE EXCEPTION 'order-monitor: index % is missing', '"public"."order_monitor_product_orders_inflight_v1"'
            USING HINT = 'run this file again, as the table''s owner';
    END IF;
    IF NOT existing.valid THEN
        RAISE EXCEPTION 'order-monitor: index % is INVALID (an interrupted CREATE INDEX CONCURRENTLY left it): the sweep cannot use it', '"public"."order_monitor_product_orders_inflight_v1"'
            USING HINT = 'run DROP INDEX CONCURRENTLY ' || '"public"."order_monitor_product_orders_inflight_v1"' || '; then run this file again';
    END IF;
    IF NOT existing.on_table THEN
        RAISE EXCEPTION 'order-monitor: index % indexes another table than %', '"public"."order_monitor_product_orders_inflight_v1"', '"public"."product_orders"'
            USING HINT = 'run DROP INDEX CONCURRENTLY ' || '"public"."order_monitor_product_orders_inflight_v1"' || '; then run this file again';
    END IF;
    SELECT pg_catalog.string_agg(CASE WHEN a.attisdropped
               THEN pg_catalog.format('order_monitor_dropped_%s integer', a.attnum)
               ELSE pg_catalog.format('%I %s%s', a.attname,
                   pg_catalog.format_type(a.atttypid, a.atttypmod),
                   CASE WHEN a.attcollation = 0 THEN ''
                   ELSE pg_catalog.format(' COLLATE %I.%I', cn.nspname, co.collname)
                   END) END, ', ' ORDER BY a.attnum),
           pg_catalog.string_agg(
               pg_catalog.format('DROP COLUMN order_monitor_dropped_%s', a.attnum), ', '
           ) FILTER (WHERE a.attisdropped)
      INTO probe_columns, probe_drops
      FROM pg_catalog.pg_attribute a
      LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation
      LEFT JOIN pg_catalog.pg_namespace cn ON cn.oid = co.collnamespace
     WHERE a.attrelid = pg_catalog.to_regclass('"public"."product_orders"') AND a.attnum > 0;
    EXECUTE pg_catalog.format('CREATE TEMPORARY TABLE "pg_temp"."order_monitor_probe" (%s)', probe_columns);
    IF probe_drops IS NOT NULL THEN
        EXECUTE pg_catalog.format('ALTER TABLE "pg_temp"."order_monitor_probe" %s', probe_drops);
    END IF;
    CREATE INDEX order_monitor_probe_index ON "pg_temp"."order_monitor_probe" ("id") WHERE "provider_referans" IS NOT NULL AND pg_catalog.lower("externalStatus") IN ('sent', 'processing', 'queued', 'pending', 'unknown') AND pg_catalog.lower("status") NOT IN ('approved', 'rejected');
    SELECT (am.amname, i.indisunique, i.indnatts, i.indkey, i.indclass, i.indcollation,
            pg_catalog.regexp_replace(i.indexprs::text, ' :location -?[0-9]+', '', 'g'), pg_catalog.regexp_replace(i.indpred::text, ' :location -?[0-9]+', '', 'g'))::text AS shape, i.indpred, i.indrelid
      INTO wanted
      FROM pg_catalog.pg_index i
      JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
      JOIN pg_catalog.pg_am am ON am.oid = c.relam
     WHERE i.indexrelid = 'pg_temp.order_monitor_probe_index'::pg_catalog.regclass;
    IF existing.shape IS DISTINCT FROM wanted.shape THEN
        -- Both deparsed on the probe (same column numbers), not on the table.
        RAISE EXCEPTION 'order-monitor: index % was built for another in-flight rule (WHERE %), this file builds it WHERE %', '"public"."order_monitor_product_orders_inflight_v1"',
            pg_catalog.pg_get_expr(existing.indpred, wanted.indrelid), pg_catalog.pg_get_expr(wanted.indpred, wanted.indrelid)
            USING HINT = 'run DROP INDEX CONCURRENTLY ' || '"public"."order_monitor_product_orders_inflight_v1"' || '; then run this file again (or render it with the settings the index was built for)';
    END IF;
    DROP TABLE "pg_temp"."order_monitor_probe";
END
$om$;

-- Everything else in one transaction: every application commit sees
-- the old objects or the new ones, never a mix, and a run that stops
-- (lock timeout) leaves nothing half done.
BEGIN;

-- The outbox: one row per result the write function wrote and an action
-- of the application delivers (approve; reject and refund), recorded in
-- the very transaction that writes the result. So a written result is
-- never left undelivered (the daemon killed between its write and its
-- call: the next leader delivers it), and nothing is delivered for a
-- result that was not written. LOGGED, unlike the inbox: it must survive
-- a crash and a failover. delivery_id is the stable id the application
-- can deduplicate on (at least once). Delivered entries are DELETEd, so
-- it holds only what is not delivered yet and the dead letters (dead_at
-- set), which an operator re-queues or drops (order-monitor deliveries).
-- No foreign key to the orders table: one would lock that table here and
-- on every write. Never a PIN. Rows arrive only through the write
-- function: empty, and unused, until actions are configured.
CREATE TABLE IF NOT EXISTS "public"."order_monitor_product_orders_outbox_v1" (
    "delivery_id" uuid PRIMARY KEY DEFAULT pg_catalog.gen_random_uuid(),
    "order_id" uuid NOT NULL,
    "outcome" text NOT NULL,
    "provider_message" text,
    "last_message" text,
    "columns" jsonb NOT NULL DEFAULT '{}',
    "recorded_at" timestamptz NOT NULL DEFAULT pg_catalog.now(),
    "due_at" timestamptz NOT NULL DEFAULT pg_catalog.now(),
    "tries" integer NOT NULL DEFAULT 0,
    "rejections" integer NOT NULL DEFAULT 0,
    "last_verdict" text,
    "last_error" text,
    "dead_at" timestamptz,
    "requeued_at" timestamptz
);

-- What the relay asks for: the entries due, not dead, oldest due first.
-- Built only when missing (CREATE INDEX ... IF NOT EXISTS would lock the
-- outbox first, queueing the daemon's writes behind this file); on a new,
-- empty table, so not CONCURRENTLY. The orders table is not touched.
DO $om$
BEGIN
    IF pg_catalog.to_regclass('"public"."order_monitor_product_orders_outbox_due_v1"') IS NULL THEN
        CREATE INDEX IF NOT EXISTS "order_monitor_product_orders_outbox_due_v1" ON "public"."order_monitor_product_orders_outbox_v1" (due_at) WHERE dead_at IS NULL;
    END IF;
END
$om$;

-- Announces an order that entered flight, or got a new provider
-- reference, with NOTIFY on the channel named by the trigger's argument.
-- The triggers call it only while the daemon holds its idle lock, that is
-- while orders arrive slowly enough that a call per write and a NOTIFY per
-- order cost nothing. A transaction that has NOTIFYed takes one lock for
-- the whole cluster at COMMIT and holds it through its WAL flush, so
-- notifying commits run one at a time (pgbench on 2 cores: a quarter of
-- the application's dispatch throughput); while the daemon is busy the
-- trigger's WHEN is false and nothing of ours runs for the row: the daemon
-- reads the orders that changed since its last read instead. Not SECURITY
-- DEFINER: it touches no table. Replacing a function takes no lock on the
-- orders table, and the triggers are replaced in this same transaction.
CREATE OR REPLACE FUNCTION "public"."order_monitor_product_orders_notify_v3"() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $om$
BEGIN
    -- Called only when the trigger's WHEN found the idle lock held by
    -- the daemon (the shared try failed): it wants a NOTIFY per order.
    -- While it is busy the try succeeds, this is never called, and the
    -- daemon finds the order by reading what changed in the table.
    -- Only an order in flight is announced ...
    IF (NEW."provider_referans" IS NOT NULL AND pg_catalog.lower(NEW."externalStatus") IN ('sent', 'processing', 'queued', 'pending', 'unknown') AND pg_catalog.lower(NEW."status") NOT IN ('approved', 'rejected')) IS NOT TRUE THEN
        RETURN NULL;
    END IF;
    -- ... once: when it enters flight, or gets a new provider reference.
    IF TG_OP = 'UPDATE' THEN
        IF OLD."provider_referans" IS NOT DISTINCT FROM NEW."provider_referans"
           AND (OLD."provider_referans" IS NOT NULL AND pg_catalog.lower(OLD."externalStatus") IN ('sent', 'processing', 'queued', 'pending', 'unknown') AND pg_catalog.lower(OLD."status") NOT IN ('approved', 'rejected')) IS TRUE THEN
            RETURN NULL;
        END IF;
    END IF;
    -- The payload is the id alone: far below NOTIFY's 8000-byte limit,
    -- and the daemon reads the committed row itself.
    PERFORM pg_catalog.pg_notify(TG_ARGV[0], NEW."id"::text);
    RETURN NULL;
END
$om$;

-- Only the triggers call it (a trigger's call needs no EXECUTE): no role
-- needs to.
REVOKE ALL ON FUNCTION "public"."order_monitor_product_orders_notify_v3"() FROM PUBLIC;

-- The daemon's only way to write: one call applies a batch of results, each
-- guarded (same reference and provider, row still in flight), skipping rows
-- another transaction holds locked (returned as 'locked', to try again),
-- and announces the finished ones on the result channel in the same
-- transaction while the cluster's NOTIFY queue is less than half full.
-- When actions deliver results to the application, it also records each
-- such result in the outbox, in the same transaction.
-- SECURITY DEFINER: it runs with the rights of its owner (install as the
-- table's owner, not as a superuser), so the daemon's role needs no UPDATE
-- on the table and cannot touch a row that is not in flight. What each
-- outcome writes is fixed here, from the settings at install time.
-- plan_cache_mode: planned for each batch, with the arrays' real lengths.
-- A generic plan, which plpgsql switches to after five calls, guesses a
-- few rows for the batch; once autovacuum has analyzed the table, that
-- guess joins the batch to itself row by row: bench/delivery.py wrote
-- 8,268 results/s that way, 23,343 with a plan per batch.
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
    SET plan_cache_mode = force_custom_plan
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
      AND o."provider_referans" IS NOT NULL AND pg_catalog.lower(o."externalStatus") IN ('sent', 'processing', 'queued', 'pending', 'unknown') AND pg_catalog.lower(o."status") NOT IN ('approved', 'rejected')
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
      AND o."provider_referans" IS NOT NULL AND pg_catalog.lower(o."externalStatus") IN ('sent', 'processing', 'queued', 'pending', 'unknown') AND pg_catalog.lower(o."status") NOT IN ('approved', 'rejected')
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
      AND o."provider_referans" IS NOT NULL AND pg_catalog.lower(o."externalStatus") IN ('sent', 'processing', 'queued', 'pending', 'unknown') AND pg_catalog.lower(o."status") NOT IN ('approved', 'rejected')
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

-- And by no other role, whatever ALTER DEFAULT PRIVILEGES or an earlier
-- GRANT gave: the owner, and the daemon's role for the write function.
DO $om$
DECLARE
    item record;
BEGIN
    FOR item IN
        SELECT p.oid::pg_catalog.regprocedure AS f, p.proname::text AS name
          FROM pg_catalog.pg_proc p
          JOIN pg_catalog.pg_namespace s ON s.oid = p.pronamespace
         WHERE s.nspname = 'public' AND p.proname::text IN ('order_monitor_product_orders_notify_v3', 'order_monitor_product_orders_write_v2')
    LOOP
        -- A function with no ACL yet is executable by PUBLIC: this makes the
        -- ACL explicit, which the loop below then reads.
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', item.f);
    END LOOP;
    -- Whatever ALTER DEFAULT PRIVILEGES or an earlier hand granted: a
    -- SECURITY DEFINER function runs with the owner's rights, so each grantee
    -- is one more role that may write orders (or the inbox) as the owner.
    FOR item IN
        SELECT DISTINCT p.oid::pg_catalog.regprocedure AS f, r.rolname
          FROM pg_catalog.pg_proc p
         CROSS JOIN LATERAL pg_catalog.aclexplode(p.proacl) AS acl
          JOIN pg_catalog.pg_roles r ON r.oid = acl.grantee
          JOIN pg_catalog.pg_namespace s ON s.oid = p.pronamespace
         WHERE s.nspname = 'public' AND p.proname::text IN ('order_monitor_product_orders_notify_v3', 'order_monitor_product_orders_write_v2')
           AND acl.grantee <> p.proowner
           AND NOT (p.proname::text = 'order_monitor_product_orders_write_v2' AND r.rolname = 'order_monitor')
    LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM %I CASCADE', item.f, item.rolname);
    END LOOP;
END
$om$;

-- The triggers: on every insert, and every update of the provider
-- reference or a status, their WHEN tries the daemon's idle lock shared,
-- without waiting, and that is all they do. The try fails while the daemon
-- holds the lock (it wants a NOTIFY: the function is called, and announces
-- the order if it entered flight or got a new reference); it succeeds while
-- the daemon does not (busy, or not running: nothing is called, and the
-- shared lock is held until this transaction ends, so the daemon cannot go
-- back to NOTIFY before it has seen this row committed). The in-flight rule
-- is in the function, not in the WHEN, because PostgreSQL prepares a WHEN
-- for every statement: the rule there cost the application up to a third
-- of its dispatch throughput (version 5). Every other update is kept out by
-- UPDATE OF. Compared first with what this file would create (on a temporary copy
-- of the columns): when they match and earlier versions' are gone, this
-- takes no lock on the table; else it takes the one lock the change needs,
-- once (SHARE ROW EXCLUSIVE to replace version 5's in place, ACCESS
-- EXCLUSIVE when an earlier version's triggers are dropped).
DO $om$
DECLARE
    insert_name constant text := 'order_monitor_insert_v3';
    update_name constant text := 'order_monitor_update_v3';
    probe_columns text;
    probe_drops text;
    differs boolean;
    drop_old boolean;
BEGIN
    SELECT pg_catalog.string_agg(CASE WHEN a.attisdropped
               THEN pg_catalog.format('order_monitor_dropped_%s integer', a.attnum)
               ELSE pg_catalog.format('%I %s%s', a.attname,
                   pg_catalog.format_type(a.atttypid, a.atttypmod),
                   CASE WHEN a.attcollation = 0 THEN ''
                   ELSE pg_catalog.format(' COLLATE %I.%I', cn.nspname, co.collname)
                   END) END, ', ' ORDER BY a.attnum),
           pg_catalog.string_agg(
               pg_catalog.format('DROP COLUMN order_monitor_dropped_%s', a.attnum), ', '
           ) FILTER (WHERE a.attisdropped)
      INTO probe_columns, probe_drops
      FROM pg_catalog.pg_attribute a
      LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation
      LEFT JOIN pg_catalog.pg_namespace cn ON cn.oid = co.collnamespace
     WHERE a.attrelid = pg_catalog.to_regclass('"public"."product_orders"') AND a.attnum > 0;
    EXECUTE pg_catalog.format('CREATE TEMPORARY TABLE "pg_temp"."order_monitor_probe" (%s)', probe_columns);
    IF probe_drops IS NOT NULL THEN
        EXECUTE pg_catalog.format('ALTER TABLE "pg_temp"."order_monitor_probe" %s', probe_drops);
    END IF;
    CREATE OR REPLACE TRIGGER "order_monitor_insert_v3"
            AFTER INSERT ON "pg_temp"."order_monitor_probe"
            FOR EACH ROW
            WHEN (NOT pg_catalog.pg_try_advisory_xact_lock_shared(6769325586509180928))
            EXECUTE FUNCTION "public"."order_monitor_product_orders_notify_v3"('order_monitor');
    CREATE OR REPLACE TRIGGER "order_monitor_update_v3"
            AFTER UPDATE OF "provider_referans", "externalStatus", "status" ON "pg_temp"."order_monitor_probe"
            FOR EACH ROW
            WHEN (NOT pg_catalog.pg_try_advisory_xact_lock_shared(6769325586509180928))
            EXECUTE FUNCTION "public"."order_monitor_product_orders_notify_v3"('order_monitor');
    WITH wanted AS (SELECT t.tgname::text AS name,
                   (t.tgtype, t.tgfoid, t.tgargs, t.tgattr, pg_catalog.regexp_replace(t.tgqual::text, ' :location -?[0-9]+', '', 'g'))::text AS shape
              FROM pg_catalog.pg_trigger t
             WHERE t.tgrelid = '"pg_temp"."order_monitor_probe"'::pg_catalog.regclass AND NOT t.tgisinternal
               AND t.tgname::text IN (insert_name, update_name)),
         present AS (SELECT t.tgname::text AS name,
                   (t.tgtype, t.tgfoid, t.tgargs, t.tgattr, pg_catalog.regexp_replace(t.tgqual::text, ' :location -?[0-9]+', '', 'g'))::text AS shape
              FROM pg_catalog.pg_trigger t
             WHERE t.tgrelid = pg_catalog.to_regclass('"public"."product_orders"') AND NOT t.tgisinternal
               AND t.tgname::text IN (insert_name, update_name))
    SELECT EXISTS (SELECT FROM wanted FULL JOIN present USING (name)
                    WHERE wanted.shape IS DISTINCT FROM present.shape)
      INTO differs;
    DROP TABLE "pg_temp"."order_monitor_probe";
    SELECT EXISTS (SELECT FROM pg_catalog.pg_trigger t
                    WHERE t.tgrelid = pg_catalog.to_regclass('"public"."product_orders"')
                      AND t.tgname::text IN ('order_monitor_insert_v1', 'order_monitor_update_v1', 'order_monitor_insert_v2', 'order_monitor_update_v2'))
      INTO drop_old;
    IF NOT differs AND NOT drop_old THEN
        RETURN;  -- nothing to change: no lock on the table at all
    END IF;
    -- The strongest lock this transaction will need, taken first and once:
    -- CREATE OR REPLACE TRIGGER wants SHARE ROW EXCLUSIVE, DROP TRIGGER
    -- ACCESS EXCLUSIVE. Asking for the weaker one and then the stronger
    -- one deadlocked with an application transaction that had done
    -- SELECT ... FOR UPDATE and then UPDATE.
    IF drop_old THEN
        LOCK TABLE "public"."product_orders" IN ACCESS EXCLUSIVE MODE;
    ELSE
        LOCK TABLE "public"."product_orders" IN SHARE ROW EXCLUSIVE MODE;
    END IF;
    CREATE OR REPLACE TRIGGER "order_monitor_insert_v3"
            AFTER INSERT ON "public"."product_orders"
            FOR EACH ROW
            WHEN (NOT pg_catalog.pg_try_advisory_xact_lock_shared(6769325586509180928))
            EXECUTE FUNCTION "public"."order_monitor_product_orders_notify_v3"('order_monitor');
    CREATE OR REPLACE TRIGGER "order_monitor_update_v3"
            AFTER UPDATE OF "provider_referans", "externalStatus", "status" ON "public"."product_orders"
            FOR EACH ROW
            WHEN (NOT pg_catalog.pg_try_advisory_xact_lock_shared(6769325586509180928))
            EXECUTE FUNCTION "public"."order_monitor_product_orders_notify_v3"('order_monitor');
    DROP TRIGGER IF EXISTS "order_monitor_insert_v1" ON "public"."product_orders";
    DROP TRIGGER IF EXISTS "order_monitor_update_v1" ON "public"."product_orders";
    DROP TRIGGER IF EXISTS "order_monitor_insert_v2" ON "public"."product_orders";
    DROP TRIGGER IF EXISTS "order_monitor_update_v2" ON "public"."product_orders";
END
$om$;

-- Versions 1 and 2's trigger functions: no trigger uses them any more.
DROP FUNCTION IF EXISTS "public"."order_monitor_product_orders_notify_v1"();

DROP FUNCTION IF EXISTS "public"."order_monitor_product_orders_notify_v2"();

-- Versions 2 to 4's UNLOGGED inbox, where their trigger put order ids
-- while the daemon was busy: nothing writes to it any more. Ids still in it
-- belong to orders that a daemon of this release also finds by reading
-- what changed in the table (upgrade the daemons first), and the sweep
-- finds any order in flight.
DROP TABLE IF EXISTS "public"."order_monitor_product_orders_inbox_v2";

-- Versions 1 and 2's write function, which returned another shape. A
-- daemon of those versions can no longer write: stop every instance
-- (standbys included) before running this file, start the new ones after.
DROP FUNCTION IF EXISTS "public"."order_monitor_product_orders_write_v1"(uuid[], text[], text[], text[], text[], text[], text[]);

COMMIT;

RESET lock_timeout;

RESET ROLE;

RESET search_path;
