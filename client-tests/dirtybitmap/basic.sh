#!/bin/bash
# cbw — client-tests/dirtybitmap/basic.sh: random writes, zeroes and discards
# from qemu-io through nbdkit + the dirtybitmap filter; the `extents` of every
# bitmap must equal, exactly, a model computed here (awk) from the same ops.
# Covers granularities 64K and 4K, add/enable/disable/merge/clear/remove,
# bad control requests (errors, I/O undisturbed), and a clean restart
# (bitmaps identical, state clean, no recovery).
if [ -z "${TMPDIR:-}" ] && [ -w /dev/shm ]; then export TMPDIR=/dev/shm; fi
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/sanitize-guard.sh"
requires qemu-io
requires jq
TOOL=$CBW_BUILD/client-tests/dirtybitmap/dbm-tool
[ -x "$TOOL" ] || fail "$TOOL not built"
[ -f "$DIRTYBITMAP_FILTER" ] || fail "$DIRTYBITMAP_FILTER not built"

SIZE=$((64 * 1048576 + 12288))        # not a multiple of 64K: partial last granule
truncate -s $SIZE "$T/disk.img"
mkdir "$T/bm"
ARGS=(--filter="$DIRTYBITMAP_FILTER" file "$T/disk.img" dirtybitmap-image="$T/disk.img"
      dirtybitmap-control="$T/ctl" dirtybitmap-region-size=4M dirtybitmap-create=true)
URI="nbd+unix:///?socket=$T/s"
ok() { "$TOOL" ctl "$T/ctl" "$@" >/dev/null || fail "control $* failed"; }
# expect_err CLASS CMD [ARGS]: the command must fail with that error class
expect_err() {
  local cls=$1 out; shift
  if out=$("$TOOL" ctl "$T/ctl" "$@"); then fail "control $* succeeded: $out"; fi
  assert_eq "error class of $*" "$cls" "$(jq -r .class <<<"$out")"
}

# gen_ops N: N random ops "KIND OFFSET LENGTH" (512-aligned, some spanning
# granules, some at the very end of the image).
gen_ops() {
  local i k off len
  for i in $(seq "$1"); do
    case $((RANDOM % 5)) in 0|1|2) k=write ;; 3) k=zero ;; 4) k=discard ;; esac
    len=$(( (1 + RANDOM % 300) * 512 ))
    if [ $((RANDOM % 8)) = 0 ]; then off=$((SIZE - len))
    else off=$(( (RANDOM * 32768 + RANDOM) % ((SIZE - len) / 512) * 512 )); fi
    echo "$k $off $len"
  done
}
run_ops() {
  local a=() k off len
  while read -r k off len; do
    case $k in
      write) a+=(-c "write -P 0x5a $off $len") ;;
      zero) a+=(-c "write -z $off $len") ;;
      discard) a+=(-c "discard $off $len") ;;
    esac
  done < "$1"
  qemu-io -f raw "${a[@]}" "$URI" >/dev/null || fail "qemu-io failed"
}
# model GRAN FILES...: expected extents "OFFSET LENGTH" of the ops in FILES
model() {
  local g=$1; shift
  cat "$@" | awk -v g="$g" -v size="$SIZE" '
    { f = int($2 / g); l = int(($2 + $3 - 1) / g); for (i = f; i <= l; i++) d[i] = 1 }
    END {
      n = int((size + g - 1) / g); s = -1
      for (i = 0; i <= n; i++) {
        if (i < n && (i in d)) { if (s < 0) s = i }
        else if (s >= 0) { e = i * g; if (e > size) e = size; printf "%d %d\n", s * g, e - s * g; s = -1 }
      }
    }'
}
check() {   # check BITMAP GRAN FILES...
  local b=$1 g=$2; shift 2
  "$TOOL" extents "$T/ctl" "$b" > "$T/got" || fail "extents $b failed"
  model "$g" "$@" > "$T/want"
  diff -u "$T/want" "$T/got" > "$T/diff" || { cat "$T/diff" >&2; fail "bitmap $b differs from the model"; }
  log "bitmap $b: $(wc -l < "$T/want") extents as modelled"
}

RANDOM=${CBW_TEST_SEED:-$$}
log "seed $RANDOM"
start_nbdkit "$T/s" "${ARGS[@]}" dirtybitmap="$T/bm/d.json"
"$TOOL" wait "$T/ctl" || fail "no control socket"
ok add '{"name":"b64k"}'
ok add '{"name":"b4k","granularity":4096}'
ok add '{"name":"later","granularity":65536,"enabled":false}'
: > "$T/empty"

gen_ops 40 > "$T/ops1"; run_ops "$T/ops1"
check b64k 65536 "$T/ops1"
check b4k 4096 "$T/ops1"
check later 65536 "$T/empty"

ok enable '{"name":"later"}'
ok disable '{"name":"b4k"}'
gen_ops 30 > "$T/ops2"; run_ops "$T/ops2"
check b64k 65536 "$T/ops1" "$T/ops2"
check b4k 4096 "$T/ops1"
check later 65536 "$T/ops2"

# merge a 4K bitmap into a 64K one: every 64K granule with a dirty 4K granule
ok merge '{"src":"b4k","dst":"later"}'
check later 65536 "$T/ops1" "$T/ops2"

# bad requests: clear errors, nothing changes, I/O keeps working
expect_err CommandNotFound frobnicate
expect_err InvalidParameter add '{"name":"x","granularity":1000}'
expect_err InvalidParameter add '{"name":"../x"}'
expect_err InvalidParameter add '{"granularity":65536}'
expect_err Exists add '{"name":"b64k"}'
expect_err NotFound remove '{"name":"nope"}'
expect_err NotFound extents '{"name":"nope"}'
expect_err InvalidParameter extents '{"name":"b64k","offset":'$((SIZE + 1))'}'
expect_err InvalidParameter extents '{"name":"b64k","offset":0,"length":'$((SIZE + 1))'}'
expect_err InvalidParameter extents '{"name":"b64k","max-extents":0}'
expect_err InvalidParameter merge '{"src":"b64k","dst":"b64k"}'
expect_err InvalidParameter clear '{"name":"b64k","extra":1}'
r=$("$TOOL" raw "$T/ctl" '{"execute": "list", garbage')
assert_eq "garbage line" ParseError "$(jq -r .error.class <<<"$r")"
qemu-io -f raw -c 'write -P 0x77 1048576 4096' -c 'read -P 0x77 1048576 4096' "$URI" >/dev/null ||
  fail "I/O disturbed by bad requests"
echo "write 1048576 4096" > "$T/ops3"
check b64k 65536 "$T/ops1" "$T/ops2" "$T/ops3"
check b4k 4096 "$T/ops1"

# list agrees with the model (dirty bytes) and states are in-use while open
dirty=$(model 65536 "$T/ops1" "$T/ops2" "$T/ops3" | awk '{s += $2} END {print s + 0}')
assert_eq "b64k dirty-bytes" "$dirty" \
  "$("$TOOL" ctl "$T/ctl" list | jq '.bitmaps[] | select(.name=="b64k") | ."dirty-bytes"')"
assert_eq "state while open" in-use \
  "$("$TOOL" ctl "$T/ctl" list | jq -r '.bitmaps[0].state')"

# clean restart: same bits, state clean on disk, no recovery needed
kill "$NBDKIT_PID"; wait "$NBDKIT_PID" || true
grep -q '"state": "in-use"' "$T/bm/d.json" && fail "descriptor still in-use after clean exit"
start_nbdkit "$T/s" "${ARGS[@]}" dirtybitmap="$T/bm/d.json"
"$TOOL" wait "$T/ctl" || fail "no control socket after restart"
assert_eq "recovery after clean exit" clean "$("$TOOL" ctl "$T/ctl" info | jq -r .recovery)"
check b64k 65536 "$T/ops1" "$T/ops2" "$T/ops3"
check b4k 4096 "$T/ops1"
check later 65536 "$T/ops1" "$T/ops2" "$T/ops3"

ok clear '{"name":"b64k"}'
check b64k 65536 "$T/empty"
ok remove '{"name":"b4k"}'
assert_eq "bitmaps after remove" "b64k later" \
  "$("$TOOL" ctl "$T/ctl" list | jq -r '[.bitmaps[].name] | join(" ")')"
ls "$T/bm" | grep -q 'b4k' && fail "data file of removed bitmap left behind: $(ls "$T/bm")"
log "basic: OK"
