#!/bin/bash
# cbw — client-tests/cbwd/bounds-idle.sh: --idle-timeout.  A client that
# completed the handshake and then sends nothing is closed after the
# timeout (with a log line); a client that keeps sending requests is
# served the whole time; a client that never reads its replies is dropped
# too; a config file's "idle-timeout" works like the option.
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/lib.sh"
requires python3
SOCK=$T/cbwd.sock
truncate -s 256M $T/disk.img
start_cbwd cbwd --idle-timeout 2 --export "name=disk,type=file,path=$T/disk.img"
python3 "$(dirname "$0")/bounds.py" idle "$SOCK" disk 2 ||
  { tail -20 "$CBWD_LOG" >&2; fail "idle timeout"; }
grep -q "idle for [0-9]* s after the handshake (--idle-timeout): closing" "$CBWD_LOG" ||
  { tail -20 "$CBWD_LOG" >&2; fail "no log line for the idle client"; }
n=$(grep -c "idle for" "$CBWD_LOG")
assert_eq "connections closed as idle" 1 "$n"
# Replies nobody reads: the client is dropped, its memory released.
python3 "$(dirname "$0")/bounds.py" memory "$SOCK" disk 1 1 8 $((32 * 1024 * 1024)) 6 ||
  { tail -20 "$CBWD_LOG" >&2; fail "non-reading client"; }
grep -q "read no reply for" "$CBWD_LOG" || { tail -20 "$CBWD_LOG" >&2; fail "non-reading client not dropped"; }
stop_cbwd

# The JSON config key; 0 = never.
cat > $T/cfg.json <<EOC
{ "idle-timeout": 0, "max-memory": "64M", "max-connections-per-peer": 2,
  "exports": [ { "name": "disk", "type": "file", "path": "$T/disk.img" } ] }
EOC
start_cbwd cbwd-cfg --config $T/cfg.json
python3 - "$SOCK" <<'EOP' || fail "idle-timeout 0 closed a client"
import socket, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(3)
s.recv(18); s.sendall(b"\0\0\0\3" + b"IHAVEOPT" + b"\0\0\0\1\0\0\0\4disk"); time.sleep(0.2)
s.recv(10)
try:
    s.recv(1); sys.exit(1)   # closed or data: wrong
except socket.timeout:
    pass
EOP
stop_cbwd
# Bad values are refused at start.
for bad in "--idle-timeout -1" "--idle-timeout x" "--max-memory 1M" "--max-connections-per-peer 1z"; do
  if "$CBWD" --listen unix:$T/x.sock $bad --export "name=d,type=file,path=$T/disk.img" 2>$T/bad.log; then
    fail "cbwd accepted $bad"
  fi
  log "refused: $bad: $(tail -1 $T/bad.log)"
done
