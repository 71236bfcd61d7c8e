-- order-monitor: a least-privilege login role for the daemon
--
-- The daemon needs to read some columns of "public"."product_orders" and write a few; it
-- never inserts or deletes rows, and never touches prices or user data.
-- LISTEN/NOTIFY and advisory locks need no grant.
-- Apply with psql as a role that may create roles, after install.sql (the
-- grants name the provider reference column it adds):
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

-- Read: only the columns the daemon looks at.
GRANT SELECT ("id", "status", "externalStatus", "provider_referans", "providerId", "externalOrderId", "pinCode", "providerMessage", "lastMessage", "sentAt", "lastSyncAt", "completedAt", "durationMs", "createdAt") ON TABLE "public"."product_orders" TO "order_monitor";

-- Write: only the columns an outcome sets. No INSERT, no DELETE, no other
-- column (prices, user, notes are out of reach);
-- status only if ORDER_MONITOR_DONE_STATUS/FAILED_STATUS is configured.
GRANT UPDATE ("externalStatus", "pinCode", "providerMessage", "lastMessage", "lastSyncAt", "completedAt", "durationMs") ON TABLE "public"."product_orders" TO "order_monitor";
