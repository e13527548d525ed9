"""Read the history of an offline W&B run (`wandb/offline-run-*/run-*.wandb`) without syncing it.

The `.wandb` file is a LevelDB-style log of protobuf `Record`s: a 7-byte file header (`:W&B`, magic, version),
then 32 KiB blocks of chunks, each with a 7-byte header (CRC-32C, payload length, chunk type). A record too
long for the rest of its block is split into FIRST / MIDDLE / LAST chunks; a block tail shorter than a chunk
header is zero padding. Only the history records are decoded here (one per `log` call: step and values).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

from dreamshot.utils.errors import DataError

FILE_HEADER = struct.Struct("<4sHB")
CHUNK_HEADER = struct.Struct("<IHB")
IDENT = b":W&B"
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def offline_runs(run_dir: Path) -> list[Path]:
    """The `.wandb` files of a run folder's offline W&B runs, oldest first (a resumed run adds one)."""
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def read_history(path: Path) -> list[dict[str, float]]:
    """The numeric values of every history record of one `.wandb` file, in logging order.

    Media and other non-numeric values (images, tables) are left out; W&B's bookkeeping keys (`_step`,
    `_runtime`, `_timestamp`) are kept.
    """
    from wandb.proto import wandb_internal_pb2  # imported here: only W&B runs need it

    rows = []
    for payload in _records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            rows.append(_numeric_items(record.history.item))
    return rows


def _numeric_items(items) -> dict[str, float]:
    """Numbers of one history record. A logged image or table arrives flattened into `<key>/_type`,
    `<key>/width`, ...: every value under such a key is metadata, not a metric."""
    values = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
    media = tuple(key.removesuffix("_type") for key in values if key.endswith("/_type"))
    return {key: float(value) for key, value in values.items() if _is_number(value) and not _under(key, media)}


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return bool(prefixes) and key.startswith(prefixes)


def _records(path: Path) -> Iterator[bytes]:
    """The payload of every complete record of the log at `path`."""
    data = path.read_bytes()
    if len(data) < FILE_HEADER.size or FILE_HEADER.unpack_from(data)[0] != IDENT:
        raise DataError(f"{path}: not a W&B run file (no {IDENT.decode()} header)")
    position, pending = FILE_HEADER.size, b""
    while position + CHUNK_HEADER.size <= len(data):
        if BLOCK - position % BLOCK < CHUNK_HEADER.size:
            position += BLOCK - position % BLOCK  # padding at the end of a block
            continue
        _, length, kind = CHUNK_HEADER.unpack_from(data, position)
        chunk = data[position + CHUNK_HEADER.size : position + CHUNK_HEADER.size + length]
        position += CHUNK_HEADER.size + length
        if len(chunk) < length:
            return  # a run still writing, or killed mid-record: its last record is incomplete
        if kind in (FULL, FIRST):
            pending = chunk
        elif kind in (MIDDLE, LAST):
            pending += chunk
        if kind in (FULL, LAST):
            yield pending
