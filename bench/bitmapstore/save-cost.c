/* cbw — bench/bitmapstore/save-cost.c: what a bitmap store save costs as
 * the number of checkpoints grows.
 *
 * A disk with N checkpoints has N bitmaps in its store: N-1 frozen
 * (disabled, the older checkpoints) and one enabled one taking the writes.
 * Each round marks a few blocks in the enabled bitmap (a guest write) and
 * saves, as the dirtybitmap filter does on a flush.  Printed per N: median
 * and max save time over ROUNDS, data files written per save, and the ratio
 * of the median to the median with N = 1 measured in the same run (the
 * peer: a save is flat if the ratio stays near 1).
 *
 *   bitmap-store-save-bench DIR [DISK_GIB [ROUNDS [MAX_CHECKPOINTS]]]
 *
 * DIR: a scratch directory on the filesystem to measure (its fsyncs are
 * the cost); DISK_GIB default 16 (64 KiB granularity: 32 KiB per bitmap),
 * ROUNDS default 20.  Counts of 1, 10, 100, 1000 checkpoints, those up to
 * MAX_CHECKPOINTS (default 1000; bench/scale runs 1 to see the cost of
 * one save against the disk's size).
 *
 * Locking: single-threaded.
 */
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bitmap_store.h"

static double
now_ms (void)
{
  struct timespec ts;
  clock_gettime (CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int
cmp_d (const void *a, const void *b)
{
  double x = *(const double *) a, y = *(const double *) b;
  return x < y ? -1 : x > y;
}

static void
clean_dir (const char *d)
{
  DIR *dp = opendir (d);
  struct dirent *e;
  char p[4096];
  if (dp == NULL)
    return;
  while ((e = readdir (dp)) != NULL)
    if (strncmp (e->d_name, "bench.", 6) == 0) {
      snprintf (p, sizeof p, "%s/%s", d, e->d_name);
      unlink (p);
    }
  closedir (dp);
}

int
main (int argc, char **argv)
{
  static const unsigned counts[] = { 1, 10, 100, 1000 };
  uint64_t disk = (argc > 2 ? strtoull (argv[2], NULL, 10) : 16) << 30;
  int rounds = argc > 3 ? atoi (argv[3]) : 20;
  unsigned maxc = argc > 4 ? (unsigned) atoi (argv[4]) : 1000;
  double base = 0;
  char desc[4096];

  if (argc < 2 || rounds < 1 || disk == 0) {
    fprintf (stderr, "usage: bitmap-store-save-bench DIR [DISK_GIB [ROUNDS "
             "[MAX_CHECKPOINTS]]]\n");
    return 2;
  }
  snprintf (desc, sizeof desc, "%s/bench.cbw-bitmaps.json", argv[1]);
  printf ("| checkpoints | median save ms | max ms | data files written per save | ratio to 1 |\n"
          "|---|---|---|---|---|\n");
  for (size_t c = 0; c < sizeof counts / sizeof counts[0] && counts[c] <= maxc;
       c++) {
    struct cbw_err err = { 0 };
    struct cbw_bitmap_store *st;
    double *t = calloc ((size_t) rounds, sizeof *t);
    uint64_t written = 0;

    clean_dir (argv[1]);
    st = cbw_bitmap_store_open (desc, disk, &err);
    if (st == NULL || t == NULL) {
      fprintf (stderr, "open: %s\n", err.msg);
      return 1;
    }
    for (unsigned i = 0; i < counts[c]; i++) {
      char name[32];
      struct cbw_stored_bitmap *b;
      snprintf (name, sizeof name, "cp-%u", i);
      b = cbw_bitmap_store_add (st, name, 65536, i + 1 == counts[c], &err);
      if (b == NULL) {
        fprintf (stderr, "add: %s\n", err.msg);
        return 1;
      }
      cbw_bitmap_set_range (&b->bits, (i * 7919) % b->bits.nbits, 64);   /* its history */
    }
    if (cbw_bitmap_store_save (st, &err) < 0) {
      fprintf (stderr, "save: %s\n", err.msg);
      return 1;
    }
    struct cbw_stored_bitmap *active = &st->bitmaps[st->count - 1];
    for (int r = 0; r < rounds; r++) {
      cbw_bitmap_set_range (&active->bits, ((uint64_t) r * 104729) % active->bits.nbits, 4);
      double t0 = now_ms ();
      if (cbw_bitmap_store_save (st, &err) < 0) {
        fprintf (stderr, "save: %s\n", err.msg);
        return 1;
      }
      t[r] = now_ms () - t0;
      for (size_t i = 0; i < st->count; i++)
        written += st->bitmaps[i].generation == st->generation;
    }
    cbw_bitmap_store_close (st);
    qsort (t, (size_t) rounds, sizeof *t, cmp_d);
    double med = t[rounds / 2];
    if (c == 0)
      base = med;
    printf ("| %u | %.2f | %.2f | %.1f | %.2f |\n", counts[c], med, t[rounds - 1],
            (double) written / rounds, base > 0 ? med / base : 0);
    free (t);
  }
  clean_dir (argv[1]);
  return 0;
}
