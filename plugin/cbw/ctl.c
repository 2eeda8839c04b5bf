/* cbw — plugin/cbw/ctl.c: the cbw filter's control commands (one table,
 * common/control.h): begin, end, status, skip, quiesce, resume.  The
 * reference docs/control/cbw.md is generated from this table.
 *
 * Locking: handlers run on the control thread only, one at a time, so two
 * begins can never race.  They publish/withdraw cbw_active under
 * cbw_session_lock with the write gate closed and drained (gate.c); all
 * network I/O (target connect, dirtybitmap queries) happens before the gate
 * is closed and without any lock held.
 */
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/stat.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>
#include <nbdkit-filter.h>

#include "cbw.h"
#include "cbw_err.h"
#include "cleanup.h"
#include "gate.h"
#include "target.h"

#define DRAIN_SLACK_NS (5LL * 1000000000)

/* The disk size, from a shared context opened on the plugin. */
static int64_t
disk_size (struct cbw_ctl_reply *r)
{
  nbdkit_next *nx;
  int64_t size;

  if (cbw_backend == NULL) {
    cbw_ctl_fail (r, CBW_CTL_GENERIC_ERROR, "nbdkit is not ready yet");
    return -1;
  }
  nx = nbdkit_next_context_open (cbw_backend, 1, "", 1);
  if (nx == NULL) {
    cbw_ctl_fail (r, CBW_CTL_IO_ERROR, "cannot open the live disk");
    return -1;
  }
  if (nx->prepare (nx) == -1) {
    nbdkit_next_context_close (nx);
    cbw_ctl_fail (r, CBW_CTL_IO_ERROR, "cannot open the live disk");
    return -1;
  }
  size = nx->get_size (nx);
  nx->finalize (nx);
  nbdkit_next_context_close (nx);
  if (size < 0)
    cbw_ctl_fail (r, CBW_CTL_IO_ERROR, "cannot get the size of the live disk");
  return size;
}

static uint32_t
auto_granularity (uint64_t size)
{
  uint32_t g = 4096;
  while ((size >> __builtin_ctz (g)) > (1ULL << 24) && g < (1u << 30))
    g <<= 1;
  return g;
}

static bool
get_u64 (struct json_object *o, const char *key, uint64_t *v)
{
  struct json_object *x;
  if (!json_object_object_get_ex (o, key, &x) ||
      !json_object_is_type (x, json_type_int) || json_object_get_int64 (x) < 0)
    return false;
  *v = json_object_get_int64 (x);
  return true;
}

/* Mark the ranges of an "extents" argument ([{"offset":O,"length":L}] or
 * [[O,L]]) as needed.  Validates everything before changing anything. */
static int
needed_from_list (struct cbw_session *s, struct json_object *arr,
                  uint64_t size, struct cbw_ctl_reply *r)
{
  size_t i, n = json_object_array_length (arr);
  int pass;

  for (pass = 0; pass < 2; ++pass) {
    for (i = 0; i < n; ++i) {
      struct json_object *e = json_object_array_get_idx (arr, i);
      uint64_t o, l;
      bool ok;
      if (json_object_is_type (e, json_type_array) &&
          json_object_array_length (e) == 2) {
        struct json_object *a = json_object_array_get_idx (e, 0);
        struct json_object *b = json_object_array_get_idx (e, 1);
        ok = json_object_is_type (a, json_type_int) &&
          json_object_is_type (b, json_type_int) &&
          json_object_get_int64 (a) >= 0 && json_object_get_int64 (b) >= 0;
        o = ok ? json_object_get_int64 (a) : 0;
        l = ok ? json_object_get_int64 (b) : 0;
      }
      else
        ok = json_object_is_type (e, json_type_object) &&
          get_u64 (e, "offset", &o) && get_u64 (e, "length", &l);
      if (!ok)
        return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER,
                             "extents[%zu]: expected {\"offset\":O,"
                             "\"length\":L} or [O,L] with O,L >= 0", i);
      if (o > size || l > size - o)
        return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER,
                             "extents[%zu]: %" PRIu64 "+%" PRIu64 " is past "
                             "the end of the disk (%" PRIu64 " bytes)",
                             i, o, l, size);
      if (pass == 1)
        cbw_session_mark_needed (s, o, l);
    }
  }
  return 0;
}

/* Ask the dirtybitmap filter's control socket which blocks of bitmap `name`
 * are dirty ("extents" command, paged with "next"). */
static int
needed_from_bitmap (struct cbw_session *s, const char *sock, const char *name,
                    uint64_t size, struct cbw_ctl_reply *r)
{
  struct cbw_err err = { 0 };
  struct cbw_ctl_client *c = cbw_ctl_client_connect (sock, &err);
  uint64_t pos = 0;
  int ret = -1;

  if (c == NULL)
    return cbw_ctl_fail (r, CBW_CTL_NOT_FOUND, "bitmap-control %s: %s",
                         sock, err.msg);
  while (pos < size) {
    struct json_object *args = json_object_new_object ();
    struct json_object *rep, *ret_o, *exts, *nx, *e;
    uint64_t next = 0, o, l;
    size_t i;

    json_object_object_add (args, "name", json_object_new_string (name));
    json_object_object_add (args, "offset", json_object_new_int64 (pos));
    json_object_object_add (args, "length",
                            json_object_new_int64 (size - pos));
    rep = cbw_ctl_client_call (c, "extents", args, &err);
    if (rep == NULL) {
      cbw_ctl_fail (r, CBW_CTL_IO_ERROR, "bitmap-control %s: %s", sock,
                    err.msg);
      goto out;
    }
    if (json_object_object_get_ex (rep, "error", &e)) {
      struct json_object *cls = NULL, *desc = NULL;
      json_object_object_get_ex (e, "class", &cls);
      json_object_object_get_ex (e, "desc", &desc);
      cbw_ctl_fail (r, cls && strcmp (json_object_get_string (cls),
                                      "NotFound") == 0
                    ? CBW_CTL_NOT_FOUND : CBW_CTL_GENERIC_ERROR,
                    "bitmap '%s': %s", name,
                    desc ? json_object_get_string (desc) : "error");
      json_object_put (rep);
      goto out;
    }
    if (!json_object_object_get_ex (rep, "return", &ret_o) ||
        !json_object_object_get_ex (ret_o, "extents", &exts) ||
        !json_object_is_type (exts, json_type_array)) {
      cbw_ctl_fail (r, CBW_CTL_IO_ERROR, "bitmap '%s': malformed extents "
                    "reply", name);
      json_object_put (rep);
      goto out;
    }
    for (i = 0; i < json_object_array_length (exts); ++i) {
      struct json_object *x = json_object_array_get_idx (exts, i), *d;
      if (!get_u64 (x, "offset", &o) || !get_u64 (x, "length", &l) ||
          o < pos || o > size || l > size - o) {
        cbw_ctl_fail (r, CBW_CTL_IO_ERROR, "bitmap '%s': malformed or out "
                      "of range extent in reply", name);
        json_object_put (rep);
        goto out;
      }
      /* Extents are the dirty ones; a "dirty": false entry is clean. */
      if (!json_object_object_get_ex (x, "dirty", &d) ||
          json_object_get_boolean (d))
        cbw_session_mark_needed (s, o, l);
    }
    /* "next": the offset to continue from, or null when the range is done. */
    if (!json_object_object_get_ex (ret_o, "next", &nx) ||
        !json_object_is_type (nx, json_type_int)) {
      json_object_put (rep);
      break;
    }
    next = json_object_get_int64 (nx);
    json_object_put (rep);
    if (next <= pos || next > size) {
      cbw_ctl_fail (r, CBW_CTL_IO_ERROR, "bitmap '%s': bad 'next' %" PRIu64
                    " in extents reply (at %" PRIu64 ")", name, next, pos);
      goto out;
    }
    pos = next;
  }
  ret = 0;
 out:
  cbw_ctl_client_close (c);
  return ret;
}

static struct json_object *
stats_json (struct cbw_session *s)
{
  struct cbw_session_stats st;
  struct json_object *o = json_object_new_object ();

  if (s == NULL) {
    json_object_object_add (o, "state", json_object_new_string ("idle"));
  }
  else {
    cbw_session_stats (s, &st);
    json_object_object_add (o, "state", json_object_new_string
                            (st.ended ? "ended" :
                             st.broken ? "broken" : "active"));
#define ADD(k, v) json_object_object_add (o, k, json_object_new_int64 (v))
    ADD ("size", st.size);
    ADD ("granularity", st.granularity);
    ADD ("blocks", st.blocks);
    ADD ("needed-blocks", st.needed_blocks);
    ADD ("copied-blocks", st.copied_blocks);
    ADD ("copied-bytes", st.copied_bytes);
    ADD ("zero-bytes", st.zero_bytes);
    ADD ("skipped-blocks", st.skipped_blocks);
    ADD ("failed-blocks", st.failed_blocks);
    ADD ("in-flight", st.in_flight);
    ADD ("errors", st.errors);
    ADD ("guest-write-waits", st.guest_write_waits);
    ADD ("pit-rechecks", st.pit_rechecks);
    ADD ("buffered-blocks", st.buffered_blocks);
    ADD ("copy-workers", st.copy_workers);
    ADD ("direct-bytes", st.direct_bytes);
    ADD ("clone-bytes", st.clone_bytes);
    ADD ("kernel-copy-bytes", st.kernel_copy_bytes);
    ADD ("kernel-copy-fallbacks", st.kernel_copy_fallbacks);
    ADD ("write-back-batches", st.writeback_batches);
    ADD ("write-back-copies", st.writeback_copies);
    ADD ("timeout-ms", st.timeout_ms);
#undef ADD
    json_object_object_add (o, "broken", json_object_new_boolean (st.broken));
    json_object_object_add (o, "last-error",
                            json_object_new_string (st.last_error));
    json_object_object_add (o, "state-file", st.state_file[0]
                            ? json_object_new_string (st.state_file) : NULL);
  }
  json_object_object_add (o, "quiesced",
                          json_object_new_boolean (cbw_gate_quiesced ()));
  json_object_object_add (o, "on-cbw-error", json_object_new_string
                          (cbw_cfg.policy == CBW_BREAK_SNAPSHOT
                           ? "break-snapshot" : "break-guest-write"));
  json_object_object_add (o, "pit-export",
                          cbw_cfg.pit_export
                          ? json_object_new_string (cbw_cfg.pit_export)
                          : NULL);
  return o;
}

/* Copies shorter than this go through user space even with cbw-source: a
 * pread and a pwrite of a few KiB cost fewer system calls than the hole
 * probes and the copy_file_range (see bench/cbw/results.md). */
#ifndef CBW_KERNEL_COPY_MIN
#define CBW_KERNEL_COPY_MIN (64 * 1024)
#endif

/* Open cbw-source for a session on a disk of `size` bytes: a regular file
 * of exactly that size (a different size proves it is not the disk below;
 * the same size is the operator's word that it is). */
static int
open_source (int64_t size, int *fd, struct cbw_err *err)
{
  struct stat st;

  *fd = open (cbw_cfg.source, O_RDONLY | O_CLOEXEC | O_NOCTTY);
  if (*fd == -1)
    return cbw_err_set (err, errno, "cbw-source %s: open: %s", cbw_cfg.source,
                        strerror (errno));
  if (fstat (*fd, &st) == -1) {
    int e = errno;
    close (*fd);
    return cbw_err_set (err, e, "cbw-source %s: fstat: %s", cbw_cfg.source,
                        strerror (e));
  }
  if (!S_ISREG (st.st_mode)) {
    close (*fd);
    return cbw_err_set (err, EINVAL, "cbw-source %s is not a regular file",
                        cbw_cfg.source);
  }
  if (st.st_size != size) {
    close (*fd);
    return cbw_err_set (err, EINVAL, "cbw-source %s: %lld bytes, but the disk "
                        "has %lld: it is not the image below the filter",
                        cbw_cfg.source, (long long) st.st_size,
                        (long long) size);
  }
  return 0;
}

static int
h_begin (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  const char *uri = cbw_ctl_arg_str (args, "target", NULL);
  const char *bitmap = cbw_ctl_arg_str (args, "bitmap", NULL);
  const char *bsock = cbw_ctl_arg_str (args, "bitmap-control", NULL);
  const char *state_file = cbw_ctl_arg_str (args, "state-file", NULL);
  long long gran = cbw_ctl_arg_int (args, "granularity", 0);
  long long conns = cbw_ctl_arg_int (args, "connections",
                                     cbw_cfg.connections);
  long long tlimit = cbw_ctl_arg_int (args, "target-limit", 0);
  bool direct = cbw_ctl_arg_bool (args, "target-direct", false);
  bool has_tmo = json_object_object_get_ex (args, "timeout-ms", NULL);
  long long tmo_ms = cbw_ctl_arg_int (args, "timeout-ms", 1);
  struct json_object *extents = NULL;
  struct cbw_session_params p = { 0 };
  struct cbw_target *t;
  struct cbw_session *s;
  struct cbw_err err = { 0 };
  int64_t size;

  (void) data;
  json_object_object_get_ex (args, "extents", &extents);
  if (atomic_load (&cbw_active))
    return cbw_ctl_fail (r, CBW_CTL_BUSY, "a backup session is already "
                         "active (send 'end' first)");
  if ((bitmap != NULL) != (bsock != NULL))
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "'bitmap' and "
                         "'bitmap-control' go together");
  if (bitmap && extents)
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "give either "
                         "'bitmap' or 'extents', not both");
  if (gran && (gran < 512 || gran > (1 << 30) || (gran & (gran - 1))))
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "granularity %lld: "
                         "expected a power of 2 in [512, 1G]", gran);
  if (conns < 1 || conns > 64)
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "connections %lld: "
                         "expected 1..64", conns);
  if (tmo_ms < 1 || tmo_ms > 86400000LL)
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "timeout-ms %lld: "
                         "expected 1..86400000", tmo_ms);
  /* The session's bound on a guest write's wait (and on every target
   * command): `timeout-ms`, else cbw-timeout. */
  int64_t tmo_ns = has_tmo ? tmo_ms * 1000000LL : cbw_cfg.timeout_ns;

  size = disk_size (r);
  if (size < 0)
    return -1;

  t = cbw_target_open (uri, conns, cbw_now_ns () + tmo_ns, &err);
  if (t == NULL)
    return cbw_ctl_fail (r, CBW_CTL_IO_ERROR, "%s", err.msg);
  if (cbw_target_size (t) < size) {
    int64_t tsize = cbw_target_size (t);
    cbw_target_close (t);
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "target %s is "
                         "smaller (%" PRId64 " bytes) than the disk (%" PRId64
                         " bytes)", uri, tsize, size);
  }
  if (tlimit > 0 && cbw_target_set_limit (t, (uint64_t) tlimit, &err) == -1) {
    cbw_target_close (t);
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "%s", err.msg);
  }
  if (direct && cbw_target_set_direct (t, &err) == -1) {
    cbw_target_close (t);
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "%s", err.msg);
  }

  p.size = size;
  p.granularity = gran ? gran : cbw_cfg.granularity ? cbw_cfg.granularity
    : auto_granularity (size);
  p.policy = cbw_cfg.policy;
  p.timeout_ns = tmo_ns;
  p.debug_pit_delay_us = cbw_cfg.debug_pit_delay_us;
  p.debug_no_recheck = cbw_cfg.debug_no_recheck;
  p.buffer_bytes = cbw_cfg.buffer_bytes;
  /* Each worker pipelines a batch of copies on one connection; fewer,
   * fuller batches cost less CPU per copy than many half-empty ones (see
   * cbw-workers in the man page).  The rest of the pool serves synchronous
   * copies (buffer full, break-guest-write). */
  p.workers = cbw_cfg.workers < conns ? cbw_cfg.workers : (unsigned) conns;
  p.state_file = state_file;
  if (cbw_cfg.source && cbw_target_can_copy_from (t)) {
    if (open_source (size, &p.source_fd, &err) == -1) {
      cbw_target_close (t);
      return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "%s", err.msg);
    }
    p.has_source = true;
    p.source_min = CBW_KERNEL_COPY_MIN;
  }
  s = cbw_session_new (&p, t, &err);
  if (s == NULL) {
    cbw_target_close (t);
    return cbw_ctl_fail (r, state_file && err.errnum != ENOMEM
                         ? CBW_CTL_INVALID_PARAMETER : CBW_CTL_GENERIC_ERROR,
                         "%s", err.msg);
  }
  if (extents ? needed_from_list (s, extents, size, r)
      : bitmap ? needed_from_bitmap (s, bsock, bitmap, size, r)
      : (cbw_session_mark_all_needed (s), 0)) {
    cbw_session_put (s);
    return -1;
  }

  /* The point in time: drain the writes in flight, publish, let go. */
  if (cbw_gate_close_and_drain (cbw_now_ns () + cbw_cfg.timeout_ns +
                                DRAIN_SLACK_NS) == -1) {
    cbw_session_put (s);
    return cbw_ctl_fail (r, CBW_CTL_TIMEOUT, "guest writes in flight did "
                         "not drain; no session started");
  }
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&cbw_session_lock);
    atomic_store (&cbw_active, s);
  }
  cbw_gate_open ();
  nbdkit_debug ("cbw: session begun, target %s", uri);
  r->ret = stats_json (s);
  return 0;
}

static int
h_end (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_session *s;

  struct cbw_session_stats st;

  (void) data; (void) args;
  s = atomic_load (&cbw_active);
  if (s == NULL)
    return cbw_ctl_fail (r, CBW_CTL_NOT_FOUND, "no backup session is active");
  /* Writes in flight wait at most the session's timeout for their copy. */
  cbw_session_stats (s, &st);
  if (cbw_gate_close_and_drain (cbw_now_ns () + st.timeout_ms * 1000000LL +
                                DRAIN_SLACK_NS) == -1)
    return cbw_ctl_fail (r, CBW_CTL_TIMEOUT, "guest writes in flight did "
                         "not drain; the session is still active");
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&cbw_session_lock);
    s = atomic_exchange (&cbw_active, NULL);
  }
  /* Before any write can pass without a copy: readers of the state map
   * must see the end first. */
  cbw_session_publish_end (s);
  cbw_gate_open ();
  cbw_session_end (s);
  r->ret = stats_json (s);
  cbw_session_put (s);
  return 0;
}

static int
h_status (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_session *s;

  (void) data; (void) args;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&cbw_session_lock);
    s = atomic_load (&cbw_active);
    if (s)
      cbw_session_get (s);
  }
  r->ret = stats_json (s);
  cbw_session_put (s);
  return 0;
}

static int
h_skip (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  long long off = cbw_ctl_arg_int (args, "offset", 0);
  long long len = cbw_ctl_arg_int (args, "length", 0);
  struct cbw_session *s = atomic_load (&cbw_active);
  struct cbw_err err = { 0 };
  uint64_t released = 0;

  (void) data;
  if (s == NULL)
    return cbw_ctl_fail (r, CBW_CTL_NOT_FOUND, "no backup session is active");
  if (cbw_session_skip (s, off, len, &released, &err) == -1)
    return cbw_ctl_fail (r, err.errnum == EINVAL ? CBW_CTL_INVALID_PARAMETER
                         : CBW_CTL_IO_ERROR, "%s", err.msg);
  r->ret = json_object_new_object ();
  json_object_object_add (r->ret, "released-blocks",
                          json_object_new_int64 (released));
  return 0;
}

static int
h_quiesce (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  long long ms = cbw_ctl_arg_int (args, "timeout-ms", 10000);

  (void) data;
  if (ms < 1 || ms > 3600000)
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "timeout-ms %lld: "
                         "expected 1..3600000", ms);
  if (cbw_gate_quiesce (cbw_now_ns () + ms * 1000000, ms) == -1)
    return errno == EBUSY
      ? cbw_ctl_fail (r, CBW_CTL_BUSY, "already quiesced")
      : cbw_ctl_fail (r, CBW_CTL_TIMEOUT, "guest writes in flight did not "
                      "drain within %lld ms; writes resumed", ms);
  r->ret = json_object_new_object ();
  json_object_object_add (r->ret, "timeout-ms", json_object_new_int64 (ms));
  return 0;
}

static int
h_resume (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  bool was;

  (void) data; (void) args;
  if (cbw_gate_resume (&was) == -1)
    return cbw_ctl_fail (r, CBW_CTL_TIMEOUT, "the quiesce expired before "
                         "resume: guest writes had already resumed by "
                         "themselves (the quiesce failed)");
  if (!was)
    return cbw_ctl_fail (r, CBW_CTL_GENERIC_ERROR, "not quiesced");
  return 0;
}

static const struct cbw_ctl_arg begin_args[] = {
  { "target", CBW_ARG_STRING, true,
    "the backup target: an NBD URI (`nbd+unix:///?socket=PATH`, "
    "`nbd://host:port/export`) or an existing local file or block device "
    "(`file:///PATH`); must be writable and at least as large as the disk" },
  { "bitmap", CBW_ARG_STRING, false,
    "incremental: only blocks dirty in this bitmap of the dirtybitmap filter "
    "are needed (with `bitmap-control`)" },
  { "bitmap-control", CBW_ARG_STRING, false,
    "control socket of the dirtybitmap filter holding `bitmap`" },
  { "extents", CBW_ARG_ARRAY, false,
    "incremental: the needed ranges, `[{\"offset\":O,\"length\":L},...]` or "
    "`[[O,L],...]`; blocks they touch are needed" },
  { "granularity", CBW_ARG_UINT, false,
    "tracking block size for this session (power of 2, 512..1G); default "
    "`cbw-granularity`" },
  { "connections", CBW_ARG_UINT, false,
    "connections to the target; default `cbw-connections`" },
  { "timeout-ms", CBW_ARG_UINT, false,
    "this session's bound on how long a guest write may wait for the "
    "backup (its copy, buffer space, another write's copy) and on every "
    "target command, in milliseconds (1..86400000); past it "
    "`on-cbw-error` applies.  Default `cbw-timeout`" },
  { "target-limit", CBW_ARG_UINT, false,
    "local `file:` targets only: at most this many bytes allocated to the "
    "target file on the host; copies past it fail with ENOSPC (handled by "
    "`on-cbw-error`); default 0 = no limit" },
  { "target-direct", CBW_ARG_BOOL, false,
    "local `file:` targets only: write copies of 64 KiB and more with "
    "O_DIRECT, past the host's page cache (status `direct-bytes`); "
    "default false" },
  { "state-file", CBW_ARG_STRING, false,
    "create this file (must not exist; mode 0600) and keep the session's "
    "block states in a shared mapping of it "
    "(docs/formats/cbw-state-map.md), so that cbwd on the same host can "
    "serve point-in-time reads itself; removed at `end`" },
  { NULL },
};
static const struct cbw_ctl_arg skip_args[] = {
  { "offset", CBW_ARG_UINT, true, "start of the range (bytes)" },
  { "length", CBW_ARG_UINT, true, "length of the range (bytes)" },
  { NULL },
};
static const struct cbw_ctl_arg quiesce_args[] = {
  { "timeout-ms", CBW_ARG_UINT, false,
    "drain and hold at most this long (default 10000); then writes resume "
    "by themselves and `resume` reports the failure" },
  { NULL },
};
static const struct cbw_ctl_arg no_args[] = { { NULL } };

static const struct cbw_ctl_command commands[] = {
  { "begin", h_begin, begin_args,
    "Start a backup session: fix the point in time.  Guest writes in flight "
    "are drained first and new writes wait for the switch.  From then on the "
    "old data of every needed block is copied to the target before a guest "
    "write, write-zeroes or trim changes it, and the export named "
    "`cbw-pit-export` serves the point-in-time view.  Fails (nothing "
    "changed) if a session is active, the target is unreachable, read-only "
    "or smaller than the disk, the bitmap is unknown or a range is past the "
    "end.",
    "the session status (as `status`)" },
  { "status", h_status, no_args,
    "Report the session: state (`idle`, `active`, `broken`), block and byte "
    "counters, copies in flight, errors, last error, quiesce state.",
    "`state`, `size`, `granularity`, `blocks`, `needed-blocks`, "
    "`copied-blocks`, `copied-bytes`, `zero-bytes`, `skipped-blocks`, "
    "`failed-blocks`, `in-flight`, `errors`, `guest-write-waits`, "
    "`pit-rechecks`, `buffered-blocks`, `copy-workers`, `direct-bytes`, "
    "`clone-bytes`, `kernel-copy-bytes`, `kernel-copy-fallbacks`, "
    "`write-back-batches`, `write-back-copies`, `timeout-ms`, "
    "`broken`, `last-error`, `state-file`, `quiesced`, `on-cbw-error`, "
    "`pit-export`" },
  { "skip", h_skip, skip_args,
    "Release a range the backup reader has finished with: its whole blocks "
    "are no longer copied, point-in-time reads of them fail with EIO, and "
    "the target is sent a trim so it may drop them.",
    "`released-blocks`" },
  { "end", h_end, no_args,
    "End the session: drain guest writes, stop copying; open point-in-time "
    "connections get EIO from now on.",
    "the final session status" },
  { "quiesce", h_quiesce, quiesce_args,
    "Drain guest writes and hold new ones (for atomic multi-disk points in "
    "time: quiesce every disk, begin on each, resume).  After `timeout-ms` "
    "writes resume by themselves.",
    "`timeout-ms`" },
  { "resume", h_resume, no_args,
    "Let held guest writes go.  Fails with `Timeout` if the quiesce had "
    "already expired (so the caller knows its point in time is not atomic).",
    "{}" },
  { NULL },
};

const struct cbw_ctl_table cbw_ctl_table = { "cbw", commands };

/* For tools/ctl_docs.c, which dlopens the module to print the reference. */
__attribute__ ((visibility ("default"))) const struct cbw_ctl_table *
cbw_filter_ctl_table (void)
{
  return &cbw_ctl_table;
}
