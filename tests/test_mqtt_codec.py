"""agent.mqtt.codec against paho's own property codec, both ways, and bad headers."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers

from agent.mqtt.codec import (
    MalformedPublish,
    PublishProperties,
    decode_publish_header,
    encode_properties,
    encode_publish_header,
    encode_variable_int,
)


# MQTT strings hold no U+0000 (refused below); paho also refuses U+FEFF when reading.
def mqtt_text(max_size: int) -> st.SearchStrategy[str]:
    characters = st.characters(codec="utf-8", exclude_characters="\x00\ufeff")
    return st.text(characters, max_size=max_size)


texts = mqtt_text(40)
publish_properties = st.builds(
    PublishProperties,
    expiry_s=st.none() | st.integers(0, 2**32 - 1),
    response_topic=st.none() | texts,
    correlation_data=st.none() | st.binary(max_size=200),
    user_properties=st.lists(st.tuples(texts, mqtt_text(300)), max_size=8).map(tuple),
)


def paho_properties(props: PublishProperties) -> Properties:
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


def publish_body(topic: bytes, qos: int, packed: bytes, payload: bytes) -> bytes:
    return struct.pack("!H", len(topic)) + topic + (b"\x12\x34" if qos else b"") + packed + payload


@given(props=publish_properties)
def test_paho_reads_what_we_encode(props: PublishProperties) -> None:
    theirs = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    _, used = theirs.unpack(encode_properties(props))  # type: ignore[no-untyped-call]
    assert used == len(encode_properties(props))
    assert getattr(theirs, "MessageExpiryInterval", None) == props.expiry_s
    assert getattr(theirs, "ResponseTopic", None) == props.response_topic
    assert getattr(theirs, "CorrelationData", None) == props.correlation_data
    assert tuple(getattr(theirs, "UserProperty", ())) == props.user_properties


@given(
    props=publish_properties,
    topic=st.text(min_size=1, max_size=80).map(str.encode),
    qos=st.sampled_from([0, 1]),
    payload=st.binary(max_size=300),
)
def test_we_read_what_paho_encodes_and_find_the_payload(
    props: PublishProperties, topic: bytes, qos: int, payload: bytes
) -> None:
    packed = paho_properties(props).pack()  # type: ignore[no-untyped-call]
    body = publish_body(topic, qos, packed, payload)
    header = decode_publish_header(body, qos)
    assert header.properties == props
    assert (header.topic, header.mid) == (topic, 0x1234 if qos else 0)
    assert body[header.payload_start :] == payload
    assert body[header.properties_start : header.payload_start] == packed
    # Any cut inside the header is malformed, never a wrong answer.
    for cut in range(header.payload_start):
        with pytest.raises(MalformedPublish):
            decode_publish_header(body[:cut], qos)


@given(
    props=publish_properties,
    topic=st.text(min_size=1, max_size=80).map(str.encode),
    mid=st.integers(1, 65535),
    qos=st.sampled_from([0, 1, 2]),
    retain=st.booleans(),
    dup=st.booleans(),
    payload=st.binary(max_size=300) | st.sampled_from([b"\x5a" * 200_000]),
)
def test_paho_reads_the_publish_headers_we_frame(
    props: PublishProperties,
    topic: bytes,
    mid: int,
    qos: int,
    retain: bool,
    dup: bool,
    payload: bytes,
) -> None:
    """A payload sent from a file follows a header we frame (agent.mqtt.fast_path, for a
    FileRegion); checked with paho's own decoder, private, of the releases that path is
    tested with."""
    _packet = pytest.importorskip("paho.mqtt._packet")
    header = encode_publish_header(
        topic, mid, qos, retain, dup, encode_properties(props), len(payload)
    )
    packet = header + payload
    remaining, used = VariableByteIntegers.decode(packet[1:])  # type: ignore[no-untyped-call]
    assert remaining == len(packet) - 1 - used  # the length covers exactly the rest
    theirs = _packet.decode_publish(packet[0], packet[1 + used :], MQTTProtocolVersion.MQTTv5)
    assert packet[0] >> 4 == 3  # PUBLISH
    assert (theirs.dup, theirs.qos, theirs.retain) == (dup, qos, retain)
    assert (theirs.topic, theirs.mid) == (topic, mid if qos else 0)
    assert theirs.payload == payload
    assert getattr(theirs.properties, "CorrelationData", None) == props.correlation_data
    assert tuple(getattr(theirs.properties, "UserProperty", ())) == props.user_properties


def test_publish_headers_that_do_not_fit_mqtt_are_refused() -> None:
    with pytest.raises(ValueError, match="QoS 3"):
        encode_publish_header(b"t", 1, 3, False, False, b"\x00", 0)
    with pytest.raises(ValueError, match="topic is 65536 bytes"):
        encode_publish_header(b"t" * 65536, 1, 1, False, False, b"\x00", 0)
    with pytest.raises(ValueError, match="variable byte integer"):
        encode_publish_header(b"t", 1, 1, False, False, b"\x00", 268_435_455)


def test_properties_the_agent_does_not_use_are_skipped() -> None:
    theirs = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    theirs.PayloadFormatIndicator = 1
    theirs.ContentType = "application/json"
    theirs.SubscriptionIdentifier = [300]
    theirs.TopicAlias = 7
    theirs.CorrelationData = b"c"
    body = publish_body(b"t", 1, theirs.pack(), b"data")  # type: ignore[no-untyped-call]
    header = decode_publish_header(body, 1)
    assert header.properties == PublishProperties(correlation_data=b"c")
    assert body[header.payload_start :] == b"data"


@pytest.mark.parametrize(
    ("properties", "message"),
    [
        (b"\x02\x21\x00", "is not a PUBLISH property"),  # Receive Maximum: CONNECT only
        (b"\x04\x08\x00\x01\xff", "response topic is not UTF-8"),
        (b"\x06\x26\x00\x01\xfe\x00\x00", "user property is not UTF-8"),
        (b"\x07\x26\x00\x01a\x00\x01\x00", "user property contains U\\+0000"),
        (b"\xff\xff\xff\xff\x7f", "over 4 bytes"),
        (b"\x03\x02\x00\x00", "inside its message expiry"),
    ],
)
def test_a_bad_property_section_is_malformed(properties: bytes, message: str) -> None:
    with pytest.raises(MalformedPublish, match=message):
        decode_publish_header(publish_body(b"t", 0, properties, b"payload"), 0)


def test_fields_that_do_not_fit_mqtt_are_refused_when_encoding() -> None:
    with pytest.raises(ValueError, match="correlation data is 65536 bytes"):
        encode_properties(PublishProperties(correlation_data=b"x" * 65536))
    with pytest.raises(ValueError, match="response topic contains U\\+0000"):
        encode_properties(PublishProperties(response_topic="a\x00b"))
    with pytest.raises(ValueError, match="user property value is not encodable as UTF-8"):
        encode_properties(PublishProperties(user_properties=(("k", "\ud800"),)))
    with pytest.raises(ValueError, match="not a 4-byte integer"):
        encode_properties(PublishProperties(expiry_s=2**32))
    with pytest.raises(ValueError, match="variable byte integer"):
        encode_variable_int(268_435_456)
    assert encode_variable_int(268_435_455) == b"\xff\xff\xff\x7f"
    assert encode_properties(PublishProperties()) == b"\x00"
