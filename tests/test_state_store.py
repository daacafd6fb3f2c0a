"""The durable state file: atomic replacement, round trips, corrupt files refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.common.durable import write_atomically
from agent.fleet.state_store import (
    AgentState,
    JobRecord,
    ModelRecord,
    StateError,
    StateStore,
)


def sample_state() -> AgentState:
    state = AgentState(highest_sequence=42)
    state.models["tabular_classifier"] = ModelRecord(3, 3, 2)
    state.job = JobRecord(
        deployment={"deployment_id": "d-1", "sequence": 42, "model_name": "tabular_classifier",
                    "model_version": 3},
        phase="Active",
        status="IN_PROGRESS",
        previous_active=2,
        probation_until=1_800_000_060.0,
        attempts=1,
    )
    return state


def test_a_fresh_directory_gives_a_fresh_state(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    store.ensure()
    state = store.load()
    assert state == AgentState()
    assert state.pins() == {}
    assert (tmp_path / "state").is_dir()
    assert oct((tmp_path / "state").stat().st_mode & 0o777) == oct(0o700)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save(sample_state())
    loaded = store.load()
    assert loaded == sample_state()
    assert loaded.pins() == {"tabular_classifier": 3}
    assert loaded.highest_versions() == {"tabular_classifier": 3}
    assert loaded.job is not None
    assert (loaded.job.deployment_id, loaded.job.sequence) == ("d-1", 42)
    assert (loaded.job.model, loaded.job.model_version) == ("tabular_classifier", 3)
    assert oct(store.path.stat().st_mode & 0o777) == oct(0o600)


def test_save_replaces_and_leaves_no_temporaries(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    for sequence in range(1, 6):
        store.save(AgentState(highest_sequence=sequence))
    assert store.load().highest_sequence == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_ensure_removes_temporaries_left_by_a_crash(tmp_path: Path) -> None:
    (tmp_path / ".state.json.abc123.tmp").write_bytes(b"half")
    (tmp_path / "keep.txt").write_bytes(b"x")
    StateStore(tmp_path).ensure()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{",
        b"[]",
        b'{"schema": "other", "version": 1}',
        b'{"schema": "edge.agent_state", "version": 2, "highest_sequence": 1, "models": {}}',
        b'{"schema": "edge.agent_state", "version": 1, "models": {}}',
        b'{"schema": "edge.agent_state", "version": 1, "highest_sequence": 1,'
        b' "models": {"m": {"bogus": 1}}}',
        b'{"schema": "edge.agent_state", "version": 1, "highest_sequence": 1,'
        b' "models": {"m": {"active": "3"}}}',
        b'{"schema": "edge.agent_state", "version": 1, "highest_sequence": 1,'
        b' "models": {}, "job": {"phase": "x"}}',
    ],
)
def test_an_invalid_state_file_is_refused_with_its_path(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "state.json").write_bytes(content)
    with pytest.raises(StateError, match=r"state\.json"):
        StateStore(tmp_path).load()


def test_unreadable_state_directory_is_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(StateError):
        StateStore(blocker / "sub").ensure()
    with pytest.raises(StateError):
        StateStore(blocker).save(AgentState())


def test_the_file_is_readable_json_for_operators(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save(sample_state())
    doc = json.loads(store.path.read_text())
    assert doc["schema"] == "edge.agent_state"
    assert doc["models"]["tabular_classifier"]["last_known_good"] == 2


def test_sigkill_during_saves_leaves_an_old_or_a_new_state(tmp_path: Path) -> None:
    # A child process saves in a tight loop; it is killed at random moments. After
    # every kill the file must load, with a sequence the child had already started.
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from pathlib import Path
        from agent.fleet.state_store import AgentState, StateStore, ModelRecord
        store = StateStore(Path({str(tmp_path)!r}))
        n = store.load().highest_sequence
        print("ready", flush=True)
        while True:
            n += 1
            state = AgentState(highest_sequence=n)
            state.models["m"] = ModelRecord(n, n, n - 1)
            store.save(state)
        """
    )
    import random
    import time

    last = 0
    for _ in range(8):
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == b"ready\n"
            time.sleep(random.uniform(0.01, 0.08))
        finally:
            os.kill(child.pid, 9)
            child.wait(10)
        state = StateStore(tmp_path).load()
        assert state.highest_sequence >= last
        assert state.models["m"].active == state.highest_sequence
        last = state.highest_sequence
    assert last > 0


def test_write_atomically_cleans_up_when_the_rename_fails(tmp_path: Path) -> None:
    target = tmp_path / "dir_in_the_way"
    target.mkdir()
    (target / "x").write_bytes(b"")
    with pytest.raises(OSError):
        write_atomically(target, b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir_in_the_way"]
