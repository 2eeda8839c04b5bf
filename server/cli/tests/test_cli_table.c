/* cbw — server/cli/tests/test_cli_table.c: the `cbw` CLI's subcommand table
 * (subs[] in server/cli/cbw.c) checked against cbwd's control command table
 * (cbw_orch_ctl_table, server/orch/commands.c), so that the two lists
 * cannot drift apart:
 *   - every subcommand sends a command cbwd has;
 *   - its positional argument and every option map to an argument of that
 *     command, of a compatible JSON type (or are listed in cli_only[]: the
 *     CLI consumes them itself);
 *   - every required argument of the command is reachable from the CLI;
 *   - every argument of every command that no subcommand exposes is listed
 *     in not_exposed[] with the reason; a listed one that the CLI does
 *     expose, or that cbwd no longer has, is an error too (stale list).
 * A row added to one table only fails here.  New rows in both tables with
 * compatible types need nothing here.
 *
 * The test includes cbw.c to see its static table (its main is renamed).
 *
 * Locking: single-threaded.
 */
#define main cbw_cli_main
#include "../cbw.c"
#undef main

#include <criterion/criterion.h>

#include "orch.h"

/* Options the CLI consumes itself (never sent). */
static const struct { const char *command, *key, *why; } cli_only[] = {
  { "disk-commit", "wait", "`cbw disk commit --wait` follows the commit's events itself" },
};

/* Arguments of cbwd's commands that the CLI does not offer, and why. */
static const struct { const char *command, *arg, *why; } not_exposed[] = {
#include "cli_not_exposed.h"
};

static const struct cbw_ctl_command *
find_command (const char *name)
{
  for (const struct cbw_ctl_command *c = cbw_orch_ctl_table.commands; c->name; c++)
    if (strcmp (c->name, name) == 0)
      return c;
  return NULL;
}

static const struct cbw_ctl_arg *
find_arg (const struct cbw_ctl_command *c, const char *name)
{
  for (const struct cbw_ctl_arg *a = c->args; a && a->name; a++)
    if (strcmp (a->name, name) == 0)
      return a;
  return NULL;
}

static bool
is_cli_only (const char *command, const char *key)
{
  for (size_t i = 0; i < sizeof cli_only / sizeof cli_only[0]; i++)
    if (strcmp (cli_only[i].command, command) == 0 && strcmp (cli_only[i].key, key) == 0)
      return true;
  return false;
}

static bool
is_listed_not_exposed (const char *command, const char *arg)
{
  for (size_t i = 0; i < sizeof not_exposed / sizeof not_exposed[0]; i++)
    if (strcmp (not_exposed[i].command, command) == 0 && strcmp (not_exposed[i].arg, arg) == 0)
      return true;
  return false;
}

/* The JSON type an option type sends. */
static bool
compatible (enum opt_type o, enum cbw_ctl_arg_type t)
{
  switch (o) {
  case O_STR: case O_DIR: case O_FULL: case O_INCR:
    return t == CBW_ARG_STRING;
  case O_UINT: case O_SIZE: case O_SECS:
    return t == CBW_ARG_UINT || t == CBW_ARG_INT;
  case O_BOOL:
    return t == CBW_ARG_BOOL;
  case O_LIST: case O_TARGET:
    return t == CBW_ARG_ARRAY;
  }
  return false;
}

/* The JSON keys an option sends (O_FULL and O_INCR set "mode"; O_INCR
 * also "since"). */
static size_t
option_keys (const struct opt *o, const char *keys[2])
{
  if (o->type == O_FULL) {
    keys[0] = "mode";
    return 1;
  }
  if (o->type == O_INCR) {
    keys[0] = "mode";
    keys[1] = "since";
    return 2;
  }
  keys[0] = o->key;
  return 1;
}

/* Does any subcommand that sends `command` expose argument `arg`? */
static bool
exposed (const char *command, const char *arg)
{
  for (const struct sub *s = subs; s->group; s++) {
    if (s->command == NULL || strcmp (s->command, command) != 0)
      continue;
    if (s->positional && strcmp (s->positional, arg) == 0)
      return true;
    for (const struct opt *o = s->opts; o->flag; o++) {
      const char *keys[2];
      size_t n = option_keys (o, keys);
      for (size_t k = 0; k < n; k++)
        if (strcmp (keys[k], arg) == 0)
          return true;
    }
  }
  return false;
}

Test (cli_table, every_option_maps_to_an_argument)
{
  int bad = 0;
  for (const struct sub *s = subs; s->group; s++) {
    const struct cbw_ctl_command *c = find_command (s->command);
    if (c == NULL) {
      cr_log_error ("cbw %s %s sends \"%s\", which cbwd does not have", s->group,
                    s->verb ? s->verb : "", s->command);
      bad++;
      continue;
    }
    if (s->positional) {
      const struct cbw_ctl_arg *a = find_arg (c, s->positional);
      if (a == NULL || a->type != CBW_ARG_STRING) {
        cr_log_error ("cbw %s %s: positional %s is %s of %s", s->group, s->verb,
                      s->positional, a ? "not a string argument" : "not an argument",
                      s->command);
        bad++;
      }
    }
    for (const struct opt *o = s->opts; o->flag; o++) {
      const char *keys[2];
      size_t n = option_keys (o, keys);
      for (size_t k = 0; k < n; k++) {
        if (is_cli_only (s->command, keys[k]))
          continue;
        const struct cbw_ctl_arg *a = find_arg (c, keys[k]);
        if (a == NULL) {
          cr_log_error ("cbw %s %s %s sends \"%s\", not an argument of %s", s->group,
                        s->verb ? s->verb : "", o->flag, keys[k], s->command);
          bad++;
        }
        else if (!compatible (o->type, a->type)) {
          cr_log_error ("cbw %s %s %s: its type does not fit %s's argument \"%s\"",
                        s->group, s->verb ? s->verb : "", o->flag, s->command, keys[k]);
          bad++;
        }
      }
    }
  }
  cr_expect_eq (bad, 0, "%d CLI options do not match cbwd's command table", bad);
}

Test (cli_table, every_argument_is_exposed_or_listed)
{
  int bad = 0;
  for (const struct cbw_ctl_command *c = cbw_orch_ctl_table.commands; c->name; c++)
    for (const struct cbw_ctl_arg *a = c->args; a && a->name; a++) {
      bool e = exposed (c->name, a->name), l = is_listed_not_exposed (c->name, a->name);
      if (!e && !l) {
        cr_log_error ("%s argument \"%s\"%s is not offered by cbw: add an option to subs[] "
                      "in server/cli/cbw.c, or list it with the reason in "
                      "server/cli/tests/cli_not_exposed.h", c->name, a->name,
                      a->required ? " (required)" : "");
        bad++;
      }
      if (e && l) {
        cr_log_error ("%s argument \"%s\" is offered by cbw but listed as not exposed "
                      "(server/cli/tests/cli_not_exposed.h)", c->name, a->name);
        bad++;
      }
    }
  cr_expect_eq (bad, 0, "%d arguments of cbwd's commands are neither offered nor listed", bad);
}

Test (cli_table, required_arguments_are_reachable)
{
  int bad = 0;
  for (const struct sub *s = subs; s->group; s++) {
    const struct cbw_ctl_command *c = find_command (s->command);
    for (const struct cbw_ctl_arg *a = c ? c->args : NULL; a && a->name; a++)
      if (a->required && !exposed (c->name, a->name)) {
        cr_log_error ("cbw %s %s cannot send %s's required argument \"%s\"", s->group,
                      s->verb ? s->verb : "", c->name, a->name);
        bad++;
      }
  }
  cr_expect_eq (bad, 0, "%d required arguments unreachable from the CLI", bad);
}

Test (cli_table, not_exposed_list_is_current)
{
  int bad = 0;
  for (size_t i = 0; i < sizeof not_exposed / sizeof not_exposed[0]; i++) {
    const struct cbw_ctl_command *c = find_command (not_exposed[i].command);
    if (c == NULL || find_arg (c, not_exposed[i].arg) == NULL) {
      cr_log_error ("cli_not_exposed.h lists %s \"%s\", which cbwd does not have",
                    not_exposed[i].command, not_exposed[i].arg);
      bad++;
    }
    if (not_exposed[i].why == NULL || not_exposed[i].why[0] == '\0') {
      cr_log_error ("cli_not_exposed.h: %s \"%s\" without a reason", not_exposed[i].command,
                    not_exposed[i].arg);
      bad++;
    }
  }
  for (size_t i = 0; i < sizeof cli_only / sizeof cli_only[0]; i++) {
    const struct cbw_ctl_command *c = find_command (cli_only[i].command);
    if (c == NULL) {
      cr_log_error ("cli_only lists %s, which cbwd does not have", cli_only[i].command);
      bad++;
    }
  }
  cr_expect_eq (bad, 0, "%d stale rows", bad);
}
