#!/usr/bin/env bash
# Installs everything the test suite needs, then runs all of it: ruff, mypy,
# the stale-protobuf check and pytest. CI runs exactly this (see .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  apt-get update && apt-get install -y mosquitto
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'

.venv/bin/ruff check .
.venv/bin/mypy
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
