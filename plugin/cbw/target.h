/* cbw — plugin/cbw/target.h: the backup target: a pool of libnbd
 * connections to any NBD server given by URI, where every operation has a
 * deadline, or a local file or block device (file:///PATH, target_file.c:
 * plain system calls, no deadline).  See target.c for the locking. */
#ifndef CBW_TARGET_H
#define CBW_TARGET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cbw_err.h"

struct cbw_target;

/* Monotonic clock in nanoseconds; deadlines are absolute values of it. */
int64_t cbw_now_ns (void);

/* Connect the first connection now (so a bad URI, a read-only or a too small
 * target is reported by `begin`), the others lazily.  nconns >= 1. */
struct cbw_target *cbw_target_open (const char *uri, size_t nconns,
                                    int64_t deadline_ns, struct cbw_err *err);
void cbw_target_close (struct cbw_target *t);
int64_t cbw_target_size (const struct cbw_target *t);
bool cbw_target_can_trim (const struct cbw_target *t);
/* A local-file target: copies are cheap system calls, best done in the
 * guest write's own thread rather than handed to a copy worker. */
bool cbw_target_is_local (const struct cbw_target *t);
/* Local targets only: cap the bytes the file may take on the host (see
 * target_file.c); returns -1 (EINVAL) for an NBD target, whose server
 * enforces its own limits (e.g. cbwd's store export limit=). */
int cbw_target_set_limit (struct cbw_target *t, uint64_t bytes,
                          struct cbw_err *err);
/* Local file targets: write aligned copies with O_DIRECT (target_file.c);
 * EINVAL for NBD targets.  Bytes so written (0 for NBD targets). */
int cbw_target_set_direct (struct cbw_target *t, struct cbw_err *err);
uint64_t cbw_target_direct_bytes (const struct cbw_target *t);
/* In-kernel copy of [off,off+len) from the raw image open at src (local
 * file targets only; see target_file.c).  0, or -1 with *err: copy the
 * range through user space instead. */
bool cbw_target_can_copy_from (const struct cbw_target *t);
int cbw_target_copy_from (struct cbw_target *t, int src, size_t len,
                          uint64_t off, uint64_t *holes, struct cbw_err *err);
/* Bytes the in-kernel copy cloned (shared extents) and copied. */
void cbw_target_copy_stats (const struct cbw_target *t, uint64_t *cloned,
                            uint64_t *kcopied);

/* Each returns 0, or -1 with *err filled: errnum ETIMEDOUT if the deadline
 * passed (that connection is then dropped and reopened on next use), the
 * server's errno (EIO, ENOSPC, ...) for a failed command, ENOTCONN/EIO for a
 * lost connection. */
int cbw_target_pwrite (struct cbw_target *t, const void *buf, size_t len,
                       uint64_t off, int64_t deadline_ns, struct cbw_err *err);
int cbw_target_zero (struct cbw_target *t, size_t len, uint64_t off,
                     int64_t deadline_ns, struct cbw_err *err);
int cbw_target_pread (struct cbw_target *t, void *buf, size_t len,
                      uint64_t off, int64_t deadline_ns, struct cbw_err *err);
int cbw_target_trim (struct cbw_target *t, size_t len, uint64_t off,
                     int64_t deadline_ns, struct cbw_err *err);

/* A batch of writes pipelined on ONE connection (many commands in flight,
 * one poll loop: far fewer thread switches than one command per thread).
 * zero: the data is all zeroes, sent as write-zeroes when the target
 * supports it (else buf is written).  Each op gets result 0 or an errno.
 * Returns the number of failed ops; *err describes the first failure. */
struct cbw_target_wr {
  const void *buf;
  size_t len;
  uint64_t off;
  bool zero;
  int result;               /* out */
  int64_t cookie;           /* private: != 0 while the command is pending */
  void *batch;              /* private: the batch's counters */
};
size_t cbw_target_write_batch (struct cbw_target *t, struct cbw_target_wr *w,
                               size_t n, int64_t deadline_ns,
                               struct cbw_err *err);

#endif
