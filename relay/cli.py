"""The `relay` command: `relay serve` runs the relay, `relay simulator` a standalone Realtime simulator."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from relay import __version__
from pydantic import SecretStr

from relay.config import Settings, SettingsError
from relay.logs import setup_logging
from relay.simulator.config import ALL_KNOBS, KnobError, SimConfig, with_overrides
from relay.simulator.config import HELP as SIM_HELP

log = logging.getLogger("relay")
SECRET_KNOBS = ("api_key",)


def _secret_values(settings: Settings) -> list[str]:
    """The values of every secret setting, for the log formatters to blank out wherever they might appear."""
    values: list[str] = []
    for name, info in Settings.model_fields.items():
        if "SecretStr" not in str(info.annotation):
            continue
        value = getattr(settings, name)
        for secret in value if isinstance(value, list) else [value]:
            if isinstance(secret, SecretStr):
                values.append(secret.get_secret_value())
    return values


def _run(coro: Any) -> None:
    try:
        import uvloop  # Linux only; a plain asyncio loop elsewhere
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


# --- relay serve -------------------------------------------------------------------------------------------------


def _add_serve(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "serve",
        help="run the relay (HTTP + WebRTC)",
        description="Run the relay. With no OPENAI_API_KEY and no RELAY_UPSTREAM_URL it talks to a built-in "
        "Realtime simulator, so it works offline. Every flag can also be set by the environment variable shown.",
    )
    for name, info in Settings.model_fields.items():
        if info.annotation is not None and "SecretStr" in str(info.annotation):
            continue  # secrets only from the environment: flags show up in `ps` and shell history
        default = info.get_default(call_default_factory=True)
        default = "unset" if default is None else json.dumps(default) if isinstance(default, (list, dict)) else default
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=None,
            help=f"{info.description} [env {Settings.env_name(name)}; default: {default}]",
        )
    parser.epilog = "Secrets come from the environment only: " + ", ".join(
        Settings.env_name(n) for n, i in Settings.model_fields.items() if "SecretStr" in str(i.annotation)
    )
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    flags = {name: getattr(args, name, None) for name in Settings.model_fields}
    try:
        settings = Settings.load(**flags)
    except SettingsError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format, _secret_values(settings))
    if settings.insecure and not settings.api_keys:
        log.warning("--insecure: open access on %s, no API keys: anyone who reaches this address can spend the "
                    "upstream key", settings.host)
    for name in ("history_dir", "recordings_dir"):
        directory = getattr(settings, name)
        if directory is None:
            continue
        try:
            Path(directory).mkdir(parents=True, exist_ok=True)
            if not os.access(directory, os.W_OK):
                raise PermissionError("not writable")
        except OSError as exc:
            print(f"relay: {name} ({Settings.env_name(name)}): cannot use {directory}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 2
    if settings.tools:
        from relay.tools import Toolbox, ToolError

        try:
            Toolbox.load(settings.tools)  # here, so a bad module stops the start, not every worker in a loop
        except ToolError as exc:
            print(f"relay: tools ({Settings.env_name('tools')}): {exc}", file=sys.stderr)
            return 2
    if settings.workers > 1 and "RELAY_WORKER_INDEX" not in os.environ:
        try:
            tempfile.gettempdir()  # the workers' sockets and metrics files go there
        except FileNotFoundError:
            print(f"relay: {settings.workers} workers need a writable temporary directory (TMPDIR, else /tmp) and "
                  "none is: on a read-only root, mount one (docker run --tmpfs /tmp; Kubernetes: an emptyDir "
                  "volume at /tmp), or run one worker (RELAY_WORKERS=1)", file=sys.stderr)
            return 2
        from relay.server.workers import run_master  # the master stays small: no aiortc, no PyAV

        return run_master(settings)
    from relay.server.app import ListenError, serve

    try:
        _run(serve(settings))
    except ListenError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    return 0


# --- relay simulator ---------------------------------------------------------------------------------------------


def _sim_env(name: str) -> str:
    return "RELAY_SIM_" + name.upper()


def _add_simulator(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "simulator",
        help="run a standalone Realtime API simulator",
        description="Serve a local Realtime-API-compatible WebSocket at ws://HOST:PORT/v1/realtime?model=... . "
        "It echoes the speech it hears, speaks synthetic audio for text, calls tools named in a message, "
        "and can inject faults. Per-connection overrides: query parameters sim_<knob> (e.g. "
        "?sim_close_after_events=20). Records: GET /v1/simulator/sessions.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on [default: 127.0.0.1]")
    parser.add_argument("--port", type=int, default=8090, help="port to listen on [default: 8090]")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    for f in dataclasses.fields(SimConfig):
        if f.name in SECRET_KNOBS:
            continue  # secrets come from the environment only: flags show up in `ps` and shell history
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{SIM_HELP[f.name]} [env {_sim_env(f.name)}; default: {f.default}]"
        if str(f.type).startswith("bool"):
            parser.add_argument(flag, dest=f.name, action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=help_text)
    parser.epilog = "Secrets come from the environment only: " + ", ".join(_sim_env(n) for n in SECRET_KNOBS)
    parser.set_defaults(handler=_simulator)


def sim_config_from(values: dict[str, Any], env: Mapping[str, str] | None = None) -> SimConfig:
    """A SimConfig from flags over env RELAY_SIM_* over the defaults."""
    env = os.environ if env is None else env
    raw: dict[str, str] = {}
    for name in ALL_KNOBS:
        value = values.get(name)
        value = env.get(_sim_env(name)) if value is None else value
        if value is not None:
            raw[name] = str(value)
    return with_overrides(SimConfig(), raw, prefix="", knobs=ALL_KNOBS)


def _simulator(args: argparse.Namespace) -> int:
    try:
        config = sim_config_from(vars(args))
    except KnobError as exc:
        print(f"relay simulator: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level, secrets=[config.api_key] if config.api_key else [])

    async def main() -> None:
        from relay.simulator.server import start_simulator

        simulator = await start_simulator(config, args.host, args.port)
        log.info("Realtime simulator listening at %s?model=%s", simulator.url, config.default_model)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await simulator.stop()

    _run(main())
    return 0


# --- relay analyze ----------------------------------------------------------------------------------------------


def _add_analyze(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "analyze",
        help="per turn, the gap from the end of the user's speech to the start of the model's, in a call recording",
        description="Read a recording made with RELAY_RECORDINGS_DIR (stereo: the user left, the model right, one "
        "clock) and print, per user turn, when the user stopped, when the model started, and the gap between them: "
        "the speech-to-speech latency as the relay saw it.",
    )
    parser.add_argument("file", help="a <call_id>.wav recording")
    parser.set_defaults(handler=_analyze)


def _analyze(args: argparse.Namespace) -> int:
    import wave

    import numpy as np

    from relay.core.recording import turns

    try:
        with wave.open(args.file) as wav:
            if (wav.getnchannels(), wav.getsampwidth()) != (2, 2):
                print(f"relay: {args.file}: not a relay recording (stereo 16-bit expected)", file=sys.stderr)
                return 2
            rate = wav.getframerate()
            stereo = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    except (OSError, EOFError, wave.Error) as exc:
        print(f"relay: {args.file}: {exc}", file=sys.stderr)
        return 2
    found = turns(stereo, rate)
    print(f"{args.file}: {stereo.size / 2 / rate:.1f} s, {len(found)} user turns")
    print("turn  user stopped  model started  gap")
    for index, turn in enumerate(found, 1):
        started = f"{turn.model_start_s:10.2f} s" if turn.model_start_s is not None else "         —  "
        gap = f"{turn.gap_ms:6.0f} ms" if turn.gap_ms is not None else "     —"
        print(f"{index:4d}  {turn.user_end_s:10.2f} s  {started}  {gap}")
    gaps = [t.gap_ms for t in found if t.gap_ms is not None]
    if gaps:
        print(f"median gap {float(np.median(gaps)):.0f} ms over {len(gaps)} answered turns")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay",
        description="WebRTC relay between browsers/mobile apps and speech-to-speech models "
        "(OpenAI Realtime API or any service speaking its protocol).",
    )
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_serve(commands)
    _add_simulator(commands)
    _add_analyze(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    return args.handler(args)
