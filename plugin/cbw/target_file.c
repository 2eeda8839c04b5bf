/* cbw — plugin/cbw/target_file.c: a backup target that is a local file or
 * block device (`file:///PATH`), written with plain system calls.
 *
 * Why: a copy to an NBD target costs a round trip to another process (two
 * context switches per request on our side and as many in the server), which
 * on a small or paravirtualised host costs more than the guest write it
 * protects.  A local target turns each copy into one pread of the old data
 * and one pwrite, done in the thread of the guest write: no hand-off, no
 * waiting for another process.  It is the same kind of target as QEMU's
 * fleecing image (a local file of the host).
 *
 * What a local target cannot do: a system call cannot be given a deadline,
 * so cbw-timeout bounds only the NBD target kinds; a local filesystem that
 * hangs hangs the guest write (as it would hang the disk itself).  A full
 * filesystem (ENOSPC) and I/O errors are ordinary copy errors, handled by
 * the session's on-cbw-error policy.
 *
 * The file must exist (it is the operator's, like a QEMU fleecing image):
 * a regular file (sparse is fine; it grows as blocks are copied) or a block
 * device, at least as large as the disk.  Zeroes are written as holes
 * (fallocate punch-hole, else zero-range, else written zeroes); trims punch
 * holes when the filesystem can.
 *
 * Space limit (cbw_file_target_set_limit, begin's "target-limit"): the bytes
 * allocated to the file on the host (st_blocks) plus the bytes of writes in
 * flight never exceed the limit; a write that would is refused with ENOSPC
 * before it is issued (a failed copy, handled by the policy), so a backup can
 * never fill the host's disk.  The count is conservative, like cbwd's store
 * export: `alloc` is the allocation seen at the last fstat plus every byte
 * written since (overwrites and holes punched are counted back only at the
 * next fstat, which happens when the estimate gets close to the limit).
 *
 * Direct writes (cbw_file_target_set_direct, begin's "target-direct"):
 * copies whose buffer, length and offset are CBW_DIRECT_ALIGN-aligned go to
 * a second descriptor opened with O_DIRECT, the rest (small copies, the
 * disk's last partial block) through the page cache; why, and why readahead
 * is turned off, in common/fileutil.h (cbw_open_direct).  The copy buffers
 * of 64 KiB and more from common/bufcache are page-aligned.  Our reads of
 * the target are point-in-time reads of blocks already copied; no other
 * process may read the file while the session runs (cbwd's direct reads,
 * store-file=, would bring their own readahead).  bench/cbw/results.md
 * compares the 1 MiB pass over a just-begun session with and without
 * target-direct.
 *
 * Copies inside the kernel (cbw_file_target_copy_from): when the operator
 * names the raw image under the filter (cbw-source), the old data of a
 * block goes from the image to the target without passing through user
 * space: FICLONERANGE where the filesystem shares extents (btrfs, xfs with
 * reflink: no data is copied at all), else copy_file_range (ext4: one copy
 * between page-cache pages instead of a pread into our buffer and a pwrite
 * out of it).  Holes of the image (SEEK_DATA/SEEK_HOLE) become holes of the
 * target, as the zero detection of the user-space copy makes them.  Any
 * failure hands the range back to the caller, which copies it through user
 * space from the start (rewriting what the kernel may already have
 * written is harmless: the blocks are still COPYING, nobody reads them
 * from the target yet); a method the filesystem does not have (EXDEV,
 * EOPNOTSUPP, ENOSYS, EINVAL, ENOTTY) is turned off for the rest of the
 * session.  A copy that comes back short is continued; one that returns 0
 * before the end (the image shrank), or an image shorter than the range,
 * is a failure, never a hole.
 *
 * Threads and locking: no locks.  The fds are opened before the target is
 * shared and only read afterwards; pread/pwrite/fallocate on one fd are safe
 * from many threads.  `direct` only goes from true to false.
 * `can_punch` / `can_zero_range` are atomics that only ever go from true to
 * false (the first EOPNOTSUPP turns a method off for everyone).  `alloc` and
 * `inflight` are atomics; `limit` is set before the target is shared.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <limits.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <linux/fs.h>

#include "cleanup.h"
#include "fileutil.h"
#include "target_file.h"

struct cbw_file_target {
  int fd;
  int dfd;                      /* O_DIRECT, or -1 */
  _Atomic bool direct;          /* use dfd for aligned writes */
  _Atomic uint64_t direct_bytes;
  char *path;
  int64_t size;
  bool is_block;
  _Atomic bool can_punch;
  _Atomic bool can_zero_range;
  _Atomic bool can_clone;       /* FICLONERANGE; only goes true -> false */
  _Atomic bool can_copy_range;  /* copy_file_range; likewise */
  _Atomic uint64_t cloned_bytes, kcopied_bytes;
  uint64_t limit;               /* 0: none */
  _Atomic uint64_t alloc;       /* estimate, >= the real allocation */
  _Atomic uint64_t inflight;    /* bytes of writes being issued */
};

/* file:///abs/path or file:/abs/path -> the path (no query strings or
 * percent escapes: a file name is taken literally).  A relative path would
 * depend on nbdkit's working directory: refused. */
static const char *
uri_path (const char *uri)
{
  const char *p = uri + strlen (CBW_FILE_TARGET_PREFIX);
  if (strncmp (p, "//", 2) == 0) {
    p += 2;
    if (*p != '/')            /* file://host/path: no remote files */
      return NULL;
  }
  return *p == '/' ? p : NULL;
}

bool
cbw_file_target_uri (const char *uri)
{
  return strncmp (uri, CBW_FILE_TARGET_PREFIX,
                  strlen (CBW_FILE_TARGET_PREFIX)) == 0;
}

struct cbw_file_target *
cbw_file_target_open (const char *uri, struct cbw_err *err)
{
  struct cbw_file_target *t;
  const char *path = uri_path (uri);
  struct stat st;

  if (path == NULL) {
    cbw_err_set (err, EINVAL, "target %s: expected file:///ABSOLUTE/PATH", uri);
    return NULL;
  }
  t = calloc (1, sizeof *t);
  if (t == NULL || (t->path = strdup (path)) == NULL) {
    free (t);
    cbw_err_set (err, ENOMEM, "target: out of memory");
    return NULL;
  }
  t->dfd = -1;
  t->fd = open (path, O_RDWR | O_CLOEXEC | O_NOCTTY);
  if (t->fd == -1) {
    int e = errno;
    cbw_err_set (err, e, "target %s: open: %s%s", path, strerror (e),
                 e == ENOENT ? " (a local target must exist: create it, e.g. "
                 "truncate -s SIZE)" : "");
    goto fail;
  }
  if (fstat (t->fd, &st) == -1) {
    cbw_err_set (err, errno, "target %s: fstat: %s", path, strerror (errno));
    goto fail;
  }
  if (S_ISBLK (st.st_mode)) {
    uint64_t sz;
    if (ioctl (t->fd, BLKGETSIZE64, &sz) == -1) {
      cbw_err_set (err, errno, "target %s: BLKGETSIZE64: %s", path,
                   strerror (errno));
      goto fail;
    }
    t->is_block = true;
    t->size = (int64_t) sz;
  }
  else if (S_ISREG (st.st_mode))
    t->size = st.st_size;
  else {
    cbw_err_set (err, EINVAL, "target %s is neither a regular file nor a "
                 "block device", path);
    goto fail;
  }
  atomic_init (&t->direct, false);
  atomic_init (&t->direct_bytes, 0);
  atomic_init (&t->can_punch, true);
  atomic_init (&t->can_zero_range, !t->is_block);
  atomic_init (&t->can_clone, true);
  atomic_init (&t->can_copy_range, true);
  atomic_init (&t->cloned_bytes, 0);
  atomic_init (&t->kcopied_bytes, 0);
  return t;

 fail:
  cbw_file_target_close (t);
  return NULL;
}

void
cbw_file_target_close (struct cbw_file_target *t)
{
  if (t == NULL)
    return;
  if (t->fd >= 0)
    close (t->fd);
  if (t->dfd >= 0)
    close (t->dfd);
  free (t->path);
  free (t);
}

int64_t
cbw_file_target_size (const struct cbw_file_target *t)
{
  return t->size;
}

static uint64_t
allocated (const struct cbw_file_target *t)
{
  struct stat st;
  if (fstat (t->fd, &st) == -1)
    return UINT64_MAX;          /* unknown: refuse rather than overfill */
  return (uint64_t) st.st_blocks * 512;
}

void
cbw_file_target_set_limit (struct cbw_file_target *t, uint64_t limit)
{
  t->limit = limit;
  atomic_store (&t->alloc, allocated (t));
}

int
cbw_file_target_set_direct (struct cbw_file_target *t, struct cbw_err *err)
{
  if (t->dfd >= 0)
    return 0;
  t->dfd = cbw_open_direct (t->path, t->fd);
  if (t->dfd == -1) {
    int e = errno;
    return cbw_err_set (err, e, "target %s: open with O_DIRECT (target-direct): "
                        "%s%s", t->path, strerror (e), e == EINVAL
                        ? " (this filesystem has no direct I/O)" : "");
  }
  atomic_store (&t->direct, true);
  return 0;
}

uint64_t
cbw_file_target_direct_bytes (const struct cbw_file_target *t)
{
  return atomic_load_explicit (&t->direct_bytes, memory_order_relaxed);
}

/* Reserve len bytes under the limit (or fail with ENOSPC); every successful
 * reserve is paired with release(). */
static int
reserve (struct cbw_file_target *t, size_t len, struct cbw_err *err)
{
  if (t->limit == 0)
    return 0;
  uint64_t in = atomic_fetch_add (&t->inflight, len) + len;
  uint64_t a = atomic_load (&t->alloc);
  if (a > t->limit || in > t->limit - a) {
    a = allocated (t);          /* close to the limit: count precisely */
    atomic_store (&t->alloc, a);
    in = atomic_load (&t->inflight);
    if (a > t->limit || in > t->limit - a) {
      atomic_fetch_sub (&t->inflight, len);
      return cbw_err_set (err, ENOSPC, "target %s: limit reached (%llu bytes "
                          "allocated, %llu in flight, limit %llu)", t->path,
                          (unsigned long long) a,
                          (unsigned long long) (in - len),
                          (unsigned long long) t->limit);
    }
  }
  return 0;
}

static void
release (struct cbw_file_target *t, size_t len, bool written)
{
  if (t->limit == 0)
    return;
  if (written)
    atomic_fetch_add (&t->alloc, len);
  atomic_fetch_sub (&t->inflight, len);
}

static int
range_ok (const struct cbw_file_target *t, size_t len, uint64_t off,
          struct cbw_err *err)
{
  if (off > (uint64_t) t->size || len > (uint64_t) t->size - off)
    return cbw_err_set (err, ENOSPC, "target %s: range %zu@%llu past its end "
                        "(%lld bytes)", t->path, len, (unsigned long long) off,
                        (long long) t->size);
  return 0;
}

int
cbw_file_target_pwrite (struct cbw_file_target *t, const void *buf,
                        size_t len, uint64_t off, struct cbw_err *err)
{
  if (range_ok (t, len, off, err) == -1 || reserve (t, len, err) == -1)
    return -1;
  ssize_t direct = cbw_pwrite_maybe_direct (t->fd, t->dfd, &t->direct, buf,
                                            len, off);
  int e = errno;
  release (t, len, true);       /* on failure part may have been written */
  if (direct == -1)
    return cbw_err_set (err, e, "target %s: pwrite: %s", t->path, strerror (e));
  atomic_fetch_add_explicit (&t->direct_bytes, (uint64_t) direct,
                             memory_order_relaxed);
  return 0;
}

int
cbw_file_target_pread (struct cbw_file_target *t, void *buf, size_t len,
                       uint64_t off, struct cbw_err *err)
{
  char *p = buf;

  if (range_ok (t, len, off, err) == -1)
    return -1;
  while (len > 0) {
    ssize_t r = pread (t->fd, p, len, (off_t) off);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return cbw_err_set (err, errno, "target %s: pread: %s", t->path,
                          strerror (errno));
    }
    if (r == 0)               /* the file shrank under us: never invent data */
      return cbw_err_set (err, EIO, "target %s: unexpected end of file at "
                          "%llu", t->path, (unsigned long long) off);
    p += r; off += (uint64_t) r; len -= (size_t) r;
  }
  return 0;
}

static bool
unsupported (int e)
{
  return e == EOPNOTSUPP || e == ENOSYS || e == EINVAL;
}

int
cbw_file_target_zero (struct cbw_file_target *t, size_t len, uint64_t off,
                      struct cbw_err *err)
{
  static const char zeroes[64 * 1024];

  if (range_ok (t, len, off, err) == -1)
    return -1;
  if (!t->is_block && atomic_load (&t->can_punch)) {
    if (fallocate (t->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                   (off_t) off, (off_t) len) == 0)
      return 0;
    if (!unsupported (errno))
      return cbw_err_set (err, errno, "target %s: punch hole: %s", t->path,
                          strerror (errno));
    atomic_store (&t->can_punch, false);
  }
  if (atomic_load (&t->can_zero_range)) {
    /* zero-range allocates (unwritten extents): it counts like a write */
    if (reserve (t, len, err) == -1)
      return -1;
    int r = fallocate (t->fd, FALLOC_FL_ZERO_RANGE, (off_t) off, (off_t) len);
    release (t, len, true);
    if (r == 0)
      return 0;
    if (!unsupported (errno))
      return cbw_err_set (err, errno, "target %s: zero range: %s", t->path,
                          strerror (errno));
    atomic_store (&t->can_zero_range, false);
  }
  if (t->is_block) {
    uint64_t r[2] = { off, len };
    if (ioctl (t->fd, BLKZEROOUT, r) == 0)
      return 0;
  }
  while (len > 0) {
    size_t n = len < sizeof zeroes ? len : sizeof zeroes;
    if (cbw_file_target_pwrite (t, zeroes, n, off, err) == -1)
      return -1;
    off += n; len -= n;
  }
  return 0;
}

int
cbw_file_target_trim (struct cbw_file_target *t, size_t len, uint64_t off,
                      struct cbw_err *err)
{
  if (range_ok (t, len, off, err) == -1)
    return -1;
  /* A trim only gives space back: where the filesystem cannot punch holes
   * (or on a block device, where discard may not read back as zeroes and
   * the data no longer matters anyway) it is a no-op. */
  if (t->is_block || !atomic_load (&t->can_punch))
    return 0;
  if (fallocate (t->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                 (off_t) off, (off_t) len) == 0)
    return 0;
  if (unsupported (errno)) {
    atomic_store (&t->can_punch, false);
    return 0;
  }
  return cbw_err_set (err, errno, "target %s: punch hole: %s", t->path,
                      strerror (errno));
}

/* The system calls of the in-kernel copy, replaceable by unit tests that
 * need a short copy or a given errno (cbw_file_target_test_hooks). */
static ssize_t
sys_copy_range (int in, off_t *in_off, int out, off_t *out_off, size_t len)
{
  return copy_file_range (in, in_off, out, out_off, len, 0);
}

static int
sys_clone_range (int in, uint64_t in_off, int out, uint64_t out_off,
                 uint64_t len)
{
  struct file_clone_range r = {
    .src_fd = in, .src_offset = in_off, .src_length = len,
    .dest_offset = out_off,
  };
  return ioctl (out, FICLONERANGE, &r);
}

static cbw_copy_range_fn copy_range_fn = sys_copy_range;
static cbw_clone_range_fn clone_range_fn = sys_clone_range;

void
cbw_file_target_test_hooks (cbw_copy_range_fn copy, cbw_clone_range_fn clone)
{
  copy_range_fn = copy ? copy : sys_copy_range;
  clone_range_fn = clone ? clone : sys_clone_range;
}

/* The filesystem has no such method (as opposed to a failed copy). */
static bool
no_method (int e)
{
  return e == EXDEV || e == EOPNOTSUPP || e == ENOSYS || e == EINVAL ||
    e == ENOTTY;
}

/* Copy the data range [off,off+len) of src to the same offset of the
 * target, by clone else copy_file_range.  0, or -1 with *err. */
static int
copy_data (struct cbw_file_target *t, int src, size_t len, uint64_t off,
           struct cbw_err *err)
{
  uint64_t done = 0;

  if (atomic_load_explicit (&t->can_clone, memory_order_relaxed)) {
    if (clone_range_fn (src, off, t->fd, off, len) == 0) {
      atomic_fetch_add_explicit (&t->cloned_bytes, len, memory_order_relaxed);
      return 0;
    }
    /* EINVAL may only mean "not aligned to the filesystem's blocks" (a
     * range at the disk's end): the method stays on for the others. */
    if (errno != EINVAL && no_method (errno))
      atomic_store (&t->can_clone, false);
  }
  if (!atomic_load_explicit (&t->can_copy_range, memory_order_relaxed))
    return cbw_err_set (err, EOPNOTSUPP, "target %s: no in-kernel copy",
                        t->path);
  while (done < len) {
    off_t in_off = (off_t) (off + done), out_off = in_off;
    ssize_t r = copy_range_fn (src, &in_off, t->fd, &out_off, len - done);
    if (r == -1) {
      int e = errno;
      if (e == EINTR)
        continue;
      if (no_method (e))
        atomic_store (&t->can_copy_range, false);
      return cbw_err_set (err, e, "target %s: copy_file_range at %llu: %s",
                          t->path, (unsigned long long) (off + done),
                          strerror (e));
    }
    if (r == 0)                 /* the image is shorter: never invent data */
      return cbw_err_set (err, EIO, "target %s: copy_file_range: source "
                          "ends at %llu", t->path,
                          (unsigned long long) (off + done));
    done += (uint64_t) r;
    atomic_fetch_add_explicit (&t->kcopied_bytes, (uint64_t) r,
                               memory_order_relaxed);
  }
  return 0;
}

int
cbw_file_target_copy_from (struct cbw_file_target *t, int src, size_t len,
                           uint64_t off, uint64_t *holes, struct cbw_err *err)
{
  uint64_t pos = off, end = off + len, d, h;

  *holes = 0;
  if (!cbw_file_target_can_copy_from (t))
    return cbw_err_set (err, EOPNOTSUPP, "target %s: no in-kernel copy",
                        t->path);
  if (range_ok (t, len, off, err) == -1)
    return -1;
  while (pos < end) {
    off_t x = lseek (src, (off_t) pos, SEEK_DATA);
    if (x == -1 && errno == ENXIO)
      d = end;                  /* only a hole up to the end of the image */
    else if (x == -1)
      d = pos;                  /* no hole detection here: copy it all */
    else
      d = (uint64_t) x < end ? (uint64_t) x : end;
    if (d > pos && cbw_file_target_zero (t, d - pos, pos, err) == -1)
      return -1;
    *holes += d - pos;
    if ((pos = d) == end)
      break;
    x = lseek (src, (off_t) pos, SEEK_HOLE);
    h = x == -1 || (uint64_t) x > end ? end : (uint64_t) x;
    if (h <= pos)
      h = end;
    if (reserve (t, h - pos, err) == -1)
      return -1;
    int r = copy_data (t, src, h - pos, pos, err);
    release (t, h - pos, true);
    if (r == -1)
      return -1;
    pos = h;
  }
  /* Past the image's end SEEK_DATA finds "no data", which must not pass
   * for a hole: an image that is (or became, while we copied) shorter than
   * the range fails the copy.  Images never shrink back to grow again, so
   * looking once at the end covers the whole copy. */
  struct stat st;
  if (fstat (src, &st) == -1)
    return cbw_err_set (err, errno, "target %s: fstat of the source: %s",
                        t->path, strerror (errno));
  if ((uint64_t) st.st_size < end)
    return cbw_err_set (err, EIO, "target %s: the source ends at %lld, "
                        "before %llu", t->path, (long long) st.st_size,
                        (unsigned long long) end);
  return 0;
}

bool
cbw_file_target_can_copy_from (const struct cbw_file_target *t)
{
  /* A direct target keeps the copies out of the page cache; the kernel's
   * copy would put them back in. */
  return !atomic_load (&t->direct) &&
    (atomic_load (&t->can_clone) || atomic_load (&t->can_copy_range));
}

void
cbw_file_target_copy_stats (const struct cbw_file_target *t,
                            uint64_t *cloned, uint64_t *kcopied)
{
  *cloned = atomic_load_explicit (&t->cloned_bytes, memory_order_relaxed);
  *kcopied = atomic_load_explicit (&t->kcopied_bytes, memory_order_relaxed);
}
