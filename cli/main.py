"""The `kdprobe` command: one typer app, one module per command."""
from __future__ import annotations

import typer

from cli import (agreement, calibration, cka, diversity, evaluate, info, landscape, pipeline, prune, sharpness, study,
                 surplus, train)
from cli.common import handle_errors

app = typer.Typer(
    name="kdprobe", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
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
]
for _name, _fn in COMMANDS:
    app.command(_name)(handle_errors(_fn))
app.add_typer(pipeline.pipeline_app, name="pipeline")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
