#!/bin/bash
# cbw — client-tests/cbwd/bounds-connlimit.sh: connection budgets.
# --max-connections is each listener's own budget: TCP clients that fill
# the TCP listener's budget never lock a local (Unix) reader out, and the
# next TCP client is refused.  A listener's ",max-connections=N" overrides
# it; --max-connections-per-peer refuses the N+1th connection from one
# address while another address still gets in.
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/lib.sh"
requires python3
requires nbdinfo
SOCK=$T/cbwd.sock
truncate -s 16M $T/disk.img
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
B="$(dirname "$0")/bounds.py"

PORT=$(free_port)
start_cbwd cbwd --listen "tcp:127.0.0.1:$PORT" --tls=off --max-connections 4 \
  --export "name=disk,type=file,path=$T/disk.img"
python3 "$B" listener "$SOCK" "$PORT" disk 4 || { tail -20 "$CBWD_LOG" >&2; fail "listener budget"; }
grep -q "too many connections on tcp:127.0.0.1:$PORT" "$CBWD_LOG" || fail "no log line for the refused client"
stop_cbwd

# A listener's own budget, and the per-peer budget.
PORT=$(free_port)
start_cbwd cbwd-peer --listen "tcp:127.0.0.1:$PORT,max-connections=3" --tls=off \
  --max-connections-per-peer 2 --export "name=disk,type=file,path=$T/disk.img"
python3 "$B" peer "$PORT" disk 2 || { tail -20 "$CBWD_LOG" >&2; fail "per-peer budget"; }
grep -q "too many connections from 127.0.0.1 (2, --max-connections-per-peer)" "$CBWD_LOG" ||
  fail "no log line for the refused peer"
# Now 127.0.0.1 holds 2 and 127.0.0.2 one: the listener's 3 are taken.
python3 - "$PORT" <<'EOP' || { tail -20 "$CBWD_LOG" >&2; fail "listener max-connections=3"; }
import socket, sys, time
port = int(sys.argv[1])
held = []
for src in ("127.0.0.1", "127.0.0.1", "127.0.0.2"):
    for i in range(100):       # the earlier clients' slots free up as cbwd sees them close
        s = socket.socket(); s.bind((src, 0)); s.settimeout(10); s.connect(("127.0.0.1", port))
        if len(s.recv(18)) == 18: break
        time.sleep(0.05)
    else:
        sys.exit("no greeting from " + src)
    held.append(s)
s = socket.socket(); s.bind(("127.0.0.3", 0)); s.settimeout(10); s.connect(("127.0.0.1", port))
sys.exit(0 if s.recv(18) == b"" else 1)
EOP
nbdinfo --size "$(uri disk)" >/dev/null || fail "Unix reader"
stop_cbwd
# Bad listener options are refused at start.
if "$CBWD" --listen "tcp:127.0.0.1:$PORT,max-connections=0" --tls=off \
     --export "name=d,type=file,path=$T/disk.img" 2>$T/bad.log; then
  fail "max-connections=0 accepted"
fi
grep -q "max-connections= expects" $T/bad.log || fail "no message for max-connections=0"
