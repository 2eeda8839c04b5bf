# cbw — scripts/lib.sh: shared by scripts/test and scripts/demo.
# Installs missing Debian packages (only when missing) and builds with CMake.
set -euo pipefail

CBW_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
JOBS=${JOBS:-$(nproc)}

# What cbw needs to build, test, demo and benchmark (one list: README points here).
CBW_PACKAGES=(
  build-essential cmake pkg-config
  nbdkit nbdkit-plugin-dev libnbd-dev libnbd-bin python3-libnbd
  libuv1-dev libcriterion-dev libjson-c-dev libxxhash-dev libgnutls28-dev gnutls-bin
  qemu-utils qemu-system-common fio hyperfine jq python3 perl
  clang libclang-rt-dev util-linux procps psmisc
  debhelper dpkg-dev lintian systemd man-db
  virtnbdbackup
)

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

install_deps() {
  local missing=() p
  for p in "${CBW_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing missing packages: ${missing[*]}"
  local sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# build DIR [cmake args...]
build() {
  local dir=$1; shift
  say "configuring $dir $*"
  cmake -S "$CBW_SRC" -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" >/dev/null
  say "building $dir"
  cmake --build "$dir" -j "$JOBS"
}
