"""Server-side tools: async Python functions the relay runs for the model.

An operator names modules in RELAY_TOOLS (e.g. `RELAY_TOOLS=mypackage.tools,relay.tools.examples`); every async
function in them decorated with `@tool` is offered to the model in each call's session. The parameters' JSON schema
comes from the type hints (or from a single pydantic-model parameter); the docstring is the description. A parameter
annotated `ToolContext` is not shown to the model: it receives the call's context (its id, and a way to end it).

When the model calls one of these, the relay validates the arguments, runs the function with a timeout, sends its
result back as a `function_call_output` and asks for the next response. A tool that raises, times out or gets bad
arguments returns an output saying so: the model can tell the user; nothing crashes. Calls to tools the relay does
not own are left to the client over the data channel, as on OpenAI's WebRTC interface.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import typing
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import pydantic

_MARK = "__relay_tool__"


class ToolError(Exception):
    """A tools module that cannot be used (the relay refuses to start with it)."""


@dataclass
class ToolContext:
    """What a tool may know of its call."""

    call_id: str
    end_call: Callable[[], None]  # hang up once the model's current reply has played


def tool(fn: Callable[..., Awaitable[Any]] | None = None, *, name: str | None = None,
         description: str | None = None):
    """Mark an async function as a tool for the model: `@tool` or `@tool(name=..., description=...)`."""
    def mark(function: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        setattr(function, _MARK, {"name": name or function.__name__, "description": description})
        return function

    return mark(fn) if fn is not None else mark


class Tool:
    def __init__(self, function: Callable[..., Awaitable[Any]], name: str, description: str | None) -> None:
        if not inspect.iscoroutinefunction(function):
            raise ToolError(f"tool {name!r} must be an async function")
        self.function = function
        self.name = name
        self.description = description or inspect.getdoc(function) or ""
        hints = typing.get_type_hints(function)
        self._context_param: str | None = None
        fields: dict[str, Any] = {}
        for param in inspect.signature(function).parameters.values():
            hint = hints.get(param.name, Any)
            if hint is ToolContext:
                self._context_param = param.name
                continue
            fields[param.name] = (hint, ... if param.default is inspect.Parameter.empty else param.default)
        single = next(iter(fields.values()))[0] if len(fields) == 1 else None
        # One pydantic-model parameter: the model is the schema, and the function gets the parsed model.
        self._model_param = next(iter(fields)) if isinstance(single, type) and issubclass(single, pydantic.BaseModel) else None
        self._model = single if self._model_param else pydantic.create_model(f"{name}_arguments", **fields)
        self.parameters = self._model.model_json_schema()
        self.parameters.pop("title", None)

    def definition(self) -> dict[str, Any]:
        return {"type": "function", "name": self.name, "description": self.description, "parameters": self.parameters}

    async def run(self, arguments: str, context: ToolContext) -> Any:
        parsed = self._model.model_validate_json(arguments or "{}")
        if self._model_param:
            kwargs: dict[str, Any] = {self._model_param: parsed}
        else:
            kwargs = {field: getattr(parsed, field) for field in type(parsed).model_fields}
        if self._context_param:
            kwargs[self._context_param] = context
        return await self.function(**kwargs)


class Toolbox:
    def __init__(self, tools: list[Tool]) -> None:
        self.tools = {t.name: t for t in tools}

    @classmethod
    def load(cls, modules: list[str]) -> "Toolbox":
        tools: list[Tool] = []
        for module_name in modules:
            try:
                module = importlib.import_module(module_name)
            except Exception as exc:
                raise ToolError(f"cannot import tools module {module_name!r}: {exc}") from exc
            for _, function in inspect.getmembers(module, callable):
                mark = getattr(function, _MARK, None)
                if mark is not None:
                    tools.append(Tool(function, mark["name"], mark["description"]))
        names = [t.name for t in tools]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ToolError(f"tools defined twice: {duplicates}")
        return cls(tools)

    def definitions(self) -> list[dict[str, Any]]:
        return [t.definition() for t in self.tools.values()]

    def owns(self, name: Any) -> bool:
        return isinstance(name, str) and name in self.tools

    async def call(self, name: str, arguments: str, context: ToolContext, timeout: float) -> str:
        """The tool's result as the text the model gets: its string, or its JSON; or what went wrong."""
        try:
            result = await asyncio.wait_for(self.tools[name].run(arguments, context), timeout)
        except pydantic.ValidationError as exc:
            return f"error: invalid arguments for {name}: {exc.errors(include_url=False, include_context=False)}"
        except asyncio.TimeoutError:
            return f"error: {name} did not finish within {timeout:g} s"
        except Exception as exc:  # the tool's own failure is the model's to explain, not the call's end
            return f"error: {name} failed: {type(exc).__name__}: {exc}"
        if isinstance(result, str):
            return result
        try:
            return json.dumps(result, default=str)
        except (TypeError, ValueError) as exc:  # e.g. tuple keys, or a structure that contains itself
            return f"error: {name} returned a value that is not JSON: {exc}"
