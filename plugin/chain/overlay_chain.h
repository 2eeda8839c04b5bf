/* cbw — plugin/chain/overlay_chain.h: the layered I/O engine of the chain
 * plugin (a raw base + overlays, formats/overlay.h) and its operations:
 * snapshot, commit (active and intermediate; make-empty or delete), status.
 *
 * The engine knows nothing about nbdkit: it reports errors through struct
 * cbw_err (errnum + message) and is unit-tested on its own
 * (plugin/chain/tests/).  The plugin maps calls 1:1 from its callbacks and
 * its control table.  Thread-safety: every function may be called from any
 * thread concurrently (see the locking notes in overlay_chain_int.h),
 * except ovc_open/ovc_close.
 */
#ifndef CBW_OVERLAY_CHAIN_H
#define CBW_OVERLAY_CHAIN_H

#include <stdbool.h>
#include <stdint.h>

#include <json-c/json.h>

#include "cbw_err.h"
#include "control.h"
#include "overlay.h"

struct ovc;

/* Create a new chain descriptor CHAIN_PATH over an existing raw BASE (path
 * stored as given; relative paths are relative to the descriptor's
 * directory), with no overlays.  Fails with EEXIST if CHAIN_PATH exists. */
int ovc_create (const char *chain_path, const char *base, uint32_t cluster_size,
                struct cbw_err *err);

struct ovc_open_opts {
  bool readonly;                 /* no writes, no operations, no recovery writes */
  bool force_share;              /* layer image locks without exclusivity */
};

/* Open a chain: validates every file (cbw_chain_validate), then recovers an
 * interrupted operation: a commit interrupted while copying is undone (the
 * chain stays as it was; run the commit again), one interrupted while
 * switching is finished.  *recovered (optional) gets a malloc'd note of what
 * was done, or NULL. */
struct ovc *ovc_open (const char *chain_path, const struct ovc_open_opts *opts,
                      char **recovered, struct cbw_err *err);
/* Waits for a running commit to stop (cancels it), flushes, frees. */
void ovc_close (struct ovc *c);

uint64_t ovc_size (struct ovc *c);
uint32_t ovc_cluster_size (struct ovc *c);
unsigned ovc_nlayers (struct ovc *c);   /* overlays above the base */
/* Path of the raw base as opened (relative paths joined to the chain's dir). */
const char *ovc_base_path (struct ovc *c);
/* True if ovc_zero of this range is a metadata-only operation (the top is
 * an overlay and the range covers whole clusters): for NBD fast zero. */
bool ovc_zero_is_fast (struct ovc *c, uint32_t count, uint64_t offset);

/* Guest I/O.  fua: durable before return (like NBD_CMD_FLAG_FUA). */
int ovc_pread (struct ovc *c, void *buf, uint32_t count, uint64_t offset,
               struct cbw_err *err);
int ovc_pwrite (struct ovc *c, const void *buf, uint32_t count, uint64_t offset,
                bool fua, struct cbw_err *err);
int ovc_zero (struct ovc *c, uint32_t count, uint64_t offset, bool fua,
              struct cbw_err *err);
int ovc_flush (struct ovc *c, struct cbw_err *err);

/* Block status: for [offset, offset+count) return the length of the first
 * run with the same status from offset (clipped to count).  *allocated: some
 * layer above the base holds it (or, with no overlay, always true), *zero:
 * reads as zero because a layer records it as zero. */
int ovc_extent (struct ovc *c, uint64_t offset, uint64_t count,
                uint64_t *len, bool *allocated, bool *zero, struct cbw_err *err);

/* Snapshot: drain in-flight writes, flush, create an empty overlay and make
 * it the top (chain descriptor replace = commit point).  label may be NULL.
 * *name_out (optional) gets the new layer name (malloc'd). */
int ovc_snapshot (struct ovc *c, const char *label, char **name_out,
                  struct cbw_err *err);

/* Commit layers lo..hi (1 = lowest overlay, hi <= nlayers) into layer lo-1
 * (0 = the base) in a background thread.  hi == nlayers is an active commit:
 * guest writes continue and are mirrored.  speed: bytes/s, 0 = unlimited. */
int ovc_commit_start (struct ovc *c, unsigned lo, unsigned hi,
                      enum cbw_commit_mode mode, uint64_t speed,
                      struct cbw_err *err);
int ovc_commit_cancel (struct ovc *c, struct cbw_err *err);
/* Wait for the running (or last) commit; returns its result (0 or -1 + the
 * commit's error; ECANCELED if cancelled). */
int ovc_commit_wait (struct ovc *c, struct cbw_err *err);
int ovc_commit_set_speed (struct ovc *c, uint64_t speed, struct cbw_err *err);

/* Allocated extents of overlay `layer` (1..nlayers; 0 = the current top):
 * the clusters that layer holds as DATA or ZERO (a write, or a write-zeroes,
 * since it became the top), in bytes, as ascending, non-overlapping runs of
 * one state (adjacent runs differ in `zero`), clipped to [offset,
 * offset+length).  At most `max` runs are returned in out[]; *next gets the
 * offset to continue from, or UINT64_MAX when the range is exhausted.
 * *layer_out / *name_out (optional, malloc'd) identify the layer read, so a
 * paging caller can check the top did not change between pages.  EINVAL for
 * a range outside the disk or max == 0; ENOENT if the layer does not exist
 * (the chain has no overlay).  Bounded work per call: O(clusters scanned /
 * 64) plus O(max). */
struct ovc_extent { uint64_t offset, length; bool zero; };
int ovc_layer_extents (struct ovc *c, unsigned layer, uint64_t offset, uint64_t length,
                       size_t max, struct ovc_extent *out, size_t *n, uint64_t *next,
                       unsigned *layer_out, char **name_out, struct cbw_err *err);

/* {"size","cluster_size","generation","layers":[...],"operation":{...}} */
struct json_object *ovc_status_json (struct ovc *c);

/* Control-socket commands (common/control.h).  The chain plugin's table
 * lists OVC_CTL_COMMANDS(...) entries whose handlers forward to these with
 * its struct ovc (or fail with NotFound when no chain is configured):
 *   snapshot       {"label"?}                      -> {"layer","index","layers"}
 *   commit         {"base"?,"top"?,"mode"?,"speed"?} -> {"lo","hi","active"}
 *   commit-cancel  {}                              -> {}
 *   commit-speed   {"speed"}                       -> {}
 *   status         {}                              -> ovc_status_json()
 *   list           {}                              -> {"layers": [...]}
 * The argument specs and docs are exported so the plugin's table stays the
 * one source of truth for its docs. */
int ovc_ctl_snapshot (struct ovc *c, struct json_object *args, struct cbw_ctl_reply *r);
int ovc_ctl_commit (struct ovc *c, struct json_object *args, struct cbw_ctl_reply *r);
int ovc_ctl_commit_cancel (struct ovc *c, struct json_object *args, struct cbw_ctl_reply *r);
int ovc_ctl_commit_speed (struct ovc *c, struct json_object *args, struct cbw_ctl_reply *r);
int ovc_ctl_status (struct ovc *c, struct json_object *args, struct cbw_ctl_reply *r);
int ovc_ctl_list (struct ovc *c, struct json_object *args, struct cbw_ctl_reply *r);
/*   layer-extents  {"layer"?,"offset"?,"length"?,"max-extents"?}
 *                  -> {"layer","name","cluster-size","extents":[{"offset","length","zero"}],
 *                      "next": OFFSET|null} */
int ovc_ctl_layer_extents (struct ovc *c, struct json_object *args, struct cbw_ctl_reply *r);
#define OVC_EXTENTS_DEFAULT 1024
#define OVC_EXTENTS_MAX 65536
extern const struct cbw_ctl_arg ovc_ctl_snapshot_args[], ovc_ctl_commit_args[],
  ovc_ctl_speed_args[], ovc_ctl_no_args[], ovc_ctl_layer_extents_args[];
#define OVC_CTL_DOC_SNAPSHOT "Live snapshot: in-flight writes drain, the top is " \
  "flushed, a new empty overlay becomes the top; the layers below become read-only. " \
  "Crash-atomic (the chain descriptor replace is the commit point)."
#define OVC_CTL_DOC_COMMIT "Merge layers base+1..top into layer `base` (0 = the raw " \
  "base) in the background while the disk stays online. `top` defaults to the active " \
  "top (active commit: writes continue and are mirrored), `base` to top-1. `mode`: " \
  "`delete` (default; merged overlays leave the chain) or `make-empty` (they are " \
  "emptied and kept). `speed`: bytes/s, 0 = unlimited. Progress in `status`."
#define OVC_CTL_DOC_CANCEL "Cancel the running commit; the chain is left as it was."
#define OVC_CTL_DOC_SPEED "Change the speed limit of the running commit (bytes/s, 0 = unlimited)."
#define OVC_CTL_DOC_STATUS "The chain (layers bottom to top with allocation), and the " \
  "running or last operation with its progress or error."
#define OVC_CTL_DOC_LIST "The layers of the chain, bottom (the raw base) to top."
#define OVC_CTL_DOC_LAYER_EXTENTS "Allocated extents of one overlay (default: the " \
  "writable top): the clusters it holds as data or as zero, i.e. everything written " \
  "to the disk since that overlay became the top (its snapshot).  Runs are in bytes, " \
  "ascending, clipped to the range, each of one kind (`zero`: written as zeroes).  " \
  "The reply is bounded by `max-extents`; if it was cut, `next` is the offset to " \
  "continue from, else null.  A paging reader compares `name` across pages (a " \
  "snapshot in between changes the top).  `NotFound` if the chain has no overlay."


/* Commit copy tuning (process-global, read when a commit starts): window
 * size in bytes (0 = default 8 MiB; a speed limit makes windows smaller)
 * and number of copy threads (0 = default 2, at most 16), OVC_TUNE_* flags
 * (0 = default).  For tests and A/B benchmarks; the defaults are what
 * production uses. */
#define OVC_TUNE_NO_COPY_FILE_RANGE 1   /* copy through user-space buffers */
#define OVC_TUNE_NO_WRITEBACK_KICK 2    /* no sync_file_range after each window */
void ovc_set_commit_tuning (uint64_t chunk_bytes, unsigned workers, unsigned flags);

/* Test hooks (process-global, NULL by default).  Called with path == NULL
 * at every named crash/fault point; a non-zero return fails the operation
 * there with EIO.  Called with point "durable" and a file path right after
 * that file's current content became durable (data file fdatasync'd, a
 * descriptor or map atomically replaced, a new overlay's files created):
 * power-loss tests mirror the files at those moments (return ignored).
 * Called with point "new-layer" and the path of a snapshot's new overlay
 * descriptor (its files are PATH.data and PATH.map) just before they are
 * created: tests plant files there (return ignored). */
typedef int (*ovc_hook_fn) (const char *point, const char *path, void *opaque);
void ovc_set_test_hook (ovc_hook_fn fn, void *opaque);

#endif
