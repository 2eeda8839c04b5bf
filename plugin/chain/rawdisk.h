/* cbw — plugin/chain/rawdisk.h: the raw layer of the chain plugin: I/O on a
 * raw file or block device through one file descriptor.
 *
 * It is the whole data path when the chain has no overlay (chain.c calls it
 * directly from the nbdkit callbacks), and the base layer under overlays.
 * It knows nothing about nbdkit: failures fill a struct cbw_err (errnum +
 * a message naming the file) that the caller turns into nbdkit_error.
 *
 * Thread-safety: every I/O function may be called concurrently from any
 * number of threads (pread/pwrite/fallocate on a shared fd).  With
 * direct=true, requests not aligned to rawdisk_align() go through bounce
 * buffers, and writes that need read-modify-write reserve their aligned
 * range first (see rawdisk.c), so concurrent writes to different bytes of
 * one block never lose each other.
 */
#ifndef CBW_RAWDISK_H
#define CBW_RAWDISK_H

#include <stdbool.h>
#include <stdint.h>

#include "cbw_err.h"

struct rawdisk;

struct rawdisk_opts {
  bool readonly;                 /* open O_RDONLY, reject writes */
  bool direct;                   /* O_DIRECT, bounce unaligned requests */
  bool force_share;              /* image lock without exclusivity (see rawdisk.c) */
};

/* Open PATH: a regular file or a block device, and lock it as QEMU does
 * (common/imagelock.h) for as long as it is open.  Clear errors (ENOENT,
 * EACCES, EISDIR, ENODEV for other file types, EINVAL for O_DIRECT not
 * supported, EBUSY for an image another process holds or a block device in
 * exclusive use, ...). */
struct rawdisk *rawdisk_open (const char *path, const struct rawdisk_opts *o,
                              struct cbw_err *err);
void rawdisk_close (struct rawdisk *d);

struct rawdisk_info {
  const char *path;
  uint64_t size;
  bool readonly, direct, block_device;
  uint32_t align;                /* direct I/O alignment (1 if !direct) */
  bool can_extents;              /* SEEK_DATA/SEEK_HOLE work */
  bool can_punch_hole;           /* last known; may turn false at run time */
  bool can_zero_range;
  bool can_discard;              /* block devices: BLKDISCARD */
};
void rawdisk_get_info (const struct rawdisk *d, struct rawdisk_info *info);
uint64_t rawdisk_size (const struct rawdisk *d);
uint32_t rawdisk_align (const struct rawdisk *d);

int rawdisk_pread (struct rawdisk *d, void *buf, uint32_t count,
                   uint64_t offset, struct cbw_err *err);
/* fua: data durable before return. */
int rawdisk_pwrite (struct rawdisk *d, const void *buf, uint32_t count,
                    uint64_t offset, bool fua, struct cbw_err *err);
/* Make the range read as zeroes.  may_trim: deallocating is allowed.
 * fast: fail with ENOTSUP rather than do anything slower than a metadata
 * operation.  Fails with ENOTSUP when there is no efficient way, so that the
 * caller (nbdkit) falls back to writing zeroes. */
int rawdisk_zero (struct rawdisk *d, uint32_t count, uint64_t offset,
                  bool may_trim, bool fast, bool fua, struct cbw_err *err);
/* Advisory deallocation (punch hole / BLKDISCARD); unsupported = no-op. */
int rawdisk_trim (struct rawdisk *d, uint32_t count, uint64_t offset,
                  bool fua, struct cbw_err *err);
int rawdisk_flush (struct rawdisk *d, struct cbw_err *err);
/* Prefetch hint (posix_fadvise WILLNEED); no-op with direct=true. */
int rawdisk_cache (struct rawdisk *d, uint32_t count, uint64_t offset,
                   struct cbw_err *err);

/* Extents of [offset, offset+count) (clipped to the size), in order and
 * contiguous.  type: RAWDISK_HOLE|RAWDISK_ZERO for holes, 0 for data.
 * req_one: stop after the first extent.  The callback returns 0 or -1 (and
 * then fills err itself). */
#define RAWDISK_HOLE 1
#define RAWDISK_ZERO 2
typedef int (*rawdisk_extent_fn) (void *opaque, uint64_t offset, uint64_t len,
                                  uint32_t type, struct cbw_err *err);
int rawdisk_extents (struct rawdisk *d, uint32_t count, uint64_t offset,
                     bool req_one, rawdisk_extent_fn fn, void *opaque,
                     struct cbw_err *err);

#endif
