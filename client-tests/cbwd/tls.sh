#!/bin/bash
# cbw — client-tests/cbwd/tls.sh: TLS on cbwd's TCP listeners, driven by
# real clients.  Keys and certificates are made here with psktool/certtool.
#  1. a TCP listener without a TLS choice, or TLS without credentials,
#     refuses to start, with a message saying what to give; --tls=off
#     serves plain NBD and warns at start and in `cbw status`;
#  2. PSK (config file keys): nbdinfo/nbdcopy over nbds:// read a file and
#     a PIT export byte for byte (PIT replies are encrypted by worker
#     threads, many in flight), qemu-img convert with tls-creds-psk too, nbdcopy
#     writes a store export over TLS; a wrong key,
#     an unknown user, a missing key and plain nbd:// are refused and read
#     nothing; the Unix listener stays plain;
#  3. raw socket: an option before STARTTLS gets NBD_REP_ERR_TLS_REQD,
#     STARTTLS then silence is dropped by --handshake-timeout, STARTTLS
#     then garbage fails the handshake (logged) and closes before that
#     timeout, STARTTLS with data is invalid; cbwd serves on;
#  4. X.509 with --tls-verify-peer: a client certificate signed by the CA
#     reads (nbdcopy, qemu-img with tls-creds-x509), and its DN is logged;
#     no client certificate, or one from another CA, is refused;
#  5. X.509 without --tls-verify-peer: a client with just the CA reads.
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/lib.sh"
for p in psktool certtool nbdinfo nbdcopy qemu-img python3 jq; do requires $p; done
SOCK=$T/cbwd.sock
head -c $((8 * 1024 * 1024 + 4096)) /dev/urandom > $T/disk.img
SIZE=$(stat -c %s $T/disk.img)

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# expect_refused WHAT CMD...: CMD must fail.
expect_refused() {
  local what=$1; shift
  if "$@" > $T/refused.out 2>&1; then
    cat $T/refused.out >&2; fail "$what: was not refused"
  fi
  log "refused as expected: $what: $(tail -1 $T/refused.out)"
}

# ---- 1. start-up refusals ----
PORT=$(free_port)
# (a cbwd that wrongly starts is stopped by timeout: status 124)
rc=0
timeout 10 "$CBWD" --listen "tcp:127.0.0.1:$PORT" --export "name=disk,type=file,path=$T/disk.img" \
  > $T/start1.log 2>&1 || rc=$?
[ "$rc" != 0 ] && [ "$rc" != 124 ] || fail "cbwd started a TCP listener without --tls"
grep -q "refusing to serve NBD on a TCP listener without TLS.*--tls=off" $T/start1.log ||
  { cat $T/start1.log >&2; fail "no clear message for a TCP listener without TLS"; }
rc=0
timeout 10 "$CBWD" --listen "tcp:127.0.0.1:$PORT" --tls=require --export "name=disk,type=file,path=$T/disk.img" \
  > $T/start2.log 2>&1 || rc=$?
[ "$rc" != 0 ] && [ "$rc" != 124 ] && grep -q "TLS needs --tls-psk FILE or --tls-certificates DIR" $T/start2.log ||
  { cat $T/start2.log >&2; fail "--tls=require without credentials"; }
# --tls=off: serves, and says so at start and in `cbw status`.
"$CBWD" --listen "tcp:127.0.0.1:$PORT" --tls=off --export "name=disk,type=file,path=$T/disk.img" \
  --state-dir $T/state --control $T/ctl.sock > $T/start3.log 2>&1 & PLAIN=$!
_CBW_PIDS+=("$PLAIN")
for i in $(seq 200); do [ -S $T/ctl.sock ] && break; sleep 0.05; done
grep -q "WARNING: plain NBD on TCP (--tls=off)" $T/start3.log ||
  { cat $T/start3.log >&2; fail "--tls=off on TCP did not warn"; }
nbdinfo --size "nbd://127.0.0.1:$PORT/disk" >/dev/null || fail "--tls=off: plain TCP client"
"$CBW_BUILD/server/cli/cbw" -c $T/ctl.sock --json status > $T/status.json
jq -e '.warnings | map(test("plain NBD on TCP")) | any' $T/status.json >/dev/null ||
  { cat $T/status.json >&2; fail "cbw status does not warn about plain TCP"; }
kill $PLAIN; wait $PLAIN || true
log "start-up: refusals and the --tls=off warning ok"

# ---- 2. PSK, configured through the config file ----
mkdir -p $T/psk $T/wrong $T/qpsk
psktool -u alice -p $T/psk/keys.psk >/dev/null 2>&1
psktool -u alice -p $T/wrong/keys.psk >/dev/null 2>&1   # same user, another key
psktool -u bob -p $T/wrong/bob.psk >/dev/null 2>&1
cp $T/psk/keys.psk $T/qpsk/keys.psk                     # qemu wants DIR/keys.psk
# a point-in-time export whose upstream is an nbdkit on the same image:
# its reads run on cbwd's worker threads, which encrypt their own replies
start_nbdkit $T/up.sock -r file $T/disk.img
PORT=$(free_port)
cat > $T/cbwd.json <<EOF
{ "listen": ["tcp:127.0.0.1:$PORT"], "tls": "require", "tls-psk": "psk/keys.psk",
  "exports": [ { "name": "disk", "type": "file", "path": "$T/disk.img" },
               { "name": "store", "type": "store", "path": "$T/store.img", "size": "$SIZE",
                 "allow": ["psk:alice"] },
               { "name": "pit", "type": "pit", "upstream": "nbd+unix:///?socket=$T/up.sock",
                 "connections": 4 } ] }
EOF
start_cbwd cbwd-psk --config $T/cbwd.json --handshake-timeout 4 -v
U="nbds://alice@127.0.0.1:$PORT/disk?tls-psk-file=$T/psk/keys.psk"
assert_eq "nbdinfo --size over TLS-PSK" "$SIZE" "$(nbdinfo --size "$U")"
nbdinfo "$U" | grep -q "with TLS" || fail "nbdinfo does not report TLS"
nbdcopy "$U" $T/copy.img
cmp $T/disk.img $T/copy.img || fail "nbdcopy over TLS-PSK: data differs"
grep -q "client identity psk:alice" "$CBWD_LOG" || fail "PSK identity not logged"
qemu-img convert -O raw \
  --object "tls-creds-psk,id=tls0,endpoint=client,dir=$T/qpsk,username=alice" \
  --image-opts "driver=nbd,host=127.0.0.1,port=$PORT,export=disk,tls-creds=tls0" $T/qemu.img
cmp $T/disk.img $T/qemu.img || fail "qemu-img convert over TLS-PSK: data differs"
rm -f $T/pit.img
nbdcopy --connections=4 --requests=32 --request-size=65536 \
  "nbds://alice@127.0.0.1:$PORT/pit?tls-psk-file=$T/psk/keys.psk" $T/pit.img
cmp $T/disk.img $T/pit.img || fail "nbdcopy of the PIT export over TLS-PSK: data differs"
# Writes over TLS (payloads decrypted straight into request buffers),
# read back through the plain Unix listener.
nbdcopy $T/disk.img "nbds://alice@127.0.0.1:$PORT/store?tls-psk-file=$T/psk/keys.psk"
nbdcopy "$(uri store)" $T/store-back.img
cmp $T/disk.img $T/store-back.img || fail "nbdcopy writes over TLS-PSK: data differs"
log "PSK: nbdinfo, nbdcopy and qemu-img read the export, nbdcopy writes the store"

rm -f $T/bad.img
expect_refused "wrong key" nbdcopy "nbds://alice@127.0.0.1:$PORT/disk?tls-psk-file=$T/wrong/keys.psk" $T/bad.img
expect_refused "unknown user" nbdinfo "nbds://bob@127.0.0.1:$PORT/disk?tls-psk-file=$T/wrong/bob.psk"
expect_refused "no key" nbdcopy "nbds://alice@127.0.0.1:$PORT/disk" $T/bad.img
expect_refused "plain nbd://" nbdcopy "nbd://127.0.0.1:$PORT/disk" $T/bad.img
expect_refused "plain nbd:// list" nbdinfo --list "nbd://127.0.0.1:$PORT"
expect_refused "qemu-img without TLS" qemu-img convert -O raw \
  --image-opts "driver=nbd,host=127.0.0.1,port=$PORT,export=disk" $T/bad.img
[ ! -s $T/bad.img ] || fail "a refused client wrote $(stat -c %s $T/bad.img) bytes"
# The Unix listener is plain (its file mode protects it).
assert_eq "plain Unix listener" "$SIZE" "$(nbdinfo --size "$(uri disk)")"

# ---- 3. raw socket: STARTTLS then silence / garbage ----
python3 - "$PORT" <<'PYEOF' || fail "raw STARTTLS checks"
import socket, struct, sys, time
port = int(sys.argv[1])
def start():
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    g = s.recv(18, socket.MSG_WAITALL); assert g[:8] == b"NBDMAGIC", g
    s.sendall(struct.pack(">I", 3))
    return s
def opt(s, o, d=b""): s.sendall(struct.pack(">QII", 0x49484156454F5054, o, len(d)) + d)
def reply(s):
    h = s.recv(20, socket.MSG_WAITALL); magic, o, t, l = struct.unpack(">QIII", h)
    return o, t, s.recv(l, socket.MSG_WAITALL) if l else b""
def closed_within(s, secs):
    s.settimeout(secs)
    t0 = time.monotonic()
    try:
        while s.recv(4096): pass
    except ConnectionResetError:
        pass
    return time.monotonic() - t0
ERR_TLS_REQD = 0x80000005
# option before STARTTLS: TLS required
s = start(); opt(s, 3); o, t, _ = reply(s); assert t == ERR_TLS_REQD, hex(t)
# STARTTLS, then nothing: --handshake-timeout 4 drops it
opt(s, 5); o, t, _ = reply(s); assert (o, t) == (5, 1), (o, t)
d = closed_within(s, 20); assert 3.0 < d < 15, "silent TLS client kept %.1fs" % d
# STARTTLS, then garbage (fixed bytes: a random prefix could look like a
# record header announcing more bytes, which TLS then rightly waits for):
# the handshake fails, the connection closes at once
s = start(); opt(s, 5); o, t, _ = reply(s); assert t == 1
s.sendall(b"NBD is not TLS\r\n" * 200)
d = closed_within(s, 20); assert d < 3, "garbage after STARTTLS kept %.1fs" % d
# STARTTLS with data is invalid, and the connection goes on
s = start(); opt(s, 5, b"x"); o, t, _ = reply(s); assert t == 0x80000003, hex(t)
opt(s, 2); o, t, _ = reply(s); assert t == ERR_TLS_REQD or t == 1
print("raw STARTTLS checks ok")
PYEOF
grep -q "TLS handshake: " "$CBWD_LOG" || fail "the failed handshake was not logged"
nbdcopy "$U" $T/copy2.img && cmp $T/disk.img $T/copy2.img || fail "cbwd after the raw checks"
stop_cbwd

# ---- 4. X.509 with client certificates verified ----
mkdir -p $T/ca $T/srv $T/cli $T/nocert $T/other
cd $T/ca
certtool --generate-privkey > ca-key.pem 2>/dev/null
printf 'cn = cbw test CA\nca\ncert_signing_key\nexpiration_days = 2\n' > ca.info
certtool --generate-self-signed --load-privkey ca-key.pem --template ca.info --outfile ca-cert.pem 2>/dev/null
certtool --generate-privkey > $T/srv/server-key.pem 2>/dev/null
printf 'organization = cbw test\ncn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\nexpiration_days = 2\n' > srv.info
certtool --generate-certificate --load-ca-certificate ca-cert.pem --load-ca-privkey ca-key.pem \
  --load-privkey $T/srv/server-key.pem --template srv.info --outfile $T/srv/server-cert.pem 2>/dev/null
certtool --generate-privkey > $T/cli/client-key.pem 2>/dev/null
printf 'country = GB\norganization = cbw test\ncn = backup-host\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 2\n' > cli.info
certtool --generate-certificate --load-ca-certificate ca-cert.pem --load-ca-privkey ca-key.pem \
  --load-privkey $T/cli/client-key.pem --template cli.info --outfile $T/cli/client-cert.pem 2>/dev/null
cp ca-cert.pem $T/srv/; cp ca-cert.pem $T/cli/; cp ca-cert.pem $T/nocert/; cp ca-cert.pem $T/other/
# a client certificate from another CA
certtool --generate-privkey > other-ca-key.pem 2>/dev/null
certtool --generate-self-signed --load-privkey other-ca-key.pem --template ca.info --outfile other-ca.pem 2>/dev/null
certtool --generate-privkey > $T/other/client-key.pem 2>/dev/null
certtool --generate-certificate --load-ca-certificate other-ca.pem --load-ca-privkey other-ca-key.pem \
  --load-privkey $T/other/client-key.pem --template cli.info --outfile $T/other/client-cert.pem 2>/dev/null
cd - >/dev/null

PORT=$(free_port)
start_cbwd cbwd-x509 --listen "tcp:127.0.0.1:$PORT" --tls=require \
  --tls-certificates $T/srv --tls-verify-peer --export "name=disk,type=file,path=$T/disk.img"
X="nbds://127.0.0.1:$PORT/disk?tls-certificates=$T/cli"
assert_eq "nbdinfo --size over X.509" "$SIZE" "$(nbdinfo --size "$X")"
rm -f $T/copy.img
nbdcopy "$X" $T/copy.img
cmp $T/disk.img $T/copy.img || fail "nbdcopy over X.509: data differs"
grep -q "client identity x509:.*CN=backup-host" "$CBWD_LOG" || fail "certificate DN not logged"
rm -f $T/qemu.img
qemu-img convert -O raw \
  --object "tls-creds-x509,id=tls0,endpoint=client,dir=$T/cli" \
  --image-opts "driver=nbd,host=127.0.0.1,port=$PORT,export=disk,tls-creds=tls0" $T/qemu.img
cmp $T/disk.img $T/qemu.img || fail "qemu-img convert over X.509: data differs"
rm -f $T/bad.img
expect_refused "no client certificate" nbdcopy "nbds://127.0.0.1:$PORT/disk?tls-certificates=$T/nocert" $T/bad.img
expect_refused "client certificate of another CA" nbdcopy "nbds://127.0.0.1:$PORT/disk?tls-certificates=$T/other" $T/bad.img
expect_refused "plain nbd:// (X.509)" nbdcopy "nbd://127.0.0.1:$PORT/disk" $T/bad.img
[ ! -s $T/bad.img ] || fail "a refused client wrote $(stat -c %s $T/bad.img) bytes"
log "X.509: verified clients read, others refused"
stop_cbwd

# ---- 5. X.509 without --tls-verify-peer: no client certificate needed ----
PORT=$(free_port)
start_cbwd cbwd-x509-anon --listen "tcp:127.0.0.1:$PORT" --tls=require \
  --tls-certificates $T/srv --export "name=disk,type=file,path=$T/disk.img"
assert_eq "X.509 client without certificate" "$SIZE" \
  "$(nbdinfo --size "nbds://127.0.0.1:$PORT/disk?tls-certificates=$T/nocert")"
grep -q "client identity (none" "$CBWD_LOG" || fail "anonymous X.509 client not logged as such"
expect_refused "plain nbd:// (X.509, no verify)" nbdinfo --size "nbd://127.0.0.1:$PORT/disk"
stop_cbwd
