"""agent.mqtt.client against a real mosquitto: acknowledgement bookkeeping.

Every behaviour test runs twice: on the fast path (agent.mqtt.fast_path, where the
installed paho is one it was tested with) and on paho's public API alone
(PUBLIC_PATH_ENV=1, what any other paho release gets)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import paho.mqtt
import paho.mqtt.client as paho_client
import pytest

from agent.mqtt import fast_path
from agent.mqtt.client import (
    PUBLIC_PATH_ENV,
    FileRegion,
    Message,
    MqttClient,
    MqttError,
    MqttSettings,
)
from tests.fleet_device import device_settings
from tests.mqtt_broker import CONTROLLER_IDENTITY, BrokerFactory, MosquittoBroker

MID_SPACE = 65535  # paho's message ids run 1..65535 and wrap


@pytest.fixture(autouse=True, params=["fast", "public"])
def mqtt_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which path the clients of a test take; "fast" is skipped where paho is untested."""
    if request.param == "fast" and not fast_path.AVAILABLE:
        pytest.skip(f"fast path untested on paho {paho.mqtt.__version__}")
    if request.param == "public":
        monkeypatch.setenv(PUBLIC_PATH_ENV, "1")
    else:
        monkeypatch.delenv(PUBLIC_PATH_ENV, raising=False)
    return str(request.param)


def fast_counters(client: MqttClient) -> fast_path.FastClient:
    assert isinstance(client._client, fast_path.FastClient)
    return client._client


def test_the_fast_path_is_taken_exactly_where_paho_is_a_tested_release(mqtt_path: str) -> None:
    settings = MqttSettings(client_id="never-started")  # constructed only, never connects
    installed_tested = paho.mqtt.__version__ in fast_path.TESTED_PAHO_VERSIONS
    assert fast_path.AVAILABLE is installed_tested
    assert not fast_path.supported("2.0.0") and not fast_path.supported("3.0.0")
    default = MqttClient(settings)
    assert default.fast_path is (installed_tested and mqtt_path == "fast")
    assert isinstance(default._client, fast_path.FastClient) is default.fast_path
    # The constructor flag overrides the environment one way only: to the public path.
    assert MqttClient(settings, fast_path=False).fast_path is False
    assert type(MqttClient(settings, fast_path=False)._client) is paho_client.Client
    assert MqttClient(settings, fast_path=True).fast_path is installed_tested


@contextlib.asynccontextmanager
async def receiver_and_sender(
    broker: MosquittoBroker, device: str, topic: str, **sender_settings: Any
) -> AsyncIterator[tuple[MqttClient, MqttClient]]:
    """Two connected clients of ``device``; the first subscribed to ``topic`` (QoS 1)."""
    receiver = MqttClient(device_settings(broker, device, client_id=f"{device}-rx"))
    sender = MqttClient(device_settings(broker, device, **sender_settings))
    await receiver.start()
    await sender.start()
    try:
        await receiver.wait_connected(10)
        await sender.wait_connected(10)
        await receiver.subscribe(topic, qos=1)
        yield receiver, sender
    finally:
        await sender.stop()
        await receiver.stop()


def test_awaited_publish_after_mid_wraparound_still_waits_for_its_own_ack(
    mqtt_tls_broker: MosquittoBroker,
) -> None:
    """Acks of publishes nobody awaits must not answer a later publish with the same id.

    After MID_SPACE un-awaited QoS 1 publishes every message id has been used once;
    an awaited publish the broker refuses (ACL) must still raise.
    """

    async def scenario() -> None:
        client = MqttClient(device_settings(mqtt_tls_broker, "dev-a", max_inflight=1000))
        await client.start()
        try:
            await client.wait_connected(10)
            for i in range(MID_SPACE):
                await client.publish("edge/devices/dev-a/health", b"%d" % i, qos=1, wait_ack=False)
                if i % 10_000 == 9_999:
                    # paho refuses a 65,536th unacknowledged message ("queue full"): on a
                    # fast machine the broker's PUBACKs lag the loop, so let them catch up.
                    await client.publish("edge/devices/dev-a/health", b"sync", qos=1)
            # Let every PUBACK arrive, then pass the id space once more with awaited
            # publishes that the broker accepts.
            await client.publish("edge/devices/dev-a/health", b"sync", qos=1)
            with pytest.raises(MqttError, match="Not authorized"):
                await client.publish("edge/devices/dev-b/health", b"forged", qos=1)
        finally:
            await client.stop()

    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_a_lost_connection_is_a_warning_and_our_own_stop_is_not(
    mqtt_broker: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.mqtt")

    async def scenario() -> None:
        ours = MqttClient(device_settings(mqtt_broker, "dev-a"))
        lost = MqttClient(device_settings(mqtt_broker, "dev-b"))
        for client in (ours, lost):
            await client.start()
            await client.wait_connected(10)
        await ours.stop()
        mqtt_broker.stop()
        for _ in range(200):  # bounded: 10 s
            if not lost.connected.is_set():
                break
            await asyncio.sleep(0.05)
        await lost.stop()

    asyncio.run(asyncio.wait_for(scenario(), 60))
    levels = sorted(r.levelno for r in caplog.records if r.getMessage() == "mqtt disconnected")
    assert levels == [logging.INFO, logging.WARNING]


def test_a_burst_of_messages_and_acks_reaches_the_loop_complete_and_in_order(
    mqtt_broker: MosquittoBroker,
) -> None:
    """Hand-offs from paho's thread are batched (one loop wake-up per burst): a burst
    of 2,000 QoS 1 messages published back to back must still all arrive, in order,
    and every awaited publish must still get its own acknowledgement."""
    count = 2_000
    topic = "edge/devices/dev-burst/health"

    async def scenario() -> None:
        async with receiver_and_sender(mqtt_broker, "dev-burst", topic, max_inflight=1000) as (
            receiver,
            sender,
        ):
            sends = [
                asyncio.create_task(sender.publish(topic, b"%d" % i, qos=1)) for i in range(count)
            ]
            await asyncio.gather(*sends)  # every ack arrived
            got = [
                int((await asyncio.wait_for(receiver.messages.get(), 10)).payload)
                for _ in range(count)
            ]
            assert got == list(range(count))
            assert receiver.messages.empty()

    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_inline_handlers_take_messages_on_the_network_thread_and_decline_the_rest(
    mqtt_broker: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """take_inline: the handler sees only its topics, on paho's thread; what it takes
    is not queued, what it declines (or fails on) is; publish_nowait works from it."""
    base = "edge/devices/dev-inline"
    seen: list[tuple[bytes, int]] = []

    async def scenario() -> None:
        async with receiver_and_sender(mqtt_broker, "dev-inline", f"{base}/#") as (
            receiver,
            sender,
        ):

            def handler(message: Message) -> bool:
                seen.append((message.payload, threading.get_ident()))
                if message.payload.startswith(b"take"):
                    receiver.publish_nowait(message.topic, b"echo:" + message.payload)
                    return True
                if message.payload == b"boom":
                    raise RuntimeError("handler bug")
                return False

            receiver.take_inline(f"{base}/health", handler)
            for topic, payload in [
                (f"{base}/health", b"take-1"),
                (f"{base}/health", b"keep-1"),
                (f"{base}/state", b"take-other"),  # not the handler's topic
                (f"{base}/health", b"boom"),
                (f"{base}/health", b"take-2"),
            ]:
                await sender.publish(topic, payload, qos=1)
            queued = {(await asyncio.wait_for(receiver.messages.get(), 10)).payload
                      for _ in range(5)}
            assert queued == {b"keep-1", b"take-other", b"boom", b"echo:take-1", b"echo:take-2"}
            await asyncio.sleep(0.3)
            assert receiver.messages.empty()
            assert sorted(p for p, _ in seen) == sorted(
                [b"take-1", b"keep-1", b"boom", b"take-2", b"echo:take-1", b"echo:take-2"]
            )
            assert threading.get_ident() not in {t for _, t in seen}
            assert len({t for _, t in seen}) == 1  # paho's network thread

    with caplog.at_level(logging.ERROR, logger="agent.mqtt"):
        asyncio.run(asyncio.wait_for(scenario(), 60))
    assert "inline message handler failed" in caplog.text


@pytest.mark.parametrize("qos", [0, 1])
def test_messages_arrive_whole_with_their_properties_on_the_copy_saving_paths(
    mqtt_broker: MosquittoBroker, qos: int, mqtt_path: str
) -> None:
    """Large packets skip paho's copies on both ends, and properties take our codec
    (agent.mqtt.client._PahoClient): every payload must still arrive byte for byte, with
    topic, properties and QoS, large or small."""
    topic = "edge/devices/dev-big/artifacts"
    big = [bytes([i]) * 100 + bytes(range(256)) * (1024 + 37 * i) for i in range(3)]
    props = {"offset": "1048576", "total": "104857600", "status": "ok"}

    async def scenario() -> None:
        async with receiver_and_sender(mqtt_broker, "dev-big", topic) as (receiver, sender):
            for i, payload in enumerate([big[0], b"small", *big[1:]]):
                await sender.publish(
                    topic,
                    payload,
                    qos=qos,
                    response_topic=f"{topic}/reply",
                    correlation_data=b"corr-%d" % i,
                    user_properties=props,
                    expiry_s=30,
                )
            got = [await asyncio.wait_for(receiver.messages.get(), 10) for _ in range(4)]
            assert [m.payload for m in got] == [big[0], b"small", *big[1:]]
            for i, m in enumerate(got):
                assert (m.topic, m.qos, m.response_topic) == (topic, qos, f"{topic}/reply")
                assert m.correlation_data == b"corr-%d" % i
                assert m.user_properties == props
                assert m.expiry_s is not None and 0 < m.expiry_s <= 30
            if mqtt_path == "fast":
                # All four were decoded by agent.mqtt.codec; the three large ones (and
                # only they) were queued as views.
                assert fast_counters(receiver).publishes_decoded == 4
                assert fast_counters(sender).packets_viewed == 3
            else:
                assert not receiver.fast_path and not sender.fast_path

    asyncio.run(asyncio.wait_for(scenario(), 60))


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_a_payload_sent_from_a_file_arrives_byte_for_byte(
    mosquitto_factory: BrokerFactory, tmp_path: Path, transport: str, mqtt_path: str
) -> None:
    """A FileRegion payload goes from the page cache to the socket (sendfile) on plain
    TCP, in pieces through TLS; either way the receiver gets exactly the region's bytes
    with the message's properties, for regions larger than the socket's buffers."""
    broker = mosquitto_factory(tls=transport == "tls")
    data = os.urandom(3 * 1024 * 1024 + 123)
    path = tmp_path / "blob"
    path.write_bytes(data)
    regions = [
        (0, 1024 * 1024 + 7),
        (1024 * 1024 + 7, 5),
        (1024 * 1024 + 12, len(data) - 1024 * 1024 - 12),
    ]
    topic = "edge/devices/dev-file/artifacts"

    async def scenario() -> None:
        receiver = MqttClient(device_settings(broker, "dev-file", clean_start=True))
        sender = MqttClient(device_settings(broker, CONTROLLER_IDENTITY, clean_start=True))
        for client in (receiver, sender):
            await client.start()
            await client.wait_connected(10)
        try:
            await receiver.subscribe(topic, qos=1)
            with path.open("rb") as blob:
                for i, (offset, length) in enumerate(regions):
                    await sender.publish(
                        topic,
                        FileRegion(blob, offset, length),
                        qos=1,
                        correlation_data=b"c%d" % i,
                        user_properties={"offset": str(offset)},
                        expiry_s=30,
                    )
            got = [await asyncio.wait_for(receiver.messages.get(), 10) for _ in regions]
            for i, (message, (offset, length)) in enumerate(zip(got, regions, strict=True)):
                assert message.payload == data[offset : offset + length]
                assert message.correlation_data == b"c%d" % i
                assert message.user_properties == {"offset": str(offset)}
            if mqtt_path == "fast":
                assert fast_counters(sender).files_sent == len(regions)
                assert fast_counters(sender).packets_viewed == 0  # no copy of the payload
        finally:
            await sender.stop()
            await receiver.stop()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_file_payload_published_while_offline_is_sent_from_the_file_on_reconnect(
    mqtt_broker: MosquittoBroker, tmp_path: Path, mqtt_path: str
) -> None:
    """paho keeps an unacknowledged QoS 1 message and sends it again after a reconnect;
    a FileRegion must survive that (and the descriptor must stay open until then)."""
    data = os.urandom(700_001)
    path = tmp_path / "blob"
    path.write_bytes(data)
    topic = "edge/devices/dev-resend/artifacts"

    async def scenario() -> None:
        receiver = MqttClient(device_settings(mqtt_broker, "dev-resend-rx"))  # persistent
        sender = MqttClient(device_settings(mqtt_broker, "dev-resend-tx"))
        for client in (receiver, sender):
            await client.start()
            await client.wait_connected(10)
        try:
            await receiver.subscribe(topic, qos=1)
            mqtt_broker.stop()  # SIGTERM: mosquitto saves the receiver's session
            for _ in range(200):  # bounded: 10 s
                if not sender.connected.is_set():
                    break
                await asyncio.sleep(0.05)
            assert not sender.connected.is_set()
            with path.open("rb") as blob:
                publishing = asyncio.create_task(
                    sender.publish(topic, FileRegion(blob, 1, len(data) - 2), qos=1)
                )
                await asyncio.sleep(0.2)
                assert not publishing.done()
                assert sender.unacknowledged() == 1  # paho holds it while offline
                if mqtt_path == "fast":
                    assert fast_counters(sender).files_sent == 0  # refused for now: offline
                mqtt_broker.start()
                await asyncio.wait_for(publishing, 20)
            assert sender.unacknowledged() == 0
            message = await asyncio.wait_for(receiver.messages.get(), 20)
            assert message.payload == data[1:-1]
            if mqtt_path == "fast":
                assert fast_counters(sender).files_sent == 1  # the resend, from the file
        finally:
            await sender.stop()
            await receiver.stop()

    asyncio.run(asyncio.wait_for(scenario(), 60))
