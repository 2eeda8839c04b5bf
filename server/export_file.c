/* cbw — server/export_file.c: raw-file exports.
 *
 *  type=store  the backup target the cbw filter pushes old blocks to: a
 *              writable, sparse raw file.  TRIM and WRITE_ZEROES punch holes
 *              (space is released); an optional limit caps the bytes actually
 *              allocated on the host: a write that would allocate past it
 *              fails with ENOSPC before touching the file, so a runaway
 *              backup fails that backup and never fills the host's disk.
 *  type=file   a read-only raw file or block device (a stopped VM's disk)
 *              served with its bitmaps for offline backups.
 *
 * direct=on (stores): WRITEs whose payload, length and offset are
 * CBW_DIRECT_ALIGN-aligned (payloads of 64 KiB and more come page-aligned
 * from common/bufcache) go to a second descriptor opened with O_DIRECT,
 * past the page cache; reads stay buffered, readahead off.  Why, in
 * common/fileutil.h (cbw_open_direct).  Such writes skip the loop's
 * RWF_NOWAIT fast path.
 *
 * Locking: the fd is shared by every worker thread (pread/pwrite are
 * positional).  `lock` guards only `reserved` (bytes promised to writes in
 * flight under the limit); it is held for arithmetic, never across a
 * syscall that does I/O.  Allocation accounting: allocated-on-disk (fstat
 * st_blocks) + reserved + what this write may newly allocate must stay
 * <= limit.  The estimate is conservative (over-counts, never under-counts).
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "cleanup.h"
#include "export.h"
#include "fileutil.h"
#include "nbd_proto.h"

struct file_priv {
  int fd;
  int dfd;                     /* O_DIRECT (direct=on), or -1 */
  _Atomic bool direct;         /* use dfd for aligned writes */
  bool readonly;
  uint64_t limit;              /* 0 = none */
  uint64_t blksize;            /* allocation unit for accounting */
  pthread_mutex_t lock;        /* guards reserved */
  uint64_t reserved;
  char *path;
  bool no_nowait_read, no_nowait_write;   /* RWF_NOWAIT unsupported (atomic) */
};

static uint64_t
allocated_bytes (struct file_priv *p)
{
  struct stat st;
  if (fstat (p->fd, &st) == -1)
    return UINT64_MAX;
  return (uint64_t) st.st_blocks * 512;
}

/* Upper bound of the bytes a write of [off, off+len) may newly allocate:
 * the holes in the range, rounded out to the allocation unit. */
static uint64_t
unallocated_in_range (struct file_priv *p, uint64_t off, uint64_t len)
{
  uint64_t bs = p->blksize;
  uint64_t start = off / bs * bs, end = (off + len + bs - 1) / bs * bs;
  uint64_t need = 0, o = start;
  while (o < end) {
    off_t d = lseek (p->fd, o, SEEK_DATA);
    if (d == -1) {             /* ENXIO: only hole till EOF; other: assume all */
      need += end - o;
      break;
    }
    if ((uint64_t) d > o)
      need += ((uint64_t) d < end ? (uint64_t) d : end) - o;
    if ((uint64_t) d >= end) break;
    off_t h = lseek (p->fd, d, SEEK_HOLE);
    if (h == -1) break;
    o = (uint64_t) h / bs * bs;
    if (o <= (uint64_t) d) o = (uint64_t) d + bs;  /* hole inside a unit: count from next */
  }
  return need;
}

/* Reserve room for a write; 0 or -1 with ENOSPC in *err. *res_out is what to
 * release after the write. */
static int
reserve (struct file_priv *p, uint64_t off, uint64_t len, uint64_t *res_out,
         struct cbw_err *err)
{
  *res_out = 0;
  if (p->limit == 0)
    return 0;
  uint64_t bs = p->blksize;
  uint64_t worst = (off + len + bs - 1) / bs * bs - off / bs * bs;
  uint64_t alloc = allocated_bytes (p);
  uint64_t need = worst;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&p->lock);
    if (alloc + p->reserved + worst <= p->limit) {
      p->reserved += worst;
      *res_out = worst;
      return 0;
    }
  }
  /* Close to the limit: count precisely (outside the lock). */
  need = unallocated_in_range (p, off, len);
  alloc = allocated_bytes (p);
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&p->lock);
  if (alloc + p->reserved + need > p->limit)
    return cbw_err_set (err, ENOSPC,
                        "%s: store limit reached (%llu bytes allocated, %llu in "
                        "flight, %llu needed, limit %llu)", p->path,
                        (unsigned long long) alloc, (unsigned long long) p->reserved,
                        (unsigned long long) need, (unsigned long long) p->limit);
  p->reserved += need;
  *res_out = need;
  return 0;
}

static void
unreserve (struct file_priv *p, uint64_t r)
{
  if (r == 0) return;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&p->lock);
  p->reserved -= r;
}

static int
errno_err (struct cbw_err *err, struct file_priv *p, const char *what, uint64_t off)
{
  int e = errno ? errno : EIO;
  return cbw_err_set (err, e, "%s: %s at offset %llu: %s", p->path, what,
                      (unsigned long long) off, strerror (e));
}

static int
file_pread (struct cbwd_export *e, void *buf, uint32_t len, uint64_t off,
            struct cbwd_holes *holes, struct cbw_err *err)
{
  struct file_priv *p = e->priv;
  if (holes) {
    /* Record holes of at least 4 KiB; read only the data parts. */
    uint64_t end = off + len, o = off;
    off_t h = lseek (p->fd, off, SEEK_HOLE);
    if (h != -1 && (uint64_t) h < end) {
      while (o < end) {
        off_t d = lseek (p->fd, o, SEEK_DATA);
        uint64_t dstart = (d == -1) ? end : ((uint64_t) d < end ? (uint64_t) d : end);
        if (dstart > o) {
          memset ((uint8_t *) buf + (o - off), 0, dstart - o);
          if (cbwd_holes_add (holes, o - off, dstart - o) == -1)
            return cbw_err_set (err, ENOMEM, "out of memory");
        }
        if (dstart >= end) break;
        off_t hh = lseek (p->fd, dstart, SEEK_HOLE);
        uint64_t dend = (hh == -1) ? end : ((uint64_t) hh < end ? (uint64_t) hh : end);
        if (dend <= dstart) dend = end;
        if (cbw_pread_full (p->fd, (uint8_t *) buf + (dstart - off), dend - dstart, dstart) == -1)
          return errno_err (err, p, "read", dstart);
        o = dend;
      }
      return 0;
    }
  }
  if (cbw_pread_full (p->fd, buf, len, off) == -1)
    return errno_err (err, p, "read", off);
  return 0;
}

static int
file_pwrite (struct cbwd_export *e, const void *buf, uint32_t len, uint64_t off,
             bool fua, struct cbw_err *err)
{
  struct file_priv *p = e->priv;
  uint64_t res;
  if (reserve (p, off, len, &res, err) == -1)
    return -1;
  int r = cbw_pwrite_maybe_direct (p->fd, p->dfd, &p->direct, buf, len, off) == -1
    ? -1 : 0;
  if (r == 0 && fua)
    r = cbw_fdatasync (p->fd);
  int saved = errno;
  unreserve (p, res);
  errno = saved;
  if (r == -1)
    return errno_err (err, p, "write", off);
  return 0;
}

static int
file_trim (struct cbwd_export *e, uint32_t len, uint64_t off, bool fua,
           struct cbw_err *err)
{
  struct file_priv *p = e->priv;
  if (fallocate (p->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len) == -1) {
    if (errno == EOPNOTSUPP)
      return 0;                     /* trim is advisory */
    return errno_err (err, p, "punch hole", off);
  }
  if (fua && cbw_fdatasync (p->fd) == -1)
    return errno_err (err, p, "fdatasync", off);
  return 0;
}

static int
file_zero (struct cbwd_export *e, uint32_t len, uint64_t off, bool may_trim,
           bool fast, bool fua, struct cbw_err *err)
{
  struct file_priv *p = e->priv;
  int r = -1;
  if (may_trim) {
    r = fallocate (p->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len);
    if (r == -1 && errno != EOPNOTSUPP)
      return errno_err (err, p, "punch hole", off);
  }
  if (r == -1) {
    uint64_t res;
    if (reserve (p, off, len, &res, err) == -1)
      return -1;
    r = fallocate (p->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, off, len);
    if (r == -1 && errno == EOPNOTSUPP) {
      if (fast) {
        unreserve (p, res);
        return cbw_err_set (err, ENOTSUP, "%s: fast zero not supported", p->path);
      }
      /* Slow path: write zeroes in 1 MiB pieces. */
      static const uint8_t zbuf[1024 * 1024];
      uint64_t o = off, end = off + len;
      r = 0;
      while (o < end && r == 0) {
        uint64_t n = end - o < sizeof zbuf ? end - o : sizeof zbuf;
        r = cbw_pwrite_full (p->fd, zbuf, n, o);
        o += n;
      }
    }
    int saved = errno;
    unreserve (p, res);
    errno = saved;
    if (r == -1)
      return errno_err (err, p, "write zeroes", off);
  }
  if (fua && cbw_fdatasync (p->fd) == -1)
    return errno_err (err, p, "fdatasync", off);
  return 0;
}

static int
file_flush (struct cbwd_export *e, struct cbw_err *err)
{
  struct file_priv *p = e->priv;
  if (p->readonly)
    return 0;
  if (cbw_fdatasync (p->fd) == -1)
    return errno_err (err, p, "fdatasync", 0);
  return 0;
}

static int
file_cache (struct cbwd_export *e, uint32_t len, uint64_t off, struct cbw_err *err)
{
  struct file_priv *p = e->priv;
  int r = posix_fadvise (p->fd, off, len, POSIX_FADV_WILLNEED);
  if (r != 0 && r != ESPIPE) {
    errno = r;
    return errno_err (err, p, "fadvise", off);
  }
  return 0;
}

static int
file_block_status (struct cbwd_export *e, uint64_t off, struct cbwd_extents *x,
                   struct cbw_err *err)
{
  struct file_priv *p = e->priv;
  uint64_t o = off, end = e->size;
  while (o < end) {
    off_t d = lseek (p->fd, o, SEEK_DATA);
    int r;
    if (d == -1 && errno != ENXIO) {
      /* No SEEK_DATA support: report everything as data. */
      r = cbwd_extents_add (x, end - o, 0);
      if (r == -1) return cbw_err_set (err, ENOMEM, "out of memory");
      return 0;
    }
    uint64_t dstart = (d == -1 || (uint64_t) d > end) ? end : (uint64_t) d;
    if (dstart > o) {
      r = cbwd_extents_add (x, dstart - o, NBD_STATE_HOLE | NBD_STATE_ZERO);
      if (r == -1) return cbw_err_set (err, ENOMEM, "out of memory");
      if (r == 1) return 0;
    }
    if (dstart >= end) break;
    off_t h = lseek (p->fd, dstart, SEEK_HOLE);
    uint64_t dend = (h == -1 || (uint64_t) h > end) ? end : (uint64_t) h;
    if (dend <= dstart) dend = end;
    r = cbwd_extents_add (x, dend - dstart, 0);
    if (r == -1) return cbw_err_set (err, ENOMEM, "out of memory");
    if (r == 1) return 0;
    o = dend;
  }
  return 0;
}

/* Loop-thread fast paths: RWF_NOWAIT never blocks (EAGAIN when the data is
 * not in the page cache or the write would block); anything short of the
 * whole request goes to the pool, which redoes it (idempotent). */
static int
file_pread_nowait (struct cbwd_export *e, void *buf, uint32_t len, uint64_t off)
{
  struct file_priv *p = e->priv;
  if (__atomic_load_n (&p->no_nowait_read, __ATOMIC_RELAXED))
    return -1;
  struct iovec iov = { buf, len };
  ssize_t r = preadv2 (p->fd, &iov, 1, off, RWF_NOWAIT);
  if (r == -1 && (errno == EOPNOTSUPP || errno == EINVAL || errno == ENOSYS))
    __atomic_store_n (&p->no_nowait_read, true, __ATOMIC_RELAXED);
  return r == (ssize_t) len ? 0 : -1;
}

static int
file_pwrite_nowait (struct cbwd_export *e, const void *buf, uint32_t len, uint64_t off)
{
  struct file_priv *p = e->priv;
  if (p->limit || __atomic_load_n (&p->no_nowait_write, __ATOMIC_RELAXED) ||
      cbw_direct_aligned (&p->direct, buf, len, off))
    return -1;
  struct iovec iov = { (void *) buf, len };
  ssize_t r = pwritev2 (p->fd, &iov, 1, off, RWF_NOWAIT);
  if (r == -1 && (errno == EOPNOTSUPP || errno == EINVAL || errno == ENOSYS))
    __atomic_store_n (&p->no_nowait_write, true, __ATOMIC_RELAXED);
  return r == (ssize_t) len ? 0 : -1;
}

static void
file_close (struct cbwd_export *e)
{
  struct file_priv *p = e->priv;
  if (!p) return;
  if (p->fd >= 0) close (p->fd);
  if (p->dfd >= 0) close (p->dfd);
  pthread_mutex_destroy (&p->lock);
  free (p->path);
  free (p);
  e->priv = NULL;
}

static const struct cbwd_export_ops store_ops = {
  .type = "store",
  .pread = file_pread, .pwrite = file_pwrite, .zero = file_zero,
  .trim = file_trim, .flush = file_flush, .cache = file_cache,
  .block_status = file_block_status, .close = file_close,
  .pread_nowait = file_pread_nowait, .pwrite_nowait = file_pwrite_nowait,
};
static const struct cbwd_export_ops file_ops = {
  .type = "file",
  .pread = file_pread, .pwrite = file_pwrite, .zero = file_zero,
  .trim = file_trim, .flush = file_flush, .cache = file_cache,
  .block_status = file_block_status, .close = file_close,
  .pread_nowait = file_pread_nowait,
};

struct cbwd_export *
cbwd_export_file_new (const char *name, const struct cbwd_store_opts *o,
                      struct cbw_err *err)
{
  struct cbwd_export *e = calloc (1, sizeof *e);
  struct file_priv *p = calloc (1, sizeof *p);
  if (!e || !p || !(e->name = strdup (name)) || !(p->path = strdup (o->path))) {
    if (e) free (e->name);
    if (p) free (p->path);
    free (e); free (p);
    cbw_err_set (err, ENOMEM, "out of memory");
    return NULL;
  }
  p->fd = p->dfd = -1;
  pthread_mutex_init (&p->lock, NULL);
  e->refs = 1;
  e->priv = p;
  e->ops = o->readonly ? &file_ops : &store_ops;
  p->readonly = o->readonly;
  p->limit = o->limit;

  int flags = (o->readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC;
  if (o->create && !o->readonly)
    flags |= O_CREAT;
  p->fd = open (o->path, flags, 0600);
  if (p->fd == -1) {
    cbw_err_set (err, errno, "export '%s': open %s: %s", name, o->path, strerror (errno));
    goto fail;
  }
  struct stat st;
  if (fstat (p->fd, &st) == -1) {
    cbw_err_set (err, errno, "export '%s': stat %s: %m", name, o->path);
    goto fail;
  }
  p->blksize = st.st_blksize > 0 ? (uint64_t) st.st_blksize : 4096;
  off_t end = lseek (p->fd, 0, SEEK_END);
  if (end == -1) {
    cbw_err_set (err, errno, "export '%s': size of %s: %m", name, o->path);
    goto fail;
  }
  e->size = (uint64_t) end;
  if (o->size && e->size != o->size) {
    if (e->size == 0 && !o->readonly && S_ISREG (st.st_mode)) {
      if (ftruncate (p->fd, o->size) == -1) {
        cbw_err_set (err, errno, "export '%s': truncate %s to %llu: %m", name,
                     o->path, (unsigned long long) o->size);
        goto fail;
      }
      e->size = o->size;
    }
    else {
      cbw_err_set (err, EINVAL, "export '%s': %s has size %llu, configured size is %llu",
                   name, o->path, (unsigned long long) e->size,
                   (unsigned long long) o->size);
      goto fail;
    }
  }
  if (e->size == 0) {
    cbw_err_set (err, EINVAL, "export '%s': %s is empty (give size= to create a store)",
                 name, o->path);
    goto fail;
  }

  if (o->direct) {
    p->dfd = cbw_open_direct (o->path, p->fd);
    if (p->dfd == -1) {
      int en = errno;
      cbw_err_set (err, en, "export '%s': direct=on: open %s with O_DIRECT: %s%s", name,
                   o->path, strerror (en),
                   en == EINVAL ? " (this filesystem has no direct I/O)" : "");
      goto fail;
    }
    atomic_store (&p->direct, true);
  }

  e->eflags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_CAN_MULTI_CONN | NBD_FLAG_SEND_CACHE;
  if (o->readonly)
    e->eflags |= NBD_FLAG_READ_ONLY;
  else
    e->eflags |= NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM |
      NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;

  struct cbwd_meta m;
  if (cbwd_meta_base_init (&m) == -1) { cbw_err_set (err, ENOMEM, "out of memory"); goto fail; }
  if (cbwd_export_add_meta (e, &m, err) == -1) { m.free (&m); goto fail; }
  if (cbwd_meta_depth_init (&m) == -1) { cbw_err_set (err, ENOMEM, "out of memory"); goto fail; }
  if (cbwd_export_add_meta (e, &m, err) == -1) { m.free (&m); goto fail; }
  return e;

 fail:
  cbwd_export_free (e);
  return NULL;
}
