/* cbw — plugin/chain/chain.c: nbdkit-chain-plugin, the live disk of a VM.
 *
 * It serves a raw file or block device (rawdisk.c).  Later an overlay chain
 * (snapshots, commit) sits on top of the raw layer; with no overlay every
 * callback goes straight to rawdisk, so the fast path costs one predictable
 * branch.  This file holds the nbdkit callbacks, the configuration and the
 * control-socket command table (common/control.h) — one table for the whole
 * plugin, to which overlay commands are added.
 *
 * Threads and locking: thread model PARALLEL.  The global `chain` is written
 * only during configuration and get_ready/after_fork/cleanup (single
 * threaded in nbdkit); afterwards the callbacks only read it, and rawdisk is
 * safe for concurrent use (see rawdisk.h).  Control handlers run on the
 * control thread and only read immutable fields or atomics, so they take no
 * lock.  Every connection shares the one fd, so a flush on any connection
 * covers writes completed on all of them (multi-conn is safe).
 *
 * Overlay chains: with chain=DESC, get_ready opens the overlay engine
 * (overlay_chain.h) instead of rawdisk and every data callback forwards to
 * it (chain.ovc != NULL); the engine does its own locking and its commands
 * (snapshot, commit, ...) are in the table below, forwarded by OVC_FORWARD.
 */
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <unistd.h>
#include <sys/un.h>

#include <json-c/json.h>

#include "cbw_err.h"
#include "control.h"
#include "disk_id.h"
#include "rawdisk.h"
#include "overlay_chain.h"

static struct chain {
  /* configuration */
  char *file;                    /* file= (absolute) */
  bool readonly;                 /* readonly= */
  bool direct;                   /* direct= */
  bool force_share;              /* force-share= */
  char *control_path;            /* control= (absolute), or NULL */
  char *chain_path;              /* chain= (absolute), or NULL: overlay chain */
  char *description;             /* "cbw-disk-id:UUID" from disk-id=, or NULL */
  bool chain_create;             /* chain-create=: a missing DESC is created */

  /* state after get_ready */
  struct rawdisk *raw;           /* the base layer: the data path */
  struct cbw_ctl_server *ctl;    /* control socket server, or NULL */
  struct ovc *ovc;               /* overlay chain engine when chain= is set;
                                  * then every callback goes to it (it opens
                                  * the base itself) and raw is NULL */
} chain;

/* Report a layer error through nbdkit. */
static int
fail (const struct cbw_err *err)
{
  nbdkit_error ("%s", err->msg);
  nbdkit_set_error (err->errnum ? err->errnum : EIO);
  errno = err->errnum ? err->errnum : EIO;
  return -1;
}

/* ---- configuration ------------------------------------------------------ */

static int
parse_bool (const char *key, const char *value, bool *out)
{
  int r = nbdkit_parse_bool (value);
  if (r == -1)
    return -1;                   /* nbdkit_parse_bool reported it */
  (void) key;
  *out = r;
  return 0;
}

static int
chain_config (const char *key, const char *value)
{
  if (strcmp (key, "file") == 0) {
    free (chain.file);
    chain.file = nbdkit_absolute_path (value);
    if (chain.file == NULL)
      return -1;
  }
  else if (strcmp (key, "readonly") == 0)
    return parse_bool (key, value, &chain.readonly);
  else if (strcmp (key, "direct") == 0)
    return parse_bool (key, value, &chain.direct);
  else if (strcmp (key, "force-share") == 0)
    return parse_bool (key, value, &chain.force_share);
  else if (strcmp (key, "chain") == 0) {
    free (chain.chain_path);
    chain.chain_path = nbdkit_absolute_path (value);
    if (chain.chain_path == NULL)
      return -1;
  }
  else if (strcmp (key, "disk-id") == 0) {
    if (!cbw_disk_id_valid (value)) {
      nbdkit_error ("disk-id=%s: not a lowercase UUID (8-4-4-4-12 hex digits)", value);
      errno = EINVAL;
      return -1;
    }
    free (chain.description);
    if (asprintf (&chain.description, "%s%s", CBW_DISK_ID_DESC_PREFIX, value) < 0) {
      chain.description = NULL;
      nbdkit_error ("asprintf: %m");
      return -1;
    }
  }
  else if (strcmp (key, "chain-create") == 0)
    return parse_bool (key, value, &chain.chain_create);
  else if (strcmp (key, "control") == 0) {
    free (chain.control_path);
    chain.control_path = nbdkit_absolute_path (value);
    if (chain.control_path == NULL)
      return -1;
  }
  else {
    nbdkit_error ("unknown parameter '%s' (see nbdkit-chain-plugin(1))", key);
    errno = EINVAL;
    return -1;
  }
  return 0;
}

static int
chain_config_complete (void)
{
  if (chain.file == NULL && chain.chain_path == NULL) {
    nbdkit_error ("you must supply the file=PATH parameter "
                  "(a raw file or a block device)");
    errno = EINVAL;
    return -1;
  }
  /* Catch what can be caught before nbdkit starts serving; the socket
   * itself is created in after_fork. */
  if (chain.control_path &&
      strlen (chain.control_path) >= sizeof ((struct sockaddr_un *) 0)->sun_path) {
    nbdkit_error ("control=%s: path too long (%zu bytes, a Unix socket path "
                  "is limited to %zu)", chain.control_path,
                  strlen (chain.control_path),
                  sizeof ((struct sockaddr_un *) 0)->sun_path - 1);
    errno = ENAMETOOLONG;
    return -1;
  }
  if (chain.chain_create && chain.chain_path == NULL) {
    nbdkit_error ("chain-create=true needs chain=DESC");
    errno = EINVAL;
    return -1;
  }
  if (chain.chain_create && chain.file == NULL) {
    nbdkit_error ("chain-create=true needs file=BASE (the base of the new chain)");
    errno = EINVAL;
    return -1;
  }
  return 0;
}

#define chain_config_help \
  "file=<PATH>         (required) Raw file or block device to serve.\n" \
  "readonly=<BOOL>     Open read-only (default false).\n" \
  "direct=<BOOL>       Use O_DIRECT (default false).\n" \
  "force-share=<BOOL>  Serve even if another process (QEMU) holds the image\n" \
  "                    and let others share it (default false: QEMU's\n" \
  "                    image locks, exclusive writer).\n" \
  "control=<SOCKET>    Unix socket for run-time control (JSON lines).\n" \
  "chain=<DESC>        Serve the overlay chain described by DESC (snapshots,\n" \
  "                    commit; docs/formats/overlay.md).  DESC must exist.\n" \
  "chain-create=<BOOL> Create DESC over file= (as its base) if it does not\n" \
  "                    exist (default false: a missing DESC is an error).\n" \
  "disk-id=<UUID>      Announce \"cbw-disk-id:UUID\" as the export description\n" \
  "                    (clients can tell a live cbw disk from a backup target)."

/* chain=DESC: open the overlay chain; with chain-create=true, create it
 * over file= first if DESC does not exist.  Without it a missing DESC is an
 * error: a disk whose descriptor was lost must not come back as a new empty
 * chain over its base (its overlays hold guest writes the base lacks). */
static int
chain_open_overlays (void)
{
  struct ovc_open_opts o = { .readonly = chain.readonly,
                            .force_share = chain.force_share };
  struct cbw_err err = { 0 };
  char *note = NULL;

  if (access (chain.chain_path, F_OK) == -1) {
    int e = errno;
    if (e != ENOENT || !chain.chain_create) {
      nbdkit_error ("chain descriptor %s: %s%s", chain.chain_path, strerror (e),
                    e == ENOENT ? " (the overlay chain's descriptor is missing: "
                    "not creating a new empty chain; restore the file, or give "
                    "chain-create=true only for a new chain)" : "");
      errno = e;
      return -1;
    }
    if (chain.readonly) {
      nbdkit_error ("chain descriptor %s does not exist and readonly=true",
                    chain.chain_path);
      errno = EROFS;
      return -1;
    }
    if (ovc_create (chain.chain_path, chain.file, 0, &err) == -1)
      return fail (&err);
    nbdkit_debug ("created chain %s over %s", chain.chain_path, chain.file);
  }
  chain.ovc = ovc_open (chain.chain_path, &o, &note, &err);
  if (chain.ovc == NULL)
    return fail (&err);
  if (note) {
    nbdkit_debug ("%s: %s", chain.chain_path, note);
    fprintf (stderr, "nbdkit-chain-plugin: %s: %s\n", chain.chain_path, note);
    free (note);
  }
  if (chain.file) {
    /* file= must name the chain's base, not some other disk */
    char *a = realpath (chain.file, NULL), *b = realpath (ovc_base_path (chain.ovc), NULL);
    bool same = a && b && strcmp (a, b) == 0;
    free (a);
    free (b);
    if (!same) {
      nbdkit_error ("file=%s is not the base of chain %s (its base is %s)",
                    chain.file, chain.chain_path, ovc_base_path (chain.ovc));
      ovc_close (chain.ovc);
      chain.ovc = NULL;
      errno = EINVAL;
      return -1;
    }
  }
  return 0;
}

static int
chain_get_ready (void)
{
  struct rawdisk_opts o = { .readonly = chain.readonly,
                            .direct = chain.direct,
                            .force_share = chain.force_share };
  struct cbw_err err = { 0 };

  if (chain.chain_path)
    return chain_open_overlays ();
  chain.raw = rawdisk_open (chain.file, &o, &err);
  if (chain.raw == NULL)
    return fail (&err);
  return 0;
}

/* ---- control commands --------------------------------------------------- */

static int
cmd_status (void *data, struct json_object *args, struct cbw_ctl_reply *reply)
{
  struct chain *c = data;
  struct rawdisk_info info;
  struct json_object *r, *flags;

  (void) args;
  if (c->ovc) {
    r = json_object_new_object ();
    if (r == NULL)
      return cbw_ctl_fail (reply, CBW_CTL_GENERIC_ERROR, "out of memory");
    json_object_object_add (r, "file", json_object_new_string (ovc_base_path (c->ovc)));
    json_object_object_add (r, "size", json_object_new_int64 ((int64_t) ovc_size (c->ovc)));
    json_object_object_add (r, "readonly", json_object_new_boolean (c->readonly));
    json_object_object_add (r, "direct", json_object_new_boolean (false));
    json_object_object_add (r, "force-share", json_object_new_boolean (c->force_share));
    json_object_object_add (r, "overlays", json_object_new_int ((int) ovc_nlayers (c->ovc)));
    json_object_object_add (r, "chain", ovc_status_json (c->ovc));
    reply->ret = r;
    return 0;
  }
  if (c->raw == NULL)
    return cbw_ctl_fail (reply, CBW_CTL_GENERIC_ERROR, "no disk open");
  rawdisk_get_info (c->raw, &info);
  r = json_object_new_object ();
  flags = json_object_new_object ();
  if (r == NULL || flags == NULL) {
    json_object_put (r);
    json_object_put (flags);
    return cbw_ctl_fail (reply, CBW_CTL_GENERIC_ERROR, "out of memory");
  }
  json_object_object_add (r, "file", json_object_new_string (info.path));
  json_object_object_add (r, "size", json_object_new_int64 ((int64_t) info.size));
  json_object_object_add (r, "readonly", json_object_new_boolean (info.readonly));
  json_object_object_add (r, "direct", json_object_new_boolean (info.direct));
  json_object_object_add (r, "force-share", json_object_new_boolean (c->force_share));
  json_object_object_add (r, "overlays", json_object_new_int (0));
  json_object_object_add (flags, "block_device",
                          json_object_new_boolean (info.block_device));
  json_object_object_add (flags, "align", json_object_new_int64 (info.align));
  json_object_object_add (flags, "can_extents",
                          json_object_new_boolean (info.can_extents));
  json_object_object_add (flags, "can_punch_hole",
                          json_object_new_boolean (info.can_punch_hole));
  json_object_object_add (flags, "can_zero_range",
                          json_object_new_boolean (info.can_zero_range));
  json_object_object_add (flags, "can_discard",
                          json_object_new_boolean (info.can_discard));
  json_object_object_add (flags, "multi_conn", json_object_new_boolean (true));
  json_object_object_add (flags, "fua", json_object_new_string ("native"));
  json_object_object_add (r, "flags", flags);
  reply->ret = r;
  return 0;
}

static const struct cbw_ctl_arg no_args[] = { { NULL } };

/* Overlay chain commands: forwarded to the engine (overlay_chain.h). */
#define OVC_FORWARD(fn)                                                        \
  static int                                                                   \
  cmd_##fn (void *data, struct json_object *args, struct cbw_ctl_reply *reply) \
  {                                                                            \
    struct chain *c = data;                                                    \
    if (c->ovc == NULL)                                                        \
      return cbw_ctl_fail (reply, CBW_CTL_NOT_FOUND,                           \
                           "no overlay chain: start the plugin with chain=DESC"); \
    return ovc_ctl_##fn (c->ovc, args, reply);                                 \
  }
OVC_FORWARD (snapshot)
OVC_FORWARD (commit)
OVC_FORWARD (commit_cancel)
OVC_FORWARD (commit_speed)
OVC_FORWARD (list)
OVC_FORWARD (layer_extents)

static const struct cbw_ctl_command chain_commands[] = {
  { "status", cmd_status, no_args,
    "Describe the served disk: its file, size and mode, and what the "
    "file or device supports.",
    "`{\"file\": STRING, \"size\": UINT, \"readonly\": BOOL, \"direct\": BOOL, "
    "\"overlays\": UINT, \"flags\": {\"block_device\": BOOL, \"align\": UINT, "
    "\"can_extents\": BOOL, \"can_punch_hole\": BOOL, \"can_zero_range\": "
    "BOOL, \"can_discard\": BOOL, \"multi_conn\": BOOL, \"fua\": \"native\"}}` "
    "— `align` is the direct I/O alignment (1 without direct=true); the "
    "`can_*` flags turn false once the filesystem refused that operation. "
    "With chain=, `chain` holds the overlay chain: `{\"size\", \"cluster_size\", "
    "\"generation\", \"layers\": [{\"index\", \"name\", \"kind\", \"writable\", "
    "\"allocated_bytes\", \"zero_bytes\", \"label\"}], \"operation\": {\"type\", "
    "\"state\", \"lo\", \"hi\", \"active\", \"mode\", \"done\", \"total\", "
    "\"speed\", \"error\"}}` (operation: the running or last commit)." },
  { "snapshot", cmd_snapshot, ovc_ctl_snapshot_args, OVC_CTL_DOC_SNAPSHOT,
    "`{\"layer\": STRING, \"index\": UINT, \"layers\": UINT}`" },
  { "commit", cmd_commit, ovc_ctl_commit_args, OVC_CTL_DOC_COMMIT,
    "`{\"lo\": UINT, \"hi\": UINT, \"active\": BOOL}`" },
  { "commit-cancel", cmd_commit_cancel, no_args, OVC_CTL_DOC_CANCEL, "`{}`" },
  { "commit-speed", cmd_commit_speed, ovc_ctl_speed_args, OVC_CTL_DOC_SPEED, "`{}`" },
  { "list", cmd_list, no_args, OVC_CTL_DOC_LIST,
    "`{\"layers\": [...]}` as in `status`" },
  { "layer-extents", cmd_layer_extents, ovc_ctl_layer_extents_args,
    OVC_CTL_DOC_LAYER_EXTENTS,
    "`{\"layer\": UINT, \"name\": STRING, \"cluster-size\": UINT, \"extents\": "
    "[{\"offset\": UINT, \"length\": UINT, \"zero\": BOOL}], \"next\": UINT|null}`" },
  { NULL }
};

static const struct cbw_ctl_table chain_table = { "chain", chain_commands };

static int
chain_after_fork (void)
{
  struct cbw_err err = { 0 };

  /* Threads do not survive nbdkit's fork into the background, so the
   * control thread starts here. */
  if (chain.control_path) {
    chain.ctl = cbw_ctl_server_start (chain.control_path, &chain_table,
                                      &chain, &err);
    if (chain.ctl == NULL)
      return fail (&err);
  }
  return 0;
}

static void
chain_cleanup (void)
{
  cbw_ctl_server_stop (chain.ctl);
  chain.ctl = NULL;
  rawdisk_close (chain.raw);
  chain.raw = NULL;
  ovc_close (chain.ovc);
  chain.ovc = NULL;
}

static void
chain_unload (void)
{
  free (chain.file);
  free (chain.control_path);
  free (chain.chain_path);
  free (chain.description);
}

/* ---- overlay chain data path (chain.ovc != NULL) ------------------------ */

static int
ovl_zero (uint32_t count, uint64_t offset, uint32_t flags)
{
  struct cbw_err err;
  if ((flags & NBDKIT_FLAG_FAST_ZERO) &&
      !ovc_zero_is_fast (chain.ovc, count, offset)) {
    nbdkit_set_error (ENOTSUP);
    errno = ENOTSUP;
    return -1;
  }
  if (ovc_zero (chain.ovc, count, offset, flags & NBDKIT_FLAG_FUA, &err) == -1)
    return fail (&err);
  return 0;
}

/* base:allocation through the chain: clusters recorded as zero are
 * HOLE|ZERO; everything else is data (a hole in the raw base is not
 * reported, which is always safe). */
static int
ovl_extents (uint32_t count, uint64_t offset, uint32_t flags,
             struct nbdkit_extents *extents)
{
  struct cbw_err err;
  uint64_t end = offset + count;
  while (offset < end) {
    uint64_t len;
    bool alloc, zero;
    if (ovc_extent (chain.ovc, offset, end - offset, &len, &alloc, &zero, &err) == -1)
      return fail (&err);
    if (nbdkit_add_extent (extents, offset, len,
                           zero ? NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO : 0) == -1)
      return -1;
    offset += len;
    if (flags & NBDKIT_FLAG_REQ_ONE)
      break;
  }
  return 0;
}

/* ---- per-connection ----------------------------------------------------- */

static void *
chain_open (int readonly)
{
  (void) readonly;
  return NBDKIT_HANDLE_NOT_NEEDED;
}

static int64_t
chain_get_size (void *h)
{
  (void) h;
  if (chain.ovc)
    return (int64_t) ovc_size (chain.ovc);
  return (int64_t) rawdisk_size (chain.raw);
}

static int
chain_block_size (void *h, uint32_t *minimum, uint32_t *preferred,
                  uint32_t *maximum)
{
  /* with a chain: whole clusters avoid copy-up */
  uint32_t a = chain.ovc ? ovc_cluster_size (chain.ovc) : rawdisk_align (chain.raw);
  (void) h;
  *minimum = 1;                  /* any alignment works (bounce buffers) */
  *preferred = a > 4096 ? a : 4096;
  *maximum = 0xffffffff;
  return 0;
}

static int
chain_can_write (void *h)
{
  (void) h;
  return !chain.readonly;
}

static int chain_true (void *h) { (void) h; return 1; }

static int
chain_can_extents (void *h)
{
  struct rawdisk_info info;
  (void) h;
  if (chain.ovc)
    return 1;
  rawdisk_get_info (chain.raw, &info);
  return info.can_extents;
}

static int
chain_can_fua (void *h)
{
  (void) h;
  return NBDKIT_FUA_NATIVE;
}

static int
chain_can_cache (void *h)
{
  (void) h;
  return chain.ovc ? NBDKIT_CACHE_NONE : NBDKIT_CACHE_NATIVE;
}

static int
chain_thread_model (void)
{
  return NBDKIT_THREAD_MODEL_PARALLEL;
}

static int
chain_pread (void *h, void *buf, uint32_t count, uint64_t offset,
             uint32_t flags)
{
  struct cbw_err err;
  (void) h; (void) flags;
  if (chain.ovc) {
    if (ovc_pread (chain.ovc, buf, count, offset, &err) == -1)
      return fail (&err);
    return 0;
  }
  if (rawdisk_pread (chain.raw, buf, count, offset, &err) == -1)
    return fail (&err);
  return 0;
}

static int
chain_pwrite (void *h, const void *buf, uint32_t count, uint64_t offset,
              uint32_t flags)
{
  struct cbw_err err;
  (void) h;
  if (chain.ovc) {
    if (ovc_pwrite (chain.ovc, buf, count, offset, flags & NBDKIT_FLAG_FUA, &err) == -1)
      return fail (&err);
    return 0;
  }
  if (rawdisk_pwrite (chain.raw, buf, count, offset,
                      flags & NBDKIT_FLAG_FUA, &err) == -1)
    return fail (&err);
  return 0;
}

static int
chain_flush (void *h, uint32_t flags)
{
  struct cbw_err err;
  (void) h; (void) flags;
  if (chain.ovc) {
    if (ovc_flush (chain.ovc, &err) == -1)
      return fail (&err);
    return 0;
  }
  if (rawdisk_flush (chain.raw, &err) == -1)
    return fail (&err);
  return 0;
}

static int
chain_trim (void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
  struct cbw_err err;
  (void) h;
  if (chain.ovc)          /* advisory: an overlay keeps what it has */
    return (flags & NBDKIT_FLAG_FUA) ? chain_flush (h, 0) : 0;
  if (rawdisk_trim (chain.raw, count, offset, flags & NBDKIT_FLAG_FUA,
                    &err) == -1)
    return fail (&err);
  return 0;
}

static int
chain_zero (void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
  struct cbw_err err;
  (void) h;
  if (chain.ovc)
    return ovl_zero (count, offset, flags);
  if (rawdisk_zero (chain.raw, count, offset, flags & NBDKIT_FLAG_MAY_TRIM,
                    flags & NBDKIT_FLAG_FAST_ZERO, flags & NBDKIT_FLAG_FUA,
                    &err) == -1) {
    if (err.errnum == ENOTSUP) {
      /* Not an error worth logging: nbdkit writes zeroes instead, or tells
       * the client a fast zero is not possible. */
      nbdkit_debug ("%s", err.msg);
      nbdkit_set_error (ENOTSUP);
      errno = ENOTSUP;
      return -1;
    }
    return fail (&err);
  }
  return 0;
}

struct extents_ctx {
  struct nbdkit_extents *extents;
};

static int
add_extent (void *opaque, uint64_t offset, uint64_t len, uint32_t type,
            struct cbw_err *err)
{
  struct extents_ctx *ctx = opaque;
  uint32_t t = 0;

  if (type & RAWDISK_HOLE) t |= NBDKIT_EXTENT_HOLE;
  if (type & RAWDISK_ZERO) t |= NBDKIT_EXTENT_ZERO;
  if (nbdkit_add_extent (ctx->extents, offset, len, t) == -1)
    return cbw_err_set (err, errno ? errno : EIO, "nbdkit_add_extent failed");
  return 0;
}

static int
chain_extents (void *h, uint32_t count, uint64_t offset, uint32_t flags,
               struct nbdkit_extents *extents)
{
  struct extents_ctx ctx = { extents };
  struct cbw_err err;
  (void) h;
  if (chain.ovc)
    return ovl_extents (count, offset, flags, extents);
  if (rawdisk_extents (chain.raw, count, offset, flags & NBDKIT_FLAG_REQ_ONE,
                       add_extent, &ctx, &err) == -1)
    return fail (&err);
  return 0;
}

static int
chain_cache (void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
  struct cbw_err err;
  (void) h; (void) flags;
  if (rawdisk_cache (chain.raw, count, offset, &err) == -1)
    return fail (&err);
  return 0;
}

/* The disk's identity, for clients that ask (NBD_INFO_DESCRIPTION). */
static const char *
chain_export_description (void *h)
{
  (void) h;
  return chain.description;
}

static struct nbdkit_plugin plugin = {
  .name              = "chain",
  .longname          = "cbw chain plugin (raw disk + overlay chain)",
  .version           = CBW_VERSION,
  .description       = "Serve a raw file or block device, with live "
                       "snapshots through an overlay chain.",
  .unload            = chain_unload,
  .config            = chain_config,
  .config_complete   = chain_config_complete,
  .config_help       = chain_config_help,
  .magic_config_key  = "file",
  .get_ready         = chain_get_ready,
  .after_fork        = chain_after_fork,
  .cleanup           = chain_cleanup,
  .thread_model      = chain_thread_model,
  .open              = chain_open,
  .get_size          = chain_get_size,
  .block_size        = chain_block_size,
  .can_write         = chain_can_write,
  .can_flush         = chain_true,
  .can_trim          = chain_can_write,
  .can_zero          = chain_can_write,
  .can_fast_zero     = chain_true,
  .can_fua           = chain_can_fua,
  .can_multi_conn    = chain_true,
  .can_extents       = chain_can_extents,
  .can_cache         = chain_can_cache,
  .pread             = chain_pread,
  .pwrite            = chain_pwrite,
  .flush             = chain_flush,
  .trim              = chain_trim,
  .zero              = chain_zero,
  .extents           = chain_extents,
  .cache             = chain_cache,
  .export_description = chain_export_description,
  .errno_is_preserved = 1,
};

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL
NBDKIT_REGISTER_PLUGIN (plugin)
