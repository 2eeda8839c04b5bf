/* cbw — plugin/chain/tests/test_overlay_chain.c: the overlay chain engine
 * against an in-memory model of the disk: randomised writes, zeroes,
 * snapshots and commits (active/intermediate, make-empty/delete, with
 * concurrent writers), reopen, I/O errors and cancel during commit, and bad
 * requests.  After every step the disk read through the engine must equal
 * the model.  The model is a plain byte array updated by the test itself.
 * Locking: the concurrent tests give each writer thread its own region of
 * the model. */
#include <pthread.h>
#include <sys/stat.h>

#include "chain_test_util.h"

#define MAXL 8

struct rt {
  char dir[256], chain[512];
  uint64_t size;
  uint32_t cs;
  unsigned char *model;
  struct ovc *c;
  unsigned nlayers;       /* model of the overlay count */
  uint64_t rs;            /* PRNG state */
};

static void
rt_open (struct rt *t)
{
  struct cbw_err err;
  t->c = ovc_open (t->chain, NULL, NULL, &err);
  cr_assert_not_null (t->c, "open: %s", err.msg);
}

static void
rt_init (struct rt *t, uint64_t size, uint32_t cs, uint64_t seed)
{
  memset (t, 0, sizeof *t);
  t->size = size;
  t->cs = cs;
  t->rs = seed;
  tu_mkdtemp (t->dir, sizeof t->dir);
  tu_mkdisk (t->dir, size, cs, seed, &t->model, t->chain, sizeof t->chain);
  rt_open (t);
}

static void
rt_fini (struct rt *t)
{
  ovc_close (t->c);
  free (t->model);
  tu_rmrf (t->dir);
}

static void
rt_check (struct rt *t, const char *what)
{
  uint64_t d = tu_diff (t->c, t->model, t->size);
  cr_assert_eq (d, UINT64_MAX, "%s: disk differs from the model at offset %lu",
                what, (unsigned long) d);
  cr_assert_eq (ovc_nlayers (t->c), t->nlayers, "%s: %u layers, model says %u",
                what, ovc_nlayers (t->c), t->nlayers);
}

/* A random request: mixes cluster-aligned, sector-aligned and odd ones. */
static void
rand_range (struct rt *t, uint64_t *off, uint32_t *len)
{
  uint64_t r = tu_rand (&t->rs) % 4;
  uint64_t maxlen = 4 * (uint64_t) t->cs + 1000;
  uint64_t o, l;
  if (r == 0) {               /* cluster aligned */
    uint64_t ncl = (t->size + t->cs - 1) / t->cs;
    o = (tu_rand (&t->rs) % ncl) * t->cs;
    l = (1 + tu_rand (&t->rs) % 3) * (uint64_t) t->cs;
  } else if (r == 1) {        /* sector aligned */
    o = (tu_rand (&t->rs) % (t->size / 512)) * 512;
    l = (1 + tu_rand (&t->rs) % (maxlen / 512)) * 512;
  } else {
    o = tu_rand (&t->rs) % t->size;
    l = 1 + tu_rand (&t->rs) % maxlen;
  }
  if (o >= t->size) o = t->size - 1;
  if (l > t->size - o) l = t->size - o;
  *off = o;
  *len = (uint32_t) l;
}

static void
do_write (struct rt *t, struct ovc *c)
{
  struct cbw_err err;
  uint64_t off;
  uint32_t len;
  rand_range (t, &off, &len);
  unsigned char *buf = malloc (len);
  tu_fill (buf, len, tu_rand (&t->rs));
  cr_assert_eq (ovc_pwrite (c, buf, len, off, tu_rand (&t->rs) % 8 == 0, &err), 0,
                "write: %s", err.msg);
  memcpy (t->model + off, buf, len);
  free (buf);
}

static void
do_zero (struct rt *t, struct ovc *c)
{
  struct cbw_err err;
  uint64_t off;
  uint32_t len;
  rand_range (t, &off, &len);
  cr_assert_eq (ovc_zero (c, len, off, false, &err), 0, "zero: %s", err.msg);
  memset (t->model + off, 0, len);
}

static void
do_snapshot (struct rt *t)
{
  struct cbw_err err;
  char *name = NULL;
  cr_assert_eq (ovc_snapshot (t->c, "rnd", &name, &err), 0, "snapshot: %s", err.msg);
  cr_assert_not_null (name);
  free (name);
  t->nlayers++;
}

static void
do_commit (struct rt *t, unsigned lo, unsigned hi, enum cbw_commit_mode mode,
           int concurrent_writes)
{
  struct cbw_err err;
  cr_assert_eq (ovc_commit_start (t->c, lo, hi, mode, 0, &err), 0,
                "commit %u..%u: %s", lo, hi, err.msg);
  /* Guest writes continue during the commit (mirrored if active). */
  for (int i = 0; i < concurrent_writes; i++) {
    if (tu_rand (&t->rs) % 4 == 0) do_zero (t, t->c);
    else do_write (t, t->c);
  }
  cr_assert_eq (ovc_commit_wait (t->c, &err), 0, "commit %u..%u wait: %s",
                lo, hi, err.msg);
  if (mode == CBW_COMMIT_DELETE)
    t->nlayers -= hi - lo + 1;
}

static void
randomised (uint64_t seed, uint64_t size, uint32_t cs, int steps)
{
  struct rt t;
  char what[128];
  rt_init (&t, size, cs, seed);
  rt_check (&t, "initial");
  for (int step = 0; step < steps; step++) {
    uint64_t r = tu_rand (&t.rs) % 100;
    if (r < 45) {
      do_write (&t, t.c);
      snprintf (what, sizeof what, "seed %lu step %d write", (unsigned long) seed, step);
    } else if (r < 55) {
      do_zero (&t, t.c);
      snprintf (what, sizeof what, "seed %lu step %d zero", (unsigned long) seed, step);
    } else if (r < 72) {
      if (t.nlayers >= MAXL) continue;
      do_snapshot (&t);
      snprintf (what, sizeof what, "seed %lu step %d snapshot", (unsigned long) seed, step);
    } else if (r < 94) {
      if (t.nlayers == 0) continue;
      unsigned hi = 1 + (unsigned) (tu_rand (&t.rs) % t.nlayers);
      unsigned lo = 1 + (unsigned) (tu_rand (&t.rs) % hi);
      enum cbw_commit_mode m = tu_rand (&t.rs) % 2 ? CBW_COMMIT_DELETE : CBW_COMMIT_MAKE_EMPTY;
      int w = (int) (tu_rand (&t.rs) % 6);
      do_commit (&t, lo, hi, m, w);
      snprintf (what, sizeof what, "seed %lu step %d commit %u..%u/%u %s +%d writes",
                (unsigned long) seed, step, lo, hi, t.nlayers, cbw_commit_mode_name (m), w);
    } else if (r < 97) {
      struct cbw_err err;
      cr_assert_eq (ovc_flush (t.c, &err), 0, "%s", err.msg);
      continue;
    } else {
      ovc_close (t.c);
      rt_open (&t);
      snprintf (what, sizeof what, "seed %lu step %d reopen", (unsigned long) seed, step);
    }
    rt_check (&t, what);
  }
  /* Commit everything into the base: the raw base file is the disk. */
  if (t.nlayers > 0)
    do_commit (&t, 1, t.nlayers, CBW_COMMIT_DELETE, 3);
  rt_check (&t, "final full commit");
  ovc_close (t.c);
  t.c = NULL;
  char p[600];
  snprintf (p, sizeof p, "%s/base.img", t.dir);
  tu_file_equals (p, t.model, t.size);
  rt_open (&t);
  rt_check (&t, "reopen after final commit");
  rt_fini (&t);
}

Test (chain, randomised_64k) { randomised (1, 3 * 1024 * 1024 + 12345, 65536, 300); }
Test (chain, randomised_4k) { randomised (2, 1024 * 1024 + 512, 4096, 300); }
Test (chain, randomised_seeds)
{
  for (uint64_t s = 10; s < 16; s++)
    randomised (s, 512 * 1024 + 7, 4096, 120);
}

/* The same random scripts with other commit copy tunings: windows of a few
 * clusters copied by several threads, with and without copy_file_range and
 * the writeback kick (the defaults are covered above). */
Test (chain, randomised_commit_tunings)
{
  static const struct { uint64_t chunk_cl; unsigned workers, flags; } tn[] = {
    { 1, 4, 0 },
    { 3, 3, OVC_TUNE_NO_COPY_FILE_RANGE },
    { 5, 1, OVC_TUNE_NO_WRITEBACK_KICK },
    { 7, 2, OVC_TUNE_NO_COPY_FILE_RANGE | OVC_TUNE_NO_WRITEBACK_KICK },
  };
  for (unsigned i = 0; i < sizeof tn / sizeof tn[0]; i++) {
    ovc_set_commit_tuning (tn[i].chunk_cl * 4096, tn[i].workers, tn[i].flags);
    randomised (20 + i, 512 * 1024 + 4096 * 3 + 99, 4096, 100);
  }
  ovc_set_commit_tuning (0, 0, 0);
}

/* ---- commit of extents: adjacent runs served by different layers, gaps,
 * ZERO records, all-zero data, a partial last cluster; into an overlay and
 * into the base; checked against a per-layer cluster-state model. */

enum { M_U, M_D, M_Z };
#define XC 4096
#define XN 65                   /* clusters; the last one is partial */
#define XSIZE ((XN - 1) * XC + 1000)

struct xm {
  unsigned char st[5][XN];      /* layer 1..4 states (model) */
};

static int
count_fds (void)
{
  int n = 0;
  char p[64];
  for (int fd = 0; fd < 4096; fd++) {
    snprintf (p, sizeof p, "/proc/self/fd/%d", fd);
    if (access (p, F_OK) == 0) n++;
  }
  return n;
}

static void
x_write (struct rt *t, struct xm *m, unsigned layer, uint64_t c0, uint64_t n,
         bool zeros)
{
  struct cbw_err err;
  uint64_t off = c0 * XC, len = n * XC;
  if (off + len > XSIZE) len = XSIZE - off;
  unsigned char *buf = calloc (1, len);
  if (!zeros) tu_fill (buf, len, c0 * 1000 + layer);
  cr_assert_eq (ovc_pwrite (t->c, buf, (uint32_t) len, off, false, &err), 0, "%s", err.msg);
  memcpy (t->model + off, buf, len);
  free (buf);
  memset (&m->st[layer][c0], M_D, n);
}

static void
x_zero (struct rt *t, struct xm *m, unsigned layer, uint64_t c0, uint64_t n)
{
  struct cbw_err err;
  cr_assert_eq (ovc_zero (t->c, (uint32_t) (n * XC), c0 * XC, false, &err), 0, "%s", err.msg);
  memset (t->model + c0 * XC, 0, n * XC);
  memset (&m->st[layer][c0], M_Z, n);
}

static uint64_t
x_status_zero_bytes (struct ovc *c, unsigned index)
{
  struct json_object *o = ovc_status_json (c), *layers, *l, *v;
  cr_assert (json_object_object_get_ex (o, "layers", &layers));
  l = json_object_array_get_idx (layers, index);
  cr_assert (json_object_object_get_ex (l, "zero_bytes", &v));
  uint64_t r = (uint64_t) json_object_get_int64 (v);
  json_object_put (o);
  return r;
}

static void
extents_case (uint64_t chunk_cl, unsigned workers, unsigned flags)
{
  struct rt t;
  struct xm m;
  char p[600];
  int fds0 = count_fds ();

  memset (&m, M_U, sizeof m);
  ovc_set_commit_tuning (chunk_cl * XC, workers, flags);
  rt_init (&t, XSIZE, XC, 77 + flags);
  do_snapshot (&t);                       /* layer 1 */
  x_write (&t, &m, 1, 0, 3, false);       /* run 0..2 */
  x_zero (&t, &m, 1, 3, 3);               /* ZERO 3..5, adjacent to the run */
  x_write (&t, &m, 1, 6, 1, false);       /* adjacent again */
  x_write (&t, &m, 1, 10, 11, false);     /* after a gap 7..9 */
  x_zero (&t, &m, 1, 30, 4);
  x_write (&t, &m, 1, XN - 1, 1, false);  /* the partial last cluster */
  do_snapshot (&t);                       /* layer 2 */
  x_write (&t, &m, 2, 2, 2, false);       /* over the DATA/ZERO boundary */
  x_zero (&t, &m, 2, 12, 2);              /* ZERO inside a DATA run below */
  x_write (&t, &m, 2, 40, 1, false);      /* isolated */
  x_write (&t, &m, 2, 50, 2, true);       /* DATA that is all zeros */
  x_zero (&t, &m, 2, 33, 2);              /* ZERO over ZERO, one cluster past */
  do_snapshot (&t);                       /* layer 3 (top) */
  x_write (&t, &m, 3, 45, 1, false);
  rt_check (&t, "built");

  /* Intermediate commit 2..2 into overlay 1: the expected states of layer
   * 1 are computed from the model: what layer 2 holds wins; all-zero data
   * becomes ZERO. */
  do_commit (&t, 2, 2, CBW_COMMIT_DELETE, 0);
  for (unsigned cl = 0; cl < XN; cl++)
    if (m.st[2][cl] != M_U) {
      bool allz = true;
      uint64_t e = (cl + 1) * XC < XSIZE ? (cl + 1) * XC : XSIZE;
      for (uint64_t i = cl * XC; i < e; i++) if (t.model[i]) { allz = false; break; }
      m.st[1][cl] = m.st[2][cl] == M_Z || allz ? M_Z : M_D;
    }
  memcpy (m.st[2], m.st[3], XN);
  memset (m.st[3], M_U, XN);
  uint64_t want_z = 0;
  for (unsigned cl = 0; cl < XN; cl++)
    if (m.st[1][cl] == M_Z)
      want_z += (cl + 1) * XC < XSIZE ? XC : XSIZE - cl * XC;
  rt_check (&t, "after intermediate commit");
  cr_assert_eq (x_status_zero_bytes (t.c, 1), want_z, "layer 1 zero bytes %lu, model %lu",
                (unsigned long) x_status_zero_bytes (t.c, 1), (unsigned long) want_z);

  /* Active commit of everything into the base, guest writes meanwhile. */
  do_commit (&t, 1, 2, CBW_COMMIT_DELETE, 4);
  rt_check (&t, "after commit into the base");
  ovc_close (t.c);
  t.c = NULL;
  snprintf (p, sizeof p, "%s/base.img", t.dir);
  tu_file_equals (p, t.model, t.size);
  /* every file of the deleted layers was closed (their space freed) */
  cr_assert_eq (count_fds (), fds0, "open fds %d, before %d", count_fds (), fds0);
  rt_open (&t);
  rt_check (&t, "reopen");
  rt_fini (&t);
  ovc_set_commit_tuning (0, 0, 0);
}

Test (chain, commit_extents_zero_records)
{
  extents_case (0, 0, 0);                  /* production defaults: one window */
  extents_case (2, 3, 0);                  /* windows of 2 clusters, 3 threads */
  extents_case (4, 2, OVC_TUNE_NO_COPY_FILE_RANGE);   /* buffered fallback */
  extents_case (1, 1, OVC_TUNE_NO_WRITEBACK_KICK);
}

/* make-empty of the active top frees the top's old data after the resume,
 * while guest writes go on: a write that lands after the switch (here from
 * the hook right before the punching) must survive, every other cluster of
 * the top's data file is punched. */
static struct rt *punch_t;
static int punch_writes;
static int
punch_hook (const char *point, const char *path, void *opaque)
{
  (void) opaque;
  if (path || strcmp (point, "commit-punch") != 0)
    return 0;
  struct cbw_err err;
  unsigned char buf[3 * 4096];
  for (int i = 0; i < 3; i++) {      /* clusters 1, 9 and 17 (+ a partial one) */
    uint64_t off = (uint64_t) (1 + 8 * i) * 4096;
    uint32_t len = i == 2 ? 1000 : 4096;
    tu_fill (buf, len, 900 + i);
    cr_assert_eq (ovc_pwrite (punch_t->c, buf, len, off, false, &err), 0, "%s", err.msg);
    memcpy (punch_t->model + off, buf, len);
    punch_writes++;
  }
  return 0;
}

Test (chain, make_empty_active_top_keeps_writes_after_switch)
{
  struct rt t;
  struct cbw_err err;
  struct stat st;
  char p[700];
  rt_init (&t, 24 * 4096 + 100, 4096, 31);
  do_snapshot (&t);
  for (int i = 0; i < 40; i++) do_write (&t, t.c);
  cr_assert_eq (ovc_flush (t.c, &err), 0, "%s", err.msg);
  punch_t = &t;
  punch_writes = 0;
  ovc_set_test_hook (punch_hook, NULL);
  do_commit (&t, 1, 1, CBW_COMMIT_MAKE_EMPTY, 0);
  ovc_set_test_hook (NULL, NULL);
  cr_assert_eq (punch_writes, 3, "the punch hook ran %d writes", punch_writes);
  rt_check (&t, "after make-empty with writes during the release");
  /* The top holds exactly the 3 clusters written after the switch. */
  struct json_object *o = ovc_status_json (t.c), *layers, *l, *v;
  cr_assert (json_object_object_get_ex (o, "layers", &layers));
  l = json_object_array_get_idx (layers, 1);
  cr_assert (json_object_object_get_ex (l, "allocated_bytes", &v));
  cr_assert_eq (json_object_get_int64 (v), 3 * 4096);
  json_object_put (o);
  /* and its data file holds no more than those (the rest was punched;
   * file systems without hole punching keep the blocks: not checked) */
  struct json_object *o2 = ovc_status_json (t.c);
  json_object_object_get_ex (o2, "layers", &layers);
  l = json_object_array_get_idx (layers, 1);
  json_object_object_get_ex (l, "name", &v);
  snprintf (p, sizeof p, "%s/%s.data", t.dir, json_object_get_string (v));
  json_object_put (o2);
  cr_assert_eq (stat (p, &st), 0, "%s", p);
  int fd = open (p, O_RDWR);
  cr_assert_geq (fd, 0);
  bool can_punch = fallocate (fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                              (off_t) (t.size - 1), 1) == 0;
  close (fd);
  if (can_punch)
    cr_assert_leq ((uint64_t) st.st_blocks * 512, 4 * 4096,
                   "top data file still uses %lu bytes", (unsigned long) st.st_blocks * 512);
  ovc_close (t.c);
  rt_open (&t);
  rt_check (&t, "reopen");
  rt_fini (&t);
}

/* ---- concurrency: writers in disjoint regions while snapshots/commits run */

struct wr {
  struct rt *t;
  uint64_t base, len, seed;
  int n;
};

static void *
writer (void *arg)
{
  struct wr *w = arg;
  struct cbw_err err;
  uint64_t s = w->seed;
  unsigned char *buf = malloc (w->len);
  for (int i = 0; i < w->n; i++) {
    uint64_t o = tu_rand (&s) % w->len;
    uint64_t l = 1 + tu_rand (&s) % 20000;
    if (l > w->len - o) l = w->len - o;
    tu_fill (buf, l, tu_rand (&s));
    if (ovc_pwrite (w->t->c, buf, (uint32_t) l, w->base + o, false, &err) != 0) {
      fprintf (stderr, "writer: %s\n", err.msg);
      abort ();
    }
    memcpy (w->t->model + w->base + o, buf, l);
  }
  free (buf);
  return NULL;
}

Test (chain, concurrent_writers_with_operations)
{
  struct rt t;
  struct cbw_err err;
  rt_init (&t, 4 * 1024 * 1024, 65536, 77);
  for (int round = 0; round < 6; round++) {
    pthread_t th[4];
    struct wr w[4];
    /* regions start off cluster boundaries on purpose: writers share clusters */
    for (int i = 0; i < 4; i++) {
      w[i] = (struct wr) { &t, (uint64_t) i * (t.size / 4) + (i ? 1000 : 0),
                           t.size / 4 - 2000, 100 + (uint64_t) round * 10 + (uint64_t) i, 150 };
      cr_assert_eq (pthread_create (&th[i], NULL, writer, &w[i]), 0);
    }
    do_snapshot (&t);
    do_snapshot (&t);
    unsigned n = t.nlayers;
    cr_assert_eq (ovc_commit_start (t.c, round % 2 ? 1 : n - 1, n,
                                    round % 3 ? CBW_COMMIT_DELETE : CBW_COMMIT_MAKE_EMPTY,
                                    0, &err), 0, "%s", err.msg);
    for (int i = 0; i < 4; i++) pthread_join (th[i], NULL);
    cr_assert_eq (ovc_commit_wait (t.c, &err), 0, "%s", err.msg);
    if (round % 3) t.nlayers -= (round % 2 ? n : 2);
    rt_check (&t, "after concurrent round");
  }
  rt_fini (&t);
}

/* ---- status */

Test (chain, status_json)
{
  struct rt t;
  struct cbw_err err;
  rt_init (&t, 1024 * 1024, 65536, 5);
  do_snapshot (&t);
  unsigned char buf[65536];
  tu_fill (buf, sizeof buf, 9);
  cr_assert_eq (ovc_pwrite (t.c, buf, sizeof buf, 65536 * 3, false, &err), 0);
  cr_assert_eq (ovc_zero (t.c, 65536 * 2, 65536 * 5, false, &err), 0);
  struct json_object *o = ovc_status_json (t.c), *layers, *l1, *v;
  cr_assert (json_object_object_get_ex (o, "layers", &layers));
  cr_assert_eq (json_object_array_length (layers), 2);
  l1 = json_object_array_get_idx (layers, 1);
  cr_assert (json_object_object_get_ex (l1, "allocated_bytes", &v));
  cr_assert_eq (json_object_get_int64 (v), 65536);
  cr_assert (json_object_object_get_ex (l1, "zero_bytes", &v));
  cr_assert_eq (json_object_get_int64 (v), 2 * 65536);
  cr_assert (json_object_object_get_ex (l1, "writable", &v) && json_object_get_boolean (v));
  json_object_put (o);
  memcpy (t.model + 65536 * 3, buf, sizeof buf);
  memset (t.model + 65536 * 5, 0, 65536 * 2);
  do_commit (&t, 1, 1, CBW_COMMIT_MAKE_EMPTY, 0);
  o = ovc_status_json (t.c);
  struct json_object *op;
  cr_assert (json_object_object_get_ex (o, "operation", &op));
  cr_assert (json_object_object_get_ex (op, "state", &v));
  cr_assert_str_eq (json_object_get_string (v), "completed");
  cr_assert (json_object_object_get_ex (op, "done", &v));
  cr_assert_eq (json_object_get_int64 (v), 3 * 65536);
  json_object_object_get_ex (o, "layers", &layers);
  l1 = json_object_array_get_idx (layers, 1);
  json_object_object_get_ex (l1, "allocated_bytes", &v);
  cr_assert_eq (json_object_get_int64 (v), 0, "make-empty left data");
  json_object_put (o);
  rt_check (&t, "after make-empty");
  rt_fini (&t);
}

/* ---- errors during commit, cancel, speed */

static int fail_after;
static int
fail_hook (const char *point, const char *path, void *opaque)
{
  (void) opaque;
  if (path) return 0;
  /* a window (commit-copy) or a segment copied into the base inside one */
  if ((strcmp (point, "commit-copy") == 0 || strcmp (point, "commit-copy-range") == 0) &&
      fail_after-- == 0)
    return 1;
  return 0;
}

Test (chain, io_error_stops_commit_chain_stays_valid)
{
  struct rt t;
  struct cbw_err err;
  rt_init (&t, 4 * 1024 * 1024, 65536, 8);
  do_snapshot (&t);
  for (int i = 0; i < 30; i++) do_write (&t, t.c);
  do_snapshot (&t);
  for (int i = 0; i < 30; i++) do_write (&t, t.c);
  fail_after = 1;
  ovc_set_test_hook (fail_hook, NULL);
  cr_assert_eq (ovc_commit_start (t.c, 1, 2, CBW_COMMIT_DELETE, 0, &err), 0);
  for (int i = 0; i < 10; i++) do_write (&t, t.c);
  cr_assert_eq (ovc_commit_wait (t.c, &err), -1);
  ovc_set_test_hook (NULL, NULL);
  cr_assert_eq (err.errnum, EIO);
  cr_assert (strstr (err.msg, "injected I/O error") && strstr (err.msg, "commit"), "%s", err.msg);
  struct json_object *o = ovc_status_json (t.c), *op, *v;
  cr_assert (json_object_object_get_ex (o, "operation", &op));
  json_object_object_get_ex (op, "state", &v);
  cr_assert_str_eq (json_object_get_string (v), "failed");
  json_object_object_get_ex (op, "error", &v);
  cr_assert (strstr (json_object_get_string (v), "injected") != NULL);
  json_object_put (o);
  rt_check (&t, "after failed commit");
  /* the disk keeps working, no reopen needed, and the commit can be re-run */
  for (int i = 0; i < 10; i++) do_write (&t, t.c);
  do_commit (&t, 1, 2, CBW_COMMIT_DELETE, 2);
  rt_check (&t, "after re-run commit");
  ovc_close (t.c);
  rt_open (&t);
  rt_check (&t, "reopen");
  rt_fini (&t);
}

static pthread_t main_thread;
static int
mirror_fail_hook (const char *point, const char *path, void *opaque)
{
  (void) opaque;
  return !path && strcmp (point, "write-lower") == 0 &&
    pthread_equal (pthread_self (), main_thread);
}

Test (chain, mirror_failure_fails_commit_not_guest)
{
  struct rt t;
  struct cbw_err err;
  rt_init (&t, 4 * 1024 * 1024, 65536, 13);
  do_snapshot (&t);
  for (int i = 0; i < 40; i++) do_write (&t, t.c);
  main_thread = pthread_self ();
  ovc_set_test_hook (mirror_fail_hook, NULL);
  /* slow commit: guest writes happen while it runs */
  cr_assert_eq (ovc_commit_start (t.c, 1, 1, CBW_COMMIT_DELETE, 1 << 20, &err), 0);
  for (int i = 0; i < 5; i++) do_write (&t, t.c);   /* must succeed */
  cr_assert_eq (ovc_commit_wait (t.c, &err), -1, "commit finished despite a failed mirror");
  ovc_set_test_hook (NULL, NULL);
  cr_assert (strstr (err.msg, "mirroring a guest write") != NULL, "%s", err.msg);
  rt_check (&t, "after mirror failure");
  do_commit (&t, 1, 1, CBW_COMMIT_DELETE, 3);
  rt_check (&t, "after re-run");
  rt_fini (&t);
}

Test (chain, cancel_and_speed_limit)
{
  struct rt t;
  struct cbw_err err;
  rt_init (&t, 8 * 1024 * 1024, 65536, 9);
  do_snapshot (&t);
  /* every other cluster: many extents (the speed limit spans all of them) */
  unsigned char *buf = malloc (65536);
  for (uint64_t off = 0; off < t.size; off += 2 * 65536) {
    tu_fill (buf, 65536, off);
    cr_assert_eq (ovc_pwrite (t.c, buf, 65536, off, false, &err), 0);
    memcpy (t.model + off, buf, 65536);
  }
  free (buf);
  do_snapshot (&t);
  struct timespec t0, t1;
  clock_gettime (CLOCK_MONOTONIC, &t0);
  /* 4 MiB/s: 4 MiB would take 1 s; cancel after ~0.3 s */
  cr_assert_eq (ovc_commit_start (t.c, 1, 1, CBW_COMMIT_DELETE, 4 << 20, &err), 0);
  cr_assert_eq (ovc_commit_start (t.c, 1, 2, CBW_COMMIT_DELETE, 0, &err), -1);
  cr_assert_eq (err.errnum, EBUSY, "%s", err.msg);
  cr_assert_eq (ovc_snapshot (t.c, NULL, NULL, &err), -1);
  cr_assert_eq (err.errnum, EBUSY, "%s", err.msg);
  usleep (300000);
  struct json_object *o = ovc_status_json (t.c), *op, *v;
  json_object_object_get_ex (o, "operation", &op);
  json_object_object_get_ex (op, "done", &v);
  int64_t done = json_object_get_int64 (v);
  json_object_object_get_ex (op, "total", &v);
  cr_assert_eq (json_object_get_int64 (v), (int64_t) t.size / 2);
  cr_assert (done > 0 && done < (int64_t) t.size / 4, "speed limit not applied: done %ld",
             (long) done);
  json_object_put (o);
  cr_assert_eq (ovc_commit_cancel (t.c, &err), 0);
  cr_assert_eq (ovc_commit_wait (t.c, &err), -1);
  clock_gettime (CLOCK_MONOTONIC, &t1);
  cr_assert_eq (err.errnum, ECANCELED, "%s", err.msg);
  cr_assert ((t1.tv_sec - t0.tv_sec) < 2, "cancel took too long");
  rt_check (&t, "after cancel");
  /* speed can be lifted while running */
  cr_assert_eq (ovc_commit_start (t.c, 1, 1, CBW_COMMIT_DELETE, 1 << 20, &err), 0);
  cr_assert_eq (ovc_commit_set_speed (t.c, 0, &err), 0);
  cr_assert_eq (ovc_commit_wait (t.c, &err), 0, "%s", err.msg);
  t.nlayers--;
  rt_check (&t, "after commit");
  rt_fini (&t);
}

/* ---- bad requests */

Test (chain, bad_requests)
{
  struct rt t;
  struct cbw_err err;
  char buf[512] = { 0 };
  rt_init (&t, 1024 * 1024, 65536, 10);
  cr_assert_eq (ovc_commit_start (t.c, 1, 1, CBW_COMMIT_DELETE, 0, &err), -1);
  cr_assert_eq (err.errnum, EINVAL);
  cr_assert (strstr (err.msg, "not in the chain") != NULL, "%s", err.msg);
  do_snapshot (&t);
  do_snapshot (&t);
  cr_assert_eq (ovc_commit_start (t.c, 0, 1, CBW_COMMIT_DELETE, 0, &err), -1);
  cr_assert_eq (ovc_commit_start (t.c, 2, 1, CBW_COMMIT_DELETE, 0, &err), -1);
  cr_assert_eq (ovc_commit_start (t.c, 1, 3, CBW_COMMIT_DELETE, 0, &err), -1);
  cr_assert (strstr (err.msg, "1..3 is not in the chain (overlays are 1..2") != NULL, "%s", err.msg);
  cr_assert_eq (ovc_pread (t.c, buf, 512, t.size - 511, &err), -1);
  cr_assert_eq (err.errnum, EINVAL);
  cr_assert_eq (ovc_pwrite (t.c, buf, 512, UINT64_MAX - 100, false, &err), -1);
  cr_assert_eq (ovc_zero (t.c, 0, 0, false, &err), -1);
  cr_assert_eq (ovc_create (t.chain, "base.img", 65536, &err), -1);
  cr_assert_eq (err.errnum, EEXIST);
  rt_check (&t, "after bad requests");
  rt_fini (&t);
}

Test (chain, open_refuses_broken_chains)
{
  struct rt t;
  struct cbw_err err;
  char p[600], q[600];
  rt_init (&t, 1024 * 1024, 65536, 11);
  do_snapshot (&t);
  do_snapshot (&t);
  ovc_close (t.c);
  t.c = NULL;
  /* find the first overlay's data file and make it the wrong size */
  struct cbw_chain_desc d;
  cr_assert_eq (cbw_chain_desc_load (t.chain, &d, &err), 0);
  snprintf (p, sizeof p, "%s/%s.data", t.dir, d.layers[0]);
  cr_assert_eq (truncate (p, 4096), 0);
  cr_assert_null (ovc_open (t.chain, NULL, NULL, &err));
  cr_assert (strstr (err.msg, "wrong size") != NULL, "%s", err.msg);
  cr_assert_eq (truncate (p, (off_t) t.size), 0);
  /* a missing top layer */
  snprintf (p, sizeof p, "%s/%s", t.dir, d.layers[1]);
  snprintf (q, sizeof q, "%s/%s.hidden", t.dir, d.layers[1]);
  cr_assert_eq (rename (p, q), 0);
  cr_assert_null (ovc_open (t.chain, NULL, NULL, &err));
  cr_assert_eq (err.errnum, ENOENT, "%s", err.msg);
  cr_assert_eq (rename (q, p), 0);
  /* corrupt chain descriptor */
  int fd = open (t.chain, O_WRONLY);
  cr_assert_eq (pwrite (fd, "X", 1, 20), 1);
  close (fd);
  cr_assert_null (ovc_open (t.chain, NULL, NULL, &err));
  cr_assert (strstr (err.msg, "disk.chain") != NULL, "%s", err.msg);
  cbw_chain_desc_free (&d);
  free (t.model);
  tu_rmrf (t.dir);
}

/* ---- control commands through the one-table dispatcher */

static int h_snap (void *d, struct json_object *a, struct cbw_ctl_reply *r) { return ovc_ctl_snapshot (d, a, r); }
static int h_commit (void *d, struct json_object *a, struct cbw_ctl_reply *r) { return ovc_ctl_commit (d, a, r); }
static int h_cancel (void *d, struct json_object *a, struct cbw_ctl_reply *r) { return ovc_ctl_commit_cancel (d, a, r); }
static int h_speed (void *d, struct json_object *a, struct cbw_ctl_reply *r) { return ovc_ctl_commit_speed (d, a, r); }
static int h_status (void *d, struct json_object *a, struct cbw_ctl_reply *r) { return ovc_ctl_status (d, a, r); }
static int h_list (void *d, struct json_object *a, struct cbw_ctl_reply *r) { return ovc_ctl_list (d, a, r); }

static const struct cbw_ctl_command cmds[] = {
  { "snapshot", h_snap, ovc_ctl_snapshot_args, OVC_CTL_DOC_SNAPSHOT, "" },
  { "commit", h_commit, ovc_ctl_commit_args, OVC_CTL_DOC_COMMIT, "" },
  { "commit-cancel", h_cancel, ovc_ctl_no_args, OVC_CTL_DOC_CANCEL, "" },
  { "commit-speed", h_speed, ovc_ctl_speed_args, OVC_CTL_DOC_SPEED, "" },
  { "status", h_status, ovc_ctl_no_args, OVC_CTL_DOC_STATUS, "" },
  { "list", h_list, ovc_ctl_no_args, OVC_CTL_DOC_LIST, "" },
  { NULL },
};
static const struct cbw_ctl_table table = { "chain", cmds };

static struct json_object *
call (struct ovc *c, const char *line)
{
  return ctl_test_call (&table, c, line);
}


Test (chain, control_commands)
{
  struct rt t;
  struct cbw_err err;
  struct json_object *o, *ret, *v;
  rt_init (&t, 1024 * 1024, 65536, 12);
  o = call (t.c, "{\"execute\":\"commit\"}");
  cr_assert_str_eq (ctl_test_err_class (o), "InvalidParameter");
  json_object_put (o);
  o = call (t.c, "{\"execute\":\"snapshot\",\"arguments\":{\"label\":\"one\"}}");
  cr_assert_null (ctl_test_err_class (o));
  cr_assert (json_object_object_get_ex (o, "return", &ret));
  json_object_object_get_ex (ret, "index", &v);
  cr_assert_eq (json_object_get_int (v), 1);
  json_object_put (o);
  t.nlayers = 1;
  do_write (&t, t.c);
  o = call (t.c, "{\"execute\":\"snapshot\"}");
  json_object_put (o);
  t.nlayers = 2;
  do_write (&t, t.c);
  o = call (t.c, "{\"execute\":\"commit\",\"arguments\":{\"base\":2,\"top\":2}}");
  cr_assert_str_eq (ctl_test_err_class (o), "InvalidParameter");
  json_object_put (o);
  o = call (t.c, "{\"execute\":\"commit\",\"arguments\":{\"top\":5}}");
  cr_assert_str_eq (ctl_test_err_class (o), "InvalidParameter");
  json_object_put (o);
  o = call (t.c, "{\"execute\":\"commit\",\"arguments\":{\"mode\":\"squash\"}}");
  cr_assert_str_eq (ctl_test_err_class (o), "InvalidParameter");
  json_object_put (o);
  o = call (t.c, "{\"execute\":\"commit-cancel\"}");
  cr_assert_str_eq (ctl_test_err_class (o), "NotFound");
  json_object_put (o);
  o = call (t.c, "{\"execute\":\"commit\",\"arguments\":{\"base\":0,\"mode\":\"make-empty\",\"speed\":1}}");
  cr_assert_null (ctl_test_err_class (o), "%s", json_object_to_json_string (o));
  json_object_put (o);
  o = call (t.c, "{\"execute\":\"snapshot\"}");
  cr_assert_str_eq (ctl_test_err_class (o), "Busy");
  json_object_put (o);
  o = call (t.c, "{\"execute\":\"commit-speed\",\"arguments\":{\"speed\":0}}");
  cr_assert_null (ctl_test_err_class (o));
  json_object_put (o);
  cr_assert_eq (ovc_commit_wait (t.c, &err), 0, "%s", err.msg);
  o = call (t.c, "{\"execute\":\"list\"}");
  json_object_object_get_ex (o, "return", &ret);
  json_object_object_get_ex (ret, "layers", &v);
  cr_assert_eq (json_object_array_length (v), 3);
  json_object_put (o);
  o = call (t.c, "{\"execute\":\"status\"}");
  json_object_object_get_ex (o, "return", &ret);
  cr_assert (json_object_object_get_ex (ret, "operation", &v));
  json_object_object_get_ex (v, "state", &v);
  cr_assert_str_eq (json_object_get_string (v), "completed");
  json_object_put (o);
  rt_check (&t, "after control commands");
  char *md = cbw_ctl_docs_markdown (&table);
  cr_assert (md && strstr (md, "make-empty"));
  free (md);
  rt_fini (&t);
}

Test (chain, readonly_open)
{
  struct rt t;
  struct cbw_err err;
  char buf[4096];
  rt_init (&t, 1024 * 1024, 65536, 14);
  do_snapshot (&t);
  do_write (&t, t.c);
  ovc_close (t.c);
  struct ovc_open_opts o = { .readonly = true };
  t.c = ovc_open (t.chain, &o, NULL, &err);
  cr_assert_not_null (t.c, "%s", err.msg);
  rt_check (&t, "readonly");
  cr_assert_eq (ovc_pwrite (t.c, buf, sizeof buf, 0, false, &err), -1);
  cr_assert_eq (err.errnum, EROFS);
  cr_assert_eq (ovc_snapshot (t.c, NULL, NULL, &err), -1);
  cr_assert_eq (ovc_commit_start (t.c, 1, 1, CBW_COMMIT_DELETE, 0, &err), -1);
  cr_assert_eq (err.errnum, EROFS);
  cr_assert_eq (ovc_create ("/nonexistent-dir/x.chain", "base.img", 65536, &err), -1);
  char p[600];
  snprintf (p, sizeof p, "%s/other.chain", t.dir);
  cr_assert_eq (ovc_create (p, "base.img", 3000, &err), -1);
  cr_assert (strstr (err.msg, "cluster size") != NULL, "%s", err.msg);
  rt_fini (&t);
}
