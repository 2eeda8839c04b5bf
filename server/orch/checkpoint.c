/* cbw — server/orch/checkpoint.c: checkpoints across a set of disks.
 *
 * create N on disks S (plan.c explains the bitmap model):
 *   1. record N in the state with pending={checkpoint-create,N}; save
 *   2. quiesce every disk of S through its cbw filter (writes drained and
 *      held: no write can straddle the checkpoint on any disk)
 *   3. on each disk: add bitmap cp-N (enabled), then disable the bitmap of
 *      the previous checkpoint of that disk (add-before-disable: a write is
 *      always recorded by at least one of them)
 *   4. resume every disk; clear pending; save.
 * A failure in 2-3 resumes the disks and rolls back (re-enable the previous
 * bitmap, merge cp-N into it, remove cp-N), so the error names the step and
 * nothing changed.  After a crash, orch_cp_reconcile() rolls forward when
 * cp-N exists on every disk, back otherwise; the quiesce of a dead cbwd
 * lifts itself (the cbw filter's quiesce timeout).
 *
 * delete C: for each disk of C, the previous checkpoint P of that disk (if
 * any) absorbs cp-C: if C is the disk's latest, P's bitmap is enabled first,
 * then cp-C is merged into cp-P and removed.  Every step is idempotent, so
 * recovery simply redoes it.
 *
 * A disk in an offline backup (d->offline: stopped, disk-start refused) has
 * no dirtybitmap filter running: the primitives below then edit its bitmap
 * store directly (bmstore.c), one crash-atomic save per primitive, so every
 * step above keeps the same crash behaviour.
 *
 * Locking: runs as the busy owner; o->lock only around state changes.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cleanup.h"
#include "orch_internal.h"

#define QUIESCE_TIMEOUT_MS 10000

/* ---- dirtybitmap filter primitives ---- */

static int
call (const char *sock, const char *cmd, struct json_object *args,
      char *cls, size_t cls_len, struct cbw_err *err)
{
  struct json_object *r = orch_mod_call (sock, cmd, args, cls, cls_len, err);
  if (r == NULL)
    return -1;
  json_object_put (r);
  return 0;
}

static struct json_object *
args1 (const char *k, const char *v)
{
  struct json_object *a = json_object_new_object ();
  json_object_object_add (a, k, json_object_new_string (v));
  return a;
}

int
orch_bm_add (struct orch_disk *d, const char *bm, bool enabled, struct cbw_err *err)
{
  return orch_bm_add_gran (d, bm, enabled, 0, err);
}

int
orch_bm_add_gran (struct orch_disk *d, const char *bm, bool enabled, uint64_t gran,
                  struct cbw_err *err)
{
  if (d->offline)
    return orch_bm_store_add (d, bm, enabled, gran, err);
  struct json_object *a = args1 ("name", bm);
  json_object_object_add (a, "granularity",
                          json_object_new_int64 ((int64_t) (gran ? gran : d->granularity)));
  json_object_object_add (a, "enabled", json_object_new_boolean (enabled));
  return call (d->ctl_bitmap, "add", a, NULL, 0, err);
}

int
orch_bm_remove (struct orch_disk *d, const char *bm, bool missing_ok, struct cbw_err *err)
{
  char cls[32];
  if (d->offline)
    return orch_bm_store_remove (d, bm, missing_ok, err);
  if (call (d->ctl_bitmap, "remove", args1 ("name", bm), cls, sizeof cls, err) == 0)
    return 0;
  if (missing_ok && strcmp (cls, "NotFound") == 0)
    return 0;
  return -1;
}

int
orch_bm_enable (struct orch_disk *d, const char *bm, bool on, struct cbw_err *err)
{
  if (d->offline)
    return orch_bm_store_enable (d, bm, on, err);
  return call (d->ctl_bitmap, on ? "enable" : "disable", args1 ("name", bm),
               NULL, 0, err);
}

int
orch_bm_merge (struct orch_disk *d, const char *src, const char *dst, struct cbw_err *err)
{
  if (d->offline)
    return orch_bm_store_merge (d, src, dst, err);
  struct json_object *a = args1 ("src", src);
  json_object_object_add (a, "dst", json_object_new_string (dst));
  return call (d->ctl_bitmap, "merge", a, NULL, 0, err);
}

int
orch_bm_exists (struct orch_disk *d, const char *bm, struct cbw_err *err)
{
  if (d->offline)
    return orch_bm_store_exists (d, bm, err);
  struct json_object *r = orch_mod_call (d->ctl_bitmap, "list", NULL, NULL, 0, err);
  struct json_object *arr;
  if (r == NULL)
    return -1;
  int found = 0;
  if (json_object_object_get_ex (r, "bitmaps", &arr) &&
      json_object_is_type (arr, json_type_array)) {
    for (size_t i = 0; i < json_object_array_length (arr); i++) {
      struct json_object *e = json_object_array_get_idx (arr, i), *n;
      if (json_object_object_get_ex (e, "name", &n) &&
          strcmp (json_object_get_string (n), bm) == 0)
        found = 1;
    }
  }
  else {
    json_object_put (r);
    return cbw_err_set (err, EPROTO, "%s: list: reply has no \"bitmaps\" array",
                        d->ctl_bitmap);
  }
  json_object_put (r);
  return found;
}

/* Coarsen a sorted extent list in place until it has at most `max` entries
 * by joining neighbours whose gap is at most *tol (doubled as needed).
 * Joining only ever adds bytes: the copy-before-write session protects a
 * superset of the dirty blocks, never fewer. */
static void
coarsen (uint64_t (*x)[2], size_t *n, size_t max, uint64_t *tol)
{
  while (*n > max) {
    size_t k = 0;
    for (size_t i = 1; i < *n; i++) {
      if (x[i][0] - (x[k][0] + x[k][1]) <= *tol)
        x[k][1] = x[i][0] + x[i][1] - x[k][0];
      else {
        k++;
        x[k][0] = x[i][0];
        x[k][1] = x[i][1];
      }
    }
    *n = k + 1;
    *tol = *tol ? *tol * 2 : 65536;
  }
}

struct json_object *
orch_bm_extents (struct orch_disk *d, const char *bm, uint64_t size, size_t max,
                 uint64_t *dirty_bytes, struct cbw_err *err)
{
  uint64_t (*x)[2] = NULL, pos = 0, tol = 0;
  size_t n = 0, cap = 0;
  *dirty_bytes = 0;
  while (pos < size) {
    struct json_object *a = args1 ("name", bm), *exts, *nx;
    json_object_object_add (a, "offset", json_object_new_int64 ((int64_t) pos));
    json_object_object_add (a, "length", json_object_new_int64 ((int64_t) (size - pos)));
    json_object_object_add (a, "max-extents", json_object_new_int (65536));
    struct json_object *r = orch_mod_call (d->ctl_bitmap, "extents", a, NULL, 0, err);
    if (r == NULL) {
      free (x);
      return NULL;
    }
    if (!json_object_object_get_ex (r, "extents", &exts) ||
        !json_object_is_type (exts, json_type_array)) {
      json_object_put (r);
      free (x);
      cbw_err_set (err, EPROTO, "%s: extents: reply has no \"extents\" array", d->ctl_bitmap);
      return NULL;
    }
    uint64_t last = pos;
    for (size_t i = 0; i < json_object_array_length (exts); i++) {
      struct json_object *e = json_object_array_get_idx (exts, i), *vo, *vl;
      if (!json_object_object_get_ex (e, "offset", &vo) ||
          !json_object_object_get_ex (e, "length", &vl) ||
          !json_object_is_type (vo, json_type_int) || !json_object_is_type (vl, json_type_int)) {
        json_object_put (r);
        free (x);
        cbw_err_set (err, EPROTO, "%s: extents: malformed extent", d->ctl_bitmap);
        return NULL;
      }
      int64_t o = json_object_get_int64 (vo), l = json_object_get_int64 (vl);
      /* never trust a length or offset from a socket */
      if (o < (int64_t) last || l <= 0 || (uint64_t) o > size || (uint64_t) l > size - (uint64_t) o) {
        json_object_put (r);
        free (x);
        cbw_err_set (err, EPROTO, "%s: extents: extent %lld+%lld out of order or range",
                     d->ctl_bitmap, (long long) o, (long long) l);
        return NULL;
      }
      if (n == cap) {
        cap = cap ? cap * 2 : 256;
        void *nx2 = realloc (x, cap * sizeof *x);
        if (nx2 == NULL) {
          json_object_put (r);
          free (x);
          cbw_err_set (err, ENOMEM, "out of memory");
          return NULL;
        }
        x = nx2;
      }
      x[n][0] = (uint64_t) o;
      x[n][1] = (uint64_t) l;
      n++;
      *dirty_bytes += (uint64_t) l;
      last = (uint64_t) (o + l);
      if (n >= 2 * max)
        coarsen (x, &n, max, &tol);
    }
    uint64_t next = size;
    if (json_object_object_get_ex (r, "next", &nx) && json_object_is_type (nx, json_type_int)) {
      int64_t v = json_object_get_int64 (nx);
      if (v <= (int64_t) pos || (uint64_t) v > size) {
        json_object_put (r);
        free (x);
        cbw_err_set (err, EPROTO, "%s: extents: \"next\" %lld does not advance",
                     d->ctl_bitmap, (long long) v);
        return NULL;
      }
      next = (uint64_t) v;
    }
    json_object_put (r);
    pos = next;
  }
  coarsen (x, &n, max, &tol);
  struct json_object *arr = json_object_new_array ();
  for (size_t i = 0; i < n; i++) {
    struct json_object *p = json_object_new_array ();
    json_object_array_add (p, json_object_new_int64 ((int64_t) x[i][0]));
    json_object_array_add (p, json_object_new_int64 ((int64_t) x[i][1]));
    json_object_array_add (arr, p);
  }
  free (x);
  return arr;
}

/* ---- quiesce ---- */

/* Quiesce and resume go to every disk at once, one thread per disk: the
 * first disk's writes are held from its quiesce until its resume, so done
 * one disk after the other the guest-visible pause grew with the number of
 * disks by a control round trip (and a drain) per disk and per step
 * (bench/scale: the max write pause of 32 disks).  Each thread makes one
 * control call on its own connection; nothing is shared but its slot. */
struct disk_call {
  struct cbw_orch *o;
  const char *disk, *cmd;
  pthread_t th;
  bool started;
  int r;
  struct cbw_err err;
};

static void *
disk_call_run (void *arg)
{
  struct disk_call *c = arg;
  struct orch_disk *d;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->o->lock);
    d = orch_find_disk (&c->o->st, c->disk);
  }
  if (d == NULL && strcmp (c->cmd, "resume") == 0)
    return NULL;                /* gone: nothing to release */
  if (d == NULL || (strcmp (c->cmd, "quiesce") == 0 && !orch_disk_running (c->o, d))) {
    c->r = cbw_err_set (&c->err, EIO, "%s: disk %s is not running", c->cmd, c->disk);
    return NULL;
  }
  struct json_object *a = NULL;
  if (strcmp (c->cmd, "quiesce") == 0) {
    a = json_object_new_object ();
    json_object_object_add (a, "timeout-ms", json_object_new_int (QUIESCE_TIMEOUT_MS));
  }
  c->r = call (d->ctl_cbw, c->cmd, a, NULL, 0, &c->err);
  if (c->r < 0)
    cbw_err_prefix (&c->err, "%s disk %s", c->cmd, c->disk);
  return NULL;
}

/* Run cmd on disks[0..n) in parallel (the calling thread when a thread
 * cannot be started); c[i] holds each result. */
static void
disk_calls (struct cbw_orch *o, const char *cmd, char **disks, size_t n,
            struct disk_call *c)
{
  for (size_t i = 0; i < n; i++) {
    c[i] = (struct disk_call) { .o = o, .disk = disks[i], .cmd = cmd };
    c[i].started = n > 1 && pthread_create (&c[i].th, NULL, disk_call_run, &c[i]) == 0;
    if (!c[i].started)
      disk_call_run (&c[i]);
  }
  for (size_t i = 0; i < n; i++)
    if (c[i].started)
      pthread_join (c[i].th, NULL);
}

static void
resume_event (struct cbw_orch *o, const struct disk_call *c)
{
  struct json_object *data = json_object_new_object ();
  json_object_object_add (data, "disk", json_object_new_string (c->disk));
  json_object_object_add (data, "error", json_object_new_string (c->err.msg));
  orch_event (o, "resume-failed", data);
}

int
orch_quiesce (struct cbw_orch *o, char **disks, size_t n, size_t *done,
              struct cbw_err *err)
{
  CLEANUP_FREE struct disk_call *c = calloc (n ? n : 1, sizeof *c);
  size_t i, bad = n;

  *done = 0;
  if (c == NULL)
    return cbw_err_set (err, ENOMEM, "quiesce: out of memory");
  disk_calls (o, "quiesce", disks, n, c);
  for (i = 0; i < n && bad == n; i++)
    if (c[i].r < 0)
      bad = i;
  if (bad == n) {
    *done = n;
    return 0;
  }
  /* Release the disks that were quiesced (not a prefix of the list, so the
   * caller's orch_resume (..., *done = 0) has nothing left to do). */
  for (i = 0; i < n; i++)
    if (c[i].r == 0) {
      struct disk_call r = { .o = o, .disk = disks[i], .cmd = "resume" };
      disk_call_run (&r);
      if (r.r < 0)
        resume_event (o, &r);
    }
  *err = c[bad].err;
  return -1;
}

void
orch_resume (struct cbw_orch *o, char **disks, size_t n)
{
  CLEANUP_FREE struct disk_call *c = calloc (n ? n : 1, sizeof *c);
  size_t i;

  if (c == NULL) {              /* one at a time then */
    for (i = 0; i < n; i++) {
      struct disk_call r = { .o = o, .disk = disks[i], .cmd = "resume" };
      disk_call_run (&r);
      if (r.r < 0)
        resume_event (o, &r);
    }
    return;
  }
  disk_calls (o, "resume", disks, n, c);
  for (i = 0; i < n; i++)
    if (c[i].r < 0)
      resume_event (o, &c[i]);
}

/* ---- rotation ---- */

/* The previous checkpoint of disk before checkpoint index ci, or NULL. */
static const char *
prev_cp (struct cbw_orch *o, size_t ci, const char *disk)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  ssize_t p = orch_plan_delete_into (&o->st, ci, disk);
  return p >= 0 ? o->st.cps[p].name : NULL;
}

static ssize_t
cp_index (struct cbw_orch *o, const char *name)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  for (size_t i = 0; i < o->st.ncps; i++)
    if (strcmp (o->st.cps[i].name, name) == 0)
      return (ssize_t) i;
  return -1;
}

static struct orch_disk *
disk_by_name (struct cbw_orch *o, const char *name)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  return orch_find_disk (&o->st, name);
}

/* Undo the bitmap side of creating checkpoint index ci on one disk. */
static int
undo_rotate_disk (struct cbw_orch *o, size_t ci, const char *disk, struct cbw_err *err)
{
  char bm[ORCH_NAME_MAX + 8], pbm[ORCH_NAME_MAX + 8];
  struct orch_disk *d = disk_by_name (o, disk);
  if (d == NULL)
    return 0;
  orch_cp_bitmap (o->st.cps[ci].name, bm, sizeof bm);
  int ex = orch_bm_exists (d, bm, err);
  if (ex < 0)
    return -1;
  const char *p = prev_cp (o, ci, disk);
  if (p) {
    orch_cp_bitmap (p, pbm, sizeof pbm);
    if (orch_bm_enable (d, pbm, true, err) < 0)
      return -1;
    if (ex && orch_bm_merge (d, bm, pbm, err) < 0)
      return -1;
  }
  if (ex && orch_bm_remove (d, bm, true, err) < 0)
    return -1;
  return 0;
}

int
orch_cp_rotate (struct cbw_orch *o, const char *name, char **disks,
                size_t ndisks, struct cbw_err *err)
{
  char bm[ORCH_NAME_MAX + 8], pbm[ORCH_NAME_MAX + 8];
  ssize_t ci = cp_index (o, name);
  if (ci < 0)
    return cbw_err_set (err, ENOENT, "checkpoint %s is not recorded", name);
  orch_cp_bitmap (name, bm, sizeof bm);
  for (size_t i = 0; i < ndisks; i++) {
    struct orch_disk *d = disk_by_name (o, disks[i]);
    if (d == NULL)
      return cbw_err_set (err, ENOENT, "disk %s vanished", disks[i]);
    if (orch_bm_add (d, bm, true, err) < 0)
      return cbw_err_prefix (err, "add bitmap %s on disk %s", bm, disks[i]);
    orch_crash_point ("rotate:added");
    const char *p = prev_cp (o, (size_t) ci, disks[i]);
    if (p) {
      orch_cp_bitmap (p, pbm, sizeof pbm);
      if (orch_bm_enable (d, pbm, false, err) < 0)
        return cbw_err_prefix (err, "disable bitmap %s on disk %s", pbm, disks[i]);
    }
  }
  return 0;
}

static void
remove_cp_from_state (struct cbw_orch *o, const char *name)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  for (size_t i = 0; i < o->st.ncps; i++)
    if (strcmp (o->st.cps[i].name, name) == 0) {
      orch_cp_clear (&o->st.cps[i]);
      memmove (&o->st.cps[i], &o->st.cps[i + 1],
               (o->st.ncps - i - 1) * sizeof o->st.cps[0]);
      o->st.ncps--;
      return;
    }
}

void
orch_set_pending (struct cbw_orch *o, const char *op, const char *name)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  snprintf (o->st.pending.op, sizeof o->st.pending.op, "%s", op ? op : "");
  snprintf (o->st.pending.name, sizeof o->st.pending.name, "%s", name ? name : "");
}

/* Append checkpoint `name` covering disks to the state (not saved). */
static int
record_cp (struct cbw_orch *o, const char *name, char **disks, size_t n,
           struct cbw_err *err)
{
  char **copy = calloc (n, sizeof *copy);
  if (copy == NULL)
    return cbw_err_set (err, ENOMEM, "out of memory");
  for (size_t i = 0; i < n; i++)
    if ((copy[i] = strdup (disks[i])) == NULL) {
      for (size_t j = 0; j < i; j++) free (copy[j]);
      free (copy);
      return cbw_err_set (err, ENOMEM, "out of memory");
    }
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  struct orch_checkpoint *nc = realloc (o->st.cps, (o->st.ncps + 1) * sizeof *nc);
  if (nc == NULL) {
    for (size_t j = 0; j < n; j++) free (copy[j]);
    free (copy);
    return cbw_err_set (err, ENOMEM, "out of memory");
  }
  o->st.cps = nc;
  struct orch_checkpoint *c = &o->st.cps[o->st.ncps++];
  memset (c, 0, sizeof *c);
  snprintf (c->name, sizeof c->name, "%s", name);
  c->created = (int64_t) time (NULL);
  c->ndisks = n;
  c->disks = copy;
  return 0;
}

int
orch_cp_prepare (struct cbw_orch *o, const char *name, char **disks, size_t n,
                 const char *op, const char *pending_name, struct cbw_err *err)
{
  if (record_cp (o, name, disks, n, err) < 0)
    return -1;
  orch_set_pending (o, op, pending_name);
  if (orch_state_save (o, err) < 0) {
    remove_cp_from_state (o, name);
    orch_set_pending (o, NULL, NULL);
    return cbw_err_prefix (err, "saving state");
  }
  return 0;
}

/* Undo a recorded, maybe partly rotated checkpoint (not saved). */
int
orch_cp_undo (struct cbw_orch *o, const char *name, struct cbw_err *err)
{
  ssize_t ci = cp_index (o, name);
  if (ci < 0)
    return 0;
  struct orch_checkpoint *c = &o->st.cps[ci];
  for (size_t i = 0; i < c->ndisks; i++)
    if (undo_rotate_disk (o, (size_t) ci, c->disks[i], err) < 0)
      return cbw_err_prefix (err, "rollback of checkpoint %s on disk %s",
                             name, c->disks[i]);
  remove_cp_from_state (o, name);
  return 0;
}

/* Validate a disk set: non-empty, known, running (or, with offline, stopped:
 * offline[i] says which), no duplicates. */
int
orch_check_disks_offline (struct cbw_orch *o, char **disks, size_t n, bool *offline,
                          struct cbw_err *err)
{
  if (n == 0)
    return cbw_err_set (err, EINVAL, "no disks");
  for (size_t i = 0; i < n; i++)
    for (size_t j = 0; j < i; j++)
      if (strcmp (disks[i], disks[j]) == 0)
        return cbw_err_set (err, EINVAL, "disk %s given twice", disks[i]);
  for (size_t i = 0; i < n; i++) {
    struct orch_disk *d = disk_by_name (o, disks[i]);
    if (d == NULL)
      return cbw_err_set (err, ENOENT, "no disk named %s", disks[i]);
    if (!orch_disk_running (o, d)) {
      if (offline == NULL)
        return cbw_err_set (err, EIO, "disk %s is not running (its nbdkit is dead "
                            "or stopped; see disk-list)", disks[i]);
      offline[i] = true;
    }
  }
  return 0;
}

int
orch_check_disks (struct cbw_orch *o, char **disks, size_t n, struct cbw_err *err)
{
  return orch_check_disks_offline (o, disks, n, NULL, err);
}

int
orch_checkpoint_create (struct cbw_orch *o, const char *name, char **disks,
                        size_t ndisks, struct cbw_err *err)
{
  size_t q = 0;
  if (!orch_valid_name (name))
    return cbw_err_set (err, EINVAL, "invalid checkpoint name \"%.80s\" "
                        "(want [A-Za-z0-9_.-]{1,%d}, not starting with . or -)",
                        name, ORCH_NAME_MAX);
  if (cp_index (o, name) >= 0)
    return cbw_err_set (err, EEXIST, "checkpoint %s already exists", name);
  if (orch_check_disks (o, disks, ndisks, err) < 0)
    return -1;
  if (orch_cp_prepare (o, name, disks, ndisks, "checkpoint-create", name, err) < 0)
    return -1;
  orch_crash_point ("checkpoint-create:recorded");
  if (orch_quiesce (o, disks, ndisks, &q, err) < 0)
    goto rollback;
  orch_crash_point ("checkpoint-create:quiesced");
  if (orch_cp_rotate (o, name, disks, ndisks, err) < 0)
    goto rollback;
  orch_crash_point ("checkpoint-create:rotated");
  orch_resume (o, disks, ndisks);
  orch_crash_point ("checkpoint-create:resumed");
  orch_set_pending (o, NULL, NULL);
  if (orch_state_save (o, err) < 0)
    return cbw_err_prefix (err, "checkpoint %s created but saving state failed "
                           "(it will be recovered at restart)", name);
  struct json_object *data = json_object_new_object ();
  json_object_object_add (data, "checkpoint", json_object_new_string (name));
  orch_event (o, "checkpoint-created", data);
  return 0;

 rollback:;
  struct cbw_err e2 = { 0 };
  orch_resume (o, disks, q);
  if (orch_cp_undo (o, name, &e2) < 0) {
    char msg[CBW_ERR_MSG_MAX];
    memcpy (msg, err->msg, sizeof msg);
    return cbw_err_set (err, err->errnum, "%s; rollback failed too (will be retried): %s",
                        msg, e2.msg);
  }
  orch_set_pending (o, NULL, NULL);
  orch_state_save (o, &e2);
  return -1;
}

/* The bitmap side of deleting checkpoint index ci on one disk (idempotent). */
static int
delete_step_disk (struct cbw_orch *o, size_t ci, const char *disk, struct cbw_err *err)
{
  char bm[ORCH_NAME_MAX + 8], pbm[ORCH_NAME_MAX + 8];
  struct orch_disk *d = disk_by_name (o, disk);
  if (d == NULL)
    return 0;
  if (!orch_disk_running (o, d))
    return cbw_err_set (err, EIO, "disk %s is not running", disk);
  orch_cp_bitmap (o->st.cps[ci].name, bm, sizeof bm);
  int ex = orch_bm_exists (d, bm, err);
  if (ex < 0)
    return cbw_err_prefix (err, "disk %s", disk);
  if (!ex)
    return 0;
  bool latest;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    latest = orch_latest_cp (&o->st, disk) == (ssize_t) ci;
  }
  const char *p = prev_cp (o, ci, disk);
  if (p) {
    orch_cp_bitmap (p, pbm, sizeof pbm);
    if (latest && orch_bm_enable (d, pbm, true, err) < 0)
      return cbw_err_prefix (err, "enable %s on disk %s", pbm, disk);
    if (orch_bm_merge (d, bm, pbm, err) < 0)
      return cbw_err_prefix (err, "merge %s into %s on disk %s", bm, pbm, disk);
    orch_crash_point ("checkpoint-delete:merged");
  }
  if (orch_bm_remove (d, bm, true, err) < 0)
    return cbw_err_prefix (err, "remove %s on disk %s", bm, disk);
  return 0;
}

static int
delete_steps (struct cbw_orch *o, const char *name, struct cbw_err *err)
{
  ssize_t ci = cp_index (o, name);
  if (ci < 0)
    return 0;
  struct orch_checkpoint *c = &o->st.cps[ci];
  for (size_t i = 0; i < c->ndisks; i++)
    if (delete_step_disk (o, (size_t) ci, c->disks[i], err) < 0)
      return -1;
  remove_cp_from_state (o, name);
  return 0;
}

int
orch_cp_abandon (struct cbw_orch *o, const char *name, bool deleting, const char *why,
                 struct json_object *failed)
{
  ssize_t ci = cp_index (o, name);
  if (ci < 0)
    return 0;
  struct orch_checkpoint *c = &o->st.cps[ci];
  size_t n = c->ndisks;
  char **bad = calloc (n + 1, sizeof *bad);
  size_t nbad = 0;
  if (bad == NULL)
    return -1;
  /* Per disk, best effort: the disks where the step works are consistent
   * again; the others are the ones whose checkpoints become unusable. */
  for (size_t i = 0; i < n; i++) {
    struct cbw_err e = { 0 };
    int r = deleting ? delete_step_disk (o, (size_t) ci, c->disks[i], &e)
      : undo_rotate_disk (o, (size_t) ci, c->disks[i], &e);
    struct orch_disk *d = disk_by_name (o, c->disks[i]);
    if (r == 0 && d && !deleting && !orch_disk_running (o, d))
      r = -1;                   /* undo_rotate_disk asks the filter: not reached */
    if (r < 0)
      bad[nbad++] = strdup (c->disks[i]);
  }
  remove_cp_from_state (o, name);
  int ret = 0;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    for (size_t i = 0; i < nbad; i++) {
      if (bad[i] == NULL || orch_cp_mark_unusable (&o->st, bad[i], why) < 0)
        ret = -1;
      if (bad[i])
        json_object_array_add (failed, json_object_new_string (bad[i]));
    }
  }
  for (size_t i = 0; i < nbad; i++)
    free (bad[i]);
  free (bad);
  return ret;
}

int
orch_checkpoint_delete (struct cbw_orch *o, const char *name, struct cbw_err *err)
{
  if (cp_index (o, name) < 0)
    return cbw_err_set (err, ENOENT, "no checkpoint named %s", name);
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    if (o->st.backup && (strcmp (o->st.backup->checkpoint, name) == 0))
      return cbw_err_set (err, EBUSY, "checkpoint %s belongs to the running "
                          "backup %s", name, o->st.backup->id);
  }
  orch_set_pending (o, "checkpoint-delete", name);
  if (orch_state_save (o, err) < 0) {
    orch_set_pending (o, NULL, NULL);
    return -1;
  }
  if (delete_steps (o, name, err) < 0) {
    /* Steps are idempotent: keep pending so a retry or restart finishes. */
    return cbw_err_prefix (err, "deleting checkpoint %s (partly done; it will be "
                           "finished on the next checkpoint command or restart)",
                           name);
  }
  orch_set_pending (o, NULL, NULL);
  if (orch_state_save (o, err) < 0)
    return -1;
  struct json_object *data = json_object_new_object ();
  json_object_object_add (data, "checkpoint", json_object_new_string (name));
  orch_event (o, "checkpoint-deleted", data);
  return 0;
}

/* Roll forward: cp-N exists everywhere, make sure the previous bitmaps are
 * disabled (idempotent). */
int
orch_cp_rotate_finish (struct cbw_orch *o, const char *name, struct cbw_err *err)
{
  char pbm[ORCH_NAME_MAX + 8];
  ssize_t ci = cp_index (o, name);
  if (ci < 0)
    return 0;
  struct orch_checkpoint *c = &o->st.cps[ci];
  for (size_t i = 0; i < c->ndisks; i++) {
    struct orch_disk *d = disk_by_name (o, c->disks[i]);
    const char *p = prev_cp (o, (size_t) ci, c->disks[i]);
    if (d && p) {
      orch_cp_bitmap (p, pbm, sizeof pbm);
      if (orch_bm_enable (d, pbm, false, err) < 0)
        return cbw_err_prefix (err, "disable %s on disk %s", pbm, c->disks[i]);
    }
  }
  return 0;
}

int
orch_cp_reconcile (struct cbw_orch *o, const char *op, const char *name,
                   struct cbw_err *err)
{
  if (strcmp (op, "checkpoint-delete") == 0) {
    if (delete_steps (o, name, err) < 0)
      return -1;
  }
  else {
    ssize_t ci = cp_index (o, name);
    if (ci >= 0) {
      char bm[ORCH_NAME_MAX + 8];
      bool all = true;
      orch_cp_bitmap (name, bm, sizeof bm);
      struct orch_checkpoint *c = &o->st.cps[ci];
      for (size_t i = 0; i < c->ndisks; i++) {
        struct orch_disk *d = disk_by_name (o, c->disks[i]);
        if (d == NULL || !orch_disk_running (o, d))
          return cbw_err_set (err, EIO, "cannot recover checkpoint %s: disk %s "
                              "is not running", name, c->disks[i]);
        int ex = orch_bm_exists (d, bm, err);
        if (ex < 0)
          return -1;
        all = all && ex;
      }
      if (all) {                /* roll forward: finish the rotation */
        if (orch_cp_rotate_finish (o, name, err) < 0)
          return -1;
      }
      else if (orch_cp_undo (o, name, err) < 0)
        return -1;
    }
  }
  orch_set_pending (o, NULL, NULL);
  return orch_state_save (o, err);
}
