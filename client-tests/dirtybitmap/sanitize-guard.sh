# cbw — client-tests/dirtybitmap/sanitize-guard.sh: sourced after
# functions.sh by every test here.  In the sanitizer build functions.sh
# preloads libasan into nbdkit; with nbdkit 1.32 / glibc 2.36 that preload
# leaves glibc's __libc_setlocale_lock with a reader count of -1 before any
# module code runs (seen with `nbdkit null` alone, inspected with gdb), so the
# first duplocale() — json-c calls it on every parse, i.e. on every control
# request — deadlocks.  (client-tests/cbw found the same.)  These tests drive
# the filter through its control socket, so in the sanitizer build they first
# probe one control request with a timeout and skip if it hangs.  The filter's
# logic still runs under ASan+UBSan in the unit tests (test_dbm_journal,
# test_dbm_tracker: fully instrumented binaries, no preload).
if [ "${CBW_SANITIZE:-0}" = 1 ] || [ "${CBW_SANITIZE:-}" = ON ]; then
  mkdir -p "$T/probe"
  start_nbdkit "$T/probe/s" --filter="$DIRTYBITMAP_FILTER" memory 1M \
    dirtybitmap="$T/probe/d.json" dirtybitmap-control="$T/probe/ctl" dirtybitmap-create=true
  wait_socket "$T/probe/ctl"
  if ! timeout 8 "$CBW_BUILD/client-tests/dirtybitmap/dbm-tool" ctl "$T/probe/ctl" info >/dev/null 2>&1; then
    kill9 "$NBDKIT_PID"            # it would hang in cleanup joining that thread
    fail "control socket does not answer with libasan preloaded into nbdkit (glibc locale-lock hang: is client-tests/asan_preload_fix.c preloaded?)"
  fi
  kill "$NBDKIT_PID"; wait "$NBDKIT_PID" 2>/dev/null || true
fi
