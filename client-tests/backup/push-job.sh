#!/bin/bash
# cbw — client-tests/backup/push-job.sh: push backup jobs, full then
# incremental, under concurrent guest writes, checked with qemu-img compare.
#
# Two disks with data, holes and written zeroes; a writer keeps overwriting
# random ranges of both through their live NBD sockets.
#  - full backup, `cbw job start` vda -> a new qcow2 file, vdb -> a new raw
#    file; both equal the images copied while the writer was stopped just
#    before `backup begin` (qemu-img compare); holes and zeroes were not read
#    (zero-bytes >= the holes we made); job-started/-completed events;
#  - skip works: guest writes before the job grow the store; once the job has
#    pushed the disk, the store is trimmed and further writes do not grow it;
#  - more writes, incremental backup since the checkpoint pushed onto the
#    same qcow2 and raw files (opened, not recreated): equal to their new
#    point-in-time copies, and only the dirty extents were copied.
. "$(dirname "$0")/lib.sh"
need_modules
requires qemu-img
requires qemu-io
requires qemu-nbd
requires jq

SIZE=$((64 << 20))
MiB=$((1 << 20))
# Data at 0..24M and 40..48M, written zeroes at 24..32M, holes elsewhere.
for d in a b; do
  truncate -s $SIZE "$T/$d.img"
  head -c $((24 * MiB)) /dev/urandom | dd of="$T/$d.img" conv=notrunc status=none
  head -c $((8 * MiB)) /dev/zero | dd of="$T/$d.img" bs=1M seek=24 conv=notrunc status=none
  head -c $((8 * MiB)) /dev/urandom | dd of="$T/$d.img" bs=1M seek=40 conv=notrunc status=none
done
HOLES=$((24 * MiB))              # 32..40M and 48..64M: never written before the backup

start_orchd
expect_rc 0 "$CBW" disk add vda --file "$T/a.img"
expect_rc 0 "$CBW" disk add vdb --file "$T/b.img"

# writer: random overwrites of both disks (data area and holes) until stopped
start_writer() {
  rm -f "$T/stop-writer"
  (
    RANDOM=$1
    while [ ! -e "$T/stop-writer" ]; do
      for d in vda vdb; do
        qemu-io -f raw -c "write -P $((RANDOM % 250 + 1)) $(( (RANDOM % (SIZE / 65536)) * 65536 + RANDOM % 4096 )) $((RANDOM % 200000 + 1))" \
          "$(disk_uri $d)" >/dev/null 2>&1 || exit 1
      done
    done
  ) &
  WRITER=$!
  _CBW_PIDS+=("$WRITER")
}
stop_writer() { touch "$T/stop-writer"; wait "$WRITER" || fail "writer failed"; }
store_alloc() { echo $(( $(stat -c %b "$STATE/backups/backup/$1.store") * 512 )); }
job_json() { "$CBW" --json job status "$1"; }
# wait_job ID: cbw job wait (no TTY: no bar) must say completed
wait_job() {
  timeout 60 "$CBW" job wait "$1" >"$T/wait.out" 2>"$T/wait.err" ||
    fail "job $1 did not complete: $(cat "$T/wait.err") $(job_json "$1")"
}

# ---- full push under writes ----
log "section: full push to qcow2 + raw under writes"
start_writer 1
sleep 1
stop_writer
cp "$T/a.img" "$T/exp-a0"; cp "$T/b.img" "$T/exp-b0"
expect_rc 0 "$CBW" backup begin --checkpoint c0
# guest writes before the job: the store grows by what they overwrote
qemu-io -f raw -c "write -P 7 $((8 * MiB)) $((8 * MiB))" "$(disk_uri vda)" >/dev/null
before_job=$(store_alloc vda)
[ "$before_job" -ge $((8 * MiB)) ] || fail "store of vda holds $before_job bytes after 8 MiB of overwrites"
start_writer 2
expect_rc 0 "$CBW" --json job start --target "vda=$T/full-a.qcow2" --target "vdb=$T/full-b.raw"
JOB=$(jq -r .id "$T/out")
[ "$(jq -r .mode "$T/out")" = full ] || fail "job mode: $(cat "$T/out")"
if command -v script >/dev/null; then
  # on a terminal, `cbw job wait` draws a progress bar (on stderr) that ends at 100 %
  script -qec "timeout 60 '$CBW' job wait '$JOB'" /dev/null > "$T/tty.out" ||
    fail "job wait on a tty: $(cat "$T/tty.out")"
  grep -q $'\r'"$JOB \[#*\.*\]" "$T/tty.out" && grep -q "\[#\{40\}\] 100.0%" "$T/tty.out" ||
    fail "no progress bar on the tty: $(tr '\r' '\n' < "$T/tty.out" | tail -3)"
fi
wait_job "$JOB"
job_json "$JOB" > "$T/st.json"
jq -e --argjson s $((2 * SIZE)) '.state == "completed" and ."bytes-done" == $s and ."bytes-total" == $s' \
  "$T/st.json" >/dev/null || fail "job status: $(cat "$T/st.json")"
zero=$(jq '."zero-bytes"' "$T/st.json")
[ "$zero" -ge $((2 * HOLES)) ] || fail "zero-bytes $zero: holes/zeroes were read as data"
log "full job: $(jq -c '{"data-bytes","zero-bytes","released-bytes"}' "$T/st.json")"
[ "$(jq '."released-bytes"' "$T/st.json")" = $((2 * SIZE)) ] || fail "not everything released: $(cat "$T/st.json")"
qemu-img compare -q -f qcow2 -F raw "$T/full-a.qcow2" "$T/exp-a0" || fail "qcow2 push of vda differs from its point in time"
qemu-img compare -q -f raw -F raw "$T/full-b.raw" "$T/exp-b0" || fail "raw push of vdb differs from its point in time"
cmp -s "$T/exp-a0" "$T/a.img" && fail "vacuous: the writer did not change vda after the point in time"
# the raw target was created sparse: holes stayed holes
alloc=$(( $(stat -c %b "$T/full-b.raw") * 512 ))
[ "$alloc" -le $((SIZE - HOLES)) ] || fail "raw target allocates $alloc bytes: holes were written"
# skip: the job trimmed the store, and writes after the push do not grow it
after_job=$(store_alloc vda)
qemu-io -f raw -c "write -P 9 $((16 * MiB)) $((8 * MiB))" "$(disk_uri vda)" >/dev/null
after_writes=$(store_alloc vda)
log "store of vda: $before_job bytes before the job, $after_job after, $after_writes after 8 MiB more writes"
[ "$after_writes" -lt $((before_job / 4)) ] ||
  fail "store did not shrink with the push: $before_job -> $after_job -> $after_writes bytes"
"$CBW" --json event list > "$T/ev.json"
for ev in job-started job-completed; do
  jq -e --arg e $ev --arg j "$JOB" '[.events[] | select(.event == $e and .data.job == $j)] | length == 1' \
    "$T/ev.json" >/dev/null || fail "no $ev event for $JOB: $(cat "$T/ev.json")"
done
expect_rc 0 "$CBW" job list
grep -q "$JOB .*completed" "$T/out" || fail "job list: $(cat "$T/out")"
stop_writer
expect_rc 0 "$CBW" backup end
[ -z "$(ls -A "$STATE/backups" 2>/dev/null)" ] || fail "backup end left files: $(ls -R "$STATE/backups")"
[ -z "$(ls "$STATE"/jobs/*.sock 2>/dev/null)" ] || fail "a qemu-nbd socket was left behind"
pgrep -f "qemu-nbd.*$T/" >/dev/null && fail "a qemu-nbd of the job is still running"

# ---- incremental push onto the same files ----
log "section: incremental push onto the previous copies"
start_writer 3
sleep 1
stop_writer
cp "$T/a.img" "$T/exp-a1"; cp "$T/b.img" "$T/exp-b1"
expect_rc 0 "$CBW" backup begin --incremental c0 --checkpoint c1
start_writer 4
ino=$(stat -c %i "$T/full-b.raw")
expect_rc 0 "$CBW" --json job start --target "vda=qcow2:$T/full-a.qcow2" --target "vdb=raw:$T/full-b.raw" --id inc
[ "$(jq -r .mode "$T/out")" = incremental ] || fail "job mode: $(cat "$T/out")"
wait_job inc
job_json inc > "$T/st.json"
total=$(jq '."bytes-total"' "$T/st.json")
[ "$total" -gt 0 ] && [ "$total" -lt $((SIZE / 2)) ] || fail "incremental pushed $total of $((2 * SIZE)) bytes"
[ "$(jq '[.disks[].created] | any' "$T/st.json")" = false ] || fail "incremental recreated a target"
[ "$(stat -c %i "$T/full-b.raw")" = "$ino" ] || fail "raw target was replaced"
stop_writer
qemu-img compare -q -f qcow2 -F raw "$T/full-a.qcow2" "$T/exp-a1" || fail "full + incremental (qcow2) of vda differs from its point in time"
qemu-img compare -q -f raw -F raw "$T/full-b.raw" "$T/exp-b1" || fail "full + incremental (raw) of vdb differs from its point in time"
log "incremental job: $(jq -c '{"bytes-total","data-bytes","zero-bytes"}' "$T/st.json")"
expect_rc 0 "$CBW" backup end
log "OK"
