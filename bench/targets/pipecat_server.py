"""Pipecat as a benchmark target: its SmallWebRTC transport and OpenAIRealtimeLLMService, set up the way Pipecat's
own examples do (transport in, user context aggregator, realtime LLM, transport out, assistant aggregator).

    python bench/targets/pipecat_server.py --upstream ws://127.0.0.1:8090/v1/realtime [--port 0]

`POST /offer` takes a raw SDP offer and answers 201 with the SDP answer (the same exchange as the relay's
`POST /v1/realtime/calls`), so one benchmark client serves both. Audio runs at 24 kHz inside the pipeline (the
realtime API's rate: no extra resampling step). ICE gathers on 127.0.0.1 only. Needs pipecat-ai[webrtc,openai]
(the `bench` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from aiohttp import web
from loguru import logger
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.runner import PipelineRunner
from pipecat.pipeline.task import PipelineParams, PipelineTask
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from relay.webrtc.aiortc_internals import restrict_host_addresses  # noqa: E402

RUNNING: web.AppKey[set[asyncio.Task]] = web.AppKey("running")
UPSTREAM: web.AppKey[str] = web.AppKey("upstream")


async def run_bot(connection: SmallWebRTCConnection, upstream: str) -> None:
    transport = SmallWebRTCTransport(
        webrtc_connection=connection,
        params=TransportParams(audio_in_enabled=True, audio_out_enabled=True),
    )
    llm = OpenAIRealtimeLLMService(
        api_key="sk-bench", base_url=upstream, settings=OpenAIRealtimeLLMService.Settings(model="gpt-realtime"))
    aggregators = LLMContextAggregatorPair(LLMContext())
    pipeline = Pipeline([transport.input(), aggregators.user(), llm, transport.output(), aggregators.assistant()])
    task = PipelineTask(pipeline, params=PipelineParams(audio_in_sample_rate=24000, audio_out_sample_rate=24000))

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(transport, client):
        await task.cancel()

    await PipelineRunner(handle_sigint=False).run(task)


async def offer(request: web.Request) -> web.Response:
    connection = SmallWebRTCConnection(ice_servers=[])
    await connection.initialize(sdp=await request.text(), type="offer")
    task = asyncio.create_task(run_bot(connection, request.app[UPSTREAM]))
    request.app[RUNNING].add(task)
    task.add_done_callback(request.app[RUNNING].discard)
    return web.Response(status=201, text=connection.get_answer()["sdp"], content_type="application/sdp")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="the Realtime WebSocket URL, without ?model=")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    restrict_host_addresses(["127.0.0.1"])
    app = web.Application()
    app[RUNNING], app[UPSTREAM] = set(), args.upstream
    app.router.add_post("/offer", offer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    print(f"listening on http://127.0.0.1:{runner.addresses[0][1]}/offer", file=sys.stderr, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
