/* cbw — server/tests/test_tx_order.c: the reply path of cbwd under socket
 * back-pressure (conn.c: workers send replies with a non-blocking sendmsg;
 * when the socket is full the unsent tail goes to the loop and every later
 * reply queues behind it).  A raw-socket client pipelines many writes and
 * large reads of random sizes, does not read for a while (the socket fills,
 * sends become partial), then reads everything: every reply must be whole,
 * with a cookie it sent exactly once, and read data must equal a model of
 * the export kept by the test.  Run on the memory export (worker path) and
 * on a store file (page-cache reads replied on the loop, writes on workers,
 * interleaved on the same stream).  Also: a client that vanishes with
 * replies stuck in its socket must not disturb the server.  And: a Unix
 * socket client that does not read gets several large replies queued in
 * its socket at once (cbwd enlarges the send buffer of Unix-socket
 * connections, so replies leave with one direct send).
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "nbd_proto.h"
#include "server.h"
#include "wire.h"

#define EXPORT_SIZE (64u << 20)
#define MAXLEN (1u << 20)

static struct cbwd_server srv;
static uv_async_t stopper;
static char dir[] = "/tmp/cbwd-txorder.XXXXXX";
static char sock[256];
static pthread_t loop_t;

static void stop_cb (uv_async_t *a) { cbwd_server_stop (&srv); uv_close ((uv_handle_t *) a, NULL); }
static void *loop_thread (void *arg) { (void) arg; uv_run (srv.loop, UV_RUN_DEFAULT); return NULL; }

static void
start_server (void)
{
  struct cbw_err err = { 0 };
  signal (SIGPIPE, SIG_IGN);
  cr_assert (mkdtemp (dir));
  memset (&srv, 0, sizeof srv);
  srv.loop = malloc (sizeof *srv.loop);
  uv_loop_init (srv.loop);
  /* 8 in flight, 4 MiB held: the limits are reached too. */
  srv.limits = (struct cbwd_limits) { .max_connections = 64, .max_inflight = 8,
                                      .max_inflight_bytes = 4 << 20 };
  srv.threads = 4;
  struct cbwd_export *m = cbwd_export_memory_new ("mem", EXPORT_SIZE, false, &err);
  cr_assert (m && cbwd_add_export (&srv, m, &err) == 0, "%s", err.msg);
  char path[300];
  snprintf (path, sizeof path, "%s/store.img", dir);
  struct cbwd_store_opts o = { .path = path, .size = EXPORT_SIZE, .create = true };
  struct cbwd_export *s = cbwd_export_file_new ("store", &o, &err);
  cr_assert (s && cbwd_add_export (&srv, s, &err) == 0, "%s", err.msg);
  snprintf (sock, sizeof sock, "%s/s.sock", dir);
  char spec[300];
  snprintf (spec, sizeof spec, "unix:%s", sock);
  cr_assert_eq (cbwd_listen (&srv, spec), 0);
  cr_assert_eq (cbwd_admin_init (&srv), 0);
  uv_async_init (srv.loop, &stopper, stop_cb);
  pthread_create (&loop_t, NULL, loop_thread, NULL);
}

static void
stop_server (void)
{
  uv_async_send (&stopper);
  pthread_join (loop_t, NULL);
  cbwd_server_cleanup (&srv);
  for (size_t i = 0; i < srv.exports.n; i++) cbwd_export_unref (srv.exports.v[i]);
  free (srv.exports.v);
  free (srv.first_listen);
  cr_assert_eq (uv_loop_close (srv.loop), 0);
  free (srv.loop);
  char path[300];
  snprintf (path, sizeof path, "%s/store.img", dir);
  unlink (path);
  rmdir (dir);
}

static void
full_write (int fd, const void *p, size_t n)
{
  const uint8_t *b = p;
  while (n) {
    ssize_t r = write (fd, b, n);
    if (r < 0 && errno == EINTR) continue;
    cr_assert (r > 0, "write: %s", strerror (errno));
    b += r; n -= (size_t) r;
  }
}

static void
full_read (int fd, void *p, size_t n)
{
  uint8_t *b = p;
  while (n) {
    ssize_t r = read (fd, b, n);
    if (r < 0 && errno == EINTR) continue;
    cr_assert (r > 0, "read: %s (short reply stream)", r < 0 ? strerror (errno) : "EOF");
    b += r; n -= (size_t) r;
  }
}

/* Fixed newstyle + EXPORT_NAME; returns the connected fd. */
static int
connect_export (const char *name)
{
  int fd = socket (AF_UNIX, SOCK_STREAM, 0);
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  strcpy (sa.sun_path, sock);
  cr_assert_eq (connect (fd, (struct sockaddr *) &sa, sizeof sa), 0);
  uint8_t g[18];
  full_read (fd, g, sizeof g);
  cr_assert_eq (get_be64 (g), NBD_MAGIC);
  cr_assert_eq (get_be64 (g + 8), NBD_IHAVEOPT);
  uint8_t cf[4];
  put_be32 (cf, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
  full_write (fd, cf, 4);
  uint8_t opt[16];
  put_be64 (opt, NBD_IHAVEOPT);
  put_be32 (opt + 8, NBD_OPT_EXPORT_NAME);
  put_be32 (opt + 12, (uint32_t) strlen (name));
  full_write (fd, opt, 16);
  full_write (fd, name, strlen (name));
  uint8_t rep[10];
  full_read (fd, rep, sizeof rep);
  cr_assert_eq (get_be64 (rep), EXPORT_SIZE);
  return fd;
}

static void
request (int fd, uint16_t type, uint64_t cookie, uint64_t off, uint32_t len)
{
  uint8_t h[28];
  put_be32 (h, NBD_REQUEST_MAGIC);
  put_be16 (h + 4, 0);
  put_be16 (h + 6, type);
  put_be64 (h + 8, cookie);
  put_be64 (h + 16, off);
  put_be32 (h + 24, len);
  full_write (fd, h, 28);
}

struct op { uint64_t off; uint32_t len; bool read, seen; };

static void
fill (uint8_t *p, size_t n, unsigned *seed)
{
  for (size_t i = 0; i < n; i++) p[i] = (uint8_t) rand_r (seed);
}

/* Rounds of: N non-overlapping writes pipelined, all replies read; then N
 * reads pipelined, a pause (socket fills), all replies read and checked. */
static void
exercise (const char *name, unsigned seed, int rounds, int n)
{
  uint8_t *model = calloc (1, EXPORT_SIZE), *buf = malloc (MAXLEN);
  cr_assert (model && buf);
  int fd = connect_export (name);
  struct op *ops = calloc (n, sizeof *ops);
  uint64_t cookie0 = 1000;
  for (int round = 0; round < rounds; round++) {
    /* Writes: region i of EXPORT_SIZE/n, random sub-range (non-overlapping). */
    uint64_t slot = EXPORT_SIZE / (uint64_t) n;
    for (int i = 0; i < n; i++) {
      uint32_t len = 1 + rand_r (&seed) % (slot < MAXLEN ? slot : MAXLEN);
      if (rand_r (&seed) % 2) len = 4096;
      uint64_t off = (uint64_t) i * slot + rand_r (&seed) % (slot - len + 1);
      ops[i] = (struct op) { off, len, false, false };
      fill (model + off, len, &seed);
      request (fd, NBD_CMD_WRITE, cookie0 + i, off, len);
      full_write (fd, model + off, len);
    }
    for (int i = 0; i < n; i++) {
      uint8_t r[16];
      full_read (fd, r, 16);
      cr_assert_eq (get_be32 (r), NBD_SIMPLE_REPLY_MAGIC, "%s round %d: bad reply magic", name, round);
      cr_assert_eq (get_be32 (r + 4), 0, "write failed");
      uint64_t k = get_be64 (r + 8) - cookie0;
      cr_assert (k < (uint64_t) n && !ops[k].seen && !ops[k].read, "unexpected cookie");
      ops[k].seen = true;
    }
    cookie0 += n;
    /* Reads, anywhere (overlaps are fine: nothing writes now). */
    for (int i = 0; i < n; i++) {
      uint32_t len = 1 + rand_r (&seed) % MAXLEN;
      uint64_t off = rand_r (&seed) % (EXPORT_SIZE - len + 1);
      ops[i] = (struct op) { off, len, true, false };
      request (fd, NBD_CMD_READ, cookie0 + i, off, len);
    }
    struct timespec ts = { 0, 150 * 1000 * 1000 };
    nanosleep (&ts, NULL);
    for (int i = 0; i < n; i++) {
      uint8_t r[16];
      full_read (fd, r, 16);
      cr_assert_eq (get_be32 (r), NBD_SIMPLE_REPLY_MAGIC, "%s round %d reply %d: bad magic (replies interleaved?)",
                    name, round, i);
      cr_assert_eq (get_be32 (r + 4), 0, "read failed");
      uint64_t k = get_be64 (r + 8) - cookie0;
      cr_assert (k < (uint64_t) n && !ops[k].seen, "unexpected or repeated cookie");
      ops[k].seen = true;
      full_read (fd, buf, ops[k].len);
      cr_assert (memcmp (buf, model + ops[k].off, ops[k].len) == 0,
                 "%s round %d: read %llu+%u differs from the model", name, round,
                 (unsigned long long) ops[k].off, ops[k].len);
    }
    cookie0 += n;
  }
  request (fd, NBD_CMD_DISC, 0, 0, 0);
  close (fd);
  free (ops);
  free (model);
  free (buf);
}

Test (tx_order, memory_and_store_under_backpressure, .timeout = 60)
{
  start_server ();
  exercise ("mem", 1, 3, 48);
  exercise ("store", 2, 3, 48);
  stop_server ();
}

Test (tx_order, client_vanishes_with_replies_queued, .timeout = 60)
{
  start_server ();
  for (int k = 0; k < 4; k++) {
    int fd = connect_export (k % 2 ? "store" : "mem");
    for (int i = 0; i < 32; i++)
      request (fd, NBD_CMD_READ, i, (uint64_t) i * MAXLEN, MAXLEN);
    struct timespec ts = { 0, 50 * 1000 * 1000 };
    nanosleep (&ts, NULL);
    close (fd);                   /* replies stuck in the socket */
  }
  /* The server still serves, and correctly. */
  exercise ("mem", 3, 1, 16);
  stop_server ();
}

/* Six 256 KiB reads pipelined, nothing read back: all six replies must
 * reach the client's socket (the default Unix send buffer, ~200 KiB, holds
 * less than one).  Needs root (SO_SNDBUFFORCE) or net.core.wmem_max >=
 * 2 MiB (the kernel clamps SO_SNDBUF to it). */
Test (tx_order, unix_replies_fill_a_large_send_buffer, .timeout = 60)
{
  FILE *f = fopen ("/proc/sys/net/core/wmem_max", "r");
  long wmax = 0;
  if (f) { if (fscanf (f, "%ld", &wmax) != 1) wmax = 0; fclose (f); }
  if (wmax < CBWD_UNIX_SNDBUF && geteuid () != 0)
    cr_skip_test ("net.core.wmem_max %ld < %d and not root: SO_SNDBUF would be clamped",
                  wmax, CBWD_UNIX_SNDBUF);
  start_server ();
  int fd = connect_export ("store");
  const int n = 6;
  const uint32_t len = 256 * 1024;
  for (int i = 0; i < n; i++)
    request (fd, NBD_CMD_READ, 500 + i, (uint64_t) i * len, len);
  int want = n * (int) (16 + len), have = 0;
  /* Poll the queued byte count until it is all there (or the deadline). */
  struct timespec t0, now, ts = { 0, 5 * 1000 * 1000 };
  clock_gettime (CLOCK_MONOTONIC, &t0);
  for (;;) {
    cr_assert_eq (ioctl (fd, FIONREAD, &have), 0);
    clock_gettime (CLOCK_MONOTONIC, &now);
    if (have >= want || now.tv_sec - t0.tv_sec > 10) break;
    nanosleep (&ts, NULL);
  }
  cr_assert_geq (have, want, "only %d of %d reply bytes reached the socket: "
                 "the server's send buffer is too small", have, want);
  uint8_t *buf = malloc (len);
  for (int i = 0; i < n; i++) {
    uint8_t r[16];
    full_read (fd, r, 16);
    cr_assert_eq (get_be32 (r), NBD_SIMPLE_REPLY_MAGIC);
    cr_assert_eq (get_be32 (r + 4), 0);
    full_read (fd, buf, len);
  }
  free (buf);
  request (fd, NBD_CMD_DISC, 0, 0, 0);
  close (fd);
  stop_server ();
}
