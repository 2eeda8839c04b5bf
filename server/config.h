/* cbw — server/config.h: cbwd's configuration: --export KEY=VALUE,... specs
 * and the JSON config file, both turned into the same struct cbwd_export_spec
 * and built by one function, so the two front ends cannot drift apart.
 * Start-up only (single thread).
 */
#ifndef CBWD_CONFIG_H
#define CBWD_CONFIG_H

#include <stdint.h>

#include "cbw_err.h"
#include "export.h"
#include "server.h"

#define CBWD_MAX_BITMAPS 64

struct cbwd_bitmap_spec {
  char *name;                 /* context is qemu:dirty-bitmap:NAME */
  char *source;               /* raw | extents | store */
  char *path;                 /* raw/extents file, or store descriptor */
  char *stored;               /* store: bitmap name inside the store (default NAME) */
  uint64_t granularity;       /* raw */
};

struct cbwd_export_spec {
  char *name, *type, *path, *description, *upstream;
  uint64_t size, limit;
  unsigned connections;
  int release;                /* pit: forward TRIM upstream */
  int direct;                 /* store: aligned writes with O_DIRECT */
  /* pit: direct reads (export_pit.c); the debug knobs are for tests */
  char *state_file, *live_file, *store_file;
  uint64_t state_granularity;
  uint64_t debug_delay_us;
  int debug_no_recheck;
  size_t nbitmaps;
  struct cbwd_bitmap_spec bitmaps[CBWD_MAX_BITMAPS];
  /* allow= identities (export.h: cbwd_export_allowed); has_allow is set
   * even when the list ends up empty */
  size_t nallow;
  char **allow;
  int has_allow;
};

void cbwd_export_spec_free (struct cbwd_export_spec *s);
/* "name=disk,type=file,path=disk.img,bitmap=NAME:raw:PATH:GRAN,..." */
int cbwd_parse_export_kv (const char *kv, struct cbwd_export_spec *s,
                          struct cbw_err *err);
/* Size with optional K/M/G/T suffix (powers of 1024). */
int cbwd_parse_size (const char *str, uint64_t *out);

/* Smallest --max-memory: two requests of the largest size (32 MiB). */
#define CBWD_MIN_MAX_MEMORY (64ULL * 1024 * 1024)
#define CBWD_DEFAULT_MAX_MEMORY (256ULL * 1024 * 1024)
struct cbwd_limits;
/* Set one of the connection bounds from its option string: "max-memory"
 * (a size >= 64M), "idle-timeout" (seconds, 0 = never),
 * "max-connections-per-peer" (0 = no limit).  Returns 0 or -1 with err. */
int cbwd_parse_limit (const char *str, const char *key, struct cbwd_limits *l,
                      struct cbw_err *err);
struct cbwd_export *cbwd_build_export (const struct cbwd_export_spec *s,
                                       struct cbw_err *err);
/* Load a JSON config: listeners are added to srv, exports appended. */
int cbwd_load_config (const char *path, struct cbwd_server *srv,
                      struct cbw_err *err);
/* The same, and *disks gets the "disks" section (a new reference, NULL if
 * absent; disks == NULL: a "disks" section is an error): an array of
 * objects with a string "name", a relative "file" made absolute against the
 * config file's directory; the other keys are the orchestrator's disk-add
 * arguments, checked by cbw_orch_apply_disks() (server/orch/orch.h). */
struct json_object;
int cbwd_load_config_ex (const char *path, struct cbwd_server *srv,
                         struct json_object **disks, struct cbw_err *err);
/* Just the "disks" section of parsed config `root` (see above). */
int cbwd_config_disks (struct json_object *root, const char *path,
                       struct json_object **disks, struct cbw_err *err);
/* --pit-allow ID: one more identity for the orchestrator's PIT exports. */
int cbwd_add_pit_allow (struct cbwd_server *srv, const char *identity,
                        struct cbw_err *err);
/* --freeze-hook NAME=PATH: a named freeze hook (NAME: letters, digits,
 * '.', '_', '-'; PATH: an absolute path to an executable). */
int cbwd_add_freeze_hook (struct cbwd_server *srv, const char *spec,
                          struct cbw_err *err);
/* Free what the two above (and the config file) stored in srv. */
void cbwd_config_free (struct cbwd_server *srv);
/* Append to the export list: start-up or the loop thread only (from other
 * threads use cbwd_server_add_export()). */
int cbwd_add_export (struct cbwd_server *srv, struct cbwd_export *e,
                     struct cbw_err *err);
#define cbwd_add_export_loop cbwd_add_export

#endif
