"""[actions.NAME] in the providers file: the reference configuration, every rule's error, no secret in any message."""

from __future__ import annotations

import base64
import copy
import math
import tomllib
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as settings_
from hypothesis import strategies as st

from order_monitor.config import (
    DELIVERABLE_OUTCOMES,
    WEBHOOK_SECRET,
    ActionConfig,
    ProviderLimits,
    load_providers,
    load_settings,
    parse_actions,
    parse_providers,
    reloaded,
)
from order_monitor.config.actions import KEYS
from order_monitor.errors import ConfigError
from order_monitor.redaction import Secret
from tests.config.helpers import write_providers

TOKEN = 'p@ss:w/rd?&%"'
SIGNING_KEY = "whsec_" + base64.b64encode(bytes(range(32))).decode()

REFERENCE = """
[actions.approve]
kind = "http"
outcomes = ["done"]
url = "https://shop.example.com/api/admin/orders/bulk/approve"
confirm_status = "approved"
errors_path = "errors"
batch_size = 100
max_age = "3d"
attempts = 5
[actions.approve.headers]
Authorization = "Bearer {secret:token}"
X-Tenant-Id = "{column:tenantId}"
Idempotency-Key = "{request_id}"
[actions.approve.body]
ids = "{ids}"
note = "{message}"
[actions.approve.success]
ok = true
[actions.approve.secrets]
token = { credential = "shop-admin-token" }
[actions.approve.limits]
concurrency = 2
rate = 5

[actions.reject]
kind = "http"
outcomes = ["failed"]
url = "https://shop.example.com/api/admin/orders/bulk/reject"
confirm_status = "rejected"
errors_path = "errors"
headers = { Authorization = "Bearer {secret:token}", X-Tenant-Id = "{column:tenantId}" }
body = { ids = "{ids}", note = "{message}" }
success = { ok = true }
secrets = { token = { credential = "shop-admin-token" } }

[actions.notify]
kind = "webhook"
outcomes = ["gave_up"]
url = "https://hooks.example.com/order-monitor"
columns = ["tenantId", "userId"]
[actions.notify.secrets]
signing_secret = { env = "ORDER_HOOK_SECRET" }
"""


def credentials(tmp_path: Path) -> dict[str, str]:
    directory = tmp_path / "creds"
    directory.mkdir(exist_ok=True)
    (directory / "shop-admin-token").write_text(TOKEN + "\n")
    return {"CREDENTIALS_DIRECTORY": str(directory), "ORDER_HOOK_SECRET": SIGNING_KEY}


def http_action(**changes: Any) -> dict[str, Any]:
    """A valid http action's table with *changes* (None removes a key)."""
    table: dict[str, Any] = {
        "kind": "http",
        "outcomes": ["done"],
        "url": "https://shop.example.com/api/admin/orders/bulk/approve",
        "headers": {"Authorization": "Bearer {secret:token}"},
        "body": {"ids": "{ids}"},
        "secrets": {"token": TOKEN},
    }
    return _changed(table, changes)


def webhook_action(**changes: Any) -> dict[str, Any]:
    table: dict[str, Any] = {
        "kind": "webhook",
        "outcomes": ["gave_up"],
        "url": "https://hooks.example.com/order-monitor",
        "secrets": {WEBHOOK_SECRET: SIGNING_KEY},
    }
    return _changed(table, changes)


def _changed(table: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    for key, value in changes.items():
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
    return table


def parse(
    *tables: tuple[str, dict[str, Any]],
    environ: dict[str, str] | None = None,
    resolve: bool = True,
) -> tuple[ActionConfig, ...]:
    return parse_actions(
        {"actions": dict(tables)},
        environ or {},
        source="providers.toml",
        resolve_secrets=resolve,
    )


# --- the reference configuration ----------------------------------------------------------


def test_the_reference_configuration_parses_into_its_actions_and_writes(tmp_path: Path) -> None:
    env = write_providers(tmp_path, REFERENCE)
    s = load_settings({**env, **credentials(tmp_path)})
    approve, reject, notify = s.actions
    token = {"token": Secret(TOKEN)}
    assert approve == ActionConfig(
        name="approve",
        kind="http",
        outcomes=("done",),
        url="https://shop.example.com/api/admin/orders/bulk/approve",
        limits=ProviderLimits(concurrency=2, rate=5.0),
        secrets=token,
        method="POST",
        headers={
            "Authorization": "Bearer {secret:token}",
            "X-Tenant-Id": "{column:tenantId}",
            "Idempotency-Key": "{request_id}",
        },
        body={"ids": "{ids}", "note": "{message}"},
        batch_size=100,
        success={"ok": True},
        errors_path="errors",
        error_id_key="id",
        error_key="error",
        confirm_status="approved",
        max_age=3 * 86400.0,
        attempts=5,
        columns=(),
    )
    assert reject.outcomes == ("failed",)
    assert reject.url.endswith("/bulk/reject")
    assert reject.confirm_status == "rejected"
    assert reject.limits == ProviderLimits()
    assert reject.secrets == token
    assert notify.kind == "webhook"
    assert notify.outcomes == ("gave_up",)
    assert notify.columns == ("tenantId", "userId")
    assert notify.body is None
    assert notify.secrets == {WEBHOOK_SECRET: Secret(SIGNING_KEY)}
    assert s.writes.deliver == ("done", "failed", "gave_up")
    assert s.writes.deliver_columns == ("tenantId", "userId")
    assert s.action_for("failed") is reject
    assert s.action_for("gave_up") is notify
    for text in (repr(s), repr(approve), str(approve.secrets)):
        assert TOKEN not in text
        assert SIGNING_KEY not in text


def test_without_actions_nothing_is_recorded_for_delivery(tmp_path: Path) -> None:
    env = write_providers(tmp_path, "[providers.a]\nkind='znet'\nbase_url='https://x'")
    s = load_settings(env)
    assert s.actions == ()
    assert (s.writes.deliver, s.writes.deliver_columns) == ((), ())


def test_the_shipped_example_parses_once_uncommented(tmp_path: Path) -> None:
    """The example an operator uncomments must be valid: it cannot drift from the code."""
    example = (Path(__file__).parents[2] / "packaging" / "providers.toml.example").read_text()
    # Code lines are commented with '#' and no space; prose with '# '.
    code = "\n".join(
        line[1:] if line.startswith("#") and not line.startswith("# ") and line != "#" else ""
        for line in example.splitlines()
    )
    document = tomllib.loads(code)
    (tmp_path / "order-hook-secret").write_text(SIGNING_KEY)
    environ = {**credentials(tmp_path), "CREDENTIALS_DIRECTORY": str(tmp_path)}
    (tmp_path / "shop-admin-token").write_text(TOKEN)
    for name in ("znet-kod", "znet-sifre", "shop-token"):
        (tmp_path / name).write_text("x")
    assert parse_providers(document, environ)
    actions = parse_actions(document, environ)
    assert {a.name: a.outcomes for a in actions} == {
        "approve": ("done",),
        "reject": ("failed",),
        "notify": ("gave_up",),
    }
    assert all(a.secrets for a in actions)


def test_defaults_of_an_http_action() -> None:
    (action,) = parse(("a", http_action()))
    assert (action.method, action.batch_size, action.attempts) == ("POST", 100, 5)
    assert action.max_age == 3 * 86400
    assert (action.error_id_key, action.error_key) == ("id", "error")
    assert (action.errors_path, action.confirm_status) == (None, None)
    assert action.success == {}
    assert action.limits == ProviderLimits()


def test_a_dotted_success_key_is_a_path_into_the_answer() -> None:
    document = tomllib.loads(
        """
[actions.a]
kind = "http"
outcomes = ["done"]
url = "https://x.example/a"
body = { ids = "{delivery_ids}" }
[actions.a.success]
ok = true
data.state = "accepted"
"meta.count" = 3
"""
    )
    (action,) = parse_actions(document, {})
    assert action.success == {"ok": True, "data.state": "accepted", "meta.count": 3}


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [("3d", 259200.0), ("90m", 5400.0), ("1h30m", 5400.0), (60, 60.0), (86400.5, 86400.5)],
)
def test_max_age_is_seconds_or_a_duration(raw: object, seconds: float) -> None:
    (action,) = parse(("a", http_action(max_age=raw)))
    assert action.max_age == seconds


def test_method_batch_size_and_columns_per_kind() -> None:
    http, hook = parse(
        ("a", http_action(method="put", batch_size=1000)),
        ("b", webhook_action(columns=["tenantId", "tenantId", "x"], confirm_status="approved")),
    )
    assert (http.method, http.batch_size) == ("PUT", 1000)
    assert hook.columns == ("tenantId", "x")
    assert hook.confirm_status == "approved"


def test_the_url_may_use_row_values_after_its_host() -> None:
    (action,) = parse(
        ("a", http_action(url="https://x.example/t/{column:tenantId}/approve?r={request_id}"))
    )
    assert action.url == "https://x.example/t/{column:tenantId}/approve?r={request_id}"
    (action,) = parse(("a", http_action(url="https://x.example:8443?o={outcome}")))
    assert action.url.startswith("https://x.example:8443")


def test_columns_come_from_every_template_and_a_webhook_columns() -> None:
    from order_monitor.config import delivered_columns, delivered_outcomes

    actions = parse(
        (
            "a",
            http_action(
                url="https://x.example/{column:c_url}",
                headers={"X-T": "{column:c_header}"},
                body={"ids": "{ids}", "deep": [{"v": "n={column:c_body}"}, "{column:c_url}"]},
            ),
        ),
        ("b", webhook_action(outcomes=["failed", "gave_up"], columns=["c_hook", "c_body"])),
    )
    assert delivered_columns(actions) == ("c_body", "c_header", "c_hook", "c_url")
    assert delivered_outcomes(actions) == ("done", "failed", "gave_up")


# --- every rule's error -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        # kind, keys
        (http_action(kind=None), r"\[actions\.a\] kind: required, one of http, webhook"),
        (http_action(kind="smtp"), r"\[actions\.a\] kind: required, one of http, webhook"),
        (http_action(colour="red"), r"unknown keys \['colour'\]; allowed: \['attempts', "),
        (http_action(columns=["x"]), r"\[actions\.a\] columns: not allowed for kind = 'http'"),
        # outcomes
        (http_action(outcomes=None), r"\[actions\.a\] outcomes: required, a non-empty list"),
        (http_action(outcomes=[]), r"outcomes: required, a non-empty list of done, failed"),
        (http_action(outcomes="done"), r"outcomes: required, a non-empty list"),
        (http_action(outcomes=["approved"]), r"outcomes: 'approved' is not an outcome"),
        (http_action(outcomes=[1]), r"outcomes: an entry is not an outcome"),
        # url
        (http_action(url=None), r"\[actions\.a\] url: required, an absolute http"),
        (http_action(url="ftp://x.example/a"), r"url: expected an absolute http:// or https://"),
        (http_action(url="/api/admin/orders"), r"url: expected an absolute http"),
        (http_action(url="https:///path"), r"url: expected an absolute http"),
        (http_action(url="https://x.example:99999/a"), r"url: .*port"),
        (http_action(url="https://u:pw@x.example/a"), r"url: no user or password in the URL"),
        (http_action(url="https://x.example/a b"), r"url: spaces and control characters"),
        (http_action(url="https://x.example/a\r\nX: y"), r"url: spaces and control characters"),
        (http_action(url="https://{column:host}/a"), r"url: expected an absolute http"),
        (http_action(url="https://x.{column:t}.example/a"), r"placeholder may stand only after"),
        (http_action(url="https://x.example{column:p}"), r"placeholder may stand only after"),
        (http_action(url="https://x.example/{secret:token}"), r"url: \{secret:\.\.\.\} only in"),
        (http_action(url="https://x.example/?i={ids}"), r"url: \{ids\} only as a whole string"),
        (http_action(url="https://x.example/{tenant}"), r"url: unknown placeholder \{tenant\}"),
        (http_action(url="https://x.example/{"), r"url: a lone '\{'"),
        # method
        (http_action(method="GET"), r"\[actions\.a\] method: expected one of POST, PUT, PATCH"),
        (http_action(method=1), r"method: expected one of POST, PUT, PATCH"),
        # headers
        (http_action(headers=["x"]), r"\[actions\.a\] headers: expected a table"),
        (
            http_action(headers={"X-Tenant-Id": "{tenant}"}),
            r"\[actions\.a\] headers\.X-Tenant-Id: unknown placeholder \{tenant\}",
        ),
        (http_action(headers={"X-N": 5}), r"headers\.X-N: expected a string"),
        (http_action(headers={"X N": "v"}), r"headers: 'X N' is not a header name"),
        (http_action(headers={"X\nN": "v"}), r"is not a header name"),
        (http_action(headers={"x-a": "1", "X-A": "2"}), r"headers\.X-A: given twice"),
        (http_action(headers={"Host": "x"}), r"headers\.Host: set by the HTTP client"),
        (http_action(headers={"Content-Length": "1"}), r"set by the HTTP client"),
        (http_action(headers={"X-A": "a\r\nX-B: b"}), r"headers\.X-A: a line break or other"),
        (http_action(headers={"X-A": "a\x00"}), r"headers\.X-A: a line break or other"),
        (http_action(headers={"X-A": "{secret:other}"}), r"\{secret:other\} is not a secret of"),
        (http_action(headers={"X-A": "{ids}"}), r"headers\.X-A: \{ids\} only as a whole string"),
        (
            http_action(headers={"X-A": "{delivery_ids}"}),
            r"\{delivery_ids\} only as a whole string of the body",
        ),
        # body
        (http_action(body=None), r"\[actions\.a\] body: required for an http action"),
        (http_action(body="{ids}"), r"body: expected a table"),
        (http_action(body=["{ids}"]), r"body: expected a table"),
        (http_action(body={"note": "{message}"}), r"body: must name the orders"),
        (http_action(body={"ids": "x{ids}"}), r"body\.ids: \{ids\} only as a whole string"),
        (http_action(body={"ids": "{ids}", "t": "{secret:token}"}), r"body\.t: \{secret:"),
        (http_action(body={"ids": "{ids}", "t": "{nope}"}), r"body\.t: unknown placeholder"),
        (
            http_action(body={"ids": "{ids}", "deep": [{"x": "}"}]}),
            r"body\.deep\[0\]\.x: a lone '\}'",
        ),
        (
            http_action(body={"ids": "{ids}", "at": datetime(2026, 1, 1)}),
            r"body\.at: a TOML date or time is not JSON",
        ),
        (
            http_action(body={"ids": "{ids}", "d": [date(2026, 1, 1)]}),
            r"body\.d\[0\]: a TOML date",
        ),
        (http_action(body={"ids": "{ids}", "n": math.nan}), r"body\.n: nan and inf"),
        (http_action(body={"ids": "{ids}", "{column:x}": 1}), r"looks like a template"),
        # batch_size, attempts
        (http_action(batch_size=0), r"batch_size: expected a whole number >= 1 and <= 1000"),
        (http_action(batch_size=1001), r"batch_size: expected a whole number >= 1 and <= 1000"),
        (http_action(batch_size=1.5), r"batch_size: expected a whole number"),
        (http_action(batch_size=True), r"batch_size: expected a whole number"),
        (http_action(attempts=0), r"\[actions\.a\] attempts: expected a whole number >= 1"),
        (http_action(attempts="5"), r"attempts: expected a whole number >= 1"),
        # success, errors_path, keys
        (http_action(success=["ok"]), r"success: expected a table of 'path = value'"),
        (http_action(success={"ok": [1]}), r"success\.ok: expected a string, a number"),
        (http_action(success={"ok": {}}), r"success\.ok: expected a string, a number"),
        (http_action(success={"ok": math.inf}), r"success\.ok: expected a string, a number"),
        (http_action(success={"a..b": 1}), r"success\.a\.\.b: expected a dotted path"),
        (http_action(success={"a.b": 1, "a": {"b": 2}}), r"success\.a\.b: the path is given twice"),
        (http_action(errors_path=""), r"errors_path: expected a dotted path"),
        (http_action(errors_path="data..errors"), r"errors_path: expected a dotted path"),
        (http_action(errors_path=3), r"errors_path: expected a dotted path"),
        (http_action(error_id_key=""), r"error_id_key: expected a non-empty string"),
        (http_action(error_key=1), r"error_key: expected a non-empty string"),
        # confirm_status
        (http_action(confirm_status=""), r"confirm_status: expected the status word"),
        (http_action(confirm_status="  "), r"confirm_status: expected the status word"),
        (http_action(confirm_status="a\nb"), r"confirm_status: expected the status word"),
        (http_action(confirm_status=True), r"confirm_status: expected the status word"),
        # max_age
        (http_action(max_age=59), r"max_age: expected a number of seconds or a duration"),
        (http_action(max_age="59s"), r"at least 60 s and at most 30 days"),
        (http_action(max_age="31d"), r"at least 60 s and at most 30 days"),
        (http_action(max_age="9" * 400), r"at least 60 s and at most 30 days"),
        (http_action(max_age=math.nan), r"max_age: expected"),
        (http_action(max_age=math.inf), r"max_age: expected"),
        (http_action(max_age=10**400), r"max_age: expected"),
        (http_action(max_age="soon"), r"max_age: expected"),
        (http_action(max_age=True), r"max_age: expected"),
        # limits (the providers' parser)
        (http_action(limits={"rate": -1}), r"\[actions\.a\]\.limits\.rate = -1 is invalid"),
        (http_action(limits={"speed": 1}), r"limits: unknown keys \['speed'\]"),
        (http_action(limits=[1]), r"'limits' must be a table"),
        # secrets (the providers' resolver)
        (http_action(secrets={"token": {"env": "NOPE_UNSET"}}), r"NOPE_UNSET is not set"),
        (http_action(secrets={"token": {"vault": "x"}}), r"unknown source 'vault'"),
        (http_action(secrets="token"), r"'secrets' must be a table"),
        (http_action(secrets={"token": "a\nb"}), r"secrets\.token holds a line break"),
        (http_action(secrets={"token": "a\x00b"}), r"secrets\.token holds a line break"),
        (http_action(secrets={"a\nb": "x"}), r"secrets: the name 'a\\nb' is not usable"),
        (http_action(url="https://x.example/\ud800"), r"url: spaces and control characters"),
        (http_action(headers={"A": "\ud800"}), r"headers\.A: a line break or other control"),
        (http_action(success={"a\n": {"": 1}}), r"success\.'a\\n\.': expected a dotted path"),
        (
            http_action(body={"ids": "{ids}", "k\r": {"v": "{x}"}}),
            r"body\.'k\\r'\.v: unknown placeholder \{x\}",
        ),
        # webhook
        (webhook_action(secrets={}), r"secrets\.signing_secret: required for a webhook action"),
        (webhook_action(body={"ids": "{ids}"}), r"body: not allowed for kind = 'webhook'"),
        (webhook_action(batch_size=10), r"batch_size: not allowed for kind = 'webhook'"),
        (webhook_action(method="PUT"), r"method: not allowed for kind = 'webhook'"),
        (webhook_action(success={"ok": True}), r"success: not allowed for kind = 'webhook'"),
        (webhook_action(errors_path="errors"), r"errors_path: not allowed for kind"),
        (webhook_action(columns="tenantId"), r"columns: expected a list of the orders table"),
        (webhook_action(columns=[1]), r"columns: expected a list"),
        (webhook_action(columns=[""]), r"column '' is not a usable column name"),
        (webhook_action(columns=["a%b"]), r"column 'a%b' is not a usable column name"),
        (webhook_action(columns=["a\nb"]), r"is not a usable column name"),
        (webhook_action(columns=["x" * 64]), r"is not a usable column name"),
        (
            webhook_action(headers={"X-Sig": "{secret:signing_secret}"}),
            r"headers\.X-Sig: the signing secret signs the event and is never sent",
        ),
        (webhook_action(headers={"webhook-id": "x"}), r"headers\.webhook-id: a webhook sets it"),
        (webhook_action(headers={"Content-Type": "x"}), r"a webhook sets it itself"),
        (
            webhook_action(secrets={WEBHOOK_SECRET: "whsec_not base64!"}),
            r"secrets\.signing_secret is not valid: expected a Standard Webhooks signing key",
        ),
        (
            webhook_action(
                secrets={WEBHOOK_SECRET: "whsec_" + base64.b64encode(b"short").decode()}
            ),
            r"secrets\.signing_secret is too short or too long",
        ),
        (
            webhook_action(
                secrets={WEBHOOK_SECRET: "whsec_" + base64.b64encode(bytes(65)).decode()}
            ),
            r"secrets\.signing_secret is too short or too long",
        ),
        (webhook_action(secrets={WEBHOOK_SECRET: "whsec_"}), r"signing_secret is"),
        # column names in templates
        (http_action(headers={"X-T": "{column:a%b}"}), r"column 'a%b' is not a usable column"),
        (http_action(headers={"X-T": "{column:}"}), r"\{column:\} needs a name"),
    ],
)
def test_each_rule_has_an_error_naming_the_file_the_action_and_the_key(
    table: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected) as caught:
        parse(("a", copy.deepcopy(table)))
    message = str(caught.value)
    assert message.startswith("providers.toml: ")
    assert "[actions.a]" in message
    assert "\n" not in message
    assert TOKEN not in message


def test_one_action_per_outcome_names_both() -> None:
    with pytest.raises(
        ConfigError,
        match=r"\[actions\.reject\] and \[actions\.also\] both deliver 'failed' results",
    ):
        parse(
            ("reject", http_action(outcomes=["failed"])),
            ("also", webhook_action(outcomes=["gave_up", "failed"])),
        )


def test_actions_must_be_tables_with_usable_names() -> None:
    with pytest.raises(ConfigError, match=r"'actions' must be a table of \[actions.NAME\]"):
        parse_actions({"actions": [1]}, {})
    with pytest.raises(ConfigError, match=r"\[actions\.a\] must be a table"):
        parse_actions({"actions": {"a": "http"}}, {})
    with pytest.raises(ConfigError, match=r"an action's name must be non-empty text"):
        parse(("", http_action()))
    with pytest.raises(ConfigError, match=r"\[actions\.'a\\nb'\]: an action's name"):
        parse(("a\nb", http_action()))


def test_the_top_level_names_both_tables(tmp_path: Path) -> None:
    env = write_providers(tmp_path, "[provider.a]\nkind='znet'")
    with pytest.raises(
        ConfigError,
        match=r"unknown top-level keys \['provider'\]; expected \[providers.NAME\] and "
        r"\[actions.NAME\] tables",
    ):
        load_settings(env)


def test_load_providers_still_reads_a_file_with_actions(tmp_path: Path) -> None:
    path = tmp_path / "providers.toml"
    path.write_text(
        "[providers.a]\nkind='znet'\nbase_url='https://x'\n"
        "[actions.b]\nkind='http'\noutcomes=['done']\nurl='https://y/z'\nbody={ids='{ids}'}\n"
    )
    (provider,) = load_providers(path, {})
    assert provider.name == "a"


# --- secrets ------------------------------------------------------------------------------


def test_commands_that_deliver_nothing_read_actions_without_their_secrets(tmp_path: Path) -> None:
    env = write_providers(tmp_path, REFERENCE)
    with pytest.raises(ConfigError, match="credential 'shop-admin-token' is not available"):
        load_settings(env)
    s = load_settings(env, need_provider_secrets=False)
    assert [a.secrets for a in s.actions] == [{}, {}, {}]
    assert s.writes.deliver == ("done", "failed", "gave_up")
    # The names are checked all the same: a header naming no secret is wrong anywhere.
    with pytest.raises(ConfigError, match=r"\{secret:tokn\} is not a secret of this action"):
        parse(
            ("a", http_action(headers={"A": "{secret:tokn}"}, secrets={"token": {"env": "N"}})),
            resolve=False,
        )
    with pytest.raises(ConfigError, match=r"signing_secret: required for a webhook"):
        parse(("a", webhook_action(secrets={})), resolve=False)


@pytest.mark.parametrize(
    "table",
    [
        webhook_action(secrets={WEBHOOK_SECRET: TOKEN}),
        webhook_action(secrets={WEBHOOK_SECRET: "whsec_" + TOKEN}),
        webhook_action(secrets={WEBHOOK_SECRET: {"env": "HOOK"}}),
        http_action(secrets={"token": TOKEN + "\n"}, url="https://x.example/{nope}"),
        http_action(secrets={"token": TOKEN}, headers={"A": "Bearer {secret:token}\n"}),
        http_action(secrets={"token": TOKEN}, headers={"X": "{" + TOKEN + "}"}),
        http_action(secrets={"token": TOKEN}, body={"t": TOKEN}),
        http_action(secrets={"token": {"env": "TOKEN_WITH_NUL"}}),
        http_action(secrets={"token": TOKEN}, url=f"https://u:{TOKEN}@x.example/a"),
        http_action(secrets={"token": TOKEN}, url=f"https://x.example/a?t={TOKEN} "),
    ],
)
def test_no_error_quotes_a_secret(table: dict[str, Any]) -> None:
    environ = {"HOOK": TOKEN, "TOKEN_WITH_NUL": TOKEN + "\x00"}
    with pytest.raises(ConfigError) as caught:
        parse(("a", table), environ=environ)
    message = str(caught.value)
    assert "[actions.a]" in message
    for shown in (TOKEN, TOKEN.replace('"', '\\"'), "p@ss", "w/rd"):
        assert shown not in message, message


def test_a_valid_signing_key_with_or_without_its_prefix_is_taken() -> None:
    bare = SIGNING_KEY.removeprefix("whsec_")
    (a, b) = parse(
        ("a", webhook_action()),
        ("b", webhook_action(outcomes=["done"], secrets={WEBHOOK_SECRET: bare})),
    )
    assert a.secrets[WEBHOOK_SECRET].reveal() == SIGNING_KEY
    assert b.secrets[WEBHOOK_SECRET].reveal() == bare


# --- with the environment's settings ------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "outcome", "consequence"),
    [
        ("FAILED_STATUS", "failed", "a rejected order is never refunded"),
        ("DONE_STATUS", "done", "wallet record is never marked approved"),
    ],
)
def test_an_outcome_is_either_written_in_sql_or_delivered(
    tmp_path: Path, variable: str, outcome: str, consequence: str
) -> None:
    table = "[actions.finish]\nkind='http'\nurl='https://x/y'\nbody={ids='{ids}'}\n"
    env = write_providers(tmp_path, table + f"outcomes=['{outcome}']\n")
    assert load_settings(env).writes.deliver == (outcome,)
    with pytest.raises(ConfigError) as caught:
        load_settings({**env, f"ORDER_MONITOR_{variable}": "closed"})
    message = str(caught.value)
    assert f"ORDER_MONITOR_{variable}='closed' sets status in SQL" in message
    assert consequence in message
    assert f"[actions.finish] delivers {outcome} results through the application" in message
    assert f"keep one — unset ORDER_MONITOR_{variable}" in message
    # The other outcome's status is no conflict.
    other = "DONE_STATUS" if variable == "FAILED_STATUS" else "FAILED_STATUS"
    s = load_settings({**env, f"ORDER_MONITOR_{other}": "closed"})
    assert s.writes.deliver == (outcome,)


@pytest.mark.parametrize(
    ("extra", "pin"),
    [({}, "pinCode"), ({"ORDER_MONITOR_COLUMN_PIN_CODE": "secret_pin"}, "secret_pin")],
)
def test_the_pin_column_never_goes_into_the_outbox(
    tmp_path: Path, extra: dict[str, str], pin: str
) -> None:
    http = f"[actions.a]\nkind='http'\noutcomes=['done']\nurl='https://x/y'\nbody={{ids='{{ids}}', p='{{column:{pin}}}'}}\n"
    hook = f"[actions.b]\nkind='webhook'\noutcomes=['done']\nurl='https://x/y'\ncolumns=['{pin}']\nsecrets={{signing_secret='{SIGNING_KEY}'}}\n"
    for text, name in ((http, "a"), (hook, "b")):
        env = write_providers(tmp_path, text)
        with pytest.raises(ConfigError, match=rf"\[actions\.{name}\] uses the column '{pin}'"):
            load_settings({**env, **extra})
    # Another table's PIN column name is an ordinary column.
    if extra:
        env = write_providers(tmp_path, hook.replace(pin, "pinCode"))
        assert load_settings({**env, **extra}).writes.deliver_columns == ("pinCode",)


def test_a_reload_that_changes_actions_waits_for_a_restart(tmp_path: Path) -> None:
    environ = credentials(tmp_path)
    old = load_settings({**write_providers(tmp_path, REFERENCE), **environ})
    changed = REFERENCE.replace("batch_size = 100", "batch_size = 10")
    new = load_settings({**write_providers(tmp_path, changed), **environ})
    assert new.actions != old.actions
    applied, restart_needed = reloaded(old, new)
    assert "[actions.*] in the providers file (delivery)" in restart_needed
    assert applied.actions == old.actions
    # Dropping an action also changes what the write function records.
    fewer = REFERENCE.split("[actions.notify]")[0]
    new = load_settings({**write_providers(tmp_path, fewer), **environ})
    applied, restart_needed = reloaded(old, new)
    assert "ORDER_MONITOR_*_STATUS (outcome writes)" in restart_needed
    assert (applied.actions, applied.writes) == (old.actions, old.writes)
    # The same file again changes nothing (the secrets compare by value).
    again = load_settings({**write_providers(tmp_path, REFERENCE), **environ})
    assert reloaded(old, again)[1] == []


# --- any table: parsed or refused ---------------------------------------------------------

#: Any text, lone surrogates and NUL included (a Mapping is not always from TOML).
_text = st.text(st.characters(codec=None, categories=None), max_size=30) | st.sampled_from(
    ["\ud800", "a\x00b", "a\r\nb", "\u2028", "x" * 100_000]
)
_templates = st.one_of(
    _text,
    st.sampled_from(
        [
            "{ids}",
            "{delivery_ids}",
            "{message}",
            "{request_id}",
            "{outcome}",
            "{column:tenantId}",
            "{secret:token}",
            "{secret:signing_secret}",
            "x{ids}",
            "{",
            "}}",
            "https://x.example/a",
            "https://x.example/{column:t}",
            "http://{column:h}/",
            "Bearer {secret:token}",
            "{secret:a\nb}",
            "{column:a\x00b}",
            "https://x.example/\ud800",
            "3d",
            "59s",
            "done",
            "POST",
            SIGNING_KEY,
        ]
    ),
)
_scalars = st.one_of(
    _templates,
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.booleans(),
    st.datetimes(),
    st.dates(),
)
_toml_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(_text, st.sampled_from(["ids", "ok"])), inner, max_size=4),
    ),
    max_leaves=12,
)
_header_names = st.sampled_from(["Authorization", "X-Tenant-Id", "x-tenant-id", "Host", "A B"])
_secret_specs = st.one_of(
    st.sampled_from([TOKEN, SIGNING_KEY, "a\nb", ""]),
    st.fixed_dictionaries({"env": st.sampled_from(["TOKEN", "UNSET"])}),
    _toml_values,
)
#: Values an operator might write for each key, beside any TOML value at all.
_PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "kind": st.sampled_from(["http", "webhook", "HTTP"]),
    "outcomes": st.lists(st.sampled_from([*DELIVERABLE_OUTCOMES, "x"]), max_size=3),
    "url": _templates.map(lambda t: "https://x.example/" + t) | _templates,
    "method": st.sampled_from(["POST", "put", "PATCH", "GET"]),
    "headers": st.dictionaries(_header_names, _templates, max_size=3),
    "body": st.dictionaries(st.sampled_from(["ids", "note", "{x}"]), _toml_values, max_size=3),
    "batch_size": st.integers(-1, 1001),
    "success": st.dictionaries(st.sampled_from(["ok", "a.b", "a..b", ""]), _toml_values),
    "errors_path": _text | st.just("errors"),
    "error_id_key": _text,
    "error_key": _text,
    "confirm_status": _text,
    "max_age": st.integers(0, 10**7) | st.floats() | _templates,
    "attempts": st.integers(-1, 10),
    "columns": st.lists(_text | st.sampled_from(["tenantId", "pinCode"]), max_size=3),
    "limits": st.dictionaries(
        st.sampled_from(["rate", "concurrency", "burst", "speed"]),
        st.integers(-1, 10) | st.floats(),
        max_size=2,
    ),
    "secrets": st.dictionaries(st.sampled_from(["token", WEBHOOK_SECRET]), _secret_specs),
}
_overrides = st.lists(
    st.sampled_from([*sorted(KEYS) * 4, "colour", ""]).flatmap(
        lambda key: st.tuples(st.just(key), _PLAUSIBLE.get(key, _toml_values) | _toml_values)
    ),
    max_size=3,
).map(dict)


@settings_(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from([http_action, webhook_action]),
    overrides=_overrides,
    resolve=st.booleans(),
)
def test_any_table_either_parses_or_is_refused_with_a_config_error(
    base: Any, overrides: dict[str, Any], resolve: bool
) -> None:
    table = base()
    table.update(overrides)
    try:
        actions = parse(("a", table), environ={"TOKEN": TOKEN}, resolve=resolve)
    except ConfigError as exc:
        refused: str | None = str(exc)
    else:
        refused = None
    if refused is not None:
        assert "[actions." in refused
        assert TOKEN not in refused
        # One line a terminal and the journal can take.
        assert not any(ch in refused for ch in "\r\n\x00")
        refused.encode("utf-8")
        return
    (action,) = actions
    assert action.kind in ("http", "webhook")
    assert action.outcomes
    assert set(action.outcomes) <= set(DELIVERABLE_OUTCOMES)
    assert 60 <= action.max_age <= 30 * 86400
    assert action.attempts >= 1
    assert 1 <= action.batch_size <= 1000
