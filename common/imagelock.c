/* cbw — common/imagelock.c: QEMU-compatible image locks (see imagelock.h).
 *
 * Every byte is locked and tested with its own fcntl (as QEMU does), so the
 * bytes of two users interleave freely.  The error texts follow QEMU's,
 * prefixed with the file and the hint that the holder is unknown.
 *
 * Locking (threads): none; no state.  Messages use strerrordesc_np, not
 * strerror (glibc's locale lock is unusable in nbdkit under a preloaded ASan
 * runtime).
 */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "imagelock.h"

static const char *
errstr (int e)
{
  const char *s = strerrordesc_np (e);
  return s ? s : "Unknown error";
}

const char *
cbw_imagelock_perm_name (unsigned bit)
{
  switch (bit) {
  case CBW_PERM_CONSISTENT_READ: return "consistent read";
  case CBW_PERM_WRITE: return "write";
  case CBW_PERM_WRITE_UNCHANGED: return "write unchanged";
  case CBW_PERM_RESIZE: return "resize";
  case CBW_PERM_GRAPH_MOD: return "change children";
  default: return "?";
  }
}

void
cbw_imagelock_perms (bool writable, bool force_share, unsigned *perm,
                     unsigned *shared)
{
  *perm = CBW_PERM_CONSISTENT_READ | (writable ? CBW_PERM_WRITE : 0);
  *shared = force_share ? CBW_PERM_ALL
    : CBW_PERM_ALL & ~(CBW_PERM_WRITE | CBW_PERM_RESIZE);
}

static int
lock_byte (int fd, int off, short type)
{
  struct flock fl = {
    .l_type = type, .l_whence = SEEK_SET, .l_start = off, .l_len = 1,
  };
  int r;
  do r = fcntl (fd, F_OFD_SETLK, &fl); while (r == -1 && errno == EINTR);
  return r;
}

/* 1 if another open file description holds a lock on byte off, 0 if not,
 * -1 with errno on failure. */
static int
byte_taken (int fd, int off)
{
  struct flock fl = {
    .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = off, .l_len = 1,
  };
  int r;
  do r = fcntl (fd, F_OFD_GETLK, &fl); while (r == -1 && errno == EINTR);
  if (r == -1)
    return -1;
  return fl.l_type != F_UNLCK;
}

void
cbw_imagelock_release (int fd)
{
  struct flock fl = {
    .l_type = F_UNLCK, .l_whence = SEEK_SET,
    .l_start = CBW_LOCK_PERM_BASE,
    .l_len = CBW_LOCK_SHARED_BASE + 100 - CBW_LOCK_PERM_BASE,
  };
  int e = errno;
  while (fcntl (fd, F_OFD_SETLK, &fl) == -1 && errno == EINTR)
    ;
  errno = e;
}

int
cbw_imagelock_acquire (int fd, const char *path, unsigned perm,
                       unsigned shared, bool test, struct cbw_err *err)
{
  int e;

  for (unsigned i = 0; (1u << i) <= CBW_PERM_ALL; i++) {
    unsigned bit = 1u << i;
    if ((perm & bit) && lock_byte (fd, CBW_LOCK_PERM_BASE + (int) i, F_RDLCK) == -1)
      goto lock_failed;
    if (!(shared & bit) &&
        lock_byte (fd, CBW_LOCK_SHARED_BASE + (int) i, F_RDLCK) == -1)
      goto lock_failed;
  }
  if (!test)
    return 0;
  /* Our own bytes never show up here: F_OFD_GETLK ignores the locks of the
   * description it is called on. */
  for (unsigned i = 0; (1u << i) <= CBW_PERM_ALL; i++) {
    unsigned bit = 1u << i;
    int r = 0;
    if ((perm & bit) && (r = byte_taken (fd, CBW_LOCK_SHARED_BASE + (int) i)) != 0) {
      if (r < 0)
        goto test_failed;
      cbw_imagelock_release (fd);
      return cbw_err_set (err, EBUSY, "%s: locked by another process (QEMU/qemu-nbd?): "
                          "failed to get \"%s\" lock", path, cbw_imagelock_perm_name (bit));
    }
  }
  for (unsigned i = 0; (1u << i) <= CBW_PERM_ALL; i++) {
    unsigned bit = 1u << i;
    int r = 0;
    if (!(shared & bit) && (r = byte_taken (fd, CBW_LOCK_PERM_BASE + (int) i)) != 0) {
      if (r < 0)
        goto test_failed;
      cbw_imagelock_release (fd);
      return cbw_err_set (err, EBUSY, "%s: locked by another process (QEMU/qemu-nbd?): "
                          "failed to get shared \"%s\" lock", path,
                          cbw_imagelock_perm_name (bit));
    }
  }
  return 0;

 lock_failed:
  e = errno;
  cbw_imagelock_release (fd);
  if (e == EAGAIN || e == EACCES)   /* only a write lock blocks ours */
    return cbw_err_set (err, EBUSY, "%s: locked by another process: an exclusive "
                        "lock is held on cbw's/QEMU's lock bytes", path);
  return cbw_err_set (err, e, "%s: cannot take the image lock (F_OFD_SETLK): %s%s",
                      path, errstr (e), e == EINVAL || e == ENOLCK || e == EOPNOTSUPP
                      ? " (a filesystem without byte-range locks?)" : "");
 test_failed:
  e = errno;
  cbw_imagelock_release (fd);
  return cbw_err_set (err, e, "%s: cannot test the image lock (F_OFD_GETLK): %s",
                      path, errstr (e));
}

int
cbw_imagelock_serve (int fd, const char *path, bool writable, bool force_share,
                     struct cbw_err *err)
{
  unsigned perm, shared;
  cbw_imagelock_perms (writable, force_share, &perm, &shared);
  if (cbw_imagelock_acquire (fd, path, perm, shared, !force_share, err) == -1) {
    if (!force_share)
      return -1;
    if (err)
      err->errnum = 0;
  }
  return 0;
}

int
cbw_imagelock_probe (const char *path, unsigned perm, unsigned shared,
                     struct cbw_err *err)
{
  int fd = open (path, O_RDONLY | O_CLOEXEC | O_NONBLOCK), r;
  if (fd == -1)
    return cbw_err_set (err, errno, "%s: open: %s", path, errstr (errno));
  r = cbw_imagelock_acquire (fd, path, perm, shared, true, err);
  close (fd);
  return r;
}
