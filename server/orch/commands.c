/* cbw — server/orch/commands.c: cbwd's control API, one table.
 *
 * cbw_orch_ctl_table is the single source of truth for the commands, their
 * typed arguments, dispatch and documentation: common/control validates a
 * request against it before a handler runs, `cbwd-orch --control-docs`
 * renders docs/control/cbwd.md from it (a test checks they match) and the
 * `cbw` CLI maps its subcommands onto these names.
 *
 * Handlers run on the control server's single thread, one request at a
 * time.  Mutating commands take the orchestrator's `busy` flag (Busy error
 * if another operation runs, e.g. from cbwd's own main) and first finish an
 * operation a crash interrupted.  Errors map errno to an error class:
 * EINVAL->InvalidParameter, ENOENT->NotFound, EEXIST->Exists,
 * EBUSY->Busy, ETIMEDOUT->Timeout, EIO->IOError, else GenericError.
 *
 * Locking: handlers read shared state under o->lock (see orch_internal.h)
 * and never hold it across I/O.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cleanup.h"
#include "fileutil.h"
#include "orch_internal.h"

#define ORCH_DISKS_MAX 256

static int
fail_err (struct cbw_ctl_reply *r, const struct cbw_err *e)
{
  enum cbw_ctl_error_class c;
  switch (e->errnum) {
  case EINVAL: case ENAMETOOLONG: c = CBW_CTL_INVALID_PARAMETER; break;
  case ENOENT: c = CBW_CTL_NOT_FOUND; break;
  case EEXIST: c = CBW_CTL_EXISTS; break;
  case EBUSY: case EADDRINUSE: c = CBW_CTL_BUSY; break;
  case ETIMEDOUT: c = CBW_CTL_TIMEOUT; break;
  case EIO: c = CBW_CTL_IO_ERROR; break;
  default: c = CBW_CTL_GENERIC_ERROR; break;
  }
  return cbw_ctl_fail (r, c, "%s", e->msg);
}

/* Busy + recovery of an interrupted operation. */
static int
enter (struct cbw_orch *o, struct cbw_ctl_reply *r, bool recover)
{
  struct cbw_err e = { 0 };
  if (orch_begin_busy (o, &e) < 0)
    return fail_err (r, &e);
  /* Never a lasting Busy: what cannot be redone is recorded as failed. */
  if (recover && orch_reconcile_or_abandon (o, &e) < 0) {
    orch_end_busy (o);
    return cbw_ctl_fail (r, CBW_CTL_BUSY, "an interrupted operation could not be "
                         "finished yet: %s", e.msg);
  }
  return 0;
}

/* Disk names from an optional array argument; all disks if absent. */
static char **
disk_names (struct cbw_orch *o, struct json_object *args, const char *key,
            size_t *n, struct cbw_ctl_reply *r)
{
  struct json_object *a;
  char **v;
  *n = 0;
  if (json_object_object_get_ex (args, key, &a)) {
    size_t len = json_object_array_length (a);
    if (len == 0 || len > ORCH_DISKS_MAX) {
      cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "'%s' must list 1 to %d disks",
                    key, ORCH_DISKS_MAX);
      return NULL;
    }
    v = calloc (len, sizeof *v);
    if (v == NULL) { cbw_ctl_fail (r, CBW_CTL_GENERIC_ERROR, "out of memory"); return NULL; }
    for (size_t i = 0; i < len; i++) {
      struct json_object *e = json_object_array_get_idx (a, i);
      if (!json_object_is_type (e, json_type_string)) {
        cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "'%s'[%zu] must be a string", key, i);
        for (size_t j = 0; j < i; j++) free (v[j]);
        free (v);
        return NULL;
      }
      v[i] = strdup (json_object_get_string (e));
      (*n)++;
    }
    return v;
  }
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  if (o->st.ndisks == 0) {
    cbw_ctl_fail (r, CBW_CTL_NOT_FOUND, "no disks (add one with disk-add)");
    return NULL;
  }
  v = calloc (o->st.ndisks, sizeof *v);
  if (v == NULL) { cbw_ctl_fail (r, CBW_CTL_GENERIC_ERROR, "out of memory"); return NULL; }
  for (size_t i = 0; i < o->st.ndisks; i++)
    v[(*n)++] = strdup (o->st.disks[i]->name);
  return v;
}

static void
free_names (char **v, size_t n)
{
  for (size_t i = 0; i < n; i++) free (v[i]);
  free (v);
}

static struct json_object *
disk_json (struct orch_disk *d)
{
  struct json_object *j = json_object_new_object ();
  json_object_object_add (j, "name", json_object_new_string (d->name));
  json_object_object_add (j, "file", json_object_new_string (d->file));
  json_object_object_add (j, "id", json_object_new_string (d->id));
  json_object_object_add (j, "state", json_object_new_string (orch_disk_run_name (d->run)));
  json_object_object_add (j, "pid", json_object_new_int64 (d->pid > 0 ? d->pid : 0));
  json_object_object_add (j, "size", json_object_new_int64 ((int64_t) d->size));
  json_object_object_add (j, "granularity", json_object_new_int64 ((int64_t) d->granularity));
  json_object_object_add (j, "chain", d->chain ? json_object_new_string (d->chain) : NULL);
  json_object_object_add (j, "force-share", json_object_new_boolean (d->force_share));
  json_object_object_add (j, "cbw-timeout-ms", json_object_new_int64 (orch_disk_cbw_timeout (d)));
  CLEANUP_FREE char *uri = orch_strdup_printf ("nbd+unix:///?socket=%s", d->nbd_sock);
  json_object_object_add (j, "uri", json_object_new_string (uri ? uri : ""));
  json_object_object_add (j, "socket", json_object_new_string (d->nbd_sock));
  struct json_object *ctl = json_object_new_object ();
  json_object_object_add (ctl, "chain", json_object_new_string (d->ctl_chain));
  json_object_object_add (ctl, "cbw", json_object_new_string (d->ctl_cbw));
  json_object_object_add (ctl, "dirtybitmap", json_object_new_string (d->ctl_bitmap));
  json_object_object_add (j, "control", ctl);
  json_object_object_add (j, "log", json_object_new_string (d->log_path));
  if (d->tcp) {
    struct json_object *t = orch_disk_tcp_json (d->tcp, true);
    const char *scheme = d->tcp->tls == 2 ? "nbds" : "nbd";
    CLEANUP_FREE char *turi = orch_strdup_printf
      (strchr (d->tcp->host, ':') ? "%s://[%s]:%s/" : "%s://%s:%s/", scheme,
       d->tcp->host, d->tcp->port);
    json_object_object_add (t, "uri", json_object_new_string (turi ? turi : ""));
    if (d->tcp->tls == 0 && !orch_disk_tcp_loopback (d->tcp))
      json_object_object_add (t, "warning", json_object_new_string
                              ("plain NBD on a non-loopback TCP listener: anyone "
                               "who can reach it reads and writes the disk"));
    json_object_object_add (j, "tcp", t);
  }
  if (d->exit_status >= 0)
    json_object_object_add (j, "wait-status", json_object_new_int (d->exit_status));
  return j;
}

/* ---- handlers ---- */

static int
h_status (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_orch *o = data;
  (void) args;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  r->ret = json_object_new_object ();
  json_object_object_add (r->ret, "state-dir", json_object_new_string (o->state_dir));
  json_object_object_add (r->ret, "disks", json_object_new_int ((int) o->st.ndisks));
  json_object_object_add (r->ret, "checkpoints", json_object_new_int ((int) o->st.ncps));
  json_object_object_add (r->ret, "backup",
                          o->st.backup ? json_object_new_string (o->st.backup->id) : NULL);
  json_object_object_add (r->ret, "pending",
                          o->st.pending.op[0] ? json_object_new_string (o->st.pending.op) : NULL);
  json_object_object_add (r->ret, "busy", json_object_new_boolean (o->busy));
  /* Disks whose next backup must be full: they have an unusable checkpoint
   * and no usable one after it. */
  struct json_object *full = json_object_new_array ();
  for (size_t i = 0; i < o->st.ndisks; i++) {
    ssize_t l = orch_latest_cp (&o->st, o->st.disks[i]->name);
    if (l >= 0 && orch_cp_unusable (&o->st.cps[l], o->st.disks[i]->name))
      json_object_array_add (full, json_object_new_string (o->st.disks[i]->name));
  }
  json_object_object_add (r->ret, "needs-full-backup", full);
  json_object_object_add (r->ret, "generation", json_object_new_int64 ((int64_t) o->st.generation));
  json_object_object_add (r->ret, "last-event", json_object_new_int64 ((int64_t) o->next_seq));
  struct json_object *w = json_object_new_array ();
  if (o->warning) json_object_array_add (w, json_object_new_string (o->warning));
  json_object_object_add (r->ret, "warnings", w);
  return 0;
}

static void
tcp_cleanup (struct orch_disk_tcp **t)
{
  orch_disk_tcp_free (*t);
}

static int
h_disk_add (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_orch *o = data;
  struct cbw_err e = { 0 };
  const char *name = cbw_ctl_arg_str (args, "name", NULL);
  const char *file = cbw_ctl_arg_str (args, "file", NULL);
  long long gran = cbw_ctl_arg_int (args, "granularity", 65536);
  const char *chain_arg = cbw_ctl_arg_str (args, "chain", NULL);
  bool overlays = cbw_ctl_arg_bool (args, "overlays", chain_arg != NULL);
  bool force_share = cbw_ctl_arg_bool (args, "force-share", false);
  long long tmo_ms = cbw_ctl_arg_int (args, "cbw-timeout-ms", 0);
  struct stat sb;

  if (!orch_valid_name (name))
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "invalid disk name \"%.80s\" "
                         "(want [A-Za-z0-9_.-]{1,%d}, not starting with . or -)",
                         name, ORCH_NAME_MAX);
  if (gran < 512 || gran > (1LL << 31) || (gran & (gran - 1)) != 0)
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "granularity %lld must be a "
                         "power of two from 512 to 2147483648", gran);
  if (json_object_object_get_ex (args, "cbw-timeout-ms", NULL) &&
      (tmo_ms < 1 || tmo_ms > ORCH_CBW_TIMEOUT_MS_MAX))
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "cbw-timeout-ms %lld must be "
                         "1..%d", tmo_ms, ORCH_CBW_TIMEOUT_MS_MAX);
  CLEANUP_FREE char *path = realpath (file, NULL);
  if (path == NULL)
    return cbw_ctl_fail (r, CBW_CTL_NOT_FOUND, "%s: %s", file, strerror (errno));
  if (stat (path, &sb) < 0 || !(S_ISREG (sb.st_mode) || S_ISBLK (sb.st_mode)))
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "%s: not a regular file or "
                         "block device", path);
  struct orch_disk_tcp *tcp = NULL;
  if (orch_disk_tcp_parse (args, false, &tcp, &e) < 0)
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "%s", e.msg);
  /* Not yet the disk's: freed on every refusal below. */
  __attribute__ ((cleanup (tcp_cleanup))) struct orch_disk_tcp *tcp_owned = tcp;
  if (chain_arg && !overlays)
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "\"chain\" needs overlays "
                         "(or leave overlays out)");
  if (chain_arg && (chain_arg[0] != '/' || strlen (chain_arg) > 4000))
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "chain \"%.200s\": must be an "
                         "absolute path", chain_arg);
  if (overlays && o->file_plugin)
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "overlays need the chain plugin "
                         "(this cbwd serves disks with nbdkit's file plugin)");
  CLEANUP_FREE char *chain = !overlays ? NULL : chain_arg ? strdup (chain_arg)
    : orch_chain_default_path (o->state_dir, name);
  if (overlays && chain == NULL)
    return cbw_ctl_fail (r, CBW_CTL_GENERIC_ERROR, "out of memory");
  if (enter (o, r, false) < 0)
    return -1;
  struct orch_disk *d = NULL;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    if (orch_find_disk (&o->st, name)) {
      o->busy = false;
      return cbw_ctl_fail (r, CBW_CTL_EXISTS, "disk %s already exists", name);
    }
  }
  /* Identity of the image and the chain (file system work: unlocked; the
   * disk list only changes under busy, which we hold). */
  if (orch_disk_check_files (o, name, path, chain, chain_arg != NULL, &e) < 0) {
    orch_end_busy (o);
    return fail_err (r, &e);
  }
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    if (o->st.ndisks >= ORCH_DISKS_MAX) {
      o->busy = false;
      return cbw_ctl_fail (r, CBW_CTL_GENERIC_ERROR, "too many disks (limit %d)",
                           ORCH_DISKS_MAX);
    }
    struct orch_disk **nd = realloc (o->st.disks, (o->st.ndisks + 1) * sizeof *nd);
    d = orch_disk_new (o->state_dir, name, path, (uint64_t) gran);
    if (nd == NULL || d == NULL) {
      if (nd) o->st.disks = nd;
      orch_disk_free (d);
      o->busy = false;
      return cbw_ctl_fail (r, CBW_CTL_GENERIC_ERROR, "out of memory");
    }
    o->st.disks = nd;
    orch_disk_set_cbw_timeout (d, (uint32_t) tmo_ms);
    d->chain = chain;
    d->force_share = force_share;
    d->tcp = tcp_owned;
    tcp_owned = NULL;
    chain = NULL;
    o->st.disks[o->st.ndisks++] = d;
  }
  /* Saved before nbdkit starts: after a crash the disk is known (dead),
   * never an unknown orphan.  Only this first start may create the bitmap
   * store and the chain. */
  d->create_bitmaps = true;     /* the one start that makes a new bitmap store */
  d->chain_create = d->chain != NULL;
  int started = orch_state_save (o, &e) < 0 ? -1 : orch_disk_start (o, d, &e);
  d->create_bitmaps = false;
  d->chain_create = false;
  if (started < 0 || orch_state_save (o, &e) < 0) {
    struct cbw_err e2 = { 0 };
    orch_disk_stop (o, d, &e2);
    {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
      o->st.ndisks--;          /* d is the last one: only the busy owner adds */
    }
    orch_state_save (o, &e2);
    orch_disk_free (d);
    orch_end_busy (o);
    return fail_err (r, &e);
  }
  struct json_object *ev = json_object_new_object ();
  json_object_object_add (ev, "disk", json_object_new_string (name));
  orch_event (o, "disk-added", ev);
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    r->ret = disk_json (d);
  }
  orch_end_busy (o);
  return 0;
}

static struct orch_disk *
find_disk_or_fail (struct cbw_orch *o, const char *name, struct cbw_ctl_reply *r)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  struct orch_disk *d = orch_find_disk (&o->st, name);
  if (d == NULL)
    cbw_ctl_fail (r, CBW_CTL_NOT_FOUND, "no disk named %.80s", name);
  return d;
}

static bool
disk_in_backup (struct cbw_orch *o, const char *name)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  if (o->st.backup)
    for (size_t i = 0; i < o->st.backup->ndisks; i++)
      if (strcmp (o->st.backup->disks[i].name, name) == 0)
        return true;
  return false;
}

/* The disk's directory is deleted with it: refuse while it holds overlays
 * (guest writes that are not in the image yet).  A chain kept outside the
 * state directory is the user's and stays where it is. */
static int
overlays_would_be_lost (struct cbw_orch *o, struct orch_disk *d, struct cbw_ctl_reply *r)
{
  struct cbw_err e = { 0 };
  size_t dl = strlen (d->dir);
  if (d->chain == NULL || strncmp (d->chain, d->dir, dl) != 0 || d->chain[dl] != '/')
    return 0;
  unsigned n = 0;
  int rc;
  if (orch_disk_running (o, d)) {
    struct orch_chain_info ci;
    rc = orch_chain_info (d, &ci, &e);
    n = ci.overlays;
  }
  else
    rc = orch_chain_overlays_offline (d, &n, &e);
  if (rc < 0)
    return cbw_ctl_fail (r, CBW_CTL_BUSY, "disk %s: cannot tell whether its overlays hold "
                         "guest data (%s): not removed", d->name, e.msg);
  if (n > 0)
    return cbw_ctl_fail (r, CBW_CTL_BUSY, "disk %s has %u overlay%s in %s holding guest "
                         "writes that are not in %s: commit %s first (`cbw disk commit %s`, "
                         "once per overlay)", d->name, n, n == 1 ? "" : "s", d->chain,
                         d->file, n == 1 ? "it" : "them", d->name);
  return 0;
}

static int
h_disk_remove (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_orch *o = data;
  struct cbw_err e = { 0 };
  const char *name = cbw_ctl_arg_str (args, "name", "");
  if (enter (o, r, false) < 0)
    return -1;
  struct orch_disk *d = find_disk_or_fail (o, name, r);
  if (d == NULL) {
    orch_end_busy (o);
    return -1;
  }
  if (disk_in_backup (o, name)) {
    orch_end_busy (o);
    return cbw_ctl_fail (r, CBW_CTL_BUSY, "disk %s is part of the running backup "
                         "(end it first)", name);
  }
  if (overlays_would_be_lost (o, d, r) < 0) {
    orch_end_busy (o);
    return -1;
  }
  orch_disk_stop (o, d, &e);
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    /* Forget the disk in every checkpoint; drop checkpoints left empty. */
    for (size_t i = 0; i < o->st.ncps;) {
      struct orch_checkpoint *c = &o->st.cps[i];
      for (size_t j = 0; j < c->ndisks; j++)
        if (strcmp (c->disks[j], name) == 0) {
          orch_cp_drop_unusable (c, name);
          free (c->disks[j]);
          memmove (&c->disks[j], &c->disks[j + 1], (c->ndisks - j - 1) * sizeof *c->disks);
          c->ndisks--;
          break;
        }
      if (c->ndisks == 0) {
        orch_cp_clear (c);
        memmove (c, c + 1, (o->st.ncps - i - 1) * sizeof *c);
        o->st.ncps--;
      }
      else
        i++;
    }
    for (size_t i = 0; i < o->st.ndisks; i++)
      if (o->st.disks[i] == d) {
        memmove (&o->st.disks[i], &o->st.disks[i + 1],
                 (o->st.ndisks - i - 1) * sizeof d);
        o->st.ndisks--;
        break;
      }
  }
  orch_supervisor_kick (o);
  int s = orch_state_save (o, &e);
  /* Only the files cbwd made for the disk go (sockets, log, its bitmaps, its
   * own empty chain); anything else in its directory stays and is reported. */
  struct json_object *left = orch_disk_remove_files (o, d);
  size_t nleft = left ? json_object_array_length (left) : 0;
  for (size_t i = 0; i < nleft; i++)
    fprintf (stderr, "cbwd: disk-remove %s: left in place (not made by cbwd): %s\n",
             name, json_object_get_string (json_object_array_get_idx (left, i)));
  struct json_object *ev = json_object_new_object ();
  json_object_object_add (ev, "disk", json_object_new_string (name));
  if (nleft)
    json_object_object_add (ev, "left", json_object_get (left));
  orch_event (o, "disk-removed", ev);
  if (s == 0) {
    r->ret = json_object_new_object ();
    json_object_object_add (r->ret, "left", left ? left : json_object_new_array ());
  }
  else
    json_object_put (left);
  orch_disk_free (d);
  orch_end_busy (o);
  return s < 0 ? fail_err (r, &e) : 0;
}

static int
h_disk_repair (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_orch *o = data;
  struct cbw_err e = { 0 };
  const char *name = cbw_ctl_arg_str (args, "name", "");
  if (!cbw_ctl_arg_bool (args, "reset-bitmaps", false))
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "say what to repair: "
                         "\"reset-bitmaps\": true (`--reset-bitmaps`) restarts the disk's "
                         "bitmaps all dirty and makes its checkpoints unusable");
  /* No recovery first: repair is the way out when recovery cannot finish. */
  if (enter (o, r, false) < 0)
    return -1;
  struct orch_disk *d = find_disk_or_fail (o, name, r);
  int ret = -1;
  if (d == NULL)
    goto out;
  if (disk_in_backup (o, name)) {
    cbw_ctl_fail (r, CBW_CTL_BUSY, "disk %s is part of the running backup (end it first)",
                  name);
    goto out;
  }
  if (orch_disk_repair_bitmaps (o, d, &r->ret, &e) < 0) {
    fail_err (r, &e);
    goto out;
  }
  ret = 0;
 out:
  orch_end_busy (o);
  return ret;
}

static int
h_disk_start (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_orch *o = data;
  struct cbw_err e = { 0 };
  const char *name = cbw_ctl_arg_str (args, "name", "");
  if (enter (o, r, false) < 0)
    return -1;
  struct orch_disk *d = find_disk_or_fail (o, name, r);
  int ret = -1;
  if (d == NULL)
    goto out;
  if (orch_disk_running (o, d)) {
    cbw_ctl_fail (r, CBW_CTL_EXISTS, "disk %s is already running", name);
    goto out;
  }
  {
    char bid[ORCH_NAME_MAX + 1] = "";
    {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
      if (d->offline && o->st.backup)
        snprintf (bid, sizeof bid, "%s", o->st.backup->id);
    }
    if (bid[0]) {
      cbw_ctl_fail (r, CBW_CTL_BUSY, "disk %s is being backed up offline by backup %s: "
                    "its image is served read-only and must not change; end the backup "
                    "first (`cbw backup end %s`)", name, bid, bid);
      goto out;
    }
  }
  if (orch_disk_start (o, d, &e) < 0 || orch_state_save (o, &e) < 0) {
    fail_err (r, &e);
    goto out;
  }
  struct json_object *ev = json_object_new_object ();
  json_object_object_add (ev, "disk", json_object_new_string (name));
  orch_event (o, "disk-started", ev);
  {
    /* The disk may be what an interrupted operation waited for (after a
     * host restart every disk is dead): retry it now, quietly. */
    struct cbw_err re = { 0 };
    orch_reconcile (o, &re);
  }
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    r->ret = disk_json (d);
  }
  ret = 0;
 out:
  orch_end_busy (o);
  return ret;
}

static int
h_disk_stop (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_orch *o = data;
  struct cbw_err e = { 0 };
  const char *name = cbw_ctl_arg_str (args, "name", "");
  if (enter (o, r, false) < 0)
    return -1;
  struct orch_disk *d = find_disk_or_fail (o, name, r);
  int ret = -1;
  if (d == NULL)
    goto out;
  if (disk_in_backup (o, name)) {
    cbw_ctl_fail (r, CBW_CTL_BUSY, "disk %s is part of the running backup", name);
    goto out;
  }
  orch_disk_stop (o, d, &e);
  if (orch_state_save (o, &e) < 0) {
    fail_err (r, &e);
    goto out;
  }
  struct json_object *ev = json_object_new_object ();
  json_object_object_add (ev, "disk", json_object_new_string (name));
  orch_event (o, "disk-stopped", ev);
  ret = 0;
 out:
  orch_end_busy (o);
  return ret;
}

/* ---- overlays (overlay.c): snapshot, commit, chain ---- */

/* A disk for a chain operation: known, with a chain, running, not in the
 * running backup (its readers, and the direct PIT path reading the base,
 * need the chain to stay as it was at the point in time). */
static struct orch_disk *
chain_disk (struct cbw_orch *o, const char *name, const char *what, bool need_idle,
            struct cbw_ctl_reply *r)
{
  struct orch_disk *d = find_disk_or_fail (o, name, r);
  if (d == NULL)
    return NULL;
  if (d->chain == NULL) {
    cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "disk %s has no overlay chain: it was "
                  "added without overlays (its image is served raw); %s needs a disk "
                  "added with `cbw disk add --overlays`", name, what);
    return NULL;
  }
  if (!orch_disk_running (o, d)) {
    cbw_ctl_fail (r, CBW_CTL_IO_ERROR, "disk %s is not running (its nbdkit is dead or "
                  "stopped; see disk-list)", name);
    return NULL;
  }
  if (need_idle) {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    if (o->st.backup)
      for (size_t i = 0; i < o->st.backup->ndisks; i++)
        if (strcmp (o->st.backup->disks[i].name, name) == 0) {
          cbw_ctl_fail (r, CBW_CTL_BUSY, "disk %s is part of the running backup %s: "
                        "%s would change the chain under its point in time (end the "
                        "backup first)", name, o->st.backup->id, what);
          return NULL;
        }
  }
  return d;
}

static int
h_disk_snapshot (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_orch *o = data;
  struct cbw_err e = { 0 };
  const char *name = cbw_ctl_arg_str (args, "name", "");
  const char *label = cbw_ctl_arg_str (args, "label", NULL);
  if (enter (o, r, false) < 0)
    return -1;
  int ret = -1;
  struct orch_disk *d = chain_disk (o, name, "a snapshot", true, r);
  if (d == NULL)
    goto out;
  struct json_object *a = json_object_new_object ();
  if (label)
    json_object_object_add (a, "label", json_object_new_string (label));
  struct json_object *sr = orch_mod_call (d->ctl_chain, "snapshot", a, NULL, 0, &e), *v;
  if (sr == NULL) {
    cbw_err_prefix (&e, "disk %s: snapshot", name);
    fail_err (r, &e);
    goto out;
  }
  r->ret = json_object_new_object ();
  json_object_object_add (r->ret, "disk", json_object_new_string (name));
  if (json_object_object_get_ex (sr, "layer", &v))
    json_object_object_add (r->ret, "layer", json_object_get (v));
  if (json_object_object_get_ex (sr, "index", &v)) {
    json_object_object_add (r->ret, "index", json_object_get (v));
    json_object_object_add (r->ret, "overlays", json_object_get (v));
  }
  struct json_object *ev = json_object_new_object ();
  json_object_object_add (ev, "disk", json_object_new_string (name));
  if (json_object_object_get_ex (sr, "layer", &v))
    json_object_object_add (ev, "layer", json_object_get (v));
  json_object_put (sr);
  orch_event (o, "disk-snapshot", ev);
  ret = 0;
 out:
  orch_end_busy (o);
  return ret;
}

/* The plugin's commit arguments for a disk-commit request: the range
 * resolved from the chain's layers (names or indices), the mode, the speed. */
static struct json_object *
commit_request (struct orch_disk *d, const char *name, struct json_object *args,
                unsigned *lo, unsigned *hi, struct cbw_err *e)
{
  struct json_object *c = orch_chain_status (d, e), *layers = NULL;
  if (c == NULL)
    return NULL;
  json_object_object_get_ex (c, "layers", &layers);
  int rr = orch_commit_range (name, layers, cbw_ctl_arg_str (args, "base", NULL),
                              cbw_ctl_arg_str (args, "top", NULL), lo, hi, e);
  json_object_put (c);
  if (rr < 0)
    return NULL;
  struct json_object *a = json_object_new_object ();
  json_object_object_add (a, "base", json_object_new_int64 (*lo - 1));
  json_object_object_add (a, "top", json_object_new_int64 (*hi));
  json_object_object_add (a, "mode", json_object_new_string
                          (cbw_ctl_arg_bool (args, "keep", false) ? "make-empty" : "delete"));
  json_object_object_add (a, "speed", json_object_new_int64
                          (cbw_ctl_arg_int (args, "speed", 0)));
  return a;
}

static int
h_disk_commit (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_orch *o = data;
  struct cbw_err e = { 0 };
  const char *name = cbw_ctl_arg_str (args, "name", "");
  const char *mode = cbw_ctl_arg_bool (args, "keep", false) ? "make-empty" : "delete";
  unsigned lo, hi;
  if (enter (o, r, false) < 0)
    return -1;
  int ret = -1;
  struct orch_disk *d = chain_disk (o, name, "a commit", true, r);
  if (d == NULL)
    goto out;
  struct json_object *a = commit_request (d, name, args, &lo, &hi, &e);
  if (a == NULL) {
    fail_err (r, &e);
    goto out;
  }
  struct json_object *cr = orch_mod_call (d->ctl_chain, "commit", a, NULL, 0, &e), *v;
  if (cr == NULL) {
    cbw_err_prefix (&e, "disk %s: commit", name);
    fail_err (r, &e);
    goto out;
  }
  r->ret = json_object_new_object ();
  json_object_object_add (r->ret, "disk", json_object_new_string (name));
  json_object_object_add (r->ret, "mode", json_object_new_string (mode));
  struct json_object *ev = json_object_new_object ();
  json_object_object_add (ev, "disk", json_object_new_string (name));
  json_object_object_add (ev, "mode", json_object_new_string (mode));
  const char *keys[] = { "lo", "hi", "active" };
  for (size_t i = 0; i < 3; i++)
    if (json_object_object_get_ex (cr, keys[i], &v)) {
      json_object_object_add (r->ret, keys[i], json_object_get (v));
      json_object_object_add (ev, keys[i], json_object_get (v));
    }
  json_object_put (cr);
  orch_event (o, "disk-commit-started", ev);
  ret = 0;
 out:
  orch_end_busy (o);
  return ret;
}

static int
h_disk_commit_cancel (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_orch *o = data;
  struct cbw_err e = { 0 };
  const char *name = cbw_ctl_arg_str (args, "name", "");
  struct orch_disk *d = chain_disk (o, name, "commit-cancel", false, r);
  if (d == NULL)
    return -1;
  struct json_object *cr = orch_mod_call (d->ctl_chain, "commit-cancel", NULL, NULL, 0, &e);
  if (cr == NULL) {
    cbw_err_prefix (&e, "disk %s: commit-cancel", name);
    return fail_err (r, &e);
  }
  json_object_put (cr);
  struct json_object *ev = json_object_new_object ();
  json_object_object_add (ev, "disk", json_object_new_string (name));
  orch_event (o, "disk-commit-cancelled", ev);
  return 0;
}

static int
h_disk_chain (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_orch *o = data;
  struct cbw_err e = { 0 };
  const char *name = cbw_ctl_arg_str (args, "name", "");
  struct orch_disk *d = find_disk_or_fail (o, name, r);
  if (d == NULL)
    return -1;
  r->ret = json_object_new_object ();
  json_object_object_add (r->ret, "disk", json_object_new_string (name));
  if (d->chain == NULL) {
    /* a raw disk: the image is the only layer */
    struct json_object *layers = json_object_new_array (), *base = json_object_new_object ();
    json_object_object_add (base, "index", json_object_new_int (0));
    json_object_object_add (base, "name", json_object_new_string (d->file));
    json_object_object_add (base, "kind", json_object_new_string ("base"));
    json_object_object_add (base, "writable", json_object_new_boolean (true));
    json_object_array_add (layers, base);
    json_object_object_add (r->ret, "chain", NULL);
    json_object_object_add (r->ret, "overlays", json_object_new_int (0));
    json_object_object_add (r->ret, "layers", layers);
    json_object_object_add (r->ret, "operation", NULL);
    return 0;
  }
  json_object_object_add (r->ret, "chain", json_object_new_string (d->chain));
  if (!orch_disk_running (o, d)) {
    json_object_put (r->ret);
    r->ret = NULL;
    return cbw_ctl_fail (r, CBW_CTL_IO_ERROR, "disk %s is not running (its nbdkit is dead "
                         "or stopped; see disk-list)", name);
  }
  struct json_object *c = orch_chain_status (d, &e), *v;
  if (c == NULL) {
    json_object_put (r->ret);
    r->ret = NULL;
    return fail_err (r, &e);
  }
  size_t nl = json_object_object_get_ex (c, "layers", &v) ? json_object_array_length (v) : 0;
  json_object_object_add (r->ret, "overlays", json_object_new_int (nl ? (int) nl - 1 : 0));
  json_object_object_add (r->ret, "layers", v ? json_object_get (v) : json_object_new_array ());
  if (json_object_object_get_ex (c, "cluster_size", &v))
    json_object_object_add (r->ret, "cluster-size", json_object_get (v));
  json_object_object_add (r->ret, "operation",
                          json_object_object_get_ex (c, "operation", &v) && v
                          ? json_object_get (v) : NULL);
  json_object_put (c);
  return 0;
}

static int
h_disk_list (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_orch *o = data;
  (void) args;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  struct json_object *a = json_object_new_array ();
  for (size_t i = 0; i < o->st.ndisks; i++)
    json_object_array_add (a, disk_json (o->st.disks[i]));
  r->ret = json_object_new_object ();
  json_object_object_add (r->ret, "disks", a);
  return 0;
}

static int
h_cp_create (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_orch *o = data;
  struct cbw_err e = { 0 };
  size_t n;
  const char *name = cbw_ctl_arg_str (args, "name", "");
  if (!orch_valid_name (name))
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "invalid checkpoint name "
                         "\"%.80s\"", name);
  char **disks = disk_names (o, args, "disks", &n, r);
  if (disks == NULL)
    return -1;
  if (enter (o, r, true) < 0) {
    free_names (disks, n);
    return -1;
  }
  int ret = orch_checkpoint_create (o, name, disks, n, &e);
  free_names (disks, n);
  orch_end_busy (o);
  if (ret < 0)
    return fail_err (r, &e);
  r->ret = json_object_new_object ();
  json_object_object_add (r->ret, "name", json_object_new_string (name));
  return 0;
}

static int
h_cp_delete (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_orch *o = data;
  struct cbw_err e = { 0 };
  const char *name = cbw_ctl_arg_str (args, "name", "");
  if (enter (o, r, true) < 0)
    return -1;
  int ret = orch_checkpoint_delete (o, name, &e);
  orch_end_busy (o);
  return ret < 0 ? fail_err (r, &e) : 0;
}

static int
h_cp_list (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_orch *o = data;
  const char *disk = cbw_ctl_arg_str (args, "disk", NULL);
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  if (disk && !orch_find_disk (&o->st, disk))
    return cbw_ctl_fail (r, CBW_CTL_NOT_FOUND, "no disk named %.80s", disk);
  struct json_object *a = json_object_new_array ();
  for (size_t i = 0; i < o->st.ncps; i++) {
    struct orch_checkpoint *c = &o->st.cps[i];
    if (disk && !orch_cp_has_disk (c, disk))
      continue;
    struct json_object *j = json_object_new_object ();
    json_object_object_add (j, "name", json_object_new_string (c->name));
    json_object_object_add (j, "created", json_object_new_int64 (c->created));
    struct json_object *d = json_object_new_array ();
    for (size_t k = 0; k < c->ndisks; k++) {
      json_object_array_add (d, json_object_new_string (c->disks[k]));
    }
    json_object_object_add (j, "disks", d);
    char bm[ORCH_NAME_MAX + 8];
    orch_cp_bitmap (c->name, bm, sizeof bm);
    json_object_object_add (j, "bitmap", json_object_new_string (bm));
    bool pending = strcmp (o->st.pending.name, c->name) == 0 && o->st.pending.op[0];
    json_object_object_add (j, "pending", json_object_new_boolean (pending));
    struct json_object *ua = json_object_new_array ();
    for (size_t k = 0; k < c->nunusable; k++) {
      if (disk && strcmp (c->unusable[k].disk, disk) != 0)
        continue;
      struct json_object *u = json_object_new_object ();
      json_object_object_add (u, "disk", json_object_new_string (c->unusable[k].disk));
      json_object_object_add (u, "since", json_object_new_int64 (c->unusable[k].since));
      json_object_object_add (u, "reason", json_object_new_string (c->unusable[k].reason));
      json_object_array_add (ua, u);
    }
    json_object_object_add (j, "unusable", ua);
    json_object_array_add (a, j);
  }
  r->ret = json_object_new_object ();
  json_object_object_add (r->ret, "checkpoints", a);
  return 0;
}

static int
h_backup_begin (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_orch *o = data;
  struct cbw_err e = { 0 };
  size_t n;
  long long tmo = cbw_ctl_arg_int (args, "freeze-timeout", 10);
  if (tmo <= 0 || tmo > 3600)
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER,
                         "freeze-timeout must be 1..3600 seconds");
  if (cbw_ctl_arg_str (args, "freeze-hook", NULL) &&
      cbw_ctl_arg_str (args, "freeze-qga", NULL))
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER,
                         "freeze-hook and freeze-qga are exclusive: choose one "
                         "way to freeze the guest");
  /* Hooks are chosen by name among those cbwd was started with: nothing
   * from the socket is run as a command. */
  const char *hook_name = cbw_ctl_arg_str (args, "freeze-hook", NULL), *hook = NULL;
  if (hook_name && !(hook = orch_freeze_hook (o, hook_name))) {
    CLEANUP_FREE char *names = NULL;
    size_t len = 0;
    FILE *f = open_memstream (&names, &len);
    for (size_t i = 0; f && i < o->nfreeze_hooks; i++)
      fprintf (f, "%s%.*s", i ? ", " : "",
               (int) strcspn (o->freeze_hooks[i], "="), o->freeze_hooks[i]);
    if (f) fclose (f);
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER,
                         "unknown freeze hook '%.100s': freeze-hook names a hook "
                         "configured in cbwd (--freeze-hook NAME=/PATH); configured: %s",
                         hook_name, names && names[0] ? names : "none");
  }
  CLEANUP_FREE char *hooklog = orch_strdup_printf ("%s/hook.log", o->state_dir);
  struct orch_backup_req req = {
    .id = cbw_ctl_arg_str (args, "id", "backup"),
    .mode = cbw_ctl_arg_str (args, "mode", "full"),
    .since = cbw_ctl_arg_str (args, "since", NULL),
    .readable = cbw_ctl_arg_str (args, "readable", NULL),
    .checkpoint = cbw_ctl_arg_str (args, "checkpoint", NULL),
    .freeze = {
      .hook = hook,
      .qga = cbw_ctl_arg_str (args, "freeze-qga", NULL),
      .timeout = (double) tmo,
      .required = cbw_ctl_arg_bool (args, "freeze-required", false),
      .log = hooklog,
    },
  };
  req.store_dir = cbw_ctl_arg_str (args, "store-dir", NULL);
  req.store_limit = (uint64_t) cbw_ctl_arg_int (args, "store-limit", 0);
  if (json_object_object_get_ex (args, "store-limit", NULL) && req.store_limit == 0)
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "store-limit must be at least 1 "
                         "byte (leave it out for the default)");
  long long btmo = cbw_ctl_arg_int (args, "cbw-timeout-ms", 0);
  req.cbw_timeout_ms = (uint32_t) btmo;
  if (json_object_object_get_ex (args, "cbw-timeout-ms", NULL) &&
      (btmo < 1 || btmo > ORCH_CBW_TIMEOUT_MS_MAX))
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "cbw-timeout-ms must be 1..%d",
                         ORCH_CBW_TIMEOUT_MS_MAX);
  req.disks = disk_names (o, args, "disks", &n, r);
  if (req.disks == NULL)
    return -1;
  req.ndisks = n;
  if (enter (o, r, true) < 0) {
    free_names (req.disks, n);
    return -1;
  }
  int ret = orch_backup_begin (o, &req, &r->ret, &e);
  free_names (req.disks, n);
  orch_end_busy (o);
  return ret < 0 ? fail_err (r, &e) : 0;
}

static int
h_backup_end (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_orch *o = data;
  struct cbw_err e = { 0 };
  if (enter (o, r, true) < 0)
    return -1;
  /* Running push jobs of this backup stop first (cancelled, joined): they
   * read its PIT exports and release its ranges. */
  const char *bid = cbw_ctl_arg_str (args, "id", NULL);
  {
    char running[ORCH_NAME_MAX + 1] = "";
    {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
      if (o->st.backup)
        snprintf (running, sizeof running, "%s", o->st.backup->id);
    }
    if (running[0] && (bid == NULL || bid[0] == '\0' || strcmp (bid, running) == 0))
      orch_jobs_cancel_backup (o, running);
  }
  int ret = orch_backup_end (o, bid, &e);
  orch_end_busy (o);
  return ret < 0 ? fail_err (r, &e) : 0;
}

static int
h_backup_status (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_orch *o = data;
  struct json_object *j;
  size_t n;
  char socks[ORCH_DISKS_MAX][256];
  (void) args;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    if (o->st.backup == NULL)
      return cbw_ctl_fail (r, CBW_CTL_NOT_FOUND, "no backup is running");
    j = orch_backup_to_json (o->st.backup);
    n = o->st.backup->ndisks;
    for (size_t i = 0; i < n && i < ORCH_DISKS_MAX; i++) {
      struct orch_disk *d = orch_find_disk (&o->st, o->st.backup->disks[i].name);
      /* an offline disk has no session (its image is served as is) */
      snprintf (socks[i], sizeof socks[i], "%s",
                d && !o->st.backup->disks[i].offline ? d->ctl_cbw : "");
    }
  }
  /* Per-disk session status from the cbw filters, unlocked. */
  struct json_object *disks, *v;
  bool broken = false;
  json_object_object_get_ex (j, "disks", &disks);
  for (size_t i = 0; i < n && i < ORCH_DISKS_MAX; i++) {
    struct cbw_err e = { 0 };
    if (socks[i][0] == '\0')
      continue;
    struct json_object *st = orch_mod_call (socks[i], "status", NULL, NULL, 0, &e);
    struct json_object *dj = json_object_array_get_idx (disks, i);
    if (st && json_object_object_get_ex (st, "broken", &v) && json_object_get_boolean (v))
      broken = true;
    if (st)
      json_object_object_add (dj, "session", st);
    else
      json_object_object_add (dj, "session-error", json_object_new_string (e.msg));
  }
  /* A broken session no longer protects its point in time: reads of what
   * changed since fail (never wrong data); the backup must be redone. */
  json_object_object_add (j, "broken", json_object_new_boolean (broken));
  r->ret = j;
  return 0;
}

static int
h_event_list (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_orch *o = data;
  uint64_t since = (uint64_t) cbw_ctl_arg_int (args, "since", 0);
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  struct json_object *a = json_object_new_array ();
  uint64_t first = o->next_seq > ORCH_EVENTS_MAX ? o->next_seq - ORCH_EVENTS_MAX + 1 : 1;
  for (uint64_t s = since + 1 > first ? since + 1 : first; s <= o->next_seq; s++) {
    struct orch_event *ev = &o->events[s % ORCH_EVENTS_MAX];
    struct json_object *ej;
    if (ev->seq == s && ev->json && (ej = json_tokener_parse (ev->json)) != NULL) {
      /* the pushed line plus "time" (unix seconds), as before */
      json_object_object_add (ej, "time", json_object_new_int64 (ev->time));
      json_object_array_add (a, ej);
    }
  }
  r->ret = json_object_new_object ();
  json_object_object_add (r->ret, "events", a);
  json_object_object_add (r->ret, "last", json_object_new_int64 ((int64_t) o->next_seq));
  json_object_object_add (r->ret, "lost", json_object_new_boolean (since + 1 < first &&
                                                                   o->next_seq > 0));
  return 0;
}

/* ---- push jobs (job.c) ---- */

static char **
string_list (struct json_object *args, const char *key, size_t *n, size_t max,
             struct cbw_ctl_reply *r)
{
  struct json_object *a;
  *n = 0;
  if (!json_object_object_get_ex (args, key, &a))
    return calloc (1, sizeof (char *));
  size_t len = json_object_array_length (a);
  if (len == 0 || len > max) {
    cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "'%s' must list 1 to %zu items", key, max);
    return NULL;
  }
  char **v = calloc (len, sizeof *v);
  if (v == NULL) {
    cbw_ctl_fail (r, CBW_CTL_GENERIC_ERROR, "out of memory");
    return NULL;
  }
  for (size_t i = 0; i < len; i++) {
    struct json_object *e = json_object_array_get_idx (a, i);
    if (!json_object_is_type (e, json_type_string)) {
      cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "'%s'[%zu] must be a string", key, i);
      free_names (v, *n);
      return NULL;
    }
    v[i] = strdup (json_object_get_string (e));
    (*n)++;
  }
  return v;
}

static int
h_job_start (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_orch *o = data;
  struct cbw_err e = { 0 };
  struct orch_job_req req = {
    .id = cbw_ctl_arg_str (args, "id", NULL),
    .backup = cbw_ctl_arg_str (args, "backup", NULL),
    .speed = (uint64_t) cbw_ctl_arg_int (args, "speed", 0),
    .request_size = (uint64_t) cbw_ctl_arg_int (args, "request-size", 256 << 10),
    .requests = (unsigned) cbw_ctl_arg_int (args, "requests", 0),
    .connect_timeout = (unsigned) cbw_ctl_arg_int (args, "connect-timeout", 30),
  };
  long long ct = cbw_ctl_arg_int (args, "connect-timeout", 30);
  if (ct < 1 || ct > 3600)
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "connect-timeout must be 1..3600 seconds");
  long long rq = cbw_ctl_arg_int (args, "requests", 0);
  if (rq < 0 || rq > 64)
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "requests must be 1..64 (0: automatic)");
  req.disks = string_list (args, "disks", &req.ndisks, ORCH_DISKS_MAX, r);
  if (req.disks == NULL)
    return -1;
  req.targets = string_list (args, "targets", &req.ntargets, ORCH_DISKS_MAX, r);
  if (req.targets == NULL) {
    free_names (req.disks, req.ndisks);
    return -1;
  }
  int ret = -1;
  if (enter (o, r, true) == 0) {         /* a half-made backup is finished first */
    ret = orch_job_start (o, &req, &r->ret, &e);
    orch_end_busy (o);
    if (ret < 0)
      fail_err (r, &e);
  }
  free_names (req.disks, req.ndisks);
  free_names (req.targets, req.ntargets);
  return ret;
}

static int
h_job_list (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_orch *o = data;
  (void) args;
  r->ret = json_object_new_object ();
  json_object_object_add (r->ret, "jobs", orch_jobs_list (o));
  return 0;
}

static int
h_job_status (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_orch *o = data;
  const char *id = cbw_ctl_arg_str (args, "id", "");
  /* jobs are freed only by job-start (this thread) and shutdown */
  struct orch_job *j = orch_job_find (o, id);
  if (j == NULL)
    return cbw_ctl_fail (r, CBW_CTL_NOT_FOUND, "no job named %.80s", id);
  r->ret = orch_job_to_json (j);
  return 0;
}

static int
h_job_pause (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_err e = { 0 };
  if (orch_job_pause (data, cbw_ctl_arg_str (args, "id", ""), true, &e) < 0)
    return fail_err (r, &e);
  return 0;
}

static int
h_job_resume (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_err e = { 0 };
  if (orch_job_pause (data, cbw_ctl_arg_str (args, "id", ""), false, &e) < 0)
    return fail_err (r, &e);
  return 0;
}

static int
h_job_cancel (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_err e = { 0 };
  if (orch_job_cancel (data, cbw_ctl_arg_str (args, "id", ""), &r->ret, &e) < 0)
    return fail_err (r, &e);
  return 0;
}

static int
h_job_set_speed (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_err e = { 0 };
  if (orch_job_set_speed (data, cbw_ctl_arg_str (args, "id", ""),
                          (uint64_t) cbw_ctl_arg_int (args, "speed", 0), &e) < 0)
    return fail_err (r, &e);
  return 0;
}

/* ---- the table ---- */

static const struct cbw_ctl_arg no_args[] = { { NULL } };
static const struct cbw_ctl_arg name_arg[] = {
  { "name", CBW_ARG_STRING, true, "the object's name" },
  { NULL }
};
static const struct cbw_ctl_arg disk_add_args[] = {
  { "name", CBW_ARG_STRING, true, "disk name, `[A-Za-z0-9_.-]{1,64}`, not starting with `.` or `-`" },
  { "file", CBW_ARG_STRING, true, "image: a raw file or block device (made absolute)" },
  { "granularity", CBW_ARG_UINT, false, "dirty bitmap granularity in bytes, power of two, "
    "512..2 GiB (default 65536)" },
  { "overlays", CBW_ARG_BOOL, false, "serve the image through an overlay chain, so that live "
    "snapshots and commits (`disk-snapshot`, `disk-commit`) and `top` backups work "
    "(default false: the raw fast path, no overlays). The chain descriptor is "
    "STATE/disks/NAME/overlays/NAME.chain unless `chain` is given" },
  { "chain", CBW_ARG_STRING, false, "absolute path of the chain descriptor to use (an "
    "existing chain whose base is `file`, or a new one created over it; its overlays live "
    "in its directory); implies `overlays`. Refused inside the state directory (except "
    "the disk's own default path): a disk's directory is deleted with the disk" },
  { "force-share", CBW_ARG_BOOL, false, "serve the image even if another process (QEMU, "
    "qemu-nbd) holds it, and let others open it (default false: QEMU's image locks, "
    "cbw is the only writer). Dangerous: two writers corrupt the image and the dirty "
    "bitmaps miss the other writer's writes. Logged, and shown in `disk-list`" },
  { "cbw-timeout-ms", CBW_ARG_UINT, false, "bound in milliseconds (1..86400000) on how "
    "long a guest write may wait for a backup of this disk (its copy-before-write to the "
    "backup store); past it the backup of the disk breaks and the write goes on. Saved "
    "with the disk, given to nbdkit as `cbw-timeout`; default 5000" },
  { "listen", CBW_ARG_STRING, false, "`HOST:PORT` or `[IPV6]:PORT`: also serve the disk "
    "on TCP, for guests on other hosts, through a forwarding nbdkit in front of the "
    "disk's Unix socket (every write still goes through the cbw and dirtybitmap "
    "filters). Needs `tls`" },
  { "tls", CBW_ARG_STRING, false, "`require` (or `on`: clients choose) with `tls-psk` or "
    "`tls-certificates`; `off` (plain NBD on TCP, trusted networks only) must be "
    "given explicitly and is shown as a warning" },
  { "tls-psk", CBW_ARG_STRING, false, "absolute path of nbdkit's PSK file "
    "(`USER:HEXKEY` lines, psktool); refused unless mode 600 or stricter" },
  { "tls-certificates", CBW_ARG_STRING, false, "absolute path of a directory with "
    "`server-cert.pem`, `server-key.pem` (mode 600 or stricter) and, for "
    "`tls-verify-peer`, `ca-cert.pem`" },
  { "tls-verify-peer", CBW_ARG_BOOL, false, "X.509: admit only clients with a "
    "certificate signed by `ca-cert.pem`" },
  { NULL }
};
static const struct cbw_ctl_arg snapshot_args[] = {
  { "name", CBW_ARG_STRING, true, "the disk" },
  { "label", CBW_ARG_STRING, false, "free text stored with the new overlay" },
  { NULL }
};
static const struct cbw_ctl_arg commit_args[] = {
  { "name", CBW_ARG_STRING, true, "the disk" },
  { "base", CBW_ARG_STRING, false, "LAYER receiving the data: an index (0 = the image) "
    "or a name, as `disk-chain` lists them; default: the layer below `top`" },
  { "top", CBW_ARG_STRING, false, "highest LAYER merged (index or name); default: the "
    "active layer" },
  { "keep", CBW_ARG_BOOL, false, "make-empty: the merged layers stay in the chain, "
    "emptied (the active one keeps taking the guest's writes); default: they are deleted" },
  { "speed", CBW_ARG_UINT, false, "bytes/s, 0 = unlimited (default)" },
  { NULL }
};
static const struct cbw_ctl_arg cp_create_args[] = {
  { "name", CBW_ARG_STRING, true, "checkpoint name (same rules as disk names)" },
  { "disks", CBW_ARG_ARRAY, false, "disk names (strings); default: every disk" },
  { NULL }
};
static const struct cbw_ctl_arg cp_list_args[] = {
  { "disk", CBW_ARG_STRING, false, "only checkpoints covering this disk" },
  { NULL }
};
static const struct cbw_ctl_arg backup_begin_args[] = {
  { "id", CBW_ARG_STRING, false, "backup id (default `backup`)" },
  { "disks", CBW_ARG_ARRAY, false, "disk names (strings); default: every disk" },
  { "mode", CBW_ARG_STRING, false, "`full` (default), `incremental` (needs `since`), "
    "`top` (only what each disk's top overlay holds: the writes since its last snapshot; "
    "disks added with overlays) or `none` (copy-before-write only)" },
  { "since", CBW_ARG_STRING, false, "incremental: the base checkpoint; any earlier "
    "checkpoint works (differential = since the checkpoint of the last full backup)" },
  { "readable", CBW_ARG_STRING, false, "incremental: what the point-in-time exports serve: "
    "`all` (default, as libvirt: the whole disk at its point in time; every block is "
    "protected, `qemu:dirty-bitmap:backup-DISK` still lists only the changes) or `changed` "
    "(only the changed blocks are protected and readable, cheaper for the guest's writes; "
    "reading another block fails with an error saying why)" },
  { "checkpoint", CBW_ARG_STRING, false, "create this checkpoint at the backup's point in time" },
  { "freeze-hook", CBW_ARG_STRING, false, "name of a freeze hook configured in cbwd "
    "(`--freeze-hook NAME=/PATH`, config `freeze-hooks`): its program runs as `PATH freeze` / "
    "`PATH thaw` around the point in time, without a shell (exit 0 = success); an unknown "
    "name is InvalidParameter" },
  { "freeze-qga", CBW_ARG_STRING, false, "freeze through the qemu-guest-agent on this Unix "
    "socket (`guest-sync`, `guest-fsfreeze-freeze` / `-thaw`) instead of a hook" },
  { "freeze-timeout", CBW_ARG_UINT, false, "seconds to wait for the hook or the agent, per phase "
    "(default 10)" },
  { "freeze-required", CBW_ARG_BOOL, false, "fail the backup if the freeze fails "
    "(default false: proceed crash-consistent and emit `freeze-failed`)" },
  { "cbw-timeout-ms", CBW_ARG_UINT, false, "this backup's bound in milliseconds "
    "(1..86400000) on how long a guest write may wait for it; past it the disk's backup "
    "breaks (event `backup-broken`), the write goes on. Default: each disk's "
    "`cbw-timeout-ms`" },
  { "store-dir", CBW_ARG_STRING, false, "absolute path of an existing directory for the "
    "backup stores (the old data copied before guest writes), e.g. on another filesystem "
    "than the state directory; they go in a subdirectory `cbwd-HASH-ID`. Default: "
    "STATE/backups/ID" },
  { "store-limit", CBW_ARG_UINT, false, "bytes each disk's store may take on the host; "
    "reaching it breaks that disk's backup (event `backup-broken`), never the guest. "
    "Default: CBW_ORCH_STORE_LIMIT (50% of the free space of the stores' filesystem at "
    "begin, shared by the disks). On the state directory's filesystem the stores "
    "together never get the last CBW_ORCH_STATE_RESERVE bytes (128 MiB): a larger "
    "limit is refused (ENOSPC), and so is a backup when nothing is left beyond it" },
  { NULL }
};
static const struct cbw_ctl_arg backup_end_args[] = {
  { "id", CBW_ARG_STRING, false, "backup id (default: the running backup)" },
  { NULL }
};
static const struct cbw_ctl_arg event_args[] = {
  { "since", CBW_ARG_UINT, false, "return events with a sequence number above this (default 0)" },
  { NULL }
};

static const struct cbw_ctl_arg job_start_args[] = {
  { "targets", CBW_ARG_ARRAY, true, "one per disk: `DISK=TARGET` (just `TARGET` when the job "
    "has one disk). TARGET: an NBD URI (`nbd://`, `nbd+unix://`; writable, at least the "
    "disk's size), `raw:PATH` or a path (raw file: created sparse if missing, else "
    "overwritten in place and must have the disk's size), `qcow2:PATH` or a path ending in "
    "`.qcow2` (created with `qemu-img create` if missing, written through a `qemu-nbd` the "
    "job starts). Paths are absolute. Incremental jobs need an existing target (the previous "
    "full copy)" },
  { "backup", CBW_ARG_STRING, false, "backup id (default: the running backup)" },
  { "disks", CBW_ARG_ARRAY, false, "disk names (strings); default: every disk of the backup" },
  { "id", CBW_ARG_STRING, false, "job id (default `job-N`)" },
  { "speed", CBW_ARG_UINT, false, "speed limit in bytes/s of data read (default 0: none)" },
  { "request-size", CBW_ARG_UINT, false, "bytes per request, power of two, 64 KiB..32 MiB "
    "(default 256 KiB, as nbdcopy)" },
  { "requests", CBW_ARG_UINT, false, "requests in flight, 1..64 (default 0 = automatic: 16 "
    "pipelined on cbwd's PIT export, 8 connections with one request each on the cbw "
    "filter's)" },
  { "connect-timeout", CBW_ARG_UINT, false, "seconds an NBD target gets to complete the "
    "connection and NBD handshake, 1..3600 (default 30); the job's own thread connects, so "
    "job-start answers at once and a target that does not answer fails the job" },
  { NULL }
};
static const struct cbw_ctl_arg job_id_args[] = {
  { "id", CBW_ARG_STRING, true, "the job id" },
  { NULL }
};
static const struct cbw_ctl_arg job_speed_args[] = {
  { "id", CBW_ARG_STRING, true, "the job id" },
  { "speed", CBW_ARG_UINT, true, "new limit in bytes/s (0: none); applies at once" },
  { NULL }
};

static const struct cbw_ctl_arg disk_repair_args[] = {
  { "name", CBW_ARG_STRING, true, "the disk (stopped or dead)" },
  { "reset-bitmaps", CBW_ARG_BOOL, false, "must be true: write a new bitmap store in "
    "which every checkpoint's bitmap is all dirty" },
  { NULL }
};

static const struct cbw_ctl_command commands[] = {
  { "status", h_status, no_args,
    "Summary of the daemon: state directory, counts, running backup, pending "
    "(interrupted) operation, the disks whose next backup must be full (their "
    "latest checkpoint is unusable), and warnings about the set-up (plain NBD on TCP).",
    "`{\"state-dir\", \"disks\", \"checkpoints\", \"backup\": ID|null, \"pending\": OP|null, "
    "\"busy\", \"needs-full-backup\": [DISK], \"generation\", \"last-event\", "
    "\"warnings\": [STRING]}`" },
  { "disk-add", h_disk_add, disk_add_args,
    "Add a disk and start its nbdkit (chain plugin + cbw filter + dirtybitmap filter) on "
    "a Unix socket under the state directory. The disk is recorded in the state file "
    "before nbdkit starts. Images are told apart by device + inode (block devices by "
    "device number), never by name. Errors: `Exists` (name, image or chain already used "
    "by a disk, also through a hard or symbolic link), `NotFound` (image missing), "
    "`InvalidParameter` (the image is a file of cbwd's state directory or of another "
    "disk's overlay chain; `chain` inside the state directory), `Busy` (another process, "
    "e.g. QEMU or qemu-nbd, holds QEMU's image lock on it; see `force-share`), or the "
    "nbdkit start failure with the last line of its log. While served, the image carries "
    "QEMU's image locks, so QEMU, qemu-nbd, qemu-img and qemu-io refuse it.",
    "the disk, as in `disk-list`" },
  { "disk-remove", h_disk_remove, name_arg,
    "Stop the disk's nbdkit and forget the disk (and its place in checkpoints; a "
    "checkpoint left without disks is dropped). Deletes only the files cbwd made for "
    "it in its directory of the state directory (sockets, log, dirty bitmap store, its "
    "own overlay chain descriptor once no overlay is left); any other file there is "
    "left in place and listed in `left` (the directory then stays too). Refused "
    "(`Busy`) while it is part of the running backup, or while its own chain holds "
    "overlays. The image is left in place.",
    "`{\"left\": [PATH]}`" },
  { "disk-start", h_disk_start, name_arg,
    "Start the nbdkit of a stopped or dead disk (cbwd never restarts one by itself). "
    "Refused, naming the file, when the disk's bitmap descriptor is missing or "
    "unreadable (see `disk-repair`). Fails with nbdkit's error, naming the file, when "
    "the disk's chain descriptor or one of its layer files is missing, truncated or "
    "corrupt: nothing is recreated (only `disk-add` creates a chain), so the guest never "
    "sees a disk without its overlays. Then retries an interrupted operation, if any. "
    "Refused (`Busy`, naming the backup) while the disk is in an offline backup.",
    "the disk, as in `disk-list`" },
  { "disk-repair", h_disk_repair, disk_repair_args,
    "Explicit recovery of a disk whose dirty bitmap descriptor is missing or unreadable "
    "(the disk then refuses to start, naming the file). With `reset-bitmaps` the old "
    "descriptor is kept as DESCRIPTOR.lost-TIME, a new store is written in which the "
    "bitmap of every checkpoint covering the disk is all dirty, and those checkpoints "
    "are marked unusable on this disk: an incremental since them is refused (\"take a "
    "full backup\"), the next backup of the disk must be full. Start the disk with "
    "`disk-start` afterwards. Errors: `Busy` (the disk is running or part of the running "
    "backup, or another process holds its bitmap store), `NotFound`, "
    "`InvalidParameter` (reset-bitmaps not given).",
    "`{\"disk\", \"bitmaps\": N, \"unusable\": [CHECKPOINT], \"message\"}`" },
  { "disk-stop", h_disk_stop, name_arg,
    "Stop the disk's nbdkit (clients are disconnected). Refused while it is part of the "
    "running backup.",
    NULL },
  { "disk-snapshot", h_disk_snapshot, snapshot_args,
    "Live snapshot of a disk added with overlays: guest writes in flight drain, a new "
    "empty overlay becomes the top and receives every write from now on; the layers below "
    "become read-only. Crash-atomic (the chain descriptor is the commit point). The new "
    "overlay's files get fresh random names and are created exclusively: a file that is "
    "already there (another chain's) fails the snapshot naming it, and is left untouched. "
    "Errors: "
    "`NotFound` (no such disk), `InvalidParameter` (the disk has no overlay chain), "
    "`Busy` (the disk is part of the running backup, or a commit runs), `IOError` (not "
    "running).",
    "`{\"disk\", \"layer\": NAME, \"index\": N, \"overlays\": N}`" },
  { "disk-commit", h_disk_commit, commit_args,
    "Live commit: merge layers `base`+1..`top` into layer `base` in the background while "
    "the guest keeps running. Default: the active (top) overlay into the layer below it "
    "(the image itself when it is the only overlay). An active commit (`top` is the "
    "active layer) mirrors the guest's writes into `base` meanwhile; an intermediate "
    "commit (`top` below the active layer) copies while the guest writes to the layers "
    "above, which shadow it. The guest-visible disk never changes. When it completes, "
    "the merged layers leave the chain (`base` is the layer below the ones that stayed), "
    "or with `keep` they stay, emptied, and the active one keeps taking the guest's "
    "writes. Progress and the result are in `disk-chain` (`operation`); `cbw disk commit "
    "--wait` follows it; `disk-commit-cancel` stops any of them with the chain as it was. "
    "A crash at any instant loses no acknowledged write (an interrupted copy is undone "
    "at the next start, an interrupted switch finished). Refused like `disk-snapshot`, "
    "and with `InvalidParameter` naming the problem when the chain has no overlay, a "
    "LAYER is unknown or out of range, `top` is the image, `base` is the active layer or "
    "not below `top`.",
    "`{\"disk\", \"lo\", \"hi\", \"active\", \"mode\": delete|make-empty}` (layers "
    "lo..hi merge into lo-1)" },
  { "disk-commit-cancel", h_disk_commit_cancel, name_arg,
    "Cancel the disk's running commit; the chain stays as it was.",
    NULL },
  { "disk-chain", h_disk_chain, name_arg,
    "The layers of a disk, bottom (the image) to top, and the running or last commit. A "
    "disk without overlays has one layer, its image.",
    "`{\"disk\", \"chain\": PATH|null, \"overlays\": N, \"cluster-size\"?, "
    "\"layers\": [{\"index\", \"name\", \"kind\", \"writable\", "
    "\"allocated_bytes\"?, \"zero_bytes\"?, \"label\"?}], \"operation\": {\"type\", "
    "\"state\": running|completed|failed|cancelled, \"done\", \"total\", \"speed\", "
    "\"error\"?, ...}|null}`" },
  { "disk-list", h_disk_list, no_args,
    "List disks with their run state (`running`, `stopped`, `dead`: an nbdkit that "
    "exited unasked; see also the `disk-dead` event).",
    "`{\"disks\": [{\"name\", \"file\", \"id\" (the disk's UUID, announced as its live "
    "export's NBD description `cbw-disk-id:UUID`), \"state\", \"pid\", \"size\", "
    "\"granularity\", \"chain\": PATH|null, \"force-share\", "
    "\"uri\", \"socket\", \"control\": {\"chain\", \"cbw\", \"dirtybitmap\"}, \"log\", "
    "\"wait-status\"?}]}`" },
  { "checkpoint-create", h_cp_create, cp_create_args,
    "Create a checkpoint atomically across a set of disks: quiesce all, start the new "
    "interval's bitmap `cp-NAME` and freeze the previous one on each disk, record, "
    "resume. On failure everything is rolled back and the error names the step.",
    "`{\"name\"}`" },
  { "checkpoint-list", h_cp_list, cp_list_args,
    "List checkpoints, oldest first, with the disks on which each is unusable (refused as "
    "an incremental base there: its bitmaps were reset, or the recovery of an "
    "interrupted operation failed on that disk).",
    "`{\"checkpoints\": [{\"name\", \"created\", \"disks\", \"bitmap\", \"pending\", "
    "\"unusable\": [{\"disk\", \"since\", \"reason\"}]}]}`" },
  { "checkpoint-delete", h_cp_delete, name_arg,
    "Delete a checkpoint: on each of its disks its bitmap is merged into the previous "
    "checkpoint's bitmap (so incrementals since older checkpoints stay exact), then removed.",
    NULL },
  { "backup-begin", h_backup_begin, backup_begin_args,
    "Begin a pull backup of a set of disks at one point in time: quiesce all, optional "
    "guest freeze, per disk a copy-before-write session (and for `incremental` the bitmap "
    "`backup-DISK` = changes since `since`; for `top` the bitmap `backup-DISK` = the "
    "clusters the top overlay holds at the point in time), optional new checkpoint, thaw, "
    "resume, then "
    "one point-in-time export per disk. Any failure rolls everything back; the error "
    "says `backup-begin failed at step S`. An incremental since a checkpoint that is "
    "unusable on one of the disks is refused (`InvalidParameter`: take a full backup). "
    "A stopped disk is backed up offline (same modes except `top`, same export name and "
    "context): no session and no store, its raw image is served read-only under QEMU "
    "read locks (writers such as qemu-io are refused) with `backup-DISK` read from its "
    "bitmap store, a new checkpoint is rotated in the store, and `disk-start` is refused "
    "(`Busy`) until `backup-end`. Refused for a stopped disk with an overlay chain "
    "(`InvalidParameter`) and for one whose bitmaps were not saved cleanly (`IOError`: "
    "start and stop it once). Running and stopped disks may share one backup.",
    "`{\"id\", \"mode\", \"readable\", \"since\", \"checkpoint\", \"started\", \"disks\": [{\"name\", "
    "\"pit-uri\", \"bitmap\", \"store-path\", \"store-socket\", \"store-pid\", \"export\", "
    "\"store-limit\", \"offline\"}]}` (`store-limit` 0: not bounded; `offline` only when "
    "true)" },
  { "backup-end", h_backup_end, backup_end_args,
    "End the running backup: cancel its running push jobs, remove its exports, end the "
    "sessions, drop the backup bitmaps and stores. Checkpoints created with it stay.",
    NULL },
  { "backup-status", h_backup_status, no_args,
    "The running backup, with each disk's copy-before-write session status.",
    "as `backup-begin`, plus `broken` (a disk's session gave up: see the event "
    "`backup-broken`) and per disk `session` (the cbw filter's `status`) or "
    "`session-error`" },
  { "job-start", h_job_start, job_start_args,
    "Start a push job: copy the point in time of the running backup's disks (their PIT "
    "exports) to targets, on a thread of its own. Mode follows the backup: `full` (and "
    "`none`) copies the whole disk, `incremental` and `top` only the extents of `backup-DISK` (a `top` job may create its "
    "target: it then holds just those ranges). Holes "
    "and zeroes (base:allocation) are not read; on a target the job created they are not "
    "written either. Every range on the target is released with the cbw filter's `skip`, "
    "so the store shrinks. Errors (nothing started, files the job created are removed): "
    "`NotFound` (no such backup or disk, incremental target missing), `InvalidParameter` "
    "(a disk backed up offline: no session to follow, pull its export instead; "
    "bad target, wrong size; a target that is one of cbwd's files by device and inode "
    "— a served image, a chain's file, a store, a bitmap or state file, anything in the "
    "state directory, a block device holding one, a disk's or cbwd's socket), `Busy` (the "
    "disk is being or was already pushed in this backup), `IOError` (session not active). "
    "An NBD target is connected on the job's thread, never on the control thread: the "
    "command answers at once, and an unreachable or silent server (no handshake within "
    "`connect-timeout`), a read-only or too small export, or one announcing a cbw disk id "
    "fails the job before anything is written (`job-status` `error`).",
    "the job, as in `job-status`" },
  { "job-list", h_job_list, no_args,
    "List jobs (running and the last 64 finished; those of a previous cbwd that were "
    "running are `failed` with an `interrupted` error).",
    "`{\"jobs\": [JOB]}`" },
  { "job-status", h_job_status, job_id_args,
    "Status and progress of a job.",
    "`{\"id\", \"backup\", \"mode\", \"state\": running|paused|completed|cancelled|failed, "
    "\"error\": STRING|null, \"started\", \"finished\", \"elapsed-ms\", \"speed\", \"bytes-done\", "
    "\"bytes-total\", \"percent\", \"data-bytes\", \"zero-bytes\", \"released-bytes\", "
    "\"release-errors\", \"in-flight\", \"requests\", \"request-size\", \"disks\": "
    "[{\"name\", \"target\", \"format\", \"created\", \"bytes-done\", \"bytes-total\", "
    "\"released-bytes\"}]}`" },
  { "job-pause", h_job_pause, job_id_args,
    "Pause a running job: no new requests; those in flight finish (`in-flight` drops to 0). "
    "Errors on a job that is not running.",
    NULL },
  { "job-resume", h_job_resume, job_id_args,
    "Resume a paused job.",
    NULL },
  { "job-cancel", h_job_cancel, job_id_args,
    "Cancel a running or paused job and wait until its requests in flight have drained. "
    "The target is left as is (partly written).",
    "the job's final status, as in `job-status`" },
  { "job-set-speed", h_job_set_speed, job_speed_args,
    "Change a running job's speed limit.",
    NULL },
  { "event-list", h_event_list, event_args,
    "Events after sequence number `since` (the last 256 are kept): `started`, "
    "`disk-added`, `disk-removed`, `disk-started`, `disk-stopped`, `disk-dead`, "
    "`disk-snapshot`, `disk-commit-started`, `disk-commit-cancelled`, "
    "`checkpoint-created`, `checkpoint-deleted`, `backup-begun`, `backup-ended`, "
    "`backup-failed`, `freeze-failed`, `thaw-failed`, `resume-failed`, `recovered`, "
    "`recovery-failed` (an interrupted operation recorded as failed; `unusable-on` lists "
    "the disks whose next backup must be full), `disk-repaired`, "
    "`job-started`, `job-progress` (at most every 2 s per job), `job-paused`, "
    "`job-resumed`, `job-completed`, `job-cancelled`, `job-failed`, `jobs-file-invalid`.",
    "`{\"events\": [{\"event\", \"data\", \"seq\", \"timestamp\", \"time\"}], \"last\": SEQ, "
    "\"lost\": bool}`" },
  CBW_CTL_EVENT_COMMANDS,
  { NULL }
};

const struct cbw_ctl_table cbw_orch_ctl_table = { "cbwd", commands };
