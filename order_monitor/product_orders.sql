-- The orders table of the application that order-monitor serves by default,
-- as its ORM created it (columns the daemon does not touch are kept, since
-- real rows carry them). Used by tests, the benchmark and the demo.
-- Copied from the application's reference DDL, less its
-- `CREATE EXTENSION pgcrypto`: gen_random_uuid() is built in since
-- PostgreSQL 13, and the embedded server ships no contrib extensions.

CREATE TABLE IF NOT EXISTS product_orders (
    id                      uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    "tenantId"              uuid,
    "orderNo"               integer,
    status                  varchar(50)  NOT NULL DEFAULT 'pending',
    "userId"                uuid,
    "productId"             uuid,
    "packageId"             uuid,
    quantity                integer      NOT NULL DEFAULT 1,
    "sellPriceCurrency"     varchar(10)  NOT NULL DEFAULT 'USD',
    "sellPriceAmount"       numeric(12,2) NOT NULL DEFAULT 0,
    price                   numeric(12,2) NOT NULL DEFAULT 0,
    "createdAt"             timestamptz  NOT NULL DEFAULT now(),
    "userIdentifier"        varchar(255),
    "extraField"            varchar(255),
    "providerId"            varchar(255),
    "externalOrderId"       varchar(255),
    "providerMessage"       text,
    "lastMessage"           varchar(250),
    "manualNote"            text,
    notes                   jsonb,
    "pinCode"               varchar(120),
    "externalStatus"        varchar(30)  NOT NULL DEFAULT 'not_sent',
    "sentAt"                timestamptz,
    "completedAt"           timestamptz,
    "durationMs"            integer,
    "lastSyncAt"            timestamptz,
    "fxLocked"              boolean      NOT NULL DEFAULT false,
    "approvedAt"            timestamptz,
    "notesCount"            integer      NOT NULL DEFAULT 0,
    cost_usd_at_order       numeric(12,4),
    sell_usd_at_order       numeric(12,4),
    profit_usd_at_order     numeric(12,4)
);
CREATE INDEX IF NOT EXISTS product_orders_tenant_idx ON product_orders ("tenantId");
-- provider_referans is NOT here: it is what sql/install.sql adds
-- (ADD COLUMN IF NOT EXISTS), exactly as on the real database.
