/* cbw — server/orch/bmstore.c: the dirty-bitmap primitives of checkpoint.c
 * (add, remove, enable, merge, exists) on a STOPPED disk, done on its bitmap
 * store (formats/bitmap_store.h, DISKDIR/bitmaps.json) instead of through
 * the dirtybitmap filter's control socket, for offline backups (backup.c).
 *
 * Why this is safe:
 *   - nobody writes the image: the disk's nbdkit is stopped, disk-start is
 *     refused while the offline backup runs (commands.c), and the image is
 *     held with QEMU-compatible read locks by cbwd's export;
 *   - each call opens the store, which takes the store's exclusive flock
 *     (a stray nbdkit still holding it makes the call fail with EBUSY),
 *     edits it in memory and saves it crash-atomically, so each primitive
 *     is one atomic step exactly as with the filter, and a crash between
 *     two of them leaves what a crash between two control calls leaves;
 *   - a store whose bitmaps are "in-use" (the filter did not close cleanly:
 *     kill -9, power loss) holds only a lower bound until the filter's
 *     recovery merges its journal/live map; reading or rotating it here
 *     could under-report, so it is refused with a way out (start the disk
 *     once so the filter recovers the bitmaps, stop it again);
 *   - the dirtybitmap filter starts from whatever the store holds: a bitmap
 *     added here enabled and empty records every write from the disk's next
 *     start on (its live map of an earlier life is ignored because the
 *     store's generation changed).
 *
 * Locking: runs as the busy owner (no orchestrator lock needed: the disk's
 * persistent fields do not change under busy); the store's flock serialises
 * against other processes.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cleanup.h"
#include "fileutil.h"
#include "orch_internal.h"

#ifdef ORCH_HAVE_FORMATS
#include "bitmap_store.h"

/* Open d's store for an offline edit; NULL with *err. */
static struct cbw_bitmap_store *
store_open (struct orch_disk *d, uint64_t *size_out, struct cbw_err *err)
{
  uint64_t size = 0;
  if (orch_image_size (d->file, &size, err) == 0 && size == 0)
    cbw_err_set (err, EINVAL, "%s: cannot find the size (empty)", d->file);
  if (size == 0) {                      /* an error, or an empty image */
    cbw_err_prefix (err, "disk %s", d->name);
    return NULL;
  }
  struct cbw_bitmap_store *st = cbw_bitmap_store_open_ex (d->bitmaps, size, 0, err);
  if (st == NULL) {
    cbw_err_prefix (err, "disk %s (not running): its bitmap store", d->name);
    return NULL;
  }
  for (size_t i = 0; i < st->count; i++)
    if (st->bitmaps[i].state != CBW_BITMAP_CLEAN) {
      cbw_err_set (err, EIO, "disk %s (not running): bitmap %s in %s was not saved cleanly "
                   "(the disk's nbdkit died); only its dirtybitmap filter can recover it: "
                   "start the disk once and stop it again (`cbw disk start %s && cbw disk "
                   "stop %s`)", d->name, st->bitmaps[i].name, d->bitmaps, d->name, d->name);
      cbw_bitmap_store_close (st);
      return NULL;
    }
  if (size_out)
    *size_out = size;
  return st;
}

static int
store_save_close (struct orch_disk *d, struct cbw_bitmap_store *st, struct cbw_err *err)
{
  int r = cbw_bitmap_store_save (st, err);
  cbw_bitmap_store_close (st);
  if (r < 0)
    return cbw_err_prefix (err, "disk %s (not running): saving %s", d->name, d->bitmaps);
  return 0;
}

static int
not_found (struct orch_disk *d, const char *bm, struct cbw_err *err)
{
  return cbw_err_set (err, ENOENT, "disk %s (not running): no bitmap %s in %s", d->name, bm,
                      d->bitmaps);
}

int
orch_bm_store_check (struct orch_disk *d, uint64_t *size, struct cbw_err *err)
{
  struct cbw_bitmap_store *st = store_open (d, size, err);
  if (st == NULL)
    return -1;
  cbw_bitmap_store_close (st);
  return 0;
}

int
orch_bm_store_add (struct orch_disk *d, const char *bm, bool enabled, uint64_t gran,
                   struct cbw_err *err)
{
  struct cbw_bitmap_store *st = store_open (d, NULL, err);
  if (st == NULL)
    return -1;
  if (cbw_bitmap_store_add (st, bm, gran ? gran : d->granularity, enabled, err) == NULL) {
    cbw_bitmap_store_close (st);
    return cbw_err_prefix (err, "disk %s (not running): add bitmap %s", d->name, bm);
  }
  return store_save_close (d, st, err);
}

int
orch_bm_store_remove (struct orch_disk *d, const char *bm, bool missing_ok,
                      struct cbw_err *err)
{
  struct cbw_bitmap_store *st = store_open (d, NULL, err);
  if (st == NULL)
    return -1;
  if (cbw_bitmap_store_find (st, bm) == NULL) {
    cbw_bitmap_store_close (st);
    return missing_ok ? 0 : not_found (d, bm, err);
  }
  if (cbw_bitmap_store_remove (st, bm, err) < 0) {
    cbw_bitmap_store_close (st);
    return -1;
  }
  return store_save_close (d, st, err);
}

int
orch_bm_store_enable (struct orch_disk *d, const char *bm, bool on, struct cbw_err *err)
{
  struct cbw_bitmap_store *st = store_open (d, NULL, err);
  if (st == NULL)
    return -1;
  struct cbw_stored_bitmap *b = cbw_bitmap_store_find (st, bm);
  if (b == NULL) {
    cbw_bitmap_store_close (st);
    return not_found (d, bm, err);
  }
  if (b->enabled == on) {
    cbw_bitmap_store_close (st);
    return 0;
  }
  b->enabled = on;
  return store_save_close (d, st, err);
}

/* dst |= src, granularities may differ: every dst granule that overlaps a
 * dirty src granule becomes dirty (a superset, never less). */
static void
merge_bits (struct cbw_stored_bitmap *dst, const struct cbw_stored_bitmap *src,
            uint64_t size)
{
  uint64_t from = 0, start, count;
  while (cbw_bitmap_next_extent (&src->bits, from, &start, &count)) {
    uint64_t b0 = start * src->granularity;
    uint64_t b1 = (start + count) * src->granularity;
    if (b1 > size) b1 = size;
    if (b0 < b1) {
      uint64_t g0 = b0 / dst->granularity, g1 = (b1 - 1) / dst->granularity + 1;
      cbw_bitmap_set_range (&dst->bits, g0, g1 - g0);
    }
    from = start + count;
  }
}

int
orch_bm_store_merge (struct orch_disk *d, const char *src, const char *dst,
                     struct cbw_err *err)
{
  uint64_t size = 0;
  struct cbw_bitmap_store *st = store_open (d, &size, err);
  if (st == NULL)
    return -1;
  struct cbw_stored_bitmap *s = cbw_bitmap_store_find (st, src);
  struct cbw_stored_bitmap *t = cbw_bitmap_store_find (st, dst);
  if (s == NULL || t == NULL) {
    cbw_bitmap_store_close (st);
    return not_found (d, s == NULL ? src : dst, err);
  }
  merge_bits (t, s, size);
  return store_save_close (d, st, err);
}

int
orch_bm_store_exists (struct orch_disk *d, const char *bm, struct cbw_err *err)
{
  struct cbw_bitmap_store *st = store_open (d, NULL, err);
  if (st == NULL)
    return -1;
  int r = cbw_bitmap_store_find (st, bm) != NULL;
  cbw_bitmap_store_close (st);
  return r;
}

int
orch_bm_store_union_file (struct orch_disk *d, char *const *bms, size_t n,
                          const char *path, uint64_t *dirty, struct cbw_err *err)
{
  uint64_t size = 0;
  *dirty = 0;
  struct cbw_bitmap_store *st = store_open (d, &size, err);
  if (st == NULL)
    return -1;
  /* The union at the finest granularity of the bitmaps involved. */
  uint64_t gran = d->granularity;
  for (size_t i = 0; i < n; i++) {
    struct cbw_stored_bitmap *b = cbw_bitmap_store_find (st, bms[i]);
    if (b == NULL) {
      cbw_bitmap_store_close (st);
      return not_found (d, bms[i], err);
    }
    if (b->granularity < gran)
      gran = b->granularity;
  }
  struct cbw_stored_bitmap u = { .granularity = gran };
  if (cbw_bitmap_init (&u.bits, (size + gran - 1) / gran) < 0) {
    cbw_bitmap_store_close (st);
    return cbw_err_set (err, ENOMEM, "out of memory");
  }
  for (size_t i = 0; i < n; i++)
    merge_bits (&u, cbw_bitmap_store_find (st, bms[i]), size);
  cbw_bitmap_store_close (st);

  size_t len = 0, cap = 4096;
  char *buf = malloc (cap);
  int ret = 0;
  if (buf == NULL)
    ret = cbw_err_set (err, ENOMEM, "out of memory");
  else
    len = (size_t) snprintf (buf, cap, "# dirty extents of disk %s, offline backup\n",
                             d->name);
  uint64_t from = 0, start, count;
  while (ret == 0 && cbw_bitmap_next_extent (&u.bits, from, &start, &count)) {
    uint64_t off = start * gran, l = count * gran;
    if (off + l > size)
      l = size - off;
    if (cap - len < 64) {
      char *nb = realloc (buf, cap * 2);
      if (nb == NULL) {
        ret = cbw_err_set (err, ENOMEM, "out of memory");
        break;
      }
      buf = nb;
      cap *= 2;
    }
    len += (size_t) snprintf (buf + len, cap - len, "%" PRIu64 " %" PRIu64 "\n", off, l);
    *dirty += l;
    from = start + count;
  }
  cbw_bitmap_free (&u.bits);
  if (ret == 0 && cbw_write_file_atomic (path, buf, len, err) < 0)
    ret = cbw_err_prefix (err, "disk %s: writing the backup's dirty extents", d->name);
  free (buf);
  return ret;
}

#else  /* !ORCH_HAVE_FORMATS */

static int
no_formats (struct cbw_err *err)
{
  return cbw_err_set (err, ENOSYS, "this cbwd was built without the formats library: "
                      "it cannot read a stopped disk's bitmap store");
}
int orch_bm_store_add (struct orch_disk *d, const char *bm, bool enabled, uint64_t gran,
                       struct cbw_err *err)
{ (void) d; (void) bm; (void) enabled; (void) gran; return no_formats (err); }
int orch_bm_store_remove (struct orch_disk *d, const char *bm, bool missing_ok,
                          struct cbw_err *err)
{ (void) d; (void) bm; (void) missing_ok; return no_formats (err); }
int orch_bm_store_enable (struct orch_disk *d, const char *bm, bool on, struct cbw_err *err)
{ (void) d; (void) bm; (void) on; return no_formats (err); }
int orch_bm_store_merge (struct orch_disk *d, const char *src, const char *dst,
                         struct cbw_err *err)
{ (void) d; (void) src; (void) dst; return no_formats (err); }
int orch_bm_store_exists (struct orch_disk *d, const char *bm, struct cbw_err *err)
{ (void) d; (void) bm; return no_formats (err); }
int orch_bm_store_check (struct orch_disk *d, uint64_t *size, struct cbw_err *err)
{ (void) d; (void) size; return no_formats (err); }
int orch_bm_store_union_file (struct orch_disk *d, char *const *bms, size_t n,
                              const char *path, uint64_t *dirty, struct cbw_err *err)
{ (void) d; (void) bms; (void) n; (void) path; (void) dirty; return no_formats (err); }

#endif
