#!/usr/bin/env bash
# Install slime with its test extras and run the test suite (CPU only, a few minutes).
# This is the README's test command and what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first, pinned: a bare `torch` requirement would pull several GB of CUDA wheels.
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[test]"
set +e
python -m pytest tests "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
