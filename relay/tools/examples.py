"""Example tools (RELAY_TOOLS=relay.tools.examples): the current time, and ending the call."""

from __future__ import annotations

import datetime
import zoneinfo

from relay.tools import ToolContext, tool


@tool
async def current_time(timezone: str = "UTC") -> str:
    """The current date and time in an IANA time zone such as Europe/Paris (default UTC)."""
    try:
        zone = zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return f"unknown time zone {timezone!r}; use an IANA name such as Europe/Paris"
    return datetime.datetime.now(zone).strftime("%A %d %B %Y, %H:%M:%S %Z")


@tool
async def end_call(context: ToolContext) -> str:
    """End the call. Say goodbye first: the line closes once your current reply has been heard."""
    context.end_call()
    return "The call will end after your reply."
