#!/bin/bash
# cbw — bench/cbwd/run.sh: cbwd against its peers in ONE run of the shared anchor
# harness (../../../shared/bench/anchors): peers A (nbdkit file), C (QSD),
# D-first (QSD fleecing, snapshot-access reads) and E (QSD dirty bitmap), then
# cbwd's cases F (store), G (PIT proxy over the cbw filter) and H (bitmap map),
# all into the same results.tsv; prints the summary and the cbwd/peer ratios.
#   env: CBW_BUILD (build tree with server/cbwd and modules/), ANCHORS, WORK, RES,
#        READ_RUNS, FIO_RUNS, FIO_RUNTIME, DISK_SIZE (reduced knobs are fine: ratios
#        only hold inside one run anyway)
#        CBWD_OLD=path of an older cbwd binary: afterwards also run the
#        back-to-back A/B scripts ab-store.sh (vs nbdkit file and CBWD_OLD) and
#        ab-pit.sh (vs CBWD_OLD, with peak RSS); AB_ROUNDS rounds (default 5).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
export ANCHORS=${ANCHORS:-/work/shared/bench/anchors}
export WORK=${WORK:-/tmp/nbd-anchors-cbwd}
export RES=${RES:-$WORK/results}
export CBW_BUILD=${CBW_BUILD:-/tmp/build-e}
rm -rf "$RES"; mkdir -p "$RES"
export KEEP_RES=1
"$ANCHORS/run-all.sh" ${PEERS:-a-nbdkit-file.sh c-qsd.sh d1-qsd-fleecing-first.sh e-qsd-dirty-bitmap.sh} || true
for s in f-cbwd-store.sh g-cbwd-pit.sh h-cbwd-bitmap.sh; do
  timeout --signal=TERM "${SCRIPT_TIMEOUT:-170}" "$HERE/$s" 2>&1 | tee -a "$RES/run.log" || echo "!! $s failed"
done
/usr/bin/python3 "$ANCHORS/summarize.py" "$RES" > "$RES/summary.md"
/usr/bin/python3 "$HERE/ratios.py" "$RES" | tee "$RES/cbwd-ratios.md"
if [ -n "${CBWD_OLD:-}" ]; then
  ROUNDS=${AB_ROUNDS:-5} "$HERE/ab-store.sh" "$CBW_BUILD/server/cbwd" "$CBWD_OLD" | tee "$RES/ab-store.md"
  ROUNDS=${AB_ROUNDS:-5} "$HERE/ab-pit.sh" "$CBW_BUILD/server/cbwd" "$CBWD_OLD" | tee "$RES/ab-pit.md"
fi
