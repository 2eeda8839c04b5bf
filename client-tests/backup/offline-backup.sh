#!/bin/bash
# cbw — client-tests/backup/offline-backup.sh: backups of stopped disks
# (VM off) through cbwd (orchestrator + NBD exports), the `cbw` CLI and real
# clients (qemu-io, nbdinfo, nbdcopy, qemu-img).
#  - a full backup begun while vda is stopped and vdb runs (one backup, one
#    checkpoint c0 across both): the export of vda has the same name as an
#    online PIT export, nbdcopy of it equals the image (cmp); `disk start
#    vda` is refused (Busy, naming the backup) and a qemu-io write to the
#    image file is refused (QEMU image lock) until `backup end`;
#  - after a restart, writes, an online incremental since c0 with checkpoint
#    c1; more writes, stop, an OFFLINE incremental since c1 with checkpoint
#    c2: nbdinfo --map=qemu:dirty-bitmap:backup-vda reports exactly the
#    clusters written since c1; full + the dirty extents of each incremental
#    (nbdcopy of the export, only the dirty extents applied) rebuild the disk
#    at each point in time exactly (cmp + qemu-img compare);
#  - the checkpoint c2 rotated in the bitmap store while the disk was
#    stopped records every write after the next start (online incremental
#    since c2 = exactly the clusters written since);
#  - cbwd killed (-9) during an offline backup: after its restart the backup
#    is still recorded, its export is served again with the same data and
#    the locks hold again (disk start and qemu-io refused) until backup end;
#  - cbwd exiting inside the checkpoint rotation of an offline begin (test
#    hook CBW_ORCH_CRASH_AT=rotate:added): the restart rolls the checkpoint
#    back in the bitmap store (bitmaps as before, the disk starts, an
#    incremental since c2 still reports every write);
#  - refusals: a push job on an offline disk (no session to follow; the
#    error names the export to pull); a dead disk whose bitmaps were not saved cleanly (only its
#    dirtybitmap filter can recover them: start + stop, then the offline
#    incremental works and misses nothing); a stopped disk with an overlay
#    chain (clear message).
. "$(dirname "$0")/lib.sh"
need_modules
[ "$PLUGIN" = chain ] || skip "the chain plugin is not built (cbwd serves disks with it)"
requires nbdinfo
requires nbdcopy
requires nbdkit
[ -f "$(nbdkit --dump-config | sed -n 's/^filterdir=//p')/nbdkit-offset-filter.so" ] ||
  skip "nbdkit offset filter not installed"
requires qemu-io
requires qemu-img
requires jq
CBWD=$CBW_BUILD/server/cbwd
[ -x "$CBWD" ] || skip "cbwd not built"

MiB=$((1 << 20))
C=65536                                   # bitmap granularity (default)
SIZE=$((16 * MiB))
head -c $SIZE /dev/urandom > "$T/a.img"
head -c $((4 * MiB)) /dev/urandom > "$T/b.img"
NBD="$T/cbwd.sock"
EXP="nbd+unix:///vda?socket=$NBD"          # the export readers use, online or not

start_cbwd() {        # start_cbwd [VAR=VALUE...]
  rm -f "$CBW_SOCKET"
  start_bg env CBW_NBDKIT="${NBDKIT[*]}" "$@" "$CBWD" --listen "unix:$NBD" \
    --state-dir "$STATE" --module-dir "$CBW_MODULES" 2>>"$T/cbwd.log"
  ORCHD_PID=$BG_PID
  wait_socket "$CBW_SOCKET" 30
}
start_cbwd

: > "$T/writes"
gw() {        # gw OFF LEN: a guest write to the running vda + model
  qemu-io -f raw -c "write -P $(( (RANDOM % 250) + 1 )) $1 $2" "$(disk_uri vda)" >/dev/null ||
    fail "guest write $1 $2"
  echo "$1 $2" >> "$T/writes"
}
merge_runs() {
  sort -n | awk '{ if (n && s + l >= $1) { if ($1 + $2 > s + l) l = $1 + $2 - s }
                   else { if (n) print s, l; s = $1; l = $2; n = 1 } } END { if (n) print s, l }'
}
model_runs() {       # the clusters the recorded writes touched, merged
  awk -v C=$C -v S=$SIZE '{ for (c = int($1 / C); c <= int(($1 + $2 - 1) / C); c++) {
      e = (c + 1) * C; if (e > S) e = S; print c * C, e - c * C } }' "$1" | merge_runs
}
some_writes() {
  : > "$T/writes"
  for _ in $(seq 10); do
    gw $(( RANDOM % (SIZE / 4096) * 4096 + RANDOM % 3000 )) $(( RANDOM % 150000 + 1 ))
  done
}
# dirty_map URI: the dirty runs of qemu:dirty-bitmap:backup-vda, merged
dirty_map() {
  nbdinfo --json --map=qemu:dirty-bitmap:backup-vda "$1" > "$T/map.json" ||
    fail "nbdinfo --map on $1"
  jq -r '.[] | select(.type == 1) | "\(.offset) \(.length)"' "$T/map.json" | merge_runs
}
# apply_incremental URI BASE OUT: OUT = BASE + the dirty extents of URI,
# each copied by nbdcopy (through nbdkit's offset filter: only that range is
# read, as an online incremental serves nothing else) and put in place
apply_incremental() {
  dirty_map "$1" > "$T/runs"
  cp "$2" "$3"
  while read -r off len; do
    rm -f "$T/piece"
    nbdcopy -- [ nbdkit --exit-with-parent -r --filter=offset nbd uri="$1" \
      offset="$off" range="$len" ] "$T/piece" || fail "nbdcopy of dirty run $off+$len"
    dd if="$T/piece" of="$3" bs=65536 oflag=seek_bytes seek="$off" conv=notrunc \
      status=none || fail "dd $off $len"
  done < "$T/runs"
}
same() {             # same A B WHAT: byte-identical, also for qemu-img
  cmp "$1" "$2" || fail "$3: $1 and $2 differ"
  qemu-img compare -q -f raw -F raw "$1" "$2" || fail "$3: qemu-img compare"
}

expect_rc 0 "$CBW" disk add vda --file "$T/a.img"
expect_rc 0 "$CBW" disk add vdb --file "$T/b.img"
RANDOM=11
some_writes

# ---- full offline backup of vda, vdb running, one checkpoint for both ----
log "section: full backup, vda stopped, vdb running"
expect_rc 0 "$CBW" disk stop vda
cp "$T/a.img" "$T/p0.img"
expect_rc 0 "$CBW" --json backup begin --checkpoint c0 --id off0
jq -e '.disks | map(select(.name == "vda"))[0] | .offline == true and .export == "vda"' \
  "$T/out" >/dev/null || fail "begin: vda not offline: $(cat "$T/out")"
jq -e '.disks | map(select(.name == "vdb"))[0] | .offline != true' "$T/out" >/dev/null ||
  fail "begin: vdb offline: $(cat "$T/out")"
URI=$(jq -r '.disks | map(select(.name == "vda"))[0]."pit-uri"' "$T/out")
[ "$URI" = "$EXP" ] || fail "offline export URI $URI, expected $EXP"
nbdinfo --json "$EXP" | jq -e '.exports[0]."is_read_only" == true' >/dev/null ||
  fail "the offline export is not read-only"
nbdcopy "$EXP" "$T/full.img" || fail "nbdcopy of the offline export"
same "$T/full.img" "$T/p0.img" "full offline backup"
nbdcopy "nbd+unix:///vdb?socket=$NBD" "$T/fullb.img" || fail "nbdcopy of vdb's PIT"
same "$T/fullb.img" "$T/b.img" "vdb's online PIT in the mixed backup"
# the stopped disk must stay as it is while the backup runs
expect_rc 1 "$CBW" disk start vda
grep -q "Busy.*vda is being backed up offline by backup off0.*cbw backup end off0" <<<"$ERR" ||
  fail "disk start during the offline backup: $ERR"
if qemu-io -f raw -c "write -P 7 0 4096" "$T/a.img" >"$T/qio" 2>&1; then
  fail "qemu-io wrote the image of an offline backup"
fi
grep -q 'Failed to get "write" lock' "$T/qio" || fail "qemu-io: $(cat "$T/qio")"
cmp "$T/a.img" "$T/p0.img" || fail "the image changed during the offline backup"
expect_rc 0 "$CBW" backup end
qemu-io -f raw -c "read 0 4096" "$T/a.img" >/dev/null || fail "the image stayed locked after end"
expect_rc 0 "$CBW" disk start vda

# ---- online incremental since c0, checkpoint c1 ----
log "section: online incremental since c0"
some_writes
model_runs "$T/writes" > "$T/want1"
cp "$T/a.img" "$T/p1.img"                 # nothing writes: the disk at c1
expect_rc 0 "$CBW" backup begin --incremental c0 --checkpoint c1 --disk vda --id on1
dirty_map "$EXP" > "$T/got1"
diff -u "$T/want1" "$T/got1" >&2 || fail "online incremental since c0: wrong dirty map"
apply_incremental "$EXP" "$T/full.img" "$T/r1.img"
same "$T/r1.img" "$T/p1.img" "full + incremental c0..c1"
expect_rc 0 "$CBW" backup end

# ---- offline incremental since c1, checkpoint c2 ----
log "section: offline incremental since c1"
some_writes
model_runs "$T/writes" > "$T/want2"
expect_rc 0 "$CBW" disk stop vda
cp "$T/a.img" "$T/p2.img"
expect_rc 0 "$CBW" --json backup begin --incremental c1 --checkpoint c2 --disk vda --id off2
jq -e '.disks[0].offline == true and .disks[0].bitmap == "backup-vda"' "$T/out" >/dev/null ||
  fail "offline incremental begin: $(cat "$T/out")"
dirty_map "$EXP" > "$T/got2"
diff -u "$T/want2" "$T/got2" >&2 || fail "offline incremental since c1: wrong dirty map"
apply_incremental "$EXP" "$T/r1.img" "$T/r2.img"
same "$T/r2.img" "$T/p2.img" "full + incremental c0..c1 + offline incremental c1..c2"
expect_rc 1 "$CBW" disk start vda
grep -q "Busy.*backed up offline by backup off2" <<<"$ERR" || fail "disk start: $ERR"
expect_rc 1 "$CBW" job start --target vda="$T/push.img"
grep -q "InvalidParameter: disk vda is backed up offline.*pull its export $EXP" <<<"$ERR" ||
  fail "push job on an offline disk: $ERR"
expect_rc 0 "$CBW" backup end
expect_rc 0 "$CBW" --json checkpoint list
jq -e '[.checkpoints[].name] == ["c0", "c1", "c2"]' "$T/out" >/dev/null ||
  fail "checkpoints: $(cat "$T/out")"

# ---- the checkpoint made offline records the writes of the next start ----
log "section: checkpoint c2 (made while stopped) tracks later writes"
expect_rc 0 "$CBW" disk start vda
some_writes
model_runs "$T/writes" > "$T/want3"
cp "$T/a.img" "$T/p3.img"
expect_rc 0 "$CBW" backup begin --incremental c2 --disk vda --id on3
dirty_map "$EXP" > "$T/got3"
diff -u "$T/want3" "$T/got3" >&2 || fail "incremental since the offline checkpoint c2"
apply_incremental "$EXP" "$T/r2.img" "$T/r3.img"
same "$T/r3.img" "$T/p3.img" "chain of full + 3 incrementals"
expect_rc 0 "$CBW" backup end

# ---- cbwd killed during an offline backup ----
log "section: kill -9 of cbwd during an offline backup"
some_writes
model_runs "$T/writes" > "$T/want4"
expect_rc 0 "$CBW" disk stop vda
expect_rc 0 "$CBW" backup begin --incremental c2 --disk vda --id crash
kill -9 "$ORCHD_PID"
wait "$ORCHD_PID" 2>/dev/null || true
start_cbwd
# the watch publishes the recorded offline backup again (event, then served)
for _ in $(seq 100); do
  "$CBW" --json event list > "$T/ev" 2>/dev/null &&
    jq -e '.events[] | select(.event == "backup-offline-served" and .data.disk == "vda")' \
      "$T/ev" >/dev/null && break
  sleep 0.1
done
jq -e '.events[] | select(.event == "backup-offline-served")' "$T/ev" >/dev/null ||
  fail "the offline export was not served again after the restart: $(cat "$T/ev")"
expect_rc 0 "$CBW" --json backup status
jq -e '.id == "crash" and .disks[0].offline == true and .disks[0]."session-error" == null
       and .broken == false' "$T/out" >/dev/null ||
  fail "backup status after restart: $(cat "$T/out")"
expect_rc 0 "$CBW" backup status
grep -q "offline: yes" "$T/out" || fail "backup status: $(cat "$T/out")"
cat "$T/want3" "$T/want4" | merge_runs > "$T/want34"
dirty_map "$EXP" > "$T/got4"
diff -u "$T/want34" "$T/got4" >&2 || fail "dirty map after the restart"
nbdcopy "$EXP" "$T/whole4.img" || fail "nbdcopy after the restart"
same "$T/whole4.img" "$T/a.img" "offline export after the restart"
expect_rc 1 "$CBW" disk start vda
grep -q "backed up offline by backup crash" <<<"$ERR" || fail "disk start after restart: $ERR"
if qemu-io -f raw -c "write -P 7 0 4096" "$T/a.img" >"$T/qio" 2>&1; then
  fail "qemu-io wrote the image after the restart"
fi
grep -q 'Failed to get "write" lock' "$T/qio" || fail "qemu-io after restart: $(cat "$T/qio")"
expect_rc 0 "$CBW" backup end
expect_rc 0 "$CBW" disk start vda

# ---- cbwd dies inside the checkpoint rotation of an offline begin ----
log "section: crash at rotate:added during an offline begin, recovery"
bitmaps() { ctl "$(bm_ctl vda)" '{"execute":"list"}' | jq -c '[.return.bitmaps[] | {name, enabled}]'; }
bm_before=$(bitmaps)
[ "$bm_before" = '[{"name":"cp-c0","enabled":false},{"name":"cp-c1","enabled":false},{"name":"cp-c2","enabled":true}]' ] ||
  fail "bitmaps before: $bm_before"
expect_rc 0 "$CBW" disk stop vda
stop_orchd
start_cbwd CBW_ORCH_CRASH_AT=rotate:added
"$CBW" backup begin --checkpoint cx --disk vda >/dev/null 2>&1 || true
rc=0; wait "$ORCHD_PID" || rc=$?
[ "$rc" = 99 ] || fail "cbwd did not stop at rotate:added (exit $rc)"
grep -q '"name": *"cp-cx"' "$STATE/disks/vda/bitmaps.json" ||
  fail "test setup: the crash came before cp-cx was added to the store"
start_cbwd
expect_rc 0 "$CBW" --json checkpoint list
jq -e '[.checkpoints[].name] == ["c0", "c1", "c2"]' "$T/out" >/dev/null ||
  fail "checkpoints after the recovery: $(cat "$T/out")"
expect_rc 1 "$CBW" backup status
expect_rc 0 "$CBW" disk start vda
[ "$(bitmaps)" = "$bm_before" ] || fail "bitmaps after the recovery: $(bitmaps)"
expect_rc 0 "$CBW" backup begin --incremental c2 --disk vda --id after
dirty_map "$EXP" > "$T/got5"
diff -u "$T/want34" "$T/got5" >&2 || fail "incremental since c2 after the recovery"
expect_rc 0 "$CBW" backup end

# ---- cbwd dies inside backup-end of an offline backup ----
log "section: crash at backup-end:recorded of an offline backup, recovery"
expect_rc 0 "$CBW" disk stop vda
stop_orchd
start_cbwd CBW_ORCH_CRASH_AT=backup-end:recorded
expect_rc 0 "$CBW" backup begin --disk vda --id endcrash
"$CBW" backup end >/dev/null 2>&1 || true
rc=0; wait "$ORCHD_PID" || rc=$?
[ "$rc" = 99 ] || fail "cbwd did not stop at backup-end:recorded (exit $rc)"
start_cbwd                                 # finishes the end at start-up
expect_rc 1 "$CBW" backup status
grep -q "no backup is running" <<<"$ERR" || fail "backup status after the recovery: $ERR"
qemu-io -f raw -c "read 0 4096" "$T/a.img" >/dev/null || fail "image still locked"
expect_rc 0 "$CBW" disk start vda

# ---- refusals ----
log "section: a dead disk's unclean bitmaps are refused, recovered by a start"
disk_field() { "$CBW" --json disk list | jq -r ".disks[] | select(.name==\"$1\") | .$2"; }
gw $((3 * MiB)) 4096                      # a write the store's data files do not have yet
kill -9 "$(disk_field vda pid)"
for _ in $(seq 50); do [ "$(disk_field vda state)" = dead ] && break; sleep 0.1; done
[ "$(disk_field vda state)" = dead ] || fail "killed nbdkit not reported dead"
expect_rc 1 "$CBW" backup begin --incremental c2 --disk vda
grep -q "IOError: disk vda (not running): bitmap cp-c[0-9] .* was not saved cleanly.*cbw disk start vda && cbw disk stop vda" \
  <<<"$ERR" || fail "offline incremental of a dead disk: $ERR"
expect_rc 1 "$CBW" backup begin --checkpoint cy --disk vda
grep -q "was not saved cleanly" <<<"$ERR" || fail "offline checkpoint of a dead disk: $ERR"
expect_rc 0 "$CBW" disk start vda           # the filter recovers its bitmaps
expect_rc 0 "$CBW" disk stop vda
expect_rc 0 "$CBW" backup begin --incremental c2 --disk vda --id recovered
dirty_map "$EXP" > "$T/got6"
# c2's bitmap after recovery: every write since c2, the one before the kill
# included (never less; more only where the filter's recovery over-reports)
echo "$((3 * MiB)) 4096" | model_runs /dev/stdin | cat - "$T/want34" | merge_runs > "$T/want6"
comm -23 <(awk '{ for (o = $1; o < $1 + $2; o += 65536) print o }' "$T/want6" | sort) \
         <(awk '{ for (o = $1; o < $1 + $2; o += 65536) print o }' "$T/got6" | sort) > "$T/missing"
[ ! -s "$T/missing" ] || fail "offline incremental after recovery misses clusters: $(head "$T/missing")"
expect_rc 0 "$CBW" backup end
expect_rc 0 "$CBW" disk start vda
log "section: a stopped disk with an overlay chain is refused"
  truncate -s 4M "$T/c.img"
  expect_rc 0 "$CBW" disk add vdc --file "$T/c.img" --overlays
  expect_rc 0 "$CBW" disk stop vdc
  expect_rc 1 "$CBW" backup begin --disk vdc
  grep -q "InvalidParameter.*vdc is stopped and has an overlay chain" <<<"$ERR" ||
    fail "offline backup of a chain: $ERR"
log "PASS"
