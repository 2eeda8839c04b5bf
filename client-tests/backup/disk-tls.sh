#!/bin/bash
# cbw — client-tests/backup/disk-tls.sh: a disk served on TCP with nbdkit's
# TLS (`cbw disk add --listen --tls ...`), for guests on other hosts.
#
# PSK (vda) and X.509 with client certificates (vdb), keys made here with
# psktool/certtool.  nbdinfo/nbdcopy reach the disks over nbds://; a write
# through TCP goes through the filters: the dirty bitmap of an incremental
# backup marks exactly its granule, and the point-in-time export of a
# backup begun before a second TCP write still returns the old data (the
# cbw filter copied it before the write).  Refused: plain nbd://, a wrong
# key, a client without a certificate; the cbw filter's PIT export is not
# reachable from TCP (the name "pit" gets the live disk).  Policy: a TCP
# listener without tls, credentials without listen, a world-readable PSK
# file.  The options persist across a restart of the daemon (the front is
# adopted) and `disk stop`/`disk start`; `disk remove` stops the front;
# `disk list` shows the key file's path, never the key.
. "$(dirname "$0")/lib.sh"
need_modules
for p in psktool certtool nbdinfo nbdcopy nbdsh jq python3; do requires $p; done

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
# nbdsh runs the python3 first in PATH: the system's has the nbd module.
nbdsh() { PATH=/usr/bin:$PATH command nbdsh "$@"; }
nbdsh -c pass 2>/dev/null || skip "nbdsh: python3 module nbd not installed"
# write_tcp URI OFFSET BYTE: 64 KiB of BYTE at OFFSET through URI.
write_tcp() {
  nbdsh -c "h.set_uri_allow_local_file(True); h.connect_uri('$1')" \
    -c "h.pwrite(bytes([$3]) * 65536, $2); h.flush()" ||
    fail "write through $1"
}
# read_byte URI OFFSET: the first byte at OFFSET.
read_byte() {
  nbdsh -c "h.set_uri_allow_local_file(True); h.connect_uri('$1')" -c "print(h.pread(1, $2)[0])"
}
refused() {                        # refused WHAT CMD...
  local what=$1; shift
  if "$@" > "$T/refused.out" 2>&1; then fail "$what: not refused"; fi
}

G=65536
SIZE=$((8 << 20))
truncate -s $SIZE "$T/a.img" "$T/b.img"

mkdir -p "$T/psk" "$T/wrong" "$T/ca" "$T/srv" "$T/cli" "$T/nocert"
psktool -u alice -p "$T/psk/keys.psk" >/dev/null 2>&1
psktool -u alice -p "$T/wrong/keys.psk" >/dev/null 2>&1
chmod 600 "$T/psk/keys.psk" "$T/wrong/keys.psk"
KEYHEX=$(cut -d: -f2 "$T/psk/keys.psk")
(
  cd "$T/ca" || exit 1
  certtool --generate-privkey > ca-key.pem 2>/dev/null
  printf 'cn = cbw test CA\nca\ncert_signing_key\nexpiration_days = 2\n' > ca.info
  certtool --generate-self-signed --load-privkey ca-key.pem --template ca.info \
    --outfile ca-cert.pem 2>/dev/null
  certtool --generate-privkey > "$T/srv/server-key.pem" 2>/dev/null
  printf 'cn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\nexpiration_days = 2\n' > srv.info
  certtool --generate-certificate --load-ca-certificate ca-cert.pem --load-ca-privkey ca-key.pem \
    --load-privkey "$T/srv/server-key.pem" --template srv.info --outfile "$T/srv/server-cert.pem" 2>/dev/null
  certtool --generate-privkey > "$T/cli/client-key.pem" 2>/dev/null
  printf 'cn = remote-guest\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 2\n' > cli.info
  certtool --generate-certificate --load-ca-certificate ca-cert.pem --load-ca-privkey ca-key.pem \
    --load-privkey "$T/cli/client-key.pem" --template cli.info --outfile "$T/cli/client-cert.pem" 2>/dev/null
  cp ca-cert.pem "$T/srv/"; cp ca-cert.pem "$T/cli/"; cp ca-cert.pem "$T/nocert/"
) || fail "certtool"
chmod 600 "$T/srv/server-key.pem"

start_orchd
P1=$(free_port) P2=$(free_port)

# ---- policy: refused before anything starts ----
expect_rc 1 "$CBW" disk add vdx --file "$T/a.img" --listen "127.0.0.1:$P1"
grep -q 'needs tls' <<<"$ERR" || fail "listen without tls: $ERR"
expect_rc 1 "$CBW" disk add vdx --file "$T/a.img" --listen "127.0.0.1:$P1" --tls require
grep -q 'exactly one of tls-psk and tls-certificates' <<<"$ERR" || fail "require without keys: $ERR"
expect_rc 1 "$CBW" disk add vdx --file "$T/a.img" --tls-psk "$T/psk/keys.psk"
grep -q 'need listen' <<<"$ERR" || fail "credentials without listen: $ERR"
expect_rc 1 "$CBW" disk add vdx --file "$T/a.img" --listen "127.0.0.1:$P1" --tls off \
  --tls-psk "$T/psk/keys.psk"
grep -q 'off with TLS credentials' <<<"$ERR" || fail "off with keys: $ERR"
cp "$T/psk/keys.psk" "$T/open.psk"; chmod 644 "$T/open.psk"
expect_rc 1 "$CBW" disk add vdx --file "$T/a.img" --listen "127.0.0.1:$P1" --tls require \
  --tls-psk "$T/open.psk"
grep -q 'chmod 600' <<<"$ERR" || fail "world-readable PSK file: $ERR"
expect_rc 0 "$CBW" --json disk list
[ "$(jq '.disks | length' "$T/out")" = 0 ] || fail "a refused disk-add left a disk: $(cat "$T/out")"

# ---- PSK ----
expect_rc 0 "$CBW" disk add vda --file "$T/a.img" --listen "127.0.0.1:$P1" --tls require \
  --tls-psk "$T/psk/keys.psk"
U1="nbds://alice@127.0.0.1:$P1/?tls-psk-file=$T/psk/keys.psk"
assert_eq "nbdinfo --size over PSK" "$SIZE" "$(nbdinfo --size "$U1")"
refused "plain nbd://" nbdinfo --size "nbd://127.0.0.1:$P1/"
refused "wrong PSK" nbdinfo --size "nbds://alice@127.0.0.1:$P1/?tls-psk-file=$T/wrong/keys.psk"

# ---- X.509, client certificates verified ----
expect_rc 0 "$CBW" disk add vdb --file "$T/b.img" --listen "127.0.0.1:$P2" --tls require \
  --tls-certificates "$T/srv" --tls-verify-peer
U2="nbds://127.0.0.1:$P2/?tls-certificates=$T/cli"
assert_eq "nbdinfo --size over X.509" "$SIZE" "$(nbdinfo --size "$U2")"
refused "X.509 without a client certificate" nbdinfo --size "nbds://127.0.0.1:$P2/?tls-certificates=$T/nocert"
refused "plain nbd:// to the X.509 listener" nbdinfo --size "nbd://127.0.0.1:$P2/"

# ---- the writes go through the filters ----
expect_rc 0 "$CBW" checkpoint create c1
write_tcp "$U1" $((3 * G)) 7          # granule 3 of vda
write_tcp "$U2" $((5 * G)) 9          # granule 5 of vdb
expect_rc 0 "$CBW" backup begin --incremental c1
for d in vda:3 vdb:5; do
  got=$("$BK" extents "$(bm_ctl "${d%:*}")" "backup-${d%:*}" $SIZE | tr '\n' ' ')
  assert_eq "dirty bitmap of ${d%:*} after one TCP write" "$((${d#*:} * G)) $G " "$got"
done
# A TCP write during the backup: the PIT export (the cbw filter's, local)
# keeps the old data, the live disk has the new.
write_tcp "$U1" $((3 * G)) 8
assert_eq "PIT export after a TCP write" 7 "$(read_byte "$(pit_uri vda)" $((3 * G)))"
assert_eq "live disk after a TCP write" 8 "$(read_byte "$(disk_uri vda)" $((3 * G)))"
# The filter's PIT export is not reachable through the front: "pit" over
# TCP is the live disk.
assert_eq "export 'pit' over TCP" 8 \
  "$(read_byte "nbds://alice@127.0.0.1:$P1/pit?tls-psk-file=$T/psk/keys.psk" $((3 * G)))"
expect_rc 0 "$CBW" backup end
nbdcopy "$U2" "$T/b.copy" || fail "nbdcopy over X.509"
cmp "$T/b.img" "$T/b.copy" || fail "nbdcopy over X.509: not the image"

# ---- shown, never the key ----
expect_rc 0 "$CBW" disk list
grep -q "vda .*(tcp 127.0.0.1:$P1, tls require)" "$T/out" || fail "disk list: $(cat "$T/out")"
expect_rc 0 "$CBW" --json disk list
[ "$(jq -r '.disks[] | select(.name == "vda") | .tcp["tls-psk"]' "$T/out")" = "$T/psk/keys.psk" ] ||
  fail "disk list --json: no tls-psk path: $(cat "$T/out")"
grep -qi "$KEYHEX" "$T/out" "$STATE"/*.json 2>/dev/null && fail "the PSK itself is shown or saved"

# ---- persistence: daemon restart (adopted), disk stop/start ----
front=$(jq -r '.disks[] | select(.name == "vda") | .tcp.pid' "$T/out")
alive_pid "$front" || fail "no front process for vda (pid $front)"
stop_orchd; ORCHD_PID=
start_orchd
expect_rc 0 "$CBW" --json disk list
assert_eq "front pid after a daemon restart" "$front" \
  "$(jq -r '.disks[] | select(.name == "vda") | .tcp.pid' "$T/out")"
assert_eq "PSK listener after a daemon restart" "$SIZE" "$(nbdinfo --size "$U1")"
expect_rc 0 "$CBW" disk stop vda
alive_pid "$front" && fail "disk stop left the front (pid $front) running"
refused "a stopped disk's TCP listener" nbdinfo --size "$U1"
expect_rc 0 "$CBW" disk start vda
assert_eq "PSK listener after disk start" "$SIZE" "$(nbdinfo --size "$U1")"
expect_rc 0 "$CBW" --json disk list
front=$(jq -r '.disks[] | select(.name == "vda") | .tcp.pid' "$T/out")
expect_rc 0 "$CBW" disk remove vda
alive_pid "$front" && fail "disk remove left the front (pid $front) running"
expect_rc 0 "$CBW" disk remove vdb
log PASS
