/* cbw — server/export_admin.c: the orchestrator's view of cbwd's exports
 * (struct cbw_orch_exports in orch/orch_exports.h): store, PIT and
 * offline-backup file exports created at run time, their URIs, removal.
 *
 * Threads: called from the orchestrator's control thread.  Export objects
 * are built on the calling thread (opening files and the first upstream
 * connection is blocking I/O, so it must not run on the loop) and handed to
 * the loop with cbwd_server_add_export(); nothing here takes a lock itself.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "export_admin.h"
#include "server.h"

/* Authorization of run-time exports: stores are never reachable from TCP
 * (the cbw filter writes them through the Unix listener); PIT exports get
 * cbwd's --pit-allow list, or none (every client of a listener). */
static int
publish (struct cbwd_server *srv, struct cbwd_export *e, char *uri_out,
         size_t uri_len, struct cbw_err *err)
{
  bool is_store = strcmp (e->ops->type, "store") == 0;
  e->tcp_deny_default = is_store;
  if (!is_store)
    for (size_t i = 0; i < srv->npit_allow; i++)
      if (cbwd_export_allow (e, srv->pit_allow[i], err) == -1) {
        cbwd_export_unref (e);
        return -1;
      }
  char *uri = cbwd_server_uri (srv, e->name);
  if (!uri || strlen (uri) >= uri_len) {
    free (uri);
    cbwd_export_unref (e);
    return cbw_err_set (err, ENAMETOOLONG, "export URI does not fit");
  }
  if (cbwd_server_add_export (srv, e, err) == -1) {
    free (uri);
    cbwd_export_unref (e);
    return -1;
  }
  strcpy (uri_out, uri);
  free (uri);
  return 0;
}

static int
add_store (void *opaque, const char *name, const char *path, uint64_t size,
           uint64_t limit, char *uri_out, size_t uri_len, struct cbw_err *err)
{
  struct cbwd_store_opts o = { .path = path, .size = size, .limit = limit, .create = true };
  struct cbwd_export *e = cbwd_export_file_new (name, &o, err);
  if (!e) return -1;
  return publish (opaque, e, uri_out, uri_len, err);
}

static int
add_pit_direct (void *opaque, const char *name, const char *upstream,
                const char *bitmap_ctl, const char *bitmap, const char *context,
                const char *unreadable_why, const char *state_file, const char *live_file, const char *store_file,
                char *uri_out, size_t uri_len, struct cbw_err *err)
{
  struct cbwd_pit_opts o = { .upstream = upstream, .connections = 8,
                             .state_file = state_file, .live_file = live_file,
                             .store_file = store_file };
  struct cbwd_export *e = cbwd_export_pit_new (name, &o, err);
  if (!e) return -1;
  if (bitmap) {
    struct cbwd_meta m;
    if (!bitmap_ctl || !context) {
      cbwd_export_unref (e);
      return cbw_err_set (err, EINVAL, "export '%s': bitmap without control socket or context",
                          name);
    }
    if (cbwd_meta_bitmap_from_ctl (&m, context, bitmap_ctl, bitmap, e->size, err) == -1) {
      cbwd_export_unref (e);
      return -1;
    }
    if (cbwd_export_add_meta (e, &m, err) == -1) {
      m.free (&m);
      cbwd_export_unref (e);
      return -1;
    }
    char ctxname[1100];
    snprintf (ctxname, sizeof ctxname, "qemu:dirty-bitmap:%s", context);
    if (unreadable_why &&
        cbwd_export_pit_readable_only (e, ctxname, unreadable_why, err) == -1) {
      cbwd_export_unref (e);
      return -1;
    }
  }
  else if (unreadable_why) {
    cbwd_export_unref (e);
    return cbw_err_set (err, EINVAL, "export '%s': a readable set needs a bitmap", name);
  }
  return publish (opaque, e, uri_out, uri_len, err);
}

static int
add_pit (void *opaque, const char *name, const char *upstream,
         const char *bitmap_ctl, const char *bitmap, const char *context,
         const char *unreadable_why, char *uri_out, size_t uri_len, struct cbw_err *err)
{
  return add_pit_direct (opaque, name, upstream, bitmap_ctl, bitmap, context,
                         unreadable_why, NULL, NULL, NULL, uri_out, uri_len, err);
}

static int
add_file (void *opaque, const char *name, const char *path, const char *extents,
          const char *context, char *uri_out, size_t uri_len, struct cbw_err *err)
{
  struct cbwd_store_opts o = { .path = path, .readonly = true };
  struct cbwd_export *e = cbwd_export_file_new (name, &o, err);
  if (!e) return -1;
  if (extents) {
    struct cbwd_meta m;
    if (!context) {
      cbwd_export_unref (e);
      return cbw_err_set (err, EINVAL, "export '%s': bitmap without context", name);
    }
    if (cbwd_meta_bitmap_from_extents (&m, context, extents, e->size, err) == -1) {
      cbwd_export_unref (e);
      return -1;
    }
    if (cbwd_export_add_meta (e, &m, err) == -1) {
      m.free (&m);
      cbwd_export_unref (e);
      return -1;
    }
  }
  return publish (opaque, e, uri_out, uri_len, err);
}

static int
remove_export (void *opaque, const char *name, struct cbw_err *err)
{
  return cbwd_server_remove_export (opaque, name, err);
}

void
cbwd_orch_exports_init (struct cbw_orch_exports *x, struct cbwd_server *srv)
{
  x->opaque = srv;
  x->add_store_export = add_store;
  x->add_pit_export = add_pit;
  x->add_pit_export_direct = add_pit_direct;
  x->remove_export = remove_export;
  x->add_file_export = add_file;
}
