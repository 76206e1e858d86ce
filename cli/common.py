"""Shared CLI plumbing: error handling, globs, tables, progress bars."""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional, Sequence

import typer
from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
from typer.core import TyperGroup

from kdprobe.errors import Interrupted, KdprobeError
from kdprobe.files.io import atomic_write_text, run_scope
from kdprobe.checkpoints.selection import arch_choice


def interrupted_line(e: BaseException) -> str:
    """What Ctrl-C prints: what was saved (if the interrupted work says so), else just 'interrupted'."""
    saved = getattr(e, "saved", None)
    return f"interrupted; {saved}; run the same command again to resume" if saved else "interrupted"


def folder_interrupted(e: KeyboardInterrupt, out: Path) -> Interrupted:
    """Ctrl-C in a study/pipeline: finished cells (and a cell's partial state) in OUT are what a rerun keeps."""
    saved = getattr(e, "saved", None)
    cells = out.is_dir() and any(p.suffix in (".pt", ".partial") for p in out.rglob("*"))
    if cells and not saved:
        saved = f"finished cells are kept in {out}"
    return Interrupted(saved)


def _error(text: str) -> None:
    one_line = " ".join(line.strip() for line in str(text).splitlines())  # a message never spans lines
    # a pasted 5,000-digit number or 30,000 brackets stay readable: very long words are cut, their length told
    one_line = " ".join(w if len(w) <= 200 else f"{w[:60]}...({len(w):,} characters)" for w in one_line.split(" "))
    typer.secho(f"error: {one_line}", fg=typer.colors.RED, err=True)


BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE: what the shell reports for any tool whose reader went away


def stdout_closed() -> None:
    """The reader of stdout went away (`kdprobe models | head -1`): a normal end, not an error. Point stdout
    at /dev/null so no later write or the interpreter's final flush fails again, and print nothing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor (a test runner's buffer): nothing to redirect
        pass


def handle_errors(fn: Callable) -> Callable:
    """Turn library errors into one stderr line and exit 1 (no traceback); exit 2 only for our bugs.
    The command runs in one kdprobe.files.io.run_scope: the outputs check_outputs locks stay locked until it ends."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with run_scope():
                return fn(*args, **kwargs)
        except KdprobeError as e:
            _error(str(e))
            raise typer.Exit(1) from None
        except KeyboardInterrupt as e:
            typer.secho(interrupted_line(e), err=True)
            raise typer.Exit(130) from None
        except BrokenPipeError:  # stdout's reader went away: the command group ends quietly
            raise
        except FileNotFoundError as e:
            _error(f"file not found: {e.filename}; check the path")
            raise typer.Exit(1) from None
        except OSError as e:
            if e.filename is None or not e.strerror:
                raise _internal(e) from None
            _error(f"cannot access {e.filename}: {e.strerror.lower()}; check the path and its permissions")
            raise typer.Exit(1) from None
        except MemoryError:
            _error("out of memory; use fewer samples, a smaller grid, batch or model, or a machine with more memory")
            raise typer.Exit(1) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - a bug of ours: still one line, traceback on request
            raise _internal(e) from None

    return wrapper


def _internal(e: Exception) -> typer.Exit:
    if os.environ.get("KDPROBE_DEBUG"):
        raise e
    _error(f"internal error {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''} "
           "(rerun with KDPROBE_DEBUG=1 for the traceback and please report it)")
    return typer.Exit(2)


# --help as plain text (click's formatter), not typer's rich panels: those squeeze every description into a
# narrow last column, print <bool> after flags and read help text as rich markup, eating `[scales.NAME]`,
# `[[pruning]]` and `[train]`. Lines use the terminal's width up to 120 columns.
HELP_SETTINGS = {"rich_markup_mode": None, "context_settings": {"max_content_width": 120}}


class KdprobeGroup(TyperGroup):
    """The top-level command group: a usage mistake (unknown option, non-numeric value, missing
    --out) is one line `error: ...` with exit 1, like every other user mistake; Ctrl-C is one
    line with exit 130."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = sys.argv[1:] if args is None else list(args)
        try:
            with self.make_context(prog_name or "kdprobe", args, **extra) as ctx:
                self.invoke(ctx)
            code = 0
        except typer.Exit as e:
            code = e.exit_code
        except NoArgsIsHelpError as e:  # the help (typer's rich help is printed while the error is built)
            if e.format_message().strip():
                typer.echo(e.format_message())
            code = 0
        except UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else "kdprobe"
            _error(f"{' '.join(e.format_message().split())} (see `{where} --help`)")
            code = 1
        except ClickException as e:
            _error(" ".join(e.format_message().split()))
            code = 1
        except (typer.Abort, EOFError):
            _error("aborted")
            code = 1
        except KeyboardInterrupt as e:
            typer.secho(interrupted_line(e), err=True)
            code = 130
        except BrokenPipeError:
            stdout_closed()
            code = BROKEN_PIPE_EXIT
        try:
            sys.stdout.flush()  # what is still buffered goes now, while a closed pipe can still end quietly
        except BrokenPipeError:
            stdout_closed()
            code = BROKEN_PIPE_EXIT
        except (OSError, ValueError):
            pass
        if not standalone_mode:
            return code
        sys.exit(code)

    def format_commands(self, ctx, formatter) -> None:
        """Each command with the first paragraph of its help, whole: click's own cut stops at the first '. '
        (so 'Loss surface of Li et al. 2018 ...' became 'Loss surface of Li et al.') or at a width."""
        import inspect

        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                text = cmd.short_help or inspect.cleandoc(cmd.help or "").split("\n\n")[0]
                rows.append((name, " ".join(text.split())))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def ranged(rng, flag: str | None = None) -> Callable:
    """A typer callback checking a numeric flag at parse time against one declared Range
    (trainers.config.RANGES[field] when given a field name, or a kdprobe.ranges.Range)."""
    if isinstance(rng, str):
        from trainers.config import RANGES

        rng = RANGES[rng]

    def check(value):
        if value is not None and not rng.ok(value):
            raise typer.BadParameter(f"expected {rng.describe()}, got {value!r}")
        return value

    return check


def in_range(name: str) -> Callable:
    """A parse-time check of a probe option against its range in kdprobe.ranges.PROBE_RANGES (the same
    range a study spec's probe table is checked against)."""
    from kdprobe.ranges import PROBE_RANGES

    return ranged(PROBE_RANGES[name])


def fmt(v, digits: int = 4) -> str:
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.{digits}f}"
    return "" if v is None else str(v)


def table(rows: Sequence[dict], columns: Sequence[str] | None = None, digits: int = 4) -> str:
    """A plain aligned text table (readable in any terminal and in a log file)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    cells = [[fmt(r.get(c), digits) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    # numbers right-aligned (digits line up), text left-aligned
    numeric = [all(_is_number(row[i]) for row in cells) for i in range(len(columns))]
    line = lambda vals: "  ".join(v.rjust(w) if num else v.ljust(w)  # noqa: E731
                                  for v, w, num in zip(vals, widths, numeric)).rstrip()
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _is_number(text: str) -> bool:
    if text in ("", "-", "nan"):
        return True
    try:
        float(text.replace(",", "").replace("±", "0").split()[0])
        return True
    except ValueError:
        return False


def write_rows_csv(rows: Sequence[dict], path: Path) -> None:
    """CSV with a header from the union of keys (pandas.read_csv reads it)."""
    from kdprobe.writers.probe_files import write_records_csv

    write_records_csv(rows, path)


def write_json(obj, path: Path) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


# ---- options every command that reads checkpoints or data shares (one definition each) ----

ARCH_HELP = ("Architecture of foreign checkpoints (default: detected from their tensor names and shapes). "
             "NAME for every file, or FILE=NAME for one file (FILE may be a glob; repeat the option), e.g. "
             "--arch repdistiller:wrn_40_2 or --arch 't/*.pth=repdistiller:resnet32x4'. Names: `kdprobe models` "
             "(kdprobe's, repdistiller:, rnp-l1:, rnp-slimming:, rnp-weight:, torchvision:). "
             "python:MODULE:FACTORY IMPORTS AND RUNS that module of yours to build the model.")
ARCH_KWARGS_HELP = ("Keyword arguments of foreign architectures as a JSON object, for every file or as "
                    "FILE={...} for one (repeatable), e.g. --arch-kwargs '{\"cfg\": [16, 8]}'; they win over "
                    "what is read off the tensors.")


def checked(parse: Callable) -> Callable:
    """A typer callback that runs `parse(value)` at parse time, so a bad value is a usage error before any work."""

    def callback(value):
        try:
            parse(value)
        except KdprobeError as e:
            raise typer.BadParameter(str(e)) from None
        return value

    return callback


def _parse_image_size(value):
    from kdprobe.data.preprocess import parse_image_size

    return parse_image_size(value)


_check_archs = checked(lambda v: arch_choice(v, None))  # NAME or FILE=NAME
_check_arch_kwargs = checked(lambda v: arch_choice(None, v))  # {...} or FILE={...}
_check_image_size = checked(_parse_image_size)  # N >= 1 or 'native'


Arch = Annotated[Optional[list[str]], typer.Option("--arch", help=ARCH_HELP, callback=_check_archs,
                                                   metavar="NAME|FILE=NAME")]
ArchKwargs = Annotated[Optional[list[str]], typer.Option("--arch-kwargs", help=ARCH_KWARGS_HELP, metavar="JSON|FILE=JSON",
                                                         callback=_check_arch_kwargs)]
Dataset = Annotated[Optional[str], typer.Option(help="Dataset: digits, cifar10, cifar100 or imagefolder:PATH (a folder "
                                                     "or .tar.gz); default: the one recorded in the checkpoint(s).")]
DataDir = Annotated[Optional[Path], typer.Option(help="Folder of torchvision's CIFAR files (overrides the recorded one).")]
ImageSize = Annotated[Optional[str], typer.Option(
    help="Side S of the images a model receives: N pixels or 'native' (no resizing). Default: what the checkpoint "
         "records, else 224 for torchvision models and native for the CIFAR families. Batches are resized on the "
         "device: shorter side to S/0.875, center crop S (the ImageNet evaluation recipe).",
    callback=_check_image_size, metavar="N|native")]
