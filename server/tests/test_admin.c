/* cbw — server/tests/test_admin.c: exports added and removed while cbwd's
 * loop runs in another thread (the orchestrator's use), checked with libnbd
 * clients: a new export is served at once, a removed one is unknown to new
 * clients and its open connections are closed, other exports are untouched,
 * and the admin calls fail cleanly after the server stopped.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <libnbd.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "export_admin.h"
#include "server.h"

static struct cbwd_server srv;
static uv_async_t stopper;
static char dir[] = "/tmp/cbwd-admin.XXXXXX";

static void stop_cb (uv_async_t *a) { cbwd_server_stop (&srv); uv_close ((uv_handle_t *) a, NULL); }
static void *loop_thread (void *arg) { (void) arg; uv_run (srv.loop, UV_RUN_DEFAULT); return NULL; }

static struct nbd_handle *
connect_to (const char *name)
{
  struct nbd_handle *h = nbd_create ();
  cr_assert (h);
  char *uri = cbwd_server_uri (&srv, name);
  int r = nbd_connect_uri (h, uri);
  free (uri);
  if (r == -1) { nbd_close (h); return NULL; }
  return h;
}

Test (admin, add_remove_while_running)
{
  struct cbw_err err = { 0 };
  signal (SIGPIPE, SIG_IGN);
  cr_assert (mkdtemp (dir));
  memset (&srv, 0, sizeof srv);
  srv.loop = malloc (sizeof *srv.loop);
  uv_loop_init (srv.loop);
  srv.limits = (struct cbwd_limits) { .max_connections = 64, .max_inflight = 16,
                                      .max_inflight_bytes = 1 << 26 };
  char spec[128];
  snprintf (spec, sizeof spec, "unix:%s/s.sock", dir);
  struct cbwd_export *a = cbwd_export_memory_new ("a", 1 << 20, false, &err);
  cr_assert (a && cbwd_add_export (&srv, a, &err) == 0);
  cr_assert_eq (cbwd_listen (&srv, spec), 0);
  cr_assert_eq (cbwd_admin_init (&srv), 0);
  uv_async_init (srv.loop, &stopper, stop_cb);
  pthread_t t;
  pthread_create (&t, NULL, loop_thread, NULL);

  struct nbd_handle *ha = connect_to ("a");
  cr_assert (ha, "%s", nbd_get_error ());
  cr_assert (connect_to ("b") == NULL);
  /* Add a store through the orchestrator interface. */
  struct cbw_orch_exports x;
  cbwd_orch_exports_init (&x, &srv);
  char path[256], uri[512];
  snprintf (path, sizeof path, "%s/store.img", dir);
  cr_assert_eq (x.add_store_export (x.opaque, "b", path, 4 << 20, 0, uri, sizeof uri, &err), 0,
                "%s", err.msg);
  cr_assert (strstr (uri, "nbd+unix:///b?socket="));
  struct nbd_handle *hb = nbd_create ();
  cr_assert_eq (nbd_connect_uri (hb, uri), 0, "%s", nbd_get_error ());
  cr_assert_eq (nbd_get_size (hb), 4 << 20);
  char buf[4096];
  memset (buf, 0x3c, sizeof buf);
  cr_assert_eq (nbd_pwrite (hb, buf, sizeof buf, 8192, 0), 0);
  /* Duplicate names are refused. */
  cr_assert_eq (x.add_store_export (x.opaque, "b", path, 4 << 20, 0, uri, sizeof uri, &err), -1);
  cr_assert_eq (err.errnum, EEXIST);
  /* Remove "a": its connection is closed, new clients cannot find it, "b" works. */
  cr_assert_eq (x.remove_export (x.opaque, "a", &err), 0, "%s", err.msg);
  cr_assert_eq (nbd_pread (ha, buf, 512, 0, 0), -1);
  cr_assert (connect_to ("a") == NULL);
  cr_assert_eq (x.remove_export (x.opaque, "a", &err), -1);
  cr_assert_eq (err.errnum, ENOENT);
  memset (buf, 0, sizeof buf);
  cr_assert_eq (nbd_pread (hb, buf, sizeof buf, 8192, 0), 0);
  cr_assert_eq (buf[4095], 0x3c);
  nbd_close (ha);
  nbd_close (hb);
  /* Stop; afterwards admin calls fail with ESHUTDOWN. */
  uv_async_send (&stopper);
  pthread_join (t, NULL);
  cr_assert_eq (cbwd_server_remove_export (&srv, "b", &err), -1);
  cr_assert_eq (err.errnum, ESHUTDOWN);
  for (size_t i = 0; i < srv.exports.n; i++) cbwd_export_unref (srv.exports.v[i]);
  free (srv.exports.v);
  free (srv.first_listen);
  cr_assert_eq (uv_loop_close (srv.loop), 0);
  free (srv.loop);
  unlink (path);
  rmdir (dir);
}
