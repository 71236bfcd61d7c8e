"""Service plumbing the daemon plugs in: sd_notify, the HTTP probes, the leader lock,
and the housekeeping loop that feeds the watchdog.

Each module stands alone and is usable (and tested) without the daemon.
"""
