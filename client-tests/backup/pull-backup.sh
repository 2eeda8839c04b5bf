#!/bin/bash
# cbw — client-tests/backup/pull-backup.sh: the nightly story, end to end.
#
# Two disks under a writer that keeps writing a sequence number to both
# (A then B, each acknowledged before the next): full pull backup of both
# with nbdcopy from their point-in-time exports while the guest overwrites
# data, then more writes, an incremental pull of the dirty extents, and a
# restore = full + incremental.  Checks:
#  - each PIT export equals a copy of the image taken just before
#    `backup begin` (bytes 8.. — bytes 0..7 hold the running sequence), and
#    the restore equals the incremental's point-in-time copy (qemu-img
#    compare); with --readable changed, blocks outside the incremental are
#    not served (EIO);
#  - both disks were taken at the same instant: seq(B) <= seq(A) <= seq(B)+1
#    on the PIT exports (a non-atomic point in time breaks it);
#  - the incremental copied far less than the disk;
#  - a reader can disconnect and read again; `backup end` leaves nothing;
#  - guest freeze hook: called around the point in time; a hook that hangs
#    fails the backup (required) or degrades to crash-consistent;
#  - a failure in the middle of begin rolls everything back.
. "$(dirname "$0")/lib.sh"
need_modules
requires qemu-io
requires qemu-img
requires nbdcopy
requires jq

SIZE=$((16 << 20))
for d in a b; do
  head -c $SIZE /dev/urandom > "$T/$d.img"
done
# the guest freeze hook, configured by name (hooks run without a shell)
cat > "$T/hook.sh" <<HOOK
#!/bin/sh
echo "\$1" >> "$T/hook.log"
[ -e "$T/hang" ] && [ "\$1" = freeze ] && sleep 30
exit 0
HOOK
chmod +x "$T/hook.sh"
ORCHD_ARGS=(--freeze-hook "fs=$T/hook.sh")
start_orchd
expect_rc 0 "$CBW" disk add vda --file "$T/a.img"
expect_rc 0 "$CBW" disk add vdb --file "$T/b.img"

start_bg "$BK" seqwrite "$(disk_uri vda)" "$(disk_uri vdb)" "$T/stop-writer"
WRITER=$BG_PID
sleep 0.3

guest_writes() {                  # guest_writes DISK SEED: overwrite 16 ranges
  local cmds=() i
  RANDOM=$2
  for i in $(seq 16); do
    cmds+=(-c "write -P $(( (RANDOM % 250) + 1 )) $(( (RANDOM % 240 + 1) * 65536 - RANDOM % 4096 )) $(( RANDOM % 100000 + 1 ))")
  done
  qemu-io -f raw "${cmds[@]}" "$(disk_uri "$1")" >/dev/null || fail "guest writes on $1"
}
seq_check() {                     # seq_check LABEL: cross-disk consistency on the PITs
  local a b
  a=$("$BK" readseq "$(pit_uri vda)") b=$("$BK" readseq "$(pit_uri vdb)")
  [ "$a" -ge 1 ] || fail "$1: writer had not started (seq $a)"
  [ "$b" -le "$a" ] && [ "$a" -le $((b + 1)) ] ||
    fail "$1: disks not taken at one instant: seq A=$a B=$b"
  log "$1: seq A=$a B=$b"
}

# ---- full backup ----
log "section: full backup"
guest_writes vda 1; guest_writes vdb 2
cp "$T/a.img" "$T/exp-a0"; cp "$T/b.img" "$T/exp-b0"
expect_rc 0 "$CBW" backup begin --checkpoint full
grep -q "pit" "$T/out" || fail "backup begin output: $(cat "$T/out")"
guest_writes vda 3; guest_writes vdb 4          # overwrites after the point in time
nbdcopy "$(pit_uri vda)" "$T/full-a" || fail "nbdcopy vda"
nbdcopy "$(pit_uri vdb)" "$T/full-b" || fail "nbdcopy vdb"
cmp -i 8 "$T/full-a" "$T/exp-a0" || fail "full backup of vda differs from its point in time"
cmp -i 8 "$T/full-b" "$T/exp-b0" || fail "full backup of vdb differs from its point in time"
cmp -s -i 8 "$T/full-a" "$T/a.img" && fail "vacuous: guest writes did not change vda"
seq_check full
# A reader that disconnects can come back and read the same point in time.
guest_writes vdb 5
nbdcopy "$(pit_uri vdb)" "$T/full-b2" || fail "second nbdcopy"
cmp "$T/full-b" "$T/full-b2" || fail "re-read of the PIT export differs"
expect_rc 0 "$CBW" --json backup status
jq -e '.disks[0].session.state == "active"' "$T/out" >/dev/null || fail "status: $(cat "$T/out")"
# the store target kind asked for is the one used (CBW_ORCH_STORE_TARGET;
# this script also runs as backup-pull-backup-nbd-store)
if [ "${CBW_ORCH_STORE_TARGET:-local}" = nbd ]; then
  jq -e '.disks[0]["store-socket"] != null' "$T/out" >/dev/null ||
    fail "store target nbd: no store socket: $(cat "$T/out")"
else
  jq -e '.disks[0]["store-socket"] == null' "$T/out" >/dev/null ||
    fail "store target local: an NBD store was started: $(cat "$T/out")"
fi
expect_rc 0 "$CBW" backup end
[ -z "$(ls -A "$STATE/backups" 2>/dev/null)" ] || fail "backup end left files: $(ls -R "$STATE/backups")"

# ---- incremental backup ----
log "section: incremental backup"
guest_writes vda 6; guest_writes vdb 7
cp "$T/a.img" "$T/exp-a1"; cp "$T/b.img" "$T/exp-b1"
expect_rc 0 "$CBW" backup begin --incremental full --readable changed --checkpoint inc1
guest_writes vda 8; guest_writes vdb 9
for d in a b; do
  cp "$T/full-$d" "$T/restore-$d"
  copied=$("$BK" dirty-copy "$(bm_ctl vd$d)" backup-vd$d "$(pit_uri vd$d)" "$T/restore-$d") ||
    fail "incremental copy of vd$d"
  [ "$copied" -gt 0 ] && [ "$copied" -lt $((SIZE / 2)) ] ||
    fail "incremental of vd$d copied $copied bytes of $SIZE"
  # The point-in-time copy: the image copied before begin, with the writer's
  # sequence number as the PIT export holds it (bytes 0..7 keep changing).
  # With --readable changed only dirty blocks are readable from an
  # incremental PIT export (the session protects just those), so a full
  # nbdcopy would rightly fail.
  "$BK" readseq "$(pit_uri vd$d)" | perl -ne 'print pack("Q<", $_)' |
    dd of="$T/exp-${d}1" conv=notrunc status=none
  qemu-img compare -q -f raw -F raw "$T/restore-$d" "$T/exp-${d}1" ||
    fail "restore (full + incremental) of vd$d differs from its point-in-time copy"
  # (one request: nbdcopy aborting mid-stream on the EIO can crash nbdkit
  # 1.32 — connections.c raw_send_socket assertion — taking the disk down)
  "$BK" readat "$(pit_uri vd$d)" $((SIZE - 65536)) 4096 2>/dev/null &&
    fail "an incremental PIT export served a block it does not protect"
  log "vd$d: incremental copied $copied bytes"
done
seq_check incremental
expect_rc 0 "$CBW" backup end

# ---- guest freeze hook ----
log "section: guest freeze hook"
expect_rc 0 "$CBW" backup begin --freeze-hook fs --checkpoint frozen
[ "$(tr '\n' ' ' < "$T/hook.log")" = "freeze thaw " ] || fail "hook calls: $(cat "$T/hook.log")"
expect_rc 0 "$CBW" backup end
touch "$T/hang"
expect_rc 1 "$CBW" backup begin --freeze-hook fs --freeze-timeout 1 --freeze-required
grep -q "failed at step freeze" <<<"$ERR" || fail "hung hook, required: $ERR"
expect_rc 0 "$CBW" --json status
jq -e '.backup == null' "$T/out" >/dev/null || fail "failed begin left a backup"
expect_rc 0 "$CBW" backup begin --freeze-hook fs --freeze-timeout 1
"$CBW" --json event list | jq -e '.events[] | select(.event == "freeze-failed")' >/dev/null ||
  fail "no freeze-failed event"
expect_rc 0 "$CBW" backup end

# ---- a failure in the middle of begin rolls everything back ----
log "section: a failure in the middle of begin rolls everything back"
touch "$T/stop-writer"
wait "$WRITER" || fail "writer failed"
start_nbdkit "$T/stray.sock" memory $SIZE      # a scratch backup target
ctl "$(cbw_ctl vdb)" "{\"execute\":\"begin\",\"arguments\":{\"target\":\"nbd+unix:///?socket=$T/stray.sock\"}}" |
  grep -q '"return"' || fail "could not start a stray session on vdb"
before=$(ctl "$(bm_ctl vda)" '{"execute":"list"}' | jq -c '[.return.bitmaps[] | {name, enabled}]')
expect_rc 1 "$CBW" backup begin --incremental inc1 --checkpoint broken
grep -q "failed at step begin" <<<"$ERR" || fail "expected a failure at step begin: $ERR"
after=$(ctl "$(bm_ctl vda)" '{"execute":"list"}' | jq -c '[.return.bitmaps[] | {name, enabled}]')
[ "$before" = "$after" ] || fail "rollback left bitmaps changed: $before -> $after"
ctl "$(cbw_ctl vda)" '{"execute":"status"}' | jq -e '.return.state == "idle"' >/dev/null ||
  fail "rollback left a session on vda"
"$CBW" --json checkpoint list | jq -e '[.checkpoints[].name] | index("broken") == null' >/dev/null ||
  fail "rollback left checkpoint 'broken'"
timeout 10 qemu-io -f raw -c "write 0 4k" "$(disk_uri vda)" >/dev/null || fail "guest writes held after rollback"
ctl "$(cbw_ctl vdb)" '{"execute":"status"}' | jq -e '.return.state == "active"' >/dev/null ||
  fail "rollback ended a session it did not begin"
ctl "$(cbw_ctl vdb)" '{"execute":"end"}' >/dev/null
log "OK"
