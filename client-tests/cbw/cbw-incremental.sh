#!/bin/bash
# cbw-incremental: a session limited to a set of blocks copies only those.
#  a. `extents` list: needed/copied block counts (computed here from the
#     list), PIT reads inside the set give the old data, outside fail (EIO).
#  b. `bitmap` of the dirtybitmap filter in the same nbdkit (only if that
#     filter is built): only dirty blocks are copied.
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/cbw-lib.sh"
size=$((16 * 1048576)) g=4096
o2=$((10485760 + 100)) l2=5000
expected=$(( 1048576 / g + (o2 + l2 - 1) / g - o2 / g + 1 ))

log "a. extent list"
random_disk "$T/disk.img" $size; cp "$T/disk.img" "$T/ref.img"
random_disk "$T/new.img" $size
start_target tgt $size
start_live "$T/disk.img" cbw-granularity=$g
r=$(ok_ctl "{\"execute\":\"begin\",\"arguments\":{\"target\":\"$TGT_URI\",\"extents\":[[0,1048576],{\"offset\":$o2,\"length\":$l2}]}}")
assert_eq "needed-blocks" $expected "$(jget "$r" '.return["needed-blocks"]')"
nbdcopy "$T/new.img" "$LIVE"                  # the guest rewrites every block
wait_copies
assert_eq "copied-blocks" $expected "$(status_field copied-blocks)"
assert_eq "copied-bytes" $((expected * g)) "$(status_field copied-bytes)"
cmp -s "$T/new.img" "$T/disk.img" || fail "live disk does not hold the new data"
assert_eq "PIT [0,1M)" ok "$("$CBW_IO" pread "$PIT" 0 1048576 "$T/ref.img")"
assert_eq "PIT second extent" ok "$("$CBW_IO" pread "$PIT" $o2 $l2 "$T/ref.img")"
assert_eq "PIT outside the set" "error errno=5" "$("$CBW_IO" pread "$PIT" $((2 * 1048576)) 4096)"
assert_eq "PIT straddling the set's end" "error errno=5" "$("$CBW_IO" pread "$PIT" $((1048576 - 4096)) 8192)"
ok_ctl '{"execute":"end"}' >/dev/null
kill "$LIVE_PID"; wait "$LIVE_PID" 2>/dev/null || true

log "b. dirty bitmap (dirtybitmap filter below cbw in the same nbdkit)"
if [ ! -f "$DIRTYBITMAP_FILTER" ]; then
  log "SKIP part b: $DIRTYBITMAP_FILTER not built"
  log PASS; exit 0
fi
g=65536
random_disk "$T/disk.img" $size
rm -f "$T/ctl.sock"
start_nbdkit "$T/live.sock" --filter="$CBW_FILTER" --filter="$DIRTYBITMAP_FILTER" \
  file "$T/disk.img" cbw-control="$T/ctl.sock" cbw-pit-export=pit cbw-granularity=$g \
  dirtybitmap="$T/disk.bitmaps" dirtybitmap-image="$T/disk.img" \
  dirtybitmap-control="$T/dbm.sock" dirtybitmap-create=true
LIVE_PID=$NBDKIT_PID; CTL=$T/ctl.sock
LIVE="nbd+unix:///?socket=$T/live.sock"; PIT="nbd+unix:///pit?socket=$T/live.sock"
wait_socket "$CTL"; wait_socket "$T/dbm.sock"
r=$(cctl "$T/dbm.sock" '{"execute":"add","arguments":{"name":"b0","granularity":'$g'}}')
[ "$(jget "$r" 'has("return")')" = true ] || fail "dirtybitmap add: $r"
# guest writes since the checkpoint: these blocks are dirty
writes=("0 4096" "$((5 * 1048576 + 100)) 70000" "$((12 * 1048576)) 65536" "$((size - 512)) 512")
dirty=$(for w in "${writes[@]}"; do set -- $w; seq $(( $1 / g )) $(( ($1 + $2 - 1) / g )); done | sort -un | wc -l)
for w in "${writes[@]}"; do set -- $w; "$CBW_IO" pwrite "$LIVE" $1 $2 7 >/dev/null; done
cp "$T/disk.img" "$T/ref.img"
err_ctl NotFound '{"execute":"begin","arguments":{"target":"'$TGT_URI'","bitmap":"nope","bitmap-control":"'$T'/dbm.sock"}}'
assert_eq "state after unknown bitmap" idle "$(status_field state)"
r=$(ok_ctl '{"execute":"begin","arguments":{"target":"'$TGT_URI'","bitmap":"b0","bitmap-control":"'$T'/dbm.sock"}}')
assert_eq "needed-blocks (bitmap)" "$dirty" "$(jget "$r" '.return["needed-blocks"]')"
nbdcopy "$T/new.img" "$LIVE"
wait_copies
assert_eq "copied-blocks (bitmap)" "$dirty" "$(status_field copied-blocks)"
for w in "${writes[@]}"; do set -- $w
  assert_eq "PIT of dirty range $1+$2" ok "$("$CBW_IO" pread "$PIT" $1 $2 "$T/ref.img")"
done
assert_eq "PIT of a clean block" "error errno=5" "$("$CBW_IO" pread "$PIT" $((8 * 1048576)) 4096)"
ok_ctl '{"execute":"end"}' >/dev/null
log PASS
