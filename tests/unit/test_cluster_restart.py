"""A relay killed in place (a container restarted in its pod) starts again on its port at once, though its last
connections linger there in TIME_WAIT; a port that another relay listens on is still refused."""

from __future__ import annotations

import socket

import pytest

from relay.server.workers import _resolve_port


def relay_socket() -> socket.socket:
    """A listening socket as a relay's workers open theirs (asyncio's reuse_address, and SO_REUSEPORT)."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    return listener


def port_left_in_time_wait() -> int:
    """The port of a relay that died with a connection open: its end of it waits in TIME_WAIT."""
    listener = relay_socket()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()  # the relay's side closes first (its process is gone): TIME_WAIT is on its port
    listener.close()
    client.close()
    return port


def test_a_killed_relay_gets_its_port_back_at_once():
    port = port_left_in_time_wait()
    probe, resolved = _resolve_port("127.0.0.1", port)
    probe.close()
    assert resolved == port


def test_a_port_another_relay_listens_on_is_refused():
    listener = relay_socket()
    try:
        with pytest.raises(OSError):
            _resolve_port("127.0.0.1", listener.getsockname()[1])
    finally:
        listener.close()
