/* cbw — plugin/cbw/target_file.h: a backup target that is a local file or
 * block device (file:///PATH), used by target.c when the target URI has the
 * file: scheme.  See target_file.c for what it can and cannot do. */
#ifndef CBW_TARGET_FILE_H
#define CBW_TARGET_FILE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

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

#endif
