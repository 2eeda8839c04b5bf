/* cbw — common/bufcache.h: one cache of big I/O buffers (64 KiB .. 32 MiB)
 * for the whole process, used by cbwd (request buffers: WRITE payloads,
 * READ data) and by the cbw filter (copy-before-write buffers: write-back
 * entries and synchronous copies' bounce buffers).
 *
 * Why cbwd needs it: its buffers are allocated on one thread and freed on
 * another.  From malloc, each worker thread grows its own arena to its own
 * high-water mark (8 workers = 8 arenas of a few MiB each that are never
 * returned: most of cbwd's peak RSS under nbdcopy), or, above glibc's mmap
 * threshold, every buffer is a fresh mmap whose pages fault in on every
 * byte received.
 *
 * Why the filter needs it: malloc handed its 1 MiB copy buffers back to the
 * kernel, and every copy into a new one faulted in 256 fresh pages: half of
 * the filter's CPU in the 1 MiB pass after `begin` (bench/cbw/results.md
 * has what reusing buffers saved).
 *
 * What it does: big buffers are anonymous mappings kept in a free list per
 * power-of-two size class and reused; the cache never holds more than
 * (high-water of bytes in use) - (bytes in use now), so it never raises the
 * process's peak RSS above what the buffers in flight needed anyway, and
 * never more than a hard cap (cbw_bufcache_set_cap).  When the size in use
 * changes, buffers of other classes are evicted to make room (bufcache.c).
 * Small buffers (< CBW_BUF_MIN) and huge ones (> CBW_BUF_MAX) come from
 * malloc.  In AddressSanitizer builds every buffer is an exact-size malloc,
 * so ASan still sees overflows and use after free.  Buffers of CBW_BUF_MIN
 * bytes or more are CBW_BUF_ALIGN-aligned in every build (mappings; aligned
 * allocations under ASan), so they can be written with O_DIRECT (the filter's
 * local targets with target-direct).
 *
 * Locking: one mutex guards the free lists and the counters; it is held for
 * list and counter updates only (mmap/munmap happen outside it).  All
 * functions are thread-safe.
 */
#ifndef CBW_BUFCACHE_H
#define CBW_BUFCACHE_H

#include <stddef.h>
#include <stdint.h>

#define CBW_BUF_MIN (64 * 1024)         /* smallest cached size class */
#define CBW_BUF_MAX (32 * 1024 * 1024)  /* largest cached size class */
#define CBW_BUF_ALIGN 4096              /* alignment of buffers >= CBW_BUF_MIN */

/* A buffer of len bytes (len > 0), CBW_BUF_ALIGN-aligned if len >=
 * CBW_BUF_MIN; NULL with errno = ENOMEM on failure. */
void *cbw_buf_alloc (size_t len);
/* p from cbw_buf_alloc(len) with the same len, or NULL.  ASan builds abort
 * on another len. */
void cbw_buf_free (void *p, size_t len);
/* Most bytes kept idle in the cache (default 64 MiB). */
void cbw_bufcache_set_cap (uint64_t bytes);
/* For tests and logs. */
struct cbw_bufcache_stats {
  uint64_t in_use, cached, peak, maps;
  int plain;      /* 1: this build never caches (bufcache.c compiled with ASan) */
};
void cbw_bufcache_stats (struct cbw_bufcache_stats *s);

#endif
