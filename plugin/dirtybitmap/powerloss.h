/* cbw — plugin/dirtybitmap/powerloss.h: the power-loss simulation test hook of
 * the dirtybitmap storage layer.
 *
 * When the environment variable CBW_TEST_POWERLOSS_DIR names a directory, the
 * filter mirrors its durable state there, and only at durability points:
 *   - DIR/journal     — a copy of the journal file, taken right after each
 *                       journal fdatasync() returned;
 *   - DIR/store.cur   — a symlink to DIR/store.N, a copy of every file of the
 *                       bitmap store directory (descriptor + data files, not
 *                       the lock, temp files or the journal), taken right after
 *                       each cbw_bitmap_store_save() returned (it fsyncs all).
 * Both are updated crash-atomically (temp + rename), so a kill -9 while
 * mirroring leaves the previous mirror.  A test simulates power loss by
 * killing nbdkit with SIGKILL and replacing the store directory with the
 * mirror: whatever was written but not yet synced is then gone, exactly as
 * after a real power cut.  Without the variable every function is a no-op.
 *
 * Locking: none; callers serialise (journal writer, checkpoint lock).
 */
#ifndef CBW_DBM_POWERLOSS_H
#define CBW_DBM_POWERLOSS_H

#include "cbw_err.h"

/* NULL if the hook is off. */
const char *dbm_powerloss_dir (void);
/* Mirror the journal file after a successful fdatasync. */
int dbm_powerloss_journal_synced (const char *journal_path, struct cbw_err *err);
/* Mirror the store directory after a successful save. */
int dbm_powerloss_store_saved (const char *store_dir, const char *journal_path,
                               struct cbw_err *err);

#endif
