/* cbw — plugin/cbw/session.h: one backup session (begin .. end): which
 * blocks the backup needs, which were copied, the copy-before-write protocol
 * of guest writes and the point-in-time (PIT) read path.  See session.c. */
#ifndef CBW_SESSION_H
#define CBW_SESSION_H

#include <stdbool.h>
#include <stdint.h>

#include <nbdkit-filter.h>

#include "cbw_err.h"
#include "state_map.h"
#include "target.h"

enum cbw_policy { CBW_BREAK_SNAPSHOT = 0, CBW_BREAK_GUEST_WRITE = 1 };

/* Per-block states (one byte each).  The byte values are a file format
 * (docs/formats/cbw-state-map.md, formats/state_map.h) once a session
 * has a state file: they are defined from there and cannot drift. */
enum cbw_block_state {
  CBW_B_NOT_NEEDED = CBW_SM_NOT_NEEDED, /* outside the set, skipped, released */
  CBW_B_NEEDED = CBW_SM_NEEDED,     /* needed, old data still on the live disk */
  CBW_B_COPYING = CBW_SM_COPYING,   /* a guest write owns its copy right now */
  CBW_B_COPIED = CBW_SM_COPIED,     /* old data is in the target */
  CBW_B_FAILED = CBW_SM_FAILED,     /* copy lost (break-snapshot): PIT fails */
  CBW_B_BUFFERED = CBW_SM_BUFFERED, /* old data read, queued for the target */
};
_Static_assert (CBW_B_NOT_NEEDED == 0 && CBW_B_NEEDED == 1 &&
                CBW_B_COPYING == 2 && CBW_B_COPIED == 3 &&
                CBW_B_FAILED == 4 && CBW_B_BUFFERED == 5 &&
                CBW_SM_NSTATES == 6,
                "block state bytes are fixed by docs/formats/cbw-state-map.md");

struct cbw_session_stats {
  uint64_t size, granularity, blocks, needed_blocks, copied_blocks,
    copied_bytes, zero_bytes, skipped_blocks, failed_blocks, in_flight,
    errors, guest_write_waits, pit_rechecks, buffered_blocks,
    copy_workers,               /* write-back workers running (0: none) */
    direct_bytes,               /* copied bytes written with O_DIRECT */
    clone_bytes,                /* copied by sharing extents (FICLONERANGE) */
    kernel_copy_bytes,          /* copied by copy_file_range */
    kernel_copy_fallbacks,      /* in-kernel copies redone in user space */
    writeback_batches,          /* target batches written by the workers */
    writeback_copies,           /* buffered copies in those batches */
    timeout_ms;                 /* the session's bound on a write's wait */
  bool broken, ended;
  char last_error[256];
  char state_file[256];        /* "" if none */
};

struct cbw_session_params {
  uint64_t size;
  uint32_t granularity;        /* power of 2 >= 512 */
  enum cbw_policy policy;
  int64_t timeout_ns;
  uint32_t debug_pit_delay_us; /* testing: sleep before a PIT live read */
  bool debug_no_recheck;       /* testing: UNSAFE, proves the race test bites */
  uint64_t buffer_bytes;       /* write-back buffer (break-snapshot), 0 = off */
  unsigned workers;            /* copy workers for the buffer */
  const char *state_file;      /* NULL: states in private memory; else a new
                                  shared state map (cbw-state-map.md) */
  bool has_source;             /* source_fd is the raw image the live disk
                                  is, byte for byte (cbw-source): copies to
                                  a local target go through the kernel.
                                  cbw_session_new takes it over (closes it
                                  at the end, or on failure). */
  int source_fd;
  uint64_t source_min;         /* shorter copies go through user space */
};

struct cbw_session;

/* Create a session owning target (closed when the last reference goes).
 * All blocks start NOT_NEEDED; mark the backup set with mark_needed before
 * the session is published. */
struct cbw_session *cbw_session_new (const struct cbw_session_params *p,
                                     struct cbw_target *target,
                                     struct cbw_err *err);
void cbw_session_mark_needed (struct cbw_session *s, uint64_t off,
                              uint64_t len);
void cbw_session_mark_all_needed (struct cbw_session *s);
void cbw_session_get (struct cbw_session *s);
void cbw_session_put (struct cbw_session *s);
void cbw_session_end (struct cbw_session *s);   /* PIT reads fail from now on */
/* The quick part of end, for the control thread while the write gate is
 * still closed and drained: marks the session ended (also in the state
 * map: status ENDED, liveness lock released, file unlinked), so that no
 * reader can take live data for point-in-time data once writes stop being
 * copied.  Idempotent; cbw_session_end calls it too. */
void cbw_session_publish_end (struct cbw_session *s);

/* Guest write path: call before passing a write/zero/trim of [off,off+len)
 * down.  Returns 0 (write may proceed) or -1 with *err set (policy
 * break-guest-write: fail the guest write). */
int cbw_session_before_write (struct cbw_session *s, nbdkit_next *next,
                              uint64_t off, uint64_t len, int *err);

/* PIT read path: next is a read-only context on the live disk. */
int cbw_session_pit_read (struct cbw_session *s, nbdkit_next *next,
                          void *buf, uint32_t count, uint64_t off, int *err);
int cbw_session_pit_extents (struct cbw_session *s, nbdkit_next *next,
                             uint32_t count, uint64_t off, uint32_t flags,
                             struct nbdkit_extents *extents, int *err);

/* skip: the reader is done with [off,off+len): no more copies, target may
 * drop it (trim).  Only whole blocks inside the range are released. */
int cbw_session_skip (struct cbw_session *s, uint64_t off, uint64_t len,
                      uint64_t *released_blocks, struct cbw_err *err);

void cbw_session_stats (struct cbw_session *s, struct cbw_session_stats *st);
uint64_t cbw_session_size (const struct cbw_session *s);

#endif
