/* cbw — plugin/cbw/tests/test_session.c: unit tests of the copy-before-write
 * core (session.c, gate.c, target.c) without nbdkit, so that the sanitizer
 * build instruments the whole concurrent path.  The live disk is a memory
 * buffer behind a hand-made nbdkit_next; the target is a real
 * `nbdkit memory` on a Unix socket started by the test.  Expectations come
 * from a copy of the disk taken at begin.
 *
 * Locking: guest writer threads write the fake disk under disk_lock only for
 * the memcpy (like the plugin below would); the session does its own.
 */
#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "bufcache.h"
#include "nbdkit_test_util.h"
#include "gate.h"
#include "session.h"
#include "target.h"
#include "target_file.h"

extern char **environ;

/* ---- nbdkit stubs (session.c uses only these) ---- */
void nbdkit_error (const char *fs, ...)
{
  va_list ap; va_start (ap, fs); vfprintf (stderr, fs, ap); va_end (ap);
  fputc ('\n', stderr);
}
void nbdkit_debug (const char *fs, ...) { (void) fs; }
struct nbdkit_extents *nbdkit_extents_new (uint64_t a, uint64_t b)
{ (void) a; (void) b; errno = ENOTSUP; return NULL; }
void nbdkit_extents_free (struct nbdkit_extents *e) { (void) e; }
size_t nbdkit_extents_count (const struct nbdkit_extents *e) { (void) e; return 0; }
struct nbdkit_extent nbdkit_get_extent (const struct nbdkit_extents *e, size_t i)
{ (void) e; (void) i; struct nbdkit_extent x = { 0 }; return x; }
int nbdkit_add_extent (struct nbdkit_extents *e, uint64_t o, uint64_t l, uint32_t t)
{ (void) e; (void) o; (void) l; (void) t; return 0; }

/* ---- the fake live disk ---- */
#define SIZE (8 * 1024 * 1024 + 4096 * 3)
static char *disk, *ref;
static pthread_mutex_t disk_lock = PTHREAD_MUTEX_INITIALIZER;
/* >= 0: a raw image file kept equal to `disk` (guest writes go to both),
 * the cbw-source of the in-kernel copy tests */
static int disk_fd = -1;

static int
fake_pread (nbdkit_next *n, void *buf, uint32_t count, uint64_t off,
            uint32_t flags, int *err)
{
  (void) n; (void) flags; (void) err;
  pthread_mutex_lock (&disk_lock);
  memcpy (buf, disk + off, count);
  pthread_mutex_unlock (&disk_lock);
  return 0;
}
static int fake_can_extents (nbdkit_next *n) { (void) n; return 0; }
static struct nbdkit_next_ops next_ops = {
  .pread = fake_pread, .can_extents = fake_can_extents,
};
static nbdkit_next *next = &next_ops;

/* ---- the target: nbdkit memory ---- */
static pid_t tpid;
static char tdir[64], turi[160];

static void
start_target (void)
{
  char sock[128];

  strcpy (tdir, "/tmp/cbw-ut.XXXXXX");
  cr_assert_not_null (mkdtemp (tdir));
  snprintf (sock, sizeof sock, "%s/t.sock", tdir);
  snprintf (turi, sizeof turi, "nbd+unix:///?socket=%s", sock);
  tpid = test_start_nbdkit_memory (sock, SIZE);
}

static void
stop_target (void)
{
  char cmd[128];
  if (tpid > 0) {
    kill (tpid, SIGCONT);
    kill (tpid, SIGTERM);
    waitpid (tpid, NULL, 0);
    tpid = 0;
  }
  snprintf (cmd, sizeof cmd, "rm -rf %s", tdir);
  if (system (cmd)) {}
}

/* SIGSTOP the target and wait until every one of its threads is stopped:
 * kill() only queues the stop, and on a loaded machine a target thread
 * could still answer one more request (seen once in CI: a write that had to
 * time out succeeded). */
static void
stop_target_hard (void)
{
  char path[64], st[512];
  int i;

  cr_assert_eq (kill (tpid, SIGSTOP), 0);
  snprintf (path, sizeof path, "/proc/%d/task", (int) tpid);
  for (i = 0; i < 500; ++i) {
    DIR *d = opendir (path);
    struct dirent *e;
    bool all = true;
    cr_assert_not_null (d);
    while ((e = readdir (d)) != NULL) {
      char f[64 + 256 + 8];
      FILE *fp;
      if (e->d_name[0] == '.')
        continue;
      snprintf (f, sizeof f, "%s/%s/stat", path, e->d_name);
      fp = fopen (f, "r");
      if (fp == NULL)
        continue;                 /* thread gone */
      if (fgets (st, sizeof st, fp)) {
        char *rp = strrchr (st, ')');
        if (rp == NULL || rp[1] != ' ' || rp[2] != 'T')
          all = false;
      }
      fclose (fp);
    }
    closedir (d);
    if (all)
      return;
    usleep (2000);
  }
  cr_assert_fail ("target nbdkit did not stop");
}

static uint64_t
rnd (uint64_t *s)
{
  *s ^= *s >> 12; *s ^= *s << 25; *s ^= *s >> 27;
  return *s * 2685821657736338717ULL;
}

static void
setup (void)
{
  uint64_t s = 42, i;
  disk = malloc (SIZE);
  ref = malloc (SIZE);
  for (i = 0; i + 8 <= SIZE; i += 8) *(uint64_t *) (disk + i) = rnd (&s);
  memset (disk + SIZE / 2, 0, 1 << 20);          /* some zeros */
  memcpy (ref, disk, SIZE);
  start_target ();
}

static void
teardown (void)
{
  if (disk_fd >= 0)
    close (disk_fd);
  disk_fd = -1;
  cbw_file_target_test_hooks (NULL, NULL);
  stop_target ();
  free (disk);
  free (ref);
}

/* A session on the whole disk with `workers` write-back workers over
 * `conns` target connections. */
static struct cbw_session *
new_session_w (enum cbw_policy pol, uint64_t buffer, uint32_t gran, double tmo,
               unsigned workers, size_t conns)
{
  struct cbw_err err = { 0 };
  struct cbw_session_params p = {
    .size = SIZE, .granularity = gran, .policy = pol,
    .timeout_ns = (int64_t) (tmo * 1e9), .buffer_bytes = buffer,
    .workers = workers,
  };
  struct cbw_target *t = cbw_target_open (turi, conns,
                                          cbw_now_ns () + 10000000000LL, &err);
  cr_assert_not_null (t, "%s", err.msg);
  struct cbw_session *s = cbw_session_new (&p, t, &err);
  cr_assert_not_null (s, "%s", err.msg);
  cbw_session_mark_all_needed (s);
  return s;
}

static struct cbw_session *
new_session (enum cbw_policy pol, uint64_t buffer, uint32_t gran, double tmo)
{
  return new_session_w (pol, buffer, gran, tmo, 4, 4);
}

/* A guest write through the session, like cbw.c's guest_write(). */
static int
guest_write (struct cbw_session *s, uint64_t off, uint64_t len, uint64_t *seed)
{
  int err = 0;
  uint64_t i;
  char *buf = malloc (len);
  for (i = 0; i < len; ++i) buf[i] = rnd (seed);
  cbw_gate_enter ();
  int r = cbw_session_before_write (s, next, off, len, &err);
  if (r == 0) {
    pthread_mutex_lock (&disk_lock);
    memcpy (disk + off, buf, len);
    if (disk_fd >= 0 && pwrite (disk_fd, buf, len, (off_t) off) != (ssize_t) len)
      r = -1;
    pthread_mutex_unlock (&disk_lock);
  }
  cbw_gate_leave ();
  free (buf);
  return r;
}

struct targ { struct cbw_session *s; uint64_t seed; atomic_bool *stop; int bad; };

static void *
writer (void *a)
{
  struct targ *t = a;
  while (!atomic_load (t->stop)) {
    uint64_t len = (rnd (&t->seed) % 64 + 1) * 512;
    uint64_t off = rnd (&t->seed) % (SIZE - len);
    if (guest_write (t->s, off, len, &t->seed) != 0) t->bad++;
  }
  return NULL;
}

static void *
reader (void *a)
{
  struct targ *t = a;
  char *buf = malloc (256 * 1024);
  while (!atomic_load (t->stop)) {
    uint64_t len = rnd (&t->seed) % (256 * 1024) + 1;
    uint64_t off = rnd (&t->seed) % (SIZE - len);
    int err = 0;
    if (cbw_session_pit_read (t->s, next, buf, len, off, &err) != 0 ||
        memcmp (buf, ref + off, len) != 0)
      t->bad++;
  }
  free (buf);
  return NULL;
}

static void
hammer (struct cbw_session *s, double secs)
{
  atomic_bool stop = false;
  pthread_t th[6];
  struct targ a[6];
  int i;
  for (i = 0; i < 6; ++i) {
    a[i] = (struct targ) { s, 1000 + i, &stop, 0 };
    pthread_create (&th[i], NULL, i < 4 ? writer : reader, &a[i]);
  }
  usleep ((useconds_t) (secs * 1e6));
  atomic_store (&stop, true);
  for (i = 0; i < 6; ++i) {
    pthread_join (th[i], NULL);
    cr_expect_eq (a[i].bad, 0, "%s thread %d: %d bad operations",
                  i < 4 ? "writer" : "reader", i, a[i].bad);
  }
}

static void
check_full_pit (struct cbw_session *s)
{
  char *buf = malloc (SIZE);
  int err = 0;
  uint64_t o;
  for (o = 0; o < SIZE; o += 1 << 20) {
    uint32_t n = SIZE - o < (1 << 20) ? SIZE - o : (1 << 20);
    cr_assert_eq (cbw_session_pit_read (s, next, buf + o, n, o, &err), 0);
  }
  cr_assert (memcmp (buf, ref, SIZE) == 0, "PIT view differs from begin");
  free (buf);
}

TestSuite (session, .init = setup, .fini = teardown, .timeout = 120);

Test (session, concurrent_sync_copies)
{
  struct cbw_session *s = new_session (CBW_BREAK_SNAPSHOT, 0, 4096, 10);
  struct cbw_session_stats st;
  hammer (s, 1.5);
  check_full_pit (s);
  cbw_session_stats (s, &st);
  cr_expect_gt (st.copied_blocks, 0);
  cr_expect_eq (st.errors, 0);
  cr_expect_leq (st.copied_blocks, st.needed_blocks);
  cbw_session_end (s);
  cbw_session_put (s);
}

Test (session, concurrent_buffered_copies)
{
  struct cbw_session *s = new_session (CBW_BREAK_SNAPSHOT, 1 << 20, 512, 10);
  struct cbw_session_stats st;
  hammer (s, 1.5);
  check_full_pit (s);
  cbw_session_stats (s, &st);
  cr_expect_eq (st.errors, 0);
  cbw_session_end (s);
  cbw_session_put (s);
}

/* Big buffered copies (1 MiB guest writes, 64 KiB blocks): one worker
 * pipelines whole 1 MiB entries, split into data and write-zeroes pieces
 * (the disk has 1 MiB of zeros at SIZE/2; one write straddles its start).
 * The PIT view must be exact and the byte counters must add up. */
Test (session, buffered_big_copies)
{
  struct cbw_session *s = new_session_w (CBW_BREAK_SNAPSHOT, 8 << 20, 65536,
                                         10, 1, 2);
  struct cbw_session_stats st;
  uint64_t seed = 7, o, z = SIZE / 2, copied;
  int i;

  cr_assert_eq (guest_write (s, z - 512 * 1024, 1 << 20, &seed), 0);
  for (o = 0; o + (1 << 20) <= SIZE; o += 1 << 20)
    cr_assert_eq (guest_write (s, o, 1 << 20, &seed), 0);
  cr_assert_eq (guest_write (s, SIZE - 4096, 4096, &seed), 0);
  for (i = 0; i < 1000; ++i) {
    cbw_session_stats (s, &st);
    if (st.buffered_blocks == 0 && st.in_flight == 0) break;
    usleep (10000);
  }
  cr_assert_eq (st.buffered_blocks, 0, "copies did not drain");
  cr_assert_eq (st.copy_workers, 1);
  check_full_pit (s);
  cr_expect_eq (st.errors, 0);
  cr_expect_eq (st.copied_blocks, st.blocks);
  copied = st.copied_bytes + st.zero_bytes;
  cr_expect_eq (copied, SIZE, "copied %" PRIu64 " + zero %" PRIu64 " bytes, "
                "disk %d", st.copied_bytes, st.zero_bytes, SIZE);
  /* Every 64 KiB block that was all zero at begin went as write-zeroes. */
  uint64_t want_zero = 0;
  for (o = 0; o < SIZE; o += 65536) {
    uint64_t n = SIZE - o < 65536 ? SIZE - o : 65536, k;
    for (k = 0; k < n && ref[o + k] == 0; ++k) ;
    if (k == n) want_zero += n;
  }
  cr_assert_gt (want_zero, 0);
  cr_expect_eq (st.zero_bytes, want_zero, "zero bytes %" PRIu64 ", want %"
                PRIu64, st.zero_bytes, want_zero);
  cbw_session_end (s);
  cbw_session_put (s);
}

/* Copy buffers come from the process's buffer cache and go back to it:
 * bytes in use return to where they were after each session, and later
 * sessions of the same 1 MiB copies reuse the buffers of the first one.
 * With a 2 MiB write-back buffer and one guest writer, at most 2 buffered
 * copies plus the one being read are in use at once, so however many copies
 * run, a cache that reuses maps at most a few buffers (without reuse: one
 * per copy).  The 64 KiB pass first fills the cache with 64 KiB buffers,
 * which the 1 MiB copies must evict instead of mapping every time. */
#define REUSE_BUFFER (2 << 20)
#define REUSE_MAX_MAPS 4                        /* concurrency bound, + 1 */
static void
one_pass (uint64_t wlen, uint64_t *seed)
{
  struct cbw_session *s = new_session_w (CBW_BREAK_SNAPSHOT, REUSE_BUFFER,
                                         65536, 10, 1, 2);
  for (uint64_t o = 0; o + wlen <= SIZE; o += wlen)
    cr_assert_eq (guest_write (s, o, wlen, seed), 0);
  cbw_session_end (s);
  cbw_session_put (s);                          /* joins the worker */
}

Test (session, copy_buffers_reused)
{
  struct cbw_bufcache_stats b0, b1, b2, b3;
  uint64_t seed = 11;
  int i, copies = 4 * (SIZE >> 20);

  cbw_bufcache_stats (&b0);
  one_pass (65536, &seed);                      /* 64 KiB copies */
  cbw_bufcache_stats (&b1);
  one_pass (1 << 20, &seed);                    /* 1 MiB copies */
  cbw_bufcache_stats (&b2);
  for (i = 0; i < 4; ++i)
    one_pass (1 << 20, &seed);
  cbw_bufcache_stats (&b3);
  cr_assert_eq (b1.in_use, b0.in_use, "64 KiB pass left %" PRIu64 " bytes in use",
                b1.in_use - b0.in_use);
  cr_assert_eq (b2.in_use, b0.in_use);
  cr_assert_eq (b3.in_use, b0.in_use);
  cr_assert_gt (b1.maps, b0.maps, "copy buffers do not come from the cache");
  if (b0.plain)                                 /* ASan: exact mallocs, no reuse */
    return;
  cr_assert_gt (b2.maps, b1.maps, "1 MiB copies need 1 MiB buffers");
  cr_assert_leq (b2.maps - b1.maps, REUSE_MAX_MAPS, "%" PRIu64 " buffers mapped "
                 "for %d 1 MiB copies", b2.maps - b1.maps, SIZE >> 20);
  cr_assert_leq (b3.maps - b2.maps, REUSE_MAX_MAPS, "%" PRIu64 " buffers mapped "
                 "for %d more 1 MiB copies: not reused", b3.maps - b2.maps, copies);
  cr_assert_leq (b3.cached, b3.peak - b3.in_use);
}

Test (session, skip_releases)
{
  struct cbw_session *s = new_session (CBW_BREAK_SNAPSHOT, 0, 65536, 10);
  struct cbw_err e = { 0 };
  uint64_t rel = 0, seed = 7;
  char buf[4096];
  int err = 0;
  cr_assert_eq (cbw_session_skip (s, SIZE, 1, &rel, &e), -1);
  cr_assert_eq (e.errnum, EINVAL);
  cr_assert_eq (cbw_session_skip (s, 100, 65536 * 3, &rel, &e), 0);
  cr_assert_eq (rel, 2);                        /* whole blocks 1 and 2 */
  cr_assert_eq (cbw_session_pit_read (s, next, buf, 4096, 65536, &err), -1);
  cr_assert_eq (err, EIO);
  cr_assert_eq (cbw_session_pit_read (s, next, buf, 4096, 0, &err), 0);
  cr_assert (memcmp (buf, ref, 4096) == 0);
  cr_assert_eq (guest_write (s, 65536, 4096, &seed), 0);
  struct cbw_session_stats st;
  cbw_session_stats (s, &st);
  cr_assert_eq (st.copied_blocks, 0);           /* released: no copy */
  cbw_session_end (s);
  cr_assert_eq (cbw_session_pit_read (s, next, buf, 4096, 0, &err), -1);
  cbw_session_put (s);
}

Test (session, dead_target_policies)
{
  uint64_t seed = 9;
  char buf[4096];
  int err = 0;
  struct cbw_session *bgw = new_session (CBW_BREAK_GUEST_WRITE, 0, 4096, 0.5);
  struct cbw_session *bs = new_session (CBW_BREAK_SNAPSHOT, 1 << 20, 4096, 0.5);
  stop_target_hard ();                          /* hung target */
  int64_t t0 = cbw_now_ns ();
  cr_assert_eq (guest_write (bgw, 0, 4096, &seed), -1);
  cr_assert_lt (cbw_now_ns () - t0, 3000000000LL, "guest write not bounded");
  cr_assert (memcmp (disk, ref, 4096) == 0, "failed write changed the disk");
  cr_assert_eq (cbw_session_pit_read (bgw, next, buf, 4096, 0, &err), 0);
  cr_assert (memcmp (buf, ref, 4096) == 0);
  cr_assert_eq (guest_write (bs, 8192, 4096, &seed), 0);   /* buffered */
  usleep (1500000);                             /* worker times out */
  struct cbw_session_stats st;
  cbw_session_stats (bs, &st);
  cr_assert (st.broken);
  cr_assert_eq (cbw_session_pit_read (bs, next, buf, 4096, 8192, &err), -1);
  cr_assert_eq (guest_write (bs, 16384, 4096, &seed), 0);  /* fast, no copy */
  kill (tpid, SIGCONT);
  cbw_session_end (bgw); cbw_session_put (bgw);
  cbw_session_end (bs); cbw_session_put (bs);
}

/* ---- the shared state map (begin "state-file") ---- */
#include <fcntl.h>
#include <sys/mman.h>

static bool
map_locked (int fd)
{
  struct flock fl = { .l_type = F_RDLCK, .l_whence = SEEK_SET, .l_start = 0,
                      .l_len = 1 };
  cr_assert_eq (fcntl (fd, F_OFD_GETLK, &fl), 0);
  return fl.l_type != F_UNLCK;
}

Test (session, state_map)
{
  struct cbw_err err = { 0 };
  char path[128];
  struct stat sb;
  uint64_t seed = 11, b;
  snprintf (path, sizeof path, "%s/states", tdir);
  struct cbw_session_params p = {
    .size = SIZE, .granularity = 4096, .policy = CBW_BREAK_SNAPSHOT,
    .timeout_ns = 10000000000LL, .workers = 1, .state_file = path,
  };
  struct cbw_target *t = cbw_target_open (turi, 1, cbw_now_ns () + 10000000000LL,
                                          &err);
  cr_assert_not_null (t, "%s", err.msg);
  struct cbw_session *s = cbw_session_new (&p, t, &err);
  cr_assert_not_null (s, "%s", err.msg);
  uint64_t nb = (SIZE + 4095) / 4096;

  /* Another "process": a read-only shared mapping of the file. */
  int fd = open (path, O_RDONLY);
  cr_assert_geq (fd, 0);
  cr_assert_eq (fstat (fd, &sb), 0);
  cr_assert_eq ((sb.st_mode & 0777), 0600);
  cr_assert_eq ((uint64_t) sb.st_size, CBW_SM_HEADER_SIZE + nb);
  const uint8_t *m = mmap (NULL, sb.st_size, PROT_READ, MAP_SHARED, fd, 0);
  cr_assert_neq (m, MAP_FAILED);
  const struct cbw_sm_header *h = (const void *) m;
  cr_assert_eq (cbw_sm_check_header (h, sb.st_size, SIZE, 4096, path, &err), 0,
                "%s", err.msg);
  cr_assert_eq (h->gran_shift, 12);
  cr_assert (map_locked (fd), "an active session holds the liveness lock");
  for (b = 0; b < nb; ++b)
    cr_assert_eq (m[CBW_SM_HEADER_SIZE + b], CBW_SM_NOT_NEEDED);

  /* The states seen through the file are the session's. */
  cbw_session_mark_needed (s, 4096 * 10, 4096 * 5);
  cr_assert_eq (m[CBW_SM_HEADER_SIZE + 9], CBW_SM_NOT_NEEDED);
  for (b = 10; b < 15; ++b)
    cr_assert_eq (m[CBW_SM_HEADER_SIZE + b], CBW_SM_NEEDED);
  cr_assert_eq (guest_write (s, 4096 * 11, 100, &seed), 0);
  cr_assert_eq (m[CBW_SM_HEADER_SIZE + 11], CBW_SM_COPIED);
  cr_assert_eq (m[CBW_SM_HEADER_SIZE + 12], CBW_SM_NEEDED);

  /* A second session on the same path must not reuse the file. */
  struct cbw_target *t2 = cbw_target_open (turi, 1, cbw_now_ns () + 10000000000LL,
                                           &err);
  cr_assert_not_null (t2);
  cr_assert_null (cbw_session_new (&p, t2, &err));
  cr_assert_eq (err.errnum, EEXIST);
  cr_assert (strstr (err.msg, path) != NULL, "%s", err.msg);
  /* A path in a missing directory. */
  char bad[160];
  snprintf (bad, sizeof bad, "%s/no/such/dir", tdir);
  p.state_file = bad;
  cr_assert_null (cbw_session_new (&p, t2, &err));
  cr_assert_eq (err.errnum, ENOENT);
  cbw_target_close (t2);
  cr_assert_eq (stat (path, &sb), 0, "a failed begin must not remove the "
                "active session's file");

  /* publish_end: status ENDED, lock released, file unlinked. */
  cbw_session_publish_end (s);
  cr_assert_eq (__atomic_load_n (&h->status, __ATOMIC_SEQ_CST),
                CBW_SM_STATUS_ENDED);
  cr_assert_not (map_locked (fd));
  cr_assert_eq (stat (path, &sb), -1);
  char buf[512];
  int e2 = 0;
  cr_assert_eq (cbw_session_pit_read (s, next, buf, 512, 4096 * 12, &e2), -1);
  cbw_session_end (s);
  cbw_session_put (s);
  munmap ((void *) m, CBW_SM_HEADER_SIZE + nb);
  close (fd);
}

/* ---- local-file target (file:///PATH, target_file.c) ---- */

static struct cbw_session *
new_file_session (const char *path, uint64_t buffer, uint32_t gran)
{
  struct cbw_err err = { 0 };
  char uri[256];
  struct cbw_session_params p = {
    .size = SIZE, .granularity = gran, .policy = CBW_BREAK_SNAPSHOT,
    .timeout_ns = 10000000000LL, .buffer_bytes = buffer, .workers = 4,
  };
  snprintf (uri, sizeof uri, "file://%s", path);
  struct cbw_target *t = cbw_target_open (uri, 4, cbw_now_ns () + 10000000000LL,
                                          &err);
  cr_assert_not_null (t, "%s", err.msg);
  cr_assert (cbw_target_is_local (t));
  cr_assert_eq (cbw_target_size (t), SIZE);
  struct cbw_session *s = cbw_session_new (&p, t, &err);
  cr_assert_not_null (s, "%s", err.msg);
  cbw_session_mark_all_needed (s);
  return s;
}

static void
make_sparse (const char *path, off_t size)
{
  FILE *f = fopen (path, "w");
  cr_assert_not_null (f);
  cr_assert_eq (ftruncate (fileno (f), size), 0);
  fclose (f);
}

/* Guest writes and PIT reads race with copies written to a local file in
 * the writers' own threads; afterwards the view equals the disk at begin,
 * and every copied block of the target file holds exactly the old data
 * (blocks the state map says were not copied are never looked at). */
Test (session, file_target_concurrent)
{
  char path[128];
  snprintf (path, sizeof path, "%s/target.img", tdir);
  make_sparse (path, SIZE);
  /* a write-back buffer is asked for, but a local target copies in the
   * guest write's thread: the test also checks nothing is left buffered */
  struct cbw_session *s = new_file_session (path, 1 << 20, 4096);
  struct cbw_session_stats st;
  hammer (s, 1.5);
  check_full_pit (s);
  cbw_session_stats (s, &st);
  cr_expect_gt (st.copied_blocks, 0);
  cr_expect_eq (st.errors, 0);
  cr_expect_eq (st.buffered_blocks, 0);
  cbw_session_end (s);
  cbw_session_put (s);

  /* The target file: where it is not a hole it must be the old data or the
   * zeroes of an old all-zero block (written as a hole); a block the guest
   * overwrote must be there. */
  FILE *f = fopen (path, "r");
  cr_assert_not_null (f);
  char *t = malloc (SIZE);
  cr_assert_eq (fread (t, 1, SIZE, f), (size_t) SIZE);
  fclose (f);
  uint64_t b, same = 0, zero = 0;
  for (b = 0; b < SIZE; b += 4096) {
    static const char z[4096];
    if (memcmp (t + b, ref + b, 4096) == 0) same++;
    else if (memcmp (t + b, z, 4096) == 0) zero++;   /* never copied */
    else cr_assert_fail ("target block at %" PRIu64 " is neither the old "
                         "data nor a hole", b);
  }
  cr_expect_geq (same, st.copied_blocks - (1 << 20) / 4096,
                 "copied %" PRIu64 " blocks, but only %" PRIu64 " hold the "
                 "old data", st.copied_blocks, same);
  free (t);
}

Test (session, file_target_bad)
{
  struct cbw_err err = { 0 };
  char uri[256], path[128];
  int64_t dl = cbw_now_ns () + 1000000000LL;

  snprintf (uri, sizeof uri, "file://%s/missing.img", tdir);
  cr_assert_null (cbw_target_open (uri, 1, dl, &err));
  cr_assert_eq (err.errnum, ENOENT);
  cr_assert (strstr (err.msg, "missing.img") && strstr (err.msg, "must exist"),
             "%s", err.msg);

  snprintf (uri, sizeof uri, "file://%s", tdir);           /* a directory */
  memset (&err, 0, sizeof err);
  cr_assert_null (cbw_target_open (uri, 1, dl, &err));
  cr_assert (err.errnum == EISDIR || err.errnum == EINVAL, "%d %s", err.errnum,
             err.msg);

  memset (&err, 0, sizeof err);                            /* relative */
  cr_assert_null (cbw_target_open ("file:target.img", 1, dl, &err));
  cr_assert_eq (err.errnum, EINVAL);
  cr_assert (strstr (err.msg, "ABSOLUTE"), "%s", err.msg);

  memset (&err, 0, sizeof err);                            /* remote host */
  cr_assert_null (cbw_target_open ("file://host/x.img", 1, dl, &err));
  cr_assert_eq (err.errnum, EINVAL);

  /* writes past the end of a small target fail with ENOSPC, naming it */
  snprintf (path, sizeof path, "%s/small.img", tdir);
  make_sparse (path, 8192);
  snprintf (uri, sizeof uri, "file://%s", path);
  memset (&err, 0, sizeof err);
  struct cbw_target *t = cbw_target_open (uri, 1, dl, &err);
  cr_assert_not_null (t, "%s", err.msg);
  char buf[4096] = { 1 };
  cr_assert_eq (cbw_target_pwrite (t, buf, 4096, 4096, dl, &err), 0);
  cr_assert_eq (cbw_target_pwrite (t, buf, 4096, 8192, dl, &err), -1);
  cr_assert_eq (err.errnum, ENOSPC);
  cr_assert (strstr (err.msg, "small.img"), "%s", err.msg);
  cr_assert_eq (cbw_target_pread (t, buf, 4096, 4096, dl, &err), 0);
  cr_assert_eq (buf[0], 1);
  cr_assert_eq (cbw_target_zero (t, 4096, 4096, dl, &err), 0);
  cr_assert_eq (cbw_target_pread (t, buf, 4096, 4096, dl, &err), 0);
  cr_assert_eq (buf[0], 0);
  cr_assert_eq (cbw_target_trim (t, 4096, 0, dl, &err), 0);
  cbw_target_close (t);
}

/* The space limit of a local target: writes that would take the file past
 * it fail with ENOSPC before anything is written; trims give space back;
 * an NBD target refuses a limit. */
Test (session, file_target_limit)
{
  struct cbw_err err = { 0 };
  char uri[256], path[128];
  int64_t dl = cbw_now_ns () + 1000000000LL;
  static char buf[65536];
  struct stat sb;
  int i;

  memset (buf, 0x5a, sizeof buf);
  snprintf (path, sizeof path, "%s/limited.img", tdir);
  make_sparse (path, 16 << 20);
  snprintf (uri, sizeof uri, "file://%s", path);
  struct cbw_target *t = cbw_target_open (uri, 1, dl, &err);
  cr_assert_not_null (t, "%s", err.msg);
  cr_assert_eq (cbw_target_set_limit (t, 256 * 1024, &err), 0);
  for (i = 0; i < 4; ++i)                       /* 4 x 64K: exactly the limit */
    cr_assert_eq (cbw_target_pwrite (t, buf, sizeof buf, (uint64_t) i << 20,
                                     dl, &err), 0, "%s", err.msg);
  cr_assert_eq (cbw_target_pwrite (t, buf, sizeof buf, 8 << 20, dl, &err), -1);
  cr_assert_eq (err.errnum, ENOSPC);
  cr_assert (strstr (err.msg, "limit reached"), "%s", err.msg);
  cr_assert_eq (stat (path, &sb), 0);
  cr_assert_leq ((uint64_t) sb.st_blocks * 512, 256 * 1024,
                 "the file took %lld bytes past its limit",
                 (long long) sb.st_blocks * 512);
  /* overwriting allocated space is counted back at the precise recount */
  cr_assert_eq (cbw_target_trim (t, 2 << 20, 0, dl, &err), 0);
  cr_assert_eq (cbw_target_pwrite (t, buf, sizeof buf, 8 << 20, dl, &err), 0,
                "after a trim: %s", err.msg);
  cbw_target_close (t);

  memset (&err, 0, sizeof err);
  t = cbw_target_open (turi, 1, dl, &err);      /* the NBD target */
  cr_assert_not_null (t, "%s", err.msg);
  cr_assert_eq (cbw_target_set_limit (t, 1 << 20, &err), -1);
  cr_assert_eq (err.errnum, EINVAL);
  cbw_target_close (t);
}

/* ---- in-kernel copies from the raw image (cbw-source) ---- */

/* A raw image file equal to the disk at begin in dir; sets disk_fd (the
 * writers keep it equal) and returns a second descriptor for the session
 * (which closes it). */
static int
make_source (const char *dir)
{
  char path[128];
  snprintf (path, sizeof path, "%s/source.img", dir);
  disk_fd = open (path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  cr_assert_geq (disk_fd, 0, "%s: %s", path, strerror (errno));
  cr_assert_eq (pwrite (disk_fd, disk, SIZE, 0), SIZE);
  int fd = open (path, O_RDONLY | O_CLOEXEC);
  cr_assert_geq (fd, 0);
  return fd;
}

static struct cbw_session *
new_source_session (const char *tpath, int src, uint64_t min)
{
  struct cbw_err err = { 0 };
  char uri[256];
  struct cbw_session_params p = {
    .size = SIZE, .granularity = 4096, .policy = CBW_BREAK_SNAPSHOT,
    .timeout_ns = 10000000000LL, .has_source = true, .source_fd = src,
    .source_min = min,
  };
  make_sparse (tpath, SIZE);
  snprintf (uri, sizeof uri, "file://%s", tpath);
  struct cbw_target *t = cbw_target_open (uri, 1, cbw_now_ns () + 10000000000LL,
                                          &err);
  cr_assert_not_null (t, "%s", err.msg);
  struct cbw_session *s = cbw_session_new (&p, t, &err);
  cr_assert_not_null (s, "%s", err.msg);
  cbw_session_mark_all_needed (s);
  return s;
}

/* One guest write over [off,off+len) (fresh blocks: one copy of them). */
static void
write_once (struct cbw_session *s, uint64_t off, uint64_t len)
{
  uint64_t seed = off + 7;
  cr_assert_eq (guest_write (s, off, len, &seed), 0);
}

/* The target holds the old data at [off,off+len). */
static void
expect_target_old (const char *tpath, uint64_t off, uint64_t len)
{
  char *b = malloc (len);
  int fd = open (tpath, O_RDONLY);
  cr_assert_geq (fd, 0);
  cr_assert_eq (pread (fd, b, len, (off_t) off), (ssize_t) len);
  close (fd);
  cr_expect (memcmp (b, ref + off, len) == 0, "target at %" PRIu64 "+%"
             PRIu64 " is not the old data", off, len);
  free (b);
}

/* Guest writes race with in-kernel copies and PIT reads: the PIT view is
 * the disk at begin (the copy is complete before the guest data lands:
 * were the state published first, a writer could overwrite the image
 * before the kernel read it), and the copies did go through the kernel. */
Test (session, kernel_copy_concurrent)
{
  char tpath[128];
  struct cbw_session_stats st;
  snprintf (tpath, sizeof tpath, "%s/target.img", tdir);
  struct cbw_session *s = new_source_session (tpath, make_source (tdir), 0);
  hammer (s, 1.5);
  check_full_pit (s);
  cbw_session_stats (s, &st);
  cr_expect_gt (st.kernel_copy_bytes + st.clone_bytes, 0);
  cr_expect_eq (st.kernel_copy_fallbacks, 0);
  cr_expect_eq (st.errors, 0);
  cbw_session_end (s);
  cbw_session_put (s);
}

/* Holes of the image stay holes of the target (no space spent on them);
 * data around them is copied. */
Test (session, kernel_copy_holes)
{
  char tpath[128];
  struct stat sb;
  snprintf (tpath, sizeof tpath, "%s/target.img", tdir);
  int src = make_source (tdir);
  /* a hole of 1 MiB at 2 MiB, on disk and in the reference alike */
  memset (disk + (2 << 20), 0, 1 << 20);
  memset (ref + (2 << 20), 0, 1 << 20);
  cr_assert_eq (fallocate (disk_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                           2 << 20, 1 << 20), 0);
  struct cbw_session *s = new_source_session (tpath, src, 0);
  write_once (s, (2 << 20) - 65536, (1 << 20) + 2 * 65536);
  expect_target_old (tpath, (2 << 20) - 65536, (1 << 20) + 2 * 65536);
  cr_assert_eq (stat (tpath, &sb), 0);
  cr_expect_leq ((uint64_t) sb.st_blocks * 512, 2 * 65536 + 8192,
                 "the hole was written: %lld bytes allocated",
                 (long long) sb.st_blocks * 512);
  cbw_session_put (s);
}

/* Short copies: continued until the range is done. */
static _Atomic int short_calls;
static ssize_t
short_copy (int in, off_t *io, int out, off_t *oo, size_t len)
{
  short_calls++;
  return copy_file_range (in, io, out, oo, len > 3000 ? 3000 : len, 0);
}
static int
no_clone (int in, uint64_t a, int out, uint64_t b, uint64_t len)
{
  (void) in; (void) a; (void) out; (void) b; (void) len;
  errno = EOPNOTSUPP;
  return -1;
}

Test (session, kernel_copy_short)
{
  char tpath[128];
  struct cbw_session_stats st;
  snprintf (tpath, sizeof tpath, "%s/target.img", tdir);
  cbw_file_target_test_hooks (short_copy, no_clone);
  struct cbw_session *s = new_source_session (tpath, make_source (tdir), 0);
  write_once (s, 1 << 20, 65536);
  expect_target_old (tpath, 1 << 20, 65536);
  cbw_session_stats (s, &st);
  cr_expect_eq (st.kernel_copy_bytes, 65536);
  cr_expect_eq (st.kernel_copy_fallbacks, 0);
  cr_expect_geq (short_calls, 65536 / 3000);
  cbw_session_put (s);
}

/* A method the filesystem lacks (EXDEV: image and target on different
 * filesystems; EOPNOTSUPP): this copy is redone in user space and the
 * method is not tried again. */
static _Atomic int fail_calls, fail_errno;
static ssize_t
failing_copy (int in, off_t *io, int out, off_t *oo, size_t len)
{
  (void) in; (void) io; (void) out; (void) oo; (void) len;
  fail_calls++;
  errno = fail_errno;
  return -1;
}

static void
method_missing (int e)
{
  char tpath[128];
  struct cbw_session_stats st;
  snprintf (tpath, sizeof tpath, "%s/target.img", tdir);
  fail_errno = e;
  fail_calls = 0;
  cbw_file_target_test_hooks (failing_copy, no_clone);
  struct cbw_session *s = new_source_session (tpath, make_source (tdir), 0);
  write_once (s, 0, 65536);
  write_once (s, 1 << 20, 65536);
  expect_target_old (tpath, 0, 65536);
  expect_target_old (tpath, 1 << 20, 65536);
  cbw_session_stats (s, &st);
  cr_expect_eq (fail_calls, 1, "the missing method was tried %d times",
                fail_calls);
  cr_expect_eq (st.kernel_copy_fallbacks, 1);
  cr_expect_eq (st.kernel_copy_bytes, 0);
  cr_expect_eq (st.errors, 0);
  cbw_session_put (s);
}

Test (session, kernel_copy_exdev) { method_missing (EXDEV); }
Test (session, kernel_copy_eopnotsupp) { method_missing (EOPNOTSUPP); }

/* A copy that fails half-way (EIO after part of the range was written):
 * the whole range is copied again in user space, and the method stays on
 * for the next copy. */
static _Atomic int partial_calls;
static ssize_t
partial_copy (int in, off_t *io, int out, off_t *oo, size_t len)
{
  if (partial_calls++ % 2 == 0)
    return copy_file_range (in, io, out, oo, len / 2, 0);
  errno = EIO;
  return -1;
}

Test (session, kernel_copy_partial)
{
  char tpath[128];
  struct cbw_session_stats st;
  snprintf (tpath, sizeof tpath, "%s/target.img", tdir);
  cbw_file_target_test_hooks (partial_copy, no_clone);
  struct cbw_session *s = new_source_session (tpath, make_source (tdir), 0);
  write_once (s, 0, 65536);
  write_once (s, 1 << 20, 65536);
  expect_target_old (tpath, 0, 65536);
  expect_target_old (tpath, 1 << 20, 65536);
  cbw_session_stats (s, &st);
  cr_expect_eq (partial_calls, 4, "the method was not tried again");
  cr_expect_eq (st.kernel_copy_fallbacks, 2);
  cbw_session_put (s);
}

/* The image ends early (shrunk under us): copy_file_range returns 0; that
 * is a failed copy redone from the disk below, never a hole. */
Test (session, kernel_copy_source_eof)
{
  char tpath[128];
  struct cbw_session_stats st;
  snprintf (tpath, sizeof tpath, "%s/target.img", tdir);
  cbw_file_target_test_hooks (NULL, no_clone);
  struct cbw_session *s = new_source_session (tpath, make_source (tdir), 0);
  cr_assert_eq (ftruncate (disk_fd, 1 << 20), 0);
  write_once (s, (1 << 20) - 4096, 65536);
  expect_target_old (tpath, (1 << 20) - 4096, 65536);
  cbw_session_stats (s, &st);
  cr_expect_eq (st.kernel_copy_fallbacks, 1);
  cbw_session_put (s);
}

/* The real system calls on this machine's filesystems: FICLONERANGE where
 * the filesystem shares extents, else (EOPNOTSUPP, e.g. ext4; EXDEV on
 * tmpfs -> other) copy_file_range, else user space: whichever runs, the
 * target holds the old data and nothing is counted as an error. */
Test (session, kernel_copy_real_methods)
{
  char tpath[128], sdir[64];
  struct cbw_session_stats st;
  int pass;
  for (pass = 0; pass < 2; ++pass) {
    /* pass 1: the image on /dev/shm (tmpfs), the target in /tmp */
    strcpy (sdir, pass ? "/dev/shm/cbw-ut.XXXXXX" : tdir);
    if (pass && mkdtemp (sdir) == NULL)
      continue;                 /* no /dev/shm here */
    snprintf (tpath, sizeof tpath, "%s/target.img", tdir);
    if (disk_fd >= 0)
      close (disk_fd);
    memcpy (disk, ref, SIZE);   /* a new begin: the old data again */
    struct cbw_session *s = new_source_session (tpath, make_source (sdir), 0);
    write_once (s, 0, 1 << 20);
    write_once (s, SIZE - 4096 * 3, 4096 * 3);   /* the unaligned end */
    expect_target_old (tpath, 0, 1 << 20);
    expect_target_old (tpath, SIZE - 4096 * 3, 4096 * 3);
    cbw_session_stats (s, &st);
    cr_expect_eq (st.errors, 0);
    cr_log_info ("pass %d: cloned %" PRIu64 ", kernel-copied %" PRIu64
                 ", fallbacks %" PRIu64, pass, st.clone_bytes,
                 st.kernel_copy_bytes, st.kernel_copy_fallbacks);
    cbw_session_put (s);
    if (pass) {
      char cmd[128];
      snprintf (cmd, sizeof cmd, "rm -rf %s", sdir);
      if (system (cmd)) {}
    }
  }
}

/* Copies shorter than source_min stay in user space. */
Test (session, kernel_copy_min)
{
  char tpath[128];
  struct cbw_session_stats st;
  snprintf (tpath, sizeof tpath, "%s/target.img", tdir);
  struct cbw_session *s = new_source_session (tpath, make_source (tdir), 65536);
  write_once (s, 0, 4096);
  write_once (s, 1 << 20, 65536);
  expect_target_old (tpath, 0, 4096);
  expect_target_old (tpath, 1 << 20, 65536);
  cbw_session_stats (s, &st);
  cr_expect_eq (st.kernel_copy_bytes + st.clone_bytes, 65536);
  cbw_session_put (s);
}
