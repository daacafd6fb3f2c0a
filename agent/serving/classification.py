"""Triton's classification extension and config.pbtxt ``label_filename``.

A requested output with the parameter ``classification`` = k comes back as a
BYTES tensor of the k largest values of each batch row, best first, each
``"<value>:<index>"`` or ``"<value>:<index>:<label>"`` when the output has a
label file (one label per line, line i labels class i). The shape is
``[batch, k]`` for a batching model, else ``[k]``; k is capped at the number
of classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.errors import InvalidInputError, ModelConfigError
from agent.serving.datatypes import BYTES, NUMPY_DTYPES, encode_bytes_tensor
from agent.serving.inference import OutputTensor
from agent.serving.model_config import TensorSpec
from agent.wire import model_config_pb2 as mc

MAX_LABEL_FILE_BYTES = 16 * 1024 * 1024
_FLOATS = ("FP16", "FP32", "FP64")


def read_labels(model_dir: Path, config: mc.ModelConfig) -> dict[str, tuple[str, ...]]:
    """Each output's labels, from its ``label_filename`` in the model directory (as
    Triton: beside config.pbtxt, the same trust as config.pbtxt itself)."""
    labels: dict[str, tuple[str, ...]] = {}
    for output in config.output:
        name = output.label_filename
        if not name:
            continue
        where = f"model '{config.name}': output '{output.name}': label_filename '{name}'"
        if "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
            raise ModelConfigError(f"{where} must be a file name in the model directory")
        path = model_dir / name
        try:
            if path.is_symlink() or not path.is_file():
                raise ModelConfigError(f"{where}: not a regular file in {model_dir}")
            if path.stat().st_size > MAX_LABEL_FILE_BYTES:
                raise ModelConfigError(f"{where}: larger than {MAX_LABEL_FILE_BYTES} bytes")
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelConfigError(f"{where}: cannot read it: {exc}") from None
        labels[output.name] = tuple(text.splitlines())
    return labels


def _format(value: np.generic, datatype: str) -> str:
    # As Triton (std::to_string): six decimals for floating point, integers as they are.
    return f"{float(value):f}" if datatype in _FLOATS else str(int(value))


def classify(
    output: OutputTensor, spec: TensorSpec, k: int, batch_size: int, batching: bool
) -> OutputTensor:
    """The top-``k`` classification of ``output`` (its raw values), as Triton returns it."""
    if k < 1:
        raise InvalidInputError(
            f"output '{output.name}': classification count must be >= 1, got {k}"
        )
    if output.datatype == BYTES or output.datatype == "BOOL":
        raise InvalidInputError(
            f"output '{output.name}': classification needs a numeric output, not "
            f"{output.datatype}"
        )
    values = np.frombuffer(output.raw, dtype=NUMPY_DTYPES[output.datatype])
    rows = values.reshape(batch_size if batching else 1, -1)
    k = min(k, rows.shape[1])
    labels = spec.labels
    result = np.empty((rows.shape[0], k), dtype=object)
    for r, row in enumerate(rows):
        order = np.argsort(-row.astype(np.float64), kind="stable")[:k]
        for j, index in enumerate(order):
            text = f"{_format(row[index], output.datatype)}:{int(index)}"
            if int(index) < len(labels):
                text += f":{labels[int(index)]}"
            result[r, j] = text
    shape = (rows.shape[0], k) if batching else (k,)
    return OutputTensor(output.name, BYTES, shape, encode_bytes_tensor(result))
