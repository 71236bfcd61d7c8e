"""The parts of bench/trigger.py: setup, databases, hearing, pgbench, runs, report."""
