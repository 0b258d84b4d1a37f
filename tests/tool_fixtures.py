"""Tools for the tests of server-side tools (RELAY_TOOLS=tests.tool_fixtures)."""

from __future__ import annotations

import asyncio

import pydantic

from relay.tools import ToolContext, tool


@tool
async def add(a: int, b: int) -> int:
    """Add two whole numbers."""
    return a + b


class Query(pydantic.BaseModel):
    city: str
    days: int = 1


@tool(name="forecast", description="The weather to come.")
async def weather(query: Query, context: ToolContext) -> dict:
    return {"city": query.city, "days": query.days, "call": context.call_id, "sky": "clear"}


@tool
async def broken() -> str:
    """Always fails."""
    raise RuntimeError("the tool broke")


@tool
async def sluggish() -> str:
    """Never finishes in time."""
    await asyncio.sleep(30)
    return "too late"


async def not_a_tool() -> str:  # no @tool: never offered
    return "hidden"
