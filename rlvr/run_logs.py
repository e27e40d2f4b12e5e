"""Reading a run's scalars back from its logs: metrics.jsonl, else its TensorBoard events.

metrics.jsonl is the run's own record (rlvr/tracking.py's RunLogger truncates it to the
checkpoint step on --resume); TensorBoard events are read, through TensorBoard's own
EventAccumulator, only for a run without one. Damage is reported, never silently dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def read_metrics_file(path: Path) -> tuple[dict[str, dict[int, float]], list[str]]:
    """Scalars from a run's metrics.jsonl, and what could not be read.

    A line that does not parse (torn by a crash, damaged on disk) is skipped and reported, never
    a reason to drop the lines after it. Non-finite values are logged as null: left out.
    """
    out: dict[str, dict[int, float]] = {}
    bad = []
    text = path.read_text(encoding="utf-8", errors="replace")
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = record["step"]
            if type(step) is not int:
                raise TypeError(f"step {step!r}")
        except (json.JSONDecodeError, KeyError, TypeError):
            bad.append(lineno)
            continue
        for tag, value in record.items():
            if tag != "step" and type(value) in (int, float):
                out.setdefault(tag, {})[step] = float(value)  # a later line for a step wins
    problems = []
    if bad:
        lines = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        problems.append(f"{METRICS_FILE}: {plural(len(bad), 'unreadable line')} skipped "
                        f"(line {lines})")
    return {tag: dict(sorted(steps.items())) for tag, steps in out.items()}, problems


def read_event_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """All TensorBoard scalars of a run directory, through TensorBoard's own EventAccumulator.

    Orphaned data is purged as TensorBoard itself does: a resumed run writes a restart marker at
    its checkpoint step + 1 (SummaryWriter's purge_step), and what a dead process logged from
    there on is dropped. A step still logged twice keeps the value with the latest wall_time.
    """
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(run_dir), {ea.SCALARS: 0}, purge_orphaned_data=True)
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["scalars"]:
        latest: dict[int, tuple[float, float]] = {}
        for ev in acc.Scalars(tag):
            if ev.step not in latest or ev.wall_time >= latest[ev.step][0]:
                latest[ev.step] = (ev.wall_time, ev.value)
        out[tag] = {step: v for step, (_, v) in sorted(latest.items())}
    return out


def damaged_event_files(run_dir: Path) -> list[tuple[str, int, int | None, str]]:
    """(file, records read, last step read, why) for each event file that stops being readable.

    EventAccumulator stops reading a file at the first record that fails its checksum or is cut
    short, silently; TensorBoard's own record reader says where and why.
    """
    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.tensorflow_stub import errors
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New

    damaged = []
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        reader, n, last_step = PyRecordReader_New(str(path)), 0, None
        while True:
            try:
                reader.GetNext()
            except errors.OutOfRangeError:
                break
            except errors.DataLossError as e:
                damaged.append((path.name, n, last_step, e.message.split(" ", 1)[-1]))
                break
            n += 1
            last_step = event_pb2.Event.FromString(reader.record()).step
    return damaged


def read_scalars(run_dir: Path) -> tuple[dict[str, dict[int, float]], list[str]]:
    """The scalars a run kept, and warnings about data that could not be read.

    metrics.jsonl is the run's record: the training loop logs every scalar there and in
    TensorBoard, and on --resume truncates it to the checkpoint step, so it holds exactly what
    the run itself reports. TensorBoard events are read (orphans purged) only for a run without
    one. Damaged event files are reported either way.
    """
    metrics = run_dir / METRICS_FILE
    if metrics.is_file():
        scalars, problems = read_metrics_file(metrics)
        consequence = "TensorBoard shows less of this run (the numbers here use metrics.jsonl)"
    else:
        scalars, problems = read_event_scalars(run_dir), []
        consequence = "the rest of that file is missing here (no metrics.jsonl to use instead)"
    for name, n, step, why in damaged_event_files(run_dir):
        where = f"after record {n}" + ("" if step is None else f" (step {step})")
        problems.append(f"event file {name} is unreadable {where}: {why}; {consequence}")
    return scalars, problems


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("s" if n != 1 else "")
