"""The experiment-tracker flags that `kdprobe train` and `kdprobe study` share (trainers.trackers)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

O = typer.Option
PANEL = "Experiment trackers (--log)"

Log = Annotated[Optional[list[str]], O(
    "--log", help="Also log every epoch (losses, KD loss terms, accuracies as fractions, lr, seconds) and the full "
                  "config to tensorboard, wandb (an offline run; WANDB_MODE=online logs to the server) or mlflow "
                  "(a SQLite store; MLFLOW_TRACKING_URI names another). Repeat it, or separate with commas, for "
                  "several. Each is an optional extra: pip install 'kdprobe[tensorboard]' (or [wandb], [mlflow]). "
                  "A resumed run continues its tracker runs. See docs/trackers.md.",
    rich_help_panel=PANEL, show_default=False, metavar="TRACKER")]
LogDir = Annotated[Optional[Path], O(
    help="Folder of the tracker files: DIR/tensorboard/RUN/, DIR/wandb/, DIR/mlflow.db (default: logs/ next to "
         "the checkpoint; a study's or pipeline's OUT/logs). Runs are named after the checkpoint's stem; a study's "
         "OUT-NAME/METHOD/seedS, so several studies can share one folder.", rich_help_panel=PANEL,
    show_default=False, metavar="DIR")]
LogProject = Annotated[Optional[str], O(
    help="W&B project and MLflow experiment name (default: kdprobe; a study's own name).", rich_help_panel=PANEL,
    show_default=False, metavar="NAME")]
