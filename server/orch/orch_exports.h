/* cbw — server/orch/orch_exports.h: the narrow interface the orchestrator
 * needs from cbwd's NBD server (server/) to publish backup
 * exports at run time.
 *
 * The orchestrator calls these from its control thread; the implementation
 * must be thread-safe with respect to cbwd's event loop (e.g. hand the
 * request to the loop with uv_async_send and wait for the result).  Every
 * function returns 0, or -1 with *err filled.
 *
 * When cbwd does not provide it (exports == NULL in struct cbw_orch_config),
 * the orchestrator still works: readers use the cbw filter's own
 * point-in-time export of the disk's nbdkit (nbd+unix:///pit?socket=...) and
 * read changed blocks through the dirtybitmap filter's `extents` command;
 * the backup target of the copy-before-write session is a sparse file served
 * by an `nbdkit file` process the orchestrator starts per disk.
 */
#ifndef CBW_ORCH_EXPORTS_H
#define CBW_ORCH_EXPORTS_H

#include <stddef.h>
#include <stdint.h>

#include "cbw_err.h"

struct cbw_orch_exports {
  void *opaque;
  /* A writable sparse store (backup target of a cbw session) of `size`
   * bytes backed by `path`, at most `limit` bytes allocated (0 = no limit).
   * On success writes the URI the cbw filter must push to into uri_out
   * (uri_len bytes). */
  int (*add_store_export) (void *opaque, const char *name, const char *path,
                           uint64_t size, uint64_t limit,
                           char *uri_out, size_t uri_len, struct cbw_err *err);
  /* A read-only point-in-time export `name` proxying `upstream_uri` (the cbw
   * filter's PIT export) with the block-status context
   * "qemu:dirty-bitmap:<context>" answered from bitmap `bitmap` of the
   * dirtybitmap filter whose control socket is `bitmap_ctl` (bitmap may be
   * NULL: no dirty-bitmap context, e.g. a full backup).  unreadable_why
   * (NULL: the whole disk is readable): the export serves only the blocks
   * that bitmap marks dirty, a read of any other block fails with an error
   * whose message ends in this reason.  Writes the URI readers use into
   * uri_out. */
  int (*add_pit_export) (void *opaque, const char *name,
                         const char *upstream_uri, const char *bitmap_ctl,
                         const char *bitmap, const char *context,
                         const char *unreadable_why,
                         char *uri_out, size_t uri_len, struct cbw_err *err);
  int (*remove_export) (void *opaque, const char *name, struct cbw_err *err);
  /* Optional (NULL: offline backups are refused).  A read-only export `name`
   * of the stopped disk's raw image `path` (offline backup) with the
   * block-status context "qemu:dirty-bitmap:<context>" answered from the
   * extents file `extents` (NULL: no such context).  The image locks are
   * the orchestrator's (backup.c), not the export's. */
  int (*add_file_export) (void *opaque, const char *name, const char *path,
                          const char *extents, const char *context,
                          char *uri_out, size_t uri_len, struct cbw_err *err);
  /* Optional (NULL: not offered).  add_pit_export with direct reads: cbwd
   * reads the raw live disk `live_file` and the store file `store_file`
   * itself, following the cbw session's shared state map `state_file`
   * (begin "state-file", docs/formats/cbw-state-map.md), and uses
   * upstream_uri only for what it cannot prove from the map. */
  int (*add_pit_export_direct) (void *opaque, const char *name,
                                const char *upstream_uri, const char *bitmap_ctl,
                                const char *bitmap, const char *context,
                                const char *unreadable_why, const char *state_file, const char *live_file,
                                const char *store_file,
                                char *uri_out, size_t uri_len, struct cbw_err *err);
};

#endif
