#!/bin/bash
# cbw — client-tests/cbwd/options.sh: cbwd's numeric options and their JSON
# config keys take only what they say ("--max-connections abc" used to mean
# 0 connections, a negative handshake timeout a huge one), every refusal
# names the option and exits 2 (1 for a config file), and every early
# return frees what the options allocated (the sanitizer build turns a leak
# into exit status 66, so the status checks below catch it).
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/lib.sh"
requires nbdinfo
SOCK=$T/cbwd.sock
truncate -s 1M "$T/disk.img"
EXP="name=disk,type=file,path=$T/disk.img"
export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=0:exitcode=66}

# refuse WANT_RC WANT_TEXT ARGS...: cbwd exits WANT_RC and says WANT_TEXT.
refuse() {
  local want=$1 text=$2 rc=0; shift 2
  timeout 20 "$CBWD" --listen "unix:$SOCK" --export "$EXP" "$@" >"$T/out" 2>"$T/err" || rc=$?
  [ "$rc" = "$want" ] || fail "cbwd $* exited $rc, expected $want: $(cat "$T/err")"
  cat "$T/out" "$T/err" | grep -qF -- "$text" || fail "cbwd $*: no [$text] in: $(cat "$T/out" "$T/err")"
  ! grep -qE "AddressSanitizer|LeakSanitizer|runtime error" "$T/err" ||
    fail "cbwd $*: sanitizer report: $(cat "$T/err")"
}

refuse 2 "max-connections abc" --max-connections abc
refuse 2 "max-connections 0" --max-connections 0
refuse 2 "max-connections 12x" --max-connections 12x
refuse 2 "handshake-timeout -1" --handshake-timeout -1
refuse 2 "--threads 0" --threads 0
refuse 2 "--threads 999" --threads 999
refuse 2 "--threads x" --threads x
refuse 2 "idle-timeout 5s" --idle-timeout 5s
# Usage errors after options that allocate (TLS file names): exit 2, no leak.
refuse 2 "usage:" --tls-psk "$T/psk" --tls-certificates "$T/certs" --no-such-option
refuse 2 "usage:" --tls-psk "$T/psk" extra-argument
refuse 2 "max-memory" --tls-psk "$T/psk" --max-memory 1K
# -h and -V after such options: exit 0, no leak.
refuse 0 "usage:" --tls-psk "$T/psk" --help

rc=0; "$CBWD" --tls-psk "$T/psk" --version >"$T/out" 2>"$T/err" || rc=$?
assert_eq "cbwd --version exit" 0 "$rc"
grep -q "^cbwd " "$T/out" || fail "cbwd --version printed: $(cat "$T/out")"

# The config keys: a string or a negative number is refused, naming the file.
for bad in '"max-connections": "abc"' '"max-connections": -5' '"handshake-timeout": -1' \
           '"handshake-timeout": "x"'; do
  echo "{ $bad }" > "$T/cfg.json"
  refuse 1 "$T/cfg.json" --config "$T/cfg.json"
done

# Sane values are taken: cbwd serves with them.
echo '{ "max-connections": 4, "handshake-timeout": 5 }' > "$T/cfg.json"
start_cbwd ok --export "$EXP" --config "$T/cfg.json" --threads 2 --max-connections 3 \
  --handshake-timeout 0
nbdinfo --size "nbd+unix:///disk?socket=$SOCK" > "$T/size"
assert_eq "size through cbwd" 1048576 "$(cat "$T/size")"
stop_cbwd
log "PASS"
