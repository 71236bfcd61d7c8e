"""The README's action examples are valid configuration, and the demo runs the same actions.

A reader copies the README's TOML; the demo proves it against the fake
application. Both stay the same configuration through these tests.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from order_monitor.config import ActionConfig, parse_actions
from order_monitor.demo.setup import demo_actions

README = Path(__file__).parents[2] / "README.md"


def readme_actions() -> dict[str, ActionConfig]:
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
    found: dict[str, ActionConfig] = {}
    for block in blocks:
        if "[actions." not in block:
            continue
        document: dict[str, Any] = tomllib.loads(block)
        for action in parse_actions(document, {}, source="README", resolve_secrets=False):
            found[action.name] = action
    return found


def what_it_sends(action: ActionConfig) -> tuple[object, ...]:
    path = action.url.split("://", 1)[1].split("/", 1)[1]
    return (
        action.kind,
        action.outcomes,
        action.method,
        path,
        dict(action.headers),
        action.body,
        dict(action.success),
        action.errors_path,
        action.error_id_key,
        action.error_key,
        action.confirm_status,
    )


def test_the_readme_shows_approve_reject_and_a_webhook() -> None:
    actions = readme_actions()
    assert sorted(actions) == ["approve", "notify", "reject"]
    assert actions["notify"].kind == "webhook"
    assert actions["notify"].columns == ("tenantId",)
    assert actions["approve"].max_age == 3 * 86400
    assert actions["approve"].attempts == 5


def test_the_demo_sends_what_the_readme_configures() -> None:
    readme = readme_actions()
    for action in demo_actions("http://127.0.0.1:1", "token"):
        assert what_it_sends(action) == what_it_sends(readme[action.name]), action.name
