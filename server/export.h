/* cbw — server/export.h: what cbwd serves.  One struct cbwd_export per export
 * name, one backend vtable (struct cbwd_export_ops) per export type:
 *   store  export_file.c  writable sparse raw file, backup target, size limit
 *   file   export_file.c  read-only raw file (stopped disk) + its bitmaps
 *   pit    export_pit.c   read-only point-in-time view: proxy to the cbw
 *                         filter's PIT export, or direct reads of the live
 *                         disk / store files following the shared state map
 * and a list of meta contexts (struct cbwd_meta) each export offers:
 *   base:allocation       from the backend's block_status
 *   qemu:allocation-depth export.c (every export is one layer)
 *   qemu:dirty-bitmap:N   meta_bitmap.c (frozen bitmaps attached to the export)
 *
 * Threads: export ops and meta extents() run on cbwd's worker pool (pool.h),
 * many at a time; a backend that can serve a request without blocking (page
 * cache hits, RWF_NOWAIT) may also be called on the event loop in nowait
 * mode.  Each backend documents its own locking; a backend never holds a
 * lock across I/O.  The export list is changed only on the loop thread
 * (start-up, and exports the orchestrator adds and removes at run time,
 * export_admin.c); an export lives as long as its references (see
 * cbwd_export_ref below).
 *
 * Errors: ops return 0, or -1 with *err filled (errnum is what the client gets
 * on the wire, msg goes into the structured error reply and the log).
 */
#ifndef CBWD_EXPORT_H
#define CBWD_EXPORT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cbw_err.h"

/* An extent list as it goes on the wire: consecutive (length, flags) pairs
 * starting at .offset.  Lengths are u32 on the wire; adders split longer runs.
 * Adders merge runs with equal flags and stop (return 1) when .max
 * descriptors are stored or .limit bytes are covered. */
struct cbwd_extent { uint32_t length; uint32_t flags; };
struct cbwd_extents {
  uint64_t offset;       /* first byte described */
  uint64_t covered;      /* bytes described so far */
  uint64_t limit;        /* stop after this many bytes */
  size_t max;            /* stop after this many descriptors */
  size_t n, cap;
  struct cbwd_extent *e;
};
void cbwd_extents_init (struct cbwd_extents *x, uint64_t offset, uint64_t limit, size_t max);
void cbwd_extents_free (struct cbwd_extents *x);
/* Append a run; 0 = keep going, 1 = full (stop), -1 = ENOMEM. */
int cbwd_extents_add (struct cbwd_extents *x, uint64_t length, uint32_t flags);

/* Hole ranges found while reading (for OFFSET_HOLE chunks), sorted,
 * relative to the read offset. */
struct cbwd_holes {
  size_t n, cap;
  struct { uint32_t off, len; } *h;
};
int cbwd_holes_add (struct cbwd_holes *h, uint32_t off, uint32_t len);
void cbwd_holes_free (struct cbwd_holes *h);

struct cbwd_export;

struct cbwd_export_ops {
  const char *type;
  /* holes may be NULL (caller does not care); a backend that knows cheaply
   * which parts are holes records them (buf holds zeros there). */
  int (*pread) (struct cbwd_export *e, void *buf, uint32_t len, uint64_t off,
                struct cbwd_holes *holes, struct cbw_err *err);
  int (*pwrite) (struct cbwd_export *e, const void *buf, uint32_t len,
                 uint64_t off, bool fua, struct cbw_err *err);
  int (*zero) (struct cbwd_export *e, uint32_t len, uint64_t off, bool may_trim,
               bool fast, bool fua, struct cbw_err *err);
  int (*trim) (struct cbwd_export *e, uint32_t len, uint64_t off, bool fua,
               struct cbw_err *err);
  int (*flush) (struct cbwd_export *e, struct cbw_err *err);
  int (*cache) (struct cbwd_export *e, uint32_t len, uint64_t off,
                struct cbw_err *err);
  /* base:allocation: NBD_STATE_HOLE / NBD_STATE_ZERO flags. */
  int (*block_status) (struct cbwd_export *e, uint64_t off, struct cbwd_extents *x,
                       struct cbw_err *err);
  void (*close) (struct cbwd_export *e);
  /* Optional non-blocking fast paths, run ON THE LOOP THREAD: they must
   * never block (preadv2/pwritev2 with RWF_NOWAIT: page-cache hits only).
   * Return 0 when the whole request was done, -1 to send it to the pool
   * (nothing observable happened, or a repeat is harmless). */
  int (*pread_nowait) (struct cbwd_export *e, void *buf, uint32_t len, uint64_t off);
  int (*pwrite_nowait) (struct cbwd_export *e, const void *buf, uint32_t len, uint64_t off);
};

struct cbwd_meta {
  char *name;                       /* full context name */
  /* Fill x from x->offset; runs on the thread pool. */
  int (*extents) (struct cbwd_export *e, struct cbwd_meta *m,
                  struct cbwd_extents *x, struct cbw_err *err);
  void (*free) (struct cbwd_meta *m);
  void *data;
};

struct cbwd_export {
  unsigned refs;                    /* loop thread only: export list + sessions */
  char *name;
  char *description;                /* may be NULL */
  uint64_t size;
  uint16_t eflags;                  /* NBD transmission flags (without DF) */
  const struct cbwd_export_ops *ops;
  void *priv;                       /* backend state */
  size_t nmetas;
  struct cbwd_meta *metas;          /* context id = index */
  /* Authorization (export.c: cbwd_export_allowed), set before the export
   * is published and immutable afterwards: the identities that may open
   * it over TCP ("psk:USER", "x509:DN", "*" = any TCP client), and whether
   * it has an allow list at all.  Without one, store exports are refused
   * on TCP and the others are open to every client of the listener. */
  char **allow;
  size_t nallow;
  bool has_allow;
  bool tcp_deny_default;            /* store: TCP only through allow= */
};

/* May a client open export e?  tcp: it came in on a TCP listener (Unix
 * listeners are protected by their file mode: everything is allowed);
 * identity: its TLS identity, NULL without one. */
bool cbwd_export_allowed (const struct cbwd_export *e, bool tcp,
                          const char *identity);
/* Add one identity to e's allow list (sets has_allow); 0 or -1 (ENOMEM). */
int cbwd_export_allow (struct cbwd_export *e, const char *identity,
                       struct cbw_err *err);
/* Check an identity as written in allow= ("*", "psk:USER", "x509:DN"). */
int cbwd_allow_check (const char *identity, struct cbw_err *err);

/* Meta context providers.  name is the full context name. */
int cbwd_export_add_meta (struct cbwd_export *e, const struct cbwd_meta *m,
                          struct cbw_err *err);
int cbwd_meta_base_init (struct cbwd_meta *m);
int cbwd_meta_depth_init (struct cbwd_meta *m);
/* Frozen dirty bitmaps (meta_bitmap.c).  Sources:
 *   raw:   little-endian bit array, bit i = granule i (formats/bitmap.h layout)
 *   extents: text file, one "OFFSET LENGTH" dirty range per line
 *   store: bitmap store descriptor (formats/bitmap_store.h) + stored name
 *   ctl:   a dirtybitmap filter's control socket + bitmap name (read once) */
int cbwd_meta_bitmap_from_raw (struct cbwd_meta *m, const char *name,
                               const char *path, uint64_t granularity,
                               uint64_t export_size, struct cbw_err *err);
int cbwd_meta_bitmap_from_extents (struct cbwd_meta *m, const char *name,
                                   const char *path, uint64_t export_size,
                                   struct cbw_err *err);
int cbwd_meta_bitmap_from_store (struct cbwd_meta *m, const char *name,
                                 const char *descriptor, const char *stored_name,
                                 uint64_t export_size, struct cbw_err *err);
int cbwd_meta_bitmap_from_ctl (struct cbwd_meta *m, const char *name,
                               const char *ctl_path, const char *stored_name,
                               uint64_t export_size, struct cbw_err *err);
/* Is some byte of [off, off+len) clean in bitmap context m?  Then *clean is
 * the first clean byte.  False for a context that is not a bitmap. */
bool cbwd_meta_bitmap_first_clean (const struct cbwd_meta *m, uint64_t off,
                                   uint64_t len, uint64_t *clean);
/* In-memory dirty ranges (tests, fuzzing): sorted, merged copy is made. */
int cbwd_meta_bitmap_from_ranges (struct cbwd_meta *m, const char *name,
                                  const uint64_t (*ranges)[2], size_t n,
                                  uint64_t export_size, struct cbw_err *err);

/* Backends.  Each returns a new export or NULL with *err filled. */
struct cbwd_store_opts {
  const char *path;
  uint64_t size;          /* 0: use the existing file's size */
  uint64_t limit;         /* bytes allocated; 0 = no limit */
  bool readonly;          /* true for type=file */
  bool create;            /* create/extend the file (store) */
  bool direct;            /* store: aligned writes with O_DIRECT */
};
struct cbwd_export *cbwd_export_file_new (const char *name,
                                          const struct cbwd_store_opts *o,
                                          struct cbw_err *err);
struct cbwd_pit_opts {
  const char *upstream;   /* NBD URI of the cbw filter's PIT export */
  unsigned connections;   /* pool size */
  bool release;           /* accept TRIM and forward it upstream */
  /* Direct reads (all three or none; see export_pit.c): the session's
   * shared state map (begin "state-file", docs/formats/cbw-state-map.md),
   * the raw live disk and the raw file behind the session's target. */
  const char *state_file, *live_file, *store_file;
  uint64_t state_granularity;   /* expected granularity, 0 = any */
  uint32_t debug_delay_us;      /* testing: sleep before a direct read */
  bool debug_no_recheck;        /* testing: UNSAFE, proves the race test bites */
};
/* Serve only the blocks the export's meta context `context` (a
 * qemu:dirty-bitmap:NAME added to e) marks dirty: a read touching any other
 * block fails with EIO and a message "offset O is not readable: WHY" (the
 * structured error reply carries it), and base:allocation reports those
 * blocks as data.  why: what the operator needs to know (which backup, why
 * it serves only these blocks, how to get the others). */
int cbwd_export_pit_readable_only (struct cbwd_export *e, const char *context,
                                   const char *why, struct cbw_err *err);
/* Counters of a PIT export (tests, logs): bytes read directly from the
 * live/store files, bytes read through the upstream, re-checks that
 * discarded data.  Zero for other export types. */
struct cbwd_pit_stats { uint64_t direct_bytes, upstream_bytes, rechecks; bool direct; };
void cbwd_export_pit_stats (struct cbwd_export *e, struct cbwd_pit_stats *st);
struct cbwd_export *cbwd_export_pit_new (const char *name,
                                         const struct cbwd_pit_opts *o,
                                         struct cbw_err *err);
/* An in-memory export (tests and fuzzing only; not reachable from config
 * except type=memory which is documented as a test aid). */
struct cbwd_export *cbwd_export_memory_new (const char *name, uint64_t size,
                                            bool readonly, struct cbw_err *err);

void cbwd_export_free (struct cbwd_export *e);
/* Reference counting (loop thread only): the export list holds one (the
 * constructors return refs = 1), every session using the export for
 * transmission or meta-context selection holds one.  The last unref frees. */
void cbwd_export_ref (struct cbwd_export *e);
void cbwd_export_unref (struct cbwd_export *e);

/* The export list (loop thread only). */
struct cbwd_exports {
  size_t n;
  struct cbwd_export **v;
};
struct cbwd_export *cbwd_exports_find (const struct cbwd_exports *l,
                                       const char *name, size_t len);

#endif
