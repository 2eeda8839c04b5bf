/* cbw — common/control.h: the run-time control socket shared by every cbw
 * nbdkit module (chain plugin, cbw filter, dirtybitmap filter) and reused by
 * cbwd's control API.
 *
 * Protocol (QMP style, newline-delimited JSON, one object per line):
 *   request:  {"execute": "NAME", "arguments": {...}, "id": ANY}
 *   success:  {"return": {...}, "id": ANY}
 *   failure:  {"error": {"class": "CLASS", "desc": "human readable"}, "id": ANY}
 * On connect the server sends a greeting line {"cbw": {"module": "NAME",
 * "version": "X.Y.Z"}} (like QMP's greeting, so a client can check it talks to
 * the right thing).  "id" is echoed verbatim when present.  Error classes are
 * the fixed list in enum cbw_ctl_error_class (one source of truth; the strings
 * come from cbw_ctl_error_class_name()).
 *
 * One table per module defines its commands: name, argument spec, handler and
 * the text of its documentation.  The library validates the request against
 * the spec (unknown command, missing/unknown/wrong-typed argument, lines over
 * CBW_CTL_MAX_LINE bytes, bad JSON) before calling the handler, so handlers
 * only see well-typed arguments.  cbw_ctl_docs_markdown() renders the table as
 * the module's command reference; docs are generated from it and a test checks
 * the committed docs match.
 *
 * Pushed events (QMP style): see struct cbw_ctl_event_source below and
 * docs/control-protocol.md "Events".
 *
 * Threads and locking: cbw_ctl_server_start() starts one thread that accepts
 * connections and serves them one request at a time (poll-based, at most
 * CBW_CTL_MAX_CLIENTS clients).  cbw_ctl_server_broadcast() may be called
 * from any thread: it only takes the server's queue lock (a leaf lock).  Handlers run on that thread, never on an
 * nbdkit I/O thread; a slow handler delays other control clients, never guest
 * I/O.  Handlers must take the module's own locks themselves and must not
 * hold them across I/O.  A client that disconnects early, sends garbage or a
 * huge line only ever affects itself.
 */
#ifndef CBW_CONTROL_H
#define CBW_CONTROL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <json-c/json.h>

#define CBW_CTL_MAX_LINE (1024 * 1024)  /* longer request lines: error + drop */
#define CBW_CTL_MAX_CLIENTS 16

enum cbw_ctl_error_class {
  CBW_CTL_GENERIC_ERROR = 0,   /* "GenericError": the command failed */
  CBW_CTL_COMMAND_NOT_FOUND,   /* "CommandNotFound" */
  CBW_CTL_INVALID_PARAMETER,   /* "InvalidParameter": bad/missing/extra argument */
  CBW_CTL_PARSE_ERROR,         /* "ParseError": not JSON / not an object / line too long */
  CBW_CTL_NOT_FOUND,           /* "NotFound": named object (bitmap, session, layer) missing */
  CBW_CTL_EXISTS,              /* "Exists": named object already exists */
  CBW_CTL_BUSY,                /* "Busy": conflicting operation in progress */
  CBW_CTL_IO_ERROR,            /* "IOError": an I/O error, desc has details */
  CBW_CTL_TIMEOUT,             /* "Timeout" */
  CBW_CTL_PERMISSION_DENIED,   /* "PermissionDenied": peer not allowed on this socket */
  CBW_CTL_ERROR_CLASS_COUNT
};
const char *cbw_ctl_error_class_name (enum cbw_ctl_error_class c);
/* The inverse: the enum value of a class name, or -1 if unknown. */
int cbw_ctl_error_class_from_name (const char *name);

enum cbw_ctl_arg_type {
  CBW_ARG_STRING,
  CBW_ARG_INT,        /* json int64; handlers range-check */
  CBW_ARG_UINT,       /* json int64 >= 0 */
  CBW_ARG_BOOL,
  CBW_ARG_OBJECT,
  CBW_ARG_ARRAY,
};

struct cbw_ctl_arg {
  const char *name;
  enum cbw_ctl_arg_type type;
  bool required;
  const char *doc;
};

/* A handler's reply.  On success set *ret to a new json object (or leave
 * NULL for {}) and return 0.  On failure call cbw_ctl_fail() and return -1. */
struct cbw_ctl_reply {
  struct json_object *ret;
  enum cbw_ctl_error_class err_class;
  char err_desc[512];
};
int cbw_ctl_fail (struct cbw_ctl_reply *r, enum cbw_ctl_error_class c,
                  const char *fmt, ...) __attribute__ ((format (printf, 3, 4)));

typedef int (*cbw_ctl_handler) (void *module_data, struct json_object *args,
                                struct cbw_ctl_reply *reply);

struct cbw_ctl_command {
  const char *name;
  cbw_ctl_handler handler;
  const struct cbw_ctl_arg *args;   /* terminated by {NULL} */
  const char *doc;                  /* one paragraph, markdown */
  const char *returns_doc;          /* what "return" holds */
};

struct cbw_ctl_table {
  const char *module;               /* "dirtybitmap", "cbw", "chain", "cbwd" */
  const struct cbw_ctl_command *commands;  /* terminated by {NULL} */
};

/* Pushed events.  A module that pushes events lists CBW_CTL_EVENT_COMMANDS
 * in its command table (so "subscribe" and "unsubscribe" are validated,
 * listed by query-commands and documented like its other commands) and
 * starts its server with cbw_ctl_server_start_events().  A subscribed
 * connection receives, interleaved with its replies, every line given to
 * cbw_ctl_server_broadcast() from then on.  Lines are told apart QMP style:
 * a reply has "return" or "error" (and the request's "id"), an event has
 * "event" and never "return"/"error"; the greeting has "cbw".
 *
 * history (may be NULL): the module's record of past events, so that
 * "subscribe" with {"since": N} replays the kept events with a sequence
 * number above N before any live one, and none twice.  It calls
 * emit(emit_ctx, seq, line) for each kept event with seq > since, oldest
 * first (since == CBW_CTL_NO_REPLAY: none), sets *last to the newest
 * sequence number ever broadcast (0: none) and *lost if events above since
 * are no longer kept.  Returns 0, or -1 (the subscribe fails).  It runs on
 * the control thread and may take module locks.  For the replay to be exact
 * the module must number its events 1, 2, 3 ... and record each one and
 * broadcast it under one lock that history also takes.
 *
 * A subscriber that does not read is dropped (connection closed, reason
 * given to log) once more than max_backlog bytes of events wait for it;
 * broadcasting never blocks and never fails because of one client. */
#define CBW_CTL_NO_REPLAY UINT64_MAX
#define CBW_CTL_EVENT_BACKLOG (1024 * 1024)       /* default max_backlog */
#define CBW_CTL_EVENT_QUEUE_MAX (16 * 1024 * 1024) /* bytes not yet distributed */
typedef int (*cbw_ctl_emit_fn) (void *emit_ctx, uint64_t seq, const char *line);
struct cbw_ctl_event_source {
  int (*history) (void *module_data, uint64_t since, cbw_ctl_emit_fn emit,
                  void *emit_ctx, uint64_t *last, bool *lost);
  size_t max_backlog;               /* per client, bytes; 0 = CBW_CTL_EVENT_BACKLOG */
  void (*log) (void *module_data, const char *msg);  /* NULL: stderr */
};

/* The two command-table rows of "subscribe" / "unsubscribe" (handlers and
 * argument specs live in control_events.c; they need the connection, which the
 * server passes them itself). */
int cbw_ctl_subscribe_handler (void *, struct json_object *, struct cbw_ctl_reply *);
int cbw_ctl_unsubscribe_handler (void *, struct json_object *, struct cbw_ctl_reply *);
/* Hidden: several nbdkit modules, each linking this library statically,
 * may be loaded into one process. */
extern const struct cbw_ctl_arg cbw_ctl_subscribe_args[]
  __attribute__ ((visibility ("hidden")));
extern const struct cbw_ctl_arg cbw_ctl_no_args[]
  __attribute__ ((visibility ("hidden")));
#define CBW_CTL_EVENT_COMMANDS                                                 \
  { "subscribe", cbw_ctl_subscribe_handler, cbw_ctl_subscribe_args,            \
    "Receive events on this connection as they happen, interleaved with "     \
    "replies: lines `{\"event\": NAME, \"data\": {...}, \"seq\": N, "            \
    "\"timestamp\": {\"seconds\", \"microseconds\"}}` (a reply has `return` or " \
    "`error`, an event has `event`). With `since`, the kept events numbered " \
    "above it are sent first (after this reply), so a client that polled "    \
    "`event-list` up to N misses none and sees none twice. A client that "    \
    "does not read its events is disconnected once 1 MiB of them wait for "  \
    "it (the reason is logged); reconnect and subscribe with `since`.",       \
    "`{\"last\": SEQ, \"replayed\": N, \"lost\": bool}`: the newest sequence "    \
    "number when subscribing, the events replayed, and whether events after " \
    "`since` were no longer kept" },                                          \
  { "unsubscribe", cbw_ctl_unsubscribe_handler, cbw_ctl_no_args,              \
    "Stop receiving events on this connection (events already queued for "   \
    "it are still sent).", NULL }

struct cbw_ctl_server;

/* Listen on a Unix socket at path (an existing socket file is replaced only
 * if nobody answers on it; a live one is an error: EADDRINUSE), start the
 * thread.  Returns NULL with *err filled on failure. */
struct cbw_err;
struct cbw_ctl_server *cbw_ctl_server_start (const char *path,
                                             const struct cbw_ctl_table *table,
                                             void *module_data,
                                             struct cbw_err *err);
/* The same, for a module that pushes events (events: see above; kept by
 * reference, must outlive the server). */
struct cbw_ctl_server *cbw_ctl_server_start_events
  (const char *path, const struct cbw_ctl_table *table, void *module_data,
   const struct cbw_ctl_event_source *events, struct cbw_err *err);
/* Who may use a control socket besides root and the server's own euid.
 * With group_set, the members of `group` too: the socket file is then mode
 * 0660 with that group (else 0600), and a peer is a member when the gid or
 * one of the supplementary groups of its process at connect time is
 * `group` (SO_PEERCRED, SO_PEERGROUPS): the credentials the kernel checked
 * the file's mode against, not the user database, so nothing on the
 * control thread waits for NSS, and a user added to the group must log in
 * again, as for any file. */
struct cbw_ctl_access {
  bool group_set;
  gid_t group;
};
/* The same with an access policy (NULL: root and the server's euid). */
struct cbw_ctl_server *cbw_ctl_server_start_access
  (const char *path, const struct cbw_ctl_table *table, void *module_data,
   const struct cbw_ctl_event_source *events,
   const struct cbw_ctl_access *access, struct cbw_err *err);
/* Stop the thread, close clients, unlink the socket.  NULL is a no-op. */
void cbw_ctl_server_stop (struct cbw_ctl_server *srv);

/* Queue an event line (one JSON object, no newline) for every subscribed
 * client; seq is its sequence number (0: unnumbered, never skipped).  Any
 * thread, any time, also with module locks held: it copies the line under
 * the server's queue lock and wakes the server thread, nothing more.
 * Returns 0; -1 with errno EINVAL (bad line) or ENOBUFS (the server thread
 * is CBW_CTL_EVENT_QUEUE_MAX behind: every subscriber will be dropped, so
 * none misses an event silently).  srv == NULL is a no-op.  Callers make
 * sure no broadcast runs during or after cbw_ctl_server_stop() (cbwd clears
 * its pointer under its lock first). */
int cbw_ctl_server_broadcast (struct cbw_ctl_server *srv, uint64_t seq,
                              const char *line);

/* Validate arguments against a command's spec and call its handler, in
 * process (no JSON line, no socket): for callers that reuse a command's
 * code path, e.g. cbwd applying its config file through "disk-add".
 * args is borrowed.  Returns the handler's result; on -1 reply has the
 * class and text (validation failures included); on 0 *ret_out gets the
 * "return" value (caller puts; may be NULL). */
int cbw_ctl_call_local (const struct cbw_ctl_table *table, void *module_data,
                        const char *command, struct json_object *args,
                        struct json_object **ret_out,
                        struct cbw_ctl_reply *reply);

/* Only the validation part: 0 if args (an object) would pass for command,
 * else -1 with reply's class and text. */
int cbw_ctl_validate_args (const struct cbw_ctl_table *table,
                           const char *command, struct json_object *args,
                           struct cbw_ctl_reply *reply);

/* Run one request line through validation + dispatch without a socket
 * (used by unit tests and fuzzers).  Returns a malloc'd reply line
 * (no trailing newline). */
char *cbw_ctl_dispatch_line (const struct cbw_ctl_table *table,
                             void *module_data, const char *line, size_t len);

/* Markdown reference of a table (malloc'd). */
char *cbw_ctl_docs_markdown (const struct cbw_ctl_table *table);

/* Typed argument getters for handlers (validation already happened). */
const char *cbw_ctl_arg_str (struct json_object *args, const char *name,
                             const char *dflt);
long long cbw_ctl_arg_int (struct json_object *args, const char *name,
                           long long dflt);
bool cbw_ctl_arg_bool (struct json_object *args, const char *name, bool dflt);

/* Client side (used by tests, cbwd and the cbw filter to talk to a module):
 * connect, read the greeting, send one command and wait for its reply.
 * Returns the parsed reply object (caller puts it) or NULL with *err. */
struct cbw_ctl_client;
struct cbw_ctl_client *cbw_ctl_client_connect (const char *path,
                                               struct cbw_err *err);
struct json_object *cbw_ctl_client_call (struct cbw_ctl_client *c,
                                         const char *command,
                                         struct json_object *args /* stolen */,
                                         struct cbw_err *err);
void cbw_ctl_client_close (struct cbw_ctl_client *c);

/* Additions to the client side.
 * cbw_ctl_client_call() returns the whole reply object: {"return": ...} or
 * {"error": {"class", "desc"}} (plus "id"); NULL only for transport or
 * protocol failures (connection lost, timeout, unparsable reply).
 * cbw_ctl_client_execute() is the convenient form: 0 and *ret = the "return"
 * value (a new reference, may be NULL if ret_out is NULL), or -1 with *err
 * filled from the error reply ("CLASS: desc") and errnum mapped from the
 * class (NotFound->ENOENT, Exists->EEXIST, Busy->EBUSY, InvalidParameter and
 * ParseError->EINVAL, CommandNotFound->ENOTSUP, Timeout->ETIMEDOUT,
 * IOError and GenericError->EIO); *err_class (if non-NULL) gets the class
 * (-1 for a transport failure). */
int cbw_ctl_client_execute (struct cbw_ctl_client *c, const char *command,
                            struct json_object *args /* stolen */,
                            struct json_object **ret_out, int *err_class,
                            struct cbw_err *err);
/* The module name from the server's greeting. */
const char *cbw_ctl_client_module (const struct cbw_ctl_client *c);
/* Receive timeout for replies in milliseconds (0 = wait forever, the
 * default).  A timed-out call fails with ETIMEDOUT and the connection
 * becomes unusable (a late reply would be mismatched). */
void cbw_ctl_client_set_timeout (struct cbw_ctl_client *c, int timeout_ms);
/* Send raw bytes / read one raw line (no trailing newline, malloc'd; NULL
 * with *err on EOF or error).  For tests and tools. */
int cbw_ctl_client_send_raw (struct cbw_ctl_client *c, const void *buf,
                             size_t len, struct cbw_err *err);
char *cbw_ctl_client_read_line (struct cbw_ctl_client *c, struct cbw_err *err);
/* Events on a subscribed connection: the next event line (malloc'd, no
 * newline), first those that arrived while cbw_ctl_client_call() waited for
 * a reply (kept for this, at most 4096), then from the socket.  Waits at
 * most timeout_ms (< 0: forever); NULL with *err on timeout (ETIMEDOUT,
 * the connection stays usable), EOF or error. */
char *cbw_ctl_client_read_event (struct cbw_ctl_client *c, int timeout_ms,
                                 struct cbw_err *err);

#endif
