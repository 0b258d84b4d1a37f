"""Which upstream a relay talks to, decided once at start-up from the settings."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from relay.config import Settings
from relay.protocol.session import REALTIME_MODELS

OPENAI_REALTIME_URL = "wss://api.openai.com/v1/realtime"


@dataclass(frozen=True)
class UpstreamTarget:
    kind: Literal["openai", "url", "simulator"]
    url: str | None  # None for the simulator until it has started
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # holds the key: never print it

    @property
    def model(self) -> str | None:
        """The model the URL asks for (its `model` query parameter), if it names one."""
        query = dict(parse_qsl(urlsplit(self.url or "").query))
        return query.get("model")

    def for_model(self, model: str) -> "UpstreamTarget":
        """The same upstream, asked for `model`: the URL's `model` query parameter set to it (OpenAI's, an Azure
        deployment's, the simulator's, or any other URL's alike), the rest of the URL kept."""
        assert self.url is not None
        parts = urlsplit(self.url)
        query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "model"]
        return replace(self, url=urlunsplit(parts._replace(query=urlencode([("model", model), *query]))))

    def describe(self) -> str:
        """One log line; never contains the key."""
        if self.kind == "simulator":
            where = f" at {self.url}" if self.url else ""
            return f"upstream: built-in Realtime simulator{where} (no OPENAI_API_KEY or RELAY_UPSTREAM_URL set)"
        keyed = "with a key" if self.headers else "without a key"
        label = "OpenAI Realtime API" if self.kind == "openai" else "RELAY_UPSTREAM_URL"
        return f"upstream: {label} {_loggable(self.url)} ({keyed})"


@dataclass(frozen=True)
class ModelChoice:
    """The model of a call that asks for none, and the models a client may ask for."""

    default: str
    allowed: list[str]

    @classmethod
    def of(cls, settings: Settings, target: UpstreamTarget) -> "ModelChoice":
        """RELAY_MODELS when set; else OpenAI's realtime models for OpenAI and the simulator, and only its own
        model for a RELAY_UPSTREAM_URL (another provider's names, an Azure deployment: the relay cannot know them).
        The default model is always allowed."""
        default = target.model or settings.model
        names = settings.models if settings.models is not None else [] if target.kind == "url" else REALTIME_MODELS
        return cls(default, list(dict.fromkeys([*names, default])))


def _loggable(url: str | None) -> str:
    """The URL without credentials or query string (either may hold a secret)."""
    if not url:
        return ""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"


def _auth_headers(header: str, key: str | None) -> dict[str, str]:
    if key is None:
        return {}
    return {header: f"Bearer {key}"} if header.lower() == "authorization" else {header: key}


def choose_upstream(settings: Settings) -> UpstreamTarget:
    """RELAY_UPSTREAM_URL (as given) > OPENAI_API_KEY (OpenAI) > the built-in simulator.

    A URL gets RELAY_UPSTREAM_API_KEY only: OPENAI_API_KEY is never sent to any host but OpenAI's.
    """
    openai_key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
    if settings.upstream_url:
        key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
        return UpstreamTarget("url", settings.upstream_url, _auth_headers(settings.upstream_auth_header, key))
    if openai_key:
        url = f"{OPENAI_REALTIME_URL}?{urlencode({'model': settings.model})}"
        return UpstreamTarget("openai", url, _auth_headers("Authorization", openai_key))
    return UpstreamTarget("simulator", None)
