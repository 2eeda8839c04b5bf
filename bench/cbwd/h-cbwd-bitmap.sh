#!/bin/bash
# h-cbwd-bitmap.sh - cbwd file export of disk.img with a frozen dirty bitmap made like
# case E's: 10000 random 4k writes (seed 42) at 64 KiB granularity, given as a raw
# bit array; nbdinfo --map=qemu:dirty-bitmap:bm1 timed as a whole process.
. "$(dirname "$0")/cases.sh"
CASE=${CASE_NAME:-H-cbwd-bitmap}
ensure_disk
BITS=$WORK/cbwd-bm1.bits
"$PY" - "$BITS" "$(stat -c %s "$DISK")" <<'PYEOF'
import random, sys
path, size = sys.argv[1], int(sys.argv[2])
g = 65536; n = (size + g - 1) // g; b = bytearray((n + 7) // 8); r = random.Random(42)
for _ in range(10000):
    o = r.randrange(size // 4096) * 4096; k = o // g; b[k // 8] |= 1 << (k % 8)
open(path, "wb").write(b)
PYEOF
S=$SOCKDIR/h.sock
srv "$CBWD" --listen "unix:$S" --export "name=frag,type=file,path=$DISK,bitmap=bm1:raw:$BITS:65536"; P=$!; register_pid $P
UF="nbd+unix:///frag?socket=$S"; MF=qemu:dirty-bitmap:bm1; wait_nbd "$UF"
ext=$(nbdinfo --map=$MF "$UF" | awk '$3==1' | wc -l)
j="$RES/$CASE.mapquery.hyperfine.json"
hyperfine -N --style none --warmup 1 --runs "$READ_RUNS" --export-json "$j" "nbdinfo --map=$MF $UF" >/dev/null 2>&1
record "$CASE" dirty_map_query_ms ms $(jq -r '.results[0].times[]' "$j" | stats | awk '{printf "%.1f %.1f %.1f %d",$1*1000,$2*1000,$3*1000,$4}') "nbdinfo --map (whole process) of a bitmap with $ext dirty extents (10000 random 4k writes)"
record_mem "$CASE" $P; stop_pid $P; rm -f "$BITS"
log done
