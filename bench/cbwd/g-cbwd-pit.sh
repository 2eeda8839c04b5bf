#!/bin/bash
# g-cbwd-pit.sh - the cbw pull-backup path, same state as case D-fleece-first:
# nbdkit + cbw filter on disk.img (live), a backup session begun with cbwd's store
# export as the target (nothing copied yet), cbwd's PIT export proxying the filter's
# PIT view.  nbdcopy of the PIT export with 4 and 1 connections; peak RSS is the sum
# of every process of the stack (nbdkit + both cbwd), as QSD does it all in one.
# Without the cbw filter the PIT proxy is measured against a plain nbdkit file upstream.
. "$(dirname "$0")/cases.sh"
CASE=${CASE_NAME:-G-cbwd-pit}
ensure_disk; warm_cache
T_STORE=$SOCKDIR/g-store.sock LIVE=$SOCKDIR/g-live.sock CTL=$SOCKDIR/g.ctl S=$SOCKDIR/g.sock
FLEECE=$WORK/cbwd-fleece.raw
rm -f "$FLEECE"; truncate -s "$(stat -c %s "$DISK")" "$FLEECE"
srv "$CBWD" --listen "unix:$T_STORE" --export "name=store,type=store,path=$FLEECE"; PS=$!; register_pid $PS
wait_nbd "nbd+unix:///store?socket=$T_STORE"
if [ -f "$CBW_FILTER" ]; then
  srv nbdkit -f -U "$LIVE" --filter="$CBW_FILTER" file "$DISK" cbw-control="$CTL" cbw-pit-export=pit; PN=$!; register_pid $PN
  wait_nbd "nbd+unix:///?socket=$LIVE"
  r=$(cbw_ctl "$CTL" "{\"execute\":\"begin\",\"arguments\":{\"target\":\"nbd+unix:///store?socket=$T_STORE\"}}")
  echo "$r" | grep -q '"return"' || { log "begin failed: $r"; exit 1; }
  UP="nbd+unix:///pit?socket=$LIVE"; note="upstream: nbdkit cbw filter PIT export"
else
  srv nbdkit -f -U "$LIVE" -r file "$DISK"; PN=$!; register_pid $PN
  UP="nbd+unix:///?socket=$LIVE"; note="upstream: nbdkit file (cbw filter not built)"
fi
wait_nbd "$UP"
srv "$CBWD" --listen "unix:$S" --export "name=snap,type=pit,upstream=$UP,connections=${PIT_CONNS:-8}"; P=$!; register_pid $P
U="nbd+unix:///snap?socket=$S"; wait_nbd "$U"; record_flags "$CASE" "$U"
log "$note"
bench_read "$CASE" snap_seqread "$U"
bench_read "$CASE" snap_seqread_1conn "$U" --connections=1
orig=$(md5sum < "$DISK" | cut -d' ' -f1); snap=$(nbdcopy "$U" - | md5sum | cut -d' ' -f1)
ok=FAIL; [ "$snap" = "$orig" ] && ok=PASS
record "$CASE" snapshot_consistency "-" "$ok" "$ok" "$ok" 1 "md5 of the PIT export vs disk.img"
h=0; for p in $P $PS $PN; do read -r x _ < <(hwm "$p"); h=$((h + x)); done
record "$CASE" server_peak_rss MiB $((h/1024)) $((h/1024)) $((h/1024)) 1 "sum of VmHWM: cbwd pit + cbwd store + nbdkit; $note"
read -r x _ < <(hwm "$P")
record "$CASE" cbwd_pit_peak_rss MiB $((x/1024)) $((x/1024)) $((x/1024)) 1 "cbwd serving the PIT export alone"
stop_pid $P; stop_pid $PN; stop_pid $PS; rm -f "$FLEECE"
log done
