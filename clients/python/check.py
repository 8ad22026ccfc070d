"""The Python client's scenario against a real cluster, driven by tests/tests/t67_python_client.rs.

It talks with the test in JSON lines: each step it finishes is a line on stdout ({"step": ...}); it reads what it
needs from the test (the Rust leaf's PeerId, "the mailbox message is sent") as lines on stdin. Every step checks
what it got; the first failure prints {"step": "failed", ...}, explains on stderr and exits with 1.

    python check.py --seeds 127.0.0.1:7400,127.0.0.1:7410 --ca .vesper/dev/ca/ca.pem
"""

import argparse
import json
import queue
import sys
import threading
import time
import traceback

import grpc

import vesper_client
from vesper_client import Client, Identity, leaf_pb2

NAMESPACE = "pyclient"
KIND = "vesper.pytest"
# How long any one wait may take (a message, a watch frame, a line from the test); generous for a loaded machine.
WAIT = 60.0


class CheckFailed(Exception):
    pass


def expect(condition, what: str):
    if not condition:
        raise CheckFailed(what)


def emit(step: str, **fields):
    print(json.dumps({"step": step, **fields}), flush=True)


class Test:
    """The lines the test writes on stdin, read by a thread so that waiting for one has a deadline."""

    def __init__(self):
        self.lines: "queue.Queue" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in sys.stdin:
            self.lines.put(line)
        self.lines.put(None)

    def wait(self, what: str) -> dict:
        try:
            line = self.lines.get(timeout=WAIT)
        except queue.Empty:
            raise CheckFailed(f"the test did not send {what} within {WAIT} s") from None
        expect(line is not None, f"the test closed stdin before sending {what}")
        return json.loads(line)


def expect_code(error: grpc.RpcError, code: grpc.StatusCode, what: str):
    expect(error.code() == code, f"{what}: expected {code.name}, got {vesper_client.describe(error)}")


def records(client: Client):
    """Put, get, and compare-and-set both ways."""
    created = client.put(NAMESPACE, "k1", b"v1", {"lang": "python"}, expected_version=0)
    expect(created.version == 1, f"a new record has version 1, got {created.version}")
    expect(created.owner == client.peer_id, f"the owner is the caller: {created.owner}")
    got = client.get(NAMESPACE, "k1")
    expect(got is not None, "the record just put is there")
    expect((got.value, dict(got.attributes), got.version) == (b"v1", {"lang": "python"}, 1), f"as put: {got}")
    expect(client.get(NAMESPACE, "no-such-key") is None, "a missing record reads as none")
    for stale in (0, 7):
        try:
            client.put(NAMESPACE, "k1", b"lost", expected_version=stale)
            raise CheckFailed(f"a put expecting version {stale} of a record at version 1 succeeded")
        except grpc.RpcError as error:
            # superpeer/src/error.rs: a stale compare-and-set is FAILED_PRECONDITION.
            expect_code(error, grpc.StatusCode.FAILED_PRECONDITION, f"a put expecting version {stale}")
    updated = client.put(NAMESPACE, "k1", b"v2", {"lang": "python"}, expected_version=1)
    expect(updated.version == 2, f"a compare-and-set at the current version succeeds: {updated}")
    got = client.get(NAMESPACE, "k1")
    expect((got.value, got.version) == (b"v2", 2), f"the second put is what is stored: {got}")
    emit("records", namespace=NAMESPACE, key="k1", version=got.version)


def presence(client: Client):
    stored = client.set_presence(vesper_client.AWAY, "written in python", {"lang": "python"})
    expect(stored.status == vesper_client.AWAY, f"set presence answers the stored presence: {stored}")
    seen = client.lookup(client.peer_id)
    expect(seen is not None, "this peer is known")
    expect(seen.status == vesper_client.AWAY and seen.note == "written in python", f"as set: {seen}")
    expect(dict(seen.attributes) == {"lang": "python"}, f"with its profile: {seen}")
    expect(len(seen.sessions) == 1, f"one session listed: {seen}")
    emit("presence", status="away", note=seen.note)


def keepalive(client: Client, hold: float):
    """The session outlives the super peer's session TTL: the keepalive thread pings."""
    if hold <= 0:
        return
    time.sleep(hold)
    expect(client.attached, "the session still stands after the hold")
    seen = client.lookup(client.peer_id)
    expect(seen is not None and len(seen.sessions) == 1, f"still listed after {hold} s: {seen}")
    emit("keepalive", held_seconds=hold)


def watch_rust_presence(client: Client, rust: str):
    """A watch of the Rust leaf's presence: a reset, its current state, then the change the test makes."""
    watch = client.watch(peers=[rust])
    reset = watch.next(WAIT)
    expect(isinstance(reset, leaf_pb2.WatchReset), f"the first frame of a new watch is a reset: {reset}")
    expect(reset.watch_id == watch.watch_id and reset.applied_index > 0, f"a reset of this watch: {reset}")
    current = watch.next(WAIT)
    expect(isinstance(current, leaf_pb2.WatchEvent), f"the current state follows the reset: {current}")
    expect(current.applied_index == reset.applied_index, "the current state is at the reset's index")
    expect(current.presence.peer_id == rust and current.presence.status == vesper_client.ONLINE,
           f"the Rust leaf is online: {current}")
    emit("watching", reset_index=reset.applied_index)
    index = current.applied_index
    while True:
        event = watch.next(WAIT)
        expect(isinstance(event, leaf_pb2.WatchEvent), f"only events after the reset: {event}")
        expect(event.applied_index > index, f"events come in index order: {event.applied_index} after {index}")
        expect(event.presence.peer_id == rust, f"only the watched peer: {event}")
        index = event.applied_index
        if event.presence.status == vesper_client.BUSY:
            break
    expect(event.presence.note == "rust is busy", f"with the note the Rust leaf set: {event}")
    watch.close()
    emit("watch_event", status="busy", applied_index=event.applied_index)


def message_from(client: Client, rust: str, payload: bytes, from_mailbox: bool):
    message = client.next_message(WAIT)
    expect(getattr(message, "from") == rust, f"from the Rust leaf: {message}")
    expect(message.kind == KIND and message.payload == payload, f"the message sent: {message}")
    expect(message.from_mailbox == from_mailbox, f"from_mailbox is {from_mailbox}: {message}")
    expect(message.delivery_id != 0, f"a pushed message has a delivery id: {message}")
    return message


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", required=True, help="Leaf addresses of super peers, comma-separated")
    parser.add_argument("--ca", required=True, help="PEM file of the cluster CA")
    parser.add_argument("--server-name", help="name to check in the super peers' certificates")
    parser.add_argument("--hold", type=float, default=0.0,
                        help="seconds to stay attached without calls (past the session TTL: keepalives work)")
    args = parser.parse_args()
    with open(args.ca, "rb") as file:
        ca = file.read()
    test = Test()
    step = "attach"
    client = Client(args.seeds.split(","), ca, Identity.generate(), server_name=args.server_name)
    try:
        # docs/PROTOCOL.md's worked example (the public key of RFC 8032's first test), then a round trip.
        rfc8032 = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
        expect(vesper_client.peer_id_of(rfc8032) == "vp125njqamcweflpvkl73j4szahhihoc4xt3ktcgjnpaingr5yhkena",
               "the PeerId text of RFC 8032's test key")
        expect(vesper_client.public_key_of(client.peer_id) == client.identity.public_key, "peer id round trip")
        welcome = client.attach()
        expect(welcome.peer_id == client.peer_id, "the super peer derives the same peer id")
        expect(welcome.keepalive_interval_ms > 0 and len(welcome.members) > 0, f"a full welcome: {welcome}")
        emit("attached", peer_id=client.peer_id, protocol=welcome.protocol_version,
             keepalive_ms=welcome.keepalive_interval_ms)
        step = "the Rust leaf's peer id"
        rust = test.wait("the Rust leaf's peer id")["rust_peer_id"]
        expect(len(vesper_client.public_key_of(rust)) == 32, "the Rust leaf's peer id decodes")
        step = "records"
        records(client)
        step = "presence"
        presence(client)
        step = "keepalive"
        keepalive(client, args.hold)
        step = "watch"
        watch_rust_presence(client, rust)
        step = "a message from the Rust leaf"
        message_from(client, rust, b"hello from rust", from_mailbox=False)
        emit("received", payload="hello from rust")
        step = "a message to the Rust leaf"
        outcome = client.send(rust, KIND, b"hello from python")
        expect(outcome == "delivered", f"the Rust leaf is attached, so the message is delivered, not {outcome}")
        emit("sent", outcome=outcome)
        step = "detach"
        client.detach()
        emit("detached")
        step = "the mailbox"
        expect(test.wait("word of the mailbox message").get("mailbox") == "sent", "the test sent to the mailbox")
        client.attach()
        message_from(client, rust, b"kept in the mailbox", from_mailbox=True)
        emit("mailbox_received")
        # The test now sends a direct message: once it is here, anything the mailbox had has come too.
        message_from(client, rust, b"after the mailbox", from_mailbox=False)
        expect(client.inbox.empty(), "nothing else came")
        emit("done", received_frames=client.received_frames, duplicates=client.duplicates)
        client.detach()
    except Exception as error:  # noqa: BLE001 - every failure is reported the same way
        detail = vesper_client.describe(error) if isinstance(error, grpc.RpcError) else f"{error}"
        emit("failed", at=step, error=detail)
        print(f"check.py: failed at {step}: {detail}", file=sys.stderr)
        traceback.print_exc()
        client.close()
        sys.exit(1)


if __name__ == "__main__":
    main()
