/* cbw — server/orch/orch.c: open/close of the orchestrator, the event ring,
 * the busy flag and crash recovery (reconcile) at startup.
 *
 * Startup order: lock the state directory (flock on STATE_DIR/lock: two
 * cbwd on one state dir is an error naming the lock), load the state file,
 * adopt or report each disk's nbdkit, start the supervisor, then finish or
 * undo the operation that a crash interrupted (state.pending).
 *
 * Events: orch_event() numbers each event (1, 2, 3 ... per cbwd run), keeps
 * it in a ring of ORCH_EVENTS_MAX (polled with `event-list since=SEQ`) and
 * pushes the same line to the control connections that sent `subscribe`
 * (common/control.h).  Recording and broadcasting happen under o->lock, and
 * the replay of `subscribe since=SEQ` (event_history) reads the ring
 * under o->lock too, so a subscriber sees every event once, in order.
 * cbw_ctl_server_broadcast() only queues the line (it takes the control
 * server's leaf queue lock), so holding o->lock across it is no I/O.
 *
 * Disks from the config file (cbw_orch_apply_disks): checked first, all of
 * them, without side effects; then the missing ones are added through the
 * `disk-add` command itself (cbw_ctl_call_local), so the config file and
 * the control API share one validation.
 *
 * Locking: o->lock guards the state, the disks' run-time fields, the event
 * ring, `ctl` and `busy` (see orch_internal.h).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
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
  struct json_object *ts = json_object_new_object ();
  struct timespec now;
  uint64_t seq = ++o->next_seq;

  clock_gettime (CLOCK_REALTIME, &now);
  /* QMP's event shape, plus our sequence number. */
  json_object_object_add (e, "event", json_object_new_string (type));
  json_object_object_add (e, "data", data ? data : json_object_new_object ());
  json_object_object_add (e, "seq", json_object_new_int64 ((int64_t) seq));
  json_object_object_add (ts, "seconds", json_object_new_int64 ((int64_t) now.tv_sec));
  json_object_object_add (ts, "microseconds",
                          json_object_new_int64 ((int64_t) (now.tv_nsec / 1000)));
  json_object_object_add (e, "timestamp", ts);
  struct orch_event *slot = &o->events[seq % ORCH_EVENTS_MAX];
  free (slot->json);
  slot->seq = seq;
  slot->time = (int64_t) now.tv_sec;
  slot->json = strdup (json_object_to_json_string_ext (e, JSON_C_TO_STRING_PLAIN |
                                                       JSON_C_TO_STRING_NOSLASHESCAPE));
  json_object_put (e);
  /* No subscriber misses it: a full queue drops the subscribers instead. */
  if (slot->json && o->ctl &&
      cbw_ctl_server_broadcast (o->ctl, seq, slot->json) == -1 && errno != ENOBUFS)
    fprintf (stderr, "cbwd: event %s (%" PRIu64 ") not pushed: %s\n", type, seq,
             strerror (errno));
}

/* The event source of cbwd's control socket: replay from the ring. */
static int
event_history (void *data, uint64_t since, cbw_ctl_emit_fn emit, void *ctx,
               uint64_t *last, bool *lost)
{
  struct cbw_orch *o = data;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  uint64_t first = o->next_seq > ORCH_EVENTS_MAX ? o->next_seq - ORCH_EVENTS_MAX + 1 : 1;
  *last = o->next_seq;
  *lost = false;
  if (since >= o->next_seq)
    return 0;
  if (since + 1 < first)
    *lost = true;
  for (uint64_t s = since + 1 > first ? since + 1 : first; s <= o->next_seq; s++) {
    struct orch_event *ev = &o->events[s % ORCH_EVENTS_MAX];
    if (ev->seq != s || ev->json == NULL) {
      *lost = true;             /* out of memory when it was recorded */
      continue;
    }
    if (emit (ctx, s, ev->json) < 0)
      return -1;
  }
  return 0;
}

static void
event_log (void *data, const char *msg)
{
  (void) data;
  fprintf (stderr, "cbwd: control: %s\n", msg);
}

static const struct cbw_ctl_event_source orch_event_source = {
  .history = event_history,
  .log = event_log,
};

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
  for (size_t i = 0; i < o->nlisten; i++)
    free (o->listen[i]);
  free (o->listen);
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

/* A step of the interrupted operation cannot be redone (a disk is dead or
 * does not start, a bitmap is gone): keeping it pending would refuse every
 * later checkpoint/backup command for good.  Instead it is recorded as
 * failed and finished as far as it goes; what could not be repaired costs
 * the affected disks their incremental base, said in the event, in
 * `status` (needs-full-backup) and in `checkpoint-list` (unusable). */
int
orch_reconcile_or_abandon (struct cbw_orch *o, struct cbw_err *err)
{
  char op[32], name[ORCH_NAME_MAX + 1], why[CBW_ERR_MSG_MAX + 256], when[32];
  struct cbw_err rerr = { 0 };
  time_t now = time (NULL);
  struct tm tm;

  if (reconcile (o, &rerr) == 0)
    return 0;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    snprintf (op, sizeof op, "%s", o->st.pending.op);
    snprintf (name, sizeof name, "%s", o->st.pending.name);
  }
  if (op[0] == '\0')
    return 0;
  strftime (when, sizeof when, "%Y-%m-%d %H:%M:%S UTC", gmtime_r (&now, &tm));
  snprintf (why, sizeof why, "recovery of the interrupted %s %s failed at %s: %s",
            op, name, when, rerr.msg);
  struct json_object *failed = json_object_new_array ();
  int r;
  if (strcmp (op, "checkpoint-create") == 0 || strcmp (op, "checkpoint-delete") == 0)
    r = orch_cp_abandon (o, name, strcmp (op, "checkpoint-delete") == 0, why, failed);
  else
    r = orch_backup_abandon (o, why, failed);
  orch_set_pending (o, NULL, NULL);
  if (r < 0 || orch_state_save (o, err) < 0) {
    if (r < 0)
      cbw_err_set (err, ENOMEM, "out of memory");
    json_object_put (failed);
    return cbw_err_prefix (err, "recording the failed recovery of %s %s", op, name);
  }
  char msg[1024] = "";
  for (size_t i = 0; i < json_object_array_length (failed); i++) {
    const char *dn = json_object_get_string (json_object_array_get_idx (failed, i));
    snprintf (msg + strlen (msg), sizeof msg - strlen (msg), "%sthe checkpoints of disk "
              "%s are unusable: the next backup of %s must be full", i ? "; " : "", dn, dn);
  }
  if (msg[0] == '\0')
    snprintf (msg, sizeof msg, "no checkpoint was affected");
  struct json_object *data = json_object_new_object ();
  json_object_object_add (data, "op", json_object_new_string (op));
  json_object_object_add (data, "name", json_object_new_string (name));
  json_object_object_add (data, "error", json_object_new_string (rerr.msg));
  json_object_object_add (data, "unusable-on", failed);
  json_object_object_add (data, "message", json_object_new_string (msg));
  orch_event (o, "recovery-failed", data);
  fprintf (stderr, "cbwd: %s; %s\n", why, msg);
  return 0;
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
  o->ctl_access = cfg->control_access;
  o->module_dir = cfg->module_dir ? strdup (cfg->module_dir) : NULL;
  o->nbdkit_argv = split_words (cfg->nbdkit && cfg->nbdkit[0] ? cfg->nbdkit : "nbdkit");
  o->start_timeout = cfg->start_timeout > 0 ? cfg->start_timeout : 30;
  o->exports = cfg->exports;
  if (cfg->nlisten_paths) {
    o->listen = calloc (cfg->nlisten_paths, sizeof *o->listen);
    if (o->listen == NULL) {
      cbw_err_set (err, ENOMEM, "out of memory");
      goto fail;
    }
    for (size_t i = 0; i < cfg->nlisten_paths; i++)
      if (cfg->listen_paths[i] &&
          (o->listen[o->nlisten++] = strdup (cfg->listen_paths[i])) == NULL) {
        cbw_err_set (err, ENOMEM, "out of memory");
        goto fail;
      }
  }
  o->warning = cfg->warning;
  o->freeze_hooks = cfg->freeze_hooks;
  o->nfreeze_hooks = cfg->nfreeze_hooks;
  for (size_t i = 0; i < o->nfreeze_hooks; i++) {
    const char *h = o->freeze_hooks[i], *eq = strchr (h, '=');
    size_t nl = eq ? (size_t) (eq - h) : 0;
    if (nl == 0 || nl > 64 || strspn (h, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                      "0123456789._-") != nl) {
      cbw_err_set (err, EINVAL, "freeze hook '%.100s': expected NAME=/PATH (NAME: letters, "
                   "digits, '.', '_', '-')", h);
      goto fail;
    }
    if (eq[1] != '/' || access (eq + 1, X_OK) < 0) {
      cbw_err_set (err, eq[1] != '/' ? EINVAL : errno, "freeze hook %.*s: '%.200s' is not an "
                   "executable given by absolute path (hooks run without a shell)",
                   (int) nl, h, eq + 1);
      goto fail;
    }
  }
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
  if (orch_backup_config (o, getenv ("CBW_ORCH_STORE_LIMIT"),
                          getenv ("CBW_ORCH_STATE_RESERVE"), err) < 0)
    goto fail;
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
  /* One-time upgrade: disks of an older cbwd get their identity now, kept
   * from here on (their running nbdkit announces it from its next start). */
  for (size_t i = 0; i < o->st.ndisks; i++)
    if (o->st.disks[i]->id_new) {
      if (orch_state_save (o, err) < 0)
        goto fail;
      break;
    }
  for (size_t i = 0; i < o->st.ndisks; i++)
    orch_disk_adopt (o, o->st.disks[i]);
  if (orch_supervisor_start (o, err) < 0)
    goto fail;
  struct json_object *data = json_object_new_object ();
  json_object_object_add (data, "state-dir", json_object_new_string (o->state_dir));
  orch_event (o, "started", data);
  struct cbw_err rerr = { 0 };
  /* cbwd's run-time exports died with the previous process, and its event
   * loop does not run yet (an export call now would wait for it for ever):
   * recovery at start-up has no exports to remove. */
  const struct cbw_orch_exports *exports = o->exports;
  o->exports = NULL;
  int rr = reconcile (o, &rerr);
  o->exports = exports;
  if (rr < 0)
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
  struct cbw_ctl_server *ctl =
    cbw_ctl_server_start_access (o->ctl_path, &cbw_orch_ctl_table, o,
                                 &orch_event_source, &o->ctl_access, err);
  if (ctl == NULL)
    return -1;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    o->ctl = ctl;
  }
  return orch_backup_watch_start (o, err);
}

void
cbw_orch_close (struct cbw_orch *o, bool stop_disks)
{
  struct cbw_ctl_server *ctl;
  if (o == NULL)
    return;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    ctl = o->ctl;
    o->ctl = NULL;              /* producers stop pushing before it goes */
  }
  cbw_ctl_server_stop (ctl);
  orch_backup_watch_stop (o);
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

/* ---- disks from the config file ---- */

static const struct cbw_ctl_command *
table_command (const char *name)
{
  for (const struct cbw_ctl_command *c = cbw_orch_ctl_table.commands; c->name; c++)
    if (strcmp (c->name, name) == 0)
      return c;
  return NULL;
}

/* Phase 1 for one entry: keys and types against disk-add's own spec, and
 * the settings of a disk of that name already in the state directory.
 * *exists tells which.  No side effects. */
static int
check_disk_def (struct cbw_orch *o, struct json_object *def, size_t i,
                const char *source, bool *exists, struct cbw_err *err)
{
  const struct cbw_ctl_command *add = table_command ("disk-add");
  struct cbw_ctl_reply reply = { .ret = NULL };
  struct json_object *v;
  const char *name = "?";

  *exists = false;
  if (add == NULL)
    return cbw_err_set (err, ENOSYS, "%s: the control table has no disk-add", source);
  if (!json_object_is_type (def, json_type_object))
    return cbw_err_set (err, EINVAL, "%s: disks[%zu] must be an object", source, i);
  if (json_object_object_get_ex (def, "name", &v) && json_object_is_type (v, json_type_string))
    name = json_object_get_string (v);
  json_object_object_foreach (def, key, val) {
    const struct cbw_ctl_arg *a;
    (void) val;
    for (a = add->args; a->name; a++)
      if (strcmp (a->name, key) == 0)
        break;
    if (a->name == NULL) {
      char allowed[256] = "";
      for (a = add->args; a->name; a++)
        snprintf (allowed + strlen (allowed), sizeof allowed - strlen (allowed), "%s%s",
                  allowed[0] ? ", " : "", a->name);
      return cbw_err_set (err, EINVAL, "%s: disk \"%.80s\": unknown key \"%.80s\" "
                          "(allowed: %s)", source, name, key, allowed);
    }
  }
  if (cbw_ctl_validate_args (&cbw_orch_ctl_table, "disk-add", def, &reply) < 0)
    return cbw_err_set (err, EINVAL, "%s: disk \"%.80s\": %s", source, name,
                        reply.err_desc);

  /* The existing disk as `disk-list` shows it: every key the listing has
   * is compared, so options added to disk-add later are covered as soon as
   * disk-list reports them. */
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    *exists = orch_find_disk (&o->st, name) != NULL;
  }
  if (!*exists)
    return 0;
  struct json_object *list = NULL, *cur = NULL, *arr;
  if (cbw_ctl_call_local (&cbw_orch_ctl_table, o, "disk-list", NULL, &list, &reply) < 0)
    return cbw_err_set (err, EIO, "%s: disk \"%s\": disk-list: %s", source, name,
                        reply.err_desc);
  if (json_object_object_get_ex (list, "disks", &arr))
    for (size_t k = 0; k < json_object_array_length (arr); k++) {
      struct json_object *dj = json_object_array_get_idx (arr, k);
      if (strcmp (cbw_ctl_arg_str (dj, "name", ""), name) == 0)
        cur = dj;
    }
  int r = 0;
  json_object_object_foreach (def, k, kv) {
    struct json_object *have = NULL;
    if (strcmp (k, "name") == 0 || cur == NULL)
      continue;
    if (strcmp (k, "overlays") == 0 && json_object_object_get_ex (cur, "chain", &have)) {
      /* overlays <=> the disk has a chain descriptor */
      bool want = json_object_get_boolean (kv), is = have != NULL &&
        !json_object_is_type (have, json_type_null);
      if (want != is) {
        r = cbw_err_set (err, EEXIST, "%s: disk \"%s\": key \"overlays\" is %s, but disk %s "
                         "in the state directory is served %s overlays (remove and re-add "
                         "the disk to change it)", source, name, want ? "true" : "false",
                         name, is ? "with" : "without");
        break;
      }
      continue;
    }
    if (!json_object_object_get_ex (cur, k, &have)) {
      fprintf (stderr, "cbwd: %s: disk \"%s\": key \"%s\" is not reported by disk-list: "
               "not compared with the existing disk\n", source, name, k);
      continue;
    }
    bool same;
    if (json_object_is_type (kv, json_type_string) && have &&
        json_object_is_type (have, json_type_string) &&
        (strcmp (k, "file") == 0 || strcmp (k, "chain") == 0)) {
      /* paths: as disk-add would store them */
      CLEANUP_FREE char *real = realpath (json_object_get_string (kv), NULL);
      same = strcmp (real ? real : json_object_get_string (kv),
                     json_object_get_string (have)) == 0;
    }
    else
      same = json_object_equal (kv, have);
    if (!same) {
      const char *hs = have ? json_object_to_json_string_ext (have, JSON_C_TO_STRING_PLAIN |
                                                              JSON_C_TO_STRING_NOSLASHESCAPE)
        : "null";
      r = cbw_err_set (err, EEXIST, "%s: disk \"%s\": key \"%s\" is %s, but disk %s in the "
                       "state directory has %s (remove the disk with `cbw disk remove %s` "
                       "and restart to re-add it, or fix the config)", source, name, k,
                       json_object_to_json_string_ext (kv, JSON_C_TO_STRING_PLAIN |
                                                       JSON_C_TO_STRING_NOSLASHESCAPE),
                       name, hs, name);
      break;
    }
  }
  json_object_put (list);
  return r;
}

int
cbw_orch_apply_disks (struct cbw_orch *o, struct json_object *disks, const char *source,
                      struct cbw_err *err)
{
  size_t n;
  CLEANUP_FREE bool *exists = NULL;

  if (disks == NULL)
    return 0;
  if (!json_object_is_type (disks, json_type_array))
    return cbw_err_set (err, EINVAL, "%s: \"disks\" must be an array", source);
  n = json_object_array_length (disks);
  if (n == 0)
    return 0;
  exists = calloc (n, sizeof *exists);
  if (exists == NULL)
    return cbw_err_set (err, ENOMEM, "out of memory");
  for (size_t i = 0; i < n; i++) {
    struct json_object *di = json_object_array_get_idx (disks, i);
    const char *ni = cbw_ctl_arg_str (di, "name", NULL);
    if (check_disk_def (o, di, i, source, &exists[i], err) < 0)
      return -1;
    for (size_t j = 0; j < i; j++)
      if (strcmp (ni, cbw_ctl_arg_str (json_object_array_get_idx (disks, j), "name", "")) == 0)
        return cbw_err_set (err, EINVAL, "%s: disk \"%s\" defined twice", source, ni);
  }
  for (size_t i = 0; i < n; i++) {
    struct json_object *di = json_object_array_get_idx (disks, i);
    const char *name = cbw_ctl_arg_str (di, "name", "?");
    if (exists[i]) {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
      struct orch_disk *d = orch_find_disk (&o->st, name);
      fprintf (stderr, "cbwd: %s: disk \"%s\" already in the state directory (%s): kept\n",
               source, name, d ? orch_disk_run_name (d->run) : "?");
      continue;
    }
    struct cbw_ctl_reply reply = { .ret = NULL };
    if (cbw_ctl_call_local (&cbw_orch_ctl_table, o, "disk-add", di, NULL, &reply) < 0) {
      int e = EIO;
      switch (reply.err_class) {
      case CBW_CTL_INVALID_PARAMETER: e = EINVAL; break;
      case CBW_CTL_NOT_FOUND: e = ENOENT; break;
      case CBW_CTL_EXISTS: e = EEXIST; break;
      case CBW_CTL_BUSY: e = EBUSY; break;
      case CBW_CTL_TIMEOUT: e = ETIMEDOUT; break;
      default: break;
      }
      return cbw_err_set (err, e, "%s: disk \"%s\": disk-add failed: %s: %s", source, name,
                          cbw_ctl_error_class_name (reply.err_class), reply.err_desc);
    }
    fprintf (stderr, "cbwd: %s: disk \"%s\" added\n", source, name);
  }
  return 0;
}
