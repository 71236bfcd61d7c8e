"""order-monitor: follows dispatched orders at their providers until they end."""

__version__ = "0.6.1"
