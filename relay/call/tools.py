"""The relay's own tools in one call: running what the core asks for (RunTools) and handing the outputs back.

Owns: each run (all its calls at once, each with the tool timeout), how many are running (a rollover waits for
none), and a tool's request to end the call, which waits for the model's goodbye to be heard first.
Must not touch: which tools exist (relay/tools), what to tell the model (the core's tool_outputs), the links or the
records: the outputs go back through `carry_out`, the call's own handling of the core's actions.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

from relay.core.call import Action, CallCore, RunTools
from relay.tools import ToolContext, Toolbox

GOODBYE_WAIT_S = 30.0  # a tool ended the call: the model's goodbye may take this long to be created and heard
GOODBYE_START_S = 5.0  # if no new response starts within this, the call ends once nothing plays


class ToolRunner:
    def __init__(self, call_id: str, toolbox: Toolbox, timeout_s: float, core: CallCore,
                 carry_out: Callable[[list[Action]], None], spawn: Callable[[Awaitable[None], str], None],
                 end_call: Callable[[str], None]) -> None:
        self.call_id = call_id
        self.toolbox = toolbox
        self.timeout_s = timeout_s
        self._core = core
        self._carry_out = carry_out
        self._spawn = spawn
        self._end_call = end_call
        self.running = 0

    def run(self, run: RunTools) -> None:
        self._spawn(self._run(run), "tools")

    async def _run(self, run: RunTools) -> None:
        context = ToolContext(self.call_id, self._end_after_reply)
        self.running += 1
        try:
            outputs = await asyncio.gather(*(self.toolbox.call(name, arguments, context, self.timeout_s)
                                             for _, name, arguments in run.calls))
        finally:
            self.running -= 1
        answered = [(call_id, output) for (call_id, _, _), output in zip(run.calls, outputs)]
        self._carry_out(self._core.tool_outputs(answered, respond=run.respond))

    def _end_after_reply(self) -> None:
        """A tool asked to end the call: let the model's next reply (its goodbye) play out first."""
        async def end() -> None:
            # The reply to the tool's output is a response that starts after this (the one that called the tool has
            # already had its response.done); wait for it to be created and then heard.
            core = self._core
            responses, started = core.stats.responses_created, time.monotonic()
            while time.monotonic() - started < GOODBYE_WAIT_S:
                await asyncio.sleep(0.1)
                replied = core.stats.responses_created > responses
                if core.idle and (replied or time.monotonic() - started > GOODBYE_START_S):
                    break
            self._end_call("ended by a tool")

        self._spawn(end(), "end-call")
