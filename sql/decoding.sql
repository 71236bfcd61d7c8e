-- order-monitor: capture dispatched orders from the WAL (opt-in, schema version 6)
--
-- For a server with wal_level = logical. Instead of a trigger, the daemon
-- (ORDER_MONITOR_CAPTURE=decoding) reads the orders of "public"."product_orders" from a
-- logical replication slot: the application's commits do no work of ours.
-- What it does:
--   * creates the slot (pgoutput), named after the database and the table;
--   * a NOLOGIN role "order_monitor"_decoder with REPLICATION, which owns the four
--     functions the daemon calls to read the slot, confirm what it read, see
--     the slot's state, and recreate it once invalidated (only then): the
--     daemon's role "order_monitor" keeps no REPLICATION, and so cannot decode any
--     other table;
--   * a publication of "public"."product_orders"'s inserts and updates, with the columns
--     the in-flight rule reads and the id only;
--   * drops our triggers (ACCESS EXCLUSIVE on the table, once, at most 3 s).
-- A slot nobody reads keeps WAL until the disk is full: set
-- max_slot_wal_keep_size (doctor requires it); the daemon recreates a slot
-- invalidated for falling behind, then sweeps.
-- Apply with psql as a superuser, after install.sql and role.sql, NOT inside
-- a transaction (the slot is created in a transaction of its own):
--     psql "$DSN" -v ON_ERROR_STOP=1 -f sql/decoding.sql
-- Running it again is harmless. Back to the trigger: run install.sql (it puts
-- the triggers back), then uninstall's decoding part by hand, or all of
-- uninstall.sql as a superuser to retire order-monitor.

-- Names resolve in pg_catalog first (see install.sql).
SET search_path = pg_catalog, pg_temp;

-- See install.sql: a step that waits longer for a lock stops, changing nothing.
SET lock_timeout = '3s';

-- Stops here unless the server decodes its WAL and the objects this file
-- builds on are in place.
DO $om$
BEGIN
    IF pg_catalog.current_setting('wal_level') <> 'logical' THEN
        RAISE EXCEPTION 'order-monitor: wal_level is %, not logical: nothing was changed', pg_catalog.current_setting('wal_level')
            USING HINT = 'ALTER SYSTEM SET wal_level = logical (a managed service: its parameter group), restart the server, then run this file again';
    END IF;
    IF pg_catalog.to_regprocedure('"public"."order_monitor_product_orders_write_v2"(uuid[], text[], text[], text[], text[], text[], text[])') IS NULL THEN
        RAISE EXCEPTION 'order-monitor: install.sql has not run here: nothing was changed'
            USING HINT = 'run install.sql, then role.sql, then this file';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'order_monitor') THEN
        RAISE EXCEPTION 'order-monitor: the daemon''s role % does not exist: nothing was changed', 'order_monitor'
            USING HINT = 'run role.sql first';
    END IF;
END
$om$;

-- The slot, first and in a transaction of its own (PostgreSQL creates a
-- logical slot only in a transaction that has written nothing). It waits
-- for the transactions running now to end, to start from a consistent
-- point. Its name is derived from the database and the table: slot names
-- are per cluster. From here on the server keeps the WAL the slot has not
-- confirmed: set max_slot_wal_keep_size (doctor requires it), or a slot
-- nobody reads fills the disk.
DO $om$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_replication_slots WHERE slot_name = 'order_monitor_' || pg_catalog.left(pg_catalog.md5(pg_catalog.current_database() || ':' || '"public"."product_orders"'), 16)) THEN
        PERFORM pg_catalog.pg_create_logical_replication_slot('order_monitor_' || pg_catalog.left(pg_catalog.md5(pg_catalog.current_database() || ':' || '"public"."product_orders"'), 16), 'pgoutput');
    END IF;
END
$om$;

BEGIN;

-- A role that may read slots (REPLICATION) and cannot log in. It owns the
-- four functions below and nothing else; the daemon's role is not it and
-- is not a member of it.
DO $om$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'order_monitor_decoder') THEN
        CREATE ROLE "order_monitor_decoder" NOLOGIN REPLICATION;
    END IF;
    ALTER ROLE "order_monitor_decoder" NOLOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS;
END
$om$;

-- The publication: the orders table's inserts and updates, with only the
-- columns the in-flight rule reads and the id (a column list needs
-- PostgreSQL 15). Deletes and truncates are not published. Created when
-- missing; a different one of the same name is reported by doctor.
DO $om$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_publication WHERE pubname = 'order_monitor_product_orders_pub_v1') THEN
        CREATE PUBLICATION "order_monitor_product_orders_pub_v1" FOR TABLE "public"."product_orders" ("id", "provider_referans", "externalStatus", "status")
            WITH (publish = 'insert, update');
    END IF;
END
$om$;

-- The slot's changes, as the publication carries them: a peek (nothing is
-- consumed), whole transactions, at most upto changes, then the position
-- read up to.
CREATE OR REPLACE FUNCTION "public"."order_monitor_product_orders_changes_v1"(upto integer) RETURNS TABLE (lsn pg_catalog.pg_lsn, data pg_catalog.bytea)
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $om$
DECLARE
    flushed pg_catalog.pg_lsn := pg_catalog.pg_current_wal_flush_lsn();
BEGIN
    -- Peek, never get: the daemon advances the slot itself, once the orders
    -- are scheduled. Whole transactions only, at most upto changes, up to
    -- the WAL flushed now; then one row (that position, no data): when fewer
    -- than upto rows came, everything up to it was read, and the daemon may
    -- confirm it even when no order changed. Else a slot on a quiet table
    -- would hold back every other table's WAL.
    RETURN QUERY
        SELECT c.lsn, c.data
          FROM pg_catalog.pg_logical_slot_peek_binary_changes(
                   'order_monitor_' || pg_catalog.left(pg_catalog.md5(pg_catalog.current_database() || ':' || '"public"."product_orders"'), 16), flushed, upto,
                   'proto_version', '1', 'publication_names', pg_catalog.quote_ident('order_monitor_product_orders_pub_v1')) AS c;
    RETURN QUERY SELECT flushed, NULL::pg_catalog.bytea;
END
$om$;

-- Confirms the changes up to upto: the server may then recycle that WAL.
CREATE OR REPLACE FUNCTION "public"."order_monitor_product_orders_advance_v1"(upto pg_catalog.pg_lsn) RETURNS pg_catalog.pg_lsn
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $om$
BEGIN
    RETURN (SELECT a.end_lsn FROM pg_catalog.pg_replication_slot_advance('order_monitor_' || pg_catalog.left(pg_catalog.md5(pg_catalog.current_database() || ':' || '"public"."product_orders"'), 16), upto) AS a);
END
$om$;

-- The slot's state: its WAL status (lost: invalidated), how many bytes of
-- WAL it holds back, how many more it may before it is invalidated.
CREATE OR REPLACE FUNCTION "public"."order_monitor_product_orders_slot_v1"() RETURNS TABLE (slot_name text, wal_status text, lag_bytes bigint, safe_wal_size bigint)
    LANGUAGE plpgsql
    SECURITY INVOKER
    SET search_path = pg_catalog, pg_temp
AS $om$
BEGIN
    RETURN QUERY
        SELECT s.slot_name::text, s.wal_status,
               pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(),
                                          s.confirmed_flush_lsn)::bigint,
               s.safe_wal_size
          FROM pg_catalog.pg_replication_slots s
         WHERE s.slot_name = 'order_monitor_' || pg_catalog.left(pg_catalog.md5(pg_catalog.current_database() || ':' || '"public"."product_orders"'), 16);
END
$om$;

-- A new slot for an invalidated (or dropped) one; refuses while the slot
-- is healthy, so the daemon cannot skip changes with it. The daemon sweeps
-- after it: orders dispatched meanwhile are found there.
CREATE OR REPLACE FUNCTION "public"."order_monitor_product_orders_recreate_v1"() RETURNS pg_catalog.pg_lsn
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $om$
DECLARE
    status text;
BEGIN
    SELECT s.wal_status INTO status FROM pg_catalog.pg_replication_slots s
     WHERE s.slot_name = 'order_monitor_' || pg_catalog.left(pg_catalog.md5(pg_catalog.current_database() || ':' || '"public"."product_orders"'), 16);
    IF FOUND AND status IS DISTINCT FROM 'lost' THEN
        RAISE EXCEPTION 'order-monitor: the slot % is %, not lost: it is not recreated', 'order_monitor_' || pg_catalog.left(pg_catalog.md5(pg_catalog.current_database() || ':' || '"public"."product_orders"'), 16), status
            USING HINT = 'only a slot invalidated for falling behind (or dropped) is recreated';
    END IF;
    IF FOUND THEN
        PERFORM pg_catalog.pg_drop_replication_slot('order_monitor_' || pg_catalog.left(pg_catalog.md5(pg_catalog.current_database() || ':' || '"public"."product_orders"'), 16));
    END IF;
    RETURN (SELECT r.lsn FROM pg_catalog.pg_create_logical_replication_slot('order_monitor_' || pg_catalog.left(pg_catalog.md5(pg_catalog.current_database() || ':' || '"public"."product_orders"'), 16), 'pgoutput') AS r);
END
$om$;

ALTER FUNCTION "public"."order_monitor_product_orders_changes_v1"(integer) OWNER TO "order_monitor_decoder";

REVOKE ALL ON FUNCTION "public"."order_monitor_product_orders_changes_v1"(integer) FROM PUBLIC;

GRANT EXECUTE ON FUNCTION "public"."order_monitor_product_orders_changes_v1"(integer) TO "order_monitor";

ALTER FUNCTION "public"."order_monitor_product_orders_advance_v1"(pg_catalog.pg_lsn) OWNER TO "order_monitor_decoder";

REVOKE ALL ON FUNCTION "public"."order_monitor_product_orders_advance_v1"(pg_catalog.pg_lsn) FROM PUBLIC;

GRANT EXECUTE ON FUNCTION "public"."order_monitor_product_orders_advance_v1"(pg_catalog.pg_lsn) TO "order_monitor";

ALTER FUNCTION "public"."order_monitor_product_orders_slot_v1"() OWNER TO "order_monitor_decoder";

REVOKE ALL ON FUNCTION "public"."order_monitor_product_orders_slot_v1"() FROM PUBLIC;

GRANT EXECUTE ON FUNCTION "public"."order_monitor_product_orders_slot_v1"() TO "order_monitor";

ALTER FUNCTION "public"."order_monitor_product_orders_recreate_v1"() OWNER TO "order_monitor_decoder";

REVOKE ALL ON FUNCTION "public"."order_monitor_product_orders_recreate_v1"() FROM PUBLIC;

GRANT EXECUTE ON FUNCTION "public"."order_monitor_product_orders_recreate_v1"() TO "order_monitor";

-- And by no other role, whatever ALTER DEFAULT PRIVILEGES gave: each
-- grantee of a SECURITY DEFINER function here could read or confirm the
-- slot with REPLICATION's rights.
DO $om$
DECLARE
    item record;
BEGIN
    FOR item IN
        SELECT DISTINCT p.oid::pg_catalog.regprocedure AS f, r.rolname
          FROM pg_catalog.pg_proc p
         CROSS JOIN LATERAL pg_catalog.aclexplode(p.proacl) AS acl
          JOIN pg_catalog.pg_roles r ON r.oid = acl.grantee
         WHERE p.oid IN (pg_catalog.to_regprocedure('"public"."order_monitor_product_orders_changes_v1"(integer)'), pg_catalog.to_regprocedure('"public"."order_monitor_product_orders_advance_v1"(pg_catalog.pg_lsn)'), pg_catalog.to_regprocedure('"public"."order_monitor_product_orders_slot_v1"()'), pg_catalog.to_regprocedure('"public"."order_monitor_product_orders_recreate_v1"()'))
           AND acl.grantee <> p.proowner AND r.rolname <> 'order_monitor'
    LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM %I CASCADE', item.f, item.rolname);
    END LOOP;
END
$om$;

-- Our triggers go: from here on the application's commits do no work of
-- ours. (install.sql run again puts them back; doctor says so.)
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

COMMIT;

RESET lock_timeout;

RESET search_path;
