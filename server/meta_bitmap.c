/* cbw — server/meta_bitmap.c: the qemu:dirty-bitmap:NAME meta context of an
 * export: a frozen dirty bitmap, held as a sorted array of dirty byte ranges
 * (memory is O(number of dirty runs), lookups are a binary search).
 *
 * Sources (all validated: sizes, ranges, granularity; a bad file is an error
 * naming the file and the problem, never a silently wrong bitmap):
 *   raw      a little-endian bit array as written by formats/bitmap.h
 *            (bit i = granule i), with its granularity;
 *   extents  a text file of "OFFSET LENGTH" dirty ranges, one per line
 *            ('#' comments allowed) — what orchestration can write from the
 *            dirtybitmap filter's `extents` control command;
 *   store    a bitmap store descriptor (formats/bitmap_store.h), compiled in
 *            when the formats library is part of the build;
 *   ctl      a bitmap of a running dirtybitmap filter, read once through its
 *            control socket (`extents` command, paged) when the export is
 *            created — the orchestrator freezes the bitmap first.
 *
 * Locking: none needed; the range array is immutable after load and read
 * concurrently by worker threads.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cleanup.h"
#include "export.h"
#include "fileutil.h"
#include "nbd_proto.h"
#ifdef CBWD_HAVE_BITMAP_STORE
#include "bitmap_store.h"
#endif
#ifdef CBWD_HAVE_CONTROL
#include "control.h"
#endif

#define QEMU_DIRTY_PREFIX "qemu:dirty-bitmap:"
#define MAX_BITMAP_FILE (1ULL << 32)   /* 4 GiB of bits = 2^35 granules */

struct ranges {
  size_t n, cap;
  uint64_t (*r)[2];      /* [start, end) sorted, disjoint, non-adjacent */
};

static int
ranges_push (struct ranges *rs, uint64_t start, uint64_t end)
{
  if (start >= end) return 0;
  if (rs->n > 0 && rs->r[rs->n - 1][1] >= start) {
    if (end > rs->r[rs->n - 1][1]) rs->r[rs->n - 1][1] = end;
    return 0;
  }
  if (rs->n == rs->cap) {
    size_t ncap = rs->cap ? rs->cap * 2 : 64;
    void *nr = realloc (rs->r, ncap * sizeof *rs->r);
    if (!nr) return -1;
    rs->r = nr; rs->cap = ncap;
  }
  rs->r[rs->n][0] = start;
  rs->r[rs->n][1] = end;
  rs->n++;
  return 0;
}

static int
cmp_range (const void *a, const void *b)
{
  const uint64_t *x = a, *y = b;
  return x[0] < y[0] ? -1 : x[0] > y[0];
}

static void
bitmap_free (struct cbwd_meta *m)
{
  struct ranges *rs = m->data;
  if (rs) { free (rs->r); free (rs); }
  free (m->name);
}

static int bitmap_extents (struct cbwd_export *e, struct cbwd_meta *m,
                           struct cbwd_extents *x, struct cbw_err *err);

/* First range whose end > off. */
static size_t
find_range (const struct ranges *rs, uint64_t off)
{
  size_t lo = 0, hi = rs->n;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (rs->r[mid][1] <= off) lo = mid + 1; else hi = mid;
  }
  return lo;
}

bool
cbwd_meta_bitmap_first_clean (const struct cbwd_meta *m, uint64_t off, uint64_t len,
                              uint64_t *clean)
{
  const struct ranges *rs = m->data;
  uint64_t end = off + len;
  if (m->extents != bitmap_extents || rs == NULL)
    return false;               /* not a bitmap: nothing to say */
  /* Ranges are merged and non-adjacent: one range covers all or it is not
   * covered. */
  size_t i = find_range (rs, off);
  if (i < rs->n && rs->r[i][0] <= off && rs->r[i][1] >= end)
    return false;
  *clean = i < rs->n && rs->r[i][0] <= off ? rs->r[i][1] : off;
  return true;
}

static int
bitmap_extents (struct cbwd_export *e, struct cbwd_meta *m,
                struct cbwd_extents *x, struct cbw_err *err)
{
  const struct ranges *rs = m->data;
  uint64_t o = x->offset, end = e->size;
  size_t i = find_range (rs, o);
  while (o < end) {
    uint64_t s, t;
    uint32_t fl;
    if (i < rs->n && rs->r[i][0] <= o) { s = o; t = rs->r[i][1]; fl = NBD_STATE_DIRTY; i++; }
    else { s = o; t = i < rs->n ? rs->r[i][0] : end; fl = 0; }
    if (t > end) t = end;
    int r = cbwd_extents_add (x, t - s, fl);
    if (r == -1) return cbw_err_set (err, ENOMEM, "out of memory");
    if (r == 1) break;
    o = t;
  }
  return 0;
}

static int
finish (struct cbwd_meta *m, const char *name, struct ranges *rs, struct cbw_err *err)
{
  if (strlen (name) == 0 || strlen (name) > 1024 || strchr (name, ',')) {
    free (rs->r); free (rs);
    return cbw_err_set (err, EINVAL, "bad bitmap name '%s'", name);
  }
  memset (m, 0, sizeof *m);
  if (asprintf (&m->name, QEMU_DIRTY_PREFIX "%s", name) == -1) {
    free (rs->r); free (rs);
    return cbw_err_set (err, ENOMEM, "out of memory");
  }
  m->data = rs;
  m->extents = bitmap_extents;
  m->free = bitmap_free;
  return 0;
}

int
cbwd_meta_bitmap_from_ranges (struct cbwd_meta *m, const char *name,
                              const uint64_t (*in)[2], size_t n,
                              uint64_t export_size, struct cbw_err *err)
{
  struct ranges *rs = calloc (1, sizeof *rs);
  CLEANUP_FREE uint64_t (*tmp)[2] = n ? malloc (n * sizeof *tmp) : NULL;
  if (!rs || (n && !tmp)) { free (rs); return cbw_err_set (err, ENOMEM, "out of memory"); }
  for (size_t i = 0; i < n; i++) {
    if (in[i][1] == 0 || in[i][0] > export_size || in[i][1] > export_size - in[i][0]) {
      free (rs);
      return cbw_err_set (err, EINVAL, "bitmap '%s': range %" PRIu64 "+%" PRIu64
                          " outside the export (size %" PRIu64 ")", name,
                          in[i][0], in[i][1], export_size);
    }
    tmp[i][0] = in[i][0];
    tmp[i][1] = in[i][0] + in[i][1];
  }
  if (n) qsort (tmp, n, sizeof *tmp, cmp_range);
  for (size_t i = 0; i < n; i++)
    if (ranges_push (rs, tmp[i][0], tmp[i][1]) == -1) {
      free (rs->r); free (rs);
      return cbw_err_set (err, ENOMEM, "out of memory");
    }
  return finish (m, name, rs, err);
}

int
cbwd_meta_bitmap_from_extents (struct cbwd_meta *m, const char *name,
                               const char *path, uint64_t export_size,
                               struct cbw_err *err)
{
  CLEANUP_FREE char *buf = NULL;
  size_t len;
  if (cbw_read_file (path, 256 * 1024 * 1024, &buf, &len, err) == -1)
    return cbw_err_prefix (err, "bitmap '%s'", name);
  size_t n = 0, cap = 0;
  CLEANUP_FREE uint64_t (*v)[2] = NULL;
  char *save = NULL;
  unsigned line = 0;
  for (char *l = strtok_r (buf, "\n", &save); l; l = strtok_r (NULL, "\n", &save)) {
    line++;
    while (*l == ' ' || *l == '\t') l++;
    if (*l == '#' || *l == '\0' || *l == '\r') continue;
    unsigned long long a, b;
    int used = 0;
    if (sscanf (l, "%llu %llu %n", &a, &b, &used) != 2 || (l[used] && l[used] != '\r'))
      return cbw_err_set (err, EINVAL, "%s: line %u: expected \"OFFSET LENGTH\"", path, line);
    if (n == cap) {
      cap = cap ? cap * 2 : 64;
      void *nv = realloc (v, cap * sizeof *v);
      if (!nv) return cbw_err_set (err, ENOMEM, "out of memory");
      v = nv;
    }
    v[n][0] = a; v[n][1] = b; n++;
  }
  if (cbwd_meta_bitmap_from_ranges (m, name, (const uint64_t (*)[2]) v, n, export_size, err) == -1)
    return cbw_err_prefix (err, "%s", path);
  return 0;
}

/* Convert a bit array to ranges. */
static int
ranges_from_bits (struct ranges *rs, const uint8_t *bits, uint64_t nbits,
                  uint64_t gran, uint64_t size)
{
  uint64_t i = 0;
  while (i < nbits) {
    if ((i & 63) == 0 && i + 64 <= nbits) {
      uint64_t w;
      memcpy (&w, bits + i / 8, 8);
      if (w == 0) { i += 64; continue; }
    }
    if (!(bits[i / 8] & (1U << (i % 8)))) { i++; continue; }
    uint64_t s = i;
    while (i < nbits && (bits[i / 8] & (1U << (i % 8)))) i++;
    uint64_t end = i * gran > size ? size : i * gran;
    if (ranges_push (rs, s * gran, end) == -1) return -1;
  }
  return 0;
}

int
cbwd_meta_bitmap_from_raw (struct cbwd_meta *m, const char *name,
                           const char *path, uint64_t gran,
                           uint64_t export_size, struct cbw_err *err)
{
  if (gran < 512 || gran > (2ULL << 30) || (gran & (gran - 1)))
    return cbw_err_set (err, EINVAL, "bitmap '%s': granularity %" PRIu64
                        " is not a power of two in 512..2G", name, gran);
  uint64_t nbits = (export_size + gran - 1) / gran;
  uint64_t want = (nbits + 7) / 8;
  if (want > MAX_BITMAP_FILE)
    return cbw_err_set (err, EINVAL, "bitmap '%s': too large", name);
  CLEANUP_FREE char *buf = NULL;
  size_t len;
  if (cbw_read_file (path, want + 1, &buf, &len, err) == -1)
    return cbw_err_prefix (err, "bitmap '%s'", name);
  if (len != want)
    return cbw_err_set (err, EINVAL, "%s: bitmap '%s' is %zu bytes, expected %" PRIu64
                        " for a %" PRIu64 "-byte export at granularity %" PRIu64,
                        path, name, len, want, export_size, gran);
  if (nbits % 8 && ((uint8_t) buf[want - 1] >> (nbits % 8)))
    return cbw_err_set (err, EINVAL, "%s: bitmap '%s' has bits set past the end",
                        path, name);
  struct ranges *rs = calloc (1, sizeof *rs);
  if (!rs || ranges_from_bits (rs, (uint8_t *) buf, nbits, gran, export_size) == -1) {
    if (rs) free (rs->r);
    free (rs);
    return cbw_err_set (err, ENOMEM, "out of memory");
  }
  return finish (m, name, rs, err);
}

int
cbwd_meta_bitmap_from_store (struct cbwd_meta *m, const char *name,
                             const char *descriptor, const char *stored_name,
                             uint64_t export_size, struct cbw_err *err)
{
#ifdef CBWD_HAVE_BITMAP_STORE
  struct cbw_bitmap_store *st = cbw_bitmap_store_open (descriptor, export_size, err);
  if (!st)
    return cbw_err_prefix (err, "bitmap '%s'", name);
  struct cbw_stored_bitmap *b = cbw_bitmap_store_find (st, stored_name);
  if (!b) {
    cbw_bitmap_store_close (st);
    return cbw_err_set (err, ENOENT, "%s: no bitmap named '%s'", descriptor, stored_name);
  }
  if (b->state != CBW_BITMAP_CLEAN) {
    cbw_bitmap_store_close (st);
    return cbw_err_set (err, EBUSY, "%s: bitmap '%s' is in use (not frozen); "
                        "export a frozen copy", descriptor, stored_name);
  }
  struct ranges *rs = calloc (1, sizeof *rs);
  uint64_t from = 0, s, c;
  int ret = 0;
  while (rs && cbw_bitmap_next_extent (&b->bits, from, &s, &c)) {
    uint64_t end = (s + c) * b->granularity;
    if (end > export_size) end = export_size;
    if (ranges_push (rs, s * b->granularity, end) == -1) { ret = -1; break; }
    from = s + c;
  }
  cbw_bitmap_store_close (st);
  if (!rs || ret == -1) {
    if (rs) free (rs->r);
    free (rs);
    return cbw_err_set (err, ENOMEM, "out of memory");
  }
  return finish (m, name, rs, err);
#else
  (void) m; (void) stored_name; (void) export_size;
  return cbw_err_set (err, ENOTSUP, "bitmap '%s': %s: this cbwd was built without "
                      "the bitmap store library", name, descriptor);
#endif
}

int
cbwd_meta_bitmap_from_ctl (struct cbwd_meta *m, const char *name,
                           const char *ctl_path, const char *stored_name,
                           uint64_t export_size, struct cbw_err *err)
{
#ifdef CBWD_HAVE_CONTROL
  struct cbw_ctl_client *c = cbw_ctl_client_connect (ctl_path, err);
  if (!c)
    return cbw_err_prefix (err, "bitmap '%s'", name);
  cbw_ctl_client_set_timeout (c, 30000);
  struct ranges *rs = calloc (1, sizeof *rs);
  uint64_t next = 0;
  int ret = rs ? 0 : cbw_err_set (err, ENOMEM, "out of memory");
  unsigned pages = 0;
  while (ret == 0) {
    struct json_object *args = json_object_new_object ();
    json_object_object_add (args, "name", json_object_new_string (stored_name));
    json_object_object_add (args, "offset", json_object_new_int64 ((int64_t) next));
    json_object_object_add (args, "max-extents", json_object_new_int64 (65536));
    struct json_object *r = NULL, *v, *nx;
    if (cbw_ctl_client_execute (c, "extents", args, &r, NULL, err) == -1) {
      ret = cbw_err_prefix (err, "%s: extents of '%s'", ctl_path, stored_name);
      break;
    }
    if (!json_object_object_get_ex (r, "extents", &v) ||
        !json_object_is_type (v, json_type_array) ||
        !json_object_object_get_ex (r, "next", &nx)) {
      json_object_put (r);
      ret = cbw_err_set (err, EIO, "%s: malformed extents reply", ctl_path);
      break;
    }
    for (size_t i = 0; i < json_object_array_length (v) && ret == 0; i++) {
      struct json_object *x = json_object_array_get_idx (v, i), *o, *l;
      if (!json_object_object_get_ex (x, "offset", &o) ||
          !json_object_object_get_ex (x, "length", &l)) {
        ret = cbw_err_set (err, EIO, "%s: malformed extent", ctl_path);
        break;
      }
      int64_t off = json_object_get_int64 (o), len = json_object_get_int64 (l);
      if (off < 0 || len <= 0 || (uint64_t) off < next || (uint64_t) off > export_size ||
          (uint64_t) len > export_size - (uint64_t) off)
        ret = cbw_err_set (err, EIO, "%s: extent %" PRId64 "+%" PRId64 " out of order "
                           "or outside the export (size %" PRIu64 ")", ctl_path, off,
                           len, export_size);
      else if (ranges_push (rs, off, off + len) == -1)
        ret = cbw_err_set (err, ENOMEM, "out of memory");
    }
    bool more = json_object_is_type (nx, json_type_int);
    uint64_t n2 = more ? (uint64_t) json_object_get_int64 (nx) : 0;
    json_object_put (r);
    if (ret || !more) break;
    if (n2 <= next || ++pages > 1000000) {
      ret = cbw_err_set (err, EIO, "%s: extents paging does not advance", ctl_path);
      break;
    }
    next = n2;
  }
  cbw_ctl_client_close (c);
  if (ret == -1) {
    if (rs) free (rs->r);
    free (rs);
    return -1;
  }
  return finish (m, name, rs, err);
#else
  (void) m; (void) stored_name; (void) export_size;
  return cbw_err_set (err, ENOTSUP, "bitmap '%s': %s: this cbwd was built without "
                      "the control socket library", name, ctl_path);
#endif
}
