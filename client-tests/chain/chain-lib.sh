# cbw — client-tests/chain/chain-lib.sh: helpers for the chain plugin's client
# tests.  Source after ../functions.sh.
#
# nbd_py SCRIPT ARGS...: run a Python script with libnbd's bindings.  Debian's
# python3-libnbd lives in /usr/bin/python3's path; a python3 earlier in PATH
# (pyenv, venv) would not see it.
NBD_PY=${NBD_PY:-/usr/bin/python3}
# ctl (functions.sh) runs "python3": prefer the system one (a pyenv shim in
# front of it costs ~1 s per call on a loaded machine).
[ -x /usr/bin/python3 ] && PATH=/usr/bin:$PATH
"$NBD_PY" -c 'import nbd' 2>/dev/null || skip "python3-libnbd not installed for $NBD_PY"
[ -f "$CHAIN_PLUGIN" ] || fail "$CHAIN_PLUGIN not built"

nbd_py() { "$NBD_PY" - "$@"; }

# start_chain NAME ARGS...: serve with the chain plugin on $T/NAME.sock and
# set URI.
start_chain() {
  local name=$1; shift
  start_nbdkit "$T/$name.sock" "$CHAIN_PLUGIN" "$@"
  URI="nbd+unix:///?socket=$T/$name.sock"
}

# stop_nbdkit PID: SIGTERM and reap (so files can be checked after a clean exit).
stop_nbdkit() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# expect_start_failure REGEX ARGS...: nbdkit with ARGS must refuse to start
# and say something matching REGEX (extended, case-insensitive) on stderr.
expect_start_failure() {
  local re=$1; shift
  local out=$T/startfail.$RANDOM.err rc=0 sock=$T/startfail.$RANDOM.sock
  timeout 30 "${NBDKIT[@]}" -f -U "$sock" "$@" 2>"$out" >/dev/null || rc=$?
  rm -f "$sock"
  [ "$rc" -ne 0 ] || fail "nbdkit started with: $*"
  [ "$rc" -ne 124 ] || fail "nbdkit hung with: $*"
  grep -Eqi -- "$re" "$out" || { cat "$out" >&2; fail "error for [$*] does not match /$re/"; }
  log "refused as expected: $(grep -Ei -- "$re" "$out" | head -1)"
}

# CTL_OK=1: the control socket is tested in every build (it once could not be
# in the sanitizer build; see client-tests/asan_preload_fix.c).
CTL_OK=1
