#!/bin/bash
# cbw — client-tests/dirtybitmap/lock-and-corrupt.sh: startup failures.
#  - a second nbdkit on the same bitmaps is refused with a message naming the
#    lock file, while the first keeps serving;
#  - after kill -9 the lock is gone with the process: a restart works and
#    recovers from the journal;
#  - a corrupt descriptor stops nbdkit at startup with a message naming the
#    file; image, descriptor and data files are left untouched;
#  - an unreadable journal after an unclean stop: nbdkit starts, warns, and
#    reports every enabled bitmap entirely dirty (never under-reports);
#  - missing parameters are refused.
if [ -z "${TMPDIR:-}" ] && [ -w /dev/shm ]; then export TMPDIR=/dev/shm; fi
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/sanitize-guard.sh"
requires qemu-io
requires jq
TOOL=$CBW_BUILD/client-tests/dirtybitmap/dbm-tool
[ -x "$TOOL" ] || fail "$TOOL not built"

SIZE=$((32 * 1048576))
head -c $SIZE /dev/urandom > "$T/disk.img"
ARGS=(--filter="$DIRTYBITMAP_FILTER" file "$T/disk.img" dirtybitmap-image="$T/disk.img"
      dirtybitmap-region-size=1M dirtybitmap-create=true)
URI="nbd+unix:///?socket=$T/s"
ok() { "$TOOL" ctl "$T/ctl" "$@" >/dev/null || fail "control $* failed"; }

# nbdkit_must_fail LOG ARGS...: nbdkit must exit non-zero without serving
nbdkit_must_fail() {
  local out=$1 rc=0; shift
  timeout 30 "${NBDKIT[@]}" -f -U "$T/s2" "$@" > "$out" 2>&1 || rc=$?
  [ "$rc" != 0 ] || fail "nbdkit started but should not have: $(cat "$out")"
  [ "$rc" != 124 ] || fail "nbdkit hung instead of failing"
  [ ! -S "$T/s2" ] || fail "nbdkit created its socket"
}

start_nbdkit "$T/s" "${ARGS[@]}" dirtybitmap-control="$T/ctl"
"$TOOL" wait "$T/ctl" || fail "no control socket"
ok add '{"name":"b"}'
qemu-io -f raw -c 'write -P 1 0 4096' "$URI" >/dev/null

# second process on the same store
nbdkit_must_fail "$T/second.log" "${ARGS[@]}" dirtybitmap-control="$T/ctl2"
grep -q "disk.img.cbw-bitmaps.json.lock" "$T/second.log" ||
  fail "second nbdkit: message does not name the lock file: $(cat "$T/second.log")"
log "second nbdkit refused: $(grep -m1 -i lock "$T/second.log")"
qemu-io -f raw -c 'write -P 2 20971520 4096' "$URI" >/dev/null || fail "first nbdkit disturbed"

# kill -9: the lock goes with the process; restart recovers exactly from the
# live-bitmap map
kill9 "$NBDKIT_PID"
start_nbdkit "$T/s" "${ARGS[@]}" dirtybitmap-control="$T/ctl"
"$TOOL" wait "$T/ctl" || fail "no control socket after kill -9"
assert_eq "recovery after kill -9" map "$("$TOOL" ctl "$T/ctl" info | jq -r .recovery)"
"$TOOL" extents "$T/ctl" b > "$T/ext"
awk '$1 <= 0 && $1 + $2 >= 65536 {a=1} $1 <= 20971520 && $1 + $2 >= 20971520 + 65536 {b=1}
     END {exit !(a && b)}' "$T/ext" || fail "writes before kill -9 not dirty: $(cat "$T/ext")"
kill "$NBDKIT_PID"; wait "$NBDKIT_PID" || true

# corrupt descriptor: clear error naming it, nothing modified
D=$T/disk.img.cbw-bitmaps.json
sha_before=$(cat "$T/disk.img" "$T"/disk.img.cbw-bitmaps* | sha256sum)
ls -l --time-style=+%s.%N "$T" | grep -v lock > "$T/ls.before"
sed -i 's/"granularity": 65536/"granularity": 65537/' "$D"
grep -q 65537 "$D" || fail "could not corrupt the descriptor"
sha_before=$(cat "$T/disk.img" "$T"/disk.img.cbw-bitmaps* | sha256sum)
nbdkit_must_fail "$T/corrupt.log" "${ARGS[@]}"
grep -q "$D" "$T/corrupt.log" || fail "message does not name the descriptor: $(cat "$T/corrupt.log")"
log "corrupt descriptor refused: $(grep -m1 "$D" "$T/corrupt.log")"
assert_eq "image and bitmap files untouched" "$sha_before" \
  "$(cat "$T/disk.img" "$T"/disk.img.cbw-bitmaps* | sha256sum)"
sed -i 's/"granularity": 65537/"granularity": 65536/' "$D"

# truncated descriptor
cp "$D" "$T/desc.good"
truncate -s 100 "$D"
nbdkit_must_fail "$T/trunc.log" "${ARGS[@]}"
grep -q "$D" "$T/trunc.log" || fail "truncated descriptor: message does not name it: $(cat "$T/trunc.log")"
cp "$T/desc.good" "$D"

# unclean stop + destroyed journal: all dirty, with a warning
start_nbdkit "$T/s" "${ARGS[@]}" dirtybitmap-control="$T/ctl"
"$TOOL" wait "$T/ctl" || fail "no control socket"
qemu-io -f raw -c 'write -P 3 8388608 4096' "$URI" >/dev/null
kill9 "$NBDKIT_PID"
M=$T/disk.img.cbw-bitmaps.json.livemap
[ -f "$M" ] || fail "no live-bitmap map beside the descriptor"

# unclean stop + corrupt live-bitmap map: ignored with a warning naming it,
# the journal is used (whole regions: the write is covered)
cp "$M" "$T/livemap.good"
printf 'garbage' | dd of="$M" bs=1 seek=200 conv=notrunc status=none
rm -f "$T/s"
start_bg "${NBDKIT[@]}" -f -U "$T/s" "${ARGS[@]}" dirtybitmap-control="$T/ctl" 2> "$T/map.log"
NBDKIT_PID=$BG_PID
wait_nbd "$URI"
"$TOOL" wait "$T/ctl" || fail "no control socket"
assert_eq "recovery with a corrupt map" journal "$("$TOOL" ctl "$T/ctl" info | jq -r .recovery)"
grep -q "WARNING.*$M.*checksum" "$T/map.log" || fail "no warning naming the map: $(cat "$T/map.log")"
"$TOOL" extents "$T/ctl" b > "$T/ext"
awk '$1 <= 8388608 && $1 + $2 >= 8388608 + 4096 {a=1} END {exit !a}' "$T/ext" ||
  fail "write before kill -9 not dirty with a corrupt map: $(cat "$T/ext")"
qemu-io -f raw -c 'write -P 3 8388608 4096' "$URI" >/dev/null
kill9 "$NBDKIT_PID"

# unclean stop + destroyed journal and map: all dirty, with a warning
head -c 8192 /dev/zero > "$T/disk.img.cbw-bitmaps.json.journal"
truncate -s 10 "$M"
rm -f "$T/s"
start_bg "${NBDKIT[@]}" -f -U "$T/s" "${ARGS[@]}" dirtybitmap-control="$T/ctl" 2> "$T/warn.log"
NBDKIT_PID=$BG_PID
wait_nbd "$URI"
"$TOOL" wait "$T/ctl" || fail "no control socket"
assert_eq "recovery with a destroyed journal" all-dirty "$("$TOOL" ctl "$T/ctl" info | jq -r .recovery)"
assert_eq "all dirty" "$SIZE" "$("$TOOL" ctl "$T/ctl" list | jq '.bitmaps[0]."dirty-bytes"')"
grep -q "WARNING.*journal" "$T/warn.log" || fail "no warning about the journal: $(cat "$T/warn.log")"
kill "$NBDKIT_PID"; wait "$NBDKIT_PID" || true
[ ! -e "$M" ] || fail "live-bitmap map left behind by a clean stop"

# dirtybitmap=DESCRIPTOR without the image: the store opens at the first
# connection (size from the plugin); it then works like the eager mode
mkdir "$T/lazy"
start_nbdkit "$T/s" --filter="$DIRTYBITMAP_FILTER" file "$T/disk.img" \
  dirtybitmap="$T/lazy/d.json" dirtybitmap-control="$T/ctl3" dirtybitmap-create=true
"$TOOL" wait "$T/ctl3" || fail "lazy mode: no control socket after the first connection"
"$TOOL" ctl "$T/ctl3" add '{"name":"l","granularity":4096}' >/dev/null || fail "lazy add"
qemu-io -f raw -c 'write -P 4 12288 8192' "$URI" >/dev/null
assert_eq "lazy mode extents" "12288 8192" "$("$TOOL" extents "$T/ctl3" l)"
kill "$NBDKIT_PID"; wait "$NBDKIT_PID" || true

# parameters
nbdkit_must_fail "$T/noparam.log" --filter="$DIRTYBITMAP_FILTER" file "$T/disk.img"
grep -q "dirtybitmap-image" "$T/noparam.log" || fail "missing parameter: unclear message: $(cat "$T/noparam.log")"
nbdkit_must_fail "$T/badregion.log" "${ARGS[@]}" dirtybitmap-region-size=3M
nbdkit_must_fail "$T/badinterval.log" "${ARGS[@]}" dirtybitmap-checkpoint-interval=0
log "lock-and-corrupt: OK"
