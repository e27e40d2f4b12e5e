"""Build and write the stratified MATH subset: data_prep.py's work, and a first run's.

`build` loads every requested split, extracts gold answers and draws the subset (rlvr/data.py's
pure functions); `write_atomically` writes the files under temporary names and renames them only
once all are written, so a failure leaves the output directory as it was. `build_default_subset`
makes a missing default --data_dir of MATH_experiment.py with this same code, from the hub.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from rlvr.data import (
    HUB_DATASET,
    SPLITS,
    DataError,
    load_math,
    load_overrides,
    output_row,
    prepare_split,
    split_seed,
    stratified_subset,
    stratum_counts,
)

DEFAULT_OUTPUT_DIR = "data/math_subset"
DEFAULT_FRACTION = 0.25
DEFAULT_SEED = 42
# The default --data_dir of each preset of MATH_experiment.py and the data_prep.py --fraction
# that builds it.
DEFAULT_DATA_DIRS = {DEFAULT_OUTPUT_DIR: DEFAULT_FRACTION, "data/math_full": 1.0}


def build(source: str | None, fraction: float, seed: int,
          splits: list[str] | tuple[str, ...] = SPLITS) -> tuple[dict[str, bytes], dict]:
    """All outputs in memory: {file name: bytes} and the manifest (with checksums); DataError
    (one line) on any problem, an empty split included."""
    if not 0 < fraction <= 1:
        raise DataError(f"--fraction must be in (0, 1], got {fraction}; 0.25 is the default "
                        "subset, 1.0 keeps everything")
    overrides = load_overrides()
    manifest: dict = {
        "source": source or f"hub:{HUB_DATASET}",
        "seed": seed,
        "fraction": fraction,
        "splits": list(splits),
        "counts": {},
        "dropped_no_answer": {},
        "overrides_applied": {},
        "multi_box": {},
    }
    files = {}
    for split in dict.fromkeys(splits):  # a repeated split would only be done twice
        rows = load_math(source, split)
        kept, dropped, multi_box, applied = prepare_split(rows, overrides, split)
        subset = stratified_subset(kept, fraction, split_seed(seed, split))
        if not subset:
            # the subset keeps floor(fraction x N + 0.5) rows: at least one from 0.5 / N on
            least = math.ceil(0.5 / max(len(kept), 1) * 1e4) / 1e4
            raise DataError(f"--fraction {fraction:g} keeps none of the {len(kept)} {split} "
                            f"problems; pass --fraction {least:g} or more")
        manifest["counts"][split] = {
            "before": stratum_counts(rows),
            "eligible": stratum_counts(kept),
            "after": stratum_counts(subset),
            "total": {"before": len(rows), "eligible": len(kept), "after": len(subset)},
        }
        manifest["dropped_no_answer"][split] = dropped
        manifest["overrides_applied"][split] = applied
        manifest["multi_box"][split] = multi_box
        lines = (json.dumps(output_row(r), ensure_ascii=False) + "\n" for r in subset)
        files[f"{split}.jsonl"] = "".join(lines).encode("utf-8")
    manifest["sha256"] = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    return files, manifest


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode()


def write_atomically(output_dir: Path, files: dict[str, bytes]) -> None:
    """Write every file under a temporary name, then rename them all; clean up on failure."""
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = {name: output_dir / f".{name}.tmp-{os.getpid()}" for name in files}
    try:
        for name, data in files.items():
            tmp[name].write_bytes(data)
        for name in files:
            os.replace(tmp[name], output_dir / name)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)


def write_new_dir_atomically(output_dir: Path, files: dict[str, bytes]) -> bool:
    """Write the files into a directory beside `output_dir`, then rename it into place in one
    step: nothing half-written is ever at `output_dir`. False when another process (a run of a
    study, a rank of a job) put one there first; its files are then the ones kept."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        try:
            os.rename(tmp, output_dir)
        except OSError:
            if (output_dir / "manifest.json").is_file():
                return False
            raise
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_default_subset(data_dir: str) -> bool:
    """Build a default --data_dir (DEFAULT_DATA_DIRS) that does not exist yet, as
    `python data_prep.py [--fraction F --output_dir DIR]` would, from the hub. Returns whether
    it built one; DataError naming the command to run when the hub cannot be read."""
    key = os.path.normpath(data_dir)
    fraction = next((f for d, f in DEFAULT_DATA_DIRS.items() if os.path.normpath(d) == key), None)
    if fraction is None or Path(data_dir).exists():
        return False
    flags = "" if key == os.path.normpath(DEFAULT_OUTPUT_DIR) else \
        f" --fraction {fraction:g} --output_dir {data_dir}"
    print(f"[data] {data_dir} not found: building it from the hub ({HUB_DATASET}), as "
          f"`python data_prep.py{flags}` does", flush=True)
    try:
        files, manifest = build(None, fraction, DEFAULT_SEED)
    except DataError as e:
        raise DataError(f"no MATH subset at {data_dir}, and it cannot be built from the hub "
                        f"({e}); build it from a local copy of MATH with `python data_prep.py "
                        f"--source /path/to/MATH{flags}`") from None
    try:
        if not write_new_dir_atomically(Path(data_dir),
                                        {**files, "manifest.json": manifest_bytes(manifest)}):
            print(f"[data] {data_dir} was built meanwhile by another run: using it", flush=True)
            return False
    except OSError as e:
        raise DataError(f"cannot write the MATH subset to {data_dir}: {e.strerror or e}; run "
                        "from a writable directory, or pass --data_dir one data_prep.py "
                        "wrote") from None
    counts = ", ".join(f"{s} {c['total']['after']}" for s, c in manifest["counts"].items())
    print(f"[data] wrote {data_dir} ({counts} problems)", flush=True)
    return True
