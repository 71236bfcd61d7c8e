"""role.sql's DO blocks: refuse up front what psql would only warn about, strip the role's powers.

A GRANT by a role that holds no grant option on the object is not an error
in PostgreSQL: it prints "no privileges were granted" and psql exits 0. So
role.sql checks, before it changes anything, that the role running it can
grant each thing, and raises an ERROR naming what is missing.
"""

from __future__ import annotations

from psycopg import sql

from order_monitor.config import Layout
from order_monitor.schema.guards import do, table_text
from order_monitor.schema.names import Names
from order_monitor.schema.write_function import write_signature

#: Role attributes the daemon's role must not have, and the catalog column of each.
POWERS = (
    ("SUPERUSER", "rolsuper"),
    ("CREATEDB", "rolcreatedb"),
    ("CREATEROLE", "rolcreaterole"),
    ("REPLICATION", "rolreplication"),
    ("BYPASSRLS", "rolbypassrls"),
)


def check_and_create_role(layout: Layout) -> sql.Composed:
    """Raise naming what this role cannot grant; else create the daemon's role, strip its powers."""
    c = layout.columns
    n = Names(layout)
    columns = sql.SQL(", ").join(sql.Literal(x) for x in c.read())
    strip = sql.SQL("\n").join(
        sql.SQL(
            "    IF EXISTS (SELECT FROM pg_catalog.pg_roles\n"
            "                WHERE rolname = {name} AND {column}) THEN\n"
            "        ALTER ROLE {role} {attribute};\n"
            "    END IF;"
        ).format(
            name=sql.Literal(layout.role),
            column=sql.Identifier(column),
            role=n.role,
            attribute=sql.SQL("NO" + attribute),
        )
        for attribute, column in POWERS
    )
    body = sql.SQL(
        """
DECLARE
    missing text[] := '{{}}';
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = {name})
       AND NOT EXISTS (SELECT FROM pg_catalog.pg_roles
                        WHERE rolname = current_user AND (rolsuper OR rolcreaterole)) THEN
        missing := missing || 'CREATEROLE (the role ' || {name} || ' does not exist yet)';
    END IF;
    IF NOT pg_catalog.has_database_privilege(pg_catalog.current_database(),
                                             'CONNECT WITH GRANT OPTION') THEN
        missing := missing || ('CONNECT WITH GRANT OPTION on database ' || pg_catalog.current_database());
    END IF;
    IF NOT pg_catalog.has_schema_privilege({schema}, 'USAGE WITH GRANT OPTION') THEN
        missing := missing || ('USAGE WITH GRANT OPTION on schema ' || {schema});
    END IF;
    IF pg_catalog.to_regclass({table}) IS NULL THEN
        RAISE EXCEPTION 'order-monitor: table % does not exist', {table};
    END IF;
    missing := missing || ARRAY(
        SELECT 'SELECT WITH GRANT OPTION on ' || {table} || ' column ' || col
          FROM pg_catalog.unnest(ARRAY[{columns}]) AS col
         WHERE NOT pg_catalog.has_column_privilege(pg_catalog.to_regclass({table}), col,
                                                   'SELECT WITH GRANT OPTION'));
    IF pg_catalog.to_regprocedure({function}) IS NULL THEN
        RAISE EXCEPTION 'order-monitor: the write function % does not exist', {function}
            USING HINT = 'run install.sql first, as the table''s owner';
    END IF;
    IF NOT pg_catalog.has_function_privilege(pg_catalog.to_regprocedure({function}),
                                             'EXECUTE WITH GRANT OPTION') THEN
        missing := missing || ('EXECUTE WITH GRANT OPTION on ' || {function});
    END IF;
    IF pg_catalog.cardinality(missing) > 0 THEN
        RAISE EXCEPTION 'order-monitor: % cannot grant what role.sql grants; nothing was changed. Missing: %',
            current_user, pg_catalog.array_to_string(missing, '; ')
            USING HINT = 'run role.sql as the table''s owner with those grant options, or as a superuser';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = {name}) THEN
        CREATE ROLE {role} LOGIN;
    END IF;
    -- A role that existed before may have been given more than the daemon
    -- needs: take every power back (only those it has: changing SUPERUSER,
    -- REPLICATION or BYPASSRLS at all needs a superuser).
{strip}
    EXECUTE pg_catalog.format('GRANT CONNECT ON DATABASE %I TO %I',
                              pg_catalog.current_database(), {name});
END
"""  # noqa: E501 (plpgsql a DBA reads: long messages stay on one line)
    ).format(
        name=sql.Literal(layout.role),
        role=n.role,
        schema=sql.Literal(layout.schema),
        table=table_text(layout),
        columns=columns,
        function=sql.Literal(
            sql.SQL("{}({})").format(n.write_function, write_signature()).as_string(None)
        ),
        strip=strip,
    )
    return do(body)


def check_outbox_grant(layout: Layout) -> sql.Composed:
    """Raise when this role cannot grant what role.sql grants on the outbox (or it is missing)."""
    return _check_table_grant(
        "the outbox",
        Names(layout).outbox,
        ("SELECT", "DELETE", "UPDATE"),
        since=" (schema version 4)",
    )


def _check_table_grant(
    what: str, table: sql.Identifier, privileges: tuple[str, ...], *, since: str
) -> sql.Composed:
    """Raise when *table* is missing, or this role cannot grant each of *privileges* on it."""
    name = sql.Literal(table.as_string(None))
    lacking = sql.SQL("\n       OR ").join(
        sql.SQL(
            "NOT pg_catalog.has_table_privilege(pg_catalog.to_regclass({name}), {privilege})"
        ).format(name=name, privilege=sql.Literal(f"{privilege} WITH GRANT OPTION"))
        for privilege in privileges
    )
    listed = ", ".join(privileges[:-1]) + " and " + privileges[-1]
    body = sql.SQL(
        """
BEGIN
    IF pg_catalog.to_regclass({name}) IS NULL THEN
        RAISE EXCEPTION 'order-monitor: {what} % does not exist', {name}
            USING HINT = 'run install.sql{since} first, as the table''s owner';
    END IF;
    IF {lacking} THEN
        RAISE EXCEPTION 'order-monitor: % cannot grant {listed} on %; nothing was changed', current_user, {name}
            USING HINT = 'run role.sql as the table''s owner, or as a superuser';
    END IF;
END
"""  # noqa: E501 (plpgsql a DBA reads: long messages stay on one line)
    ).format(
        name=name,
        lacking=lacking,
        what=sql.SQL(what),
        since=sql.SQL(since),
        listed=sql.SQL(listed),
    )
    return do(body)
