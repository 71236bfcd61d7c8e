"""latency: COMMIT to the provider's first request, the application at a fixed rate."""

from __future__ import annotations

from typing import Any

from common import (
    commit_to_request,
)

from scenarios.context import Context


async def scenario_latency(ctx: Context, rate: float, seconds: float) -> dict[str, Any]:
    """COMMIT (application process) to the provider's request (fake process), initial_delay=0."""
    return await commit_to_request(ctx.server, ctx.fake, rate, seconds)
