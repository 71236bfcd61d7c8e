"""The operator page: what is in flight, what is stuck, which provider is down.

A read-only HTML page served by the daemon's HTTP server (off unless
``ORDER_MONITOR_HTTP_LISTEN`` is set), for a shop without Prometheus or
Grafana and for the on-call engineer with a phone.

* ``activity`` — checks and outcomes per provider over the last hour (pure);
* ``ledger`` — the orders that gave up lately, so no refresh scans the table (pure);
* ``cache`` — one reading shared by every viewer per refresh interval;
* ``reading`` — the page's SQL: one statement per refresh, one per order looked up;
* ``source`` — the daemon's in-memory state, as plain values;
* ``view`` — what the page shows (pure dataclasses and builders);
* ``render`` — Jinja2 templates, autoescaped, with visible escapes for invisible text;
* ``server`` — the routes, access rules and security headers.
"""
