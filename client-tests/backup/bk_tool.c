/* cbw — client-tests/backup/bk_tool.c: libnbd helper for the backup client
 * tests (no python3-libnbd needed).
 *
 *   bk_tool seqwrite URI_A URI_B STOPFILE
 *       loop n = 1, 2, ...: write n (8 bytes, little endian) at offset 0 of
 *       disk A, wait for the ack, then the same on disk B; stop when STOPFILE
 *       exists; print the last n.  At any instant the disks hold
 *       (A, B) = (n, n-1) or (n, n): a consistent point in time across both
 *       disks therefore satisfies B <= A <= B + 1.
 *   bk_tool ctl SOCKET JSON      send one raw request line to a control
 *                                socket, print the reply line (like
 *                                functions.sh's ctl, without python's
 *                                start-up cost on a loaded CI box)
 *   bk_tool readseq URI          print the 8-byte number at offset 0
 *   bk_tool readat URI OFF LEN   one read request; exit 0 if it succeeds,
 *                                1 if the server returns an error
 *   bk_tool extents CTL BITMAP SIZE
 *       print "OFFSET LENGTH" lines: dirty extents of BITMAP from the
 *       dirtybitmap filter's control socket CTL (paged with "next")
 *   bk_tool dirty-copy CTL BITMAP URI OUTFILE
 *       copy the dirty extents of BITMAP from the NBD export URI into OUTFILE
 *       at the same offsets (an incremental restore); print the bytes copied
 *   bk_tool randwrite URI SECS THREADS BS [SPAN]
 *       THREADS connections each write BS bytes of random data at random
 *       BS-aligned offsets (in the first SPAN bytes, default the whole
 *       disk), one request at a time, for SECS seconds; print
 *       "writes=N failed=F max_ms=M" (M: the slowest write, as the guest
 *       saw it, from request to reply)
 *   bk_tool pitcheck URI REF BS
 *       read the whole export URI in BS pieces and compare each with the
 *       same bytes of the file REF; print "ok=N eio=E differs=D" (a piece
 *       that fails is counted in E; D must be 0 for a point in time)
 *
 * Locking: single-threaded, but for randwrite's writers, which share only
 * atomic counters.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <libnbd.h>
#include <json-c/json.h>

#include "cbw_err.h"
#include "control.h"

static struct nbd_handle *
open_uri (const char *uri)
{
  struct nbd_handle *h = nbd_create ();
  if (h == NULL || nbd_connect_uri (h, uri) == -1) {
    fprintf (stderr, "bk_tool: %s: %s\n", uri, nbd_get_error ());
    exit (1);
  }
  return h;
}

/* Calls fn(offset, length) for each dirty extent; returns 0 or exits. */
static void
for_extents (const char *ctl, const char *bitmap, uint64_t size,
             void (*fn) (uint64_t, uint64_t, void *), void *opaque)
{
  struct cbw_err err = { 0 };
  struct cbw_ctl_client *c = cbw_ctl_client_connect (ctl, &err);
  uint64_t pos = 0;
  if (c == NULL) {
    fprintf (stderr, "bk_tool: %s\n", err.msg);
    exit (1);
  }
  while (pos < size) {
    struct json_object *a = json_object_new_object (), *ret = NULL, *ex, *nx;
    json_object_object_add (a, "name", json_object_new_string (bitmap));
    json_object_object_add (a, "offset", json_object_new_int64 ((int64_t) pos));
    json_object_object_add (a, "length", json_object_new_int64 ((int64_t) (size - pos)));
    if (cbw_ctl_client_execute (c, "extents", a, &ret, NULL, &err) < 0) {
      fprintf (stderr, "bk_tool: extents: %s\n", err.msg);
      exit (1);
    }
    json_object_object_get_ex (ret, "extents", &ex);
    for (size_t i = 0; ex && i < json_object_array_length (ex); i++) {
      struct json_object *e = json_object_array_get_idx (ex, i), *o, *l;
      json_object_object_get_ex (e, "offset", &o);
      json_object_object_get_ex (e, "length", &l);
      fn ((uint64_t) json_object_get_int64 (o), (uint64_t) json_object_get_int64 (l), opaque);
    }
    uint64_t next = size;
    if (json_object_object_get_ex (ret, "next", &nx) && json_object_is_type (nx, json_type_int))
      next = (uint64_t) json_object_get_int64 (nx);
    json_object_put (ret);
    if (next <= pos) {
      fprintf (stderr, "bk_tool: extents: next does not advance\n");
      exit (1);
    }
    pos = next;
  }
  cbw_ctl_client_close (c);
}

static void
print_ext (uint64_t o, uint64_t l, void *opaque)
{
  (void) opaque;
  printf ("%" PRIu64 " %" PRIu64 "\n", o, l);
}

struct copy_ctx { struct nbd_handle *h; int fd; uint64_t bytes; };

static void
copy_ext (uint64_t o, uint64_t l, void *opaque)
{
  struct copy_ctx *cc = opaque;
  static char buf[4 << 20];
  while (l > 0) {
    size_t n = l > sizeof buf ? sizeof buf : (size_t) l;
    if (nbd_pread (cc->h, buf, n, o, 0) == -1) {
      fprintf (stderr, "bk_tool: pread %" PRIu64 ": %s\n", o, nbd_get_error ());
      exit (1);
    }
    if (pwrite (cc->fd, buf, n, (off_t) o) != (ssize_t) n) {
      perror ("bk_tool: pwrite");
      exit (1);
    }
    cc->bytes += n;
    o += n;
    l -= n;
  }
}

static double
now_s (void)
{
  struct timespec ts;
  clock_gettime (CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

struct rw_ctx {
  const char *uri;
  double end;
  uint64_t bs, span;
  _Atomic uint64_t writes, failed, max_us;
  _Atomic int lost;
};

static void *
rw_writer (void *arg)
{
  struct rw_ctx *c = arg;
  struct nbd_handle *h = open_uri (c->uri);
  int64_t size = nbd_get_size (h);
  uint64_t seed = (uint64_t) (uintptr_t) &h ^ (uint64_t) (now_s () * 1e9), nblocks;
  char *buf = malloc (c->bs);
  if (buf == NULL || size < (int64_t) c->bs) {
    fprintf (stderr, "bk_tool: randwrite: out of memory or disk too small\n");
    exit (1);
  }
  nblocks = (c->span && c->span < (uint64_t) size ? c->span : (uint64_t) size) / c->bs;
  while (now_s () < c->end) {
    for (uint64_t i = 0; i < c->bs; i += 8) {
      seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;
      memcpy (buf + i, &seed, c->bs - i < 8 ? c->bs - i : 8);
    }
    double t0 = now_s ();
    int r = nbd_pwrite (h, buf, c->bs, (seed % nblocks) * c->bs, 0);
    uint64_t us = (uint64_t) ((now_s () - t0) * 1e6), m = atomic_load (&c->max_us);
    while (us > m && !atomic_compare_exchange_weak (&c->max_us, &m, us))
      ;
    atomic_fetch_add (&c->writes, 1);
    if (r == -1) {
      atomic_fetch_add (&c->failed, 1);
      if (nbd_aio_is_dead (h) || nbd_aio_is_closed (h)) {
        fprintf (stderr, "bk_tool: randwrite: connection lost: %s\n", nbd_get_error ());
        atomic_store (&c->lost, 1);
        break;
      }
    }
  }
  free (buf);
  nbd_close (h);
  return NULL;
}

int
main (int argc, char **argv)
{
  if ((argc == 6 || argc == 7) && strcmp (argv[1], "randwrite") == 0) {
    struct rw_ctx c = { .uri = argv[2], .end = now_s () + atof (argv[3]),
                        .bs = strtoull (argv[5], NULL, 10),
                        .span = argc == 7 ? strtoull (argv[6], NULL, 10) : 0 };
    int n = atoi (argv[4]);
    pthread_t th[64];
    if (n < 1 || n > 64 || c.bs == 0 || (c.span && c.span < c.bs)) {
      fprintf (stderr, "bk_tool: randwrite: THREADS 1..64, BS > 0, SPAN >= BS\n");
      return 2;
    }
    for (int i = 0; i < n; i++)
      pthread_create (&th[i], NULL, rw_writer, &c);
    for (int i = 0; i < n; i++)
      pthread_join (th[i], NULL);
    printf ("writes=%" PRIu64 " failed=%" PRIu64 " max_ms=%" PRIu64 "\n",
            atomic_load (&c.writes), atomic_load (&c.failed), atomic_load (&c.max_us) / 1000);
    return atomic_load (&c.lost) ? 1 : 0;
  }
  if (argc == 5 && strcmp (argv[1], "pitcheck") == 0) {
    struct nbd_handle *h = open_uri (argv[2]);
    int64_t size = nbd_get_size (h);
    uint64_t bs = strtoull (argv[4], NULL, 10), ok = 0, eio = 0, differs = 0;
    int fd = open (argv[3], O_RDONLY);
    char *a = malloc (bs ? bs : 1), *b = malloc (bs ? bs : 1);
    if (size < 0 || fd < 0 || bs == 0 || a == NULL || b == NULL) {
      fprintf (stderr, "bk_tool: pitcheck: cannot size %s or open %s\n", argv[2], argv[3]);
      return 1;
    }
    for (uint64_t off = 0; off < (uint64_t) size; off += bs) {
      size_t n = (uint64_t) size - off < bs ? (size_t) ((uint64_t) size - off) : (size_t) bs;
      if (nbd_pread (h, a, n, off, 0) == -1) {
        if (nbd_aio_is_dead (h) || nbd_aio_is_closed (h)) {
          fprintf (stderr, "bk_tool: pitcheck: connection lost: %s\n", nbd_get_error ());
          return 1;
        }
        eio++;
        continue;
      }
      if (pread (fd, b, n, (off_t) off) != (ssize_t) n) {
        perror ("bk_tool: pitcheck: pread");
        return 1;
      }
      if (memcmp (a, b, n) == 0)
        ok++;
      else {
        if (differs++ < 5)
          fprintf (stderr, "bk_tool: pitcheck: %" PRIu64 "+%zu differs from %s\n", off, n,
                   argv[3]);
      }
    }
    printf ("ok=%" PRIu64 " eio=%" PRIu64 " differs=%" PRIu64 "\n", ok, eio, differs);
    close (fd);
    free (a); free (b);
    nbd_close (h);
    return 0;
  }
  if (argc == 5 && strcmp (argv[1], "seqwrite") == 0) {
    struct nbd_handle *a = open_uri (argv[2]), *b = open_uri (argv[3]);
    uint64_t n;
    for (n = 1; access (argv[4], F_OK) != 0; n++) {
      usleep (500);              /* steady, not a CPU hog on a shared CI box */
      if (nbd_pwrite (a, &n, sizeof n, 0, 0) == -1 || nbd_pwrite (b, &n, sizeof n, 0, 0) == -1) {
        fprintf (stderr, "bk_tool: seqwrite: %s\n", nbd_get_error ());
        return 1;
      }
    }
    printf ("%" PRIu64 "\n", n - 1);
    nbd_shutdown (a, 0); nbd_shutdown (b, 0);
    nbd_close (a); nbd_close (b);
    return 0;
  }
  if (argc == 3 && strcmp (argv[1], "readseq") == 0) {
    struct nbd_handle *h = open_uri (argv[2]);
    uint64_t n;
    if (nbd_pread (h, &n, sizeof n, 0, 0) == -1) {
      fprintf (stderr, "bk_tool: readseq: %s\n", nbd_get_error ());
      return 1;
    }
    printf ("%" PRIu64 "\n", n);
    nbd_close (h);
    return 0;
  }
  if (argc == 4 && strcmp (argv[1], "ctl") == 0) {
    struct cbw_err err = { 0 };
    struct cbw_ctl_client *c = cbw_ctl_client_connect (argv[2], &err);
    char *line;
    if (c == NULL || cbw_ctl_client_send_raw (c, argv[3], strlen (argv[3]), &err) < 0 ||
        cbw_ctl_client_send_raw (c, "\n", 1, &err) < 0 ||
        (line = cbw_ctl_client_read_line (c, &err)) == NULL) {
      fprintf (stderr, "bk_tool: ctl %s: %s\n", argv[2], err.msg);
      return 1;
    }
    printf ("%s\n", line);
    free (line);
    cbw_ctl_client_close (c);
    return 0;
  }
  if (argc == 5 && strcmp (argv[1], "readat") == 0) {
    struct nbd_handle *h = open_uri (argv[2]);
    size_t len = strtoul (argv[4], NULL, 10);
    char *buf = malloc (len ? len : 1);
    int r = nbd_pread (h, buf, len, strtoull (argv[3], NULL, 10), 0);
    if (r == -1)
      fprintf (stderr, "bk_tool: readat: %s\n", nbd_get_error ());
    free (buf);
    nbd_close (h);
    return r == -1 ? 1 : 0;
  }
  if (argc == 5 && strcmp (argv[1], "extents") == 0) {
    for_extents (argv[2], argv[3], strtoull (argv[4], NULL, 10), print_ext, NULL);
    return 0;
  }
  if (argc == 6 && strcmp (argv[1], "dirty-copy") == 0) {
    struct copy_ctx cc = { .h = open_uri (argv[4]) };
    int64_t size = nbd_get_size (cc.h);
    cc.fd = open (argv[5], O_WRONLY);
    if (size < 0 || cc.fd < 0) {
      fprintf (stderr, "bk_tool: dirty-copy: cannot open %s or size the export\n", argv[5]);
      return 1;
    }
    for_extents (argv[2], argv[3], (uint64_t) size, copy_ext, &cc);
    close (cc.fd);
    nbd_close (cc.h);
    printf ("%" PRIu64 "\n", cc.bytes);
    return 0;
  }
  fprintf (stderr, "usage: bk_tool seqwrite|readseq|extents|dirty-copy ... (see source)\n");
  return 2;
}
