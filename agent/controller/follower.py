"""Follow what devices report over one MQTT connection (for one-shot commands).

``edge-controller deploy --group`` and ``rollout resume`` need the fleet's live
state without a ``serve`` process: this subscribes to the report topics (not
shared: every controller sees every report), feeds a :class:`StatusBook`, and
``settle`` waits until the broker has delivered the retained ``reported``
messages (no new message for ``quiet_s``, bounded by ``timeout``). It follows
the retained ``desired`` messages too, so that reports bind to the envelopes
other controllers published (``PublishedEnvelopes``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

from agent.controller import fleetview
from agent.controller import rollout as ro
from agent.controller.envelopes import (
    PublishedEnvelopes,
    desired_subscription,
    device_of_desired_topic,
)
from agent.controller.status import StatusBook
from agent.mqtt.client import MqttClient, MqttSettings
from agent.protocol.topics import report_subscriptions, split_report_topic


class FleetFollower:
    def __init__(
        self, settings: MqttSettings, prefix: str, envelopes: PublishedEnvelopes | None = None
    ) -> None:
        self.client = MqttClient(settings)
        self.prefix = prefix
        self.envelopes = envelopes if envelopes is not None else PublishedEnvelopes()
        self.book = StatusBook(None, envelopes=self.envelopes)
        self.last_message = 0.0
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout: float) -> None:
        await self.client.start()
        await self.client.wait_connected(timeout)
        self._task = asyncio.create_task(self._consume())
        await self.client.subscribe(desired_subscription(self.prefix), qos=1)
        for topic_filter in report_subscriptions(self.prefix):
            await self.client.subscribe(topic_filter, qos=1)
        self.last_message = time.monotonic()

    async def _consume(self) -> None:
        while True:
            message = await self.client.messages.get()
            device = device_of_desired_topic(self.prefix, message.topic)
            if device is not None:
                self.envelopes.observe_desired(device, message.payload)
                continue
            parsed = split_report_topic(self.prefix, message.topic)
            if parsed is not None:
                self.book.observe(parsed[0], parsed[1], message.payload)
                self.last_message = time.monotonic()

    async def settle(self, quiet_s: float = 0.5, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if time.monotonic() - self.last_message >= quiet_s:
                return
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.client.stop()

    def observe(self, plan: ro.RolloutPlan) -> Mapping[str, ro.DeviceObservation]:
        return observations(self.book, plan)


def observations(book: StatusBook, plan: ro.RolloutPlan) -> dict[str, ro.DeviceObservation]:
    return {
        device: fleetview.observation(
            book.devices.get(device, {"device": device}), plan.model, plan.version
        )
        for device in plan.devices
    }
