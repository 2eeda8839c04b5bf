/* cbw — client-tests/cbw/cbw-io.c: libnbd load and check tool for the cbw
 * filter's client tests.
 *
 *   cbw-io stress LIVE PIT REF SEED SECONDS WRITERS READERS
 *       WRITERS threads send random writes / write-zeroes / trims to LIVE
 *       while READERS threads read random ranges of PIT and compare them with
 *       REF (a copy of the disk taken at begin).  Exit 1 on any mismatch or
 *       failed request.
 *   cbw-io race LIVE PIT REF ITERS GRAN
 *       The classic PIT race, per iteration on a fresh block: a PIT read of
 *       the block and a guest write to it start together (the write a little
 *       later, while the filter's debug delay holds the reader between its
 *       state check and its live read).  The PIT data must equal REF.
 *   cbw-io writes LIVE SEED COUNT SIZE [MAXMS]
 *       COUNT random writes of SIZE bytes, one at a time; prints
 *       "ok=N failed=M max_ms=X"; exit 1 if a write took longer than MAXMS.
 *   cbw-io pread URI OFFSET LENGTH [REF]
 *       prints "ok", "differs" (from REF) or "error errno=N".
 *   cbw-io pwrite URI OFFSET LENGTH SEED
 *       one write of random data; prints "ok ms=X" or "error errno=N ms=X".
 *   cbw-io begin-race LIVE PIT CTL TARGET-URI GRAN
 *       writers rewrite blocks with sequence numbers while `begin` is sent;
 *       the PIT must hold, untorn, a write acknowledged before begin or in
 *       flight during it, never one issued after begin returned.
 *   cbw-io ctl SOCK JSON
 *       one control-socket request; prints the reply line.
 *
 * Locking: each thread owns its libnbd handle; shared counters are atomics.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/time.h>

#include <libnbd.h>

static const char *live_uri, *pit_uri;
static int ref_fd = -1;
static uint64_t disk_size;
static double end_time;
static _Atomic bool failed;
static _Atomic uint64_t n_write, n_zero, n_trim, n_read, n_read_bytes;

static double
now (void)
{
  struct timespec ts;
  clock_gettime (CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t
rnd (uint64_t *s)                      /* xorshift64* */
{
  *s ^= *s >> 12; *s ^= *s << 25; *s ^= *s >> 27;
  return *s * 2685821657736338717ULL;
}

static struct nbd_handle *
connect_uri (const char *uri)
{
  struct nbd_handle *h = nbd_create ();
  if (h == NULL || nbd_connect_uri (h, uri) == -1) {
    fprintf (stderr, "cbw-io: %s: %s\n", uri, nbd_get_error ());
    exit (1);
  }
  return h;
}

static void
die_nbd (const char *what)
{
  fprintf (stderr, "cbw-io: %s: %s (errno %d)\n", what, nbd_get_error (),
           nbd_get_errno ());
  failed = true;
}

static bool
check_ref (const char *buf, uint64_t off, size_t len, const char *who)
{
  char *ref = malloc (len);
  size_t i;
  bool ok = true;

  if (pread (ref_fd, ref, len, off) != (ssize_t) len) {
    perror ("pread ref");
    exit (1);
  }
  if (memcmp (ref, buf, len) != 0) {
    for (i = 0; i < len && ref[i] == buf[i]; ++i)
      ;
    fprintf (stderr, "cbw-io: %s: PIT data differs from the copy taken at "
             "begin at offset %" PRIu64 " (read %" PRIu64 "+%zu)\n",
             who, off + i, off, len);
    ok = false;
  }
  free (ref);
  return ok;
}

static void *
writer (void *arg)
{
  uint64_t seed = (uintptr_t) arg;
  struct nbd_handle *h = connect_uri (live_uri);
  char *buf = malloc (1 << 20);

  while (!failed && now () < end_time) {
    uint64_t len = ((rnd (&seed) % 512) + 1) * 512;     /* 512 .. 256K */
    uint64_t off, op = rnd (&seed) % 10;
    size_t i;
    if (rnd (&seed) % 8 == 0)
      len = 1 << 20;
    if (len > disk_size)
      len = disk_size;
    off = (rnd (&seed) % ((disk_size - len) / 512 + 1)) * 512;
    if (op < 7) {
      for (i = 0; i < len; i += 8)
        *(uint64_t *) (buf + i) = rnd (&seed);
      if (nbd_pwrite (h, buf, len, off, 0) == -1) die_nbd ("write");
      n_write++;
    }
    else if (op < 9) {
      if (nbd_zero (h, len, off, 0) == -1) die_nbd ("zero");
      n_zero++;
    }
    else {
      if (nbd_trim (h, len, off, 0) == -1) die_nbd ("trim");
      n_trim++;
    }
  }
  nbd_shutdown (h, 0);
  nbd_close (h);
  free (buf);
  return NULL;
}

static void *
reader (void *arg)
{
  uint64_t seed = (uintptr_t) arg;
  struct nbd_handle *h = connect_uri (pit_uri);
  char *buf = malloc (4 << 20);

  while (!failed && now () < end_time) {
    uint64_t len = ((rnd (&seed) % 1024) + 1) * 512;    /* 512 .. 512K */
    uint64_t off;
    if (rnd (&seed) % 8 == 0)
      len = 4 << 20;
    if (len > disk_size)
      len = disk_size;
    off = (rnd (&seed) % ((disk_size - len) / 512 + 1)) * 512;
    if (nbd_pread (h, buf, len, off, 0) == -1) {
      die_nbd ("PIT read");
      break;
    }
    if (!check_ref (buf, off, len, "stress"))
      failed = true;
    n_read++;
    n_read_bytes += len;
  }
  nbd_shutdown (h, 0);
  nbd_close (h);
  free (buf);
  return NULL;
}

static int
do_stress (int argc, char **argv)
{
  uint64_t seed;
  int secs, nw, nr, i;
  pthread_t th[64];
  struct nbd_handle *h;

  if (argc != 9) return 2;
  live_uri = argv[2]; pit_uri = argv[3];
  ref_fd = open (argv[4], O_RDONLY);
  if (ref_fd == -1) { perror (argv[4]); return 1; }
  seed = strtoull (argv[5], NULL, 0) | 1;
  secs = atoi (argv[6]); nw = atoi (argv[7]); nr = atoi (argv[8]);
  if (nw + nr > 64 || nw < 0 || nr < 0) return 2;
  h = connect_uri (live_uri);
  disk_size = nbd_get_size (h);
  nbd_close (h);
  end_time = now () + secs;
  for (i = 0; i < nw; ++i)
    pthread_create (&th[i], NULL, writer,
                    (void *) (uintptr_t) (seed * 7919 + i * 104729 + 1));
  for (i = 0; i < nr; ++i)
    pthread_create (&th[nw + i], NULL, reader,
                    (void *) (uintptr_t) (seed * 31337 + i * 65537 + 3));
  for (i = 0; i < nw + nr; ++i)
    pthread_join (th[i], NULL);
  printf ("writes=%" PRIu64 " zeroes=%" PRIu64 " trims=%" PRIu64
          " pit_reads=%" PRIu64 " pit_read_MiB=%" PRIu64 "\n",
          n_write, n_zero, n_trim, n_read, n_read_bytes >> 20);
  return failed ? 1 : 0;
}

/* race */
static uint64_t race_gran;
static pthread_barrier_t race_bar;
static _Atomic uint64_t race_block;
static _Atomic bool race_done;

static void *
race_writer (void *arg)
{
  struct nbd_handle *h = connect_uri (live_uri);
  char *buf = malloc (race_gran);
  uint64_t seed = 12345;
  size_t i;

  (void) arg;
  for (;;) {
    pthread_barrier_wait (&race_bar);
    if (race_done)
      break;
    for (i = 0; i < race_gran; i += 8)
      *(uint64_t *) (buf + i) = rnd (&seed);
    usleep (2000);      /* let the reader pass its state check first */
    if (nbd_pwrite (h, buf, race_gran, race_block * race_gran, 0) == -1)
      die_nbd ("race write");
    pthread_barrier_wait (&race_bar);
  }
  nbd_close (h);
  free (buf);
  return NULL;
}

static int
do_race (int argc, char **argv)
{
  struct nbd_handle *h;
  pthread_t w;
  uint64_t iters, i, nblocks, bad = 0;
  char *buf;

  if (argc != 7) return 2;
  live_uri = argv[2]; pit_uri = argv[3];
  ref_fd = open (argv[4], O_RDONLY);
  if (ref_fd == -1) { perror (argv[4]); return 1; }
  iters = strtoull (argv[5], NULL, 0);
  race_gran = strtoull (argv[6], NULL, 0);
  h = connect_uri (pit_uri);
  disk_size = nbd_get_size (h);
  nblocks = disk_size / race_gran;
  if (iters > nblocks) iters = nblocks;
  buf = malloc (race_gran);
  pthread_barrier_init (&race_bar, NULL, 2);
  pthread_create (&w, NULL, race_writer, NULL);
  for (i = 0; i < iters && !failed; ++i) {
    race_block = (i * 7) % nblocks;     /* fresh block each iteration */
    pthread_barrier_wait (&race_bar);
    if (nbd_pread (h, buf, race_gran, race_block * race_gran, 0) == -1)
      die_nbd ("race PIT read");
    else if (!check_ref (buf, race_block * race_gran, race_gran, "race"))
      bad++;
    pthread_barrier_wait (&race_bar);   /* writer finished its write */
  }
  race_done = true;
  pthread_barrier_wait (&race_bar);     /* writer sees race_done, exits */
  pthread_join (w, NULL);
  nbd_close (h);
  free (buf);
  printf ("iterations=%" PRIu64 " wrong=%" PRIu64 "\n", i, bad);
  return bad || failed ? 1 : 0;
}

static int
do_writes (int argc, char **argv)
{
  struct nbd_handle *h;
  uint64_t seed, count, size, i, ok = 0, bad = 0;
  double maxms = 0, limit;
  char *buf;

  if (argc != 6 && argc != 7) return 2;
  h = connect_uri (argv[2]);
  seed = strtoull (argv[3], NULL, 0) | 1;
  count = strtoull (argv[4], NULL, 0);
  size = strtoull (argv[5], NULL, 0);
  limit = argc == 7 ? atof (argv[6]) : 1e12;
  disk_size = nbd_get_size (h);
  buf = malloc (size);
  for (i = 0; i < size; ++i) buf[i] = rnd (&seed);
  for (i = 0; i < count; ++i) {
    uint64_t off = (rnd (&seed) % (disk_size / size)) * size;
    double t0 = now (), ms;
    if (nbd_pwrite (h, buf, size, off, 0) == -1) {
      bad++;
      if (nbd_aio_is_dead (h) || nbd_aio_is_closed (h)) {
        fprintf (stderr, "cbw-io: connection lost: %s\n", nbd_get_error ());
        return 1;
      }
    }
    else
      ok++;
    ms = (now () - t0) * 1000;
    if (ms > maxms) maxms = ms;
  }
  printf ("ok=%" PRIu64 " failed=%" PRIu64 " max_ms=%.0f\n", ok, bad, maxms);
  free (buf);
  nbd_close (h);
  return maxms > limit ? 1 : 0;
}

/* pread URI OFF LEN [REF]: "ok", "differs" (from REF at OFF) or
 * "error errno=N"; pwrite URI OFF LEN SEED: "ok ms=X" or "error errno=N
 * ms=X". */
static int
do_pread (int argc, char **argv)
{
  struct nbd_handle *h;
  uint64_t off, len;
  char *buf;

  if (argc != 5 && argc != 6) return 2;
  h = connect_uri (argv[2]);
  off = strtoull (argv[3], NULL, 0);
  len = strtoull (argv[4], NULL, 0);
  buf = malloc (len);
  if (buf == NULL) { perror ("malloc"); nbd_close (h); return 1; }
  if (nbd_pread (h, buf, len, off, 0) == -1)
    printf ("error errno=%d\n", nbd_get_errno ());
  else if (argc == 6) {
    ref_fd = open (argv[5], O_RDONLY);
    if (ref_fd == -1) { perror (argv[5]); free (buf); nbd_close (h); return 1; }
    printf ("%s\n", check_ref (buf, off, len, "pread") ? "ok" : "differs");
  }
  else
    printf ("ok\n");
  free (buf);
  nbd_close (h);
  return 0;
}

static int
do_pwrite (int argc, char **argv)
{
  struct nbd_handle *h;
  uint64_t off, len, seed, i;
  double t0;
  char *buf;
  int r;

  if (argc != 6) return 2;
  h = connect_uri (argv[2]);
  off = strtoull (argv[3], NULL, 0);
  len = strtoull (argv[4], NULL, 0);
  seed = strtoull (argv[5], NULL, 0) | 1;
  buf = malloc (len);
  if (buf == NULL) { perror ("malloc"); nbd_close (h); return 1; }
  for (i = 0; i < len; ++i) buf[i] = rnd (&seed);
  t0 = now ();
  r = nbd_pwrite (h, buf, len, off, 0);
  if (r == -1)
    printf ("error errno=%d ms=%.0f\n", nbd_get_errno (), (now () - t0) * 1000);
  else
    printf ("ok ms=%.0f\n", (now () - t0) * 1000);
  free (buf);
  nbd_close (h);
  return 0;
}

/* ctl SOCK JSON: one control request; prints the reply line (like the
 * ctl() helper of functions.sh, without a Python start-up per call). */
static int
read_line (int fd, char *buf, size_t max)
{
  size_t n = 0;
  while (n + 1 < max) {
    ssize_t r = read (fd, buf + n, 1);
    if (r <= 0) return -1;
    if (buf[n] == '\n') break;
    n++;
  }
  buf[n] = 0;
  return 0;
}

/* One control request on SOCK; the reply line into line[max].  0 or -1. */
static int
ctl_call (const char *sock, const char *req, char *line, size_t max)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  struct timeval tv = { .tv_sec = 120 };        /* never hang a test */
  int fd, r = -1;

  fd = socket (AF_UNIX, SOCK_STREAM, 0);
  snprintf (sun.sun_path, sizeof sun.sun_path, "%s", sock);
  if (fd == -1 || connect (fd, (struct sockaddr *) &sun, sizeof sun) == -1) {
    perror (sock);
    if (fd >= 0) close (fd);
    return -1;
  }
  setsockopt (fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  if (read_line (fd, line, max) == 0 &&
      write (fd, req, strlen (req)) == (ssize_t) strlen (req) &&
      write (fd, "\n", 1) == 1 && read_line (fd, line, max) == 0)
    r = 0;
  else
    fprintf (stderr, "cbw-io: ctl %s: connection closed\n", sock);
  close (fd);
  return r;
}

static int
do_ctl (int argc, char **argv)
{
  static char line[1 << 20];

  if (argc != 4) return 2;
  if (ctl_call (argv[2], argv[3], line, sizeof line) == -1)
    return 1;
  printf ("%s\n", line);
  return 0;
}

/* begin-race LIVE PIT CTL TARGET-URI GRAN: 4 writers rewrite their own block
 * with increasing sequence numbers while `begin` is sent.  The PIT block
 * must hold one whole write (no tearing) whose number is >= the last one
 * acknowledged before begin was sent and <= the last one issued when begin
 * returned. */
#define BR_N 4
static _Atomic uint64_t br_acked[BR_N], br_issued[BR_N];
static _Atomic bool br_stop;
static uint64_t br_gran;

static void *
br_writer (void *arg)
{
  uintptr_t i = (uintptr_t) arg;
  struct nbd_handle *h = connect_uri (live_uri);
  uint64_t *buf = malloc (br_gran), seq, k;

  for (seq = 1; !br_stop; ++seq) {
    for (k = 0; k < br_gran / 8; ++k) buf[k] = seq;
    br_issued[i] = seq;
    if (nbd_pwrite (h, buf, br_gran, i * 7 * br_gran, 0) == -1) {
      die_nbd ("begin-race write");
      break;
    }
    br_acked[i] = seq;
  }
  nbd_close (h);
  free (buf);
  return NULL;
}

static int
do_begin_race (int argc, char **argv)
{
  static char line[1 << 16];
  char req[1024];
  pthread_t th[BR_N];
  uint64_t lo[BR_N], hi[BR_N], i, k;
  struct nbd_handle *h;
  int bad = 0;

  if (argc != 7) return 2;
  live_uri = argv[2]; pit_uri = argv[3];
  br_gran = strtoull (argv[6], NULL, 0);
  for (i = 0; i < BR_N; ++i)
    pthread_create (&th[i], NULL, br_writer, (void *) (uintptr_t) i);
  for (i = 0; i < BR_N; ++i)
    while (br_acked[i] < 3 && !failed) usleep (1000);
  for (i = 0; i < BR_N; ++i) lo[i] = br_acked[i];
  snprintf (req, sizeof req, "{\"execute\":\"begin\",\"arguments\":"
            "{\"target\":\"%s\"}}", argv[5]);
  if (ctl_call (argv[4], req, line, sizeof line) == -1 ||
      strstr (line, "\"return\"") == NULL) {
    fprintf (stderr, "cbw-io: begin failed: %s\n", line);
    failed = true;
  }
  for (i = 0; i < BR_N; ++i) hi[i] = br_issued[i];
  usleep (200000);                      /* keep writing after the switch */
  br_stop = true;
  for (i = 0; i < BR_N; ++i) pthread_join (th[i], NULL);
  if (failed) return 1;
  h = connect_uri (pit_uri);
  uint64_t *buf = malloc (br_gran);
  for (i = 0; i < BR_N; ++i) {
    if (nbd_pread (h, buf, br_gran, i * 7 * br_gran, 0) == -1) {
      die_nbd ("begin-race PIT read");
      return 1;
    }
    for (k = 1; k < br_gran / 8 && buf[k] == buf[0]; ++k)
      ;
    printf ("block %" PRIu64 ": acked-before=%" PRIu64 " pit=%" PRIu64
            " issued-at-return=%" PRIu64 " last=%" PRIu64 "%s\n", i, lo[i],
            buf[0], hi[i], br_acked[i], k < br_gran / 8 ? " TORN" : "");
    if (k < br_gran / 8 || buf[0] < lo[i] || buf[0] > hi[i])
      bad++;
  }
  nbd_close (h);
  free (buf);
  return bad ? 1 : 0;
}

int
main (int argc, char **argv)
{
  int r = 2;
  if (argc >= 2 && strcmp (argv[1], "stress") == 0) r = do_stress (argc, argv);
  else if (argc >= 2 && strcmp (argv[1], "race") == 0) r = do_race (argc, argv);
  else if (argc >= 2 && strcmp (argv[1], "writes") == 0) r = do_writes (argc, argv);
  else if (argc >= 2 && strcmp (argv[1], "pread") == 0) r = do_pread (argc, argv);
  else if (argc >= 2 && strcmp (argv[1], "pwrite") == 0) r = do_pwrite (argc, argv);
  else if (argc >= 2 && strcmp (argv[1], "ctl") == 0) r = do_ctl (argc, argv);
  else if (argc >= 2 && strcmp (argv[1], "begin-race") == 0) r = do_begin_race (argc, argv);
  if (r == 2)
    fprintf (stderr, "usage: see the comment at the top of cbw-io.c\n");
  return r;
}
