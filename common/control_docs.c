/* cbw — common/control_docs.c: a command table described for people and
 * programs: the built-in "query-commands" (the table as JSON, plus the
 * markdown) and cbw_ctl_docs_markdown(), the module's command reference
 * that the docs/control pages are generated from and checked against.
 *
 * Threads and locking: reads only the constant tables; any thread.
 */
#include <stdio.h>
#include <stdlib.h>

#include <json-c/json.h>

#include "control_internal.h"

/* ---- the built-in commands ---------------------------------------------- */

const char *
cbw_ctl__arg_type_name (enum cbw_ctl_arg_type t)
{
  switch (t) {
  case CBW_ARG_STRING: return "string";
  case CBW_ARG_INT: return "int";
  case CBW_ARG_UINT: return "uint";
  case CBW_ARG_BOOL: return "bool";
  case CBW_ARG_OBJECT: return "object";
  case CBW_ARG_ARRAY: return "array";
  }
  return "?";
}

int
cbw_ctl__query_commands (void *ctxv, struct json_object *args,
                struct cbw_ctl_reply *reply)
{
  const struct builtin_ctx *ctx = ctxv;
  struct json_object *ret, *list;
  char *md;

  (void) args;
  ret = json_object_new_object ();
  list = json_object_new_array ();
  if (ret == NULL || list == NULL) {
    json_object_put (ret);
    json_object_put (list);
    return cbw_ctl_fail (reply, CBW_CTL_GENERIC_ERROR, "out of memory");
  }
  json_object_object_add (ret, "commands", list);
  FOR_EACH_COMMAND (ctx->table, cmd, pass) {
    struct json_object *c = json_object_new_object ();
    struct json_object *al = json_object_new_array ();
    const struct cbw_ctl_arg *a;

    (void) pass;
    json_object_object_add (c, "name", json_object_new_string (cmd->name));
    json_object_object_add (c, "doc",
                            json_object_new_string (cmd->doc ? cmd->doc : ""));
    for (a = cmd->args; a && a->name; ++a) {
      struct json_object *ao = json_object_new_object ();
      json_object_object_add (ao, "name", json_object_new_string (a->name));
      json_object_object_add (ao, "type", json_object_new_string
                              (cbw_ctl__arg_type_name (a->type)));
      json_object_object_add (ao, "required",
                              json_object_new_boolean (a->required));
      json_object_object_add (ao, "doc",
                              json_object_new_string (a->doc ? a->doc : ""));
      json_object_array_add (al, ao);
    }
    json_object_object_add (c, "args", al);
    json_object_object_add (c, "returns",
                            json_object_new_string (cmd->returns_doc
                                                    ? cmd->returns_doc : ""));
    json_object_array_add (list, c);
  }
  md = cbw_ctl_docs_markdown (ctx->table);
  if (md == NULL) {
    json_object_put (ret);
    return cbw_ctl_fail (reply, CBW_CTL_GENERIC_ERROR, "out of memory");
  }
  json_object_object_add (ret, "markdown", json_object_new_string (md));
  free (md);
  reply->ret = ret;
  return 0;
}

/* ---- markdown reference ------------------------------------------------- */

char *
cbw_ctl_docs_markdown (const struct cbw_ctl_table *table)
{
  char *buf = NULL;
  size_t len = 0;
  FILE *fp = open_memstream (&buf, &len);

  if (fp == NULL)
    return NULL;
  fprintf (fp, "# `%s` control commands\n\n", table->module);
  fprintf (fp, "Requests and replies follow the cbw control protocol "
           "(docs/control-protocol.md).\n");
  FOR_EACH_COMMAND (table, cmd, pass) {
    const struct cbw_ctl_arg *a;

    (void) pass;
    fprintf (fp, "\n## `%s`\n\n%s\n\n", cmd->name, cmd->doc ? cmd->doc : "");
    if (cmd->args == NULL || cmd->args[0].name == NULL)
      fprintf (fp, "Arguments: none.\n\n");
    else {
      fprintf (fp, "| argument | type | required | description |\n");
      fprintf (fp, "|---|---|---|---|\n");
      for (a = cmd->args; a->name; ++a)
        fprintf (fp, "| `%s` | %s | %s | %s |\n", a->name,
                 cbw_ctl__arg_type_name (a->type), a->required ? "yes" : "no",
                 a->doc ? a->doc : "");
      fprintf (fp, "\n");
    }
    fprintf (fp, "Returns: %s\n",
             cmd->returns_doc && cmd->returns_doc[0] ? cmd->returns_doc : "`{}`");
  }
  if (fclose (fp) != 0) {
    free (buf);
    return NULL;
  }
  return buf;
}
