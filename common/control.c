/* cbw — common/control.c: the server side of the run-time control socket
 * (see control.h for the protocol): request validation and dispatch, the
 * built-in "query-commands", the markdown reference of a command table, and
 * the poll-based server thread.
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
 * Pushed events: cbw_ctl_server_broadcast() (any thread) appends a copy of
 * the line to the server's event queue and writes the eventfd `wake_fd`; the
 * server thread takes the whole queue and appends each line to the output
 * of every subscribed client, in queue order, skipping for a client the
 * numbered events its "subscribe" already replayed (seq <= skip_upto).  A
 * client whose unsent output would pass max_backlog bytes is closed with a
 * logged reason; if the queue itself overflows (server thread stuck in a
 * slow handler), every subscriber is closed at the next drain, so that no
 * subscriber ever misses an event silently.  A subscriber that shut down its
 * sending side stays connected (it may only want events) until it closes.
 *
 * Access: the socket file is made 0600 between bind and listen, whatever
 * the umask, and every accepted peer is checked with SO_PEERCRED (root or
 * the server's euid): cbwd's commands run freeze hooks, so a control socket
 * is a root shell for whoever reaches it.
 *
 * Threads and locking: cbw_ctl_dispatch_line() keeps no state of its own and
 * may be called from any thread.  A server owns one thread; every field of
 * struct cbw_ctl_server and of its clients is touched only by that thread,
 * except the event queue, `nsubscribers` and `stopping`, which `qlock`
 * guards (broadcasters on any thread and cbw_ctl_server_stop() take it), and
 * `wake_fd`, an eventfd written without a lock.  qlock is a leaf: nothing
 * else is locked or called while it is held, so a broadcaster may hold its
 * own module locks.  Handlers (including the event history callback of
 * "subscribe") take their module's own locks and must not hold them across
 * I/O.  All sockets are non-blocking and every send uses MSG_NOSIGNAL, so a
 * client that stops reading or disappears can never block or kill the
 * process, nor block a broadcaster.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <json-c/json.h>

#include "cbw_err.h"
#include "cleanup.h"
#include "control.h"

/* Error text without locale or gettext: strerror() takes glibc's locale
 * lock, which is unusable in nbdkit under a preloaded ASan runtime, and is
 * not guaranteed thread-safe. */
static inline const char *
errstr (int e)
{
  const char *s = strerrordesc_np (e);
  return s ? s : "Unknown error";
}

#ifndef CBW_VERSION
#define CBW_VERSION "0.0.0"
#endif

/* ---- error classes ------------------------------------------------------ */

static const char *const class_names[CBW_CTL_ERROR_CLASS_COUNT] = {
  [CBW_CTL_GENERIC_ERROR] = "GenericError",
  [CBW_CTL_COMMAND_NOT_FOUND] = "CommandNotFound",
  [CBW_CTL_INVALID_PARAMETER] = "InvalidParameter",
  [CBW_CTL_PARSE_ERROR] = "ParseError",
  [CBW_CTL_NOT_FOUND] = "NotFound",
  [CBW_CTL_EXISTS] = "Exists",
  [CBW_CTL_BUSY] = "Busy",
  [CBW_CTL_IO_ERROR] = "IOError",
  [CBW_CTL_TIMEOUT] = "Timeout",
  [CBW_CTL_PERMISSION_DENIED] = "PermissionDenied",
};

const char *
cbw_ctl_error_class_name (enum cbw_ctl_error_class c)
{
  if ((unsigned) c >= CBW_CTL_ERROR_CLASS_COUNT)
    return "GenericError";
  return class_names[c];
}

int
cbw_ctl_error_class_from_name (const char *name)
{
  int i;

  if (name == NULL)
    return -1;
  for (i = 0; i < CBW_CTL_ERROR_CLASS_COUNT; ++i)
    if (strcmp (name, class_names[i]) == 0)
      return i;
  return -1;
}

int
cbw_ctl_fail (struct cbw_ctl_reply *r, enum cbw_ctl_error_class c,
              const char *fmt, ...)
{
  va_list ap;

  if ((unsigned) c >= CBW_CTL_ERROR_CLASS_COUNT)
    c = CBW_CTL_GENERIC_ERROR;
  r->err_class = c;
  va_start (ap, fmt);
  vsnprintf (r->err_desc, sizeof r->err_desc, fmt, ap);
  va_end (ap);
  return -1;
}

/* ---- argument getters --------------------------------------------------- */

const char *
cbw_ctl_arg_str (struct json_object *args, const char *name, const char *dflt)
{
  struct json_object *v;

  if (args && json_object_object_get_ex (args, name, &v) &&
      json_object_is_type (v, json_type_string))
    return json_object_get_string (v);
  return dflt;
}

long long
cbw_ctl_arg_int (struct json_object *args, const char *name, long long dflt)
{
  struct json_object *v;

  if (args && json_object_object_get_ex (args, name, &v) &&
      json_object_is_type (v, json_type_int))
    return (long long) json_object_get_int64 (v);
  return dflt;
}

bool
cbw_ctl_arg_bool (struct json_object *args, const char *name, bool dflt)
{
  struct json_object *v;

  if (args && json_object_object_get_ex (args, name, &v) &&
      json_object_is_type (v, json_type_boolean))
    return json_object_get_boolean (v);
  return dflt;
}

/* ---- the built-in commands ---------------------------------------------- */

static const char *
arg_type_name (enum cbw_ctl_arg_type t)
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

static int query_commands (void *module_data, struct json_object *args,
                           struct cbw_ctl_reply *reply);

static const struct cbw_ctl_arg no_args[] = { { NULL } };

/* Present in every table; looked up before the module's own commands so
 * that a module cannot shadow them. */
static const struct cbw_ctl_command builtin_commands[] = {
  { "query-commands", query_commands, no_args,
    "List every command this socket accepts, with its arguments and "
    "documentation, and the same reference rendered as markdown.",
    "`{\"commands\": [{\"name\", \"doc\", \"args\": [{\"name\", \"type\", "
    "\"required\", \"doc\"}], \"returns\"}], \"markdown\": STRING}`" },
  { NULL }
};

struct client;
struct cbw_ctl_server;

/* The table being served, handed to query_commands (and the connection, to
 * subscribe) through a per-call context (the handler signature only carries
 * module_data). */
struct builtin_ctx {
  const struct cbw_ctl_table *table;
  void *module_data;
  struct cbw_ctl_server *srv;          /* NULL: no connection */
  struct client *client;
  /* subscribe: events to replay after the reply */
  char **replay;
  size_t nreplay, replay_alloc;
};

static bool
needs_connection (const struct cbw_ctl_command *cmd)
{
  return cmd->handler == cbw_ctl_subscribe_handler ||
    cmd->handler == cbw_ctl_unsubscribe_handler;
}

/* Iterate over builtins then the module's table. */
#define FOR_EACH_COMMAND(table, cmd, i)                                        \
  for (int i = 0; i < 2; ++i)                                                  \
    for (const struct cbw_ctl_command *cmd =                                   \
           i == 0 ? builtin_commands : (table)->commands;                      \
         cmd && cmd->name; ++cmd)

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
query_commands (void *ctxv, struct json_object *args,
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
      json_object_object_add (ao, "type",
                              json_object_new_string (arg_type_name (a->type)));
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
                 arg_type_name (a->type), a->required ? "yes" : "no",
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

/* ---- validation and dispatch -------------------------------------------- */

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
                       arg_type_name (spec->type), json_type_to_name (t));
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

static bool
all_space (const char *p, size_t len)
{
  size_t i;
  for (i = 0; i < len; ++i)
    if (p[i] != ' ' && p[i] != '\t' && p[i] != '\r' && p[i] != '\n')
      return false;
  return true;
}

static char *
dispatch (struct builtin_ctx *bctx, const char *line, size_t len)
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
  if (all_space (line, len)) {
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
  if (!all_space (line + tok->char_offset, len - (size_t) tok->char_offset)) {
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
  return dispatch (&bctx, line, len);
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

/* ---- the server --------------------------------------------------------- */

#define READ_CHUNK 65536

struct client {
  int fd;                        /* -1 = free slot */
  char *in;                      /* received bytes not yet dispatched */
  size_t in_len, in_alloc;
  size_t scanned;                /* in[0..scanned) has no '\n' */
  char *out;                     /* reply bytes not yet sent */
  size_t out_len, out_off;
  bool closing;                  /* close once out is flushed */
  bool eof;                      /* peer shut down its side: finish the
                                    complete lines, then close (unless
                                    subscribed: then when it closes) */
  bool subscribed;               /* receives broadcast events */
  uint64_t skip_upto;            /* numbered events <= this were replayed */
};

/* One queued broadcast line. */
struct bcast {
  struct bcast *next;
  uint64_t seq;
  size_t len;
  char line[];
};

struct cbw_ctl_server {
  const struct cbw_ctl_table *table;
  void *module_data;
  char *path;
  dev_t sock_dev;                /* identity of the socket file we bound, */
  ino_t sock_ino;                /* so stop only unlinks our own socket */
  int listen_fd;
  int wake_fd;                   /* eventfd: broadcast and server_stop */
  pthread_t thread;
  struct client clients[CBW_CTL_MAX_CLIENTS];
  const struct cbw_ctl_event_source *events;  /* NULL: none */
  size_t max_backlog;
  /* guarded by qlock (see the top of this file) */
  pthread_mutex_t qlock;
  struct bcast *qhead, *qtail;   /* broadcast, not yet distributed */
  size_t qbytes;
  uint64_t qdropped;             /* lines refused: queue full */
  unsigned nsubscribers;         /* no subscriber: broadcast drops at once */
  bool stopping;
};

static void
server_log (struct cbw_ctl_server *srv, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));

static void
server_log (struct cbw_ctl_server *srv, const char *fmt, ...)
{
  char msg[512];
  va_list ap;

  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  if (srv->events && srv->events->log)
    srv->events->log (srv->module_data, msg);
  else
    fprintf (stderr, "cbw control (%s): %s\n", srv->table->module, msg);
}

static void
client_unsubscribe (struct cbw_ctl_server *srv, struct client *c)
{
  if (!c->subscribed)
    return;
  c->subscribed = false;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&srv->qlock);
  srv->nsubscribers--;
}

static void
client_close_srv (struct cbw_ctl_server *srv, struct client *c)
{
  client_unsubscribe (srv, c);
  if (c->fd >= 0)
    close (c->fd);
  free (c->in);
  free (c->out);
  memset (c, 0, sizeof *c);
  c->fd = -1;
}
#define client_close(c) client_close_srv (srv, (c))

/* Append bytes (a reply or event line) to a client's output. */
static int
client_queue (struct client *c, const char *s, size_t len)
{
  if (c->out_off == c->out_len) {
    c->out_off = c->out_len = 0;
  }
  else if (c->out_off > 0) {     /* a subscriber may never fully drain */
    memmove (c->out, c->out + c->out_off, c->out_len - c->out_off);
    c->out_len -= c->out_off;
    c->out_off = 0;
  }
  char *p = realloc (c->out, c->out_len + len + 1);
  if (p == NULL)
    return -1;
  c->out = p;
  memcpy (c->out + c->out_len, s, len);
  c->out_len += len;
  c->out[c->out_len++] = '\n';
  return 0;
}

/* Send as much as the socket takes.  Returns -1 if the client is gone. */
static int
client_flush (struct client *c)
{
  while (c->out_off < c->out_len) {
    ssize_t r = send (c->fd, c->out + c->out_off, c->out_len - c->out_off,
                      MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
      return -1;
    }
    c->out_off += (size_t) r;
  }
  return 0;
}

static bool
client_has_output (const struct client *c)
{
  return c->out_off < c->out_len;
}

/* Dispatch complete lines, one at a time, while nothing is waiting to be
 * sent (so a client that does not read its replies cannot make us buffer
 * without bound).  Returns -1 if the client must be dropped now. */
static int
client_process (struct cbw_ctl_server *srv, struct client *c)
{
  for (;;) {
    char *nl;
    size_t line_len;

    if (client_flush (c) == -1)
      return -1;
    if (c->closing || client_has_output (c))
      break;
    nl = c->in_len > c->scanned
      ? memchr (c->in + c->scanned, '\n', c->in_len - c->scanned) : NULL;

    if (nl == NULL) {
      c->scanned = c->in_len;
      if (c->in_len > CBW_CTL_MAX_LINE) {
        char msg[256];
        snprintf (msg, sizeof msg,
                  "{\"error\":{\"class\":\"%s\",\"desc\":\"request line too "
                  "long (more than %d bytes without a newline); closing the "
                  "connection\"}}",
                  cbw_ctl_error_class_name (CBW_CTL_PARSE_ERROR),
                  CBW_CTL_MAX_LINE);
        if (client_queue (c, msg, strlen (msg)) == -1)
          return -1;
        c->closing = true;
        continue;                /* flush it at the top of the loop */
      }
      break;
    }
    line_len = (size_t) (nl - c->in);
    if (line_len > 0 && c->in[line_len - 1] == '\r')
      line_len--;
    if (line_len > CBW_CTL_MAX_LINE || !all_space (c->in, line_len)) {
      struct builtin_ctx bctx = { .table = srv->table,
                                  .module_data = srv->module_data,
                                  .srv = srv, .client = c };
      char *reply = dispatch (&bctx, c->in, line_len);
      int r = reply ? client_queue (c, reply, strlen (reply)) : -1;
      free (reply);
      /* "subscribe" with since: the replayed events follow its reply */
      for (size_t i = 0; i < bctx.nreplay; i++) {
        if (r == 0)
          r = client_queue (c, bctx.replay[i], strlen (bctx.replay[i]));
        free (bctx.replay[i]);
      }
      free (bctx.replay);
      if (r == -1)
        return -1;
      if (line_len > CBW_CTL_MAX_LINE)
        c->closing = true;
    }
    /* Blank lines are ignored (handy for interactive use). */
    line_len = (size_t) (nl - c->in) + 1;
    memmove (c->in, c->in + line_len, c->in_len - line_len);
    c->in_len -= line_len;
    c->scanned = 0;
  }
  /* Every break above comes right after a flush with nothing queued since.
   * Do not flush again here: if that drained the output we would go back to
   * poll for POLLIN with complete lines still buffered, and a client that
   * has sent everything would wait for ever (seen as a rare hang of
   * socket::pipelined_requests_in_order). */
  if ((c->closing || (c->eof && !c->subscribed)) && !client_has_output (c))
    return -1;
  return 0;
}

/* ---- pushed events ------------------------------------------------------ */

const struct cbw_ctl_arg cbw_ctl_subscribe_args[] = {
  { "since", CBW_ARG_UINT, false, "replay the kept events with a sequence "
    "number above this first (default: no replay)" },
  { NULL }
};
const struct cbw_ctl_arg cbw_ctl_no_args[] = { { NULL } };

static int
collect_replay (void *ctxv, uint64_t seq, const char *line)
{
  struct builtin_ctx *ctx = ctxv;
  char *copy;

  (void) seq;
  if (line == NULL || strchr (line, '\n') != NULL)
    return 0;                    /* never send a malformed line */
  if (ctx->nreplay == ctx->replay_alloc) {
    size_t n = ctx->replay_alloc ? ctx->replay_alloc * 2 : 64;
    char **p = realloc (ctx->replay, n * sizeof *p);
    if (p == NULL)
      return -1;
    ctx->replay = p;
    ctx->replay_alloc = n;
  }
  if ((copy = strdup (line)) == NULL)
    return -1;
  ctx->replay[ctx->nreplay++] = copy;
  return 0;
}

static void
drop_replay (struct builtin_ctx *ctx)
{
  for (size_t i = 0; i < ctx->nreplay; i++)
    free (ctx->replay[i]);
  free (ctx->replay);
  ctx->replay = NULL;
  ctx->nreplay = ctx->replay_alloc = 0;
}

int
cbw_ctl_subscribe_handler (void *ctxv, struct json_object *args,
                           struct cbw_ctl_reply *reply)
{
  struct builtin_ctx *ctx = ctxv;
  struct cbw_ctl_server *srv = ctx->srv;
  struct client *c = ctx->client;
  const struct cbw_ctl_event_source *ev;
  bool has_since = json_object_object_get_ex (args, "since", NULL);
  uint64_t since = (uint64_t) cbw_ctl_arg_int (args, "since", 0);
  uint64_t last = 0;
  bool lost = false, newly = false;

  if (srv == NULL || c == NULL)
    return cbw_ctl_fail (reply, CBW_CTL_GENERIC_ERROR, "subscribe needs a "
                         "control connection");
  ev = srv->events;
  if (has_since && (ev == NULL || ev->history == NULL))
    return cbw_ctl_fail (reply, CBW_CTL_INVALID_PARAMETER, "argument "
                         "'since': the '%s' module keeps no event history",
                         srv->table->module);
  /* Count the subscriber before reading the history: an event recorded
   * after that read is then queued for us, not dropped (see top). */
  if (!c->subscribed) {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&srv->qlock);
    srv->nsubscribers++;
    c->subscribed = newly = true;
  }
  if (ev && ev->history &&
      ev->history (srv->module_data, has_since ? since : CBW_CTL_NO_REPLAY,
                   collect_replay, ctx, &last, &lost) != 0) {
    drop_replay (ctx);
    if (newly)
      client_unsubscribe (srv, c);
    return cbw_ctl_fail (reply, CBW_CTL_GENERIC_ERROR, "reading the event "
                         "history failed");
  }
  c->skip_upto = last;
  reply->ret = json_object_new_object ();
  if (reply->ret == NULL) {
    drop_replay (ctx);
    if (newly)
      client_unsubscribe (srv, c);
    return cbw_ctl_fail (reply, CBW_CTL_GENERIC_ERROR, "out of memory");
  }
  json_object_object_add (reply->ret, "last",
                          json_object_new_int64 ((int64_t) last));
  json_object_object_add (reply->ret, "replayed",
                          json_object_new_int64 ((int64_t) ctx->nreplay));
  json_object_object_add (reply->ret, "lost",
                          json_object_new_boolean (lost));
  return 0;
}

int
cbw_ctl_unsubscribe_handler (void *ctxv, struct json_object *args,
                             struct cbw_ctl_reply *reply)
{
  struct builtin_ctx *ctx = ctxv;

  (void) args;
  if (ctx->srv == NULL || ctx->client == NULL)
    return cbw_ctl_fail (reply, CBW_CTL_GENERIC_ERROR, "unsubscribe needs a "
                         "control connection");
  client_unsubscribe (ctx->srv, ctx->client);
  return 0;
}

int
cbw_ctl_server_broadcast (struct cbw_ctl_server *srv, uint64_t seq,
                          const char *line)
{
  struct bcast *b;
  size_t len;
  uint64_t one = 1;

  if (srv == NULL)
    return 0;
  if (line == NULL || (len = strlen (line)) == 0 || len > CBW_CTL_MAX_LINE ||
      memchr (line, '\n', len) != NULL) {
    errno = EINVAL;
    return -1;
  }
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&srv->qlock);
    if (srv->nsubscribers == 0 || srv->stopping)
      return 0;                  /* nobody to tell */
  }
  /* Copy outside the lock; a subscriber that came meanwhile is checked
   * again below. */
  b = malloc (sizeof *b + len + 1);
  if (b == NULL) {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&srv->qlock);
    srv->qdropped++;             /* subscribers are dropped: none misses it */
    errno = ENOMEM;
    return -1;
  }
  b->next = NULL;
  b->seq = seq;
  b->len = len;
  memcpy (b->line, line, len + 1);
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&srv->qlock);
    if (srv->nsubscribers == 0 || srv->stopping) {
      free (b);
      return 0;
    }
    if (srv->qbytes + len > CBW_CTL_EVENT_QUEUE_MAX) {
      srv->qdropped++;
      free (b);
      errno = ENOBUFS;
      return -1;
    }
    if (srv->qtail)
      srv->qtail->next = b;
    else
      srv->qhead = b;
    srv->qtail = b;
    srv->qbytes += len;
  }
  while (write (srv->wake_fd, &one, sizeof one) < 0 && errno == EINTR)
    ;
  return 0;
}

/* Server thread: hand the queued events to the subscribers.  Returns true
 * if the server is stopping. */
static bool
distribute_events (struct cbw_ctl_server *srv)
{
  struct bcast *list, *next;
  uint64_t dropped;
  uint64_t n;
  bool stopping;
  int i;

  while (read (srv->wake_fd, &n, sizeof n) < 0 && errno == EINTR)
    ;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&srv->qlock);
    list = srv->qhead;
    srv->qhead = srv->qtail = NULL;
    srv->qbytes = 0;
    dropped = srv->qdropped;
    srv->qdropped = 0;
    stopping = srv->stopping;
  }
  if (dropped > 0 && !stopping)
    for (i = 0; i < CBW_CTL_MAX_CLIENTS; ++i) {
      struct client *c = &srv->clients[i];
      if (c->fd >= 0 && c->subscribed) {
        server_log (srv, "dropping event subscriber (fd %d): %" PRIu64
                    " event(s) could not be queued (queue full or out of "
                    "memory); it must subscribe again with 'since'",
                    c->fd, dropped);
        client_close (c);
      }
    }
  for (; list; list = next) {
    next = list->next;
    for (i = 0; !stopping && i < CBW_CTL_MAX_CLIENTS; ++i) {
      struct client *c = &srv->clients[i];
      size_t backlog;
      if (c->fd < 0 || !c->subscribed ||
          (list->seq != 0 && list->seq <= c->skip_upto))
        continue;
      backlog = c->out_len - c->out_off;
      if (backlog + list->len + 1 > srv->max_backlog) {
        server_log (srv, "dropping event subscriber (fd %d): it does not "
                    "read its events (%zu bytes waiting, limit %zu; at event "
                    "%" PRIu64 ")", c->fd, backlog, srv->max_backlog,
                    list->seq);
        client_close (c);
        continue;
      }
      if (client_queue (c, list->line, list->len) == -1 ||
          client_flush (c) == -1)
        client_close (c);
    }
    free (list);
  }
  return stopping;
}

static int
client_read (struct cbw_ctl_server *srv, struct client *c)
{
  ssize_t r;

  if (c->in_alloc - c->in_len < READ_CHUNK) {
    size_t n = c->in_alloc ? c->in_alloc * 2 : READ_CHUNK * 2;
    char *p;
    /* Never grow beyond one maximal line plus one chunk. */
    if (n > (size_t) CBW_CTL_MAX_LINE + 2 * READ_CHUNK)
      n = (size_t) CBW_CTL_MAX_LINE + 2 * READ_CHUNK;
    if (n < c->in_len + READ_CHUNK)
      n = c->in_len + READ_CHUNK;
    p = realloc (c->in, n);
    if (p == NULL)
      return -1;
    c->in = p;
    c->in_alloc = n;
  }
  r = recv (c->fd, c->in + c->in_len, c->in_alloc - c->in_len, MSG_DONTWAIT);
  if (r < 0)
    return (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
  if (r == 0)                  /* EOF; a partial last line is discarded */
    c->eof = true;
  c->in_len += (size_t) r;
  return client_process (srv, c);
}

/* Who may talk to a control socket: root and the server's own effective
 * uid.  The socket file is created 0600 (bind_socket), so this only
 * matters when its mode was widened by hand or the kernel's file check is
 * bypassed (a descriptor passed on); commands such as cbwd's backup-begin
 * run hooks as the server's user, so another uid must never reach them. */
static bool
peer_allowed (int fd)
{
  struct ucred cred;
  socklen_t len = sizeof cred;

  if (getsockopt (fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == -1 ||
      len != sizeof cred)
    return false;
  return cred.uid == 0 || cred.uid == geteuid ();
}

/* Send one error line to a client that is not taken on, and close it. */
static void
reject_client (int fd, enum cbw_ctl_error_class cls, const char *desc)
{
  char msg[320];
  int n = snprintf (msg, sizeof msg,
                    "{\"error\":{\"class\":\"%s\",\"desc\":\"%s\"}}\n",
                    cbw_ctl_error_class_name (cls), desc);
  if (n > 0 && (size_t) n < sizeof msg &&
      send (fd, msg, (size_t) n, MSG_NOSIGNAL | MSG_DONTWAIT) < 0) {
    /* nothing more we can do for this client */
  }
  close (fd);
}

static void
accept_one (struct cbw_ctl_server *srv)
{
  struct client *c = NULL;
  char *greeting;
  int fd, i;

  fd = accept4 (srv->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
  if (fd < 0)
    return;                      /* EAGAIN, ECONNABORTED, EMFILE: try later */
  if (!peer_allowed (fd)) {
    reject_client (fd, CBW_CTL_PERMISSION_DENIED,
                   "permission denied: only root and the server's own uid "
                   "may use this control socket");
    return;
  }
  for (i = 0; i < CBW_CTL_MAX_CLIENTS; ++i)
    if (srv->clients[i].fd < 0) {
      c = &srv->clients[i];
      break;
    }
  if (c == NULL) {
    char desc[64];
    snprintf (desc, sizeof desc, "too many control clients (limit %d)",
              CBW_CTL_MAX_CLIENTS);
    reject_client (fd, CBW_CTL_BUSY, desc);
    return;
  }
  c->fd = fd;
  if (asprintf (&greeting, "{\"cbw\":{\"module\":\"%s\",\"version\":\"%s\"}}",
                srv->table->module, CBW_VERSION) < 0) {
    client_close (c);
    return;
  }
  if (client_queue (c, greeting, strlen (greeting)) == -1 ||
      client_flush (c) == -1)
    client_close (c);
  free (greeting);
}

static void *
server_thread (void *arg)
{
  struct cbw_ctl_server *srv = arg;
  struct pollfd pfd[CBW_CTL_MAX_CLIENTS + 2];
  int map[CBW_CTL_MAX_CLIENTS + 2];

  for (;;) {
    int n = 0, i, r;

    pfd[n] = (struct pollfd) { .fd = srv->wake_fd, .events = POLLIN };
    map[n++] = -1;
    pfd[n] = (struct pollfd) { .fd = srv->listen_fd, .events = POLLIN };
    map[n++] = -2;
    for (i = 0; i < CBW_CTL_MAX_CLIENTS; ++i) {
      struct client *c = &srv->clients[i];
      short ev = 0;
      if (c->fd < 0)
        continue;
      if (client_has_output (c))
        ev |= POLLOUT;
      else if (!c->closing && !c->eof)
        ev |= POLLIN;
      /* else (a subscriber after EOF): only POLLHUP, when it closes */
      pfd[n] = (struct pollfd) { .fd = c->fd, .events = ev };
      map[n++] = i;
    }
    r = poll (pfd, (nfds_t) n, -1);
    if (r < 0) {
      if (errno == EINTR) continue;
      break;                     /* cannot happen with valid fds */
    }
    if (pfd[1].revents & POLLIN)
      accept_one (srv);
    for (i = 2; i < n; ++i) {
      struct client *c = &srv->clients[map[i]];
      short re = pfd[i].revents;
      int rc = 0;
      if (re == 0 || c->fd != pfd[i].fd)
        continue;
      if (re & POLLOUT) {
        rc = client_flush (c);
        if (rc == 0)             /* more buffered lines may now run */
          rc = client_process (srv, c);
      }
      else if (re & POLLIN)
        rc = client_read (srv, c);
      else if (re & (POLLERR | POLLHUP | POLLNVAL))
        rc = -1;
      if (rc == -1)
        client_close (c);
    }
    /* Events last: dropping a subscriber closes its fd, which must not
     * happen between accept and the loop above (a new client could reuse
     * the fd and the slot, and get the old one's revents). */
    if (pfd[0].revents && distribute_events (srv))
      break;                     /* stop requested */
  }
  return NULL;
}

/* Bind a Unix socket at path, replacing a stale socket file. */
static int
bind_socket (struct cbw_ctl_server *srv, struct cbw_err *err)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  const char *path = srv->path;
  struct stat st;
  int fd, attempt;

  if (path == NULL || path[0] == '\0')
    return cbw_err_set (err, EINVAL, "control socket: empty path");
  if (strlen (path) >= sizeof sun.sun_path)
    return cbw_err_set (err, ENAMETOOLONG,
                        "control socket %s: path too long (%zu bytes, a Unix "
                        "socket path is limited to %zu)", path, strlen (path),
                        sizeof sun.sun_path - 1);
  memcpy (sun.sun_path, path, strlen (path) + 1);

  for (attempt = 0; attempt < 2; ++attempt) {
    fd = socket (AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
      return cbw_err_set (err, errno, "control socket %s: socket: %s",
                          path, errstr (errno));
    if (bind (fd, (struct sockaddr *) &sun, sizeof sun) == 0)
      break;
    int e = errno;
    close (fd);
    fd = -1;
    if (e != EADDRINUSE || attempt > 0)
      return cbw_err_set (err, e, "control socket %s: bind: %s",
                          path, errstr (e));
    /* Something is there.  Replace it only if it is a socket nobody
     * answers on (left behind by a crashed process). */
    if (lstat (path, &st) == -1)
      continue;                  /* vanished meanwhile: retry */
    if (!S_ISSOCK (st.st_mode))
      return cbw_err_set (err, EEXIST,
                          "control socket %s: path exists and is not a socket",
                          path);
    int probe = socket (AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (probe < 0)
      return cbw_err_set (err, errno, "control socket %s: socket: %s",
                          path, errstr (errno));
    int cr = connect (probe, (struct sockaddr *) &sun, sizeof sun);
    int ce = errno;
    close (probe);
    if (cr == 0 || ce == EAGAIN)
      return cbw_err_set (err, EADDRINUSE,
                          "control socket %s: already in use by a running "
                          "server", path);
    if (ce != ECONNREFUSED)
      return cbw_err_set (err, ce, "control socket %s: probe: %s",
                          path, errstr (ce));
    if (unlink (path) == -1 && errno != ENOENT)
      return cbw_err_set (err, errno,
                          "control socket %s: removing stale socket: %s",
                          path, errstr (errno));
  }
  if (fd < 0)
    return cbw_err_set (err, EADDRINUSE, "control socket %s: bind failed",
                        path);
  /* Owner-only before anyone can connect (connect fails until listen):
   * the file's mode is what the kernel checks on connect, and bind gave it
   * the umask's mode, which may let every local user in. */
  if (chmod (path, S_IRUSR | S_IWUSR) == -1) {
    int e = errno;
    close (fd);
    unlink (path);
    return cbw_err_set (err, e, "control socket %s: chmod 0600: %s",
                        path, errstr (e));
  }
  if (listen (fd, CBW_CTL_MAX_CLIENTS) == -1) {
    int e = errno;
    close (fd);
    unlink (path);
    return cbw_err_set (err, e, "control socket %s: listen: %s",
                        path, errstr (e));
  }
  if (stat (path, &st) == 0) {
    srv->sock_dev = st.st_dev;
    srv->sock_ino = st.st_ino;
  }
  srv->listen_fd = fd;
  return 0;
}

struct cbw_ctl_server *
cbw_ctl_server_start (const char *path, const struct cbw_ctl_table *table,
                      void *module_data, struct cbw_err *err)
{
  return cbw_ctl_server_start_events (path, table, module_data, NULL, err);
}

struct cbw_ctl_server *
cbw_ctl_server_start_events (const char *path,
                             const struct cbw_ctl_table *table,
                             void *module_data,
                             const struct cbw_ctl_event_source *events,
                             struct cbw_err *err)
{
  struct cbw_ctl_server *srv;
  sigset_t all, old;
  int i, e;

  if (table == NULL || table->module == NULL) {
    cbw_err_set (err, EINVAL, "control socket: no command table");
    return NULL;
  }
  srv = calloc (1, sizeof *srv);
  if (srv == NULL || (srv->path = strdup (path ? path : "")) == NULL) {
    free (srv);
    cbw_err_set (err, ENOMEM, "control socket: out of memory");
    return NULL;
  }
  srv->table = table;
  srv->module_data = module_data;
  srv->events = events;
  srv->max_backlog = events && events->max_backlog ? events->max_backlog
    : CBW_CTL_EVENT_BACKLOG;
  pthread_mutex_init (&srv->qlock, NULL);
  srv->listen_fd = srv->wake_fd = -1;
  for (i = 0; i < CBW_CTL_MAX_CLIENTS; ++i)
    srv->clients[i].fd = -1;

  if (bind_socket (srv, err) == -1)
    goto fail;
  srv->wake_fd = eventfd (0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (srv->wake_fd < 0) {
    cbw_err_set (err, errno, "control socket %s: eventfd: %s",
                 path, errstr (errno));
    goto fail_unlink;
  }
  /* The thread must not take the host process's signals (nbdkit, cbwd). */
  sigfillset (&all);
  pthread_sigmask (SIG_SETMASK, &all, &old);
  e = pthread_create (&srv->thread, NULL, server_thread, srv);
  pthread_sigmask (SIG_SETMASK, &old, NULL);
  if (e != 0) {
    cbw_err_set (err, e, "control socket %s: pthread_create: %s",
                 path, errstr (e));
    goto fail_unlink;
  }
  return srv;

 fail_unlink:
  unlink (srv->path);
 fail:
  if (srv->listen_fd >= 0) close (srv->listen_fd);
  if (srv->wake_fd >= 0) close (srv->wake_fd);
  pthread_mutex_destroy (&srv->qlock);
  free (srv->path);
  free (srv);
  return NULL;
}

void
cbw_ctl_server_stop (struct cbw_ctl_server *srv)
{
  uint64_t one = 1;
  struct stat st;
  int i;

  if (srv == NULL)
    return;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&srv->qlock);
    srv->stopping = true;
  }
  while (write (srv->wake_fd, &one, sizeof one) < 0 && errno == EINTR)
    ;
  pthread_join (srv->thread, NULL);
  for (i = 0; i < CBW_CTL_MAX_CLIENTS; ++i)
    if (srv->clients[i].fd >= 0)
      client_close (&srv->clients[i]);
  while (srv->qhead) {
    struct bcast *b = srv->qhead;
    srv->qhead = b->next;
    free (b);
  }
  pthread_mutex_destroy (&srv->qlock);
  close (srv->listen_fd);
  close (srv->wake_fd);
  /* Unlink only the socket we created, not one a successor bound since. */
  if (stat (srv->path, &st) == 0 && st.st_dev == srv->sock_dev &&
      st.st_ino == srv->sock_ino)
    unlink (srv->path);
  free (srv->path);
  free (srv);
}
