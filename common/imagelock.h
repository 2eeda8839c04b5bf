/* cbw — common/imagelock.h: QEMU-compatible image locks.
 *
 * QEMU (block/file-posix.c) marks every image it opens with open-file-
 * description (OFD) byte-range locks, all shared (F_RDLCK) locks on single
 * bytes:
 *   byte 100 + i   "I hold permission i"          (RAW_LOCK_PERM_BASE)
 *   byte 200 + i   "nobody else may hold i"       (RAW_LOCK_SHARED_BASE)
 * with the permission bits CONSISTENT_READ = 0, WRITE = 1, WRITE_UNCHANGED =
 * 2, RESIZE = 3, GRAPH_MOD = 4.  An opener first takes its own bytes, then
 * tests (F_OFD_GETLK with F_WRLCK) the bytes of everyone else: for each
 * permission it wants, byte 200 + i (someone refuses to share it); for each
 * permission it does not share, byte 100 + i (someone holds it).  Taking
 * before testing makes two concurrent openers both see each other.
 *
 * cbw takes the same bytes for the images it serves, so QEMU, qemu-nbd,
 * qemu-img and qemu-io refuse an image cbw is serving ("Failed to get
 * "write" lock"), and cbw refuses an image one of them holds.  OFD locks
 * carry no pid (l_pid is -1), so a conflict cannot name the holder.
 *
 * The locks belong to the open file description: they go away when its
 * last descriptor is closed (also when the process dies), and are shared
 * with a child that inherits the descriptor.  Other descriptors of the same
 * process opened separately are other descriptions and would conflict.
 *
 * Locking (threads): no state; callers serialise calls on one descriptor.
 */
#ifndef CBW_IMAGELOCK_H
#define CBW_IMAGELOCK_H

#include <stdbool.h>

#include "cbw_err.h"

#define CBW_LOCK_PERM_BASE 100
#define CBW_LOCK_SHARED_BASE 200

enum {
  CBW_PERM_CONSISTENT_READ = 1u << 0,
  CBW_PERM_WRITE = 1u << 1,
  CBW_PERM_WRITE_UNCHANGED = 1u << 2,
  CBW_PERM_RESIZE = 1u << 3,
  CBW_PERM_GRAPH_MOD = 1u << 4,
  CBW_PERM_ALL = 0x1fu,
};

/* The permissions cbw holds and shares when it serves an image, as QEMU's
 * raw driver under a guest device: a writer holds CONSISTENT_READ|WRITE and
 * shares everything except WRITE and RESIZE; a read-only user holds
 * CONSISTENT_READ and does not share WRITE or RESIZE either (its view must
 * not change under it).  force_share: share everything (take no "not
 * shared" byte) and skip the conflict test: another writer may already hold
 * the image, and one may start later unless it refuses to share WRITE. */
void cbw_imagelock_perms (bool writable, bool force_share, unsigned *perm,
                          unsigned *shared);

/* Take the lock bytes for perm / ~shared on fd, then test for conflicting
 * bytes of others (unless test is false).  0 on success.  -1 with *err on
 * failure, all of this call's bytes released again:
 *   EBUSY   another process holds a conflicting lock: "PATH: locked by
 *           another process (QEMU/qemu-nbd?): failed to get [shared] "P"
 *           lock" (P: QEMU's permission name);
 *   ENOLCK  the filesystem refuses byte-range locks (or another errno from
 *           fcntl). */
int cbw_imagelock_acquire (int fd, const char *path, unsigned perm,
                           unsigned shared, bool test, struct cbw_err *err);

/* What a server of the image does on its descriptor: perms as
 * cbw_imagelock_perms, acquire, testing unless force_share.  With
 * force_share a failure to lock (a filesystem without byte-range locks) is
 * not an error: the image is served unlocked. */
int cbw_imagelock_serve (int fd, const char *path, bool writable, bool force_share,
                         struct cbw_err *err);

/* Release every lock byte of cbw/QEMU (100..299) held through fd. */
void cbw_imagelock_release (int fd);

/* Who, if anyone, blocks taking perm/shared on PATH: open it read-only,
 * acquire as above, close (which releases).  0 = free, -1 with *err (EBUSY
 * for a conflict, errno of open otherwise). */
int cbw_imagelock_probe (const char *path, unsigned perm, unsigned shared,
                         struct cbw_err *err);

/* QEMU's name of one permission bit ("consistent read", "write", ...). */
const char *cbw_imagelock_perm_name (unsigned bit);

#endif
