"""The chunked downloader: byte ranges, partial files, resume, refusals.

The fetcher here is an in-memory implementation of the ``ChunkFetcher``
interface (the MQTT one is exercised end to end in test_fleet_updates.py), so
these tests can count, reorder and falsify answers precisely.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.fleet import downloader as downloader_module
from agent.fleet.downloader import (
    ArtifactNotFoundError,
    ChunkInvalidError,
    ChunkTimeoutError,
    Downloader,
    DownloadSettings,
    PartialFile,
    RangeSet,
)
from agent.protocol.deployment import DeploymentFile, DigestMismatchError


def artifact(path: str, data: bytes) -> DeploymentFile:
    return DeploymentFile(path, hashlib.sha256(data).hexdigest(), len(data))


class MemoryFetcher:
    """Serves blobs from memory; ``hook`` may replace an answer or raise."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.requests: list[tuple[str, int, int]] = []
        self.hook: Callable[[str, int, int, bytes], bytes] | None = None
        self.is_online = True

    async def wait_online(self) -> None:
        for _ in range(1000):
            if self.is_online:
                return
            await asyncio.sleep(0.001)
        raise AssertionError("never came online")

    def online(self) -> bool:
        return self.is_online

    async def fetch(self, sha256: str, offset: int, length: int) -> bytes:
        self.requests.append((sha256, offset, length))
        await asyncio.sleep(0)
        blob = self.blobs.get(sha256)
        if blob is None:
            raise ArtifactNotFoundError(sha256)
        data = blob[offset : offset + length]
        if self.hook is not None:
            data = self.hook(sha256, offset, length, data)
        return data


SETTINGS = DownloadSettings(chunk_bytes=1000, window=3, retries=2, retry_backoff_s=0.0)


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- ranges


def test_ranges_merge_and_report_what_is_missing() -> None:
    r = RangeSet()
    r.add(10, 20)
    r.add(30, 40)
    r.add(20, 30)
    assert list(r.ranges) == [(10, 40)]
    r.add(0, 5)
    assert r.total() == 35
    assert r.missing(50, 4) == [(5, 4), (9, 1), (40, 4), (44, 4), (48, 2)]
    assert r.covers(12, 40) and not r.covers(4, 6)
    r.add(5, 5)  # empty: ignored
    assert list(r.ranges) == [(0, 5), (10, 40)]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 60)), max_size=25),
    st.integers(1, 250),
    st.integers(1, 40),
)
def test_ranges_agree_with_a_set_of_bytes(
    spans: list[tuple[int, int]], size: int, chunk: int
) -> None:
    r = RangeSet()
    covered: set[int] = set()
    for start, length in spans:
        r.add(start, start + length)
        covered |= set(range(start, start + length))
    assert r.total() == len(covered)
    previous_end = -1
    for a, b in r.ranges:
        assert a < b and a > previous_end  # sorted, merged, never touching
        previous_end = b
    requested: set[int] = set()
    for offset, length in r.missing(size, chunk):
        assert 0 < length <= chunk and offset + length <= size
        span = set(range(offset, offset + length))
        assert not span & requested
        requested |= span
    assert requested == set(range(size)) - covered


# --------------------------------------------------------------------------- downloads


def test_download_assembles_every_file(tmp_path: Path) -> None:
    big = os.urandom(10_500)
    files = [artifact("model.onnx", big), artifact("sub/copy.onnx", big),
             artifact("empty.txt", b""), artifact("model.sig", b"sig")]
    fetcher = MemoryFetcher({f.sha256: d for f, d in zip(files, [big, big, b"", b"sig"],
                                                         strict=True)})
    progress: list[tuple[int, int]] = []
    downloader = Downloader(tmp_path / "dl", fetcher, SETTINGS,
                            lambda done, total: progress.append((done, total)))
    dest = tmp_path / "staged"
    run(downloader.download([(f, dest / f.path) for f in files]))
    assert (dest / "model.onnx").read_bytes() == big
    assert (dest / "sub" / "copy.onnx").read_bytes() == big  # same digest: fetched once
    assert (dest / "empty.txt").read_bytes() == b""
    assert (dest / "model.sig").read_bytes() == b"sig"
    assert len(fetcher.requests) == 11 + 1  # 11 chunks of the big blob, 1 for model.sig
    assert progress[-1] == (10_503, 10_503)
    assert list((tmp_path / "dl").iterdir()) == []


def test_requests_never_reach_past_the_declared_size(tmp_path: Path) -> None:
    data = os.urandom(5_000)
    f = artifact("a", data)
    fetcher = MemoryFetcher({f.sha256: data + b"more bytes the controller has"})
    fetcher.blobs[f.sha256] = data + b"x" * 5000
    downloader = Downloader(tmp_path / "dl", fetcher, SETTINGS)
    run(downloader.download([(f, tmp_path / "out" / "a")]))
    assert max(offset + length for _, offset, length in fetcher.requests) == 5_000


def test_a_longer_answer_is_refused_and_never_written(tmp_path: Path) -> None:
    data = os.urandom(3_000)
    f = artifact("a", data)
    fetcher = MemoryFetcher({f.sha256: data})
    sizes: list[int] = []
    part = tmp_path / "dl" / f"{f.sha256}.part"

    def longer(sha: str, offset: int, length: int, chunk: bytes) -> bytes:
        if part.exists():
            sizes.append(part.stat().st_size)
        return chunk + b"endless data" if offset == 1000 else chunk

    fetcher.hook = longer
    downloader = Downloader(tmp_path / "dl", fetcher, SETTINGS)
    with pytest.raises(ChunkInvalidError, match="bytes for a request of 1000"):
        run(downloader.download([(f, tmp_path / "out" / "a")]))
    assert [r[1] for r in fetcher.requests].count(1000) == 3  # tried, retried, refused
    assert set(sizes) <= {3_000}  # the partial file is the declared size, never more
    assert not (tmp_path / "out" / "a").exists()


def test_a_partial_file_refuses_bytes_beyond_the_declared_size(tmp_path: Path) -> None:
    f = artifact("a", b"0123456789")
    partial = PartialFile(tmp_path, f)

    async def go() -> None:
        partial.open()
        with pytest.raises(ChunkInvalidError):
            partial.write(8, b"abc")
        partial.write(0, b"0123")
        assert partial.written.ranges == ((0, 4),)
        partial.close()

    run(go())
    assert (tmp_path / f"{f.sha256}.part").stat().st_size == 10


def test_wrong_content_fails_the_digest_check_and_is_discarded(tmp_path: Path) -> None:
    good = os.urandom(2_500)
    f = artifact("a", good)
    fetcher = MemoryFetcher({f.sha256: bytes(b ^ 1 for b in good)})
    downloader = Downloader(tmp_path / "dl", fetcher, SETTINGS)
    with pytest.raises(DigestMismatchError):
        run(downloader.download([(f, tmp_path / "out" / "a")]))
    assert list((tmp_path / "dl").iterdir()) == []
    assert not (tmp_path / "out").exists()


def test_timeouts_are_retried_then_fail(tmp_path: Path) -> None:
    data = os.urandom(2_500)
    f = artifact("a", data)
    fetcher = MemoryFetcher({f.sha256: data})
    flaky = {"left": 2}

    def sometimes(sha: str, offset: int, length: int, chunk: bytes) -> bytes:
        if offset == 1000 and flaky["left"]:
            flaky["left"] -= 1
            raise ChunkTimeoutError("no answer")
        return chunk

    fetcher.hook = sometimes
    run(Downloader(tmp_path / "dl", fetcher, SETTINGS).download([(f, tmp_path / "o" / "a")]))
    assert (tmp_path / "o" / "a").read_bytes() == data
    assert [r[1] for r in fetcher.requests].count(1000) == 3

    def never(sha: str, offset: int, length: int, chunk: bytes) -> bytes:
        raise ChunkTimeoutError("no answer")

    fetcher.hook = never
    with pytest.raises(ChunkTimeoutError):
        run(Downloader(tmp_path / "dl2", fetcher, SETTINGS).download(
            [(f, tmp_path / "o2" / "a")]))


def test_timeouts_while_offline_do_not_use_up_retries(tmp_path: Path) -> None:
    data = os.urandom(1_500)
    f = artifact("a", data)
    fetcher = MemoryFetcher({f.sha256: data})
    offline_only = {"left": 20}

    def offline(sha: str, offset: int, length: int, chunk: bytes) -> bytes:
        if offline_only["left"]:
            offline_only["left"] -= 1
            fetcher.is_online = False
            raise ChunkTimeoutError("lost in a disconnect")
        return chunk

    fetcher.hook = offline

    async def reconnect_later() -> None:
        for _ in range(1000):
            await asyncio.sleep(0.001)
            fetcher.is_online = True

    async def go() -> None:
        task = asyncio.create_task(reconnect_later())
        await Downloader(tmp_path / "dl3", fetcher, SETTINGS).download(
            [(f, tmp_path / "o3" / "a")])
        task.cancel()

    run(go())
    assert (tmp_path / "o3" / "a").read_bytes() == data


def test_an_artifact_the_controller_does_not_have_fails(tmp_path: Path) -> None:
    f = artifact("a", b"data")
    with pytest.raises(ArtifactNotFoundError):
        run(Downloader(tmp_path / "dl", MemoryFetcher({}), SETTINGS).download(
            [(f, tmp_path / "o" / "a")]))


def test_a_download_resumes_from_the_durable_ranges(tmp_path: Path) -> None:
    data = os.urandom(20_000)
    f = artifact("model.onnx", data)
    fetcher = MemoryFetcher({f.sha256: data})
    served = {"n": 0}

    def stop_after_twelve(sha: str, offset: int, length: int, chunk: bytes) -> bytes:
        served["n"] += 1
        if served["n"] > 12:
            raise ArtifactNotFoundError("controller went away")
        return chunk

    fetcher.hook = stop_after_twelve
    one = DownloadSettings(chunk_bytes=1000, window=1, retries=0)
    with pytest.raises(ArtifactNotFoundError):
        run(Downloader(tmp_path / "dl", fetcher, one).download([(f, tmp_path / "o" / "m")]))
    ranges = json.loads((tmp_path / "dl" / f"{f.sha256}.ranges").read_text())
    assert ranges["done"] == [[0, 12_000]]  # synced before the record claims it
    fetcher.hook = None
    fetcher.requests.clear()
    run(Downloader(tmp_path / "dl", fetcher, one).download([(f, tmp_path / "o" / "m")]))
    assert (tmp_path / "o" / "m").read_bytes() == data
    assert [offset for _, offset, _ in fetcher.requests] == list(range(12_000, 20_000, 1000))


def _unrecorded_at_each_request(
    tmp_path: Path, fsync: Callable[[int], None], every: int, chunk: int, window: int,
    size: int,
) -> tuple[list[int], int]:
    """Download ``size`` bytes; at each request, the bytes already answered that the
    ranges record does not claim (what a crash at that moment would re-request)."""
    data = os.urandom(size)
    f = artifact("model.onnx", data)
    fetcher = MemoryFetcher({f.sha256: data})
    answered = {"bytes": 0}
    lag: list[int] = []
    ranges = tmp_path / "dl" / f"{f.sha256}.ranges"

    def look(sha: str, offset: int, length: int, chunk_data: bytes) -> bytes:
        recorded = 0
        if ranges.exists():  # replaced atomically: always a whole record
            recorded = sum(b - a for a, b in json.loads(ranges.read_bytes())["done"])
        lag.append(answered["bytes"] - recorded)
        answered["bytes"] += len(chunk_data)
        return chunk_data

    fetcher.hook = look
    settings = DownloadSettings(chunk_bytes=chunk, window=window, retries=0)
    downloader = Downloader(tmp_path / "dl", fetcher, settings, fsync=fsync)
    run(downloader.download([(f, tmp_path / "o" / "m")]))
    assert (tmp_path / "o" / "m").read_bytes() == data
    # Answered but not yet written: at most one chunk per request of the window.
    return lag, downloader.unrecorded_bound() + window * chunk


@pytest.mark.parametrize("fsync_delay_s", [0.0, 0.25])
def test_the_ranges_record_never_lags_the_download_by_more_than_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync_delay_s: float
) -> None:
    """Checkpoints come every CHECKPOINT_EVERY_BYTES, and when the fsync is slow the
    download waits for the record instead of running ahead of it: however long an fsync
    takes, a crash re-requests at most the documented bound (here a fast disk and one
    whose every fsync takes a quarter of a second, injected through the downloader)."""
    monkeypatch.setattr(downloader_module, "CHECKPOINT_EVERY_S", 3600.0)  # bytes alone
    mib = 1024 * 1024
    every = mib
    monkeypatch.setattr(downloader_module, "CHECKPOINT_EVERY_BYTES", every)
    fsyncs = {"n": 0}

    def fsync(fd: int) -> None:
        fsyncs["n"] += 1
        time.sleep(fsync_delay_s)
        os.fsync(fd)

    chunk, window = 128 * 1024, 4
    lag, bound = _unrecorded_at_each_request(tmp_path, fsync, every, chunk, window, 8 * mib)
    assert max(lag) <= bound, (max(lag), bound)
    assert fsyncs["n"] >= 6  # a checkpoint about every MiB of the 8, plus finish()
    # The record did keep up: late in the download, most of what arrived is recorded.
    assert lag[-1] < 8 * mib - every, lag[-1]


def test_a_ranges_file_that_does_not_fit_is_ignored(tmp_path: Path) -> None:
    data = os.urandom(3_000)
    f = artifact("a", data)
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / f"{f.sha256}.part").write_bytes(b"\0" * 3_000)
    for content in (b"garbage", json.dumps({"schema": "edge.partial_download", "sha256": "x",
                                            "size": 3000, "done": [[0, 3000]]}).encode()):
        (tmp_path / "dl" / f"{f.sha256}.ranges").write_bytes(content)
        fetcher = MemoryFetcher({f.sha256: data})
        run(Downloader(tmp_path / "dl", fetcher, SETTINGS).download([(f, tmp_path / "o" / "a")]))
        assert (tmp_path / "o" / "a").read_bytes() == data
        assert len(fetcher.requests) == 3
        (tmp_path / "o" / "a").unlink()
        (tmp_path / "dl" / f"{f.sha256}.part").write_bytes(b"\0" * 3_000)


def test_files_already_at_their_destination_are_not_fetched_again(tmp_path: Path) -> None:
    data = os.urandom(1_234)
    f = artifact("a", data)
    g = artifact("b/a", data)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "a").write_bytes(data)  # a crash after the first of two copies
    fetcher = MemoryFetcher({f.sha256: data})
    run(Downloader(tmp_path / "dl", fetcher, SETTINGS).download(
        [(f, tmp_path / "o" / "a"), (g, tmp_path / "o" / "b" / "a")]))
    assert fetcher.requests == []
    assert (tmp_path / "o" / "b" / "a").read_bytes() == data


def test_timeouts_halve_the_window_once_per_round_trip_and_answers_regrow_it(
    tmp_path: Path,
) -> None:
    """AIMD: a whole window timing out together is one congestion signal, not eight."""
    data = os.urandom(40 * 1000)
    f = artifact("a", data)
    in_flight = {"now": 0}
    seen: list[tuple[int, bool]] = []  # (requests in flight when one was sent, after timeouts)
    first_round = {"left": 8}

    class SlowFetcher(MemoryFetcher):
        async def fetch(self, sha256: str, offset: int, length: int) -> bytes:
            in_flight["now"] += 1
            seen.append((in_flight["now"], first_round["left"] == 0))
            try:
                await asyncio.sleep(0.002)
                if first_round["left"]:
                    first_round["left"] -= 1
                    raise ChunkTimeoutError("no answer")
                return await super().fetch(sha256, offset, length)
            finally:
                in_flight["now"] -= 1

    fetcher = SlowFetcher({f.sha256: data})
    settings = DownloadSettings(chunk_bytes=1000, window=8, retries=2, retry_backoff_s=0.0)
    downloader = Downloader(tmp_path / "dl", fetcher, settings)
    run(downloader.download([(f, tmp_path / "o" / "a")]))
    assert (tmp_path / "o" / "a").read_bytes() == data
    assert downloader.window.timeouts == 8
    before = [n for n, after in seen if not after]
    after = [n for n, after in seen if after]
    assert max(before) == 8
    assert max(after[:4]) == 4  # halved once (8 -> 4), not down to 1
    assert downloader.window.limit == 8  # 22 answers later it is whole again
    assert max(after) == 8


@pytest.mark.parametrize("corrupt_at", [None, 0, 9_000_000])
def test_files_are_hashed_while_they_arrive_and_corruption_is_still_caught(
    tmp_path: Path, corrupt_at: int | None
) -> None:
    """Out-of-order answers: in-order chunks are hashed as they are written, early ones
    once the gap before them fills, and a wrong byte anywhere (in a chunk hashed from
    memory or one read back) fails the digest check."""
    data = os.urandom(12 * 1024 * 1024)
    f = artifact("model.onnx", data)

    class Reordering(MemoryFetcher):
        async def fetch(self, sha256: str, offset: int, length: int) -> bytes:
            # Every fourth chunk answers late: the prefix grows in bursts.
            await asyncio.sleep(0.02 if (offset // length) % 4 == 0 else 0.001)
            return await super().fetch(sha256, offset, length)

    fetcher = Reordering({f.sha256: data})

    def corrupt(sha: str, offset: int, length: int, chunk: bytes) -> bytes:
        if corrupt_at is not None and offset <= corrupt_at < offset + length:
            flipped = bytearray(chunk)
            flipped[corrupt_at - offset] ^= 0xFF
            return bytes(flipped)
        return chunk

    fetcher.hook = corrupt
    settings = DownloadSettings(chunk_bytes=256 * 1024, window=8, retries=0)
    downloader = Downloader(tmp_path / "dl", fetcher, settings)
    target = tmp_path / "out" / "model.onnx"
    if corrupt_at is None:
        run(downloader.download([(f, target)]))
        assert target.read_bytes() == data
    else:
        with pytest.raises(DigestMismatchError):
            run(downloader.download([(f, target)]))
        assert not target.exists()
        assert list((tmp_path / "dl").iterdir()) == []
    # The whole file was hashed by the end of the transfer: finishing only compares.
    assert downloader.hashed_in_transfer == len(data)


def test_chunks_are_written_and_hashed_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(64 * 1000)
    f = artifact("model.onnx", data)
    threads: set[str] = set()
    real_pwrite = os.pwrite

    def pwrite(fd: int, chunk: bytes, offset: int) -> int:
        threads.add(threading.current_thread().name)
        return real_pwrite(fd, chunk, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)

    async def go() -> None:
        downloader = Downloader(tmp_path / "dl", MemoryFetcher({f.sha256: data}), SETTINGS)
        await downloader.download([(f, tmp_path / "out" / "a")])
        assert downloader.hashed_in_transfer == len(data)

    run(go())
    assert (tmp_path / "out" / "a").read_bytes() == data
    assert threads and all(name.startswith("fleet-write") for name in threads), threads


def test_a_download_rate_cap_spaces_the_chunk_requests(tmp_path: Path) -> None:
    """fleet.max_download_bytes_per_s: 400 kB at 1 MB/s cannot take less than ~0.4 s
    (the first chunk goes at once); without a cap the same download is not held back."""
    data = os.urandom(400_000)
    f = artifact("model.onnx", data)

    def timed(cap: int, where: Path) -> float:
        settings = DownloadSettings(chunk_bytes=20_000, window=4, max_bytes_per_s=cap)
        downloader = Downloader(where / "dl", MemoryFetcher({f.sha256: data}), settings)
        started = time.monotonic()
        run(downloader.download([(f, where / "out")]))
        assert (where / "out").read_bytes() == data
        return time.monotonic() - started

    capped = timed(1_000_000, tmp_path / "capped")
    assert capped >= 0.38, capped
    uncapped = timed(0, tmp_path / "free")
    assert uncapped < capped / 2, (uncapped, capped)  # the cap made it slow, not the machine
