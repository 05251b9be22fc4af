/*
 * effitrain._storeio: read source files into store records for `convert`.
 *
 * read_files(paths, room) -> [(bytearray, crc32) | (None, errno) | (None, 0)]
 *     Each file read into a new bytearray after `room` free bytes (where the caller packs
 *     the record header), with the CRC32 (zlib's) of the file's bytes. (None, errno) for a
 *     file that cannot be opened or read, (None, 0) for one whose size changed while it was
 *     read (the caller reads it again its own way). The files of one call are opened,
 *     read and checksummed without the GIL, so a writer thread runs beside this one.
 * address(buffer) -> int
 *     Where a buffer's first byte is in memory (for a view into a memory map: its offset).
 * crc32(data, value=0, simd=True) -> int
 *     zlib.crc32 with PCLMULQDQ folding where the CPU has it (~10x zlib's own loop);
 *     simd=False forces zlib's code (for tests).
 *
 * Why C: per file, Python's reading path took ~100 us of one core (open/fstat/read/close
 * as separate calls, each dropping and retaking the GIL; a zero-filled buffer; zlib's
 * CRC32 at ~3.6 GB/s), more than the writer thread that puts the records into LMDB.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_PCLMUL_CODE 1
#endif

/* Files opened at once per group: bounded, whatever the caller passes. */
#define GROUP 64

/* ------------------------------------------------------------------ CRC32 */

static int use_pclmul = 0;

#ifdef HAVE_PCLMUL_CODE
/*
 * CRC32 (reflected polynomial 0x04C11DB7, no pre/post inversion) of len bytes, len a
 * multiple of 16 and at least 64: four 128-bit lanes folded 64 bytes at a time, folded
 * into one lane, reduced to 64 then 32 bits, and a Barrett reduction (Intel, "Fast CRC
 * Computation for Generic Polynomials Using PCLMULQDQ", 2009; the constants are
 * x^(k) mod P for the fold distances, bit-reflected, as in that paper).
 */
__attribute__((target("pclmul,sse4.1"))) static uint32_t crc32_fold(uint32_t crc, const unsigned char *p,
                                                                        size_t len) {
  const __m128i k1k2 = _mm_set_epi64x(0x1c6e41596, 0x154442bd4); /* fold by 512 bits */
  const __m128i k3k4 = _mm_set_epi64x(0x0ccaa009e, 0x1751997d0); /* fold by 128 bits */
  const __m128i k5 = _mm_set_epi64x(0, 0x163cd6124);             /* 64 -> 32 bits */
  const __m128i poly = _mm_set_epi64x(0x1f7011641, 0x1db710641); /* mu, P */
  const __m128i mask32 = _mm_set_epi32(0, 0, 0, -1);
  __m128i x1 = _mm_loadu_si128((const __m128i *)p), x2 = _mm_loadu_si128((const __m128i *)(p + 16));
  __m128i x3 = _mm_loadu_si128((const __m128i *)(p + 32)), x4 = _mm_loadu_si128((const __m128i *)(p + 48));
  x1 = _mm_xor_si128(x1, _mm_cvtsi32_si128((int)crc));
  p += 64;
  len -= 64;
#define FOLD(x, k, next) \
  _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11)), next)
  for (; len >= 64; len -= 64, p += 64) {
    x1 = FOLD(x1, k1k2, _mm_loadu_si128((const __m128i *)p));
    x2 = FOLD(x2, k1k2, _mm_loadu_si128((const __m128i *)(p + 16)));
    x3 = FOLD(x3, k1k2, _mm_loadu_si128((const __m128i *)(p + 32)));
    x4 = FOLD(x4, k1k2, _mm_loadu_si128((const __m128i *)(p + 48)));
  }
  x1 = FOLD(x1, k3k4, x2);
  x1 = FOLD(x1, k3k4, x3);
  x1 = FOLD(x1, k3k4, x4);
  for (; len >= 16; len -= 16, p += 16) x1 = FOLD(x1, k3k4, _mm_loadu_si128((const __m128i *)p));
#undef FOLD
  /* 128 -> 64 bits (appending 32 zero bits), then 64 -> 32. */
  x1 = _mm_xor_si128(_mm_srli_si128(x1, 8), _mm_clmulepi64_si128(k3k4, x1, 0x01));
  x1 = _mm_xor_si128(_mm_srli_si128(x1, 4), _mm_clmulepi64_si128(_mm_and_si128(x1, mask32), k5, 0x00));
  /* Barrett reduction to the 32-bit remainder. */
  __m128i t = _mm_and_si128(_mm_clmulepi64_si128(_mm_and_si128(x1, mask32), poly, 0x10), mask32);
  x1 = _mm_xor_si128(x1, _mm_clmulepi64_si128(t, poly, 0x00));
  return (uint32_t)_mm_extract_epi32(x1, 1);
}
#endif

/* zlib.crc32(data, value): the folding code for the bulk, zlib's for the rest. */
static uint32_t crc32_any(uint32_t value, const unsigned char *p, size_t len, int simd) {
#ifdef HAVE_PCLMUL_CODE
  if (simd && use_pclmul && len >= 64) {
    size_t bulk = len & ~(size_t)15;
    value = ~crc32_fold(~value, p, bulk);
    p += bulk;
    len -= bulk;
  }
#endif
  return (uint32_t)crc32_z(value, p, len);
}

static PyObject *py_crc32(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kwds) {
  static char *kwlist[] = {"data", "value", "simd", NULL};
  Py_buffer data;
  unsigned int value = 0;
  int simd = 1;
  if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*|Ip", kwlist, &data, &value, &simd)) return NULL;
  uint32_t crc;
  Py_BEGIN_ALLOW_THREADS
  crc = crc32_any(value, data.buf, (size_t)data.len, simd);
  Py_END_ALLOW_THREADS
  PyBuffer_Release(&data);
  return PyLong_FromUnsignedLong(crc);
}

/* ------------------------------------------------------------------ files */

typedef struct {
  const char *path;
  int fd;
  int err;     /* errno of a failed open/fstat/read, else 0 */
  int changed; /* the file's size changed while it was read */
  size_t size; /* from fstat, then what was read */
  uint32_t crc;
  PyObject *buf; /* bytearray of room + size */
} item_t;

static void open_all(item_t *it, Py_ssize_t n) {
  for (Py_ssize_t i = 0; i < n; i++) {
    struct stat st;
    it[i].fd = open(it[i].path, O_RDONLY | O_CLOEXEC);
    if (it[i].fd < 0) {
      it[i].err = errno;
    } else if (fstat(it[i].fd, &st) != 0) {
      it[i].err = errno;
    } else {
      it[i].size = (size_t)st.st_size;
    }
  }
}

static void read_all(item_t *it, Py_ssize_t n, Py_ssize_t room) {
  for (Py_ssize_t i = 0; i < n; i++) {
    if (it[i].buf == NULL) continue;
    unsigned char *data = (unsigned char *)PyByteArray_AS_STRING(it[i].buf) + room;
    size_t done = 0;
    while (done < it[i].size) {
      ssize_t r = read(it[i].fd, data + done, it[i].size - done);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) {
        it[i].err = errno;
        break;
      }
      if (r == 0) break;
      done += (size_t)r;
    }
    if (it[i].err) continue;
    char more;
    ssize_t r;
    do r = read(it[i].fd, &more, 1);
    while (r < 0 && errno == EINTR);
    it[i].changed = done != it[i].size || r != 0;
    if (!it[i].changed) it[i].crc = crc32_any(0, data, done, 1);
  }
  for (Py_ssize_t i = 0; i < n; i++)
    if (it[i].fd >= 0) close(it[i].fd);
}

/* One group of files: open + fstat, buffers, read + CRC; results appended to `out`. */
static int read_group(item_t *it, Py_ssize_t n, Py_ssize_t room, PyObject *out) {
  Py_BEGIN_ALLOW_THREADS
  open_all(it, n);
  Py_END_ALLOW_THREADS
  int ok = 1;
  for (Py_ssize_t i = 0; i < n && ok; i++) {
    if (it[i].err) continue;
    if (it[i].size > (size_t)(PY_SSIZE_T_MAX - room)) {
      it[i].err = EFBIG;
      continue;
    }
    it[i].buf = PyByteArray_FromStringAndSize(NULL, room + (Py_ssize_t)it[i].size); /* not zeroed */
    ok = it[i].buf != NULL;
  }
  if (!ok) { /* out of memory: close what is open and raise */
    for (Py_ssize_t i = 0; i < n; i++) {
      if (it[i].fd >= 0) close(it[i].fd);
      Py_XDECREF(it[i].buf);
    }
    return -1;
  }
  Py_BEGIN_ALLOW_THREADS
  read_all(it, n, room);
  Py_END_ALLOW_THREADS
  for (Py_ssize_t i = 0; i < n; i++) {
    PyObject *result;
    if (it[i].err || it[i].changed) {
      Py_CLEAR(it[i].buf);
      result = Py_BuildValue("(Oi)", Py_None, it[i].err);
    } else {
      result = Py_BuildValue("(Nk)", it[i].buf, (unsigned long)it[i].crc);
      it[i].buf = NULL;
    }
    if (result == NULL || PyList_Append(out, result) != 0) {
      Py_XDECREF(result);
      for (Py_ssize_t j = i + 1; j < n; j++) Py_XDECREF(it[j].buf);
      return -1;
    }
    Py_DECREF(result);
  }
  return 0;
}

static PyObject *py_read_files(PyObject *Py_UNUSED(self), PyObject *args) {
  PyObject *paths;
  Py_ssize_t room;
  if (!PyArg_ParseTuple(args, "On", &paths, &room)) return NULL;
  if (room < 0) return PyErr_Format(PyExc_ValueError, "room must be >= 0, got %zd", room);
  PyObject *seq = PySequence_Fast(paths, "paths must be a sequence");
  if (seq == NULL) return NULL;
  PyObject *out = PyList_New(0);
  PyObject *names[GROUP];
  item_t items[GROUP];
  Py_ssize_t total = PySequence_Fast_GET_SIZE(seq);
  for (Py_ssize_t start = 0; out != NULL && start < total; start += GROUP) {
    Py_ssize_t n = total - start < GROUP ? total - start : GROUP, named = 0;
    for (; named < n; named++) {
      if (!PyUnicode_FSConverter(PySequence_Fast_GET_ITEM(seq, start + named), &names[named])) break;
      items[named] = (item_t){.path = PyBytes_AS_STRING(names[named]), .fd = -1};
    }
    if (named < n || read_group(items, n, room, out) != 0) Py_CLEAR(out);
    for (Py_ssize_t i = 0; i < named; i++) Py_DECREF(names[i]);
  }
  Py_DECREF(seq);
  return out;
}

/* ------------------------------------------------------------------ address */

static PyObject *py_address(PyObject *Py_UNUSED(self), PyObject *obj) {
  Py_buffer view;
  if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) != 0) return NULL;
  PyObject *result = PyLong_FromVoidPtr(view.buf);
  PyBuffer_Release(&view);
  return result;
}

static PyMethodDef methods[] = {
    {"read_files", py_read_files, METH_VARARGS,
     "read_files(paths, room) -> [(bytearray, crc32) | (None, errno) | (None, 0)]: files read after `room` free bytes."},
    {"crc32", (PyCFunction)(void (*)(void))py_crc32, METH_VARARGS | METH_KEYWORDS,
     "crc32(data, value=0, simd=True) -> int: zlib.crc32, with PCLMULQDQ where the CPU has it."},
    {"address", py_address, METH_O, "address(buffer) -> int: where the buffer's first byte is in memory."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_storeio",
    .m_doc = "Reading source files into store records, with a fast CRC32 (see effitrain.store.prepare).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__storeio(void) {
#ifdef HAVE_PCLMUL_CODE
  __builtin_cpu_init();
  use_pclmul = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
#endif
  PyObject *m = PyModule_Create(&module);
  if (m != NULL && PyModule_AddIntConstant(m, "simd", use_pclmul) != 0) Py_CLEAR(m);
  return m;
}
