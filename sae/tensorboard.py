"""Training curves as a TensorBoard event file, written with no TensorBoard dependency.

An event file is a TFRecord stream (length, masked CRC-32C of the length, payload, masked
CRC-32C of the payload) of `Event` protocol buffers: the first names the file version, each
later one holds a step and scalar summaries. The `tensorboard` package brings grpcio and a
server binary with it, and torch.utils.tensorboard imports that package, so the few bytes of
the format are written here by hand: the field numbers are those of TensorFlow's event.proto
and summary.proto (Event: wall_time 1, step 2, file_version 3, summary 5; Summary: value 1;
Summary.Value: tag 1, simple_value 2).

The trainer rewrites the whole file from its history at every checkpoint (atomically, like
training.json), with the step axis in training tokens, so a resumed run's file holds exactly
the rows its training.json holds.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

#: The event file's name beside training.json (TensorBoard reads any name containing "tfevents").
EVENTS_FILE = "events.out.tfevents.sae-training"
#: History fields that are axes, not curves (elapsed_s becomes the wall time).
AXES = ("step", "tokens", "elapsed_s")


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum TFRecord frames carry."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> bytes:
    crc = crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 as protobuf encodes it (negative numbers take ten bytes)
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, file_version: str | None = None, scalars: Mapping[str, float] | None = None) -> bytes:
    body = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
    if file_version is not None:
        body += _field(3, file_version.encode())
    if scalars:
        values = b"".join(_field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value)) for tag, value in scalars.items())
        body += _field(5, values)
    return body


def _record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + _masked(length) + data + _masked(data)


def write_events(path: str | Path, history: Iterable[Mapping[str, float]], prefix: str = "train/") -> Path:
    """Write history rows (the trainer's: step, tokens, elapsed_s and metrics) as an event file,
    one event per row at step = tokens, each numeric metric a scalar tagged prefix + name.
    Replaced atomically; a failed write (OSError) leaves the previous file as it was."""
    path = Path(path)
    rows = list(history)
    started = time.time() - max((float(r.get("elapsed_s", 0.0)) for r in rows), default=0.0)
    chunks = [_record(_event(started, 0, file_version="brain.Event:2"))]
    for row in rows:
        scalars = {prefix + k: float(v) for k, v in row.items() if k not in AXES and isinstance(v, (int, float))}
        step = int(row.get("tokens", row.get("step", 0)))
        chunks.append(_record(_event(started + float(row.get("elapsed_s", 0.0)), step, scalars=scalars)))
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(b"".join(chunks))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    return path
