"""agent.batch.plan: which columns feed which input, output columns, progress text (pure)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from agent.batch.plan import (
    LIST,
    OTHER,
    SCALAR,
    Column,
    bind_inputs,
    bind_outputs,
    parse_maps,
    progress_text,
)
from agent.errors import ConfigError, InvalidInputError, ModelConfigError


@dataclass(frozen=True)
class T:
    name: str
    datatype: str
    shape: tuple[int, ...]


def cols(*specs: tuple[str, str] | tuple[str, str, int]) -> dict[str, Column]:
    return {s[0]: Column(s[0], s[1], s[2] if len(s) > 2 else None) for s in specs}


FEATURES = T("features", "FP32", (-1, 8))


def test_a_list_column_named_like_the_input_is_the_default() -> None:
    (b,) = bind_inputs([FEATURES], cols(("id", SCALAR), ("features", LIST, 8)), {})
    assert b.columns == ("features",) and b.from_list and b.row_shape == (8,)


def test_numbered_scalar_columns_are_the_fallback() -> None:
    columns = cols(*[(f"features_{i}", SCALAR) for i in range(8)])
    (b,) = bind_inputs([FEATURES], columns, {})
    assert b.columns == tuple(f"features_{i}" for i in range(8)) and not b.from_list


def test_map_overrides_with_columns_in_order() -> None:
    columns = cols(*[(f"c{i}", SCALAR) for i in range(8)])
    maps = parse_maps([f"features={','.join(f'c{i}' for i in reversed(range(8)))}"])
    (b,) = bind_inputs([FEATURES], columns, maps)
    assert b.columns[0] == "c7" and b.columns[-1] == "c0"


def test_a_one_value_input_takes_a_scalar_column() -> None:
    (b,) = bind_inputs([T("w", "FP64", (-1, 1))], cols(("w", SCALAR)), {})
    assert b.row_shape == (1,) and not b.from_list


@pytest.mark.parametrize(
    ("columns", "maps", "words"),
    [
        (cols(("x", SCALAR)), {}, ["input 'features'", "no column 'features'", "features_0"]),
        (cols(("features", SCALAR)), {}, ["holds one value a row", "needs 8"]),
        (cols(("features", LIST, 4)), {}, ["lists of 4 values", "needs 8"]),
        (cols(("features", OTHER)), {}, ["cannot hold FP32"]),
        (cols(("a", SCALAR)), {"features": ("a", "b")}, ["column 'b'", "not in the input"]),
        (cols(("a", SCALAR), ("b", SCALAR)), {"features": ("a", "b")}, ["--map gives 2"]),
    ],
)
def test_bad_mappings_name_the_input_and_column(columns, maps, words) -> None:
    with pytest.raises(InvalidInputError) as info:
        bind_inputs([FEATURES], columns, maps)
    for word in words:
        assert word in str(info.value)


def test_map_syntax_and_unknown_inputs_are_config_errors() -> None:
    for bad in (["features"], ["=a"], ["features="], ["x=a", "x=b"]):
        with pytest.raises(ConfigError):
            parse_maps(bad)
    with pytest.raises(ConfigError, match="no input 'nope'"):
        bind_inputs([FEATURES], {}, {"nope": ("a",)})


def test_inputs_without_a_batch_dimension_are_refused() -> None:
    for shape in ((), (4, 8), (-1, -1)):
        with pytest.raises(ModelConfigError):
            bind_inputs([T("features", "FP32", shape)], cols(("features", LIST)), {})


def test_outputs_become_one_column_or_numbered_columns_for_csv() -> None:
    outputs = [T("probabilities", "FP32", (-1, 3)), T("label", "INT64", (-1, 1))]
    probs, label = bind_outputs(outputs, (), expand=False, taken=("id",))
    assert probs.columns == ("probabilities",) and probs.row_size == 3
    assert label.columns == ("label",) and label.row_size == 1
    probs, _ = bind_outputs(outputs, (), expand=True, taken=())
    assert probs.columns == ("probabilities_0", "probabilities_1", "probabilities_2")
    (only,) = bind_outputs(outputs, ("label",), expand=False, taken=())
    assert only.output == "label"
    with pytest.raises(ConfigError, match="kept input column"):
        bind_outputs(outputs, (), expand=False, taken=("label",))
    with pytest.raises(ConfigError, match="no output 'nope'"):
        bind_outputs(outputs, ("nope",), expand=False, taken=())


def test_progress_text() -> None:
    text = progress_text(450_000, 1_000_000, None, 123_456.0, 4.4, bar_width=10)
    assert text == "[####------]   45.0%  450,000/1,000,000 rows  123,456 rows/s  ETA 0:00:04"
    assert progress_text(10, None, None, 5.0, None) == "10 rows  5 rows/s  ETA --"
    assert progress_text(10, None, 0.5, 5.0, 3725.0).startswith(" 50.0%  10 rows")
