#!/bin/bash
# g-cbwd-pit.sh - the cbw pull-backup path, same state as case D-fleece-first:
# nbdkit + cbw filter on disk.img (live), a backup session begun with cbwd's store
# export as the target (nothing copied yet), cbwd's PIT export reading disk.img and
# the store file itself, following the session's shared state map (begin
# "state-file"; what cbwd's orchestrator sets up), the filter's PIT view only for
# what the map cannot prove.  PIT_DIRECT=0: the plain two-hop proxy.  nbdcopy of the PIT export with 4 and 1 connections; peak RSS is the sum
# of every process of the stack (nbdkit + both cbwd), as QSD does it all in one.
# STORE_TARGET=local (default, what cbwd's orchestrator does): the filter writes
# the store file itself (begin target file:///...), no store server; =nbd: the
# store is a second cbwd's store export.
# Without the cbw filter the PIT proxy is measured against a plain nbdkit file upstream.
. "$(dirname "$0")/cases.sh"
CASE=${CASE_NAME:-G-cbwd-pit}
ensure_disk; warm_cache
T_STORE=$SOCKDIR/g-store.sock LIVE=$SOCKDIR/g-live.sock CTL=$SOCKDIR/g.ctl S=$SOCKDIR/g.sock
FLEECE=$WORK/cbwd-fleece.raw
rm -f "$FLEECE"; truncate -s "$(stat -c %s "$DISK")" "$FLEECE"
PS=
if [ "${STORE_TARGET:-local}" = nbd ]; then
  srv "$CBWD" --listen "unix:$T_STORE" --export "name=store,type=store,path=$FLEECE"; PS=$!; register_pid $PS
  wait_nbd "nbd+unix:///store?socket=$T_STORE"
  TGT="nbd+unix:///store?socket=$T_STORE"
else
  TGT="file://$FLEECE"
fi
if [ -f "$CBW_FILTER" ]; then
  srv nbdkit -f -U "$LIVE" --filter="$CBW_FILTER" file "$DISK" cbw-control="$CTL" cbw-pit-export=pit; PN=$!; register_pid $PN
  wait_nbd "nbd+unix:///?socket=$LIVE"
  STATES=$SOCKDIR/g.states DIRECT=
  if [ "${PIT_DIRECT:-1}" = 1 ]; then
    rm -f "$STATES"
    r=$(cbw_ctl "$CTL" "{\"execute\":\"begin\",\"arguments\":{\"target\":\"$TGT\",\"state-file\":\"$STATES\"}}")
    DIRECT=",state-file=$STATES,live-file=$DISK,store-file=$FLEECE"
  else
    r=$(cbw_ctl "$CTL" "{\"execute\":\"begin\",\"arguments\":{\"target\":\"$TGT\"}}")
  fi
  echo "$r" | grep -q '"return"' || { log "begin failed: $r"; exit 1; }
  UP="nbd+unix:///pit?socket=$LIVE"
  note="upstream: nbdkit cbw filter PIT export; direct reads: ${PIT_DIRECT:-1}"
else
  srv nbdkit -f -U "$LIVE" -r file "$DISK"; PN=$!; register_pid $PN
  UP="nbd+unix:///?socket=$LIVE"; note="upstream: nbdkit file (cbw filter not built)"
fi
wait_nbd "$UP"
srv "$CBWD" --listen "unix:$S" --export "name=snap,type=pit,upstream=$UP,connections=${PIT_CONNS:-8}${DIRECT:-}" \
  2> "$RES/$CASE.cbwd.log"; P=$!; register_pid $P
U="nbd+unix:///snap?socket=$S"; wait_nbd "$U"; record_flags "$CASE" "$U"
log "$note"
bench_read "$CASE" snap_seqread "$U"
bench_read "$CASE" snap_seqread_1conn "$U" --connections=1
orig=$(md5sum < "$DISK" | cut -d' ' -f1); snap=$(nbdcopy "$U" - | md5sum | cut -d' ' -f1)
ok=FAIL; [ "$snap" = "$orig" ] && ok=PASS
record "$CASE" snapshot_consistency "-" "$ok" "$ok" "$ok" 1 "md5 of the PIT export vs disk.img"
h=0; for p in $P $PS $PN; do read -r x _ < <(hwm "$p"); h=$((h + x)); done
record "$CASE" server_peak_rss MiB $((h/1024)) $((h/1024)) $((h/1024)) 1 "sum of VmHWM: cbwd pit + nbdkit (+ cbwd store if STORE_TARGET=nbd); $note"
read -r x _ < <(hwm "$P")
record "$CASE" cbwd_pit_peak_rss MiB $((x/1024)) $((x/1024)) $((x/1024)) 1 "cbwd serving the PIT export alone"
stop_pid $P
if [ -n "${DIRECT:-}" ]; then     # the direct path must have served the reads
  if grep -q "bytes direct" "$RES/$CASE.cbwd.log"; then log "$(grep "bytes direct" "$RES/$CASE.cbwd.log" | tail -1)"
  else log "WARNING: direct reads configured but not reported by cbwd"; fi
fi
stop_pid $PN; [ -z "$PS" ] || stop_pid $PS; rm -f "$FLEECE"
log done
