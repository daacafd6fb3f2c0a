"""Building model variants with onnxruntime's offline tools.

The second module allowed to import onnxruntime (an explicit exception in the
import contract): it needs onnxruntime's offline graph writer
(``SessionOptions.optimized_model_filepath``) and ``onnxruntime.quantization``,
which pulls in the ``onnx`` package and is imported only when a variant is
built. Keeping both out of ``onnx_runtime`` keeps the serving adapter small
and every serving process free of the quantisation tool chain.

Both tools work on files: they run in a private temporary directory, and the
results come back as bytes (to be checked and stored by the caller).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import onnxruntime as ort

from agent.errors import ModelConfigError


def optimize_graph(model_bytes: bytes, provider: str) -> bytes:
    """The model as onnxruntime optimises it for ``provider``, saved offline.

    ORT_ENABLE_ALL adds layout and fused kernels specific to the CPU provider; for
    other providers only the EXTENDED level's optimisations are portable to them.
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if provider == "CPUExecutionProvider"
        else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    )
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    with tempfile.TemporaryDirectory(prefix="edge-variant-") as tmp:
        out = Path(tmp) / "graph.onnx"
        so.optimized_model_filepath = str(out)
        try:
            ort.InferenceSession(model_bytes, sess_options=so, providers=[provider])
        except Exception as exc:  # onnxruntime's own untyped errors
            raise ModelConfigError(f"graph optimisation failed: {exc}") from exc
        return out.read_bytes()


class _QuietQuantizer(logging.Filter):
    """The quantisation tool logs advice and per-tensor notes on the root logger: below
    warnings they would flood the agent's log, and its generic pre-processing hint is
    no help on a device."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "quantization" not in record.pathname.replace("\\", "/"):
            return True
        advice = "pre-processing before quantization" in record.getMessage()
        return record.levelno >= logging.WARNING and not advice


def quantize_int8(model_bytes: bytes) -> bytes:
    """Dynamic INT8 quantisation: weights stored as int8, activations quantised per run."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quiet = _QuietQuantizer()
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        with tempfile.TemporaryDirectory(prefix="edge-variant-") as tmp:
            src, dst = Path(tmp) / "model.onnx", Path(tmp) / "int8.onnx"
            fd = os.open(src, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(model_bytes)
            try:
                quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
            except Exception as exc:  # the tool raises whatever onnx raises
                raise ModelConfigError(f"int8 quantisation failed: {exc}") from exc
            return dst.read_bytes()
    finally:
        root.removeFilter(quiet)
