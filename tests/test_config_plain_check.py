"""The config's plain check (agent.config._plainly_valid) never passes what the JSON
Schema refuses, and a good config starts the agent without importing jsonschema."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import _SCHEMA, DEFAULTS, _plainly_valid, _validator
from tests.agent_process import REPO_ROOT


def _leaves(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.extend(_leaves(value, (*prefix, key)))
        else:
            out.append((*prefix, key))
    return out


LEAVES = _leaves(DEFAULTS)
VALUES = st.one_of(
    st.integers(-5, 70_000),
    st.floats(-10, 1e6, allow_nan=False),
    st.booleans(),
    st.text(max_size=12),
    st.sampled_from(["auto", "inline", "worker", "all", "json", "info", "", "127.0.0.1:0"]),
    st.lists(st.text(max_size=6), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(0, 3), max_size=2),
)


def test_the_defaults_and_an_empty_file_pass_the_plain_check() -> None:
    assert _plainly_valid({}, _SCHEMA)
    assert _plainly_valid(DEFAULTS, _SCHEMA)


@settings(max_examples=400, deadline=None)
@given(path=st.sampled_from(LEAVES), value=VALUES, also_unknown=st.booleans())
def test_the_plain_check_never_passes_what_the_schema_refuses(
    path: tuple[str, ...], value: Any, also_unknown: bool
) -> None:
    config: dict[str, Any] = {}
    node = config
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    if also_unknown:
        node["no_such_key"] = 1
    if _plainly_valid(config, _SCHEMA):
        errors = list(_validator()(_SCHEMA).iter_errors(config))
        assert not errors, (config, errors[0].message)


def test_serving_start_up_does_not_import_jsonschema() -> None:
    code = (
        "import sys, agent.app, agent.cli\n"
        "from agent.config import build_config\n"
        "build_config({'runtime': {'execution': 'inline'}, 'server': {'address': '127.0.0.1:0'}})\n"
        "mods = ('jsonschema', 'prometheus_client', 'paho')\n"
        "print(sorted(m for m in mods if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout
