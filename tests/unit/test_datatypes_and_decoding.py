"""Pure unit tests: the BYTES wire encoding, request decoding and validation,
``config.pbtxt`` parsing and completion, and the repository's version policies.

These import ``agent.wire`` (through ``agent.serving.model_config``), so they live in
tests/unit and run in their own pytest process (see tests/unit/conftest.py).
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agent.errors import InvalidInputError, ModelConfigError, ModelNotFoundError
from agent.serving.datatypes import (
    BYTES,
    ITEM_SIZES,
    NUMPY_DTYPES,
    config_type_from_wire,
    decode_bytes_tensor,
    encode_bytes_tensor,
    wire_from_config_type,
)
from agent.serving.inference import InferenceRequest, InputTensor, decode_request
from agent.serving.model_config import (
    BatchingSpec,
    ModelSpec,
    TensorSpec,
    complete_config,
    model_spec,
    parse_config_pbtxt,
)
from agent.serving.onnx_runtime import GraphTensor
from agent.serving.repository import check_model_name, read_model, scan_repository, select_versions
from agent.wire import model_config_pb2 as mc

FIXED_TYPES = sorted(ITEM_SIZES)  # every datatype with a fixed element size


def element(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)


# -- datatypes ------------------------------------------------------------------


def test_config_and_wire_type_names_map_both_ways() -> None:
    for wire in NUMPY_DTYPES:
        config_name = config_type_from_wire(wire)
        assert wire_from_config_type(config_name) == wire
        assert config_name in set(mc.DataType.keys())
    assert config_type_from_wire(BYTES) == "TYPE_STRING"
    with pytest.raises(ValueError, match="TYPE_BF16"):
        wire_from_config_type("TYPE_BF16")


# -- BYTES encoding ---------------------------------------------------------------


@given(st.lists(_text, max_size=30))
def test_bytes_tensor_round_trip_from_text(texts: list[str]) -> None:
    array = np.array(texts, dtype=np.object_).reshape(len(texts))
    raw = encode_bytes_tensor(array)
    assert len(raw) == sum(4 + len(t.encode()) for t in texts)
    assert decode_bytes_tensor("t", raw, len(texts)).tolist() == texts


@given(st.lists(_text, min_size=1, max_size=24), st.sampled_from([1, 2, 3, 4]))
def test_bytes_tensor_round_trip_from_bytes_in_c_order(texts: list[str], rows: int) -> None:
    assume(len(texts) % rows == 0)
    array = np.array([t.encode() for t in texts], dtype=np.object_).reshape(rows, -1)
    raw = encode_bytes_tensor(array)
    assert raw == b"".join(element(t.encode()) for t in texts)
    assert decode_bytes_tensor("t", raw, len(texts)).tolist() == texts


@given(st.lists(_text, min_size=1, max_size=12), st.data())
def test_truncated_bytes_tensor_is_always_rejected(texts: list[str], data: st.DataObject) -> None:
    raw = encode_bytes_tensor(np.array(texts, dtype=np.object_))
    cut = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
    with pytest.raises(InvalidInputError, match="input 'words'"):
        decode_bytes_tensor("words", raw[:cut], len(texts))


@given(st.lists(_text, max_size=12), st.binary(min_size=1, max_size=16))
def test_bytes_left_over_after_the_last_element_are_rejected(
    texts: list[str], extra: bytes
) -> None:
    raw = encode_bytes_tensor(np.array(texts, dtype=np.object_)) + extra
    with pytest.raises(InvalidInputError, match=f"input 'words': {len(extra)} bytes left over"):
        decode_bytes_tensor("words", raw, len(texts))


@given(st.lists(_text, min_size=1, max_size=12), st.sampled_from([-1, 1]))
def test_element_count_other_than_encoded_is_rejected(texts: list[str], delta: int) -> None:
    raw = encode_bytes_tensor(np.array(texts, dtype=np.object_))
    with pytest.raises(InvalidInputError, match="input 'words'"):
        decode_bytes_tensor("words", raw, len(texts) + delta)


def test_declared_length_past_the_end_is_rejected_naming_it() -> None:
    raw = element(b"ok") + struct.pack("<I", 2**32 - 1) + b"abc"
    with pytest.raises(InvalidInputError, match=r"element 1 declares 4294967295 bytes but only 3"):
        decode_bytes_tensor("words", raw, 2)


@given(
    st.lists(_text, max_size=5),
    st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"abc\x80"]),
)
def test_non_utf8_element_is_rejected_naming_its_index(texts: list[str], bad: bytes) -> None:
    raw = b"".join(element(t.encode()) for t in texts) + element(bad)
    with pytest.raises(InvalidInputError, match=f"input 'w': BYTES element {len(texts)} .*UTF-8"):
        decode_bytes_tensor("w", raw, len(texts) + 1)


# -- decode_request -------------------------------------------------------------------


def spec_with(
    inputs: list[TensorSpec],
    max_batch_size: int = 0,
    outputs: list[TensorSpec] | None = None,
) -> ModelSpec:
    return ModelSpec(
        name="m",
        version="1",
        max_batch_size=max_batch_size,
        inputs=tuple(inputs),
        outputs=tuple(outputs or [TensorSpec("out", "FP32", (-1,), NUMPY_DTYPES["FP32"])]),
        batching=None,
        instance_count=1,
        max_queue_size=8,
        default_timeout_us=0,
    )


def tensor_spec(name: str, datatype: str, dims: tuple[int, ...]) -> TensorSpec:
    return TensorSpec(name, datatype, dims, NUMPY_DTYPES[datatype])


def request(*inputs: InputTensor, outputs: list[str] | None = None) -> InferenceRequest:
    return InferenceRequest("m", "", "id", list(inputs), outputs)


_shapes = st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=3)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(datatype=st.sampled_from(FIXED_TYPES), shape=_shapes, data=st.data())
def test_raw_bytes_must_match_shape_times_datatype(
    datatype: str, shape: list[int], data: st.DataObject
) -> None:
    spec = spec_with([tensor_spec("x", datatype, (-1,) * len(shape))])
    needed = math.prod(shape) * ITEM_SIZES[datatype]
    size = data.draw(st.integers(min_value=0, max_value=needed + 64).filter(lambda n: n != needed))
    raw = bytes(size)
    with pytest.raises(InvalidInputError) as info:
        decode_request(spec, request(InputTensor("x", datatype, tuple(shape), raw=raw)))
    message = str(info.value)
    assert f"input 'x': got {size} bytes" in message
    assert f"{datatype} needs {needed}" in message


@settings(max_examples=200)
@given(datatype=st.sampled_from(FIXED_TYPES), shape=_shapes, data=st.data())
def test_matching_raw_bytes_decode_to_the_same_values(
    datatype: str, shape: list[int], data: st.DataObject
) -> None:
    dtype = NUMPY_DTYPES[datatype]
    count = math.prod(shape)
    raw = data.draw(st.binary(min_size=count * dtype.itemsize, max_size=count * dtype.itemsize))
    spec = spec_with([tensor_spec("x", datatype, (-1,) * len(shape))])
    decoded = decode_request(spec, request(InputTensor("x", datatype, tuple(shape), raw=raw)))
    array = decoded.feeds["x"]
    assert array.shape == tuple(shape)
    assert array.dtype == dtype
    assert array.tobytes() == raw
    assert decoded.batch_size == 1


@settings(max_examples=200)
@given(
    dims=st.lists(st.integers(min_value=2**20, max_value=2**62), min_size=1, max_size=3),
    size=st.integers(min_value=0, max_value=256),
    datatype=st.sampled_from([*FIXED_TYPES, BYTES]),
)
def test_enormous_shapes_are_rejected_against_the_data_sent(
    dims: list[int], size: int, datatype: str
) -> None:
    spec = spec_with([tensor_spec("x", datatype, (-1,) * len(dims))])
    with pytest.raises(InvalidInputError, match=r"input 'x': got \d+ bytes"):
        decode_request(spec, request(InputTensor("x", datatype, tuple(dims), raw=bytes(size))))


@given(shape=_shapes, data=st.data())
def test_bytes_input_needs_a_prefix_per_element(shape: list[int], data: st.DataObject) -> None:
    count = math.prod(shape)
    assume(count > 0)
    size = data.draw(st.integers(min_value=0, max_value=4 * count - 1))
    spec = spec_with([tensor_spec("s", BYTES, (-1,) * len(shape))])
    with pytest.raises(InvalidInputError, match=f"input 's': got {size} bytes"):
        decode_request(spec, request(InputTensor("s", BYTES, tuple(shape), raw=bytes(size))))


@given(texts=st.lists(_text, min_size=1, max_size=8))
def test_bytes_input_decodes_to_text(texts: list[str]) -> None:
    spec = spec_with([tensor_spec("s", BYTES, (-1,))])
    raw = b"".join(element(t.encode()) for t in texts)
    decoded = decode_request(spec, request(InputTensor("s", BYTES, (len(texts),), raw=raw)))
    assert decoded.feeds["s"].tolist() == texts


@given(shape=_shapes, values=st.lists(st.floats(width=32, allow_nan=False), max_size=40))
def test_typed_value_count_must_match_the_shape(shape: list[int], values: list[float]) -> None:
    spec = spec_with([tensor_spec("x", "FP32", (-1,) * len(shape))])
    tensor = InputTensor("x", "FP32", tuple(shape), typed=values)
    if len(values) == math.prod(shape):
        decoded = decode_request(spec, request(tensor))
        assert decoded.feeds["x"].reshape(-1).tolist() == values
    else:
        with pytest.raises(InvalidInputError, match=f"input 'x': got {len(values)} values"):
            decode_request(spec, request(tensor))


BATCHING = spec_with(
    [tensor_spec("x", "FP32", (4,)), tensor_spec("s", BYTES, (1,))], max_batch_size=4
)


def _x(batch: int, shape: tuple[int, ...] | None = None, datatype: str = "FP32") -> InputTensor:
    shape = shape or (batch, 4)
    return InputTensor("x", datatype, shape, raw=bytes(4 * math.prod(shape)))


def _s(batch: int) -> InputTensor:
    return InputTensor("s", BYTES, (batch, 1), raw=element(b"a") * batch)


@pytest.mark.parametrize(
    ("inputs", "fragments"),
    [
        ([_x(1)], ["missing input", "'s'"]),
        ([_x(1), _s(1), InputTensor("zz", "FP32", (1,), raw=bytes(4))],
         ["unexpected input 'zz'", "x, s"]),
        ([_x(1), _x(1), _s(1)], ["input 'x'", "more than once"]),
        ([_x(1, datatype="FP64", shape=(1, 4)), _s(1)], ["input 'x'", "FP64", "FP32"]),
        ([_x(1, shape=(4,)), _s(1)], ["input 'x'", "[batch] + [4]"]),
        ([_x(1, shape=(1, 5)), _s(1)], ["input 'x'", "[1, 5]", "[-1, 4]"]),
        ([_x(5), _s(5)], ["input 'x'", "batch size 5", "1..4"]),
        ([_x(0), _s(0)], ["input 'x'", "batch size 0"]),
        ([_x(2), _s(1)], ["input 's'", "batch size 1", "2"]),
        ([InputTensor("x", "FP32", (-2, 4), raw=b""), _s(1)], ["input 'x'", "negative"]),
        ([InputTensor("x", "FP32", (1, 4), raw=bytes(16), typed=[0.0] * 4), _s(1)],
         ["input 'x'", "both"]),
    ],
)
def test_decode_request_errors_name_the_input(
    inputs: list[InputTensor], fragments: list[str]
) -> None:
    with pytest.raises(InvalidInputError) as info:
        decode_request(BATCHING, request(*inputs))
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_requested_outputs_are_checked() -> None:
    good = request(_x(2), _s(2), outputs=["out"])
    decoded = decode_request(BATCHING, good)
    assert decoded.output_names == ["out"] and decoded.batch_size == 2
    with pytest.raises(InvalidInputError, match=r"requested output 'nope'.*outputs: out"):
        decode_request(BATCHING, request(_x(1), _s(1), outputs=["nope"]))
    with pytest.raises(InvalidInputError, match="output 'out' is requested more than once"):
        decode_request(BATCHING, request(_x(1), _s(1), outputs=["out", "out"]))


def test_optional_inputs_may_be_left_out() -> None:
    optional = TensorSpec("o", "FP32", (1,), NUMPY_DTYPES["FP32"], optional=True)
    spec = spec_with([tensor_spec("x", "FP32", (1,)), optional])
    decoded = decode_request(spec, request(InputTensor("x", "FP32", (1,), raw=bytes(4))))
    assert list(decoded.feeds) == ["x"]


# -- config.pbtxt ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("foo: 1", ["no field named \"foo\"", "1:1"]),
        ('input [ { name: "x" data_type: TYPE_FOO } ]', ["TYPE_FOO"]),
        ('max_batch_size: "a"', ["max_batch_size", "integer"]),
        ('name: "x"\nmax_batch_size: 4 {', ["2:"]),
        ("dynamic_batching { max_queue_delay: 5 }", ["max_queue_delay"]),
        ("instance_group [ { kind: KIND_TPU } ]", ["KIND_TPU"]),
    ],
)
def test_parse_errors_name_the_field_and_the_file(text: str, fragments: list[str]) -> None:
    with pytest.raises(ModelConfigError) as info:
        parse_config_pbtxt(text, "repo/m/config.pbtxt")
    message = str(info.value)
    assert message.startswith("repo/m/config.pbtxt: ")
    for fragment in fragments:
        assert fragment in message, message


def test_triton_config_parses() -> None:
    config = parse_config_pbtxt(
        """
        name: "m"
        platform: "onnxruntime_onnx"
        max_batch_size: 8
        version_policy: { specific: { versions: [1, 3] } }
        input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
        output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
        dynamic_batching {
          preferred_batch_size: [ 4, 8 ]
          max_queue_delay_microseconds: 100
          default_queue_policy { max_queue_size: 5 default_timeout_microseconds: 2000 }
        }
        instance_group [ { count: 2 kind: KIND_CPU } ]
        """,
        "m/config.pbtxt",
    )
    assert config.max_batch_size == 8
    assert list(config.version_policy.specific.versions) == [1, 3]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]


GRAPH_IN = [GraphTensor("x", "FP32", (-1, 4)), GraphTensor("s", "BYTES", (-1, 1))]
GRAPH_OUT = [GraphTensor("y", "FP32", (-1, 4))]


def complete(text: str, name: str = "m", default_instances: int = 1) -> mc.ModelConfig:
    return complete_config(
        parse_config_pbtxt(text, "config.pbtxt"), name, GRAPH_IN, GRAPH_OUT, default_instances
    )


def test_empty_config_is_completed_from_the_graph() -> None:
    config = complete("", default_instances=3)
    assert config.name == "m"
    assert config.platform == "onnxruntime_onnx"
    assert config.backend == "onnxruntime"
    assert config.max_batch_size == 0
    assert config.default_model_filename == "model.onnx"
    assert config.version_policy.latest.num_versions == 1
    assert [(i.name, mc.DataType.Name(i.data_type), list(i.dims)) for i in config.input] == [
        ("x", "TYPE_FP32", [-1, 4]),
        ("s", "TYPE_STRING", [-1, 1]),
    ]
    assert [(o.name, list(o.dims)) for o in config.output] == [("y", [-1, 4])]
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (3, mc.ModelInstanceGroup.KIND_CPU)
    ]


def test_batching_config_drops_the_batch_dimension() -> None:
    config = complete("max_batch_size: 4")
    assert [list(i.dims) for i in config.input] == [[4], [1]]
    spec = model_spec(config, "1", default_max_queue_size=16)
    assert spec.max_batch_size == 4
    assert spec.inputs[0].dims == (4,)
    assert spec.batching is None
    assert spec.max_queue_size == 16


def test_model_spec_takes_batching_and_queue_policy() -> None:
    config = complete(
        """
        max_batch_size: 8
        dynamic_batching {
          preferred_batch_size: [ 2, 8 ]
          max_queue_delay_microseconds: 500
          default_queue_policy { max_queue_size: 3 default_timeout_microseconds: 7000 }
        }
        instance_group [ { count: 2 }, { count: 1 kind: KIND_AUTO } ]
        """
    )
    spec = model_spec(config, "4", default_max_queue_size=1024)
    assert spec.batching == BatchingSpec((2, 8), 500)
    assert spec.max_queue_size == 3
    assert spec.default_timeout_us == 7000
    assert spec.instance_count == 3
    assert spec.version == "4"
    assert all(g.kind == mc.ModelInstanceGroup.KIND_CPU for g in config.instance_group)


def test_dynamic_batching_completes_max_batch_size_as_triton() -> None:
    assert complete("dynamic_batching { }").max_batch_size == 4  # default-max-batch-size
    fixed = [GraphTensor("x", "FP32", (2, 4))]
    with pytest.raises(ModelConfigError, match="dynamic_batching needs max_batch_size"):
        complete_config(parse_config_pbtxt("dynamic_batching { }", "c"), "m", fixed,
                        [GraphTensor("y", "FP32", (2, 4))], 1)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ('name: "other"', ["'other'", "directory"]),
        ('platform: "tensorrt_plan"', ["platform 'tensorrt_plan'", "onnxruntime_onnx"]),
        ('backend: "python"', ["backend 'python'"]),
        ("max_batch_size: -1", ["max_batch_size"]),
        ('input [ { name: "nope" } ]', ["input 'nope'", "not in the ONNX graph", "x, s"]),
        ('output [ { name: "z" } ]', ["output 'z'", "not in the ONNX graph"]),
        ('input [ { name: "x" data_type: TYPE_INT32 } ]',
         ["input 'x'", "TYPE_INT32", "FP32"]),
        ('input [ { name: "x" dims: [ 5, 3 ] } ]', ["input 'x'", "[5, 3]", "[-1, 4]"]),
        ('input [ { name: "x" dims: [ 4 ] } ]', ["input 'x'", "[4]", "[-1, 4]"]),
        ('max_batch_size: 2\ninput [ { name: "x" dims: [ 5 ] } ]',
         ["input 'x'", "[5]", "[4]", "batch dimension"]),
        ('input [ { name: "x" reshape: { shape: [ 4 ] } } ]', ["input 'x'", "reshape"]),
        ("max_batch_size: 4\ndynamic_batching { preferred_batch_size: [ 8 ] }",
         ["preferred_batch_size 8", "1..max_batch_size (4)"]),
        ("instance_group [ { kind: KIND_GPU } ]", ["KIND_GPU"]),
        ("instance_group [ { count: -2 } ]", ["instance_group count"]),
    ],
)
def test_config_errors_name_the_field(text: str, fragments: list[str]) -> None:
    with pytest.raises(ModelConfigError) as info:
        complete(text)
    message = str(info.value)
    assert "model 'm'" in message or "of 'm'" in message, message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize(
    ("text", "shape", "problem"),
    [
        ("max_batch_size: 4", (2, 4), "a fixed first dimension 2"),
        ('max_batch_size: 4\ninput [ { name: "x" } ]', (2, 4), "a fixed first dimension 2"),
        ("max_batch_size: 4", (), "no dimensions"),
    ],
)
def test_a_batching_model_needs_a_dynamic_first_dimension(
    text: str, shape: tuple[int, ...], problem: str
) -> None:
    # Whether or not config.pbtxt lists the tensor.
    with pytest.raises(ModelConfigError, match=f"input 'x' has {problem}"):
        complete_config(
            parse_config_pbtxt(text, "c"), "m", [GraphTensor("x", "FP32", shape)], GRAPH_OUT, 1
        )


def test_a_graph_dimension_left_dynamic_may_be_fixed_in_config() -> None:
    # As in Triton: config.pbtxt may be more specific than the graph.
    config = complete('input [ { name: "x" dims: [ 5, 4 ] } ]')
    assert list(config.input[0].dims) == [5, 4]


def test_complete_config_leaves_the_parsed_message_alone() -> None:
    parsed = parse_config_pbtxt("max_batch_size: 4", "c")
    complete_config(parsed, "m", GRAPH_IN, GRAPH_OUT, 1)
    assert len(parsed.input) == 0 and parsed.name == ""


# -- repository and version policy -------------------------------------------------------


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    def version(model: str, v: str) -> None:
        (tmp_path / model / v).mkdir(parents=True)
        (tmp_path / model / v / "model.onnx").write_bytes(b"onnx")

    for v in ("1", "2", "3", "10"):
        version("many", v)
    (tmp_path / "many" / "config.pbtxt").write_text('name: "many"')
    for junk in ("0", "abc", "-1", "2.5"):
        (tmp_path / "many" / junk).mkdir()
    (tmp_path / "many" / "7").write_text("a file, not a version directory")
    os.symlink(tmp_path / "many" / "1", tmp_path / "many" / "11")
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.pbtxt").write_text("max_batch_size: 1")
    (tmp_path / "keys").mkdir()  # neither config nor versions: not a model
    (tmp_path / "keys" / "k.pub").write_text("key")
    version(".hidden", "1")
    version("bad name!", "1")
    os.symlink(tmp_path / "many", tmp_path / "linked")
    (tmp_path / "README.md").write_text("not a model")
    return tmp_path


def test_scan_repository_finds_models_and_numeric_versions(repo: Path) -> None:
    models = scan_repository(repo)
    assert sorted(models) == ["config_only", "many"]
    assert models["many"].versions == (1, 2, 3, 10)
    assert models["many"].config_text == 'name: "many"'
    assert models["config_only"].versions == ()
    assert models["config_only"].path == repo / "config_only"


def test_scan_repository_of_a_missing_directory_fails(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="not a directory"):
        scan_repository(tmp_path / "absent")


def test_read_model_by_name(repo: Path) -> None:
    assert read_model(repo, "many").versions == (1, 2, 3, 10)
    with pytest.raises(ModelNotFoundError, match="'absent'"):
        read_model(repo, "absent")
    with pytest.raises(ModelNotFoundError, match="not a valid model name"):
        read_model(repo, "../many")


@pytest.mark.parametrize(
    "name", ["", ".", "..", "a/b", "../x", ".hidden", "a b", "x" * 200, "a..b"]
)
def test_check_model_name_rejects_path_like_names(name: str) -> None:
    with pytest.raises(ModelNotFoundError):
        check_model_name(name)


@pytest.mark.parametrize("name", ["m", "tabular_classifier", "m-1.2", "A9"])
def test_check_model_name_accepts_ordinary_names(name: str) -> None:
    assert check_model_name(name) == name


def policy(text: str) -> mc.ModelVersionPolicy:
    return parse_config_pbtxt(f"version_policy: {{ {text} }}", "c").version_policy


AVAILABLE = (1, 2, 3, 10)


@pytest.mark.parametrize(
    ("policy_text", "expected"),
    [
        (None, [10]),  # no policy: latest 1 (numeric, not lexicographic)
        ("latest: { num_versions: 1 }", [10]),
        ("latest: { num_versions: 2 }", [3, 10]),
        ("latest: { num_versions: 9 }", [1, 2, 3, 10]),
        ("all: { }", [1, 2, 3, 10]),
        ("specific: { versions: [ 1, 3 ] }", [1, 3]),
        ("specific: { versions: [ 3, 7 ] }", [3]),  # 7 does not exist
        ("specific: { versions: [ 7 ] }", []),
    ],
)
def test_select_versions(policy_text: str | None, expected: list[int]) -> None:
    chosen = policy(policy_text) if policy_text else mc.ModelVersionPolicy()
    assert select_versions(chosen, AVAILABLE) == expected


_versions = st.lists(st.integers(min_value=1, max_value=10**6), unique=True, max_size=20).map(
    lambda vs: tuple(sorted(vs))
)


@given(available=_versions, n=st.integers(min_value=1, max_value=25))
def test_latest_n_is_the_n_highest(available: tuple[int, ...], n: int) -> None:
    chosen = select_versions(policy(f"latest: {{ num_versions: {n} }}"), available)
    assert chosen == sorted(available)[-n:] if available else chosen == []
    assert len(chosen) == min(n, len(available))


@given(available=_versions, wanted=st.lists(st.integers(min_value=1, max_value=10**6), max_size=8))
def test_specific_is_the_intersection_in_order(
    available: tuple[int, ...], wanted: list[int]
) -> None:
    text = f"specific: {{ versions: [ {', '.join(map(str, wanted))} ] }}"
    assert select_versions(policy(text), available) == sorted(set(available) & set(wanted))


@given(available=_versions)
def test_all_is_everything(available: tuple[int, ...]) -> None:
    assert select_versions(policy("all: { }"), available) == list(available)
