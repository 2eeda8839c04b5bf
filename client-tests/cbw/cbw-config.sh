#!/bin/bash
# cbw-config: the filter's command-line parameters.  A bad value stops nbdkit
# at start-up with an error naming the parameter (nothing is served); the
# write-back worker count (cbw-workers, at most cbw-connections; none for
# break-guest-write or a local-file target) is what status reports, and a
# session with one worker still produces an exact point-in-time copy.
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/cbw-lib.sh"
size=$((8 * 1048576)) M=1048576
random_disk "$T/disk.img" $size; cp "$T/disk.img" "$T/ref.img"

# must_refuse PARAM...: nbdkit must exit non-zero, naming the first PARAM's key.
must_refuse() {
  local key=${1%%=*} rc=0
  rm -f "$T/bad.sock" "$T/bad-ctl.sock"
  timeout 30 "${NBDKIT[@]}" -f -U "$T/bad.sock" --filter="$CBW_FILTER" \
    file "$T/disk.img" cbw-control="$T/bad-ctl.sock" "$@" 2> "$T/bad.err" || rc=$?
  [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] ||
    fail "nbdkit accepted $* (exit $rc)"
  grep -q -- "$key" "$T/bad.err" || fail "error for $* does not name $key: $(cat "$T/bad.err")"
  log "  refused $*: $(grep -- "$key" "$T/bad.err" | head -1)"
}
log "bad parameters stop nbdkit with an error naming them"
for p in cbw-workers=0 cbw-workers=65 cbw-workers=two cbw-connections=0 \
         cbw-connections=65 cbw-buffer=2T cbw-buffer=lots on-cbw-error=ignore \
         cbw-granularity=3000 cbw-granularity=256 cbw-granularity=big cbw-timeout=0 cbw-timeout=-1; do
  must_refuse "$p"
done
rm -f "$T/bad-ctl.sock"
rc=0; timeout 30 "${NBDKIT[@]}" -f -U "$T/bad.sock" --filter="$CBW_FILTER" \
  file "$T/disk.img" 2> "$T/bad.err" || rc=$?
[ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && grep -q "cbw-control" "$T/bad.err" ||
  fail "no cbw-control: exit $rc, $(cat "$T/bad.err")"

# session_workers EXPECTED WHAT BEGIN-EXTRA [filter args...]: start, begin,
# write, check status copy-workers and the PIT copy, stop.
session_workers() {
  local want=$1 what=$2 extra=$3; shift 3
  cp "$T/ref.img" "$T/disk.img"
  start_live "$T/disk.img" cbw-granularity=65536 "$@"
  begin_full "$extra"
  assert_eq "$what: copy-workers" "$want" "$(status_field copy-workers)"
  "$CBW_IO" stress "$LIVE" "$PIT" "$T/ref.img" 7 1 4 2 > "$T/stress.out" ||
    fail "$what: stress: $(cat "$T/stress.out")"
  wait_copies
  nbdcopy "$PIT" "$T/pit.img" || fail "$what: PIT read failed"
  cmp "$T/ref.img" "$T/pit.img" || fail "$what: PIT view differs from begin"
  local st blocks batches copies
  st=$(ok_ctl '{"execute":"status"}'); blocks=$(jget "$st" '.return["copied-blocks"]')
  batches=$(jget "$st" '.return["write-back-batches"]')
  copies=$(jget "$st" '.return["write-back-copies"]')
  [ "$blocks" -gt 0 ] || fail "$what: nothing was copied"
  # Write-back counters: none without workers; else every batch holds at
  # least one copy and every copy at least one block.
  if [ "$want" = 0 ]; then
    assert_eq "$what: write-back batches/copies" "0/0" "$batches/$copies"
  elif ! [ "$copies" -gt 0 ] || ! [ "$batches" -ge 1 ] ||
       ! [ "$batches" -le "$copies" ] || ! [ "$copies" -le "$blocks" ]; then
    fail "$what: write-back batches $batches, copies $copies, blocks $blocks"
  fi
  ok_ctl '{"execute":"end"}' > /dev/null
  kill "$LIVE_PID"; wait "$LIVE_PID" 2>/dev/null || true
  log "  $what: copy-workers $want, PIT view exact, write-back $copies copies in $batches batches"
}
log "write-back workers"
start_target tgt $size
session_workers 1 "default" ""
session_workers 3 "cbw-workers=3" "" cbw-workers=3
session_workers 2 "cbw-workers=3, 2 connections" "" cbw-workers=3 cbw-connections=2
session_workers 1 "cbw-workers=3, begin connections 1" ',"connections":1' cbw-workers=3
session_workers 0 "break-guest-write" "" on-cbw-error=break-guest-write cbw-workers=3
session_workers 0 "no buffer" "" cbw-buffer=0 cbw-workers=3
kill "$TGT_PID"; wait "$TGT_PID" 2>/dev/null || true
start_file_target ftgt $size
session_workers 0 "local file target" "" cbw-workers=3

# target-direct: copies of whole 64 KiB granules are written with O_DIRECT
# (status direct-bytes), the PIT view is still exact; where the filesystem
# has no direct I/O (tmpfs), begin fails naming target-direct.
log "target-direct"
cp "$T/ref.img" "$T/disk.img"
start_live "$T/disk.img" cbw-granularity=65536
r=$(cctl "$CTL" '{"execute":"begin","arguments":{"target":"'"$TGT_URI"'","target-direct":true}}')
if [ "$(jget "$r" 'has("return")')" = true ]; then
  "$CBW_IO" stress "$LIVE" "$PIT" "$T/ref.img" 7 1 4 2 > "$T/stress.out" ||
    fail "target-direct: stress: $(cat "$T/stress.out")"
  nbdcopy "$PIT" "$T/pit.img" || fail "target-direct: PIT read failed"
  cmp "$T/ref.img" "$T/pit.img" || fail "target-direct: PIT view differs from begin"
  copied=$(status_field copied-bytes) direct=$(status_field direct-bytes)
  [ "$copied" -gt 0 ] && [ "$direct" -gt 0 ] && [ "$direct" -le "$copied" ] ||
    fail "target-direct: copied $copied bytes, $direct of them direct"
  log "  $direct of $copied copied bytes written with O_DIRECT, PIT view exact"
  ok_ctl '{"execute":"end"}' > /dev/null
else
  case $(jget "$r" .error.desc) in
    *target-direct*"no direct I/O"*) log "  no direct I/O here: $(jget "$r" .error.desc)" ;;
    *) fail "target-direct: begin failed: $r" ;;
  esac
fi
kill "$LIVE_PID"; wait "$LIVE_PID" 2>/dev/null || true
log PASS
