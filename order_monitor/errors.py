"""The errors order-monitor raises on purpose.

Each message is written for the person who has to act on it (a sysadmin or a
DBA), names the setting or object at fault and says what is expected. None of
them carries a secret.
"""

from __future__ import annotations

import os


class OrderMonitorError(Exception):
    """Base of every error raised on purpose by order-monitor."""

    #: Process exit status when this error ends the program.
    exit_code: int = 1


class ConfigError(OrderMonitorError):
    """A setting is missing or invalid. Restarting will not help."""

    # EX_CONFIG: the systemd unit sets RestartPreventExitStatus=78 so a bad
    # configuration does not turn into a restart loop.
    exit_code = os.EX_CONFIG if hasattr(os, "EX_CONFIG") else 78


class SchemaError(OrderMonitorError):
    """The database lacks something order-monitor needs (table, column, trigger)."""

    exit_code = os.EX_CONFIG if hasattr(os, "EX_CONFIG") else 78


class ProviderError(OrderMonitorError):
    """A provider could not be asked, or answered with something unusable.

    Never an answer about an order: the order stays pending and is checked
    again later.
    """


class ProviderAuthError(ProviderError):
    """The provider refused our credentials or our IP address (configuration)."""
