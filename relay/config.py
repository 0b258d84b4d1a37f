"""The relay's settings: one validated object, from environment variables and command-line flags.

Each setting `name` is read from env `RELAY_<NAME>` (OPENAI_API_KEY keeps its usual name); a flag given on the
command line wins. Secrets are `SecretStr`: they print as '**********' and never reach a log line.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Any, Literal, Mapping

from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from relay.cluster.ids import NODE_ID
from relay.core.policy import DEFAULT_CLIENT_FIELDS
from relay.protocol.session import MODEL_NAME

ENV_NAMES = {"openai_api_key": "OPENAI_API_KEY"}
# turn:HOST[:PORT][?transport=udp|tcp] and turns:… (RFC 7065); an IPv6 host in brackets
TURN_URL = re.compile(r"turns?:(?:\[[0-9A-Fa-f:.]+\]|[^?:/\[\]\s]+)(?::(?P<port>[0-9]{1,5}))?(?:\?transport=(?:udp|tcp))?")
# gpt-realtime's list prices, USD per million tokens (2026): what the page and the usage totals estimate cost with.
DEFAULT_PRICES = {
    "audio_input": 32.0, "cached_audio_input": 0.4, "audio_output": 64.0,
    "text_input": 4.0, "cached_text_input": 0.4, "text_output": 16.0,
}


def cpu_limit(cgroup: str = "/sys/fs/cgroup") -> int | None:
    """The whole CPUs this process's cgroup may use (a container's --cpus, a pod's CPU limit: cgroup v2's cpu.max,
    v1's cfs quota), at least 1; None without a quota."""
    for quota_file, period_file in (("cpu.max", None), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us"),
                                    ("cpu,cpuacct/cpu.cfs_quota_us", "cpu,cpuacct/cpu.cfs_period_us")):
        try:
            fields = Path(cgroup, quota_file).read_text().split()
            if period_file is not None:
                fields.append(Path(cgroup, period_file).read_text().strip())
            quota, period = fields[0], int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
        if quota in ("max", "-1") or period <= 0:
            return None
        return max(1, int(quota) // period)
    return None


def default_workers() -> int:
    """One worker per CPU this process may use: the cores it may run on, fewer under a CPU quota."""
    cores = len(os.sched_getaffinity(0))
    return min(62, cores, cpu_limit() or cores)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _base_url(value: str) -> str:
    """An http(s)://HOST[:PORT] URL (a path prefix allowed; no query, no fragment), without its trailing slash."""
    parts = urlsplit(value)
    try:
        _ = parts.port  # reading it checks it
    except ValueError:
        raise ValueError(f"{value!r} has a bad port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"{value!r} is not an http:// or https:// URL (scheme://host[:port])")
    return value.rstrip("/")


class SettingsError(ValueError):
    """A setting has a bad value; the message names it and says what is expected."""


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8080, ge=0, le=65535, description="port to listen on (0: any free port)")
    workers: int = Field(
        default_factory=default_workers, ge=1, le=62, validate_default=True,
        description="worker processes sharing the port, one per core (default: the cores this process may use, or "
        "its CPU quota in whole CPUs, at least 1, where a container or pod has one)",
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, le=86400, description="on SIGTERM, how long live calls may go on (new calls get 503, /readyz "
        "says 503) before each gets a relay.shutdown event and ends; the process exits as soon as its last call "
        "ends; a second SIGTERM ends them at once (Kubernetes: set terminationGracePeriodSeconds above it)",
    )
    metrics: bool = Field(
        True, description="serve Prometheus metrics at /metrics, without auth (they hold no secret and no call id; "
        "false: no /metrics)",
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="log lines as text, or as one JSON object per line (ts, level, logger, message, "
        "call_id and the event's fields)",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log verbosity")
    openai_api_key: SecretStr | None = Field(None, description="use the OpenAI Realtime API with this key")
    model: str = Field(
        "gpt-realtime", min_length=1, description="model of the calls whose client asks for none (OpenAI's and the "
        "simulator's URL; a RELAY_UPSTREAM_URL keeps its own model parameter for them)",
    )
    models: list[str] | None = Field(
        None,
        description="comma-separated models a client may ask for (session.model of an offer or a client secret), "
        "besides RELAY_MODEL; * for any name (default: the realtime models of OpenAI's API; with "
        "RELAY_UPSTREAM_URL, only the URL's own model)",
    )
    upstream_url: str | None = Field(
        None, description="any Realtime-compatible WebSocket URL, used as given (wins over OPENAI_API_KEY)"
    )
    upstream_api_key: SecretStr | None = Field(
        None, description="key sent to RELAY_UPSTREAM_URL (OPENAI_API_KEY never goes to another host)"
    )
    upstream_auth_header: str = Field(
        "Authorization",
        min_length=1,
        description="header carrying the upstream key: 'Authorization' sends 'Bearer <key>'; "
        "any other name (e.g. Azure's 'api-key') sends the key as is",
    )

    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="comma-separated keys that backends send as 'Authorization: Bearer <key>' (default: none, "
        "open access, allowed on loopback only)",
    )
    insecure: bool = Field(False, description="serve with no API keys on a non-loopback address (logs a warning)")
    token_secret: SecretStr | None = Field(
        None, description="key that signs client secrets (ek_ tokens), shared by the relay's workers "
        "(default: a random one per start: tokens do not outlive a restart)",
    )
    client_secret_ttl_s: int = Field(
        600, ge=10, le=7200, description="how long a client secret is valid when the request does not say",
    )
    client_secret_single_use: bool = Field(
        False, description="a client secret creates one call only (OpenAI's create any number until they expire); "
        "its use is remembered by the relay process that minted it, so it must be used there",
    )
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="comma-separated browser origins (https://app.example.com, or *) that may call the API besides "
        "the relay's own page; requests without an Origin (backends, apps) are not concerned",
    )
    ice_servers: list[dict[str, Any]] = Field(
        default_factory=list,
        description='ICE servers for the relay\'s peer, as JSON in the WebRTC form, e.g. [{"urls": "stun:stun.example.org:3478"}] '
        "(default: none, host candidates only)",
    )
    ice_addresses: list[str] = Field(
        default_factory=list,
        description="comma-separated addresses to gather host candidates on (default: every non-loopback interface)",
    )
    # NAT traversal (relay/webrtc/ice.py; README: NAT traversal). The UDP port range has no setting: aioice takes
    # ephemeral ports, so it is the net.ipv4.ip_local_port_range sysctl of the relay's network namespace.
    announced_ip: str | None = Field(
        None, description="public IP address written into the SDP answer in place of the host candidates' addresses "
        "(ports kept): the relay's address as clients reach it through a 1:1 NAT (Docker's published ports, a cloud's "
        "elastic IP); host candidates of the other IP family are left as they are (default: none, answer as gathered)",
    )
    turn_urls: list[str] = Field(
        default_factory=list,
        description="comma-separated turn:/turns: URLs of a TURN server in coturn's use-auth-secret (REST) mode, e.g. "
        "turn:turn.example.org:3478?transport=udp; clients get them from /relay/client-config with a credential "
        "minted per request from RELAY_TURN_SECRET (default: none)",
    )
    turn_secret: SecretStr | None = Field(
        None, description="the TURN server's shared secret (coturn's static-auth-secret), needed with RELAY_TURN_URLS",
    )
    turn_ttl_s: int = Field(
        4000, ge=60, le=7 * 86400, description="how long a minted TURN credential is valid: longer than a call "
        "may last (coturn refuses an expired credential's refreshes, which ends the allocation), and no longer: "
        "a client's credential is good for that long, call or no call",
    )
    turn_for_relay: bool = Field(
        False, description="the relay's own peer also gathers a TURN candidate (a credential minted per call), for a "
        "relay with no reachable address of its own; each call's answer then waits for a TURN allocation",
    )
    max_sdp_bytes: int = Field(65536, ge=1024, description="largest SDP offer or signaling body accepted (bytes)")
    upstream_timeout_s: float = Field(10.0, gt=0, description="how long to wait for the upstream when a call starts")
    upstream_retries: int = Field(
        5, ge=0, le=100, description="attempts to reconnect when the upstream drops under a live call "
        "(0: the call ends with the upstream)",
    )
    upstream_retry_backoff_s: float = Field(
        0.5, gt=0, le=60, description="wait before the second reconnect attempt (the first is at once); doubles "
        "with each attempt up to 10 s",
    )
    rollover_before_s: float = Field(
        300.0, ge=0, description="replace the upstream session this long before its expires_at, at a quiet moment "
        "(0: never; a session_expired is still recovered from)",
    )
    session: dict[str, Any] = Field(
        default_factory=dict,
        description='the session every call starts with, as JSON in the GA form, e.g. {"instructions": "You are '
        'Ada, a support agent.", "audio": {"output": {"voice": "marin"}}}: the agent clients talk to. A backend '
        "(API key) or a client secret may set other values per call; its top-level fields replace these",
    )
    client_session_fields: list[str] = Field(
        default_factory=lambda: list(DEFAULT_CLIENT_FIELDS),
        description="comma-separated session fields a client (the data channel, or a call created without an API "
        "key) may change; * for all. The others (instructions, tools, tool_choice, model, prompt, tracing) stay "
        "as the operator or the backend set them",
    )
    max_calls: int = Field(
        100, ge=1, description="calls this relay carries at once (each worker its share); beyond it new calls get "
        "503 with Retry-After and /readyz says 503",
    )
    calls_per_ip_per_s: float = Field(
        2.0, gt=0, description="call creations one client IP may make per second, on average, bursts of 5 allowed "
        "(beyond it: 429 with Retry-After); callers without an API key (client secrets, open access)",
    )
    calls_per_key_per_s: float = Field(
        50.0, gt=0, description="call creations one API key may make per second, on average, bursts of 100 "
        "allowed (beyond it: 429 with Retry-After): a backend posting its users' offers",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="comma-separated addresses or networks (10.0.0.0/8) of the reverse proxies in front of the relay: "
        "behind them, the client IP (for the per-IP limit) is taken from X-Forwarded-For",
    )
    max_message_bytes: int = Field(
        262144, ge=1024, le=262144, description="largest data-channel message a client may send (bytes); a larger "
        "one gets an error event (at most 262144: what the relay's SCTP advertises, a=max-message-size)",
    )
    max_backends_per_call: int = Field(
        4, ge=1, le=100, description="backends one call may have attached at once over its control socket "
        "(GET /v1/realtime?call_id=); one more is refused (429 too_many_backends), the call goes on",
    )
    backend_queue_bytes: int = Field(
        4 * 1024 * 1024, ge=65536, description="events waiting for a backend that does not keep up (bytes); beyond "
        "it the backend is closed (1008) and the call goes on",
    )
    max_call_duration_s: float = Field(
        3600.0, gt=0, description="end a call after this long, whatever it is doing (the client gets an error event "
        "first)",
    )
    call_idle_timeout_s: float = Field(
        20.0, gt=0, description="end a call when neither media nor data-channel messages arrive for this long"
    )
    interruptions: bool = Field(
        True, description="flush the model's audio when the user starts speaking (false: keep talking through)"
    )
    reorder_window: int = Field(2, ge=0, le=16, description="packets the inbound audio may wait for a late packet")
    tools: list[str] = Field(
        default_factory=list,
        description="comma-separated Python modules whose @tool functions the relay runs for the model "
        "(e.g. relay.tools.examples)",
    )
    tool_timeout_s: float = Field(10.0, gt=0, description="how long a server-side tool may run")
    recordings_dir: str | None = Field(
        None, description="directory for one stereo WAV per call, <call_id>.wav: the user left as received, the model "
        "right as sent, on one clock (default: none, no recording)",
    )
    history_dir: str | None = Field(
        None, description="directory for one JSON Lines transcript file per call, <call_id>.jsonl (default: none; "
        "transcripts of the last 1000 calls stay in memory)",
    )
    # Cluster mode (relay/cluster/, relay/server/cluster.py): several relays behind one address.
    node_id: str | None = Field(
        None, description="this relay's node id in a cluster, letters and digits (e.g. a StatefulSet pod's ordinal): "
        "call ids name it, and a request about a call that reaches another relay is forwarded here (default: none, "
        "a relay on its own); needs RELAY_CLUSTER_SECRET, and RELAY_PEER_URL_TEMPLATE or RELAY_REDIS_URL with "
        "RELAY_ADVERTISE_URL",
    )
    cluster_secret: SecretStr | None = Field(
        None, description="the key (32 characters or more) relays sign the requests they forward to each other with "
        "(HMAC-SHA256); the same on every relay, needed with RELAY_NODE_ID",
    )
    advertise_url: str | None = Field(
        None, description="how the other relays reach this one (http://ADDRESS:PORT), written in the registry in "
        "Redis (default: RELAY_PEER_URL_TEMPLATE with this node id)",
    )
    peer_url_template: str | None = Field(
        None, description="how a relay is reached from its node id when the registry does not say (no Redis, Redis "
        "down, or the node not in it), with {node} for the id, e.g. http://relay-{node}.relay-internal:8080",
    )
    redis_url: str | None = Field(
        None, description="Redis the relays share state through (redis://HOST:PORT/DB, rediss://, unix://): the node "
        "registry, cluster-wide rate limits, single-use client secrets, calls' transcripts (default: none, each "
        "relay on its own)",
    )
    transcript_ttl_s: int = Field(
        3600, ge=60, le=30 * 86400, description="with RELAY_REDIS_URL, how long Redis keeps a call's transcript after "
        "its last change (for GET .../transcript and ?resume= at any relay)",
    )
    transcript_redis_url: str | None = Field(
        None, description="with RELAY_REDIS_URL, another Redis for the calls' transcripts only (their memory then "
        "never crowds out single-use secrets, limits and the registry; default: RELAY_REDIS_URL)",
    )
    prices: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_PRICES),
        description="USD per million tokens, JSON, for cost estimates: "
        + ", ".join(f"{k} (default {v:g})" for k, v in DEFAULT_PRICES.items()),
    )

    @field_validator("prices", mode="before")
    @classmethod
    def _prices(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"must be a JSON object of prices: {exc}") from None
        if isinstance(value, dict):
            unknown = set(value) - set(DEFAULT_PRICES)
            if unknown:
                raise ValueError(f"unknown price names {sorted(unknown)}; known: {sorted(DEFAULT_PRICES)}")
            return {**DEFAULT_PRICES, **value}
        return value

    @field_validator("ice_addresses", "tools", "api_keys", "allowed_origins", "client_session_fields", "turn_urls",
                     "trusted_proxies", "models",
                     mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:
                return json.loads(value)  # a JSON list (how a worker process is handed its settings)
            except ValueError as exc:
                raise ValueError(f"must be a comma-separated list or a JSON list: {exc}") from None
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("ice_addresses")
    @classmethod
    def _ip_addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            ipaddress.ip_address(address)  # ValueError names the bad one
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for network in value:
            ipaddress.ip_network(network, strict=False)  # ValueError names the bad one
        return value

    @field_validator("client_session_fields")
    @classmethod
    def _field_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if name != "*" and not re.fullmatch(r"[a-z][a-z0-9_]*", name):
                raise ValueError(f"{name!r} is not a session field name (or *)")
        return value

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            if name != "*" and not MODEL_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a model name (or *)")
        return value

    @field_validator("session", mode="before")
    @classmethod
    def _json_object(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"must be a JSON object: {exc}") from None
        return value

    @field_validator("session")
    @classmethod
    def _realtime_session(cls, value: dict[str, Any]) -> dict[str, Any]:
        return {"type": "realtime", **value} if value else value  # the GA interface requires the session's type

    @field_validator("ice_servers", mode="before")
    @classmethod
    def _json_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError as exc:
                raise ValueError(f"must be a JSON list of ICE servers: {exc}") from None
        return value

    @field_validator("ice_servers")
    @classmethod
    def _ice_server_urls(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for server in value:
            urls = server.get("urls")
            urls = [urls] if isinstance(urls, str) else urls
            if not urls or not all(isinstance(u, str) and u.split(":", 1)[0] in {"stun", "turn", "turns"} for u in urls):
                raise ValueError("every ICE server needs 'urls' with stun:, turn: or turns: URLs")
        return value

    @field_validator("announced_ip")
    @classmethod
    def _announced_ip(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            address = ipaddress.ip_address(value.strip())
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address (a host name is not resolved here)") from None
        if address.is_unspecified or address.is_multicast:
            raise ValueError(f"{value!r} cannot be a peer's address")
        return str(address)

    @field_validator("turn_urls")
    @classmethod
    def _turn_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            match = TURN_URL.fullmatch(url)
            if match is None or not 0 < int(match["port"] or 3478) < 65536:
                raise ValueError(f"{url!r} is not a TURN URL (turn:HOST[:PORT][?transport=udp|tcp] or turns:…)")
        return value

    @field_validator("token_secret")
    @classmethod
    def _strong_token_secret(cls, value: SecretStr | None) -> SecretStr | None:
        """Anyone holding one client secret may try guesses offline (a right guess opens it), and a found secret
        forges any session for any relay sharing it: no short ones."""
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("use at least 32 characters (e.g. openssl rand -hex 32)")
        return value

    @model_validator(mode="after")
    def _turn_wiring(self) -> "Settings":
        """TURN URLs are useless without the secret that mints their credentials, and the other way round."""
        if bool(self.turn_urls) != (self.turn_secret is not None):
            raise ValueError("turn_urls (RELAY_TURN_URLS) and turn_secret (RELAY_TURN_SECRET) go together: set both "
                             "or neither")
        if self.turn_secret is not None and len(self.turn_secret.get_secret_value()) < 16:
            raise ValueError("turn_secret (RELAY_TURN_SECRET): use at least 16 characters (e.g. openssl rand -hex 32)")
        if self.turn_for_relay and not self.turn_urls:
            raise ValueError("turn_for_relay (RELAY_TURN_FOR_RELAY) needs RELAY_TURN_URLS and RELAY_TURN_SECRET")
        return self

    @field_validator("upstream_url")
    @classmethod
    def _websocket_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("ws://", "wss://")):
            raise ValueError("must be a ws:// or wss:// URL")
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            parts = urlsplit(origin)
            if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc or parts.path):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], no path) or *")
        return value

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, value: str | None) -> str | None:
        if value is not None and not NODE_ID.fullmatch(value):
            raise ValueError(f"{value!r} is not a node id: 1 to 32 letters and digits (a StatefulSet pod's ordinal "
                             "will do)")
        return value

    @field_validator("cluster_secret")
    @classmethod
    def _strong_cluster_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("use at least 32 characters (e.g. openssl rand -hex 32)")
        return value

    @field_validator("advertise_url")
    @classmethod
    def _advertise_url(cls, value: str | None) -> str | None:
        return None if value is None else _base_url(value)

    @field_validator("peer_url_template")
    @classmethod
    def _peer_url_template(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if "{node}" not in value:
            raise ValueError(f"{value!r} has no {{node}} for the node id")
        _base_url(value.replace("{node}", "0"))
        return value.rstrip("/")

    @field_validator("redis_url", "transcript_redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        parts = urlsplit(value or "")
        if value is not None and (parts.scheme not in ("redis", "rediss", "unix") or not (parts.netloc or parts.path)):
            raise ValueError("must be a redis://HOST[:PORT][/DB], rediss:// or unix:// URL")
        return value

    @model_validator(mode="after")
    def _transcripts_redis_with_redis(self) -> "Settings":
        if self.transcript_redis_url and not self.redis_url:
            raise ValueError("transcript_redis_url (RELAY_TRANSCRIPT_REDIS_URL) needs redis_url (RELAY_REDIS_URL): "
                             "transcripts are shared only where the rest is")
        return self

    @model_validator(mode="after")
    def _cluster_wiring(self) -> "Settings":
        """A node id needs the key its requests are signed with and a way for the relays to find each other."""
        if self.node_id is None:
            if self.advertise_url or self.peer_url_template:
                raise ValueError("advertise_url (RELAY_ADVERTISE_URL) and peer_url_template "
                                 "(RELAY_PEER_URL_TEMPLATE) need node_id (RELAY_NODE_ID)")
            return self
        if self.cluster_secret is None:
            raise ValueError("node_id (RELAY_NODE_ID) needs cluster_secret (RELAY_CLUSTER_SECRET): the key the "
                             "relays sign forwarded requests with")
        if not self.peer_url_template and not (self.redis_url and self.advertise_url):
            raise ValueError("node_id (RELAY_NODE_ID) needs RELAY_PEER_URL_TEMPLATE, or RELAY_REDIS_URL and "
                             "RELAY_ADVERTISE_URL: how the relays reach each other")
        return self

    @model_validator(mode="after")
    def _no_open_access_off_loopback(self) -> "Settings":
        """Open access (no API keys) is for a relay that only this machine can reach."""
        if not self.api_keys and not self.insecure and self.host != "localhost" and not _is_loopback(self.host):
            raise ValueError(f"host: {self.host} is reachable from other machines and no API keys are set: set "
                             "RELAY_API_KEYS, or pass --insecure to serve with open access anyway")
        return self

    @model_validator(mode="after")
    def _turn_outlives_calls(self) -> "Settings":
        if self.turn_urls and self.turn_ttl_s <= self.max_call_duration_s:
            raise ValueError(f"turn_ttl_s: {self.turn_ttl_s} s would expire before a call of max_call_duration_s "
                             f"({self.max_call_duration_s:g} s) ends; make it longer")
        return self

    @model_validator(mode="after")
    def _no_key_in_clear(self) -> "Settings":
        """A key travels over ws:// only to this machine; anywhere else it needs wss://."""
        if self.upstream_url and self.upstream_api_key and self.upstream_url.startswith("ws://"):
            host = urlsplit(self.upstream_url).hostname or ""
            if host != "localhost" and not _is_loopback(host):
                raise ValueError("upstream_url: a key is sent to a ws:// URL only on loopback; use wss://")
        return self

    @classmethod
    def env_name(cls, field: str) -> str:
        return ENV_NAMES.get(field, "RELAY_" + field.upper())

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, **flags: Any) -> "Settings":
        """Settings from `env` (default: os.environ), overridden by `flags` that are not None."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = env.get(cls.env_name(name))
            if raw not in (None, ""):
                values[name] = raw
        values.update({k: v for k, v in flags.items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = []
            for error in exc.errors(include_url=False, include_input=False):
                if error["loc"]:
                    name = str(error["loc"][0])
                    problems.append(f"{name} ({cls.env_name(name)}): {error['msg']}")
                else:
                    problems.append(str(error["msg"]).removeprefix("Value error, "))
            raise SettingsError("invalid settings: " + "; ".join(problems)) from None
