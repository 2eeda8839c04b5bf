/* cbw — client-tests/cbwd/incremental_reader.c: what an incremental backup
 * reader (virtnbdbackup style) does, on libnbd: one connection with
 * base:allocation and qemu:dirty-bitmap:NAME, block status in 32 MiB steps,
 * read only the dirty data (dirty + zero ranges are written as zeroes without
 * reading), apply it to the previous full copy.
 *
 * usage: incremental_reader URI BITMAP-NAME COPY-FILE
 * prints: "dirty BYTES read BYTES zeroed BYTES"
 * Single-threaded, synchronous libnbd; no locking.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <libnbd.h>

#define STEP (32ULL * 1024 * 1024)
#define MAXREAD (4U * 1024 * 1024)

struct ext { uint64_t off, len; uint32_t flags; };
struct list { struct ext *v; size_t n, cap; };

static const char *dirty_ctx;

struct collect { struct list base, dirty; };

static void
push (struct list *l, uint64_t off, uint64_t len, uint32_t flags)
{
  if (l->n == l->cap) {
    l->cap = l->cap ? l->cap * 2 : 64;
    l->v = realloc (l->v, l->cap * sizeof *l->v);
    if (!l->v) { perror ("realloc"); exit (1); }
  }
  l->v[l->n++] = (struct ext) { off, len, flags };
}

static int
extent_cb (void *opaque, const char *ctx, uint64_t off, uint32_t *e, size_t n, int *error)
{
  (void) error;
  struct collect *c = opaque;
  struct list *l = strcmp (ctx, "base:allocation") == 0 ? &c->base
    : strcmp (ctx, dirty_ctx) == 0 ? &c->dirty : NULL;
  if (!l) return 0;
  for (size_t i = 0; i + 1 < n; i += 2) {
    push (l, off, e[i], e[i + 1]);
    off += e[i];
  }
  return 0;
}

/* State of byte `off` in list l (extents sorted, contiguous from start). */
static const struct ext *
find (const struct list *l, uint64_t off)
{
  size_t lo = 0, hi = l->n;
  while (lo < hi) {
    size_t m = (lo + hi) / 2;
    if (l->v[m].off + l->v[m].len <= off) lo = m + 1; else hi = m;
  }
  return lo < l->n && l->v[lo].off <= off ? &l->v[lo] : NULL;
}

int
main (int argc, char **argv)
{
  if (argc != 4) {
    fprintf (stderr, "usage: %s URI BITMAP COPY-FILE\n", argv[0]);
    return 2;
  }
  char ctxname[512];
  snprintf (ctxname, sizeof ctxname, "qemu:dirty-bitmap:%s", argv[2]);
  dirty_ctx = ctxname;
  struct nbd_handle *h = nbd_create ();
  if (!h ||
      nbd_add_meta_context (h, "base:allocation") == -1 ||
      nbd_add_meta_context (h, ctxname) == -1 ||
      nbd_connect_uri (h, argv[1]) == -1) {
    fprintf (stderr, "%s\n", nbd_get_error ());
    return 1;
  }
  if (nbd_can_meta_context (h, ctxname) != 1 ||
      nbd_can_meta_context (h, "base:allocation") != 1) {
    fprintf (stderr, "server does not offer %s and base:allocation\n", ctxname);
    return 1;
  }
  int64_t size = nbd_get_size (h);
  int fd = open (argv[3], O_WRONLY);
  if (size < 0 || fd == -1) { perror (argv[3]); return 1; }
  char *buf = malloc (MAXREAD), *zero = calloc (1, MAXREAD);
  if (!buf || !zero) return 1;
  uint64_t dirty = 0, nread = 0, zeroed = 0;
  uint64_t off = 0;
  while (off < (uint64_t) size) {
    uint64_t len = (uint64_t) size - off < STEP ? (uint64_t) size - off : STEP;
    struct collect c = { 0 };
    nbd_extent_callback cb = { .callback = extent_cb, .user_data = &c };
    if (nbd_block_status (h, len, off, cb, 0) == -1) {
      fprintf (stderr, "block status at %" PRIu64 ": %s\n", off, nbd_get_error ());
      return 1;
    }
    if (c.base.n == 0 || c.dirty.n == 0) {
      fprintf (stderr, "block status at %" PRIu64 ": a context is missing\n", off);
      return 1;
    }
    /* The server may describe less than asked: advance by what both cover. */
    uint64_t be = c.base.v[c.base.n - 1].off + c.base.v[c.base.n - 1].len;
    uint64_t de = c.dirty.v[c.dirty.n - 1].off + c.dirty.v[c.dirty.n - 1].len;
    uint64_t end = be < de ? be : de;
    if (end > off + len) end = off + len;
    if (end <= off) { fprintf (stderr, "no progress at %" PRIu64 "\n", off); return 1; }
    uint64_t o = off;
    while (o < end) {
      const struct ext *d = find (&c.dirty, o), *b = find (&c.base, o);
      if (!d || !b) { fprintf (stderr, "gap in extents at %" PRIu64 "\n", o); return 1; }
      uint64_t n = end - o;
      if (d->off + d->len - o < n) n = d->off + d->len - o;
      if (b->off + b->len - o < n) n = b->off + b->len - o;
      if (n > MAXREAD) n = MAXREAD;
      if (d->flags & 1) {
        dirty += n;
        const char *src = zero;
        if (!(b->flags & 2)) {
          if (nbd_pread (h, buf, n, o, 0) == -1) {
            fprintf (stderr, "read at %" PRIu64 ": %s\n", o, nbd_get_error ());
            return 1;
          }
          nread += n;
          src = buf;
        }
        else
          zeroed += n;
        if (pwrite (fd, src, n, o) != (ssize_t) n) { perror ("pwrite"); return 1; }
      }
      o += n;
    }
    free (c.base.v);
    free (c.dirty.v);
    off = end;
  }
  if (fsync (fd) == -1 || close (fd) == -1) { perror ("close"); return 1; }
  nbd_shutdown (h, 0);
  nbd_close (h);
  free (buf);
  free (zero);
  printf ("dirty %" PRIu64 " read %" PRIu64 " zeroed %" PRIu64 "\n", dirty, nread, zeroed);
  return 0;
}
