"""The one module that imports onnxruntime.

It turns verified model bytes into a session and reports the graph's inputs and
outputs in protocol terms. Sessions are created from the verified bytes, never
from the repository's files, so what runs is exactly what was verified.

On Linux the bytes go into a sealed memfd (no name on any file system, no
further writes possible) that onnxruntime opens as ``/proc/self/fd/N``: from a
path it parses the model without holding the GIL, while from a Python bytes
object it holds the GIL for the whole parse (about 60 ms for a 100 MB model on
a small CPU, stalling the event loop and every other Python thread while a new
version loads next to the serving one).
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import onnxruntime as ort

from agent.common.buffers import FileBytes, as_bytes
from agent.errors import ModelConfigError
from agent.serving import onnx_external
from agent.serving.datatypes import NUMPY_DTYPES

# An edge device must not phone home: onnxruntime builds may carry a telemetry client.
ort.disable_telemetry_events()

# onnxruntime's type strings -> protocol datatype names.
_ORT_TO_WIRE = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


_SEALS: Final = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
_ORT_FORMAT_ID: Final = b"ORTM"  # flatbuffer file identifier of .ort models (bytes 4-8)


@contextlib.contextmanager
def _sealed_model_path(model_bytes: FileBytes) -> Iterator[bytes | str]:
    """``/proc/self/fd/N`` of a sealed memfd holding ``model_bytes`` (else the bytes)."""
    if (
        not hasattr(os, "memfd_create")
        or model_bytes[4:8] == _ORT_FORMAT_ID  # told apart by extension when from a path
        or not os.path.isdir("/proc/self/fd")
    ):
        yield as_bytes(model_bytes)  # onnxruntime takes bytes or a path
        return
    try:
        fd = os.memfd_create("edge-model", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError:
        yield as_bytes(model_bytes)
        return
    try:
        view = memoryview(model_bytes)
        while view:
            view = view[os.write(fd, view) :]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class GraphTensor:
    """One graph input or output: name, protocol datatype, shape (-1 = dynamic)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SessionOptions:
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    graph_optimization: str = "all"
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)


# The (intra, inter) sizes of the process-wide pools, once share_thread_pools() made them.
_shared_pools: tuple[int, int] | None = None
_environment_created = False


def share_thread_pools(intra_op_threads: int, inter_op_threads: int) -> bool:
    """Give sessions with these thread counts one process-wide pair of pools, made now.

    onnxruntime's pool threads take the priority of the thread that creates
    them. With a pool per session, a session created on a low-priority thread
    (as an update would like, so that loading does not compete with serving)
    would then serve at low priority. Pools made once, here, at start-up and at
    normal priority, let every later session be created at any priority without
    starting threads of its own; models also stop each having a pool of their own.

    Call before anything else touches onnxruntime (the pools are part of its
    environment, made once per process). From then on every session of the
    process runs on these pools (onnxruntime allows no pool of its own beside
    them), whatever thread counts its options ask for. Returns False if it is
    too late (sessions keep pools of their own, as before), or if pools of other
    sizes were made already.
    """
    global _shared_pools, _environment_created
    sizes = (intra_op_threads, inter_op_threads)
    if _shared_pools is not None:
        return _shared_pools == sizes
    if _environment_created:
        return False
    ort.capi._pybind_state.set_global_thread_pool_sizes(*sizes)
    ort.get_available_providers()  # creates the environment and its pools on this thread
    _shared_pools = sizes
    _environment_created = True
    return True


def shares_thread_pools() -> bool:
    """Whether every session of this process runs on the pools of ``share_thread_pools``
    (so a session created for one purpose, say validation, can serve as well)."""
    return _shared_pools is not None


def starts_no_threads(options: SessionOptions) -> bool:
    """Whether a session with ``options`` runs only on its callers' threads and shared
    pools, so the thread creating it can have any priority."""
    single = options.intra_op_threads == 1 and options.inter_op_threads <= 1
    return _shared_pools is not None or single


def available_providers() -> list[str]:
    global _environment_created
    _environment_created = True
    return list(ort.get_available_providers())


def runtime_version() -> str:
    return str(ort.__version__)


def _dims(shape: Sequence[Any]) -> tuple[int, ...]:
    # Symbolic or unknown dimensions are dynamic.
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)


def _graph_tensor(node: Any) -> GraphTensor:
    datatype = _ORT_TO_WIRE.get(node.type)
    if datatype is None:
        raise ModelConfigError(f"tensor '{node.name}' has unsupported type {node.type}")
    return GraphTensor(node.name, datatype, _dims(node.shape))


def zero_inputs(tensors: Sequence[GraphTensor]) -> dict[str, np.ndarray[Any, Any]]:
    """A feed of zeros (empty strings for BYTES) with every dynamic dimension 1.

    Runs any graph whose inputs are plain tensors once: a warm-up before a new
    version takes traffic, and the smoke test for a version without validation
    vectors.
    """
    feeds: dict[str, np.ndarray[Any, Any]] = {}
    for tensor in tensors:
        shape = tuple(d if d >= 0 else 1 for d in tensor.shape)
        if tensor.datatype == "BYTES":
            feeds[tensor.name] = np.full(shape, "", dtype=object)
        else:
            feeds[tensor.name] = np.zeros(shape, dtype=NUMPY_DTYPES[tensor.datatype])
    return feeds


def _external_initializers(
    model_bytes: FileBytes, external_files: Mapping[str, FileBytes]
) -> tuple[FileBytes, list[str], list[Any]]:
    """The model to give onnxruntime, and the names and values of its external initializers.

    Every external reference is resolved here, against ``external_files`` (the
    verified files of the version), and replaced by a location naming no file:
    onnxruntime gets the verified bytes as OrtValues and never opens a path the
    model names (older onnxruntime versions would follow ``..`` or an absolute
    path). No external data and the model is returned as it is.
    """
    tensors = onnx_external.external_tensors(model_bytes)
    if not tensors:
        return model_bytes, [], []
    onnx_external.check_files(tensors, {k: len(v) for k, v in external_files.items()})
    values = []
    for t in tensors:
        dtype = np.dtype(onnx_external.NUMPY_TYPES[t.data_type])
        array = np.frombuffer(
            external_files[t.location], dtype, count=math.prod(t.dims), offset=t.offset
        ).reshape(t.dims)
        if t.offset % dtype.itemsize:  # kernels may assume aligned weights
            array = array.copy()
        values.append(ort.OrtValue.ortvalue_from_numpy(array))
    return onnx_external.without_external_files(model_bytes), [t.name for t in tensors], values


class OnnxSession:
    """An onnxruntime session; ``run`` is thread-safe and blocks (call it off the loop).

    ``external_files``: the verified files the model's external data may name
    (path relative to the version directory -> contents); by default those a
    ``onnx_external.ModelBytes`` carries, else none, so a model with external
    data is refused (ExternalDataError naming the tensor and its location).
    The session keeps them referenced: onnxruntime uses their memory in place.
    """

    def __init__(
        self,
        model_bytes: FileBytes,
        options: SessionOptions,
        external_files: Mapping[str, FileBytes] | None = None,
    ) -> None:
        if external_files is None:
            external_files = getattr(model_bytes, "external_files", {})
        model_bytes, names, values = _external_initializers(model_bytes, external_files)
        missing = [p for p in options.execution_providers if p not in available_providers()]
        if missing:
            raise ModelConfigError(
                f"execution provider(s) {', '.join(missing)} not available in this onnxruntime "
                f"(available: {', '.join(available_providers())})"
            )
        self.options = options
        so = ort.SessionOptions()
        if _shared_pools is not None:
            so.use_per_session_threads = False
        else:
            so.intra_op_num_threads = options.intra_op_threads
            so.inter_op_num_threads = options.inter_op_threads
        so.graph_optimization_level = _OPT_LEVELS[options.graph_optimization]
        # Fatal only: a failed run is raised to the caller (and answered), and a client
        # could otherwise flood journald with one error line per bad request.
        so.log_severity_level = 4
        if names:
            so.add_external_initializers(names, values)
        self._external = values  # onnxruntime reads their buffers for the session's life
        try:
            with _sealed_model_path(model_bytes) as model:
                self._session = ort.InferenceSession(
                    model, sess_options=so, providers=list(options.execution_providers)
                )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelConfigError(f"onnxruntime cannot load the model: {exc}") from exc
        self.inputs = tuple(_graph_tensor(n) for n in self._session.get_inputs())
        # Non-tensor outputs (sequences, maps: an ONNX-ML classifier's probabilities)
        # cannot go on the wire; they are left out and never asked for.
        self.outputs = tuple(
            _graph_tensor(n) for n in self._session.get_outputs() if n.type.startswith("tensor(")
        )
        self._run = self._session.run

    def run(
        self, output_names: Sequence[str], feeds: dict[str, np.ndarray[Any, Any]]
    ) -> list[np.ndarray[Any, Any]]:
        return self._run(output_names, feeds)  # type: ignore[no-any-return]

    def close(self) -> None:
        """Blocking: free the session now, on this thread (call it off the loop).

        A large model's weights are hundreds of MB: handing them back to the
        system takes milliseconds that the event loop, where the last reference
        to a retired version would otherwise go, must not spend.
        """
        self._run = _closed_run
        self._session = None
        self._external = []


def _closed_run(output_names: Sequence[str], feeds: dict[str, np.ndarray[Any, Any]]) -> Any:
    raise RuntimeError("the onnxruntime session was closed (its model version was retired)")
