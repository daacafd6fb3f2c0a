#!/usr/bin/env bash
# The tests where onnxruntime versions differ (signed loading, ONNX external data:
# older versions follow an external data path anywhere), run again on the oldest
# onnxruntime pyproject.toml allows, in a venv of its own (.venv-floor), made once
# and reused while it holds that version. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
floor=$(sed -n 's/^ *"onnxruntime>=\([0-9.]*\)".*/\1/p' pyproject.toml)
if [ -z "$floor" ]; then
  echo "onnxruntime_floor.sh: no onnxruntime>=X in pyproject.toml" >&2
  exit 1
fi
venv=.venv-floor
have=$("$venv/bin/python" -c 'import onnxruntime; print(onnxruntime.__version__)' 2>/dev/null || true)
if [ "$have" != "$floor" ]; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet -e '.[test]' "onnxruntime==$floor"
fi
echo "onnxruntime floor $floor: signed loading and external data"
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_signed_loading.py \
  tests/test_external_data.py "$@"
