"""Read an offline W&B run (``wandb/offline-run-*/run-*.wandb``) without the network.

The file is W&B's record log: a 7-byte header (``:W&B``, a 2-byte key, a version byte), then
LevelDB-log framed records (4-byte CRC, 2-byte little-endian length, 1-byte type: full, first,
middle, last) in 32 KiB blocks, each record a serialized ``wandb_internal_pb2.Record``. Used by
``ltq report`` and by the tests to read back what a run logged.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

BLOCK = 32768
HEADER = 7


def _records(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def read_offline_run(run_dir: str | Path) -> dict[str, Any]:
    """``{"config": {...}, "history": [row, ...], "summary": {...}}`` of an offline run directory."""
    from wandb.proto import wandb_internal_pb2

    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("*.wandb")) if run_dir.is_dir() else [run_dir]
    if not files:
        raise FileNotFoundError(f"no .wandb file in {run_dir}")
    out: dict[str, Any] = {"config": {}, "history": [], "summary": {}}

    def key(item) -> str:
        return item.key or "/".join(item.nested_key)

    for raw in _records(files[0]):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            out["summary"].update({key(i): json.loads(i.value_json) for i in rec.summary.update})
        elif kind == "config":
            out["config"].update({key(i): json.loads(i.value_json) for i in rec.config.update})
        elif kind == "run":
            out["config"].update({k: json.loads(v.value_json) for k, v in _config_items(rec.run.config)})
    return out


def _config_items(cfg):
    for item in getattr(cfg, "update", []):
        yield item.key, item
