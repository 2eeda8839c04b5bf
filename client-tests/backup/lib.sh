# cbw — client-tests/backup/lib.sh: helpers for the backup tests, on top of
# ../functions.sh.  Source it first thing:  . "$(dirname "$0")/lib.sh"
# shellcheck shell=bash
. "$(dirname "${BASH_SOURCE[0]}")/../functions.sh"

CBW=$CBW_BUILD/server/cli/cbw
ORCHD=$CBW_BUILD/server/orch/cbwd-orch
BK=$CBW_BUILD/client-tests/backup/bk_tool
STATE=$T/state
export CBW_SOCKET=$STATE/control.sock
[ -x "$CBW" ] && [ -x "$ORCHD" ] || skip "cbw / cbwd-orch not built"

# Every nbdkit the orchestrator starts is detached (not our child): on exit,
# kill by pid every process whose command line names this test's scratch
# directory (only ours: $T is unique), then the usual cleanup.
_bk_kill_ours() {
  local p f pids=()
  for f in $(grep -lF -- "$T/" /proc/[0-9]*/cmdline 2>/dev/null); do
    p=${f#/proc/}; p=${p%/cmdline}
    [ "$p" = $$ ] || pids+=("$p")
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  kill "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 50); do
    local alive=0
    for p in "${pids[@]}"; do alive_pid "$p" && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.1
  done
  kill -9 "${pids[@]}" 2>/dev/null || true
}
# alive_pid PID: running and not a zombie (kill -0 succeeds on zombies).
alive_pid() {
  local st
  st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [ -n "$st" ] && [ "$st" != Z ]
}
trap '_bk_exit' EXIT
# A test killed by a timeout (SIGTERM) must still stop its detached nbdkits.
trap 'exit 143' TERM INT HUP

# need_modules [noprobe]: skip unless the cbw and dirtybitmap filters are
# built (and their control sockets answer, unless noprobe); use the chain
# plugin when built, else nbdkit's file plugin (said in the log).
need_modules() {
  [ -f "$CBW_FILTER" ] || skip "nbdkit-cbw-filter.so not built ($CBW_FILTER)"
  [ -f "$DIRTYBITMAP_FILTER" ] || skip "nbdkit-dirtybitmap-filter.so not built"
  if [ -f "$CHAIN_PLUGIN" ]; then PLUGIN=chain
  else PLUGIN=file; log "chain plugin not built: disks use nbdkit's file plugin"
  fi
  [ "${1:-}" = noprobe ] || probe_module_control
}

# probe_module_control: the orchestration tests drive the modules through
# their control sockets; if those do not answer at all in this build (seen
# in the sanitizer build: the control thread of an LD_PRELOADed nbdkit
# deadlocks in json-c's newlocale on __libc_setlocale_lock), skip with that
# diagnosis instead of timing out in every step.
probe_module_control() {
  local sock=$T/probe.sock rc=0
  truncate -s 1M "$T/probe.img"
  start_nbdkit "$sock" --filter="$CBW_FILTER" --filter="$DIRTYBITMAP_FILTER" file "$T/probe.img" \
    cbw-control="$T/probe-cbw.ctl" cbw-pit-export=pit dirtybitmap-control="$T/probe-db.ctl" \
    dirtybitmap-image="$T/probe.img" dirtybitmap-create=true
  timeout 5 "$BK" ctl "$T/probe-cbw.ctl" '{"execute":"status"}' >/dev/null 2>&1 || rc=1
  timeout 5 "$BK" ctl "$T/probe-db.ctl" '{"execute":"list"}' >/dev/null 2>&1 || rc=1
  kill "$NBDKIT_PID" 2>/dev/null || true
  [ $rc = 0 ] || fail "the modules' control sockets do not answer in this build (nbdkit ${NBDKIT[*]}): cannot test orchestration"
}
PLUGIN=file

# start_orchd [VAR=VALUE...]: start cbwd-orch on $STATE; sets ORCHD_PID.
# The array ORCHD_ARGS (if set) adds options (e.g. --freeze-hook NAME=PATH).
start_orchd() {
  rm -f "$CBW_SOCKET"
  start_bg env CBW_NBDKIT="${NBDKIT[*]}" "$@" "$ORCHD" --state-dir "$STATE" \
    --module-dir "$CBW_MODULES" --plugin "$PLUGIN" --start-timeout 60 \
    ${ORCHD_ARGS[@]+"${ORCHD_ARGS[@]}"}
  ORCHD_PID=$BG_PID
  wait_socket "$CBW_SOCKET" 30
}

# stop_orchd: SIGTERM (disks keep running), wait, and fail unless it exited 0:
# a crash or sanitizer report at shutdown (after the state is saved) is a bug
# the test must not hide.  127 means the test already reaped it (kill -9 paths).
orchd_stop_status() {
  local rc=0
  [ -n "${ORCHD_PID:-}" ] || return 0
  kill "$ORCHD_PID" 2>/dev/null || true
  wait "$ORCHD_PID" 2>/dev/null || rc=$?
  ORCHD_PID=
  [ "$rc" = 0 ] || [ "$rc" = 127 ] || { log "cbwd-orch exited $rc when stopped, expected 0"; return 1; }
}
stop_orchd() { orchd_stop_status || fail "cbwd-orch did not stop cleanly"; }
# Reap the daemon first so the generic cleanup does not wait on a zombie.
# On failure, show the tail of every nbdkit log first.
_bk_exit() {
  local rc=$? f
  if [ "$rc" != 0 ] && [ "$rc" != 77 ]; then
    for f in "$STATE"/disks/*/nbdkit.log "$STATE"/backups/*/*.log; do
      [ -f "$f" ] && { echo "--- $f"; tail -n 15 "$f"; } >&2
    done
  fi
  orchd_stop_status || { [ "$rc" = 0 ] && rc=1; }
  _bk_kill_ours
  _cbw_cleanup
  exit "$rc"
}

# expect_rc RC CMD...: run CMD, check its exit status, keep its stderr in $ERR.
expect_rc() {
  local want=$1 rc=0; shift
  "$@" >"$T/out" 2>"$T/err" || rc=$?
  ERR=$(cat "$T/err")
  [ "$rc" = "$want" ] || fail "$* exited $rc, expected $want; stderr: $ERR; stdout: $(cat "$T/out")"
}

# ctl SOCK JSON: one control request (overrides functions.sh's python
# version: python3 takes seconds to start on a loaded CI machine).
ctl() { "$BK" ctl "$1" "$2"; }

disk_uri() { echo "nbd+unix:///?socket=$STATE/disks/$1/nbd.sock"; }
pit_uri() { echo "nbd+unix:///pit?socket=$STATE/disks/$1/nbd.sock"; }
bm_ctl() { echo "$STATE/disks/$1/dirtybitmap.ctl"; }
cbw_ctl() { echo "$STATE/disks/$1/cbw.ctl"; }
