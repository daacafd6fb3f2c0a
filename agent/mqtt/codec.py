"""MQTT v5 PUBLISH headers: the properties the agent and controller use, as bytes.

Pure functions (no I/O, no paho). ``agent.mqtt.fast_path`` uses them in place of
paho's ``Properties`` codec on every PUBLISH it sends with properties or
receives at QoS 0/1 (paho's codec looks every property up by name in a table
of all of MQTT's properties, field by field, several times slower; a chunk
travels with four such steps). ``agent.mqtt.client`` checks outgoing
properties with ``encode_properties`` on either path, so both refuse alike.

Layout (MQTT 5.0, 3.3.2): topic (2-byte length + UTF-8), packet id when QoS > 0,
property length (variable byte integer) and the properties, then the payload.
``encode_publish_header`` frames everything of a PUBLISH before its payload, for
payloads sent from a file (``agent.mqtt.client.FileRegion``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final


class MalformedPublish(ValueError):
    """A PUBLISH whose header cannot be decoded (the connection is then dropped)."""


@dataclass(frozen=True, slots=True)
class PublishProperties:
    """The PUBLISH properties the fleet plane uses; every other one is skipped."""

    expiry_s: int | None = None  # Message Expiry Interval
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: tuple[tuple[str, str], ...] = ()


# Property identifiers (MQTT 5.0, 2.2.2.2) valid in a PUBLISH.
PAYLOAD_FORMAT: Final = 0x01
MESSAGE_EXPIRY: Final = 0x02
CONTENT_TYPE: Final = 0x03
RESPONSE_TOPIC: Final = 0x08
CORRELATION_DATA: Final = 0x09
SUBSCRIPTION_ID: Final = 0x0B
TOPIC_ALIAS: Final = 0x23
USER_PROPERTY: Final = 0x26

MAX_FIELD: Final = 0xFFFF  # strings and binary data carry a 2-byte length
MAX_VARIABLE_INT: Final = 268_435_455  # 4 bytes of 7 bits


def encode_variable_int(value: int) -> bytes:
    if not 0 <= value <= MAX_VARIABLE_INT:
        raise ValueError(f"{value} does not fit an MQTT variable byte integer")
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _utf8(name: str, text: str) -> bytes:
    if "\x00" in text:  # MQTT 5.0, 1.5.4: a receiver treats it as malformed
        raise ValueError(f"{name} contains U+0000, which MQTT strings may not")
    try:
        return _field(name, text.encode())
    except UnicodeEncodeError:  # a lone surrogate
        raise ValueError(f"{name} is not encodable as UTF-8") from None


def _field(name: str, data: bytes) -> bytes:
    if len(data) > MAX_FIELD:
        raise ValueError(f"{name} is {len(data)} bytes; MQTT allows at most {MAX_FIELD}")
    return len(data).to_bytes(2, "big") + data


def encode_properties(props: PublishProperties) -> bytes:
    """The property section of a PUBLISH: its length, then each property set."""
    parts: list[bytes] = []
    if props.expiry_s is not None:
        if not 0 <= props.expiry_s <= 0xFFFFFFFF:
            raise ValueError(f"message expiry {props.expiry_s} s is not a 4-byte integer")
        parts.append(struct.pack("!BI", MESSAGE_EXPIRY, props.expiry_s))
    if props.response_topic is not None:
        parts.append(bytes((RESPONSE_TOPIC,)) + _utf8("response topic", props.response_topic))
    if props.correlation_data is not None:
        data = props.correlation_data
        parts.append(bytes((CORRELATION_DATA,)) + _field("correlation data", data))
    for key, value in props.user_properties:
        parts.append(
            bytes((USER_PROPERTY,))
            + _utf8("user property name", key)
            + _utf8("user property value", value)
        )
    body = b"".join(parts)
    return encode_variable_int(len(body)) + body


PUBLISH: Final = 0x30  # packet type 3 in the high nibble of the fixed header


def encode_publish_header(
    topic: bytes,
    mid: int,
    qos: int,
    retain: bool,
    dup: bool,
    properties: bytes,
    payload_length: int,
) -> bytes:
    """Every byte of a PUBLISH before its payload (the payload follows as is).

    ``properties`` is the property section as ``encode_properties`` makes it.
    """
    if not 0 <= qos <= 2:
        raise ValueError(f"QoS {qos} is not 0, 1 or 2")
    if len(topic) > MAX_FIELD:
        raise ValueError(f"topic is {len(topic)} bytes; MQTT allows at most {MAX_FIELD}")
    packet_id = mid.to_bytes(2, "big") if qos else b""
    variable = len(topic).to_bytes(2, "big") + topic + packet_id + properties
    first = PUBLISH | (int(dup) << 3) | (qos << 1) | int(retain)
    return bytes((first,)) + encode_variable_int(len(variable) + payload_length) + variable


@dataclass(frozen=True, slots=True)
class PublishHeader:
    topic: bytes
    mid: int  # 0 at QoS 0
    properties: PublishProperties
    properties_start: int  # where the property length begins
    payload_start: int


def _variable_int(body: bytes | bytearray | memoryview, pos: int, end: int) -> tuple[int, int]:
    value = 0
    for shift in (0, 7, 14, 21):
        if pos >= end:
            raise MalformedPublish("PUBLISH ends inside a variable byte integer")
        byte = body[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    raise MalformedPublish("variable byte integer over 4 bytes")


def _take(body: bytes | bytearray | memoryview, pos: int, end: int, what: str) -> tuple[bytes, int]:
    """A 2-byte length and that many bytes, from ``pos``; and the position after them."""
    if pos + 2 > end:
        raise MalformedPublish(f"PUBLISH ends inside the length of its {what}")
    stop = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
    if stop > end:
        raise MalformedPublish(f"PUBLISH ends inside its {what}")
    return bytes(body[pos + 2 : stop]), stop


def _text(data: bytes, what: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPublish(f"{what} is not UTF-8") from None
    if "\x00" in text:
        raise MalformedPublish(f"{what} contains U+0000")
    return text


def decode_publish_header(body: bytes | bytearray | memoryview, qos: int) -> PublishHeader:
    """Decode what precedes the payload in a PUBLISH ``body`` (all after the fixed header).

    Copies only the header fields, never the payload. Raises MalformedPublish for
    anything that runs past the end, an invalid string, or a property a PUBLISH
    cannot carry.
    """
    end = len(body)
    topic, pos = _take(body, 0, end, "topic")
    mid = 0
    if qos:
        if pos + 2 > end:
            raise MalformedPublish("PUBLISH ends inside its packet id")
        mid = int.from_bytes(body[pos : pos + 2], "big")
        pos += 2
    properties_start = pos
    length, pos = _variable_int(body, pos, end)
    stop = pos + length
    if stop > end:
        raise MalformedPublish("PUBLISH properties run past its end")
    expiry: int | None = None
    response_topic: str | None = None
    correlation: bytes | None = None
    user: list[tuple[str, str]] = []
    while pos < stop:
        ident, pos = _variable_int(body, pos, stop)
        if ident == MESSAGE_EXPIRY:
            if pos + 4 > stop:
                raise MalformedPublish("PUBLISH ends inside its message expiry")
            expiry = int.from_bytes(body[pos : pos + 4], "big")
            pos += 4
        elif ident == RESPONSE_TOPIC:
            data, pos = _take(body, pos, stop, "response topic")
            response_topic = _text(data, "response topic")
        elif ident == CORRELATION_DATA:
            correlation, pos = _take(body, pos, stop, "correlation data")
        elif ident == USER_PROPERTY:
            key, pos = _take(body, pos, stop, "user property")
            value, pos = _take(body, pos, stop, "user property")
            user.append((_text(key, "user property"), _text(value, "user property")))
        elif ident == PAYLOAD_FORMAT:
            pos += 1
        elif ident == TOPIC_ALIAS:
            pos += 2
        elif ident == CONTENT_TYPE:
            _, pos = _take(body, pos, stop, "content type")
        elif ident == SUBSCRIPTION_ID:
            _, pos = _variable_int(body, pos, stop)
        else:
            raise MalformedPublish(f"property {ident:#04x} is not a PUBLISH property")
        if pos > stop:
            raise MalformedPublish("PUBLISH properties run past their length")
    properties = PublishProperties(expiry, response_topic, correlation, tuple(user))
    return PublishHeader(topic, mid, properties, properties_start, stop)
