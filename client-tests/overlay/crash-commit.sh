#!/bin/bash
# client-tests/overlay/crash-commit.sh: kill -9 nbdkit at a random instant of
# an intermediate commit, an intermediate make-empty commit and an active
# make-empty commit while qemu-io writes, restart: no acknowledged write is
# lost and nothing else changed.
#
# A background writer does one patterned write + flush per qemu-io run; it
# notes the write as pending before it starts and applies it to the raw
# model only after qemu-io returned (acknowledged and flushed).  After the
# restart the disk, read whole by nbdcopy, must equal the model except inside
# the one write that may have been in flight, where every 4 KiB block holds
# either the model's data or the write's.  Then the chain must keep working:
# the commit is run again to completion and the disk still equals the model.
# CBW_CRASH_SEED fixes the random choices (printed at start);
# CBW_CRASH_ROUNDS=N runs each kind N times (default 1).
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/common.sh"
require_chain_support
requires jq

SIZE=$((32 * 1024 * 1024))
head -c $SIZE /dev/urandom > "$T/base.img"
cp "$T/base.img" "$T/model.img"
S=$T/nbd.sock C=$T/ctl.sock U=$(uri "$T/nbd.sock")
SEED=${CBW_CRASH_SEED:-$(( $(date +%s) % 100000 ))}
log "seed $SEED (CBW_CRASH_SEED=$SEED reproduces the choices)"
RANDOM=$SEED
start_chain "$S" "$C" file="$T/base.img" chain="$T/disk.chain" chain-create=true

# wr OFF LEN PAT: one write + flush, acknowledged -> model
wr() {
  echo "$1 $2 $3" > "$T/pending"
  qemu-io -f raw "$U" -c "write -P $3 $1 $2" -c flush >/dev/null 2>&1 || return 1
  qemu-io -f raw "$T/model.img" -c "write -P $3 $1 $2" >/dev/null
  rm -f "$T/pending"
}
# writes N [MAXBLOCKS]: N random 4k-aligned writes of up to MAXBLOCKS (64)
# blocks and a flush in one qemu-io run, in the foreground, then the model
writes() {
  local i off len cmds=() a=() c
  for i in $(seq "$1"); do
    off=$(( (RANDOM % (SIZE / 4096)) * 4096 )) len=$(( (1 + RANDOM % ${2:-64}) * 4096 ))
    [ $((off + len)) -le $SIZE ] || len=$((SIZE - off))
    cmds+=("write -P $((1 + RANDOM % 255)) $off $len")
  done
  for c in "${cmds[@]}" flush; do a+=(-c "$c"); done
  qemu-io -f raw "$U" "${a[@]}" >/dev/null || fail "writes failed with nbdkit up"
  qemu-io -f raw "$T/model.img" "${a[@]}" >/dev/null
}
# writer SEED: writes until nbdkit dies (run in the background)
writer() {
  RANDOM=$1
  local off len
  while :; do
    off=$(( (RANDOM % (SIZE / 4096)) * 4096 )) len=$(( (1 + RANDOM % 64) * 4096 ))
    [ $((off + len)) -le $SIZE ] || len=$((SIZE - off))
    wr $off $len $((1 + RANDOM % 255)) || break
  done
}
# check WHAT: the disk equals the model, but for the pending write's blocks
# which may hold either.
check() {
  nbdcopy "$U" "$T/read.img" || fail "$1: nbdcopy failed"
  python3 - "$T/read.img" "$T/model.img" "$T/pending" "$1" <<'EOF' || exit 1
import os, sys
disk, model, pend, what = sys.argv[1:]
a = open(disk, 'rb').read(); m = open(model, 'rb').read()
lo = hi = 0; pat = None
if os.path.exists(pend):
    off, ln, pat = (int(x) for x in open(pend).read().split())
    lo, hi = off, off + ln
for b in range(0, len(m), 4096):
    x, y = a[b:b + 4096], m[b:b + 4096]
    if x == y:
        continue
    if lo <= b < hi and x == bytes([pat]) * len(x):
        continue
    sys.exit(f"{what}: block at {b} differs from the model (acknowledged write lost "
             f"or stray data; pending write {lo}..{hi})")
EOF
}
overlays() { ctl_ok "$C" '{"execute":"status"}' | jq -r .overlays; }

kinds=("intermediate delete" "intermediate make-empty" "active make-empty")
all=()
for i in $(seq "${CBW_CRASH_ROUNDS:-1}"); do all+=("${kinds[@]}"); done
round=0
for kind in "${all[@]}"; do
  round=$((round + 1))
  while [ "$(overlays)" -lt 3 ]; do
    ctl_ok "$C" '{"execute":"snapshot"}' >/dev/null
    writes 12 512
  done
  n=$(overlays)
  case $kind in
    "intermediate delete")    args="\"base\":0,\"top\":$((n - 1)),\"mode\":\"delete\"" ;;
    "intermediate make-empty") args="\"base\":0,\"top\":$((n - 1)),\"mode\":\"make-empty\"" ;;
    "active make-empty")      args="\"base\":$((n - 1)),\"mode\":\"make-empty\"" ;;
  esac
  # 4 MiB/s: the kill lands at a random instant of the copy, the switch
  # (about the last 10% of the draw) or just after it.
  speed=4194304
  before=$(ctl_ok "$C" '{"execute":"status"}' | jq -c '[.chain.layers[].name]')
  t0=$(date +%s%N)
  ctl_ok "$C" "{\"execute\":\"commit\",\"arguments\":{$args,\"speed\":$speed}}" >/dev/null
  writer $((SEED + round)) &
  WPID=$!
  total=$(ctl_ok "$C" '{"execute":"status"}' | jq -r '.chain.operation.total')
  ms=$(( total * 1000 / speed ))
  delay=$(( (RANDOM * 32768 + RANDOM) % (ms + ms / 10 + 1) ))
  # the instant is counted from the commit's start
  left=$(( delay - ($(date +%s%N) - t0) / 1000000 ))
  [ $left -gt 0 ] && sleep "$((left / 1000)).$(printf '%03d' $((left % 1000)))"
  st=$(octl "$C" '{"execute":"status"}' | jq -r '.return.chain.operation | "\(.state) \(.done)/\(.total)"' 2>/dev/null || true)
  kill9 "$NBDKIT_PID"
  wait "$WPID" 2>/dev/null || true
  log "round $round: $kind of $n overlays, killed after $delay of ~$ms ms ($st)"
  start_chain "$S" "$C" file="$T/base.img" chain="$T/disk.chain"
  check "round $round ($kind) after kill -9"
  after=$(ctl_ok "$C" '{"execute":"status"}' | jq -c '[.chain.layers[].name]')
  # The chain is either as it was (copy undone) or the commit's result.
  if [ "$after" != "$before" ]; then
    log "  the switch had happened: $before -> $after"
  fi
  # The write that was in flight is now decided by what the disk holds
  # (checked above): the model takes it, so later checks are exact.
  cp "$T/read.img" "$T/model.img"
  rm -f "$T/pending"
  writes 3
  check "round $round ($kind): writes after restart"
done

# The chain still works: everything into the base, which equals the model.
ctl_ok "$C" '{"execute":"commit","arguments":{"base":0}}' >/dev/null
assert_eq "final commit" completed "$(wait_commit "$C")"
check "after the final commit"
kill "$NBDKIT_PID"; wait "$NBDKIT_PID" 2>/dev/null || true
cmp -s "$T/base.img" "$T/model.img" || fail "the base after the final commit differs from the model"
log "OK: kill -9 during intermediate and make-empty commits under writes lost no acknowledged write"
