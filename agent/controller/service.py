"""``edge-controller serve``: one MQTT connection, the chunk server and the status book.

Logs one JSON event ``serving`` once the broker acknowledged every subscription,
``stats`` every ``STATS_INTERVAL_S`` while chunks flow, and ``stopped`` (with the
final counters) after SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec

from agent.common.allocator import keep_large_buffers
from agent.common.background import BackgroundThread
from agent.controller import rollout as ro
from agent.controller.config import ControllerConfig
from agent.controller.envelopes import (
    PublishedEnvelopes,
    deploy_trust,
    desired_subscription,
    device_of_desired_topic,
)
from agent.controller.follower import observations
from agent.controller.rollout_driver import RolloutBook, RolloutDriver, owner_id
from agent.controller.server import ChunkServer, stats_event
from agent.controller.status import StatusBook
from agent.controller.store import ArtifactStore, StoreError
from agent.mqtt.client import Message, MqttClient, MqttError
from agent.protocol.topics import report_subscriptions, split_report_topic

log = logging.getLogger("agent.controller")

STATS_INTERVAL_S: Final = 10.0
ROLLOUT_TICK_S: Final = 1.0
CONNECT_LOG_INTERVAL_S: Final = 10.0


class ControllerService:
    def __init__(self, config: ControllerConfig, allocator_tuned: bool = False) -> None:
        self.config = config
        self.allocator_tuned = allocator_tuned  # reported in the ``serving`` event
        self.store = ArtifactStore(config.store_dir)
        self.client = MqttClient(config.broker)
        key = _load_key(config) if config.deploy_key is not None else None
        # What was published: reports bind to it, blobs are served by it. Filled from
        # the store in run() and from the retained desired messages as they arrive.
        self.envelopes = PublishedEnvelopes(
            deploy_trust(key.public_key()) if key is not None else None, self.store
        )
        self.server = ChunkServer(
            self.client,
            self.store,
            grants=self.envelopes,
            prefix=config.prefix,
            share_group=config.share_group,
            max_chunk_bytes=config.max_chunk_bytes,
            max_bytes_per_s=config.max_bytes_per_s,
        )
        self.status = StatusBook(config.status_file, envelopes=self.envelopes)
        # The status file is written off the loop (an fsync can take long and the chunk
        # server shares the loop), one write at a time.
        self._status_writer = BackgroundThread("status-write", nice=0)
        self._status_write: asyncio.Future[None] | None = None
        self.rollouts = RolloutBook(config.store_dir)
        self.driver: RolloutDriver | None = None
        if key is not None:
            self.driver = RolloutDriver(
                self.store,
                self.rollouts,
                self.client,
                config.prefix,
                key,
                owner_id(f"serve {config.broker.client_id}"),
                lease_ttl_s=config.rollout.lease_ttl_s,
                envelopes=self.envelopes,
            )
        self._stop = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    async def _connect(self) -> bool:
        await self.client.start()
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self.client.connected.wait(), CONNECT_LOG_INTERVAL_S)
                return True
            except TimeoutError:
                log.warning(
                    "waiting for the broker",
                    extra={"broker": f"{self.config.broker.host}:{self.config.broker.port}"},
                )
        return False

    async def _handle(self, message: Message) -> None:
        if self.server.handles(message.topic):
            await self.server.dispatch(message)
            return
        device = device_of_desired_topic(self.config.prefix, message.topic)
        if device is not None:
            self.envelopes.observe_desired(device, message.payload)
            return
        parsed = split_report_topic(self.config.prefix, message.topic)
        if parsed is not None:
            self.status.observe(parsed[0], parsed[1], message.payload)
            self._flush_status()

    def _flush_status(self, force: bool = False) -> None:
        if self._status_write is not None and not self._status_write.done():
            return  # the next call after this write catches up
        if self.status.flush_due(force):
            data = self.status.encode()
            self._status_write = asyncio.ensure_future(
                self._status_writer.run(self.status.write, data)
            )

    async def _status_written(self) -> None:
        if self._status_write is not None:
            await asyncio.gather(self._status_write, return_exceptions=True)

    async def _last_status_flush(self) -> None:
        await self._status_written()  # the write under way, then whatever came after it
        self._flush_status(force=True)
        await self._status_written()
        await self._status_writer.close()

    async def _consume(self) -> None:
        while True:
            await self._handle(await self.client.messages.get())

    async def _tick(self, started: float) -> None:
        last_chunks = 0
        next_stats = time.monotonic() + STATS_INTERVAL_S
        while True:
            await asyncio.sleep(0.5)
            self._flush_status()
            now = time.monotonic()
            if now >= next_stats:
                next_stats = now + STATS_INTERVAL_S
                if self.server.stats.chunks != last_chunks:
                    last_chunks = self.server.stats.chunks
                    log.info("stats", extra=stats_event(self.server.stats, started))

    async def _drive_rollouts(self) -> None:
        """Resume and drive every unfinished rollout whose lease this process gets."""
        driver = self.driver
        if driver is None:
            return
        # Reports (retained reported states) arrive first; do not judge an empty book.
        await asyncio.sleep(ROLLOUT_TICK_S)
        while True:
            for rollout_id in self.rollouts.ids():
                try:
                    state = self.rollouts.load(rollout_id)
                    if state.finished or state.status == "paused":
                        continue
                    after = await driver.step(
                        rollout_id, lambda plan: observations(self.status, plan)
                    )
                except (ro.RolloutError, StoreError, MqttError) as exc:
                    log.error(
                        "rollout step failed", extra={"rollout": rollout_id, "reason": str(exc)}
                    )
                    continue
                if after is not None and after.updated_at != state.updated_at:
                    log.info(
                        "rollout",
                        extra={
                            "rollout": rollout_id,
                            "status": after.status,
                            "wave": (after.current_wave or 0) + 1,
                            "note": after.history[-1][1] if after.history else "",
                        },
                    )
            await asyncio.sleep(ROLLOUT_TICK_S)

    async def run(self) -> None:
        started = time.monotonic()
        try:
            if not await self._connect():
                return
            await asyncio.to_thread(self.envelopes.load_store, self.store)
            # Desired (retained) before chunk requests and reports: the deployments that
            # grant blobs and bind reports are known before either arrives (the broker
            # sends a subscription's retained messages before it handles the next one).
            await self.client.subscribe(desired_subscription(self.config.prefix), qos=1)
            await self.server.start()
            for topic_filter in report_subscriptions(self.config.prefix):
                await self.client.subscribe(topic_filter, qos=1)
            log.info(
                "serving",
                extra={
                    "broker": f"{self.config.broker.host}:{self.config.broker.port}",
                    "client_id": self.config.broker.client_id,
                    "subscription": self.server.subscription,
                    "store": str(self.config.store_dir),
                    "allocator_tuned": self.allocator_tuned,
                    "deployments_known": len(self.envelopes),
                },
            )
            consumer = asyncio.create_task(self._consume())
            ticker = asyncio.create_task(self._tick(started))
            rollouts = asyncio.create_task(self._drive_rollouts())
            await self._stop.wait()
            for task in (consumer, ticker, rollouts):
                task.cancel()
            await asyncio.gather(consumer, ticker, rollouts, return_exceptions=True)
        finally:
            await self.server.close()
            await self._last_status_flush()
            await self.client.stop()
            log.info("stopped", extra=stats_event(self.server.stats, started))


def _load_key(config: ControllerConfig) -> ec.EllipticCurvePrivateKey:
    from agent.signing import keys

    assert config.deploy_key is not None
    passphrase = (
        keys.read_passphrase_file(config.passphrase_file) if config.passphrase_file else None
    )
    return keys.load_private_key(config.deploy_key, passphrase)


async def serve(config: ControllerConfig) -> None:
    # Process-wide, so here in the composition root rather than in the service.
    allocator_tuned = keep_large_buffers(config.max_chunk_bytes)
    service = ControllerService(config, allocator_tuned=allocator_tuned)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)
    try:
        await service.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
