#!/usr/bin/env bash
# A separate environment for the peer tools that cannot share the main venv: mergekit (for bench/mixing.py)
# pulls scipy, datasets, pydantic... that the project does not need. torch is pinned first and the project's
# constraints apply, so nothing here can pull a CUDA build of torch. Idempotent; ~1-2 min the first time.
# The benchmarks find it at bench/.venv-peers (or $BENCH_PEERS_VENV); without it the mergekit row is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${BENCH_PEERS_VENV:-bench/.venv-peers}"
PY="${PYTHON:-python3}"
MERGEKIT_VERSION="0.1.5"
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -c constraints.txt "mergekit==$MERGEKIT_VERSION"
"$VENV/bin/python" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
"$VENV/bin/pip" check
echo "peer environment ready: $VENV (mergekit $MERGEKIT_VERSION, torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
