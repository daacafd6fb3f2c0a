"""The only code that touches paho's internals: copy-free sends and our PUBLISH codec.

``agent.mqtt.client`` wraps paho through its public API. This module adds a
``paho.Client`` subclass that overrides five private methods and reads
private state, for the measured hot path of fleet downloads:

Receiving: paho 2.x decodes a PUBLISH by re-slicing everything after each
field it reads, so the topic, the packet id and every property each copy
the whole payload again, and its property codec costs more than the rest
of handling a small message. Here a v5 PUBLISH at QoS 0/1 is decoded by
``agent.mqtt.codec``: paho is given the topic and packet id alone (it builds
the message and sends the PUBACK as ever), and the payload, copied out once,
and the decoded ``PublishProperties`` are put on its message before any
callback sees it. QoS 2 (which paho keeps until PUBREL) takes paho's path.

Sending: paho slices the rest of an outgoing packet before every send(), a
fresh copy of up to the whole packet each time the socket takes part of it.
A large packet is queued as a memoryview instead, whose slices copy nothing.
A ``FileRegion`` payload is never copied into a packet at all: paho queues
its header and the region, and ``_sock_send`` sends the region from the file
(sendfile on plain TCP, reads of TLS_PIECE_BYTES through TLS).

All of that depends on how paho's private methods call each other, so it is
used only on the paho releases it was tested with (``TESTED_PAHO_VERSIONS``);
on any other the client takes the public path.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
from typing import TYPE_CHECKING, Any, Final

import paho.mqtt.client as paho
from paho.mqtt import __version__ as PAHO_VERSION
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.mqtt.codec import (
    PUBLISH,
    MalformedPublish,
    PublishProperties,
    decode_publish_header,
    encode_publish_header,
)

if TYPE_CHECKING:
    from agent.mqtt.client import FileRegion

log = logging.getLogger("agent.mqtt")

# Exact paho-mqtt releases this module's overrides were tested against.
TESTED_PAHO_VERSIONS: Final = ("2.2.0",)

# The private paho methods overridden here; all must exist for the fast path.
_OVERRIDDEN: Final = (
    "_send_publish",
    "_sock_send",
    "_packet_queue",
    "_handle_publish",
    "_handle_on_message",
    "_call_socket_register_write",
)


def supported(version: str) -> bool:
    """Whether the fast path may be used with paho-mqtt ``version``."""
    return version in TESTED_PAHO_VERSIONS


AVAILABLE: Final = supported(PAHO_VERSION) and all(
    hasattr(paho.Client, name) for name in _OVERRIDDEN
)

# Outgoing packets below this size are queued as paho builds them.
LARGE_PACKET_BYTES: Final = 16 * 1024
# A FileRegion goes through TLS in reads of this size.
TLS_PIECE_BYTES: Final = 256 * 1024
_MSG_MORE: Final = getattr(socket, "MSG_MORE", 0)  # Linux: hold the header for the payload


class FastClient(paho.Client):
    """paho's client, minus its copies of large packets and its slow property codec."""

    publishes_decoded = 0  # PUBLISH packets decoded here, not by paho (tests check it)
    packets_viewed = 0  # large packets queued as views (tests check it)
    files_sent = 0  # PUBLISH packets queued with a FileRegion payload (tests check it)
    _decoded: tuple[PublishProperties, bytes] | None = None

    def _send_publish(
        self,
        mid: int,
        topic: bytes,
        payload: bytes | bytearray = b"",
        qos: int = 0,
        retain: bool = False,
        dup: bool = False,
        info: paho.MQTTMessageInfo | None = None,
        properties: Properties | None = None,
    ) -> MQTTErrorCode:
        # paho calls this for the first send and for every resend after a reconnect.
        if not isinstance(payload, _FilePayload):
            return super()._send_publish(mid, topic, payload, qos, retain, dup, info, properties)
        if self._sock is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        packed = b"\x00" if properties is None else properties.pack()  # type: ignore[no-untyped-call]
        region = payload.region
        header = encode_publish_header(topic, mid, qos, retain, dup, packed, region.length)
        self.files_sent += 1
        packet: Any = _FilePacket(header, region)  # paho only len()s and slices it
        return super()._packet_queue(PUBLISH, packet, mid, qos, info)

    def _sock_send(self, buf: bytes | bytearray) -> int:
        if not isinstance(buf, _FileSend):
            return super()._sock_send(buf)
        packet, pos = buf
        sock = self._sock
        if isinstance(sock, ssl.SSLSocket) or not isinstance(sock, socket.socket):
            # No sendfile through TLS: read a piece. After a would-block, paho asks
            # again from the same position, so the retry sends the very same bytes.
            return super()._sock_send(packet.read(pos, TLS_PIECE_BYTES))
        header = packet.header
        try:
            if pos < len(header):
                return sock.send(header[pos:], _MSG_MORE)  # in one segment with the payload
            region = packet.region
            sent = os.sendfile(
                sock.fileno(),
                region.file.fileno(),
                region.offset + pos - len(header),
                len(packet) - pos,
            )
            if sent == 0:  # the file is shorter than the region: see _FilePacket.read
                sent = sock.send(packet.read(pos, TLS_PIECE_BYTES))
        except BlockingIOError:
            self._call_socket_register_write()
            raise
        return sent

    def _packet_queue(
        self,
        command: int,
        packet: bytes | bytearray,
        mid: int,
        qos: int,
        info: paho.MQTTMessageInfo | None = None,
    ) -> MQTTErrorCode:
        if len(packet) >= LARGE_PACKET_BYTES:
            self.packets_viewed += 1
            view: Any = memoryview(packet)  # paho only len()s, slices and send()s it
            return super()._packet_queue(command, view, mid, qos, info)
        return super()._packet_queue(command, packet, mid, qos, info)

    def _handle_publish(self) -> MQTTErrorCode:
        packet = self._in_packet["packet"]
        qos = (self._in_packet["command"] & 0x06) >> 1
        if qos == 2 or self._protocol != paho.MQTTv5:
            return super()._handle_publish()
        try:
            header = decode_publish_header(packet, qos)
        except MalformedPublish as exc:
            # Only reached on a tested paho (AVAILABLE), which has this module.
            from paho.mqtt.exception import MalformedPacket

            raise MalformedPacket(str(exc)) from None  # paho: protocol error, reconnect
        self._decoded = (header.properties, bytes(memoryview(packet)[header.payload_start :]))
        self._in_packet["packet"] = packet[: header.properties_start] + b"\x00"  # no properties
        self.publishes_decoded += 1
        try:
            return super()._handle_publish()
        finally:
            self._decoded = None

    def _handle_on_message(self, message: paho.MQTTMessage) -> None:
        if self._decoded is not None:
            properties, message.payload = self._decoded
            message.properties = properties  # type: ignore[assignment]  # the adapter reads it
        super()._handle_on_message(message)


def file_payload(region: FileRegion) -> bytes:
    """``region`` as FastClient's publish() takes it (paho keeps it for resends)."""
    return _FilePayload(region)


def packed_properties(packed: bytes) -> Properties:
    """PUBLISH properties encoded by ``agent.mqtt.codec``, as paho's publish() takes them."""
    return _PackedProperties(packed)


class _FilePayload(bytes):
    """A FileRegion as paho's publish() takes it: empty bytes whose len() is the region's.

    paho keeps it as the message's payload (for resends) and hands it to
    ``_send_publish``, which sends the region instead.
    """

    region: FileRegion

    def __new__(cls, region: FileRegion) -> _FilePayload:
        payload = super().__new__(cls)
        payload.region = region
        return payload

    def __len__(self) -> int:
        return self.region.length


class _FileSend(tuple[Any, int]):
    """What paho's ``packet[pos:]`` gives for a _FilePacket: (the packet, pos)."""


class _FilePacket:
    """An outgoing PUBLISH: its header in memory, its payload a FileRegion."""

    __slots__ = ("header", "region")

    def __init__(self, header: bytes, region: FileRegion) -> None:
        self.header = header
        self.region = region

    def __len__(self) -> int:
        return len(self.header) + self.region.length

    def __getitem__(self, key: slice) -> _FileSend:
        return _FileSend((self, key.start or 0))

    def read(self, pos: int, limit: int) -> bytes:
        """Bytes ``[pos, pos + limit)`` of the packet (at most), read from the file."""
        head = self.header[pos:]
        start = max(pos - len(self.header), 0)
        count = min(limit - len(head), self.region.length - start)
        if count <= 0:
            return head
        data = os.pread(self.region.file.fileno(), count, self.region.offset + start)
        if len(data) < count:
            # The file shrank after the region was taken. The packet's length is on
            # the wire already, so it is filled up with zeros: the stream stays
            # whole, and the receiver's digest check refuses the content.
            log.error("file shorter than its region; payload padded with zeros",
                      extra={"length": self.region.length, "offset": self.region.offset})
            data += bytes(count - len(data))
        return head + data


class _PackedProperties(Properties):
    """PUBLISH properties already encoded by ``agent.mqtt.codec``: paho only pack()s them."""

    packed: bytes

    def __init__(self, packed: bytes) -> None:  # not paho's: no property tables to build
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        object.__setattr__(self, "packed", packed)

    def pack(self) -> bytes:
        return self.packed

    def __str__(self) -> str:  # paho's debug log prints it
        return f"<{len(self.packed)} bytes of encoded properties>"
