/* cbw — server/bufcache.h: request buffers (WRITE payloads, READ data) of
 * cbwd.
 *
 * Why: these buffers are 64 KiB - 32 MiB, allocated on one thread and freed
 * on another.  From malloc, each worker thread grows its own arena to its
 * own high-water mark (8 workers = 8 arenas of a few MiB each that are never
 * returned: most of cbwd's peak RSS under nbdcopy), or, above glibc's mmap
 * threshold, every buffer is a fresh mmap whose pages fault in on every
 * byte received.  Here big buffers are anonymous mappings kept in a free
 * list per power-of-two size class and reused; the cache never holds more
 * than (high-water of bytes in use) - (bytes in use now), so it never raises
 * the process's peak RSS above what requests in flight needed anyway, and
 * never more than a hard cap (cbwd_bufcache_set_cap).  Small buffers
 * (< 64 KiB) come from malloc.  In sanitizer builds every buffer is an
 * exact-size malloc, so ASan still sees overflows.
 *
 * Locking: one mutex guards the free lists and the counters; it is held for
 * list and counter updates only (mmap/munmap happen outside it).
 */
#ifndef CBWD_BUFCACHE_H
#define CBWD_BUFCACHE_H

#include <stddef.h>
#include <stdint.h>

/* NULL with errno = ENOMEM on failure.  len > 0. */
void *cbwd_buf_alloc (size_t len);
/* p from cbwd_buf_alloc(len) with the same len, or NULL. */
void cbwd_buf_free (void *p, size_t len);
/* Most bytes kept idle in the cache (default 64 MiB). */
void cbwd_bufcache_set_cap (uint64_t bytes);
/* For tests and logs. */
struct cbwd_bufcache_stats {
  uint64_t in_use, cached, peak, maps;
  int plain;      /* 1: this build never caches (bufcache.c compiled with ASan) */
};
void cbwd_bufcache_stats (struct cbwd_bufcache_stats *s);

#endif
