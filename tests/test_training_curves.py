"""Training curves: the trainer's TensorBoard event file beside training.json, decoded with
protobuf's own parser from TensorFlow's field numbers, and the curves on the comparison page."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from sae.tensorboard import EVENTS_FILE, crc32c, write_events
from tests.app_stores import demo_stores
from tests.test_app_pages import open_page, specs
from workbench.analysis.training_curves import training_history
from workbench.errors import WorkbenchError


def event_class():
    """tensorflow.Event (event.proto + summary.proto, the fields TensorBoard's scalars use)."""
    f = descriptor_pb2.FileDescriptorProto(name="tb_event_test.proto", package="tbtest", syntax="proto3")
    value = f.message_type.add(name="Value")
    value.field.add(name="tag", number=1, type=9, label=1)
    value.field.add(name="simple_value", number=2, type=2, label=1)
    summary = f.message_type.add(name="Summary")
    summary.field.add(name="value", number=1, type=11, label=3, type_name=".tbtest.Value")
    event = f.message_type.add(name="Event")
    event.field.add(name="wall_time", number=1, type=1, label=1)
    event.field.add(name="step", number=2, type=3, label=1)
    event.field.add(name="file_version", number=3, type=9, label=1)
    event.field.add(name="summary", number=5, type=11, label=1, type_name=".tbtest.Summary")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tbtest.Event"))


def masked(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path):
    Event, data, at, events = event_class(), path.read_bytes(), 0, []
    while at < len(data):
        header = data[at : at + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[at + 8 : at + 12])[0] == masked(header)
        payload = data[at + 12 : at + 12 + length]
        assert struct.unpack("<I", data[at + 12 + length : at + 16 + length])[0] == masked(payload)
        events.append(Event.FromString(payload))
        at += 16 + length
    return events


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return demo_stores(tmp_path_factory.getbasetemp())


def test_crc32c_is_castagnoli():
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value


def test_event_file_beside_training_json_holds_the_history(demo):
    for folder in demo.saes:
        history = json.loads((folder / "training.json").read_text())["history"]
        first, *rest = read_events(folder / EVENTS_FILE)
        assert first.file_version == "brain.Event:2" and len(rest) == len(history) > 1
        for event, row in zip(rest, history):
            assert event.step == row["tokens"]
            scalars = {v.tag: v.simple_value for v in event.summary.value}
            for metric in ("fvu", "l0", "dead_fraction", "aux", "lr"):
                assert scalars[f"train/{metric}"] == pytest.approx(row[metric], rel=1e-6, abs=1e-7)
            assert "train/tokens" not in scalars and "train/step" not in scalars


def test_unwritable_event_file_leaves_the_old_one(tmp_path):
    path = write_events(tmp_path / EVENTS_FILE, [{"step": 1, "tokens": 256, "fvu": 0.5}])
    before = path.read_bytes()
    (tmp_path / f".{EVENTS_FILE}.tmp").mkdir()  # the temporary name is taken: the write fails
    with pytest.raises(OSError):
        write_events(path, [{"step": 2, "tokens": 512, "fvu": 0.4}])
    assert path.read_bytes() == before


def test_comparison_page_draws_training_curves(demo, monkeypatch, tmp_path):
    at = open_page("sae_comparison", demo.dense, monkeypatch)
    [curves] = [s for s in specs(at) if s["layout"]["title"]["text"].startswith("Training curves")]
    assert len(curves["data"]) == 3 * len(demo.saes)  # FVU, L0, dead fraction per SAE
    rows = len(training_history(demo.saes[0]))
    assert rows > 1 and all(t["mode"] == "lines" for t in curves["data"])


def test_a_bad_training_record_is_named(demo, tmp_path):
    folder = tmp_path / "sae"
    shutil.copytree(demo.saes[0], folder)
    (folder / "training.json").write_text('{"history": [{"fvu": 1}]}')
    with pytest.raises(WorkbenchError, match="not a training record"):
        training_history(folder)
    (folder / "training.json").write_text("[1, 2")
    with pytest.raises(WorkbenchError, match="not a training record"):
        training_history(folder)
    (folder / "training.json").unlink()
    assert training_history(folder).empty
