"""Unit tests of agent modules that import the agent's protobuf code (``agent.wire``).

``agent.wire`` and ``tritonclient.grpc`` both register Triton's
``model_config.proto`` (same file name, same message names) in protobuf's one
default descriptor pool, so whichever a process imports second fails. The
integration tests drive a real agent through tritonclient; the tests here
import ``agent.serving.model_config``, ``agent.serving.inference`` and ``agent.serving.repository``
directly. So this directory runs in its own pytest process:

    python -m pytest tests/unit                      # this directory alone
    python -m pytest tests --ignore=tests/unit       # everything else

``tests/run.sh`` runs both. A pytest run that would mix the two is refused
here with a usage error instead of failing later on a confusing import error.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

UNIT_DIR = Path(__file__).resolve().parent

SEPARATE = (
    "tests/unit imports the agent's protobuf modules, which cannot share a process with "
    "tritonclient: run `python -m pytest tests/unit` and `python -m pytest tests "
    "--ignore=tests/unit` separately (tests/run.sh runs both)"
)


def _inside_unit_dir(arg: str, rootdir: Path) -> bool:
    path = Path(arg.split("::", 1)[0])
    if not path.is_absolute():
        path = Path.cwd() / path
        if not path.exists():
            path = rootdir / arg.split("::", 1)[0]
    return path.resolve().is_relative_to(UNIT_DIR)


def pytest_configure(config: pytest.Config) -> None:
    rootdir = Path(str(config.rootpath))
    mixed = [arg for arg in config.args if not _inside_unit_dir(arg, rootdir)]
    if mixed:
        raise pytest.UsageError(f"{SEPARATE} (this run also collects {', '.join(mixed)})")
    if "tritonclient" in sys.modules:
        raise pytest.UsageError(f"{SEPARATE} (tritonclient is already imported)")
