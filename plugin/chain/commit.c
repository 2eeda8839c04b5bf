/* cbw — plugin/chain/commit.c: the commit engine of the overlay chain:
 * merge layers lo..hi into layer lo-1 in background threads while the disk
 * stays online, then switch the chain (make-empty or delete) with I/O paused.
 *
 * A commit of layers lo..hi into lo-1 copies, in a background thread, every cluster allocated in lo..hi
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
 * Locking (overlay_chain_int.h has the full table).  The commit thread owns
 * the operation while op_state is RUNNING (op_lock guards the op_* fields
 * other threads read: state, error, thread handles); it changes c->layers,
 * c->nl, c->desc and c->mirror only with the gate paused and drained.  Copy
 * workers enter the gate and take the cluster range lock of their window, like
 * a guest write; op_iter_lock guards their shared cursor.  No lock is held
 * across I/O.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cleanup.h"
#include "fileutil.h"
#include "overlay_chain_int.h"

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

  if (ovc__hook ("commit-copy-range", err) < 0)
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
    return ovc__zero_layer (c, tgt, g->len, g->off, err);
  if (tgt == 0) {
    if (ovc__hook ("write-lower", err) < 0)
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
    if ((all_zero (w->buf, n) ? ovc__zero_layer (c, tgt, n, o, err)
                              : ovc__write_layer (c, tgt, w->buf, n, o, err)) < 0)
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
      unsigned k = ovc__serving_layer (c, hi, cl, &st);
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
  ovc__gate_enter (c);
  if (ovc__range_acquire (c, ws, we - 1, err) < 0) {
    ovc__gate_leave (c);
    return -1;
  }
  r = ovc__hook ("commit-copy", err);
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
  ovc__range_release (c, ws, we - 1);
  ovc__gate_leave (c);
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
  if (ovc__do_flush (c, err) < 0)
    return cbw_err_prefix (err, "commit: flush before switch");
  if (ovc__hook ("commit-flushed", err) < 0)
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
  if (need_record && ovc__chain_save (c->chain_path, &nd, err) < 0) {
    cbw_chain_desc_free (&nd);
    return cbw_err_prefix (err, "commit: recording the switch");
  }
  if (!need_record) {
    nd.op.type = CBW_CHAIN_OP_NONE;
    nd.generation++;      /* what the record's save would have done */
  }
  /* From here the commit completes: on-disk recovery rolls it forward. */
  *recorded = true;
  if (ovc__hook ("commit-finish-recorded", err) < 0) {
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
      if (r < 0 || ovc__hook ("finish-empty", err) < 0 ||
          ovc__atomic_save (l->map_path, mbuf, mlen, err) < 0)
        return cbw_err_prefix (err, "commit: emptying layer %u", i);
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->map_lock);
      l->map_dirty = false;
    }
    if (need_record || c->desc.op.type != CBW_CHAIN_OP_NONE) {
      c->desc.op.type = CBW_CHAIN_OP_NONE;
      if (ovc__hook ("finish-save", err) < 0 ||
          ovc__chain_save (c->chain_path, &c->desc, err) < 0)
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
  if (ovc__roll_forward (c->chain_path, c->dir, &nd, err) < 0) {
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
      ovc__layer_free (c->layers[i]);
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
  ovc__hook ("commit-punch", NULL);   /* tests: guest writes land here */
  runs = malloc ((step / 2 + 1) * sizeof *runs);
  if (runs == NULL)
    return;
  for (uint64_t ws = 0;; ws += step) {
    ovc__gate_enter (c);
    struct layer *l = c->layers[c->nl - 1];
    uint64_t ncl = l->map.nclusters, we = min64 (ws + step, ncl), nr = 0;
    if (ws >= ncl || ovc__range_acquire (c, ws, we - 1, NULL) < 0) {
      ovc__gate_leave (c);
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
    ovc__range_release (c, ws, we - 1);
    ovc__gate_leave (c);
  }
  free (runs);
}

struct reap { struct layer **l; unsigned n; };

static void *
reap_thread (void *arg)
{
  struct reap *rp = arg;
  for (unsigned i = 0; i < rp->n; i++)
    ovc__layer_free (rp->l[i]);
  free (rp->l);
  free (rp);
  return NULL;
}

/* Wait for the space of previously deleted layers to be freed. */
void
ovc__reap_wait (struct ovc *c)
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
    ovc__reap_wait (c);
    if (rp) {
      *rp = (struct reap) { c->op_dropped, c->op_ndropped };
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->op_lock);
      c->reap_live = pthread_create (&c->reap_thread, NULL, reap_thread, rp) == 0;
      if (!c->reap_live)
        free (rp);
    }
    if (rp == NULL || !c->reap_live) {
      for (unsigned i = 0; i < c->op_ndropped; i++)
        ovc__layer_free (c->op_dropped[i]);
      free (c->op_dropped);
    }
  }
  c->op_dropped = NULL;
  c->op_ndropped = 0;
  ovc__gate_enter (c);
  /* The commit is complete: a failure here only leaves space allocated to
   * data that is never read (the maps are empty), so it is not an error
   * of the commit; the next make-empty or delete frees it. */
  for (unsigned i = c->op_lo; i <= c->op_trunc_hi; i++) {
    struct layer *l = c->layers[i];
    (void) fallocate (l->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      0, (off_t) c->size);
  }
  c->op_trunc_hi = 0;
  ovc__gate_leave (c);
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
  ovc__gate_pause (c);
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
  ovc__gate_resume (c);
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
  ovc__gate_pause (c);
  if (cbw_chain_desc_copy (&nd, &c->desc, err) < 0)
    goto fail;
  /* Nothing is written to start a commit: until the switch, layer lo-1 only
   * receives clusters that lo..hi shadow, so a crash leaves the old chain
   * (undone).  A "copy" record written by older versions is dropped at open. */
  if (ovc__hook ("commit-record", err) < 0) {
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
  ovc__gate_resume (c);
  if (pthread_create (&c->op_thread, NULL, commit_thread, c) != 0) {
    int e = errno ? errno : EAGAIN;
    ovc__gate_pause (c);
    c->mirror = -1;
    ovc__gate_resume (c);
    c->op_state = OP_FAILED;
    return cbw_err_set (err, e, "commit: cannot start thread");
  }
  c->op_thread_live = true;
  return 0;
 fail:
  ovc__gate_resume (c);
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
