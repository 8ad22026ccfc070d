"""A small reference client of Vesper's Leaf service, written from the .proto files and the protocol's rules.

It is the proof that the protocol can be spoken without the Rust library: identity, the session stream
(challenge, signed attach, welcome, keepalives, acknowledgements, goodbye), unary calls with the session token,
messages deduplicated by (sender, id), and watches. It is synchronous: one thread reads the session stream, one
pings; calls are made from the caller's thread.

    identity = Identity.load_or_create("alice.key")
    client = Client(["127.0.0.1:7400"], open(".vesper/dev/ca/ca.pem", "rb").read(), identity)
    client.attach()
    client.put("notes", "n1", b"hello")
    message = client.next_message(timeout=30)
    client.detach()

The stubs are generated from proto/proto with grpcio-tools (scripts/python-client.sh does it) and imported as
`vesper.v1`.
"""

import base64
import binascii
import itertools
import os
import queue
import threading
import time

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vesper.v1 import common_pb2, leaf_pb2, leaf_pb2_grpc

# The protocol versions this client speaks (proto/src/version.rs: OLDEST..=NEWEST).
PROTOCOL_OLDEST = 2
PROTOCOL_NEWEST = 2
# Request metadata that carries the session token on every unary call.
SESSION_METADATA_KEY = "x-vesper-session"
# Domain-separation tag of the attach signature.
SESSION_SIGNATURE_CONTEXT = b"vesper-session-v1"
PEER_ID_PREFIX = "vp1"
# Answers may be up to 8 MiB (validate::MAX_ANSWER_BYTES); grpcio's default limit is 4 MiB.
MAX_ANSWER_BYTES = 8 * 1024 * 1024
# How many (sender, id) pairs of received messages are remembered to drop redeliveries.
SEEN_CAPACITY = 10_000

ONLINE = leaf_pb2.PRESENCE_STATUS_ONLINE
AWAY = leaf_pb2.PRESENCE_STATUS_AWAY
BUSY = leaf_pb2.PRESENCE_STATUS_BUSY
OFFLINE = leaf_pb2.PRESENCE_STATUS_OFFLINE


# ---- identity -------------------------------------------------------------------------------------------------


def peer_id_of(public_key: bytes) -> str:
    """The text form of a PeerId: "vp1" and the lowercase, unpadded RFC 4648 base32 of the 32-byte key."""
    if len(public_key) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(public_key)}")
    return PEER_ID_PREFIX + base64.b32encode(public_key).decode("ascii").rstrip("=").lower()


def public_key_of(peer_id: str) -> bytes:
    """The public key a PeerId text names; refuses every other spelling than the one `peer_id_of` writes
    (uppercase excepted)."""
    if not peer_id.startswith(PEER_ID_PREFIX):
        raise ValueError(f"a peer id starts with {PEER_ID_PREFIX!r}: {peer_id!r}")
    body = peer_id[len(PEER_ID_PREFIX):]
    if len(body) != 52:
        raise ValueError(f"a peer id has 52 base32 characters after the prefix, got {len(body)}")
    try:
        key = base64.b32decode(body.upper() + "====")
    except binascii.Error as error:
        raise ValueError(f"a peer id is base32: {error}") from None
    # 52 characters hold 260 bits: the last 4 must be zero, so a key has a single text form.
    if peer_id_of(key) != PEER_ID_PREFIX + body.lower():
        raise ValueError("a peer id's trailing bits must be zero")
    return key


class Identity:
    """An Ed25519 key pair; its PeerId derives from the public key."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self._key = private_key
        self.public_key = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id = peer_id_of(self.public_key)

    @classmethod
    def generate(cls) -> "Identity":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> "Identity":
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def load_or_create(cls, path: str) -> "Identity":
        """A key file as the Rust tools write it (64 hex characters of secret seed); created with mode 0600
        when missing, so the same file works with `leafpeer --key`."""
        try:
            with open(path) as file:
                return cls.from_seed(bytes.fromhex(file.read().strip()))
        except FileNotFoundError:
            pass
        identity = cls.generate()
        seed = identity._key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(seed.hex() + "\n")
        return identity

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


def attach_message(nonce: bytes, server_peer_id: str) -> bytes:
    """The bytes a leaf signs to answer a challenge: the tag, the nonce, the super peer's PeerId text."""
    return SESSION_SIGNATURE_CONTEXT + nonce + server_peer_id.encode("ascii")


# ---- the client -----------------------------------------------------------------------------------------------


class SessionError(Exception):
    """The session could not be opened, or it ended."""


class Watch:
    """One watch of a session: its frames (WatchReset, WatchEvent, WatchRefused) in arrival order. It ends with
    its session (`next` then raises SessionError)."""

    def __init__(self, session: "_Session", watch_id: int):
        self.session = session
        self.watch_id = watch_id
        self.frames: "queue.Queue" = queue.Queue()
        # Index of the last event seen: what a resume after a re-attach would start after.
        self.applied_index = 0

    def next(self, timeout: float):
        """The next frame of this watch; raises TimeoutError when none comes in time."""
        try:
            frame = self.frames.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no frame on watch {self.watch_id} within {timeout} s") from None
        if isinstance(frame, Exception):
            raise frame
        if not isinstance(frame, leaf_pb2.WatchRefused):
            self.applied_index = max(self.applied_index, frame.applied_index)
        return frame

    def close(self):
        self.session.outbound.put(leaf_pb2.ClientFrame(unwatch=leaf_pb2.Unwatch(watch_id=self.watch_id)))
        self.session.watches.pop(self.watch_id, None)


class Client:
    """A leaf peer. `attach` opens a session on the first seed that accepts; `detach` says goodbye. It can attach
    again after a detach (or a lost session): identity, received-message memory and inbox carry over."""

    def __init__(self, seeds, ca_pem: bytes, identity: Identity, *, server_name=None, without_presence=False,
                 timeout=15.0):
        """`seeds`: Leaf addresses (host:port). `ca_pem`: the cluster CA the super peers' certificates must chain
        to. `server_name`: the name to check in their certificates when it is not the host of the address dialled.
        `without_presence`: attach unlisted (no presence, nothing pushed). `timeout`: of each call, in seconds."""
        self.seeds = list(seeds)
        self.identity = identity
        self.peer_id = identity.peer_id
        self.timeout = timeout
        self._credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
        self._server_name = server_name
        self._without_presence = without_presence
        self._presence_sequence = itertools.count(1)
        self._watch_ids = itertools.count(1)
        self._seen = {}  # (from, id) -> None, oldest first; a dict keeps insertion order
        self.inbox: "queue.Queue" = queue.Queue()
        self.received_frames = 0  # messages pushed to us, duplicates included
        self.duplicates = 0  # of those, the ones dropped as already received
        self.ended = None  # the SessionEnded frame, when the super peer ended the session
        self._session = None

    # -- session ------------------------------------------------------------------------------------------------

    def attach(self):
        """Opens a session on the first seed that accepts it; returns the Welcome."""
        if self.attached:
            raise SessionError("already attached")
        self.close()  # a session that ended by itself: release its channel
        failures = []
        for seed in self.seeds:
            try:
                return self._attach_to(seed)
            except (SessionError, grpc.RpcError) as error:
                failures.append(f"{seed}: {describe(error)}")
        raise SessionError("no super peer accepted the session: " + "; ".join(failures))

    def _attach_to(self, seed: str):
        options = [
            ("grpc.max_receive_message_length", MAX_ANSWER_BYTES),
            ("grpc.max_send_message_length", MAX_ANSWER_BYTES),
        ]
        if self._server_name:
            options.append(("grpc.ssl_target_name_override", self._server_name))
        channel = grpc.secure_channel(seed, self._credentials, options=options)
        session = _Session(self, seed, channel)
        try:
            welcome = session.open(self.timeout)
        except BaseException:
            session.close(goodbye=False)
            raise
        self._session = session
        self.ended = None
        return welcome

    def detach(self):
        """Goodbye: the peer goes offline at once (its other sessions aside), then the session closes."""
        if self._session is not None:
            self._session.close(goodbye=True)
            self._session = None

    def close(self):
        """Drops the session without a goodbye (as a crash would: the peer stays online for the grace period)."""
        if self._session is not None:
            self._session.close(goodbye=False)
            self._session = None

    @property
    def attached(self) -> bool:
        return self._session is not None and not self._session.done.is_set()

    def _current(self) -> "_Session":
        if not self.attached:
            raise SessionError("not attached")
        return self._session

    def _call(self, method: str, request, retry=False):
        """A unary call with the session token; a retry-safe call is tried again while the cluster answers
        UNAVAILABLE (between leaders)."""
        for attempt in range(1, 6):
            session = self._current()
            try:
                return getattr(session.stub, method)(
                    request, metadata=[(SESSION_METADATA_KEY, session.token)], timeout=self.timeout
                )
            except grpc.RpcError as error:
                if not retry or error.code() != grpc.StatusCode.UNAVAILABLE or attempt == 5:
                    raise
                time.sleep(0.2 * attempt)

    # -- messages -------------------------------------------------------------------------------------------------

    def _received(self, session: "_Session", messages):
        """Called by the reader: keeps first deliveries, drops redeliveries, acknowledges all of them."""
        for message in messages:
            self.received_frames += 1
            key = (getattr(message, "from"), message.id)
            if key in self._seen:
                self.duplicates += 1
                continue
            self._seen[key] = None
            if len(self._seen) > SEEN_CAPACITY:
                del self._seen[next(iter(self._seen))]
            self.inbox.put(message)
        # Acknowledged once in the inbox: the app has it (or it was a duplicate).
        ids = [message.delivery_id for message in messages]
        if len(ids) == 1:
            frame = leaf_pb2.ClientFrame(message_ack=leaf_pb2.MessageAck(delivery_id=ids[0]))
        else:
            frame = leaf_pb2.ClientFrame(message_acks=leaf_pb2.MessageAcks(delivery_ids=ids))
        session.outbound.put(frame)

    def next_message(self, timeout: float):
        """The next message received (each once, in arrival order); raises TimeoutError when none comes."""
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no message within {timeout} s") from None

    def send(self, to: str, kind: str, payload: bytes, message_id=None) -> str:
        """Sends a message; "delivered" once the recipient's library acknowledged it, "queued" when it waits in
        the recipient's mailbox. Retried with the same id, so the recipient gets it once."""
        request = leaf_pb2.SendMessageRequest(
            to=to, id=message_id or os.urandom(12).hex(), kind=kind, payload=payload
        )
        reply = self._call("SendMessage", request, retry=True)
        return "delivered" if reply.delivered else "queued"

    # -- records ------------------------------------------------------------------------------------------------

    def put(self, namespace: str, key: str, value: bytes, attributes=None, expected_version=None):
        """Creates or replaces a record this peer owns; returns it as stored. `expected_version`: compare-and-set
        (0: it must not exist); a mismatch fails with FAILED_PRECONDITION."""
        request = leaf_pb2.PutRecordRequest(namespace=namespace, key=key, value=value,
                                            attributes=attributes or {})
        if expected_version is not None:
            request.expected_version = expected_version
        return self._call("PutRecord", request).record

    def get(self, namespace: str, key: str, stale=False):
        """The record, or None."""
        reply = self._call("GetRecord", leaf_pb2.GetRecordRequest(
            namespace=namespace, key=key, consistency=_consistency(stale)), retry=True)
        return reply.record if reply.HasField("record") else None

    def delete(self, namespace: str, key: str, expected_version=None) -> bool:
        request = leaf_pb2.DeleteRecordRequest(namespace=namespace, key=key)
        if expected_version is not None:
            request.expected_version = expected_version
        return self._call("DeleteRecord", request).deleted

    def list(self, namespace: str, key_prefix="", limit=100, page_token="", stale=False):
        """One page: (records, next page token or "")."""
        reply = self._call("ListRecords", leaf_pb2.ListRecordsRequest(
            namespace=namespace, key_prefix=key_prefix, limit=limit, page_token=page_token,
            consistency=_consistency(stale)), retry=True)
        return list(reply.records), reply.next_page_token

    # -- presence -------------------------------------------------------------------------------------------------

    def set_presence(self, status=ONLINE, note="", attributes=None):
        """Sets this peer's status, note and profile; returns the stored Presence."""
        request = leaf_pb2.SetPresenceRequest(status=status, note=note, attributes=attributes or {},
                                              sequence=next(self._presence_sequence))
        return self._call("SetPresence", request).presence

    def lookup(self, peer_id: str, stale=False):
        """A peer's Presence, or None when it never attached."""
        reply = self._call("LookupPeer", leaf_pb2.LookupPeerRequest(
            peer_id=peer_id, consistency=_consistency(stale)), retry=True)
        return reply.presence if reply.HasField("presence") else None

    # -- watches --------------------------------------------------------------------------------------------------

    def watch(self, peers=(), namespace="", key_prefix="", conference_id="", resume_after_index=0) -> Watch:
        """Starts a watch. A new one (resume_after_index 0) first gets a WatchReset, then the current state as
        WatchEvents at the reset's index, then the changes as they are applied."""
        session = self._current()
        watch = Watch(session, next(self._watch_ids))
        session.watches[watch.watch_id] = watch
        session.outbound.put(leaf_pb2.ClientFrame(watch=leaf_pb2.Watch(
            watch_id=watch.watch_id, peers=list(peers), namespace=namespace, key_prefix=key_prefix,
            conference_id=conference_id, resume_after_index=resume_after_index)))
        return watch


class _Session:
    """One session stream: the reader thread, the keepalive thread and the queue of frames to send."""

    _CLOSE = object()

    def __init__(self, client: Client, seed: str, channel):
        self.client = client
        self.seed = seed
        self.channel = channel
        self.stub = leaf_pb2_grpc.LeafStub(channel)
        self.outbound: "queue.Queue" = queue.Queue()
        self.welcomed = threading.Event()
        self.done = threading.Event()
        self.welcome = None
        self.token = None
        self.error = None
        self.call = None
        self.watches = {}  # watch id -> Watch

    def _frames(self):
        """The request stream: whatever is put on `outbound`, until the close marker."""
        while True:
            frame = self.outbound.get()
            if frame is self._CLOSE:
                return
            yield frame

    def open(self, timeout: float):
        self.call = self.stub.Session(self._frames())
        threading.Thread(target=self._read, name=f"vesper-session-{self.seed}", daemon=True).start()
        if not self.welcomed.wait(timeout) and self.error is None:
            raise SessionError(f"no welcome within {timeout} s")
        if self.welcome is None:
            why = describe(self.error) if self.error is not None else "the stream ended before a welcome"
            raise SessionError(f"the session was refused: {why}")
        if not PROTOCOL_OLDEST <= self.welcome.protocol_version <= PROTOCOL_NEWEST:
            raise SessionError(f"the super peer chose protocol {self.welcome.protocol_version}, this client speaks "
                               f"{PROTOCOL_OLDEST}-{PROTOCOL_NEWEST}")
        if self.welcome.peer_id != self.client.peer_id:
            raise SessionError(f"the super peer derived peer id {self.welcome.peer_id}, ours is {self.client.peer_id}")
        interval = max(self.welcome.keepalive_interval_ms, 100) / 1000
        threading.Thread(target=self._keep_alive, args=(interval,), name="vesper-keepalive", daemon=True).start()
        return self.welcome

    def _read(self):
        client = self.client
        try:
            for frame in self.call:
                kind = frame.WhichOneof("frame")
                if kind == "challenge":
                    signature = client.identity.sign(
                        attach_message(frame.challenge.nonce, frame.challenge.server_peer_id))
                    self.outbound.put(leaf_pb2.ClientFrame(attach=leaf_pb2.Attach(
                        public_key=client.identity.public_key, signature=signature,
                        protocol_oldest=PROTOCOL_OLDEST, protocol_newest=PROTOCOL_NEWEST,
                        without_presence=client._without_presence)))
                elif kind == "welcome":
                    self.welcome, self.token = frame.welcome, frame.welcome.session_token
                    self.welcomed.set()
                elif kind == "message":
                    client._received(self, [frame.message])
                elif kind == "message_batch":
                    client._received(self, list(frame.message_batch.messages))
                elif kind in ("watch_event", "watch_reset", "watch_refused"):
                    watch = self.watches.get(getattr(frame, kind).watch_id)
                    if watch is not None:
                        watch.frames.put(getattr(frame, kind))
                elif kind == "connect_offer":
                    # This client takes no direct connections: it says so at once rather than let the caller
                    # wait for the offer to time out.
                    self.outbound.put(leaf_pb2.ClientFrame(connect_answer=leaf_pb2.ConnectAnswer(
                        offer_id=frame.connect_offer.offer_id, accept=False,
                        reason="this client takes no direct connections")))
                elif kind == "session_ended":
                    client.ended = frame.session_ended
                # pong: nothing to do; send results and punch plans: this client sends no SendFrame and accepts
                # no connection.
        except grpc.RpcError as error:
            self.error = error
        finally:
            self.done.set()
            self.welcomed.set()
            # Watches live in a session: each learns that it ended (a new session starts them again).
            for watch in list(self.watches.values()):
                watch.frames.put(SessionError(f"the session ended: {describe(self.error)}"))

    def _keep_alive(self, interval: float):
        for nonce in itertools.count(1):
            if self.done.wait(interval):
                return
            self.outbound.put(leaf_pb2.ClientFrame(ping=leaf_pb2.Ping(nonce=nonce)))

    def close(self, goodbye: bool):
        """Ends the stream: with a Detach first when `goodbye` (acknowledgements already queued go before it)."""
        if goodbye and not self.done.is_set():
            self.outbound.put(leaf_pb2.ClientFrame(detach=leaf_pb2.Detach()))
        self.outbound.put(self._CLOSE)
        # After a goodbye the super peer ends the stream; give it a moment, then cancel.
        if not (goodbye and self.done.wait(5)) and self.call is not None:
            self.call.cancel()
        self.done.wait(5)
        self.channel.close()


def _consistency(stale: bool):
    return common_pb2.READ_CONSISTENCY_STALE if stale else common_pb2.READ_CONSISTENCY_LINEARIZABLE


def describe(error) -> str:
    """A gRPC error as CODE: details; anything else as its text."""
    if isinstance(error, grpc.RpcError) and hasattr(error, "code"):
        return f"{error.code().name}: {error.details()}"
    return str(error)
