/* cbw — server/config.c: --export specs and the JSON config file (see
 * config.h and docs/cbwd.8.md for the keys).  Everything is validated here:
 * unknown keys, bad numbers, missing required keys, duplicate export names
 * are errors that name the key and the export.  Start-up only; no locking.
 */
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <json-c/json.h>

#include "cleanup.h"
#include "config.h"
#include "fileutil.h"
#include "units.h"

int
cbwd_parse_size (const char *str, uint64_t *out)
{
  return cbw_parse_size (str, UINT64_MAX, out);
}

void
cbwd_export_spec_free (struct cbwd_export_spec *s)
{
  free (s->name); free (s->type); free (s->path); free (s->description);
  free (s->upstream);
  free (s->state_file); free (s->live_file); free (s->store_file);
  for (size_t i = 0; i < s->nbitmaps; i++) {
    free (s->bitmaps[i].name); free (s->bitmaps[i].source);
    free (s->bitmaps[i].path); free (s->bitmaps[i].stored);
  }
  for (size_t i = 0; i < s->nallow; i++)
    free (s->allow[i]);
  free (s->allow);
  memset (s, 0, sizeof *s);
}

/* Append one string to a malloc'd vector. */
static int
strv_add (char ***v, size_t *n, const char *str, struct cbw_err *err)
{
  char **nv = realloc (*v, (*n + 1) * sizeof *nv);
  if (!nv) return cbw_err_set (err, ENOMEM, "out of memory");
  *v = nv;
  if (!(nv[*n] = strdup (str))) return cbw_err_set (err, ENOMEM, "out of memory");
  (*n)++;
  return 0;
}

/* allow=ID[;ID...]: identities are checked here, so a typo fails start-up. */
static int
spec_allow (struct cbwd_export_spec *s, const char *list, struct cbw_err *err)
{
  CLEANUP_FREE char *copy = strdup (list);
  if (!copy) return cbw_err_set (err, ENOMEM, "out of memory");
  s->has_allow = 1;
  char *save = NULL;
  for (char *t = strtok_r (copy, ";", &save); t; t = strtok_r (NULL, ";", &save))
    if (cbwd_allow_check (t, err) == -1 || strv_add (&s->allow, &s->nallow, t, err) == -1)
      return -1;
  return 0;
}

int
cbwd_add_pit_allow (struct cbwd_server *srv, const char *identity, struct cbw_err *err)
{
  if (cbwd_allow_check (identity, err) == -1)
    return cbw_err_prefix (err, "pit-allow");
  return strv_add (&srv->pit_allow, &srv->npit_allow, identity, err);
}

int
cbwd_add_freeze_hook (struct cbwd_server *srv, const char *spec, struct cbw_err *err)
{
  const char *eq = strchr (spec, '=');
  if (!eq || eq == spec)
    return cbw_err_set (err, EINVAL, "freeze hook '%s': expected NAME=/PATH/TO/PROGRAM", spec);
  for (const char *p = spec; p < eq; p++)
    if (!isalnum ((unsigned char) *p) && *p != '.' && *p != '_' && *p != '-')
      return cbw_err_set (err, EINVAL, "freeze hook '%.*s': a name is letters, digits, "
                          "'.', '_' and '-'", (int) (eq - spec), spec);
  if (eq - spec > 64)
    return cbw_err_set (err, EINVAL, "freeze hook name longer than 64 characters");
  const char *path = eq + 1;
  if (path[0] != '/')
    return cbw_err_set (err, EINVAL, "freeze hook '%.*s': '%s' is not an absolute path "
                        "(hooks are programs run without a shell)", (int) (eq - spec), spec,
                        path);
  if (access (path, X_OK) == -1)
    return cbw_err_set (err, errno, "freeze hook '%.*s': %s: %s", (int) (eq - spec), spec,
                        path, strerror (errno));
  size_t nl = (size_t) (eq - spec) + 1;
  for (size_t i = 0; i < srv->nfreeze_hooks; i++)
    if (strncmp (srv->freeze_hooks[i], spec, nl) == 0)
      return cbw_err_set (err, EEXIST, "freeze hook '%.*s' defined twice", (int) (eq - spec),
                          spec);
  return strv_add (&srv->freeze_hooks, &srv->nfreeze_hooks, spec, err);
}

void
cbwd_config_free (struct cbwd_server *srv)
{
  for (size_t i = 0; i < srv->npit_allow; i++) free (srv->pit_allow[i]);
  free (srv->pit_allow);
  for (size_t i = 0; i < srv->nfreeze_hooks; i++) free (srv->freeze_hooks[i]);
  free (srv->freeze_hooks);
  srv->pit_allow = srv->freeze_hooks = NULL;
  srv->npit_allow = srv->nfreeze_hooks = 0;
}

static int
set_str (char **dst, const char *v, const char *key, struct cbw_err *err)
{
  if (*dst)
    return cbw_err_set (err, EINVAL, "key '%s' given twice", key);
  *dst = strdup (v);
  return *dst ? 0 : cbw_err_set (err, ENOMEM, "out of memory");
}

/* NAME:raw:PATH:GRAN | NAME:extents:PATH | NAME:store:DESCRIPTOR[:STORED] */
static int
parse_bitmap_kv (const char *v, struct cbwd_export_spec *s, struct cbw_err *err)
{
  if (s->nbitmaps >= CBWD_MAX_BITMAPS)
    return cbw_err_set (err, EINVAL, "too many bitmaps (max %d)", CBWD_MAX_BITMAPS);
  CLEANUP_FREE char *copy = strdup (v);
  if (!copy) return cbw_err_set (err, ENOMEM, "out of memory");
  char *parts[4] = { 0 };
  size_t np = 0;
  char *save = NULL;
  for (char *t = strtok_r (copy, ":", &save); t && np < 4; t = strtok_r (NULL, ":", &save))
    parts[np++] = t;
  if (np < 3)
    return cbw_err_set (err, EINVAL, "bitmap=%s: expected NAME:SOURCE:PATH[:...]", v);
  struct cbwd_bitmap_spec *b = &s->bitmaps[s->nbitmaps];
  memset (b, 0, sizeof *b);
  b->name = strdup (parts[0]);
  b->source = strdup (parts[1]);
  b->path = strdup (parts[2]);
  s->nbitmaps++;
  if (!b->name || !b->source || !b->path) return cbw_err_set (err, ENOMEM, "out of memory");
  if (strcmp (parts[1], "raw") == 0) {
    b->granularity = 65536;
    if (np == 4 && cbwd_parse_size (parts[3], &b->granularity) == -1)
      return cbw_err_set (err, EINVAL, "bitmap=%s: bad granularity", v);
  }
  else if (strcmp (parts[1], "store") == 0 || strcmp (parts[1], "ctl") == 0) {
    if (np == 4 && !(b->stored = strdup (parts[3])))
      return cbw_err_set (err, ENOMEM, "out of memory");
  }
  else if (strcmp (parts[1], "extents") != 0 || np != 3)
    return cbw_err_set (err, EINVAL, "bitmap=%s: source must be raw, extents, store or ctl", v);
  return 0;
}

int
cbwd_parse_export_kv (const char *kv, struct cbwd_export_spec *s, struct cbw_err *err)
{
  memset (s, 0, sizeof *s);
  s->release = -1;
  CLEANUP_FREE char *copy = strdup (kv);
  if (!copy) return cbw_err_set (err, ENOMEM, "out of memory");
  char *save = NULL;
  for (char *t = strtok_r (copy, ",", &save); t; t = strtok_r (NULL, ",", &save)) {
    char *eq = strchr (t, '=');
    if (!eq)
      return cbw_err_set (err, EINVAL, "--export %s: '%s' is not KEY=VALUE", kv, t);
    *eq = 0;
    const char *k = t, *v = eq + 1;
    int r = 0;
    if (strcmp (k, "name") == 0) r = set_str (&s->name, v, k, err);
    else if (strcmp (k, "type") == 0) r = set_str (&s->type, v, k, err);
    else if (strcmp (k, "path") == 0) r = set_str (&s->path, v, k, err);
    else if (strcmp (k, "description") == 0) r = set_str (&s->description, v, k, err);
    else if (strcmp (k, "upstream") == 0) r = set_str (&s->upstream, v, k, err);
    else if (strcmp (k, "size") == 0) {
      if (cbwd_parse_size (v, &s->size) == -1) r = cbw_err_set (err, EINVAL, "bad size '%s'", v);
    }
    else if (strcmp (k, "limit") == 0) {
      if (cbwd_parse_size (v, &s->limit) == -1) r = cbw_err_set (err, EINVAL, "bad limit '%s'", v);
    }
    else if (strcmp (k, "connections") == 0) {
      uint64_t n;
      if (cbwd_parse_size (v, &n) == -1 || n < 1 || n > 64)
        r = cbw_err_set (err, EINVAL, "connections must be 1..64");
      else s->connections = (unsigned) n;
    }
    else if (strcmp (k, "release") == 0) {
      if (strcmp (v, "on") == 0 || strcmp (v, "true") == 0) s->release = 1;
      else if (strcmp (v, "off") == 0 || strcmp (v, "false") == 0) s->release = 0;
      else r = cbw_err_set (err, EINVAL, "release must be on or off");
    }
    else if (strcmp (k, "direct") == 0) {
      if (strcmp (v, "on") == 0 || strcmp (v, "true") == 0) s->direct = 1;
      else if (strcmp (v, "off") == 0 || strcmp (v, "false") == 0) s->direct = 0;
      else r = cbw_err_set (err, EINVAL, "direct must be on or off");
    }
    else if (strcmp (k, "bitmap") == 0) r = parse_bitmap_kv (v, s, err);
    else if (strcmp (k, "allow") == 0) r = spec_allow (s, v, err);
    else if (strcmp (k, "state-file") == 0) r = set_str (&s->state_file, v, k, err);
    else if (strcmp (k, "live-file") == 0) r = set_str (&s->live_file, v, k, err);
    else if (strcmp (k, "store-file") == 0) r = set_str (&s->store_file, v, k, err);
    else if (strcmp (k, "state-granularity") == 0) {
      if (cbwd_parse_size (v, &s->state_granularity) == -1)
        r = cbw_err_set (err, EINVAL, "bad state-granularity '%s'", v);
    }
    else if (strcmp (k, "debug-delay-us") == 0) {
      if (cbwd_parse_size (v, &s->debug_delay_us) == -1 || s->debug_delay_us > 10000000)
        r = cbw_err_set (err, EINVAL, "debug-delay-us must be 0..10000000");
    }
    else if (strcmp (k, "debug-unsafe-no-recheck") == 0) {
      if (strcmp (v, "on") == 0 || strcmp (v, "true") == 0) s->debug_no_recheck = 1;
      else if (strcmp (v, "off") == 0 || strcmp (v, "false") == 0) s->debug_no_recheck = 0;
      else r = cbw_err_set (err, EINVAL, "debug-unsafe-no-recheck must be on or off");
    }
    else r = cbw_err_set (err, EINVAL, "unknown key '%s'", k);
    if (r == -1)
      return cbw_err_prefix (err, "--export %s", kv);
  }
  return 0;
}

struct cbwd_export *
cbwd_build_export (const struct cbwd_export_spec *s, struct cbw_err *err)
{
  struct cbwd_export *e = NULL;
  if (!s->name) { cbw_err_set (err, EINVAL, "export without a name"); return NULL; }
  if (strlen (s->name) > 4096) { cbw_err_set (err, EINVAL, "export name too long"); return NULL; }
  if (!s->type) { cbw_err_set (err, EINVAL, "export '%s': no type", s->name); return NULL; }
  bool is_store = strcmp (s->type, "store") == 0, is_file = strcmp (s->type, "file") == 0;
  if (strcmp (s->type, "pit") != 0 &&
      (s->state_file || s->live_file || s->store_file || s->state_granularity ||
       s->debug_delay_us || s->debug_no_recheck)) {
    cbw_err_set (err, EINVAL, "export '%s': state-file, live-file, store-file and the "
                 "debug keys are for type pit", s->name);
    return NULL;
  }
  if (is_store || is_file) {
    if (!s->path) { cbw_err_set (err, EINVAL, "export '%s': type %s needs path=", s->name, s->type); return NULL; }
    if (is_file && s->limit) { cbw_err_set (err, EINVAL, "export '%s': limit= is for stores", s->name); return NULL; }
    if (is_file && s->direct) { cbw_err_set (err, EINVAL, "export '%s': direct= is for stores", s->name); return NULL; }
    struct cbwd_store_opts o = { .path = s->path, .size = s->size, .limit = s->limit,
                                 .readonly = is_file, .create = is_store,
                                 .direct = s->direct == 1 };
    e = cbwd_export_file_new (s->name, &o, err);
  }
  else if (s->direct) {
    cbw_err_set (err, EINVAL, "export '%s': direct= is for stores", s->name);
    return NULL;
  }
  else if (strcmp (s->type, "pit") == 0) {
    if (!s->upstream) { cbw_err_set (err, EINVAL, "export '%s': type pit needs upstream=", s->name); return NULL; }
    struct cbwd_pit_opts o = { .upstream = s->upstream,
                               .connections = s->connections ? s->connections : 4,
                               .release = s->release == 1,
                               .state_file = s->state_file, .live_file = s->live_file,
                               .store_file = s->store_file,
                               .state_granularity = s->state_granularity,
                               .debug_delay_us = (uint32_t) s->debug_delay_us,
                               .debug_no_recheck = s->debug_no_recheck == 1 };
    e = cbwd_export_pit_new (s->name, &o, err);
  }
  else if (strcmp (s->type, "memory") == 0) {
    e = cbwd_export_memory_new (s->name, s->size, false, err);
  }
  else {
    cbw_err_set (err, EINVAL, "export '%s': unknown type '%s' (store, file, pit)", s->name, s->type);
    return NULL;
  }
  if (!e) return NULL;
  e->tcp_deny_default = strcmp (e->ops->type, "store") == 0;
  for (size_t i = 0; i < s->nallow; i++)
    if (cbwd_export_allow (e, s->allow[i], err) == -1)
      goto fail;
  e->has_allow = s->has_allow != 0;
  if (s->description && !(e->description = strdup (s->description))) {
    cbw_err_set (err, ENOMEM, "out of memory");
    goto fail;
  }
  for (size_t i = 0; i < s->nbitmaps; i++) {
    const struct cbwd_bitmap_spec *b = &s->bitmaps[i];
    struct cbwd_meta m;
    int r;
    if (strcmp (b->source, "raw") == 0)
      r = cbwd_meta_bitmap_from_raw (&m, b->name, b->path, b->granularity, e->size, err);
    else if (strcmp (b->source, "extents") == 0)
      r = cbwd_meta_bitmap_from_extents (&m, b->name, b->path, e->size, err);
    else if (strcmp (b->source, "ctl") == 0)
      r = cbwd_meta_bitmap_from_ctl (&m, b->name, b->path, b->stored ? b->stored : b->name,
                                     e->size, err);
    else if (strcmp (b->source, "store") == 0)
      r = cbwd_meta_bitmap_from_store (&m, b->name, b->path, b->stored ? b->stored : b->name,
                                       e->size, err);
    else
      r = cbw_err_set (err, EINVAL, "bitmap '%s': unknown source '%s'", b->name, b->source);
    if (r == -1) goto fail;
    if (cbwd_export_add_meta (e, &m, err) == -1) { m.free (&m); goto fail; }
  }
  return e;
 fail:
  cbw_err_prefix (err, "export '%s'", s->name);
  cbwd_export_free (e);
  return NULL;
}

int
cbwd_add_export (struct cbwd_server *srv, struct cbwd_export *e, struct cbw_err *err)
{
  for (size_t i = 0; i < srv->exports.n; i++)
    if (strcmp (srv->exports.v[i]->name, e->name) == 0)
      return cbw_err_set (err, EEXIST, "export '%s' defined twice", e->name);
  struct cbwd_export **v = realloc (srv->exports.v, (srv->exports.n + 1) * sizeof *v);
  if (!v) return cbw_err_set (err, ENOMEM, "out of memory");
  srv->exports.v = v;
  v[srv->exports.n++] = e;
  return 0;
}

/* JSON helpers. */
static int
jstr (struct json_object *o, const char *key, char **out, bool required,
      const char *ctx, struct cbw_err *err)
{
  struct json_object *v;
  if (!json_object_object_get_ex (o, key, &v)) {
    if (required) return cbw_err_set (err, EINVAL, "%s: missing \"%s\"", ctx, key);
    return 0;
  }
  if (!json_object_is_type (v, json_type_string))
    return cbw_err_set (err, EINVAL, "%s: \"%s\" must be a string", ctx, key);
  *out = strdup (json_object_get_string (v));
  return *out ? 0 : cbw_err_set (err, ENOMEM, "out of memory");
}

static int
jsize (struct json_object *o, const char *key, uint64_t *out, const char *ctx,
       struct cbw_err *err)
{
  struct json_object *v;
  if (!json_object_object_get_ex (o, key, &v)) return 0;
  if (json_object_is_type (v, json_type_int) && json_object_get_int64 (v) >= 0) {
    *out = (uint64_t) json_object_get_int64 (v);
    return 0;
  }
  if (json_object_is_type (v, json_type_string) &&
      cbwd_parse_size (json_object_get_string (v), out) == 0)
    return 0;
  return cbw_err_set (err, EINVAL, "%s: \"%s\" must be a size", ctx, key);
}

static int
check_keys (struct json_object *o, const char *const *allowed, const char *ctx,
            struct cbw_err *err)
{
  json_object_object_foreach (o, k, v) {
    (void) v;
    bool ok = false;
    for (size_t i = 0; allowed[i]; i++)
      if (strcmp (allowed[i], k) == 0) ok = true;
    if (!ok) return cbw_err_set (err, EINVAL, "%s: unknown key \"%s\"", ctx, k);
  }
  return 0;
}

static int
json_export (struct json_object *o, struct cbwd_export_spec *s, struct cbw_err *err)
{
  static const char *const keys[] = { "name", "type", "path", "description", "upstream",
    "size", "limit", "connections", "release", "direct", "bitmaps", "state-file", "live-file",
    "store-file", "state-granularity", "allow", NULL };
  static const char *const bkeys[] = { "name", "source", "path", "granularity", "bitmap", NULL };
  memset (s, 0, sizeof *s);
  s->release = -1;
  if (!json_object_is_type (o, json_type_object))
    return cbw_err_set (err, EINVAL, "exports[]: must be objects");
  if (check_keys (o, keys, "export", err) == -1 ||
      jstr (o, "name", &s->name, true, "export", err) == -1 ||
      jstr (o, "type", &s->type, true, s->name, err) == -1 ||
      jstr (o, "path", &s->path, false, s->name, err) == -1 ||
      jstr (o, "description", &s->description, false, s->name, err) == -1 ||
      jstr (o, "upstream", &s->upstream, false, s->name, err) == -1 ||
      jstr (o, "state-file", &s->state_file, false, s->name, err) == -1 ||
      jstr (o, "live-file", &s->live_file, false, s->name, err) == -1 ||
      jstr (o, "store-file", &s->store_file, false, s->name, err) == -1 ||
      jsize (o, "state-granularity", &s->state_granularity, s->name, err) == -1 ||
      jsize (o, "size", &s->size, s->name, err) == -1 ||
      jsize (o, "limit", &s->limit, s->name, err) == -1)
    return -1;
  uint64_t n = 0;
  if (jsize (o, "connections", &n, s->name, err) == -1) return -1;
  if (n > 64) return cbw_err_set (err, EINVAL, "%s: connections must be 1..64", s->name);
  s->connections = (unsigned) n;
  struct json_object *v;
  if (json_object_object_get_ex (o, "release", &v))
    s->release = json_object_get_boolean (v);
  if (json_object_object_get_ex (o, "direct", &v)) {
    if (!json_object_is_type (v, json_type_boolean))
      return cbw_err_set (err, EINVAL, "%s: \"direct\" must be true or false", s->name);
    s->direct = json_object_get_boolean (v);
  }
  if (json_object_object_get_ex (o, "allow", &v)) {
    if (!json_object_is_type (v, json_type_array))
      return cbw_err_set (err, EINVAL, "%s: \"allow\" must be an array of identities",
                          s->name);
    s->has_allow = 1;
    for (size_t i = 0; i < json_object_array_length (v); i++) {
      struct json_object *a = json_object_array_get_idx (v, i);
      if (!json_object_is_type (a, json_type_string))
        return cbw_err_set (err, EINVAL, "%s: \"allow\" must be an array of identities",
                            s->name);
      if (cbwd_allow_check (json_object_get_string (a), err) == -1 ||
          strv_add (&s->allow, &s->nallow, json_object_get_string (a), err) == -1)
        return cbw_err_prefix (err, "%s", s->name);
    }
  }
  if (json_object_object_get_ex (o, "bitmaps", &v)) {
    if (!json_object_is_type (v, json_type_array))
      return cbw_err_set (err, EINVAL, "%s: \"bitmaps\" must be an array", s->name);
    size_t nb = json_object_array_length (v);
    if (nb > CBWD_MAX_BITMAPS)
      return cbw_err_set (err, EINVAL, "%s: too many bitmaps", s->name);
    for (size_t i = 0; i < nb; i++) {
      struct json_object *b = json_object_array_get_idx (v, i);
      struct cbwd_bitmap_spec *bs = &s->bitmaps[s->nbitmaps++];
      if (!json_object_is_type (b, json_type_object))
        return cbw_err_set (err, EINVAL, "%s: bitmaps[] must be objects", s->name);
      if (check_keys (b, bkeys, s->name, err) == -1 ||
          jstr (b, "name", &bs->name, true, s->name, err) == -1 ||
          jstr (b, "source", &bs->source, true, s->name, err) == -1 ||
          jstr (b, "path", &bs->path, true, s->name, err) == -1 ||
          jstr (b, "bitmap", &bs->stored, false, s->name, err) == -1)
        return -1;
      bs->granularity = 65536;
      if (jsize (b, "granularity", &bs->granularity, s->name, err) == -1)
        return -1;
    }
  }
  return 0;
}

int
cbwd_config_disks (struct json_object *root, const char *path,
                   struct json_object **disks, struct cbw_err *err)
{
  struct json_object *v, *out;
  *disks = NULL;
  if (!json_object_object_get_ex (root, "disks", &v))
    return 0;
  if (!json_object_is_type (v, json_type_array))
    return cbw_err_set (err, EINVAL, "%s: \"disks\" must be an array of objects", path);
  if (json_object_array_length (v) > 256)
    return cbw_err_set (err, EINVAL, "%s: too many disks (limit 256)", path);
  /* relative image paths are relative to the config file */
  CLEANUP_FREE char *dir = strdup (path);
  if (!dir || !(out = json_object_new_array ()))
    return cbw_err_set (err, ENOMEM, "out of memory");
  char *slash = strrchr (dir, '/');
  if (slash) slash[slash == dir ? 1 : 0] = 0;
  else strcpy (dir, ".");
  for (size_t i = 0; i < json_object_array_length (v); i++) {
    struct json_object *d = json_object_array_get_idx (v, i), *name, *file, *copy = NULL;
    if (!json_object_is_type (d, json_type_object)) {
      cbw_err_set (err, EINVAL, "%s: disks[%zu] must be an object", path, i);
      goto fail;
    }
    if (!json_object_object_get_ex (d, "name", &name) ||
        !json_object_is_type (name, json_type_string)) {
      cbw_err_set (err, EINVAL, "%s: disks[%zu]: \"name\" (a string) is required", path, i);
      goto fail;
    }
    if (json_object_deep_copy (d, &copy, NULL) != 0) {
      cbw_err_set (err, ENOMEM, "out of memory");
      goto fail;
    }
    json_object_array_add (out, copy);
    if (json_object_object_get_ex (copy, "file", &file)) {
      if (!json_object_is_type (file, json_type_string)) {
        cbw_err_set (err, EINVAL, "%s: disk \"%s\": key \"file\" must be a string", path,
                     json_object_get_string (name));
        goto fail;
      }
      const char *f = json_object_get_string (file);
      if (f[0] != '/' && f[0] != '\0') {
        size_t len = strlen (dir) + strlen (f) + 2;
        CLEANUP_FREE char *abs = malloc (len);
        if (!abs) { cbw_err_set (err, ENOMEM, "out of memory"); goto fail; }
        snprintf (abs, len, "%s/%s", dir, f);
        json_object_object_add (copy, "file", json_object_new_string (abs));
      }
    }
  }
  *disks = out;
  return 0;
 fail:
  json_object_put (out);
  return -1;
}

/* A path of the config file, relative to the file's directory. */
static char *
config_path (const char *config, const char *p)
{
  if (p[0] == '/') return strdup (p);
  CLEANUP_FREE char *dir = strdup (config);
  if (!dir) return NULL;
  char *slash = strrchr (dir, '/');
  if (!slash) return strdup (p);
  *slash = 0;
  char *abs = NULL;
  if (asprintf (&abs, "%s/%s", dir[0] ? dir : "/", p) == -1) return NULL;
  return abs;
}

/* "tls", "tls-certificates", "tls-psk", "tls-verify-peer": the same as
 * cbwd's options, which win when both are given. */
static int
config_tls (struct json_object *root, const char *path, struct cbwd_tls_config *t,
            struct cbw_err *err)
{
  struct json_object *v;
  if (json_object_object_get_ex (root, "tls", &v)) {
    int m = json_object_is_type (v, json_type_string)
            ? cbwd_tls_parse_mode (json_object_get_string (v)) : -1;
    if (m == -1)
      return cbw_err_set (err, EINVAL, "%s: \"tls\" must be \"off\", \"on\" or \"require\"",
                          path);
    if (t->mode == -1) t->mode = m;
  }
  static const char *const pk[] = { "tls-certificates", "tls-psk" };
  char **dst[] = { &t->certificates, &t->psk };
  for (int i = 0; i < 2; i++) {
    if (!json_object_object_get_ex (root, pk[i], &v)) continue;
    if (!json_object_is_type (v, json_type_string) || !*json_object_get_string (v))
      return cbw_err_set (err, EINVAL, "%s: \"%s\" must be a path", path, pk[i]);
    if (*dst[i]) continue;
    if (!(*dst[i] = config_path (path, json_object_get_string (v))))
      return cbw_err_set (err, ENOMEM, "out of memory");
  }
  if (json_object_object_get_ex (root, "tls-verify-peer", &v)) {
    if (!json_object_is_type (v, json_type_boolean))
      return cbw_err_set (err, EINVAL, "%s: \"tls-verify-peer\" must be true or false", path);
    if (json_object_get_boolean (v)) t->verify_peer = true;
  }
  return 0;
}

int
cbwd_parse_limit (const char *str, const char *key, struct cbwd_limits *l,
                  struct cbw_err *err)
{
  if (strcmp (key, "max-memory") == 0) {
    uint64_t v;
    if (cbwd_parse_size (str, &v) == -1 || v < CBWD_MIN_MAX_MEMORY)
      return cbw_err_set (err, EINVAL, "max-memory %s: expected a size >= 64M", str);
    l->max_memory = v;
    return 0;
  }
  /* The numeric limits: where each goes and its smallest value (0 means
   * "no timeout" / "no per-peer limit"; a listener that accepts no
   * connection is a typo). */
  const struct {
    const char *key;
    unsigned long min;
    unsigned *dst;
    unsigned scale;
  } numeric[] = {
    { "idle-timeout", 0, &l->idle_timeout_ms, 1000 },
    { "max-connections-per-peer", 0, &l->max_conns_per_peer, 1 },
    { "max-connections", 1, &l->max_connections, 1 },
    { "handshake-timeout", 0, &l->handshake_timeout_ms, 1000 },
  };
  for (size_t i = 0; i < sizeof numeric / sizeof numeric[0]; i++) {
    if (strcmp (key, numeric[i].key) != 0) continue;
    char *end;
    errno = 0;
    unsigned long v = strtoul (str, &end, 10);
    if (errno || end == str || *end || str[0] == '-' || !isdigit ((unsigned char) str[0]) ||
        v < numeric[i].min || v > 1000000)
      return cbw_err_set (err, EINVAL, "%s %s: expected a number %lu..1000000", key, str,
                          numeric[i].min);
    *numeric[i].dst = (unsigned) v * numeric[i].scale;
    return 0;
  }
  return cbw_err_set (err, EINVAL, "unknown limit %s", key);
}

/* JSON: a limit as a number or a string ("256M"). */
static int
config_limit (struct json_object *root, const char *key, const char *path,
              struct cbwd_limits *l, struct cbw_err *err)
{
  struct json_object *v;
  if (!json_object_object_get_ex (root, key, &v)) return 0;
  if (!json_object_is_type (v, json_type_int) && !json_object_is_type (v, json_type_string))
    return cbw_err_set (err, EINVAL, "%s: \"%s\" must be a number or a string", path, key);
  if (cbwd_parse_limit (json_object_get_string (v), key, l, err) == -1) {
    cbw_err_prefix (err, "%s", path);
    return -1;
  }
  return 0;
}

int
cbwd_load_config (const char *path, struct cbwd_server *srv, struct cbw_err *err)
{
  return cbwd_load_config_ex (path, srv, NULL, err);
}

int
cbwd_load_config_ex (const char *path, struct cbwd_server *srv, struct json_object **disks,
                     struct cbw_err *err)
{
  CLEANUP_FREE char *buf = NULL;
  size_t len;
  if (cbw_read_file (path, 16 * 1024 * 1024, &buf, &len, err) == -1)
    return -1;
  enum json_tokener_error jerr;
  struct json_object *root = json_tokener_parse_verbose (buf, &jerr);
  if (!root)
    return cbw_err_set (err, EINVAL, "%s: %s", path, json_tokener_error_desc (jerr));
  int ret = -1;
  static const char *const keys[] = { "listen", "exports", "max-connections",
                                      "handshake-timeout", "disks", "tls",
                                      "tls-certificates", "tls-psk", "tls-verify-peer",
                                      "pit-allow", "freeze-hooks",

                                      "max-memory", "idle-timeout",
                                      "max-connections-per-peer", NULL };
  if (disks) *disks = NULL;
  if (!json_object_is_type (root, json_type_object)) {
    cbw_err_set (err, EINVAL, "%s: not a JSON object", path);
    goto out;
  }
  if (check_keys (root, keys, path, err) == -1) goto out;
  struct json_object *v;
  if (disks == NULL && json_object_object_get_ex (root, "disks", NULL)) {
    cbw_err_set (err, EINVAL, "%s: \"disks\" needs the orchestrator (--state-dir)", path);
    goto out;
  }
  if (disks && cbwd_config_disks (root, path, disks, err) == -1) goto out;
  if (config_limit (root, "max-connections", path, &srv->limits, err) == -1 ||
      config_limit (root, "handshake-timeout", path, &srv->limits, err) == -1 ||
      config_limit (root, "max-memory", path, &srv->limits, err) == -1 ||
      config_limit (root, "idle-timeout", path, &srv->limits, err) == -1 ||
      config_limit (root, "max-connections-per-peer", path, &srv->limits, err) == -1)
    goto out;
  if (config_tls (root, path, &srv->tls, err) == -1) goto out;
  if (json_object_object_get_ex (root, "pit-allow", &v)) {
    if (!json_object_is_type (v, json_type_array)) {
      cbw_err_set (err, EINVAL, "%s: \"pit-allow\" must be an array of identities", path);
      goto out;
    }
    for (size_t i = 0; i < json_object_array_length (v); i++) {
      struct json_object *a = json_object_array_get_idx (v, i);
      if (!json_object_is_type (a, json_type_string)) {
        cbw_err_set (err, EINVAL, "%s: \"pit-allow\" must be an array of identities", path);
        goto out;
      }
      if (cbwd_add_pit_allow (srv, json_object_get_string (a), err) == -1) {
        cbw_err_prefix (err, "%s", path);
        goto out;
      }
    }
  }
  if (json_object_object_get_ex (root, "freeze-hooks", &v)) {
    if (disks == NULL) {
      cbw_err_set (err, EINVAL, "%s: \"freeze-hooks\" needs the orchestrator (--state-dir)",
                   path);
      goto out;
    }
    if (!json_object_is_type (v, json_type_object)) {
      cbw_err_set (err, EINVAL, "%s: \"freeze-hooks\" must be an object NAME: \"/PATH\"",
                   path);
      goto out;
    }
    json_object_object_foreach (v, hname, hpath) {
      CLEANUP_FREE char *spec = NULL;
      if (!json_object_is_type (hpath, json_type_string)) {
        cbw_err_set (err, EINVAL, "%s: freeze-hooks.%s must be a path", path, hname);
        goto out;
      }
      if (asprintf (&spec, "%s=%s", hname, json_object_get_string (hpath)) == -1) {
        cbw_err_set (err, ENOMEM, "out of memory");
        goto out;
      }
      if (cbwd_add_freeze_hook (srv, spec, err) == -1) {
        cbw_err_prefix (err, "%s", path);
        goto out;
      }
    }
  }
  if (json_object_object_get_ex (root, "listen", &v)) {
    if (!json_object_is_type (v, json_type_array)) {
      cbw_err_set (err, EINVAL, "%s: \"listen\" must be an array of strings", path);
      goto out;
    }
    for (size_t i = 0; i < json_object_array_length (v); i++) {
      struct json_object *l = json_object_array_get_idx (v, i);
      if (!json_object_is_type (l, json_type_string) ||
          cbwd_listen (srv, json_object_get_string (l)) == -1) {
        cbw_err_set (err, EINVAL, "%s: bad listen entry %zu", path, i);
        goto out;
      }
    }
  }
  if (json_object_object_get_ex (root, "exports", &v)) {
    if (!json_object_is_type (v, json_type_array)) {
      cbw_err_set (err, EINVAL, "%s: \"exports\" must be an array", path);
      goto out;
    }
    for (size_t i = 0; i < json_object_array_length (v); i++) {
      struct cbwd_export_spec s;
      int r = json_export (json_object_array_get_idx (v, i), &s, err);
      struct cbwd_export *e = r == 0 ? cbwd_build_export (&s, err) : NULL;
      cbwd_export_spec_free (&s);
      if (!e) { cbw_err_prefix (err, "%s", path); goto out; }
      if (cbwd_add_export (srv, e, err) == -1) { cbwd_export_free (e); goto out; }
    }
  }
  ret = 0;
 out:
  if (ret == -1 && disks) {
    json_object_put (*disks);
    *disks = NULL;
  }
  json_object_put (root);
  return ret;
}
