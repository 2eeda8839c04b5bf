#!/bin/bash
# cbw — client-tests/backup/top-mode.sh: overlays in the orchestrator and
# sync mode `top` (issue #6), through cbwd (orchestrator + NBD exports), the
# `cbw` CLI and real clients (qemu-io, nbdcopy, nbdinfo, qemu-img, libnbd).
#  - a disk added with --overlays: live `cbw disk snapshot`, known writes (data
#    at any alignment, write-zeroes) land in the top overlay; the test keeps
#    the model: every 64 KiB cluster a write touched;
#  - `backup begin --mode top`: `nbdinfo --map=qemu:dirty-bitmap:backup-vda`
#    on cbwd's PIT export reports exactly the model's clusters, although the
#    guest writes other clusters after the point in time; a libnbd reader
#    pulls them onto the image as it was at the snapshot, and the result
#    equals the disk at the point in time (whole-image cmp);
#  - a push job in top mode to a new qcow2 copies only those ranges
#    (bytes-total, and the qcow2's allocated data = the model's data
#    clusters); a second top backup to a new raw file after more writes;
#  - refusals with clear errors and exit 1: top without an overlay, on a raw
#    disk, on an unknown disk; snapshot/commit during a backup (Busy); remove
#    of a disk whose overlays hold data; then `cbw disk commit --wait` merges
#    the top into the image (the image file then equals the disk).
. "$(dirname "$0")/lib.sh"
need_modules
[ "$PLUGIN" = chain ] || skip "the chain plugin is not built (overlays need it)"
requires nbdinfo
requires nbdcopy
requires qemu-io
requires qemu-img
requires jq
CBWD=$CBW_BUILD/server/cbwd
READER=$CBW_BUILD/client-tests/cbwd/incremental_reader
[ -x "$CBWD" ] || skip "cbwd not built"
[ -x "$READER" ] || skip "incremental_reader not built (client-tests/cbwd)"

MiB=$((1 << 20))
C=65536                                   # overlay cluster = bitmap granularity
SIZE=$((16 * MiB))
head -c $SIZE /dev/urandom > "$T/a.img"
head -c $((4 * MiB)) /dev/urandom > "$T/b.img"

# cbwd with the orchestrator: the PIT exports serve qemu:dirty-bitmap:*.
rm -f "$CBW_SOCKET"
start_bg env CBW_NBDKIT="${NBDKIT[*]}" "$CBWD" --listen "unix:$T/cbwd.sock" \
  --state-dir "$STATE" --module-dir "$CBW_MODULES" 2>"$T/cbwd.log"
ORCHD_PID=$BG_PID
wait_socket "$CBW_SOCKET" 30

# ---- model: clusters written since the snapshot ----
: > "$T/writes"
gw() {        # gw write|zero OFF LEN: a guest write through the live disk + model
  local op=$1 off=$2 len=$3
  if [ "$op" = write ]; then
    qemu-io -f raw -c "write -P $(( (off / 4096) % 250 + 1 )) $off $len" "$(disk_uri vda)" >/dev/null
  else
    qemu-io -f raw -c "write -z $off $len" "$(disk_uri vda)" >/dev/null
  fi || fail "guest $op $off $len"
  echo "$off $len $op" >> "$T/writes"
}
# merge "OFF LEN" lines (sorted by OFF) into maximal runs
merge_runs() {
  sort -n | awk '{ if (n && s + l >= $1) { if ($1 + $2 > s + l) l = $1 + $2 - s }
                   else { if (n) print s, l; s = $1; l = $2; n = 1 } } END { if (n) print s, l }'
}
# the clusters every recorded write touched, as merged byte runs
model_runs() {
  awk -v C=$C -v S=$SIZE '{ for (c = int($1 / C); c <= int(($1 + $2 - 1) / C); c++) {
      e = (c + 1) * C; if (e > S) e = S; print c * C, e - c * C } }' "$1" | merge_runs
}
total_of() { awk '{ s += $2 } END { print s + 0 }' "$1"; }

expect_rc 0 "$CBW" disk add vda --file "$T/a.img" --overlays
expect_rc 0 "$CBW" --json disk list
jq -e '.disks[0].chain | endswith("/overlays/vda.chain")' "$T/out" >/dev/null ||
  fail "disk list: chain: $(cat "$T/out")"
expect_rc 0 "$CBW" disk add vdb --file "$T/b.img"

# ---- refusals before any overlay ----
log "section: refusals without an overlay"
expect_rc 1 "$CBW" backup begin --mode top --disk vda
grep -q "no overlay yet" <<<"$ERR" || fail "top without overlay: $ERR"
expect_rc 1 "$CBW" backup begin --mode top --disk vdb
grep -q "InvalidParameter.*no overlay chain" <<<"$ERR" || fail "top on a raw disk: $ERR"
expect_rc 1 "$CBW" backup begin --mode top --disk nosuch
grep -q "NotFound.*nosuch" <<<"$ERR" || fail "top on an unknown disk: $ERR"
expect_rc 1 "$CBW" disk snapshot vdb
grep -q "InvalidParameter.*no overlay chain" <<<"$ERR" || fail "snapshot of a raw disk: $ERR"
expect_rc 1 "$CBW" disk snapshot nosuch
grep -q "NotFound" <<<"$ERR" || fail "snapshot of an unknown disk: $ERR"
expect_rc 1 "$CBW" disk commit vda
grep -q "InvalidParameter.*no overlay" <<<"$ERR" || fail "commit without overlay: $ERR"
expect_rc 0 "$CBW" --json status
jq -e '.backup == null' "$T/out" >/dev/null || fail "a refused begin left a backup"

# ---- snapshot, writes into the top ----
log "section: snapshot and writes into the top overlay"
qemu-io -f raw -c "write -P 9 $((3 * MiB)) 100k" "$(disk_uri vda)" >/dev/null   # before: base
nbdcopy "$(disk_uri vda)" "$T/snap0.img" || fail "copy at snapshot time"
expect_rc 0 "$CBW" --json disk snapshot vda --label before-top
jq -e '.overlays == 1' "$T/out" >/dev/null || fail "snapshot: $(cat "$T/out")"
expect_rc 0 "$CBW" --json disk chain vda
jq -e '.overlays == 1 and .layers[1].label == "before-top" and .layers[1].writable' "$T/out" \
  >/dev/null || fail "disk chain: $(cat "$T/out")"
RANDOM=6
for i in $(seq 12); do
  gw write $(( RANDOM % (SIZE / 4096) * 4096 + RANDOM % 3000 )) $(( RANDOM % 150000 + 1 ))
done
gw write 0 1                               # first byte
gw write $((SIZE - 10)) 10                 # last bytes
gw zero $((8 * MiB)) $((4 * C))            # whole clusters written as zeroes
model_runs "$T/writes" > "$T/want1"
cp "$T/writes" "$T/writes1"
nbdcopy "$(disk_uri vda)" "$T/pit1.img" || fail "copy before begin"
[ "$(total_of "$T/want1")" -lt $((SIZE / 2)) ] || fail "test setup: the top covers too much"

# ---- backup begin --mode top ----
log "section: backup begin --mode top"
expect_rc 0 "$CBW" --json backup begin --mode top --disk vda --id t1
jq -e '.mode == "top" and .disks[0].bitmap == "backup-vda"' "$T/out" >/dev/null ||
  fail "begin: $(cat "$T/out")"
PIT=$(jq -r '.disks[0]."pit-uri"' "$T/out")
# after the point in time: a write outside the set and one inside it
gw write $((12 * MiB + 5)) 70000
gw write 0 4096
nbdinfo --json --map=qemu:dirty-bitmap:backup-vda "$PIT" > "$T/map.json" ||
  fail "nbdinfo --map on $PIT"
jq -r '.[] | select(.type == 1) | "\(.offset) \(.length)"' "$T/map.json" | merge_runs > "$T/got1"
diff -u "$T/want1" "$T/got1" >&2 || fail "qemu:dirty-bitmap:backup-vda differs from the top's clusters"
log "dirty bitmap: $(wc -l < "$T/want1") runs, $(total_of "$T/want1") bytes, as written into the top"

# pull with a libnbd reader (base:allocation + the dirty context) onto the
# image as it was at the snapshot: the result is the point in time
cp "$T/snap0.img" "$T/restore.img"
out=$("$READER" "$PIT" backup-vda "$T/restore.img") || fail "incremental_reader on $PIT"
read -r _ dirty _ nread _ _ <<<"$out"
[ "$dirty" = "$(total_of "$T/want1")" ] || fail "reader saw $dirty dirty bytes, model $(total_of "$T/want1")"
[ "$nread" -le "$dirty" ] || fail "reader read $nread of $dirty"
cmp "$T/restore.img" "$T/pit1.img" || fail "snapshot image + top ranges differ from the point in time"
cmp -s "$T/snap0.img" "$T/pit1.img" && fail "vacuous: the top changed nothing"

# ---- refusals during the backup ----
log "section: refusals during the backup"
expect_rc 1 "$CBW" disk snapshot vda
grep -q "Busy.*running backup" <<<"$ERR" || fail "snapshot during backup: $ERR"
expect_rc 1 "$CBW" disk commit vda
grep -q "Busy.*running backup" <<<"$ERR" || fail "commit during backup: $ERR"
expect_rc 0 "$CBW" --json disk chain vda
jq -e '.overlays == 1' "$T/out" >/dev/null || fail "refused snapshot changed the chain"

# ---- push job, top mode, to a new qcow2 ----
log "section: push job (top) to a new qcow2"
expect_rc 0 "$CBW" --json job start --target "$T/top.qcow2" --id p1
timeout 60 "$CBW" job wait p1 >/dev/null 2>"$T/wait.err" || fail "job p1: $(cat "$T/wait.err")"
expect_rc 0 "$CBW" --json job status p1
jq -e '.mode == "top" and .state == "completed"' "$T/out" >/dev/null || fail "job: $(cat "$T/out")"
[ "$(jq '."bytes-total"' "$T/out")" = "$(total_of "$T/want1")" ] ||
  fail "job copies $(jq '."bytes-total"' "$T/out") bytes, the top holds $(total_of "$T/want1")"
# allocated data of the new qcow2 = the clusters whose last state in the
# model is data: a write touches clusters (data, copy-up for partial ones), a
# write-zeroes turns whole clusters into zero clusters (not copied to a new
# target), in write order
awk -v C=$C -v S=$SIZE '{
    for (c = int($1 / C); c <= int(($1 + $2 - 1) / C); c++) {
      full = $1 <= c * C && $1 + $2 >= ((c + 1) * C < S ? (c + 1) * C : S)
      if ($3 == "write") st[c] = "D"; else if (full) st[c] = "Z"; else if (st[c] != "Z") st[c] = "D"
    } }
  END { for (c in st) if (st[c] == "D") print c * C, C }' "$T/writes1" | merge_runs > "$T/want-data"
grep -q . "$T/want-data" || fail "test setup: no data clusters"
qemu-img map --output=json "$T/top.qcow2" |
  jq -r '.[] | select(.data) | "\(.start) \(.length)"' | merge_runs > "$T/got-data"
diff -u "$T/want-data" "$T/got-data" >&2 || fail "the qcow2 holds other ranges than the top's data clusters"
# its data equals the point in time
qemu-img convert -f qcow2 -O raw "$T/top.qcow2" "$T/top-raw.img"
while read -r off len; do
  cmp -s <(dd if="$T/top-raw.img" bs=64K iflag=skip_bytes,count_bytes skip=$off count=$len status=none) \
         <(dd if="$T/pit1.img" bs=64K iflag=skip_bytes,count_bytes skip=$off count=$len status=none) ||
    fail "qcow2 range $off+$len differs from the point in time"
done < "$T/want1"
expect_rc 0 "$CBW" backup end

# ---- a second top backup after more writes, pushed to a new raw file ----
log "section: second top backup to a new raw file"
model_runs "$T/writes" > "$T/want2"
cmp -s "$T/want1" "$T/want2" && fail "test setup: the writes after begin did not grow the top"
nbdcopy "$(disk_uri vda)" "$T/pit2.img"
expect_rc 0 "$CBW" --json backup begin --mode top --disk vda --id t2
expect_rc 0 "$CBW" --json job start --target "$T/top2.raw" --id p2
timeout 60 "$CBW" job wait p2 >/dev/null 2>"$T/wait.err" || fail "job p2: $(cat "$T/wait.err")"
[ "$("$CBW" --json job status p2 | jq '."bytes-total"')" = "$(total_of "$T/want2")" ] ||
  fail "job p2 bytes-total differs from the model ($(total_of "$T/want2"))"
cp "$T/snap0.img" "$T/restore2.img"
while read -r off len; do
  dd if="$T/top2.raw" of="$T/restore2.img" bs=64K iflag=skip_bytes,count_bytes \
     oflag=seek_bytes seek=$off skip=$off count=$len conv=notrunc status=none
done < "$T/want2"
cmp "$T/restore2.img" "$T/pit2.img" || fail "snapshot image + raw top push differ from the point in time"
expect_rc 0 "$CBW" backup end

# ---- remove refused while overlays hold data; live commit ----
log "section: remove refused, live commit"
expect_rc 1 "$CBW" disk remove vda
grep -q "Busy.*overlay.*commit" <<<"$ERR" || fail "remove with overlays: $ERR"
nbdcopy "$(disk_uri vda)" "$T/before-commit.img"
expect_rc 0 "$CBW" --json disk commit vda --wait
jq -e '.overlays == 0 and .operation.state == "completed"' "$T/out" >/dev/null ||
  fail "commit --wait: $(cat "$T/out")"
nbdcopy "$(disk_uri vda)" "$T/after-commit.img"
cmp "$T/before-commit.img" "$T/after-commit.img" || fail "the commit changed the disk's content"
cmp "$T/a.img" "$T/after-commit.img" || fail "after the commit the image file is not the disk"
"$CBW" --json event list | jq -e '[.events[].event] | index("disk-snapshot") and index("disk-commit-started")' \
  >/dev/null || fail "no disk-snapshot / disk-commit-started events"
if command -v script >/dev/null; then
  # on a terminal, `cbw disk commit --wait` draws a progress bar that ends at 100 %
  expect_rc 0 "$CBW" disk snapshot vda
  script -qec "timeout 60 '$CBW' disk commit vda --wait" /dev/null > "$T/tty.out" ||
    fail "commit --wait on a tty: $(cat "$T/tty.out")"
  grep -q $'\r'"commit vda \[#\{40\}\] 100.0% completed" "$T/tty.out" ||
    fail "no commit progress bar on the tty: $(tr '\r' '\n' < "$T/tty.out" | tail -3)"
fi
expect_rc 1 "$CBW" backup begin --mode top --disk vda
grep -q "no overlay yet" <<<"$ERR" || fail "top after commit: $ERR"
expect_rc 0 "$CBW" disk remove vda
# cbwd stops cleanly (in the sanitizer build: no memory error, no leak)
kill -TERM "$ORCHD_PID"
rc=0; wait "$ORCHD_PID" || rc=$?
ORCHD_PID=
if [ "$rc" != 0 ] || grep -q -E "AddressSanitizer|runtime error|LeakSanitizer" "$T/cbwd.log"; then
  tail -40 "$T/cbwd.log" >&2
  fail "cbwd exited with status $rc"
fi
log "OK"
