#!/bin/bash
# cbw — client-tests/package/package.sh: the Debian packages, built from this
# tree, installed, used and removed, on the machine itself.
#
#  1. a copy of the tree (tracked and untracked files, no build directories)
#     is built with dpkg-buildpackage -b -us -uc; lintian reports no error;
#  2. dpkg -i installs cbw and nbdkit-cbw-plugins (missing dependencies
#     through apt-get -f install);
#  3. smoke test against the installed files only (PATH without the build
#     tree): nbdkit serves a disk with the modules by short name
#     (--filter=cbw --filter=dirtybitmap chain) and a bitmap records a write;
#     cbwd runs with the unit's own ExecStart line (installed config path),
#     reports READY=1 on $NOTIFY_SOCKET; cbw (default socket) adds a disk and
#     pushes a full and an incremental backup of it while the guest writes,
#     each equal to the disk at its point in time; the installed completion
#     offers the disk; man -w finds every page; systemd-analyze verify passes;
#  4. dpkg -r leaves nothing of the packages but the conffile; dpkg -P
#     removes that too.
#
# It installs packages system-wide, so it runs only as root and only when
# asked (CI=true, as .ci/run sets, or CBW_PACKAGE_TEST=1), and never over an
# existing installation of cbw; otherwise it is skipped, saying why.
. "$(dirname "$0")/../functions.sh"

[ "$(id -u)" = 0 ] || skip "needs root (installs packages with dpkg)"
[ "${CI:-}" = true ] || [ "${CBW_PACKAGE_TEST:-0}" = 1 ] ||
  skip "installs system packages: runs in CI (CI=true) or with CBW_PACKAGE_TEST=1"
for c in dpkg-buildpackage dh lintian systemd-analyze man jq qemu-img qemu-io python3; do
  requires "$c"
done
for p in cbw nbdkit-cbw-plugins; do
  case $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true) in
    "" | *not-installed) ;;
    *) skip "package $p is already on this machine: not touching it" ;;
  esac
done
for d in /var/lib/cbwd /run/cbwd /etc/cbw; do
  [ -e "$d" ] && skip "$d exists: a cbwd installation is here, not touching it"
done

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset CBW_SOCKET CBW_NBDKIT CBW_ORCH_STORE_TARGET
INSTALLED=0 CBWD_PID=
# Everything this test started or installed goes away, whatever happens.
_pkg_exit() {
  local rc=$? f p
  [ -n "$CBWD_PID" ] && kill "$CBWD_PID" 2>/dev/null
  # the disks' nbdkit processes are detached from cbwd: find them by path
  for f in $(grep -lF -e "$T/" -e /var/lib/cbwd/ /proc/[0-9]*/cmdline 2>/dev/null); do
    p=${f#/proc/}; p=${p%/cmdline}; [ "$p" != $$ ] && kill "$p" 2>/dev/null
  done
  sleep 0.5
  if [ "$INSTALLED" = 1 ]; then
    dpkg -P cbw nbdkit-cbw-plugins >"$T/purge-on-exit.log" 2>&1 || cat "$T/purge-on-exit.log" >&2
  fi
  rm -rf /var/lib/cbwd /run/cbwd /etc/cbw
  _cbw_cleanup
  exit "$rc"
}
trap _pkg_exit EXIT
trap 'exit 143' TERM INT HUP

# 1. build -----------------------------------------------------------------
SRC=$T/src
mkdir -p "$SRC"
if git -C "$CBW_SRC" rev-parse --git-dir >/dev/null 2>&1; then
  (cd "$CBW_SRC" && git ls-files -co --exclude-standard -z | tar -c --null -T - -f -) | tar -x -C "$SRC"
else
  tar -C "$CBW_SRC" --exclude='./build*' --exclude=./.git --exclude='./obj-*' -c -f - . | tar -x -C "$SRC"
fi
log "building the packages"
t0=$SECONDS
(cd "$SRC" && dpkg-buildpackage -b -us -uc) >"$T/build.log" 2>&1 ||
  { tail -n 40 "$T/build.log" >&2; fail "dpkg-buildpackage failed"; }
log "built in $((SECONDS - t0)) s"
DEBS=("$T"/cbw_*.deb "$T"/nbdkit-cbw-plugins_*.deb)
[ -f "${DEBS[0]}" ] && [ -f "${DEBS[1]}" ] || fail "packages missing: $(ls "$T")"
VERSION=$(dpkg-deb -f "${DEBS[0]}" Version)
lintian --fail-on error "$T"/cbw_*.changes >"$T/lintian.log" 2>&1 ||
  { cat "$T/lintian.log" >&2; fail "lintian reports errors"; }
log "lintian: $(grep -c '^[EW]:' "$T/lintian.log") errors+warnings"
grep '^[EW]:' "$T/lintian.log" >&2 || true

# 2. install ----------------------------------------------------------------
INSTALLED=1
# --path-include: man pages even where dpkg excludes them (container images)
if ! dpkg -i --path-include='/usr/share/man/*' "${DEBS[@]}" >"$T/install.log" 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get -f install -y -q >>"$T/install.log" 2>&1 ||
    { cat "$T/install.log" >&2; fail "dpkg -i / apt-get -f install failed"; }
fi
for p in cbw nbdkit-cbw-plugins; do
  assert_eq "$p installed" "install ok installed" "$(dpkg-query -W -f='${Status}' "$p")"
done
assert_eq "cbw --version" "cbw $VERSION" "$(/usr/bin/cbw --version)"
assert_eq "cbwd --version" "cbwd $VERSION" "$(/usr/sbin/cbwd --version)"
assert_eq "cbwctl --version" "cbwctl $VERSION" "$(/usr/bin/cbwctl --version)"

# 3. smoke test -------------------------------------------------------------
# man pages and the unit
for page in cbw cbwd cbwctl cbwd-orch nbdkit-chain-plugin nbdkit-cbw-filter \
            nbdkit-dirtybitmap-filter; do
  man -w "$page" >/dev/null 2>&1 || fail "man -w $page: not found"
done
UNIT=/lib/systemd/system/cbwd.service
systemd-analyze verify "$UNIT" >"$T/verify.log" 2>&1 ||
  { cat "$T/verify.log" >&2; fail "systemd-analyze verify $UNIT"; }
[ -s "$T/verify.log" ] && { cat "$T/verify.log" >&2; fail "systemd-analyze verify $UNIT warns"; }

# nbdkit with the modules by short name; a write lands in a dirty bitmap
MiB=$((1 << 20))
truncate -s $((16 * MiB)) "$T/plain.img"
start_nbdkit "$T/plain.sock" --filter=cbw --filter=dirtybitmap chain file="$T/plain.img" \
  cbw-control="$T/plain-cbw.ctl" dirtybitmap-image="$T/plain.img" \
  dirtybitmap-control="$T/plain-db.ctl" dirtybitmap-create=true
cbwctl "$T/plain-db.ctl" add '{"name": "b1", "granularity": 65536}' >/dev/null
qemu-io -f raw -c 'write -P 7 1M 4k' "nbd+unix:///?socket=$T/plain.sock" >/dev/null
got=$(cbwctl "$T/plain-db.ctl" extents '{"name": "b1"}' | jq -c '[.extents[] | [.offset, .length]]')
assert_eq "dirty extents through the installed modules" "[[1048576,65536]]" "$got"
kill "$NBDKIT_PID"; wait "$NBDKIT_PID" 2>/dev/null || true

# cbwd exactly as the unit starts it, where systemd would: state and runtime
# directories created for it, a notify socket to report readiness on.
read -r -a EXEC <<<"$(sed -n 's/^ExecStart=//p' "$UNIT")"
assert_eq "ExecStart config" "/etc/cbw/cbwd.json" "$(printf '%s\n' "${EXEC[@]}" | grep -x /etc/cbw/cbwd.json)"
# The default config's commented example, once its two marker lines are
# deleted as it says, is valid for cbwd's parser (it gets as far as asking
# for the orchestrator, which this check leaves out on purpose).
grep -v 'delete this line' /etc/cbw/cbwd.json >"$T/example.json"
cbwd --config "$T/example.json" --listen "unix:$T/example.sock" >"$T/example.out" 2>&1 &&
  fail "cbwd accepted disks without the orchestrator"
grep -q '"disks" needs the orchestrator' "$T/example.out" ||
  fail "the config example does not parse: $(cat "$T/example.out")"
install -d -m 0700 /var/lib/cbwd
install -d -m 0755 /run/cbwd
python3 - "$T/notify.sock" "$T/notify.log" <<'PYEOF' &
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
s.settimeout(120)
with open(sys.argv[2], "a") as f:
    while True:
        d = s.recv(4096).decode()
        f.write(d.replace("\n", " ") + "\n")
        f.flush()
        if "STOPPING=1" in d:
            break
PYEOF
_CBW_PIDS+=("$!")
wait_socket "$T/notify.sock"
(umask 077; exec env NOTIFY_SOCKET="$T/notify.sock" "${EXEC[@]}" 2>>"$T/cbwd.log") &
CBWD_PID=$!
for _ in $(seq 300); do grep -q READY=1 "$T/notify.log" 2>/dev/null && break; sleep 0.1; done
grep -q READY=1 "$T/notify.log" 2>/dev/null ||
  { cat "$T/cbwd.log" >&2; fail "cbwd did not report READY=1 on NOTIFY_SOCKET"; }
[ -S /run/cbwd/control.sock ] || fail "no control socket at /run/cbwd/control.sock"
[ -S /run/cbwd/nbd.sock ] || fail "the default config's listener /run/cbwd/nbd.sock is missing"

CBW=/usr/bin/cbw
# add_disk NAME FILE
add_disk() {
  "$CBW" disk add "$1" --file "$2" >/dev/null 2>"$T/add.err" ||
    fail "disk $1 does not start: $(cat "$T/add.err")"
}
truncate -s $((32 * MiB)) "$T/vda.img"
head -c $((4 * MiB)) /dev/urandom | dd of="$T/vda.img" conv=notrunc status=none
add_disk vda "$T/vda.img"
URI=$("$CBW" --json disk list | jq -r '.disks[] | select(.name == "vda") | .uri')
guest_write() { qemu-io -f raw -c "write -P $1 $2 $3" "$URI" >/dev/null || fail "guest write $*"; }

# push_backup EXPECTED BEGIN-ARGS...: begin, the guest overwrites what the
# backup must not see, a job pushes to $T/backup.raw, end; compare.
push_backup() {
  local expected=$1 id; shift
  "$CBW" backup begin "$@" >/dev/null || fail "backup begin $*"
  guest_write 0xee 0 $((2 * MiB))                       # after the point in time
  guest_write 0xef $((20 * MiB)) 64k
  id=$("$CBW" --json job start --target "vda=$T/backup.raw" | jq -r .id)
  timeout 120 "$CBW" job wait "$id" >"$T/job.log" 2>&1 || { cat "$T/job.log" >&2; fail "job $id"; }
  "$CBW" backup end >/dev/null || fail "backup end"
  cmp "$T/backup.raw" "$expected" || fail "backup ($*) differs from the disk at its point in time"
}
guest_write 0x11 $((8 * MiB)) 1M
cp --sparse=always "$T/vda.img" "$T/expect-full.raw"
push_backup "$T/expect-full.raw" --checkpoint c1
guest_write 0x22 $((12 * MiB)) 256k
cp --sparse=always "$T/vda.img" "$T/expect-incr.raw"
push_backup "$T/expect-incr.raw" --incremental c1 --checkpoint c2
log "full and incremental backups through the installed cbwd: ok"

# the installed completion completes the disk from the running daemon
comp=$(bash -c '. /usr/share/bash-completion/completions/cbw; COMP_WORDS=(cbw disk stop ""); COMP_CWORD=3; _cbw; echo "${COMPREPLY[*]}"')
assert_eq "installed completion" "vda" "$comp"

"$CBW" disk stop vda >/dev/null || fail "disk stop"
kill "$CBWD_PID"; wait "$CBWD_PID" 2>/dev/null || true; CBWD_PID=
for _ in $(seq 50); do grep -q STOPPING=1 "$T/notify.log" && break; sleep 0.1; done
grep -q STOPPING=1 "$T/notify.log" || fail "cbwd did not report STOPPING=1"

# 4. remove, then purge -----------------------------------------------------
rm -rf /var/lib/cbwd /run/cbwd                 # what the service made, not the packages
for d in "${DEBS[@]}"; do dpkg-deb -c "$d"; done | awk '{ print $6 }' | sed 's#^\./#/#' |
  grep -v '/$' >"$T/files"
dpkg-deb --ctrl-tarfile "${DEBS[0]}" | tar -xO ./conffiles >"$T/conffiles"
assert_eq "conffiles" "/etc/cbw/cbwd.json" "$(cat "$T/conffiles")"
dpkg -r cbw nbdkit-cbw-plugins >"$T/remove.log" 2>&1 || { cat "$T/remove.log" >&2; fail "dpkg -r"; }
left=$(while read -r f; do if [ -e "$f" ] || [ -L "$f" ]; then echo "$f"; fi; done <"$T/files")
assert_eq "files left after dpkg -r" "/etc/cbw/cbwd.json" "$left"
assert_eq "cbw after dpkg -r" "deinstall ok config-files" "$(dpkg-query -W -f='${Status}' cbw)"
dpkg -P cbw nbdkit-cbw-plugins >"$T/purge.log" 2>&1 || { cat "$T/purge.log" >&2; fail "dpkg -P"; }
INSTALLED=0
[ -e /etc/cbw ] && fail "/etc/cbw left after purge: $(ls -la /etc/cbw)"
[ -e /usr/share/doc/cbw ] && fail "/usr/share/doc/cbw left after purge"
ls /etc/systemd/system/*.wants/cbwd.service >/dev/null 2>&1 && fail "cbwd.service still enabled after purge"
dpkg-query -W cbw >/dev/null 2>&1 && fail "cbw still known to dpkg after purge"
log "package: ok (version $VERSION)"
