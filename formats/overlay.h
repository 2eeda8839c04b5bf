/* cbw — formats/overlay.h: the on-disk format of overlay chains (raw-disk
 * snapshots), byte-level spec in docs/formats/overlay.md.
 *
 * A chain is a raw base disk plus 0..CBW_CHAIN_MAX_LAYERS overlays, named
 * bottom to top by a chain descriptor (JSON).  Each overlay has:
 *   - a JSON descriptor (the layer's name in the chain) naming its data file,
 *     its map file and its backing layer (the layer right below it);
 *   - a sparse data file addressed 1:1 with the disk (same size);
 *   - an allocation map: 2 bits per cluster (two formats/bitmap.h bitmaps),
 *     UNALLOC (read through to the layer below), DATA (in this data file) or
 *     ZERO (reads as zeros, nothing stored).
 * Every file has a version and a checksum; every update is crash-atomic
 * (common/fileutil.h: cbw_write_file_atomic).  The chain descriptor is the
 * commit point of every chain change (snapshot, commit, delete).
 *
 * This library only reads, validates and writes the files; the layered I/O
 * engine and the operations are in plugin/chain/ (overlay_chain.c,
 * commit.c).
 *
 * Locking: none inside; callers serialise updates of one file.  Struct
 * cbw_ovl_map bit accessors follow formats/bitmap.h rules (caller locks).
 */
#ifndef CBW_OVERLAY_H
#define CBW_OVERLAY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "bitmap.h"
#include "cbw_err.h"

#define CBW_OVERLAY_FORMAT_VERSION 1
#define CBW_CHAIN_MAX_LAYERS 64            /* overlays above the base */
#define CBW_OVL_CLUSTER_MIN 4096U
#define CBW_OVL_CLUSTER_MAX (16U << 20)
#define CBW_OVL_CLUSTER_DEFAULT 65536U
#define CBW_OVL_NAME_MAX 200               /* [A-Za-z0-9_.+-], no '/', not . / .. */
#define CBW_OVL_JSON_MAX (1024 * 1024)     /* descriptors larger than this: EFBIG */
#define CBW_OVL_MAP_HEADER_SIZE 64

enum cbw_ovl_state {
  CBW_OVL_UNALLOC = 0,   /* read through to the layer below */
  CBW_OVL_DATA = 1,      /* data is in this layer's data file */
  CBW_OVL_ZERO = 2,      /* reads as zeros, nothing stored */
};

/* Allocation map of one overlay.  ZERO clusters have both bits set; a zero
 * bit without its alloc bit is corrupt. */
struct cbw_ovl_map {
  uint64_t disk_size;
  uint32_t cluster_size;         /* power of two */
  uint32_t cluster_bits;
  uint64_t nclusters;            /* ceil(disk_size / cluster_size) */
  uint64_t generation;           /* bumped by every save */
  struct cbw_bitmap alloc;
  struct cbw_bitmap zero;
};

int cbw_ovl_map_init (struct cbw_ovl_map *m, uint64_t disk_size,
                      uint32_t cluster_size, struct cbw_err *err);
void cbw_ovl_map_free (struct cbw_ovl_map *m);
enum cbw_ovl_state cbw_ovl_map_get (const struct cbw_ovl_map *m, uint64_t cluster);
/* Set [start, start+count) clusters to a state (clipped to nclusters). */
void cbw_ovl_map_set (struct cbw_ovl_map *m, uint64_t start, uint64_t count,
                      enum cbw_ovl_state st);
/* Serialised file image (header + payload), malloc'd. */
int cbw_ovl_map_encode (const struct cbw_ovl_map *m, void **buf, size_t *len,
                        struct cbw_err *err);
/* Decode and validate a file image for a disk of disk_size/cluster_size:
 * magic, version, sizes, checksums, zero-without-alloc.  m is initialised. */
int cbw_ovl_map_decode (struct cbw_ovl_map *m, const void *buf, size_t len,
                        uint64_t disk_size, uint32_t cluster_size,
                        const char *what, struct cbw_err *err);
int cbw_ovl_map_load (const char *path, uint64_t disk_size,
                      uint32_t cluster_size, struct cbw_ovl_map *m,
                      struct cbw_err *err);
/* Crash-atomic save (bumps m->generation first). */
int cbw_ovl_map_save (const char *path, struct cbw_ovl_map *m,
                      struct cbw_err *err);

/* Overlay descriptor. */
struct cbw_ovl_desc {
  char *name;            /* descriptor file name (= layer name in the chain) */
  char *data;            /* data file name */
  char *map;             /* map file name */
  char *backing;         /* name of the layer below (base path or overlay) */
  char *label;           /* free text given at snapshot time, may be "" */
  uint64_t size;
  uint32_t cluster_size;
  int64_t created;       /* unix seconds */
};
void cbw_ovl_desc_free (struct cbw_ovl_desc *d);
/* Load DIR/NAME; validates version, checksum, fields. */
int cbw_ovl_desc_load (const char *dir, const char *name,
                       struct cbw_ovl_desc *d, struct cbw_err *err);
int cbw_ovl_desc_save (const char *dir, const struct cbw_ovl_desc *d,
                       struct cbw_err *err);

/* Pending operation recorded in the chain descriptor (crash recovery). */
enum cbw_chain_op_type { CBW_CHAIN_OP_NONE = 0, CBW_CHAIN_OP_COMMIT };
enum cbw_chain_op_phase { CBW_CHAIN_PHASE_COPY = 0, CBW_CHAIN_PHASE_FINISH };
enum cbw_commit_mode { CBW_COMMIT_DELETE = 0, CBW_COMMIT_MAKE_EMPTY };

struct cbw_chain_op {
  enum cbw_chain_op_type type;
  enum cbw_chain_op_phase phase;
  enum cbw_commit_mode mode;
  uint32_t lo, hi;       /* layer indexes (1 = lowest overlay) merged into lo-1 */
};

/* Chain descriptor. */
struct cbw_chain_desc {
  uint64_t size;
  uint32_t cluster_size;
  uint64_t generation;   /* bumped by every save */
  char *base;            /* path of the raw base (relative to the chain's dir or absolute) */
  size_t nlayers;        /* overlays, bottom to top */
  char **layers;
  struct cbw_chain_op op;
};
void cbw_chain_desc_free (struct cbw_chain_desc *c);
int cbw_chain_desc_load (const char *path, struct cbw_chain_desc *c,
                         struct cbw_err *err);
/* Crash-atomic save (bumps c->generation first). */
int cbw_chain_desc_save (const char *path, struct cbw_chain_desc *c,
                         struct cbw_err *err);
/* Write a new chain descriptor at PATH (which must not exist: EEXIST, the
 * existing file untouched), bumping c->generation, then fsync its directory. */
int cbw_chain_desc_create (const char *path, struct cbw_chain_desc *c,
                           struct cbw_err *err);
int cbw_chain_desc_copy (struct cbw_chain_desc *dst,
                         const struct cbw_chain_desc *src, struct cbw_err *err);

/* Name rules for layer files. */
int cbw_ovl_name_valid (const char *name, struct cbw_err *err);
const char *cbw_commit_mode_name (enum cbw_commit_mode m);

/* Create a new empty overlay NAME in DIR: data file NAME.data (sparse, size
 * bytes, fsynced), map NAME.map (empty), descriptor NAME (last), then fsync
 * DIR.  Every file is created with O_EXCL: if any of the three names is
 * taken, this fails with EEXIST naming that file, which is left untouched;
 * on any failure the files created so far are removed (only those). */
int cbw_ovl_create (const char *dir, const char *name, const char *backing,
                    const char *label, uint64_t size, uint32_t cluster_size,
                    struct cbw_err *err);
/* Remove an overlay's files (descriptor first). Errors other than ENOENT
 * are reported. */
int cbw_ovl_remove (const char *dir, const struct cbw_ovl_desc *d,
                    struct cbw_err *err);

/* Follow backing links from overlay TOP down to a non-overlay name (the
 * base), detecting loops and chains deeper than CBW_CHAIN_MAX_LAYERS.  On
 * success *names_out (malloc'd array of malloc'd strings) is bottom (base) to
 * top, *n_out its length. */
int cbw_ovl_resolve_backing (const char *dir, const char *top,
                             char ***names_out, size_t *n_out,
                             struct cbw_err *err);

/* Full validation of a loaded chain: base exists and has the chain's size,
 * no layer twice (loop), each overlay descriptor loads, has the chain's size
 * and cluster size, its backing is the layer right below, its data file has
 * the right size and its map loads.  Used by the engine at open and by
 * tests; does not modify anything. */
int cbw_chain_validate (const char *dir, const struct cbw_chain_desc *c,
                        struct cbw_err *err);

/* dirname of a path, malloc'd. */
char *cbw_ovl_dirname (const char *path);
/* DIR/NAME (NAME returned as is if absolute), malloc'd. */
char *cbw_ovl_join (const char *dir, const char *name);

#endif
