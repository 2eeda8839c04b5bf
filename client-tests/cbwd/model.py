# cbw — client-tests/cbwd/model.py: an independent model of what cbwd must
# report, used by the shell tests.  Subcommands:
#   gen SEED SIZE GRAN DIR   write random dirty ranges as an extents file,
#                            the same bitmap as a raw bit array (granule
#                            rounded), and a data file with random 64 KiB
#                            writes (sparse); and the expected extents
#                            ("start length flags", merged) of each view as
#                            DIR/want.extents, want.raw, want.alloc
# (Python starts slowly on the CI machine, so this is one call; the shell
# side converts client output with jq + merge_runs.)
import json, os, random, sys

def merge(runs):
    out = []
    for s, l, f in runs:
        if l == 0:
            continue
        if out and out[-1][2] == f and out[-1][0] + out[-1][1] == s:
            out[-1][1] += l
        else:
            out.append([s, l, f])
    return out

def runs_from_set(size, dirty):   # dirty: sorted disjoint [s,e)
    runs, o = [], 0
    for s, e in dirty:
        runs.append((o, s - o, 0)); runs.append((s, e - s, 1)); o = e
    runs.append((o, size - o, 0))
    return merge(runs)

def union(ranges):
    out = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out

def gen(seed, size, gran, d):
    rnd = random.Random(seed)
    ranges = []
    for _ in range(rnd.randint(20, 60)):
        s = rnd.randrange(0, size - 1)
        l = rnd.randint(1, 3 * gran)
        l = min(l, size - s)
        ranges.append((s, l))
    with open(os.path.join(d, "dirty.txt"), "w") as f:
        f.write("# offset length\n")
        for s, l in ranges:
            f.write("%d %d\n" % (s, l))
    nbits = (size + gran - 1) // gran
    bits = bytearray((nbits + 7) // 8)
    for s, l in ranges:
        for g in range(s // gran, (s + l - 1) // gran + 1):
            bits[g // 8] |= 1 << (g % 8)
    with open(os.path.join(d, "dirty.bits"), "wb") as f:
        f.write(bits)
    blocks = sorted(rnd.sample(range(size // 65536), min(40, size // 65536)))
    with open(os.path.join(d, "data.img"), "wb") as f:
        f.truncate(size)
        for b in blocks:
            f.seek(b * 65536); f.write(rnd.randbytes(65536))
    json.dump({"size": size, "gran": gran, "ranges": ranges, "blocks": blocks},
              open(os.path.join(d, "model.json"), "w"))
    for kind in ("extents", "raw", "alloc"):
        with open(os.path.join(d, "want." + kind), "w") as f:
            for s, l, fl in expect(kind, d):
                f.write("%d %d %d\n" % (s, l, fl))

def expect(kind, d):
    m = json.load(open(os.path.join(d, "model.json")))
    size, gran = m["size"], m["gran"]
    if kind == "extents":
        runs = runs_from_set(size, union([(s, s + l) for s, l in m["ranges"]]))
    elif kind == "raw":
        rs = []
        for s, l in m["ranges"]:
            rs.append((s // gran * gran, min(size, ((s + l - 1) // gran + 1) * gran)))
        runs = runs_from_set(size, union(rs))
    elif kind == "alloc":   # data blocks flag 0, holes 3 (hole|zero)
        data = union([(b * 65536, b * 65536 + 65536) for b in m["blocks"]])
        runs = [[s, l, 0 if f else 3] for s, l, f in runs_from_set(size, data)]
    return runs

cmd = sys.argv[1]
if cmd == "gen": gen(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
