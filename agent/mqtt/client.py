"""The one module that imports paho-mqtt: an asyncio facade over its client.

paho runs its network loop on its own thread; every callback from that thread
is handed to the asyncio loop, in order (``LoopCalls``: one wake-up per burst;
a 1 MiB chunk download is dozens of messages a second), so the rest of the
agent (and the controller) only sees coroutines and a message queue.
MQTT v5 only; persistent sessions (clean_start false + session expiry) so QoS 1
messages wait at the broker while a device is away.

Only paho's public API is used here. The copy-free fast path for large
messages and FileRegion payloads (``agent.mqtt.fast_path``, the one module
that touches paho's internals) is taken on the paho releases it was tested
with, unless ``MqttClient(fast_path=False)`` or PUBLIC_PATH_ENV=1 asks for
the public path; on any other paho release the public path is taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.common.loop_calls import LoopCalls
from agent.mqtt import fast_path as fast
from agent.mqtt.codec import PublishProperties, encode_properties

log = logging.getLogger("agent.mqtt")


class MqttError(Exception):
    """A publish or subscribe the broker refused, or no connection in time."""


@dataclass(frozen=True, slots=True)
class MqttSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""
    tls_ca: str = ""  # CA bundle that signed the broker's certificate; "" = plain TCP
    tls_cert: str = ""  # client certificate (mutual TLS: the device identity)
    tls_key: str = ""
    tls_server_name: str = ""  # override the name checked in the broker certificate
    username: str = ""
    password: str = ""
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 24 * 3600
    clean_start: bool = False
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    max_inflight: int = 64


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    retain: bool = True
    qos: int = 1


@dataclass(slots=True)
class Message:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: dict[str, str] = field(default_factory=dict)
    # MQTT v5 message expiry as the broker forwarded it (the seconds left then),
    # and when it arrived (time.monotonic()), to tell how long it has waited since.
    expiry_s: int | None = None
    received: float = 0.0


class OpenFile(Protocol):
    def fileno(self) -> int: ...


@dataclass(frozen=True, slots=True)
class FileRegion:
    """A payload that stays in its file: ``length`` bytes of ``file`` from ``offset``.

    On the fast path: sent with sendfile() on plain TCP (the bytes go from the
    page cache to the socket, never through Python), read in pieces on paho's
    thread over TLS; the client keeps ``file`` referenced until the message is
    acknowledged (it may have to send it again after a reconnect), so whatever
    closes the descriptor must wait for the last reference to go. On the public
    path the region is read into memory when it is published.
    """

    file: OpenFile
    offset: int
    length: int


# Set to 1 to keep to paho's public API even where the fast path is tested.
PUBLIC_PATH_ENV = "EDGE_AGENT_MQTT_PUBLIC_PATH"

ConnectHook = Callable[[], Coroutine[Any, Any, None]]
# Sees a message on paho's network thread; True if it took it (it is then not queued).
InlineHandler = Callable[[Message], bool]


class MqttClient:
    def __init__(
        self, settings: MqttSettings, will: Will | None = None, *, fast_path: bool | None = None
    ) -> None:
        """``fast_path``: None takes it where tested (and PUBLIC_PATH_ENV is not 1),
        False never; True asks for it, but an untested paho still gets the public path."""
        self.settings = settings
        self._loop: asyncio.AbstractEventLoop | None = None
        if fast_path is None:
            fast_path = os.environ.get(PUBLIC_PATH_ENV, "") not in ("1", "true", "yes")
        self.fast_path = fast_path and fast.AVAILABLE
        client_class = fast.FastClient if self.fast_path else paho.Client
        self._client: paho.Client = client_class(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=paho.MQTTv5,
        )
        self._client.max_inflight_messages_set(settings.max_inflight)
        self._client.max_queued_messages_set(0)  # unbounded: the outbox bounds what we queue
        self._jitter_reconnect()
        if settings.username:
            self._client.username_pw_set(settings.username, settings.password or None)
        if settings.tls_ca:
            context: ssl.SSLContext = (
                _NamedServerContext(ssl.PROTOCOL_TLS_CLIENT, settings.tls_server_name)
                if settings.tls_server_name
                else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            )
            context.load_verify_locations(cafile=settings.tls_ca)
            if settings.tls_cert:
                context.load_cert_chain(settings.tls_cert, settings.tls_key or None)
            self._client.tls_set_context(context)
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe
        self._client.on_socket_open = _disable_nagle
        self._lock = threading.Lock()
        self._calls: LoopCalls | None = None  # paho thread -> loop, made by start()
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._early: dict[int, Exception | None] = {}  # acks that beat their registration
        self._unwaited: set[int] = set()  # mids published without waiting for the ack
        self._outstanding: set[int] = set()  # QoS 1/2 mids paho holds until their ack
        self._subscriptions: dict[str, int] = {}
        self._connect_hooks: list[ConnectHook] = []
        self._inline: tuple[tuple[str, InlineHandler], ...] = ()
        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        self.connected = asyncio.Event()
        self.connection_count = 0
        self._started = False

    # -- life cycle -------------------------------------------------------

    def on_connected(self, hook: ConnectHook) -> None:
        """Run ``hook`` (on the loop) after every successful (re)connect."""
        self._connect_hooks.append(hook)

    async def start(self) -> None:
        """Begin connecting in the background; reconnects forever until ``stop``."""
        self._loop = asyncio.get_running_loop()
        # No eventfd: callbacks may come until paho's thread is joined, and a client
        # that is never stopped would keep the descriptor.
        self._calls = LoopCalls(self._loop, eventfd=False)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.settings.session_expiry_s
        self._client.connect_async(
            self.settings.host,
            self.settings.port,
            keepalive=self.settings.keepalive_s,
            clean_start=self.settings.clean_start,
            properties=props,
        )
        self._client.loop_start()
        self._started = True

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        await asyncio.to_thread(self._client.disconnect)
        await asyncio.to_thread(self._client.loop_stop)
        self.connected.clear()

    async def wait_connected(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.connected.wait(), timeout)
        except TimeoutError:
            raise MqttError(
                f"no connection to {self.settings.host}:{self.settings.port} in {timeout}s"
            ) from None

    # -- operations -------------------------------------------------------

    async def publish(
        self,
        topic: str,
        payload: bytes | FileRegion,
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        user_properties: dict[str, str] | None = None,
        wait_ack: bool = True,
        expiry_s: int | None = None,
    ) -> None:
        """Publish; with QoS 1 and ``wait_ack``, return once the broker's PUBACK arrived.

        ``expiry_s``: the broker discards the message if it could not deliver it
        within that many seconds (an answer nobody waits for any more).
        ``payload`` may be a ``FileRegion``: sent from the file, not from memory.
        """
        loop = self._loop_or_fail()
        future = loop.create_future() if qos > 0 and wait_ack else None
        self._publish(
            topic, payload, qos, retain, response_topic, correlation_data, user_properties,
            expiry_s, future,
        )
        if future is not None:
            await future

    def publish_nowait(
        self,
        topic: str,
        payload: bytes | FileRegion,
        qos: int = 1,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        user_properties: dict[str, str] | None = None,
        expiry_s: int | None = None,
    ) -> None:
        """Any thread, an inline handler's included: queue a publish, wait for nothing."""
        self._publish(
            topic, payload, qos, False, response_topic, correlation_data, user_properties,
            expiry_s, None,
        )

    def _publish(
        self,
        topic: str,
        payload: bytes | FileRegion,
        qos: int,
        retain: bool,
        response_topic: str | None,
        correlation_data: bytes | None,
        user_properties: dict[str, str] | None,
        expiry_s: int | None,
        future: asyncio.Future[None] | None,
    ) -> None:
        """Hand a publish to paho; ``future`` (if any) settles with the broker's PUBACK."""
        props: Properties | None = None
        if response_topic or correlation_data or user_properties or expiry_s is not None:
            wanted = PublishProperties(
                expiry_s=None if expiry_s is None else max(1, expiry_s),
                response_topic=response_topic or None,
                correlation_data=correlation_data or None,
                user_properties=tuple((user_properties or {}).items()),
            )
            try:  # our codec checks the values on both paths, so both refuse alike
                packed = encode_properties(wanted)
            except ValueError as exc:
                raise MqttError(f"publish to {topic}: {exc}") from None
            props = fast.packed_properties(packed) if self.fast_path else _paho_properties(wanted)
        body: bytes
        if isinstance(payload, FileRegion):
            if payload.length <= 0 or payload.offset < 0:
                raise MqttError(f"bad file region: {payload.length} bytes at {payload.offset}")
            body = fast.file_payload(payload) if self.fast_path else _read_region(payload)
        else:
            body = payload
        # Not under self._lock: paho calls on_publish holding its own message lock,
        # and _ack then takes ours; holding ours here while paho takes its lock
        # would deadlock (lock-order inversion). Acks that win the race land in _early.
        info = self._client.publish(topic, body, qos=qos, retain=retain, properties=props)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            raise MqttError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        with self._lock:
            early = self._early.pop(info.mid, _MISSING)
            if qos > 0 and early is _MISSING:  # paho keeps it, offline too, until acked
                self._outstanding.add(info.mid)
            if future is None:
                if early is _MISSING and not (qos == 0 and info.rc == paho.MQTT_ERR_NO_CONN):
                    self._unwaited.add(info.mid)
                return
            if early is _MISSING:
                self._pending[info.mid] = future
                return
        _settle(future, early)

    def unacknowledged(self) -> int:
        """QoS 1/2 messages paho holds (in flight or queued) that the broker has not acked."""
        return len(self._outstanding)

    def take_inline(self, topic_prefix: str, handler: InlineHandler) -> None:
        """Show messages on topics starting with ``topic_prefix`` to ``handler`` first.

        It runs on paho's network thread, before the message is queued for the
        loop, and returns True if it took the message. It must not block (no
        disk, no waiting): everything it declines goes the usual way. For the
        hot request/answer path, where handing each message to the loop (a
        thread wake-up) costs more than answering it.
        """
        self._inline = (*self._inline, (topic_prefix, handler))

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now and again after every reconnect; waits for the SUBACK."""
        self._subscriptions[topic_filter] = qos
        if self.connected.is_set():
            await self._subscribe_now(topic_filter, qos)

    async def _subscribe_now(self, topic_filter: str, qos: int) -> None:
        future = self._loop_or_fail().create_future()
        rc, mid = self._client.subscribe(topic_filter, qos=qos)  # not under self._lock
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            raise MqttError(f"subscribe {topic_filter} failed: {paho.error_string(rc)}")
        with self._lock:
            early = self._early.pop(mid, _MISSING)
            if early is _MISSING:
                self._pending[mid] = future
        if early is not _MISSING:
            if early is not None:
                raise early
            return
        await future

    # -- paho callbacks (paho's thread) ------------------------------------

    def _loop_or_fail(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise MqttError("MqttClient.start() was not called")
        return self._loop

    def _jitter_reconnect(self) -> None:
        # paho backs off exponentially between its min and max delay; moving the
        # start point randomly spreads a fleet's reconnects after a broker restart.
        base = self.settings.reconnect_min_s * random.uniform(0.5, 1.5)
        self._client.reconnect_delay_set(
            min_delay=max(1, round(base)), max_delay=max(1, int(self.settings.reconnect_max_s))
        )

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        """From the paho thread: have ``fn(*args)`` run on the loop, after earlier calls."""
        calls = self._calls
        if calls is not None:
            calls.call(fn, *args)  # False once the loop has closed: nobody waits then

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.warning("mqtt connect refused", extra={"reason": str(reason)})
            return
        self._call(self._connected)

    def _connected(self) -> None:
        self.connection_count += 1
        self.connected.set()
        log.info("mqtt connected", extra={"broker": f"{self.settings.host}:{self.settings.port}"})
        loop = self._loop_or_fail()
        for topic_filter, qos in self._subscriptions.items():
            loop.create_task(self._resubscribe(topic_filter, qos))
        for hook in self._connect_hooks:
            loop.create_task(hook())

    async def _resubscribe(self, topic_filter: str, qos: int) -> None:
        try:
            await self._subscribe_now(topic_filter, qos)
        except MqttError as exc:
            log.error("mqtt resubscribe failed", extra={"topic": topic_filter, "reason": str(exc)})

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self._jitter_reconnect()
        self._call(self._disconnected, str(reason))

    def _disconnected(self, reason: str) -> None:
        if self.connected.is_set():
            # Our own stop() is no news; a lost connection is.
            level = logging.WARNING if self._started else logging.INFO
            log.log(level, "mqtt disconnected", extra={"reason": reason})
        self.connected.clear()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        decoded = msg.properties
        props = decoded if isinstance(decoded, PublishProperties) else _from_paho(decoded)
        message = Message(
            topic=msg.topic,
            payload=msg.payload,
            qos=msg.qos,
            retain=bool(msg.retain),
            response_topic=props.response_topic,
            correlation_data=props.correlation_data,
            user_properties=dict(props.user_properties),
            expiry_s=props.expiry_s,
            received=time.monotonic(),
        )
        for prefix, handler in self._inline:
            if message.topic.startswith(prefix):
                try:
                    if handler(message):
                        return
                except Exception:  # a bug there must not end paho's thread
                    log.exception("inline message handler failed", extra={"topic": msg.topic})
                break
        self._call(self.messages.put_nowait, message)

    def _ack(self, mid: int, error: Exception | None) -> None:
        with self._lock:
            self._outstanding.discard(mid)
            future = self._pending.pop(mid, None)
            if future is None:
                if mid in self._unwaited:
                    self._unwaited.discard(mid)
                else:
                    self._early[mid] = error
                return
        self._call(_settle, future, error)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        failed = reason is not None and getattr(reason, "is_failure", False)
        self._ack(mid, MqttError(f"broker refused publish: {reason}") if failed else None)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        bad = [r for r in reasons if getattr(r, "is_failure", False)]
        self._ack(mid, MqttError(f"broker refused subscription: {bad[0]}") if bad else None)


_MISSING: Any = object()

def _paho_properties(props: PublishProperties) -> Properties:
    out = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if props.expiry_s is not None:
        out.MessageExpiryInterval = props.expiry_s
    if props.response_topic is not None:
        out.ResponseTopic = props.response_topic
    if props.correlation_data is not None:
        out.CorrelationData = props.correlation_data
    if props.user_properties:
        out.UserProperty = list(props.user_properties)
    return out


def _read_region(region: FileRegion) -> bytes:
    """The public path's FileRegion: its bytes, read now (paho keeps them for resends)."""
    data = b""
    for _ in range(64):  # a regular file returns all but at its end; bounded anyway
        piece = os.pread(region.file.fileno(), region.length - len(data),
                         region.offset + len(data))
        data += piece
        if not piece or len(data) == region.length:
            break
    if len(data) < region.length:
        # As on the fast path: the receiver's digest check refuses zero padding,
        # while a short message would pass for a short chunk.
        log.error("file shorter than its region; payload padded with zeros",
                  extra={"length": region.length, "offset": region.offset})
        data += bytes(region.length - len(data))
    return data


def _from_paho(props: Any) -> PublishProperties:
    return PublishProperties(
        expiry_s=getattr(props, "MessageExpiryInterval", None),
        response_topic=getattr(props, "ResponseTopic", None),
        correlation_data=getattr(props, "CorrelationData", None),
        user_properties=tuple(getattr(props, "UserProperty", None) or ()),
    )


class _NamedServerContext(ssl.SSLContext):
    """Checks (and sends as SNI) a fixed name instead of the host paho connects to.

    For brokers reached by IP address or through a tunnel whose certificate names
    the broker's DNS name. Verification stays on: only the expected name changes.
    """

    server_name: str

    def __new__(cls, protocol: int, server_name: str) -> _NamedServerContext:
        context = super().__new__(cls, protocol)
        context.server_name = server_name
        return context

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["server_hostname"] = self.server_name
        return super().wrap_socket(sock, *args, **kwargs)


def _disable_nagle(client: Any, userdata: Any, sock: Any) -> None:
    # paho leaves Nagle on: a small request (or PUBACK) then waits for the peer's
    # delayed ACK, ~40 ms per round trip. Request/response traffic needs it off.
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _settle(future: asyncio.Future[None], error: Exception | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
