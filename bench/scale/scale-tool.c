/* cbw — bench/scale/scale-tool.c: the client side of bench/scale/run.sh.
 *
 *   scale-tool writers STOPFILE OUT URI...
 *     One thread per URI (a disk), each writing 4 KiB in turn to the same
 *     16 blocks (after the first copy of each, a backup adds no copy: what
 *     is left is the pause of the quiesce), synchronously, one at a time,
 *     until STOPFILE exists.  Every write is a line of OUT:
 *     "DISK START_NS LATENCY_NS" (CLOCK_REALTIME start, so the shell's
 *     `date +%s%N` around `backup begin` can be laid over it).
 *
 *   scale-tool map URI CONTEXT
 *     Block status of the whole export for meta context CONTEXT, in
 *     requests of at most 1 GiB less one block, as a backup reader asks;
 *     prints "EXTENTS DIRTY_EXTENTS SECONDS" (connect and handshake not
 *     counted).
 *
 * Locking: each writer thread owns its handle and its buffer of samples;
 * the output is written after all threads are joined.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <libnbd.h>

static int64_t
now_ns (clockid_t c)
{
  struct timespec ts;
  clock_gettime (c, &ts);
  return (int64_t) ts.tv_sec * 1000000000 + ts.tv_nsec;
}

struct writer {
  const char *uri, *stop;
  pthread_t th;
  int64_t *start, *lat;
  size_t n, cap;
  int err;
};

static void *
writer (void *arg)
{
  struct writer *w = arg;
  struct nbd_handle *h = nbd_create ();
  char buf[4096];
  uint64_t i = 0;

  memset (buf, 0xa5, sizeof buf);
  if (h == NULL || nbd_connect_uri (h, w->uri) == -1) {
    fprintf (stderr, "%s: %s\n", w->uri, nbd_get_error ());
    w->err = 1;
    return NULL;
  }
  while (access (w->stop, F_OK) != 0) {
    if (w->n == w->cap) {
      w->cap = w->cap ? w->cap * 2 : 65536;
      w->start = realloc (w->start, w->cap * sizeof *w->start);
      w->lat = realloc (w->lat, w->cap * sizeof *w->lat);
      if (w->start == NULL || w->lat == NULL) {
        w->err = 1;
        break;
      }
    }
    int64_t t0 = now_ns (CLOCK_REALTIME), m0 = now_ns (CLOCK_MONOTONIC);
    if (nbd_pwrite (h, buf, sizeof buf, (i++ % 16) * 65536, 0) == -1) {
      fprintf (stderr, "%s: write: %s\n", w->uri, nbd_get_error ());
      w->err = 1;
      break;
    }
    w->start[w->n] = t0;
    w->lat[w->n++] = now_ns (CLOCK_MONOTONIC) - m0;
  }
  nbd_shutdown (h, 0);
  nbd_close (h);
  return NULL;
}

static int
writers (const char *stop, const char *out, int n, char **uris)
{
  struct writer *w = calloc ((size_t) n, sizeof *w);
  FILE *f;
  int i, err = 0;

  if (w == NULL)
    return 1;
  for (i = 0; i < n; ++i) {
    w[i].uri = uris[i];
    w[i].stop = stop;
    if (pthread_create (&w[i].th, NULL, writer, &w[i]) != 0)
      return 1;
  }
  for (i = 0; i < n; ++i)
    pthread_join (w[i].th, NULL);
  f = fopen (out, "w");
  if (f == NULL) {
    perror (out);
    return 1;
  }
  for (i = 0; i < n; ++i) {
    for (size_t k = 0; k < w[i].n; ++k)
      fprintf (f, "%d %" PRId64 " %" PRId64 "\n", i, w[i].start[k], w[i].lat[k]);
    err |= w[i].err;
    free (w[i].start);
    free (w[i].lat);
  }
  free (w);
  return fclose (f) != 0 || err;
}

struct count { uint64_t extents, dirty, covered; };

static int
extent_cb (void *data, const char *ctx, uint64_t off, uint32_t *e, size_t n,
           int *error)
{
  struct count *c = data;
  (void) ctx; (void) off; (void) error;
  for (size_t i = 0; i + 1 < n; i += 2) {
    c->extents++;
    c->dirty += e[i + 1] & 1;
    c->covered += e[i];
  }
  return 0;
}

static int
map (const char *uri, const char *ctx)
{
  struct nbd_handle *h = nbd_create ();
  struct count c = { 0, 0, 0 };
  int64_t size;
  uint64_t off = 0;
  const uint64_t chunk = (1ULL << 30) - 65536;

  if (h == NULL || nbd_add_meta_context (h, ctx) == -1 ||
      nbd_connect_uri (h, uri) == -1 || (size = nbd_get_size (h)) < 0) {
    fprintf (stderr, "%s: %s\n", uri, nbd_get_error ());
    return 1;
  }
  if (nbd_can_meta_context (h, ctx) != 1) {
    fprintf (stderr, "%s: no meta context %s\n", uri, ctx);
    return 1;
  }
  int64_t t0 = now_ns (CLOCK_MONOTONIC);
  while (off < (uint64_t) size) {
    uint64_t len = (uint64_t) size - off < chunk ? (uint64_t) size - off : chunk;
    c.covered = 0;
    if (nbd_block_status (h, len, off,
                          (nbd_extent_callback) { .callback = extent_cb,
                                                  .user_data = &c }, 0) == -1) {
      fprintf (stderr, "block status at %" PRIu64 ": %s\n", off,
               nbd_get_error ());
      return 1;
    }
    if (c.covered == 0) {
      fprintf (stderr, "block status at %" PRIu64 ": empty reply\n", off);
      return 1;
    }
    off += c.covered;           /* the reply may cover less than asked */
  }
  printf ("%" PRIu64 " %" PRIu64 " %.6f\n", c.extents, c.dirty,
          (now_ns (CLOCK_MONOTONIC) - t0) / 1e9);
  nbd_shutdown (h, 0);
  nbd_close (h);
  return 0;
}

int
main (int argc, char **argv)
{
  if (argc >= 5 && strcmp (argv[1], "writers") == 0)
    return writers (argv[2], argv[3], argc - 4, argv + 4);
  if (argc == 4 && strcmp (argv[1], "map") == 0)
    return map (argv[2], argv[3]);
  fprintf (stderr, "usage: scale-tool writers STOPFILE OUT URI... | "
           "map URI CONTEXT\n");
  return 2;
}
