#!/bin/bash
# cbw — client-tests/chain/errors.sh: bad configurations are refused at
# start-up with an error naming the problem, and never damage anything.
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/chain-lib.sh"
requires setpriv

P=$CHAIN_PLUGIN
expect_start_failure "must supply the file=" "$P"
expect_start_failure "no such file"          "$P" file="$T/missing.img"
mkdir "$T/dir"
expect_start_failure "is a directory"        "$P" file="$T/dir"
expect_start_failure "not a regular file or a block device" "$P" file=/dev/null
expect_start_failure "unknown parameter 'bogus'" "$P" file=/dev/null bogus=1
truncate -s 1M "$T/ok.img"
expect_start_failure "boolean|could not|readonly" "$P" file="$T/ok.img" readonly=maybe
expect_start_failure "direct|boolean|could not" "$P" file="$T/ok.img" direct=perhaps

# control socket problems
long=$T/$(printf 'x%.0s' $(seq 120)).sock
expect_start_failure "path too long" "$P" file="$T/ok.img" control="$long"
echo precious > "$T/notasocket"
if [ "$CTL_OK" = 1 ]; then   # these fail in after_fork, see chain-lib.sh
  expect_start_failure "no such file|No such file" "$P" file="$T/ok.img" control="$T/nodir/c.sock"
  expect_start_failure "not a socket" "$P" file="$T/ok.img" control="$T/notasocket"
fi
assert_eq "non-socket file kept" precious "$(cat "$T/notasocket")"
if [ "$CTL_OK" = 1 ]; then
  # a live control socket is not stolen; a stale one is replaced
  start_chain a file="$T/ok.img" control="$T/ctl.sock"
  truncate -s 1M "$T/ok2.img"       # ok.img itself is locked by the first server
  expect_start_failure "already in use" "$P" file="$T/ok2.img" control="$T/ctl.sock"
  # the image a server holds is not served twice (QEMU's image locks)
  expect_start_failure "ok.img: locked by another process \(QEMU/qemu-nbd\?\): failed to get \"write\" lock" \
    "$P" file="$T/ok.img"
  expect_start_failure "failed to get shared \"write\" lock" "$P" file="$T/ok.img" readonly=true
  ctl "$T/ctl.sock" '{"execute":"status"}' | jq -e '.return.size == 1048576' >/dev/null \
    || fail "first server's control socket broken by the second"
  kill9 "$NBDKIT_PID"                                # leaves a stale socket file
  [ -S "$T/ctl.sock" ] || fail "expected a stale socket after kill -9"
  start_chain b file="$T/ok.img" control="$T/ctl.sock"
  ctl "$T/ctl.sock" '{"execute":"status"}' | jq -e '.return.size == 1048576' >/dev/null \
    || fail "stale control socket not replaced"
  stop_nbdkit "$NBDKIT_PID"
  [ ! -e "$T/ctl.sock" ] || fail "control socket left behind after a clean exit"

fi

# permissions: run nbdkit as an unprivileged user (root ignores modes)
nobody=65534
chmod 0755 "$T"
head -c 1M /dev/urandom > "$T/root.img"
chmod 0644 "$T/root.img"
sum=$(sha256sum < "$T/root.img")
as_nobody=(setpriv --reuid=$nobody --regid=$nobody --clear-groups)
if "${as_nobody[@]}" test -r "$P" 2>/dev/null && "${as_nobody[@]}" test -r "$T/root.img"; then
  NBDKIT=("${as_nobody[@]}" "${NBDKIT[@]}")
  expect_start_failure "cannot open for writing: Permission denied \(use readonly=true" \
    "$P" file="$T/root.img"
  chmod 0600 "$T/root.img"
  expect_start_failure "Permission denied" "$P" file="$T/root.img" readonly=true
  chmod 0644 "$T/root.img"
  mkdir -m 0777 "$T/nb"
  start_chain nb/ro file="$T/root.img" readonly=true
  nbdcopy "$URI" "$T/copy.img" && cmp "$T/root.img" "$T/copy.img" \
    || fail "read-only serving as an unprivileged user failed"
  stop_nbdkit "$NBDKIT_PID"
  assert_eq "file untouched" "$sum" "$(sha256sum < "$T/root.img")"
else
  log "cannot run as uid $nobody here (build tree not readable): permission cases skipped"
fi
log "ok"
