#!/usr/bin/env bash
# Installs everything the test suite needs, then runs all of it: ruff, mypy,
# the stale-protobuf check and pytest. CI runs exactly this (see .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: the broker, and libb64 for perf_analyzer.
missing=()
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  missing+=(mosquitto)
fi
if ! dpkg -s libb64-0d >/dev/null 2>&1; then
  missing+=(libb64-0d)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  apt-get update && apt-get install -y "${missing[@]}"
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'

# perf_analyzer: the binary shipped inside tritonclient 2.49.0's wheel runs on
# Debian 12 given libb64 (above) and libcudart.so.12 (PyPI's CUDA runtime wheel,
# no GPU needed). Unpacked once into .venv/perf-tools for tests/test_perf_analyzer.py.
tools=.venv/perf-tools
if [ ! -x "$tools/bin/perf_analyzer" ]; then
  rm -rf "$tools" && mkdir -p "$tools/wheels"
  .venv/bin/python -m pip download --quiet --no-deps -d "$tools/wheels" \
    tritonclient==2.49.0 nvidia-cuda-runtime-cu12
  .venv/bin/python - "$tools" <<'PY'
import shutil, sys, zipfile
from pathlib import Path
tools = Path(sys.argv[1])
(tools / "bin").mkdir()
(tools / "lib").mkdir()
for wheel in (tools / "wheels").glob("*.whl"):
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.endswith("/bin/perf_analyzer") or "/libcudart.so" in name:
                target = tools / ("bin" if name.endswith("perf_analyzer") else "lib") / Path(name).name
                with zf.open(name) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
(tools / "bin" / "perf_analyzer").chmod(0o755)
PY
fi

.venv/bin/ruff check .
.venv/bin/mypy
tests/onnxruntime_floor.sh  # the oldest onnxruntime allowed: signed loading, external data
.venv/bin/lint-imports  # the import contracts in pyproject.toml
# pytest runs in two processes. tests/unit imports the agent's protobuf modules
# (agent.wire), and tritonclient registers the same Triton .proto files
# ("model_config.proto") in protobuf's one descriptor pool, so the two cannot
# be imported into one process; tests/unit/conftest.py refuses a run that mixes
# them. Arguments are pytest options given to both runs (e.g. -x, -k EXPR);
# arguments naming test paths give a single run of exactly those.
run_pytest() {
  local status=0
  .venv/bin/python -m pytest "$@" || status=$?
  if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests ($*): failing" >&2
    return 1
  fi
  return "$status"
}

names_paths=0
for arg in "$@"; do
  if [ -e "${arg%%::*}" ]; then names_paths=1; fi
done

status=0
if [ "$names_paths" -eq 1 ]; then
  run_pytest "$@" || status=$?
else
  run_pytest tests/unit "$@" || status=$?
  run_pytest tests --ignore=tests/unit "$@" || status=$?
fi
exit "$status"
