-- order-monitor: a least-privilege login role for the daemon
--
-- The daemon reads some columns of "public"."product_orders" and writes results only through
-- the write function install.sql creates; it has no UPDATE, INSERT or DELETE
-- on the table, and never sees prices, user data or PINs. It reads and
-- settles the outbox install.sql creates (no INSERT there).
-- LISTEN/NOTIFY and advisory locks need no grant.
-- Apply with psql as a role that may create roles and grant all of this
-- (a superuser, or the table's owner with CREATEROLE), after install.sql
-- (the grants name the column and the function it adds). It is one
-- transaction, and stops with an ERROR, changing nothing, when the role
-- running it cannot grant something. It takes back any power an existing
-- role had (SUPERUSER, CREATEDB, CREATEROLE, REPLICATION, BYPASSRLS; it keeps
-- LOGIN). Running it again is harmless, and brings an older release's grants
-- down to these:
--     psql "$DSN" -v ON_ERROR_STOP=1 -f sql/role.sql
-- then give the role a password in psql with: \password "order_monitor"

-- Names resolve in pg_catalog first (see install.sql).
SET search_path = pg_catalog, pg_temp;

-- One transaction: a daemon working while this runs sees the grants as
-- they were or as they are after, never the moment between the REVOKE
-- and the GRANTs below (that gave it "permission denied").
BEGIN;

-- First, whether this role can grant all of it: a GRANT without the
-- grant option is only a WARNING ("no privileges were granted") and psql
-- would exit 0. Then a login role for the daemon, created once, with
-- every power an older role may have been given taken back (it keeps
-- LOGIN). Give it a password or a certificate yourself (ALTER ROLE ...
-- PASSWORD), outside this file.
DO $om$
DECLARE
    missing text[] := '{}';
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'order_monitor')
       AND NOT EXISTS (SELECT FROM pg_catalog.pg_roles
                        WHERE rolname = current_user AND (rolsuper OR rolcreaterole)) THEN
        missing := missing || 'CREATEROLE (the role ' || 'order_monitor' || ' does not exist yet)';
    END IF;
    IF NOT pg_catalog.has_database_privilege(pg_catalog.current_database(),
                                             'CONNECT WITH GRANT OPTION') THEN
        missing := missing || ('CONNECT WITH GRANT OPTION on database ' || pg_catalog.current_database());
    END IF;
    IF NOT pg_catalog.has_schema_privilege('public', 'USAGE WITH GRANT OPTION') THEN
        missing := missing || ('USAGE WITH GRANT OPTION on schema ' || 'public');
    END IF;
    IF pg_catalog.to_regclass('"public"."product_orders"') IS NULL THEN
        RAISE EXCEPTION 'order-monitor: table % does not exist', '"public"."product_orders"';
    END IF;
    missing := missing || ARRAY(
        SELECT 'SELECT WITH GRANT OPTION on ' || '"public"."product_orders"' || ' column ' || col
          FROM pg_catalog.unnest(ARRAY['id', 'status', 'externalStatus', 'provider_referans', 'providerId', 'externalOrderId', 'lastMessage', 'sentAt', 'lastSyncAt', 'completedAt', 'createdAt']) AS col
         WHERE NOT pg_catalog.has_column_privilege(pg_catalog.to_regclass('"public"."product_orders"'), col,
                                                   'SELECT WITH GRANT OPTION'));
    IF pg_catalog.to_regprocedure('"public"."order_monitor_product_orders_write_v2"(uuid[], text[], text[], text[], text[], text[], text[])') IS NULL THEN
        RAISE EXCEPTION 'order-monitor: the write function % does not exist', '"public"."order_monitor_product_orders_write_v2"(uuid[], text[], text[], text[], text[], text[], text[])'
            USING HINT = 'run install.sql first, as the table''s owner';
    END IF;
    IF NOT pg_catalog.has_function_privilege(pg_catalog.to_regprocedure('"public"."order_monitor_product_orders_write_v2"(uuid[], text[], text[], text[], text[], text[], text[])'),
                                             'EXECUTE WITH GRANT OPTION') THEN
        missing := missing || ('EXECUTE WITH GRANT OPTION on ' || '"public"."order_monitor_product_orders_write_v2"(uuid[], text[], text[], text[], text[], text[], text[])');
    END IF;
    IF pg_catalog.cardinality(missing) > 0 THEN
        RAISE EXCEPTION 'order-monitor: % cannot grant what role.sql grants; nothing was changed. Missing: %',
            current_user, pg_catalog.array_to_string(missing, '; ')
            USING HINT = 'run role.sql as the table''s owner with those grant options, or as a superuser';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'order_monitor') THEN
        CREATE ROLE "order_monitor" LOGIN;
    END IF;
    -- A role that existed before may have been given more than the daemon
    -- needs: take every power back (only those it has: changing SUPERUSER,
    -- REPLICATION or BYPASSRLS at all needs a superuser).
    IF EXISTS (SELECT FROM pg_catalog.pg_roles
                WHERE rolname = 'order_monitor' AND "rolsuper") THEN
        ALTER ROLE "order_monitor" NOSUPERUSER;
    END IF;
    IF EXISTS (SELECT FROM pg_catalog.pg_roles
                WHERE rolname = 'order_monitor' AND "rolcreatedb") THEN
        ALTER ROLE "order_monitor" NOCREATEDB;
    END IF;
    IF EXISTS (SELECT FROM pg_catalog.pg_roles
                WHERE rolname = 'order_monitor' AND "rolcreaterole") THEN
        ALTER ROLE "order_monitor" NOCREATEROLE;
    END IF;
    IF EXISTS (SELECT FROM pg_catalog.pg_roles
                WHERE rolname = 'order_monitor' AND "rolreplication") THEN
        ALTER ROLE "order_monitor" NOREPLICATION;
    END IF;
    IF EXISTS (SELECT FROM pg_catalog.pg_roles
                WHERE rolname = 'order_monitor' AND "rolbypassrls") THEN
        ALTER ROLE "order_monitor" NOBYPASSRLS;
    END IF;
    EXECUTE pg_catalog.format('GRANT CONNECT ON DATABASE %I TO %I',
                              pg_catalog.current_database(), 'order_monitor');
END
$om$;

GRANT USAGE ON SCHEMA "public" TO "order_monitor";

-- Start from nothing on the table (this also takes back what an older
-- release granted: UPDATE on columns, SELECT on the PIN).
REVOKE ALL ON TABLE "public"."product_orders" FROM "order_monitor";

-- Read: only the columns the daemon looks at. Not the PIN, the provider's
-- message or the duration: it writes those, and never needs to see them.
-- And xmin, the id of the transaction that wrote a row: while the daemon is
-- busy the trigger announces nothing, and the daemon reads the orders in
-- flight written since its last read by comparing it.
GRANT SELECT ("id", "status", "externalStatus", "provider_referans", "providerId", "externalOrderId", "lastMessage", "sentAt", "lastSyncAt", "completedAt", "createdAt", xmin) ON TABLE "public"."product_orders" TO "order_monitor";

-- Write: only through the write function (install.sql), which writes
-- nothing but results into rows still in flight. No UPDATE, INSERT or
-- DELETE on the table itself.
GRANT EXECUTE ON FUNCTION "public"."order_monitor_product_orders_write_v2"(uuid[], text[], text[], text[], text[], text[], text[]) TO "order_monitor";

-- The outbox (install.sql): the daemon reads the entries due, DELETEs the
-- delivered ones and, on a failed attempt, updates only its bookkeeping
-- (when to try again, how often it tried, why it failed, a dead letter's
-- mark). No INSERT: only the write function records a delivery, in the
-- transaction that writes the result, so the daemon's role cannot ask the
-- application to approve or refund an order whose result was not written.
-- First, whether this role can grant that (else an ERROR, nothing changed).
DO $om$
BEGIN
    IF pg_catalog.to_regclass('"public"."order_monitor_product_orders_outbox_v1"') IS NULL THEN
        RAISE EXCEPTION 'order-monitor: the outbox % does not exist', '"public"."order_monitor_product_orders_outbox_v1"'
            USING HINT = 'run install.sql (schema version 4) first, as the table''s owner';
    END IF;
    IF NOT pg_catalog.has_table_privilege(pg_catalog.to_regclass('"public"."order_monitor_product_orders_outbox_v1"'), 'SELECT WITH GRANT OPTION')
       OR NOT pg_catalog.has_table_privilege(pg_catalog.to_regclass('"public"."order_monitor_product_orders_outbox_v1"'), 'DELETE WITH GRANT OPTION')
       OR NOT pg_catalog.has_table_privilege(pg_catalog.to_regclass('"public"."order_monitor_product_orders_outbox_v1"'), 'UPDATE WITH GRANT OPTION') THEN
        RAISE EXCEPTION 'order-monitor: % cannot grant SELECT, DELETE and UPDATE on %; nothing was changed', current_user, '"public"."order_monitor_product_orders_outbox_v1"'
            USING HINT = 'run role.sql as the table''s owner, or as a superuser';
    END IF;
END
$om$;

-- Start from nothing on the outbox (takes back what was granted by hand).
REVOKE ALL ON TABLE "public"."order_monitor_product_orders_outbox_v1" FROM "order_monitor";

GRANT SELECT, DELETE ON TABLE "public"."order_monitor_product_orders_outbox_v1" TO "order_monitor";

GRANT UPDATE ("due_at", "tries", "rejections", "last_verdict", "last_error", "dead_at", "requeued_at") ON TABLE "public"."order_monitor_product_orders_outbox_v1" TO "order_monitor";

COMMIT;

RESET search_path;
