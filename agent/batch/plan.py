"""Pure planning for batch scoring: no I/O, no pyarrow.

How the columns of a file feed a model's inputs (defaults from the graph,
overridden by ``--map``), which columns its outputs become, and the text of the
progress line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from agent.errors import ConfigError, InvalidInputError, ModelConfigError


class Tensor(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def datatype(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...


SCALAR = "scalar"  # a column of single values
LIST = "list"  # a column of lists (variable or fixed size)
OTHER = "other"  # anything else (struct, map, ...)


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    kind: str  # SCALAR, LIST or OTHER
    list_size: int | None = None  # fixed-size lists only


@dataclass(frozen=True, slots=True)
class InputBinding:
    """Model input ``input`` is read from ``columns``: one list column (``from_list``)
    or one scalar column per element of a row, in row-major order."""

    input: str
    datatype: str
    row_shape: tuple[int, ...]
    columns: tuple[str, ...]
    from_list: bool

    @property
    def row_size(self) -> int:
        return math.prod(self.row_shape)


@dataclass(frozen=True, slots=True)
class OutputBinding:
    """Model output ``output`` becomes ``columns``: one column (a scalar if a row holds
    one value, else a list of the row's values, row-major), or with ``expanded`` one
    scalar column per element (for CSV, which has no lists)."""

    output: str
    datatype: str
    row_shape: tuple[int, ...]  # -1: dynamic
    columns: tuple[str, ...]
    expanded: bool

    @property
    def row_size(self) -> int | None:
        return None if any(d < 0 for d in self.row_shape) else math.prod(self.row_shape)


def row_shape(tensor: Tensor) -> tuple[int, ...]:
    """The shape of one row of ``tensor``: its shape without the batch dimension."""
    shape = tuple(tensor.shape)
    if not shape:
        raise ModelConfigError(
            f"input '{tensor.name}' is a scalar (no batch dimension): it cannot be batch scored"
        )
    if shape[0] >= 0 and shape[0] != 1:
        # A fixed first dimension other than 1 is no batch dimension.
        raise ModelConfigError(
            f"input '{tensor.name}' has a fixed first dimension {shape[0]}: batch scoring "
            "needs a dynamic batch dimension"
        )
    rest = shape[1:]
    if any(d < 0 for d in rest):
        raise ModelConfigError(
            f"input '{tensor.name}' has shape {list(shape)}: only its first (batch) "
            "dimension may be dynamic for batch scoring"
        )
    return rest


def parse_maps(values: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """``["input=col1,col2", ...]`` -> ``{"input": ("col1", "col2")}``."""
    maps: dict[str, tuple[str, ...]] = {}
    for value in values:
        name, sep, cols = value.partition("=")
        columns = tuple(c.strip() for c in cols.split(",") if c.strip())
        if not sep or not name.strip() or not columns:
            raise ConfigError(f"--map {value!r}: expected INPUT=COLUMN[,COLUMN...]")
        if name.strip() in maps:
            raise ConfigError(f"--map: input '{name.strip()}' mapped twice")
        maps[name.strip()] = columns
    return maps


def split_names(value: str | None) -> tuple[str, ...]:
    return tuple(n.strip() for n in (value or "").split(",") if n.strip())


def _numbered(name: str, count: int) -> tuple[str, ...]:
    return tuple(f"{name}_{i}" for i in range(count))


def bind_inputs(
    inputs: Sequence[Tensor],
    columns: Mapping[str, Column],
    maps: Mapping[str, tuple[str, ...]],
) -> list[InputBinding]:
    """Which columns feed each input.

    Default, for an input ``x`` whose rows hold N values: a column ``x`` (a scalar
    column if N is 1, else a list column of N values), else N scalar columns
    ``x_0 .. x_{N-1}``. ``maps`` overrides: one column (scalar or list, as above)
    or N scalar columns. Raises InvalidInputError naming the input and the
    columns it looked for.
    """
    unknown = sorted(set(maps) - {t.name for t in inputs})
    if unknown:
        known = ", ".join(t.name for t in inputs)
        raise ConfigError(f"--map: the model has no input '{unknown[0]}' (inputs: {known})")
    bindings = []
    for tensor in inputs:
        shape = row_shape(tensor)
        size = math.prod(shape)
        wanted = maps.get(tensor.name)
        if wanted is None:
            if tensor.name in columns:
                wanted = (tensor.name,)
            elif size > 1 and all(c in columns for c in _numbered(tensor.name, size)):
                wanted = _numbered(tensor.name, size)
            else:
                alt = (
                    f" or columns {tensor.name}_0 .. {tensor.name}_{size - 1}" if size > 1 else ""
                )
                raise InvalidInputError(
                    f"input '{tensor.name}' ({tensor.datatype}, {size} value(s) a row): no "
                    f"column '{tensor.name}'{alt} in the input file; map it with --map "
                    f"{tensor.name}=COLUMN[,COLUMN...] (columns: {_shown(columns)})"
                )
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise InvalidInputError(
                f"column '{missing[0]}' (for input '{tensor.name}') is not in the input file "
                f"(columns: {_shown(columns)})"
            )
        if len(wanted) == 1:
            col = columns[wanted[0]]
            if col.kind == OTHER:
                raise InvalidInputError(
                    f"column '{col.name}' (for input '{tensor.name}'): its type cannot hold "
                    f"{tensor.datatype} values"
                )
            from_list = col.kind == LIST
            if not from_list and size != 1:
                raise InvalidInputError(
                    f"column '{col.name}' holds one value a row, input '{tensor.name}' needs "
                    f"{size}: give a list column or {size} columns with --map"
                )
            if from_list and col.list_size is not None and col.list_size != size:
                raise InvalidInputError(
                    f"column '{col.name}' holds lists of {col.list_size} values, input "
                    f"'{tensor.name}' needs {size} a row"
                )
        else:
            from_list = False
            if len(wanted) != size:
                raise InvalidInputError(
                    f"input '{tensor.name}' needs {size} value(s) a row, --map gives "
                    f"{len(wanted)} columns"
                )
            for name in wanted:
                if columns[name].kind != SCALAR:
                    raise InvalidInputError(
                        f"column '{name}' (for input '{tensor.name}') must hold one value a row"
                    )
        bindings.append(InputBinding(tensor.name, tensor.datatype, shape, wanted, from_list))
    return bindings


def _shown(columns: Mapping[str, Column], limit: int = 12) -> str:
    names = list(columns)
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "none"


def bind_outputs(
    outputs: Sequence[Tensor], selected: Sequence[str], expand: bool, taken: Sequence[str]
) -> list[OutputBinding]:
    """The columns of the chosen outputs (all by default), in the graph's order."""
    names = [t.name for t in outputs]
    unknown = [s for s in selected if s not in names]
    if unknown:
        raise ConfigError(
            f"--outputs: the model has no output '{unknown[0]}' (outputs: {', '.join(names)})"
        )
    chosen = [t for t in outputs if not selected or t.name in selected]
    bindings = []
    used = set(taken)
    for tensor in chosen:
        shape = tuple(tensor.shape)[1:] if tensor.shape else ()
        size = None if any(d < 0 for d in shape) else math.prod(shape)
        if expand and size is not None and size > 1:
            cols = _numbered(tensor.name, size)
            expanded = True
        else:
            cols = (tensor.name,)
            expanded = False
        clash = [c for c in cols if c in used]
        if clash:
            raise ConfigError(
                f"output column '{clash[0]}' would have the name of a kept input column "
                "(--keep) or another output"
            )
        used.update(cols)
        bindings.append(OutputBinding(tensor.name, tensor.datatype, shape, cols, expanded))
    return bindings


def batch_of_row(row: int, batch_size: int) -> int:
    return row // batch_size


def _clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def progress_text(
    rows: int, total: int | None, fraction: float | None, rate: float, eta: float | None,
    bar_width: int = 0,
) -> str:
    """``[#####-----]  45.0%  450,000/1,000,000 rows  123,456 rows/s  ETA 0:00:04``."""
    if total:
        fraction = min(rows / total, 1.0)
    parts = []
    if fraction is not None:
        if bar_width > 0:
            filled = int(fraction * bar_width)
            parts.append("[" + "#" * filled + "-" * (bar_width - filled) + "]")
        parts.append(f"{fraction * 100:5.1f}%")
    parts.append(f"{rows:,}/{total:,} rows" if total is not None else f"{rows:,} rows")
    parts.append(f"{rate:,.0f} rows/s")
    parts.append(f"ETA {_clock(eta)}" if eta is not None else "ETA --")
    return "  ".join(parts)
