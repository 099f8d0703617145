# Shared by scripts/test, scripts/demo and friends: install what is missing
# (Debian 12 packages only) and configure + build the one build directory.
# Source it; do not run it.

CUSTOS_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CUSTOS_BUILD=${CUSTOS_BUILD:-$CUSTOS_ROOT/build}
# ccache: paths relative to the checkout and no build directory in the hash,
# so that a fresh clone elsewhere (CI) reuses what an earlier build compiled.
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$CUSTOS_ROOT}
export CCACHE_NOHASHDIR=${CCACHE_NOHASHDIR:-1}

# Every package the build, the tests and the demo use.
CUSTOS_PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config git
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev libssl-dev openssl libp11-kit-dev softhsm2 opensc
  libsqlite3-dev sqlite3 libgtest-dev libgmock-dev libbenchmark-dev
  libspdlog-dev libfmt-dev libcli11-dev libyaml-cpp-dev nlohmann-json3-dev
  libcivetweb-dev
  clang-format libfaketime libpq-dev postgresql
  python3-grpcio python3-protobuf python3-matplotlib nodejs
)

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

custos_install_deps() {
  local missing=()
  local pkg
  local extra=()
  # npm comes with Debian's nodejs as a separate package; a NodeSource
  # nodejs (which bundles npm and conflicts with Debian's) needs nothing.
  command -v npm >/dev/null 2>&1 || extra+=(npm)
  for pkg in "${CUSTOS_PACKAGES[@]}" "${extra[@]}" "$@"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null |
        grep -q "install ok installed"; then
      missing+=("$pkg")
    fi
  done
  if [ ${#missing[@]} -eq 0 ]; then
    return 0
  fi
  say "installing ${missing[*]}"
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
    --no-install-recommends "${missing[@]}" >/dev/null
}

# custos_build [extra cmake args...]: configure once, then build incrementally.
custos_build() {
  local werror=OFF
  if [ "${CI:-}" = "true" ]; then werror=ON; fi
  if [ ! -f "$CUSTOS_BUILD/build.ninja" ]; then
    say "configuring $CUSTOS_BUILD"
    cmake -S "$CUSTOS_ROOT" -B "$CUSTOS_BUILD" -G Ninja \
      -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCUSTOS_WERROR=$werror "$@" >/dev/null
  elif [ "$werror" = ON ]; then
    cmake "$CUSTOS_BUILD" -DCUSTOS_WERROR=ON >/dev/null
  fi
  say "building"
  cmake --build "$CUSTOS_BUILD" -j "$(nproc)"
}
