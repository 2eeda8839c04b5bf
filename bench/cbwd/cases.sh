# cbw — bench/cbwd/cases.sh: cbwd cases for the shared anchor harness
# (sourced by the case scripts; needs ANCHORS and CBW_BUILD).
ANCHORS=${ANCHORS:-/work/shared/bench/anchors}
. "$ANCHORS/lib.sh"
CBW_BUILD=${CBW_BUILD:-/tmp/build-e}
CBWD=${CBWD:-$CBW_BUILD/server/cbwd}
CBW_FILTER=${CBW_FILTER:-$CBW_BUILD/modules/nbdkit-cbw-filter.so}
[ -x "$CBWD" ] || { log "no cbwd at $CBWD"; exit 1; }

# cbw_ctl SOCK JSON: one control request, prints the reply line
cbw_ctl() {
  "$PY" - "$1" "$2" <<'PYEOF'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rwb")
f.readline(); f.write(sys.argv[2].encode() + b"\n"); f.flush(); print(f.readline().decode().strip())
PYEOF
}
