/* cbw — server/orch/tests/orch_test_util.c: see orch_test_util.h. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ctl_test_util.h"
#include "orch_test_util.h"

void
orch_test_mkdtemp (char *dir, size_t size, const char *tag)
{
  int n = snprintf (dir, size, "/tmp/cbw-%s.XXXXXX", tag);
  cr_assert (n > 0 && (size_t) n < size, "directory name too long");
  cr_assert_not_null (mkdtemp (dir));
}

struct cbw_orch *
orch_test_open (const char *dir)
{
  struct cbw_err err = { 0 };
  char mods[256];
  snprintf (mods, sizeof mods, "%s/no-modules", dir);
  mkdir (mods, 0700);
  struct cbw_orch_config cfg = { .state_dir = dir, .module_dir = mods, .start_timeout = 5 };
  struct cbw_orch *o = cbw_orch_open (&cfg, &err);
  cr_assert_not_null (o, "%s", err.msg);
  return o;
}

void
orch_test_rm_rf (const char *dir)
{
  char cmd[300];
  snprintf (cmd, sizeof cmd, "rm -rf '%s'", dir);
  cr_assert_eq (system (cmd), 0);
}

struct json_object *
orch_test_call (struct cbw_orch *o, const char *line)
{
  return ctl_test_call (&cbw_orch_ctl_table, o, line);
}
