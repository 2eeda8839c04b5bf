/* cbw — plugin/cbw/target_file.h: a backup target that is a local file or
 * block device (file:///PATH), used by target.c when the target URI has the
 * file: scheme.  See target_file.c for what it can and cannot do. */
#ifndef CBW_TARGET_FILE_H
#define CBW_TARGET_FILE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "cbw_err.h"

#define CBW_FILE_TARGET_PREFIX "file:"

struct cbw_file_target;

/* Is this URI a local-file target? */
bool cbw_file_target_uri (const char *uri);
struct cbw_file_target *cbw_file_target_open (const char *uri,
                                              struct cbw_err *err);
void cbw_file_target_close (struct cbw_file_target *t);
int64_t cbw_file_target_size (const struct cbw_file_target *t);
/* Cap the bytes allocated to the file on the host (0: no cap); set before
 * the target is used.  Writes past the cap fail with ENOSPC. */
void cbw_file_target_set_limit (struct cbw_file_target *t, uint64_t limit);
/* Write aligned copies with O_DIRECT, past the host's page cache (see
 * target_file.c); set before the target is used.  -1 with *err when the
 * file cannot be opened so (e.g. EINVAL: no direct I/O on tmpfs). */
int cbw_file_target_set_direct (struct cbw_file_target *t, struct cbw_err *err);
/* Bytes written with O_DIRECT so far. */
uint64_t cbw_file_target_direct_bytes (const struct cbw_file_target *t);

/* 0, or -1 with *err filled (errno of the failed system call; ENOSPC for a
 * range past the end of the target). */
int cbw_file_target_pwrite (struct cbw_file_target *t, const void *buf,
                            size_t len, uint64_t off, struct cbw_err *err);
int cbw_file_target_pread (struct cbw_file_target *t, void *buf, size_t len,
                           uint64_t off, struct cbw_err *err);
int cbw_file_target_zero (struct cbw_file_target *t, size_t len, uint64_t off,
                          struct cbw_err *err);
int cbw_file_target_trim (struct cbw_file_target *t, size_t len, uint64_t off,
                          struct cbw_err *err);

/* Copy [off,off+len) of the raw image open at src to the same range of the
 * target inside the kernel (FICLONERANGE, else copy_file_range; holes of
 * src become holes: *holes bytes of the range).  0, or -1 with *err: the
 * caller then copies the whole range through user space (part of it may
 * have been written).  */
int cbw_file_target_copy_from (struct cbw_file_target *t, int src,
                               size_t len, uint64_t off, uint64_t *holes,
                               struct cbw_err *err);
/* Can copy_from still work (a method left, and not a direct target)? */
bool cbw_file_target_can_copy_from (const struct cbw_file_target *t);
/* Bytes copied by clone and by copy_file_range so far. */
void cbw_file_target_copy_stats (const struct cbw_file_target *t,
                                 uint64_t *cloned, uint64_t *kcopied);

/* Testing: replace the system calls of copy_from (NULL: the real one). */
typedef ssize_t (*cbw_copy_range_fn) (int in, off_t *in_off, int out,
                                      off_t *out_off, size_t len);
typedef int (*cbw_clone_range_fn) (int in, uint64_t in_off, int out,
                                   uint64_t out_off, uint64_t len);
void cbw_file_target_test_hooks (cbw_copy_range_fn copy,
                                 cbw_clone_range_fn clone);

#endif
