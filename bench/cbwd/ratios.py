#!/usr/bin/python3
# cbw — bench/cbwd/ratios.py RES: cbwd vs peer ratios (medians) from one run's
# results.tsv, against the performance bar of the cbwd issue.
import csv, os, sys
res = sys.argv[1]
v = {}
for r in csv.reader(open(os.path.join(res, "results.tsv")), delimiter="\t"):
    try: v[(r[0], r[1])] = float(r[4])
    except ValueError: pass
rows = [
    ("PIT nbdcopy seq read, 4 conns", ("G-cbwd-pit", "snap_seqread"), ("D-fleece-first", "snap_seqread"), "higher", 1.0),
    ("PIT nbdcopy seq read, 1 conn", ("G-cbwd-pit", "snap_seqread_1conn"), ("D-fleece-first", "snap_seqread_1conn"), "higher", 1.0),
    ("bitmap map query (ms, whole nbdinfo)", ("H-cbwd-bitmap", "dirty_map_query_ms"), ("E-qsd-bitmap", "dirty_map_query_ms"), "lower", 1.0),
    ("store 4k randwrite QD16 IOPS", ("F-cbwd-store", "randwrite4k_iops"), ("A-nbdkit-file", "randwrite4k_iops"), "higher", 0.9),
    ("store 1M seq write MiB/s", ("F-cbwd-store", "seqwrite1m"), ("A-nbdkit-file", "seqwrite1m"), "higher", 0.9),
    ("store seq read 4 conns", ("F-cbwd-store", "seqread"), ("A-nbdkit-file", "seqread"), "higher", None),
    ("peak RSS of the fleecing stack (MiB)", ("G-cbwd-pit", "server_peak_rss"), ("D-fleece-first", "server_peak_rss"), "lower", 1.0),
]
print("| metric | cbwd | peer | ratio | bar | verdict |\n|---|---|---|---|---|---|")
for name, a, b, better, bar in rows:
    x, y = v.get(a), v.get(b)
    if x is None or y is None or y == 0:
        print("| %s | %s | %s | n/a | | missing |" % (name, x, y)); continue
    ratio = x / y
    if bar is None: verdict = "info"
    elif better == "higher": verdict = "ok" if ratio >= bar else "BELOW"
    else: verdict = "ok" if ratio <= bar else "ABOVE"
    print("| %s | %g | %g (%s) | %.2f | %s%s | %s |" % (name, x, y, b[0], ratio,
          ">=" if better == "higher" else "<=", bar if bar else "-", verdict))
