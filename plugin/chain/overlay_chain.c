/* cbw — plugin/chain/overlay_chain.c: layered I/O over a raw base and a
 * chain of overlays (formats/overlay.h), plus the chain operations:
 * snapshot and status.  The commit engine is in commit.c, the control-socket
 * handlers in overlay_ctl.c, the shared state in overlay_chain_int.h.
 *
 * I/O model.  Layer 0 is the raw base, layers 1..n the overlays, n the
 * writable top.  A read of a cluster is served by the topmost layer whose map
 * says DATA (pread of its data file) or ZERO (memset); if none, by the base.
 * A write goes to the top: whole clusters are written in place; a partial
 * write to a cluster the top does not hold as DATA first fills the cluster
 * from the view below (copy-up), then writes the whole cluster.  The map bit
 * is set in memory only AFTER the data pwrite returned.
 *
 * Durability (the allocation journal rule, docs/formats/overlay.md):
 * flush = (1) snapshot the in-memory maps of dirty layers, (2) fdatasync
 * the data files, (3) replace the map files crash-atomically.  Every bit in
 * the snapshot belongs to a pwrite that had completed before (1), so it is
 * durable after (2): a crash never exposes an allocated cluster whose data
 * is not on disk, and every write acknowledged before a flush (or with FUA)
 * survives.  Unflushed writes may be lost (read through to the old data).
 *
 * Operations.  A snapshot drains in-flight I/O, flushes, creates the new
 * overlay's files under a fresh random name with O_EXCL (new_layer_name: a
 * layer file is never truncated or replaced, whoever owns it), and replaces
 * the chain descriptor (the commit point); a crash before leaves the old
 * chain plus unreferenced, empty layer files, which nothing reuses (safe to
 * delete; never deleted automatically: a chain cannot tell its own orphans
 * from another chain's layers in the same directory).
 * A commit (commit.c) merges layers lo..hi into lo-1 in a background thread
 * and switches the chain with I/O paused.
 *
 * Locking: see overlay_chain_int.h.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cleanup.h"
#include "control.h"
#include "fileutil.h"
#include "imagelock.h"
#include "overlay_chain_int.h"

#ifndef COPY_CHUNK
#define COPY_CHUNK (1024 * 1024)   /* unit of written zeros (fallback of fallocate) */
#endif

/* ------------------------------------------------------------ test hook */

static ovc_hook_fn hook_fn;
static void *hook_opaque;

void
ovc_set_test_hook (ovc_hook_fn fn, void *opaque)
{
  hook_fn = fn;
  hook_opaque = opaque;
}

int
ovc__hook (const char *point, struct cbw_err *err)
{
  if (hook_fn && hook_fn (point, NULL, hook_opaque) != 0)
    return cbw_err_set (err, EIO, "injected I/O error at %s", point);
  return 0;
}

void
ovc__durable (const char *path)
{
  if (hook_fn)
    hook_fn ("durable", path, hook_opaque);
}

void
ovc__hook_path_in (const char *point, const char *dir, const char *name)
{
  if (hook_fn) {
    CLEANUP_FREE char *p = cbw_ovl_join (dir, name);
    if (p) hook_fn (point, p, hook_opaque);
  }
}

void
ovc__durable_in (const char *dir, const char *name)
{
  ovc__hook_path_in ("durable", dir, name);
}

/* Every metadata save of the engine goes through these (durability hook). */
int
ovc__chain_save (const char *path, struct cbw_chain_desc *d, struct cbw_err *err)
{
  if (cbw_chain_desc_save (path, d, err) < 0) return -1;
  ovc__durable (path);
  return 0;
}

int
ovc__atomic_save (const char *path, const void *buf, size_t len, struct cbw_err *err)
{
  if (cbw_write_file_atomic (path, buf, len, err) < 0) return -1;
  ovc__durable (path);
  return 0;
}

/* ------------------------------------------------------------- helpers */

void
ovc__gate_enter (struct ovc *c)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->gate_lock);
  while (c->paused)
    pthread_cond_wait (&c->gate_cond, &c->gate_lock);
  c->in_flight++;
}

void
ovc__gate_leave (struct ovc *c)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->gate_lock);
  if (--c->in_flight == 0)
    pthread_cond_broadcast (&c->gate_cond);
}

void
ovc__gate_pause (struct ovc *c)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->gate_lock);
  while (c->paused)
    pthread_cond_wait (&c->gate_cond, &c->gate_lock);
  c->paused = true;
  while (c->in_flight > 0)
    pthread_cond_wait (&c->gate_cond, &c->gate_lock);
}

void
ovc__gate_resume (struct ovc *c)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->gate_lock);
  c->paused = false;
  pthread_cond_broadcast (&c->gate_cond);
}

int
ovc__range_acquire (struct ovc *c, uint64_t s, uint64_t e, struct cbw_err *err)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->range_lock);
  for (;;) {
    size_t i;
    bool busy = false;
    for (i = 0; i < c->nranges; i++)
      if (c->ranges[i].s <= e && s <= c->ranges[i].e) { busy = true; break; }
    if (!busy) break;
    pthread_cond_wait (&c->range_cond, &c->range_lock);
  }
  if (c->nranges == c->ranges_cap) {
    size_t n = c->ranges_cap ? c->ranges_cap * 2 : 16;
    struct range *r = realloc (c->ranges, n * sizeof *r);
    if (r == NULL)
      return cbw_err_set (err, ENOMEM, "range lock: out of memory");
    c->ranges = r;
    c->ranges_cap = n;
  }
  c->ranges[c->nranges++] = (struct range) { s, e };
  return 0;
}

void
ovc__range_release (struct ovc *c, uint64_t s, uint64_t e)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->range_lock);
  for (size_t i = 0; i < c->nranges; i++)
    if (c->ranges[i].s == s && c->ranges[i].e == e) {
      c->ranges[i] = c->ranges[--c->nranges];
      break;
    }
  pthread_cond_broadcast (&c->range_cond);
}

void
ovc__layer_free (struct layer *l)
{
  if (l == NULL) return;
  if (l->fd >= 0) close (l->fd);
  if (l->map_loaded) cbw_ovl_map_free (&l->map);
  if (l->desc_loaded) cbw_ovl_desc_free (&l->desc);
  free (l->map_path);
  free (l->data_path);
  free (l->name);
  free (l);
}

/* Open one layer (base when is_base). */
struct layer *
ovc__layer_open (struct ovc *c, const char *name, bool is_base, struct cbw_err *err)
{
  struct layer *l = calloc (1, sizeof *l);
  CLEANUP_FREE char *dpath = NULL;
  int flags = (c->readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC;

  if (l == NULL) {
    cbw_err_set (err, ENOMEM, "out of memory");
    return NULL;
  }
  l->fd = -1;
  l->is_base = is_base;
  l->name = strdup (name);
  if (l->name == NULL) {
    cbw_err_set (err, ENOMEM, "out of memory");
    goto fail;
  }
  if (is_base) {
    dpath = cbw_ovl_join (c->dir, name);
  } else {
    if (cbw_ovl_desc_load (c->dir, name, &l->desc, err) < 0)
      goto fail;
    l->desc_loaded = true;
    dpath = cbw_ovl_join (c->dir, l->desc.data);
    l->map_path = cbw_ovl_join (c->dir, l->desc.map);
    if (l->map_path == NULL) {
      cbw_err_set (err, ENOMEM, "out of memory");
      goto fail;
    }
    if (cbw_ovl_map_load (l->map_path, c->size, c->csize, &l->map, err) < 0)
      goto fail;
    l->map_loaded = true;
  }
  if (dpath == NULL) {
    cbw_err_set (err, ENOMEM, "out of memory");
    goto fail;
  }
  l->data_path = strdup (dpath);
  if (l->data_path == NULL) {
    cbw_err_set (err, ENOMEM, "out of memory");
    goto fail;
  }
  l->fd = open (dpath, flags | (c->readonly ? 0 : O_EXCL));  /* see rawdisk.c */
  if (l->fd < 0) {
    cbw_err_set (err, errno, "%s: open: %s", dpath, strerror (errno));
    goto fail;
  }
  if (cbw_imagelock_serve (l->fd, dpath, !c->readonly, c->force_share, err) < 0)
    goto fail;
  off_t sz = lseek (l->fd, 0, SEEK_END);
  if (sz < 0 || (uint64_t) sz != c->size) {
    cbw_err_set (err, EINVAL, "%s: wrong size %lld bytes (chain is %" PRIu64 " bytes)",
                 dpath, (long long) sz, c->size);
    goto fail;
  }
  return l;
 fail:
  ovc__layer_free (l);
  return NULL;
}

/* ------------------------------------------------------------- reading */

/* Which layer serves cluster cl in the view of layers 0..top: its index and
 * state (DATA for the base).  Caller holds map_lock. */
unsigned
ovc__serving_layer (struct ovc *c, unsigned top, uint64_t cl, enum cbw_ovl_state *st)
{
  for (unsigned k = top; k >= 1; k--) {
    enum cbw_ovl_state s = cbw_ovl_map_get (&c->layers[k]->map, cl);
    if (s != CBW_OVL_UNALLOC) { *st = s; return k; }
  }
  *st = CBW_OVL_DATA;
  return 0;
}

/* Read [off, off+count) as seen through layers 0..top. Caller is in the gate. */
static int
read_view (struct ovc *c, unsigned top, void *buf, uint64_t count, uint64_t off,
           struct cbw_err *err)
{
  char *p = buf;
  uint64_t end = off + count;
  while (off < end) {
    uint64_t cl = off >> c->cbits, run_end;
    enum cbw_ovl_state st, st2;
    unsigned k;
    {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->map_lock);
      k = ovc__serving_layer (c, top, cl, &st);
      run_end = min64 (end, cl_end (c, cl));
      while (run_end < end) {
        cl++;
        if (ovc__serving_layer (c, top, cl, &st2) != k || st2 != st) break;
        run_end = min64 (end, cl_end (c, cl));
      }
    }
    size_t n = (size_t) (run_end - off);
    if (st == CBW_OVL_ZERO)
      memset (p, 0, n);
    else if (cbw_pread_full (c->layers[k]->fd, p, n, off) < 0)
      return cbw_err_set (err, errno, "layer %u '%s': read at %" PRIu64 ": %s",
                          k, c->layers[k]->name, off, strerror (errno));
    p += n;
    off = run_end;
  }
  return 0;
}

/* ------------------------------------------------------------- writing */

/* Copy-up helper: write [ws, we) of buf (which starts at offset `boff`) into
 * cluster cl of layer k, filling the rest of the cluster from the view
 * below k (or zeros). */
static int
write_partial_cluster (struct ovc *c, unsigned k, uint64_t cl,
                       const char *src, uint64_t ws, uint64_t we,
                       struct cbw_err *err)
{
  struct layer *l = c->layers[k];
  uint64_t cs = cl_start (c, cl), ce = cl_end (c, cl);
  enum cbw_ovl_state st;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->map_lock);
    st = cbw_ovl_map_get (&l->map, cl);
  }
  if (st == CBW_OVL_DATA) {
    if (cbw_pwrite_full (l->fd, src, we - ws, ws) < 0)
      return cbw_err_set (err, errno, "layer %u '%s': write at %" PRIu64 ": %s",
                          k, l->name, ws, strerror (errno));
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->map_lock);
    l->data_dirty = true;
    return 0;
  }
  CLEANUP_FREE char *cbuf = malloc (ce - cs);
  if (cbuf == NULL)
    return cbw_err_set (err, ENOMEM, "copy-up: out of memory");
  if (st == CBW_OVL_ZERO)
    memset (cbuf, 0, ce - cs);
  else if (read_view (c, k - 1, cbuf, ce - cs, cs, err) < 0)
    return cbw_err_prefix (err, "copy-up");
  memcpy (cbuf + (ws - cs), src, we - ws);
  if (cbw_pwrite_full (l->fd, cbuf, ce - cs, cs) < 0)
    return cbw_err_set (err, errno, "layer %u '%s': write at %" PRIu64 ": %s",
                        k, l->name, cs, strerror (errno));
  /* The whole cluster is written: now (and only now) it becomes DATA. */
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->map_lock);
  cbw_ovl_map_set (&l->map, cl, 1, CBW_OVL_DATA);
  l->data_dirty = l->map_dirty = true;
  return 0;
}

/* Write buf to layer k.  Caller is in the gate and holds the range lock of
 * the clusters. */
int
ovc__write_layer (struct ovc *c, unsigned k, const void *buf, uint64_t count,
             uint64_t off, struct cbw_err *err)
{
  struct layer *l = c->layers[k];
  const char *p = buf;
  uint64_t end = off + count;

  if (ovc__hook (k == c->nl - 1 ? "write" : "write-lower", err) < 0)
    return -1;
  if (k == 0) {
    if (cbw_pwrite_full (l->fd, buf, count, off) < 0)
      return cbw_err_set (err, errno, "base '%s': write at %" PRIu64 ": %s",
                          l->name, off, strerror (errno));
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->map_lock);
    l->data_dirty = true;
    return 0;
  }

  uint64_t first = off >> c->cbits, last = (end - 1) >> c->cbits;
  uint64_t mid_s = off, mid_e = end;   /* byte range written directly */
  /* head */
  if (off != cl_start (c, first)) {
    uint64_t we = min64 (end, cl_end (c, first));
    if (write_partial_cluster (c, k, first, p, off, we, err) < 0)
      return -1;
    mid_s = we;
  }
  /* tail (a different cluster than the head, or the head was aligned) */
  if (mid_s < end && end != cl_end (c, last)) {
    uint64_t ws = cl_start (c, last);
    if (ws < mid_s) ws = mid_s;
    if (write_partial_cluster (c, k, last, p + (ws - off), ws, end, err) < 0)
      return -1;
    mid_e = ws;
  }
  if (mid_s < mid_e &&
      cbw_pwrite_full (l->fd, p + (mid_s - off), mid_e - mid_s, mid_s) < 0)
    return cbw_err_set (err, errno, "layer %u '%s': write at %" PRIu64 ": %s",
                        k, l->name, mid_s, strerror (errno));
  /* Data is written: now (and only now) the clusters become DATA. */
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->map_lock);
  l->data_dirty = true;
  if (!cbw_bitmap_all_in_range (&l->map.alloc, first, last - first + 1) ||
      cbw_bitmap_any_in_range (&l->map.zero, first, last - first + 1)) {
    cbw_ovl_map_set (&l->map, first, last - first + 1, CBW_OVL_DATA);
    l->map_dirty = true;
  }
  return 0;
}

static int
zero_base (struct ovc *c, uint64_t count, uint64_t off, struct cbw_err *err)
{
  struct layer *l = c->layers[0];
  if (fallocate (l->fd, FALLOC_FL_ZERO_RANGE, (off_t) off, (off_t) count) == 0 ||
      fallocate (l->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                 (off_t) off, (off_t) count) == 0) {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->map_lock);
    l->data_dirty = true;
    return 0;
  }
  CLEANUP_FREE char *z = calloc (1, min64 (count, COPY_CHUNK));
  if (z == NULL)
    return cbw_err_set (err, ENOMEM, "zero: out of memory");
  while (count > 0) {
    uint64_t n = min64 (count, COPY_CHUNK);
    if (ovc__write_layer (c, 0, z, n, off, err) < 0)
      return -1;
    count -= n; off += n;
  }
  return 0;
}

/* Zero part of one cluster of overlay k: nothing to do if it is ZERO. */
static int
zero_partial (struct ovc *c, unsigned k, uint64_t cl, const char *z,
              uint64_t ws, uint64_t we, struct cbw_err *err)
{
  enum cbw_ovl_state st;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->map_lock);
    st = cbw_ovl_map_get (&c->layers[k]->map, cl);
  }
  if (st == CBW_OVL_ZERO)
    return 0;
  return write_partial_cluster (c, k, cl, z, ws, we, err);
}

/* Zero [off, off+count) in layer k (range lock held, in gate). */
int
ovc__zero_layer (struct ovc *c, unsigned k, uint64_t count, uint64_t off,
            struct cbw_err *err)
{
  struct layer *l = c->layers[k];
  uint64_t end = off + count;

  if (ovc__hook (k == c->nl - 1 ? "write" : "write-lower", err) < 0)
    return -1;
  if (k == 0)
    return zero_base (c, count, off, err);

  uint64_t first = off >> c->cbits, last = (end - 1) >> c->cbits;
  uint64_t fs = first, fe = last + 1;  /* full clusters [fs, fe) */
  CLEANUP_FREE char *z = NULL;
  if (off != cl_start (c, first) || end != cl_end (c, last))
    if ((z = calloc (1, c->csize)) == NULL)
      return cbw_err_set (err, ENOMEM, "zero: out of memory");
  if (off != cl_start (c, first)) {
    uint64_t we = min64 (end, cl_end (c, first));
    if (zero_partial (c, k, first, z, off, we, err) < 0)
      return -1;
    fs = first + 1;
  }
  if (end != cl_end (c, last) && (last > first || off == cl_start (c, first))) {
    uint64_t ws = cl_start (c, last);
    if (zero_partial (c, k, last, z, ws, end, err) < 0)
      return -1;
    fe = last;
  }
  if (fs < fe) {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->map_lock);
    cbw_ovl_map_set (&l->map, fs, fe - fs, CBW_OVL_ZERO);
    l->map_dirty = true;
  }
  if (fs < fe) {
    /* Free the space; the map already says ZERO (reads never look). */
    uint64_t ps = cl_start (c, fs), pe = cl_end (c, fe - 1);
    (void) fallocate (l->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      (off_t) ps, (off_t) (pe - ps));
  }
  return 0;
}

/* -------------------------------------------------------------- flushing */

/* Flush every layer: snapshot dirty maps, fdatasync dirty data files, save
 * the maps.  Caller is in the gate or has paused it. */
int
ovc__do_flush (struct ovc *c, struct cbw_err *err)
{
  int r = 0;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->flush_lock);
    while (c->flushing)
      pthread_cond_wait (&c->flush_cond, &c->flush_lock);
    c->flushing = true;
  }
  for (unsigned k = 0; k < c->nl && r == 0; k++) {
    struct layer *l = c->layers[k];
    CLEANUP_FREE void *mbuf = NULL;
    size_t mlen = 0;
    bool dd, md;
    {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->map_lock);
      dd = l->data_dirty;
      md = l->map_dirty;
      l->data_dirty = l->map_dirty = false;
      if (md) {
        l->map.generation++;
        if (cbw_ovl_map_encode (&l->map, &mbuf, &mlen, err) < 0) {
          l->map_dirty = true;
          l->data_dirty |= dd;
          r = -1;
          break;
        }
      }
    }
    if (dd || md) {
      if (ovc__hook ("flush-data", err) < 0)
        r = -1;
      else if (cbw_fdatasync (l->fd) < 0)
        r = cbw_err_set (err, errno, "layer %u '%s': fdatasync: %s", k,
                         l->name, strerror (errno));
      else
        ovc__durable (l->data_path);
    }
    if (r == 0 && md &&
        (ovc__hook ("flush-map", err) < 0 ||
         ovc__atomic_save (l->map_path, mbuf, mlen, err) < 0))
      r = -1;
    if (r < 0) {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->map_lock);
      l->data_dirty |= dd;
      l->map_dirty |= md;
    }
  }
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->flush_lock);
  c->flushing = false;
  pthread_cond_broadcast (&c->flush_cond);
  return r;
}

/* ------------------------------------------------------------ guest I/O */

uint64_t ovc_size (struct ovc *c) { return c->size; }
uint32_t ovc_cluster_size (struct ovc *c) { return c->csize; }

unsigned
ovc_nlayers (struct ovc *c)
{
  ovc__gate_enter (c);
  unsigned n = c->nl - 1;
  ovc__gate_leave (c);
  return n;
}

const char *
ovc_base_path (struct ovc *c)
{
  return c->layers[0]->data_path;   /* layer 0 never changes */
}

bool
ovc_zero_is_fast (struct ovc *c, uint32_t count, uint64_t offset)
{
  uint64_t end = offset + count;
  bool aligned = (offset & (c->csize - 1)) == 0 &&
    ((end & (c->csize - 1)) == 0 || end == c->size);
  return aligned && ovc_nlayers (c) > 0;
}

static int
check_range (struct ovc *c, uint64_t count, uint64_t offset, struct cbw_err *err)
{
  if (count == 0 || offset > c->size || count > c->size - offset)
    return cbw_err_set (err, EINVAL, "request [%" PRIu64 ", +%" PRIu64
                        ") outside the disk (%" PRIu64 " bytes) or empty",
                        offset, count, c->size);
  return 0;
}

int
ovc_pread (struct ovc *c, void *buf, uint32_t count, uint64_t offset,
           struct cbw_err *err)
{
  if (check_range (c, count, offset, err) < 0)
    return -1;
  ovc__gate_enter (c);
  int r = read_view (c, c->nl - 1, buf, count, offset, err);
  ovc__gate_leave (c);
  return r;
}

static int
guest_write (struct ovc *c, const void *buf, uint32_t count, uint64_t offset,
             bool fua, struct cbw_err *err)
{
  if (check_range (c, count, offset, err) < 0)
    return -1;
  if (c->readonly)
    return cbw_err_set (err, EROFS, "chain opened read-only");
  uint64_t s = offset >> c->cbits, e = (offset + count - 1) >> c->cbits;
  int r;
  ovc__gate_enter (c);
  if (ovc__range_acquire (c, s, e, err) < 0) {
    ovc__gate_leave (c);
    return -1;
  }
  unsigned top = c->nl - 1;
  r = buf ? ovc__write_layer (c, top, buf, count, offset, err)
          : ovc__zero_layer (c, top, count, offset, err);
  if (r == 0 && c->mirror >= 0) {
    /* The guest write is complete in the top.  A failure to mirror it into
     * the commit target fails the commit, never the guest write. */
    struct cbw_err merr = { 0 };
    int mr = buf ? ovc__write_layer (c, (unsigned) c->mirror, buf, count, offset, &merr)
                 : ovc__zero_layer (c, (unsigned) c->mirror, count, offset, &merr);
    if (mr < 0 && !atomic_exchange (&c->op_mirror_failed, true)) {
      cbw_err_prefix (&merr, "active commit: mirroring a guest write into layer %d",
                      c->mirror);
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->op_lock);
      c->op_mirror_err = merr;
    }
  }
  ovc__range_release (c, s, e);
  if (r == 0 && fua)
    r = ovc__do_flush (c, err);
  ovc__gate_leave (c);
  return r;
}

int
ovc_pwrite (struct ovc *c, const void *buf, uint32_t count, uint64_t offset,
            bool fua, struct cbw_err *err)
{
  return guest_write (c, buf, count, offset, fua, err);
}

int
ovc_zero (struct ovc *c, uint32_t count, uint64_t offset, bool fua,
          struct cbw_err *err)
{
  return guest_write (c, NULL, count, offset, fua, err);
}

int
ovc_flush (struct ovc *c, struct cbw_err *err)
{
  if (c->readonly)
    return 0;
  ovc__gate_enter (c);
  int r = ovc__do_flush (c, err);
  ovc__gate_leave (c);
  return r;
}

int
ovc_extent (struct ovc *c, uint64_t offset, uint64_t count, uint64_t *len,
            bool *allocated, bool *zero, struct cbw_err *err)
{
  if (check_range (c, count, offset, err) < 0)
    return -1;
  ovc__gate_enter (c);
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->map_lock);
    unsigned top = c->nl - 1;
    uint64_t end = offset + count, cl = offset >> c->cbits, run_end;
    enum cbw_ovl_state st, st2;
    unsigned k = ovc__serving_layer (c, top, cl, &st), k2;
    run_end = min64 (end, cl_end (c, cl));
    while (run_end < end) {
      cl++;
      k2 = ovc__serving_layer (c, top, cl, &st2);
      if ((k2 == 0) != (k == 0) || st2 != st) break;
      run_end = min64 (end, cl_end (c, cl));
    }
    *len = run_end - offset;
    *allocated = top == 0 || k > 0;
    *zero = st == CBW_OVL_ZERO;
  }
  ovc__gate_leave (c);
  return 0;
}

int
ovc_layer_extents (struct ovc *c, unsigned layer, uint64_t offset, uint64_t length,
                   size_t max, struct ovc_extent *out, size_t *n, uint64_t *next,
                   unsigned *layer_out, char **name_out, struct cbw_err *err)
{
  *n = 0;
  *next = UINT64_MAX;
  if (name_out)
    *name_out = NULL;
  if (max == 0)
    return cbw_err_set (err, EINVAL, "max-extents must be at least 1");
  if (offset > c->size || length > c->size - offset)
    return cbw_err_set (err, EINVAL, "range [%" PRIu64 ", +%" PRIu64 ") is outside the "
                        "disk (%" PRIu64 " bytes)", offset, length, c->size);
  uint64_t end = offset + length;
  int r = 0;
  ovc__gate_enter (c);
  unsigned top = c->nl - 1;
  unsigned k = layer ? layer : top;
  if (top == 0 || k > top) {
    r = top == 0 ? cbw_err_set (err, ENOENT, "the chain has no overlay")
      : cbw_err_set (err, ENOENT, "no layer %u (the top is %u)", k, top);
    goto out;
  }
  if (layer_out)
    *layer_out = k;
  if (name_out && (*name_out = strdup (c->layers[k]->name)) == NULL) {
    r = cbw_err_set (err, ENOMEM, "out of memory");
    goto out;
  }
  /* One map_lock hold per run: guest I/O waits at most for one run's scan
   * (next_set/next_clear walk the bitmaps' summary words). */
  uint64_t pos = offset;
  while (pos < end) {
    uint64_t s_off, e_off;
    bool zero;
    {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->map_lock);
      const struct cbw_ovl_map *m = &c->layers[k]->map;
      uint64_t cl = pos >> c->cbits;
      uint64_t s = cbw_bitmap_next_set (&m->alloc, cl);
      if (s == UINT64_MAX || s >= m->nclusters)
        break;
      uint64_t ae = cbw_bitmap_next_clear (&m->alloc, s);
      if (ae == UINT64_MAX || ae > m->nclusters)
        ae = m->nclusters;
      /* split the allocated run [s, ae) where the zero bit changes */
      zero = cbw_bitmap_test (&m->zero, s);
      uint64_t e = zero ? cbw_bitmap_next_clear (&m->zero, s) : cbw_bitmap_next_set (&m->zero, s);
      if (e == UINT64_MAX || e > ae)
        e = ae;
      s_off = cl_start (c, s);
      e_off = e >= m->nclusters ? c->size : cl_start (c, e);
    }
    if (s_off >= end)
      break;
    if (s_off < pos)
      s_off = pos;
    if (e_off > end)
      e_off = end;
    if (*n == max) {
      *next = s_off;
      break;
    }
    if (*n > 0 && out[*n - 1].offset + out[*n - 1].length == s_off &&
        out[*n - 1].zero == zero)
      out[*n - 1].length += e_off - s_off;
    else
      out[(*n)++] = (struct ovc_extent) { s_off, e_off - s_off, zero };
    pos = e_off;
  }
 out:
  ovc__gate_leave (c);
  if (r < 0 && name_out) {
    free (*name_out);
    *name_out = NULL;
  }
  return r;
}

/* -------------------------------------------------------------- snapshot */

/* A new layer's name: the chain file's stem (for people reading the
 * directory) + 128 random bits, e.g. vm.chain.ov-0f3c...9a.json.  The random
 * part keeps it apart from every other chain's layers, also those of a chain
 * in the same directory whose file name has the same stem (vm.chain and
 * vm.chain.json), and from leftovers of interrupted snapshots; the files are
 * created with O_EXCL anyway, so even a collision never overwrites. */
static char *
new_layer_name (struct ovc *c)
{
  const char *b = strrchr (c->chain_path, '/');
  b = b ? b + 1 : c->chain_path;
  char stem[96], id[33];
  size_t n = 0;
  for (; *b && n < sizeof stem - 1; b++)
    stem[n++] = ((*b >= 'a' && *b <= 'z') || (*b >= 'A' && *b <= 'Z') ||
                 (*b >= '0' && *b <= '9') || *b == '.' || *b == '_' || *b == '-')
      ? *b : '_';
  stem[n] = 0;
  if (n > 5 && strcmp (stem + n - 5, ".json") == 0)
    stem[n - 5] = 0;
  for (;;) {
    char *name;
    bool used = false;
    if (cbw_random_hex (id, 16) < 0)
      return NULL;
    if (asprintf (&name, "%s.ov-%s.json", stem, id) < 0)
      return NULL;
    for (size_t i = 0; i < c->desc.nlayers; i++)
      if (strcmp (c->desc.layers[i], name) == 0) used = true;
    if (!used) return name;
    free (name);
  }
}

/* True if the chain descriptor at path reads and does not list layer name. */
static bool
layer_unreferenced (const char *path, const char *name)
{
  struct cbw_chain_desc d;
  bool listed = false;
  if (cbw_chain_desc_load (path, &d, NULL) < 0)
    return false;
  for (size_t i = 0; i < d.nlayers; i++)
    if (strcmp (d.layers[i], name) == 0)
      listed = true;
  cbw_chain_desc_free (&d);
  return !listed;
}

int
ovc_snapshot (struct ovc *c, const char *label, char **name_out,
              struct cbw_err *err)
{
  CLEANUP_FREE char *name = NULL;
  struct cbw_chain_desc nd;
  struct layer *nl = NULL, **arr;
  int r = -1;

  if (c->readonly)
    return cbw_err_set (err, EROFS, "chain opened read-only");
  if (label && strlen (label) > 1024)
    return cbw_err_set (err, EINVAL, "label longer than 1024 bytes");
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->op_lock);
  if (c->op_state == OP_RUNNING)
    return cbw_err_set (err, EBUSY, "a commit of layers %u..%u is running",
                        c->op_lo, c->op_hi);
  if (c->switch_pending)
    return cbw_err_set (err, EBUSY, "a failed commit switch is pending; reopen the chain");
  if (c->nl - 1 >= CBW_CHAIN_MAX_LAYERS)
    return cbw_err_set (err, ENOSPC, "chain already has %d overlays (limit)",
                        CBW_CHAIN_MAX_LAYERS);
  if ((name = new_layer_name (c)) == NULL)
    return cbw_err_set (err, errno ? errno : ENOMEM, "snapshot: new layer name: %s",
                        strerror (errno ? errno : ENOMEM));

  ovc__gate_pause (c);          /* in-flight writes drain */
  if (ovc__do_flush (c, err) < 0) {
    cbw_err_prefix (err, "snapshot: flush");
    goto out;
  }
  if (ovc__hook ("snapshot-flushed", err) < 0)
    goto out;
  ovc__hook_path_in ("new-layer", c->dir, name);
  /* On failure cbw_ovl_create removed what it created, and only that: a
   * file that was already at one of the names is not ours to remove. */
  if (cbw_ovl_create (c->dir, name, c->layers[c->nl - 1]->name, label,
                      c->size, c->csize, err) < 0) {
    cbw_err_prefix (err, "snapshot");
    goto out;
  }
  {
    char tmp[CBW_OVL_NAME_MAX + 8];
    ovc__durable_in (c->dir, name);
    snprintf (tmp, sizeof tmp, "%s.data", name);
    ovc__durable_in (c->dir, tmp);
    snprintf (tmp, sizeof tmp, "%s.map", name);
    ovc__durable_in (c->dir, tmp);
  }
  if (ovc__hook ("snapshot-created", err) < 0)
    goto out_rm;
  nl = ovc__layer_open (c, name, false, err);
  if (nl == NULL)
    goto out_rm;
  arr = realloc (c->layers, (c->nl + 1) * sizeof *arr);
  if (arr == NULL) {
    cbw_err_set (err, ENOMEM, "out of memory");
    goto out_rm;
  }
  c->layers = arr;
  if (cbw_chain_desc_copy (&nd, &c->desc, err) < 0)
    goto out_rm;
  nd.layers[nd.nlayers++] = strdup (name);   /* copy allocated nlayers+1 slots */
  if (nd.layers[nd.nlayers - 1] == NULL) {
    nd.nlayers--;
    cbw_chain_desc_free (&nd);
    cbw_err_set (err, ENOMEM, "out of memory");
    goto out_rm;
  }
  if (ovc__chain_save (c->chain_path, &nd, err) < 0 ||   /* commit point */
      ovc__hook ("snapshot-saved", err) < 0) {
    cbw_chain_desc_free (&nd);
    cbw_err_prefix (err, "snapshot");
    goto out_rm;
  }
  cbw_chain_desc_free (&c->desc);
  c->desc = nd;
  c->layers[c->nl++] = nl;
  nl = NULL;
  if (name_out) *name_out = strdup (name);
  r = 0;
  ovc__hook ("snapshot-done", NULL);
  goto out;
 out_rm:
  /* The new layer's files are ours; but once the chain descriptor on disk
   * names the layer (a save that failed after its rename, e.g. in the
   * directory fsync), they are part of the chain: keep them, and keep them
   * too if the descriptor cannot be read (orphans are harmless). */
  if (!layer_unreferenced (c->chain_path, name))
    goto out;
  {
    struct cbw_ovl_desc od = { .name = name, .data = NULL, .map = NULL };
    CLEANUP_FREE char *dn = NULL, *mn = NULL;
    if (asprintf (&dn, "%s.data", name) > 0 && asprintf (&mn, "%s.map", name) > 0) {
      od.data = dn; od.map = mn;
      cbw_ovl_remove (c->dir, &od, NULL);
    }
  }
 out:
  ovc__layer_free (nl);
  ovc__gate_resume (c);
  return r;
}

/* ---------------------------------------------------------------- status */

static const char *
op_state_name (enum op_state s)
{
  switch (s) {
  case OP_RUNNING: return "running";
  case OP_COMPLETED: return "completed";
  case OP_FAILED: return "failed";
  case OP_CANCELLED: return "cancelled";
  default: return "none";
  }
}

struct json_object *
ovc_status_json (struct ovc *c)
{
  struct json_object *o = json_object_new_object ();
  struct json_object *arr = json_object_new_array ();
  ovc__gate_enter (c);
  json_object_object_add (o, "size", json_object_new_int64 ((int64_t) c->size));
  json_object_object_add (o, "cluster_size", json_object_new_int64 (c->csize));
  json_object_object_add (o, "generation", json_object_new_int64 ((int64_t) c->desc.generation));
  for (unsigned k = 0; k < c->nl; k++) {
    struct layer *l = c->layers[k];
    struct json_object *lo = json_object_new_object ();
    json_object_object_add (lo, "index", json_object_new_int (k));
    json_object_object_add (lo, "name", json_object_new_string (l->name));
    json_object_object_add (lo, "kind", json_object_new_string (l->is_base ? "base" : "overlay"));
    json_object_object_add (lo, "writable", json_object_new_boolean (k == c->nl - 1 && !c->readonly));
    if (!l->is_base) {
      uint64_t a, z;
      {
        ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->map_lock);
        a = cbw_bitmap_count (&l->map.alloc);
        z = cbw_bitmap_count (&l->map.zero);
      }
      json_object_object_add (lo, "allocated_bytes", json_object_new_int64 ((int64_t) ((a - z) << c->cbits)));
      json_object_object_add (lo, "zero_bytes", json_object_new_int64 ((int64_t) (z << c->cbits)));
      json_object_object_add (lo, "label", json_object_new_string (l->desc.label ? l->desc.label : ""));
    }
    json_object_array_add (arr, lo);
  }
  ovc__gate_leave (c);
  json_object_object_add (o, "layers", arr);
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->op_lock);
  if (c->op_state != OP_NONE) {
    struct json_object *op = json_object_new_object ();
    json_object_object_add (op, "type", json_object_new_string ("commit"));
    json_object_object_add (op, "state", json_object_new_string (op_state_name (c->op_state)));
    json_object_object_add (op, "lo", json_object_new_int (c->op_lo));
    json_object_object_add (op, "hi", json_object_new_int (c->op_hi));
    json_object_object_add (op, "active", json_object_new_boolean (c->op_active));
    json_object_object_add (op, "mode", json_object_new_string (cbw_commit_mode_name (c->op_mode)));
    json_object_object_add (op, "done", json_object_new_int64 ((int64_t) atomic_load (&c->op_done)));
    json_object_object_add (op, "total", json_object_new_int64 ((int64_t) c->op_total));
    json_object_object_add (op, "speed", json_object_new_int64 ((int64_t) atomic_load (&c->op_speed)));
    if (c->op_state == OP_FAILED || c->op_state == OP_CANCELLED)
      json_object_object_add (op, "error", json_object_new_string (c->op_err.msg));
    json_object_object_add (o, "operation", op);
  }
  return o;
}
