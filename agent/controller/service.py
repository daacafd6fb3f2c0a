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

from agent.controller.config import ControllerConfig
from agent.controller.protocol import report_subscriptions, split_report_topic
from agent.controller.server import ChunkServer, stats_event
from agent.controller.status import StatusBook
from agent.controller.store import ArtifactStore
from agent.mqtt_client import Message, MqttClient

log = logging.getLogger("agent.controller")

STATS_INTERVAL_S: Final = 10.0
CONNECT_LOG_INTERVAL_S: Final = 10.0


class ControllerService:
    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        self.store = ArtifactStore(config.store_dir)
        self.client = MqttClient(config.broker)
        self.server = ChunkServer(
            self.client,
            self.store,
            prefix=config.prefix,
            share_group=config.share_group,
            max_chunk_bytes=config.max_chunk_bytes,
            max_bytes_per_s=config.max_bytes_per_s,
        )
        self.status = StatusBook(config.status_file)
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
        parsed = split_report_topic(self.config.prefix, message.topic)
        if parsed is not None:
            self.status.observe(parsed[0], parsed[1], message.payload)
            self.status.maybe_flush()

    async def _consume(self) -> None:
        while True:
            await self._handle(await self.client.messages.get())

    async def _tick(self, started: float) -> None:
        last_chunks = 0
        next_stats = time.monotonic() + STATS_INTERVAL_S
        while True:
            await asyncio.sleep(0.5)
            self.status.maybe_flush()
            now = time.monotonic()
            if now >= next_stats:
                next_stats = now + STATS_INTERVAL_S
                if self.server.stats.chunks != last_chunks:
                    last_chunks = self.server.stats.chunks
                    log.info("stats", extra=stats_event(self.server.stats, started))

    async def run(self) -> None:
        started = time.monotonic()
        try:
            if not await self._connect():
                return
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
                },
            )
            consumer = asyncio.create_task(self._consume())
            ticker = asyncio.create_task(self._tick(started))
            await self._stop.wait()
            for task in (consumer, ticker):
                task.cancel()
            await asyncio.gather(consumer, ticker, return_exceptions=True)
        finally:
            await self.server.close()
            self.status.maybe_flush(force=True)
            await self.client.stop()
            log.info("stopped", extra=stats_event(self.server.stats, started))


async def serve(config: ControllerConfig) -> None:
    service = ControllerService(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)
    try:
        await service.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
