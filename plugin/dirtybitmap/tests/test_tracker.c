/* cbw — plugin/dirtybitmap/tests/test_tracker.c: unit tests of the tracker
 * (tracker.c): recording, extents, control operations, recovery after an
 * unclean close (live-bitmap map after a process crash: exact; after a
 * simulated reboot, or with a corrupt, stale or foreign map: journal merge;
 * unusable journal → all dirty), and recording
 * from many threads while checkpoints run, checked against a model.
 * Each test uses its own temporary directory. */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bitmap.h"
#include "journal.h"
#include "livemap.h"
#include "tracker.h"

#define MiB (1ULL << 20)

static char dir[64], desc[128], jpath[160], mpath[160];

static void
setup (void)
{
  strcpy (dir, "/tmp/dbm-ttest.XXXXXX");
  cr_assert_not_null (mkdtemp (dir));
  snprintf (desc, sizeof desc, "%s/d.json", dir);
  snprintf (jpath, sizeof jpath, "%s/d.json.journal", dir);
  snprintf (mpath, sizeof mpath, "%s/d.json.livemap", dir);
  unsetenv ("CBW_TEST_POWERLOSS_DIR");
  unsetenv (DBM_LIVEMAP_BOOT_ID_ENV);
}

/* The next open happens "after a reboot": the live-bitmap map, whatever it
 * holds, is from another boot and must not be used. */
static void
simulate_reboot (void)
{
  static unsigned n;
  char id[40];
  snprintf (id, sizeof id, "test-boot-%u", ++n);
  setenv (DBM_LIVEMAP_BOOT_ID_ENV, id, 1);
}

static void
teardown (void)
{
  char cmd[128];
  snprintf (cmd, sizeof cmd, "rm -rf '%s'", dir);
  cr_assert_eq (system (cmd), 0);
}

TestSuite (tracker, .init = setup, .fini = teardown, .timeout = 120);

static struct dbm_tracker *
topen (uint64_t size, uint64_t region)
{
  struct cbw_err err = { 0 };
  struct dbm_tracker *t = dbm_tracker_open (desc, jpath, size, region, NULL, &err);
  cr_assert_not_null (t, "open: %s", err.msg);
  return t;
}

/* All extents of a bitmap as a malloc'd model bitmap of granules. */
static void
extents_to_model (struct dbm_tracker *t, const char *name, uint64_t gran,
                  struct cbw_bitmap *m)
{
  struct cbw_err err = { 0 };
  struct dbm_extent ext[3];
  uint64_t off = 0, size = dbm_tracker_image_size (t), next;
  size_t n;

  cr_assert_eq (cbw_bitmap_init (m, size / gran + (size % gran != 0)), 0);
  /* small max so that paging with "next" is exercised */
  for (;;) {
    cr_assert_eq (dbm_tracker_extents (t, name, off, size - off, 3, ext, &n, &next, &err), 0,
                  "%s", err.msg);
    for (size_t i = 0; i < n; ++i) {
      cr_assert_geq (ext[i].offset, off);
      cr_assert_eq (ext[i].offset % gran, 0);
      cbw_bitmap_set_range (m, ext[i].offset / gran,
                            (ext[i].length + gran - 1) / gran);
    }
    if (next >= size)
      break;
    cr_assert_gt (next, off, "progress");
    off = next;
  }
}

Test (tracker, record_and_extents)
{
  struct cbw_err err = { 0 };
  struct dbm_tracker *t = topen (100 * MiB + 512, 4 * MiB);
  struct dbm_extent ext[8];
  uint64_t next;
  size_t n;

  cr_assert_eq (dbm_tracker_add (t, "b", 65536, true, &err), 0, "%s", err.msg);
  cr_assert_eq (dbm_tracker_add (t, "b", 65536, true, &err), -1);
  cr_assert_eq (err.errnum, EEXIST);
  cr_assert_eq (dbm_tracker_add (t, "bad/name", 65536, true, &err), -1);
  cr_assert_eq (err.errnum, EINVAL);
  cr_assert_eq (dbm_tracker_add (t, "g", 1000, true, &err), -1);
  cr_assert_eq (err.errnum, EINVAL);

  cr_assert_eq (dbm_tracker_record (t, 65536 + 1, 10, &err), 0);
  cr_assert_eq (dbm_tracker_record (t, 3 * 65536 - 1, 2, &err), 0);   /* 2 granules */
  cr_assert_eq (dbm_tracker_record (t, 100 * MiB, 512, &err), 0);     /* last, partial */
  cr_assert_eq (dbm_tracker_extents (t, "b", 0, 100 * MiB + 512, 8, ext, &n, &next, &err), 0);
  cr_assert_eq (n, 2);
  cr_assert_eq (ext[0].offset, 65536);
  cr_assert_eq (ext[0].length, 3 * 65536);
  cr_assert_eq (ext[1].offset, 100 * MiB);
  cr_assert_eq (ext[1].length, 512);
  cr_assert_eq (next, 100 * MiB + 512);
  /* clipped to the requested range */
  cr_assert_eq (dbm_tracker_extents (t, "b", 65536 * 2, 100, 8, ext, &n, &next, &err), 0);
  cr_assert_eq (n, 1);
  cr_assert_eq (ext[0].offset, 131072);
  cr_assert_eq (ext[0].length, 100);
  /* bounded reply */
  cr_assert_eq (dbm_tracker_extents (t, "b", 0, 100 * MiB + 512, 1, ext, &n, &next, &err), 0);
  cr_assert_eq (n, 1);
  cr_assert_eq (next, 100 * MiB);
  /* bad requests */
  cr_assert_eq (dbm_tracker_extents (t, "nope", 0, 1, 8, ext, &n, &next, &err), -1);
  cr_assert_eq (err.errnum, ENOENT);
  cr_assert_eq (dbm_tracker_extents (t, "b", 100 * MiB, 1 * MiB, 8, ext, &n, &next, &err), -1);
  cr_assert_eq (err.errnum, EINVAL);

  struct dbm_bitmap_info *info;
  cr_assert_eq (dbm_tracker_list (t, &info, &n, &err), 0);
  cr_assert_eq (n, 1);
  cr_assert_eq (info[0].dirty_bytes, 3 * 65536 + 512);
  free (info);
  cr_assert_eq (dbm_tracker_close (t, true, &err), 0, "%s", err.msg);

  /* clean reopen: exact bits, no recovery */
  t = topen (100 * MiB + 512, 4 * MiB);
  struct dbm_tracker_stats s;
  dbm_tracker_stats (t, &s);
  cr_assert_eq (s.recovery, DBM_RECOVERED_CLEAN);
  cr_assert_eq (dbm_tracker_list (t, &info, &n, &err), 0);
  cr_assert_eq (info[0].dirty_bytes, 3 * 65536 + 512);
  free (info);
  dbm_tracker_close (t, true, &err);
}

Test (tracker, disable_enable_clear_merge_remove)
{
  struct cbw_err err = { 0 };
  struct dbm_tracker *t = topen (64 * MiB, MiB);
  struct dbm_bitmap_info *info;
  size_t n;

  cr_assert_eq (dbm_tracker_add (t, "a", 65536, true, &err), 0);
  cr_assert_eq (dbm_tracker_add (t, "c", 1 << 20, false, &err), 0);
  cr_assert_eq (dbm_tracker_record (t, 0, 4096, &err), 0);
  cr_assert_eq (dbm_tracker_set_enabled (t, "a", false, &err), 0);
  cr_assert_eq (dbm_tracker_record (t, 10 * MiB, 4096, &err), 0);    /* nobody records */
  cr_assert_eq (dbm_tracker_merge (t, "a", "c", &err), 0, "%s", err.msg);
  cr_assert_eq (dbm_tracker_list (t, &info, &n, &err), 0);
  cr_assert_eq (info[0].dirty_bytes, 65536);
  cr_assert_eq (info[1].dirty_bytes, MiB, "coarser dst: whole granule");
  cr_assert (!info[0].enabled);
  free (info);
  cr_assert_eq (dbm_tracker_set_enabled (t, "c", true, &err), 0);
  cr_assert_eq (dbm_tracker_record (t, 20 * MiB + 5, 1, &err), 0);
  cr_assert_eq (dbm_tracker_clear (t, "a", &err), 0);
  cr_assert_eq (dbm_tracker_list (t, &info, &n, &err), 0);
  cr_assert_eq (info[0].dirty_bytes, 0);
  cr_assert_eq (info[1].dirty_bytes, 2 * MiB);
  free (info);
  cr_assert_eq (dbm_tracker_remove (t, "a", &err), 0);
  cr_assert_eq (dbm_tracker_remove (t, "a", &err), -1);
  cr_assert_eq (err.errnum, ENOENT);
  cr_assert_eq (dbm_tracker_merge (t, "c", "zz", &err), -1);
  cr_assert_eq (err.errnum, ENOENT);
  cr_assert_eq (dbm_tracker_list (t, &info, &n, &err), 0);
  cr_assert_eq (n, 1);
  cr_assert_str_eq (info[0].name, "c");
  free (info);
  dbm_tracker_close (t, true, &err);
}

/* mark: ranges become dirty (whole granules), survive a clean reopen; a bad
 * range marks nothing. */
Test (tracker, mark_extents)
{
  struct cbw_err err = { 0 };
  struct dbm_tracker *t = topen (64 * MiB, MiB);
  struct dbm_extent x[2] = { { 65536 + 1, 10 }, { 3 * MiB, 2 * 65536 } };
  struct dbm_extent bad[2] = { { 0, 4096 }, { 64 * MiB - 4096, 8192 } };
  struct dbm_extent out[4];
  size_t n;
  uint64_t next;

  cr_assert_eq (dbm_tracker_add (t, "m", 65536, false, &err), 0);
  cr_assert_eq (dbm_tracker_mark (t, "m", bad, 2, &err), -1);
  cr_assert_eq (err.errnum, EINVAL);
  cr_assert_eq (dbm_tracker_mark (t, "nope", x, 2, &err), -1);
  cr_assert_eq (err.errnum, ENOENT);
  cr_assert_eq (dbm_tracker_mark (t, "m", x, 2, &err), 0, "%s", err.msg);
  cr_assert_eq (dbm_tracker_close (t, true, &err), 0);
  t = topen (64 * MiB, MiB);
  cr_assert_eq (dbm_tracker_extents (t, "m", 0, 64 * MiB, 4, out, &n, &next, &err), 0);
  cr_assert_eq (n, 2, "bad range marked something or marks lost: %zu extents", n);
  cr_assert (out[0].offset == 65536 && out[0].length == 65536);
  cr_assert (out[1].offset == 3 * MiB && out[1].length == 2 * 65536);
  dbm_tracker_close (t, true, &err);
}

/* Unclean close after a checkpoint: writes since then come back through the
 * journal (over-reported to their regions); a disabled bitmap is exact. */
Test (tracker, unclean_close_recovers_from_journal)
{
  struct cbw_err err = { 0 };
  uint64_t size = 256 * MiB, region = 8 * MiB;
  struct dbm_tracker *t = topen (size, region);
  struct cbw_bitmap m;

  cr_assert_eq (dbm_tracker_add (t, "on", 65536, true, &err), 0);
  cr_assert_eq (dbm_tracker_add (t, "off", 65536, true, &err), 0);
  cr_assert_eq (dbm_tracker_record (t, 0, 4096, &err), 0);
  cr_assert_eq (dbm_tracker_set_enabled (t, "off", false, &err), 0);   /* saves */
  cr_assert_eq (dbm_tracker_record (t, 100 * MiB + 7, 3, &err), 0);    /* region 12 */
  cr_assert_eq (dbm_tracker_close (t, false, &err), 0);               /* "crash" */
  simulate_reboot ();                          /* the map is not used */

  t = topen (size, region);
  struct dbm_tracker_stats s;
  dbm_tracker_stats (t, &s);
  cr_assert_eq (s.recovery, DBM_RECOVERED_JOURNAL);
  extents_to_model (t, "on", 65536, &m);
  cr_assert (cbw_bitmap_test (&m, 0));
  cr_assert (cbw_bitmap_all_in_range (&m, 96 * MiB / 65536, region / 65536),
             "whole region 12 dirty");
  cr_assert_eq (cbw_bitmap_count (&m), 1 + region / 65536);
  cbw_bitmap_free (&m);
  extents_to_model (t, "off", 65536, &m);
  cr_assert_eq (cbw_bitmap_count (&m), 1, "disabled bitmap not polluted");
  cbw_bitmap_free (&m);
  dbm_tracker_close (t, true, &err);
}

Test (tracker, unusable_journal_means_all_dirty)
{
  struct cbw_err err = { 0 };
  struct dbm_tracker *t = topen (32 * MiB, MiB);
  struct dbm_bitmap_info *info;
  size_t n;

  cr_assert_eq (dbm_tracker_add (t, "b", 65536, true, &err), 0);
  cr_assert_eq (dbm_tracker_record (t, 0, 1, &err), 0);
  dbm_tracker_close (t, false, &err);
  simulate_reboot ();
  cr_assert_eq (truncate (jpath, 100), 0);
  t = topen (32 * MiB, MiB);
  struct dbm_tracker_stats s;
  dbm_tracker_stats (t, &s);
  cr_assert_eq (s.recovery, DBM_RECOVERED_ALL_DIRTY);
  cr_assert_eq (dbm_tracker_list (t, &info, &n, &err), 0);
  cr_assert_eq (info[0].dirty_bytes, 32 * MiB);
  free (info);
  dbm_tracker_close (t, true, &err);
  /* and a clean close leaves a usable store: no recovery next time */
  t = topen (32 * MiB, MiB);
  dbm_tracker_stats (t, &s);
  cr_assert_eq (s.recovery, DBM_RECOVERED_CLEAN);
  dbm_tracker_close (t, true, &err);
}

Test (tracker, second_open_is_refused)
{
  struct cbw_err err = { 0 };
  struct dbm_tracker *t = topen (32 * MiB, MiB);
  cr_assert_null (dbm_tracker_open (desc, jpath, 32 * MiB, MiB, NULL, &err));
  cr_assert_eq (err.errnum, EBUSY, "%d %s", err.errnum, err.msg);
  dbm_tracker_close (t, true, &err);
}

/* Many threads record random writes while another thread checkpoints in a
 * loop; then an unclean close.  Every recorded write must be dirty after
 * reopening, and the journal must have been shrunk by the checkpoints. */
#define NTHREADS 4
#define NWRITES 3000
static struct dbm_tracker *ct;
static uint64_t csize = 512 * MiB;
static uint64_t wlog[NTHREADS][NWRITES][2];
static volatile int stop_ckpt;

static void *
writer (void *arg)
{
  int id = (int) (intptr_t) arg;
  unsigned seed = (unsigned) id * 7919u + 1;
  struct cbw_err err = { 0 };

  for (int i = 0; i < NWRITES; ++i) {
    uint64_t len = 1 + (uint64_t) rand_r (&seed) % (256 * 1024);
    uint64_t off = ((uint64_t) rand_r (&seed) << 16 ^ (uint64_t) rand_r (&seed)) % (csize - len);
    /* cluster writes into a few regions most of the time */
    if (rand_r (&seed) % 4)
      off = off % (64 * MiB) + (uint64_t) (rand_r (&seed) % 3) * 128 * MiB;
    wlog[id][i][0] = off;
    wlog[id][i][1] = len;
    cr_assert_eq (dbm_tracker_record (ct, off, len, &err), 0, "%s", err.msg);
  }
  return NULL;
}

static void *
checkpointer (void *arg)
{
  struct cbw_err err = { 0 };
  (void) arg;
  while (!stop_ckpt) {
    cr_assert_eq (dbm_tracker_checkpoint (ct, &err), 0, "%s", err.msg);
    usleep (200);
  }
  return NULL;
}

Test (tracker, concurrent_record_and_checkpoint)
{
  struct cbw_err err = { 0 };
  pthread_t w[NTHREADS], c;
  struct cbw_bitmap m;
  struct dbm_tracker_stats s;

  ct = topen (csize, 16 * MiB);
  cr_assert_eq (dbm_tracker_add (ct, "b", 65536, true, &err), 0);
  cr_assert_eq (pthread_create (&c, NULL, checkpointer, NULL), 0);
  for (int i = 0; i < NTHREADS; ++i)
    cr_assert_eq (pthread_create (&w[i], NULL, writer, (void *) (intptr_t) i), 0);
  for (int i = 0; i < NTHREADS; ++i)
    pthread_join (w[i], NULL);
  stop_ckpt = 1;
  pthread_join (c, NULL);
  dbm_tracker_stats (ct, &s);
  cr_assert_gt (s.checkpoints, 0);
  cr_assert_gt (s.journal_writes, 1);
  dbm_tracker_close (ct, false, &err);

  ct = topen (csize, 16 * MiB);
  extents_to_model (ct, "b", 65536, &m);
  for (int i = 0; i < NTHREADS; ++i)
    for (int k = 0; k < NWRITES; ++k) {
      uint64_t f = wlog[i][k][0] / 65536, l = (wlog[i][k][0] + wlog[i][k][1] - 1) / 65536;
      cr_assert (cbw_bitmap_all_in_range (&m, f, l - f + 1),
                 "write %d/%d at %llu+%llu not dirty", i, k,
                 (unsigned long long) wlog[i][k][0], (unsigned long long) wlog[i][k][1]);
    }
  cbw_bitmap_free (&m);
  dbm_tracker_close (ct, true, &err);
}

/* A sequential writer gets its next regions guaranteed ahead of it (few
 * journal updates, not one per region); random writers do not; after a
 * crash every written granule is dirty and the over-report is bounded by
 * DBM_MARK_AHEAD_MAX regions. */
Test (tracker, sequential_writer_marks_ahead)
{
  struct cbw_err err = { 0 };
  const uint64_t size = 512 * MiB, region = 8 * MiB, nreg = size / region;
  const uint64_t gran = 65536;
  struct dbm_tracker *t = topen (size, region);
  struct dbm_tracker_stats s0, s;
  struct cbw_bitmap m;
  uint64_t off, r;

  cr_assert_eq (dbm_tracker_add (t, "b", gran, true, &err), 0, "%s", err.msg);

  /* random order, never the region right after a guaranteed one */
  dbm_tracker_stats (t, &s0);
  const uint64_t scattered[] = { 40, 30, 20, 10 };
  for (size_t i = 0; i < 4; ++i)
    cr_assert_eq (dbm_tracker_record (t, scattered[i] * region + 4096, 4096, &err), 0);
  dbm_tracker_stats (t, &s);
  cr_assert_eq (s.journal_regions, 4, "random writes guaranteed %" PRIu64
                " regions, want 4", s.journal_regions);

  /* a 1 MiB sequential pass over the first half */
  dbm_tracker_stats (t, &s0);
  for (off = 0; off < size / 2; off += MiB)
    cr_assert_eq (dbm_tracker_record (t, off, MiB, &err), 0, "%s", err.msg);
  dbm_tracker_stats (t, &s);
  uint64_t writes = s.journal_writes - s0.journal_writes;
  cr_assert_leq (writes, nreg / 2 / 3,
                 "sequential pass over %" PRIu64 " regions took %" PRIu64
                 " journal updates", nreg / 2, writes);
  cr_assert_leq (s.journal_regions, nreg / 2 + DBM_MARK_AHEAD_MAX + 4);

  /* crash: everything written is dirty, the rest of the over-report is
   * whole regions ahead of the writer */
  cr_assert_eq (dbm_tracker_close (t, false, &err), 0);
  simulate_reboot ();
  t = topen (size, region);
  dbm_tracker_stats (t, &s);
  cr_assert_eq (s.recovery, DBM_RECOVERED_JOURNAL);
  extents_to_model (t, "b", gran, &m);
  cr_assert (cbw_bitmap_all_in_range (&m, 0, size / 2 / gran),
             "a sequentially written granule is clean after the crash");
  for (size_t i = 0; i < 4; ++i)
    cr_assert (cbw_bitmap_test (&m, (scattered[i] * region + 4096) / gran));
  uint64_t extra = 0;
  for (r = nreg / 2; r < nreg; ++r)
    if (cbw_bitmap_test (&m, r * region / gran))
      extra++;
  cr_assert_leq (extra, DBM_MARK_AHEAD_MAX + 4,
                 "%" PRIu64 " regions past the writer are dirty", extra);
  cbw_bitmap_free (&m);
  dbm_tracker_close (t, true, &err);
}

/* With the background thread running, a sequential writer that keeps
 * entering regions guaranteed ahead of it gets the frontier pushed further
 * in the background: it waits for the journal only at the start. */
Test (tracker, sequential_writer_prefetch_in_background)
{
  struct cbw_err err = { 0 };
  const uint64_t size = 512 * MiB, region = 8 * MiB, nreg = size / region;
  struct dbm_tracker *t = topen (size, region);
  struct dbm_tracker_stats s0, s;
  struct cbw_bitmap m;
  uint64_t off;

  cr_assert_eq (dbm_tracker_add (t, "b", 65536, true, &err), 0, "%s", err.msg);
  cr_assert_eq (dbm_tracker_start_timer (t, 3600, &err), 0, "%s", err.msg);
  dbm_tracker_stats (t, &s0);
  for (off = 0; off < size; off += MiB) {
    cr_assert_eq (dbm_tracker_record (t, off, MiB, &err), 0, "%s", err.msg);
    if (off % region == 0)
      usleep (20000);             /* the writer's own I/O time */
  }
  dbm_tracker_stats (t, &s);
  uint64_t waits = s.journal_waits - s0.journal_waits;
  cr_assert_leq (waits, 4, "a sequential pass over %" PRIu64 " regions waited "
                 "for the journal %" PRIu64 " times", nreg, waits);
  /* crash: every written granule dirty */
  cr_assert_eq (dbm_tracker_close (t, false, &err), 0);
  t = topen (size, region);
  extents_to_model (t, "b", 65536, &m);
  cr_assert (cbw_bitmap_all_in_range (&m, 0, size / 65536));
  cbw_bitmap_free (&m);
  dbm_tracker_close (t, true, &err);
}

/* ---- live-bitmap map ------------------------------------------------------ */

/* Random writes of 512 B..64 KiB over the image with the journal's 8 MiB
 * regions: returns how many granules of gran they touch (model in *m). */
static void
scatter_writes (struct dbm_tracker *t, uint64_t size, uint64_t gran, unsigned n,
                unsigned seed, struct cbw_bitmap *m)
{
  struct cbw_err err = { 0 };

  cr_assert_eq (cbw_bitmap_init (m, size / gran + (size % gran != 0)), 0);
  for (unsigned i = 0; i < n; ++i) {
    uint64_t len = 512 * (1 + rand_r (&seed) % 128);
    uint64_t off = ((uint64_t) rand_r (&seed) * 4096) % (size - len);
    cr_assert_eq (dbm_tracker_record (t, off, len, &err), 0, "%s", err.msg);
    cbw_bitmap_set_range (m, off / gran, (off + len - 1) / gran - off / gran + 1);
  }
}

static void
assert_same (struct dbm_tracker *t, const char *name, uint64_t gran,
             const struct cbw_bitmap *want)
{
  struct cbw_bitmap got;
  extents_to_model (t, name, gran, &got);
  cr_assert_eq (cbw_bitmap_count (&got), cbw_bitmap_count (want),
                "'%s': %" PRIu64 " granules dirty, %" PRIu64 " written", name,
                cbw_bitmap_count (&got), cbw_bitmap_count (want));
  for (uint64_t g = 0; g < want->nbits; ++g)
    cr_assert_eq (cbw_bitmap_test (&got, g), cbw_bitmap_test (want, g), "granule %" PRIu64, g);
  cbw_bitmap_free (&got);
}

/* A process crash keeps the page cache: the bitmaps come back exactly as
 * written, not as whole journal regions, before and after a checkpoint, for
 * bitmaps of different granularities, and a disabled bitmap stays as it was. */
Test (tracker, livemap_exact_after_process_crash)
{
  struct cbw_err err = { 0 };
  uint64_t size = 1024 * MiB, region = 8 * MiB;
  struct dbm_tracker *t = topen (size, region);
  struct dbm_tracker_stats s;
  struct cbw_bitmap m64, m4k, tail;

  cr_assert_eq (dbm_tracker_add (t, "a", 65536, true, &err), 0, "%s", err.msg);
  cr_assert_eq (dbm_tracker_add (t, "off", 65536, false, &err), 0, "%s", err.msg);
  dbm_tracker_stats (t, &s);
  cr_assert (s.livemap, "live bitmaps not in the map");
  scatter_writes (t, size, 65536, 300, 1, &m64);
  cr_assert_eq (dbm_tracker_checkpoint (t, &err), 0, "%s", err.msg);
  cr_assert_eq (dbm_tracker_add (t, "b", 4096, true, &err), 0, "%s", err.msg);
  /* after the checkpoint: only in the live bitmaps and the journal */
  scatter_writes (t, size, 65536, 300, 2, &tail);
  cr_assert_eq (cbw_bitmap_or (&m64, &tail), 0);
  cbw_bitmap_free (&tail);
  cr_assert_eq (cbw_bitmap_init (&m4k, size / 4096), 0);
  {
    unsigned seed = 2;          /* the same writes at 4 KiB */
    for (unsigned i = 0; i < 300; ++i) {
      uint64_t len = 512 * (1 + rand_r (&seed) % 128);
      uint64_t off = ((uint64_t) rand_r (&seed) * 4096) % (size - len);
      cbw_bitmap_set_range (&m4k, off / 4096, (off + len - 1) / 4096 - off / 4096 + 1);
    }
  }
  dbm_tracker_stats (t, &s);
  cr_assert_gt (s.journal_regions, 64, "writes not scattered over the regions");
  cr_assert_eq (dbm_tracker_close (t, false, &err), 0);             /* kill -9 */

  t = topen (size, region);
  dbm_tracker_stats (t, &s);
  cr_assert_eq (s.recovery, DBM_RECOVERED_MAP, "recovery %s", dbm_recovery_name (s.recovery));
  assert_same (t, "a", 65536, &m64);
  assert_same (t, "b", 4096, &m4k);
  struct cbw_bitmap none;
  cr_assert_eq (cbw_bitmap_init (&none, size / 65536), 0);
  assert_same (t, "off", 65536, &none);

  /* and a second crash right after the recovery is exact too */
  cr_assert_eq (dbm_tracker_close (t, false, &err), 0);
  t = topen (size, region);
  dbm_tracker_stats (t, &s);
  cr_assert_eq (s.recovery, DBM_RECOVERED_MAP);
  assert_same (t, "a", 65536, &m64);
  dbm_tracker_close (t, true, &err);
  cr_assert_neq (access (mpath, F_OK), 0, "map left behind by a clean close");
  cbw_bitmap_free (&m64);
  cbw_bitmap_free (&m4k);
  cbw_bitmap_free (&none);
}

/* Crash, then damage the map in one way: recovery must ignore it, say why,
 * and fall back to the journal (whole regions, never less). */
static void
crash_damage_recover (void (*damage) (void), const char *why)
{
  struct cbw_err err = { 0 };
  uint64_t size = 256 * MiB, region = 8 * MiB;
  struct dbm_tracker *t;
  struct dbm_tracker_stats s;
  struct cbw_bitmap m, got;

  teardown ();                  /* a fresh store for each case */
  setup ();
  t = topen (size, region);

  cr_assert_eq (dbm_tracker_add (t, "a", 65536, true, &err), 0, "%s", err.msg);
  dbm_tracker_stats (t, &s);
  cr_assert (s.livemap);
  scatter_writes (t, size, 65536, 50, 7, &m);
  cr_assert_eq (dbm_tracker_close (t, false, &err), 0);
  damage ();
  t = topen (size, region);
  dbm_tracker_stats (t, &s);
  cr_assert_eq (s.recovery, DBM_RECOVERED_JOURNAL, "%s: recovery %s", why,
                dbm_recovery_name (s.recovery));
  extents_to_model (t, "a", 65536, &got);
  for (uint64_t g = 0; g < m.nbits; ++g)
    if (cbw_bitmap_test (&m, g))
      cr_assert (cbw_bitmap_all_in_range (&got, g / 128 * 128, 128),
                 "%s: region of granule %" PRIu64 " not dirty", why, g);
  cbw_bitmap_free (&got);
  cbw_bitmap_free (&m);
  dbm_tracker_close (t, true, &err);
}

static void flip_byte (off_t at)
{
  int fd = open (mpath, O_RDWR);
  unsigned char c;
  cr_assert_geq (fd, 0);
  cr_assert_eq (pread (fd, &c, 1, at), 1);
  c ^= 0x40;
  cr_assert_eq (pwrite (fd, &c, 1, at), 1);
  close (fd);
}
static void dmg_short (void) { cr_assert_eq (truncate (mpath, 100), 0); }
static void dmg_cut (void) { cr_assert_eq (truncate (mpath, 4096), 0); }
static void dmg_grown (void) { cr_assert_eq (truncate (mpath, 1 << 20), 0); }
static void dmg_magic (void) { flip_byte (1); }
static void dmg_slot (void) { flip_byte (128 + 145); }     /* slot 0's nbits */
static void dmg_version (void) { flip_byte (8); }
static void dmg_reboot (void) { simulate_reboot (); }
static void
dmg_garbage (void)
{
  char cmd[256];
  snprintf (cmd, sizeof cmd, "head -c 65536 /dev/urandom > '%s'", mpath);
  cr_assert_eq (system (cmd), 0);
}
/* a well-formed map with a valid checksum, for another image size */
static void
dmg_foreign_size (void)
{
  struct cbw_err err = { 0 };
  struct dbm_livemap_slot sl = { "a", 65536, 512 * MiB / 65536, NULL };
  /* generation of the store as the crashed process left it (one save, by
   * add), so only the size tells this map apart */
  struct dbm_livemap *m = dbm_livemap_create (mpath, 512 * MiB, 1, 1, &sl, &err);
  cr_assert_not_null (m, "%s", err.msg);
  memset (sl.words, 0, 512 * MiB / 65536 / 8);
  cr_assert_eq (dbm_livemap_publish (m, &err), 0, "%s", err.msg);
  dbm_livemap_close (m, false);
}

Test (tracker, livemap_damaged_is_ignored)
{
  crash_damage_recover (dmg_short, "truncated to 100 bytes");
  crash_damage_recover (dmg_cut, "bitmap data cut off");
  crash_damage_recover (dmg_grown, "grown to 1 MiB");
  crash_damage_recover (dmg_magic, "bad magic");
  crash_damage_recover (dmg_slot, "slot size changed (checksum)");
  crash_damage_recover (dmg_version, "bad version");
  crash_damage_recover (dmg_garbage, "random bytes");
  crash_damage_recover (dmg_foreign_size, "map of another image size");
  crash_damage_recover (dmg_reboot, "another boot");
}

/* A map left by an older life of the store (another process saved the
 * descriptor since) must not be trusted: it lacks that life's writes. */
Test (tracker, livemap_of_older_generation_is_ignored)
{
  struct cbw_err err = { 0 };
  uint64_t size = 256 * MiB, region = 8 * MiB;
  struct dbm_tracker *t = topen (size, region);
  struct dbm_tracker_stats s;
  char cmd[512];

  cr_assert_eq (dbm_tracker_add (t, "a", 65536, true, &err), 0, "%s", err.msg);
  cr_assert_eq (dbm_tracker_record (t, 0, 4096, &err), 0);
  cr_assert_eq (dbm_tracker_close (t, false, &err), 0);
  snprintf (cmd, sizeof cmd, "cp '%s' '%s.old'", mpath, mpath);
  cr_assert_eq (system (cmd), 0);
  t = topen (size, region);                         /* recovers, saves */
  cr_assert_eq (dbm_tracker_record (t, 100 * MiB, 4096, &err), 0);   /* region 12 */
  cr_assert_eq (dbm_tracker_close (t, false, &err), 0);
  snprintf (cmd, sizeof cmd, "mv '%s.old' '%s'", mpath, mpath);
  cr_assert_eq (system (cmd), 0);
  t = topen (size, region);
  dbm_tracker_stats (t, &s);
  cr_assert_eq (s.recovery, DBM_RECOVERED_JOURNAL, "recovery %s", dbm_recovery_name (s.recovery));
  struct cbw_bitmap got;
  extents_to_model (t, "a", 65536, &got);
  cr_assert (cbw_bitmap_all_in_range (&got, 96 * MiB / 65536, region / 65536));
  cr_assert (cbw_bitmap_test (&got, 0));
  cbw_bitmap_free (&got);
  dbm_tracker_close (t, true, &err);
}

/* Removing and re-adding a bitmap moves the live bitmaps to a new map; the
 * removed one's old bits never come back, the new one's writes do. */
Test (tracker, livemap_follows_add_and_remove)
{
  struct cbw_err err = { 0 };
  uint64_t size = 256 * MiB, region = 8 * MiB;
  struct dbm_tracker *t = topen (size, region);
  struct dbm_tracker_stats s;
  struct cbw_bitmap want;

  cr_assert_eq (dbm_tracker_add (t, "a", 65536, true, &err), 0, "%s", err.msg);
  cr_assert_eq (dbm_tracker_add (t, "x", 65536, true, &err), 0, "%s", err.msg);
  cr_assert_eq (dbm_tracker_record (t, 0, 4096, &err), 0);
  cr_assert_eq (dbm_tracker_remove (t, "a", &err), 0, "%s", err.msg);
  cr_assert_eq (dbm_tracker_add (t, "a", 65536, true, &err), 0, "%s", err.msg);
  cr_assert_eq (dbm_tracker_record (t, 200 * MiB, 1, &err), 0);
  cr_assert_eq (dbm_tracker_close (t, false, &err), 0);
  t = topen (size, region);
  dbm_tracker_stats (t, &s);
  cr_assert_eq (s.recovery, DBM_RECOVERED_MAP, "recovery %s", dbm_recovery_name (s.recovery));
  cr_assert_eq (cbw_bitmap_init (&want, size / 65536), 0);
  cbw_bitmap_set_range (&want, 200 * MiB / 65536, 1);
  assert_same (t, "a", 65536, &want);
  cbw_bitmap_set_range (&want, 0, 1);
  assert_same (t, "x", 65536, &want);
  cbw_bitmap_free (&want);
  dbm_tracker_close (t, true, &err);
}

/* Dirty bytes of one bitmap. */
static uint64_t
dirty_of (struct dbm_tracker *t, const char *name)
{
  struct cbw_err err = { 0 };
  struct dbm_bitmap_info *info;
  size_t n, i;
  uint64_t d = UINT64_MAX;
  cr_assert_eq (dbm_tracker_list (t, &info, &n, &err), 0, "%s", err.msg);
  for (i = 0; i < n; ++i)
    if (strcmp (info[i].name, name) == 0)
      d = info[i].dirty_bytes;
  free (info);
  cr_assert_neq (d, UINT64_MAX, "no bitmap %s", name);
  return d;
}

/* A disable whose save fails is not applied: the bitmap goes on recording,
 * in memory and in the map, so neither the running filter nor a process
 * crash after it leaves an enabled bitmap that missed writes.  A disable
 * whose save succeeds freezes the bitmap, across a crash too. */
Test (tracker, disable_is_applied_only_once_saved)
{
  struct cbw_err err = { 0 };
  uint64_t size = 64 * MiB;
  struct dbm_tracker *t = topen (size, MiB);
  char blocker[200];

  cr_assert_eq (dbm_tracker_add (t, "a", 65536, true, &err), 0, "%s", err.msg);
  cr_assert_eq (dbm_tracker_record (t, 0, 4096, &err), 0);
  /* the save's temporary descriptor cannot be created: the save fails */
  snprintf (blocker, sizeof blocker, "%s.tmp", desc);
  cr_assert_eq (mkdir (blocker, 0700), 0);
  cr_assert_eq (dbm_tracker_set_enabled (t, "a", false, &err), -1);
  cr_assert_eq (err.errnum, EIO);
  cr_assert_not_null (strstr (err.msg, "disable not applied"), "%s", err.msg);
  cr_assert_eq (dbm_tracker_record (t, 8 * MiB, 4096, &err), 0);
  cr_assert_eq (dirty_of (t, "a"), 2 * 65536, "a write after a failed disable was lost");
  cr_assert_eq (rmdir (blocker), 0);
  cr_assert_eq (dbm_tracker_close (t, false, &err), 0);               /* kill -9 */

  t = topen (size, MiB);
  cr_assert_eq (dirty_of (t, "a"), 2 * 65536, "lost after the crash");
  cr_assert_eq (dbm_tracker_set_enabled (t, "a", false, &err), 0, "%s", err.msg);
  cr_assert_eq (dbm_tracker_record (t, 16 * MiB, 4096, &err), 0);
  cr_assert_eq (dirty_of (t, "a"), 2 * 65536, "a disabled bitmap recorded");
  cr_assert_eq (dbm_tracker_close (t, false, &err), 0);               /* kill -9 */
  t = topen (size, MiB);
  cr_assert_eq (dirty_of (t, "a"), 2 * 65536);
  struct dbm_bitmap_info *info;
  size_t n;
  cr_assert_eq (dbm_tracker_list (t, &info, &n, &err), 0);
  cr_assert (!info[0].enabled, "disable lost across the crash");
  free (info);
  dbm_tracker_close (t, true, &err);
}

/* A remove whose save fails leaves the bitmap in the descriptor: after a
 * crash it comes back (from the journal, having no slot in the map) and
 * must hold the writes that came after the remove, even when it was the
 * only enabled bitmap. */
Test (tracker, unsaved_remove_keeps_journaling)
{
  struct cbw_err err = { 0 };
  uint64_t size = 64 * MiB;
  struct dbm_tracker *t = topen (size, MiB);
  char blocker[200];
  struct dbm_extent ext[4];
  uint64_t next;
  size_t n;

  cr_assert_eq (dbm_tracker_add (t, "a", 65536, true, &err), 0, "%s", err.msg);
  cr_assert_eq (dbm_tracker_record (t, 0, 4096, &err), 0);
  snprintf (blocker, sizeof blocker, "%s.tmp", desc);
  cr_assert_eq (mkdir (blocker, 0700), 0);
  cr_assert_eq (dbm_tracker_remove (t, "a", &err), -1);
  cr_assert_eq (dbm_tracker_record (t, 40 * MiB, 4096, &err), 0);
  cr_assert_eq (rmdir (blocker), 0);
  cr_assert_eq (dbm_tracker_close (t, false, &err), 0);               /* kill -9 */

  t = topen (size, MiB);
  cr_assert_eq (dbm_tracker_extents (t, "a", 40 * MiB, 4096, 4, ext, &n, &next, &err), 0,
                "the bitmap did not come back: %s", err.msg);
  cr_assert_eq (n, 1, "a write after an unsaved remove is missing");
  dbm_tracker_close (t, true, &err);
}

/* "Pss" or "Pss_Anon"/"Pss_File" of this process, KiB. */
static uint64_t
pss_kib (const char *field)
{
  FILE *f = fopen ("/proc/self/smaps_rollup", "r");
  char line[256];
  size_t n = strlen (field);
  uint64_t v = UINT64_MAX;

  cr_assert_not_null (f, "/proc/self/smaps_rollup: %s", strerror (errno));
  while (fgets (line, sizeof line, f))
    if (strncmp (line, field, n) == 0 && line[n] == ':')
      v = strtoull (line + n + 1, NULL, 10);
  fclose (f);
  cr_assert_neq (v, UINT64_MAX, "no %s in smaps_rollup", field);
  return v;
}

/* Each checkpoint bitmap is in memory once: its words in the live-bitmap
 * map, which the data path writes and the save reads.  A second copy kept
 * per bitmap (a save buffer, a copy of a frozen bitmap) doubles the memory
 * per checkpoint; the save of a recording bitmap may copy it only for the
 * duration of the save.  Measured as the process's PSS growth while
 * checkpoints are made the way cbwd-orch makes them (add the new bitmap
 * enabled, disable the previous one), with writes in between. */
Test (tracker, one_copy_of_each_bitmap_in_memory)
{
#if defined (__SANITIZE_ADDRESS__)
  cr_skip_test ("the ASan allocator keeps freed blocks resident (quarantine): "
                "memory is measured in the normal build");
#endif
  struct cbw_err err = { 0 };
  const uint64_t size = 1ULL << 40, gran = 65536;
  const uint64_t bm_kib = size / gran / 8 / 1024;       /* 2048 */
  /* the first checkpoints pay the one-time costs (journal state, the heap
   * growing to its trim threshold): the slope is measured after them, as
   * bench/scale does */
  const int WARM = 4, K = 8, LAST = WARM + K;
  struct dbm_tracker *t = topen (size, 64 * MiB);
  char name[32], prev[32];
  uint64_t p0 = 0, a0 = 0, f0 = 0, p1, a1, f1;

  cr_assert_eq (dbm_tracker_add (t, "cp-0", gran, true, &err), 0, "%s", err.msg);
  for (int k = 1; k <= LAST; ++k) {
    if (k == WARM + 1) {
      p0 = pss_kib ("Pss"); a0 = pss_kib ("Pss_Anon"); f0 = pss_kib ("Pss_File");
    }
    snprintf (name, sizeof name, "cp-%d", k);
    snprintf (prev, sizeof prev, "cp-%d", k - 1);
    cr_assert_eq (dbm_tracker_add (t, name, gran, true, &err), 0, "%s", err.msg);
    cr_assert_eq (dbm_tracker_set_enabled (t, prev, false, &err), 0, "%s", err.msg);
    /* writes spread over the disk, then a timer-style checkpoint */
    for (uint64_t off = 0; off < size; off += size / 64)
      cr_assert_eq (dbm_tracker_record (t, off + (uint64_t) k * gran, 4096, &err), 0,
                    "%s", err.msg);
    cr_assert_eq (dbm_tracker_checkpoint (t, &err), 0, "%s", err.msg);
  }
  p1 = pss_kib ("Pss"); a1 = pss_kib ("Pss_Anon"); f1 = pss_kib ("Pss_File");
  double per = (double) ((int64_t) p1 - (int64_t) p0) / K;
  cr_log_info ("PSS growth per checkpoint bitmap: %.0f KiB (anon %.0f, file %.0f); "
               "bitmap %" PRIu64 " KiB", per,
               (double) ((int64_t) a1 - (int64_t) a0) / K,
               (double) ((int64_t) f1 - (int64_t) f0) / K, bm_kib);
  /* one copy plus its summary (1/64) and some slack; two copies is 2x */
  cr_assert_leq (per, 1.25 * (double) bm_kib,
                 "PSS grows by %.0f KiB per checkpoint bitmap (anon %.0f, file %.0f), "
                 "more than one copy of its %" PRIu64 " KiB: a second copy is kept",
                 per, (double) ((int64_t) a1 - (int64_t) a0) / K,
                 (double) ((int64_t) f1 - (int64_t) f0) / K, bm_kib);
  /* and the bitmaps are still right: every checkpoint holds its writes */
  for (int k = 1; k <= LAST; ++k) {
    snprintf (name, sizeof name, "cp-%d", k);
    cr_assert_geq (dirty_of (t, name), 64 * gran, "%s lost writes", name);
  }
  cr_assert_eq (dbm_tracker_close (t, true, &err), 0, "%s", err.msg);
}
