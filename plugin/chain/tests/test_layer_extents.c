/* cbw — plugin/chain/tests/test_layer_extents.c: the `layer-extents`
 * control command and ovc_layer_extents() (what `cbw backup begin --mode
 * top` reads) against a model of the top overlay's cluster states kept by
 * the test itself: random writes (any alignment: touched clusters become
 * DATA) and write-zeroes (whole clusters become ZERO, partial edges DATA
 * unless already ZERO), then the runs are read back in small pages, whole
 * and for unaligned sub-ranges, and compared with the runs computed from the
 * model.  Also: a frozen lower layer after a second snapshot, the JSON reply
 * through the one-table dispatcher, and bad requests.  Single-threaded.
 */
#include <time.h>

#include <json-c/json.h>

#include "chain_test_util.h"

enum { U = 0, D = 1, Z = 2 };

struct mt {
  char dir[256], chain[512];
  uint64_t size;
  uint32_t cs;
  unsigned char *base;
  unsigned char *st;              /* model: state of each top cluster */
  uint64_t ncl;
  struct ovc *c;
};

static void
mt_init (struct mt *t, uint64_t size, uint32_t cs, uint64_t seed)
{
  struct cbw_err err;
  memset (t, 0, sizeof *t);
  t->size = size;
  t->cs = cs;
  t->ncl = (size + cs - 1) / cs;
  tu_mkdtemp (t->dir, sizeof t->dir);
  tu_mkdisk (t->dir, size, cs, seed, &t->base, t->chain, sizeof t->chain);
  t->st = calloc (t->ncl, 1);
  cr_assert_not_null (t->st);
  t->c = ovc_open (t->chain, NULL, NULL, &err);
  cr_assert_not_null (t->c, "%s", err.msg);
}

static void
mt_fini (struct mt *t)
{
  ovc_close (t->c);
  free (t->base);
  free (t->st);
  tu_rmrf (t->dir);
}

static uint64_t cl_s (struct mt *t, uint64_t cl) { return cl * t->cs; }
static uint64_t cl_e (struct mt *t, uint64_t cl)
{
  uint64_t e = (cl + 1) * t->cs;
  return e < t->size ? e : t->size;
}

static void
m_write (struct mt *t, uint64_t off, uint64_t len)
{
  struct cbw_err err;
  char *buf = malloc (len);
  cr_assert_not_null (buf);
  tu_fill (buf, len, off ^ len);
  cr_assert_eq (ovc_pwrite (t->c, buf, (uint32_t) len, off, false, &err), 0, "%s", err.msg);
  free (buf);
  for (uint64_t cl = off / t->cs; cl <= (off + len - 1) / t->cs; cl++)
    t->st[cl] = D;
}

static void
m_zero (struct mt *t, uint64_t off, uint64_t len)
{
  struct cbw_err err;
  cr_assert_eq (ovc_zero (t->c, (uint32_t) len, off, false, &err), 0, "%s", err.msg);
  for (uint64_t cl = off / t->cs; cl <= (off + len - 1) / t->cs; cl++) {
    bool full = off <= cl_s (t, cl) && off + len >= cl_e (t, cl);
    if (full)
      t->st[cl] = Z;
    else if (t->st[cl] != Z)
      t->st[cl] = D;
  }
}

/* Expected runs in [off, off+len) from the model. */
static size_t
model_runs (struct mt *t, uint64_t off, uint64_t len, struct ovc_extent *out)
{
  size_t n = 0;
  uint64_t end = off + len;
  for (uint64_t cl = 0; cl < t->ncl; cl++) {
    if (t->st[cl] == U)
      continue;
    uint64_t s = cl_s (t, cl), e = cl_e (t, cl);
    if (e <= off || s >= end)
      continue;
    if (s < off) s = off;
    if (e > end) e = end;
    bool z = t->st[cl] == Z;
    if (n && out[n - 1].offset + out[n - 1].length == s && out[n - 1].zero == z)
      out[n - 1].length += e - s;
    else
      out[n++] = (struct ovc_extent) { s, e - s, z };
  }
  return n;
}

/* Read every run of the top in [off, off+len) in pages of `page`. */
static size_t
read_runs (struct mt *t, uint64_t off, uint64_t len, size_t page, struct ovc_extent *out,
           size_t cap)
{
  struct cbw_err err;
  size_t total = 0;
  uint64_t pos = off, end = off + len;
  char *name0 = NULL;
  unsigned pages = 0;
  for (;;) {
    size_t n;
    uint64_t next;
    unsigned k;
    char *name;
    struct ovc_extent *buf = malloc (page * sizeof *buf);
    cr_assert_eq (ovc_layer_extents (t->c, 0, pos, end - pos, page, buf, &n, &next, &k,
                                     &name, &err), 0, "%s", err.msg);
    cr_assert_leq (n, page);
    cr_assert_eq (k, ovc_nlayers (t->c));
    if (name0 == NULL)
      name0 = name;
    else {
      cr_assert_str_eq (name, name0);
      free (name);
    }
    for (size_t i = 0; i < n; i++) {
      cr_assert_geq (buf[i].offset, pos);
      cr_assert_leq (buf[i].offset + buf[i].length, end);
      cr_assert_gt (buf[i].length, 0);
      /* a page boundary may split nothing: runs continue across pages only
       * as separate entries, which we join like the model does */
      if (total && out[total - 1].offset + out[total - 1].length == buf[i].offset &&
          out[total - 1].zero == buf[i].zero)
        out[total - 1].length += buf[i].length;
      else {
        cr_assert_lt (total, cap);
        out[total++] = buf[i];
      }
    }
    free (buf);
    pages++;
    if (next == UINT64_MAX)
      break;
    cr_assert_eq (n, page, "a cut page must be full");
    cr_assert_gt (next, pos, "paging does not advance");
    pos = next;
  }
  free (name0);
  return total;
}

static void
check_range (struct mt *t, uint64_t off, uint64_t len, size_t page, const char *what)
{
  size_t cap = t->ncl + 2;
  struct ovc_extent *want = calloc (cap, sizeof *want), *got = calloc (cap, sizeof *got);
  size_t nw = model_runs (t, off, len, want);
  size_t ng = read_runs (t, off, len, page, got, cap);
  cr_assert_eq (ng, nw, "%s [%lu,+%lu) page %zu: %zu runs, model has %zu", what,
                (unsigned long) off, (unsigned long) len, page, ng, nw);
  for (size_t i = 0; i < nw; i++)
    cr_assert (got[i].offset == want[i].offset && got[i].length == want[i].length &&
               got[i].zero == want[i].zero,
               "%s run %zu: got %lu+%lu%s, model %lu+%lu%s", what, i,
               (unsigned long) got[i].offset, (unsigned long) got[i].length,
               got[i].zero ? " zero" : "", (unsigned long) want[i].offset,
               (unsigned long) want[i].length, want[i].zero ? " zero" : "");
  free (want);
  free (got);
}

static void
random_ops (struct mt *t, uint64_t *rs, int n)
{
  for (int i = 0; i < n; i++) {
    uint64_t r = tu_rand (rs);
    uint64_t off = tu_rand (rs) % t->size;
    uint64_t len = 1 + tu_rand (rs) % (4 * t->cs);
    if (len > t->size - off)
      len = t->size - off;
    if (r % 3 == 0)
      m_zero (t, off, len);
    else
      m_write (t, off, len);
  }
}

Test (layer_extents, random_writes_and_zeroes_paged)
{
  struct mt t;
  struct cbw_err err;
  uint64_t rs = 42;
  mt_init (&t, 3 * 1024 * 1024 + 12345, 4096, 7);
  cr_assert_eq (ovc_snapshot (t.c, "top", NULL, &err), 0, "%s", err.msg);
  check_range (&t, 0, t.size, 5, "empty top");
  random_ops (&t, &rs, 120);
  /* the last (partial) cluster, written as zero to the end of the disk */
  m_zero (&t, t.size - 100, 100);
  check_range (&t, 0, t.size, 1, "whole disk, page 1");
  check_range (&t, 0, t.size, 7, "whole disk, page 7");
  check_range (&t, 0, t.size, OVC_EXTENTS_MAX, "whole disk, one page");
  for (int i = 0; i < 20; i++) {
    uint64_t off = tu_rand (&rs) % t.size;
    uint64_t len = tu_rand (&rs) % (t.size - off + 1);
    check_range (&t, off, len, 1 + tu_rand (&rs) % 9, "sub-range");
  }
  /* survives a reopen (the maps were flushed) */
  cr_assert_eq (ovc_flush (t.c, &err), 0, "%s", err.msg);
  ovc_close (t.c);
  t.c = ovc_open (t.chain, NULL, NULL, &err);
  cr_assert_not_null (t.c, "%s", err.msg);
  check_range (&t, 0, t.size, 3, "after reopen");
  /* a second snapshot freezes the layer: layer 1 keeps its runs, the new
   * top is empty */
  cr_assert_eq (ovc_snapshot (t.c, NULL, NULL, &err), 0, "%s", err.msg);
  size_t n;
  uint64_t next;
  unsigned k;
  struct ovc_extent x[4];
  cr_assert_eq (ovc_layer_extents (t.c, 0, 0, t.size, 4, x, &n, &next, &k, NULL, &err), 0);
  cr_assert_eq (n, 0);
  cr_assert_eq (k, 2);
  cr_assert_eq (next, UINT64_MAX);
  size_t cap = t.ncl + 2;
  struct ovc_extent *want = calloc (cap, sizeof *want), *got = calloc (cap, sizeof *got);
  size_t nw = model_runs (&t, 0, t.size, want);
  cr_assert_gt (nw, 4, "vacuous: too few runs in the model");
  cr_assert_eq (ovc_layer_extents (t.c, 1, 0, t.size, cap, got, &n, &next, &k, NULL, &err), 0);
  cr_assert_eq (k, 1);
  cr_assert_eq (n, nw);
  for (size_t i = 0; i < nw; i++)
    cr_assert (got[i].offset == want[i].offset && got[i].length == want[i].length &&
               got[i].zero == want[i].zero, "layer 1 run %zu", i);
  free (want);
  free (got);
  mt_fini (&t);
}

/* The test can fail: a model that forgets one write must not match. */
Test (layer_extents, detects_a_missing_write)
{
  struct mt t;
  struct cbw_err err;
  mt_init (&t, 1024 * 1024, 65536, 3);
  cr_assert_eq (ovc_snapshot (t.c, NULL, NULL, &err), 0, "%s", err.msg);
  m_write (&t, 100, 10);
  m_write (&t, 5 * 65536 + 7, 65536);
  t.st[5] = U;                    /* forget part of the second write */
  struct ovc_extent want[16], got[16];
  size_t nw = model_runs (&t, 0, t.size, want), n;
  uint64_t next;
  cr_assert_eq (ovc_layer_extents (t.c, 0, 0, t.size, 16, got, &n, &next, NULL, NULL, &err), 0);
  bool same = n == nw;
  for (size_t i = 0; same && i < n; i++)
    same = got[i].offset == want[i].offset && got[i].length == want[i].length;
  cr_assert (!same, "the extents matched a model that lost a write");
  mt_fini (&t);
}

/* ---- the control command through the dispatcher ---- */

static int
h_ext (void *d, struct json_object *a, struct cbw_ctl_reply *r)
{
  return ovc_ctl_layer_extents (d, a, r);
}

static const struct cbw_ctl_command cmds[] = {
  { "layer-extents", h_ext, ovc_ctl_layer_extents_args, OVC_CTL_DOC_LAYER_EXTENTS, "" },
  { NULL }
};
static const struct cbw_ctl_table table = { "chain", cmds };

static struct json_object *
call (struct ovc *c, const char *line)
{
  return ctl_test_call (&table, c, line);
}


Test (layer_extents, control_command)
{
  struct mt t;
  struct cbw_err err;
  struct json_object *o, *ret, *v, *x;
  mt_init (&t, 1024 * 1024, 65536, 5);
  o = call (t.c, "{\"execute\":\"layer-extents\"}");
  cr_assert_str_eq (ctl_test_err_class (o), "NotFound", "%s", json_object_to_json_string (o));
  json_object_put (o);
  cr_assert_eq (ovc_snapshot (t.c, "s1", NULL, &err), 0, "%s", err.msg);
  m_write (&t, 65536 * 2, 65536 * 2);       /* clusters 2,3 data */
  m_zero (&t, 65536 * 6, 65536);            /* cluster 6 zero */
  m_write (&t, 65536 * 10 + 1, 1);          /* cluster 10 data */
  o = call (t.c, "{\"execute\":\"layer-extents\",\"arguments\":{\"max-extents\":2}}");
  cr_assert (json_object_object_get_ex (o, "return", &ret), "%s", json_object_to_json_string (o));
  json_object_object_get_ex (ret, "extents", &v);
  cr_assert_eq (json_object_array_length (v), 2);
  x = json_object_array_get_idx (v, 1);
  json_object_object_get_ex (x, "offset", &x);
  cr_assert_eq (json_object_get_int64 (x), 6 * 65536);
  x = json_object_array_get_idx (v, 1);
  json_object_object_get_ex (x, "zero", &x);
  cr_assert (json_object_get_boolean (x));
  json_object_object_get_ex (ret, "next", &x);
  cr_assert_eq (json_object_get_int64 (x), 10 * 65536);
  json_object_object_get_ex (ret, "layer", &x);
  cr_assert_eq (json_object_get_int (x), 1);
  json_object_object_get_ex (ret, "cluster-size", &x);
  cr_assert_eq (json_object_get_int (x), 65536);
  json_object_put (o);
  o = call (t.c, "{\"execute\":\"layer-extents\",\"arguments\":{\"offset\":655360}}");
  json_object_object_get_ex (o, "return", &ret);
  json_object_object_get_ex (ret, "next", &x);
  cr_assert_null (x, "next must be null at the end");
  json_object_object_get_ex (ret, "extents", &v);
  cr_assert_eq (json_object_array_length (v), 1);
  json_object_put (o);
  const char *bad[][2] = {
    { "{\"execute\":\"layer-extents\",\"arguments\":{\"offset\":2000000}}", "InvalidParameter" },
    { "{\"execute\":\"layer-extents\",\"arguments\":{\"length\":2000000}}", "InvalidParameter" },
    { "{\"execute\":\"layer-extents\",\"arguments\":{\"max-extents\":0}}", "InvalidParameter" },
    { "{\"execute\":\"layer-extents\",\"arguments\":{\"max-extents\":65537}}", "InvalidParameter" },
    { "{\"execute\":\"layer-extents\",\"arguments\":{\"layer\":2}}", "NotFound" },
    { "{\"execute\":\"layer-extents\",\"arguments\":{\"layer\":-1}}", "InvalidParameter" },
    { "{\"execute\":\"layer-extents\",\"arguments\":{\"offset\":\"0\"}}", "InvalidParameter" },
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    o = call (t.c, bad[i][0]);
    cr_assert_str_eq (ctl_test_err_class (o) ? ctl_test_err_class (o) : "(none)", bad[i][1], "%s -> %s",
                      bad[i][0], json_object_to_json_string (o));
    json_object_put (o);
  }
  char *md = cbw_ctl_docs_markdown (&table);
  cr_assert (md && strstr (md, "max-extents"));
  free (md);
  mt_fini (&t);
}

/* A 16 TiB disk (256 Mi clusters of 64 KiB, sparse files): a few clusters
 * written far apart come back in bounded pages, each page cheap (the scan
 * skips clean regions through the bitmaps' summary words). */
Test (layer_extents, huge_sparse_disk_paged, .timeout = 240)
{
  char dir[256], base[300], chain[300];
  struct cbw_err err;
  const uint64_t size = 16ULL << 40, cs = 65536;
  tu_mkdtemp (dir, sizeof dir);
  snprintf (base, sizeof base, "%s/base.img", dir);
  snprintf (chain, sizeof chain, "%s/disk.chain", dir);
  int fd = open (base, O_RDWR | O_CREAT | O_TRUNC, 0644);
  cr_assert_geq (fd, 0);
  if (ftruncate (fd, (off_t) size) < 0) {
    close (fd);
    tu_rmrf (dir);
    cr_skip_test ("cannot create a 16 TiB sparse file here: %s", strerror (errno));
  }
  close (fd);
  cr_assert_eq (ovc_create (chain, "base.img", (uint32_t) cs, &err), 0, "%s", err.msg);
  struct ovc *c = ovc_open (chain, NULL, NULL, &err);
  cr_assert_not_null (c, "%s", err.msg);
  cr_assert_eq (ovc_snapshot (c, NULL, NULL, &err), 0, "%s", err.msg);
  const uint64_t at[] = { 0, 3ULL << 40, (9ULL << 40) + 7, size - 1 };
  char byte = 1;
  for (size_t i = 0; i < 4; i++)
    cr_assert_eq (ovc_pwrite (c, &byte, 1, at[i], false, &err), 0, "%s", err.msg);
  struct ovc_extent x[2];
  size_t n, got = 0;
  uint64_t next, pos = 0;
  for (int page = 0; page < 3; page++) {
    struct timespec t0, t1;
    clock_gettime (CLOCK_MONOTONIC, &t0);
    cr_assert_eq (ovc_layer_extents (c, 0, pos, size - pos, 2, x, &n, &next, NULL, NULL,
                                     &err), 0, "%s", err.msg);
    clock_gettime (CLOCK_MONOTONIC, &t1);
    double ms = (double) (t1.tv_sec - t0.tv_sec) * 1e3 + (double) (t1.tv_nsec - t0.tv_nsec) / 1e6;
    cr_log_info ("16 TiB page %d: %zu runs in %.1f ms", page, n, ms);
    cr_assert_lt (ms, 5000.0, "a page over 16 TiB took %.0f ms", ms);
    for (size_t i = 0; i < n; i++, got++) {
      cr_assert_eq (x[i].offset, at[got] / cs * cs, "run %zu at %lu", got,
                    (unsigned long) x[i].offset);
      cr_assert_eq (x[i].length, cs);
      cr_assert (!x[i].zero);
    }
    if (next == UINT64_MAX)
      break;
    pos = next;
  }
  cr_assert_eq (got, 4, "%zu runs, want 4", got);
  cr_assert_eq (next, UINT64_MAX);
  ovc_close (c);
  tu_rmrf (dir);
}
