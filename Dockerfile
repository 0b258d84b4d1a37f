# The relay's image: the relay and what it needs to run, nothing else (no tests, benchmarks, compiler, pip, dev tools).
#
#   docker build -t relay .
#
# Try it on this machine, against the built-in Realtime simulator (no OPENAI_API_KEY given), with open access (no
# API keys) and reachable from this machine only; open http://127.0.0.1:8080/ and press Connect:
#
#   docker run --rm --read-only --tmpfs /tmp -e RELAY_INSECURE=true -p 127.0.0.1:8080:8080 relay
#
# RELAY_INSECURE is not the image's default on purpose: the relay listens on every interface of its container, so
# the image cannot know who reaches it, and an image that starts open would let anyone who can reach a port someone
# published spend the OPENAI_API_KEY given to it. Without RELAY_API_KEYS (or RELAY_INSECURE=true) it refuses to
# start and says so. For a real deployment (API keys, TURN, the announced address and the UDP port range), see
# docker-compose.yml and docs/deployment.md.
#
# CI builds this file as it is and makes a call through the image (tests/container): with a base image made from
# Debian's mirror (BASE) and a wheelhouse for pip (PIP_FIND_LINKS, PIP_NO_INDEX), the classic builder.

# Any Debian bookworm image with python3 and python3-venv (CI: one made with mmdebstrap).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
# pip's own settings, for a build that cannot reach PyPI: a mirror, or a wheelhouse and no index.
ARG PIP_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX
WORKDIR /src
# What the package is built from: the rest of the repository stays out (.dockerignore too).
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN python3 -m venv /opt/relay && /opt/relay/bin/pip install --no-cache-dir .
# Only what runs: pip and setuptools go (nothing is installed at run time), and so do the packages' own tests.
RUN /opt/relay/bin/python -m pip uninstall --yes --quiet pip setuptools \
    && find /opt/relay -depth -type d -name tests -exec rm -rf {} +

FROM ${BASE}
# Debian packages the relay uses at run time. libopus0: the voice codec (relay/audio/opus.py loads the system's
# libopus, else the copy inside PyAV's wheel).
RUN apt-get update && apt-get install -y --no-install-recommends libopus0 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/relay /opt/relay
# A numeric non-root user, so that Kubernetes' runAsNonRoot can verify it.
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin relay
USER 10001:10001
WORKDIR /tmp
# The drain fits in `docker stop`'s default 10 s (and Kubernetes' 30 s): a live call gets its relay.shutdown before
# the engine kills the relay. A longer drain needs a longer stop: `docker run --stop-timeout`, compose's
# stop_grace_period, Kubernetes' terminationGracePeriodSeconds, each above RELAY_DRAIN_TIMEOUT_S.
ENV PATH=/opt/relay/bin:$PATH PYTHONUNBUFFERED=1 RELAY_HOST=0.0.0.0 RELAY_PORT=8080 RELAY_DRAIN_TIMEOUT_S=8
# HTTP (signaling, the page, health, metrics). The media goes over UDP on ephemeral ports: the range is the
# container's net.ipv4.ip_local_port_range sysctl, set and published at run time (see docker-compose.yml), so it is
# not exposed here (`docker run -P` would publish it on other ports, which breaks the 1:1 mapping).
EXPOSE 8080/tcp
# Alive, not ready: /readyz says whether it takes new calls (503 while draining or full), for load balancers. Every
# 2 s, so that it turns healthy (and compose's depends_on: service_healthy moves on) about 2 s after the start; the
# probe is one HTTP request from a Python without site packages (about 10 ms of CPU). The start period covers a slow
# first start of the workers.
HEALTHCHECK --interval=2s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-I", "-S", "-c", "import os, socket; s = socket.create_connection(('127.0.0.1', int(os.environ.get('RELAY_PORT', '8080'))), timeout=2); s.sendall(b'GET /healthz HTTP/1.0\\r\\n\\r\\n'); assert s.recv(64).split(b' ')[1] == b'200'"]
# SIGTERM (docker stop) drains: live calls go on for up to RELAY_DRAIN_TIMEOUT_S, then get relay.shutdown.
STOPSIGNAL SIGTERM
ENTRYPOINT ["relay"]
CMD ["serve"]
