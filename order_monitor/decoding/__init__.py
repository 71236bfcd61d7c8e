"""Capture of dispatched orders from the WAL: issue #21's opt-in mode (logical decoding)."""
