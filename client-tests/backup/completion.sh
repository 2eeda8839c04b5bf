#!/bin/bash
# cbw — client-tests/backup/completion.sh: the bash completion of cbw
# (server/cli/cbw-completion.bash) run the way bash runs it: the script is
# sourced, COMP_WORDS/COMP_CWORD are set and _cbw fills COMPREPLY.
#  - subcommands, verbs and options come from cbw's own table (checked
#    against `cbw --help`, so a new subcommand is completed without edits);
#  - disk, checkpoint, backup and job names come from the running daemon, also
#    through `-c SOCKET`; a value that is a path completes file names;
#  - without a daemon nothing breaks (no names, exit 0);
#  - --version of every program prints the project version.
. "$(dirname "$0")/lib.sh"
need_modules
requires qemu-img

COMPLETION=$CBW_SRC/server/cli/cbw-completion.bash
[ -f "$COMPLETION" ] || fail "$COMPLETION missing"
# The completion runs "${COMP_WORDS[0]}": put the built cbw first in PATH.
mkdir -p "$T/bin"; ln -s "$CBW" "$T/bin/cbw"
export PATH=$T/bin:$PATH

# comp WORD... : complete the last WORD (may be empty), print COMPREPLY sorted.
comp() {
  bash -c '. "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _cbw
           printf "%s\n" "${COMPREPLY[@]}" | sort' _ "$COMPLETION" cbw "$@"
}
# expect_comp "EXPECTED (space separated, sorted)" WORD...
expect_comp() {
  local want=$1 got; shift
  got=$(comp "$@" | tr '\n' ' ' | sed 's/ $//')
  [ "$got" = "$want" ] || fail "completing [cbw $*]: expected [$want], got [$got]"
}

ver=$(sed -n 's/^project(cbw VERSION \([0-9.]*\).*/\1/p' "$CBW_SRC/CMakeLists.txt")
assert_eq "cbw --version" "cbw $ver" "$("$CBW" --version)"
assert_eq "cbwd-orch --version" "cbwd-orch $ver" "$("$ORCHD" --version)"
assert_eq "cbwctl --version" "cbwctl $ver" "$("$CBW_BUILD/tools/cbwctl" --version)"
[ -x "$CBW_BUILD/server/cbwd" ] && assert_eq "cbwd --version" "cbwd $ver" "$("$CBW_BUILD/server/cbwd" --version)"

# Subcommands: every command of `cbw --help` (its table) and nothing invented.
help_groups=$("$CBW" --help | sed -n '/^commands:/,/^$/p' | awk 'NR > 1 && NF { print $1 }' |
              sort -u | tr '\n' ' ' | sed 's/ $//')
got=$(comp "" | grep -vx help | tr '\n' ' ' | sed 's/ $//')
assert_eq "subcommands" "$help_groups" "$got"
expect_comp "checkpoint" ch
expect_comp "commit commit-cancel" disk comm
help_verbs=$("$CBW" job --help | awk '/^usage: cbw job / { print $4 }' | sort | tr '\n' ' ' | sed 's/ $//')
expect_comp "$help_verbs" job ""
expect_comp "--incremental" backup begin --inc
expect_comp "--connect" --conn
expect_comp "--json" --j

# A daemon with two disks, two checkpoints, a backup and a job.
truncate -s 8M "$T/a.img" "$T/b.img"
start_orchd
# add_disk NAME FILE
add_disk() {
  "$CBW" disk add "$1" --file "$2" >/dev/null 2>"$T/add.err" ||
    fail "disk $1 does not start: $(cat "$T/add.err")"
}
add_disk vda "$T/a.img"
add_disk vdb "$T/b.img"
expect_comp "vda vdb" disk start ""
expect_comp "vdb" disk stop vdb
# A new name has nothing to offer: only the options.
comp disk add "" | grep -qv '^-' && fail "names offered for a new disk: $(comp disk add "")"
"$CBW" checkpoint create c1 >/dev/null
"$CBW" checkpoint create c2 >/dev/null
expect_comp "c1 c2" checkpoint delete ""
expect_comp "c1 c2" backup begin --disk vda --incremental ""
expect_comp "vda vdb" checkpoint list --disk ""
"$CBW" backup begin --id nightly >/dev/null
qemu-img create -q -f raw "$T/t.img" 8M
"$CBW" job start --target "vda=$T/t.img" --disk vda --id push1 >/dev/null
expect_comp "nightly" backup end --id ""
expect_comp "nightly" job start --backup ""
expect_comp "push1" job status ""
expect_comp "push1" job set-speed p
# Options after the positional: options only, no names.
expect_comp "--help" disk start vda ""
expect_comp "--disk --help" checkpoint create c3 -
# A path completes file names.
touch "$T/file-one.img"
expect_comp "$T/file-one.img" disk add vdc --file "$T/file-o"
# -c SOCKET: names from that daemon, whatever $CBW_SOCKET says.
sock=$CBW_SOCKET
export CBW_SOCKET=$T/nowhere.sock
expect_comp "--help" disk start ""
expect_comp "vda vdb" -c "$sock" disk start ""
# No daemon: no names (only the options), no error.
stop_orchd
expect_comp "--help" -c "$sock" disk start ""
log "completion: ok"
