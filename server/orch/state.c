/* cbw — server/orch/state.c: the orchestrator's one persistent state file.
 *
 * STATE_DIR/cbwd-state.json holds everything cbwd must remember (disks,
 * checkpoints, the active backup, the pending operation) so that metadata
 * cannot drift apart: one file, replaced crash-atomically with
 * cbw_write_file_atomic() (temp, fsync, rename, fsync dir).  Layout:
 *   {"format": "cbwd-state", "version": 1,
 *    "body": {"generation": N, "disks": [...], "checkpoints": [...],
 *             "backup": {...} | null, "pending": {...} | null},
 *    "checksum": "xxh64:<16 hex>"}
 * The checksum is XXH64 (seed 0) of the body serialised by json-c in PLAIN
 * mode; a file whose checksum, format, version, types, names or references
 * do not check out is refused with an error naming the file and the problem
 * (nothing is "repaired" silently).  Spec: docs/design/orchestration.md.
 *
 * Locking: orch_state_to_json/from_json are pure; orch_state_save() takes
 * o->lock only to serialise the in-memory state, and writes the file
 * unlocked (callers are the single busy owner, so saves do not race).
 */
#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <xxhash.h>

#include "cleanup.h"
#include "disk_id.h"
#include "fileutil.h"
#include "orch_internal.h"

bool
orch_valid_name (const char *s)
{
  size_t n = 0;
  if (s == NULL || *s == '\0' || *s == '.' || *s == '-')
    return false;
  for (; s[n]; n++) {
    char c = s[n];
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
          (c >= '0' && c <= '9') || c == '_' || c == '.' || c == '-'))
      return false;
  }
  return n <= ORCH_NAME_MAX;
}

static int
rm_one (const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
  (void) sb; (void) flag; (void) ftw;
  remove (path);
  return 0;
}

void
orch_rm_rf (const char *dir)
{
  nftw (dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

char *
orch_strdup_printf (const char *fmt, ...)
{
  va_list ap;
  char *s = NULL;
  va_start (ap, fmt);
  if (vasprintf (&s, fmt, ap) < 0)
    s = NULL;
  va_end (ap);
  return s;
}

struct orch_disk *
orch_disk_new (const char *state_dir, const char *name, const char *file,
               uint64_t gran)
{
  struct orch_disk *d = calloc (1, sizeof *d);
  if (d == NULL)
    return NULL;
  snprintf (d->name, sizeof d->name, "%s", name);
  d->granularity = gran;
  orch_disk_set_cbw_timeout (d, 0);
  d->pidfd = -1;
  d->exit_status = -1;
  d->file = strdup (file);
  d->dir = orch_strdup_printf ("%s/disks/%s", state_dir, name);
  d->nbd_sock = orch_strdup_printf ("%s/disks/%s/nbd.sock", state_dir, name);
  d->ctl_chain = orch_strdup_printf ("%s/disks/%s/chain.ctl", state_dir, name);
  d->ctl_cbw = orch_strdup_printf ("%s/disks/%s/cbw.ctl", state_dir, name);
  d->ctl_bitmap = orch_strdup_printf ("%s/disks/%s/dirtybitmap.ctl", state_dir, name);
  d->log_path = orch_strdup_printf ("%s/disks/%s/nbdkit.log", state_dir, name);
  d->bitmaps = orch_strdup_printf ("%s/disks/%s/bitmaps.json", state_dir, name);
  /* a new disk's identity; a loaded disk's is overwritten with its own */
  if (cbw_disk_id_new (d->id) < 0 || !d->bitmaps || !d->file || !d->dir || !d->nbd_sock || !d->ctl_chain || !d->ctl_cbw ||
      !d->ctl_bitmap || !d->log_path) {
    orch_disk_free (d);
    errno = ENOMEM;
    return NULL;
  }
  return d;
}

void
orch_disk_set_cbw_timeout (struct orch_disk *d, uint32_t ms)
{
  d->cbw_timeout_ms = ms;
  ms = orch_disk_cbw_timeout (d);
  snprintf (d->cbw_timeout_arg, sizeof d->cbw_timeout_arg, "cbw-timeout=%u.%03u",
            ms / 1000, ms % 1000);
}

uint32_t
orch_disk_cbw_timeout (const struct orch_disk *d)
{
  return d->cbw_timeout_ms ? d->cbw_timeout_ms : ORCH_CBW_TIMEOUT_MS;
}

void
orch_disk_free (struct orch_disk *d)
{
  if (d == NULL)
    return;
  free (d->file); free (d->dir); free (d->nbd_sock); free (d->ctl_chain);
  free (d->ctl_cbw); free (d->ctl_bitmap); free (d->log_path); free (d->bitmaps);
  free (d->chain);
  orch_disk_tcp_free (d->tcp);
  free (d);
}

void
orch_cp_clear (struct orch_checkpoint *c)
{
  for (size_t i = 0; i < c->ndisks; i++)
    free (c->disks[i]);
  free (c->disks);
  c->disks = NULL;
  c->ndisks = 0;
  for (size_t i = 0; i < c->nunusable; i++)
    free (c->unusable[i].reason);
  free (c->unusable);
  c->unusable = NULL;
  c->nunusable = 0;
}

const struct orch_unusable *
orch_cp_unusable (const struct orch_checkpoint *c, const char *disk)
{
  for (size_t i = 0; i < c->nunusable; i++)
    if (strcmp (c->unusable[i].disk, disk) == 0)
      return &c->unusable[i];
  return NULL;
}

static int
cp_add_unusable (struct orch_checkpoint *c, const char *disk, int64_t since,
                 const char *reason)
{
  struct orch_unusable *u = realloc (c->unusable, (c->nunusable + 1) * sizeof *u);
  char *r = strdup (reason);
  if (u == NULL || r == NULL) {
    if (u) c->unusable = u;
    free (r);
    return -1;
  }
  c->unusable = u;
  u = &c->unusable[c->nunusable++];
  snprintf (u->disk, sizeof u->disk, "%s", disk);
  u->since = since;
  u->reason = r;
  return 0;
}

int
orch_cp_mark_unusable (struct orch_state *st, const char *disk, const char *reason)
{
  int n = 0;
  for (size_t i = 0; i < st->ncps; i++) {
    struct orch_checkpoint *c = &st->cps[i];
    bool covers = false;
    for (size_t j = 0; j < c->ndisks; j++)
      covers = covers || strcmp (c->disks[j], disk) == 0;
    if (!covers || orch_cp_unusable (c, disk))
      continue;
    if (cp_add_unusable (c, disk, (int64_t) time (NULL), reason) < 0)
      return -1;
    n++;
  }
  return n;
}

void
orch_cp_drop_unusable (struct orch_checkpoint *c, const char *disk)
{
  for (size_t i = 0; i < c->nunusable; i++)
    if (strcmp (c->unusable[i].disk, disk) == 0) {
      free (c->unusable[i].reason);
      memmove (&c->unusable[i], &c->unusable[i + 1],
               (c->nunusable - i - 1) * sizeof *c->unusable);
      c->nunusable--;
      return;
    }
}

void
orch_backup_free (struct orch_backup *b)
{
  if (b == NULL)
    return;
  for (size_t i = 0; i < b->ndisks; i++) {
    struct orch_backup_disk *bd = &b->disks[i];
    free (bd->pit_uri); free (bd->bitmap); free (bd->store_path);
    free (bd->store_sock); free (bd->export_name);
    if (bd->locked)
      close (bd->lock_fd);
  }
  free (b->disks);
  free (b);
}

void
orch_state_free (struct orch_state *st)
{
  for (size_t i = 0; i < st->ndisks; i++)
    orch_disk_free (st->disks[i]);
  free (st->disks);
  for (size_t i = 0; i < st->ncps; i++)
    orch_cp_clear (&st->cps[i]);
  free (st->cps);
  orch_backup_free (st->backup);
  memset (st, 0, sizeof *st);
}

struct orch_disk *
orch_find_disk (const struct orch_state *st, const char *name)
{
  for (size_t i = 0; i < st->ndisks; i++)
    if (strcmp (st->disks[i]->name, name) == 0)
      return st->disks[i];
  return NULL;
}

struct orch_checkpoint *
orch_find_cp (const struct orch_state *st, const char *name)
{
  for (size_t i = 0; i < st->ncps; i++)
    if (strcmp (st->cps[i].name, name) == 0)
      return &st->cps[i];
  return NULL;
}

/* ---- serialisation ---- */

/* The one place backup modes and readable sets have names. */
static const char *const backup_mode_names[] = {
  [ORCH_BACKUP_FULL] = "full", [ORCH_BACKUP_INCREMENTAL] = "incremental",
  [ORCH_BACKUP_TOP] = "top", [ORCH_BACKUP_NONE] = "none",
};
static const char *const readable_names[] = {
  [ORCH_READABLE_ALL] = "all", [ORCH_READABLE_CHANGED] = "changed",
};

static int
name_parse (const char *const *names, size_t n, const char *name, int *out)
{
  for (size_t i = 0; name && i < n; i++)
    if (strcmp (names[i], name) == 0) {
      *out = (int) i;
      return 0;
    }
  return -1;
}

int
orch_backup_mode_parse (const char *name, enum orch_backup_mode *out)
{
  int v;
  if (name_parse (backup_mode_names, sizeof backup_mode_names / sizeof *backup_mode_names,
                  name, &v) < 0)
    return -1;
  *out = (enum orch_backup_mode) v;
  return 0;
}

const char *
orch_backup_mode_name (enum orch_backup_mode m)
{
  return (size_t) m < sizeof backup_mode_names / sizeof *backup_mode_names
    ? backup_mode_names[m] : "?";
}

int
orch_readable_parse (const char *name, enum orch_readable *out)
{
  int v;
  if (name_parse (readable_names, sizeof readable_names / sizeof *readable_names,
                  name, &v) < 0)
    return -1;
  *out = (enum orch_readable) v;
  return 0;
}

const char *
orch_readable_name (enum orch_readable r)
{
  return (size_t) r < sizeof readable_names / sizeof *readable_names ? readable_names[r] : "?";
}

static void
add_str (struct json_object *o, const char *k, const char *v)
{
  json_object_object_add (o, k, v ? json_object_new_string (v) : NULL);
}

struct json_object *
orch_backup_to_json (const struct orch_backup *b)
{
  struct json_object *o = json_object_new_object ();
  add_str (o, "id", b->id);
  add_str (o, "mode", orch_backup_mode_name (b->mode));
  add_str (o, "readable", orch_readable_name (b->readable));
  add_str (o, "since", b->since);
  add_str (o, "checkpoint", b->checkpoint);
  json_object_object_add (o, "started", json_object_new_int64 (b->started));
  if (b->cbw_timeout_ms)
    json_object_object_add (o, "cbw-timeout-ms", json_object_new_int64 (b->cbw_timeout_ms));
  struct json_object *a = json_object_new_array ();
  for (size_t i = 0; i < b->ndisks; i++) {
    const struct orch_backup_disk *bd = &b->disks[i];
    struct json_object *d = json_object_new_object ();
    add_str (d, "name", bd->name);
    add_str (d, "pit-uri", bd->pit_uri);
    add_str (d, "bitmap", bd->bitmap);
    add_str (d, "store-path", bd->store_path);
    add_str (d, "store-socket", bd->store_sock);
    json_object_object_add (d, "store-pid", json_object_new_int64 (bd->store_pid));
    add_str (d, "export", bd->export_name);
    json_object_object_add (d, "store-limit", json_object_new_int64 ((int64_t) bd->store_limit));
    if (bd->offline)
      json_object_object_add (d, "offline", json_object_new_boolean (true));
    json_object_array_add (a, d);
  }
  json_object_object_add (o, "disks", a);
  return o;
}

struct json_object *
orch_state_to_json (const struct orch_state *st)
{
  struct json_object *body = json_object_new_object ();
  json_object_object_add (body, "generation",
                          json_object_new_int64 ((int64_t) st->generation));
  struct json_object *disks = json_object_new_array ();
  for (size_t i = 0; i < st->ndisks; i++) {
    const struct orch_disk *d = st->disks[i];
    struct json_object *o = json_object_new_object ();
    add_str (o, "name", d->name);
    add_str (o, "file", d->file);
    json_object_object_add (o, "granularity",
                            json_object_new_int64 ((int64_t) d->granularity));
    json_object_object_add (o, "pid",
                            json_object_new_int64 (d->pid > 0 ? d->pid : 0));
    if (d->chain)                 /* absent = raw disk (files of older cbwd) */
      add_str (o, "chain", d->chain);
    add_str (o, "id", d->id);
    if (d->force_share)           /* absent = false */
      json_object_object_add (o, "force-share", json_object_new_boolean (true));
    if (d->cbw_timeout_ms)        /* absent = the default */
      json_object_object_add (o, "cbw-timeout-ms", json_object_new_int64 (d->cbw_timeout_ms));
    if (d->tcp)                   /* absent = Unix socket only */
      json_object_object_add (o, "tcp", orch_disk_tcp_json (d->tcp, true));
    json_object_array_add (disks, o);
  }
  json_object_object_add (body, "disks", disks);
  struct json_object *cps = json_object_new_array ();
  for (size_t i = 0; i < st->ncps; i++) {
    const struct orch_checkpoint *c = &st->cps[i];
    struct json_object *o = json_object_new_object ();
    add_str (o, "name", c->name);
    json_object_object_add (o, "created", json_object_new_int64 (c->created));
    struct json_object *a = json_object_new_array ();
    for (size_t j = 0; j < c->ndisks; j++)
      json_object_array_add (a, json_object_new_string (c->disks[j]));
    json_object_object_add (o, "disks", a);
    if (c->nunusable) {         /* absent = usable everywhere (older files) */
      struct json_object *u = json_object_new_array ();
      for (size_t j = 0; j < c->nunusable; j++) {
        struct json_object *e = json_object_new_object ();
        add_str (e, "disk", c->unusable[j].disk);
        json_object_object_add (e, "since", json_object_new_int64 (c->unusable[j].since));
        add_str (e, "reason", c->unusable[j].reason);
        json_object_array_add (u, e);
      }
      json_object_object_add (o, "unusable", u);
    }
    json_object_array_add (cps, o);
  }
  json_object_object_add (body, "checkpoints", cps);
  json_object_object_add (body, "backup",
                          st->backup ? orch_backup_to_json (st->backup) : NULL);
  if (st->pending.op[0]) {
    struct json_object *p = json_object_new_object ();
    add_str (p, "op", st->pending.op);
    add_str (p, "name", st->pending.name);
    json_object_object_add (body, "pending", p);
  }
  else
    json_object_object_add (body, "pending", NULL);

  char sum[32];
  const char *text = json_object_to_json_string_ext (body, JSON_C_TO_STRING_PLAIN);
  snprintf (sum, sizeof sum, "xxh64:%016" PRIx64,
            (uint64_t) XXH64 (text, strlen (text), 0));
  struct json_object *top = json_object_new_object ();
  add_str (top, "format", ORCH_STATE_FORMAT);
  json_object_object_add (top, "version", json_object_new_int (ORCH_STATE_VERSION));
  json_object_object_add (top, "body", body);
  add_str (top, "checksum", sum);
  return top;
}

/* Strict getters: every failure names the file and the field. */
static struct json_object *
get (struct json_object *o, const char *k, enum json_type t, bool nullable,
     const char *what, const char *where, struct cbw_err *err)
{
  struct json_object *v;
  if (!json_object_object_get_ex (o, k, &v)) {
    cbw_err_set (err, EINVAL, "%s: %s: missing key \"%s\"", what, where, k);
    return NULL;
  }
  if (v == NULL && nullable)
    return NULL;
  if (!json_object_is_type (v, t)) {
    cbw_err_set (err, EINVAL, "%s: %s: \"%s\" has the wrong type (expected %s)",
                 what, where, k, json_type_to_name (t));
    return NULL;
  }
  return v;
}

#define GET(o, k, t, where)                                             \
  ({ struct json_object *_v = get (o, k, t, false, what, where, err);   \
     if (_v == NULL) { goto fail; } _v; })

static int
get_name (struct json_object *o, const char *k, char *dst, bool allow_empty,
          const char *what, const char *where, struct cbw_err *err)
{
  struct json_object *v = get (o, k, json_type_string, false, what, where, err);
  if (v == NULL)
    return -1;
  const char *s = json_object_get_string (v);
  if (!(allow_empty && *s == '\0') && !orch_valid_name (s))
    return cbw_err_set (err, EINVAL, "%s: %s: \"%s\" is not a valid name: \"%.80s\"",
                        what, where, k, s);
  snprintf (dst, ORCH_NAME_MAX + 1, "%s", s);
  return 0;
}

static char *
get_optstr (struct json_object *o, const char *k, const char *what,
            const char *where, struct cbw_err *err, bool *bad)
{
  struct json_object *v;
  *bad = false;
  if (!json_object_object_get_ex (o, k, &v) || v == NULL)
    return NULL;
  if (!json_object_is_type (v, json_type_string)) {
    cbw_err_set (err, EINVAL, "%s: %s: \"%s\" must be a string or null", what, where, k);
    *bad = true;
    return NULL;
  }
  char *s = strdup (json_object_get_string (v));
  if (s == NULL) { *bad = true; cbw_err_set (err, ENOMEM, "%s: out of memory", what); }
  return s;
}

int
orch_state_from_json (const char *text, size_t len, const char *what,
                      struct orch_state *st, struct cbw_err *err)
{
  struct json_tokener *tok = json_tokener_new ();
  struct json_object *top = NULL;
  memset (st, 0, sizeof *st);
  if (err)
    err->errnum = 0;
  if (tok == NULL)
    return cbw_err_set (err, ENOMEM, "%s: out of memory", what);
  if (len > ORCH_STATE_MAX) {
    json_tokener_free (tok);
    return cbw_err_set (err, EFBIG, "%s: larger than %d bytes", what, ORCH_STATE_MAX);
  }
  top = json_tokener_parse_ex (tok, text, (int) len);
  enum json_tokener_error jerr = json_tokener_get_error (tok);
  size_t used = json_tokener_get_parse_end (tok);
  json_tokener_free (tok);
  if (top == NULL || jerr != json_tokener_success) {
    cbw_err_set (err, EINVAL, "%s: not valid JSON: %s", what,
                 json_tokener_error_desc (jerr));
    goto fail;
  }
  for (size_t i = used; i < len; i++)
    if (text[i] != ' ' && text[i] != '\n' && text[i] != '\t' && text[i] != '\r') {
      cbw_err_set (err, EINVAL, "%s: trailing garbage after the JSON object", what);
      goto fail;
    }
  if (!json_object_is_type (top, json_type_object)) {
    cbw_err_set (err, EINVAL, "%s: not a JSON object", what);
    goto fail;
  }
  const char *fmt = json_object_get_string (GET (top, "format", json_type_string, "top"));
  if (strcmp (fmt, ORCH_STATE_FORMAT) != 0) {
    cbw_err_set (err, EINVAL, "%s: format is \"%.40s\", expected \"%s\"", what, fmt,
                 ORCH_STATE_FORMAT);
    goto fail;
  }
  int64_t ver = json_object_get_int64 (GET (top, "version", json_type_int, "top"));
  if (ver != ORCH_STATE_VERSION) {
    cbw_err_set (err, EINVAL, "%s: unsupported version %" PRId64 " (this cbwd reads %d)",
                 what, ver, ORCH_STATE_VERSION);
    goto fail;
  }
  struct json_object *body = GET (top, "body", json_type_object, "top");
  const char *sum = json_object_get_string (GET (top, "checksum", json_type_string, "top"));
  const char *btext = json_object_to_json_string_ext (body, JSON_C_TO_STRING_PLAIN);
  char want[32];
  snprintf (want, sizeof want, "xxh64:%016" PRIx64,
            (uint64_t) XXH64 (btext, strlen (btext), 0));
  if (strcmp (want, sum) != 0) {
    cbw_err_set (err, EINVAL, "%s: bad checksum (expected %s, file says %.40s)",
                 what, want, sum);
    goto fail;
  }
  int64_t gen = json_object_get_int64 (GET (body, "generation", json_type_int, "body"));
  if (gen < 0) {
    cbw_err_set (err, EINVAL, "%s: negative generation", what);
    goto fail;
  }
  st->generation = (uint64_t) gen;

  /* disks */
  struct json_object *disks = GET (body, "disks", json_type_array, "body");
  size_t n = json_object_array_length (disks);
  st->disks = calloc (n ? n : 1, sizeof *st->disks);
  if (st->disks == NULL) { cbw_err_set (err, ENOMEM, "%s: out of memory", what); goto fail; }
  for (size_t i = 0; i < n; i++) {
    char where[64], name[ORCH_NAME_MAX + 1];
    struct json_object *d = json_object_array_get_idx (disks, i);
    snprintf (where, sizeof where, "disks[%zu]", i);
    if (!json_object_is_type (d, json_type_object)) {
      cbw_err_set (err, EINVAL, "%s: %s is not an object", what, where);
      goto fail;
    }
    if (get_name (d, "name", name, false, what, where, err) < 0) goto fail;
    if (orch_find_disk (st, name)) {
      cbw_err_set (err, EINVAL, "%s: duplicate disk \"%s\"", what, name);
      goto fail;
    }
    const char *file = json_object_get_string (GET (d, "file", json_type_string, where));
    if (file[0] != '/') {
      cbw_err_set (err, EINVAL, "%s: %s: file \"%.80s\" is not an absolute path",
                   what, where, file);
      goto fail;
    }
    int64_t g = json_object_get_int64 (GET (d, "granularity", json_type_int, where));
    if (g < 512 || g > (int64_t) 1 << 31 || (g & (g - 1)) != 0) {
      cbw_err_set (err, EINVAL, "%s: %s: bad granularity %" PRId64, what, where, g);
      goto fail;
    }
    int64_t pid = json_object_get_int64 (GET (d, "pid", json_type_int, where));
    if (pid < 0 || pid > INT32_MAX) {
      cbw_err_set (err, EINVAL, "%s: %s: bad pid %" PRId64, what, where, pid);
      goto fail;
    }
    bool bad;
    char *chain = get_optstr (d, "chain", what, where, err, &bad);
    if (bad) goto fail;
    if (chain && chain[0] != '/') {
      cbw_err_set (err, EINVAL, "%s: %s: chain \"%.80s\" is not an absolute path",
                   what, where, chain);
      free (chain);
      goto fail;
    }
    /* state_dir is not known here: paths are filled by the caller. */
    struct orch_disk *od = orch_disk_new ("", name, file, (uint64_t) g);
    if (od == NULL) {
      free (chain);
      cbw_err_set (err, ENOMEM, "%s: out of memory", what);
      goto fail;
    }
    od->pid = pid;
    od->chain = chain;
    /* absent in files of older cbwd: orch_disk_new made one (saved at load) */
    char *id = get_optstr (d, "id", what, where, err, &bad);
    if (bad) goto fail_od;
    if (id && !cbw_disk_id_valid (id)) {
      cbw_err_set (err, EINVAL, "%s: %s: id \"%.80s\" is not a UUID", what, where, id);
      free (id);
      goto fail_od;
    }
    if (id)
      snprintf (od->id, sizeof od->id, "%s", id);
    od->id_new = id == NULL;
    free (id);
    struct json_object *fs;
    od->force_share = json_object_object_get_ex (d, "force-share", &fs) &&
      json_object_get_boolean (fs);
    struct json_object *tmo;
    if (json_object_object_get_ex (d, "cbw-timeout-ms", &tmo)) {
      int64_t ms = json_object_get_int64 (tmo);
      if (!json_object_is_type (tmo, json_type_int) || ms < 1 || ms > ORCH_CBW_TIMEOUT_MS_MAX) {
        cbw_err_set (err, EINVAL, "%s: %s: cbw-timeout-ms must be 1..%d", what, where,
                     ORCH_CBW_TIMEOUT_MS_MAX);
        goto fail_od;
      }
      orch_disk_set_cbw_timeout (od, (uint32_t) ms);
    }
    struct json_object *tcp;
    if (json_object_object_get_ex (d, "tcp", &tcp)) {
      int pr = !json_object_is_type (tcp, json_type_object) ? 1
        : orch_disk_tcp_parse (tcp, true, &od->tcp, err) < 0 ? -1
        : od->tcp == NULL ? 1 : 0;
      if (pr != 0) {
        if (pr > 0)
          cbw_err_set (err, EINVAL, "tcp: not a listener object");
        cbw_err_prefix (err, "%s: %s", what, where);
        goto fail_od;
      }
    }
    st->disks[st->ndisks++] = od;
    continue;
  fail_od:
    orch_disk_free (od);
    goto fail;
  }

  /* checkpoints */
  struct json_object *cps = GET (body, "checkpoints", json_type_array, "body");
  n = json_object_array_length (cps);
  st->cps = calloc (n ? n : 1, sizeof *st->cps);
  if (st->cps == NULL) { cbw_err_set (err, ENOMEM, "%s: out of memory", what); goto fail; }
  for (size_t i = 0; i < n; i++) {
    char where[64], name[ORCH_NAME_MAX + 1];
    struct json_object *c = json_object_array_get_idx (cps, i);
    snprintf (where, sizeof where, "checkpoints[%zu]", i);
    if (!json_object_is_type (c, json_type_object)) {
      cbw_err_set (err, EINVAL, "%s: %s is not an object", what, where);
      goto fail;
    }
    if (get_name (c, "name", name, false, what, where, err) < 0) goto fail;
    if (orch_find_cp (st, name)) {
      cbw_err_set (err, EINVAL, "%s: duplicate checkpoint \"%s\"", what, name);
      goto fail;
    }
    struct orch_checkpoint *oc = &st->cps[st->ncps++];
    snprintf (oc->name, sizeof oc->name, "%s", name);
    oc->created = json_object_get_int64 (GET (c, "created", json_type_int, where));
    struct json_object *cd = GET (c, "disks", json_type_array, where);
    size_t m = json_object_array_length (cd);
    if (m == 0) {
      cbw_err_set (err, EINVAL, "%s: %s: covers no disk", what, where);
      goto fail;
    }
    oc->disks = calloc (m, sizeof *oc->disks);
    if (oc->disks == NULL) { cbw_err_set (err, ENOMEM, "%s: out of memory", what); goto fail; }
    for (size_t j = 0; j < m; j++) {
      struct json_object *e = json_object_array_get_idx (cd, j);
      if (!json_object_is_type (e, json_type_string) ||
          !orch_find_disk (st, json_object_get_string (e))) {
        cbw_err_set (err, EINVAL, "%s: %s: disks[%zu] is not a known disk", what, where, j);
        goto fail;
      }
      oc->disks[oc->ndisks++] = strdup (json_object_get_string (e));
    }
    struct json_object *ua;
    if (json_object_object_get_ex (c, "unusable", &ua)) {
      if (!json_object_is_type (ua, json_type_array)) {
        cbw_err_set (err, EINVAL, "%s: %s: \"unusable\" must be an array", what, where);
        goto fail;
      }
      for (size_t j = 0; j < json_object_array_length (ua); j++) {
        char uw[96], udisk[ORCH_NAME_MAX + 1];
        struct json_object *e = json_object_array_get_idx (ua, j);
        snprintf (uw, sizeof uw, "%s.unusable[%zu]", where, j);
        if (!json_object_is_type (e, json_type_object)) {
          cbw_err_set (err, EINVAL, "%s: %s is not an object", what, uw);
          goto fail;
        }
        if (get_name (e, "disk", udisk, false, what, uw, err) < 0) goto fail;
        if (!orch_cp_has_disk (oc, udisk) || orch_cp_unusable (oc, udisk)) {
          cbw_err_set (err, EINVAL, "%s: %s: disk \"%s\" is not covered by the checkpoint "
                       "or listed twice", what, uw, udisk);
          goto fail;
        }
        int64_t since = json_object_get_int64 (GET (e, "since", json_type_int, uw));
        const char *reason = json_object_get_string (GET (e, "reason", json_type_string, uw));
        if (cp_add_unusable (oc, udisk, since, reason) < 0) {
          cbw_err_set (err, ENOMEM, "%s: out of memory", what);
          goto fail;
        }
      }
    }
  }

  /* backup */
  struct json_object *b = get (body, "backup", json_type_object, true, what, "body", err);
  if (b == NULL && err && err->errnum) goto fail;
  if (b) {
    st->backup = calloc (1, sizeof *st->backup);
    if (st->backup == NULL) { cbw_err_set (err, ENOMEM, "%s: out of memory", what); goto fail; }
    struct orch_backup *ob = st->backup;
    if (get_name (b, "id", ob->id, false, what, "backup", err) < 0) goto fail;
    const char *mode = json_object_get_string (GET (b, "mode", json_type_string, "backup"));
    if (orch_backup_mode_parse (mode, &ob->mode) < 0) {
      cbw_err_set (err, EINVAL, "%s: backup: bad mode \"%.20s\"", what, mode);
      goto fail;
    }
    /* A record without "readable" was written before the choice existed:
     * its incremental/top sessions protect only the changed blocks. */
    struct json_object *rd;
    ob->readable = ob->mode == ORCH_BACKUP_INCREMENTAL || ob->mode == ORCH_BACKUP_TOP
      ? ORCH_READABLE_CHANGED : ORCH_READABLE_ALL;
    if (json_object_object_get_ex (b, "readable", &rd) &&
        (!json_object_is_type (rd, json_type_string) ||
         orch_readable_parse (json_object_get_string (rd), &ob->readable) < 0)) {
      cbw_err_set (err, EINVAL, "%s: backup: bad readable \"%.20s\" (all or changed)", what,
                   json_object_get_string (rd));
      goto fail;
    }
    if (get_name (b, "since", ob->since, true, what, "backup", err) < 0) goto fail;
    if (get_name (b, "checkpoint", ob->checkpoint, true, what, "backup", err) < 0) goto fail;
    ob->started = json_object_get_int64 (GET (b, "started", json_type_int, "backup"));
    struct json_object *btmo;
    if (json_object_object_get_ex (b, "cbw-timeout-ms", &btmo)) {
      int64_t ms = json_object_get_int64 (btmo);
      if (!json_object_is_type (btmo, json_type_int) || ms < 1 || ms > ORCH_CBW_TIMEOUT_MS_MAX) {
        cbw_err_set (err, EINVAL, "%s: backup: cbw-timeout-ms must be 1..%d", what,
                     ORCH_CBW_TIMEOUT_MS_MAX);
        goto fail;
      }
      ob->cbw_timeout_ms = (uint32_t) ms;
    }
    struct json_object *bd = GET (b, "disks", json_type_array, "backup");
    size_t m = json_object_array_length (bd);
    ob->disks = calloc (m ? m : 1, sizeof *ob->disks);
    if (ob->disks == NULL) { cbw_err_set (err, ENOMEM, "%s: out of memory", what); goto fail; }
    for (size_t j = 0; j < m; j++) {
      char where[64];
      bool bad;
      struct json_object *e = json_object_array_get_idx (bd, j);
      snprintf (where, sizeof where, "backup.disks[%zu]", j);
      if (!json_object_is_type (e, json_type_object)) {
        cbw_err_set (err, EINVAL, "%s: %s is not an object", what, where);
        goto fail;
      }
      struct orch_backup_disk *x = &ob->disks[ob->ndisks++];
      if (get_name (e, "name", x->name, false, what, where, err) < 0) goto fail;
      if (!orch_find_disk (st, x->name)) {
        cbw_err_set (err, EINVAL, "%s: %s: unknown disk \"%s\"", what, where, x->name);
        goto fail;
      }
      x->pit_uri = get_optstr (e, "pit-uri", what, where, err, &bad); if (bad) goto fail;
      x->bitmap = get_optstr (e, "bitmap", what, where, err, &bad); if (bad) goto fail;
      x->store_path = get_optstr (e, "store-path", what, where, err, &bad); if (bad) goto fail;
      x->store_sock = get_optstr (e, "store-socket", what, where, err, &bad); if (bad) goto fail;
      x->export_name = get_optstr (e, "export", what, where, err, &bad); if (bad) goto fail;
      x->store_pid = json_object_get_int64 (GET (e, "store-pid", json_type_int, where));
      if (x->store_pid < 0 || x->store_pid > INT32_MAX) {
        cbw_err_set (err, EINVAL, "%s: %s: bad store-pid", what, where);
        goto fail;
      }
      struct json_object *lim;      /* absent in files of older cbwd */
      if (json_object_object_get_ex (e, "store-limit", &lim)) {
        if (!json_object_is_type (lim, json_type_int) || json_object_get_int64 (lim) < 0) {
          cbw_err_set (err, EINVAL, "%s: %s: bad store-limit", what, where);
          goto fail;
        }
        x->store_limit = (uint64_t) json_object_get_int64 (lim);
      }
      struct json_object *off;      /* offline backup of a stopped disk */
      if (json_object_object_get_ex (e, "offline", &off)) {
        if (!json_object_is_type (off, json_type_boolean)) {
          cbw_err_set (err, EINVAL, "%s: %s: \"offline\" must be a boolean", what, where);
          goto fail;
        }
        x->offline = json_object_get_boolean (off);
        if (x->offline)
          orch_find_disk (st, x->name)->offline = true;
      }
    }
  }

  /* pending */
  struct json_object *p = get (body, "pending", json_type_object, true, what, "body", err);
  if (p == NULL && err && err->errnum) goto fail;
  if (p) {
    const char *op = json_object_get_string (GET (p, "op", json_type_string, "pending"));
    if (strcmp (op, "checkpoint-create") && strcmp (op, "checkpoint-delete") &&
        strcmp (op, "backup-begin") && strcmp (op, "backup-end")) {
      cbw_err_set (err, EINVAL, "%s: pending: unknown op \"%.40s\"", what, op);
      goto fail;
    }
    snprintf (st->pending.op, sizeof st->pending.op, "%s", op);
    if (get_name (p, "name", st->pending.name, false, what, "pending", err) < 0) goto fail;
  }
  json_object_put (top);
  return 0;

 fail:
  if (err && err->errnum == 0)
    cbw_err_set (err, EINVAL, "%s: invalid state file", what);
  json_object_put (top);
  orch_state_free (st);
  return -1;
}

int
orch_state_save (struct cbw_orch *o, struct cbw_err *err)
{
  CLEANUP_FREE char *text = NULL;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    o->st.generation++;
    struct json_object *j = orch_state_to_json (&o->st);
    const char *s = json_object_to_json_string_ext (j, JSON_C_TO_STRING_PRETTY |
                                                    JSON_C_TO_STRING_SPACED);
    text = s ? orch_strdup_printf ("%s\n", s) : NULL;
    json_object_put (j);
  }
  if (text == NULL)
    return cbw_err_set (err, ENOMEM, "%s: out of memory", o->state_path);
  return cbw_write_file_atomic (o->state_path, text, strlen (text), err);
}

/* Append ", WHAT" to a list of clues (bounded). */
static void
clue (char *buf, size_t len, const char *fmt, ...)
{
  size_t l = strlen (buf);
  va_list ap;
  if (l + 8 >= len)
    return;
  if (l) {
    snprintf (buf + l, len - l, ", ");
    l += 2;
  }
  va_start (ap, fmt);
  vsnprintf (buf + l, len - l, fmt, ap);
  va_end (ap);
}

/* Entries of STATE_DIR/sub (not . and ..), listed into clues; count. */
static int
dir_clues (const char *state_dir, const char *sub, char *clues, size_t len)
{
  CLEANUP_FREE char *path = orch_strdup_printf ("%s/%s", state_dir, sub);
  DIR *dh = path ? opendir (path) : NULL;
  struct dirent *de;
  int n = 0;
  if (dh == NULL)
    return 0;
  while ((de = readdir (dh)) != NULL) {
    if (strcmp (de->d_name, ".") == 0 || strcmp (de->d_name, "..") == 0)
      continue;
    if (n++ < 4)
      clue (clues, len, "%s/%s", sub, de->d_name);
  }
  closedir (dh);
  return n;
}

/* The state file is missing: is this a new state directory, or did a cbwd
 * run here and its state got lost?  Clues: disk or backup directories, a
 * state temp file or backup (cbwd-state.json.*), and processes
 * (nbdkit of the disks, backup stores) whose command line names a path in
 * STATE_DIR/disks/ or STATE_DIR/backups/.  0 = fresh, else -1 + err. */
static int
check_fresh_state_dir (struct cbw_orch *o, struct cbw_err *err)
{
  char clues[1024] = "";
  int n = dir_clues (o->state_dir, "disks", clues, sizeof clues)
    + dir_clues (o->state_dir, "backups", clues, sizeof clues);
  DIR *dh = opendir (o->state_dir);
  struct dirent *de;
  if (dh) {
    while ((de = readdir (dh)) != NULL)
      if (strncmp (de->d_name, ORCH_STATE_FILE ".", sizeof ORCH_STATE_FILE) == 0) {
        clue (clues, sizeof clues, "%s", de->d_name);
        n++;
      }
    closedir (dh);
  }
  CLEANUP_FREE char *dneedle = orch_strdup_printf ("%s/disks/", o->state_dir);
  CLEANUP_FREE char *bneedle = orch_strdup_printf ("%s/backups/", o->state_dir);
  if (dneedle == NULL || bneedle == NULL)
    return cbw_err_set (err, ENOMEM, "out of memory");
  char pids[256] = "";
  dh = opendir ("/proc");
  if (dh) {
    while ((de = readdir (dh)) != NULL) {
      char *end;
      long pid = strtol (de->d_name, &end, 10);
      if (*end != '\0' || pid <= 0 || pid == (long) getpid ())
        continue;
      if (orch_pid_cmdline_has (pid, dneedle, false) ||
          orch_pid_cmdline_has (pid, bneedle, false)) {
        clue (pids, sizeof pids, "%ld", pid);
        n++;
      }
    }
    closedir (dh);
  }
  if (n == 0)
    return 0;
  /* The way out first: long clue lists are cut at CBW_ERR_MSG_MAX. */
  return cbw_err_set (err, ENOENT, "%s: missing, but cbwd ran in this state directory "
                      "before: refusing to start with an empty state (see cbwd(8), LOST "
                      "METADATA: restore the file, or stop these processes and move the "
                      "directory aside to start over). Found: %s%s%s%s",
                      o->state_path, clues, pids[0] && clues[0] ? "; " : "",
                      pids[0] ? "running with this directory in their command line: pid " : "",
                      pids);
}

int
orch_state_load (struct cbw_orch *o, struct cbw_err *err)
{
  CLEANUP_FREE char *buf = NULL;
  size_t len;
  struct cbw_err e = { 0 };

  if (cbw_read_file (o->state_path, ORCH_STATE_MAX, &buf, &len, &e) < 0) {
    if (e.errnum == ENOENT) {
      if (check_fresh_state_dir (o, err) < 0)
        return -1;              /* lost, not new: never start empty */
      memset (&o->st, 0, sizeof o->st);
      return 0;                 /* a new state directory */
    }
    *err = e;
    return -1;
  }
  struct orch_state st;
  if (orch_state_from_json (buf, len, o->state_path, &st, err) < 0)
    return -1;
  /* Fill the derived paths now that the state dir is known. */
  for (size_t i = 0; i < st.ndisks; i++) {
    struct orch_disk *old = st.disks[i];
    struct orch_disk *d = orch_disk_new (o->state_dir, old->name, old->file,
                                         old->granularity);
    if (d == NULL) {
      orch_state_free (&st);
      return cbw_err_set (err, ENOMEM, "%s: out of memory", o->state_path);
    }
    d->pid = old->pid;
    d->chain = old->chain;
    memcpy (d->id, old->id, sizeof d->id);
    d->id_new = old->id_new;
    d->force_share = old->force_share;
    if (old->cbw_timeout_ms)
      orch_disk_set_cbw_timeout (d, old->cbw_timeout_ms);
    d->tcp = old->tcp;
    old->tcp = NULL;
    d->offline = old->offline;        /* from the backup record */
    old->chain = NULL;
    orch_disk_free (old);
    st.disks[i] = d;
  }
  o->st = st;
  return 0;
}
