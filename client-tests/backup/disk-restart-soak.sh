#!/bin/bash
# cbw — client-tests/backup/disk-restart-soak.sh: a disk always starts.
#  1. Deterministic: cbwd forks nbdkit through an intermediate process
#     that exits at once; nbdkit arms PR_SET_PDEATHSIG(SIGTERM) first thing
#     in main(), so if that intermediate is still alive when nbdkit gets
#     there, its exit kills the new nbdkit (status 0 with an empty log, or
#     killed by SIGTERM before its handler is installed).  The test hook
#     CBW_ORCH_SPAWN_HOLD_MS keeps the intermediate alive 400 ms, the slow
#     exit that a loaded machine produces now and then: `disk add`,
#     `disk start` and the served disk must not notice.
#  2. Soak: CYCLES (default 200) restarts of two disks under CPU load (two
#     busy loops beside it): kill -9 of the disk's nbdkit, wait for "dead",
#     `disk start`; every 10th cycle `disk stop` + `disk start`, every 25th
#     `disk remove` + `disk add`.  Every start must succeed, serve the disk
#     with its data, and leave exactly one nbdkit per disk.
# CBW_SOAK_CYCLES overrides the number of cycles.  About 40 s in the normal
# build, 2 minutes in the ASan build, on 2 CPUs.
. "$(dirname "$0")/lib.sh"
need_modules noprobe            # never calls a module's control socket
requires qemu-io

CYCLES=${CBW_SOAK_CYCLES:-200}
truncate -s 8M "$T/a.img" "$T/b.img" "$T/h.img"
qemu-io -f raw -c "write -P 0xa1 1M 64k" "$T/a.img" >/dev/null
qemu-io -f raw -c "write -P 0xb2 2M 64k" "$T/b.img" >/dev/null
qemu-io -f raw -c "write -P 0xc3 0 64k" "$T/h.img" >/dev/null

# state_pid NAME: "STATE PID" of a disk (the human listing: jq costs
# more than cbw itself, and this runs thousands of times).
state_pid() {
  "$CBW" disk list | awk -v d="$1" '$1 == d { print $2, $3 }'
}
# nbdkits_of NAME: pids of the live nbdkit processes serving NAME's socket.
nbdkits_of() {
  local f p
  for f in $(grep -lF -- "$STATE/disks/$1/nbd.sock" /proc/[0-9]*/cmdline 2>/dev/null); do
    p=${f#/proc/}; p=${p%/cmdline}
    alive_pid "$p" && echo "$p"
  done
  return 0
}
# check_served NAME WHAT [all]: running, its nbdkit alive; with "all" also
# the only nbdkit of NAME (a scan of /proc: every 5th cycle).
check_served() {
  local st pid n
  read -r st pid <<<"$(state_pid "$1")"
  [ "$st" = running ] || fail "$2: $1 is $st, not running"
  alive_pid "$pid" || fail "$2: $1's nbdkit $pid is not alive"
  [ "${3:-}" = all ] || return 0
  n=$(nbdkits_of "$1" | wc -l)
  [ "$n" = 1 ] || fail "$2: $n nbdkit processes serve $1: $(nbdkits_of "$1" | tr '\n' ' ')"
}

# ---- 1. slow intermediate exit (deterministic) ----
start_orchd CBW_ORCH_SPAWN_HOLD_MS=400
expect_rc 0 "$CBW" disk add vdh --file "$T/h.img"
sleep 0.6                       # the intermediate is gone for sure now
check_served vdh "hold: after disk add" all
expect_rc 0 "$CBW" disk stop vdh
expect_rc 0 "$CBW" disk start vdh
sleep 0.6
check_served vdh "hold: after disk start" all
qemu-io -f raw -c "read -P 0xc3 0 64k" "$(disk_uri vdh)" >/dev/null ||
  fail "hold: vdh does not serve its data"
expect_rc 0 "$CBW" disk remove vdh
stop_orchd

# ---- 2. soak under CPU load ----
start_orchd
expect_rc 0 "$CBW" disk add vda --file "$T/a.img"
expect_rc 0 "$CBW" disk add vdb --file "$T/b.img"
busy=()
for _ in 1 2; do
  start_bg bash -c 'while :; do :; done'
  busy+=("$BG_PID")
done
log "soak: $CYCLES cycles under load"
t0=$SECONDS
for i in $(seq "$CYCLES"); do
  d=vda; img=$T/a.img
  [ $((i % 2)) = 0 ] && { d=vdb; img=$T/b.img; }
  read -r st pid <<<"$(state_pid $d)"
  [ "$st" = running ] || fail "cycle $i: $d is $st before the cycle"
  if [ $((i % 25)) = 0 ]; then
    what="disk remove + disk add"
    "$CBW" disk remove $d >/dev/null 2>"$T/err" || fail "cycle $i: disk remove $d: $(cat "$T/err")"
    "$CBW" disk add $d --file "$img" >/dev/null 2>"$T/err" ||
      fail "cycle $i: disk add $d: $(cat "$T/err")"
  else
    if [ $((i % 10)) = 0 ]; then
      what="disk stop + disk start"
      "$CBW" disk stop $d >/dev/null 2>"$T/err" || fail "cycle $i: disk stop $d: $(cat "$T/err")"
      [ "$(state_pid $d | cut -d' ' -f1)" = stopped ] || fail "cycle $i: $d not stopped"
    else
      what="kill -9 + disk start"
      kill -9 "$pid"
      for _ in $(seq 500); do
        [ "$(state_pid $d | cut -d' ' -f1)" = dead ] && break
        sleep 0.01
      done
      [ "$(state_pid $d | cut -d' ' -f1)" = dead ] || fail "cycle $i: killed $d not reported dead"
    fi
    "$CBW" disk start $d >/dev/null 2>"$T/err" ||
      fail "cycle $i ($what): disk start $d: $(cat "$T/err")"
  fi
  check_served $d "cycle $i ($what)" "$([ $((i % 5)) = 0 ] && echo all)"
done
check_served vda "after the soak" all
check_served vdb "after the soak" all
log "soak: $CYCLES cycles in $((SECONDS - t0)) s"
kill "${busy[@]}"
qemu-io -f raw -c "read -P 0xa1 1M 64k" "$(disk_uri vda)" >/dev/null || fail "vda lost its data"
qemu-io -f raw -c "read -P 0xb2 2M 64k" "$(disk_uri vdb)" >/dev/null || fail "vdb lost its data"
log "OK"
