"""The engine: how an order goes from its dispatch to its last written result.

Read in the order an order travels:

* ``listener`` — LISTENs on the channel our trigger (``sql/install.sql``)
  NOTIFYs while the shop is quiet, and turns each payload into an order id;
* ``handoff`` — the other way in: while orders arrive fast the trigger writes
  them to an inbox table instead, and this empties it (and decides when to
  switch between the two);
* ``inbox`` — every announced id waits here until one indexed query confirms
  it is really in flight, then goes on the schedule;
* ``scheduler`` — the in-memory heap of when each order is due next;
* ``checker`` — takes what is due, re-reads it, asks its provider (through
  ``order_monitor.providers``) and hands each outcome on;
* ``writer`` — writes outcomes in batches with the guarded write function,
  and gives each order back to the schedule.

Beside the flow: ``policy`` (when to check next: the one backoff policy)
and ``decisions`` (what an outcome means for the row and the schedule), both
pure, without I/O or a clock; and ``sweep``, the safety net: a periodic read
of every order in flight that schedules whatever the notifications missed,
where its policy says it stands.

``assembly`` builds these pieces for one term as leader, wires them together
and runs them; ``order_monitor.daemon`` is what is around it.
"""
