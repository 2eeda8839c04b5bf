#!/bin/bash
# cbw — client-tests/backup/store-limit.sh: backup stores are bounded.
#
# The state directory is a small tmpfs (40 MiB, reserve 8 MiB), a second
# tmpfs (24 MiB) takes stores with --store-dir; the guest rewrites its
# 64 MiB disk during each backup, more than either could hold.
#   - default limit (stores beside the state): half the free space beyond
#     the reserve; reaching it breaks the backup (event backup-broken with
#     the reason, status broken), every guest write succeeds, the reserve
#     stays free and `checkpoint create` (bitmaps + state file) still works;
#   - --store-dir + --store-limit: the store lives and stops there;
#   - refused: a limit the state filesystem cannot give beyond its reserve,
#     a backup when nothing is left beyond the reserve, a relative or
#     missing store directory, a malformed CBW_ORCH_STORE_LIMIT.
# Needs root (tmpfs mounts); skipped otherwise.
. "$(dirname "$0")/lib.sh"
need_modules
requires jq
[ "$(id -u)" = 0 ] || skip "mounting a small tmpfs needs root"
mkdir -p "$STATE" "$T/stores"
mount -t tmpfs -o size=40m,mode=0700 tmpfs "$STATE" 2>/dev/null || skip "cannot mount a tmpfs"
mount -t tmpfs -o size=24m,mode=0700 tmpfs "$T/stores" 2>/dev/null || { umount "$STATE"; skip "cannot mount a tmpfs"; }
_sl_exit() {
  local rc=$? m
  if [ "$rc" != 0 ] && [ "$rc" != 77 ]; then
    for m in "$STATE"/disks/*/nbdkit.log; do
      [ -f "$m" ] && { echo "--- $m"; tail -n 15 "$m"; } >&2
    done
  fi
  [ -n "${ORCHD_PID:-}" ] && stop_orchd
  _bk_kill_ours
  for m in "$T/stores" "$STATE"; do umount -l "$m" 2>/dev/null || true; done
  _cbw_cleanup
  exit "$rc"
}
trap _sl_exit EXIT

MiB=$((1 << 20)) SIZE=$((64 << 20))
free_bytes() { echo $(( $(stat -f -c '%a * %S' "$1") )); }
head -c $SIZE /dev/urandom > "$T/a.img"

# A malformed default is refused at start-up.
rc=0; timeout 20 env CBW_ORCH_STORE_LIMIT=lots "$ORCHD" --state-dir "$T/bad-state" \
  --module-dir "$CBW_MODULES" >"$T/bad.out" 2>&1 || rc=$?
[ $rc != 0 ] && [ $rc != 124 ] && grep -q "CBW_ORCH_STORE_LIMIT=lots" "$T/bad.out" ||
  fail "CBW_ORCH_STORE_LIMIT=lots accepted: rc=$rc $(cat "$T/bad.out")"

start_orchd CBW_ORCH_STATE_RESERVE=8M
expect_rc 0 "$CBW" disk add vda --file "$T/a.img"

# heavy_writes: 3 s of random 1 MiB guest writes over the whole disk
heavy_writes() {
  local r
  r=$("$BK" randwrite "$(disk_uri vda)" 3 2 $MiB) || fail "guest writer: $r"
  log "guest writes: $r"
  [[ $r =~ failed=0\  ]] || fail "guest writes failed: $r"
}
# broken_event SEQ: the backup-broken event after SEQ, with a reason
broken_event() {
  for _ in $(seq 50); do
    "$CBW" --json event list --since "$1" >"$T/ev"
    jq -e '.events[] | select(.event == "backup-broken")' "$T/ev" >/dev/null && break
    sleep 0.1
  done
  jq -e '.events[] | select(.event == "backup-broken") | .data.disk == "vda" and
         (.data.error | test("limit"))' "$T/ev" >/dev/null ||
    fail "no backup-broken event naming the limit: $(cat "$T/ev")"
  log "event: $(jq -c '.events[] | select(.event == "backup-broken") | .data' "$T/ev")"
}

# ---- default limit, stores beside the state ----
free0=$(free_bytes "$STATE")
seq=$("$CBW" --json event list | jq .last)
expect_rc 0 "$CBW" --json backup begin --checkpoint full
limit=$(jq '.disks[0]["store-limit"]' "$T/out")
want=$(( (free0 - 8 * MiB) / 2 ))
[ "$limit" -gt $((want - 2 * MiB)) ] && [ "$limit" -le "$want" ] ||
  fail "default store limit $limit, expected about half of $((free0 - 8 * MiB)) free beyond the reserve"
log "default store limit: $((limit / MiB)) MiB of $((free0 / MiB)) MiB free"
heavy_writes
broken_event "$seq"
expect_rc 0 "$CBW" --json backup status
jq -e '.broken == true' "$T/out" >/dev/null || fail "backup status: $(cat "$T/out")"
store=$(jq -r '.disks[0]["store-path"]' "$T/out")
used=$(( $(stat -c '%b * %B' "$store") ))
[ "$used" -le "$limit" ] || fail "store takes $used bytes, limit $limit"
left=$(free_bytes "$STATE")
[ "$left" -ge $((8 * MiB)) ] || fail "state filesystem: $left bytes left, reserve 8 MiB"
log "store $((used / MiB)) MiB, state filesystem $((left / MiB)) MiB free"
# the daemon's own metadata is still written: bitmaps and the state file
expect_rc 0 "$CBW" checkpoint create after-full
expect_rc 0 "$CBW" backup end
expect_rc 0 "$CBW" --json checkpoint list
jq -e '[.checkpoints[].name] == ["full", "after-full"]' "$T/out" >/dev/null ||
  fail "checkpoints: $(cat "$T/out")"

# ---- --store-dir on another filesystem, --store-limit ----
seq=$("$CBW" --json event list | jq .last)
sfree=$(free_bytes "$STATE")
expect_rc 0 "$CBW" --json backup begin --store-dir "$T/stores" --store-limit 4M
store=$(jq -r '.disks[0]["store-path"]' "$T/out")
[[ $store == "$T/stores/cbwd-"*"-backup/vda.store" ]] || fail "store path $store"
jq -e '.disks[0]["store-limit"] == 4194304' "$T/out" >/dev/null || fail "limit: $(cat "$T/out")"
heavy_writes
broken_event "$seq"
used=$(( $(stat -c '%b * %B' "$store") ))
[ "$used" -le $((4 * MiB)) ] || fail "store takes $used bytes, limit 4 MiB"
[ "$(free_bytes "$STATE")" -ge $((sfree - MiB)) ] || fail "the store used the state filesystem"
expect_rc 0 "$CBW" backup end
[ -z "$(ls -A "$T/stores")" ] || fail "backup end left $(ls -R "$T/stores")"

# ---- refusals ----
expect_rc 1 "$CBW" backup begin --store-limit 1G
[[ $ERR == *"kept for cbwd's state and bitmaps"* ]] || fail "1G limit: $ERR"
expect_rc 1 "$CBW" backup begin --store-dir "$T/missing"
[[ $ERR == *"$T/missing"* ]] || fail "missing store dir: $ERR"
r=$("$BK" ctl "$CBW_SOCKET" '{"execute":"backup-begin","arguments":{"store-dir":"rel/dir"}}')
[[ $r == *"must be an absolute path"* ]] || fail "relative store dir: $r"
fallocate -l $(( $(free_bytes "$STATE") - 4 * MiB )) "$STATE/filler"
expect_rc 1 "$CBW" backup begin
[[ $ERR == *"no room for backup stores"* ]] || fail "no room beyond the reserve: $ERR"
rm -f "$STATE/filler"
expect_rc 1 "$CBW" backup status            # nothing was left behind
[ -z "$(ls -A "$STATE/backups" 2>/dev/null)" ] || fail "refused begins left $(ls -R "$STATE/backups")"
log PASS
