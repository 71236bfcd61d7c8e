"""Service plumbing the daemon plugs in: sd_notify, the HTTP probes, the leader lock.

Each module stands alone and is usable (and tested) without the daemon.
"""
