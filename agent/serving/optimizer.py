"""Preparing, storing and serving on-device variants of a verified model version.

The rules (policy, keys, verdicts, records) are in :mod:`agent.serving.variants`;
the onnxruntime tools in :mod:`agent.serving.optimize_runtime`. This module
drives them: it builds each variant the signed ``optimize.json`` allows, checks
it against the version's signed golden vectors (the validation gate's own
comparison, at the policy's tolerance), times it against the original in this
process, and stores the decision under ``<state>/variants/``.

:class:`OptimizingReader` wraps the agent's model reader: a version without a
signed ``optimize.json`` loads exactly as before; one with it gets its kept
variant (made on its first load if there is no decision yet), whose bytes are
checked against the authenticated record before they are handed to
onnxruntime. Anything that goes wrong here serves the original.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from agent.common.buffers import FileBytes, as_bytes, release
from agent.common.durable import fsync_dir, write_atomically
from agent.errors import AgentError
from agent.serving import variants as v
from agent.serving.onnx_runtime import OnnxSession, SessionOptions, runtime_version
from agent.serving.validation import (
    SPEC_FILE,
    SPEC_SCHEMA,
    VECTORS_FILE,
    ValidationFailedError,
    _feed,
    _load_vectors,
    validate_model,
)

log = logging.getLogger("agent.optimize")

STORE_DIR: Final = "variants"
KEY_FILE: Final = "record.key"
TIMING_ROUNDS: Final = 9
TIMING_PASSES: Final = 2  # a variant must be faster in each of them
ROUND_S: Final = 0.02  # each round runs a model this long, at least once
MAX_RUNS_PER_ROUND: Final = 2000

ModelReader = Callable[[Path, str], FileBytes]


class VariantStore:
    """``<state>/variants``: one directory per key holding ``record.json`` and the kept
    ``<kind>.onnx``; the HMAC key in ``record.key`` (mode 0600)."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / STORE_DIR
        self._key: bytes | None = None

    def mac_key(self) -> bytes:
        if self._key is None:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            path = self.root / KEY_FILE
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            except FileExistsError:
                pass
            else:
                try:
                    os.write(fd, secrets.token_bytes(32))
                    os.fsync(fd)
                finally:
                    os.close(fd)
                fsync_dir(self.root)
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                if os.fstat(fd).st_mode & 0o077:
                    os.fchmod(fd, 0o600)  # nobody else may learn it
                key = os.read(fd, 64)
            finally:
                os.close(fd)
            if len(key) != 32:
                raise AgentError(f"{path}: not a 32-byte key (remove it to make a new one)")
            self._key = key
        return self._key

    def directory(self, key: v.VariantKey) -> Path:
        return self.root / key.directory()

    def load(self, key: v.VariantKey) -> tuple[v.Record, bytes | None] | None:
        """The authenticated record and its variant's bytes (None: the bytes do not match
        the record, or are gone). None if there is no usable record: a record that does
        not authenticate is discarded here."""
        directory = self.directory(key)
        try:
            data = (directory / v.RECORD_FILE).read_bytes()
        except FileNotFoundError:
            return None
        try:
            record = v.decode_record(data, self.mac_key(), key)
        except v.VariantRecordError as exc:
            log.warning(f"variant record discarded: {exc}", extra={"dir": str(directory)})
            self.discard(key)
            return None
        if record.chosen is None:
            return record, None
        try:
            variant = (directory / f"{record.chosen}.onnx").read_bytes()
        except OSError:
            return record, None
        return record, variant if v.variant_matches(record, variant) else None

    def save(self, record: v.Record, variant: bytes | None) -> None:
        directory = self.directory(record.key)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in directory.glob("*.onnx"):
            stale.unlink(missing_ok=True)
        if variant is not None and record.chosen is not None:
            write_atomically(directory / f"{record.chosen}.onnx", variant)
        # The record last: it is what makes the variant count.
        write_atomically(directory / v.RECORD_FILE, v.encode_record(record, self.mac_key()))

    def discard(self, key: v.VariantKey) -> None:
        shutil.rmtree(self.directory(key), ignore_errors=True)


@dataclass(frozen=True, slots=True)
class Outcome:
    record: v.Record
    variant: bytes | None  # the kept variant's checked bytes, None: serve the original
    rebuilt: bool  # decided now (not read from the store)


def _validation_files(files: Mapping[str, FileBytes], policy: v.OptimizePolicy) -> dict[str, Any]:
    """The files for the validation gate, at the policy's tolerance if it sets one."""
    out: dict[str, Any] = {VECTORS_FILE: files[VECTORS_FILE]}
    if policy.rtol is not None and policy.atol is not None:
        spec = {"schema": SPEC_SCHEMA, "version": 1, "rtol": policy.rtol, "atol": policy.atol}
        out[SPEC_FILE] = json.dumps(spec).encode()
    elif SPEC_FILE in files:
        out[SPEC_FILE] = files[SPEC_FILE]
    return out


def time_alternating(
    original: OnnxSession,
    variant: OnnxSession,
    feeds: dict[str, np.ndarray[Any, Any]],
    rounds: int = TIMING_ROUNDS,
) -> tuple[list[float], list[float], list[float], list[float]]:
    """Wall seconds per run of each session, one figure per round, then the same in
    CPU seconds of this process; the order alternates between rounds so that neither
    always runs in the other's wake."""
    names_a = [t.name for t in original.outputs]
    names_b = [t.name for t in variant.outputs]
    for _ in range(2):  # first runs allocate
        original.run(names_a, feeds)
        variant.run(names_b, feeds)
    start = time.perf_counter()
    original.run(names_a, feeds)
    once = max(time.perf_counter() - start, 1e-6)
    runs = max(1, min(MAX_RUNS_PER_ROUND, math.ceil(ROUND_S / once)))
    times: dict[int, list[float]] = {0: [], 1: []}
    cpu: dict[int, list[float]] = {0: [], 1: []}
    sessions = ((0, original, names_a), (1, variant, names_b))
    for r in range(rounds):
        for index, session, names in sessions if r % 2 == 0 else sessions[::-1]:
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(runs):
                session.run(names, feeds)
            times[index].append((time.perf_counter() - start) / runs)
            cpu[index].append((time.process_time() - cpu_start) / runs)
    return times[0], times[1], cpu[0], cpu[1]


def _build(kind: str, model: bytes, provider: str) -> bytes:
    from agent.serving import optimize_runtime

    if kind == "graph":
        return optimize_runtime.optimize_graph(model, provider)
    return optimize_runtime.quantize_int8(model)


def decide(
    model: bytes,
    files: Mapping[str, FileBytes],
    key: v.VariantKey,
    options: SessionOptions,
) -> tuple[v.Record, bytes | None]:
    """Blocking (seconds): build, check and time every allowed variant of ``model``."""
    policy = v.parse_policy(as_bytes(files[v.POLICY_FILE]))
    now = time.time()
    if VECTORS_FILE not in files:
        note = f"no {VECTORS_FILE}: a variant cannot be shown to be equivalent"
        return v.Record(key, None, (), None, now, (note,)), None
    vfiles = _validation_files(files, policy)
    base = validate_model(model, vfiles, options)  # the original, at the same tolerance
    assert base.session is not None
    graph_inputs = {t.name: t for t in base.inputs}
    inputs, _expected = _load_vectors(vfiles[VECTORS_FILE])
    feeds = {name: _feed(graph_inputs[name], array) for name, array in inputs.items()}
    candidates: list[v.Candidate] = []
    built: dict[str, bytes] = {}
    try:
        for kind in policy.allow:
            try:
                data = _build(kind, model, key.provider)
                checked = validate_model(data, vfiles, options)
            except (ValidationFailedError, AgentError) as exc:
                candidates.append(v.Candidate(kind, False, reason=str(exc)[:300]))
                continue
            assert checked.session is not None
            passes: list[float] = []
            try:
                while len(passes) < TIMING_PASSES and (
                    not passes or passes[-1] >= policy.min_speedup
                ):
                    wall_a, wall_b, cpu_a, cpu_b = time_alternating(
                        base.session, checked.session, feeds
                    )
                    # Faster in elapsed time and in CPU spent: on a busy device either
                    # alone can be flattered by the neighbours of the moment.
                    passes.append(min(v.speedup(wall_a, wall_b), v.speedup(cpu_a, cpu_b)))
            finally:
                checked.session.close()
            candidate = v.Candidate(
                kind, True, v.confirmed_speedup(passes), checked.max_abs_error, "",
                v.sha256(data), len(data),
            )
            candidates.append(v.judge(candidate, policy.min_speedup))
            built[kind] = data
    finally:
        base.session.close()
    chosen = v.choose(candidates)
    record = v.Record(
        key, None if chosen is None else chosen.kind, tuple(candidates), base.max_abs_error, now
    )
    return record, None if chosen is None else built[chosen.kind]


def variant_key(
    model: FileBytes, files: Mapping[str, FileBytes], options: SessionOptions
) -> v.VariantKey:
    return v.VariantKey(
        v.sha256(memoryview(model)),
        runtime_version(),
        options.execution_providers[0] if options.execution_providers else "CPUExecutionProvider",
        v.deciding_digest({k: as_bytes(b) for k, b in files.items()}),
    )


def prepare(
    store: VariantStore,
    model: FileBytes,
    files: Mapping[str, FileBytes],
    options: SessionOptions,
    rebuild: bool = False,
) -> Outcome:
    """The variant to serve for these verified bytes: the stored one if its record
    authenticates and its bytes match, else decided again now."""
    key = variant_key(model, files, options)
    found = None if rebuild else store.load(key)
    if found is not None:
        record, variant = found
        if record.chosen is None or variant is not None:
            return Outcome(record, variant, False)
        log.warning(
            f"stored variant does not match its record: discarded, rebuilding ({record.chosen})",
            extra={"dir": str(store.directory(key)), "variant": record.chosen},
        )
    store.discard(key)
    record, variant = decide(as_bytes(model), files, key, options)
    store.save(record, variant)
    return Outcome(record, variant, True)


class OptimizingReader:
    """A model reader that hands out a version's kept variant instead of its model.

    Only for versions with a signed ``optimize.json`` and model files without
    external data; everything else passes through unchanged. The deciding files
    are read through the wrapped reader, so they are the verified ones.
    """

    def __init__(self, reader: ModelReader, state_dir: Path, options: SessionOptions) -> None:
        self._reader = reader
        self.store = VariantStore(state_dir)
        self._options = options
        self._lock = threading.Lock()  # one decision at a time (they time the CPU)
        self._reports: dict[tuple[str, str], dict[str, Any]] = {}

    def __call__(self, version_dir: Path, filename: str) -> FileBytes:
        model = self._reader(version_dir, filename)
        if not filename.endswith(".onnx") or not self.opted_in(version_dir):
            return model
        if getattr(model, "external_files", None):
            self._report(version_dir, {"variant": "original", "reason": "external data"})
            return model
        try:
            outcome = self.optimize(version_dir, model)
        except Exception as exc:  # whatever fails here, the verified original serves
            log.warning(
                "no variant (the original serves)",
                extra={"dir": str(version_dir), "reason": str(exc)[:300]},
            )
            self._report(version_dir, {"variant": "original", "reason": str(exc)[:300]})
            return model
        if outcome.variant is None:
            return model
        release(model)
        return outcome.variant

    @staticmethod
    def opted_in(version_dir: Path) -> bool:
        return (version_dir / v.POLICY_FILE).is_file()

    def optimize(
        self, version_dir: Path, model: FileBytes | None = None, rebuild: bool = False
    ) -> Outcome:
        """Blocking: the decision for this version (``edge-agent optimize`` calls it)."""
        if model is None:
            model = self._reader(version_dir, "model.onnx")
        files = {
            name: self._reader(version_dir, name)
            for name in v.DECIDING_FILES
            if name == v.POLICY_FILE or (version_dir / name).is_file()
        }
        with self._lock:
            outcome = prepare(self.store, model, files, self._options, rebuild)
        summary = outcome.record.summary()
        log.info(
            "model variant chosen" if outcome.variant is not None else "model variant: original",
            extra={"dir": str(version_dir), "rebuilt": outcome.rebuilt, **_flat(summary)},
        )
        self._report(version_dir, summary)
        return outcome

    def _report(self, version_dir: Path, summary: dict[str, Any]) -> None:
        self._reports[(version_dir.parent.name, version_dir.name)] = summary

    def optimization_reports(self, serving: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
        """Variant per serving (model, version) that opted in, for the health message."""
        return [
            {"name": name, "version": version, **self._reports[(name, version)]}
            for name, version in sorted(serving)
            if (name, version) in self._reports
        ]


def _flat(summary: dict[str, Any]) -> dict[str, Any]:
    out = {k: val for k, val in summary.items() if k != "tried"}
    out["tried"] = ", ".join(f"{k}: {r}" for k, r in summary.get("tried", {}).items())
    with contextlib.suppress(KeyError):
        out["variant_speedup"] = out.pop("speedup")
    return out


def describe(outcome: Outcome) -> str:
    """``edge-agent optimize``'s report: what serves, and each variant tried."""
    r = outcome.record
    summary = r.summary()
    lines = [
        f"serving: {summary['variant']}"
        + ("" if r.chosen is None else f" ({summary['speedup']:+.1%} faster, max abs error "
                                       f"{summary['max_abs_error']:.3g} vs golden vectors)"),
        f"key: model {r.key.model_sha256[:16]}  onnxruntime {r.key.runtime_version}  "
        f"provider {r.key.provider}  ({'decided now' if outcome.rebuilt else 'stored decision'})",
        f"{'variant':<9}{'vectors':<9}{'speedup':>9}  {'max abs err':>12}  verdict",
        f"{'original':<9}{'pass':<9}{'':>9}  {r.original_max_abs_error or 0.0:>12.3g}",
    ]
    for c in r.candidates:
        gain = "" if c.speedup is None else f"{c.speedup:+.1%}"
        err = "" if c.max_abs_error is None else f"{c.max_abs_error:.3g}"
        verdict = "kept" if c.kind == r.chosen else (c.reason or "not chosen")
        lines.append(
            f"{c.kind:<9}{'pass' if c.valid else 'fail':<9}{gain:>9}  {err:>12}  {verdict}"
        )
    lines.extend(f"note: {n}" for n in r.notes)
    return "\n".join(lines)
