/* cbw — server/orch/tests/test_commands.c: cbwd's control API without
 * nbdkit: every bad request gets the right error class and a message naming
 * the problem, and changes nothing (the state file's bytes are compared);
 * state directory locking; a corrupt state file refuses to start; the
 * committed docs/control/cbwd.md matches the table.
 * No locking concerns: requests go through cbw_ctl_dispatch_line on the
 * test thread (the supervisor thread runs but has nothing to watch).
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <xxhash.h>

#include "disk_id.h"
#include "fileutil.h"
#include "orch_internal.h"
#include "orch_test_util.h"

static char dir[64];
static struct cbw_orch *orch;

static void
setup (void)
{
  orch_test_mkdtemp (dir, sizeof dir, "orch-test");
  orch = orch_test_open (dir);
}

static void
teardown (void)
{
  cbw_orch_close (orch, true);
  orch_test_rm_rf (dir);
}

static struct json_object *
call (const char *line)
{
  return orch_test_call (orch, line);
}

static char *
state_bytes (void)
{
  char p[128], *buf = NULL;
  size_t len;
  struct cbw_err err = { 0 };
  snprintf (p, sizeof p, "%s/%s", dir, ORCH_STATE_FILE);
  if (cbw_read_file (p, 1 << 20, &buf, &len, &err) < 0)
    return strdup ("(none)");
  return buf;
}

static void
expect_error (const char *line, const char *cls, const char *needle)
{
  char *before = state_bytes ();
  struct json_object *j = call (line), *e, *c, *d;
  cr_assert (json_object_object_get_ex (j, "error", &e), "no error for %s: %s", line,
             json_object_to_json_string (j));
  json_object_object_get_ex (e, "class", &c);
  json_object_object_get_ex (e, "desc", &d);
  cr_assert_str_eq (json_object_get_string (c), cls, "for %s: %s", line,
                    json_object_get_string (d));
  cr_assert (strstr (json_object_get_string (d), needle) != NULL,
             "for %s: expected \"%s\" in \"%s\"", line, needle, json_object_get_string (d));
  json_object_put (j);
  char *after = state_bytes ();
  cr_assert_str_eq (before, after, "state changed by a failed request %s", line);
  free (before); free (after);
}

static struct json_object *
expect_ok (const char *line)
{
  struct json_object *j = call (line), *r;
  cr_assert (json_object_object_get_ex (j, "return", &r), "error for %s: %s", line,
             json_object_to_json_string (j));
  json_object_get (r);
  json_object_put (j);
  return r;
}

TestSuite (cmds, .init = setup, .fini = teardown);

Test (cmds, bad_requests)
{
  expect_error ("{\"execute\":\"no-such\"}", "CommandNotFound", "no-such");
  expect_error ("not json", "ParseError", "invalid JSON");
  expect_error ("{\"execute\":\"disk-add\"}", "InvalidParameter", "name");
  expect_error ("{\"execute\":\"disk-add\",\"arguments\":{\"name\":\"a\"}}",
                "InvalidParameter", "file");
  expect_error ("{\"execute\":\"disk-add\",\"arguments\":{\"name\":\"a\",\"file\":\"/x\","
                "\"bogus\":1}}", "InvalidParameter", "bogus");
  expect_error ("{\"execute\":\"disk-add\",\"arguments\":{\"name\":5,\"file\":\"/x\"}}",
                "InvalidParameter", "name");
  expect_error ("{\"execute\":\"disk-add\",\"arguments\":{\"name\":\"../etc\",\"file\":\"/etc/hostname\"}}",
                "InvalidParameter", "invalid disk name");
  expect_error ("{\"execute\":\"disk-add\",\"arguments\":{\"name\":\"a\",\"file\":\"/nonexistent/x.img\"}}",
                "NotFound", "/nonexistent/x.img");
  expect_error ("{\"execute\":\"disk-add\",\"arguments\":{\"name\":\"a\",\"file\":\"/tmp\"}}",
                "InvalidParameter", "not a regular file");
  expect_error ("{\"execute\":\"disk-add\",\"arguments\":{\"name\":\"a\",\"file\":\"/etc/hostname\","
                "\"granularity\":1000}}", "InvalidParameter", "power of two");
  expect_error ("{\"execute\":\"disk-add\",\"arguments\":{\"name\":\"a\",\"file\":\"/etc/hostname\","
                "\"granularity\":-4096}}", "InvalidParameter", "granularity");
  expect_error ("{\"execute\":\"disk-remove\",\"arguments\":{\"name\":\"zz\"}}", "NotFound", "zz");
  expect_error ("{\"execute\":\"disk-start\",\"arguments\":{\"name\":\"zz\"}}", "NotFound", "zz");
  expect_error ("{\"execute\":\"checkpoint-create\",\"arguments\":{\"name\":\"c1\"}}",
                "NotFound", "no disks");
  expect_error ("{\"execute\":\"checkpoint-create\",\"arguments\":{\"name\":\"c 1\"}}",
                "InvalidParameter", "invalid checkpoint name");
  expect_error ("{\"execute\":\"checkpoint-create\",\"arguments\":{\"name\":\"c1\",\"disks\":[1]}}",
                "InvalidParameter", "must be a string");
  expect_error ("{\"execute\":\"checkpoint-create\",\"arguments\":{\"name\":\"c1\",\"disks\":[]}}",
                "InvalidParameter", "1 to");
  expect_error ("{\"execute\":\"checkpoint-create\",\"arguments\":{\"name\":\"c1\",\"disks\":[\"x\"]}}",
                "NotFound", "no disk named x");
  expect_error ("{\"execute\":\"checkpoint-delete\",\"arguments\":{\"name\":\"c1\"}}",
                "NotFound", "c1");
  expect_error ("{\"execute\":\"checkpoint-list\",\"arguments\":{\"disk\":\"q\"}}",
                "NotFound", "q");
  expect_error ("{\"execute\":\"backup-begin\",\"arguments\":{\"disks\":[\"x\"],\"mode\":\"weird\"}}",
                "InvalidParameter", "mode");
  expect_error ("{\"execute\":\"backup-begin\",\"arguments\":{\"disks\":[\"x\"],\"mode\":\"incremental\"}}",
                "InvalidParameter", "since");
  expect_error ("{\"execute\":\"backup-begin\",\"arguments\":{\"disks\":[\"x\"],\"since\":\"c\"}}",
                "InvalidParameter", "only makes sense");
  expect_error ("{\"execute\":\"backup-begin\",\"arguments\":{\"disks\":[\"x\"],\"freeze-timeout\":0}}",
                "InvalidParameter", "freeze-timeout");
  expect_error ("{\"execute\":\"backup-begin\",\"arguments\":{\"disks\":[\"x\",\"x\"]}}",
                "InvalidParameter", "twice");
  expect_error ("{\"execute\":\"backup-begin\",\"arguments\":{\"disks\":[\"x\"]}}",
                "NotFound", "no disk named x");
  expect_error ("{\"execute\":\"backup-end\"}", "NotFound", "no backup");
  expect_error ("{\"execute\":\"backup-status\"}", "NotFound", "no backup");
  expect_error ("{\"execute\":\"event-list\",\"arguments\":{\"since\":\"x\"}}",
                "InvalidParameter", "since");
}

Test (cmds, status_and_events)
{
  struct json_object *r = expect_ok ("{\"execute\":\"status\"}"), *v;
  cr_assert (json_object_object_get_ex (r, "disks", &v));
  cr_assert_eq (json_object_get_int (v), 0);
  json_object_put (r);
  r = expect_ok ("{\"execute\":\"event-list\"}");
  cr_assert (json_object_object_get_ex (r, "events", &v));
  cr_assert_geq (json_object_array_length (v), 1);
  struct json_object *e = json_object_array_get_idx (v, 0), *name;
  json_object_object_get_ex (e, "event", &name);
  cr_assert_str_eq (json_object_get_string (name), "started");
  json_object_put (r);
  r = expect_ok ("{\"execute\":\"event-list\",\"arguments\":{\"since\":1000}}");
  cr_assert (json_object_object_get_ex (r, "events", &v));
  cr_assert_eq (json_object_array_length (v), 0);
  json_object_put (r);
}

Test (cmds, disk_add_without_modules_changes_nothing)
{
  char img[128];
  snprintf (img, sizeof img, "%s.img", dir);   /* not in the state directory */
  FILE *f = fopen (img, "w");
  cr_assert_not_null (f);
  fclose (f);
  char line[512];
  snprintf (line, sizeof line, "{\"execute\":\"disk-add\",\"arguments\":{\"name\":\"a\","
            "\"file\":\"%s\"}}", img);
  struct json_object *j = call (line), *e;
  cr_assert (json_object_object_get_ex (j, "error", &e));
  cr_assert (strstr (json_object_to_json_string (e), "is it built?") != NULL,
             "%s", json_object_to_json_string (e));
  json_object_put (j);
  struct json_object *r = expect_ok ("{\"execute\":\"disk-list\"}"), *d;
  json_object_object_get_ex (r, "disks", &d);
  cr_assert_eq (json_object_array_length (d), 0);
  json_object_put (r);
  unlink (img);
}

Test (cmds, second_daemon_is_refused)
{
  struct cbw_err err = { 0 };
  struct cbw_orch_config cfg = { .state_dir = dir };
  struct cbw_orch *o2 = cbw_orch_open (&cfg, &err);
  cr_assert_null (o2);
  cr_assert_eq (err.errnum, EBUSY);
  cr_assert (strstr (err.msg, "in use by another cbwd") != NULL, "%s", err.msg);
}

Test (startup, corrupt_state_refused)
{
  char d[] = "/tmp/cbw-orch-test.XXXXXX", p[128];
  cr_assert_not_null (mkdtemp (d));
  snprintf (p, sizeof p, "%s/%s", d, ORCH_STATE_FILE);
  FILE *f = fopen (p, "w");
  fputs ("{\"format\":\"cbwd-state\",\"version\":1,\"body\":{},\"checksum\":\"xxh64:0\"}", f);
  fclose (f);
  struct cbw_err err = { 0 };
  struct cbw_orch_config cfg = { .state_dir = d };
  cr_assert_null (cbw_orch_open (&cfg, &err));
  cr_assert (strstr (err.msg, p) && strstr (err.msg, "bad checksum"), "%s", err.msg);
  orch_test_rm_rf (d);
}

/* The id of a disk in cbwd-state.json, or "" (caller frees). */
static char *
state_disk_id (const char *path)
{
  char *buf = NULL;
  size_t len;
  struct cbw_err err = { 0 };
  cr_assert_eq (cbw_read_file (path, 1 << 20, &buf, &len, &err), 0, "%s", err.msg);
  struct json_object *top = json_tokener_parse (buf), *body, *disks, *id;
  free (buf);
  cr_assert (json_object_object_get_ex (top, "body", &body));
  cr_assert (json_object_object_get_ex (body, "disks", &disks));
  struct json_object *d0 = json_object_array_get_idx (disks, 0);
  char *r = strdup (json_object_object_get_ex (d0, "id", &id) ? json_object_get_string (id) : "");
  json_object_put (top);
  return r;
}

/* A state file of an older cbwd (disks without "id"): its disks get an id
 * at start-up, saved at once, and the same id from then on. */
Test (startup, disk_ids_added_at_load)
{
  char d[] = "/tmp/cbw-orch-test.XXXXXX", p[128];
  cr_assert_not_null (mkdtemp (d));
  snprintf (p, sizeof p, "%s/%s", d, ORCH_STATE_FILE);
  struct orch_state st = { 0 };
  st.generation = 1;
  st.ndisks = 1;
  st.disks = calloc (1, sizeof *st.disks);
  st.disks[0] = orch_disk_new (d, "vda", "/nonexistent/a.img", 65536);
  struct json_object *top = orch_state_to_json (&st), *body, *disks;
  orch_state_free (&st);
  json_object_object_get_ex (top, "body", &body);
  json_object_object_get_ex (body, "disks", &disks);
  json_object_object_del (json_object_array_get_idx (disks, 0), "id");
  const char *t = json_object_to_json_string_ext (body, JSON_C_TO_STRING_PLAIN);
  char sum[40];
  snprintf (sum, sizeof sum, "xxh64:%016llx", (unsigned long long) XXH64 (t, strlen (t), 0));
  json_object_object_add (top, "checksum", json_object_new_string (sum));
  t = json_object_to_json_string_ext (top, JSON_C_TO_STRING_PLAIN);
  struct cbw_err err = { 0 };
  cr_assert_eq (cbw_write_file_atomic (p, t, strlen (t), &err), 0, "%s", err.msg);
  json_object_put (top);
  char *before = state_disk_id (p);
  cr_assert_str_eq (before, "", "the old file already has an id");

  struct cbw_orch_config cfg = { .state_dir = d };
  struct cbw_orch *o = cbw_orch_open (&cfg, &err);
  cr_assert_not_null (o, "%s", err.msg);
  char *saved = state_disk_id (p);
  cr_assert (cbw_disk_id_valid (saved), "id not saved at load: \"%s\"", saved);
  cr_assert_str_eq (o->st.disks[0]->id, saved);
  cbw_orch_close (o, false);
  o = cbw_orch_open (&cfg, &err);
  cr_assert_not_null (o, "%s", err.msg);
  cr_assert_str_eq (o->st.disks[0]->id, saved, "the id changed across a restart");
  cbw_orch_close (o, false);
  free (before);
  free (saved);
  orch_test_rm_rf (d);
}

/* A disk's own settings survive a restart: the state file's disks read
 * back by a new orchestrator serialise to the same JSON (cbw-timeout-ms
 * was once dropped at load, so a restarted cbwd ran the disk with the
 * default bound). */
Test (startup, disk_settings_survive_restart)
{
  char d[] = "/tmp/cbw-orch-test.XXXXXX";
  cr_assert_not_null (mkdtemp (d));
  struct orch_state st = { 0 };
  st.generation = 1;
  st.ndisks = 1;
  st.disks = calloc (1, sizeof *st.disks);
  st.disks[0] = orch_disk_new (d, "vda", "/nonexistent/a.img", 65536);
  st.disks[0]->force_share = true;
  orch_disk_set_cbw_timeout (st.disks[0], 1234);
  struct json_object *want = orch_state_to_json (&st), *wbody, *wdisks;
  json_object_object_get_ex (want, "body", &wbody);
  json_object_object_get_ex (wbody, "disks", &wdisks);
  const char *t = json_object_to_json_string_ext (want, JSON_C_TO_STRING_PLAIN);
  char p[128];
  snprintf (p, sizeof p, "%s/%s", d, ORCH_STATE_FILE);
  struct cbw_err err = { 0 };
  cr_assert_eq (cbw_write_file_atomic (p, t, strlen (t), &err), 0, "%s", err.msg);
  orch_state_free (&st);

  struct cbw_orch_config cfg = { .state_dir = d };
  struct cbw_orch *o = cbw_orch_open (&cfg, &err);
  cr_assert_not_null (o, "%s", err.msg);
  cr_assert_eq (orch_disk_cbw_timeout (o->st.disks[0]), 1234);
  struct json_object *got = orch_state_to_json (&o->st), *gbody, *gdisks;
  json_object_object_get_ex (got, "body", &gbody);
  json_object_object_get_ex (gbody, "disks", &gdisks);
  cr_assert_str_eq (json_object_to_json_string_ext (gdisks, JSON_C_TO_STRING_PLAIN),
                    json_object_to_json_string_ext (wdisks, JSON_C_TO_STRING_PLAIN),
                    "a disk changed across a restart");
  json_object_put (got);
  json_object_put (want);
  cbw_orch_close (o, false);
  orch_test_rm_rf (d);
}

Test (docs, committed_reference_matches_table)
{
  char *md = cbw_ctl_docs_markdown (&cbw_orch_ctl_table), *file = NULL;
  size_t len;
  struct cbw_err err = { 0 };
  cr_assert_not_null (md);
  cr_assert_eq (cbw_read_file (CBW_SRC_DIR "/docs/control/cbwd.md", 1 << 20, &file, &len,
                               &err), 0, "%s", err.msg);
  cr_assert_str_eq (file, md, "docs/control/cbwd.md is stale: regenerate with "
                    "`cbwd-orch --control-docs > docs/control/cbwd.md`");
  free (md);
  free (file);
}

/* disk-commit's LAYER arguments: indices and names resolve against the
 * chain's layers; every bad combination is refused naming the problem. */
static struct json_object *
test_layers (unsigned n)
{
  struct json_object *a = json_object_new_array ();
  for (unsigned i = 0; i <= n; i++) {
    struct json_object *l = json_object_new_object ();
    char nm[32];
    snprintf (nm, sizeof nm, i ? "ovl-%u" : "/img/base.raw", i);
    json_object_object_add (l, "index", json_object_new_int ((int) i));
    json_object_object_add (l, "name", json_object_new_string (nm));
    json_object_array_add (a, l);
  }
  return a;
}

static void
range_ok (struct json_object *l, const char *base, const char *top, unsigned lo, unsigned hi)
{
  struct cbw_err e = { 0 };
  unsigned rl = 99, rh = 99;
  cr_assert_eq (orch_commit_range ("vda", l, base, top, &rl, &rh, &e), 0,
                "base %s top %s: %s", base ? base : "-", top ? top : "-", e.msg);
  cr_assert_eq (rl, lo, "base %s top %s: lo %u", base ? base : "-", top ? top : "-", rl);
  cr_assert_eq (rh, hi, "base %s top %s: hi %u", base ? base : "-", top ? top : "-", rh);
}

static void
range_bad (struct json_object *l, const char *base, const char *top, const char *needle)
{
  struct cbw_err e = { 0 };
  unsigned rl = 99, rh = 99;
  cr_assert_eq (orch_commit_range ("vda", l, base, top, &rl, &rh, &e), -1,
                "base %s top %s accepted", base ? base : "-", top ? top : "-");
  cr_assert_eq (e.errnum, EINVAL);
  cr_assert_not_null (strstr (e.msg, needle), "base %s top %s: '%s' lacks '%s'",
                      base ? base : "-", top ? top : "-", e.msg, needle);
  cr_assert_eq (rl, 99);
}

Test (commit_range, layers_by_index_and_name)
{
  struct json_object *l = test_layers (4), *none = test_layers (0);
  range_ok (l, NULL, NULL, 4, 4);             /* active top into the layer below */
  range_ok (l, "0", NULL, 1, 4);              /* everything into the image */
  range_ok (l, "0", "3", 1, 3);               /* intermediate */
  range_ok (l, NULL, "3", 3, 3);
  range_ok (l, "/img/base.raw", "ovl-3", 1, 3);
  range_ok (l, "ovl-1", "ovl-2", 2, 2);
  range_bad (none, NULL, NULL, "no overlay to commit");
  range_bad (l, NULL, "ovl-9", "no layer of that name");
  range_bad (l, "nope", NULL, "no layer of that name");
  range_bad (l, "5", NULL, "layers are 0..4");
  range_bad (l, NULL, "99999999999999999999", "layers are 0..4");
  range_bad (l, NULL, "0", "is the image");
  range_bad (l, "4", NULL, "is the active layer");
  range_bad (l, "ovl-4", "ovl-4", "is the active layer");
  range_bad (l, "3", "3", "is not below --top");
  range_bad (l, "3", "2", "is not below --top");
  range_bad (l, "", NULL, "empty layer");
  json_object_put (l);
  json_object_put (none);
}
