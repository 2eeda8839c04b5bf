/* cbw — bench/overlay/ovc-tool.c: drive the overlay chain engine
 * (plugin/chain/overlay_chain.c) from the command line, for benchmarks and
 * manual experiments, without nbdkit.  Single-threaded except for the
 * engine's own commit thread.
 *
 *   ovc-tool create CHAIN BASE [CLUSTER]    new chain over a raw base
 *   ovc-tool snapshot CHAIN                 add an empty top overlay
 *   ovc-tool fill CHAIN STRIDE LEN COUNT [START]
 *                                           COUNT writes of LEN bytes every
 *                                           STRIDE bytes from START, byte
 *                                           pattern (i % 255) + 1 (as qemu-io
 *                                           -P), then flush
 *   ovc-tool commit CHAIN LO HI [delete|make-empty]
 *                                           prints two times in seconds from
 *                                           the start of the program: the
 *                                           commit complete (merged, durable,
 *                                           chain switched), and after close
 *                                           (space of deleted layers freed)
 *   ovc-tool read CHAIN BS                  read the whole disk in BS-byte
 *                                           requests, print MiB/s (for
 *                                           callgrind: engine cost per read)
 *   ovc-tool status CHAIN                   status JSON
 *
 * Environment: OVC_CHUNK (commit window bytes), OVC_WORKERS (commit copy
 * threads) and OVC_FLAGS (OVC_TUNE_* bits: 1 = no copy_file_range, 2 = no
 * writeback kick) override the engine's defaults (ovc_set_commit_tuning),
 * for A/B runs; unset = production defaults.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "overlay_chain.h"

static void
die (const char *what, const struct cbw_err *e)
{
  fprintf (stderr, "ovc-tool: %s: %s\n", what, e->msg);
  exit (1);
}

static struct ovc *
open_chain (const char *path)
{
  struct cbw_err e;
  char *note = NULL;
  struct ovc *c = ovc_open (path, NULL, &note, &e);
  if (c == NULL) die ("open", &e);
  if (note) fprintf (stderr, "ovc-tool: recovered: %s\n", note);
  free (note);
  return c;
}

static double
now (void)
{
  struct timespec t;
  clock_gettime (CLOCK_MONOTONIC, &t);
  return (double) t.tv_sec + t.tv_nsec / 1e9;
}

int
main (int argc, char **argv)
{
  struct cbw_err e;
  double t_start = now ();
  if (argc < 3) {
    fprintf (stderr, "usage: see the top of bench/overlay/ovc-tool.c\n");
    return 2;
  }
  const char *cmd = argv[1], *chain = argv[2];
  const char *ch = getenv ("OVC_CHUNK"), *wk = getenv ("OVC_WORKERS");
  const char *fl = getenv ("OVC_FLAGS");
  ovc_set_commit_tuning (ch ? strtoull (ch, NULL, 0) : 0,
                         wk ? (unsigned) atoi (wk) : 0,
                         fl ? (unsigned) atoi (fl) : 0);
  if (strcmp (cmd, "create") == 0 && argc >= 4) {
    uint32_t cs = argc >= 5 ? (uint32_t) strtoul (argv[4], NULL, 0) : 0;
    if (ovc_create (chain, argv[3], cs, &e) < 0) die ("create", &e);
    return 0;
  }
  struct ovc *c = open_chain (chain);
  if (strcmp (cmd, "snapshot") == 0) {
    char *name;
    if (ovc_snapshot (c, "ovc-tool", &name, &e) < 0) die ("snapshot", &e);
    printf ("%s\n", name);
    free (name);
  }
  else if (strcmp (cmd, "fill") == 0 && (argc == 6 || argc == 7)) {
    uint64_t start = argc == 7 ? strtoull (argv[6], NULL, 0) : 0;
    uint64_t stride = strtoull (argv[3], NULL, 0);
    uint32_t len = (uint32_t) strtoul (argv[4], NULL, 0);
    uint64_t count = strtoull (argv[5], NULL, 0);
    char *buf = malloc (len);
    if (buf == NULL || len == 0) return 1;
    for (uint64_t i = 0; i < count; i++) {
      memset (buf, (int) (i % 255) + 1, len);
      if (ovc_pwrite (c, buf, len, start + i * stride, false, &e) < 0) die ("write", &e);
    }
    if (ovc_flush (c, &e) < 0) die ("flush", &e);
    free (buf);
  }
  else if (strcmp (cmd, "commit") == 0 && argc >= 5) {
    enum cbw_commit_mode m = argc >= 6 && strcmp (argv[5], "make-empty") == 0
      ? CBW_COMMIT_MAKE_EMPTY : CBW_COMMIT_DELETE;
    if (ovc_commit_start (c, (unsigned) atoi (argv[3]), (unsigned) atoi (argv[4]),
                          m, 0, &e) < 0)
      die ("commit", &e);
    if (ovc_commit_wait (c, &e) < 0) die ("commit", &e);
    double t_done = now ();
    ovc_close (c);
    printf ("%.3f %.3f\n", t_done - t_start, now () - t_start);
    return 0;
  }
  else if (strcmp (cmd, "read") == 0 && argc == 4) {
    uint32_t bs = (uint32_t) strtoul (argv[3], NULL, 0);
    uint64_t size = ovc_size (c);
    char *buf = malloc (bs ? bs : 1);
    if (buf == NULL || bs == 0) return 1;
    double t0 = now ();
    for (uint64_t off = 0; off < size; off += bs) {
      uint32_t n = size - off < bs ? (uint32_t) (size - off) : bs;
      if (ovc_pread (c, buf, n, off, &e) < 0) die ("read", &e);
    }
    printf ("%.0f\n", (double) size / 1048576 / (now () - t0));
    free (buf);
  }
  else if (strcmp (cmd, "status") == 0) {
    struct json_object *o = ovc_status_json (c);
    printf ("%s\n", json_object_to_json_string_ext (o, JSON_C_TO_STRING_PRETTY));
    json_object_put (o);
  }
  else {
    fprintf (stderr, "ovc-tool: bad command or arguments\n");
    ovc_close (c);
    return 2;
  }
  ovc_close (c);
  return 0;
}
