#!/bin/bash
# cbw — client-tests/backup/checkpoints.sh: checkpoints across disk sets and
# incrementals since any of them, checked exactly against a model.
#
# Random writes (seeded) in phases between checkpoints c1 {vda,vdb},
# c2 {vda}, c3 {vda,vdb}; the test records which 64 KiB granules each phase
# touched.  An incremental backup since checkpoint X must expose, in bitmap
# backup-DISK of the dirtybitmap filter, exactly the granules written on
# that disk since X (the filter tracks granules exactly; the test computes
# the expectation from its own log, not from cbw).  Checked again after
# deleting a middle checkpoint (merge into its neighbour), the latest one
# (the previous one is re-enabled) and the last one; plus the bitmap
# rotation state of each disk and a failed create that changes nothing.
. "$(dirname "$0")/lib.sh"
need_modules
requires qemu-io
requires jq

G=65536
SIZE=$((16 << 20))
truncate -s $SIZE "$T/a.img" "$T/b.img"
start_orchd
expect_rc 0 "$CBW" disk add vda --file "$T/a.img"
expect_rc 0 "$CBW" disk add vdb --file "$T/b.img"

RANDOM=4242
: > "$T/log"                       # lines: PHASE DISK FIRST_GRANULE LAST_GRANULE
phase=0
writes() {                         # writes DISK COUNT
  local disk=$1 n=$2 cmds=() i off len
  for i in $(seq "$n"); do
    off=$(( (RANDOM * 32768 + RANDOM) % (SIZE - 300000) ))
    len=$(( RANDOM % 200000 + 1 ))
    cmds+=(-c "write -P $((i % 250 + 1)) $off $len")
    echo "$phase $disk $((off / G)) $(((off + len - 1) / G))" >> "$T/log"
  done
  qemu-io -f raw "${cmds[@]}" "$(disk_uri "$disk")" >/dev/null || fail "writes on $disk"
}

# expected DISK SINCE_PHASE: granules written on DISK in phases >= SINCE_PHASE
expected() {
  awk -v d="$1" -v p="$2" '$2 == d && $1 >= p { for (g = $3; g <= $4; g++) print g }' "$T/log" | sort -n -u
}
# actual DISK: granules of bitmap backup-DISK
actual() {
  "$BK" extents "$(bm_ctl "$1")" "backup-$1" $SIZE |
    awk -v G=$G '{ if ($1 % G || $2 % G) { print "unaligned " $0; exit 1 }
                   for (g = $1 / G; g < ($1 + $2) / G; g++) print g }' | sort -n -u
}
check_since() {                    # check_since CHECKPOINT PHASE DISKS...
  local cp=$1 ph=$2 d; shift 2
  local dargs=(); for d in "$@"; do dargs+=(--disk "$d"); done
  expect_rc 0 "$CBW" backup begin "${dargs[@]}" --incremental "$cp"
  for d in "$@"; do
    diff <(expected "$d" "$ph") <(actual "$d") > "$T/diff" ||
      fail "incremental since $cp on $d differs from the model (< expected, > bitmap): $(head -20 "$T/diff")"
    [ -n "$(expected "$d" "$ph")" ] || fail "model empty for $d since $cp: test is vacuous"
  done
  expect_rc 0 "$CBW" backup end
}
bitmaps() {                        # bitmaps DISK: "name:enabled" list of cp-* bitmaps
  ctl "$(bm_ctl "$1")" '{"execute":"list"}' |
    jq -r '[.return.bitmaps[] | select(.name | startswith("cp-")) | "\(.name):\(.enabled)"] | sort | join(" ")'
}

writes vda 10; writes vdb 10
expect_rc 0 "$CBW" checkpoint create c1
phase=1; writes vda 12; writes vdb 12
expect_rc 0 "$CBW" checkpoint create c2 --disk vda
phase=2; writes vda 12; writes vdb 12
expect_rc 0 "$CBW" checkpoint create c3
phase=3; writes vda 12; writes vdb 12

[ "$(bitmaps vda)" = "cp-c1:false cp-c2:false cp-c3:true" ] || fail "vda bitmaps: $(bitmaps vda)"
[ "$(bitmaps vdb)" = "cp-c1:false cp-c3:true" ] || fail "vdb bitmaps: $(bitmaps vdb)"
expect_rc 0 "$CBW" --json checkpoint list
[ "$(jq -r '[.checkpoints[].name] | join(",")' "$T/out")" = c1,c2,c3 ] || fail "checkpoint list"

check_since c1 1 vda vdb
check_since c2 2 vda
check_since c3 3 vda vdb
expect_rc 1 "$CBW" backup begin --disk vdb --incremental c2
grep -q "does not cover disk" <<<"$ERR" || fail "c2 on vdb: $ERR"

# A failing create (duplicate name; unknown disk) changes nothing.
expect_rc 1 "$CBW" checkpoint create c2
expect_rc 1 "$CBW" checkpoint create c9 --disk vda --disk nosuch
[ "$(bitmaps vda)" = "cp-c1:false cp-c2:false cp-c3:true" ] || fail "failed create changed bitmaps"

# Delete the middle checkpoint of vda: incrementals since c1 stay exact.
expect_rc 0 "$CBW" checkpoint delete c2
[ "$(bitmaps vda)" = "cp-c1:false cp-c3:true" ] || fail "vda after delete c2: $(bitmaps vda)"
phase=4; writes vda 8; writes vdb 8
check_since c1 1 vda vdb
check_since c3 3 vda vdb

# Delete the latest: the previous one records writes again.
expect_rc 0 "$CBW" checkpoint delete c3
[ "$(bitmaps vda)" = "cp-c1:true" ] || fail "vda after delete c3: $(bitmaps vda)"
phase=5; writes vda 8; writes vdb 8
check_since c1 1 vda vdb

# Delete the last one: no checkpoint bitmaps remain.
expect_rc 0 "$CBW" checkpoint delete c1
[ -z "$(bitmaps vda)" ] && [ -z "$(bitmaps vdb)" ] || fail "bitmaps left: $(bitmaps vda) / $(bitmaps vdb)"
expect_rc 1 "$CBW" backup begin --incremental c1
log "OK"
