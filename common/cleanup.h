/* cbw — common/cleanup.h: scope-based cleanup and lock-scope macros.
 *
 * In the style of nbdkit's common/include/cleanup.h: a variable declared with
 * CLEANUP_FREE is freed when it goes out of scope; ACQUIRE_LOCK_FOR_CURRENT_SCOPE
 * holds a pthread mutex until the end of the enclosing block.  Never use a lock
 * scope around blocking I/O (DEVELOPERS.md: never hold a lock across I/O).
 */
#ifndef CBW_CLEANUP_H
#define CBW_CLEANUP_H

#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

static inline void cbw_cleanup_free (void *ptr) { free (*(void **) ptr); }
#define CLEANUP_FREE __attribute__ ((cleanup (cbw_cleanup_free)))

static inline void cbw_cleanup_close (int *fd) { if (*fd >= 0) close (*fd); }
#define CLEANUP_CLOSE __attribute__ ((cleanup (cbw_cleanup_close)))

static inline void
cbw_cleanup_unlock (pthread_mutex_t **ptr)
{
  if (*ptr) pthread_mutex_unlock (*ptr);
}
#define CBW_CONCAT_(a, b) a##b
#define CBW_CONCAT(a, b) CBW_CONCAT_ (a, b)
#define ACQUIRE_LOCK_FOR_CURRENT_SCOPE(mutex)                                  \
  __attribute__ ((cleanup (cbw_cleanup_unlock)))                               \
  pthread_mutex_t *CBW_CONCAT (_lock_, __LINE__) = (mutex);                    \
  pthread_mutex_lock (CBW_CONCAT (_lock_, __LINE__))

#endif
