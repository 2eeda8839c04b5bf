/* cbw — common/fileutil.h: small, careful file I/O helpers shared by formats/,
 * plugin/ and server/.
 *
 * All functions retry on EINTR and short transfers.  The crash-atomic update
 * rule of every on-disk format in cbw is implemented once, here, in
 * cbw_write_file_atomic(): write PATH.tmp, fsync it, rename over PATH, fsync
 * the directory.  No locking: callers serialise updates of one file.
 */
#ifndef CBW_FILEUTIL_H
#define CBW_FILEUTIL_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "cbw_err.h"

/* Read/write exactly len bytes at offset; return 0 or -1 with errno set.
 * cbw_pread_full returns -1/EIO ("unexpected end of file") on a short file. */
int cbw_pread_full (int fd, void *buf, size_t len, uint64_t offset);
int cbw_pwrite_full (int fd, const void *buf, size_t len, uint64_t offset);

/* fsync the directory containing PATH. */
int cbw_fsync_dir_of (const char *path, struct cbw_err *err);

/* Crash-atomic replace of PATH with the given bytes (see top comment). */
int cbw_write_file_atomic (const char *path, const void *buf, size_t len,
                           struct cbw_err *err);

/* Read a whole (small) file into a malloc'd, NUL-terminated buffer.
 * Fails with EFBIG if it is larger than max_len. */
int cbw_read_file (const char *path, size_t max_len, char **buf_out,
                   size_t *len_out, struct cbw_err *err);

/* fsync/fdatasync retrying on EINTR.  Every fsync in cbw goes through these,
 * so that a power-loss test hook has one place to hook. */
int cbw_fsync (int fd);
int cbw_fdatasync (int fd);

#endif
