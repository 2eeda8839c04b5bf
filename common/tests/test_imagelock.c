/* cbw — common/tests/test_imagelock.c: QEMU-compatible image locks
 * (common/imagelock.c).  Two open() calls of one file are two open file
 * descriptions, so one process can play both sides: the bytes a writer
 * takes are exactly QEMU's (100 + perm, 200 + unshared perm), a second
 * writer or a reader is refused with QEMU's wording, force-share skips the
 * test but still announces its write permission, and released or closed
 * locks are gone.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "imagelock.h"

static char path[64];

static void
setup (void)
{
  snprintf (path, sizeof path, "/tmp/cbw-imagelock-XXXXXX");
  int fd = mkstemp (path);
  cr_assert_geq (fd, 0);
  cr_assert_eq (ftruncate (fd, 1 << 20), 0);
  close (fd);
}

static void
teardown (void)
{
  unlink (path);
}

static int
open_rw (void)
{
  int fd = open (path, O_RDWR | O_CLOEXEC);
  cr_assert_geq (fd, 0);
  return fd;
}

/* Does another description hold a lock on byte off (seen from fd)? */
static bool
held (int fd, int off)
{
  struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = off, .l_len = 1 };
  cr_assert_eq (fcntl (fd, F_OFD_GETLK, &fl), 0);
  return fl.l_type != F_UNLCK;
}

static int
take (int fd, bool writable, bool force, struct cbw_err *e)
{
  unsigned perm, shared;
  cbw_imagelock_perms (writable, force, &perm, &shared);
  return cbw_imagelock_acquire (fd, path, perm, shared, !force, e);
}

TestSuite (imagelock, .init = setup, .fini = teardown);

Test (imagelock, writer_takes_qemus_bytes)
{
  struct cbw_err e = { 0 };
  int a = open_rw (), b = open_rw ();
  cr_assert_eq (take (a, true, false, &e), 0, "%s", e.msg);
  /* holds consistent read + write; does not share write + resize */
  int want[] = { 100, 101, 201, 203 };
  int free_[] = { 99, 102, 103, 104, 200, 202, 204, 300 };
  for (size_t i = 0; i < sizeof want / sizeof *want; i++)
    cr_assert (held (b, want[i]), "byte %d not locked", want[i]);
  for (size_t i = 0; i < sizeof free_ / sizeof *free_; i++)
    cr_assert (!held (b, free_[i]), "byte %d locked", free_[i]);
  /* the holder does not see its own bytes */
  cr_assert (!held (a, 101));
  close (a);
  cr_assert (!held (b, 101), "close did not release");
  close (b);
}

Test (imagelock, second_writer_refused)
{
  struct cbw_err e = { 0 };
  int a = open_rw (), b = open_rw ();
  cr_assert_eq (take (a, true, false, &e), 0, "%s", e.msg);
  cr_assert_eq (take (b, true, false, &e), -1);
  cr_assert_eq (e.errnum, EBUSY);
  cr_assert (strstr (e.msg, "failed to get \"write\" lock"), "%s", e.msg);
  cr_assert (strstr (e.msg, "QEMU/qemu-nbd?"), "%s", e.msg);
  cr_assert (strstr (e.msg, path), "%s", e.msg);
  /* the refused opener left nothing behind: after the holder goes, b's
   * view is clean and a new writer succeeds */
  close (a);
  int c = open_rw ();
  cr_assert (!held (c, 100) && !held (c, 201));
  cr_assert_eq (take (b, true, false, &e), 0, "%s", e.msg);
  close (b);
  close (c);
}

Test (imagelock, reader_refused_by_writer_and_blocks_writer)
{
  struct cbw_err e = { 0 };
  int a = open_rw (), b = open_rw ();
  cr_assert_eq (take (a, true, false, &e), 0, "%s", e.msg);
  cr_assert_eq (take (b, false, false, &e), -1);
  cr_assert_eq (e.errnum, EBUSY);
  cr_assert (strstr (e.msg, "failed to get shared \"write\" lock"), "%s", e.msg);
  close (a);
  /* a reader first: a writer is refused (the reader does not share write) */
  cr_assert_eq (take (b, false, false, &e), 0, "%s", e.msg);
  a = open_rw ();
  cr_assert_eq (take (a, true, false, &e), -1);
  cr_assert (strstr (e.msg, "failed to get \"write\" lock"), "%s", e.msg);
  /* two readers coexist */
  int c = open_rw ();
  cr_assert_eq (take (c, false, false, &e), 0, "%s", e.msg);
  close (a); close (b); close (c);
}

Test (imagelock, force_share)
{
  struct cbw_err e = { 0 };
  unsigned perm, shared;
  cbw_imagelock_perms (true, true, &perm, &shared);
  cr_assert_eq (shared, CBW_PERM_ALL);
  int a = open_rw (), b = open_rw (), c = open_rw ();
  cr_assert_eq (take (a, true, false, &e), 0, "%s", e.msg);
  /* force-share serves next to a writer ... */
  cr_assert_eq (take (b, true, true, &e), 0, "%s", e.msg);
  close (a);
  /* ... takes no "not shared" byte, but announces its write permission, so
   * a writer that does not share write is still refused */
  cr_assert (held (c, 101) && !held (c, 201) && !held (c, 203));
  cr_assert_eq (take (c, true, false, &e), -1);
  cr_assert (strstr (e.msg, "failed to get shared \"write\" lock"), "%s", e.msg);
  close (b); close (c);
}

Test (imagelock, release_and_probe)
{
  struct cbw_err e = { 0 };
  unsigned perm, shared;
  cbw_imagelock_perms (true, false, &perm, &shared);
  cr_assert_eq (cbw_imagelock_probe (path, perm, shared, &e), 0, "%s", e.msg);
  int a = open_rw ();
  cr_assert_eq (take (a, true, false, &e), 0, "%s", e.msg);
  cr_assert_eq (cbw_imagelock_probe (path, perm, shared, &e), -1);
  cr_assert_eq (e.errnum, EBUSY);
  cbw_imagelock_release (a);
  cr_assert_eq (cbw_imagelock_probe (path, perm, shared, &e), 0, "%s", e.msg);
  close (a);
  cr_assert_eq (cbw_imagelock_probe ("/nonexistent/cbw-image", perm, shared, &e), -1);
  cr_assert_eq (e.errnum, ENOENT);
}
