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

/* Zigzag position -> natural (row-major) index in an 8x8 block. */
static const uint8_t ZIGZAG[64] = {
    0,  1,  8,  16, 9,  2,  3,  10, 17, 24, 32, 25, 18, 11, 4,  5,  12, 19, 26, 33, 40, 48,
    41, 34, 27, 20, 13, 6,  7,  14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23,
    30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63};

/* Huffman decoding of a scan with a restart marker after every MCU (a crop's sub-JPEG)
 * into libjpeg's coefficient blocks, for jpegext.c's crop decode. */
#define MCU_MAX_BLOCKS 10 /* libjpeg's D_MAX_BLOCKS_IN_MCU */
typedef struct McuDecoder McuDecoder;
typedef struct {
  const uint8_t *bits, *huffval; /* a table's bits[17] (bits[0] unused) and huffval[256] */
} HuffRef;
/* The decoder of the entropy-coded data from scan up to and including EOI at end - 2:
 * n_mcus MCUs of nblocks blocks each, block b of component block_comp[b], component c coded
 * with the tables dc[c] and ac[c]. NULL where this code does not take the scan (tables for
 * more than 8-bit samples, markers not RST0-7 in order then EOI, no memory). */
McuDecoder *mcu_decoder_new(const uint8_t *scan, const uint8_t *end, uint32_t n_mcus, int nblocks,
                            const int *block_comp, int ncomp, const HuffRef *dc, const HuffRef *ac);
/* Decode the next MCU into nblocks zeroed blocks of 64 coefficients (natural order). -1 for
 * corrupt data: an invalid code, a coefficient past its block, bits past the MCU's data or
 * whole bytes left after it, no MCU left. */
int mcu_decoder_next(McuDecoder *d, int16_t *const *blocks);
void mcu_decoder_free(McuDecoder *d);

#endif
