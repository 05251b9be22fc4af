/*
 * effitrain._jpegext: lossless re-coding of baseline Huffman JPEGs without libjpeg, the
 * fast path of transcode() (jpegext.c).
 *
 * libjpeg's way (decode the scan into coefficient blocks, count symbols over the blocks,
 * encode the blocks again) touches every one of the 64 coefficients of every block three
 * times. Here the scan is Huffman-decoded once, straight into the stream of symbols the new
 * scan will code (DC differences against a predictor reset at every MCU, AC run/size
 * symbols with their extra bits passed through unchanged), counting them on the way; the
 * optimal tables are built from the counts, and one pass over the symbols writes the new
 * scan with a restart marker after every MCU and the MCU-row index.
 *
 * The output is byte for byte what jpegext.c's libjpeg path writes for the same file (the
 * tests compare the two over every kind of input). Only files this code fully understands
 * are taken: 8-bit sequential Huffman (SOF0/SOF1), one interleaved scan of all components
 * in frame order, the layouts transcode supports, defined and valid Huffman tables, every
 * code valid, restart markers in order with nothing but padding bits before each, EOI
 * right after the scan. Anything else returns RECODE_DECLINED and goes to the libjpeg path,
 * which keeps its own rules on what is corrupt: this path never accepts a file that path
 * would refuse, nor writes other bytes.
 */
#include "recode.h"

#include <stdlib.h>
#include <string.h>

#define FAST_BITS 10        /* Huffman codes up to this long are decoded by one lookup */
#define PAD 1024            /* zero bytes after the unstuffed scan: a block reads < 300 past its end */
#define MAX_DIMENSION 65500 /* libjpeg's JPEG_MAX_DIMENSION */

typedef struct {
  int defined;
  uint8_t bits[17], huffval[256];
} HuffSpec;

typedef struct {
  uint32_t fast[1 << FAST_BITS]; /* ENTRY()s, 0 for longer codes */
  int32_t maxcode[17];           /* largest code of each length, -1 if none */
  int32_t valoff[17];            /* huffval index of a code of each length, minus the code */
  uint8_t huffval[256];
} DecTable;

typedef struct {
  int id, h, v, tq, td, ta;
} Comp;

typedef struct {
  uint32_t width, height, restart_interval;
  int ncomp, sof_seen;
  Comp comp[3];
  uint16_t quant[4][64]; /* in file (zigzag) order, which is also the order written */
  int quant_defined[4];
  HuffSpec dc[4], ac[4];
  int jfif;
  uint8_t jfif_minor, density_unit;
  uint16_t x_density, y_density;
  size_t scan_pos; /* first entropy-coded byte */
} Header;

typedef struct {
  uint32_t cols, rows;       /* MCU grid */
  int nblocks;               /* blocks per MCU, in coding order: */
  int bcomp[6], bx[6], by[6]; /* component, column and row inside its part of the MCU */
  int last_col_w[3], last_row_h[3]; /* blocks of the last MCU column/row inside the image */
} Geometry;

static uint32_t be16(const uint8_t *p) { return ((uint32_t)p[0] << 8) | p[1]; }

static uint64_t be64(const uint8_t *p) {
  uint64_t v;
  memcpy(&v, p, 8);
  return __builtin_bswap64(v);
}

/* ----------------------------------------------------------------- header */

static int parse_dqt(Header *h, const uint8_t *p, size_t n) {
  while (n > 0) {
    int precision = p[0] >> 4, t = p[0] & 15;
    size_t size = precision ? 128 : 64;
    if (precision > 1 || t > 3 || n < 1 + size) return -1; /* incl. partial tables */
    for (int i = 0; i < 64; i++) h->quant[t][i] = (uint16_t)(precision ? be16(p + 1 + 2 * i) : p[1 + i]);
    h->quant_defined[t] = 1;
    p += 1 + size;
    n -= 1 + size;
  }
  return 0;
}

static int parse_dht(Header *h, const uint8_t *p, size_t n) {
  while (n > 0) {
    if (n < 17) return -1;
    int cls = p[0] >> 4, t = p[0] & 15;
    size_t count = 0;
    if (cls > 1 || t > 3) return -1;
    for (int l = 1; l <= 16; l++) count += p[l];
    if (count > 256 || n < 17 + count) return -1;
    HuffSpec *s = cls ? &h->ac[t] : &h->dc[t];
    s->defined = 1;
    s->bits[0] = 0;
    memcpy(s->bits + 1, p + 1, 16);
    memcpy(s->huffval, p + 17, count);
    p += 17 + count;
    n -= 17 + count;
  }
  return 0;
}

/* The layouts jpegext.c's supported_layout() takes, as libjpeg would read them. */
static int parse_sof(Header *h, const uint8_t *p, size_t n) {
  if (h->sof_seen || n < 6 || p[0] != 8) return -1;
  h->sof_seen = 1;
  h->height = be16(p + 1);
  h->width = be16(p + 3);
  h->ncomp = p[5];
  if ((h->ncomp != 1 && h->ncomp != 3) || n != 6 + 3 * (size_t)h->ncomp) return -1;
  if (h->width == 0 || h->height == 0 || h->width > MAX_DIMENSION || h->height > MAX_DIMENSION) return -1;
  for (int c = 0; c < h->ncomp; c++) {
    Comp *k = &h->comp[c];
    k->id = p[6 + 3 * c];
    k->h = p[7 + 3 * c] >> 4;
    k->v = p[7 + 3 * c] & 15;
    k->tq = p[8 + 3 * c];
    if (k->tq > 3 || k->h < 1 || k->v < 1) return -1;
  }
  if (h->ncomp == 1) return h->comp[0].h <= 2 && h->comp[0].v <= 2 ? 0 : -1;
  int lh = h->comp[0].h, lv = h->comp[0].v;
  if (!((lh == 1 && lv == 1) || (lh == 2 && lv == 1) || (lh == 2 && lv == 2))) return -1;
  for (int c = 1; c < 3; c++)
    if (h->comp[c].h != 1 || h->comp[c].v != 1) return -1;
  return 0;
}

/* One scan of all components in frame order, sequential (Ss=0, Se=63, Ah=Al=0). */
static int parse_sos(Header *h, const uint8_t *p, size_t n) {
  if (!h->sof_seen || n < 1 || p[0] != h->ncomp || n != 4 + 2 * (size_t)h->ncomp) return -1;
  for (int c = 0; c < h->ncomp; c++) {
    Comp *k = &h->comp[c];
    if (p[1 + 2 * c] != k->id) return -1;
    k->td = p[2 + 2 * c] >> 4;
    k->ta = p[2 + 2 * c] & 15;
    if (k->td > 3 || k->ta > 3 || !h->dc[k->td].defined || !h->ac[k->ta].defined || !h->quant_defined[k->tq])
      return -1;
  }
  const uint8_t *q = p + 1 + 2 * h->ncomp;
  if (q[0] != 0 || q[1] != 63 || q[2] != 0) return -1;
  if (h->ncomp == 3) {
    /* libjpeg reads 3 components as YCbCr with a JFIF marker, or without one if the IDs
     * are 1, 2, 3 (anything else: other guesses, left to the libjpeg path). */
    if (h->comp[0].id == h->comp[1].id || h->comp[0].id == h->comp[2].id || h->comp[1].id == h->comp[2].id)
      return -1;
    if (!h->jfif && !(h->comp[0].id == 1 && h->comp[1].id == 2 && h->comp[2].id == 3)) return -1;
  }
  return 0;
}

static int parse_header(const uint8_t *data, size_t len, Header *h) {
  memset(h, 0, sizeof *h);
  if (len < 4 || data[0] != 0xFF || data[1] != 0xD8) return -1;
  size_t pos = 2;
  for (;;) {
    if (pos + 4 > len || data[pos] != 0xFF) return -1;
    uint8_t m = data[pos + 1];
    size_t seglen = be16(data + pos + 2);
    if (seglen < 2 || pos + 2 + seglen > len) return -1;
    const uint8_t *p = data + pos + 4;
    size_t n = seglen - 2;
    int rc = 0;
    if (m == 0xC0 || m == 0xC1) rc = parse_sof(h, p, n);
    else if (m == 0xC4) rc = parse_dht(h, p, n);
    else if (m == 0xDB) rc = parse_dqt(h, p, n);
    else if (m == 0xDD) {
      if (n != 2) return -1;
      h->restart_interval = be16(p);
    } else if (m == 0xE0) {
      if (n >= 14 && memcmp(p, "JFIF", 5) == 0) { /* what libjpeg reads of it */
        if (p[5] != 1) return -1; /* other versions: libjpeg warns or writes 1.01 */
        h->jfif = 1;
        h->jfif_minor = p[6];
        h->density_unit = p[7];
        h->x_density = (uint16_t)be16(p + 8);
        h->y_density = (uint16_t)be16(p + 10);
      }
    } else if (m == 0xDA) {
      if (parse_sos(h, p, n) < 0) return -1;
      h->scan_pos = pos + 2 + seglen;
      return 0;
    } else if (!((m >= 0xE1 && m <= 0xEF && m != 0xEE) || m == 0xFE))
      return -1; /* Adobe (colour transform), other frames, DNL, ...: the libjpeg path */
    if (rc < 0) return -1;
    pos += 2 + seglen;
  }
}

static void geometry(const Header *h, Geometry *g) {
  memset(g, 0, sizeof *g);
  if (h->ncomp == 1) { /* a lone component's scan is never interleaved: one block per MCU */
    g->cols = (h->width + 7) / 8;
    g->rows = (h->height + 7) / 8;
    g->nblocks = 1;
    g->last_col_w[0] = g->last_row_h[0] = 1;
    return;
  }
  int hmax = h->comp[0].h, vmax = h->comp[0].v;
  g->cols = (h->width + 8 * hmax - 1) / (8 * hmax);
  g->rows = (h->height + 8 * vmax - 1) / (8 * vmax);
  for (int c = 0; c < 3; c++) {
    const Comp *k = &h->comp[c];
    for (int y = 0; y < k->v; y++)
      for (int x = 0; x < k->h; x++) {
        g->bcomp[g->nblocks] = c;
        g->bx[g->nblocks] = x;
        g->by[g->nblocks++] = y;
      }
    /* libjpeg's width_in_blocks: ceil(width * h / (8 * hmax)); the rest are dummy blocks */
    uint32_t wib = (h->width * k->h + 8 * hmax - 1) / (8 * hmax), hib = (h->height * k->v + 8 * vmax - 1) / (8 * vmax);
    g->last_col_w[c] = (int)(wib - (g->cols - 1) * k->h);
    g->last_row_h[c] = (int)(hib - (g->rows - 1) * k->v);
  }
}

/* -------------------------------------------------------------- decoding */

/* A lookup entry: the symbol, and where the code and the symbol's extra bits together fit
 * in FAST_BITS, those bits and the length of both (FULL); else the code's length alone. */
#define FULL (1u << 20)
#define ENTRY(sym, extra, len) ((uint32_t)(sym) | ((uint32_t)(extra) << 8) | ((uint32_t)(len) << 24))

/* libjpeg's checks (jpeg_make_d_derived_tbl) and a lookup table. Tables with symbols for
 * more than 8-bit coefficients (DC categories above 11, AC sizes above 10) are declined. */
static int build_dec_table(const HuffSpec *s, int dc, DecTable *t) {
  int p = 0;
  int32_t code = 0;
  memset(t->fast, 0, sizeof t->fast);
  for (int l = 1; l <= 16; l++) {
    t->valoff[l] = p - code;
    for (int i = 0; i < s->bits[l]; i++, p++, code++) {
      uint8_t sym = s->huffval[p];
      int size = dc ? sym : sym & 15;
      if (size > (dc ? 11 : 10)) return -1; /* more than 8-bit coefficients have */
      if (l > FAST_BITS) continue;
      uint32_t base = (uint32_t)code << (FAST_BITS - l);
      if (l + size <= FAST_BITS) {
        int rest = FAST_BITS - l - size;
        for (uint32_t x = 0; x < (1u << size); x++)
          for (uint32_t j = 0; j < (1u << rest); j++)
            t->fast[base | (x << rest) | j] = ENTRY(sym, x, l + size) | FULL;
      } else
        for (uint32_t j = 0; j < (1u << (FAST_BITS - l)); j++) t->fast[base | j] = ENTRY(sym, 0, l);
    }
    t->maxcode[l] = s->bits[l] ? code - 1 : -1;
    if (code >= (1 << l)) return -1; /* over-subscribed, or the all-ones code used */
    code <<= 1;
  }
  memcpy(t->huffval, s->huffval, 256);
  return 0;
}

/* MSB-first bit reader over the unstuffed scan: buf holds nbits bits, left-aligned. */
typedef struct {
  uint64_t buf;
  int nbits;
  const uint8_t *next;
} Bits;

/* Top up to 56+ bits (reads 8 bytes at next: the buffer has PAD bytes of slack). */
static inline void refill(Bits *b) {
  b->buf |= be64(b->next) >> b->nbits;
  b->next += (63 - b->nbits) >> 3;
  b->nbits |= 56;
}

static inline void consume(Bits *b, int n) {
  b->buf <<= n;
  b->nbits -= n;
}

/* The next symbol (for DC: category; AC: run << 4 | size) and its extra bits, consumed;
 * -1 for an invalid code. At most 27 bits: needs a refill before. */
static inline int decode_sym(const DecTable *t, int dc, Bits *b, uint32_t *extra) {
  uint32_t f = t->fast[b->buf >> (64 - FAST_BITS)];
  if (f & FULL) {
    *extra = (f >> 8) & 0x7FF;
    consume(b, (int)(f >> 24));
    return (int)(f & 0xFF);
  }
  int len, sym;
  if (f) {
    len = (int)(f >> 24);
    sym = (int)(f & 0xFF);
  } else {
    for (len = FAST_BITS + 1;; len++) {
      if (len > 16) return -1;
      int32_t code = (int32_t)(b->buf >> (64 - len));
      if (code <= t->maxcode[len]) {
        sym = t->huffval[t->valoff[len] + code];
        break;
      }
    }
  }
  int size = dc ? sym : sym & 15;
  *extra = size ? (uint32_t)((b->buf << len) >> (64 - size)) : 0;
  consume(b, len + size);
  return sym;
}

/* Decode one block and append the symbols the new scan codes for it: a head entry (its
 * DC difference from *out_pred, the new scan's predictor: category | extra bits << 4 |
 * number of AC entries << 16), then the AC entries (run/size | extra bits << 8) up to EOB
 * (0) where the block ends before coefficient 63. The input's own predictor is *pred.
 * Counts the symbols into dcf/acf. */
static inline __attribute__((always_inline)) int decode_block(const DecTable *dct, const DecTable *act, Bits *bits,
                                                              int *pred, int *out_pred, uint32_t **pe, long *dcf,
                                                              long *acf) {
  Bits b = *bits;
  uint32_t *head = *pe, *e = head + 1, v;
  refill(&b);
  int s = decode_sym(dct, 1, &b, &v);
  if (s < 0) return -1;
  *pred += s == 0 ? 0 : v >> (s - 1) ? (int)v : (int)v - (1 << s) + 1;
  if (*pred < -2047 || *pred > 2047) return -1; /* beyond 8-bit DCT range: libjpeg's business */
  int d = *pred - *out_pred;
  *out_pred = *pred;
  unsigned a = (unsigned)(d < 0 ? -d : d);
  int cat = a ? 32 - __builtin_clz(a) : 0;
  if (cat > 11) return -1;
  dcf[cat]++;

  /* A refill leaves 56+ bits: enough for the DC symbol and one AC symbol (27 + 26 bits),
   * then for two AC symbols at a time. ZRL (16 zeros) entries are written as they come
   * and taken back at the end where no coefficient follows them (as libjpeg codes it). */
  *head = 0; /* never 0xF0: stops the ZRL take-back */
  int k = 1; /* the next coefficient's position */
#define AC_SYMBOL                                                                    \
  s = decode_sym(act, 0, &b, &v);                                                    \
  if (s < 0) return -1;                                                              \
  if ((s & 15) == 0 && s != 0xF0) goto eob; /* libjpeg reads any run of size 0 so */ \
  k += (s >> 4) + 1;                                                                 \
  if (__builtin_expect(k >= 64, 0)) {                                                \
    if (s == 0xF0) goto eob;                                                         \
    if (k > 64) return -1; /* a coefficient past the block */                        \
    *e++ = (uint32_t)s | (v << 8);                                                   \
    acf[s]++;                                                                        \
    goto full; /* coefficient 63: no EOB */                                          \
  }                                                                                  \
  *e++ = (uint32_t)s | (v << 8);                                                     \
  acf[s]++;
  AC_SYMBOL
  for (;;) {
    refill(&b);
    AC_SYMBOL
    AC_SYMBOL
  }
#undef AC_SYMBOL
eob:
  while (e[-1] == 0xF0) { /* trailing ZRLs */
    e--;
    acf[0xF0]--;
  }
  *e++ = 0;
  acf[0]++;
full:
  *head = (uint32_t)cat | (((uint32_t)(d < 0 ? d - 1 : d) & ((1u << cat) - 1)) << 4) |
          ((uint32_t)(e - head - 1) << 16);
  *bits = b;
  *pe = e;
  return 0;
}

typedef struct {
  uint32_t *sym;
  size_t n, cap;
} Symbols;

/* Remove byte stuffing from the scan into u, checking its markers: RST0-7 in order where
 * restart intervals end (bounds[i] = where interval i starts in u, bounds[nseg] = end),
 * then EOI. */
static int unstuff(const uint8_t *p, const uint8_t *end, uint8_t *u, uint32_t *bounds, uint32_t nseg) {
  uint8_t *w = u;
  uint32_t seg = 0;
  bounds[0] = 0;
  for (;;) {
    const uint8_t *ff = memchr(p, 0xFF, (size_t)(end - p));
    if (ff == NULL || ff + 1 >= end) return -1; /* no EOI */
    memcpy(w, p, (size_t)(ff - p));
    w += ff - p;
    uint8_t m = ff[1];
    p = ff + 2;
    if (m == 0x00) {
      *w++ = 0xFF;
    } else if (m >= 0xD0 && m <= 0xD7 && m == 0xD0 + (seg & 7) && seg + 1 < nseg) {
      bounds[++seg] = (uint32_t)(w - u);
    } else if (m == 0xD9 && seg + 1 == nseg) {
      bounds[++seg] = (uint32_t)(w - u);
      memset(w, 0, PAD);
      return 0;
    } else
      return -1;
  }
}

/* Decode the whole scan into symbols, counting them per table of the new scan (DC and AC
 * table 0 for the first component, 1 for the others). */
static int decode_scan(const Header *h, const Geometry *g, const uint8_t *u, const uint32_t *bounds,
                       Symbols *out, long dcf[2][257], long acf[2][257]) {
  DecTable *tables = malloc(2 * h->ncomp * sizeof *tables);
  const DecTable *dct[3], *act[3];
  int rc = -1;
  if (tables == NULL) return -1;
  for (int c = 0; c < h->ncomp; c++) {
    if (build_dec_table(&h->dc[h->comp[c].td], 1, &tables[2 * c]) < 0 ||
        build_dec_table(&h->ac[h->comp[c].ta], 0, &tables[2 * c + 1]) < 0)
      goto done;
    dct[c] = &tables[2 * c];
    act[c] = &tables[2 * c + 1];
  }
  long junk_dc[257] = {0}, junk_ac[257] = {0}; /* counts of the input's dummy blocks: not coded again */
  uint32_t interval = h->restart_interval ? h->restart_interval : UINT32_MAX, left = interval, seg = 0;
  Bits bits = {0, 0, u};
  uint64_t limit = 8 * (uint64_t)bounds[1]; /* bit position where this restart interval ends */
#define POS ((uint64_t)(bits.next - u) * 8 - (uint64_t)bits.nbits)
  int pred[3] = {0, 0, 0};
  uint32_t *e = out->sym, *cap_end = out->sym + out->cap;
  size_t per_mcu = (size_t)g->nblocks * 66;
  for (uint32_t row = 0; row < g->rows; row++)
    for (uint32_t col = 0; col < g->cols; col++) {
      if (left-- == 0) { /* the input's restart: only padding may be left, predictors reset */
        if (POS > limit || limit - POS > 7) goto done;
        seg++;
        bits.buf = 0;
        bits.nbits = 0;
        bits.next = u + bounds[seg];
        limit = 8 * (uint64_t)bounds[seg + 1];
        left = interval - 1;
        pred[0] = pred[1] = pred[2] = 0;
      }
      if ((size_t)(cap_end - e) < per_mcu) {
        size_t used = (size_t)(e - out->sym), cap = 2 * out->cap + per_mcu;
        uint32_t *bigger = realloc(out->sym, cap * sizeof *bigger);
        if (bigger == NULL) goto done;
        out->sym = bigger;
        out->cap = cap;
        e = bigger + used;
        cap_end = bigger + cap;
      }
      int out_pred[3] = {0, 0, 0}; /* the new scan restarts at every MCU */
      int edge = col + 1 == g->cols || row + 1 == g->rows;
      for (int b = 0; b < g->nblocks; b++) {
        int c = g->bcomp[b], t = c ? 1 : 0;
        if (edge && ((col + 1 == g->cols && g->bx[b] >= g->last_col_w[c]) ||
                     (row + 1 == g->rows && g->by[b] >= g->last_row_h[c]))) {
          /* A dummy block outside the image: libjpeg writes it as DC equal to the previous
           * block's (difference 0) and EOB, whatever the input held. */
          uint32_t *e0 = e;
          int keep = out_pred[c];
          if (decode_block(dct[c], act[c], &bits, &pred[c], &out_pred[c], &e, junk_dc, junk_ac) < 0) goto done;
          out_pred[c] = keep;
          e = e0;
          *e++ = 1u << 16; /* DC difference 0, then one AC entry: */
          *e++ = 0;        /* EOB */
          dcf[t][0]++;
          acf[t][0]++;
        } else if (decode_block(dct[c], act[c], &bits, &pred[c], &out_pred[c], &e, dcf[t], acf[t]) < 0)
          goto done;
        if (POS > limit) goto done; /* ran past the data (libjpeg would warn) */
      }
    }
  if (POS > limit || limit - POS > 7) goto done;
#undef POS
  out->n = (size_t)(e - out->sym);
  rc = 0;
done:
  free(tables);
  return rc;
}

/* ------------------------------------------------------- crop decoding */

/* jpegext.c's crop decode hands libjpeg's coefficient controller the blocks decoded here:
 * libjpeg takes its slow, byte-at-a-time Huffman path for every MCU of a scan with restart
 * markers, which was ~3/4 of a crop's decode time. The blocks are libjpeg's: quantised
 * coefficients in natural order, DC predictors reset at every MCU (restart interval 1). */

/* An AC lookup for the crop decoder: for a code whose extra bits also fit in AC_BITS, the
 * coefficient itself (AC_COEF: value, zeros before it, length of code and extra bits);
 * AC_EOB for end of block; 0 for the rest (ZRL, longer codes): decode_sym then. */
#define AC_BITS 11
#define AC_COEF (1u << 31)
#define AC_EOB (1u << 30)

typedef struct {
  DecTable dc, ac;
  uint32_t fast[1 << AC_BITS];
} CropTables;

struct McuDecoder {
  uint8_t *u;       /* the unstuffed scan, PAD zero bytes after it */
  uint32_t *bounds; /* where MCU i starts in u; bounds[n_mcus] = the end */
  uint32_t n_mcus, next;
  int nblocks, bcomp[MCU_MAX_BLOCKS];
  const CropTables *tables[4]; /* per component of the scan */
  CropTables owned[4];
  int pending;                        /* the next MCU is decoded already, into ahead */
  int16_t ahead[MCU_MAX_BLOCKS][64];
};

/* HUFF_EXTEND: the signed value of `size` extra bits v, without a branch on the sign (a
 * coin toss per coefficient); 0 for size 0. */
static inline int extend(uint32_t v, int size) {
  int negative = ((int)v - (int)((1u << size) >> 1)) >> 31; /* -1 where the top bit is 0 */
  return (int)v + (negative & (int)((~0u << size) + 1));
}

static void build_ac_fast(const HuffSpec *s, uint32_t *fast) {
  int p = 0;
  uint32_t code = 0;
  memset(fast, 0, sizeof(uint32_t) << AC_BITS);
  for (int l = 1; l <= AC_BITS; l++, code <<= 1)
    for (int i = 0; i < s->bits[l]; i++, p++, code++) {
      int sym = s->huffval[p], size = sym & 15, run = sym >> 4;
      if (sym != 0 && (size == 0 || l + size > AC_BITS)) continue;
      int rest = AC_BITS - l - size;
      for (uint32_t x = 0; x < (1u << size); x++) {
        uint32_t e = sym == 0 ? AC_EOB | (uint32_t)l << 24
                              : AC_COEF | (uint32_t)(l + size) << 24 | (uint32_t)run << 16 | (uint16_t)extend(x, size);
        for (uint32_t j = 0; j < (1u << rest); j++) fast[(code << (AC_BITS - l)) | (x << rest) | j] = e;
      }
    }
}

/* Blocks are written as libjpeg's decode_mcu writes them into zeroed blocks (libjpeg's
 * coefficient controller zeroes the MCU's blocks before each call). */

/* A block's DC coefficient; *pred is its component's predictor. */
static inline __attribute__((always_inline)) int dc_step(const CropTables *t, Bits *b, int *pred, int16_t *blk) {
  uint32_t v;
  refill(b);
  int s = decode_sym(&t->dc, 1, b, &v);
  if (s < 0) return -1;
  *pred += extend(v, s);
  blk[0] = (int16_t)*pred;
  return 0;
}

/* One AC symbol at coefficient *k (needs a refill before): 1 while the block goes on, 0
 * at its end, -1 for corrupt data. */
static inline __attribute__((always_inline)) int ac_step(const CropTables *t, Bits *b, int *k, int16_t *blk) {
  uint32_t e = t->fast[b->buf >> (64 - AC_BITS)];
  if (e & AC_COEF) {
    consume(b, (int)(e >> 24 & 31));
    *k += (int)(e >> 16 & 15);
    if (*k > 63) return -1; /* a coefficient past the block */
    blk[ZIGZAG[(*k)++]] = (int16_t)e;
    return *k < 64;
  }
  if (e & AC_EOB) {
    consume(b, (int)(e >> 24 & 31));
    return 0;
  }
  uint32_t v;
  int s = decode_sym(&t->ac, 0, b, &v);
  if (s < 0) return -1;
  int run = s >> 4, size = s & 15;
  if (size) {
    *k += run;
    if (*k > 63) return -1;
    blk[ZIGZAG[(*k)++]] = (int16_t)extend(v, size);
  } else if (run == 15) {
    *k += 16; /* ZRL */
  } else
    return 0; /* EOB (libjpeg reads any run of size 0 so) */
  return *k < 64;
}

/* One block. */
static inline int decode_block_coefs(const CropTables *t, Bits *bits, int *pred, int16_t *blk) {
  Bits b = *bits;
  int k = 1, r;
  if (dc_step(t, &b, pred, blk) < 0) return -1;
  do {
    refill(&b);
    r = ac_step(t, &b, &k, blk);
  } while (r > 0);
  *bits = b;
  return r;
}

/* The same block of two MCUs (same component, same tables), symbol by symbol in turn: two
 * independent chains of table lookups in flight instead of one, where each symbol's
 * position depends on the previous one's length. */
static inline int decode_block_pair(const CropTables *t, Bits *bits_a, int *pred_a, int16_t *blk_a, Bits *bits_b,
                                    int *pred_b, int16_t *blk_b) {
  Bits a = *bits_a, b = *bits_b;
  int ka = 1, kb = 1, ra, rb;
  if (dc_step(t, &a, pred_a, blk_a) < 0 || dc_step(t, &b, pred_b, blk_b) < 0) return -1;
  do {
    refill(&a);
    refill(&b);
    ra = ac_step(t, &a, &ka, blk_a);
    rb = ac_step(t, &b, &kb, blk_b);
  } while (ra > 0 && rb > 0);
  while (ra > 0) {
    refill(&a);
    ra = ac_step(t, &a, &ka, blk_a);
  }
  while (rb > 0) {
    refill(&b);
    rb = ac_step(t, &b, &kb, blk_b);
  }
  *bits_a = a;
  *bits_b = b;
  return ra < 0 || rb < 0 ? -1 : 0;
}

/* The tables of scan component c: shared with an earlier component using the same ones. */
static const CropTables *tables_for(McuDecoder *d, int *used, const HuffRef *dc, const HuffRef *ac, int c) {
  for (int j = 0; j < c; j++)
    if (dc[j].bits == dc[c].bits && dc[j].huffval == dc[c].huffval && ac[j].bits == ac[c].bits &&
        ac[j].huffval == ac[c].huffval)
      return d->tables[j];
  HuffSpec ds, as;
  ds.defined = as.defined = 1;
  memcpy(ds.bits, dc[c].bits, 17);
  memcpy(ds.huffval, dc[c].huffval, 256);
  memcpy(as.bits, ac[c].bits, 17);
  memcpy(as.huffval, ac[c].huffval, 256);
  CropTables *t = &d->owned[(*used)++];
  if (build_dec_table(&ds, 1, &t->dc) < 0 || build_dec_table(&as, 0, &t->ac) < 0) return NULL;
  build_ac_fast(&as, t->fast);
  return t;
}

McuDecoder *mcu_decoder_new(const uint8_t *scan, const uint8_t *end, uint32_t n_mcus, int nblocks,
                            const int *block_comp, int ncomp, const HuffRef *dc, const HuffRef *ac) {
  if (nblocks < 1 || nblocks > MCU_MAX_BLOCKS || ncomp < 1 || ncomp > 4 || n_mcus == 0 ||
      end - scan > (1 << 30))
    return NULL;
  McuDecoder *d = malloc(sizeof *d);
  if (d == NULL) return NULL;
  d->u = malloc((size_t)(end - scan) + PAD);
  d->bounds = malloc(((size_t)n_mcus + 1) * sizeof *d->bounds);
  d->n_mcus = n_mcus;
  d->next = 0;
  d->pending = 0;
  d->nblocks = nblocks;
  int used = 0;
  for (int b = 0; b < nblocks; b++) {
    if (block_comp[b] < 0 || block_comp[b] >= ncomp) goto fail;
    d->bcomp[b] = block_comp[b];
  }
  for (int c = 0; c < ncomp; c++) {
    if (dc[c].bits == NULL || ac[c].bits == NULL || (d->tables[c] = tables_for(d, &used, dc, ac, c)) == NULL)
      goto fail;
  }
  if (d->u == NULL || d->bounds == NULL || unstuff(scan, end, d->u, d->bounds, n_mcus) < 0) goto fail;
  return d;
fail:
  mcu_decoder_free(d);
  return NULL;
}

/* An MCU's entropy-coded data, read through bits. */
typedef struct {
  Bits bits;
  const uint8_t *start;
  uint64_t limit; /* its length in bits */
  int pred[4];
} Mcu;

static inline void mcu_start(const McuDecoder *d, Mcu *m, uint32_t i) {
  m->start = d->u + d->bounds[i];
  m->limit = 8 * (uint64_t)(d->bounds[i + 1] - d->bounds[i]);
  m->bits = (Bits){0, 0, m->start};
  m->pred[0] = m->pred[1] = m->pred[2] = m->pred[3] = 0;
}

/* Bits read past the MCU's data (libjpeg would warn): 1. */
static inline int overran(const Mcu *m) { return (uint64_t)(m->bits.next - m->start) * 8 - (uint64_t)m->bits.nbits > m->limit; }

/* Whole bytes left before the marker (libjpeg would warn): 1. */
static inline int bytes_left(const Mcu *m) {
  return m->limit - ((uint64_t)(m->bits.next - m->start) * 8 - (uint64_t)m->bits.nbits) > 7;
}

int mcu_decoder_next(McuDecoder *d, int16_t *const *blocks) {
  if (d->pending) { /* decoded with the previous one */
    d->pending = 0;
    for (int k = 0; k < d->nblocks; k++) memcpy(blocks[k], d->ahead[k], sizeof d->ahead[k]);
    return 0;
  }
  if (d->next >= d->n_mcus) return -1;
  Mcu a, b;
  mcu_start(d, &a, d->next++);
  if (d->next == d->n_mcus) { /* the last one, alone */
    for (int k = 0; k < d->nblocks; k++) {
      int c = d->bcomp[k];
      if (decode_block_coefs(d->tables[c], &a.bits, &a.pred[c], blocks[k]) < 0 || overran(&a)) return -1;
    }
    return bytes_left(&a) ? -1 : 0;
  }
  mcu_start(d, &b, d->next++); /* the next one alongside, into ahead */
  memset(d->ahead, 0, (size_t)d->nblocks * sizeof d->ahead[0]);
  for (int k = 0; k < d->nblocks; k++) {
    int c = d->bcomp[k];
    if (decode_block_pair(d->tables[c], &a.bits, &a.pred[c], blocks[k], &b.bits, &b.pred[c], d->ahead[k]) < 0 ||
        overran(&a) || overran(&b))
      return -1;
  }
  if (bytes_left(&a) || bytes_left(&b)) return -1;
  d->pending = 1;
  return 0;
}

void mcu_decoder_free(McuDecoder *d) {
  if (d == NULL) return;
  free(d->u);
  free(d->bounds);
  free(d);
}

/* ------------------------------------------------------ optimal tables */

/* A min-heap of node numbers: by frequency, then the larger number first. */
static int heap_less(const long *freq, int a, int b) { return freq[a] < freq[b] || (freq[a] == freq[b] && a > b); }

static void heap_push(int *heap, int *size, const long *freq, int node) {
  int i = (*size)++;
  for (; i > 0 && heap_less(freq, node, heap[(i - 1) / 2]); i = (i - 1) / 2) heap[i] = heap[(i - 1) / 2];
  heap[i] = node;
}

static int heap_pop(int *heap, int *size, const long *freq) {
  int top = heap[0], last = heap[--(*size)], i = 0;
  for (;;) {
    int child = 2 * i + 1;
    if (child >= *size) break;
    if (child + 1 < *size && heap_less(freq, heap[child + 1], heap[child])) child++;
    if (!heap_less(freq, heap[child], last)) break;
    heap[i] = heap[child];
    i = child;
  }
  heap[i] = last;
  return top;
}

int optimal_table(const long counts[257], uint8_t bits_out[17], uint8_t huffval[256]) {
  enum { MAX_LEN = 32 };
  long freq[257];
  int sym[257], codesize[257], others[257], n = 0, bits[MAX_LEN + 1];
  for (int i = 0; i < 256; i++)
    if (counts[i]) sym[n++] = i;
  sym[n++] = 256; /* reserved pseudo-symbol so that no code is all ones */
  for (int i = 0; i < n; i++) {
    freq[i] = sym[i] == 256 ? 1 : counts[sym[i]];
    codesize[i] = 0;
    others[i] = -1;
  }
  /* Merge the two least frequent nodes until one is left; among equal ones the larger
   * symbol goes first (libjpeg's linear scans; a heap here, same choices). */
  int heap[257], size = 0;
  for (int i = 0; i < n; i++) heap_push(heap, &size, freq, i);
  while (size > 1) {
    int c1 = heap_pop(heap, &size, freq), c2 = heap_pop(heap, &size, freq);
    freq[c1] += freq[c2];
    freq[c2] = 0;
    heap_push(heap, &size, freq, c1);
    for (codesize[c1]++; others[c1] >= 0; codesize[c1]++) c1 = others[c1];
    others[c1] = c2;
    for (codesize[c2]++; others[c2] >= 0; codesize[c2]++) c2 = others[c2];
  }
  memset(bits, 0, sizeof bits);
  for (int i = 0; i < n; i++) {
    if (codesize[i] > MAX_LEN) return -1;
    bits[codesize[i]]++;
  }
  /* Shorten codes longer than 16 bits, keeping the code complete. */
  for (int i = MAX_LEN; i > 16; i--)
    while (bits[i] > 0) {
      int j = i - 2;
      while (bits[j] == 0) j--;
      bits[i] -= 2;
      bits[i - 1]++;
      bits[j + 1] += 2;
      bits[j]--;
    }
  int longest = 16;
  while (bits[longest] == 0) longest--;
  bits[longest]--; /* drop the reserved symbol's code */
  memset(bits_out, 0, 17);
  for (int i = 1; i <= 16; i++) bits_out[i] = (uint8_t)bits[i];
  int p = 0;
  for (int len = 1; len <= MAX_LEN; len++)
    for (int i = 0; i < n; i++)
      if (codesize[i] == len && sym[i] != 256) huffval[p++] = (uint8_t)sym[i];
  return 0;
}

/* --------------------------------------------------------------- writing */

typedef struct {
  uint8_t bits[17], huffval[256];
  /* per symbol: its code shifted left by the symbol's extra bits << 5 | the length of both */
  uint32_t code[256];
} EncTable;

static void build_enc_table(EncTable *t, int dc) {
  uint32_t code = 0;
  int p = 0;
  for (int l = 1; l <= 16; l++, code <<= 1)
    for (int i = 0; i < t->bits[l]; i++, code++) {
      int sym = t->huffval[p++], extra = dc ? sym : sym & 15;
      t->code[sym] = ((code << extra) << 5) | (uint32_t)(l + extra);
    }
}

static uint8_t *put16(uint8_t *o, uint32_t v) {
  o[0] = (uint8_t)(v >> 8);
  o[1] = (uint8_t)v;
  return o + 2;
}

static uint8_t *put_dht(uint8_t *o, int index, const EncTable *t) {
  int count = 0;
  for (int l = 1; l <= 16; l++) count += t->bits[l];
  *o++ = 0xFF;
  *o++ = 0xC4;
  o = put16(o, (uint32_t)(2 + 1 + 16 + count));
  *o++ = (uint8_t)index;
  memcpy(o, t->bits + 1, 16);
  memcpy(o + 16, t->huffval, (size_t)count);
  return o + 16 + count;
}

/* The markers libjpeg writes before the scan (jcmarker.c, for jpeg_write_coefficients
 * after jpeg_copy_critical_parameters, restart interval 1, our tables): SOI, JFIF APP0,
 * DQT per table in component order, SOF, DHT per table in component order, DRI, SOS.
 * At most 2 + 18 + 4 * 133 + 19 + 4 * 275 + 6 + 12 bytes. Sets *sof_pos. */
static uint8_t *write_header(uint8_t *o, const Header *h, const EncTable *dc, const EncTable *ac, uint32_t *sof_pos) {
  uint8_t *start = o;
  static const uint8_t soi_app0[] = {0xFF, 0xD8, 0xFF, 0xE0, 0, 16, 'J', 'F', 'I', 'F', 0};
  memcpy(o, soi_app0, sizeof soi_app0);
  o += sizeof soi_app0;
  *o++ = 1; /* JFIF version 1.xx, the source's density where it had a JFIF marker */
  *o++ = h->jfif ? h->jfif_minor : 1;
  *o++ = h->jfif ? h->density_unit : 0;
  o = put16(o, h->jfif ? h->x_density : 1);
  o = put16(o, h->jfif ? h->y_density : 1);
  *o++ = 0;
  *o++ = 0;
  int sent[4] = {0, 0, 0, 0}, wide_any = 0;
  for (int c = 0; c < h->ncomp; c++) {
    int t = h->comp[c].tq, wide = 0;
    for (int i = 0; i < 64; i++) wide |= h->quant[t][i] > 255;
    wide_any |= wide;
    if (sent[t]) continue;
    sent[t] = 1;
    *o++ = 0xFF;
    *o++ = 0xDB;
    o = put16(o, wide ? 2 + 1 + 128 : 2 + 1 + 64);
    *o++ = (uint8_t)((wide << 4) | t);
    for (int i = 0; i < 64; i++) {
      if (wide) *o++ = (uint8_t)(h->quant[t][i] >> 8);
      *o++ = (uint8_t)h->quant[t][i];
    }
  }
  *sof_pos = (uint32_t)(o - start);
  *o++ = 0xFF;
  *o++ = wide_any ? 0xC1 : 0xC0; /* baseline unless a quantiser needs 16 bits */
  o = put16(o, (uint32_t)(8 + 3 * h->ncomp));
  *o++ = 8;
  o = put16(o, h->height);
  o = put16(o, h->width);
  *o++ = (uint8_t)h->ncomp;
  for (int c = 0; c < h->ncomp; c++) {
    *o++ = (uint8_t)h->comp[c].id;
    *o++ = (uint8_t)((h->comp[c].h << 4) | h->comp[c].v);
    *o++ = (uint8_t)h->comp[c].tq;
  }
  o = put_dht(o, 0x00, &dc[0]);
  o = put_dht(o, 0x10, &ac[0]);
  if (h->ncomp > 1) {
    o = put_dht(o, 0x01, &dc[1]);
    o = put_dht(o, 0x11, &ac[1]);
  }
  static const uint8_t dri[] = {0xFF, 0xDD, 0, 4, 0, 1};
  memcpy(o, dri, sizeof dri);
  o += sizeof dri;
  *o++ = 0xFF;
  *o++ = 0xDA;
  o = put16(o, (uint32_t)(6 + 2 * h->ncomp));
  *o++ = (uint8_t)h->ncomp;
  for (int c = 0; c < h->ncomp; c++) {
    *o++ = (uint8_t)h->comp[c].id;
    *o++ = c ? 0x11 : 0x00;
  }
  *o++ = 0;
  *o++ = 63;
  *o++ = 0;
  return o;
}

#define HEADER_MAX 2048

static inline uint8_t *put_byte(uint8_t *o, uint8_t b) {
  *o++ = b;
  if (b == 0xFF) *o++ = 0; /* byte stuffing */
  return o;
}

/* Write 8 bytes, stuffing a 0x00 after each 0xFF. */
static inline uint8_t *put_8_bytes(uint8_t *o, uint64_t v) {
  uint64_t x = ~v;
  if (__builtin_expect(((x - 0x0101010101010101ull) & ~x & 0x8080808080808080ull) == 0, 1)) { /* no 0xFF */
    uint64_t be = __builtin_bswap64(v);
    memcpy(o, &be, 8);
    return o + 8;
  }
  for (int i = 56; i >= 0; i -= 8) o = put_byte(o, (uint8_t)(v >> i));
  return o;
}

/* Write the scan: a restart marker after every MCU but the last, then EOI; and the index.
 * o points just after the header in buf (capacity *cap, may be reallocated). */
static int write_scan(const Header *h, const Geometry *g, const Symbols *syms, const EncTable *dc,
                      const EncTable *ac, uint8_t **pbuf, size_t *pcap, size_t header_len, uint8_t *index,
                      size_t *out_len) {
  uint8_t *buf = *pbuf, *o = buf + header_len;
  size_t cap = *pcap;
  size_t per_mcu = (size_t)g->nblocks * 64 * 8 + 16; /* 27 bits a symbol at most, doubled by stuffing */
  const uint32_t *e = syms->sym;
  uint64_t acc = 0;
  int room = 64; /* bits acc can take before it is written */
  uint64_t total = (uint64_t)g->rows * g->cols, k = 0;
  const uint32_t *dct[3], *act[3];
  for (int c = 0; c < h->ncomp; c++) {
    dct[c] = dc[c ? 1 : 0].code;
    act[c] = ac[c ? 1 : 0].code;
  }
/* Append the low nb bits of val (nb <= 27) to acc, which has room for `room` more; when
 * full, write its 8 bytes. */
#define PUT(val, nb)                                                 \
  do {                                                               \
    room -= (nb);                                                    \
    if (room >= 0) {                                                 \
      acc = (acc << (nb)) | (val);                                   \
    } else {                                                         \
      o = put_8_bytes(o, (acc << ((nb) + room)) | ((val) >> -room)); \
      acc = (val);                                                   \
      room += 64;                                                    \
    }                                                                \
  } while (0)
  for (uint32_t row = 0; row < g->rows; row++) {
    wr32le(index + INDEX_HEADER + 4 * row, (uint32_t)(o - buf));
    for (uint32_t col = 0; col < g->cols; col++, k++) {
      if (cap - (size_t)(o - buf) < per_mcu) {
        size_t used = (size_t)(o - buf);
        cap = 2 * cap + per_mcu;
        uint8_t *bigger = realloc(buf, cap);
        if (bigger == NULL) {
          *pbuf = buf;
          return -1;
        }
        buf = bigger;
        o = buf + used;
      }
      for (int b = 0; b < g->nblocks; b++) {
        int c = g->bcomp[b];
        uint32_t head = *e++, hc = dct[c][head & 15];
        PUT((hc >> 5) | ((head >> 4) & 0x7FF), hc & 31);
        const uint32_t *acode = act[c];
        for (uint32_t i = head >> 16; i > 0; i--) {
          uint32_t s = *e++;
          hc = acode[s & 0xFF];
          PUT((hc >> 5) | (s >> 8), hc & 31);
        }
      }
      /* Pad to a byte with 1 bits (as libjpeg), write the whole bytes, then the marker. */
      PUT(0x7F, 7);
      for (int left = 64 - room; left >= 8; left -= 8) o = put_byte(o, (uint8_t)(acc >> (left - 8)));
      acc = 0;
      room = 64;
      if (k + 1 < total) {
        *o++ = 0xFF;
        *o++ = (uint8_t)(0xD0 + (k & 7));
      }
    }
  }
#undef PUT
  if ((size_t)(o - buf) > UINT32_MAX - 2) {
    *pbuf = buf;
    return -1;
  }
  wr32le(index + INDEX_HEADER + 4 * g->rows, (uint32_t)(o - buf));
  *o++ = 0xFF;
  *o++ = 0xD9;
  *pbuf = buf;
  *pcap = cap;
  *out_len = (size_t)(o - buf);
  return 0;
}

/* ------------------------------------------------------------------ main */

int recode_baseline(const uint8_t *data, size_t len, Transcoded *out) {
  Header h;
  Geometry g;
  if (len > (1u << 30) || parse_header(data, len, &h) < 0) return RECODE_DECLINED;
  geometry(&h, &g);
  uint64_t total = (uint64_t)g.rows * g.cols;
  uint64_t nseg = h.restart_interval ? (total + h.restart_interval - 1) / h.restart_interval : 1;
  size_t scan_len = len - h.scan_pos;
  uint8_t *u = malloc(scan_len + PAD);
  uint32_t *bounds = malloc((nseg + 1) * sizeof *bounds);
  Symbols syms = {NULL, 0, 0};
  uint8_t *buf = NULL, *index = NULL;
  long dcf[2][257], acf[2][257];
  int rc = RECODE_DECLINED;
  if (u == NULL || bounds == NULL) goto done;
  if (unstuff(data + h.scan_pos, data + len, u, bounds, (uint32_t)nseg) < 0) goto done;
  syms.cap = 2 * scan_len + 1024; /* about 1.5 symbols a byte; grows if needed */
  syms.sym = malloc(syms.cap * sizeof *syms.sym);
  if (syms.sym == NULL) goto done;
  memset(dcf, 0, sizeof dcf);
  memset(acf, 0, sizeof acf);
  if (decode_scan(&h, &g, u, bounds, &syms, dcf, acf) < 0) goto done;

  EncTable dc[2], ac[2];
  for (int t = 0; t < (h.ncomp > 1 ? 2 : 1); t++) {
    if (optimal_table(dcf[t], dc[t].bits, dc[t].huffval) < 0 || optimal_table(acf[t], ac[t].bits, ac[t].huffval) < 0)
      goto done;
    build_enc_table(&dc[t], 1);
    build_enc_table(&ac[t], 0);
  }
  size_t index_len = INDEX_HEADER + 4 * ((size_t)g.rows + 1), cap = HEADER_MAX + len + len / 4 + 4096, jpeg_len;
  uint32_t sof_pos;
  buf = malloc(cap);
  index = calloc(index_len, 1);
  if (buf == NULL || index == NULL) goto done;
  size_t header_len = (size_t)(write_header(buf, &h, dc, ac, &sof_pos) - buf);
  index[0] = INDEX_VERSION;
  wr32le(index + 4, sof_pos);
  wr32le(index + 8, g.rows);
  if (write_scan(&h, &g, &syms, dc, ac, &buf, &cap, header_len, index, &jpeg_len) < 0) goto done;
  out->jpeg = buf;
  out->jpeg_len = jpeg_len;
  out->index = index;
  out->index_len = index_len;
  buf = index = NULL;
  rc = 0;
done:
  free(u);
  free(bounds);
  free(syms.sym);
  free(buf);
  free(index);
  return rc;
}
