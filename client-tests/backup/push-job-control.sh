#!/bin/bash
# cbw — client-tests/backup/push-job-control.sh: controlling push jobs.
#  - speed limit: a job limited to 4 MiB/s copies about that much per second
#    (measured from its progress); set-speed changes it while it runs;
#  - pause: once the requests in flight drained, progress stops for 1 s;
#    resume: it moves again;
#  - cancel: status cancelled, the target is left as is (partly written,
#    full size), `backup end` is still clean (no store, no session, no
#    qemu-nbd left);
#  - backup end cancels a running job first;
#  - the NBD target dies mid-job (kill -9): the job fails naming the disk and
#    the write, the guest's disk keeps serving (sources drained first);
#  - kill -9 of cbwd mid-job: after the restart the job is reported failed
#    (interrupted), its qemu-nbd is gone, the disk still serves the guest;
#  - bad requests: unknown job, bad targets, pause of a finished job, a
#    second push of released ranges: clear errors, nothing started.
. "$(dirname "$0")/lib.sh"
need_modules
requires qemu-img
requires qemu-nbd
requires jq

MiB=$((1 << 20))
SIZE=$((64 * MiB))
head -c $SIZE /dev/urandom > "$T/a.img"
start_orchd
expect_rc 0 "$CBW" disk add vda --file "$T/a.img"
done_bytes() { "$CBW" --json job status "$1" | jq '."bytes-done"'; }
job_state() { "$CBW" --json job status "$1" | jq -r .state; }
# drained ID: wait until a paused job has no request in flight
drained() {
  local i
  for i in $(seq 100); do
    [ "$("$CBW" --json job status "$1" | jq '."in-flight"')" = 0 ] && return 0
    sleep 0.05
  done
  fail "paused job $1 still has requests in flight"
}

# ---- speed limit, pause, resume, cancel ----
log "section: speed limit, pause, resume, cancel"
expect_rc 0 "$CBW" backup begin --checkpoint c0
expect_rc 0 "$CBW" --json job start --target "$T/slow.qcow2" --speed 4M --request-size 256K --id slow
[ "$(jq -r '.disks[0].format' "$T/out")" = qcow2 ] || fail "format: $(cat "$T/out")"
sleep 0.5
d0=$(done_bytes slow); t0=$(date +%s%N)
sleep 2
d1=$(done_bytes slow); t1=$(date +%s%N)
rate=$(( (d1 - d0) * 1000000000 / (t1 - t0) ))
log "limited to 4 MiB/s: measured $rate bytes/s"
[ "$rate" -gt $((2 * MiB)) ] && [ "$rate" -lt $((6 * MiB)) ] || fail "speed limit 4 MiB/s: measured $rate bytes/s"
expect_rc 0 "$CBW" job pause slow
[ "$(job_state slow)" = paused ] || fail "state after pause: $(job_state slow)"
drained slow
p0=$(done_bytes slow)
sleep 1
p1=$(done_bytes slow)
[ "$p0" = "$p1" ] || fail "progress moved while paused: $p0 -> $p1"
expect_rc 1 "$CBW" job pause slow
grep -q "already paused" <<<"$ERR" || fail "pause twice: $ERR"
expect_rc 0 "$CBW" job resume slow
sleep 0.8
p2=$(done_bytes slow)
[ "$p2" -gt "$p1" ] || fail "no progress after resume: $p1 -> $p2"
expect_rc 0 "$CBW" job set-speed slow --speed 1M
sleep 0.3
# The samples are taken somewhere inside each cbw call: divide by the time
# from before the first call to after the second (an upper bound of the
# interval between them), so that slow cbw calls on a loaded machine
# cannot make the rate look higher than it is.
u0=$(date +%s%N); s0=$(done_bytes slow); sleep 2; s1=$(done_bytes slow); u1=$(date +%s%N)
rate=$(( (s1 - s0) * 1000000000 / (u1 - u0) ))
[ "$rate" -lt $((2 * MiB)) ] || fail "set-speed 1M: $((s1 - s0)) bytes in $(( (u1 - u0) / 1000000 )) ms"
[ "$s1" -lt $SIZE ] || fail "vacuous: the job finished before cancel"
expect_rc 0 "$CBW" --json job cancel slow
jq -e '.state == "cancelled" and .error == null' "$T/out" >/dev/null || fail "cancel: $(cat "$T/out")"
c0=$(done_bytes slow); sleep 0.5
[ "$(done_bytes slow)" = "$c0" ] || fail "a cancelled job still makes progress"
[ -f "$T/slow.qcow2" ] || fail "cancel removed the target"
vs=$(qemu-img info --output=json "$T/slow.qcow2" | jq '."virtual-size"')
[ "$vs" = $SIZE ] || fail "target virtual size $vs"
expect_rc 1 "$CBW" job pause slow
grep -q "is cancelled: it cannot be paused" <<<"$ERR" || fail "pause of a cancelled job: $ERR"
expect_rc 1 "$CBW" job resume slow
expect_rc 1 "$CBW" job cancel slow
grep -q "cancelled already" <<<"$ERR" || fail "cancel twice: $ERR"
expect_rc 1 "$CBW" job wait slow
"$CBW" --json event list | jq -e '[.events[].event] | (index("job-progress") != null and index("job-paused") != null and index("job-resumed") != null and index("job-cancelled") != null)' >/dev/null ||
  fail "missing job events: $("$CBW" event list)"
# the cancelled job released what it copied: pushing the disk again in this backup is refused
expect_rc 1 "$CBW" job start --target "$T/again.raw"
grep -q "was released by job slow" <<<"$ERR" || fail "second push: $ERR"
[ -e "$T/again.raw" ] && fail "a refused job created its target"
expect_rc 0 "$CBW" backup end
[ -z "$(ls -A "$STATE/backups" 2>/dev/null)" ] || fail "backup end left files: $(ls -R "$STATE/backups")"
ctl "$(cbw_ctl vda)" '{"execute":"status"}' | jq -e '.return.state == "idle"' >/dev/null || fail "session left"
pgrep -f "qemu-nbd.*$T/" >/dev/null && fail "qemu-nbd left running"

# ---- backup end cancels a running job ----
log "section: backup end cancels a running job"
expect_rc 0 "$CBW" backup begin
expect_rc 0 "$CBW" job start --target "raw:$T/b.raw" --speed 2M --id run2
sleep 0.3
expect_rc 0 "$CBW" backup end
[ "$(job_state run2)" = cancelled ] || fail "job after backup end: $(job_state run2)"

# ---- bad requests ----
log "section: bad requests"
expect_rc 1 "$CBW" job status nosuch
grep -q "NotFound: no job named nosuch" <<<"$ERR" || fail "unknown job: $ERR"
expect_rc 1 "$CBW" job pause nosuch
expect_rc 1 "$CBW" job set-speed nosuch --speed 1
expect_rc 2 "$CBW" job set-speed run2
expect_rc 2 "$CBW" job start
grep -q "needs --target" <<<"$ERR" || fail "job start without target: $ERR"
expect_rc 2 "$CBW" job start --target x --speed 12Q
expect_rc 1 "$CBW" job start --target "$T/none.raw"
grep -q "no backup is running" <<<"$ERR" || fail "no backup: $ERR"
expect_rc 0 "$CBW" backup begin --incremental c0
expect_rc 1 "$CBW" raw job-start '{"targets":["vda=relative/x.raw"]}'
grep -q "must be absolute" "$T/out" || fail "relative path: $(cat "$T/out")"
expect_rc 1 "$CBW" job start --target "vdz=$T/x.raw"
grep -q "vdz is not a disk of this job" <<<"$ERR" || fail "unknown disk: $ERR"
expect_rc 1 "$CBW" job start --target "$T/nodir/x.raw"
grep -q "nodir/x.raw" <<<"$ERR" || fail "missing directory: $ERR"
expect_rc 1 "$CBW" job start --target "$T/missing.qcow2"
grep -q "does not exist: an incremental job writes onto the previous full copy" <<<"$ERR" ||
  fail "incremental onto a missing target: $ERR"
expect_rc 1 "$CBW" job start --target "raw:$T/a.img"
grep -q "is disk vda's served image" <<<"$ERR" || fail "target = disk image: $ERR"
head -c 4096 /dev/zero > "$T/small.raw"
expect_rc 1 "$CBW" job start --target "$T/small.raw"
grep -q "has 4096 bytes" <<<"$ERR" || fail "wrong-size raw target: $ERR"
expect_rc 1 "$CBW" job start --target "ftp://x/y"
grep -q "unknown URI scheme" <<<"$ERR" || fail "bad scheme: $ERR"
n=$("$CBW" --json job list | jq '.jobs | length')
[ "$n" = 2 ] || fail "bad requests created jobs: $("$CBW" job list)"
# NBD targets are connected and checked on the job's thread (job-start
# never waits for a server): what is wrong with them fails the job
# (nothing written), with the reason in its status.
# nbd_target_fails ID SOCKET PATTERN
nbd_target_fails() {
  expect_rc 0 "$CBW" job start --target "nbd+unix:///?socket=$2" --id "$1"
  expect_rc 1 timeout 30 "$CBW" job wait "$1"
  "$CBW" --json job status "$1" > "$T/st.json"
  jq -e --arg p "$3" '.state == "failed" and (.error | test($p)) and ."bytes-done" == 0' \
    "$T/st.json" >/dev/null || fail "NBD target $2: $(cat "$T/st.json")"
}
nbd_target_fails nosuch "$T/nosuch.sock" "disk vda: cannot connect to target"
start_nbdkit "$T/ro.sock" -r memory $SIZE
nbd_target_fails ro "$T/ro.sock" "disk vda: target .* is read-only"
# an NBD target works (incremental onto an nbdkit memory disk: copies only dirty extents)
start_nbdkit "$T/mem.sock" memory $SIZE
expect_rc 0 "$CBW" --json job start --target "nbd+unix:///?socket=$T/mem.sock" --id tonbd
timeout 30 "$CBW" job wait tonbd >/dev/null 2>&1 || fail "NBD push: $("$CBW" job status tonbd)"
expect_rc 1 "$CBW" job pause tonbd
grep -q "is completed: it cannot be paused" <<<"$ERR" || fail "pause of a completed job: $ERR"
expect_rc 0 "$CBW" backup end

# ---- the target dies mid-job: failed with a message, the disk is unharmed ----
log "section: target dies mid-job"
expect_rc 0 "$CBW" backup begin
start_nbdkit "$T/dying.sock" memory $SIZE
DYING=$NBDKIT_PID
expect_rc 0 "$CBW" job start --target "nbd+unix:///?socket=$T/dying.sock" --speed 4M --id dies
sleep 0.5
kill9 "$DYING"
expect_rc 1 timeout 30 "$CBW" job wait dies
"$CBW" --json job status dies > "$T/st.json"
jq -e '.state == "failed" and (.error | test("disk vda: .*(target|writing)"))' "$T/st.json" >/dev/null ||
  fail "job with a dead target: $(cat "$T/st.json")"
grep -q "cbw: job dies failed" <<<"$ERR" || fail "job wait message: $ERR"
timeout 10 qemu-io -f raw -c "write 0 4k" "$(disk_uri vda)" >/dev/null || fail "disk vda stopped serving"
"$CBW" --json disk list | jq -e '.disks[0].state == "running"' >/dev/null || fail "disk vda died with the job"
expect_rc 0 "$CBW" backup end

# ---- kill -9 of cbwd mid-job ----
log "section: cbwd killed mid-job"
expect_rc 0 "$CBW" backup begin
expect_rc 0 "$CBW" job start --target "$T/crash.qcow2" --speed 2M --id crash
sleep 0.5
helper=$(pgrep -f "qemu-nbd.*$T/crash.qcow2") || fail "no qemu-nbd for the qcow2 target"
kill -9 "$ORCHD_PID"; wait "$ORCHD_PID" 2>/dev/null || true
start_orchd
expect_rc 0 "$CBW" --json job status crash
jq -e '.state == "failed" and (.error | startswith("interrupted"))' "$T/out" >/dev/null ||
  fail "job after the restart: $(cat "$T/out")"
alive_pid "$helper" && fail "qemu-nbd of the interrupted job still runs"
"$CBW" --json event list | jq -e '[.events[] | select(.event == "job-failed" and .data.job == "crash")] | length == 1' >/dev/null ||
  fail "no job-failed event after the restart"
timeout 10 qemu-io -f raw -c "write 0 4k" "$(disk_uri vda)" >/dev/null || fail "disk vda stopped serving"
expect_rc 0 "$CBW" backup end
[ -z "$(ls -A "$STATE/backups" 2>/dev/null)" ] || fail "backup end left files after the restart"
log "OK"
