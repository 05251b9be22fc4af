/* effitrain._jpegext: what recode.c (the fast transcode path) shares with jpegext.c. */
#ifndef EFFITRAIN_RECODE_H
#define EFFITRAIN_RECODE_H

#include <stddef.h>
#include <stdint.h>

#define INDEX_VERSION 1
#define INDEX_HEADER 12

/* A transcoded JPEG and its MCU-row index (format: jpegext.c's header), both malloc'ed. */
typedef struct {
  uint8_t *jpeg, *index;
  size_t jpeg_len, index_len;
} Transcoded;

static inline void wr32le(uint8_t *p, uint32_t v) {
  p[0] = (uint8_t)v;
  p[1] = (uint8_t)(v >> 8);
  p[2] = (uint8_t)(v >> 16);
  p[3] = (uint8_t)(v >> 24);
}

/* Optimal Huffman code lengths limited to 16 bits for these symbol counts (JPEG Annex K.2,
 * libjpeg's tie-breaking): bits[1..16] and huffval in a DHT's layout. -1 if impossible. */
int optimal_table(const long counts[257], uint8_t bits[17], uint8_t huffval[256]);

/* Transcode a baseline sequential Huffman JPEG without libjpeg: 0 with out filled (the same
 * bytes as libjpeg's path in jpegext.c gives), or RECODE_DECLINED where this code does not
 * take the file (anything but the plain cases; nothing allocated): use the libjpeg path. */
#define RECODE_DECLINED 1
int recode_baseline(const uint8_t *data, size_t len, Transcoded *out);

#endif
