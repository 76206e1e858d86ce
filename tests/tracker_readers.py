"""Read back what the trackers wrote, with each tracker's own reader where it has one.

TensorBoard: its EventAccumulator (what the TensorBoard server reads). MLflow: its MlflowClient on the store.
W&B: the wandb package has no public reader of an offline run; its `.wandb` file is W&B's transaction log
(the LevelDB log format: a 7-byte header ':W&B', magic 0xBEE1, version 0, then 32 KiB blocks of records with a
CRC32C, a length and a type FULL/FIRST/MIDDLE/LAST), each record a wandb.proto.wandb_internal_pb2.Record, the
protobuf schema wandb itself writes and syncs. The few lines below follow that format; the records are parsed
by wandb's own protobuf classes."""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7  # ':W&B' + uint16 magic + uint8 version


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard shows them (purged events hidden)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tensorboard_text(folder: Path, tag: str = "config") -> str:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    event = acc.Tensors(f"{tag}/text_summary")[-1]
    return event.tensor_proto.string_val[0].decode()


def _wandb_payloads(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    magic, version = struct.unpack("<HB", data[4:7])
    assert (magic, version) == (0xBEE1, 0), (hex(magic), version)
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # FULL
            yield chunk
        elif kind == 2:  # FIRST
            pending = chunk
        elif kind == 3:  # MIDDLE
            pending += chunk
        elif kind == 4:  # LAST
            yield pending + chunk
            pending = b""


def wandb_offline_runs(folder: Path) -> list[dict]:
    """Every offline run under FOLDER/wandb, oldest first: {"id", "name", "group", "project", "config", "history":
    [{step, metrics}]}."""
    from wandb.proto import wandb_internal_pb2 as pb

    runs = []
    for run_dir in sorted((Path(folder) / "wandb").glob("offline-run-*")):
        run = {"history": [], "config": {}}
        for path in run_dir.glob("run-*.wandb"):
            for payload in _wandb_payloads(path):
                record = pb.Record()
                record.ParseFromString(payload)
                kind = record.WhichOneof("record_type")
                if kind == "run":
                    r = record.run
                    run.update(id=r.run_id, name=r.display_name, group=r.run_group, project=r.project)
                    run["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
                elif kind == "config":
                    run["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
                elif kind == "history":
                    items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                    run["history"].append({"step": record.history.step.num,
                                           "metrics": {k: v for k, v in items.items() if not k.startswith("_")}})
        runs.append(run)
    return runs


def mlflow_runs(folder: Path, experiment: str) -> list[dict]:
    """Every MLflow run of `experiment` in FOLDER/mlflow.db: {"id", "name", "status", "params", "tags",
    "metrics": {key: [(step, value)]}, "artifacts"}."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{Path(folder) / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    out = []
    for run in client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"]):
        rid = run.info.run_id
        metrics = {k: sorted((m.step, m.value) for m in client.get_metric_history(rid, k)) for k in run.data.metrics}
        out.append({"id": rid, "name": run.info.run_name, "status": run.info.status, "params": run.data.params,
                    "tags": run.data.tags, "metrics": metrics,
                    "artifacts": [a.path for a in client.list_artifacts(rid)], "artifact_uri": run.info.artifact_uri})
    return out
