/* cbw — common/control_dispatch.c: one request in, one reply out.  Parses
 * a request line, finds the command (built-ins first), validates the
 * arguments against the command's table row and calls the handler; also
 * the same path for in-process callers (cbw_ctl_call_local) and for
 * checking arguments before a request is sent (cbw_ctl_validate_args).
 *
 * Validation order for one request line (each step has one error class):
 *   line longer than CBW_CTL_MAX_LINE, NUL byte, not JSON, trailing
 *   garbage, not an object                               -> ParseError
 *   "execute" missing / not a string, unknown top-level member,
 *   "arguments" not an object                            -> InvalidParameter
 *   command not in the table (nor built in)              -> CommandNotFound
 *   unknown / missing required / wrong-typed argument    -> InvalidParameter
 * Only then is the handler called; what it reports is passed through.
 *
 * Threads and locking: keeps no state of its own and may be called from any
 * thread; handlers take their module's own locks.
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "control_internal.h"

static const struct cbw_ctl_arg no_args[] = { { NULL } };

const struct cbw_ctl_command cbw_ctl__builtin_commands[] = {
  { "query-commands", cbw_ctl__query_commands, no_args,
    "List every command this socket accepts, with its arguments and "
    "documentation, and the same reference rendered as markdown.",
    "`{\"commands\": [{\"name\", \"doc\", \"args\": [{\"name\", \"type\", "
    "\"required\", \"doc\"}], \"returns\"}], \"markdown\": STRING}`" },
  { NULL }
};

static bool
needs_connection (const struct cbw_ctl_command *cmd)
{
  return cmd->handler == cbw_ctl_subscribe_handler ||
    cmd->handler == cbw_ctl_unsubscribe_handler;
}

static const struct cbw_ctl_command *
find_command (const struct cbw_ctl_table *table, const char *name,
              bool *builtin)
{
  FOR_EACH_COMMAND (table, cmd, pass) {
    if (strcmp (cmd->name, name) == 0) {
      *builtin = pass == 0;
      return cmd;
    }
  }
  return NULL;
}

/* find_command, or NULL with the CommandNotFound error in *reply. */
static const struct cbw_ctl_command *
lookup_command (const struct cbw_ctl_table *table, const char *name,
                bool *builtin, struct cbw_ctl_reply *reply)
{
  const struct cbw_ctl_command *cmd = find_command (table, name, builtin);
  if (cmd == NULL)
    cbw_ctl_fail (reply, CBW_CTL_COMMAND_NOT_FOUND,
                  "the '%s' module has no command '%.200s'", table->module,
                  name);
  return cmd;
}


static int
check_arg_type (const struct cbw_ctl_arg *spec, struct json_object *v,
                struct cbw_ctl_reply *reply)
{
  enum json_type t = json_object_get_type (v);

  switch (spec->type) {
  case CBW_ARG_STRING:
    if (t == json_type_string) return 0;
    break;
  case CBW_ARG_BOOL:
    if (t == json_type_boolean) return 0;
    break;
  case CBW_ARG_OBJECT:
    if (t == json_type_object) return 0;
    break;
  case CBW_ARG_ARRAY:
    if (t == json_type_array) return 0;
    break;
  case CBW_ARG_INT:
  case CBW_ARG_UINT:
    if (t != json_type_int)
      break;
    /* json-c clamps out-of-range numbers silently: values above INT64_MAX
     * come back as uint64 > INT64_MAX, values below INT64_MIN as INT64_MIN.
     * Reject both (INT64_MIN itself is therefore not accepted). */
    if (json_object_get_uint64 (v) > (uint64_t) INT64_MAX &&
        json_object_get_int64 (v) == INT64_MAX)
      return cbw_ctl_fail (reply, CBW_CTL_INVALID_PARAMETER,
                           "argument '%s': number out of range", spec->name);
    if (json_object_get_int64 (v) == INT64_MIN)
      return cbw_ctl_fail (reply, CBW_CTL_INVALID_PARAMETER,
                           "argument '%s': number out of range", spec->name);
    if (spec->type == CBW_ARG_UINT && json_object_get_int64 (v) < 0)
      return cbw_ctl_fail (reply, CBW_CTL_INVALID_PARAMETER,
                           "argument '%s': expected a non-negative integer, "
                           "got %lld", spec->name,
                           (long long) json_object_get_int64 (v));
    return 0;
  }
  return cbw_ctl_fail (reply, CBW_CTL_INVALID_PARAMETER,
                       "argument '%s': expected %s, got %s", spec->name,
                       cbw_ctl__arg_type_name (spec->type),
                       json_type_to_name (t));
}

static int
validate_args (const struct cbw_ctl_command *cmd, struct json_object *args,
               struct cbw_ctl_reply *reply)
{
  const struct cbw_ctl_arg *a;

  json_object_object_foreach (args, key, val) {
    for (a = cmd->args; a && a->name; ++a)
      if (strcmp (a->name, key) == 0)
        break;
    if (a == NULL || a->name == NULL)
      return cbw_ctl_fail (reply, CBW_CTL_INVALID_PARAMETER,
                           "command '%s': unknown argument '%s'",
                           cmd->name, key);
    if (check_arg_type (a, val, reply) == -1)
      return -1;
  }
  for (a = cmd->args; a && a->name; ++a) {
    if (a->required && !json_object_object_get_ex (args, a->name, NULL))
      return cbw_ctl_fail (reply, CBW_CTL_INVALID_PARAMETER,
                           "command '%s': missing required argument '%s'",
                           cmd->name, a->name);
  }
  return 0;
}

/* Serialise a reply; consumes ret and id references. */
static char *
format_reply (int r, struct cbw_ctl_reply *reply, struct json_object *id)
{
  struct json_object *o = json_object_new_object ();
  char *s;

  if (o == NULL) {
    json_object_put (reply->ret);
    json_object_put (id);
    return strdup ("{\"error\":{\"class\":\"GenericError\","
                   "\"desc\":\"out of memory\"}}");
  }
  if (r == 0) {
    json_object_object_add (o, "return",
                            reply->ret ? reply->ret : json_object_new_object ());
  }
  else {
    struct json_object *e = json_object_new_object ();
    json_object_put (reply->ret);
    json_object_object_add (e, "class",
                            json_object_new_string
                            (cbw_ctl_error_class_name (reply->err_class)));
    json_object_object_add (e, "desc",
                            json_object_new_string (reply->err_desc[0]
                                                    ? reply->err_desc
                                                    : "command failed"));
    json_object_object_add (o, "error", e);
  }
  reply->ret = NULL;
  if (id)
    json_object_object_add (o, "id", id);
  s = strdup (json_object_to_json_string_ext (o, JSON_C_TO_STRING_PLAIN |
                                              JSON_C_TO_STRING_NOSLASHESCAPE));
  json_object_put (o);
  return s;
}

bool
cbw_ctl__all_space (const char *p, size_t len)
{
  size_t i;
  for (i = 0; i < len; ++i)
    if (p[i] != ' ' && p[i] != '\t' && p[i] != '\r' && p[i] != '\n')
      return false;
  return true;
}

char *
cbw_ctl__dispatch (struct builtin_ctx *bctx, const char *line, size_t len)
{
  const struct cbw_ctl_table *table = bctx->table;
  void *module_data = bctx->module_data;
  struct cbw_ctl_reply reply = { .ret = NULL };
  struct json_object *req = NULL, *id = NULL, *exec, *a;
  struct json_object *args = NULL;     /* our reference, put at the end */
  struct json_tokener *tok = NULL;
  const struct cbw_ctl_command *cmd;
  bool builtin = false;
  int r = -1;
  char *out;

  if (len > CBW_CTL_MAX_LINE) {
    cbw_ctl_fail (&reply, CBW_CTL_PARSE_ERROR,
                  "request line too long (%zu bytes, limit %d)",
                  len, CBW_CTL_MAX_LINE);
    goto out;
  }
  if (memchr (line, '\0', len) != NULL) {
    cbw_ctl_fail (&reply, CBW_CTL_PARSE_ERROR, "request contains a NUL byte");
    goto out;
  }
  if (cbw_ctl__all_space (line, len)) {
    cbw_ctl_fail (&reply, CBW_CTL_PARSE_ERROR, "empty request");
    goto out;
  }
  tok = json_tokener_new ();
  if (tok == NULL) {
    cbw_ctl_fail (&reply, CBW_CTL_GENERIC_ERROR, "out of memory");
    goto out;
  }
  json_tokener_set_flags (tok, JSON_TOKENER_STRICT);
  req = json_tokener_parse_ex (tok, line, (int) len);
  if (req == NULL) {
    enum json_tokener_error je = json_tokener_get_error (tok);
    cbw_ctl_fail (&reply, CBW_CTL_PARSE_ERROR, "invalid JSON: %s",
                  je == json_tokener_continue ? "unexpected end of input"
                  : json_tokener_error_desc (je));
    goto out;
  }
  if (!cbw_ctl__all_space (line + tok->char_offset,
                           len - (size_t) tok->char_offset)) {
    cbw_ctl_fail (&reply, CBW_CTL_PARSE_ERROR,
                  "invalid JSON: trailing characters after the request "
                  "object (offset %zu)", (size_t) tok->char_offset);
    goto out;
  }
  if (!json_object_is_type (req, json_type_object)) {
    cbw_ctl_fail (&reply, CBW_CTL_PARSE_ERROR,
                  "request must be a JSON object, got %s",
                  json_type_to_name (json_object_get_type (req)));
    goto out;
  }
  if (json_object_object_get_ex (req, "id", &id))
    json_object_get (id);
  json_object_object_foreach (req, key, val) {
    (void) val;
    if (strcmp (key, "execute") != 0 && strcmp (key, "arguments") != 0 &&
        strcmp (key, "id") != 0) {
      cbw_ctl_fail (&reply, CBW_CTL_INVALID_PARAMETER,
                    "unexpected member '%s' in request "
                    "(allowed: execute, arguments, id)", key);
      goto out;
    }
  }
  if (!json_object_object_get_ex (req, "execute", &exec)) {
    cbw_ctl_fail (&reply, CBW_CTL_INVALID_PARAMETER,
                  "request lacks member 'execute'");
    goto out;
  }
  if (!json_object_is_type (exec, json_type_string)) {
    cbw_ctl_fail (&reply, CBW_CTL_INVALID_PARAMETER,
                  "member 'execute' must be a string, got %s",
                  json_type_to_name (json_object_get_type (exec)));
    goto out;
  }
  cmd = lookup_command (table, json_object_get_string (exec), &builtin,
                        &reply);
  if (cmd == NULL)
    goto out;
  if (json_object_object_get_ex (req, "arguments", &a)) {
    if (!json_object_is_type (a, json_type_object)) {
      cbw_ctl_fail (&reply, CBW_CTL_INVALID_PARAMETER,
                    "member 'arguments' must be an object, got %s",
                    json_type_to_name (json_object_get_type (a)));
      goto out;
    }
    args = json_object_get (a);
  }
  else if ((args = json_object_new_object ()) == NULL) {
    cbw_ctl_fail (&reply, CBW_CTL_GENERIC_ERROR, "out of memory");
    goto out;
  }
  if (validate_args (cmd, args, &reply) == -1)
    goto out;

  reply.err_class = CBW_CTL_GENERIC_ERROR;
  reply.err_desc[0] = '\0';
  r = cmd->handler (builtin || needs_connection (cmd) ? bctx : module_data,
                    args, &reply);
  if (r != 0)
    r = -1;

 out:
  json_object_put (args);
  json_object_put (req);
  if (tok)
    json_tokener_free (tok);
  out = format_reply (r, &reply, id);
  return out;
}

char *
cbw_ctl_dispatch_line (const struct cbw_ctl_table *table, void *module_data,
                       const char *line, size_t len)
{
  struct builtin_ctx bctx = { .table = table, .module_data = module_data };
  return cbw_ctl__dispatch (&bctx, line, len);
}

int
cbw_ctl_validate_args (const struct cbw_ctl_table *table, const char *command,
                       struct json_object *args, struct cbw_ctl_reply *reply)
{
  const struct cbw_ctl_command *cmd;
  bool builtin = false;

  reply->ret = NULL;
  reply->err_desc[0] = '\0';
  cmd = lookup_command (table, command, &builtin, reply);
  if (cmd == NULL)
    return -1;
  if (args == NULL || !json_object_is_type (args, json_type_object))
    return cbw_ctl_fail (reply, CBW_CTL_INVALID_PARAMETER,
                         "arguments must be an object");
  return validate_args (cmd, args, reply);
}

int
cbw_ctl_call_local (const struct cbw_ctl_table *table, void *module_data,
                    const char *command, struct json_object *args,
                    struct json_object **ret_out, struct cbw_ctl_reply *reply)
{
  struct builtin_ctx bctx = { .table = table, .module_data = module_data };
  struct json_object *empty = NULL;
  const struct cbw_ctl_command *cmd;
  bool builtin = false;
  int r;

  if (ret_out)
    *ret_out = NULL;
  reply->ret = NULL;
  reply->err_class = CBW_CTL_GENERIC_ERROR;
  reply->err_desc[0] = '\0';
  cmd = lookup_command (table, command, &builtin, reply);
  if (cmd == NULL)
    return -1;
  if (args == NULL && (args = empty = json_object_new_object ()) == NULL)
    return cbw_ctl_fail (reply, CBW_CTL_GENERIC_ERROR, "out of memory");
  if (!json_object_is_type (args, json_type_object))
    r = cbw_ctl_fail (reply, CBW_CTL_INVALID_PARAMETER,
                      "arguments must be an object");
  else if (validate_args (cmd, args, reply) == -1)
    r = -1;
  else
    r = cmd->handler (builtin || needs_connection (cmd) ? (void *) &bctx
                      : module_data, args, reply) == 0 ? 0 : -1;
  json_object_put (empty);
  if (r == 0 && ret_out)
    *ret_out = reply->ret;
  else
    json_object_put (reply->ret);
  reply->ret = NULL;
  return r;
}
