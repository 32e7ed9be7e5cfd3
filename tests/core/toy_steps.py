"""Toy step functions for the batch-runner tests: real files, instant, with scripted failures.

A unit's source file holds a command: a number (written doubled, times ``scale``),
``bad`` (bad input: BHInputError), ``crash`` (a bug: RuntimeError) or
``crash-once`` (a bug the first time only; a marker beside the source remembers).
Every call appends the source's name to ``calls.txt`` in the working directory.
"""

from __future__ import annotations

from pathlib import Path

from bh_models.core.errors import BHInputError
from bh_models.core.jsonio import sidecar_path, write_json


def toy_unit(*, source: Path, out_timeseries: Path, out_figure: Path, scale: float = 1.0, threads: int = 1) -> dict:
    with open("calls.txt", "a") as fh:
        fh.write(Path(source).name + "\n")
    command = Path(source).read_text().strip()
    if command == "bad":
        raise BHInputError(source, "holds 'bad'", "write a number into it")
    if command == "crash" or (command == "crash-once" and not Path(f"{source}.crashed").exists()):
        Path(f"{source}.crashed").touch()
        raise RuntimeError("a bug")
    value = 2 * float(command if command != "crash-once" else 1) * scale
    out_timeseries.parent.mkdir(parents=True, exist_ok=True)
    out_timeseries.write_text(f"{value}\n")
    write_json(sidecar_path(out_timeseries), {"value": value})
    from PIL import Image

    out_figure.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 20), (int(value) % 256, 0, 0)).save(out_figure)
    return {"value": value}


def toy_consumer(*, timeseries: list[Path], out_table: Path, timeseries_datasets: list[str] | None = None,
                 threads: int = 1) -> dict:
    lines = [f"{d}\t{Path(p).name}\t{Path(p).read_text().strip()}"
             for p, d in zip(timeseries, timeseries_datasets or [""] * len(timeseries))]
    out_table.write_text("\n".join(lines) + "\n")
    return {"n": len(lines)}
