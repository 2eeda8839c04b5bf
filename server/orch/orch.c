/* cbw — server/orch/orch.c: open/close of the orchestrator, the event ring,
 * the busy flag and crash recovery (reconcile) at startup.
 *
 * Startup order: lock the state directory (flock on STATE_DIR/lock: two
 * cbwd on one state dir is an error naming the lock), load the state file,
 * adopt or report each disk's nbdkit, start the supervisor, then finish or
 * undo the operation that a crash interrupted (state.pending).
 *
 * Locking: o->lock guards the state, the disks' run-time fields, the event
 * ring and `busy` (see orch_internal.h).  Events are kept in a ring of
 * ORCH_EVENTS_MAX with increasing sequence numbers; clients poll them with
 * `event-list since=SEQ` (the control library has no push channel).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cleanup.h"
#include "orch_internal.h"

void
orch_event_locked (struct cbw_orch *o, const char *type, struct json_object *data)
{
  struct json_object *e = json_object_new_object ();
  uint64_t seq = ++o->next_seq;
  json_object_object_add (e, "seq", json_object_new_int64 ((int64_t) seq));
  json_object_object_add (e, "time", json_object_new_int64 ((int64_t) time (NULL)));
  json_object_object_add (e, "event", json_object_new_string (type));
  json_object_object_add (e, "data", data ? data : json_object_new_object ());
  struct orch_event *slot = &o->events[seq % ORCH_EVENTS_MAX];
  free (slot->json);
  slot->seq = seq;
  slot->time = (int64_t) time (NULL);
  slot->json = strdup (json_object_to_json_string_ext (e, JSON_C_TO_STRING_PLAIN));
  json_object_put (e);
}

void
orch_event (struct cbw_orch *o, const char *type, struct json_object *data)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  orch_event_locked (o, type, data);
}

void
orch_crash_point (const char *point)
{
  const char *at = getenv ("CBW_ORCH_CRASH_AT");
  if (at && strcmp (at, point) == 0) {
    fprintf (stderr, "cbwd: CBW_ORCH_CRASH_AT=%s: exiting\n", point);
    _exit (99);
  }
}

int
orch_begin_busy (struct cbw_orch *o, struct cbw_err *err)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  if (o->busy)
    return cbw_err_set (err, EBUSY, "another operation is in progress");
  o->busy = true;
  return 0;
}

void
orch_end_busy (struct cbw_orch *o)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  o->busy = false;
}

static char **
split_words (const char *s)
{
  size_t n = 0, cap = 8;
  char **v = calloc (cap, sizeof *v);
  CLEANUP_FREE char *copy = strdup (s);
  char *save = NULL;
  if (v == NULL || copy == NULL) {
    free (v);
    return NULL;
  }
  for (char *w = strtok_r (copy, " \t", &save); w; w = strtok_r (NULL, " \t", &save)) {
    if (n + 2 > cap) {
      char **nv = realloc (v, (cap *= 2) * sizeof *v);
      if (nv == NULL) goto fail;
      v = nv;
    }
    if ((v[n++] = strdup (w)) == NULL) goto fail;
    v[n] = NULL;
  }
  if (n == 0) goto fail;
  return v;
 fail:
  for (size_t i = 0; i < n; i++) free (v[i]);
  free (v);
  return NULL;
}

static void
orch_free (struct cbw_orch *o)
{
  orch_state_free (&o->st);
  if (o->nbdkit_argv)
    for (size_t i = 0; o->nbdkit_argv[i]; i++)
      free (o->nbdkit_argv[i]);
  free (o->nbdkit_argv);
  for (size_t i = 0; i < ORCH_EVENTS_MAX; i++)
    free (o->events[i].json);
  free (o->state_dir); free (o->state_path); free (o->ctl_path); free (o->module_dir);
  if (o->lock_fd >= 0)
    close (o->lock_fd);
  pthread_mutex_destroy (&o->lock);
  free (o);
}

/* Finish or undo what a crash interrupted.  Failures are reported as
 * events and leave `pending` set, so that every later checkpoint/backup
 * command retries first (and refuses to run on top of a half state). */
static int
reconcile (struct cbw_orch *o, struct cbw_err *err)
{
  char op[32], name[ORCH_NAME_MAX + 1];
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    snprintf (op, sizeof op, "%s", o->st.pending.op);
    snprintf (name, sizeof name, "%s", o->st.pending.name);
  }
  if (op[0] == '\0')
    return 0;
  /* A crash inside a quiesced window leaves guest writes held until the
   * filter's quiesce timeout: release them now (errors such as "not
   * quiesced" are expected and ignored). */
  {
    size_t n = 0;
    char **names = NULL;
    {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
      names = calloc (o->st.ndisks + 1, sizeof *names);
      for (size_t i = 0; names && i < o->st.ndisks; i++)
        if (o->st.disks[i]->run == ORCH_DISK_RUNNING)
          names[n++] = o->st.disks[i]->name;
    }
    if (names) {
      for (size_t i = 0; i < n; i++) {
        struct orch_disk *d = orch_find_disk (&o->st, names[i]);
        struct cbw_err e = { 0 };
        struct json_object *r = orch_mod_call (d->ctl_cbw, "resume", NULL, NULL, 0, &e);
        json_object_put (r);
      }
      free (names);
    }
  }
  int r;
  if (strcmp (op, "checkpoint-create") == 0 || strcmp (op, "checkpoint-delete") == 0)
    r = orch_cp_reconcile (o, op, name, err);
  else
    r = orch_backup_reconcile (o, err);
  struct json_object *data = json_object_new_object ();
  json_object_object_add (data, "op", json_object_new_string (op));
  json_object_object_add (data, "name", json_object_new_string (name));
  json_object_object_add (data, "result", json_object_new_string (r == 0 ? "done" : err->msg));
  orch_event (o, "recovered", data);
  return r;
}

int
orch_reconcile (struct cbw_orch *o, struct cbw_err *err)
{
  return reconcile (o, err);
}

struct cbw_orch *
cbw_orch_open (const struct cbw_orch_config *cfg, struct cbw_err *err)
{
  CLEANUP_FREE char *lock_path = NULL, *disks_dir = NULL;
  struct cbw_orch *o = calloc (1, sizeof *o);
  if (o == NULL) {
    cbw_err_set (err, ENOMEM, "out of memory");
    return NULL;
  }
  pthread_mutex_init (&o->lock, NULL);
  o->lock_fd = -1;
  o->sup_wakefd = -1;
  if (cfg->state_dir == NULL || cfg->state_dir[0] == '\0') {
    cbw_err_set (err, EINVAL, "no state directory given");
    goto fail;
  }
  if (mkdir (cfg->state_dir, 0700) < 0 && errno != EEXIST) {
    cbw_err_set (err, errno, "%s: mkdir: %s", cfg->state_dir, strerror (errno));
    goto fail;
  }
  o->state_dir = realpath (cfg->state_dir, NULL);
  if (o->state_dir == NULL) {
    cbw_err_set (err, errno, "%s: %s", cfg->state_dir, strerror (errno));
    goto fail;
  }
  o->state_path = orch_strdup_printf ("%s/%s", o->state_dir, ORCH_STATE_FILE);
  o->ctl_path = cfg->control_socket ? strdup (cfg->control_socket)
    : orch_strdup_printf ("%s/control.sock", o->state_dir);
  o->module_dir = cfg->module_dir ? strdup (cfg->module_dir) : NULL;
  o->nbdkit_argv = split_words (cfg->nbdkit && cfg->nbdkit[0] ? cfg->nbdkit : "nbdkit");
  o->start_timeout = cfg->start_timeout > 0 ? cfg->start_timeout : 30;
  o->exports = cfg->exports;
  const char *plugin = cfg->plugin ? cfg->plugin : getenv ("CBW_ORCH_PLUGIN");
  if (plugin && strcmp (plugin, "chain") != 0) {
    if (strcmp (plugin, "file") != 0) {
      cbw_err_set (err, EINVAL, "plugin must be \"chain\" or \"file\", not \"%.40s\"",
                   plugin);
      goto fail;
    }
    o->file_plugin = true;
  }
  const char *st = cfg->store_target ? cfg->store_target
    : getenv ("CBW_ORCH_STORE_TARGET");
  if (st && strcmp (st, "local") != 0) {
    if (strcmp (st, "nbd") != 0) {
      cbw_err_set (err, EINVAL, "store target must be \"local\" or \"nbd\", "
                   "not \"%.40s\"", st);
      goto fail;
    }
    o->nbd_store = true;
  }
  if (!o->state_path || !o->ctl_path || (cfg->module_dir && !o->module_dir) ||
      !o->nbdkit_argv) {
    cbw_err_set (err, ENOMEM, "out of memory");
    goto fail;
  }
  lock_path = orch_strdup_printf ("%s/lock", o->state_dir);
  disks_dir = orch_strdup_printf ("%s/disks", o->state_dir);
  if (!lock_path || !disks_dir) {
    cbw_err_set (err, ENOMEM, "out of memory");
    goto fail;
  }
  if (mkdir (disks_dir, 0700) < 0 && errno != EEXIST) {
    cbw_err_set (err, errno, "%s: mkdir: %s", disks_dir, strerror (errno));
    goto fail;
  }
  o->lock_fd = open (lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (o->lock_fd < 0) {
    cbw_err_set (err, errno, "%s: %s", lock_path, strerror (errno));
    goto fail;
  }
  if (flock (o->lock_fd, LOCK_EX | LOCK_NB) < 0) {
    cbw_err_set (err, EBUSY, "%s: state directory is in use by another cbwd (%s)",
                 lock_path, strerror (errno));
    goto fail;
  }
  if (orch_state_load (o, err) < 0)
    goto fail;
  for (size_t i = 0; i < o->st.ndisks; i++)
    orch_disk_adopt (o, o->st.disks[i]);
  if (orch_supervisor_start (o, err) < 0)
    goto fail;
  struct json_object *data = json_object_new_object ();
  json_object_object_add (data, "state-dir", json_object_new_string (o->state_dir));
  orch_event (o, "started", data);
  struct cbw_err rerr = { 0 };
  if (reconcile (o, &rerr) < 0)
    fprintf (stderr, "cbwd: recovery of an interrupted operation failed "
             "(will retry): %s\n", rerr.msg);
  orch_jobs_load (o);
  return o;

 fail:
  orch_free (o);
  return NULL;
}

int
cbw_orch_serve (struct cbw_orch *o, struct cbw_err *err)
{
  o->ctl = cbw_ctl_server_start (o->ctl_path, &cbw_orch_ctl_table, o, err);
  return o->ctl ? 0 : -1;
}

void
cbw_orch_close (struct cbw_orch *o, bool stop_disks)
{
  if (o == NULL)
    return;
  cbw_ctl_server_stop (o->ctl);
  o->ctl = NULL;
  orch_jobs_shutdown (o);
  if (stop_disks)
    for (size_t i = 0; i < o->st.ndisks; i++)
      orch_disk_stop (o, o->st.disks[i], NULL);
  orch_supervisor_stop (o);
  for (size_t i = 0; i < o->st.ndisks; i++)
    if (o->st.disks[i]->pidfd >= 0) {
      close (o->st.disks[i]->pidfd);
      o->st.disks[i]->pidfd = -1;
    }
  orch_free (o);
}
