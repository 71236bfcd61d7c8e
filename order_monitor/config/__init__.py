"""Settings: from the environment, a .env file and the providers file.

Everything is read and validated once, at start-up (and again on SIGHUP), into
frozen objects. An invalid value raises one :class:`ConfigError` that names
the variable or key, shows the value (unless it is a secret) and says what is
expected.

* ``settings`` — the frozen objects themselves;
* ``environment`` — ORDER_MONITOR_* values, typed, from the environment and
  the .env file;
* ``secrets`` — the DSN, systemd credentials, the providers file's secret specs;
* ``providers_file`` — the providers file;
* ``actions`` — its ``[actions.NAME]`` tables: delivering results to the application;
* ``loading`` — :func:`load_settings`, which puts them together.
"""

from order_monitor.config.actions import (
    action_columns,
    delivered_columns,
    delivered_outcomes,
    parse_actions,
)
from order_monitor.config.environment import (
    ENV_FILE_VARIABLE,
    PREFIX,
    TEST_DSN_VARIABLE,
    TEST_PREFIX,
    Env,
    has_control_characters,
    load_environment,
    parse_duration,
    unknown_variables,
)
from order_monitor.config.loading import (
    DEFAULT_PROVIDERS_FILE,
    load_providers_file,
    load_settings,
)
from order_monitor.config.providers_file import load_providers, parse_providers
from order_monitor.config.secrets import read_credential
from order_monitor.config.settings import (
    DELIVERABLE_OUTCOMES,
    WEBHOOK_SECRET,
    ActionConfig,
    Columns,
    Layout,
    OutcomeWrites,
    ProviderConfig,
    ProviderLimits,
    Settings,
    UnknownVariable,
    reloaded,
)

__all__ = [
    "DEFAULT_PROVIDERS_FILE",
    "DELIVERABLE_OUTCOMES",
    "ENV_FILE_VARIABLE",
    "PREFIX",
    "TEST_DSN_VARIABLE",
    "TEST_PREFIX",
    "WEBHOOK_SECRET",
    "ActionConfig",
    "Columns",
    "Env",
    "Layout",
    "OutcomeWrites",
    "ProviderConfig",
    "ProviderLimits",
    "Settings",
    "UnknownVariable",
    "action_columns",
    "delivered_columns",
    "delivered_outcomes",
    "has_control_characters",
    "load_environment",
    "load_providers",
    "load_providers_file",
    "load_settings",
    "parse_actions",
    "parse_duration",
    "parse_providers",
    "read_credential",
    "reloaded",
    "unknown_variables",
]
