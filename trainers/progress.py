"""Progress bars on tqdm (stderr) for a training run and a study: what `kdprobe train` / `kdprobe study` and
`kdprobe.train(...)` / `kdprobe.study(...)` show unless told to be quiet.

TqdmProgress is a trainers.loop.Progress (one bar in steps, one line per epoch); TqdmStudyProgress is a
trainers.study.StudyProgress (an outer bar in epochs, one bar per cell). Both write to the sys.stderr of the
moment they start, so a caller that swaps stderr (a test runner) gets them."""
from __future__ import annotations

import sys

from trainers.loop import Progress
from trainers.study import StudyProgress


class TqdmProgress(Progress):
    """trainers.loop.Progress on a tqdm bar (stderr), with a one-line summary per epoch."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.bar = enabled, None

    def start(self, total_steps, done_steps, desc):
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=done_steps, desc=desc, unit="step",
                        disable=not self.enabled, dynamic_ncols=True, file=sys.stderr)

    def step(self, n, postfix):
        self.bar.update(n)
        if postfix and self.bar.n % 10 == 0:
            self.bar.set_postfix(postfix, refresh=False)

    def epoch(self, record):
        if self.enabled:
            self.bar.write(f"epoch {record['epoch']:>3}  lr {record['lr']:.4g}  train loss {record['train_loss']:.4f} "
                           f"acc {record['train_acc']:.2%}  test loss {record['test_loss']:.4f} acc {record['test_acc']:.2%}  "
                           f"({record['seconds']:.1f}s)", file=sys.stderr)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class CellBar(TqdmProgress):
    """A study cell's training bar; epochs update its postfix instead of printing a line each (a study has
    hundreds)."""

    def epoch(self, record):
        if self.bar is not None:
            self.bar.set_postfix({"epoch": record["epoch"], "test acc": f"{record['test_acc']:.2%}"}, refresh=False)


class TqdmStudyProgress(StudyProgress):
    """trainers.study.StudyProgress on tqdm: an outer bar in epochs (ETA of the whole study) + one per cell."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.outer = enabled, None

    def note(self, text):
        from tqdm import tqdm

        if self.enabled:
            tqdm.write(text, file=sys.stderr)

    def plan(self, total_epochs):
        from tqdm import tqdm

        if total_epochs and self.enabled:
            self.outer = tqdm(total=total_epochs, desc="study", unit="epoch", position=0, file=sys.stderr,
                              dynamic_ncols=True, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} epochs "
                                                             "[{elapsed}<{remaining}]")

    def advance(self, epochs):
        if self.outer is not None and epochs:
            self.outer.update(epochs)

    def training(self, label):
        return CellBar(self.enabled)

    def close(self):
        if self.outer is not None:
            self.outer.close()
            self.outer = None
