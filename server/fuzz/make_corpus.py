# cbw — server/fuzz/make_corpus.py: writes the seed corpus for fuzz_nbd
# (valid handshakes and request streams; the fuzzer mutates from there).
# Each seed starts with fuzz_nbd's control byte: fragment size (low 6 bits)
# and TLS mode (top 2 bits: 0 off, 1 on, 2 require, 3 require).
import os, struct, sys
out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "corpus")
os.makedirs(out, exist_ok=True)
IHAVEOPT = 0x49484156454F5054
def opt(o, d=b""): return struct.pack(">QII", IHAVEOPT, o, len(d)) + d
def go(name, infos=()): n = name.encode(); return struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)
def meta(name, qs):
    n = name.encode(); d = struct.pack(">I", len(n)) + n + struct.pack(">I", len(qs))
    for q in qs: d += struct.pack(">I", len(q)) + q.encode()
    return d
def req(t, off, ln, fl=0, cookie=1, payload=b""): return struct.pack(">IHHQQI", 0x25609513, fl, t, cookie, off, ln) + payload
flags = struct.pack(">I", 3)
seeds = {
  "list": flags + opt(3) + opt(2),
  "info": flags + opt(6, go("disk", (0, 1, 2, 3))) + opt(2),
  "meta": flags + opt(8) + opt(9, meta("disk", ["qemu:dirty-bitmap:", "base:"])) + opt(10, meta("disk", ["base:allocation", "qemu:dirty-bitmap:bm", "qemu:allocation-depth"])),
  "go-read": flags + opt(8) + opt(7, go("disk")) + req(0, 0, 4096) + req(0, 1 << 19, 65536, 4) + req(2, 0, 0),
  "go-write": flags + opt(8) + opt(7, go("disk")) + req(1, 4096, 512, 1, 2, b"\xab" * 512) + req(3, 0, 0) + req(6, 0, 8192, 2) + req(4, 0, 4096) + req(5, 0, 4096),
  "bs": flags + opt(8) + opt(10, meta("disk", ["base:allocation", "qemu:dirty-bitmap:bm", "qemu:allocation-depth"])) + opt(7, go("disk")) + req(7, 0, 1 << 20) + req(7, 4095, 70000, 8),
  "export-name": struct.pack(">I", 1) + opt(1, b"ro") + req(0, 0, 512) + req(1, 0, 4, 0, 3, b"abcd"),
  "ro-errors": flags + opt(7, go("ro")) + req(1, 0, 8, 0, 1, b"x" * 8) + req(0, 99999, 10) + req(9, 0, 0) + req(0, 0, 1, 0x40),
}
GO_READ = opt(8) + opt(7, go("disk")) + req(0, 0, 4096) + req(7, 0, 1 << 20)
tls_seeds = {
  # require: options before STARTTLS are refused, then TLS (stood in by
  # "x"), then a normal session; a second STARTTLS is invalid
  "tls-require": (0x80 | 7, flags + opt(3) + opt(7, go("disk")) + opt(5) + b"x" + opt(5) + opt(3) + GO_READ),
  # on: negotiation before STARTTLS must be forgotten after it
  "tls-on-forget": (0x40 | 12, flags + opt(8) + opt(10, meta("disk", ["base:allocation"])) + opt(5) + b"x" + opt(7, go("disk")) + req(7, 0, 65536)),
  "tls-starttls-data": (0x80 | 3, flags + opt(5, b"junk") + opt(5) + b"x" + GO_READ),
  "tls-export-name": (0x80 | 63, struct.pack(">I", 1) + opt(1, b"disk")),
  # garbage and a truncated ClientHello after STARTTLS go to GnuTLS
  "tls-garbage": (0xc0 | 30, flags + opt(5) + b"\x16\x03\x01\x00\x40" + bytes(range(64)) + b"\xff" * 40),
  "tls-hello-short": (0x80 | 5, flags + opt(5) + b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 32),
}
for k, v in seeds.items():
    open(os.path.join(out, k), "wb").write(bytes([63]) + v)
for k, (ctl, v) in tls_seeds.items():
    open(os.path.join(out, k), "wb").write(bytes([ctl]) + v)
