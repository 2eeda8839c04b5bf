/* cbw — plugin/dirtybitmap/tracker.h: the crash-safe dirty-bitmap tracker
 * behind nbdkit-dirtybitmap-filter: a bitmap store (formats/bitmap_store.h),
 * the write-ahead region journal (journal.h) and the checkpoint protocol that
 * ties them together.  Independent of nbdkit so it can be unit-tested.
 * Design and the crash-safety argument: docs/design/dirty-bitmaps.md.
 *
 * Thread safety: every function may be called from any thread, concurrently,
 * except open/close.  dbm_tracker_record() is the I/O hot path; everything
 * else is the control plane.  See tracker.c for the lock order.
 */
#ifndef CBW_DBM_TRACKER_H
#define CBW_DBM_TRACKER_H

#include <stdbool.h>
#include <stdint.h>

#include "bitmap_store.h"
#include "cbw_err.h"

struct dbm_tracker;

/* Logging hook (nbdkit_debug in the filter); may be NULL. */
typedef void (*dbm_log_fn) (const char *msg);

/* How the tracker found the store when it opened it. */
enum dbm_recovery {
  DBM_RECOVERED_CLEAN = 0,     /* clean shutdown (or no bitmaps): nothing to do */
  DBM_RECOVERED_JOURNAL,       /* unclean: journal regions merged into bitmaps */
  DBM_RECOVERED_ALL_DIRTY,     /* unclean and journal unusable: bitmaps set full */
  DBM_RECOVERED_MAP,           /* process crash: the live-bitmap map merged (exact) */
};
const char *dbm_recovery_name (enum dbm_recovery r);

/* Open the store at descriptor (locking it), recover after an unclean
 * shutdown, save every bitmap as "in-use", start an empty journal at
 * journal_path and put the live bitmaps into the map DESCRIPTOR.livemap
 * (livemap.h).  Recovery uses the map when it is trusted (same boot, same
 * descriptor generation: the last writer's process died), else the journal.
 * Nothing on disk changes if the store cannot be opened. */
struct dbm_tracker *dbm_tracker_open (const char *descriptor,
                                      const char *journal_path,
                                      uint64_t image_size,
                                      uint64_t region_size,
                                      dbm_log_fn log, struct cbw_err *err);
/* The same with the store's open flags (formats/bitmap_store.h): the filter
 * passes 0 (a missing descriptor is an error) or CBW_BITMAP_STORE_CREATE;
 * dbm_tracker_open() uses CBW_BITMAP_STORE_EMPTY_IF_MISSING (tests, tools). */
struct dbm_tracker *dbm_tracker_open_flags (const char *descriptor,
                                            const char *journal_path,
                                            uint64_t image_size,
                                            uint64_t region_size,
                                            unsigned store_flags,
                                            dbm_log_fn log, struct cbw_err *err);
/* Stop the timer.  If clean, save every bitmap as "clean" and empty the
 * journal first.  Returns -1 if the clean save failed (everything is freed
 * anyway; the on-disk state then stays "in-use" and recovers on next open). */
int dbm_tracker_close (struct dbm_tracker *t, bool clean, struct cbw_err *err);

uint64_t dbm_tracker_image_size (const struct dbm_tracker *t);

/* Hot path: record [offset, offset+count) in every enabled bitmap, after
 * making sure its regions are durable in the journal.  -1 + err (EIO) only
 * if the journal cannot be written; then the request must not go down. */
int dbm_tracker_record (struct dbm_tracker *t, uint64_t offset, uint64_t count,
                        struct cbw_err *err);

/* Fine checkpoint: save every bitmap durably (state in-use), then drop from
 * the journal the regions no write entered since. */
int dbm_tracker_checkpoint (struct dbm_tracker *t, struct cbw_err *err);
/* Background checkpoints every interval_s seconds (if anything changed) and
 * soon after dbm_tracker_kick(), at most once per min(5, interval_s) s. */
int dbm_tracker_start_timer (struct dbm_tracker *t, unsigned interval_s,
                             struct cbw_err *err);
void dbm_tracker_kick (struct dbm_tracker *t);

/* Control operations.  Each one is applied under the bitmap write lock and
 * then made durable with a checkpoint before returning.  Errors: ENOENT (no
 * such bitmap), EEXIST, EINVAL (bad name/granularity/range), EIO (saving). */
int dbm_tracker_add (struct dbm_tracker *t, const char *name, uint64_t granularity,
                     bool enabled, struct cbw_err *err);
int dbm_tracker_remove (struct dbm_tracker *t, const char *name, struct cbw_err *err);
int dbm_tracker_clear (struct dbm_tracker *t, const char *name, struct cbw_err *err);
int dbm_tracker_set_enabled (struct dbm_tracker *t, const char *name, bool enabled,
                             struct cbw_err *err);
int dbm_tracker_merge (struct dbm_tracker *t, const char *src, const char *dst,
                       struct cbw_err *err);

struct dbm_extent;
/* Mark byte ranges dirty in a bitmap (every granule they touch), atomically
 * with respect to writes, then save durably.  Dirtying more never breaks
 * the "never under-reports" rule; used to load an externally computed set
 * (e.g. an overlay's allocated extents for a `top` backup).  EINVAL if a
 * range is empty or past the image (nothing is marked then). */
int dbm_tracker_mark (struct dbm_tracker *t, const char *name,
                      const struct dbm_extent *x, size_t n, struct cbw_err *err);

struct dbm_bitmap_info {
  char name[CBW_BITMAP_NAME_MAX + 1];
  uint64_t granularity;
  bool enabled;
  enum cbw_bitmap_state state;
  uint64_t dirty_bytes;
  uint64_t generation;
};
/* Snapshot of the bitmap list (malloc'd array in *out). */
int dbm_tracker_list (struct dbm_tracker *t, struct dbm_bitmap_info **out,
                      size_t *n, struct cbw_err *err);

struct dbm_extent { uint64_t offset, length; };
/* Dirty extents of a bitmap inside [offset, offset+length), in bytes, at most
 * max; *next is where to continue (offset+length when done). */
int dbm_tracker_extents (struct dbm_tracker *t, const char *name, uint64_t offset,
                         uint64_t length, size_t max, struct dbm_extent *out,
                         size_t *n, uint64_t *next, struct cbw_err *err);

/* At most this many regions are guaranteed ahead of a sequential writer
 * (tracker.c): the extra over-report after a crash is bounded by it. */
#define DBM_MARK_AHEAD_MAX 8

struct dbm_tracker_stats {
  uint64_t image_size, region_size, nregions;
  uint64_t journal_regions;       /* regions set in the journal now */
  uint64_t journal_writes;        /* durable journal updates since open */
  uint64_t journal_waits;         /* writes that waited for one */
  uint64_t checkpoints;           /* fine checkpoints since open */
  enum dbm_recovery recovery;
  bool livemap;                   /* live bitmaps are in the map file */
  const char *descriptor, *journal;
};
void dbm_tracker_stats (struct dbm_tracker *t, struct dbm_tracker_stats *s);

#endif
