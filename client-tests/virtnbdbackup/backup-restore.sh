#!/bin/bash
# cbw — client-tests/virtnbdbackup/backup-restore.sh: virtnbdbackup (the
# Debian package) backs up cbw disks with its own reader code, and
# virtnbdrestore rebuilds them, while a guest keeps writing.
#
# cbwd (orchestrator + NBD exports) runs two disks, vda (48 MiB, partly
# sparse) and vdb (40 MiB + 12345 bytes: one data extent larger than cbwd's
# 32 MiB maximum request, and a partial last cluster).  A guest writer
# (qemu-io through each disk's live export) writes random ranges to both
# (write-zeroes too on vda, now and then vdb's last bytes, a hot block on
# both every round), all the time.
# vnb_driver.py runs virtnbdbackup's own backup steps (checkpoint naming,
# backupDisk per disk in its thread pool, its sparse stream files) with
# `cbw backup begin/end` in the place of libvirt, in this order:
#   disks declared raw: virtnbdbackup switches to level copy (raw images);
#   declared qcow2: full (checkpoint virtnbdbackup.0), inc (virtnbdbackup.1),
#   diff (since .1, no checkpoint, lz4-compressed), inc (virtnbdbackup.2)
# Each reader waits, before each of its first two data reads, until the guest
# has written once more: the guest writes while every disk is being read.
#
# The reference for each point in time: the freeze hook of each backup (cbwd
# runs it before the point in time and "thaw" after) pauses the writer, waits
# until its last write was acknowledged, and copies both live disks with
# nbdcopy; the writer resumes at thaw.  Nothing is written between the copy
# and the point in time, so the copy is the disk at the point in time,
# taken independently of the PIT export under test.
#
# Checks:
#  - the checkpoint names and parents are virtnbdbackup's; diff creates no
#    cbw checkpoint; the incrementals and the diff carry only vda's first half
#    (where the writer writes) and something (virtnbdrestore's dump);
#  - vdb's big extent was read in chunks of cbwd's maximum request size;
#  - virtnbdrestore (with libvirt's test driver, no libvirtd) rebuilds each
#    point in time: --raw = the copy (cmp), --until virtnbdbackup.0 = full,
#    --until virtnbdbackup.1 = inc, --until virtnbdbackup.2 = diff (it
#    carries the next checkpoint's name), the whole set = the last inc;
#    qemu-img compare against the references, for both disks;
#  - not vacuous: every reference differs from the next one, and the live disk
#    differs from the last reference (the guest wrote during the last backup).
. "$(dirname "$0")/../backup/lib.sh"
need_modules
for p in virtnbdbackup virtnbdrestore qemu-io qemu-img qemu-nbd nbdcopy jq; do requires "$p"; done
# virtnbdbackup runs on Debian's python3 (its modules are in dist-packages)
PY=/usr/bin/python3
[ -x $PY ] || skip "$PY not installed"
$PY -c 'import nbd, libvirt, libvirtnbdbackup' 2>/dev/null ||
  skip "$PY cannot import nbd, libvirt and libvirtnbdbackup (package virtnbdbackup)"
CBWD=$CBW_BUILD/server/cbwd
[ -x "$CBWD" ] || skip "cbwd not built"
DRIVER=$(dirname "$0")/vnb_driver.py

MiB=$((1 << 20))
truncate -s $((48 * MiB)) "$T/vda.img"            # vda: data, then holes, then data
head -c $((20 * MiB)) /dev/urandom | dd of="$T/vda.img" conv=notrunc status=none
head -c $((8 * MiB)) /dev/urandom | dd of="$T/vda.img" bs=1M seek=36 conv=notrunc status=none
head -c $((40 * MiB + 12345)) /dev/urandom > "$T/vdb.img"    # vdb: one extent > 32 MiB, odd size

# ---- the freeze hook: pause the guest, copy the disks, resume ----
cat > "$T/hook.sh" <<HOOK
#!/bin/bash
set -e
case "\$1" in
freeze)
  touch "$T/pause"
  for i in \$(seq 3000); do [ -e "$T/paused" ] && break; sleep 0.01; done
  [ -e "$T/paused" ] || { echo "writer did not pause" >&2; exit 1; }
  ref=\$(cat "$T/refname")
  for d in vda vdb; do
    nbdcopy "nbd+unix:///?socket=$STATE/disks/\$d/nbd.sock" "$T/ref\$ref-\$d.img"
  done ;;
thaw)
  rm -f "$T/pause"
  for i in \$(seq 3000); do [ -e "$T/paused" ] || break; sleep 0.01; done ;;
esac
HOOK
chmod +x "$T/hook.sh"

rm -f "$CBW_SOCKET"
start_bg env CBW_NBDKIT="${NBDKIT[*]}" "$CBWD" --listen "unix:$T/cbwd.sock" \
  --state-dir "$STATE" --module-dir "$CBW_MODULES" --freeze-hook "ref=$T/hook.sh" 2>"$T/cbwd.log"
ORCHD_PID=$BG_PID
wait_socket "$CBW_SOCKET" 30
expect_rc 0 "$CBW" disk add vda --file "$T/vda.img"
expect_rc 0 "$CBW" disk add vdb --file "$T/vdb.img"

# ---- the guest: random writes to vda's first half and all of vdb ----
writer() {
  local n=0 d size cmds i
  RANDOM=42
  echo 0 > "$T/count"
  while [ ! -e "$T/stop" ]; do
    if [ -e "$T/pause" ]; then
      touch "$T/paused"
      while [ -e "$T/pause" ]; do sleep 0.01; done
      rm -f "$T/paused"
      continue
    fi
    for d in vda vdb; do
      size=$((40 * MiB + 12345)); [ $d = vda ] && size=$((24 * MiB))
      cmds=()
      for i in 1 2; do
        if [ $d = vda ] && [ $((RANDOM % 4)) = 0 ]; then
          cmds+=(-c "write -z $((RANDOM % (size / 4096 - 16) * 4096)) $(( (RANDOM % 16 + 1) * 4096 ))")
        else
          cmds+=(-c "write -P $((RANDOM % 250 + 1)) $(( (RANDOM * 32768 + RANDOM) % (size - 70000) )) $((RANDOM % 65536 + 1))")
        fi
      done
      # a hot block, new bytes every round: dirty in every incremental and
      # overwritten after every point in time before the first data read
      # (--pace), so a reader served post-PIT data always gets it wrong there
      cmds+=(-c "write -P $((n % 250 + 1)) $((MiB + 4096)) 4096")
      # vdb: now and then its last, partial 64 KiB cluster
      [ $d = vdb ] && [ $((RANDOM % 6)) = 0 ] && cmds+=(-c "write -P $((n % 250 + 1)) $((size - 3000)) 3000")
      qemu-io -f raw "${cmds[@]}" "$(disk_uri $d)" >/dev/null || { echo "writer: qemu-io on $d failed" >&2; exit 1; }
    done
    n=$((n + 1)); echo $n > "$T/count.tmp"; mv "$T/count.tmp" "$T/count"
  done
}
start_bg writer
WRITER=$BG_PID

OUT=$T/backup
BEGIN=(--begin-arg=--freeze-hook --begin-arg=ref --begin-arg=--freeze-required
       --begin-arg=--freeze-timeout --begin-arg=120)
# vnb LEVEL REF: one virtnbdbackup backup of both disks; the hook copies the
# disks at its point in time to refREF-DISK.img.  Prints the driver's JSON.
# More driver arguments may follow (default output: $OUT).
vnb() {
  local level=$1 ref=$2; shift 2
  echo "$ref" > "$T/refname"
  $PY "$DRIVER" --cbw "$CBW" -l "$level" -o "$OUT" --disk "vda=$T/vda.img" --disk "vdb=$T/vdb.img" \
    "${BEGIN[@]}" --pace "$T/count:1" -v "$@" > "$T/vnb.json" 2> "$T/vnb-$level-$ref.log" ||
    { tail -n 30 "$T/vnb-$level-$ref.log" >&2; fail "virtnbdbackup $level backup failed"; }
  kill -0 "$WRITER" 2>/dev/null || fail "the guest writer died"
  [ -f "$T/ref$ref-vda.img" ] && [ -f "$T/ref$ref-vdb.img" ] || fail "$level: the freeze hook made no reference copy"
  log "$level: $(cat "$T/vnb.json")"
  grep -h "pace:\|extents to backup\|bytes of data extents\|Maximum Block size" "$T/vnb-$level-$ref.log" |
    sed 's/^[A-Z]* [a-z]* /    /' | sort -u >&2 || true
}
cpt() { jq -r "\"\(.checkpoint) \(.parent)\"" "$T/vnb.json"; }

# Disks declared raw, as virtnbdbackup sees a raw file: it switches to level
# copy (no checkpoint, no incrementals) and writes full-size raw images.
log "section: raw disks: level copy"
vnb full c -o "$T/copy" --format raw
assert_eq "raw disks: level" "copy" "$(jq -r .level "$T/vnb.json")"
assert_eq "raw disks: no cbw checkpoint" "" "$("$CBW" --json checkpoint list | jq -r '.checkpoints[].name')"

log "section: full, inc, diff, inc through virtnbdbackup's reader"
vnb full 0
assert_eq "full: checkpoint, parent" "virtnbdbackup.0 " "$(cpt)"
# vdb's 40 MiB data extent is read in requests of cbwd's maximum (32 MiB)
grep -q "\[vdb\]: Chunked data read from: start 0, length: $((40 * MiB + 12345))" "$T/vnb-full-0.log" ||
  fail "full: vdb was not read in chunks: $(grep -h '\[vdb\].*\(Chunked\|Read data\)' "$T/vnb-full-0.log")"
vnb inc 1
assert_eq "inc: checkpoint, parent" "virtnbdbackup.1 virtnbdbackup.0" "$(cpt)"
vnb diff 2 -z 2                  # compressed (lz4), restored the same way
assert_eq "diff: parent" "virtnbdbackup.1" "$(jq -r .parent "$T/vnb.json")"
vnb inc 3
assert_eq "second inc: checkpoint, parent" "virtnbdbackup.2 virtnbdbackup.1" "$(cpt)"
assert_eq "cbw checkpoints" "virtnbdbackup.0 virtnbdbackup.1 virtnbdbackup.2" \
  "$("$CBW" --json checkpoint list | jq -r '[.checkpoints[].name] | join(" ")')"
assert_eq "virtnbdbackup's checkpoint file" '["virtnbdbackup.0","virtnbdbackup.1","virtnbdbackup.2"]' \
  "$(jq -c . "$OUT/cbwvm.cpt")"
touch "$T/stop"
wait "$WRITER" || fail "the guest writer failed"
log "guest wrote $(cat "$T/count") times"
ls "$OUT" >&2

# ---- what the stream files hold (virtnbdrestore's dump of their headers) ----
$PY /usr/bin/virtnbdrestore -i "$OUT" -o dump -L "$T/dump.log" > "$T/dump.json" ||
  fail "virtnbdrestore dump: $(tail -n 5 "$T/dump.log")"
jq -e 'length == 8' "$T/dump.json" >/dev/null || fail "dump: expected 8 stream files: $(cat "$T/dump.json")"
jq -e 'all(.[]; .diskFormat == "qcow2")' "$T/dump.json" >/dev/null || fail "dump: formats"
jq -e '[.[] | select(.compressed == 2)] | length == 2 and all(.[]; .incremental)' "$T/dump.json" \
  >/dev/null || fail "dump: compression: $(jq -c '[.[] | {diskName, checkpointName, compressed}]' "$T/dump.json")"
jq -e '[.[] | select(.incremental | not)] | length == 2 and
       all(.[]; .checkpointName == "virtnbdbackup.0")' "$T/dump.json" >/dev/null ||
  fail "dump: the full backups: $(cat "$T/dump.json")"
# inc/diff of vda: only its first half is written to; something must be
jq -e --argjson half $((24 * MiB)) '[.[] | select(.incremental and .diskName == "vda")] |
       length == 3 and all(.[]; .dataSize > 0 and .dataSize <= $half)' "$T/dump.json" >/dev/null ||
  fail "dump: vda's incrementals: $(jq -c '[.[] | {diskName, checkpointName, dataSize}]' "$T/dump.json")"

# ---- restores ----
# virtnbdrestore opens libvirt (for the domain XML it parses and the pool it
# refreshes): libvirt's in-process test driver stands in, no libvirtd.
restore() {      # restore DIR ARGS...: virtnbdrestore into $T/DIR
  local dir=$1; shift
  $PY /usr/bin/virtnbdrestore -U test:///default -n -i "$OUT" -o "$T/$dir" -f "$T/restore-$dir.sock" \
    -L "$T/restore-$dir.log" "$@" > "$T/restore-$dir.out" 2>&1 ||
    { tail -n 20 "$T/restore-$dir.log" >&2; fail "virtnbdrestore $*"; }
}
same() {         # same RESTORED REF WHAT
  [ -f "$1" ] || fail "$3: virtnbdrestore made no $1"
  qemu-img compare -q -f qcow2 -F raw "$1" "$2" || fail "$3: $1 differs from the disk at its point in time"
}
log "section: restores"
# raw: virtnbdrestore --raw copies vdX.copy.data as is
OUT=$T/copy restore rc --raw
for d in vda vdb; do
  cmp "$T/rc/$d.img" "$T/refc-$d.img" || fail "raw copy of $d differs from the disk at its point in time"
  cmp -s "$T/refc-$d.img" "$T/ref0-$d.img" && fail "vacuous: $d unchanged between the copy and the full backup"
done
restore r0 --until virtnbdbackup.0
restore r1 --until virtnbdbackup.1
# the diff carries the name of the next checkpoint: --until stops after it
restore r2 --until virtnbdbackup.2
restore r3
for d in vda vdb; do
  same "$T/r0/$d.img" "$T/ref0-$d.img" "full of $d"
  same "$T/r1/$d.img" "$T/ref1-$d.img" "full + inc of $d"
  same "$T/r2/$d.img" "$T/ref2-$d.img" "full + inc + diff of $d"
  same "$T/r3/$d.img" "$T/ref3-$d.img" "full + inc + diff + inc of $d"
  for i in 0 1 2; do
    cmp -s "$T/ref$i-$d.img" "$T/ref$((i + 1))-$d.img" && fail "vacuous: $d unchanged between backups $i and $((i + 1))"
  done
  cmp -s "$T/ref3-$d.img" "$T/$d.img" && fail "vacuous: the guest did not write to $d after the last point in time"
done
log "OK"
