/* cbw — server/export.c: the parts of struct cbwd_export shared by every
 * backend: extent and hole lists, the export list, the base:allocation and
 * qemu:allocation-depth context providers, and the in-memory test backend.
 *
 * Locking: extent/hole lists belong to one request (one thread).  The memory
 * backend guards its buffer with one mutex held only for memcpy (there is no
 * I/O to hold it across).
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "cleanup.h"
#include "export.h"
#include "nbd_proto.h"

void
cbwd_extents_init (struct cbwd_extents *x, uint64_t offset, uint64_t limit, size_t max)
{
  memset (x, 0, sizeof *x);
  x->offset = offset;
  x->limit = limit;
  x->max = max ? max : 1;
}

void
cbwd_extents_free (struct cbwd_extents *x)
{
  free (x->e);
  x->e = NULL;
  x->n = x->cap = 0;
}

int
cbwd_extents_add (struct cbwd_extents *x, uint64_t length, uint32_t flags)
{
  while (length > 0) {
    if (x->covered >= x->limit)
      return 1;
    uint64_t room = x->limit - x->covered;
    uint64_t l = length < room ? length : room;
    if (x->n > 0 && x->e[x->n - 1].flags == flags &&
        (uint64_t) x->e[x->n - 1].length + l <= UINT32_MAX - 4095) {
      x->e[x->n - 1].length += (uint32_t) l;
    }
    else {
      if (x->n >= x->max)
        return 1;
      if (l > UINT32_MAX - 4095)   /* keep descriptors 4k-aligned when split */
        l = UINT32_MAX - 4095;
      if (x->n == x->cap) {
        size_t ncap = x->cap ? x->cap * 2 : 16;
        struct cbwd_extent *ne = realloc (x->e, ncap * sizeof *ne);
        if (!ne) { errno = ENOMEM; return -1; }
        x->e = ne; x->cap = ncap;
      }
      x->e[x->n].length = (uint32_t) l;
      x->e[x->n].flags = flags;
      x->n++;
    }
    x->covered += l;
    length -= l;
  }
  return x->covered >= x->limit ? 1 : 0;
}

int
cbwd_holes_add (struct cbwd_holes *h, uint32_t off, uint32_t len)
{
  if (len == 0) return 0;
  if (h->n > 0 && h->h[h->n - 1].off + h->h[h->n - 1].len == off) {
    h->h[h->n - 1].len += len;
    return 0;
  }
  if (h->n == h->cap) {
    size_t ncap = h->cap ? h->cap * 2 : 8;
    void *nh = realloc (h->h, ncap * sizeof *h->h);
    if (!nh) { errno = ENOMEM; return -1; }
    h->h = nh; h->cap = ncap;
  }
  h->h[h->n].off = off;
  h->h[h->n].len = len;
  h->n++;
  return 0;
}

void
cbwd_holes_free (struct cbwd_holes *h)
{
  free (h->h);
  h->h = NULL;
  h->n = h->cap = 0;
}

int
cbwd_export_add_meta (struct cbwd_export *e, const struct cbwd_meta *m,
                      struct cbw_err *err)
{
  for (size_t i = 0; i < e->nmetas; i++)
    if (strcmp (e->metas[i].name, m->name) == 0)
      return cbw_err_set (err, EINVAL, "export '%s': meta context '%s' given twice",
                          e->name, m->name);
  struct cbwd_meta *n = realloc (e->metas, (e->nmetas + 1) * sizeof *n);
  if (!n)
    return cbw_err_set (err, ENOMEM, "out of memory");
  e->metas = n;
  e->metas[e->nmetas++] = *m;
  return 0;
}

static void
meta_free_name (struct cbwd_meta *m)
{
  free (m->name);
}

static int
base_extents (struct cbwd_export *e, struct cbwd_meta *m,
              struct cbwd_extents *x, struct cbw_err *err)
{
  (void) m;
  return e->ops->block_status (e, x->offset, x, err);
}

int
cbwd_meta_base_init (struct cbwd_meta *m)
{
  memset (m, 0, sizeof *m);
  m->name = strdup ("base:allocation");
  if (!m->name) return -1;
  m->extents = base_extents;
  m->free = meta_free_name;
  return 0;
}

/* qemu:allocation-depth: every export cbwd serves is a single layer as seen
 * by the client (a raw file, or the PIT image as a whole), so a range is at
 * depth 1 when the backend has it allocated and 0 in a hole (the same answer
 * qemu gives for a raw file without backing). */
static int
depth_extents (struct cbwd_export *e, struct cbwd_meta *m,
               struct cbwd_extents *x, struct cbw_err *err)
{
  (void) m;
  struct cbwd_extents base;
  cbwd_extents_init (&base, x->offset, x->limit, x->max);
  if (e->ops->block_status (e, x->offset, &base, err) == -1) {
    cbwd_extents_free (&base);
    return -1;
  }
  for (size_t i = 0; i < base.n; i++) {
    uint32_t depth = (base.e[i].flags & NBD_STATE_HOLE) ? 0 : 1;
    int r = cbwd_extents_add (x, base.e[i].length, depth);
    if (r == -1) {
      cbwd_extents_free (&base);
      return cbw_err_set (err, ENOMEM, "out of memory");
    }
    if (r == 1) break;
  }
  cbwd_extents_free (&base);
  return 0;
}

int
cbwd_meta_depth_init (struct cbwd_meta *m)
{
  memset (m, 0, sizeof *m);
  m->name = strdup ("qemu:allocation-depth");
  if (!m->name) return -1;
  m->extents = depth_extents;
  m->free = meta_free_name;
  return 0;
}

struct cbwd_export *
cbwd_exports_find (const struct cbwd_exports *l, const char *name, size_t len)
{
  if (memchr (name, 0, len))
    return NULL;
  for (size_t i = 0; i < l->n; i++)
    if (strlen (l->v[i]->name) == len && memcmp (l->v[i]->name, name, len) == 0)
      return l->v[i];
  /* "" selects the first export (the default export), unless one is named "". */
  if (len == 0 && l->n > 0)
    return l->v[0];
  return NULL;
}

void
cbwd_export_free (struct cbwd_export *e)
{
  if (!e) return;
  if (e->ops && e->ops->close)
    e->ops->close (e);
  for (size_t i = 0; i < e->nmetas; i++)
    if (e->metas[i].free)
      e->metas[i].free (&e->metas[i]);
  free (e->metas);
  for (size_t i = 0; i < e->nallow; i++)
    free (e->allow[i]);
  free (e->allow);
  free (e->name);
  free (e->description);
  free (e);
}

bool
cbwd_export_allowed (const struct cbwd_export *e, bool tcp, const char *identity)
{
  if (!tcp)
    return true;
  if (!e->has_allow)
    return !e->tcp_deny_default;
  for (size_t i = 0; i < e->nallow; i++) {
    if (strcmp (e->allow[i], "*") == 0)
      return true;
    if (identity && strcmp (e->allow[i], identity) == 0)
      return true;
  }
  return false;
}

int
cbwd_allow_check (const char *id, struct cbw_err *err)
{
  if (strcmp (id, "*") == 0 ||
      (strncmp (id, "psk:", 4) == 0 && id[4]) ||
      (strncmp (id, "x509:", 5) == 0 && id[5]))
    return 0;
  return cbw_err_set (err, EINVAL, "allow: '%s' is not an identity "
                      "(psk:USER, x509:DN or *)", id);
}

int
cbwd_export_allow (struct cbwd_export *e, const char *identity, struct cbw_err *err)
{
  if (cbwd_allow_check (identity, err) == -1)
    return -1;
  char **v = realloc (e->allow, (e->nallow + 1) * sizeof *v);
  if (!v) return cbw_err_set (err, ENOMEM, "out of memory");
  e->allow = v;
  if (!(v[e->nallow] = strdup (identity)))
    return cbw_err_set (err, ENOMEM, "out of memory");
  e->nallow++;
  e->has_allow = true;
  return 0;
}

void
cbwd_export_ref (struct cbwd_export *e)
{
  if (e) e->refs++;
}

void
cbwd_export_unref (struct cbwd_export *e)
{
  if (e && --e->refs == 0)
    cbwd_export_free (e);
}

/* ---- memory backend (tests/fuzzing) ---- */
struct mem_priv {
  pthread_mutex_t lock;        /* guards data (memcpy only) */
  uint8_t *data;
};

static int
mem_pread (struct cbwd_export *e, void *buf, uint32_t len, uint64_t off,
           struct cbwd_holes *holes, struct cbw_err *err)
{
  (void) holes; (void) err;
  struct mem_priv *p = e->priv;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&p->lock);
  memcpy (buf, p->data + off, len);
  return 0;
}

static int
mem_pwrite (struct cbwd_export *e, const void *buf, uint32_t len, uint64_t off,
            bool fua, struct cbw_err *err)
{
  (void) fua; (void) err;
  struct mem_priv *p = e->priv;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&p->lock);
  memcpy (p->data + off, buf, len);
  return 0;
}

static int
mem_zero (struct cbwd_export *e, uint32_t len, uint64_t off, bool may_trim,
          bool fast, bool fua, struct cbw_err *err)
{
  (void) may_trim; (void) fast; (void) fua; (void) err;
  struct mem_priv *p = e->priv;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&p->lock);
  memset (p->data + off, 0, len);
  return 0;
}

static int
mem_trim (struct cbwd_export *e, uint32_t len, uint64_t off, bool fua,
          struct cbw_err *err)
{
  return mem_zero (e, len, off, true, false, fua, err);
}

static int
mem_flush (struct cbwd_export *e, struct cbw_err *err)
{
  (void) e; (void) err;
  return 0;
}

static int
mem_cache (struct cbwd_export *e, uint32_t len, uint64_t off, struct cbw_err *err)
{
  (void) e; (void) len; (void) off; (void) err;
  return 0;
}

/* Zero 4 KiB blocks are reported as holes. */
static int
mem_block_status (struct cbwd_export *e, uint64_t off, struct cbwd_extents *x,
                  struct cbw_err *err)
{
  struct mem_priv *p = e->priv;
  static const uint8_t zero[4096];
  uint64_t o = off;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&p->lock);
  while (o < e->size) {
    uint64_t blk_end = (o / 4096 + 1) * 4096;
    if (blk_end > e->size) blk_end = e->size;
    bool z = memcmp (p->data + o, zero, blk_end - o) == 0;
    int r = cbwd_extents_add (x, blk_end - o, z ? NBD_STATE_HOLE | NBD_STATE_ZERO : 0);
    if (r == -1) return cbw_err_set (err, ENOMEM, "out of memory");
    if (r == 1) break;
    o = blk_end;
  }
  return 0;
}

static void
mem_close (struct cbwd_export *e)
{
  struct mem_priv *p = e->priv;
  if (!p) return;
  pthread_mutex_destroy (&p->lock);
  free (p->data);
  free (p);
}

static const struct cbwd_export_ops mem_ops = {
  .type = "memory",
  .pread = mem_pread, .pwrite = mem_pwrite, .zero = mem_zero,
  .trim = mem_trim, .flush = mem_flush, .cache = mem_cache,
  .block_status = mem_block_status, .close = mem_close,
};

struct cbwd_export *
cbwd_export_memory_new (const char *name, uint64_t size, bool readonly,
                        struct cbw_err *err)
{
  if (size > (1ULL << 30)) {
    cbw_err_set (err, EINVAL, "export '%s': memory export larger than 1 GiB", name);
    return NULL;
  }
  struct cbwd_export *e = calloc (1, sizeof *e);
  struct mem_priv *p = calloc (1, sizeof *p);
  if (!e || !p || !(e->name = strdup (name)) ||
      !(p->data = calloc (1, size ? size : 1))) {
    free (p ? p->data : NULL); free (p);
    if (e) free (e->name);
    free (e);
    cbw_err_set (err, ENOMEM, "out of memory");
    return NULL;
  }
  pthread_mutex_init (&p->lock, NULL);
  e->refs = 1;
  e->priv = p;
  e->ops = &mem_ops;
  e->size = size;
  e->eflags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_CAN_MULTI_CONN | NBD_FLAG_SEND_CACHE;
  if (readonly)
    e->eflags |= NBD_FLAG_READ_ONLY;
  else
    e->eflags |= NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM |
      NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
  struct cbwd_meta m;
  if (cbwd_meta_base_init (&m) == -1 || cbwd_export_add_meta (e, &m, err) == -1 ||
      cbwd_meta_depth_init (&m) == -1 || cbwd_export_add_meta (e, &m, err) == -1) {
    cbwd_export_free (e);
    cbw_err_set (err, ENOMEM, "out of memory");
    return NULL;
  }
  return e;
}
