# client-tests/overlay/common.sh: helpers shared by the overlay chain client
# tests (sourced after ../functions.sh).
#
# The chain plugin serves an overlay chain with  chain=DESC  (created over
# file=BASE when DESC does not exist only with chain-create=true);
# snapshot/commit/status go through its control socket.

# Skip unless the plugin is built with overlay chain support.
require_chain_support() {
  requires nbdinfo; requires nbdcopy; requires qemu-io; requires qemu-img; requires python3
  [ -f "$CHAIN_PLUGIN" ] || skip "chain plugin not built ($CHAIN_PLUGIN)"
  "${NBDKIT[@]}" "$CHAIN_PLUGIN" --help 2>&1 | grep -q '^chain=' ||
    skip "chain plugin has no chain= parameter (overlay engine not integrated)"
}

# start_chain SOCK CTL ARGS...: the chain plugin on SOCK with control socket CTL.
start_chain() {
  local sock=$1 ctlsock=$2; shift 2
  start_nbdkit "$sock" "$CHAIN_PLUGIN" control="$ctlsock" "$@"
  wait_socket "$ctlsock"
}

uri() { echo "nbd+unix:///?socket=$1"; }

# octl SOCK JSON: one control request (the built ovl-ctl helper if present:
# no Python start-up per call), prints the reply line.
OVL_CTL=$CBW_BUILD/client-tests/overlay/ovl-ctl
octl() {
  if [ -x "$OVL_CTL" ]; then "$OVL_CTL" "$1" "$2"; else ctl "$1" "$2"; fi
}

# qio URI CMD...: qemu-io commands against an NBD URI (raw)
qio() {
  local u=$1; shift
  local args=() c
  for c in "$@"; do args+=(-c "$c"); done
  qemu-io -f raw "$u" "${args[@]}" >/dev/null
}

# ctl_ok SOCK JSON: run a control command, fail unless it returned; print the
# "return" member as JSON.
ctl_ok() {
  local r
  r=$(octl "$1" "$2")
  echo "$r" | jq -e 'has("return")' >/dev/null || fail "control $2 failed: $r"
  echo "$r" | jq -c '.return'
}

# ctl_err SOCK JSON: run a control command that must fail; print its class.
ctl_err() {
  local r
  r=$(octl "$1" "$2")
  echo "$r" | jq -e 'has("error")' >/dev/null || fail "control $2 should have failed: $r"
  echo "$r" | jq -r '.error.class'
}

# wait_commit CTL: poll status until the commit is no longer running; print
# the final state.
wait_commit() {
  local st i
  for i in $(seq 600); do
    st=$(ctl_ok "$1" '{"execute":"status"}' | jq -r '.chain.operation.state // "none"')
    [ "$st" != running ] && { echo "$st"; return 0; }
    sleep 0.1
  done
  fail "commit did not finish in 60 s"
}

# compare_export URI FILE: the whole export equals FILE.
compare_export() {
  nbdcopy "$1" "$T/export.img"
  cmp "$T/export.img" "$2" || fail "export differs from the model $2"
  rm -f "$T/export.img"
}
