#!/bin/bash
# cbw — bench/chain/run.sh: nbdkit-chain-plugin (raw path) vs nbdkit's own
# file plugin, same run, same data, plain command lines (no filters):
#   seqread     whole-disk nbdcopy to null: (READ_RUNS runs after a warm-up)
#   randwrite4k fio nbd engine, 4 KiB random writes, QD16, FIO_RUNTIME s (FIO_RUNS runs)
#   seqwrite1m_pass  one sequential 1 MiB pass over the whole disk (FIO_RUNS runs)
# on tmpfs (/dev/shm) and on ext4 (/var/tmp), with the shared harness
# ../shared/bench/anchors/lib.sh.  Servers alternate (file, chain, file,
# chain ...) for ROUNDS rounds so drift hits both.  Prints chain/file ratios
# (min/median/max) and writes bench/chain/results.md.
#   usage: bench/chain/run.sh            knobs: READ_RUNS FIO_RUNS FIO_RUNTIME
#          DISK_SIZE (2G) ROUNDS (1) FS_LIST ("/dev/shm /var/tmp") CBW_BUILD
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "$HERE/../.." && pwd)
ANCHORS=${ANCHORS:-$SRC/../shared/bench/anchors}
CBW_BUILD=${CBW_BUILD:-$SRC/build}
PLUGIN=${PLUGIN:-$CBW_BUILD/modules/nbdkit-chain-plugin.so}
export READ_RUNS=${READ_RUNS:-3} FIO_RUNS=${FIO_RUNS:-2} FIO_RUNTIME=${FIO_RUNTIME:-5}
export DISK_SIZE=${DISK_SIZE:-2G}
ROUNDS=${ROUNDS:-1}
FS_LIST=${FS_LIST:-/dev/shm /var/tmp}
OUT=${OUT:-$HERE/results.md}

# One filesystem: a child process, so lib.sh's traps and globals stay local.
if [ "${1:-}" = --one-fs ]; then
  fsdir=$2
  export WORK=$fsdir/cbw-chain-bench RES=$3
  . "$ANCHORS/lib.sh"
  ensure_disk
  one_case() {  # CASE SERVER-ARGS...
    local c=$1; shift
    CASE=$c; warm_cache
    local S=$SOCKDIR/$c.sock; rm -f "$S"
    srv nbdkit -f -U "$S" "$@"; local P=$!; register_pid $P
    local U="nbd+unix:///?socket=$S"; wait_nbd "$U"; record_flags "$c" "$U"
    bench_read "$c" seqread "$U"
    local i files=()
    for i in $(seq "$FIO_RUNS"); do
      sync; fio_once "$U" randwrite4k "$RES/$c.randwrite4k.$i.json" timed
      files+=("$RES/$c.randwrite4k.$i.json")
    done
    record_fio "$c" randwrite4k randwrite4k "${files[@]}"
    files=()
    for i in $(seq "$FIO_RUNS"); do
      sync; fio_once "$U" seqwrite1m "$RES/$c.seqwrite1m_pass.$i.json" pass
      files+=("$RES/$c.seqwrite1m_pass.$i.json")
    done
    record_fio "$c" seqwrite1m_pass seqwrite1m "${files[@]}"
    record_mem "$c" $P; stop_pid $P
  }
  fs=$(df -T "$fsdir" | awk 'NR==2{print $2}')
  # The order inside a round alternates too (the second server of a round
  # ran after the first one's writes: on tmpfs that alone cost the second
  # one up to half its 1M sequential pass in a fixed-order run).
  for r in $(seq "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then
      one_case "file@$fs.r$r" file "$DISK"
      one_case "chain@$fs.r$r" "$PLUGIN" file="$DISK"
    else
      one_case "chain@$fs.r$r" "$PLUGIN" file="$DISK"
      one_case "file@$fs.r$r" file "$DISK"
    fi
  done
  rm -f "$DISK"                       # 2 GiB per filesystem; do not leave it behind
  exit 0
fi

[ -f "$PLUGIN" ] || { echo "build the plugin first: $PLUGIN (set CBW_BUILD)" >&2; exit 1; }
RES=$(mktemp -d /tmp/cbw-chain-bench-res.XXXXXX)
for d in $FS_LIST; do
  [ -d "$d" ] || continue
  "$0" --one-fs "$d" "$RES"
done

/usr/bin/python3 - "$RES/results.tsv" "$OUT" <<'PYEOF'
import sys, collections, statistics, datetime, subprocess
tsv, out = sys.argv[1], sys.argv[2]
rows = collections.defaultdict(list)   # (fs, metric, server) -> [(min, med, max, unit)]
byround = {}                           # (fs, metric, server, round) -> median
for line in open(tsv):
    case, metric, unit, mn, md, mx, n, note = (line.rstrip("\n").split("\t") + [""])[:8]
    server, rest = case.split("@"); fs = rest.split(".")[0]
    rnd = rest.split(".r")[-1] if ".r" in rest else "1"
    rows[(fs, metric, server)].append((float(mn), float(md), float(mx), unit))
    byround[(fs, metric, server, rnd)] = float(md)
higher_better = {"MiB/s": True, "IOPS": True, "us": False}
lines = []
hdr = "| fs | metric | unit | file (min/med/max) | chain (min/med/max) | chain/file min | median | max | bar ≥0.97 |"
lines += [hdr, "|" + "---|" * 9]
worst = None
for (fs, metric, server) in sorted(rows):
    if server != "file": continue
    f = rows[(fs, metric, "file")]; c = rows.get((fs, metric, "chain"))
    if not c: continue
    unit = f[0][3]
    # each side: min/median/max over rounds of that round's median
    fv = [x[1] for x in f]; cv = [x[1] for x in c]
    fmn, fmd, fmx = min(fv), statistics.median(fv), max(fv)
    cmn, cmd, cmx = min(cv), statistics.median(cv), max(cv)
    if unit == "MiB" : continue            # peak RSS: shown below
    hb = higher_better.get(unit, True)
    def ratio(a, b):
        if b == 0: return float("nan")
        return a / b if hb else b / a      # >1 = chain better, for latencies too
    # ratios per round (file and chain ran back to back in each round)
    rs = [ratio(byround[(fs, metric, "chain", r)], byround[(fs, metric, "file", r)])
          for (f2, m2, s2, r) in sorted(byround) if (f2, m2, s2) == (fs, metric, "file")
          and (fs, metric, "chain", r) in byround]
    rmin, rmed, rmax = min(rs), statistics.median(rs), max(rs)
    ok = "yes" if rmed >= 0.97 else "**no**"
    if worst is None or rmed < worst[0]: worst = (rmed, fs, metric)
    lines.append(f"| {fs} | {metric} | {unit} | {fmn:g} / {fmd:g} / {fmx:g} | {cmn:g} / {cmd:g} / {cmx:g} | {rmin:.3f} | {rmed:.3f} | {rmax:.3f} | {ok} |")
mem = [f"{fs}: file {rows[(fs,m,'file')][0][1]:g} MiB, chain {rows[(fs,m,'chain')][0][1]:g} MiB"
       for (fs, m, s) in sorted(rows) if m == "server_peak_rss" and s == "file" and (fs, m, "chain") in rows]
import os
knobs = " ".join(f"{k}={os.environ.get(k,'')}" for k in ("READ_RUNS","FIO_RUNS","FIO_RUNTIME","DISK_SIZE"))
load = open("/proc/loadavg").read().split()[:3]
text = f"""# chain plugin (raw path) vs nbdkit file plugin

Generated by `bench/chain/run.sh` on {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC; {knobs};
load average at the end {' '.join(load)} on a 2-vCPU machine **shared with other engineers'
builds and tests**, so absolute numbers and single ratios are noisy: only ratios measured in
the same run mean anything.  Ratios are chain/file (for latencies file/chain), so > 1 means
the chain plugin did better.  Each side shows min/median/max over rounds of the round's median;
the ratio columns are min/median/max of the per-round ratios (file and chain back to back).

""" + "\n".join(lines) + f"""

Peak RSS: {'; '.join(mem)}.

Worst median ratio: {worst[0]:.3f} ({worst[1]} {worst[2]}).
Command lines: `nbdkit -f -U SOCK file DISK` and `nbdkit -f -U SOCK nbdkit-chain-plugin.so
file=DISK`; data: a {os.environ.get('DISK_SIZE')} random, fully allocated image per filesystem;
harness: `../shared/bench/anchors/lib.sh` (nbdcopy + hyperfine, fio nbd engine QD16).
"""
open(out, "w").write(text)
print(text)
PYEOF
echo "raw results: $RES"
