"""Readers of the files the loggers write, for the tests: TensorBoard event files (TFRecord
framing of ``Event`` protos) and W&B's offline run files (LevelDB-log framing of ``Record``
protos, after a 7-byte header)."""

from __future__ import annotations

import io
import pathlib
import struct
import time

import numpy as np


def tensorboard_events(directory: pathlib.Path) -> list:
    """Every ``Event`` of the event files under ``directory``, in file order."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(pathlib.Path(directory).rglob("events.out.tfevents.*")):
        data, position = path.read_bytes(), 0
        while position + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[position:position + 8])
            start = position + 12  # length, its CRC
            event = event_pb2.Event()
            event.ParseFromString(data[start:start + length])
            events.append(event)
            position = start + length + 4  # the data's CRC
    return events


def tensorboard_values(directory: pathlib.Path) -> dict[str, dict[int, object]]:
    """{tag: {step: value}}: a float for scalars, a uint8 [H, W, C] array for images, the
    ``HistogramProto`` for histograms."""
    from PIL import Image

    values: dict[str, dict[int, object]] = {}
    for event in tensorboard_events(directory):
        for value in event.summary.value:
            kind = value.WhichOneof("value")
            if kind == "simple_value":
                item = value.simple_value
            elif kind == "image":
                item = np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string)))
            elif kind == "histo":
                item = value.histo
            else:
                continue
            values.setdefault(value.tag, {})[int(event.step)] = item
    return values


_BLOCK = 32768  # LevelDB log blocks
_HEADER = 7  # CRC (4), length (2), type (1)


def wandb_records(path: pathlib.Path, wait_s: float = 120.0) -> list:
    """The ``Record`` protos of a W&B run file (``run-<id>.wandb``), once it is complete.

    wandb's own process writes the file; ``run.finish()`` can return before that process has
    flushed it (seen on a loaded machine: the file still held only its header), so this
    waits, up to ``wait_s`` seconds, for the run's ``exit`` record."""
    deadline = time.monotonic() + wait_s
    while True:
        records = _read_wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: no exit record after {wait_s:.0f} s "
                                 f"({len(records)} records)")
        time.sleep(0.5)


def _read_wandb_records(path: pathlib.Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = pathlib.Path(path).read_bytes()
    if len(data) < 7:
        return []
    assert data[:4] == b":W&B", data[:7]
    position, chunks, pending = 7, [], b""
    while position + _HEADER <= len(data):
        left = _BLOCK - position % _BLOCK
        if left < _HEADER:  # the rest of a block is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + _HEADER])
        if kind == 0:  # zero padding to the end of the block
            position += left
            continue
        chunk = data[position + _HEADER:position + _HEADER + length]
        position += _HEADER + length
        if kind == 1:  # a whole record
            chunks.append(chunk)
        elif kind == 2:  # first piece
            pending = chunk
        elif kind == 3:  # middle piece
            pending += chunk
        elif kind == 4:  # last piece
            chunks.append(pending + chunk)
    records = []
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def wandb_history(path: pathlib.Path) -> list[dict[str, str]]:
    """The logged rows of a W&B run file: {key ("a/b" for nested keys): JSON text}."""
    rows = []
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): item.value_json
                         for item in record.history.item})
    return rows
