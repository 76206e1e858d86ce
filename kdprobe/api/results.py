"""What every API result offers: .to_dict() (the command's --json document), .to_frame() (pandas), .save(path)
(the command's writers, chosen by suffix; .pdf/.svg/.png: the figure as a static file, kdprobe.writers.static_figures)
and .figure() (the plotly figure its --html page shows)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from kdprobe.errors import KdprobeError


def data_frame(records: list[dict], what: str):
    """A pandas DataFrame of flat records; pandas is optional, so its absence is a one-line error."""
    try:
        import pandas as pd
    except ImportError:
        raise KdprobeError(f"{what}.to_frame() needs pandas, which kdprobe does not install; pip install pandas "
                           "(or use .to_dict())") from None
    return pd.DataFrame.from_records(records)


def suffix_of(path, allowed: dict[str, str], what: str) -> str:
    """The output kind of `path` by its suffix among allowed {'.json': 'json', ...}; one-line error otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix not in allowed:
        raise KdprobeError(f"{what}.save({str(path)!r}): expected a path ending in {', '.join(sorted(allowed))}; "
                           "pick the file type by its suffix")
    return allowed[suffix]


#: static figure files, by suffix (every result's .save takes them: the figure drawn with matplotlib)
FIGURE_SUFFIXES = {".pdf": "pdf", ".svg": "svg", ".png": "png"}


def save_figure(figure, path, command: str, inputs: dict | None = None) -> Path:
    """Write a result's plotly figure as a static .pdf/.svg/.png under the CLI's output rules (atomically; another
    kind of file is never replaced); its title becomes the caption under it."""
    from kdprobe.files.io import run_scope
    from kdprobe.writers.static_figures import render

    kind = suffix_of(path, FIGURE_SUFFIXES, "figure")
    with run_scope():
        return render(figure, checked_output(command, path, kind, inputs))


def checked_output(command: str, path, kind: str, inputs: dict | None = None) -> Path:
    """Apply the CLI's output rules to one path (never another kind of file, never an input); returns it."""
    from kdprobe.files.outputs import check_outputs

    check_outputs(command, {"path": (path, kind)}, inputs or {})
    return Path(path)


@dataclass(frozen=True)
class ProbeResult:
    """The result of agreement, ensembles, cka, calibration or sharpness.

    tables: the kdprobe.probes.tables.ProbeTables (command, settings and named tables of flat records);
    main: the table --csv writes; details: the probe's own per-checkpoint results (for sharpness the
    kdprobe.probes.sharpness.SharpnessResult of each checkpoint in order; for agreement and ensembles
    {group: kdprobe.probes.ensemble.GroupEnsemble}), where the command has them."""

    tables: object
    main: str
    details: object = field(default=None, repr=False)

    @property
    def command(self) -> str:
        return self.tables.command

    @property
    def settings(self) -> dict:
        return self.tables.settings

    def table(self, name: str | None = None) -> list[dict]:
        """The records of one table (the main one by default)."""
        name = name or self.main
        if name not in self.tables.tables:
            raise KdprobeError(f"{self.command} has no table {name!r}; it has {', '.join(self.tables.tables)}")
        return self.tables.table(name)

    def to_dict(self) -> dict:
        """The document `--json` writes: kdprobe_version, machine, command, settings and every table."""
        from kdprobe.writers.probe_files import probe_document

        return probe_document(self.tables)

    def to_frame(self, table: str | None = None):
        """One table as a pandas DataFrame (the main one, as --csv writes it, by default)."""
        return data_frame(self.table(table), f"{self.command} result")

    def figure(self):
        """The plotly figure the --html page shows."""
        from kdprobe.writers.probe_plots import probe_figure

        return probe_figure(self.tables)

    def save(self, path: str | os.PathLike, *, table: str | None = None) -> Path:
        """Write by suffix: .json (every table, as --json), .csv (one table, the main one by default, as --csv),
        .html (the figure, as --html), .pdf/.svg/.png (the figure as a static file, as --figures). Files are written
        atomically; another kind of file is never replaced."""
        from kdprobe.files.io import run_scope
        from kdprobe.writers.probe_files import write_probe_csv, write_probe_json
        from kdprobe.writers.probe_plots import write_probe_html

        kind = suffix_of(path, {".json": "json", ".csv": "csv", ".html": "html", ".htm": "html", **FIGURE_SUFFIXES},
                         "result")
        if kind in FIGURE_SUFFIXES.values():
            return save_figure(self.figure(), path, self.command)
        if kind == "csv":
            self.table(table)  # an unknown table name is an error, not an empty file
        with run_scope():
            out = checked_output(self.command, path, kind)
            if kind == "json":
                write_probe_json(self.tables, out)
            elif kind == "csv":
                write_probe_csv(self.tables, table or self.main, out)
            else:
                write_probe_html(self.tables, out)
        return out
