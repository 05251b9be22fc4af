/*
 * effitrain._jpegext: random-access JPEG over libjpeg-turbo.
 *
 * transcode(data, method=0) -> (jpeg, index) | None
 *     Lossless transcode (DCT coefficients copied, never re-quantised) to a sequential
 *     Huffman JPEG with optimal tables and a restart marker after every MCU, plus a small
 *     index of where each MCU row starts. None where decoded pixels could change.
 *     Baseline files are re-coded symbol by symbol without libjpeg (recode.c); the rest,
 *     and any file recode.c declines, go through libjpeg's coefficient transcoding here.
 *     For tests and benchmarks (every way gives the same bytes): method 1 forces that
 *     libjpeg path, 2 the same with libjpeg's optimize_coding, 3 recode.c alone (None
 *     where it declines).
 * crop(data, index, box)           -> (sub_jpeg, inner_box)
 *     A small valid JPEG made of just the MCUs a box needs (same tables, new frame size,
 *     restart markers renumbered), and the box inside it.
 * decode(data, box, out)           decode the box of any supported JPEG as RGB into `out`
 * decode_crop(data, index, box, out, libjpeg_entropy=False)
 *                                  crop + decode, without building Python objects; the
 *                                  MCUs' Huffman codes decoded by recode.c (libjpeg's own
 *                                  decoder with libjpeg_entropy, for tests and benchmarks)
 * info(data)                       -> (width, height, rgb_ok) from the header alone
 *
 * Boxes are (top, left, height, width). Decoding uses libjpeg's defaults, which are what
 * PIL uses: JDCT_ISLOW, fancy upsampling, RGB output (grayscale replicated).
 *
 * Index format (version 1, little-endian), 12 + 4 * (rows + 1) bytes:
 *     u8 version = 1 | u8[3] zero | u32 sof_pos | u32 rows | u32 row_start[rows + 1]
 * sof_pos is the offset of the SOF marker (its frame size is rewritten for a crop);
 * row_start[r] is the offset of the first entropy-coded byte of MCU row r and
 * row_start[rows] the offset of the EOI marker. Within a row, MCUs are found by scanning
 * for the restart markers (memchr for 0xFF): a few microseconds per crop, against a
 * per-MCU table that would cost 2-4 bytes per MCU (1-5% of the file).
 *
 * Every libjpeg warning is treated as an error (corrupt data): transcode returns None,
 * the other functions raise JpegError. Nothing is printed. The heavy work runs without
 * the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h> /* error codes, ERREXIT */
#include <jpegint.h> /* struct jpeg_entropy_decoder, jpeg_input_controller: see take_entropy_decoding */

#include "recode.h"

#define MSG_LEN 200

static PyObject *JpegError;

/* ------------------------------------------------------------------ errors */

typedef struct {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
} ErrorMgr;

static void on_error(j_common_ptr cinfo) {
  ErrorMgr *err = (ErrorMgr *)cinfo->err;
  (*cinfo->err->format_message)(cinfo, err->message);
  longjmp(err->jump, 1);
}

/* Level -1 is a warning: libjpeg saw corrupt data and carried on. We never carry on,
 * because the pixels would no longer be the original's. Trace messages are dropped. */
static void on_message(j_common_ptr cinfo, int level) {
  if (level < 0) on_error(cinfo);
}

static struct jpeg_error_mgr *init_error(ErrorMgr *err) {
  jpeg_std_error(&err->pub);
  err->pub.error_exit = on_error;
  err->pub.emit_message = on_message;
  err->message[0] = '\0';
  return &err->pub;
}

/* ------------------------------------------------------- growable output */

typedef struct {
  struct jpeg_destination_mgr pub;
  unsigned char *buf;
  size_t cap;
} MemDest;

static void dest_init(j_compress_ptr cinfo) {
  MemDest *d = (MemDest *)cinfo->dest;
  d->pub.next_output_byte = d->buf;
  d->pub.free_in_buffer = d->cap;
}

static boolean dest_grow(j_compress_ptr cinfo) {
  /* libjpeg calls this only when the whole buffer is full. */
  MemDest *d = (MemDest *)cinfo->dest;
  unsigned char *bigger = realloc(d->buf, d->cap * 2);
  if (bigger == NULL) ERREXIT1(cinfo, JERR_OUT_OF_MEMORY, 0);
  d->buf = bigger;
  d->pub.next_output_byte = bigger + d->cap;
  d->pub.free_in_buffer = d->cap;
  d->cap *= 2;
  return TRUE;
}

static void dest_term(j_compress_ptr cinfo) { (void)cinfo; }

/* ----------------------------------------------------- byte-level helpers */

static uint32_t rd16be(const uint8_t *p) { return ((uint32_t)p[0] << 8) | p[1]; }

static uint32_t rd32le(const uint8_t *p) {
  return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* The next marker (0xFF not followed by a stuffed 0x00) in [p, end), or NULL. */
static const uint8_t *next_marker(const uint8_t *p, const uint8_t *end) {
  while (p < end) {
    p = memchr(p, 0xFF, (size_t)(end - p));
    if (p == NULL || p + 1 >= end) return NULL;
    if (p[1] != 0x00) return p;
    p += 2;
  }
  return NULL;
}

/* The MCU grid of a frame, read from its SOF segment. */
typedef struct {
  uint32_t sof_pos, sof_end; /* SOF marker offset, first byte after the segment */
  uint32_t width, height, mcu_w, mcu_h, cols, rows;
} Frame;

static int parse_sof(const uint8_t *data, size_t len, uint32_t sof_pos, Frame *f, char *msg) {
  if ((size_t)sof_pos + 10 > len || data[sof_pos] != 0xFF ||
      (data[sof_pos + 1] != 0xC0 && data[sof_pos + 1] != 0xC1)) {
    snprintf(msg, MSG_LEN, "index does not point at a sequential Huffman SOF marker");
    return -1;
  }
  const uint8_t *s = data + sof_pos;
  uint32_t seglen = rd16be(s + 2), ncomp = s[9];
  if (s[4] != 8 || (ncomp != 1 && ncomp != 3) || seglen != 8 + 3 * ncomp ||
      (size_t)sof_pos + 2 + seglen > len) {
    snprintf(msg, MSG_LEN, "unsupported or malformed SOF segment");
    return -1;
  }
  f->sof_pos = sof_pos;
  f->sof_end = sof_pos + 2 + seglen;
  f->height = rd16be(s + 5);
  f->width = rd16be(s + 7);
  uint32_t hmax = 1, vmax = 1;
  if (ncomp == 3) /* interleaved scan: the MCU spans the largest sampling factors */
    for (uint32_t c = 0; c < 3; c++) {
      uint32_t h = s[11 + 3 * c] >> 4, v = s[11 + 3 * c] & 15;
      if (h > hmax) hmax = h;
      if (v > vmax) vmax = v;
    }
  /* A single-component scan is never interleaved: its MCU is one 8x8 block. */
  f->mcu_w = 8 * hmax;
  f->mcu_h = 8 * vmax;
  if (f->width == 0 || f->height == 0) {
    snprintf(msg, MSG_LEN, "frame of size 0");
    return -1;
  }
  f->cols = (f->width + f->mcu_w - 1) / f->mcu_w;
  f->rows = (f->height + f->mcu_h - 1) / f->mcu_h;
  return 0;
}

/* ------------------------------------------------------------- transcode */

/* The layouts that are tested to crop-decode identically: grayscale (any sampling factors
 * of 1 or 2: a lone component is never upsampled) and YCbCr 4:4:4, 4:2:2 and 4:2:0 (luma
 * 1x1, 2x1 or 2x2, chroma 1x1). Others are kept as they are. */
static int supported_layout(j_decompress_ptr src) {
  if (src->data_precision != 8 || src->arith_code) return 0;
  jpeg_component_info *c = src->comp_info;
  int h = c[0].h_samp_factor, v = c[0].v_samp_factor;
  if (src->num_components == 1) return src->jpeg_color_space == JCS_GRAYSCALE && h <= 2 && v <= 2;
  if (src->num_components != 3 || src->jpeg_color_space != JCS_YCbCr) return 0;
  if (!((h == 1 && v == 1) || (h == 2 && v == 1) || (h == 2 && v == 2))) return 0;
  for (int i = 1; i < 3; i++)
    if (c[i].h_samp_factor != 1 || c[i].v_samp_factor != 1) return 0;
  return 1;
}

/* A progressive file decodes with block smoothing (different pixels) unless every
 * coefficient was received in full; only then is its baseline twin identical. */
static int progression_complete(j_decompress_ptr src) {
  if (!src->progressive_mode) return 1;
  if (src->coef_bits == NULL) return 0;
  for (int c = 0; c < src->num_components; c++)
    for (int k = 0; k < DCTSIZE2; k++)
      if (src->coef_bits[c][k] != 0) return 0;
  return 1;
}

/* ------------------------------------------------- optimal Huffman tables
 * libjpeg's own optimize_coding gathers statistics with a slow per-coefficient loop
 * (twice the time of decoding the file). On this (libjpeg) path we count the same symbols
 * over the coefficients here, build the tables with the JPEG standard's procedure
 * (optimal_table in recode.c: Annex K.2, same tie-breaking as libjpeg, so the output is the
 * same bytes), and let libjpeg encode once with them. */

#define MAX_SYMBOL_BITS 11 /* DC difference categories go up to 11 at 8 bits, AC up to 10 */

typedef struct {
  long dc[NUM_HUFF_TBLS][257], ac[NUM_HUFF_TBLS][257];
} Stats;

static int bit_length(int v) { return v == 0 ? 0 : 32 - __builtin_clz((unsigned)(v < 0 ? -v : v)); }

/* Count one block's symbols; last_dc is the component's DC predictor. */
static int count_block(const JCOEF *block, int *last_dc, long *dc, long *ac) {
  int nbits = bit_length(block[0] - *last_dc);
  *last_dc = block[0];
  if (nbits > MAX_SYMBOL_BITS) return -1;
  dc[nbits]++;
  /* Most AC coefficients are zero: find the others from a bit mask (no branch per
   * coefficient), each coded as (zeros before it, its size). */
  uint64_t nonzero = 0;
  for (int k = 1; k < DCTSIZE2; k++) nonzero |= (uint64_t)(block[ZIGZAG[k]] != 0) << k;
  int prev = 0;
  while (nonzero) {
    int k = __builtin_ctzll(nonzero), run = k - prev - 1;
    for (; run > 15; run -= 16) ac[0xF0]++; /* ZRL: 16 zeros */
    nbits = bit_length(block[ZIGZAG[k]]);
    if (nbits > MAX_SYMBOL_BITS) return -1;
    ac[(run << 4) + nbits]++;
    prev = k;
    nonzero &= nonzero - 1;
  }
  if (prev < DCTSIZE2 - 1) ac[0]++; /* EOB: zeros up to the end */
  return 0;
}

/* Statistics of the scan jpeg_write_coefficients will write for these coefficients: one
 * interleaved scan (a grayscale scan's MCU is one block), predictors reset at every MCU
 * (restart interval 1), and the dummy blocks that pad edge MCUs coded as jctrans.c codes
 * them: DC equal to the previous block's (difference 0), then EOB. */
static int gather(j_decompress_ptr src, j_compress_ptr dst, jvirt_barray_ptr *coefs, Stats *st) {
  int ncomp = src->num_components, hmax = 1, vmax = 1;
  for (int ci = 0; ci < ncomp && ncomp > 1; ci++) {
    if (src->comp_info[ci].h_samp_factor > hmax) hmax = src->comp_info[ci].h_samp_factor;
    if (src->comp_info[ci].v_samp_factor > vmax) vmax = src->comp_info[ci].v_samp_factor;
  }
  JDIMENSION mcus_x = (src->image_width + 8 * hmax - 1) / (8 * hmax);
  JDIMENSION mcus_y = (src->image_height + 8 * vmax - 1) / (8 * vmax);
  if (ncomp == 1) {
    mcus_x = src->comp_info[0].width_in_blocks;
    mcus_y = src->comp_info[0].height_in_blocks;
  }
  for (JDIMENSION my = 0; my < mcus_y; my++) {
    JBLOCKARRAY rows[MAX_COMPONENTS];
    for (int ci = 0; ci < ncomp; ci++) {
      int v = ncomp == 1 ? 1 : src->comp_info[ci].v_samp_factor;
      rows[ci] = (*src->mem->access_virt_barray)((j_common_ptr)src, coefs[ci], my * v, (JDIMENSION)v, FALSE);
    }
    for (JDIMENSION mx = 0; mx < mcus_x; mx++)
      for (int ci = 0; ci < ncomp; ci++) {
        jpeg_component_info *c = &src->comp_info[ci];
        int h = ncomp == 1 ? 1 : c->h_samp_factor, v = ncomp == 1 ? 1 : c->v_samp_factor, last_dc = 0;
        long *dc = st->dc[dst->comp_info[ci].dc_tbl_no], *ac = st->ac[dst->comp_info[ci].ac_tbl_no];
        for (int yi = 0; yi < v; yi++)
          for (int xi = 0; xi < h; xi++) {
            JDIMENSION bx = mx * h + xi, by = my * v + yi;
            if (bx < c->width_in_blocks && by < c->height_in_blocks) {
              if (count_block(rows[ci][yi][bx], &last_dc, dc, ac) < 0) return -1;
            } else {
              dc[0]++;
              ac[0]++;
            }
          }
      }
  }
  return 0;
}

/* Give dst the optimal tables for these coefficients (instead of optimize_coding). */
static int set_optimal_tables(j_decompress_ptr src, j_compress_ptr dst, jvirt_barray_ptr *coefs) {
  Stats *st = calloc(1, sizeof *st);
  int rc = st == NULL ? -1 : gather(src, dst, coefs, st);
  for (int t = 0; t < NUM_HUFF_TBLS && rc == 0; t++) {
    int dc_used = 0, ac_used = 0;
    for (int ci = 0; ci < dst->num_components; ci++) {
      dc_used |= dst->comp_info[ci].dc_tbl_no == t;
      ac_used |= dst->comp_info[ci].ac_tbl_no == t;
    }
    if (dc_used) {
      if (dst->dc_huff_tbl_ptrs[t] == NULL) dst->dc_huff_tbl_ptrs[t] = jpeg_alloc_huff_table((j_common_ptr)dst);
      rc = optimal_table(st->dc[t], dst->dc_huff_tbl_ptrs[t]->bits, dst->dc_huff_tbl_ptrs[t]->huffval);
      dst->dc_huff_tbl_ptrs[t]->sent_table = FALSE;
    }
    if (ac_used && rc == 0) {
      if (dst->ac_huff_tbl_ptrs[t] == NULL) dst->ac_huff_tbl_ptrs[t] = jpeg_alloc_huff_table((j_common_ptr)dst);
      rc = optimal_table(st->ac[t], dst->ac_huff_tbl_ptrs[t]->bits, dst->ac_huff_tbl_ptrs[t]->huffval);
      dst->ac_huff_tbl_ptrs[t]->sent_table = FALSE;
    }
  }
  free(st);
  return rc;
}

/* Build the index of a freshly written transcode: find SOF and SOS, then walk the restart
 * markers, checking they come one per MCU in order. */
static int build_index(const uint8_t *buf, size_t len, uint8_t **index_out, size_t *index_len, char *msg) {
  size_t pos = 2;
  uint32_t sof_pos = 0, entropy = 0;
  if (len < 4 || buf[0] != 0xFF || buf[1] != 0xD8) goto malformed;
  while (pos + 4 <= len && buf[pos] == 0xFF) {
    uint8_t m = buf[pos + 1];
    size_t seglen = rd16be(buf + pos + 2);
    if (m == 0xC0 || m == 0xC1) sof_pos = (uint32_t)pos;
    pos += 2 + seglen;
    if (m == 0xDA) {
      entropy = (uint32_t)pos;
      break;
    }
  }
  if (sof_pos == 0 || entropy == 0 || entropy >= len || len > UINT32_MAX) goto malformed;
  Frame f;
  if (parse_sof(buf, len, sof_pos, &f, msg) < 0) return -1;

  size_t n = INDEX_HEADER + 4 * ((size_t)f.rows + 1);
  uint8_t *index = calloc(n, 1);
  if (index == NULL) {
    snprintf(msg, MSG_LEN, "out of memory");
    return -1;
  }
  index[0] = INDEX_VERSION;
  wr32le(index + 4, sof_pos);
  wr32le(index + 8, f.rows);
  const uint8_t *p = buf + entropy, *end = buf + len;
  uint64_t total = (uint64_t)f.rows * f.cols;
  for (uint64_t k = 0; k < total; k++) {
    if (k % f.cols == 0) wr32le(index + INDEX_HEADER + 4 * (k / f.cols), (uint32_t)(p - buf));
    const uint8_t *m = next_marker(p, end);
    uint8_t want = k + 1 < total ? (uint8_t)(0xD0 + (k & 7)) : 0xD9;
    if (m == NULL || m[1] != want) {
      free(index);
      goto malformed;
    }
    if (k + 1 == total) wr32le(index + INDEX_HEADER + 4 * (size_t)f.rows, (uint32_t)(m - buf));
    p = m + 2;
  }
  *index_out = index;
  *index_len = n;
  return 0;
malformed:
  snprintf(msg, MSG_LEN, "transcoded stream has an unexpected layout");
  return -1;
}

/* How transcode works (the output is the same bytes every way; the tests check it). */
enum {
  AUTO = 0,           /* RECODE where it takes the file, else LIBJPEG */
  LIBJPEG = 1,        /* libjpeg decodes and encodes the coefficients, with our tables */
  LIBJPEG_TABLES = 2, /* the same with libjpeg's own optimize_coding (slow; a reference) */
  RECODE = 3,         /* recode.c alone: fails where it declines the file */
};

/* 0 with out filled, or -1 where the file is unsupported or corrupt (nothing allocated). */
static int transcode_impl(const uint8_t *data, size_t len, int method, Transcoded *out) {
  struct jpeg_decompress_struct src;
  struct jpeg_compress_struct dst;
  ErrorMgr err;
  MemDest dest;
  char msg[MSG_LEN];
  volatile int status = -1;

  if (method == AUTO || method == RECODE) {
    if (recode_baseline(data, len, out) == 0) return 0;
    if (method == RECODE) return -1;
  }
  memset(&src, 0, sizeof src);
  memset(&dst, 0, sizeof dst);
  dest.buf = NULL;
  src.err = init_error(&err);
  dst.err = &err.pub;
  if (setjmp(err.jump)) goto done; /* corrupt or unsupported: the caller keeps the original */
  jpeg_create_decompress(&src);
  jpeg_create_compress(&dst);
  jpeg_mem_src(&src, data, (unsigned long)len);
  jpeg_read_header(&src, TRUE);
  if (!supported_layout(&src)) goto done;
  jvirt_barray_ptr *coefs = jpeg_read_coefficients(&src);
  if (!progression_complete(&src)) goto done;
  /* Only the critical parameters are copied: no APPn/COM markers. JFIF is written
   * (YCbCr/grayscale), which makes every decoder read the colour space as before. */
  jpeg_copy_critical_parameters(&src, &dst);
  dst.restart_interval = 1;
  if (method == LIBJPEG_TABLES) dst.optimize_coding = TRUE;
  else if (set_optimal_tables(&src, &dst, coefs) < 0) goto done; /* coefficients out of range */
  dest.cap = len + 65536;
  dest.buf = malloc(dest.cap);
  if (dest.buf == NULL) ERREXIT1(&dst, JERR_OUT_OF_MEMORY, 0);
  dest.pub.init_destination = dest_init;
  dest.pub.empty_output_buffer = dest_grow;
  dest.pub.term_destination = dest_term;
  dst.dest = &dest.pub;
  jpeg_write_coefficients(&dst, coefs);
  jpeg_finish_compress(&dst);
  out->jpeg_len = dest.cap - dest.pub.free_in_buffer;
  if (build_index(dest.buf, out->jpeg_len, &out->index, &out->index_len, msg) < 0) goto done;
  out->jpeg = dest.buf;
  dest.buf = NULL;
  status = 0;
done:
  jpeg_destroy_compress(&dst);
  jpeg_destroy_decompress(&src);
  free(dest.buf);
  return status;
}

/* ------------------------------------------------------------------ crop */

typedef struct {
  Frame f;
  const uint8_t *row_start; /* rows + 1 little-endian u32 inside the index */
} Layout;

static int parse_layout(const uint8_t *data, size_t len, const uint8_t *index, size_t index_len, Layout *L,
                        char *msg) {
  if (index_len < INDEX_HEADER || index[0] != INDEX_VERSION) {
    snprintf(msg, MSG_LEN, "not a random-access JPEG index (version %d, %zu bytes)",
             index_len ? index[0] : -1, index_len);
    return -1;
  }
  if (parse_sof(data, len, rd32le(index + 4), &L->f, msg) < 0) return -1;
  uint32_t rows = rd32le(index + 8);
  if (rows != L->f.rows || index_len != INDEX_HEADER + 4 * ((size_t)rows + 1)) {
    snprintf(msg, MSG_LEN, "index has %u MCU rows for a frame of %u", rows, L->f.rows);
    return -1;
  }
  L->row_start = index + INDEX_HEADER;
  uint32_t prev = L->f.sof_end;
  for (uint32_t r = 0; r <= rows; r++) {
    uint32_t at = rd32le(L->row_start + 4 * r);
    if (at <= prev || (size_t)at + 2 > len) {
      snprintf(msg, MSG_LEN, "index row offset %u out of order or past the data", r);
      return -1;
    }
    prev = at;
  }
  if (data[prev] != 0xFF || data[prev + 1] != 0xD9) {
    snprintf(msg, MSG_LEN, "index does not end at the EOI marker");
    return -1;
  }
  return 0;
}

static uint32_t row_at(const Layout *L, uint32_t r) { return rd32le(L->row_start + 4 * r); }

static int check_box(uint32_t width, uint32_t height, const long box[4], char *msg) {
  if (box[0] < 0 || box[1] < 0 || box[2] < 1 || box[3] < 1 || box[0] > (long)height || box[1] > (long)width ||
      box[2] > (long)height - box[0] || box[3] > (long)width - box[1]) {
    snprintf(msg, MSG_LEN, "box (top=%ld, left=%ld, height=%ld, width=%ld) is outside the %ux%u image", box[0],
             box[1], box[2], box[3], width, height);
    return -1;
  }
  return 0;
}

/* Assemble the sub-JPEG covering `box` (widened 1 px up/left and 2 px down/right, because
 * chroma upsampling treats the sub-image's edges as image edges, then MCU-aligned and
 * clipped to the real image). Writes a malloc'ed JPEG and the box inside it. */
static int build_crop(const uint8_t *data, const Layout *L, const long box[4], uint8_t **out, size_t *out_len,
                      long inner[4], char *msg) {
  const Frame *f = &L->f;
  if (check_box(f->width, f->height, box, msg) < 0) return -1;
  long y0 = box[0] > 0 ? box[0] - 1 : 0, x0 = box[1] > 0 ? box[1] - 1 : 0;
  long y1 = box[0] + box[2] + 2, x1 = box[1] + box[3] + 2; /* exclusive */
  if (y1 > (long)f->height) y1 = f->height;
  if (x1 > (long)f->width) x1 = f->width;
  uint32_t r0 = y0 / f->mcu_h, r1 = (y1 - 1) / f->mcu_h, c0 = x0 / f->mcu_w, c1 = (x1 - 1) / f->mcu_w;
  uint32_t top = r0 * f->mcu_h, left = c0 * f->mcu_w;
  uint32_t sub_h = ((r1 + 1) * f->mcu_h < f->height ? (r1 + 1) * f->mcu_h : f->height) - top;
  uint32_t sub_w = ((c1 + 1) * f->mcu_w < f->width ? (c1 + 1) * f->mcu_w : f->width) - left;
  uint32_t header = row_at(L, 0);
  uint32_t n_mcus = (r1 - r0 + 1) * (c1 - c0 + 1);
  uint64_t last = (uint64_t)f->rows * f->cols - 1; /* the image's last MCU: no RST after it */

  /* Selected MCUs are a subset of these rows' bytes; markers are rewritten 1:1. */
  size_t cap = header + (row_at(L, r1 + 1) - row_at(L, r0)) + 2 * (size_t)n_mcus + 4;
  uint8_t *buf = malloc(cap), *w = buf;
  if (buf == NULL) {
    snprintf(msg, MSG_LEN, "out of memory");
    return -1;
  }
  memcpy(w, data, header);
  w[f->sof_pos + 5] = (uint8_t)(sub_h >> 8);
  w[f->sof_pos + 6] = (uint8_t)sub_h;
  w[f->sof_pos + 7] = (uint8_t)(sub_w >> 8);
  w[f->sof_pos + 8] = (uint8_t)sub_w;
  w += header;

  uint32_t j = 0; /* MCU number in the sub-image */
  for (uint32_t r = r0; r <= r1; r++) {
    const uint8_t *p = data + row_at(L, r), *row_end = data + row_at(L, r + 1);
    uint64_t k = (uint64_t)r * f->cols; /* MCU number in the image */
    for (uint32_t c = 0; c <= c1; c++, k++) {
      const uint8_t *m = next_marker(p, row_end);
      const uint8_t *mcu_end;
      if (k == last) { /* ends at row_end, the EOI marker */
        if (m != NULL) goto corrupt;
        mcu_end = row_end;
      } else {
        if (m == NULL || m[1] != 0xD0 + (k & 7) || (c + 1 == f->cols && m + 2 != row_end)) goto corrupt;
        mcu_end = m;
      }
      if (c >= c0) {
        memcpy(w, p, (size_t)(mcu_end - p));
        w += mcu_end - p;
        if (++j < n_mcus) {
          *w++ = 0xFF;
          *w++ = (uint8_t)(0xD0 + ((j - 1) & 7));
        }
      }
      p = mcu_end + 2;
    }
  }
  *w++ = 0xFF;
  *w++ = 0xD9;
  *out = buf;
  *out_len = (size_t)(w - buf);
  inner[0] = box[0] - top;
  inner[1] = box[1] - left;
  inner[2] = box[2];
  inner[3] = box[3];
  return 0;
corrupt:
  free(buf);
  snprintf(msg, MSG_LEN, "restart markers do not match the index (corrupt data)");
  return -1;
}

/* ---------------------------------------------------------------- decode */

_Static_assert(sizeof(JCOEF) == sizeof(int16_t), "recode.c writes libjpeg's coefficients as int16_t");

/* libjpeg's entropy decoder, replaced (see below) for a crop's sub-JPEG by recode.c's. */
static boolean next_mcu(j_decompress_ptr cinfo, JBLOCKROW *MCU_data) {
  McuDecoder *d = cinfo->client_data;
  int16_t *blocks[MCU_MAX_BLOCKS];
  for (int b = 0; b < cinfo->blocks_in_MCU; b++) blocks[b] = MCU_data[b][0];
  if (mcu_decoder_next(d, blocks) < 0) {
    ErrorMgr *err = (ErrorMgr *)cinfo->err;
    snprintf(err->message, sizeof err->message, "corrupt entropy-coded data");
    longjmp(err->jump, 1);
  }
  return TRUE;
}

/* For a sub-JPEG from build_crop (one interleaved 8-bit Huffman scan, a restart marker
 * after every MCU), make libjpeg decode its MCUs with recode.c's decoder: libjpeg takes its
 * slow Huffman path for every MCU of such a scan. The coefficient blocks are the same, so
 * are the pixels (tests compare both ways); libjpeg still does the IDCT, upsampling and
 * colour conversion. Call after jpeg_start_decompress; NULL: libjpeg decodes on its own. */
static McuDecoder *take_entropy_decoding(j_decompress_ptr cinfo) {
  if (cinfo->restart_interval != 1 || cinfo->progressive_mode || cinfo->arith_code || cinfo->data_precision != 8 ||
      cinfo->buffered_image || cinfo->inputctl->has_multiple_scans || cinfo->comps_in_scan != cinfo->num_components ||
      cinfo->blocks_in_MCU > MCU_MAX_BLOCKS || cinfo->src->bytes_in_buffer == 0)
    return NULL;
  HuffRef dc[MAX_COMPS_IN_SCAN], ac[MAX_COMPS_IN_SCAN];
  for (int c = 0; c < cinfo->comps_in_scan; c++) {
    int dt = cinfo->cur_comp_info[c]->dc_tbl_no, at = cinfo->cur_comp_info[c]->ac_tbl_no;
    if (dt < 0 || dt >= NUM_HUFF_TBLS || at < 0 || at >= NUM_HUFF_TBLS) return NULL;
    const JHUFF_TBL *d = cinfo->dc_huff_tbl_ptrs[dt], *a = cinfo->ac_huff_tbl_ptrs[at];
    if (d == NULL || a == NULL) return NULL;
    dc[c] = (HuffRef){d->bits, d->huffval};
    ac[c] = (HuffRef){a->bits, a->huffval};
  }
  const uint8_t *scan = cinfo->src->next_input_byte;
  McuDecoder *dec = mcu_decoder_new(scan, scan + cinfo->src->bytes_in_buffer,
                                    (uint32_t)cinfo->MCUs_per_row * cinfo->MCU_rows_in_scan, cinfo->blocks_in_MCU,
                                    cinfo->MCU_membership, cinfo->comps_in_scan, dc, ac);
  if (dec != NULL) {
    cinfo->client_data = dec;
    cinfo->entropy->decode_mcu = next_mcu;
  }
  return dec;
}

/* Decode rows/columns `box` of a JPEG as RGB into out (box[2] * box[3] * 3 bytes). Rows
 * below the box are never decoded. `own_entropy`: the JPEG is one of build_crop's, decode
 * its MCUs with take_entropy_decoding (tests and benchmarks turn that off). */
static int decode_rgb(const uint8_t *data, size_t len, const long box[4], int own_entropy, uint8_t *out, char *msg) {
  struct jpeg_decompress_struct cinfo;
  ErrorMgr err;
  uint8_t *volatile scratch = NULL;
  McuDecoder *volatile dec = NULL;
  enum { MAX_ROWS = 16 };

  memset(&cinfo, 0, sizeof cinfo);
  cinfo.err = init_error(&err);
  if (setjmp(err.jump)) {
    snprintf(msg, MSG_LEN, "%s", err.message);
    jpeg_destroy_decompress(&cinfo);
    free(scratch);
    mcu_decoder_free(dec);
    return -1;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data, (unsigned long)len);
  jpeg_read_header(&cinfo, TRUE);
  if (cinfo.jpeg_color_space != JCS_GRAYSCALE && cinfo.jpeg_color_space != JCS_YCbCr &&
      cinfo.jpeg_color_space != JCS_RGB) {
    snprintf(msg, MSG_LEN, "unsupported colour space %d", (int)cinfo.jpeg_color_space);
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  if (check_box(cinfo.image_width, cinfo.image_height, box, msg) < 0) {
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  cinfo.out_color_space = JCS_RGB;
  cinfo.dct_method = JDCT_ISLOW;
  cinfo.do_fancy_upsampling = TRUE;
  jpeg_start_decompress(&cinfo);
  if (own_entropy) dec = take_entropy_decoding(&cinfo);

  size_t stride = (size_t)cinfo.output_width * 3, out_stride = (size_t)box[3] * 3;
  int direct = box[1] == 0 && (size_t)box[3] == cinfo.output_width; /* libjpeg writes into out */
  scratch = malloc(stride * MAX_ROWS);
  if (scratch == NULL) ERREXIT1(&cinfo, JERR_OUT_OF_MEMORY, 0);
  JSAMPROW rows[MAX_ROWS];
  uint32_t stop = (uint32_t)(box[0] + box[2]);
  while (cinfo.output_scanline < stop) {
    uint32_t y = cinfo.output_scanline, want = stop - y < MAX_ROWS ? stop - y : MAX_ROWS;
    for (uint32_t i = 0; i < want; i++)
      rows[i] = direct && y + i >= (uint32_t)box[0] ? out + (y + i - box[0]) * out_stride : scratch + i * stride;
    uint32_t got = jpeg_read_scanlines(&cinfo, rows, want);
    if (got == 0) ERREXIT(&cinfo, JERR_INPUT_EMPTY); /* cannot happen with a memory source */
    if (!direct)
      for (uint32_t i = 0; i < got; i++)
        if (y + i >= (uint32_t)box[0])
          memcpy(out + (y + i - box[0]) * out_stride, rows[i] + box[1] * 3, out_stride);
  }
  jpeg_destroy_decompress(&cinfo); /* stops without reading the rest */
  free(scratch);
  mcu_decoder_free(dec);
  return 0;
}

/* ------------------------------------------------------ Python bindings */

static int parse_box(PyObject *obj, long box[4]) {
  if (!PyArg_ParseTuple(obj, "llll;box must be (top, left, height, width)", &box[0], &box[1], &box[2], &box[3]))
    return 0;
  return 1;
}

static PyObject *py_transcode(PyObject *self, PyObject *args) {
  Py_buffer in;
  Transcoded t;
  int status, method = AUTO;
  if (!PyArg_ParseTuple(args, "y*|i:transcode", &in, &method)) return NULL;
  if (method < AUTO || method > RECODE) {
    PyBuffer_Release(&in);
    PyErr_Format(PyExc_ValueError, "transcode method must be 0, 1, 2 or 3, not %d", method);
    return NULL;
  }
  memset(&t, 0, sizeof t);
  Py_BEGIN_ALLOW_THREADS
  status = transcode_impl(in.buf, (size_t)in.len, method, &t);
  Py_END_ALLOW_THREADS
  PyBuffer_Release(&in);
  if (status < 0) {
    free(t.jpeg);
    free(t.index);
    Py_RETURN_NONE;
  }
  PyObject *res = Py_BuildValue("(y#y#)", t.jpeg, (Py_ssize_t)t.jpeg_len, t.index, (Py_ssize_t)t.index_len);
  free(t.jpeg);
  free(t.index);
  return res;
}

static PyObject *py_crop(PyObject *self, PyObject *args) {
  Py_buffer data, index;
  PyObject *box_obj;
  long box[4], inner[4];
  uint8_t *sub = NULL;
  size_t sub_len = 0;
  char msg[MSG_LEN];
  int rc;
  if (!PyArg_ParseTuple(args, "y*y*O:crop", &data, &index, &box_obj)) return NULL;
  if (!parse_box(box_obj, box)) goto fail;
  Py_BEGIN_ALLOW_THREADS
  Layout L;
  rc = parse_layout(data.buf, (size_t)data.len, index.buf, (size_t)index.len, &L, msg);
  if (rc == 0) rc = build_crop(data.buf, &L, box, &sub, &sub_len, inner, msg);
  Py_END_ALLOW_THREADS
  if (rc < 0) {
    PyErr_SetString(JpegError, msg);
    goto fail;
  }
  PyBuffer_Release(&data);
  PyBuffer_Release(&index);
  PyObject *res = Py_BuildValue("(y#(llll))", sub, (Py_ssize_t)sub_len, inner[0], inner[1], inner[2], inner[3]);
  free(sub);
  return res;
fail:
  PyBuffer_Release(&data);
  PyBuffer_Release(&index);
  return NULL;
}

static int check_out(Py_buffer *out, const long box[4]) {
  if (box[2] < 1 || box[3] < 1 || box[2] > 65535 || box[3] > 65535) { /* JPEG's size limit */
    PyErr_Format(JpegError, "box height %ld / width %ld out of range", box[2], box[3]);
    return 0;
  }
  if (!PyBuffer_IsContiguous(out, 'C') || out->len != box[2] * box[3] * 3) {
    PyErr_Format(PyExc_ValueError, "out must be a C-contiguous buffer of %ld bytes (height x width x 3)",
                 box[2] * box[3] * 3);
    return 0;
  }
  return 1;
}

static PyObject *py_decode(PyObject *self, PyObject *args) {
  Py_buffer data, out;
  PyObject *box_obj;
  long box[4];
  char msg[MSG_LEN];
  int rc;
  if (!PyArg_ParseTuple(args, "y*Ow*:decode", &data, &box_obj, &out)) return NULL;
  if (!parse_box(box_obj, box) || !check_out(&out, box)) goto fail;
  Py_BEGIN_ALLOW_THREADS
  rc = decode_rgb(data.buf, (size_t)data.len, box, 0, out.buf, msg);
  Py_END_ALLOW_THREADS
  if (rc < 0) {
    PyErr_SetString(JpegError, msg);
    goto fail;
  }
  PyBuffer_Release(&data);
  PyBuffer_Release(&out);
  Py_RETURN_NONE;
fail:
  PyBuffer_Release(&data);
  PyBuffer_Release(&out);
  return NULL;
}

static PyObject *py_decode_crop(PyObject *self, PyObject *args) {
  Py_buffer data, index, out;
  PyObject *box_obj;
  long box[4], inner[4];
  char msg[MSG_LEN];
  int rc, libjpeg_entropy = 0;
  if (!PyArg_ParseTuple(args, "y*y*Ow*|p:decode_crop", &data, &index, &box_obj, &out, &libjpeg_entropy)) return NULL;
  if (!parse_box(box_obj, box) || !check_out(&out, box)) goto fail;
  Py_BEGIN_ALLOW_THREADS
  Layout L;
  uint8_t *sub = NULL;
  size_t sub_len = 0;
  rc = parse_layout(data.buf, (size_t)data.len, index.buf, (size_t)index.len, &L, msg);
  if (rc == 0) rc = build_crop(data.buf, &L, box, &sub, &sub_len, inner, msg);
  if (rc == 0) rc = decode_rgb(sub, sub_len, inner, !libjpeg_entropy, out.buf, msg);
  free(sub);
  Py_END_ALLOW_THREADS
  if (rc < 0) {
    PyErr_SetString(JpegError, msg);
    goto fail;
  }
  PyBuffer_Release(&data);
  PyBuffer_Release(&index);
  PyBuffer_Release(&out);
  Py_RETURN_NONE;
fail:
  PyBuffer_Release(&data);
  PyBuffer_Release(&index);
  PyBuffer_Release(&out);
  return NULL;
}

static PyObject *py_info(PyObject *self, PyObject *args) {
  Py_buffer data;
  struct jpeg_decompress_struct cinfo;
  ErrorMgr err;
  if (!PyArg_ParseTuple(args, "y*:info", &data)) return NULL;
  memset(&cinfo, 0, sizeof cinfo);
  cinfo.err = init_error(&err);
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    PyBuffer_Release(&data);
    PyErr_SetString(JpegError, err.message);
    return NULL;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data.buf, (unsigned long)data.len);
  jpeg_read_header(&cinfo, TRUE);
  int rgb_ok = cinfo.jpeg_color_space == JCS_GRAYSCALE || cinfo.jpeg_color_space == JCS_YCbCr ||
               cinfo.jpeg_color_space == JCS_RGB;
  PyObject *res = Py_BuildValue("(IIO)", cinfo.image_width, cinfo.image_height, rgb_ok ? Py_True : Py_False);
  jpeg_destroy_decompress(&cinfo);
  PyBuffer_Release(&data);
  return res;
}

static PyMethodDef methods[] = {
    {"transcode", py_transcode, METH_VARARGS,
     "transcode(data, method=0) -> (jpeg, index) or None: lossless restart-per-MCU transcode."},
    {"crop", py_crop, METH_VARARGS, "crop(data, index, box) -> (sub_jpeg, inner_box)."},
    {"decode", py_decode, METH_VARARGS, "decode(data, box, out): decode box of a JPEG as RGB into out."},
    {"decode_crop", py_decode_crop, METH_VARARGS, "decode_crop(data, index, box, out, libjpeg_entropy=False): crop + decode into out."},
    {"info", py_info, METH_VARARGS, "info(data) -> (width, height, rgb_ok) from the header."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_jpegext",
    .m_doc = "Random-access JPEG over libjpeg-turbo (see effitrain.jpeg).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__jpegext(void) {
  PyObject *m = PyModule_Create(&module);
  if (m == NULL) return NULL;
  JpegError = PyErr_NewExceptionWithDoc("effitrain.jpeg.JpegError", "Corrupt or unsupported JPEG data.",
                                        PyExc_ValueError, NULL);
  if (JpegError == NULL || PyModule_AddObject(m, "JpegError", JpegError) < 0) {
    Py_XDECREF(JpegError);
    Py_DECREF(m);
    return NULL;
  }
  Py_INCREF(JpegError); /* the module's reference was stolen; keep ours */
  return m;
}
