/* cbw — plugin/chain/overlay_chain.c: layered I/O over a raw base and a
 * chain of overlays (formats/overlay.h), plus the chain operations:
 * snapshot, commit (active/intermediate, make-empty/delete), status.
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
 * from another chain's layers in the same directory).  A commit of layers lo..hi into
 * lo-1 copies, in a background thread, every cluster allocated in lo..hi
 * (view of layers 0..hi) into layer lo-1; those clusters are shadowed by
 * lo..hi, so the guest-visible content never changes.  The copy runs in
 * windows of up to 8 MiB taken by COMMIT_WORKERS threads (see "Commit copy
 * engine" below: copy_file_range into the base, fallocate for ZERO runs).
 * An active commit (hi = top) also mirrors guest writes into lo-1 under the
 * same range lock.
 * Then: drain, flush, (only for a delete below the top, which changes two
 * files: record phase "finish" in the chain descriptor), apply (make-empty:
 * empty the maps bottom-up; delete: relink the layer above, save the
 * descriptor without the layers), resume, and only then free the merged
 * layers' space (a reaper thread closes deleted layers' files).  Recovery
 * at open: a commit interrupted before the switch left the chain unchanged
 * (lo-1 only got shadowed clusters; an old "copy" record is dropped);
 * phase "finish" is rolled forward.
 *
 * Locking (never held across I/O):
 *  - gate_lock/gate_cond: in_flight counts guest requests and commit chunks
 *    using c->layers; paused blocks new ones.  c->layers, c->nl, c->desc and
 *    c->mirror change only while paused with in_flight == 0.
 *  - map_lock: every layer's map, map_dirty, data_dirty.
 *  - range_lock/range_cond: active cluster ranges of writes (top writes,
 *    mirror writes, commit copy chunks); overlapping ones wait.
 *  - flush_lock/flush_cond: "flushing" flag; one flush at a time.
 *  - op_lock: operation state (op_* fields, snapshot/commit start/finish,
 *    reap_thread/reap_live).
 *  - op_iter_lock: the commit workers' shared cursor (op_next, op_stop).
 *    op_bits, op_lo/op_hi, op_chunk/op_flags are written before the workers
 *    start and only read while they run.
 * Lock order: op_lock -> gate_lock; map_lock, range_lock and op_iter_lock
 * are leaves.
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
#include "overlay_chain.h"

#ifndef COPY_CHUNK
#define COPY_CHUNK (1024 * 1024)   /* unit of written zeros (fallback of fallocate) */
#endif

struct layer {
  char *name;                   /* base path or overlay descriptor name */
  bool is_base;
  int fd;
  bool desc_loaded, map_loaded;
  struct cbw_ovl_desc desc;     /* overlays */
  char *map_path;               /* overlays */
  char *data_path;
  struct cbw_ovl_map map;       /* overlays; map_lock */
  bool map_dirty;               /* map_lock */
  bool data_dirty;              /* map_lock */
};

struct range { uint64_t s, e; };   /* clusters [s, e] */

enum op_state { OP_NONE, OP_RUNNING, OP_COMPLETED, OP_FAILED, OP_CANCELLED };

struct ovc {
  char *chain_path, *dir;
  uint64_t size;
  uint32_t csize, cbits;
  bool readonly, force_share;

  /* changed only while paused (see top) */
  struct cbw_chain_desc desc;
  unsigned nl;                  /* layers incl. base */
  struct layer **layers;
  int mirror;                   /* active commit target, or -1 */

  pthread_mutex_t gate_lock;
  pthread_cond_t gate_cond;
  unsigned in_flight;
  bool paused;

  pthread_mutex_t map_lock;

  pthread_mutex_t range_lock;
  pthread_cond_t range_cond;
  struct range *ranges;
  size_t nranges, ranges_cap;

  pthread_mutex_t flush_lock;
  pthread_cond_t flush_cond;
  bool flushing;

  pthread_mutex_t op_lock;      /* guards op_* */
  enum op_state op_state;
  bool op_thread_live;          /* joinable */
  pthread_t op_thread;
  unsigned op_lo, op_hi;
  enum cbw_commit_mode op_mode;
  bool op_active;
  _Atomic uint64_t op_speed;
  _Atomic bool op_cancel;
  _Atomic bool op_mirror_failed; /* a mirrored guest write failed: the commit must not finish */
  struct cbw_err op_mirror_err;  /* op_lock */
  _Atomic uint64_t op_done;
  uint64_t op_total;
  struct cbw_bitmap op_bits;    /* clusters to copy (read-only during the copy) */
  pthread_mutex_t op_iter_lock; /* guards op_next, op_stop (commit workers) */
  uint64_t op_next;             /* next cluster the copy looks at */
  uint64_t op_chunk;            /* window size in bytes (commit thread, set before workers) */
  unsigned op_flags;            /* OVC_TUNE_* (same) */
  bool op_stop;                 /* a worker failed: the others stop */
  _Atomic bool op_no_cfr;       /* copy_file_range refused: copy through buffers */
  struct layer **op_dropped;    /* layers deleted by the switch, closed after resume */
  unsigned op_ndropped;
  pthread_t reap_thread;        /* closes deleted layers (frees their space); op_lock */
  bool reap_live;               /* op_lock */
  unsigned op_trunc_hi;         /* make-empty: layers op_lo..op_trunc_hi punched after resume */
  bool op_punch_top;            /* make-empty of the active top: punch its unused clusters */
  struct cbw_err op_err;
  int64_t op_started;
  struct timespec op_t0;        /* commit thread: start of the copy (speed limit) */
  bool switch_pending;          /* a recorded switch failed: reopen finishes it */
};

/* ------------------------------------------------------------ test hook */

static ovc_hook_fn hook_fn;
static void *hook_opaque;

void
ovc_set_test_hook (ovc_hook_fn fn, void *opaque)
{
  hook_fn = fn;
  hook_opaque = opaque;
}

static int
hook (const char *point, struct cbw_err *err)
{
  if (hook_fn && hook_fn (point, NULL, hook_opaque) != 0)
    return cbw_err_set (err, EIO, "injected I/O error at %s", point);
  return 0;
}

static void
durable (const char *path)
{
  if (hook_fn)
    hook_fn ("durable", path, hook_opaque);
}

static void
hook_path_in (const char *point, const char *dir, const char *name)
{
  if (hook_fn) {
    CLEANUP_FREE char *p = cbw_ovl_join (dir, name);
    if (p) hook_fn (point, p, hook_opaque);
  }
}

static void
durable_in (const char *dir, const char *name)
{
  hook_path_in ("durable", dir, name);
}

/* Every metadata save of the engine goes through these (durability hook). */
static int
chain_save (const char *path, struct cbw_chain_desc *d, struct cbw_err *err)
{
  if (cbw_chain_desc_save (path, d, err) < 0) return -1;
  durable (path);
  return 0;
}

static int
map_save (const char *path, struct cbw_ovl_map *m, struct cbw_err *err)
{
  if (cbw_ovl_map_save (path, m, err) < 0) return -1;
  durable (path);
  return 0;
}

static int
atomic_save (const char *path, const void *buf, size_t len, struct cbw_err *err)
{
  if (cbw_write_file_atomic (path, buf, len, err) < 0) return -1;
  durable (path);
  return 0;
}

static int
desc_save (const char *dir, const struct cbw_ovl_desc *d, struct cbw_err *err)
{
  if (cbw_ovl_desc_save (dir, d, err) < 0) return -1;
  durable_in (dir, d->name);
  return 0;
}

/* ------------------------------------------------------------- helpers */

static void reap_wait (struct ovc *c);

static uint64_t min64 (uint64_t a, uint64_t b) { return a < b ? a : b; }

static uint64_t
cl_start (struct ovc *c, uint64_t cl) { return cl << c->cbits; }

static uint64_t
cl_end (struct ovc *c, uint64_t cl) { return min64 ((cl + 1) << c->cbits, c->size); }

static void
gate_enter (struct ovc *c)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->gate_lock);
  while (c->paused)
    pthread_cond_wait (&c->gate_cond, &c->gate_lock);
  c->in_flight++;
}

static void
gate_leave (struct ovc *c)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->gate_lock);
  if (--c->in_flight == 0)
    pthread_cond_broadcast (&c->gate_cond);
}

static void
gate_pause (struct ovc *c)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->gate_lock);
  while (c->paused)
    pthread_cond_wait (&c->gate_cond, &c->gate_lock);
  c->paused = true;
  while (c->in_flight > 0)
    pthread_cond_wait (&c->gate_cond, &c->gate_lock);
}

static void
gate_resume (struct ovc *c)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->gate_lock);
  c->paused = false;
  pthread_cond_broadcast (&c->gate_cond);
}

static int
range_acquire (struct ovc *c, uint64_t s, uint64_t e, struct cbw_err *err)
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

static void
range_release (struct ovc *c, uint64_t s, uint64_t e)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->range_lock);
  for (size_t i = 0; i < c->nranges; i++)
    if (c->ranges[i].s == s && c->ranges[i].e == e) {
      c->ranges[i] = c->ranges[--c->nranges];
      break;
    }
  pthread_cond_broadcast (&c->range_cond);
}

static void
layer_free (struct layer *l)
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
static struct layer *
layer_open (struct ovc *c, const char *name, bool is_base, struct cbw_err *err)
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
  layer_free (l);
  return NULL;
}

/* ------------------------------------------------------------- reading */

/* Which layer serves cluster cl in the view of layers 0..top: its index and
 * state (DATA for the base).  Caller holds map_lock. */
static unsigned
serving_layer (struct ovc *c, unsigned top, uint64_t cl, enum cbw_ovl_state *st)
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
      k = serving_layer (c, top, cl, &st);
      run_end = min64 (end, cl_end (c, cl));
      while (run_end < end) {
        cl++;
        if (serving_layer (c, top, cl, &st2) != k || st2 != st) break;
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
static int
write_layer (struct ovc *c, unsigned k, const void *buf, uint64_t count,
             uint64_t off, struct cbw_err *err)
{
  struct layer *l = c->layers[k];
  const char *p = buf;
  uint64_t end = off + count;

  if (hook (k == c->nl - 1 ? "write" : "write-lower", err) < 0)
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
    if (write_layer (c, 0, z, n, off, err) < 0)
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
static int
zero_layer (struct ovc *c, unsigned k, uint64_t count, uint64_t off,
            struct cbw_err *err)
{
  struct layer *l = c->layers[k];
  uint64_t end = off + count;

  if (hook (k == c->nl - 1 ? "write" : "write-lower", err) < 0)
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
static int
do_flush (struct ovc *c, struct cbw_err *err)
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
      if (hook ("flush-data", err) < 0)
        r = -1;
      else if (cbw_fdatasync (l->fd) < 0)
        r = cbw_err_set (err, errno, "layer %u '%s': fdatasync: %s", k,
                         l->name, strerror (errno));
      else
        durable (l->data_path);
    }
    if (r == 0 && md &&
        (hook ("flush-map", err) < 0 ||
         atomic_save (l->map_path, mbuf, mlen, err) < 0))
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
  gate_enter (c);
  unsigned n = c->nl - 1;
  gate_leave (c);
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
  gate_enter (c);
  int r = read_view (c, c->nl - 1, buf, count, offset, err);
  gate_leave (c);
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
  gate_enter (c);
  if (range_acquire (c, s, e, err) < 0) {
    gate_leave (c);
    return -1;
  }
  unsigned top = c->nl - 1;
  r = buf ? write_layer (c, top, buf, count, offset, err)
          : zero_layer (c, top, count, offset, err);
  if (r == 0 && c->mirror >= 0) {
    /* The guest write is complete in the top.  A failure to mirror it into
     * the commit target fails the commit, never the guest write. */
    struct cbw_err merr = { 0 };
    int mr = buf ? write_layer (c, (unsigned) c->mirror, buf, count, offset, &merr)
                 : zero_layer (c, (unsigned) c->mirror, count, offset, &merr);
    if (mr < 0 && !atomic_exchange (&c->op_mirror_failed, true)) {
      cbw_err_prefix (&merr, "active commit: mirroring a guest write into layer %d",
                      c->mirror);
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->op_lock);
      c->op_mirror_err = merr;
    }
  }
  range_release (c, s, e);
  if (r == 0 && fua)
    r = do_flush (c, err);
  gate_leave (c);
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
  gate_enter (c);
  int r = do_flush (c, err);
  gate_leave (c);
  return r;
}

int
ovc_extent (struct ovc *c, uint64_t offset, uint64_t count, uint64_t *len,
            bool *allocated, bool *zero, struct cbw_err *err)
{
  if (check_range (c, count, offset, err) < 0)
    return -1;
  gate_enter (c);
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->map_lock);
    unsigned top = c->nl - 1;
    uint64_t end = offset + count, cl = offset >> c->cbits, run_end;
    enum cbw_ovl_state st, st2;
    unsigned k = serving_layer (c, top, cl, &st), k2;
    run_end = min64 (end, cl_end (c, cl));
    while (run_end < end) {
      cl++;
      k2 = serving_layer (c, top, cl, &st2);
      if ((k2 == 0) != (k == 0) || st2 != st) break;
      run_end = min64 (end, cl_end (c, cl));
    }
    *len = run_end - offset;
    *allocated = top == 0 || k > 0;
    *zero = st == CBW_OVL_ZERO;
  }
  gate_leave (c);
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
  gate_enter (c);
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
  gate_leave (c);
  if (r < 0 && name_out) {
    free (*name_out);
    *name_out = NULL;
  }
  return r;
}

/* ------------------------------------------------------------ open/close */

int
ovc_create (const char *chain_path, const char *base, uint32_t cluster_size,
            struct cbw_err *err)
{
  struct cbw_chain_desc d = { 0 };
  CLEANUP_FREE char *dir = cbw_ovl_dirname (chain_path);
  CLEANUP_FREE char *bpath = NULL;
  if (dir == NULL || (bpath = cbw_ovl_join (dir, base)) == NULL)
    return cbw_err_set (err, ENOMEM, "out of memory");
  int fd = open (bpath, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return cbw_err_set (err, errno, "base %s: %s", bpath, strerror (errno));
  off_t sz = lseek (fd, 0, SEEK_END);
  close (fd);
  if (sz <= 0)
    return cbw_err_set (err, EINVAL, "base %s: empty or unreadable size", bpath);
  d.size = (uint64_t) sz;
  d.cluster_size = cluster_size ? cluster_size : CBW_OVL_CLUSTER_DEFAULT;
  d.base = (char *) base;
  d.layers = NULL;
  d.nlayers = 0;
  struct cbw_ovl_map m;   /* validates cluster size */
  if (cbw_ovl_map_init (&m, d.size, d.cluster_size, err) < 0)
    return -1;
  cbw_ovl_map_free (&m);
  /* O_EXCL: whatever is at chain_path (a chain, a dangling link) stays. */
  if (cbw_chain_desc_create (chain_path, &d, err) < 0)
    return -1;
  durable (chain_path);
  return 0;
}

/* Roll a recorded "finish" forward on disk (idempotent). d is updated to
 * the final chain (no operation) and saved. */
static int
roll_forward (const char *chain_path, const char *dir, struct cbw_chain_desc *d,
              struct cbw_err *err)
{
  unsigned lo = d->op.lo, hi = d->op.hi, i;
  if (d->op.mode == CBW_COMMIT_MAKE_EMPTY) {
    for (i = lo; i <= hi; i++) {
      struct cbw_ovl_desc od;
      struct cbw_ovl_map m;
      if (cbw_ovl_desc_load (dir, d->layers[i - 1], &od, err) < 0)
        return -1;
      CLEANUP_FREE char *mp = cbw_ovl_join (dir, od.map);
      int r = mp && cbw_ovl_map_init (&m, d->size, d->cluster_size, err) == 0 ? 0 : -1;
      if (r == 0) {
        /* keep the generation increasing */
        struct cbw_ovl_map old;
        if (cbw_ovl_map_load (mp, d->size, d->cluster_size, &old, NULL) == 0) {
          m.generation = old.generation;
          cbw_ovl_map_free (&old);
        }
        r = hook ("finish-empty", err) < 0 ? -1 : map_save (mp, &m, err);
        cbw_ovl_map_free (&m);
      }
      cbw_ovl_desc_free (&od);
      if (r < 0)
        return -1;
    }
    d->op.type = CBW_CHAIN_OP_NONE;
    return chain_save (chain_path, d, err);
  }
  /* delete: relink the layer above hi, drop lo..hi, remove their files */
  const char *below = lo == 1 ? d->base : d->layers[lo - 2];
  if (hi < d->nlayers) {
    struct cbw_ovl_desc od;
    if (cbw_ovl_desc_load (dir, d->layers[hi], &od, err) < 0)
      return -1;
    int r = 0;
    if (strcmp (od.backing, below) != 0) {
      char *nb = strdup (below);
      if (nb == NULL) r = cbw_err_set (err, ENOMEM, "out of memory");
      else {
        free (od.backing);
        od.backing = nb;
        r = hook ("finish-relink", err) < 0 ? -1 : desc_save (dir, &od, err);
      }
    }
    cbw_ovl_desc_free (&od);
    if (r < 0)
      return -1;
  }
  char **dropped = calloc (hi - lo + 2, sizeof (char *));
  if (dropped == NULL)
    return cbw_err_set (err, ENOMEM, "out of memory");
  for (i = lo; i <= hi; i++)
    dropped[i - lo] = d->layers[i - 1];
  memmove (&d->layers[lo - 1], &d->layers[hi], (d->nlayers - hi) * sizeof (char *));
  d->nlayers -= hi - lo + 1;
  d->op.type = CBW_CHAIN_OP_NONE;
  int r = hook ("finish-save", err) < 0 ? -1 : chain_save (chain_path, d, err);
  for (i = 0; dropped[i]; i++) {
    if (r == 0) {
      struct cbw_ovl_desc od;
      if (cbw_ovl_desc_load (dir, dropped[i], &od, NULL) == 0) {
        cbw_ovl_remove (dir, &od, NULL);
        cbw_ovl_desc_free (&od);
      }
    }
    free (dropped[i]);
  }
  free (dropped);
  return r;
}

struct ovc *
ovc_open (const char *chain_path, const struct ovc_open_opts *opts,
          char **recovered, struct cbw_err *err)
{
  struct ovc *c = calloc (1, sizeof *c);
  unsigned i;

  if (recovered) *recovered = NULL;
  if (c == NULL) {
    cbw_err_set (err, ENOMEM, "out of memory");
    return NULL;
  }
  pthread_mutex_init (&c->gate_lock, NULL);
  pthread_cond_init (&c->gate_cond, NULL);
  pthread_mutex_init (&c->map_lock, NULL);
  pthread_mutex_init (&c->range_lock, NULL);
  pthread_cond_init (&c->range_cond, NULL);
  pthread_mutex_init (&c->flush_lock, NULL);
  pthread_cond_init (&c->flush_cond, NULL);
  pthread_mutex_init (&c->op_lock, NULL);
  pthread_mutex_init (&c->op_iter_lock, NULL);
  c->mirror = -1;
  c->readonly = opts && opts->readonly;
  c->force_share = opts && opts->force_share;
  c->chain_path = strdup (chain_path);
  c->dir = cbw_ovl_dirname (chain_path);
  if (c->chain_path == NULL || c->dir == NULL) {
    cbw_err_set (err, ENOMEM, "out of memory");
    goto fail;
  }
  if (cbw_chain_desc_load (chain_path, &c->desc, err) < 0)
    goto fail;
  if (c->desc.op.type == CBW_CHAIN_OP_COMMIT) {
    char note[256];
    if (c->readonly) {
      cbw_err_set (err, EBUSY, "%s: an interrupted commit must be recovered; "
                   "open the chain read-write once", chain_path);
      goto fail;
    }
    snprintf (note, sizeof note, "commit of layers %u..%u (%s) was interrupted %s",
              c->desc.op.lo, c->desc.op.hi, cbw_commit_mode_name (c->desc.op.mode),
              c->desc.op.phase == CBW_CHAIN_PHASE_COPY
              ? "while copying: undone, the chain is unchanged (run it again)"
              : "while switching: finished");
    if (c->desc.op.phase == CBW_CHAIN_PHASE_COPY) {
      c->desc.op.type = CBW_CHAIN_OP_NONE;
      if (chain_save (chain_path, &c->desc, err) < 0)
        goto fail;
    }
    else if (roll_forward (chain_path, c->dir, &c->desc, err) < 0) {
      cbw_err_prefix (err, "%s: recovering interrupted commit", chain_path);
      goto fail;
    }
    if (recovered) *recovered = strdup (note);
  }
  if (cbw_chain_validate (c->dir, &c->desc, err) < 0) {
    cbw_err_prefix (err, "%s", chain_path);
    goto fail;
  }
  c->size = c->desc.size;
  c->csize = c->desc.cluster_size;
  c->cbits = (uint32_t) __builtin_ctz (c->csize);
  c->nl = (unsigned) c->desc.nlayers + 1;
  c->layers = calloc (c->nl, sizeof *c->layers);
  if (c->layers == NULL) {
    cbw_err_set (err, ENOMEM, "out of memory");
    goto fail;
  }
  for (i = 0; i < c->nl; i++) {
    c->layers[i] = layer_open (c, i == 0 ? c->desc.base : c->desc.layers[i - 1],
                               i == 0, err);
    if (c->layers[i] == NULL) {
      cbw_err_prefix (err, "%s: layer %u", chain_path, i);
      goto fail;
    }
  }
  return c;
 fail:
  if (c->layers)
    for (i = 0; i < c->nl; i++) layer_free (c->layers[i]);
  free (c->layers);
  cbw_chain_desc_free (&c->desc);
  free (c->chain_path);
  free (c->dir);
  free (c);
  if (recovered) { free (*recovered); *recovered = NULL; }
  return NULL;
}

void
ovc_close (struct ovc *c)
{
  struct cbw_err e;
  if (c == NULL) return;
  ovc_commit_cancel (c, &e);
  ovc_commit_wait (c, &e);
  reap_wait (c);
  if (!c->readonly)
    do_flush (c, &e);
  for (unsigned i = 0; i < c->nl; i++)
    layer_free (c->layers[i]);
  free (c->layers);
  free (c->ranges);
  cbw_chain_desc_free (&c->desc);
  cbw_bitmap_free (&c->op_bits);
  free (c->chain_path);
  free (c->dir);
  free (c);
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

  gate_pause (c);          /* in-flight writes drain */
  if (do_flush (c, err) < 0) {
    cbw_err_prefix (err, "snapshot: flush");
    goto out;
  }
  if (hook ("snapshot-flushed", err) < 0)
    goto out;
  hook_path_in ("new-layer", c->dir, name);
  /* On failure cbw_ovl_create removed what it created, and only that: a
   * file that was already at one of the names is not ours to remove. */
  if (cbw_ovl_create (c->dir, name, c->layers[c->nl - 1]->name, label,
                      c->size, c->csize, err) < 0) {
    cbw_err_prefix (err, "snapshot");
    goto out;
  }
  {
    char tmp[CBW_OVL_NAME_MAX + 8];
    durable_in (c->dir, name);
    snprintf (tmp, sizeof tmp, "%s.data", name);
    durable_in (c->dir, tmp);
    snprintf (tmp, sizeof tmp, "%s.map", name);
    durable_in (c->dir, tmp);
  }
  if (hook ("snapshot-created", err) < 0)
    goto out_rm;
  nl = layer_open (c, name, false, err);
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
  if (chain_save (c->chain_path, &nd, err) < 0 ||   /* commit point */
      hook ("snapshot-saved", err) < 0) {
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
  hook ("snapshot-done", NULL);
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
  layer_free (nl);
  gate_resume (c);
  return r;
}

/* ---------------------------------------------------------------- commit */

static bool
all_zero (const char *p, size_t n)
{
  static const char z[4096];
  while (n >= sizeof z) {
    if (memcmp (p, z, sizeof z)) return false;
    p += sizeof z; n -= sizeof z;
  }
  return memcmp (p, z, n) == 0;
}

static void
throttle (struct ovc *c, struct timespec *t0)
{
  uint64_t speed = atomic_load (&c->op_speed);
  if (speed == 0) return;
  for (;;) {
    struct timespec now;
    clock_gettime (CLOCK_MONOTONIC, &now);
    double el = (double) (now.tv_sec - t0->tv_sec) + (now.tv_nsec - t0->tv_nsec) / 1e9;
    double want = (double) atomic_load (&c->op_done) / (double) speed;
    if (want <= el || atomic_load (&c->op_cancel) || atomic_load (&c->op_speed) == 0)
      return;
    double d = want - el;
    if (d > 0.05) d = 0.05;
    struct timespec ts = { 0, (long) (d * 1e9) };
    nanosleep (&ts, NULL);
    speed = atomic_load (&c->op_speed);
    if (speed == 0) return;
  }
}

/* Commit copy engine.
 *
 * The set U of clusters to copy (c->op_bits) is cut into windows of at most
 * commit_step() clusters, each starting at the next set bit; a window may
 * hold several extents of U (the clusters between them are skipped), so a
 * fragmented map costs one lock round per window, not per extent.  Up to
 * COMMIT_WORKERS threads (ovc_set_commit_tuning) take windows from a shared cursor (op_iter_lock)
 * and copy them concurrently; each window is copied under the cluster range
 * lock covering the whole window, like a guest write, so a guest write (or
 * its mirror) into the window waits and never interleaves with the copy.
 *
 * Inside a window the clusters are grouped, under map_lock, into segments
 * served by the same layer in the same state (view of layers 0..hi).  The
 * view cannot change while the range lock is held.  Then, without locks:
 *  - ZERO segments: into the base, fallocate(ZERO_RANGE) (PUNCH_HOLE, then
 *    written zeros as fallbacks); into an overlay, a ZERO map record;
 *  - DATA segments into the base: copy_file_range(2) from the overlay's
 *    data file (in-kernel copy, no user-space buffer); if the kernel or the
 *    file systems refuse (EXDEV, EINVAL, ENOSYS, EOPNOTSUPP...), pread +
 *    pwrite through a buffer, and the buffered path is kept for the rest of
 *    the commit;
 *  - DATA segments into an overlay: pread + pwrite, all-zero segments
 *    become ZERO clusters.
 * After each window into the base, writeback of its range is started
 * (sync_file_range WRITE, asynchronous, no durability claim) so that the one
 * fdatasync of the switch does not find the whole commit dirty.  There is no
 * other sync during the copy: nothing becomes visible or durable-relevant
 * before the switch (see docs/formats/overlay.md, "Commit").
 */

#ifndef COMMIT_CHUNK
#define COMMIT_CHUNK (8 * 1024 * 1024)   /* max window (bytes) */
#endif
#ifndef COMMIT_WORKERS
#define COMMIT_WORKERS 2                 /* windows copied concurrently */
#endif
#define COMMIT_WORKERS_MAX 16

/* Process-global tuning (ovc_set_commit_tuning), read when a commit starts. */
static _Atomic uint64_t tune_chunk = COMMIT_CHUNK;
static _Atomic unsigned tune_workers = COMMIT_WORKERS;
static _Atomic unsigned tune_flags;

void
ovc_set_commit_tuning (uint64_t chunk, unsigned workers, unsigned flags)
{
  atomic_store (&tune_flags, flags);
  atomic_store (&tune_chunk, chunk ? chunk : COMMIT_CHUNK);
  atomic_store (&tune_workers, workers == 0 ? COMMIT_WORKERS
                : workers > COMMIT_WORKERS_MAX ? COMMIT_WORKERS_MAX : workers);
}

/* Window length in clusters: the chunk size, or with a speed limit about
 * 1/8 s worth of it (so the limit is smooth), at least one cluster. */
static uint64_t
commit_step (struct ovc *c)
{
  uint64_t bytes = c->op_chunk, speed = atomic_load (&c->op_speed);
  if (speed > 0 && speed / 8 < bytes)
    bytes = speed / 8;
  uint64_t n = bytes >> c->cbits;
  return n ? n : 1;
}

struct seg {
  uint64_t off, len;            /* bytes */
  unsigned k;                   /* serving layer */
  enum cbw_ovl_state st;
};

/* Worker-private state. */
struct cworker {
  struct ovc *c;
  char *buf;                    /* COMMIT_CHUNK (or one cluster), lazily */
  size_t buflen;
  struct seg *segs;
  size_t nsegs_cap;
  struct cbw_err err;
  int r;
  pthread_t tid;
  bool live;
};

static int
worker_buf (struct cworker *w, struct cbw_err *err)
{
  if (w->buf == NULL) {
    w->buflen = w->c->op_chunk > w->c->csize ? w->c->op_chunk : w->c->csize;
    if ((w->buf = malloc (w->buflen)) == NULL)
      return cbw_err_set (err, ENOMEM, "commit: out of memory");
  }
  return 0;
}

/* Copy [off, off+len) of layer k's data file into the base, in the kernel
 * when possible. */
static int
copy_to_base (struct ovc *c, struct cworker *w, unsigned k, uint64_t off,
              uint64_t len, struct cbw_err *err)
{
  struct layer *src = c->layers[k], *dst = c->layers[0];
  uint64_t done = 0;

  if (hook ("commit-copy-range", err) < 0)
    return -1;
  while (done < len && !atomic_load (&c->op_no_cfr)) {
    loff_t io = (loff_t) (off + done), oo = (loff_t) (off + done);
    ssize_t n = copy_file_range (src->fd, &io, dst->fd, &oo,
                                 (size_t) min64 (len - done, 1 << 30), 0);
    if (n > 0) { done += (uint64_t) n; continue; }
    if (n < 0 && errno == EINTR) continue;
    if (n == 0 || errno == EXDEV || errno == EINVAL || errno == ENOSYS ||
        errno == EOPNOTSUPP || errno == EBADF || errno == EPERM ||
        errno == ETXTBSY) {
      /* Not supported here (or a short file, which the buffered path
       * reports properly): buffers from now on. */
      atomic_store (&c->op_no_cfr, true);
      break;
    }
    return cbw_err_set (err, errno, "copy_file_range layer %u '%s' -> base "
                        "'%s' at %" PRIu64 ": %s", k, src->name, dst->name,
                        off + done, strerror (errno));
  }
  while (done < len) {
    if (worker_buf (w, err) < 0)
      return -1;
    size_t n = (size_t) min64 (len - done, w->buflen);
    if (cbw_pread_full (src->fd, w->buf, n, off + done) < 0)
      return cbw_err_set (err, errno, "layer %u '%s': read at %" PRIu64 ": %s",
                          k, src->name, off + done, strerror (errno));
    if (cbw_pwrite_full (dst->fd, w->buf, n, off + done) < 0)
      return cbw_err_set (err, errno, "base '%s': write at %" PRIu64 ": %s",
                          dst->name, off + done, strerror (errno));
    done += n;
  }
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->map_lock);
  dst->data_dirty = true;
  return 0;
}

/* Copy one segment of the view into layer tgt. */
static int
copy_seg (struct ovc *c, struct cworker *w, unsigned tgt, const struct seg *g,
          struct cbw_err *err)
{
  if (g->st == CBW_OVL_ZERO)
    return zero_layer (c, tgt, g->len, g->off, err);
  if (tgt == 0) {
    if (hook ("write-lower", err) < 0)
      return -1;
    return copy_to_base (c, w, g->k, g->off, g->len, err);
  }
  /* into an overlay: through a buffer, all-zero pieces become ZERO */
  if (worker_buf (w, err) < 0)
    return -1;
  for (uint64_t o = g->off, end = g->off + g->len; o < end;) {
    uint64_t n = min64 (end - o, w->buflen);
    struct layer *src = c->layers[g->k];
    if (cbw_pread_full (src->fd, w->buf, n, o) < 0)
      return cbw_err_set (err, errno, "layer %u '%s': read at %" PRIu64 ": %s",
                          g->k, src->name, o, strerror (errno));
    if ((all_zero (w->buf, n) ? zero_layer (c, tgt, n, o, err)
                              : write_layer (c, tgt, w->buf, n, o, err)) < 0)
      return -1;
    o += n;
  }
  return 0;
}

/* Split the clusters of U in [ws, we) into segments (caller holds the range
 * lock of the window).  Returns the number of segments. */
static size_t
window_segments (struct ovc *c, struct cworker *w, uint64_t ws, uint64_t we)
{
  unsigned hi = c->op_hi;
  size_t n = 0;
  uint64_t s, cnt, from = ws;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->map_lock);
  while (from < we && cbw_bitmap_next_extent (&c->op_bits, from, &s, &cnt) &&
         s < we) {
    uint64_t e = min64 (s + cnt, we);
    for (uint64_t cl = s; cl < e; cl++) {
      enum cbw_ovl_state st;
      unsigned k = serving_layer (c, hi, cl, &st);
      struct seg *last = n ? &w->segs[n - 1] : NULL;
      if (last && last->k == k && last->st == st &&
          last->off + last->len == cl_start (c, cl))
        last->len = cl_end (c, cl) - last->off;
      else
        w->segs[n++] = (struct seg) { cl_start (c, cl), cl_end (c, cl) - cl_start (c, cl),
                                      k, st };
    }
    from = e;
  }
  return n;
}

/* Copy the clusters of U in [ws, we). */
static int
copy_window (struct ovc *c, struct cworker *w, uint64_t ws, uint64_t we,
             struct cbw_err *err)
{
  unsigned tgt = c->op_lo - 1;
  uint64_t bytes = 0;
  int r = 0;

  if (atomic_load (&c->op_cancel))
    return cbw_err_set (err, ECANCELED, "commit cancelled");
  if (atomic_load (&c->op_mirror_failed))
    return cbw_err_set (err, EIO, "commit stopped: a mirrored write failed");
  if (we - ws > w->nsegs_cap) {
    struct seg *ns = realloc (w->segs, (we - ws) * sizeof *ns);
    if (ns == NULL)
      return cbw_err_set (err, ENOMEM, "commit: out of memory");
    w->segs = ns;
    w->nsegs_cap = we - ws;
  }
  gate_enter (c);
  if (range_acquire (c, ws, we - 1, err) < 0) {
    gate_leave (c);
    return -1;
  }
  r = hook ("commit-copy", err);
  size_t nsegs = r == 0 ? window_segments (c, w, ws, we) : 0;
  for (size_t i = 0; i < nsegs && r == 0; i++) {
    r = copy_seg (c, w, tgt, &w->segs[i], err);
    bytes += w->segs[i].len;
  }
  if (r == 0 && tgt == 0 && nsegs > 0 && !(c->op_flags & OVC_TUNE_NO_WRITEBACK_KICK)) {
    /* start writeback of the window (asynchronous; not a durability point) */
    uint64_t s = w->segs[0].off, e = w->segs[nsegs - 1].off + w->segs[nsegs - 1].len;
    (void) sync_file_range (c->layers[0]->fd, (off64_t) s, (off64_t) (e - s),
                            SYNC_FILE_RANGE_WRITE);
  }
  range_release (c, ws, we - 1);
  gate_leave (c);
  if (r < 0)
    return cbw_err_prefix (err, "commit: copying clusters %" PRIu64 "..%" PRIu64,
                           ws, we - 1);
  atomic_fetch_add (&c->op_done, bytes);
  return 0;
}

/* Next window to copy, or false when U is exhausted or a worker failed. */
static bool
next_window (struct ovc *c, uint64_t *ws, uint64_t *we)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->op_iter_lock);
  if (c->op_stop)
    return false;
  uint64_t s = cbw_bitmap_next_set (&c->op_bits, c->op_next);
  if (s == UINT64_MAX || s >= c->op_bits.nbits)
    return false;
  *ws = s;
  *we = min64 (s + commit_step (c), c->op_bits.nbits);
  c->op_next = *we;
  return true;
}

static void *
commit_worker (void *arg)
{
  struct cworker *w = arg;
  struct ovc *c = w->c;
  uint64_t ws, we;
  while (w->r == 0 && next_window (c, &ws, &we)) {
    w->r = copy_window (c, w, ws, we, &w->err);
    if (w->r < 0) {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->op_iter_lock);
      c->op_stop = true;
      break;
    }
    throttle (c, &c->op_t0);
  }
  return NULL;
}

/* Run the copy with up to COMMIT_WORKERS threads (the caller is one). */
static int
commit_copy (struct ovc *c, struct cbw_err *err)
{
  struct cworker w[COMMIT_WORKERS_MAX];
  int r = 0;
  unsigned i, nw = atomic_load (&tune_workers);

  memset (w, 0, sizeof w);
  c->op_chunk = atomic_load (&tune_chunk);
  c->op_flags = atomic_load (&tune_flags);
  c->op_next = 0;
  c->op_stop = false;
  atomic_store (&c->op_no_cfr, (c->op_flags & OVC_TUNE_NO_COPY_FILE_RANGE) != 0);
  clock_gettime (CLOCK_MONOTONIC, &c->op_t0);
  for (i = 0; i < nw; i++)
    w[i].c = c;
  for (i = 1; i < nw; i++)
    w[i].live = pthread_create (&w[i].tid, NULL, commit_worker, &w[i]) == 0;
  commit_worker (&w[0]);
  for (i = 1; i < nw; i++)
    if (w[i].live)
      pthread_join (w[i].tid, NULL);
  /* Report the first real error (a cancel seen by one worker while another
   * failed reports the failure). */
  for (i = 0; i < nw; i++)
    if (w[i].r < 0 && (r == 0 || err->errnum == ECANCELED)) {
      *err = w[i].err;
      r = -1;
    }
  for (i = 0; i < nw; i++) {
    free (w[i].buf);
    free (w[i].segs);
  }
  return r;
}

/* Final switch (I/O paused).  Records phase "finish", applies it. */
static int
commit_finish (struct ovc *c, bool *recorded, struct cbw_err *err)
{
  unsigned lo = c->op_lo, hi = c->op_hi, i;
  struct cbw_chain_desc nd;

  if (atomic_load (&c->op_mirror_failed))
    return cbw_err_set (err, EIO, "commit stopped: a mirrored write failed");
  if (do_flush (c, err) < 0)
    return cbw_err_prefix (err, "commit: flush before switch");
  if (hook ("commit-flushed", err) < 0)
    return -1;
  if (cbw_chain_desc_copy (&nd, &c->desc, err) < 0)
    return -1;
  /* The switch needs a recorded phase only when it changes two files (delete
   * below the top: the layer above is relinked, then the chain is saved).
   * Make-empty keeps the content identical at every step (bottom-up), and a
   * delete up to the top is one chain descriptor replace. */
  bool need_record = c->op_mode == CBW_COMMIT_DELETE && hi < c->nl - 1;
  nd.op = (struct cbw_chain_op) { CBW_CHAIN_OP_COMMIT, CBW_CHAIN_PHASE_FINISH,
                                  c->op_mode, lo, hi };
  if (need_record && chain_save (c->chain_path, &nd, err) < 0) {
    cbw_chain_desc_free (&nd);
    return cbw_err_prefix (err, "commit: recording the switch");
  }
  if (!need_record) {
    nd.op.type = CBW_CHAIN_OP_NONE;
    nd.generation++;      /* what the record's save would have done */
  }
  /* From here the commit completes: on-disk recovery rolls it forward. */
  *recorded = true;
  if (hook ("commit-finish-recorded", err) < 0) {
    cbw_chain_desc_free (&c->desc);
    c->desc = nd;
    return -1;
  }
  if (c->op_mode == CBW_COMMIT_MAKE_EMPTY) {
    /* Memory first (the content is the same either way), then disk. */
    {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->map_lock);
      for (i = lo; i <= hi; i++) {
        cbw_ovl_map_set (&c->layers[i]->map, 0, c->layers[i]->map.nclusters,
                         CBW_OVL_UNALLOC);
        c->layers[i]->map_dirty = true;
      }
    }
    cbw_chain_desc_free (&c->desc);
    c->desc = nd;
    for (i = lo; i <= hi; i++) {
      struct layer *l = c->layers[i];
      CLEANUP_FREE void *mbuf = NULL;
      size_t mlen;
      int r;
      {
        ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->map_lock);
        l->map.generation++;
        r = cbw_ovl_map_encode (&l->map, &mbuf, &mlen, err);
      }
      if (r < 0 || hook ("finish-empty", err) < 0 ||
          atomic_save (l->map_path, mbuf, mlen, err) < 0)
        return cbw_err_prefix (err, "commit: emptying layer %u", i);
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->map_lock);
      l->map_dirty = false;
    }
    if (need_record || c->desc.op.type != CBW_CHAIN_OP_NONE) {
      c->desc.op.type = CBW_CHAIN_OP_NONE;
      if (hook ("finish-save", err) < 0 ||
          chain_save (c->chain_path, &c->desc, err) < 0)
        return -1;
    }
    /* The space is given back after I/O resumed (commit_release):
     * freeing blocks is slow for big layers.  The layers below the top are
     * read and written by nobody any more; the active top receives writes
     * right after the resume, so only its clusters that are still not DATA
     * are punched, under the range lock. */
    c->op_trunc_hi = hi < c->nl - 1 ? hi : hi - 1;
    c->op_punch_top = hi == c->nl - 1;
    return 0;
  }
  /* delete */
  if (roll_forward (c->chain_path, c->dir, &nd, err) < 0) {
    /* The disk has phase "finish" (and maybe a relink); memory still serves
     * the old chain, which has the same content.  Next open finishes it. */
    cbw_chain_desc_free (&nd);
    return cbw_err_prefix (err, "commit: switching");
  }
  /* Closing a deleted layer's data file frees its blocks (the last
   * reference): slow for big layers, so it is done after I/O resumed. */
  c->op_dropped = calloc (hi - lo + 1, sizeof *c->op_dropped);
  for (i = lo; i <= hi; i++) {
    if (c->op_dropped)
      c->op_dropped[c->op_ndropped++] = c->layers[i];
    else
      layer_free (c->layers[i]);
  }
  memmove (&c->layers[lo], &c->layers[hi + 1], (c->nl - hi - 1) * sizeof *c->layers);
  c->nl -= hi - lo + 1;
  cbw_chain_desc_free (&c->desc);
  c->desc = nd;
  return 0;
}

/* After the switch, with guest I/O running again: free the space of the
 * merged layers (see commit_finish).  The commit thread still holds the
 * operation (op_state RUNNING), so no snapshot or commit can change
 * c->layers meanwhile; the layers concerned are no longer read or written. */
/* Punch the data of every cluster of the top that is not DATA, window by
 * window under the range lock (a guest write into the window waits; the
 * map cannot turn a cluster into DATA while the lock is held, and reads
 * never look at the data of a cluster that is not DATA). */
static void
punch_unused_top (struct ovc *c)
{
  uint64_t step = COMMIT_CHUNK >> c->cbits;
  uint64_t (*runs)[2] = NULL;
  if (step == 0) step = 1;
  hook ("commit-punch", NULL);   /* tests: guest writes land here */
  runs = malloc ((step / 2 + 1) * sizeof *runs);
  if (runs == NULL)
    return;
  for (uint64_t ws = 0;; ws += step) {
    gate_enter (c);
    struct layer *l = c->layers[c->nl - 1];
    uint64_t ncl = l->map.nclusters, we = min64 (ws + step, ncl), nr = 0;
    if (ws >= ncl || range_acquire (c, ws, we - 1, NULL) < 0) {
      gate_leave (c);
      break;
    }
    {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->map_lock);
      for (uint64_t cl = ws; cl < we; cl++) {
        if (cbw_ovl_map_get (&l->map, cl) == CBW_OVL_DATA)
          continue;
        if (nr > 0 && runs[nr - 1][1] == cl)
          runs[nr - 1][1] = cl + 1;
        else {
          runs[nr][0] = cl;
          runs[nr++][1] = cl + 1;
        }
      }
    }
    for (uint64_t i = 0; i < nr; i++) {
      uint64_t s = cl_start (c, runs[i][0]), e = cl_end (c, runs[i][1] - 1);
      (void) fallocate (l->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                        (off_t) s, (off_t) (e - s));
    }
    range_release (c, ws, we - 1);
    gate_leave (c);
  }
  free (runs);
}

struct reap { struct layer **l; unsigned n; };

static void *
reap_thread (void *arg)
{
  struct reap *rp = arg;
  for (unsigned i = 0; i < rp->n; i++)
    layer_free (rp->l[i]);
  free (rp->l);
  free (rp);
  return NULL;
}

/* Wait for the space of previously deleted layers to be freed. */
static void
reap_wait (struct ovc *c)
{
  pthread_t t;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->op_lock);
    if (!c->reap_live)
      return;
    c->reap_live = false;
    t = c->reap_thread;
  }
  pthread_join (t, NULL);
}

static void
commit_release (struct ovc *c)
{
  /* Deleted layers are no longer referenced by the chain (c->layers): a
   * reaper thread owns them and closes their files (the last reference
   * frees the blocks, which can take seconds for a big, fragmented data
   * file), so the commit completes without waiting for it.  ovc_close and
   * the next commit's release wait for it. */
  if (c->op_ndropped > 0) {
    struct reap *rp = malloc (sizeof *rp);
    reap_wait (c);
    if (rp) {
      *rp = (struct reap) { c->op_dropped, c->op_ndropped };
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->op_lock);
      c->reap_live = pthread_create (&c->reap_thread, NULL, reap_thread, rp) == 0;
      if (!c->reap_live)
        free (rp);
    }
    if (rp == NULL || !c->reap_live) {
      for (unsigned i = 0; i < c->op_ndropped; i++)
        layer_free (c->op_dropped[i]);
      free (c->op_dropped);
    }
  }
  c->op_dropped = NULL;
  c->op_ndropped = 0;
  gate_enter (c);
  /* The commit is complete: a failure here only leaves space allocated to
   * data that is never read (the maps are empty), so it is not an error
   * of the commit; the next make-empty or delete frees it. */
  for (unsigned i = c->op_lo; i <= c->op_trunc_hi; i++) {
    struct layer *l = c->layers[i];
    (void) fallocate (l->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      0, (off_t) c->size);
  }
  c->op_trunc_hi = 0;
  gate_leave (c);
  if (c->op_punch_top)
    punch_unused_top (c);
  c->op_punch_top = false;
}

static void *
commit_thread (void *arg)
{
  struct ovc *c = arg;
  struct cbw_err err = { 0 };
  c->op_trunc_hi = 0;
  c->op_punch_top = false;
  int r = commit_copy (c, &err);
  gate_pause (c);
  bool recorded = false;
  if (r == 0)
    r = commit_finish (c, &recorded, &err);
  c->mirror = -1;
  if (r < 0 && recorded) {
    /* Memory serves a chain with the same content as the disk's; the disk
     * has phase "finish" which the next open completes.  Refuse further
     * chain changes until then (they would overwrite that record). */
    c->switch_pending = true;
    cbw_err_prefix (&err, "commit switch failed after it was recorded; guest I/O "
                    "continues, reopen the chain to finish it");
  }
  gate_resume (c);
  commit_release (c);
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->op_lock);
  if (r < 0 && atomic_load (&c->op_mirror_failed) && c->op_mirror_err.errnum)
    err = c->op_mirror_err;
  c->op_err = err;
  c->op_state = r == 0 ? OP_COMPLETED
    : err.errnum == ECANCELED ? OP_CANCELLED : OP_FAILED;
  return NULL;
}

int
ovc_commit_start (struct ovc *c, unsigned lo, unsigned hi,
                  enum cbw_commit_mode mode, uint64_t speed, struct cbw_err *err)
{
  struct cbw_chain_desc nd;

  if (c->readonly)
    return cbw_err_set (err, EROFS, "chain opened read-only");
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->op_lock);
  if (c->op_state == OP_RUNNING)
    return cbw_err_set (err, EBUSY, "a commit of layers %u..%u is already running",
                        c->op_lo, c->op_hi);
  if (c->switch_pending)
    return cbw_err_set (err, EBUSY, "a failed commit switch is pending; reopen the chain");
  if (c->op_thread_live) {
    pthread_join (c->op_thread, NULL);
    c->op_thread_live = false;
  }
  unsigned n = c->nl - 1;
  if (lo < 1 || lo > hi || hi > n)
    return cbw_err_set (err, EINVAL, "commit range %u..%u is not in the chain "
                        "(overlays are 1..%u%s)", lo, hi, n,
                        n == 0 ? ": there are none" : "");
  if (mode != CBW_COMMIT_DELETE && mode != CBW_COMMIT_MAKE_EMPTY)
    return cbw_err_set (err, EINVAL, "bad commit mode");

  c->op_lo = lo;
  c->op_hi = hi;
  c->op_mode = mode;
  c->op_active = hi == n;
  atomic_store (&c->op_speed, speed);
  atomic_store (&c->op_cancel, false);
  atomic_store (&c->op_mirror_failed, false);
  c->op_mirror_err.errnum = 0;
  atomic_store (&c->op_done, 0);
  c->op_err.errnum = 0;
  c->op_err.msg[0] = 0;
  c->op_started = (int64_t) time (NULL);

  /* Record the operation (status + recovery), then mirror + snapshot the
   * set of clusters to copy with I/O drained. */
  gate_pause (c);
  if (cbw_chain_desc_copy (&nd, &c->desc, err) < 0)
    goto fail;
  /* Nothing is written to start a commit: until the switch, layer lo-1 only
   * receives clusters that lo..hi shadow, so a crash leaves the old chain
   * (undone).  A "copy" record written by older versions is dropped at open. */
  if (hook ("commit-record", err) < 0) {
    cbw_chain_desc_free (&nd);
    cbw_err_prefix (err, "commit");
    goto fail;
  }
  cbw_chain_desc_free (&c->desc);
  c->desc = nd;
  cbw_bitmap_free (&c->op_bits);
  if (cbw_bitmap_init (&c->op_bits, c->layers[lo]->map.nclusters) < 0) {
    cbw_err_set (err, ENOMEM, "commit: out of memory");
    goto fail;
  }
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->map_lock);
    for (unsigned k = lo; k <= hi; k++)
      cbw_bitmap_or (&c->op_bits, &c->layers[k]->map.alloc);
  }
  c->op_total = cbw_bitmap_count (&c->op_bits) << c->cbits;
  if (cbw_bitmap_test (&c->op_bits, c->op_bits.nbits - 1))
    c->op_total -= ((uint64_t) 1 << c->cbits) - (c->size - cl_start (c, c->op_bits.nbits - 1));
  if (c->op_active)
    c->mirror = (int) lo - 1;
  c->op_state = OP_RUNNING;
  gate_resume (c);
  if (pthread_create (&c->op_thread, NULL, commit_thread, c) != 0) {
    int e = errno ? errno : EAGAIN;
    gate_pause (c);
    c->mirror = -1;
    gate_resume (c);
    c->op_state = OP_FAILED;
    return cbw_err_set (err, e, "commit: cannot start thread");
  }
  c->op_thread_live = true;
  return 0;
 fail:
  gate_resume (c);
  return -1;
}

int
ovc_commit_cancel (struct ovc *c, struct cbw_err *err)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->op_lock);
  if (c->op_state != OP_RUNNING)
    return cbw_err_set (err, ENOENT, "no commit is running");
  atomic_store (&c->op_cancel, true);
  return 0;
}

int
ovc_commit_set_speed (struct ovc *c, uint64_t speed, struct cbw_err *err)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->op_lock);
  if (c->op_state != OP_RUNNING)
    return cbw_err_set (err, ENOENT, "no commit is running");
  atomic_store (&c->op_speed, speed);
  return 0;
}

int
ovc_commit_wait (struct ovc *c, struct cbw_err *err)
{
  pthread_t t;
  bool live;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->op_lock);
    live = c->op_thread_live;
    t = c->op_thread;
    c->op_thread_live = false;
  }
  if (live)
    pthread_join (t, NULL);
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->op_lock);
  if (c->op_state == OP_NONE)
    return cbw_err_set (err, ENOENT, "no commit was started");
  if (c->op_state == OP_COMPLETED)
    return 0;
  if (err) *err = c->op_err;
  return -1;
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
  gate_enter (c);
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
  gate_leave (c);
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

/* ------------------------------------------------------ control commands */

const struct cbw_ctl_arg ovc_ctl_snapshot_args[] = {
  { "label", CBW_ARG_STRING, false, "free text stored in the new overlay's descriptor" },
  { NULL },
};
const struct cbw_ctl_arg ovc_ctl_commit_args[] = {
  { "base", CBW_ARG_UINT, false, "layer receiving the data (0 = raw base); default top-1" },
  { "top", CBW_ARG_UINT, false, "highest layer merged; default the active top" },
  { "mode", CBW_ARG_STRING, false, "`delete` (default) or `make-empty`" },
  { "speed", CBW_ARG_UINT, false, "bytes per second, 0 = unlimited (default)" },
  { NULL },
};
const struct cbw_ctl_arg ovc_ctl_speed_args[] = {
  { "speed", CBW_ARG_UINT, true, "bytes per second, 0 = unlimited" },
  { NULL },
};
const struct cbw_ctl_arg ovc_ctl_no_args[] = { { NULL } };

static int
ctl_err (struct cbw_ctl_reply *r, const struct cbw_err *e)
{
  enum cbw_ctl_error_class cl;
  switch (e->errnum) {
  case EBUSY: cl = CBW_CTL_BUSY; break;
  case EINVAL: case ERANGE: cl = CBW_CTL_INVALID_PARAMETER; break;
  case ENOENT: cl = CBW_CTL_NOT_FOUND; break;
  case EEXIST: cl = CBW_CTL_EXISTS; break;
  case EIO: case ENOSPC: case EROFS: cl = CBW_CTL_IO_ERROR; break;
  default: cl = CBW_CTL_GENERIC_ERROR; break;
  }
  return cbw_ctl_fail (r, cl, "%s", e->msg);
}

int
ovc_ctl_snapshot (struct ovc *c, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_err e = { 0 };
  char *name = NULL;
  if (ovc_snapshot (c, cbw_ctl_arg_str (args, "label", NULL), &name, &e) < 0)
    return ctl_err (r, &e);
  unsigned n = ovc_nlayers (c);
  r->ret = json_object_new_object ();
  json_object_object_add (r->ret, "layer", json_object_new_string (name));
  json_object_object_add (r->ret, "index", json_object_new_int ((int) n));
  json_object_object_add (r->ret, "layers", json_object_new_int ((int) n + 1));
  free (name);
  return 0;
}

int
ovc_ctl_commit (struct ovc *c, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_err e = { 0 };
  unsigned n = ovc_nlayers (c);
  long long top = cbw_ctl_arg_int (args, "top", n);
  long long base = cbw_ctl_arg_int (args, "base", top - 1);
  long long speed = cbw_ctl_arg_int (args, "speed", 0);
  const char *mode = cbw_ctl_arg_str (args, "mode", "delete");
  enum cbw_commit_mode m;
  if (strcmp (mode, "delete") == 0) m = CBW_COMMIT_DELETE;
  else if (strcmp (mode, "make-empty") == 0) m = CBW_COMMIT_MAKE_EMPTY;
  else
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER,
                         "mode '%.64s': expected 'delete' or 'make-empty'", mode);
  if (n == 0)
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER,
                         "the chain has no overlay to commit");
  if (top < 1 || top > (long long) n || base < 0 || base >= top)
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER,
                         "commit base %lld, top %lld: not in the chain (layers 0..%u, "
                         "need 0 <= base < top <= %u)", base, top, n, n);
  if (speed < 0)
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "speed must be >= 0");
  if (ovc_commit_start (c, (unsigned) base + 1, (unsigned) top, m,
                        (uint64_t) speed, &e) < 0)
    return ctl_err (r, &e);
  r->ret = json_object_new_object ();
  json_object_object_add (r->ret, "lo", json_object_new_int ((int) base + 1));
  json_object_object_add (r->ret, "hi", json_object_new_int ((int) top));
  json_object_object_add (r->ret, "active", json_object_new_boolean (top == (long long) n));
  return 0;
}

int
ovc_ctl_commit_cancel (struct ovc *c, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_err e = { 0 };
  (void) args;
  if (ovc_commit_cancel (c, &e) < 0)
    return ctl_err (r, &e);
  return 0;
}

int
ovc_ctl_commit_speed (struct ovc *c, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_err e = { 0 };
  long long speed = cbw_ctl_arg_int (args, "speed", 0);
  if (speed < 0)
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "speed must be >= 0");
  if (ovc_commit_set_speed (c, (uint64_t) speed, &e) < 0)
    return ctl_err (r, &e);
  return 0;
}

int
ovc_ctl_status (struct ovc *c, struct json_object *args, struct cbw_ctl_reply *r)
{
  (void) args;
  r->ret = ovc_status_json (c);
  return 0;
}

const struct cbw_ctl_arg ovc_ctl_layer_extents_args[] = {
  { "layer", CBW_ARG_UINT, false, "overlay index, 1 = lowest (default 0 = the top)" },
  { "offset", CBW_ARG_UINT, false, "start of the byte range (default 0)" },
  { "length", CBW_ARG_UINT, false, "length of the byte range (default: to the end of the disk)" },
  { "max-extents", CBW_ARG_UINT, false, "at most this many runs in the reply (default 1024, "
    "max 65536)" },
  { NULL },
};

int
ovc_ctl_layer_extents (struct ovc *c, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_err e = { 0 };
  long long layer = cbw_ctl_arg_int (args, "layer", 0);
  long long off = cbw_ctl_arg_int (args, "offset", 0);
  long long max = cbw_ctl_arg_int (args, "max-extents", OVC_EXTENTS_DEFAULT);
  uint64_t size = c->size;
  if (off < 0 || (uint64_t) off > size)
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "offset %lld is past the end of "
                         "the disk (%" PRIu64 " bytes)", off, size);
  long long len = cbw_ctl_arg_int (args, "length", (long long) (size - (uint64_t) off));
  if (len < 0 || (uint64_t) len > size - (uint64_t) off)
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "range %lld+%lld is past the end "
                         "of the disk (%" PRIu64 " bytes)", off, len, size);
  if (max < 1 || max > OVC_EXTENTS_MAX)
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "max-extents must be 1..%d",
                         OVC_EXTENTS_MAX);
  if (layer < 0 || layer > CBW_CHAIN_MAX_LAYERS)
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "layer %lld: not an overlay index",
                         layer);
  struct ovc_extent *x = malloc ((size_t) max * sizeof *x);
  if (x == NULL)
    return cbw_ctl_fail (r, CBW_CTL_GENERIC_ERROR, "out of memory");
  size_t n;
  uint64_t next;
  unsigned k;
  char *name = NULL;
  if (ovc_layer_extents (c, (unsigned) layer, (uint64_t) off, (uint64_t) len, (size_t) max,
                         x, &n, &next, &k, &name, &e) < 0) {
    free (x);
    return ctl_err (r, &e);
  }
  struct json_object *a = json_object_new_array_ext ((int) n);
  for (size_t i = 0; i < n; i++) {
    struct json_object *o = json_object_new_object ();
    json_object_object_add (o, "offset", json_object_new_int64 ((int64_t) x[i].offset));
    json_object_object_add (o, "length", json_object_new_int64 ((int64_t) x[i].length));
    json_object_object_add (o, "zero", json_object_new_boolean (x[i].zero));
    json_object_array_add (a, o);
  }
  free (x);
  r->ret = json_object_new_object ();
  json_object_object_add (r->ret, "layer", json_object_new_int ((int) k));
  json_object_object_add (r->ret, "name", json_object_new_string (name));
  json_object_object_add (r->ret, "cluster-size", json_object_new_int64 (c->csize));
  json_object_object_add (r->ret, "extents", a);
  json_object_object_add (r->ret, "next", next == UINT64_MAX ? NULL
                          : json_object_new_int64 ((int64_t) next));
  free (name);
  return 0;
}

int
ovc_ctl_list (struct ovc *c, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct json_object *st = ovc_status_json (c), *layers;
  (void) args;
  r->ret = json_object_new_object ();
  if (json_object_object_get_ex (st, "layers", &layers))
    json_object_object_add (r->ret, "layers", json_object_get (layers));
  json_object_put (st);
  return 0;
}
