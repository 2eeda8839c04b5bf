/* cbw — server/tests/test_config_disks.c: the "disks" section of cbwd's
 * JSON config file as server/config.c parses it (the orchestrator checks
 * the disk-add keys themselves: server/orch/tests/test_config_disks.c).
 * Checked: shape errors name the file and the entry; relative image paths
 * become absolute against the config file's directory; "disks" without the
 * orchestrator (no disks_out) is an error; absent means NULL.
 * Locking: none (start-up code, one thread).
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <json-c/json.h>

#include "config.h"

static char dir[64], path[128];

static void
setup (void)
{
  strcpy (dir, "/tmp/cbw-cfg.XXXXXX");
  cr_assert_not_null (mkdtemp (dir));
  snprintf (path, sizeof path, "%s/cbwd.json", dir);
}

static void
teardown (void)
{
  unlink (path);
  rmdir (dir);
}

static int
load (const char *json, struct json_object **disks, struct cbw_err *err)
{
  static struct cbwd_server srv;
  FILE *f = fopen (path, "w");
  cr_assert_not_null (f);
  fputs (json, f);
  fclose (f);
  memset (&srv, 0, sizeof srv);
  memset (err, 0, sizeof *err);
  return cbwd_load_config_ex (path, &srv, disks, err);
}

static void
bad (const char *json, const char *needle)
{
  struct json_object *disks = (struct json_object *) 1;
  struct cbw_err err;
  cr_assert_eq (load (json, &disks, &err), -1, "accepted %s", json);
  cr_assert_null (disks);
  cr_assert_not_null (strstr (err.msg, needle), "\"%s\" not in: %s", needle, err.msg);
  cr_assert_not_null (strstr (err.msg, path), "file not named: %s", err.msg);
}

TestSuite (config_disks, .init = setup, .fini = teardown);

Test (config_disks, parsed_and_paths_resolved)
{
  struct json_object *disks = NULL, *d, *v;
  struct cbw_err err;
  cr_assert_eq (load ("{\"disks\":[{\"name\":\"vda\",\"file\":\"a.img\",\"granularity\":4096},"
                      "{\"name\":\"vdb\",\"file\":\"/abs/b.img\",\"other\":true},"
                      "{\"name\":\"vdc\",\"file\":\"../c.img\"}]}", &disks, &err), 0, "%s",
                err.msg);
  cr_assert_not_null (disks);
  cr_assert_eq (json_object_array_length (disks), 3);
  char want[192];
  snprintf (want, sizeof want, "%s/a.img", dir);
  d = json_object_array_get_idx (disks, 0);
  cr_assert (json_object_object_get_ex (d, "file", &v));
  cr_assert_str_eq (json_object_get_string (v), want);
  cr_assert (json_object_object_get_ex (d, "granularity", &v));
  cr_assert_eq (json_object_get_int64 (v), 4096);
  d = json_object_array_get_idx (disks, 1);
  json_object_object_get_ex (d, "file", &v);
  cr_assert_str_eq (json_object_get_string (v), "/abs/b.img");
  /* other keys are passed through for the orchestrator to check */
  cr_assert (json_object_object_get_ex (d, "other", NULL));
  d = json_object_array_get_idx (disks, 2);
  json_object_object_get_ex (d, "file", &v);
  snprintf (want, sizeof want, "%s/../c.img", dir);
  cr_assert_str_eq (json_object_get_string (v), want);
  json_object_put (disks);

  /* absent: NULL */
  disks = (struct json_object *) 1;
  cr_assert_eq (load ("{\"max-connections\":4}", &disks, &err), 0, "%s", err.msg);
  cr_assert_null (disks);
}

Test (config_disks, shape_errors)
{
  bad ("{\"disks\":{\"name\":\"vda\"}}", "\"disks\" must be an array");
  bad ("{\"disks\":[\"vda\"]}", "disks[0] must be an object");
  bad ("{\"disks\":[{\"name\":\"a\",\"file\":\"x\"},{\"file\":\"y\"}]}",
       "disks[1]: \"name\" (a string) is required");
  bad ("{\"disks\":[{\"name\":3}]}", "\"name\" (a string) is required");
  bad ("{\"disks\":[{\"name\":\"vda\",\"file\":5}]}", "disk \"vda\": key \"file\" must be a string");
  bad ("{\"disks\":[], \"disk\":[]}", "unknown key \"disk\"");
}

Test (config_disks, needs_the_orchestrator)
{
  struct cbw_err err;
  cr_assert_eq (load ("{\"disks\":[]}", NULL, &err), -1);
  cr_assert_not_null (strstr (err.msg, "needs the orchestrator"), "%s", err.msg);
  static struct cbwd_server srv;
  memset (&srv, 0, sizeof srv);
  cr_assert_eq (cbwd_load_config (path, &srv, &err), -1);
}
