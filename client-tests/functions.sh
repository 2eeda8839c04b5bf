# cbw — client-tests/functions.sh: shared helpers for client-level shell tests.
# Source it first thing:  . "$(dirname "$0")/../functions.sh"
#
# ctest passes CBW_BUILD (build tree), CBW_MODULES (built nbdkit modules) and
# CBW_SRC.  Every test gets a private scratch directory $T, removed on exit
# together with every process started through start_bg.  A test exits 0 on
# success, 77 to skip (ctest treats it as skipped via SKIP_RETURN_CODE), and
# anything else on failure, after printing what went wrong.
set -euo pipefail

CBW_SRC=${CBW_SRC:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
CBW_BUILD=${CBW_BUILD:-$CBW_SRC/build}
CBW_MODULES=${CBW_MODULES:-$CBW_BUILD/modules}
CHAIN_PLUGIN=$CBW_MODULES/nbdkit-chain-plugin.so
DIRTYBITMAP_FILTER=$CBW_MODULES/nbdkit-dirtybitmap-filter.so
CBW_FILTER=$CBW_MODULES/nbdkit-cbw-filter.so

# In the sanitizer build our modules are instrumented but nbdkit is not: preload
# the runtimes into nbdkit only (use "${NBDKIT[@]}" / start_nbdkit, never bare
# nbdkit), followed by asan_preload_fix.so, without which glibc's locale lock
# is corrupted at nbdkit's start-up and every control request hangs (see
# client-tests/asan_preload_fix.c).
NBDKIT=(nbdkit)
if [ "${CBW_SANITIZE:-0}" = 1 ] || [ "${CBW_SANITIZE:-}" = ON ]; then
  _fix=$CBW_BUILD/client-tests/libcbw-asan-preload-fix.so
  [ -f "$_fix" ] || { echo "FAIL: $_fix not built (sanitizer build)" >&2; exit 1; }
  NBDKIT=(env "LD_PRELOAD=$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so):$_fix"
          "ASAN_OPTIONS=detect_leaks=0:abort_on_error=1" "UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1"
          nbdkit)
fi

T=$(mktemp -d "${TMPDIR:-/tmp}/cbw-test.XXXXXX")
_CBW_PIDS=()

log() { printf '[%s] %s\n' "$(date +%H:%M:%S.%N | cut -c1-12)" "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }
skip() { log "SKIP: $*"; exit 77; }
requires() { command -v "$1" >/dev/null 2>&1 || skip "$1 not installed"; }

_cbw_cleanup() {
  local p
  for p in "${_CBW_PIDS[@]:-}"; do
    [ -n "$p" ] && kill "$p" 2>/dev/null || true
  done
  for p in "${_CBW_PIDS[@]:-}"; do
    [ -n "$p" ] || continue
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  rm -rf "$T"
}
trap _cbw_cleanup EXIT

# start_bg CMD...: run CMD in the background, remember its pid in $BG_PID.
start_bg() { "$@" & BG_PID=$!; _CBW_PIDS+=("$BG_PID"); }

# wait_socket PATH [secs]: wait until a Unix socket exists.
wait_socket() {
  local i
  for i in $(seq $(( ${2:-20} * 20 ))); do [ -S "$1" ] && return 0; sleep 0.05; done
  fail "socket $1 did not appear"
}

# wait_nbd URI [secs]: wait until an NBD server answers.
wait_nbd() {
  local i
  for i in $(seq $(( ${2:-20} * 10 ))); do
    nbdinfo --size "$1" >/dev/null 2>&1 && return 0; sleep 0.1
  done
  fail "NBD server $1 did not come up"
}

# start_nbdkit SOCK ARGS...: nbdkit in the foreground of a background job,
# on a Unix socket; waits until it answers.  Sets NBDKIT_PID.
start_nbdkit() {
  local sock=$1; shift
  rm -f "$sock"
  start_bg "${NBDKIT[@]}" -f -U "$sock" "$@"
  NBDKIT_PID=$BG_PID
  wait_nbd "nbd+unix:///?socket=$sock"
}

# kill9 PID: kill -9 and reap.
kill9() { kill -9 "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# ctl SOCK JSON: send one control request, print the reply line (greeting skipped).
ctl() {
  python3 - "$1" "$2" <<'PYEOF'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
f = s.makefile("rwb")
f.readline()                                   # greeting
f.write(sys.argv[2].encode() + b"\n"); f.flush()
sys.stdout.write(f.readline().decode())
PYEOF
}

# assert_eq WHAT EXPECTED GOT
assert_eq() { [ "$2" = "$3" ] || fail "$1: expected [$2], got [$3]"; }
