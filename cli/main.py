"""The `kdprobe` command: one typer app, one module per command."""
from __future__ import annotations

# Ctrl-C while the heavy modules import (torch takes seconds): one line and exit 130, never a
# KeyboardInterrupt traceback. Installed before any other import; the previous handler (Python's
# KeyboardInterrupt) is back once the imports are done, and main() turns Ctrl-C into one line.
import os
import signal


def _interrupted_while_starting(signum, frame):  # pragma: no cover - exercised by a subprocess test
    os.write(2, b"interrupted\n")
    os._exit(130)


_previous_sigint = None
if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when the caller ignores SIGINT (nohup, &)
    try:
        _previous_sigint = signal.signal(signal.SIGINT, _interrupted_while_starting)
    except ValueError:  # imported from a thread other than the main one: signals cannot be set there
        pass

import sys  # noqa: E402

import typer  # noqa: E402

from cli import (agreement, cache, calibration, cka, compare, diversity, evaluate, info, landscape, pipeline,  # noqa: E402
                 prune, sharpness, study, surplus, train)
from cli.common import HELP_SETTINGS, KdprobeGroup, handle_errors, interrupted_line  # noqa: E402

app = typer.Typer(
    name="kdprobe", cls=KdprobeGroup, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    **HELP_SETTINGS,
    help="Train and probe image-classifier checkpoints: what did distillation, pruning or augmentation do to my network?",
)

COMMANDS = [
    ("train", train.train),
    ("eval", evaluate.evaluate),
    ("info", info.info),
    ("models", info.models),
    ("prune", prune.prune),
    ("surplus", surplus.surplus),
    ("diversity", diversity.diversity),
    ("landscape", landscape.landscape),
    ("interpolate", landscape.interpolate),
    ("agreement", agreement.agreement),
    ("cka", cka.cka),
    ("calibration", calibration.calibration),
    ("sharpness", sharpness.sharpness),
    ("study", study.study),
    ("compare", compare.compare),
]
for _name, _fn in COMMANDS:
    app.command(_name)(handle_errors(_fn))
app.add_typer(pipeline.pipeline_app, name="pipeline")
app.add_typer(cache.cache_app, name="cache")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt as e:  # between the imports and the command group's own handling
        print(interrupted_line(e), file=sys.stderr)
        sys.exit(130)


if _previous_sigint is not None:
    signal.signal(signal.SIGINT, _previous_sigint)

if __name__ == "__main__":
    main()
