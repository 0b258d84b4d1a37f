"""Which peers the TURN gateway relays to: one allocation with a credential from /relay/client-config, then a
CreatePermission (RFC 8656) for each peer address; coturn answers 403 for a peer its denied-peer-ip ranges cover.

    ip netns exec NS python -m tests.turn.turn_probe --server 10.77.2.1:3478 --username U --credential C PEER...

Prints one JSON object: {"allocated": [relayed host, port], "peers": {PEER: "ok" | error code}}.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aioice import stun
from aioice.turn import make_integrity_key


class _Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.pending: dict[bytes, asyncio.Future[stun.Message]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            message = stun.parse_message(data)
        except ValueError:
            return
        future = self.pending.pop(message.transaction_id, None)
        if future is not None and not future.done():
            future.set_result(message)

    async def request(self, message: stun.Message, server: tuple[str, int], key: bytes | None) -> stun.Message:
        if key is not None:
            message.add_message_integrity(key)
            message.add_fingerprint()
        future = asyncio.get_running_loop().create_future()
        self.pending[message.transaction_id] = future
        for _ in range(4):  # UDP: resend a lost request, a bounded number of times
            self.transport.sendto(bytes(message), server)
            try:
                return await asyncio.wait_for(asyncio.shield(future), 1.0)
            except asyncio.TimeoutError:
                continue
        raise TimeoutError(f"no answer from {server}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", required=True, help="HOST:PORT of the TURN server")
    parser.add_argument("--username", required=True)
    parser.add_argument("--credential", required=True)
    parser.add_argument("peers", nargs="+")
    args = parser.parse_args()
    host, port = args.server.rsplit(":", 1)
    server = (host, int(port))
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_datagram_endpoint(_Client, local_addr=("0.0.0.0", 0))
    try:
        allocate = stun.Message(stun.Method.ALLOCATE, stun.Class.REQUEST)
        allocate.attributes["REQUESTED-TRANSPORT"] = 0x11000000  # UDP
        challenge = await client.request(allocate, server, None)
        realm, nonce = challenge.attributes["REALM"], challenge.attributes["NONCE"]
        key = make_integrity_key(args.username, realm, args.credential)

        def signed(method: stun.Method, **attributes) -> stun.Message:
            message = stun.Message(method, stun.Class.REQUEST)
            message.attributes.update(attributes)
            message.attributes.update({"USERNAME": args.username, "REALM": realm, "NONCE": nonce})
            return message

        allocated = await client.request(signed(stun.Method.ALLOCATE, **{"REQUESTED-TRANSPORT": 0x11000000}),
                                         server, key)
        if allocated.message_class != stun.Class.RESPONSE:
            print(json.dumps({"allocated": None, "error": allocated.attributes.get("ERROR-CODE")}))
            return
        peers = {}
        for peer in args.peers:
            answer = await client.request(signed(stun.Method.CREATE_PERMISSION, **{"XOR-PEER-ADDRESS": (peer, 0)}),
                                          server, key)
            peers[peer] = "ok" if answer.message_class == stun.Class.RESPONSE else answer.attributes["ERROR-CODE"][0]
        await client.request(signed(stun.Method.REFRESH, LIFETIME=0), server, key)  # release the allocation
        print(json.dumps({"allocated": allocated.attributes["XOR-RELAYED-ADDRESS"], "peers": peers}))
    finally:
        transport.close()


if __name__ == "__main__":
    asyncio.run(main())
