/* cbw — plugin/cbw/cbw.c: nbdkit-cbw-filter, copy-before-write with a
 * point-in-time view (the nbdkit glue).
 *
 * Two kinds of connections: the live disk (any export name but the PIT one)
 * and the read-only point-in-time view (export name cbw-pit-export, default
 * "pit").  A backup session is begun/ended through the control socket
 * (ctl.c); session.c does the copy-before-write and PIT reads; gate.c drains
 * and holds guest writes; target.c talks to the backup target.
 *
 * Idle fast path of a guest write: gate enter/leave (two atomic ops, no
 * lock) + one atomic load of cbw_active, then the write goes down.
 *
 * Locking: cbw_session_lock guards publishing/withdrawing cbw_active and
 * taking a reference for a PIT connection; it is never held across I/O.
 * Writes read cbw_active inside the gate: it only changes while the gate is
 * closed and drained, so a write sees one session from start to end.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include <nbdkit-filter.h>

#include "cbw.h"
#include "cbw_err.h"
#include "cleanup.h"
#include "gate.h"

struct cbw_config cbw_cfg = {
  .pit_export = NULL,           /* not served unless cbw-pit-export= */
  .policy = CBW_BREAK_SNAPSHOT,
  .timeout_ns = 30LL * 1000000000,
  .connections = 8,
  .workers = 1,
  .buffer_bytes = 64 * 1024 * 1024,
};
_Atomic (struct cbw_session *) cbw_active;
pthread_mutex_t cbw_session_lock = PTHREAD_MUTEX_INITIALIZER;
nbdkit_backend *cbw_backend;
static struct cbw_ctl_server *ctl_server;

struct handle {
  bool pit;
  struct cbw_session *s;        /* PIT only: reference held */
};

static int
cbw_config (nbdkit_next_config *next, nbdkit_backend *nxdata,
            const char *key, const char *value)
{
  if (strcmp (key, "cbw-control") == 0) {
    cbw_cfg.control_path = value;
    return 0;
  }
  if (strcmp (key, "cbw-pit-export") == 0) {
    cbw_cfg.pit_export = value;
    return 0;
  }
  if (strcmp (key, "cbw-granularity") == 0) {
    int64_t g;
    if (strcmp (value, "auto") == 0) {
      cbw_cfg.granularity = 0;
      return 0;
    }
    g = nbdkit_parse_size (value);
    if (g == -1 || g < 512 || g > (1 << 30) || (g & (g - 1))) {
      nbdkit_error ("cbw-granularity=%s: must be a power of 2 between 512 "
                    "and 1G (or auto)", value);
      return -1;
    }
    cbw_cfg.granularity = g;
    return 0;
  }
  if (strcmp (key, "on-cbw-error") == 0) {
    if (strcmp (value, "break-snapshot") == 0)
      cbw_cfg.policy = CBW_BREAK_SNAPSHOT;
    else if (strcmp (value, "break-guest-write") == 0)
      cbw_cfg.policy = CBW_BREAK_GUEST_WRITE;
    else {
      nbdkit_error ("on-cbw-error=%s: expected break-snapshot or "
                    "break-guest-write", value);
      return -1;
    }
    return 0;
  }
  if (strcmp (key, "cbw-timeout") == 0) {
    char *end;
    double t;
    errno = 0;
    t = strtod (value, &end);
    if (errno || end == value || *end || !(t > 0) || t > 86400) {
      nbdkit_error ("cbw-timeout=%s: expected seconds in (0, 86400]", value);
      return -1;
    }
    cbw_cfg.timeout_ns = (int64_t) (t * 1e9);
    return 0;
  }
  if (strcmp (key, "cbw-connections") == 0) {
    if (nbdkit_parse_unsigned (key, value, &cbw_cfg.connections) == -1)
      return -1;
    if (cbw_cfg.connections < 1 || cbw_cfg.connections > 64) {
      nbdkit_error ("cbw-connections=%s: expected 1..64", value);
      return -1;
    }
    return 0;
  }
  if (strcmp (key, "cbw-workers") == 0) {
    if (nbdkit_parse_unsigned (key, value, &cbw_cfg.workers) == -1)
      return -1;
    if (cbw_cfg.workers < 1 || cbw_cfg.workers > 64) {
      nbdkit_error ("cbw-workers=%s: expected 1..64", value);
      return -1;
    }
    return 0;
  }
  if (strcmp (key, "cbw-buffer") == 0) {
    int64_t b = nbdkit_parse_size (value);
    if (b == -1) {           /* nbdkit's message does not name the key */
      nbdkit_error ("cbw-buffer=%s: expected a size (64M, 1G, 0)", value);
      return -1;
    }
    if (b > (int64_t) 1 << 40) {
      nbdkit_error ("cbw-buffer=%s: too large", value);
      return -1;
    }
    cbw_cfg.buffer_bytes = b;
    return 0;
  }
  if (strcmp (key, "cbw-source") == 0) {
    if (value[0] != '/') {
      nbdkit_error ("cbw-source=%s: expected an absolute path", value);
      return -1;
    }
    cbw_cfg.source = value;
    return 0;
  }
  if (strcmp (key, "cbw-debug-pit-delay-us") == 0)
    return nbdkit_parse_uint32_t (key, value, &cbw_cfg.debug_pit_delay_us);
  if (strcmp (key, "cbw-debug-unsafe-no-recheck") == 0) {
    int r = nbdkit_parse_bool (value);
    if (r == -1)
      return -1;
    cbw_cfg.debug_no_recheck = r;
    return 0;
  }
  return next (nxdata, key, value);
}

#define cbw_config_help \
  "cbw-control=SOCKET        Control socket (begin/end/status/...).\n" \
  "cbw-pit-export=NAME       Serve the point-in-time view as export NAME\n" \
  "                          (default: not served; see the man page).\n" \
  "cbw-granularity=SIZE|auto Tracking block size (auto: 4K, larger for\n" \
  "                          disks over 64G).\n" \
  "on-cbw-error=break-snapshot|break-guest-write\n" \
  "cbw-timeout=SECONDS       Max wait of a guest write for its copy (30).\n" \
  "cbw-connections=N         Connections to the backup target (8).\n" \
  "cbw-workers=N             Threads writing the buffer to the target (1).\n" \
  "cbw-buffer=SIZE           Write-back buffer for old data (64M; 0 = copy\n" \
  "                          synchronously).  break-snapshot only.\n" \
  "cbw-source=PATH           The raw image the disk below is, byte for\n" \
  "                          byte: copies to a local target go through\n" \
  "                          the kernel (reflink / copy_file_range)."

static int
cbw_config_complete (nbdkit_next_config_complete *next, nbdkit_backend *nxdata)
{
  if (cbw_cfg.control_path == NULL) {
    nbdkit_error ("cbw: cbw-control=SOCKET is required");
    return -1;
  }
  if (cbw_cfg.pit_export && cbw_cfg.pit_export[0] == '\0') {
    nbdkit_error ("cbw-pit-export: the name must not be empty (the empty "
                  "name is the live disk)");
    return -1;
  }
#if NBDKIT_VERSION_MAJOR == 1 && NBDKIT_VERSION_MINOR < 34
  if (cbw_cfg.pit_export)
    nbdkit_debug ("cbw: serving the point-in-time view as export '%s' on "
                  "nbdkit %s: this nbdkit aborts when a client hangs up "
                  "with several requests in flight (fixed in 1.33.10), "
                  "which would take the live disk down with it; let only "
                  "clients that keep one request in flight per connection "
                  "(cbwd's PIT export) connect to it", cbw_cfg.pit_export,
                  NBDKIT_VERSION_STRING);
#endif
  return next (nxdata);
}

static int
cbw_after_fork (nbdkit_backend *backend)
{
  struct cbw_err err = { 0 };

  cbw_backend = backend;
  ctl_server = cbw_ctl_server_start (cbw_cfg.control_path, &cbw_ctl_table,
                                     NULL, &err);
  if (ctl_server == NULL) {
    nbdkit_error ("cbw-control=%s: %s", cbw_cfg.control_path, err.msg);
    errno = err.errnum;
    return -1;
  }
  return 0;
}

static void
cbw_cleanup (nbdkit_backend *backend)
{
  struct cbw_session *s;

  (void) backend;
  cbw_ctl_server_stop (ctl_server);
  ctl_server = NULL;
  s = atomic_exchange (&cbw_active, NULL);
  if (s) {
    cbw_session_end (s);
    cbw_session_put (s);
  }
}

static int
cbw_list_exports (nbdkit_next_list_exports *next, nbdkit_backend *nxdata,
                  int readonly, int is_tls, struct nbdkit_exports *exports)
{
  (void) is_tls;
  if (next (nxdata, readonly, exports) == -1)
    return -1;
  if (cbw_cfg.pit_export == NULL)
    return 0;
  return nbdkit_add_export (exports, cbw_cfg.pit_export,
                            "cbw point-in-time view (read-only)");
}

static void *
cbw_open (nbdkit_next_open *next, nbdkit_context *ctx, int readonly,
          const char *exportname, int is_tls)
{
  struct handle *h;
  bool pit = cbw_cfg.pit_export != NULL &&
    strcmp (exportname, cbw_cfg.pit_export) == 0;

  (void) is_tls;
  h = calloc (1, sizeof *h);
  if (h == NULL) {
    nbdkit_error ("calloc: %m");
    return NULL;
  }
  h->pit = pit;
  if (pit) {
    {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&cbw_session_lock);
      h->s = atomic_load (&cbw_active);
      if (h->s)
        cbw_session_get (h->s);
    }
    if (h->s == NULL) {
      nbdkit_error ("cbw: export '%s': no backup session is active "
                    "(send 'begin' on the control socket first)", exportname);
      free (h);
      errno = ENOENT;
      return NULL;
    }
    if (next (ctx, 1, "") == -1) {
      cbw_session_put (h->s);
      free (h);
      return NULL;
    }
    return h;
  }
  if (next (ctx, readonly, exportname) == -1) {
    free (h);
    return NULL;
  }
  return h;
}

static void
cbw_close (void *handle)
{
  struct handle *h = handle;
  cbw_session_put (h->s);
  free (h);
}

#define H ((struct handle *) handle)

static int64_t
cbw_get_size (nbdkit_next *next, void *handle)
{
  int64_t size = next->get_size (next);   /* also primes nbdkit's range checks */

  if (H->pit && size >= 0 && (uint64_t) size != cbw_session_size (H->s)) {
    nbdkit_error ("cbw: the live disk is %" PRId64 " bytes, the session "
                  "was begun at %" PRIu64 " bytes", size,
                  cbw_session_size (H->s));
    errno = EIO;
    return -1;
  }
  return size;
}

static int
cbw_can_write (nbdkit_next *next, void *handle)
{
  return H->pit ? 0 : next->can_write (next);
}

static int
cbw_can_trim (nbdkit_next *next, void *handle)
{
  return H->pit ? 0 : next->can_trim (next);
}

static int
cbw_can_zero (nbdkit_next *next, void *handle)
{
  return H->pit ? NBDKIT_ZERO_NONE : next->can_zero (next);
}

static int
cbw_can_fast_zero (nbdkit_next *next, void *handle)
{
  return H->pit ? 0 : next->can_fast_zero (next);
}

static int
cbw_can_extents (nbdkit_next *next, void *handle)
{
  return H->pit ? 1 : next->can_extents (next);
}

static int
cbw_can_cache (nbdkit_next *next, void *handle)
{
  return H->pit ? NBDKIT_CACHE_NONE : next->can_cache (next);
}

static int
cbw_can_multi_conn (nbdkit_next *next, void *handle)
{
  return H->pit ? 1 : next->can_multi_conn (next);
}

static int
cbw_pread (nbdkit_next *next, void *handle, void *buf, uint32_t count,
           uint64_t offset, uint32_t flags, int *err)
{
  if (H->pit)
    return cbw_session_pit_read (H->s, next, buf, count, offset, err);
  return next->pread (next, buf, count, offset, flags, err);
}

static int
cbw_extents (nbdkit_next *next, void *handle, uint32_t count, uint64_t offset,
             uint32_t flags, struct nbdkit_extents *extents, int *err)
{
  if (H->pit)
    return cbw_session_pit_extents (H->s, next, count, offset, flags,
                                    extents, err);
  return next->extents (next, count, offset, flags, extents, err);
}

/* The guest write path: gate, copy-before-write, write down. */
enum wop { W_WRITE, W_ZERO, W_TRIM };

static int
guest_write (nbdkit_next *next, void *handle, enum wop op, const void *buf,
             uint32_t count, uint64_t offset, uint32_t flags, int *err)
{
  struct cbw_session *s;
  int r = -1;

  if (H->pit) {                 /* nbdkit already refuses: belt and braces */
    *err = EROFS;
    return -1;
  }
  cbw_gate_enter ();
  s = atomic_load_explicit (&cbw_active, memory_order_acquire);
  if (s == NULL || cbw_session_before_write (s, next, offset, count, err) == 0) {
    switch (op) {
    case W_WRITE: r = next->pwrite (next, buf, count, offset, flags, err); break;
    case W_ZERO:  r = next->zero (next, count, offset, flags, err); break;
    case W_TRIM:  r = next->trim (next, count, offset, flags, err); break;
    }
  }
  cbw_gate_leave ();
  return r;
}

static int
cbw_pwrite (nbdkit_next *next, void *handle, const void *buf, uint32_t count,
            uint64_t offset, uint32_t flags, int *err)
{
  return guest_write (next, handle, W_WRITE, buf, count, offset, flags, err);
}

static int
cbw_zero (nbdkit_next *next, void *handle, uint32_t count, uint64_t offset,
          uint32_t flags, int *err)
{
  return guest_write (next, handle, W_ZERO, NULL, count, offset, flags, err);
}

static int
cbw_trim (nbdkit_next *next, void *handle, uint32_t count, uint64_t offset,
          uint32_t flags, int *err)
{
  return guest_write (next, handle, W_TRIM, NULL, count, offset, flags, err);
}

static struct nbdkit_filter filter = {
  .name = "cbw",
  .longname = "nbdkit copy-before-write filter",
  .config = cbw_config,
  .config_complete = cbw_config_complete,
  .config_help = cbw_config_help,
  .after_fork = cbw_after_fork,
  .cleanup = cbw_cleanup,
  .list_exports = cbw_list_exports,
  .open = cbw_open,
  .close = cbw_close,
  .get_size = cbw_get_size,
  .can_write = cbw_can_write,
  .can_trim = cbw_can_trim,
  .can_zero = cbw_can_zero,
  .can_fast_zero = cbw_can_fast_zero,
  .can_extents = cbw_can_extents,
  .can_cache = cbw_can_cache,
  .can_multi_conn = cbw_can_multi_conn,
  .pread = cbw_pread,
  .pwrite = cbw_pwrite,
  .zero = cbw_zero,
  .trim = cbw_trim,
  .extents = cbw_extents,
};

NBDKIT_REGISTER_FILTER (filter)
