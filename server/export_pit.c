/* cbw — server/export_pit.c: the point-in-time (PIT) export of a backup
 * session: a read-only proxy to the cbw filter's PIT export (an upstream NBD
 * URI), over a pool of libnbd connections, and optionally a DIRECT read path
 * that skips the second hop.
 *
 * Direct reads (state-file + live-file + store-file).  The cbw filter keeps
 * the session's block states in a shared map (docs/formats/cbw-state-map.md);
 * we map it read-only and serve each run of same-state blocks ourselves:
 *   NEEDED  pread the live disk file, full fence, re-load the run's states:
 *           the prefix still NEEDED is old data (THE RULE of the filter: a
 *           block leaves NEEDED before its live data changes).
 *   COPIED  pread the store file (the session's target), re-check COPIED
 *           (a skip may release the block while we read it).
 *   other   (COPYING, BUFFERED, FAILED, NOT_NEEDED, or a state that changed
 *           under the read): that range goes through the upstream proxy,
 *           which waits for copies and fails where the filter cannot be sure.
 * After the data of a request is read, the session must still be alive:
 * status ACTIVE and the filter's OFD lock on byte 0 of the map held (it is
 * released at `end` before writes stop being copied, and by the kernel when
 * nbdkit dies).  Otherwise the request fails: never data we cannot prove is
 * point-in-time data.  The map header is validated against the export size
 * (and granularity, if given) when the export is created; the files are
 * never trusted for lengths: a short read goes to the upstream.  Page-cache
 * hits are served on the loop (pread_nowait, RWF_NOWAIT; anything else is
 * sent to the pool, a repeat of a read is harmless).  Block status and TRIM
 * still go through the upstream.  Counters (direct/upstream bytes,
 * re-checks) are relaxed atomics, logged when the export is freed.
 *
 * Why direct reads are always COPIED into our buffer, never sent with
 * sendfile/splice/MSG_ZEROCOPY: the order that proves a NEEDED block is
 * point-in-time data is (1) our copy of the live bytes is complete, (2) full
 * fence, (3) the state is still NEEDED.  Only then may the bytes leave.  A
 * zero-copy send hands page-cache pages to the socket by reference: the bytes
 * the client receives are the page's contents when the kernel finally copies
 * them, which can be after a guest write that the filter let through once the
 * block left NEEDED (copied to the store, state changed, then the live page
 * overwritten).  Step (3) would then vouch for bytes that no longer exist:
 * post-PIT data on the wire, against invariant 1.  The same holds for splice
 * into a pipe (also page references) and for the store file (a skip releases
 * and may punch a COPIED block).  So the PIT export has no read_fd-style
 * zero-copy op; the copy is the price of the proof.
 *
 * Readable set (cbwd_export_pit_readable_only, an incremental backup begun
 * with readable=changed): the cbw session protects only the blocks of the
 * backup's dirty bitmap, and the upstream answers a bare EIO for the others
 * (nbdkit sends no error messages).  Such a read is refused here, before
 * any I/O, with a message saying why, from the same frozen bitmap the
 * export's qemu:dirty-bitmap context serves.  base:allocation still reports
 * those blocks as data (the filter's conservative answer): HOLE|ZERO would
 * make a copying reader (nbdcopy) skip them and write zeroes, wrong data
 * without an error; "data" makes it read and fail with the reason.
 *
 * Guarantee: cbwd returns only what the upstream returned for the same range;
 * an upstream error (the filter could not be sure of the data) or a lost
 * upstream connection is an error to the client, never data.  A broken pool
 * connection is reconnected on next use.
 *
 * base:allocation comes from the upstream's block status (holes and zeroes
 * are reported, so nbdcopy skips them); holes found during structured reads
 * are passed through as OFFSET_HOLE chunks.  TRIM is refused unless the
 * export has release=on: then it is forwarded (the cbw filter's PIT export
 * treats trim as "this range need not be kept any more").
 *
 * Threads and locking: worker threads take a handle from the pool (`lock`
 * guards `busy[]` and `h[]` slots; `cond` signals a free slot), use it with
 * synchronous libnbd calls without holding any lock, and give it back.  At
 * most `n` upstream requests are in flight per export; the thread pool is
 * sized accordingly by cbwd.c.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <libnbd.h>

#include "state_map.h"
#include "cleanup.h"
#include "export.h"
#include "fileutil.h"
#include "nbd_proto.h"
#include "server.h"

/* The direct read path (NULL in struct pit_priv when not configured).
 * Immutable after creation except the counters. */
struct pit_direct {
  int state_fd, live_fd, store_fd;
  const struct cbw_sm_header *hdr;   /* the mapping */
  const _Atomic uint8_t *st;         /* hdr + CBW_SM_HEADER_SIZE */
  size_t map_len;
  unsigned shift;
  uint64_t nblocks;
  uint32_t delay_us;
  bool no_recheck;
  _Atomic bool no_nowait;            /* RWF_NOWAIT unsupported */
  _Atomic uint64_t direct_bytes, upstream_bytes, rechecks;
};

struct pit_priv {
  char *uri;
  unsigned n;
  bool release;
  bool can_trim, can_cache, has_base;
  pthread_mutex_t lock;          /* guards h[] ownership and busy[] */
  pthread_cond_t cond;
  struct nbd_handle **h;         /* NULL: not connected */
  bool *busy;
  struct pit_direct *d;          /* NULL: proxy only */
  /* Readable set: index of the bitmap meta context in e->metas, and the
   * reason for refusals; set before the export is published, immutable
   * after.  readable_meta < 0: the whole disk is served. */
  long readable_meta;
  char *unreadable_why;
};

static struct nbd_handle *
pit_connect (struct pit_priv *p, struct cbw_err *err)
{
  struct nbd_handle *h = nbd_create ();
  if (!h) {
    cbw_err_set (err, ENOMEM, "nbd_create: %s", nbd_get_error ());
    return NULL;
  }
  /* Our buffers are always fully overwritten by a successful read (data or
   * hole chunks) and discarded on failure: skip libnbd's memset of them. */
  nbd_set_pread_initialize (h, false);
  if (nbd_add_meta_context (h, "base:allocation") == -1 ||
      nbd_connect_uri (h, p->uri) == -1) {
    int e = nbd_get_errno ();
    cbw_err_set (err, EIO, "upstream %s: %s", p->uri, nbd_get_error ());
    (void) e;
    nbd_close (h);
    return NULL;
  }
  return h;
}

static int
get_handle (struct pit_priv *p, unsigned *slot, bool *fresh, struct cbw_err *err)
{
  *fresh = false;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&p->lock);
    for (;;) {
      unsigned i;
      for (i = 0; i < p->n; i++)
        if (!p->busy[i]) break;
      if (i < p->n) { p->busy[i] = true; *slot = i; break; }
      pthread_cond_wait (&p->cond, &p->lock);
    }
  }
  /* The slot is ours: (re)connect without the lock. */
  struct nbd_handle *h = p->h[*slot];
  if (h && (nbd_aio_is_dead (h) || nbd_aio_is_closed (h))) {
    nbd_close (h);
    p->h[*slot] = h = NULL;
  }
  if (!h) {
    h = pit_connect (p, err);
    if (!h) {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&p->lock);
      p->busy[*slot] = false;
      pthread_cond_signal (&p->cond);
      return -1;
    }
    p->h[*slot] = h;
    *fresh = true;
  }
  return 0;
}

/* After a failed command: was it the connection (dead now) rather than the
 * upstream answering with an error?  Then a fresh connection may retry. */
static bool
retry_on_fresh (struct pit_priv *p, unsigned slot, bool fresh)
{
  struct nbd_handle *h = p->h[slot];
  return !fresh && (nbd_aio_is_dead (h) || nbd_aio_is_closed (h));
}

static void
put_handle (struct pit_priv *p, unsigned slot)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&p->lock);
  p->busy[slot] = false;
  pthread_cond_signal (&p->cond);
}

static int
upstream_err (struct cbw_err *err, struct pit_priv *p, const char *what, uint64_t off)
{
  int e = nbd_get_errno ();
  if (e == 0 || e == ENOTCONN || e == ESHUTDOWN) e = EIO;
  return cbw_err_set (err, e, "upstream %s: %s at offset %llu: %s", p->uri, what,
                      (unsigned long long) off, nbd_get_error ());
}

struct read_holes {
  uint64_t base;
  size_t n, cap;
  struct { uint32_t off, len; } *v;
  bool oom;
};

static int
chunk_cb (void *opaque, const void *sub, size_t count, uint64_t offset,
          unsigned status, int *error)
{
  (void) sub; (void) error;
  struct read_holes *rh = opaque;
  if (status != LIBNBD_READ_HOLE || count < 4096)
    return 0;
  if (rh->n == rh->cap) {
    size_t ncap = rh->cap ? rh->cap * 2 : 8;
    void *nv = realloc (rh->v, ncap * sizeof *rh->v);
    if (!nv) { rh->oom = true; return 0; }
    rh->v = nv; rh->cap = ncap;
  }
  rh->v[rh->n].off = (uint32_t) (offset - rh->base);
  rh->v[rh->n].len = (uint32_t) count;
  rh->n++;
  return 0;
}

static int
cmp_hole (const void *a, const void *b)
{
  const uint32_t *x = a, *y = b;
  return x[0] < y[0] ? -1 : x[0] > y[0];
}

static int
upstream_pread (struct pit_priv *p, void *buf, uint32_t len, uint64_t off,
                struct cbwd_holes *holes, struct cbw_err *err)
{
  unsigned slot;
  bool fresh;
  int r = -1;
  struct read_holes rh = { .base = off };
  for (int attempt = 0; attempt < 2; attempt++) {
    if (get_handle (p, &slot, &fresh, err) == -1)
      return -1;
    struct nbd_handle *h = p->h[slot];
    rh.n = 0;
    if (holes) {
      nbd_chunk_callback cb = { .callback = chunk_cb, .user_data = &rh };
      r = nbd_pread_structured (h, buf, len, off, cb, 0);
    }
    else
      r = nbd_pread (h, buf, len, off, 0);
    if (r == -1)
      upstream_err (err, p, "read", off);
    bool retry = r == -1 && retry_on_fresh (p, slot, fresh);
    put_handle (p, slot);
    if (!retry) break;
  }
  if (r == 0)
    err->errnum = 0;             /* a retry succeeded: forget the first failure */
  if (r == 0 && holes && rh.n && !rh.oom) {
    qsort (rh.v, rh.n, sizeof *rh.v, cmp_hole);
    uint32_t end = 0;
    for (size_t i = 0; i < rh.n; i++) {
      if (rh.v[i].off < end || (uint64_t) rh.v[i].off + rh.v[i].len > len)
        continue;                   /* overlapping or bogus: treat as data */
      if (cbwd_holes_add (holes, rh.v[i].off, rh.v[i].len) == -1) { r = -1; break; }
      end = rh.v[i].off + rh.v[i].len;
    }
    if (r == -1) {
      cbwd_holes_free (holes);      /* data in buf is still right */
      r = 0;
    }
  }
  free (rh.v);
  return r;
}

/* ---- direct reads ---- */

#define RLX memory_order_relaxed

/* Is the session still active (status ACTIVE and the filter's liveness lock
 * held)?  Called AFTER the data reads it vouches for. */
static bool
session_alive (const struct pit_direct *d)
{
  struct flock fl = { .l_type = F_RDLCK, .l_whence = SEEK_SET, .l_start = 0,
                      .l_len = 1 };
  if (__atomic_load_n (&d->hdr->status, __ATOMIC_SEQ_CST) != CBW_SM_STATUS_ACTIVE)
    return false;
  if (fcntl (d->state_fd, F_OFD_GETLK, &fl) == -1)
    return false;
  return fl.l_type != F_UNLCK;
}

/* Read [pos, pos+n) of fd into dst: 0 if all of it was read.  nowait: page
 * cache only. */
static int
direct_file_read (struct pit_direct *d, int fd, void *dst, uint64_t n,
                  uint64_t pos, bool nowait)
{
  if (nowait) {
    struct iovec iov = { dst, n };
    ssize_t r = preadv2 (fd, &iov, 1, pos, RWF_NOWAIT);
    if (r == -1 && (errno == EOPNOTSUPP || errno == EINVAL || errno == ENOSYS))
      atomic_store_explicit (&d->no_nowait, true, RLX);
    return r == (ssize_t) n ? 0 : -1;
  }
  if (d->delay_us)
    usleep (d->delay_us);
  return cbw_pread_full (fd, dst, n, pos);
}

/* Serve a read through the state map.  Returns 0 (buf filled), -1 (*err
 * set), or 1 in nowait mode when the loop cannot finish it (the pool
 * redoes the whole request). */
static int
direct_pread (struct cbwd_export *e, struct pit_direct *d, char *buf,
              uint32_t len, uint64_t off, bool nowait, struct cbw_err *err)
{
  struct pit_priv *p = e->priv;
  uint64_t end = off + len, pos = off, b, rb, rend, n, chg;
  uint64_t direct = 0, upstream = 0, rechecks = 0;
  uint8_t v;

  if (nowait && atomic_load_explicit (&d->no_nowait, RLX))
    return 1;
  while (pos < end) {
    b = pos >> d->shift;
    v = cbw_sm_run (d->st, d->nblocks, d->shift, pos, end, &rb, &rend);
    n = rend - pos;
    char *dst = buf + (pos - off);
    int fd = v == CBW_SM_NEEDED ? d->live_fd : v == CBW_SM_COPIED ? d->store_fd : -1;

    if (fd >= 0 && direct_file_read (d, fd, dst, n, pos, nowait) == 0) {
      if (d->no_recheck) {
        direct += n;
        pos = rend;
        continue;
      }
      /* Pairs with the filter's fence after its claim: the state loads
       * below happen after our read of the data. */
      atomic_thread_fence (memory_order_seq_cst);
      chg = cbw_sm_first_changed (d->st, b, rb, v);
      if (chg == rb) {
        direct += n;
        pos = rend;
      }
      else {
        rechecks++;
        if ((chg << d->shift) > pos) {    /* keep the unchanged prefix */
          direct += (chg << d->shift) - pos;
          pos = chg << d->shift;
        }
      }
      continue;                           /* changed: look again */
    }
    /* Anything we cannot prove ourselves: the filter decides. */
    if (nowait)
      return 1;
    if (upstream_pread (p, dst, n, pos, NULL, err) == -1)
      return -1;
    upstream += n;
    pos = rend;
  }
  if (direct && !d->no_recheck && !session_alive (d)) {
    if (nowait)
      return 1;
    return cbw_err_set (err, EIO, "export '%s': the backup session has ended "
                        "(or its nbdkit is gone): point-in-time data can no "
                        "longer be proven", e->name);
  }
  if (direct)
    atomic_fetch_add_explicit (&d->direct_bytes, direct, RLX);
  if (upstream)
    atomic_fetch_add_explicit (&d->upstream_bytes, upstream, RLX);
  if (rechecks)
    atomic_fetch_add_explicit (&d->rechecks, rechecks, RLX);
  return 0;
}

/* Outside the readable set?  Then fill *err (with the reason) and say so. */
static bool
unreadable (struct cbwd_export *e, struct pit_priv *p, uint32_t len, uint64_t off,
            struct cbw_err *err)
{
  uint64_t clean;
  if (p->readable_meta < 0 || len == 0 ||
      !cbwd_meta_bitmap_first_clean (&e->metas[p->readable_meta], off, len, &clean))
    return false;
  cbw_err_set (err, EIO, "export '%s': offset %llu is not readable: %s", e->name,
               (unsigned long long) clean, p->unreadable_why);
  return true;
}

static int
pit_pread (struct cbwd_export *e, void *buf, uint32_t len, uint64_t off,
           struct cbwd_holes *holes, struct cbw_err *err)
{
  struct pit_priv *p = e->priv;
  if (unreadable (e, p, len, off, err))
    return -1;
  if (p->d)
    return direct_pread (e, p->d, buf, len, off, false, err);
  return upstream_pread (p, buf, len, off, holes, err);
}

static int
pit_pread_nowait (struct cbwd_export *e, void *buf, uint32_t len, uint64_t off)
{
  struct pit_priv *p = e->priv;
  struct cbw_err err = { 0 };
  if (!p->d || p->d->delay_us || unreadable (e, p, len, off, &err))
    return -1;                  /* the pool answers (a refusal too) */
  return direct_pread (e, p->d, buf, len, off, true, &err) == 0 ? 0 : -1;
}

void
cbwd_export_pit_stats (struct cbwd_export *e, struct cbwd_pit_stats *st)
{
  memset (st, 0, sizeof *st);
  if (e->ops->pread != pit_pread || e->priv == NULL)
    return;
  struct pit_direct *d = ((struct pit_priv *) e->priv)->d;
  if (!d)
    return;
  st->direct = true;
  st->direct_bytes = atomic_load_explicit (&d->direct_bytes, RLX);
  st->upstream_bytes = atomic_load_explicit (&d->upstream_bytes, RLX);
  st->rechecks = atomic_load_explicit (&d->rechecks, RLX);
}

static void
direct_free (struct pit_direct *d)
{
  if (!d)
    return;
  if (d->hdr)
    munmap ((void *) d->hdr, d->map_len);
  if (d->state_fd >= 0) close (d->state_fd);
  if (d->live_fd >= 0) close (d->live_fd);
  if (d->store_fd >= 0) close (d->store_fd);
  free (d);
}

/* Open a raw data file read-only; it must hold at least size bytes. */
static int
open_data_file (const char *what, const char *path, uint64_t size, int *fd_out,
                struct cbw_err *err)
{
  struct stat sb;
  int fd = open (path, O_RDONLY | O_CLOEXEC);
  if (fd == -1)
    return cbw_err_set (err, errno, "%s %s: %s", what, path, strerror (errno));
  off_t end = lseek (fd, 0, SEEK_END);
  if (fstat (fd, &sb) == -1 || end == -1 ||
      !(S_ISREG (sb.st_mode) || S_ISBLK (sb.st_mode))) {
    close (fd);
    return cbw_err_set (err, EINVAL, "%s %s: not a regular file or block "
                        "device", what, path);
  }
  if ((uint64_t) end < size) {
    close (fd);
    return cbw_err_set (err, EINVAL, "%s %s: %llu bytes, smaller than the "
                        "export (%llu bytes)", what, path,
                        (unsigned long long) end, (unsigned long long) size);
  }
  *fd_out = fd;
  return 0;
}

/* Validate and map the state map, open the data files.  NULL + *err. */
static struct pit_direct *
direct_open (const struct cbwd_pit_opts *o, uint64_t size, struct cbw_err *err)
{
  struct pit_direct *d = calloc (1, sizeof *d);
  struct cbw_sm_header h;
  struct stat sb;

  if (!d) {
    cbw_err_set (err, ENOMEM, "out of memory");
    return NULL;
  }
  d->state_fd = d->live_fd = d->store_fd = -1;
  d->delay_us = o->debug_delay_us;
  d->no_recheck = o->debug_no_recheck;
  d->state_fd = open (o->state_file, O_RDONLY | O_CLOEXEC);
  if (d->state_fd == -1) {
    cbw_err_set (err, errno, "state-file %s: %s", o->state_file, strerror (errno));
    goto fail;
  }
  if (fstat (d->state_fd, &sb) == -1 || !S_ISREG (sb.st_mode)) {
    cbw_err_set (err, EINVAL, "state-file %s: not a regular file", o->state_file);
    goto fail;
  }
  memset (&h, 0, sizeof h);
  if ((uint64_t) sb.st_size >= sizeof h &&
      cbw_pread_full (d->state_fd, &h, sizeof h, 0) == -1) {
    cbw_err_set (err, errno, "state-file %s: %s", o->state_file, strerror (errno));
    goto fail;
  }
  if (cbw_sm_check_header (&h, sb.st_size, size, o->state_granularity,
                           o->state_file, err) == -1)
    goto fail;
  d->shift = h.gran_shift;
  d->nblocks = h.nblocks;
  d->map_len = sb.st_size;
  void *m = mmap (NULL, d->map_len, PROT_READ, MAP_SHARED, d->state_fd, 0);
  if (m == MAP_FAILED) {
    cbw_err_set (err, errno, "state-file %s: mmap: %s", o->state_file,
                 strerror (errno));
    goto fail;
  }
  d->hdr = m;
  d->st = (const _Atomic uint8_t *) ((const char *) m + CBW_SM_HEADER_SIZE);
  if (!session_alive (d)) {
    cbw_err_set (err, ESTALE, "state-file %s: its backup session is not "
                 "active (ended, or its nbdkit is gone)", o->state_file);
    goto fail;
  }
  if (open_data_file ("live-file", o->live_file, size, &d->live_fd, err) == -1 ||
      open_data_file ("store-file", o->store_file, size, &d->store_fd, err) == -1)
    goto fail;
  return d;
 fail:
  direct_free (d);
  return NULL;
}

static int
pit_readonly (struct cbwd_export *e, struct cbw_err *err)
{
  return cbw_err_set (err, EPERM, "export '%s' is a read-only point-in-time view", e->name);
}

static int
pit_pwrite (struct cbwd_export *e, const void *buf, uint32_t len, uint64_t off,
            bool fua, struct cbw_err *err)
{
  (void) buf; (void) len; (void) off; (void) fua;
  return pit_readonly (e, err);
}

static int
pit_zero (struct cbwd_export *e, uint32_t len, uint64_t off, bool may_trim,
          bool fast, bool fua, struct cbw_err *err)
{
  (void) len; (void) off; (void) may_trim; (void) fast; (void) fua;
  return pit_readonly (e, err);
}

static int
pit_trim (struct cbwd_export *e, uint32_t len, uint64_t off, bool fua,
          struct cbw_err *err)
{
  (void) fua;
  struct pit_priv *p = e->priv;
  if (!p->release)
    return pit_readonly (e, err);
  if (!p->can_trim)
    return 0;                         /* release is advisory */
  unsigned slot;
  bool fresh;
  int r = -1;
  for (int attempt = 0; attempt < 2; attempt++) {
    if (get_handle (p, &slot, &fresh, err) == -1)
      return -1;
    r = nbd_trim (p->h[slot], len, off, 0);
    if (r == -1)
      upstream_err (err, p, "trim", off);
    bool retry = r == -1 && retry_on_fresh (p, slot, fresh);
    put_handle (p, slot);
    if (!retry) break;
  }
  if (r == 0)
    err->errnum = 0;             /* a retry succeeded: forget the first failure */
  return r;
}

static int
pit_flush (struct cbwd_export *e, struct cbw_err *err)
{
  (void) e; (void) err;
  return 0;                           /* nothing is written through us */
}

static int
pit_cache (struct cbwd_export *e, uint32_t len, uint64_t off, struct cbw_err *err)
{
  struct pit_priv *p = e->priv;
  if (!p->can_cache)
    return 0;
  unsigned slot;
  bool fresh;
  if (get_handle (p, &slot, &fresh, err) == -1)
    return -1;
  int r = nbd_cache (p->h[slot], len, off, 0);
  if (r == -1)
    upstream_err (err, p, "cache", off);
  put_handle (p, slot);
  return r;
}

struct bs_ctx {
  struct cbwd_extents *x;
  uint64_t expect;                    /* next offset we need */
  bool oom, seen;
};

static int
extent_cb (void *opaque, const char *metacontext, uint64_t offset,
           uint32_t *entries, size_t nr, int *error)
{
  (void) error;
  struct bs_ctx *b = opaque;
  if (strcmp (metacontext, "base:allocation") != 0 || offset != b->expect)
    return 0;
  b->seen = true;
  for (size_t i = 0; i + 1 < nr; i += 2) {
    if (entries[i] == 0) break;
    int r = cbwd_extents_add (b->x, entries[i],
                              entries[i + 1] & (NBD_STATE_HOLE | NBD_STATE_ZERO));
    if (r == -1) { b->oom = true; break; }
    b->expect += entries[i];
    if (r == 1) break;
  }
  return 0;
}

static int
pit_block_status (struct cbwd_export *e, uint64_t off, struct cbwd_extents *x,
                  struct cbw_err *err)
{
  struct pit_priv *p = e->priv;
  if (!p->has_base) {
    uint64_t len = x->limit < e->size - off ? x->limit : e->size - off;
    if (cbwd_extents_add (x, len, 0) == -1)
      return cbw_err_set (err, ENOMEM, "out of memory");
    return 0;
  }
  unsigned slot;
  bool fresh;
  struct bs_ctx b = { .x = x, .expect = off };
  uint64_t want = x->limit;
  if (want > e->size - off) want = e->size - off;
  if (want > 0x80000000ULL) want = 0x80000000ULL;
  int r = -1;
  for (int attempt = 0; attempt < 2; attempt++) {
    if (get_handle (p, &slot, &fresh, err) == -1)
      return -1;
    nbd_extent_callback cb = { .callback = extent_cb, .user_data = &b };
    x->n = 0; x->covered = 0; b.expect = off; b.oom = false;
    r = nbd_block_status (p->h[slot], want, off, cb, 0);
    if (r == -1)
      upstream_err (err, p, "block status", off);
    bool retry = r == -1 && retry_on_fresh (p, slot, fresh);
    put_handle (p, slot);
    if (!retry) break;
  }
  if (r == 0)
    err->errnum = 0;             /* a retry succeeded: forget the first failure */
  if (r == 0 && b.oom)
    return cbw_err_set (err, ENOMEM, "out of memory");
  if (r == 0 && x->n == 0)
    return cbw_err_set (err, EIO, "upstream %s: block status returned no extents", p->uri);
  return r;
}

static void
pit_close (struct cbwd_export *e)
{
  struct pit_priv *p = e->priv;
  if (!p) return;
  for (unsigned i = 0; i < p->n; i++)
    if (p->h && p->h[i]) {
      nbd_shutdown (p->h[i], 0);
      nbd_close (p->h[i]);
    }
  free (p->h);
  free (p->busy);
  if (p->d)
    cbwd_log ("export '%s': point-in-time reads: %" PRIu64 " bytes direct, %"
              PRIu64 " bytes through the upstream, %" PRIu64 " re-checks",
              e->name, atomic_load (&p->d->direct_bytes),
              atomic_load (&p->d->upstream_bytes), atomic_load (&p->d->rechecks));
  direct_free (p->d);
  pthread_mutex_destroy (&p->lock);
  pthread_cond_destroy (&p->cond);
  free (p->uri);
  free (p->unreadable_why);
  free (p);
  e->priv = NULL;
}

static const struct cbwd_export_ops pit_ops = {
  .type = "pit",
  .pread = pit_pread, .pwrite = pit_pwrite, .zero = pit_zero,
  .trim = pit_trim, .flush = pit_flush, .cache = pit_cache,
  .block_status = pit_block_status, .close = pit_close,
  .pread_nowait = pit_pread_nowait,
};

struct cbwd_export *
cbwd_export_pit_new (const char *name, const struct cbwd_pit_opts *o,
                     struct cbw_err *err)
{
  int ndirect = !!o->state_file + !!o->live_file + !!o->store_file;
  if (ndirect != 0 && ndirect != 3) {
    cbw_err_set (err, EINVAL, "export '%s': state-file, live-file and "
                 "store-file go together (direct reads need all three)", name);
    return NULL;
  }
  struct cbwd_export *e = calloc (1, sizeof *e);
  struct pit_priv *p = calloc (1, sizeof *p);
  unsigned n = o->connections ? o->connections : 4;
  if (!e || !p || !(e->name = strdup (name)) || !(p->uri = strdup (o->upstream)) ||
      !(p->h = calloc (n, sizeof *p->h)) || !(p->busy = calloc (n, sizeof *p->busy))) {
    if (p) { free (p->uri); free (p->h); free (p->busy); }
    if (e) free (e->name);
    free (p); free (e);
    cbw_err_set (err, ENOMEM, "out of memory");
    return NULL;
  }
  p->n = n;
  p->release = o->release;
  p->readable_meta = -1;
  pthread_mutex_init (&p->lock, NULL);
  pthread_cond_init (&p->cond, NULL);
  e->refs = 1;
  e->priv = p;
  e->ops = &pit_ops;
  /* First connection now: size and capabilities of the upstream. */
  struct nbd_handle *h = pit_connect (p, err);
  if (!h) goto fail;
  p->h[0] = h;
  int64_t size = nbd_get_size (h);
  if (size <= 0) {
    cbw_err_set (err, EIO, "upstream %s: no size: %s", p->uri, nbd_get_error ());
    goto fail;
  }
  e->size = (uint64_t) size;
  if (ndirect) {
    p->d = direct_open (o, e->size, err);
    if (!p->d)
      goto fail;
    cbwd_log ("export '%s': direct point-in-time reads (state map %s, "
              "granularity %llu, live %s, store %s)", name, o->state_file,
              1ULL << p->d->shift, o->live_file, o->store_file);
  }
  p->can_trim = nbd_can_trim (h) == 1;
  p->can_cache = nbd_can_cache (h) == 1;
  p->has_base = nbd_can_meta_context (h, "base:allocation") == 1;
  e->eflags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_CAN_MULTI_CONN | NBD_FLAG_SEND_CACHE;
  if (o->release)
    e->eflags |= NBD_FLAG_SEND_TRIM;
  else
    e->eflags |= NBD_FLAG_READ_ONLY;

  struct cbwd_meta m;
  if (cbwd_meta_base_init (&m) == -1) { cbw_err_set (err, ENOMEM, "out of memory"); goto fail; }
  if (cbwd_export_add_meta (e, &m, err) == -1) { m.free (&m); goto fail; }
  if (cbwd_meta_depth_init (&m) == -1) { cbw_err_set (err, ENOMEM, "out of memory"); goto fail; }
  if (cbwd_export_add_meta (e, &m, err) == -1) { m.free (&m); goto fail; }
  return e;
 fail:
  cbw_err_prefix (err, "export '%s'", name);
  cbwd_export_free (e);
  return NULL;
}

int
cbwd_export_pit_readable_only (struct cbwd_export *e, const char *context,
                               const char *why, struct cbw_err *err)
{
  struct pit_priv *p = e->priv;
  if (e->ops != &pit_ops || p == NULL)
    return cbw_err_set (err, EINVAL, "export '%s' is not a point-in-time export", e->name);
  if (strncmp (context, "qemu:dirty-bitmap:", 18) != 0)
    return cbw_err_set (err, EINVAL, "export '%s': readable set '%s' is not a dirty bitmap",
                        e->name, context);
  for (size_t i = 0; i < e->nmetas; i++)
    if (strcmp (e->metas[i].name, context) == 0) {
      char *w = strdup (why ? why : "outside the export's readable set");
      if (w == NULL)
        return cbw_err_set (err, ENOMEM, "out of memory");
      free (p->unreadable_why);
      p->unreadable_why = w;
      p->readable_meta = (long) i;
      return 0;
    }
  return cbw_err_set (err, EINVAL, "export '%s': no meta context '%s'", e->name, context);
}
