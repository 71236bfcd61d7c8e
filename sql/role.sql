-- order-monitor: a least-privilege login role for the daemon
--
-- The daemon reads some columns of "public"."product_orders" and writes results only through
-- the write function install.sql creates; it has no UPDATE, INSERT or DELETE
-- on the table, and never sees prices, user data or PINs. It takes order ids
-- from the inbox install.sql creates (SELECT and DELETE there, nothing else).
-- LISTEN/NOTIFY and advisory locks need no grant.
-- Apply with psql as a role that may create roles, after install.sql (the
-- grants name the column and the function it adds); running it again is
-- harmless, and brings an older release's grants down to these:
--     psql "$DSN" -v ON_ERROR_STOP=1 -f sql/role.sql
-- then give the role a password in psql with: \password "order_monitor"

-- A login role for the daemon, created once. Give it a password or a
-- certificate yourself (ALTER ROLE ... PASSWORD), outside this file.
DO $om$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'order_monitor') THEN
        CREATE ROLE "order_monitor" LOGIN;
    END IF;
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), 'order_monitor');
END
$om$;

GRANT USAGE ON SCHEMA "public" TO "order_monitor";

-- Start from nothing on the table (this also takes back what an older
-- release granted: UPDATE on columns, SELECT on the PIN).
REVOKE ALL ON TABLE "public"."product_orders" FROM "order_monitor";

-- Read: only the columns the daemon looks at. Not the PIN, the provider's
-- message or the duration: it writes those, and never needs to see them.
GRANT SELECT ("id", "status", "externalStatus", "provider_referans", "providerId", "externalOrderId", "lastMessage", "sentAt", "lastSyncAt", "completedAt", "createdAt") ON TABLE "public"."product_orders" TO "order_monitor";

-- Write: only through the write function (install.sql), which writes
-- nothing but results into rows still in flight. No UPDATE, INSERT or
-- DELETE on the table itself.
GRANT EXECUTE ON FUNCTION "public"."order_monitor_product_orders_write_v2"(uuid[], text[], text[], text[], text[], text[], text[]) TO "order_monitor";

-- The inbox (install.sql): the daemon takes the order ids the trigger left
-- there while it was busy. DELETE needs SELECT to find the rows it takes.
GRANT SELECT, DELETE ON TABLE "public"."order_monitor_product_orders_inbox_v2" TO "order_monitor";
