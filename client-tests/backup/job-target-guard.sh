#!/bin/bash
# cbw — client-tests/backup/job-target-guard.sh: a push job never writes over
# a live disk, a backup or cbwd's metadata, whatever name the target is given;
# and a completed job's new target file is durable (its directory fsynced).
#
# Disk vda (raw image) and vdb (overlay chain outside the state directory,
# one snapshot taken), the same size, a full backup running.  Each of these
# targets is refused by `cbw job start` with a message naming what it is, and
# the image is unchanged:
#  - a hard link of vda's image, a symlink to it, /proc/PID/fd/N of an open
#    descriptor of it, a second path through a symlinked directory;
#  - vda's own NBD socket (nbd+unix URI), and a symlink to that socket;
#  - the data file of vdb's overlay (a hard link of it: a "copy.raw");
#  - vda's backup store (its path and a hard link), a dirty bitmap data file,
#    cbwd's state file; a new file inside the state directory;
#  - an NBD export on 127.0.0.1 served by a separate nbdkit (nbd plugin)
#    that forwards vda's socket: caught only by the disk identity the live
#    export announces (NBD export description), which `cbw disk list` shows;
#    NBD targets are connected on the job's thread, so this one is a job
#    that fails before its first write, with that message as its error.
# Then a legitimate new raw target completes and equals the image, and under
# strace the job fsyncs the new file's directory after the file itself,
# before `completed` is seen.  Last, under cbwd (the NBD server) with stores
# served over NBD: the store export on cbwd's listener, and a symlink to that
# socket, are refused.
. "$(dirname "$0")/lib.sh"
need_modules
requires jq
requires qemu-img
requires nbdinfo
[ "$PLUGIN" = chain ] || skip "the chain plugin is not built (disk identity and overlays)"

SIZE=$((16 << 20))
for d in a b; do
  truncate -s $SIZE "$T/$d.img"
  head -c $((4 << 20)) /dev/urandom | dd of="$T/$d.img" conv=notrunc status=none
done
mkdir "$T/ch"
start_orchd
expect_rc 0 "$CBW" disk add vda --file "$T/a.img"
expect_rc 0 "$CBW" disk add vdb --file "$T/b.img" --chain "$T/ch/vdb.chain"
expect_rc 0 "$CBW" disk snapshot vdb

# ---- the disk identity: in disk list (text and JSON), announced by the export ----
log "section: disk identity"
expect_rc 0 "$CBW" --json disk list
ID=$(jq -r '.disks[] | select(.name == "vda") | .id' "$T/out")
[[ "$ID" =~ ^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$ ]] ||
  fail "disk list --json: vda has no UUID id: $(cat "$T/out")"
IDB=$(jq -r '.disks[] | select(.name == "vdb") | .id' "$T/out")
[ "$IDB" != "$ID" ] || fail "vda and vdb have the same id $ID"
expect_rc 0 "$CBW" disk list
grep -q "^vda .* $ID  $T/a.img$" "$T/out" || fail "disk list does not show vda's id: $(cat "$T/out")"
nbdinfo --json "$(disk_uri vda)" >"$T/info" || fail "nbdinfo on vda"
assert_eq "export description of vda" "cbw-disk-id:$ID" "$(jq -r '.exports[0].description' "$T/info")"
# kept across a restart of cbwd (the state file holds it)
stop_orchd
start_orchd
expect_rc 0 "$CBW" --json disk list
assert_eq "vda's id after a restart" "$ID" "$(jq -r '.disks[] | select(.name == "vda") | .id' "$T/out")"

expect_rc 0 "$CBW" checkpoint create c0
expect_rc 0 "$CBW" backup begin --checkpoint c1
sum0=$(md5sum <"$T/a.img")
sumb=$(md5sum <"$T/b.img")

# refused TARGET PATTERN: job start with TARGET for vda fails naming PATTERN,
# and no job was created
refused() {
  local target=$1 pattern=$2
  expect_rc 1 "$CBW" job start --disk vda --target "vda=$target"
  grep -qE -- "$pattern" "$T/err" || fail "target $target: expected /$pattern/, got: $ERR"
  log "refused $target: $ERR"
}

log "section: other names of the live image"
ln "$T/a.img" "$T/copy.raw"
refused "$T/copy.raw" "is disk vda's served image \(same device and inode as $T/a.img\); refusing to overwrite a live disk"
ln -s "$T/a.img" "$T/link.raw"
refused "$T/link.raw" "is disk vda's served image \(same device and inode"
exec 7<"$T/a.img"
refused "/proc/$$/fd/7" "is disk vda's served image \(same device and inode"
exec 7<&-
ln -s "$T" "$T/alias"
refused "$T/alias/a.img" "is disk vda's served image \(same device and inode"
refused "raw:$T/copy.raw" "is disk vda's served image"

log "section: the live disk's own socket"
refused "$(disk_uri vda)" "socket $STATE/disks/vda/nbd.sock is disk vda's NBD socket \(same device and inode"
ln -s "$STATE/disks/vda/nbd.sock" "$T/other.sock"
refused "nbd+unix:///?socket=$T/other.sock" "is disk vda's NBD socket \(same device and inode"

log "section: another disk's overlay"
DATA=$(ls "$T"/ch/*.data | head -n 1)
[ -f "$DATA" ] || fail "vdb's chain has no overlay data file: $(ls "$T/ch")"
refused "$DATA" "is the data file of overlay .* of disk vdb's chain"
ln "$DATA" "$T/ovl-copy.raw"
refused "$T/ovl-copy.raw" "is the data file of overlay .* of disk vdb's chain \(same device and inode"

log "section: store, bitmap, state file, state directory"
STORE=$(ls "$STATE"/backups/*/vda.store)
[ -f "$STORE" ] || fail "no backup store of vda"
refused "$STORE" "is the backup store of disk vda"
ln "$STORE" "$T/store-copy.raw"
refused "$T/store-copy.raw" "is the backup store of disk vda \(same device and inode.*refusing to overwrite a backup store"
BMAP=$(ls "$STATE"/disks/vda/*.bmap | head -n 1)
[ -f "$BMAP" ] || fail "no bitmap data file of vda: $(ls "$STATE/disks/vda")"
ln "$BMAP" "$T/bmap-copy.raw"
refused "$T/bmap-copy.raw" "is a dirty bitmap data file of cbwd"
ln "$STATE/cbwd-state.json" "$T/state-copy.raw"
refused "$T/state-copy.raw" "is cbwd's state file \(same device and inode.*refusing to overwrite cbwd's metadata"
refused "$STATE/disks/new.raw" "would be created inside cbwd's state directory"
[ ! -e "$STATE/disks/new.raw" ] || fail "a refused target was created"

log "section: the live disk behind another NBD server (TCP)"
PORT=
for _ in $(seq 20); do
  p=$((20000 + RANDOM % 30000))
  start_bg "${NBDKIT[@]}" -f -i 127.0.0.1 -p "$p" nbd socket="$STATE/disks/vda/nbd.sock"
  PROXY=$BG_PID
  if wait_nbd "nbd://127.0.0.1:$p/" 2>/dev/null; then PORT=$p; break; fi
  kill "$PROXY" 2>/dev/null; wait "$PROXY" 2>/dev/null || true
done
[ -n "$PORT" ] || fail "no free TCP port for the nbdkit proxy"
# NBD targets are connected on the job's thread (job-start never waits for
# a server): the job fails before its first write, naming the disk.
expect_rc 0 "$CBW" job start --disk vda --target "vda=nbd://127.0.0.1:$PORT/" --id viatcp
expect_rc 1 timeout 30 "$CBW" job wait viatcp
"$CBW" --json job status viatcp > "$T/st.json"
jq -e '.state == "failed" and ."bytes-done" == 0' "$T/st.json" >/dev/null ||
  fail "job towards vda's live export: $(cat "$T/st.json")"
jq -r .error "$T/st.json" | grep -qE "is disk vda's live export \(it announces cbw disk id $ID\); refusing to overwrite a live disk" ||
  fail "job towards vda's live export: $(jq -r .error "$T/st.json")"
log "refused nbd://127.0.0.1:$PORT/ in the job: $(jq -r .error "$T/st.json")"
kill "$PROXY"; wait "$PROXY" 2>/dev/null || true

assert_eq "vda's image after the refusals" "$sum0" "$(md5sum <"$T/a.img")"
assert_eq "vdb's image after the refusals" "$sumb" "$(md5sum <"$T/b.img")"
expect_rc 0 "$CBW" --json job list
assert_eq "jobs after the refusals" "viatcp failed" "$(jq -r '.jobs[] | "\(.id) \(.state)"' "$T/out")"

log "section: a new target works, and its directory is fsynced"
requires strace
mkdir "$T/dur"
start_bg strace -f -y -qq -e trace=fsync,fdatasync -o "$T/strace.log" -p "$ORCHD_PID"
STRACE=$BG_PID
# strace -f -p attaches every thread of cbwd before it logs: wait for all
for _ in $(seq 300); do
  all=1
  for s in /proc/"$ORCHD_PID"/task/*/status; do
    grep -q '^TracerPid:[[:space:]]*0$' "$s" && all=0
  done
  [ $all = 1 ] && break
  sleep 0.1
done
[ $all = 1 ] || fail "strace did not attach to cbwd"
expect_rc 0 "$CBW" --json job start --disk vda --target "vda=$T/dur/full.raw"
JOB=$(jq -r .id "$T/out")
timeout 60 "$CBW" job wait "$JOB" >/dev/null 2>"$T/wait.err" || fail "job: $(cat "$T/wait.err")"
expect_rc 0 "$CBW" --json job status "$JOB"
assert_eq "job state" completed "$(jq -r .state "$T/out")"
kill -INT "$STRACE"; wait "$STRACE" 2>/dev/null || true
cmp "$T/a.img" "$T/dur/full.raw" || fail "the pushed copy differs from the image"
# the file's last fsync, then its directory's
flast=$(grep -n "sync([0-9]*<$T/dur/full.raw>)" "$T/strace.log" | tail -n 1 | cut -d: -f1 || true)
dlast=$(grep -n "sync([0-9]*<$T/dur>)" "$T/strace.log" | tail -n 1 | cut -d: -f1 || true)
[ -n "$flast" ] || fail "the target file was never fsynced: $(cat "$T/strace.log")"
[ -n "$dlast" ] || fail "the target's directory was never fsynced: $(cat "$T/strace.log")"
[ "$dlast" -gt "$flast" ] || fail "the directory was fsynced before the file (lines $dlast, $flast)"
log "fsync order: file at line $flast, directory at line $dlast"
expect_rc 0 "$CBW" backup end

log "section: cbwd's own NBD listener (its store exports)"
[ -x "$CBW_BUILD/server/cbwd" ] || skip "cbwd not built"
stop_orchd
rm -f "$CBW_SOCKET"
start_bg env CBW_NBDKIT="${NBDKIT[*]}" CBW_ORCH_STORE_TARGET=nbd "$CBW_BUILD/server/cbwd" \
  --listen "unix:$T/cbwd.sock" --state-dir "$STATE" --module-dir "$CBW_MODULES" 2>"$T/cbwd.log"
ORCHD_PID=$BG_PID
wait_socket "$CBW_SOCKET" 30
expect_rc 0 "$CBW" backup begin
expect_rc 0 "$CBW" --json backup status
SURI=$(jq -r '.disks[] | select(.name == "vda") | .["store-socket"]' "$T/out")
[[ "$SURI" == nbd+unix://*"socket=$T/cbwd.sock"* ]] || fail "vda's store is not on cbwd's listener: $SURI"
refused "$SURI" "socket $T/cbwd.sock is cbwd's NBD listener socket \(same device and inode"
ln -s "$T/cbwd.sock" "$T/cbwd-alias.sock"
refused "nbd+unix:///?socket=$T/cbwd-alias.sock" "socket $T/cbwd-alias.sock is cbwd's NBD listener socket \(same device and inode as $T/cbwd.sock"
expect_rc 0 "$CBW" backup end
log "OK"
