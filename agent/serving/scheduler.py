"""Runs validated requests on a model's onnxruntime session.

Where a run happens is decided per model (``Execution``): a model whose runs
are shorter than handing a request to a thread and back (the hop, measured on
this machine by ``handoff_ns``) runs inline, on the event loop's thread,
because the hop would cost more than the work; every other model runs on its
worker threads, off the loop. In ``auto`` mode the choice follows an EWMA of
the model's measured run times (seeded by its warm-up runs at load), so a model
that turns slow moves off the loop by itself, and back when it is fast again.

Two schedulers share one worker function:
- ``DirectScheduler`` hands each request to the model's thread pool (one thread
  per configured instance) and bounds how many may wait;
- ``DynamicBatcher`` follows Triton's dynamic batching: the loop thread only
  appends requests to a queue shared with the model's worker threads; an idle
  worker takes the oldest, waits (on a condition variable, with microsecond
  precision, not on the event loop's millisecond timers) until a preferred batch
  size is queued or the oldest has waited ``max_queue_delay_microseconds``,
  takes as many as fit in ``max_batch_size``, concatenates, runs once and splits
  the outputs back per request. Waits that keep gathering nobody stop until
  requests queue up together again (``_worth_waiting``).

Requests whose client deadline has passed are never run. onnxruntime, array
concatenation and output serialisation all happen on worker threads.

A request that makes onnxruntime fail when run on its own (say an index past an
embedding table) gets ``InputFailedModelError`` (INVALID_ARGUMENT, no model
fault), unless it holds several rows that each run alone: then the model failed
at a batch size it declares, which is its own fault. A batch that fails is
split in halves and rerun, down to single requests, so that only the requests
that fail alone fail, and requests that succeed alone succeed even if their
batch did not. The success path does no extra work.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from agent.common.loop_calls import LoopCalls
from agent.errors import (
    AgentError,
    DeadlineExceededError,
    InferenceFailedError,
    InputFailedModelError,
    QueueFullError,
)
from agent.serving.datatypes import BYTES, encode_bytes_tensor
from agent.serving.inference import Array, DecodedRequest, OutputTensor
from agent.serving.model_config import ModelSpec
from agent.serving.onnx_runtime import OnnxSession
from agent.serving.stats import ExecutionTimings, ModelStats

_monotonic = time.monotonic
_perf_ns = time.perf_counter_ns
log = logging.getLogger("agent.scheduler")

# onnxruntime's run-time error classes (by name: only agent.serving.onnx_runtime
# imports onnxruntime) that a request's content can cause. The others
# (NotImplemented, EPFail, EngineError, ...) and Python errors (a closed session)
# are the model's or the agent's, whatever the input.
_ORT_STATE_MODULE = "onnxruntime.capi.onnxruntime_pybind11_state"
_INPUT_DEPENDENT = frozenset({"InvalidArgument", "Fail", "RuntimeException"})


def _input_dependent(exc: BaseException) -> bool:
    cls = type(exc)
    return cls.__module__ == _ORT_STATE_MODULE and cls.__name__ in _INPUT_DEPENDENT


AUTO = "auto"
INLINE = "inline"
WORKER = "worker"
EXECUTION_MODES = (AUTO, INLINE, WORKER)

_EWMA_WEIGHT = 0.1  # of the newest run
# One run counts at most this many thresholds: a run the machine preempted (wall time
# on a busy host) does not move a model alone; three slow runs in a row do.
_SAMPLE_CAP = 4.0
# Back inline only below this share of the threshold: a model near it does not flap.
_BACK_INLINE = 0.75
# A model on its workers is tried inline again (a probe: one request that comes
# alone) after this many worker runs of which the fastest was below the back-inline
# bound. Worker-side times cannot decide alone: they include waits for the GIL.
PROBE_AFTER_RUNS = 32

_handoff_cached: int | None = None
# However dear a hop is measured (a machine so busy that wake-ups wait milliseconds
# for a core), no run longer than this holds the loop: every other request waits it.
MAX_INLINE_NS = 200_000


def _nothing() -> None:
    return None


async def handoff_ns(rounds: int = 24) -> int:
    """What handing a run to a worker thread and back costs here (ns, upper quartile).

    Measured once per process, on the loop, through the same ``Workers`` path a
    run takes (queue put, worker wake-up, ``LoopCalls`` back, the loop's wake-up
    and the awaiting coroutine's resumption), with nothing to run. Both threads
    go idle between rounds, as between a lone client's requests, so the wake-ups
    cost what they cost then (on a busy machine, the wait for a core too); the
    upper quartile keeps that, not the rare round preempted for milliseconds.
    About 25 ms at the first load.
    """
    global _handoff_cached
    if _handoff_cached is not None:
        return _handoff_cached
    loop = asyncio.get_running_loop()
    workers = Workers(1, "handoff-probe")
    samples = []
    try:
        for i in range(rounds + 5):
            future: asyncio.Future[None] = loop.create_future()

            def done(_r: Any, _e: BaseException | None, f: asyncio.Future[None] = future) -> None:
                if not f.done():
                    f.set_result(None)

            start = _perf_ns()
            workers.submit(_nothing, (), done)
            await future
            if i >= 5:  # the first ones pay for starting the thread
                samples.append(_perf_ns() - start)
            await asyncio.sleep(0.0005)  # both sides idle, as between requests
    finally:
        workers.shutdown()
    samples.sort()
    _handoff_cached = min(MAX_INLINE_NS, samples[(3 * len(samples)) // 4])
    return _handoff_cached


@dataclass(frozen=True, slots=True)
class Execution:
    """Where a model's runs happen: ``mode`` auto | inline | worker.

    ``threshold_ns``: in auto mode, runs (EWMA) shorter than this are inline.
    ``initial_ns``: the model's measured run time at load (None: unknown, start
    on the workers and learn from the runs there).
    """

    mode: str = WORKER
    threshold_ns: int = 0
    initial_ns: int | None = None


class _BatchRunFailed(InferenceFailedError):
    """A run of several requests failed in onnxruntime: which of them is at fault is
    found by rerunning parts (``DynamicBatcher._isolate``); never sent to a client."""


@dataclass(slots=True)
class Completed:
    outputs: list[OutputTensor]
    queue_ns: int
    timings: ExecutionTimings


def _serialise(name: str, datatype: str, array: Array) -> OutputTensor:
    # tobytes() writes C order whatever the layout; a NumPy shape is a tuple of ints.
    raw = encode_bytes_tensor(array) if datatype == BYTES else array.tobytes()
    return OutputTensor(name, datatype, array.shape, raw)


def _rows_run_alone(
    session: OnnxSession, names: list[str], feeds: dict[str, Array], rows: int
) -> bool:
    """Failure path only: whether every row of a failed request runs on its own."""
    for row in range(rows):
        try:
            session.run(names, {name: value[row : row + 1] for name, value in feeds.items()})
        except Exception:
            return False
    return True


def run_batch(
    session: OnnxSession,
    items: Sequence[DecodedRequest],
    enqueued_ns: Sequence[int],
    model: str = "",
) -> list[Completed]:
    """Worker-thread body: one onnxruntime run for ``items``, outputs split per item.

    An onnxruntime failure a request's content can cause raises
    ``InputFailedModelError`` for a single request and ``_BatchRunFailed`` for
    several; any other failure ``InferenceFailedError``.
    """
    start = _perf_ns()
    if len(items) == 1:
        feeds = items[0].feeds
        names = items[0].output_names
    else:
        feeds = {
            name: np.concatenate([it.feeds[name] for it in items]) for name in items[0].feeds
        }
        names = list(dict.fromkeys(n for it in items for n in it.output_names))
    infer_start = _perf_ns()
    try:
        results = session.run(names, feeds)
    except Exception as exc:
        if not _input_dependent(exc):
            raise InferenceFailedError(f"model '{model}': onnxruntime failed: {exc}") from exc
        if len(items) > 1:
            raise _BatchRunFailed(f"model '{model}': onnxruntime failed: {exc}") from exc
        if items[0].batch_size > 1 and _rows_run_alone(session, names, feeds, items[0].batch_size):
            # Every row runs alone: the model fails at a batch size it declares it takes.
            # That is the model's fault (it counts for probation), not the client's.
            raise InferenceFailedError(
                f"model '{model}' failed on a batch of {items[0].batch_size} although each "
                f"of its rows runs alone (its max_batch_size is too large): {exc}"
            ) from exc
        raise InputFailedModelError(
            f"the request's input made model '{model}' fail (it fails on its own, not "
            f"because of other requests): {exc}"
        ) from exc
    infer_end = _perf_ns()
    by_name = dict(zip(names, results, strict=True))
    per_item: list[list[OutputTensor]] = []
    offset = 0
    for item in items:
        outputs = []
        for name, datatype in zip(item.output_names, item.output_datatypes, strict=True):
            array = by_name[name]
            if len(items) > 1:
                array = array[offset : offset + item.batch_size]
            outputs.append(_serialise(name, datatype, array))
        offset += item.batch_size
        per_item.append(outputs)
    end = _perf_ns()
    # One run serves every request in it: they share its timings.
    batch = offset  # the samples in this run
    timings = ExecutionTimings(batch, infer_start - start, infer_end - infer_start, end - infer_end)
    return [
        Completed(outputs, start - enq, timings)
        for outputs, enq in zip(per_item, enqueued_ns, strict=True)
    ]


# What a worker calls on the loop thread when a job is done: (result, exception).
# A job cancelled by shutdown ends with a concurrent.futures.CancelledError.
OnDone = Callable[[Any, BaseException | None], None]


class Workers:
    """A model's inference threads (one per instance) and the way back to the loop.

    Jobs go in through a SimpleQueue. Outcomes come back in bursts through
    ``LoopCalls`` (an eventfd wake-up only when none is pending). Per request
    that costs one queue put and at most one loop wake-up, where
    ThreadPoolExecutor + wrap_future costs a concurrent Future, a work item,
    chained callbacks and a wake-up per future (measured by
    tests/bench/bench_serving.py: this hop is the agent's largest per-request
    cost on small models). The eventfd is closed once every thread has exited.
    """

    def __init__(self, count: int, name: str) -> None:
        self._count = count
        self._name = name
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], OnDone] | None]
        self._jobs = queue.SimpleQueue()
        self._calls: LoopCalls | None = None  # made by start(), on the loop
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._exited = 0
        self._exit_lock = threading.Lock()

    @property
    def running(self) -> bool:
        return bool(self._threads)

    def start(self, body: Callable[[], None]) -> None:
        """Start the threads running ``body`` (once; call on the loop's thread)."""
        if not self._threads:  # started on first use, like ThreadPoolExecutor's
            self._calls = LoopCalls(asyncio.get_running_loop())
            for i in range(self._count):
                thread = threading.Thread(
                    target=self._run, args=(body,), name=f"{self._name}_{i}", daemon=True
                )
                thread.start()
                self._threads.append(thread)

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], on_done: OnDone) -> None:
        """Run ``fn(*args)`` on a worker; ``on_done`` then runs on this loop's thread."""
        if self._closed:
            raise RuntimeError("cannot schedule new work after shutdown")
        if not self._threads:
            self.start(self._work)
        self._jobs.put((fn, args, on_done))

    def shutdown(self) -> None:
        """Stop the threads once they are idle; jobs not yet started are cancelled."""
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)

    def post(self, on_done: OnDone, result: Any, exc: BaseException | None) -> bool:
        """Worker thread: have ``on_done(result, exc)`` called on the loop's thread.

        Returns False if the loop has closed (nobody is waiting any more).
        """
        assert self._calls is not None
        return self._calls.call(on_done, result, exc)

    def _run(self, body: Callable[[], None]) -> None:
        try:
            body()
        finally:
            with self._exit_lock:
                self._exited += 1
                last = self._exited == len(self._threads)
            if last and self._calls is not None:  # runs after its last post
                self._calls.call(self._calls.close)

    def _work(self) -> None:
        jobs = self._jobs
        post = self.post
        while (job := jobs.get()) is not None:
            fn, args, on_done = job
            if self._closed:
                outcome = post(on_done, None, CancelledError())
            else:
                try:
                    outcome = post(on_done, fn(*args), None)
                except BaseException as exc:
                    outcome = post(on_done, None, exc)
            if not outcome:
                return


class Scheduler:
    """Common bookkeeping: the worker threads, in-flight count, drain."""

    def __init__(
        self,
        spec: ModelSpec,
        session: OnnxSession,
        stats: ModelStats,
        execution: Execution = Execution(),
    ) -> None:
        self.spec = spec
        self.session = session
        self.stats = stats
        self.workers = Workers(spec.instance_count, f"infer-{spec.name}")
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Worker thread -> when its current onnxruntime run began (stall detection).
        self._runs_started: dict[int, float] = {}
        self._runs_lock = threading.Lock()
        self.execution = execution
        self._auto = execution.mode == AUTO
        self._threshold = float(execution.threshold_ns)
        self.run_ewma_ns = float(execution.initial_ns or 0)
        # Read on every request: a plain attribute, changed only on the loop thread.
        self.inline = execution.mode == INLINE or (
            self._auto
            and execution.initial_ns is not None
            and execution.initial_ns < execution.threshold_ns
        )
        self.moves = 0  # times auto mode changed where the model runs
        self._worker_runs = 0  # since the last probe
        self._worker_min = float("inf")  # fastest of those

    def _observe(self, t: ExecutionTimings, hop_ns: int | None = None) -> None:
        """Loop thread, after a worker run: note how fast it was (auto mode) and, for a
        request that came alone (nothing queued before it), what its hop cost beyond
        the run: the threshold follows that, the hop as it is while serving (caches
        cold between requests, a busy host), not only as measured at load."""
        if self._auto:
            if hop_ns is not None:
                self._threshold += _EWMA_WEIGHT * (min(hop_ns, MAX_INLINE_NS) - self._threshold)
            self._worker_runs += 1
            run_ns = t.infer_ns  # onnxruntime's part, as measured at load
            if run_ns < self._worker_min:
                self._worker_min = run_ns

    def _probe_due(self) -> bool:
        """Whether a model on its workers should try its next lone request inline."""
        return (
            self._auto
            and self._worker_runs >= PROBE_AFTER_RUNS
            and self._worker_min < self._threshold * _BACK_INLINE
        )

    def _observe_inline(self, t: ExecutionTimings, probe: bool) -> None:
        """Loop thread, after a run on it: follow the EWMA of inline run times; off the
        loop when it passes the threshold; a probe's own time decides alone."""
        if not self._auto:
            return
        run_ns = t.infer_ns  # onnxruntime's part, as measured at load
        if probe:
            self._worker_runs = 0
            self._worker_min = float("inf")
            self.run_ewma_ns = float(run_ns)
            if run_ns < self._threshold * _BACK_INLINE:
                self._move(True)
            return
        ewma = self.run_ewma_ns
        ewma += _EWMA_WEIGHT * (min(run_ns, _SAMPLE_CAP * self._threshold) - ewma)
        self.run_ewma_ns = ewma
        if ewma > self._threshold:
            self._move(False)

    def _move(self, inline: bool) -> None:
        self.inline = inline
        self.moves += 1
        # Rare (hysteresis between the two sides), so worth a line in the log.
        log.info(
            "model execution moved",
            extra={
                "model": self.spec.name,
                "version": self.spec.version,
                "execution": INLINE if inline else WORKER,
                "run_us": round(self.run_ewma_ns / 1000, 1),
                "threshold_us": round(self._threshold / 1000, 1),
            },
        )

    def _run_inline(self, decoded: DecodedRequest, probe: bool = False) -> Completed:
        """On the loop thread: the whole run, now (the caller checked the deadline)."""
        done = run_batch(self.session, (decoded,), (_perf_ns(),), self.spec.name)[0]
        self.stats.record_execution(done.timings)
        self._observe_inline(done.timings, probe)
        return done

    async def submit(self, decoded: DecodedRequest, deadline: float | None) -> Completed:
        raise NotImplementedError

    def _begin(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def _end(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    def _execute(
        self, items: Sequence[DecodedRequest], enqueued_ns: Sequence[int]
    ) -> list[Completed]:
        """Worker-thread body: ``run_batch``, noting while it runs for the watchdog."""
        me = threading.get_ident()
        with self._runs_lock:
            self._runs_started[me] = _monotonic()
        try:
            return run_batch(self.session, items, enqueued_ns, self.spec.name)
        finally:
            with self._runs_lock:
                del self._runs_started[me]

    def oldest_run_started(self) -> float | None:
        """When the longest-running current run began (monotonic), or None if idle."""
        with self._runs_lock:
            return min(self._runs_started.values(), default=None)

    def queued(self) -> int:
        """Requests waiting for a worker (health reports; one request per run here)."""
        return max(0, self.in_flight - len(self._runs_started))

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait for requests in flight to finish; then release the workers."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            drained = True
        except TimeoutError:
            drained = False
        self._shutdown()
        return drained

    def _shutdown(self) -> None:
        self.workers.shutdown()


class DirectScheduler(Scheduler):
    """One request per onnxruntime run, up to ``instance_count`` at a time."""

    def __init__(
        self,
        spec: ModelSpec,
        session: OnnxSession,
        stats: ModelStats,
        execution: Execution = Execution(),
    ) -> None:
        super().__init__(spec, session, stats, execution)
        self._limit = spec.instance_count + spec.max_queue_size

    def _run_one(
        self, decoded: DecodedRequest, deadline: float | None, enqueued_ns: int
    ) -> Completed:
        if deadline is not None and _monotonic() >= deadline:
            raise DeadlineExceededError("the request's deadline passed while it waited to run")
        return self._execute((decoded,), (enqueued_ns,))[0]

    async def submit(self, decoded: DecodedRequest, deadline: float | None) -> Completed:
        if self.inline:
            return self._run_inline(decoded)
        if self.in_flight == 0 and self._probe_due():
            return self._run_inline(decoded, probe=True)
        if self.in_flight >= self._limit:
            raise QueueFullError(
                f"model '{self.spec.name}' has {self.in_flight} requests queued or running "
                f"(limit {self._limit})"
            )
        future: asyncio.Future[Completed] = asyncio.get_running_loop().create_future()
        alone = self.in_flight == 0
        self._begin()
        enqueued = _perf_ns()
        try:
            self.workers.submit(
                self._run_one,
                (decoded, deadline, enqueued),
                partial(self._run_finished, future, enqueued if alone else 0),
            )
        except BaseException:  # the workers are shut down (the version was retired)
            self._end()
            raise
        return await future

    def _run_finished(
        self,
        future: asyncio.Future[Completed],
        alone_since: int,  # perf_ns when submitted if nothing else was in flight, else 0
        done: Completed | None,
        exc: BaseException | None,
    ) -> None:
        # Book-keeping follows the worker, not the caller: a caller that goes away
        # (client cancelled, deadline) while its run is under way must neither free
        # the slot early nor leave the run uncounted. Done before the caller resumes.
        self._end()
        if exc is None:
            assert done is not None
            self.stats.record_execution(done.timings)
            t = done.timings
            self._observe(
                t,
                _perf_ns() - alone_since - t.input_ns - t.infer_ns - t.output_ns
                if alone_since
                else None,
            )
        if future.done():  # the caller went away
            return
        if exc is None:
            future.set_result(done)  # type: ignore[arg-type]
        elif isinstance(exc, CancelledError):
            future.cancel()
        else:
            future.set_exception(exc)


FRUITLESS_WAITS = 4
PROBE_EVERY = 128


@dataclass(slots=True)
class _Pending:
    decoded: DecodedRequest
    deadline: float | None
    enqueued_ns: int
    future: asyncio.Future[Completed]
    signature: tuple[Any, ...]
    alone: bool  # nothing else of the model was queued or running when it came


def _batch_signature(decoded: DecodedRequest) -> tuple[Any, ...]:
    # Requests can share a run only if every non-batch dimension agrees.
    return tuple((name, a.shape[1:]) for name, a in decoded.feeds.items())


class DynamicBatcher(Scheduler):
    """Triton's dynamic batching, with the batch formed on the worker threads.

    The loop thread appends to ``_queue`` (under ``_cond``'s lock) and wakes a
    worker only when the queue was empty or a preferred batch size is now
    queued; everything else (waiting out the queue delay, skipping requests
    cancelled by their client or past their deadline, grouping by shape) is the
    worker's. Outcomes come back in bursts through ``Workers.post``.
    """

    def __init__(
        self,
        spec: ModelSpec,
        session: OnnxSession,
        stats: ModelStats,
        execution: Execution = Execution(),
    ) -> None:
        super().__init__(spec, session, stats, execution)
        assert spec.batching is not None
        self._queue: deque[_Pending] = deque()
        self._queued_batch = 0  # samples in _queue
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        preferred = spec.batching.preferred_batch_sizes
        self._target = max(preferred) if preferred else spec.max_batch_size
        self._delay_ns = spec.batching.max_queue_delay_us * 1000
        self._fruitless = 0  # waits in a row that gathered no other request
        self._skipped = 0  # picks that did not wait since the last probe
        self._default_timeout_s = spec.default_timeout_us / 1e6
        self._warned_split = False  # logged once: a batch failed that no request caused

    def queued(self) -> int:
        return len(self._queue)

    async def submit(self, decoded: DecodedRequest, deadline: float | None) -> Completed:
        queue = self._queue
        if len(queue) >= self.spec.max_queue_size:
            raise QueueFullError(
                f"model '{self.spec.name}' queue is full ({self.spec.max_queue_size} requests)"
            )
        if self._closed:
            raise RuntimeError("cannot schedule new work after shutdown")
        # Nothing else of this model queued or running: nobody to batch with now.
        alone = self.in_flight == 0
        if alone and self.inline:
            return self._run_inline(decoded)
        if alone and self._probe_due():
            return self._run_inline(decoded, probe=True)
        if self._default_timeout_s:
            own = _monotonic() + self._default_timeout_s
            deadline = own if deadline is None else min(deadline, own)
        loop = asyncio.get_running_loop()
        if not self.workers.running:
            self.workers.start(self._work)
        pending = _Pending(
            decoded, deadline, _perf_ns(), loop.create_future(), _batch_signature(decoded), alone
        )
        self._begin()
        try:
            with self._cond:
                was_empty = not queue
                queue.append(pending)
                self._queued_batch += decoded.batch_size
                if was_empty or self._queued_batch >= self._target:
                    self._cond.notify()
            return await pending.future
        finally:
            self._end()

    def _shutdown(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- worker threads ----------------------------------------------------------------

    def _work(self) -> None:
        post = self.workers.post
        while (items := self._next_batch()) is not None:
            if not items:
                continue
            try:
                outcome = post(
                    partial(self._finish, items),
                    self._execute(
                        [p.decoded for p in items], [p.enqueued_ns for p in items]
                    ),
                    None,
                )
            except _BatchRunFailed:
                outcome = post(self._finish_each, self._isolate(items), None)
            except BaseException as exc:
                outcome = post(partial(self._finish, items), None, exc)
            if not outcome:
                return

    def _isolate(self, items: list[_Pending]) -> list[tuple[_Pending, Completed | BaseException]]:
        """Worker thread: rerun a failed batch in halves until each request's fate is known.

        A part that fails again is halved again; a single request that fails is
        the one at fault (``run_batch`` raises ``InputFailedModelError``). With one
        bad request among n this takes about 2 log2(n) runs. Requests that went away
        or expired meanwhile are not rerun.
        """
        outcomes: list[tuple[_Pending, Completed | BaseException]] = []
        failed = [items]
        while failed:
            part = failed.pop()
            half = len(part) // 2
            for sub in (part[:half], part[half:]):
                now = _monotonic()
                todo = []
                for p in sub:
                    if p.future.done():
                        continue
                    if p.deadline is not None and now >= p.deadline:
                        outcomes.append((p, DeadlineExceededError(
                            "the request's deadline passed while its batch was rerun")))
                    else:
                        todo.append(p)
                if not todo:
                    continue
                try:
                    results = self._execute(
                        [p.decoded for p in todo], [p.enqueued_ns for p in todo]
                    )
                except _BatchRunFailed:
                    failed.append(todo)
                    continue
                except BaseException as exc:
                    outcomes.extend((p, exc) for p in todo)
                    continue
                outcomes.extend(zip(todo, results, strict=True))
        if not self._warned_split and all(
            isinstance(o, Completed) for _, o in outcomes
        ):
            # Nobody's input was at fault: the batch itself was too much for the model.
            self._warned_split = True
            log.warning(
                "a batch failed in onnxruntime but every part of it succeeded when rerun; "
                "the model may not accept batches this large (lower max_batch_size)",
                extra={"model": self.spec.name, "batch": sum(p.decoded.batch_size for p in items)},
            )
        return outcomes

    def _next_batch(self) -> list[_Pending] | None:
        """Wait for a batch and take it off the queue; None once shut down.

        An empty list means nothing was left to run (all cancelled or expired).
        """
        cond = self._cond
        queue = self._queue
        with cond:
            while not queue:
                if self._closed:
                    return None
                cond.wait()
            # The oldest request waits at most the queue delay for a preferred batch,
            # unless waiting has been gathering nothing (see _worth_waiting).
            # A request that came when nothing else was queued or running runs at
            # once: dynamic batching never makes a lone client wait for company.
            if (
                self._queued_batch < self._target
                and self._delay_ns
                and not (queue[0].alone and len(queue) == 1)
                and self._worth_waiting()
            ):
                queued_before = len(queue)
                while self._queued_batch < self._target and not self._closed:
                    left_ns = queue[0].enqueued_ns + self._delay_ns - _perf_ns()
                    if left_ns <= 0:
                        break
                    cond.wait(left_ns / 1e9)
                    if not queue:  # another worker took them
                        return []
                self._fruitless = 0 if len(queue) > queued_before else self._fruitless + 1
            if self._closed:
                abandoned = list(queue)
                queue.clear()
                self._queued_batch = 0
                for p in abandoned:
                    self.workers.post(partial(self._fail, p), None, AgentError("worker cancelled"))
                return None
            return self._take()

    def _worth_waiting(self) -> bool:
        """Whether to hold the oldest request back for company (under ``_cond``'s lock).

        max_queue_delay is an upper bound: a lone client (say one request at a
        time) would pay all of it on every request and gain nothing. After
        ``FRUITLESS_WAITS`` waits in a row that gathered no other request, requests
        run at once; a queue holding more than one request at pick time (load is
        back) restores waiting, and every ``PROBE_EVERY``-th pick waits anyway.
        """
        if len(self._queue) > 1:
            self._fruitless = 0
        if self._fruitless < FRUITLESS_WAITS:
            return True
        self._skipped += 1
        if self._skipped >= PROBE_EVERY:
            self._skipped = 0
            return True
        return False

    def _take(self) -> list[_Pending]:
        # Under _cond's lock. A request's future is only read here (done() is a
        # plain attribute read); results and errors are set on the loop thread.
        queue = self._queue
        now = _monotonic()
        items: list[_Pending] = []
        total = 0
        signature = None
        skipped: list[_Pending] = []
        limit = self.spec.max_batch_size
        while queue:
            p = queue[0]
            if p.future.done():  # cancelled by the client
                queue.popleft()
                self._queued_batch -= p.decoded.batch_size
                continue
            if p.deadline is not None and now >= p.deadline:
                queue.popleft()
                self._queued_batch -= p.decoded.batch_size
                self.workers.post(
                    partial(self._fail, p),
                    None,
                    DeadlineExceededError("the request's deadline passed while it was queued"),
                )
                continue
            if signature is None:
                signature = p.signature
            if p.signature != signature:
                skipped.append(queue.popleft())  # runs in a later batch
                continue
            if total + p.decoded.batch_size > limit:
                break
            queue.popleft()
            self._queued_batch -= p.decoded.batch_size
            total += p.decoded.batch_size
            items.append(p)
        queue.extendleft(reversed(skipped))
        return items

    # -- back on the loop thread -------------------------------------------------------

    @staticmethod
    def _fail(p: _Pending, _result: None, exc: BaseException | None) -> None:
        if not p.future.done():
            p.future.set_exception(exc if exc is not None else AgentError("request not run"))

    def _finish_each(
        self,
        outcomes: list[tuple[_Pending, Completed | BaseException]],
        _exc: BaseException | None,
    ) -> None:
        # After _isolate: each request has its own outcome; the runs that succeeded
        # are recorded once each (their requests share one ExecutionTimings).
        recorded: set[int] = set()
        for p, outcome in outcomes:
            if isinstance(outcome, Completed):
                if id(outcome.timings) not in recorded:
                    recorded.add(id(outcome.timings))
                    self.stats.record_execution(outcome.timings)
                if not p.future.done():
                    p.future.set_result(outcome)
            elif not p.future.done():
                p.future.set_exception(outcome)

    def _finish(
        self,
        items: list[_Pending],
        results: list[Completed] | None,
        exc: BaseException | None,
    ) -> None:
        if isinstance(exc, CancelledError):
            exc = AgentError("worker cancelled")
        if exc is not None:
            for p in items:
                if not p.future.done():
                    p.future.set_exception(exc)
        else:
            assert results is not None
            t = results[0].timings
            self.stats.record_execution(t)
            lone = items[0] if len(items) == 1 and items[0].alone else None
            self._observe(
                t,
                _perf_ns() - lone.enqueued_ns - t.input_ns - t.infer_ns - t.output_ns
                if lone is not None
                else None,
            )
            for p, result in zip(items, results, strict=True):
                if not p.future.done():
                    p.future.set_result(result)


def make_scheduler(
    spec: ModelSpec,
    session: OnnxSession,
    stats: ModelStats,
    execution: Execution = Execution(),
) -> Scheduler:
    if spec.batching is not None and spec.max_batch_size > 1:
        return DynamicBatcher(spec, session, stats, execution)
    return DirectScheduler(spec, session, stats, execution)
