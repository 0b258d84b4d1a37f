# syntax=docker/dockerfile:1
# The relay's image: the relay and what it needs to run, nothing else (no tests, benchmarks, compiler or dev tools).
#
#   docker build -t relay .
#
# Try it on this machine, against the built-in Realtime simulator (no OPENAI_API_KEY given), with open access (no
# API keys) and reachable from this machine only; open http://127.0.0.1:8080/ and press Connect:
#
#   docker run --rm -e RELAY_INSECURE=true -p 127.0.0.1:8080:8080 relay
#
# RELAY_INSECURE is not the image's default on purpose: the relay listens on every interface of its container, so
# the image cannot know who reaches it, and an image that starts open would let anyone who can reach a port someone
# published spend the OPENAI_API_KEY given to it. Without RELAY_API_KEYS (or RELAY_INSECURE=true) it refuses to
# start and says so. For a real deployment (API keys, TURN, the announced address and the UDP port range), see
# docker-compose.yml and docs/deployment.md.
#
# The install steps below are run by .ci/run too, word for word (tests/unit/test_container.py checks it): CI proves
# them on every run, since our machines have no Docker engine.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
# What the package is built from: the rest of the repository stays out (.dockerignore too).
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN python3 -m venv /opt/relay && /opt/relay/bin/pip install --no-cache-dir .

FROM python:3.11-slim-bookworm
# Debian packages the relay uses at run time. libopus0: the voice codec (relay/audio/opus.py loads the system's
# libopus, else the copy inside PyAV's wheel).
RUN apt-get update && apt-get install -y --no-install-recommends libopus0 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/relay /opt/relay
# A numeric non-root user, so that Kubernetes' runAsNonRoot can verify it.
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin relay
USER 10001:10001
WORKDIR /tmp
ENV PATH=/opt/relay/bin:$PATH PYTHONUNBUFFERED=1 RELAY_HOST=0.0.0.0 RELAY_PORT=8080
# HTTP (signaling, the page, health, metrics). The media goes over UDP on ephemeral ports: the range is the
# container's net.ipv4.ip_local_port_range sysctl, set and published at run time (see docker-compose.yml), so it is
# not exposed here (`docker run -P` would publish it on other ports, which breaks the 1:1 mapping).
EXPOSE 8080/tcp
# Alive, not ready: /readyz says whether it takes new calls (503 while draining or full), for load balancers.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('RELAY_PORT', '8080'), timeout=2)"]
# SIGTERM (docker stop) drains: live calls go on for up to RELAY_DRAIN_TIMEOUT_S; give `docker stop -t` more.
STOPSIGNAL SIGTERM
ENTRYPOINT ["relay"]
CMD ["serve"]
