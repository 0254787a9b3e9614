#!/usr/bin/env bash
# Builds the C++ client (clients/cpp) and runs its CTest tests against the Python server.
# `make test` calls this after pytest, so `.ci/run` (exactly `make test`) covers it too.
#
# The build needs cmake, a C++17 compiler, pkg-config, gRPC/Protobuf headers and the code
# generators. When they are missing and we run as root on a Debian-like system, they are installed
# with apt-get; where they cannot be installed the test is skipped with a message saying why
# (exit 0), because a machine without them cannot say anything about the client either way.
#
# Idempotent: the build directory is kept, so later runs only rebuild what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD_DIR=clients/cpp/build
PYTHON=${SPECDEC_PYTHON:-$PWD/.venv/bin/python}
JOBS=${CPP_TEST_JOBS:-2}
APT_PACKAGES=(cmake g++ make pkg-config libgrpc++-dev libprotobuf-dev protobuf-compiler
  protobuf-compiler-grpc)

log() { echo "cpp_test: $*" >&2; }

# Prints what the build still lacks, one item per line; nothing when all is there.
missing_build_deps() {
  local tool
  for tool in cmake make pkg-config protoc grpc_cpp_plugin; do
    command -v "$tool" >/dev/null 2>&1 || echo "$tool"
  done
  command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || echo "a C++ compiler (g++)"
  if command -v pkg-config >/dev/null 2>&1; then
    pkg-config --exists grpc++ || echo "gRPC C++ headers/libraries (pkg-config grpc++)"
    pkg-config --exists protobuf || echo "Protobuf headers/libraries (pkg-config protobuf)"
  fi
}

install_build_deps() {
  local why
  if [[ $(id -u) -ne 0 ]]; then
    why="not running as root, so they cannot be installed"
  elif ! command -v apt-get >/dev/null 2>&1; then
    why="apt-get is not available to install them"
  else
    log "installing ${APT_PACKAGES[*]} with apt-get (first run only)"
    local apt_log
    apt_log=$(mktemp)
    if { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
      --no-install-recommends "${APT_PACKAGES[@]}"; } >"$apt_log" 2>&1; then
      rm -f "$apt_log"
      return 0
    fi
    tail -n 20 "$apt_log" >&2
    rm -f "$apt_log"
    why="apt-get install failed (output above)"
  fi
  echo "$why"
  return 1
}

missing=$(missing_build_deps)
if [[ -n $missing ]]; then
  if ! why=$(install_build_deps); then
    echo "SKIPPED: C++ client test: missing $(echo "$missing" | paste -sd, - | sed 's/,/, /g'); $why" >&2
    exit 0
  fi
  missing=$(missing_build_deps)
  if [[ -n $missing ]]; then
    echo "SKIPPED: C++ client test: still missing after apt-get install:" \
      "$(echo "$missing" | paste -sd, - | sed 's/,/, /g')" >&2
    exit 0
  fi
fi

# The server side of the test is the installed Python package; `make setup` provides it.
if [[ ! -x $PYTHON ]]; then
  log "no Python environment at $PYTHON; run \`make setup\` first (or set SPECDEC_PYTHON)"
  exit 1
fi

cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSPECDEC_PYTHON="$PYTHON" >/dev/null
cmake --build "$BUILD_DIR" -j "$JOBS"
cd "$BUILD_DIR"
exec ctest --output-on-failure --no-tests=error
