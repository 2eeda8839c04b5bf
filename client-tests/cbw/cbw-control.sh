#!/bin/bash
# cbw-control: the control socket.  Bad input gets a clear error and changes
# nothing; skip releases ranges (and trims the target); quiesce holds guest
# writes until resume or until its timeout, after which writes resume by
# themselves and resume reports the failure.
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/cbw-lib.sh"
size=$((32 * 1048576)) g=65536 M=1048576
random_disk "$T/disk.img" $size; cp "$T/disk.img" "$T/ref.img"
start_target small $((size - 512)); SMALL=$TGT_URI
start_target tgt $size
start_live "$T/disk.img" cbw-granularity=$g
idle() { assert_eq "state after: $1" idle "$(status_field state)"; }
B='{"execute":"begin","arguments":{"target":"'$TGT_URI'"'

log "bad begins change nothing"
err_ctl InvalidParameter '{"execute":"begin","arguments":{"target":"'$SMALL'"}}'; idle small
err_ctl IOError '{"execute":"begin","arguments":{"target":"nbd+unix:///?socket='$T'/nothing.sock"}}'; idle unreachable
err_ctl IOError '{"execute":"begin","arguments":{"target":"http://example.com/"}}'; idle "not an NBD URI"
err_ctl InvalidParameter "$B"',"extents":[[0,'$((size + 1))']]}}'; idle "extent past the end"
err_ctl InvalidParameter "$B"',"extents":[['$size',1]]}}'; idle "extent at the end"
err_ctl InvalidParameter "$B"',"extents":[[0]]}}'; idle "malformed extent"
err_ctl InvalidParameter "$B"',"extents":[{"offset":-1,"length":5}]}}'; idle "negative extent"
err_ctl InvalidParameter "$B"',"bitmap":"b0"}}'; idle "bitmap without its socket"
err_ctl NotFound "$B"',"bitmap":"b0","bitmap-control":"'$T'/nothing.sock"}}'; idle "bitmap socket missing"
err_ctl InvalidParameter "$B"',"granularity":3000}}'; idle "bad granularity"
err_ctl InvalidParameter "$B"',"target-direct":true}}'; idle "target-direct on an NBD target"
err_ctl InvalidParameter '{"execute":"begin","arguments":{}}'; idle "no target"
err_ctl NotFound '{"execute":"end"}'
err_ctl NotFound '{"execute":"skip","arguments":{"offset":0,"length":1}}'
err_ctl GenericError '{"execute":"resume"}'
nbdinfo "$PIT" >/dev/null 2>&1 && fail "PIT export opened without a session"
assert_eq "live disk untouched" 0 "$(cmp "$T/disk.img" "$T/ref.img" >/dev/null; echo $?)"

log "begin, then a second begin"
ok_ctl "$B}}" >/dev/null
err_ctl Busy "$B}}"
assert_eq state active "$(status_field state)"

log "skip"
err_ctl InvalidParameter '{"execute":"skip","arguments":{"offset":'$((size - g))',"length":'$((g + 1))'}}'
"$CBW_IO" pwrite "$LIVE" $((2 * M)) $M 1 >/dev/null    # copies 1 MiB to the target
wait_copies
a0=$(stat -c %b "$TGT_IMG")
r=$(ok_ctl '{"execute":"skip","arguments":{"offset":'$((2 * M))',"length":'$((M + 100))'}}')
assert_eq released-blocks $((M / g)) "$(jget "$r" '.return["released-blocks"]')"
a1=$(stat -c %b "$TGT_IMG")
[ "$a1" -lt "$a0" ] || fail "target was not trimmed (allocated blocks $a0 -> $a1)"
assert_eq "PIT of a released range" "error errno=5" "$("$CBW_IO" pread "$PIT" $((2 * M)) 4096)"
c0=$(status_field copied-blocks)
"$CBW_IO" pwrite "$LIVE" $((2 * M)) $M 2 >/dev/null
assert_eq "no copy of a released range" "$c0" "$(status_field copied-blocks)"
# a partial block at the edge is kept
r=$(ok_ctl '{"execute":"skip","arguments":{"offset":'$((5 * M + 1))',"length":'$g'}}')
assert_eq "partial block not released" 0 "$(jget "$r" '.return["released-blocks"]')"
assert_eq "PIT next to it" ok "$("$CBW_IO" pread "$PIT" $((5 * M)) $g "$T/ref.img")"

log "quiesce + resume in time: writes are held until resume"
ok_ctl '{"execute":"quiesce","arguments":{"timeout-ms":20000}}' >/dev/null
err_ctl Busy '{"execute":"quiesce","arguments":{"timeout-ms":20000}}'
"$CBW_IO" pwrite "$LIVE" $((8 * M)) 4096 3 > "$T/w1" & wp=$!
sleep 1
kill -0 $wp 2>/dev/null || fail "guest write was not held by quiesce: $(cat "$T/w1")"
ok_ctl '{"execute":"resume"}' >/dev/null
wait $wp
ms=$(sed -n 's/^ok ms=//p' "$T/w1")
[ -n "$ms" ] && [ "$ms" -ge 900 ] || fail "held write: $(cat "$T/w1")"

log "quiesce expires: writes resume by themselves, resume reports it"
ok_ctl '{"execute":"quiesce","arguments":{"timeout-ms":500}}' >/dev/null
"$CBW_IO" pwrite "$LIVE" $((9 * M)) 4096 4 > "$T/w2"
ms=$(sed -n 's/^ok ms=//p' "$T/w2")
[ -n "$ms" ] && [ "$ms" -le 5000 ] || fail "write after an expired quiesce: $(cat "$T/w2")"
err_ctl Timeout '{"execute":"resume"}'
err_ctl GenericError '{"execute":"resume"}'

log "the PIT view is still exactly the disk at begin (outside released ranges)"
assert_eq "PIT [0,2M)" ok "$("$CBW_IO" pread "$PIT" 0 $((2 * M)) "$T/ref.img")"
assert_eq "PIT [4M,32M)" ok "$("$CBW_IO" pread "$PIT" $((4 * M)) $((size - 4 * M)) "$T/ref.img")"
r=$(ok_ctl '{"execute":"end"}')
assert_eq "end state" ended "$(jget "$r" .return.state)"
idle end
nbdinfo "$PIT" >/dev/null 2>&1 && fail "PIT export opened after end"
log PASS
