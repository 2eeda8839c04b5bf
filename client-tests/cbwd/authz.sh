#!/bin/bash
# cbw — client-tests/cbwd/authz.sh: which TLS identity may open which export
# (allow=), driven by nbdinfo / nbdcopy over nbds:// with two PSK users.
#  - alice may open x (allow psk:alice) but not y (allow psk:bob): LIST shows
#    her only what she may open, and y is answered exactly like an export
#    that does not exist (the name does not leak);
#  - exports without allow= (file, PIT) are open to every authenticated
#    client; a store without allow= is never reachable over TCP, a store
#    with allow=psk:bob only by bob (alice cannot read or write it);
#  - a PIT export is read-only: a write is refused;
#  - the Unix listener (file permissions protect it) serves everything;
#  - plain TCP (--tls=off): a store needs allow=* (any client) to be served;
#  - allow= with something that is not an identity refuses to start.
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/lib.sh"
for p in psktool nbdinfo nbdcopy python3 jq; do requires $p; done
SOCK=$T/cbwd.sock
SIZE=$((1024 * 1024))
for f in x y; do head -c $SIZE /dev/urandom > $T/$f.img; done
head -c $SIZE /dev/urandom > $T/data.img

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
# refused WHAT CMD...: CMD must fail.
refused() {
  local what=$1; shift
  if "$@" > $T/refused.out 2>&1; then
    cat $T/refused.out >&2; fail "$what: was not refused"
  fi
  log "refused as expected: $what: $(tail -1 $T/refused.out)"
}

log "section: an allow= entry that is not an identity refuses to start"
for bad in "alice" "psk:" "x509:" "tcp:alice"; do
  rc=0
  timeout 10 "$CBWD" --listen "unix:$T/bad.sock" \
    --export "name=x,type=file,path=$T/x.img,allow=$bad" > $T/bad.log 2>&1 || rc=$?
  [ "$rc" != 0 ] && [ "$rc" != 124 ] || fail "cbwd started with allow=$bad (rc $rc)"
  grep -q "is not an identity" $T/bad.log || fail "allow=$bad: $(cat $T/bad.log)"
done

mkdir -p $T/psk
psktool -u alice -p $T/psk/keys.psk >/dev/null 2>&1
psktool -u bob -p $T/psk/keys.psk >/dev/null 2>&1
start_nbdkit $T/up.sock -r file $T/x.img
PORT=$(free_port)
cat > $T/cbwd.json <<JSON
{ "listen": ["tcp:127.0.0.1:$PORT"], "tls": "require", "tls-psk": "psk/keys.psk",
  "exports": [
    { "name": "x", "type": "file", "path": "$T/x.img", "allow": ["psk:alice"] },
    { "name": "y", "type": "file", "path": "$T/y.img", "allow": ["psk:bob"] },
    { "name": "open", "type": "file", "path": "$T/y.img" },
    { "name": "st", "type": "store", "path": "$T/st.img", "size": $SIZE },
    { "name": "stbob", "type": "store", "path": "$T/stbob.img", "size": $SIZE,
      "allow": ["psk:bob"] },
    { "name": "pit", "type": "pit", "upstream": "nbd+unix:///?socket=$T/up.sock" } ] }
JSON
start_cbwd cbwd-authz --config $T/cbwd.json -v
# u USER EXPORT: the nbds:// URI of EXPORT as USER
u() { echo "nbds://$1@127.0.0.1:$PORT/$2?tls-psk-file=$T/psk/keys.psk"; }
# names USER: the exports LIST shows USER, sorted, on one line
names() { nbdinfo --list --json "$(u $1 '')" | jq -r '[.exports[]."export-name"] | sort | join(" ")'; }

log "section: identities and exports"
assert_eq "alice's LIST" "open pit x" "$(names alice)"
assert_eq "bob's LIST" "open pit stbob y" "$(names bob)"
nbdcopy "$(u alice x)" $T/copy.img
cmp $T/x.img $T/copy.img || fail "alice reading x: data differs"
nbdcopy "$(u alice open)" $T/copy2.img
cmp $T/y.img $T/copy2.img || fail "alice reading open: data differs"
rm -f $T/bad.img
refused "alice opens y" nbdcopy "$(u alice y)" $T/bad.img
refused "alice: nbdinfo y" nbdinfo "$(u alice y)"
[ ! -s $T/bad.img ] || fail "a refused client read $(stat -c %s $T/bad.img) bytes"
# y is answered exactly like an export that does not exist
nbdinfo "$(u alice y)" > $T/y.err 2>&1 || true
nbdinfo "$(u alice q)" > $T/q.err 2>&1 || true
grep -q "export" $T/q.err || fail "no error for a missing export: $(cat $T/q.err)"
assert_eq "refusal of y vs a missing export" "$(sed "s/'q'/'NAME'/g; s/export: q$/export: NAME/" $T/q.err)" \
  "$(sed "s/'y'/'NAME'/g; s/export: y$/export: NAME/" $T/y.err)"
grep -q "no export named 'y'" "$CBWD_LOG" || fail "the refusal is not logged"

log "section: stores"
refused "alice writes st (no allow=: not on TCP)" nbdcopy $T/data.img "$(u alice st)"
refused "bob writes st (no allow=: not on TCP)" nbdcopy $T/data.img "$(u bob st)"
refused "alice writes stbob" nbdcopy $T/data.img "$(u alice stbob)"
refused "alice reads stbob" nbdinfo "$(u alice stbob)"
nbdcopy $T/data.img "$(u bob stbob)"
nbdcopy "$(uri stbob)" $T/back.img
cmp $T/data.img $T/back.img || fail "bob's write to stbob: data differs"
nbdcopy "$(uri st)" $T/st-back.img
cmp -n $SIZE $T/st-back.img <(head -c $SIZE /dev/zero) || fail "a refused client wrote into st"

log "section: the PIT export is read-only"
nbdinfo --json "$(u alice pit)" | jq -e '.exports[0].is_read_only == true' >/dev/null ||
  fail "PIT export not advertised read-only: $(nbdinfo "$(u alice pit)")"
refused "alice writes the PIT export" nbdcopy $T/data.img "$(u alice pit)"
nbdcopy "$(u alice pit)" $T/pit.img
cmp $T/x.img $T/pit.img || fail "the PIT export changed"

log "section: the Unix listener serves every export"
assert_eq "LIST on the Unix listener" "open pit st stbob x y" \
  "$(nbdinfo --list --json "$(uri '')" | jq -r '[.exports[]."export-name"] | sort | join(" ")')"
stop_cbwd

log "section: plain TCP: a store needs allow=*"
PORT=$(free_port)
start_cbwd cbwd-plain --listen "tcp:127.0.0.1:$PORT" --tls=off \
  --export "name=st,type=store,path=$T/p1.img,size=$SIZE" \
  --export "name=anyone,type=store,path=$T/p2.img,size=$SIZE,allow=*" \
  --export "name=named,type=store,path=$T/p3.img,size=$SIZE,allow=psk:alice;psk:bob"
assert_eq "plain TCP LIST" "anyone" \
  "$(nbdinfo --list --json "nbd://127.0.0.1:$PORT/" | jq -r '[.exports[]."export-name"] | sort | join(" ")')"
refused "plain TCP writes st" nbdcopy $T/data.img "nbd://127.0.0.1:$PORT/st"
refused "plain TCP writes named (no identity)" nbdcopy $T/data.img "nbd://127.0.0.1:$PORT/named"
nbdcopy $T/data.img "nbd://127.0.0.1:$PORT/anyone"
cmp $T/data.img $T/p2.img || fail "allow=* store over plain TCP: data differs"
stop_cbwd
log "authorization ok"
