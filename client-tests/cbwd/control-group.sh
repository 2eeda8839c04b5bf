#!/bin/bash
# cbw — client-tests/cbwd/control-group.sh: cbwd --control-group GROUP.
# The control socket is mode 0660 with group GROUP; `cbw status` works for
# a user whose supplementary groups include GROUP and for one whose primary
# group is GROUP; a user outside it is refused by the file mode and, once
# the mode is widened by hand, by the SO_PEERCRED check (PermissionDenied).
# Creates the group and the users at test time, so it needs root.
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/lib.sh"
[ "$(id -u)" = 0 ] || skip "needs root to create a group and users (run as root, as CI does)"
for c in groupadd useradd userdel groupdel setpriv; do requires $c; done
CBW=$CBW_BUILD/server/cli/cbw
[ -x "$CBW" ] || skip "cbw CLI not built"
[ -f "$CHAIN_PLUGIN" ] || skip "chain plugin not built (cbwd's orchestrator uses it)"

G=cbwcg$$ M=cbwcm$$ P=cbwcp$$ N=cbwcn$$
# A directory every user may enter: the socket's mode is what protects it.
PUB=$(mktemp -d /tmp/cbw-cg.XXXXXX)
chmod 755 "$PUB"
_cg_exit() {
  local rc=$?
  [ -n "${CBWD_PID:-}" ] && kill "$CBWD_PID" 2>/dev/null
  for u in $M $P $N; do userdel "$u" >/dev/null 2>&1; done
  groupdel "$G" >/dev/null 2>&1
  rm -rf "$PUB"
  _cbw_cleanup
  exit $rc
}
trap _cg_exit EXIT
groupadd "$G" || fail "groupadd $G"
useradd -M -N -g nogroup -G "$G" -s /usr/sbin/nologin "$M" || fail "useradd $M"
useradd -M -N -g "$G" -s /usr/sbin/nologin "$P" || fail "useradd $P"
useradd -M -N -g nogroup -s /usr/sbin/nologin "$N" || fail "useradd $N"
cp "$CBW" "$PUB/cbw" && chmod 755 "$PUB/cbw"

# as USER CMD...: run as USER with the groups the group database gives it
# (what a login would); CBW_SOCKET and the ASan options pass through.
as() { local u=$1; shift; setpriv --reuid="$u" --regid="$(id -g "$u")" --init-groups -- "$@"; }

STATE=$T/state
CTL=$PUB/control.sock
export CBW_SOCKET=$CTL CBW_NBDKIT="${NBDKIT[*]}"
SOCK=$T/cbwd.sock
start_cbwd cbwd --state-dir "$STATE" --control "$CTL" --control-group "$G" \
  --module-dir "$CBW_MODULES"
for _ in $(seq 100); do [ -S "$CTL" ] && break; sleep 0.1; done
[ -S "$CTL" ] || fail "no control socket: $(tail -5 "$CBWD_LOG")"
[ "$(stat -c '%a %G' "$CTL")" = "660 $G" ] ||
  fail "control socket is $(stat -c '%a %G' "$CTL"), want 660 $G"

"$CBW" status > $T/root.out || fail "root: cbw status: $(cat $T/root.out)"
as "$M" "$PUB/cbw" status > $T/m.out 2>&1 ||
  fail "supplementary member $M: cbw status failed: $(cat $T/m.out)"
grep -q state-dir $T/m.out || fail "member $M: no status printed: $(cat $T/m.out)"
as "$P" "$PUB/cbw" status > $T/p.out 2>&1 ||
  fail "primary-group member $P: cbw status failed: $(cat $T/p.out)"
if as "$N" "$PUB/cbw" status > $T/n.out 2>&1; then
  fail "non-member $N got in through a 0660 socket: $(cat $T/n.out)"
fi
grep -q 'connect: Permission denied' $T/n.out || fail "non-member $N: unexpected error: $(cat $T/n.out)"

# The file mode widened by hand: the peer check still keeps the
# non-member out (PermissionDenied) and lets members in.
chmod 666 "$CTL"
if as "$N" "$PUB/cbw" status > $T/n2.out 2>&1; then
  fail "non-member $N was served on a 0666 socket: $(cat $T/n2.out)"
fi
grep -q 'server refused the connection: permission denied' $T/n2.out ||
  fail "non-member $N on a 0666 socket: not refused by cbwd: $(cat $T/n2.out)"
as "$M" "$PUB/cbw" status > $T/m2.out 2>&1 ||
  fail "member $M on a 0666 socket: cbw status failed: $(cat $T/m2.out)"
stop_cbwd
CBWD_PID=

# An unknown group is refused at start, before anything listens.
if "$CBWD" --listen "unix:$SOCK" --state-dir "$STATE" --control "$CTL" \
     --control-group "cbw-no-such-group-$$" > $T/bad.out 2>&1; then
  fail "cbwd started with an unknown --control-group"
fi
grep -q 'no such group' $T/bad.out || fail "unknown group: $(cat $T/bad.out)"
log PASS
