/* cbw — common/fileutil.h: small, careful file I/O helpers shared by formats/,
 * plugin/ and server/.
 *
 * All functions retry on EINTR and short transfers.  The crash-atomic update
 * rule of every on-disk format in cbw is implemented once, here, in
 * cbw_write_file_atomic(): write a temp file beside PATH, fsync it, rename
 * over PATH, fsync the directory.  The temp file has a fresh random name and
 * is created with O_EXCL, so two writers (two processes, or two files whose
 * names share a prefix) never write into the same temp file.  A new file that
 * nothing references yet is created with cbw_write_file_new(), which never
 * replaces or truncates anything already there.  No locking: callers
 * serialise updates of one file.
 */
#ifndef CBW_FILEUTIL_H
#define CBW_FILEUTIL_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "cbw_err.h"

/* Read/write exactly len bytes at offset; return 0 or -1 with errno set.
 * cbw_pread_full returns -1/EIO ("unexpected end of file") on a short file. */
int cbw_pread_full (int fd, void *buf, size_t len, uint64_t offset);
/* The same, but bytes past the end of the file read as zero (a direct-I/O
 * read of a file's last, partial aligned block). */
int cbw_pread_full_or_zero (int fd, void *buf, size_t len, uint64_t offset);
int cbw_pwrite_full (int fd, const void *buf, size_t len, uint64_t offset);

/* Writes past the page cache, for backup targets (the cbw filter's
 * target-direct, cbwd's store direct=on).  A backup target is written once
 * and read once; through the page cache every copied byte takes a fresh page
 * and evicts the host's cached data (on a VM a fresh page also costs a first
 * touch in the hypervisor; bench/cbw/results.md has the figures).  Reads
 * stay buffered.
 *
 * cbw_open_direct: open PATH again with O_DIRECT and turn readahead off on
 * the buffered fd (POSIX_FADV_RANDOM): the writers' readers read a block only
 * after its write completed, and a direct write covers whole pages, so only
 * readahead could cache a page while its direct write is under way, a race
 * Linux does not keep coherent.  Returns the new fd, or -1 with errno
 * (EINVAL: the filesystem has no direct I/O, e.g. tmpfs).
 *
 * cbw_direct_aligned: would this write go to the direct fd (*direct set and
 * buf, len, off all CBW_DIRECT_ALIGN-aligned)?
 *
 * cbw_pwrite_maybe_direct: write exactly len bytes at off, through dfd if
 * cbw_direct_aligned, else through fd.  A direct write refused with EINVAL
 * (a device wanting a larger alignment) clears *direct for every later write
 * and is redone through fd.  Returns the bytes written directly (0 or len),
 * or -1 with errno. */
#define CBW_DIRECT_ALIGN 4096
int cbw_open_direct (const char *path, int fd);
bool cbw_direct_aligned (_Atomic bool *direct, const void *buf, size_t len,
                         uint64_t off);
ssize_t cbw_pwrite_maybe_direct (int fd, int dfd, _Atomic bool *direct,
                                 const void *buf, size_t len, uint64_t off);

/* fsync the directory containing PATH. */
int cbw_fsync_dir_of (const char *path, struct cbw_err *err);

/* Crash-atomic replace of PATH with the given bytes (see top comment).  The
 * temp file is PATH.tmp-HEX (16 random hex digits); a crash may leave one
 * behind, which nothing reads (safe to delete). */
int cbw_write_file_atomic (const char *path, const void *buf, size_t len,
                           struct cbw_err *err);

/* Create PATH (O_CREAT|O_EXCL, mode 0644 before umask) with the given bytes
 * and fsync it.  Anything already at PATH, a dangling symlink included, is
 * an error (EEXIST, the message names PATH) and is left untouched; a failed
 * write removes the file it created.  The caller fsyncs the directory. */
int cbw_write_file_new (const char *path, const void *buf, size_t len,
                        struct cbw_err *err);

/* Fill out[0..2*nbytes] with 2*nbytes lowercase hex digits of getrandom()
 * bytes and a NUL.  Returns 0, or -1 with errno. */
int cbw_random_hex (char *out, size_t nbytes);

/* Read a whole (small) file into a malloc'd, NUL-terminated buffer.
 * Fails with EFBIG if it is larger than max_len. */
int cbw_read_file (const char *path, size_t max_len, char **buf_out,
                   size_t *len_out, struct cbw_err *err);

/* fsync/fdatasync retrying on EINTR.  Every fsync in cbw goes through these,
 * so that a power-loss test hook has one place to hook. */
int cbw_fsync (int fd);
int cbw_fdatasync (int fd);

#endif
