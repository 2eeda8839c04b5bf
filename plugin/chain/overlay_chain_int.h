/* cbw — plugin/chain/overlay_chain_int.h: the state the overlay chain
 * engine's files share (overlay_chain.c: I/O, snapshot, status;
 * overlay_open.c: create, open, recovery, close; commit.c: the commit
 * engine).  Not for the plugin or tests: they use overlay_chain.h.
 *
 * Locking (never held across I/O):
 *  - gate_lock/gate_cond: in_flight counts guest requests and commit chunks
 *    using c->layers; paused blocks new ones.  c->layers, c->nl, c->desc and
 *    c->mirror change only while paused with in_flight == 0.
 *  - map_lock: every layer's map, map_dirty, data_dirty.
 *  - range_lock/range_cond: active cluster ranges of writes (top writes,
 *    mirror writes, commit copy chunks); overlapping ones wait.
 *  - flush_lock/flush_cond: "flushing" flag; one flush at a time.
 *  - op_lock: operation state (op_* fields, snapshot/commit start/finish,
 *    reap_thread/reap_live).
 *  - op_iter_lock: the commit workers' shared cursor (op_next, op_stop).
 *    op_bits, op_lo/op_hi, op_chunk/op_flags are written before the workers
 *    start and only read while they run.
 * Lock order: op_lock -> gate_lock; map_lock, range_lock and op_iter_lock
 * are leaves.
 */
#ifndef CBW_OVERLAY_CHAIN_INT_H
#define CBW_OVERLAY_CHAIN_INT_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#include "overlay_chain.h"

struct layer {
  char *name;                   /* base path or overlay descriptor name */
  bool is_base;
  int fd;
  bool desc_loaded, map_loaded;
  struct cbw_ovl_desc desc;     /* overlays */
  char *map_path;               /* overlays */
  char *data_path;
  struct cbw_ovl_map map;       /* overlays; map_lock */
  bool map_dirty;               /* map_lock */
  bool data_dirty;              /* map_lock */
};

struct range { uint64_t s, e; };   /* clusters [s, e] */

enum op_state { OP_NONE, OP_RUNNING, OP_COMPLETED, OP_FAILED, OP_CANCELLED };

struct ovc {
  char *chain_path, *dir;
  uint64_t size;
  uint32_t csize, cbits;
  bool readonly, force_share;

  /* changed only while paused (see top) */
  struct cbw_chain_desc desc;
  unsigned nl;                  /* layers incl. base */
  struct layer **layers;
  int mirror;                   /* active commit target, or -1 */

  pthread_mutex_t gate_lock;
  pthread_cond_t gate_cond;
  unsigned in_flight;
  bool paused;

  pthread_mutex_t map_lock;

  pthread_mutex_t range_lock;
  pthread_cond_t range_cond;
  struct range *ranges;
  size_t nranges, ranges_cap;

  pthread_mutex_t flush_lock;
  pthread_cond_t flush_cond;
  bool flushing;

  pthread_mutex_t op_lock;      /* guards op_* */
  enum op_state op_state;
  bool op_thread_live;          /* joinable */
  pthread_t op_thread;
  unsigned op_lo, op_hi;
  enum cbw_commit_mode op_mode;
  bool op_active;
  _Atomic uint64_t op_speed;
  _Atomic bool op_cancel;
  _Atomic bool op_mirror_failed; /* a mirrored guest write failed: the commit must not finish */
  struct cbw_err op_mirror_err;  /* op_lock */
  _Atomic uint64_t op_done;
  uint64_t op_total;
  struct cbw_bitmap op_bits;    /* clusters to copy (read-only during the copy) */
  pthread_mutex_t op_iter_lock; /* guards op_next, op_stop (commit workers) */
  uint64_t op_next;             /* next cluster the copy looks at */
  uint64_t op_chunk;            /* window size in bytes (commit thread, set before workers) */
  unsigned op_flags;            /* OVC_TUNE_* (same) */
  bool op_stop;                 /* a worker failed: the others stop */
  _Atomic bool op_no_cfr;       /* copy_file_range refused: copy through buffers */
  struct layer **op_dropped;    /* layers deleted by the switch, closed after resume */
  unsigned op_ndropped;
  pthread_t reap_thread;        /* closes deleted layers (frees their space); op_lock */
  bool reap_live;               /* op_lock */
  unsigned op_trunc_hi;         /* make-empty: layers op_lo..op_trunc_hi punched after resume */
  bool op_punch_top;            /* make-empty of the active top: punch its unused clusters */
  struct cbw_err op_err;
  int64_t op_started;
  struct timespec op_t0;        /* commit thread: start of the copy (speed limit) */
  bool switch_pending;          /* a recorded switch failed: reopen finishes it */
};

static inline uint64_t min64 (uint64_t a, uint64_t b) { return a < b ? a : b; }
static inline uint64_t cl_start (struct ovc *c, uint64_t cl) { return cl << c->cbits; }
static inline uint64_t cl_end (struct ovc *c, uint64_t cl)
{ return min64 ((cl + 1) << c->cbits, c->size); }

/* overlay_chain.c */
/* Test hook (ovc_set_test_hook): a named fault point; "durable" after a
 * file's content became durable; a path-carrying point. */
int ovc__hook (const char *point, struct cbw_err *err);
void ovc__durable (const char *path);
void ovc__durable_in (const char *dir, const char *name);
void ovc__hook_path_in (const char *point, const char *dir, const char *name);
/* Open one layer (the raw base when is_base). */
struct layer *ovc__layer_open (struct ovc *c, const char *name, bool is_base,
                               struct cbw_err *err);
int ovc__chain_save (const char *path, struct cbw_chain_desc *d, struct cbw_err *err);
int ovc__atomic_save (const char *path, const void *buf, size_t len, struct cbw_err *err);
void ovc__gate_enter (struct ovc *c);
void ovc__gate_leave (struct ovc *c);
void ovc__gate_pause (struct ovc *c);
void ovc__gate_resume (struct ovc *c);
int ovc__range_acquire (struct ovc *c, uint64_t s, uint64_t e, struct cbw_err *err);
void ovc__range_release (struct ovc *c, uint64_t s, uint64_t e);
void ovc__layer_free (struct layer *l);
unsigned ovc__serving_layer (struct ovc *c, unsigned top, uint64_t cl, enum cbw_ovl_state *st);
int ovc__write_layer (struct ovc *c, unsigned k, const void *buf, uint64_t count, uint64_t off, struct cbw_err *err);
int ovc__zero_layer (struct ovc *c, unsigned k, uint64_t count, uint64_t off, struct cbw_err *err);
int ovc__do_flush (struct ovc *c, struct cbw_err *err);
int ovc__roll_forward (const char *chain_path, const char *dir, struct cbw_chain_desc *d, struct cbw_err *err);

/* commit.c */
/* Wait for the space of previously deleted layers to be freed. */
void ovc__reap_wait (struct ovc *c);

#endif
