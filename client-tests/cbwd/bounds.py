#!/usr/bin/env python3
# cbw — client-tests/cbwd/bounds.py: raw NBD clients that push on cbwd's
# resource bounds (bounds-*.sh): many clients that send big READs and never
# read the replies, idle clients, connections up to and past the per-listener
# and per-peer limits.  Only Unix sockets and 127.0.0.0/8.
#
#   bounds.py memory SOCK EXPORT HOGS READERS NREQ SIZE HOLD  (hogs stay HOLD s)
#   bounds.py idle SOCK EXPORT TIMEOUT
#   bounds.py listener SOCK PORT EXPORT N      (N TCP clients fill the budget)
#   bounds.py peer PORT EXPORT N               (N per 127.0.0.1, then 127.0.0.2)
import socket, struct, subprocess, sys, threading, time

NBDMAGIC, IHAVEOPT = 0x4e42444d41474943, 0x49484156454F5054
REQ_MAGIC, SIMPLE_MAGIC = 0x25609513, 0x67446698


def fail(msg):
    print("bounds.py: FAIL: " + msg, file=sys.stderr, flush=True)
    sys.exit(1)


def log(msg):
    print("bounds.py: " + msg, file=sys.stderr, flush=True)


def recvn(s, n):
    b = bytearray(n)
    v = memoryview(b)
    got = 0
    while got < n:
        k = s.recv_into(v[got:], n - got)
        if k == 0:
            raise EOFError("closed after %d of %d bytes" % (got, n))
        got += k
    return b


def connect(where, timeout=30, source=None):
    if isinstance(where, str):
        s = socket.socket(socket.AF_UNIX)
    else:
        s = socket.socket(socket.AF_INET)
        if source:
            s.bind((source, 0))
    s.settimeout(timeout)
    s.connect(where)
    return s


def handshake(s, export):
    """Fixed newstyle, NBD_OPT_EXPORT_NAME: simple replies only."""
    m, o, hf = struct.unpack(">QQH", recvn(s, 18))
    if m != NBDMAGIC or o != IHAVEOPT:
        fail("bad greeting")
    s.sendall(struct.pack(">I", 3))          # FIXED_NEWSTYLE | NO_ZEROES
    name = export.encode()
    s.sendall(struct.pack(">QII", IHAVEOPT, 1, len(name)) + name)
    size, flags = struct.unpack(">QH", recvn(s, 10))
    return size


def refused(where, source=None):
    """True if the server closes the connection before its greeting."""
    try:
        s = connect(where, source=source)
        s.settimeout(10)
        b = s.recv(18)
        s.close()
        return len(b) == 0
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        fail("neither greeting nor close within 10 s")


def send_reads(s, nreq, size, first_cookie=1):
    reqs = b"".join(struct.pack(">IHHQQI", REQ_MAGIC, 0, 0, first_cookie + i,
                                (i * size) % (1 << 30), size) for i in range(nreq))
    s.sendall(reqs)


def read_replies(s, nreq, size):
    buf = bytearray(size)
    seen = set()
    for _ in range(nreq):
        m, err, cookie = struct.unpack(">IIQ", recvn(s, 16))
        if m != SIMPLE_MAGIC or err != 0:
            raise RuntimeError("reply magic %x error %d" % (m, err))
        got, v = 0, memoryview(buf)
        while got < size:
            k = s.recv_into(v[got:], size - got)
            if k == 0:
                raise EOFError("closed in a reply")
            got += k
        seen.add(cookie)
    if len(seen) != nreq:
        raise RuntimeError("cookies %s" % sorted(seen))


def memory(sock, export, hogs, readers, nreq, size, hold):
    # Hogs first: they send their READs and never read a reply.
    hs = []
    for _ in range(hogs):
        s = connect(sock)
        handshake(s, export)
        send_reads(s, nreq, size)
        hs.append(s)
    t_hogs = time.monotonic()
    log("%d clients sent %d x %d-byte READs each and read nothing" % (hogs, nreq, size))
    errors, done = [], []

    def reader():
        try:
            s = connect(sock, timeout=120)
            handshake(s, export)
            send_reads(s, nreq, size)
            read_replies(s, nreq, size)
            s.close()
            done.append(time.monotonic())
        except Exception as e:  # reported below
            errors.append(repr(e))

    t0 = time.monotonic()
    ts = [threading.Thread(target=reader) for _ in range(readers)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(150)
    if errors or len(done) != readers:
        fail("readers: %d of %d done, errors %s" % (len(done), readers, errors))
    log("%d readers got all their replies after %.1f s" % (readers, max(done) - t0))
    # The hogs stay (reading nothing) long enough to be seen stalled.
    time.sleep(max(0, hold - (time.monotonic() - t_hogs)))
    for s in hs:
        s.close()
    print("ok")


def idle(sock, export, timeout):
    quiet = connect(sock)
    handshake(quiet, export)
    busy = connect(sock)
    handshake(busy, export)
    t0 = time.monotonic()
    # The busy client reads 4 KiB every 0.25 s for 2.5 timeouts.
    cookie = 1
    closed_at = None
    quiet.setblocking(False)
    while time.monotonic() - t0 < 2.5 * timeout:
        send_reads(busy, 1, 4096, cookie)
        read_replies(busy, 1, 4096)
        cookie += 1
        if closed_at is None:
            try:
                if quiet.recv(1) == b"":
                    closed_at = time.monotonic() - t0
            except BlockingIOError:
                pass
        time.sleep(0.25)
    if closed_at is None:
        quiet.settimeout(30)
        try:
            if quiet.recv(1) != b"":
                fail("idle client got data")
        except socket.timeout:
            fail("idle client still open %.0f s after the handshake" % (time.monotonic() - t0))
        closed_at = time.monotonic() - t0
    if closed_at < timeout * 0.9:
        fail("idle client closed after %.1f s, before the %d s timeout" % (closed_at, timeout))
    log("idle client closed after %.1f s; the busy one was served for %.1f s" %
        (closed_at, time.monotonic() - t0))
    send_reads(busy, 1, 4096, cookie)
    read_replies(busy, 1, 4096)
    busy.close()
    print("ok")


def nbdinfo_unix(sock, export):
    r = subprocess.run(["nbdinfo", "--size", "nbd+unix:///%s?socket=%s" % (export, sock)],
                       capture_output=True, text=True, timeout=60)
    return r.returncode == 0


def listener(sock, port, export, n):
    held = []
    for i in range(n):
        s = connect(("127.0.0.1", port))
        handshake(s, export)
        held.append(s)
    log("%d TCP clients hold the TCP listener's budget" % n)
    if not refused(("127.0.0.1", port)):
        fail("TCP client %d was not refused" % (n + 1))
    log("TCP client %d refused" % (n + 1))
    if not nbdinfo_unix(sock, export):
        fail("a Unix client was locked out while TCP clients hold their budget")
    # A raw Unix client too, while nbdinfo is gone again.
    s = connect(sock)
    handshake(s, export)
    send_reads(s, 1, 4096)
    read_replies(s, 1, 4096)
    s.close()
    log("Unix clients still served")
    for s in held:
        s.close()
    print("ok")


def peer(port, export, n):
    held = []
    for i in range(n):
        s = connect(("127.0.0.1", port), source="127.0.0.1")
        handshake(s, export)
        held.append(s)
    if not refused(("127.0.0.1", port), source="127.0.0.1"):
        fail("connection %d from 127.0.0.1 was not refused" % (n + 1))
    log("connection %d from 127.0.0.1 refused" % (n + 1))
    s = connect(("127.0.0.1", port), source="127.0.0.2")
    handshake(s, export)
    send_reads(s, 1, 4096)
    read_replies(s, 1, 4096)
    log("a connection from 127.0.0.2 is served")
    held.append(s)
    # A slot freed by a closing client is usable again.
    held.pop(0).close()
    for _ in range(100):
        time.sleep(0.05)
        try:
            s = connect(("127.0.0.1", port), source="127.0.0.1")
            handshake(s, export)
            held.append(s)
            break
        except EOFError:
            continue
    else:
        fail("no connection from 127.0.0.1 after one closed")
    for s in held:
        s.close()
    print("ok")


def main():
    a = sys.argv[1:]
    if a[0] == "memory":
        memory(a[1], a[2], int(a[3]), int(a[4]), int(a[5]), int(a[6]), float(a[7]))
    elif a[0] == "idle":
        idle(a[1], a[2], int(a[3]))
    elif a[0] == "listener":
        listener(a[1], int(a[2]), a[3], int(a[4]))
    elif a[0] == "peer":
        peer(int(a[1]), a[2], int(a[3]))
    else:
        fail("unknown mode " + a[0])


main()
