/* cbw — server/wire.h: big-endian field access and a growable output buffer,
 * used by the handshake and transmission code.
 *
 * struct cbwd_obuf is owned by one thread at a time (no locking inside).
 * Appends never fail silently: on ENOMEM the buffer is marked failed and the
 * caller checks cbwd_obuf_failed() once after building a message.
 */
#ifndef CBWD_WIRE_H
#define CBWD_WIRE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline uint16_t get_be16 (const uint8_t *p)
{ return (uint16_t) ((p[0] << 8) | p[1]); }
static inline uint32_t get_be32 (const uint8_t *p)
{ return ((uint32_t) p[0] << 24) | ((uint32_t) p[1] << 16) | ((uint32_t) p[2] << 8) | p[3]; }
static inline uint64_t get_be64 (const uint8_t *p)
{ return ((uint64_t) get_be32 (p) << 32) | get_be32 (p + 4); }
static inline void put_be16 (uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = v; }
static inline void put_be32 (uint8_t *p, uint32_t v)
{ p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v; }
static inline void put_be64 (uint8_t *p, uint64_t v)
{ put_be32 (p, v >> 32); put_be32 (p + 4, (uint32_t) v); }

struct cbwd_obuf {
  uint8_t *data;
  size_t len, cap;
  bool failed;
};

static inline bool cbwd_obuf_reserve (struct cbwd_obuf *b, size_t more)
{
  if (b->failed) return false;
  if (b->len + more <= b->cap) return true;
  size_t ncap = b->cap ? b->cap * 2 : 256;
  while (ncap < b->len + more) ncap *= 2;
  uint8_t *n = realloc (b->data, ncap);
  if (!n) { b->failed = true; return false; }
  b->data = n; b->cap = ncap;
  return true;
}
static inline void cbwd_obuf_put (struct cbwd_obuf *b, const void *p, size_t n)
{ if (n && cbwd_obuf_reserve (b, n)) { memcpy (b->data + b->len, p, n); b->len += n; } }
static inline void cbwd_obuf_be16 (struct cbwd_obuf *b, uint16_t v)
{ uint8_t t[2]; put_be16 (t, v); cbwd_obuf_put (b, t, 2); }
static inline void cbwd_obuf_be32 (struct cbwd_obuf *b, uint32_t v)
{ uint8_t t[4]; put_be32 (t, v); cbwd_obuf_put (b, t, 4); }
static inline void cbwd_obuf_be64 (struct cbwd_obuf *b, uint64_t v)
{ uint8_t t[8]; put_be64 (t, v); cbwd_obuf_put (b, t, 8); }
static inline void cbwd_obuf_free (struct cbwd_obuf *b)
{ free (b->data); b->data = NULL; b->len = b->cap = 0; b->failed = false; }

#endif
