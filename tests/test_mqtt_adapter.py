"""agent.mqtt_client against a real mosquitto: acknowledgement bookkeeping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agent.mqtt_client import MqttClient, MqttError
from tests.fleet_device import device_settings
from tests.mqtt_broker import MosquittoBroker

MID_SPACE = 65535  # paho's message ids run 1..65535 and wrap


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
                asyncio.create_task(sender.publish(topic, b"%d" % i, qos=1))
                for i in range(count)
            ]
            await asyncio.gather(*sends)  # every ack arrived
            got = [
                int((await asyncio.wait_for(receiver.messages.get(), 10)).payload)
                for _ in range(count)
            ]
            assert got == list(range(count))
            assert receiver.messages.empty()

    asyncio.run(asyncio.wait_for(scenario(), 120))


@pytest.mark.parametrize("qos", [0, 1])
def test_messages_arrive_whole_with_their_properties_on_the_copy_saving_paths(
    mqtt_broker: MosquittoBroker, qos: int
) -> None:
    """Large packets skip paho's copies on both ends, and properties take our codec
    (agent.mqtt_client._PahoClient): every payload must still arrive byte for byte, with
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
            # All four were decoded by agent.mqtt_codec; the three large ones (and only
            # they) were queued as views.
            assert receiver._client.publishes_decoded == 4
            assert sender._client.packets_viewed == 3

    asyncio.run(asyncio.wait_for(scenario(), 60))
