/* cbw — server/export_pit.c: the point-in-time (PIT) export of a backup
 * session: a read-only proxy to the cbw filter's PIT export (an upstream NBD
 * URI), over a pool of libnbd connections.
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
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <libnbd.h>

#include "cleanup.h"
#include "export.h"
#include "nbd_proto.h"

struct pit_priv {
  char *uri;
  unsigned n;
  bool release;
  bool can_trim, can_cache, has_base;
  pthread_mutex_t lock;          /* guards h[] ownership and busy[] */
  pthread_cond_t cond;
  struct nbd_handle **h;         /* NULL: not connected */
  bool *busy;
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
pit_pread (struct cbwd_export *e, void *buf, uint32_t len, uint64_t off,
           struct cbwd_holes *holes, struct cbw_err *err)
{
  struct pit_priv *p = e->priv;
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
  pthread_mutex_destroy (&p->lock);
  pthread_cond_destroy (&p->cond);
  free (p->uri);
  free (p);
  e->priv = NULL;
}

static const struct cbwd_export_ops pit_ops = {
  .type = "pit",
  .pread = pit_pread, .pwrite = pit_pwrite, .zero = pit_zero,
  .trim = pit_trim, .flush = pit_flush, .cache = pit_cache,
  .block_status = pit_block_status, .close = pit_close,
};

struct cbwd_export *
cbwd_export_pit_new (const char *name, const struct cbwd_pit_opts *o,
                     struct cbw_err *err)
{
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
