/* cbw — client-tests/dirtybitmap/crashwriter.c: random concurrent writes,
 * zeroes and trims through libnbd, for the dirtybitmap crash tests.
 *
 * Usage: dbm-crashwriter URI LOG SEED MAX_SECONDS [CONTROL_SOCKET]
 * Requests are 1 byte..32 KiB (half 4k-aligned): 70% writes, 20% zeroes,
 * 10% trims, an occasional flush; 90% of them fall into 8 "hot" 1 MiB areas
 * chosen per run, the rest anywhere, and at most ~2 are issued per
 * millisecond, so a run leaves most of the image clean and the check has
 * teeth.  Keeps up to 16 requests in flight until the server goes away (the test kills it
 * with SIGKILL) or MAX_SECONDS pass.  Before each request is handed to
 * libnbd, one line "S SEQ W|Z|T|F OFFSET LENGTH" is written to LOG with
 * write(2) (log-then-send: the kernel has the line before any byte of the
 * request leaves this process, and only nbdkit is killed), so every request
 * the server may have seen is in the log.  When the server acknowledges a
 * request successfully, "A SEQ" follows.  Exits 0 when the server
 * disappeared or time ran out, 1 on setup errors.  Single-threaded (libnbd
 * aio), plus, if CONTROL_SOCKET is given, one thread that sends the
 * filter's "checkpoint" command every 20 ms over one control connection (so
 * fine checkpoints race with the writes) until that connection fails.
 *
 * DBM_CW_PROFILE=large switches to the workload of the crash-tightness test
 * (a guest doing random writes): writes only, 512 B..1 MiB (multiples of
 * 512), uniformly anywhere in the image (512-aligned), at most 8 in flight,
 * no flushes.  The log is the same.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libnbd.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cbw_err.h"
#include "control.h"

#define QD 16
#define MAXLEN (32 * 1024)
#define LARGE_QD 8
#define LARGE_MAXLEN (1024 * 1024)
#define NHOT 8
#define HOT (1024 * 1024)

static double
now (void)
{
  struct timespec ts;
  clock_gettime (CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *
checkpointer (void *arg)
{
  struct cbw_err err = { 0 };
  struct cbw_ctl_client *c = cbw_ctl_client_connect (arg, &err);

  if (c == NULL)
    return NULL;
  for (;;) {
    struct json_object *ret = NULL;
    if (cbw_ctl_client_execute (c, "checkpoint", NULL, &ret, NULL, &err) < 0)
      break;                       /* server killed: done */
    json_object_put (ret);
    usleep (20000);
  }
  cbw_ctl_client_close (c);
  return NULL;
}

int
main (int argc, char **argv)
{
  struct nbd_handle *nbd;
  int64_t size, sent = 0;
  unsigned seed;
  double deadline;
  static char buf[LARGE_MAXLEN];
  const char *profile = getenv ("DBM_CW_PROFILE");
  int large = profile && strcmp (profile, "large") == 0;
  int qd = large ? LARGE_QD : QD;
  int log, can_trim, can_zero;

  pthread_t ckpt;

  if (argc != 5 && argc != 6) {
    fprintf (stderr, "usage: %s URI LOG SEED MAX_SECONDS [CONTROL_SOCKET]\n", argv[0]);
    return 1;
  }
  seed = (unsigned) strtoul (argv[3], NULL, 10);
  deadline = now () + atof (argv[4]);
  log = open (argv[2], O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0644);
  if (log < 0) { perror (argv[2]); return 1; }
  nbd = nbd_create ();
  if (nbd == NULL || nbd_connect_uri (nbd, argv[1]) == -1) {
    fprintf (stderr, "%s\n", nbd_get_error ());
    return 1;
  }
  size = nbd_get_size (nbd);
  can_trim = nbd_can_trim (nbd) == 1;
  can_zero = nbd_can_zero (nbd) == 1;
  if (size < (large ? LARGE_MAXLEN : MAXLEN) * 2) {
    fprintf (stderr, "export too small\n");
    return 1;
  }
  memset (buf, 0xa5, sizeof buf);
  if (argc == 6 && pthread_create (&ckpt, NULL, checkpointer, argv[5]) != 0) {
    fprintf (stderr, "pthread_create failed\n");
    return 1;
  }
  int64_t hot[NHOT];
  for (int i = 0; i < NHOT; ++i)
    hot[i] = (int64_t) ((uint64_t) rand_r (&seed) % (uint64_t) (size / HOT)) * HOT;

  struct { int64_t cookie, seq; } inflight[QD * 2];
  memset (inflight, 0, sizeof inflight);

  while (now () < deadline) {
    int issued = 0;
    while (nbd_aio_in_flight (nbd) < qd && issued++ < 2) {
      char line[96];
      int64_t r, len = 1 + rand_r (&seed) % MAXLEN;
      int64_t off = (int64_t) (((uint64_t) rand_r (&seed) << 31 ^ (uint64_t) rand_r (&seed))
                               % (uint64_t) (size - len));
      int kind = rand_r (&seed) % 10;
      if (rand_r (&seed) % 10 != 0)    /* hot area; may run past it */
        off = hot[rand_r (&seed) % NHOT] + rand_r (&seed) % HOT;
      if (off + len > size)
        off = size - len;
      char k = kind < 7 ? 'W' : kind < 9 ? 'Z' : 'T';
      if (rand_r (&seed) % 64 == 0)    /* an occasional flush: kicks a checkpoint */
        { k = 'F'; off = 0; len = 0; }

      if (rand_r (&seed) % 2)          /* half the requests 4k-aligned */
        { off &= ~4095LL; len = (len + 4095) & ~4095LL;
          if (off + len > size) off = (size - len) & ~4095LL; }
      if (large) {
        len = 512 * (1 + rand_r (&seed) % (LARGE_MAXLEN / 512));
        off = (int64_t) (((uint64_t) rand_r (&seed) << 31 ^ (uint64_t) rand_r (&seed))
                         % (uint64_t) ((size - len) / 512 + 1)) * 512;
        k = 'W';
      }
      if (k == 'Z' && !can_zero) k = 'W';
      if (k == 'T' && !can_trim) k = 'W';
      int n = snprintf (line, sizeof line, "S %" PRIi64 " %c %" PRIi64 " %" PRIi64 "\n",
                        sent, k, off, len);
      if (write (log, line, (size_t) n) != n) { perror ("log"); return 1; }
      if (k == 'W')
        r = nbd_aio_pwrite (nbd, buf, (size_t) len, (uint64_t) off, NBD_NULL_COMPLETION, 0);
      else if (k == 'Z')
        r = nbd_aio_zero (nbd, (uint64_t) len, (uint64_t) off, NBD_NULL_COMPLETION, 0);
      else if (k == 'F')
        r = nbd_aio_flush (nbd, NBD_NULL_COMPLETION, 0);
      else
        r = nbd_aio_trim (nbd, (uint64_t) len, (uint64_t) off, NBD_NULL_COMPLETION, 0);
      if (r == -1)
        goto gone;
      for (int i = 0; i < QD * 2; ++i)
        if (inflight[i].cookie == 0) { inflight[i].cookie = r; inflight[i].seq = sent; break; }
      sent++;
    }
    if (nbd_poll (nbd, 1) == -1)
      goto gone;
    usleep (700);
    /* reap completed commands; a failed command means the server is gone */
    for (;;) {
      int64_t c = nbd_aio_peek_command_completed (nbd);
      if (c <= 0) break;
      if (nbd_aio_command_completed (nbd, (uint64_t) c) == -1)
        goto gone;
      for (int i = 0; i < QD * 2; ++i)
        if (inflight[i].cookie == c) {
          char line[48];
          int n = snprintf (line, sizeof line, "A %" PRIi64 "\n", inflight[i].seq);
          if (write (log, line, (size_t) n) != n) { perror ("log"); return 1; }
          inflight[i].cookie = 0;
          break;
        }
    }
  }
  printf ("%" PRIi64 " requests sent, deadline reached\n", sent);
  nbd_shutdown (nbd, 0);
  nbd_close (nbd);
  fflush (stdout);
  _exit (0);                       /* the checkpoint thread may still run */

 gone:
  printf ("%" PRIi64 " requests sent, server gone: %s\n", sent, nbd_get_error ());
  nbd_close (nbd);
  fflush (stdout);
  _exit (0);
}
