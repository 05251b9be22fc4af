"""The store's on-disk format: one LMDB environment, no pickle anywhere.

Keys (all ASCII):
  ``img-000000000`` ...  one record per image, zero-padded so keys sort in sample order
  ``__len__``            number of image records, decimal ASCII
  ``__keys__``           the image keys, newline-separated (for tools that want a list)
  ``__meta__``           an Arrow IPC stream: one row per record (see ``META_SCHEMA``) and
                         the store's metadata (format version, classes, options, skipped
                         files) as JSON strings in the schema metadata

A record's value is a fixed 28-byte little-endian header, then a small per-record index,
then the payload (the encoded image)::

  magic "EFTR" | version u8 | kind u8 | reserved u16 | label i32 | crc32 u32
  | width u32 | height u32 | index_len u32 | index bytes | payload bytes

``crc32`` covers everything after the header (index and payload). ``kind`` says what the
payload holds (see ``Kind``). The index is empty for plain encoded images; random-access
JPEGs carry their restart-interval offsets there.

A store is complete only once ``__meta__`` is written: writers build it in a sibling
``<OUT>.partial`` directory and rename it into place at the very end.
"""

from __future__ import annotations

import enum
import json
import struct
from typing import NamedTuple

import pyarrow as pa

try:  # zlib's CRC32, computed with PCLMULQDQ where the CPU has it (~5x faster)
    from effitrain._storeio import crc32
except ImportError:  # the C extension is not built (`make ext`)
    from zlib import crc32

FORMAT_VERSION = 1
MAGIC = b"EFTR"
HEADER = struct.Struct("<4sBBHiIIII")

LEN_KEY = b"__len__"
KEYS_KEY = b"__keys__"
META_KEY = b"__meta__"

# Keys of the schema metadata in ``__meta__``.
META_FORMAT = b"effitrain.format_version"
META_CLASSES = b"effitrain.classes"
META_OPTIONS = b"effitrain.options"
META_SKIPPED = b"effitrain.skipped"

META_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("label", pa.int32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("nbytes", pa.int64()),  # stored payload size in bytes
        ("kind", pa.uint8()),
        ("source", pa.string()),  # path relative to the source folder
    ]
)


class Kind(enum.IntEnum):
    """What a record's payload holds."""

    ENCODED = 0  # the source file's bytes, untouched (any format PIL reads)
    REENCODED = 1  # downscaled and re-encoded as JPEG (``--max-size``)
    RANDOM_ACCESS_JPEG = 2  # lossless JPEG transcode with a restart marker per MCU


class StoreError(Exception):
    """A store is missing, incomplete, of another format, or corrupt."""


def record_key(index: int) -> bytes:
    """The LMDB key of the ``index``-th image record."""
    return b"img-%09d" % index


class Record(NamedTuple):
    """One decoded record; ``index`` and ``payload`` are views into the LMDB value."""

    kind: Kind
    label: int
    width: int
    height: int
    crc32: int
    index: memoryview
    payload: memoryview

    def check_crc(self) -> bool:
        """True when the stored CRC32 matches the index and payload bytes."""
        return crc32(self.payload, crc32(self.index)) == self.crc32


def header_fields(label: int, width: int, height: int, kind: Kind, index_len: int, crc32: int) -> tuple:
    """``HEADER``'s fields for a record whose index and payload have CRC32 ``crc32``, for
    ``HEADER.pack`` or for ``HEADER.pack_into`` a buffer that already holds the rest."""
    return (MAGIC, FORMAT_VERSION, int(kind), 0, label, crc32, width, height, index_len)


def pack_header(label: int, width: int, height: int, kind: Kind, index_len: int, crc32: int) -> bytes:
    """The fixed header of a record whose index and payload have CRC32 ``crc32``."""
    return HEADER.pack(*header_fields(label, width, height, kind, index_len, crc32))


def encode_record(
    payload: bytes, label: int, width: int, height: int, kind: Kind = Kind.ENCODED, index: bytes = b""
) -> bytes:
    """Build a record value: header, index, payload."""
    crc = crc32(payload, crc32(index))
    return b"".join((pack_header(label, width, height, kind, len(index), crc), index, payload))


def decode_record(value: bytes | memoryview, key: bytes = b"?") -> Record:
    """Parse a record value without copying its payload; raise StoreError if malformed."""
    view = memoryview(value)
    if len(view) < HEADER.size:
        raise StoreError(f"record {key.decode(errors='replace')}: {len(view)} bytes, shorter than its header")
    magic, version, kind, _, label, crc, width, height, index_len = HEADER.unpack_from(view)
    if magic != MAGIC:
        raise StoreError(f"record {key.decode(errors='replace')}: bad magic {magic!r}, not an effitrain record")
    if version != FORMAT_VERSION:
        raise StoreError(
            f"record {key.decode(errors='replace')}: format version {version}, this effitrain reads {FORMAT_VERSION}"
        )
    end_index = HEADER.size + index_len
    if end_index > len(view):
        raise StoreError(f"record {key.decode(errors='replace')}: index runs past the end of the record")
    try:
        kind = Kind(kind)
    except ValueError:
        raise StoreError(f"record {key.decode(errors='replace')}: unknown payload kind {kind}") from None
    return Record(kind, label, width, height, crc, view[HEADER.size:end_index], view[end_index:])


def meta_to_bytes(table: pa.Table) -> bytes:
    """Serialise the per-record table (with its schema metadata) as an Arrow IPC stream."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def meta_from_bytes(data: bytes) -> pa.Table:
    """Read the per-record table written by ``meta_to_bytes``."""
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def with_store_metadata(
    table: pa.Table, classes: list[str], options: dict, skipped: list[dict]
) -> pa.Table:
    """Attach the store-level metadata (as JSON strings) to the per-record table."""
    return table.replace_schema_metadata(
        {
            META_FORMAT: str(FORMAT_VERSION).encode(),
            META_CLASSES: json.dumps(classes).encode(),
            META_OPTIONS: json.dumps(options, sort_keys=True).encode(),
            META_SKIPPED: json.dumps(skipped).encode(),
        }
    )
