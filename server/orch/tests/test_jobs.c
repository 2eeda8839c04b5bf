/* cbw — server/orch/tests/test_jobs.c: push-job control requests without
 * nbdkit: bad requests get the right error class and a message naming the
 * problem; STATE/jobs.json of a previous run: a job that was running or
 * paused is reported failed ("interrupted") with a job-failed event, finished
 * ones keep their state, a corrupt file does not stop the daemon (event
 * jobs-file-invalid), and the file is rewritten with the verdicts.
 * No locking concerns: requests go through cbw_ctl_dispatch_line on the
 * test thread; no job thread is ever started here.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fileutil.h"
#include "orch_internal.h"
#include "orch_test_util.h"

static char dir[64];
static struct cbw_orch *orch;

static void
open_orch (void)
{
  orch = orch_test_open (dir);
}

static void
setup (void)
{
  orch_test_mkdtemp (dir, sizeof dir, "jobs-test");
}

static void
teardown (void)
{
  if (orch)
    cbw_orch_close (orch, true);
  orch = NULL;
  orch_test_rm_rf (dir);
}

static struct json_object *
call (const char *line)
{
  return orch_test_call (orch, line);
}

static void
expect_error (const char *line, const char *cls, const char *needle)
{
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

static const char *
jstr (struct json_object *o, const char *k)
{
  struct json_object *v;
  if (!json_object_object_get_ex (o, k, &v) || v == NULL)
    return NULL;
  return json_object_get_string (v);
}

static void
write_jobs_file (const char *text)
{
  char p[128];
  struct cbw_err err = { 0 };
  snprintf (p, sizeof p, "%s/jobs.json", dir);
  cr_assert_eq (cbw_write_file_atomic (p, text, strlen (text), &err), 0, "%s", err.msg);
}

/* Number of events of a type naming job id. */
static int
count_events (const char *type, const char *job)
{
  struct json_object *r = expect_ok ("{\"execute\":\"event-list\"}"), *a;
  cr_assert (json_object_object_get_ex (r, "events", &a));
  int n = 0;
  for (size_t i = 0; i < json_object_array_length (a); i++) {
    struct json_object *e = json_object_array_get_idx (a, i), *d;
    const char *t = jstr (e, "event");
    if (t && strcmp (t, type) == 0) {
      if (job == NULL)
        n++;
      else if (json_object_object_get_ex (e, "data", &d) && jstr (d, "job") &&
               strcmp (jstr (d, "job"), job) == 0)
        n++;
    }
  }
  json_object_put (r);
  return n;
}

TestSuite (jobs, .init = setup, .fini = teardown);

Test (jobs, bad_requests)
{
  open_orch ();
  expect_error ("{\"execute\":\"job-start\"}", "InvalidParameter", "targets");
  expect_error ("{\"execute\":\"job-start\",\"arguments\":{\"targets\":[]}}",
                "InvalidParameter", "1 to");
  expect_error ("{\"execute\":\"job-start\",\"arguments\":{\"targets\":[7]}}",
                "InvalidParameter", "must be a string");
  expect_error ("{\"execute\":\"job-start\",\"arguments\":{\"targets\":[\"/tmp/x.raw\"]}}",
                "NotFound", "no backup is running");
  expect_error ("{\"execute\":\"job-start\",\"arguments\":{\"targets\":[\"/tmp/x.raw\"],"
                "\"requests\":65}}", "InvalidParameter", "requests must be 1..64");
  expect_error ("{\"execute\":\"job-start\",\"arguments\":{\"targets\":[\"/tmp/x.raw\"],"
                "\"request-size\":100000}}", "InvalidParameter", "power of two");
  expect_error ("{\"execute\":\"job-start\",\"arguments\":{\"targets\":[\"/tmp/x.raw\"],"
                "\"id\":\"../x\"}}", "InvalidParameter", "invalid job id");
  expect_error ("{\"execute\":\"job-start\",\"arguments\":{\"targets\":[\"/tmp/x.raw\"],"
                "\"speed\":-1}}", "InvalidParameter", "speed");
  expect_error ("{\"execute\":\"job-status\",\"arguments\":{\"id\":\"nope\"}}", "NotFound",
                "no job named nope");
  expect_error ("{\"execute\":\"job-status\"}", "InvalidParameter", "id");
  expect_error ("{\"execute\":\"job-pause\",\"arguments\":{\"id\":\"nope\"}}", "NotFound", "nope");
  expect_error ("{\"execute\":\"job-resume\",\"arguments\":{\"id\":\"nope\"}}", "NotFound", "nope");
  expect_error ("{\"execute\":\"job-cancel\",\"arguments\":{\"id\":\"nope\"}}", "NotFound", "nope");
  expect_error ("{\"execute\":\"job-set-speed\",\"arguments\":{\"id\":\"nope\",\"speed\":1}}",
                "NotFound", "nope");
  expect_error ("{\"execute\":\"job-set-speed\",\"arguments\":{\"id\":\"nope\"}}",
                "InvalidParameter", "speed");
  struct json_object *r = expect_ok ("{\"execute\":\"job-list\"}"), *a;
  cr_assert (json_object_object_get_ex (r, "jobs", &a));
  cr_assert_eq (json_object_array_length (a), 0);
  json_object_put (r);
  char p[128];
  snprintf (p, sizeof p, "%s/jobs.json", dir);
  cr_assert_neq (access (p, F_OK), 0, "a refused job wrote the job list");
}

Test (jobs, interrupted_after_restart)
{
  /* helper-pid 1 is never our qemu-nbd (its cmdline does not name the
   * socket): it must not be killed, the job must still be failed. */
  write_jobs_file (
    "{\"format\":\"cbwd-jobs\",\"version\":1,\"jobs\":["
    "{\"id\":\"job-3\",\"backup\":\"b\",\"mode\":\"full\",\"state\":\"running\","
    " \"bytes-done\":100,\"bytes-total\":1000,\"backup-started\":5,"
    " \"disks\":[{\"name\":\"vda\",\"target\":\"/x.qcow2\",\"format\":\"qcow2\","
    "   \"released-bytes\":100,\"helper-pid\":1,\"helper-socket\":\"/nonexistent/s.sock\"}]},"
    "{\"id\":\"p\",\"backup\":\"b\",\"mode\":\"full\",\"state\":\"paused\",\"disks\":[]},"
    "{\"id\":\"done\",\"backup\":\"b\",\"mode\":\"incremental\",\"state\":\"completed\","
    " \"bytes-done\":7,\"bytes-total\":7,\"disks\":[]},"
    "{\"id\":\"bad/id\",\"state\":\"running\"},"
    "42]}");
  open_orch ();
  struct json_object *j = expect_ok ("{\"execute\":\"job-status\",\"arguments\":{\"id\":\"job-3\"}}");
  cr_assert_str_eq (jstr (j, "state"), "failed");
  cr_assert_not_null (jstr (j, "error"));
  cr_assert (strncmp (jstr (j, "error"), "interrupted", 11) == 0, "%s", jstr (j, "error"));
  cr_assert (strstr (jstr (j, "error"), "100 of 1000 bytes") != NULL, "%s", jstr (j, "error"));
  json_object_put (j);
  j = expect_ok ("{\"execute\":\"job-status\",\"arguments\":{\"id\":\"p\"}}");
  cr_assert_str_eq (jstr (j, "state"), "failed");
  json_object_put (j);
  j = expect_ok ("{\"execute\":\"job-status\",\"arguments\":{\"id\":\"done\"}}");
  cr_assert_str_eq (jstr (j, "state"), "completed");
  cr_assert_null (jstr (j, "error"));
  json_object_put (j);
  expect_error ("{\"execute\":\"job-status\",\"arguments\":{\"id\":\"bad/id\"}}", "NotFound", "bad/id");
  cr_assert_eq (count_events ("job-failed", "job-3"), 1);
  cr_assert_eq (count_events ("job-failed", "p"), 1);
  cr_assert_eq (count_events ("job-failed", "done"), 0);
  expect_error ("{\"execute\":\"job-pause\",\"arguments\":{\"id\":\"job-3\"}}", "GenericError",
                "job job-3 is failed: it cannot be paused");
  expect_error ("{\"execute\":\"job-cancel\",\"arguments\":{\"id\":\"done\"}}", "GenericError",
                "completed already");
  expect_error ("{\"execute\":\"job-set-speed\",\"arguments\":{\"id\":\"done\",\"speed\":5}}",
                "GenericError", "cannot change");
  cr_assert_eq (kill (1, 0), 0);

  /* The verdicts were written back: a second restart reports nothing new. */
  cbw_orch_close (orch, true);
  orch = NULL;
  open_orch ();
  j = expect_ok ("{\"execute\":\"job-status\",\"arguments\":{\"id\":\"job-3\"}}");
  cr_assert_str_eq (jstr (j, "state"), "failed");
  json_object_put (j);
  cr_assert_eq (count_events ("job-failed", NULL), 0);
}

Test (jobs, corrupt_file)
{
  write_jobs_file ("{\"format\":\"something-else\",\"jobs\":[]}");
  open_orch ();
  cr_assert_eq (count_events ("jobs-file-invalid", NULL), 1);
  struct json_object *r = expect_ok ("{\"execute\":\"job-list\"}"), *a;
  cr_assert (json_object_object_get_ex (r, "jobs", &a));
  cr_assert_eq (json_object_array_length (a), 0);
  json_object_put (r);
  cbw_orch_close (orch, true);
  orch = NULL;
  write_jobs_file ("{\"format\":\"cbwd-jobs\",\"jobs\":[{\"id\":\"x\",\"state\":\"runn");
  open_orch ();
  cr_assert_eq (count_events ("jobs-file-invalid", NULL), 1);
}
