/* cbw — server/tests/test_pit_direct.c: the direct read path of cbwd's PIT
 * export (export_pit.c) against hand-made state maps
 * (docs/formats/cbw-state-map.md), with a real upstream (`nbdkit memory`,
 * all zeroes, spawned by the test) standing in for the cbw filter's PIT
 * export.
 *
 *  - negative: a state map with a bad magic, version, checksum, header size,
 *    granularity, block count, file size, disk size, an ended or unlocked
 *    (dead) session, missing/short live or store files, or only some of the
 *    three files: the export refuses to start with an error naming the
 *    problem;
 *  - reads: NEEDED blocks come from the live file, COPIED ones from the
 *    store file, anything else from the upstream (zeroes here), per block,
 *    in one request; the counters say which; after the session ended (status
 *    ENDED, or the liveness lock released) reads fail with EIO.
 * Expectations are computed by the test from the block states it wrote.
 *
 * Locking: single-threaded; the test holds the map's OFD lock itself, on
 * its own open file description, as the filter does.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "state_map.h"
#include "export.h"
#include "nbdkit_test_util.h"

extern char **environ;

#define GRAN 4096
#define SIZE (64 * GRAN + 512)          /* last block is partial */
#define NB ((SIZE + GRAN - 1) / GRAN)

static char dir[64], upstream[160], statef[128], livef[128], storef[128];
static pid_t upid;
static int lock_fd = -1;                /* the "filter's" fd: holds the lock */
static uint8_t *map;                    /* its read-write mapping */
static char live[SIZE], store[SIZE];

static void
write_file (const char *path, const void *buf, size_t len)
{
  int fd = open (path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
  cr_assert_geq (fd, 0);
  cr_assert_eq (write (fd, buf, len), (ssize_t) len);
  close (fd);
}

static void
start_upstream (void)
{
  char sock[128];
  snprintf (sock, sizeof sock, "%s/up.sock", dir);
  snprintf (upstream, sizeof upstream, "nbd+unix:///?socket=%s", sock);
  upid = test_start_nbdkit_memory (sock, SIZE);
}

/* A valid header for SIZE at GRAN; tests corrupt it afterwards. */
static void
make_header (struct cbw_sm_header *h)
{
  memset (h, 0, sizeof *h);
  memcpy (h->magic, CBW_SM_MAGIC, 8);
  h->version = CBW_SM_VERSION;
  h->header_size = CBW_SM_HEADER_SIZE;
  h->gran_shift = 12;
  h->creator_pid = getpid ();
  h->nblocks = NB;
  h->disk_size = SIZE;
  h->session_id = 0x1234;
  h->checksum = cbw_sm_checksum (h);
}

/* (Re)create the state map from h with all blocks `state`, locked. */
static void
make_map (const struct cbw_sm_header *h, uint64_t file_size, uint8_t state)
{
  struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_len = 1 };
  if (map) munmap (map, CBW_SM_HEADER_SIZE + NB);
  if (lock_fd >= 0) close (lock_fd);
  unlink (statef);
  lock_fd = open (statef, O_RDWR | O_CREAT | O_EXCL, 0600);
  cr_assert_geq (lock_fd, 0);
  cr_assert_eq (ftruncate (lock_fd, CBW_SM_HEADER_SIZE + NB), 0);
  map = mmap (NULL, CBW_SM_HEADER_SIZE + NB, PROT_READ | PROT_WRITE, MAP_SHARED,
              lock_fd, 0);
  cr_assert_neq (map, MAP_FAILED);
  memcpy (map, h, sizeof *h);
  memset (map + CBW_SM_HEADER_SIZE, state, NB);
  cr_assert_eq (ftruncate (lock_fd, file_size), 0);
  cr_assert_eq (fcntl (lock_fd, F_OFD_SETLK, &fl), 0);
}

static void
setup (void)
{
  uint64_t s = 99;
  signal (SIGPIPE, SIG_IGN);
  strcpy (dir, "/tmp/cbwd-pitd.XXXXXX");
  cr_assert (mkdtemp (dir));
  snprintf (statef, sizeof statef, "%s/states", dir);
  snprintf (livef, sizeof livef, "%s/live", dir);
  snprintf (storef, sizeof storef, "%s/store", dir);
  for (size_t i = 0; i < SIZE; i++) {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    live[i] = (char) ((s >> 33) | 1);   /* never zero: tells upstream apart */
    store[i] = (char) ((s >> 41) | 0x80);
  }
  write_file (livef, live, SIZE);
  write_file (storef, store, SIZE);
  start_upstream ();
}

static void
teardown (void)
{
  if (map) munmap (map, CBW_SM_HEADER_SIZE + NB);
  map = NULL;
  if (lock_fd >= 0) close (lock_fd);
  lock_fd = -1;
  if (upid > 0) { kill (upid, SIGTERM); waitpid (upid, NULL, 0); }
  char cmd[96];
  snprintf (cmd, sizeof cmd, "rm -rf %s", dir);
  if (system (cmd)) {}
}

static struct cbwd_export *
open_pit (uint64_t gran, struct cbw_err *err)
{
  struct cbwd_pit_opts o = { .upstream = upstream, .connections = 2,
                             .state_file = statef, .live_file = livef,
                             .store_file = storef, .state_granularity = gran };
  return cbwd_export_pit_new ("pit", &o, err);
}

/* The export must refuse to start, naming `needle` in its error. */
static void
refused (const char *needle)
{
  struct cbw_err err = { 0 };
  struct cbwd_export *e = open_pit (0, &err);
  if (e) cbwd_export_free (e);
  cr_assert_null (e, "export started; expected an error about '%s'", needle);
  cr_assert (strstr (err.msg, needle) != NULL, "error '%s' does not mention '%s'",
             err.msg, needle);
}

TestSuite (pit_direct, .init = setup, .fini = teardown, .timeout = 60);

Test (pit_direct, bad_state_maps_are_refused)
{
  struct cbw_sm_header h;
  struct cbw_err err = { 0 };
  uint64_t fsz = CBW_SM_HEADER_SIZE + NB;

  make_header (&h); memcpy (h.magic, "CBWSTMAQ", 8); h.checksum = cbw_sm_checksum (&h);
  make_map (&h, fsz, CBW_SM_NEEDED); refused ("bad magic");
  make_header (&h); h.version = 2; h.checksum = cbw_sm_checksum (&h);
  make_map (&h, fsz, CBW_SM_NEEDED); refused ("version 2");
  make_header (&h); h.checksum ^= 1;
  make_map (&h, fsz, CBW_SM_NEEDED); refused ("checksum");
  make_header (&h); h.disk_size += 1; /* checksum now stale too */
  make_map (&h, fsz, CBW_SM_NEEDED); refused ("checksum");
  make_header (&h); h.header_size = 512; h.checksum = cbw_sm_checksum (&h);
  make_map (&h, fsz, CBW_SM_NEEDED); refused ("header size");
  /* wrong granularity: the block count no longer matches */
  make_header (&h); h.gran_shift = 16; h.checksum = cbw_sm_checksum (&h);
  make_map (&h, fsz, CBW_SM_NEEDED); refused ("blocks do not match");
  make_header (&h); h.gran_shift = 8; h.checksum = cbw_sm_checksum (&h);
  make_map (&h, fsz, CBW_SM_NEEDED); refused ("out of range");
  /* wrong file size (truncated, or extended) */
  make_header (&h);
  make_map (&h, fsz - 1, CBW_SM_NEEDED); refused ("expected");
  make_map (&h, fsz + 4096, CBW_SM_NEEDED); refused ("expected");
  make_map (&h, 100, CBW_SM_NEEDED); refused ("shorter than");
  /* a consistent map of another disk size */
  make_header (&h); h.disk_size = SIZE - 100; h.checksum = cbw_sm_checksum (&h);
  make_map (&h, fsz, CBW_SM_NEEDED); refused ("differs from the export");
  /* a granularity other than the one asked for */
  make_header (&h);
  make_map (&h, fsz, CBW_SM_NEEDED);
  struct cbwd_export *e = open_pit (65536, &err);
  cr_assert_null (e);
  cr_assert (strstr (err.msg, "granularity 4096 differs"), "%s", err.msg);
  /* ended, and dead (lock not held) */
  make_header (&h); h.status = CBW_SM_STATUS_ENDED;
  make_map (&h, fsz, CBW_SM_NEEDED); refused ("not active");
  make_header (&h);
  make_map (&h, fsz, CBW_SM_NEEDED);
  /* "nbdkit died": its fd and mapping go (the mapping alone would keep the
   * open file description, and so its lock, alive) */
  munmap (map, CBW_SM_HEADER_SIZE + NB); map = NULL;
  close (lock_fd); lock_fd = -1;
  refused ("not active");
  /* missing files, a short live file, incomplete options */
  make_header (&h);
  make_map (&h, fsz, CBW_SM_NEEDED);
  unlink (statef);
  refused ("No such file");
  make_map (&h, fsz, CBW_SM_NEEDED);
  cr_assert_eq (truncate (livef, SIZE - 1), 0);
  refused ("smaller than the export");
  write_file (livef, live, SIZE);
  struct cbwd_pit_opts o = { .upstream = upstream, .state_file = statef,
                             .live_file = livef };
  e = cbwd_export_pit_new ("pit", &o, &err);
  cr_assert_null (e);
  cr_assert (strstr (err.msg, "go together"), "%s", err.msg);
  /* and the good one starts */
  e = open_pit (GRAN, &err);
  cr_assert_not_null (e, "%s", err.msg);
  struct cbwd_pit_stats st;
  cbwd_export_pit_stats (e, &st);
  cr_assert (st.direct);
  cbwd_export_free (e);
}

Test (pit_direct, reads_follow_the_states)
{
  struct cbw_sm_header h;
  struct cbw_err err = { 0 };
  static char buf[SIZE], want[SIZE];
  uint8_t *st;

  make_header (&h);
  make_map (&h, CBW_SM_HEADER_SIZE + NB, CBW_SM_NEEDED);
  st = map + CBW_SM_HEADER_SIZE;
  /* a mix, including the partial last block */
  for (uint64_t b = 0; b < NB; b++) {
    static const uint8_t mix[] = { CBW_SM_NEEDED, CBW_SM_NEEDED, CBW_SM_COPIED,
                                   CBW_SM_NOT_NEEDED, CBW_SM_COPYING, CBW_SM_COPIED,
                                   CBW_SM_BUFFERED, CBW_SM_FAILED };
    st[b] = mix[(b * 5 + b / 3) % 8];
  }
  st[NB - 1] = CBW_SM_COPIED;
  /* expectation: live / store / upstream (zeroes) by state */
  for (uint64_t i = 0; i < SIZE; i++) {
    uint8_t v = st[i / GRAN];
    want[i] = v == CBW_SM_NEEDED ? live[i] : v == CBW_SM_COPIED ? store[i] : 0;
  }
  struct cbwd_export *e = open_pit (0, &err);
  cr_assert_not_null (e, "%s", err.msg);
  cr_assert_eq (e->size, SIZE);
  uint64_t upstream_expected = 0, direct_expected = 0;
  for (uint64_t b = 0; b < NB; b++) {
    uint64_t n = b == NB - 1 ? SIZE - b * GRAN : GRAN;
    if (st[b] == CBW_SM_NEEDED || st[b] == CBW_SM_COPIED) direct_expected += n;
    else upstream_expected += n;
  }
  cr_assert_eq (e->ops->pread (e, buf, SIZE, 0, NULL, &err), 0, "%s", err.msg);
  cr_assert (memcmp (buf, want, SIZE) == 0, "whole read differs from the model");
  struct cbwd_pit_stats ps;
  cbwd_export_pit_stats (e, &ps);
  cr_assert_eq (ps.direct_bytes, direct_expected);
  cr_assert_eq (ps.upstream_bytes, upstream_expected);
  /* unaligned reads inside and across blocks */
  for (uint64_t off = 100; off + 9000 < SIZE; off += 3001) {
    cr_assert_eq (e->ops->pread (e, buf, 9000, off, NULL, &err), 0, "%s", err.msg);
    cr_assert (memcmp (buf, want + off, 9000) == 0, "read at %lu differs", (unsigned long) off);
  }
  /* the loop-thread path serves only what it can prove from the page cache */
  if (e->ops->pread_nowait (e, buf, GRAN, 0) == 0)
    cr_assert (memcmp (buf, want, GRAN) == 0);
  uint64_t other = 0;
  while (st[other] == CBW_SM_NEEDED || st[other] == CBW_SM_COPIED) other++;
  cr_assert_eq (e->ops->pread_nowait (e, buf, GRAN, other * GRAN), -1,
                "a block the filter must decide was served on the loop");
  /* session ended: no read of the map's data any more */
  __atomic_store_n (&((struct cbw_sm_header *) map)->status, CBW_SM_STATUS_ENDED,
                    __ATOMIC_SEQ_CST);
  cr_assert_eq (e->ops->pread (e, buf, GRAN, 0, NULL, &err), -1);
  cr_assert_eq (err.errnum, EIO);
  cr_assert (strstr (err.msg, "ended"), "%s", err.msg);
  cr_assert_eq (e->ops->pread_nowait (e, buf, GRAN, 0), -1);
  /* active again but the lock released (nbdkit died) */
  __atomic_store_n (&((struct cbw_sm_header *) map)->status, CBW_SM_STATUS_ACTIVE,
                    __ATOMIC_SEQ_CST);
  cr_assert_eq (e->ops->pread (e, buf, GRAN, 0, NULL, &err), 0, "%s", err.msg);
  struct flock fl = { .l_type = F_UNLCK, .l_whence = SEEK_SET, .l_len = 1 };
  cr_assert_eq (fcntl (lock_fd, F_OFD_SETLK, &fl), 0);
  err.errnum = 0;
  cr_assert_eq (e->ops->pread (e, buf, GRAN, 2 * GRAN, NULL, &err), -1);
  cr_assert_eq (err.errnum, EIO);
  cbwd_export_free (e);
}
