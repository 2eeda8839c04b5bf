# cbw — client-tests/cbwd/negative.py: a raw-socket NBD client that attacks
# cbwd with malformed, truncated, oversize and out-of-spec input and checks
# every answer against the NBD spec (constants written out here, not taken
# from cbwd's headers).  After each attack a well-behaved client must still
# be served.  Usage: negative.py SOCKET DATAFILE PID
# Export "ro" (read-only file = DATAFILE, bitmap "bm"), "rw" (store).
import os, random, socket, struct, sys, time

SOCK, DATA, PID = sys.argv[1], sys.argv[2], int(sys.argv[3])
DATA_BYTES = open(DATA, "rb").read()
SIZE = len(DATA_BYTES)

NBDMAGIC, IHAVEOPT, REPMAGIC = 0x4e42444d41474943, 0x49484156454F5054, 0x3e889045565a9
REQ, SIMPLE, STRUCT = 0x25609513, 0x67446698, 0x668e33ef
OPT = dict(EXPORT_NAME=1, ABORT=2, LIST=3, STARTTLS=5, INFO=6, GO=7, SR=8, LISTMC=9, SETMC=10)
ACK, SERVER, INFO, METACTX = 1, 2, 3, 4
ERR_UNSUP, ERR_INVALID, ERR_UNKNOWN, ERR_TOO_BIG = 2**31 + 1, 2**31 + 3, 2**31 + 6, 2**31 + 9
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WZ, BS = range(8)
EPERM, EIO, EINVAL, ENOSPC = 1, 5, 22, 28
checks = 0

def fail(msg):
    print("FAIL:", msg); sys.exit(1)

def check(cond, msg):
    global checks
    checks += 1
    if not cond: fail(msg)

def conn(timeout=10):
    s = socket.socket(socket.AF_UNIX); s.settimeout(timeout); s.connect(SOCK); return s

def recvn(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: raise EOFError("closed after %d of %d bytes" % (len(b), n))
        b += c
    return b

def closed_by_server(s, timeout=10):
    s.settimeout(timeout)
    try:
        while True:
            if not s.recv(65536): return True
    except (ConnectionResetError, BrokenPipeError): return True
    except socket.timeout: return False

def greet(s, flags=3):
    m, o, hf = struct.unpack(">QQH", recvn(s, 18))
    check(m == NBDMAGIC and o == IHAVEOPT and hf & 1, "bad greeting")
    s.sendall(struct.pack(">I", flags))

def opt(s, o, data=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, o, len(data)) + data)

def reply(s):
    m, o, t, l = struct.unpack(">QIII", recvn(s, 20))
    check(m == REPMAGIC, "bad option reply magic")
    return o, t, recvn(s, l)

def replies_until_final(s):
    out = []
    while True:
        r = reply(s); out.append(r)
        if r[1] not in (SERVER, INFO, METACTX): return out

def go_data(name, infos=()):
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)

def meta_data(name, queries):
    n = name.encode()
    d = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
    for q in queries:
        q = q.encode() if isinstance(q, str) else q
        d += struct.pack(">I", len(q)) + q
    return d

def session(export="ro", structured=True, contexts=()):
    s = conn(); greet(s)
    if structured:
        opt(s, OPT["SR"]); check(reply(s)[1] == ACK, "SR not acked")
    ids = {}
    if contexts:
        opt(s, OPT["SETMC"], meta_data(export, contexts))
        for o, t, d in replies_until_final(s):
            if t == METACTX: ids[d[4:].decode()] = struct.unpack(">I", d[:4])[0]
            else: check(t == ACK, "SETMC final not ACK")
    opt(s, OPT["GO"], go_data(export))
    rs = replies_until_final(s)
    check(rs[-1][1] == ACK, "GO failed: %r" % (rs[-1],))
    info = [d for o, t, d in rs if t == INFO and struct.unpack(">H", d[:2])[0] == 0][0]
    size, flags = struct.unpack(">QH", info[2:12])
    return s, size, flags, ids

def req(s, typ, off, length, flags=0, cookie=None, payload=b""):
    cookie = random.getrandbits(64) if cookie is None else cookie
    s.sendall(struct.pack(">IHHQQI", REQ, flags, typ, cookie, off, length) + payload)
    return cookie

def simple_reply(s, readlen=0):
    m, err, cookie = struct.unpack(">IIQ", recvn(s, 16))
    check(m == SIMPLE, "bad simple reply magic %x" % m)
    data = recvn(s, readlen) if err == 0 and readlen else b""
    return cookie, err, data

def struct_reply(s):
    """All chunks of one structured reply: (cookie, error, data-by-offset, extents)."""
    err, chunks, ext = 0, [], {}
    while True:
        m, fl, typ, cookie, ln = struct.unpack(">IHHQI", recvn(s, 20))
        check(m == STRUCT, "bad structured reply magic %x" % m)
        body = recvn(s, ln)
        if typ == 1: chunks.append((struct.unpack(">Q", body[:8])[0], body[8:]))
        elif typ == 2:
            o, l = struct.unpack(">QI", body); chunks.append((o, b"\0" * l))
        elif typ == 5:
            cid = struct.unpack(">I", body[:4])[0]
            ext[cid] = [struct.unpack(">II", body[i:i + 8]) for i in range(4, len(body), 8)]
        elif typ & 0x8000:
            err = struct.unpack(">I", body[:4])[0]
            ml = struct.unpack(">H", body[4:6])[0]
            check(ml == len(body) - 6, "error message length mismatch")
        if fl & 1: return cookie, err, chunks, ext

def good_client_works():
    s, size, flags, ids = session("ro", contexts=["base:allocation"])
    check(size == SIZE, "size")
    off = random.randrange(0, SIZE - 4096)
    c = req(s, READ, off, 4096)
    cookie, err, chunks, _ = struct_reply(s)
    data = b"".join(d for o, d in sorted(chunks))
    check(cookie == c and err == 0 and data == DATA_BYTES[off:off + 4096], "good client read")
    req(s, DISC, 0, 0); s.close()
    check(os.path.exists("/proc/%d" % PID), "cbwd died")

# ---- handshake attacks ----
def t_truncated():
    for cut in range(0, 40, 3):
        s = conn()
        try:
            recvn(s, 18)
            msg = struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, OPT["GO"], 11) + go_data("ro")
            s.sendall(msg[:cut])
        finally:
            s.close()

def t_bad_flags():
    s = conn(); greet(s, flags=0xfffffff0)
    check(closed_by_server(s), "unknown client flags must close"); s.close()

def t_bad_opt_magic():
    s = conn(); greet(s)
    s.sendall(struct.pack(">QII", 0x1234, OPT["GO"], 0))
    check(closed_by_server(s), "bad option magic must close"); s.close()

def t_option_errors():
    s = conn(); greet(s)
    opt(s, 12345); check(reply(s)[1] == ERR_UNSUP, "unknown option -> ERR_UNSUP")
    opt(s, OPT["STARTTLS"]); check(reply(s)[1] == ERR_UNSUP, "STARTTLS without TLS -> ERR_UNSUP")
    opt(s, OPT["LIST"], b"xx"); check(reply(s)[1] == ERR_INVALID, "LIST with data -> ERR_INVALID")
    opt(s, OPT["SR"], b"x"); check(reply(s)[1] == ERR_INVALID, "SR with data -> ERR_INVALID")
    # GO: name length past the option, bad info count, unknown export, NUL in name
    opt(s, OPT["GO"], struct.pack(">I", 1000) + b"ro" + b"\0\0"); check(reply(s)[1] == ERR_INVALID, "GO name overflow")
    opt(s, OPT["GO"], go_data("ro")[:-2] + struct.pack(">H", 5)); check(reply(s)[1] == ERR_INVALID, "GO info count")
    opt(s, OPT["GO"], b"\0\0"); check(reply(s)[1] == ERR_INVALID, "GO too short")
    opt(s, OPT["GO"], go_data("nope")); check(reply(s)[1] == ERR_UNKNOWN, "GO unknown export")
    opt(s, OPT["INFO"], go_data("r\0o")); check(reply(s)[1] in (ERR_INVALID, ERR_UNKNOWN), "NUL in name")
    # meta contexts before structured replies
    opt(s, OPT["SETMC"], meta_data("ro", ["base:allocation"])); check(reply(s)[1] == ERR_INVALID, "SETMC w/o SR")
    opt(s, OPT["SR"]); check(reply(s)[1] == ACK, "SR")
    opt(s, OPT["SR"]); check(reply(s)[1] == ERR_INVALID, "SR twice")
    bad = [
        struct.pack(">I", 2) + b"ro" + struct.pack(">I", 1) + struct.pack(">I", 999) + b"abc",  # query overflow
        struct.pack(">I", 2) + b"ro" + struct.pack(">I", 3) + struct.pack(">I", 1) + b"x",      # count too big
        struct.pack(">I", 2) + b"ro" + struct.pack(">I", 0) + b"trailing",                      # trailing
        struct.pack(">I", 99) + b"ro",                                                          # name overflow
        meta_data("ro", [b"base:\0allocation"]),                                                # NUL
    ]
    for d in bad:
        for o in ("SETMC", "LISTMC"):
            opt(s, OPT[o], d); t = reply(s)[1]
            check(t == ERR_INVALID, "%s malformed %r -> %x" % (o, d[:20], t))
    opt(s, OPT["LISTMC"], meta_data("ro", [b"q" * 5000])); check(reply(s)[1] in (ERR_TOO_BIG, ERR_INVALID), "long query")
    opt(s, OPT["SETMC"], meta_data("nope", ["base:allocation"])); check(reply(s)[1] == ERR_UNKNOWN, "SETMC unknown export")
    # context names: unknown ones are ignored, prefixes list in LIST only
    def names(o, q):
        opt(s, OPT[o], meta_data("ro", q))
        rs = replies_until_final(s); check(rs[-1][1] == ACK, "%s %r not acked" % (o, q))
        return sorted(d[4:].decode() for _, t, d in rs if t == METACTX)
    check(names("LISTMC", []) == ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:bm"], "LIST all")
    check(names("LISTMC", ["qemu:dirty-bitmap:"]) == ["qemu:dirty-bitmap:bm"], "LIST qemu:dirty-bitmap: prefix")
    check(names("LISTMC", ["qemu:"]) == ["qemu:allocation-depth", "qemu:dirty-bitmap:bm"], "LIST qemu:")
    check(names("LISTMC", ["nosuch:ctx", "qemu:dirty-bitmap:zz", "base:"]) == ["base:allocation"], "LIST mixed")
    check(names("SETMC", ["qemu:dirty-bitmap:"]) == [], "SET with a bare prefix selects nothing")
    check(names("SETMC", ["foo", "qemu:dirty-bitmap:bm", "qemu:dirty-bitmap:bm"]) == ["qemu:dirty-bitmap:bm"], "SET dedup")
    # oversize option: ERR_TOO_BIG after the data is discarded, then still in sync
    big = 200000
    s.sendall(struct.pack(">QII", IHAVEOPT, OPT["LISTMC"], big) + b"\xaa" * big)
    check(reply(s)[1] == ERR_TOO_BIG, "oversize option -> ERR_TOO_BIG")
    opt(s, OPT["LIST"]); rs = replies_until_final(s)
    check(rs[-1][1] == ACK and sum(t == SERVER for _, t, _ in rs) == 2, "LIST after oversize option")
    opt(s, OPT["ABORT"]); check(reply(s)[1] == ACK, "ABORT acked")
    check(closed_by_server(s), "ABORT closes"); s.close()

def t_export_name_unknown():
    s = conn(); greet(s)
    opt(s, OPT["EXPORT_NAME"], b"nope")
    check(closed_by_server(s), "EXPORT_NAME unknown must close"); s.close()
    s = conn(); greet(s, flags=1)   # no NO_ZEROES: 124 zero bytes follow
    opt(s, OPT["EXPORT_NAME"], b"ro")
    size, flags = struct.unpack(">QH", recvn(s, 10)); zeros = recvn(s, 124)
    check(size == SIZE and flags & 2 and zeros == b"\0" * 124, "EXPORT_NAME reply")
    c = req(s, READ, 0, 512); cookie, err, data = simple_reply(s, 512)
    check(err == 0 and data == DATA_BYTES[:512], "simple read after EXPORT_NAME")
    s.close()

def t_huge_option_then_drop():
    s = conn(); greet(s)
    s.sendall(struct.pack(">QII", IHAVEOPT, OPT["GO"], 0xffffffff) + b"x" * 100000)
    s.close()
    s = conn(); greet(s)
    s.sendall(struct.pack(">QII", IHAVEOPT, OPT["EXPORT_NAME"], 0xffffffff))
    check(closed_by_server(s), "huge EXPORT_NAME closes"); s.close()

# ---- transmission attacks ----
def t_requests():
    s, size, flags, ids = session("ro", contexts=["base:allocation", "qemu:dirty-bitmap:bm"])
    check(flags & 2, "ro export must be read-only")
    def expect_err(typ, off, ln, fl=0, payload=b"", want=EINVAL, what=""):
        c = req(s, typ, off, ln, fl, payload=payload)
        cookie, err, _, _ = struct_reply(s)
        check(cookie == c and err == want, "%s: expected errno %d, got %d" % (what, want, err))
    expect_err(READ, SIZE - 100, 4096, what="read past end")
    expect_err(READ, 2**64 - 512, 1024, what="read offset overflow")
    expect_err(READ, 0, 64 * 1024 * 1024, what="read over max block size")
    expect_err(WRITE, 0, 4096, payload=os.urandom(4096), want=EPERM, what="write to read-only")
    expect_err(TRIM, 0, 4096, want=EPERM, what="trim on read-only")
    expect_err(WZ, 0, 4096, want=EPERM, what="write zeroes on read-only")
    expect_err(99, 0, 4096, what="unknown command")
    expect_err(READ, 0, 4096, fl=0x80, what="unknown flag")
    expect_err(READ, 0, 4096, fl=8, what="REQ_ONE on read")
    expect_err(READ, 0, 4096, fl=2, what="NO_HOLE on read")
    expect_err(BS, 0, 0, what="zero-length block status")
    expect_err(BS, SIZE, 4096, what="block status past end")
    # Still in sync: a good read on the same connection.
    c = req(s, READ, 12345, 5000)
    cookie, err, chunks, _ = struct_reply(s)
    check(err == 0 and b"".join(d for o, d in sorted(chunks)) == DATA_BYTES[12345:17345], "read after errors")
    # DF: one data chunk
    c = req(s, READ, 0, 65536, flags=4)
    cookie, err, chunks, _ = struct_reply(s)
    check(err == 0 and len(chunks) == 1 and chunks[0][1] == DATA_BYTES[:65536], "DF read")
    # Block status: both contexts answered, extents cover the request, REQ_ONE gives one.
    c = req(s, BS, 0, SIZE)
    cookie, err, _, ext = struct_reply(s)
    check(err == 0 and sorted(ext) == sorted(ids.values()), "block status contexts")
    for cid, e in ext.items():
        check(sum(l for l, f in e) <= SIZE and all(l > 0 for l, f in e), "extent lengths")
    c = req(s, BS, 4096, 1 << 20, flags=8)
    cookie, err, _, ext = struct_reply(s)
    check(err == 0 and all(len(e) == 1 and e[0][0] <= 1 << 20 for e in ext.values()), "REQ_ONE")
    # Many requests in flight; all answered once, with the right data.
    want = {}
    for i in range(200):
        off = random.randrange(0, SIZE - 65536); ln = random.randint(1, 65536)
        want[req(s, READ, off, ln)] = DATA_BYTES[off:off + ln]
    for _ in range(200):
        cookie, err, chunks, _ = struct_reply(s)
        check(cookie in want and err == 0, "unexpected reply cookie/error")
        data = want.pop(cookie)
        base = min(o for o, d in chunks)
        check(b"".join(d for o, d in sorted(chunks)) == data, "pipelined read data")
    check(not want, "missing replies")
    # Bad magic closes.
    s.sendall(struct.pack(">IHHQQI", 0xdeadbeef, 0, READ, 1, 0, 512))
    check(closed_by_server(s), "bad request magic must close"); s.close()

def t_simple_mode():
    s, size, flags, ids = session("ro", structured=False)
    c = req(s, BS, 0, 4096); cookie, err, _ = simple_reply(s)
    check(err == EINVAL, "block status without contexts -> EINVAL")
    c = req(s, READ, 0, 4096, flags=4); cookie, err, _ = simple_reply(s)
    check(err == EINVAL, "DF without structured replies -> EINVAL")
    c = req(s, READ, SIZE, 1); cookie, err, _ = simple_reply(s)
    check(err == EINVAL, "simple read past end")
    c = req(s, READ, 100, 1000); cookie, err, data = simple_reply(s, 1000)
    check(err == 0 and data == DATA_BYTES[100:1100], "simple read")
    req(s, DISC, 0, 0); check(closed_by_server(s), "DISC closes"); s.close()

def t_writable():
    s, size, flags, ids = session("rw")
    check(not flags & 2, "rw export writable")
    big = 33 * 1024 * 1024
    c = req(s, WRITE, 0, big, payload=b"\x01" * big)
    cookie, err, _, _ = struct_reply(s)
    check(err == EINVAL, "oversize write -> EINVAL, got %d" % err)
    c = req(s, WRITE, size - 10, 20, payload=b"z" * 20)
    cookie, err, _, _ = struct_reply(s)
    check(err == ENOSPC, "write past end -> ENOSPC, got %d" % err)
    c = req(s, WZ, 0, 4096, flags=16 | 2)   # FAST_ZERO + NO_HOLE: may fail ENOTSUP, must answer
    cookie, err, _, _ = struct_reply(s)
    check(err in (0, 95), "fast zero answered")
    c = req(s, WRITE, 4096, 4, payload=b"abcd"); cookie, err, _, _ = struct_reply(s)
    check(err == 0, "write")
    c = req(s, FLUSH, 0, 0); cookie, err, _, _ = struct_reply(s); check(err == 0, "flush")
    c = req(s, READ, 4096, 4); cookie, err, chunks, _ = struct_reply(s)
    check(b"".join(d for o, d in sorted(chunks)) == b"abcd", "read back")
    # Write header with half its payload, then drop.
    s.sendall(struct.pack(">IHHQQI", REQ, 0, WRITE, 7, 0, 1 << 20) + b"x" * 1000)
    s.close()

def t_abrupt():
    for i in range(20):
        s, size, flags, ids = session("ro")
        for j in range(50):
            req(s, READ, random.randrange(0, SIZE - 65536), 65536)
        if i % 2: s.sendall(struct.pack(">IHH", REQ, 0, READ))   # half a header
        s.close()

def t_many_connections():
    n, batch = 1000, 200
    for b in range(n // batch):
        socks = []
        for i in range(batch):
            s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(SOCK); socks.append(s)
        for i, s in enumerate(socks):
            if i % 3 == 0:
                try: s.sendall(struct.pack(">I", 3))
                except OSError: pass
            s.close()

def t_handshake_timeout():
    # cbwd runs with --handshake-timeout 3: a client idling in the handshake is dropped
    s = conn(); recvn(s, 18)
    t0 = time.time()
    check(closed_by_server(s, timeout=15), "idle handshake not dropped")
    check(2.0 < time.time() - t0 < 12, "dropped after %.1fs, expected ~3s" % (time.time() - t0))
    s.close()

tests = [t_handshake_timeout, t_truncated, t_bad_flags, t_bad_opt_magic, t_option_errors, t_export_name_unknown,
         t_huge_option_then_drop, t_requests, t_simple_mode, t_writable, t_abrupt,
         t_many_connections]
random.seed(int(os.environ.get("CBW_SEED", "1")))
for t in tests:
    t0 = time.time()
    t()
    good_client_works()
    print("%-28s ok (%.2fs)" % (t.__name__, time.time() - t0), flush=True)
print("negative: %d checks passed" % checks)
