/* cbw — bench/dirtybitmap/hotpath.c: in-process cost of
 * dbm_tracker_record(), the dirtybitmap filter's write hot path, without
 * nbdkit or the network (so it is meaningful on a noisy machine):
 *   steady  — requests into regions already marked (the common case);
 *   first   — the first write into each region (journal update + fdatasync);
 *   2 thr.  — two threads recording concurrently (rwlock read side shared).
 * Usage: dbm-hotpath-bench DIR (scratch directory, created).  Locking: the
 * tracker's own; the threads share nothing else. */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "tracker.h"

#define SIZE (8ULL << 30)
#define N 2000000

static struct dbm_tracker *t;

static double
now (void)
{
  struct timespec ts;
  clock_gettime (CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *
rec (void *arg)
{
  unsigned seed = (unsigned) (uintptr_t) arg;
  struct cbw_err err;
  for (int i = 0; i < N; ++i) {
    uint64_t off = ((uint64_t) rand_r (&seed) * 4096) % (SIZE - 4096);
    if (dbm_tracker_record (t, off, 4096, &err) < 0) { fprintf (stderr, "%s\n", err.msg); exit (1); }
  }
  return NULL;
}

int
main (int argc, char **argv)
{
  char desc[4096], jp[4200], cmd[4200];
  struct cbw_err err = { 0 };
  pthread_t th[2];
  double t0;

  if (argc != 2) { fprintf (stderr, "usage: %s DIR\n", argv[0]); return 1; }
  snprintf (cmd, sizeof cmd, "rm -rf '%s'", argv[1]);
  if (system (cmd) != 0 || mkdir (argv[1], 0755) < 0) { perror (argv[1]); return 1; }
  snprintf (desc, sizeof desc, "%s/d.json", argv[1]);
  snprintf (jp, sizeof jp, "%s.journal", desc);
  t = dbm_tracker_open (desc, jp, SIZE, 64ULL << 20, NULL, &err);
  if (!t || dbm_tracker_add (t, "b", 65536, true, &err) < 0) { fprintf (stderr, "%s\n", err.msg); return 1; }

  t0 = now ();
  for (uint64_t r = 0; r < SIZE / (64ULL << 20); ++r)
    if (dbm_tracker_record (t, r * (64ULL << 20), 4096, &err) < 0) { fprintf (stderr, "%s\n", err.msg); return 1; }
  printf ("first write into a region: %.1f us each (%llu regions, journal fdatasync each)\n",
          (now () - t0) * 1e6 / (double) (SIZE / (64ULL << 20)),
          (unsigned long long) (SIZE / (64ULL << 20)));
  t0 = now ();
  rec ((void *) 1);
  printf ("steady state, 1 thread: %.1f ns per 4k request\n", (now () - t0) * 1e9 / N);
  t0 = now ();
  pthread_create (&th[0], NULL, rec, (void *) 2);
  pthread_create (&th[1], NULL, rec, (void *) 3);
  pthread_join (th[0], NULL);
  pthread_join (th[1], NULL);
  printf ("steady state, 2 threads: %.1f ns per 4k request (wall / total requests)\n",
          (now () - t0) * 1e9 / (2.0 * N));
  t0 = now ();
  if (dbm_tracker_checkpoint (t, &err) < 0) { fprintf (stderr, "%s\n", err.msg); return 1; }
  printf ("fine checkpoint (8 GiB image, 64 KiB granularity, 16 KiB bitmap): %.2f ms\n",
          (now () - t0) * 1e3);
  dbm_tracker_close (t, true, &err);
  if (system (cmd) != 0)          /* remove the scratch directory */
    fprintf (stderr, "%s: could not remove\n", argv[1]);
  return 0;
}
