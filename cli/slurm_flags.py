"""The --executor and Slurm option flags that `kdprobe study` and `kdprobe pipeline pruning` share
(trainers.study_slurm). Each is None unless given, so a study spec's [slurm] table fills the rest; a flag wins."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from cli.common import ranged
from kdprobe.ranges import Range

O = typer.Option
PANEL = "Slurm (--executor slurm)"
GPUS, CPUS, PARALLEL = Range(int, 0, 1024), Range(int, 1, 4096), Range(int, 1, 1_000_000)

Executor = Annotated[str, O(help="local: cells run on this machine (--jobs, --nproc-per-cell). slurm: every cell "
                                 "is a Slurm job submitted through submitit (teachers before their students as job "
                                 "dependencies, requeued cells resume from their .partial); the probes and the "
                                 "report then run here. See docs/cluster.md.", rich_help_panel=PANEL)]
Partition = Annotated[Optional[str], O(help="Slurm partition of the cells' jobs.", rich_help_panel=PANEL)]
Account = Annotated[Optional[str], O(help="Slurm account to charge.", rich_help_panel=PANEL)]
Qos = Annotated[Optional[str], O(help="Slurm quality of service.", rich_help_panel=PANEL)]
Time = Annotated[Optional[str], O(help="Time limit per cell: minutes or a Slurm time (4:00:00, 1-12:00; default "
                                       "1-00:00). A cell reaching it is requeued and resumes.",
                                  rich_help_panel=PANEL)]
GpusPerCell = Annotated[Optional[int], O(help="GPUs per cell's job (default 0). With --nproc-per-cell K: K.",
                                         callback=ranged(GPUS), rich_help_panel=PANEL)]
CpusPerCell = Annotated[Optional[int], O(help="CPU cores per task of a cell's job (default 1); a CPU cell uses "
                                              "them as its threads.", callback=ranged(CPUS), rich_help_panel=PANEL)]
MemPerCell = Annotated[Optional[str], O(help="Memory per cell's job, e.g. 16G (default: the cluster's).",
                                        rich_help_panel=PANEL)]
ArrayParallelism = Annotated[Optional[int], O(help="At most this many cells of one job array at once.",
                                              callback=ranged(PARALLEL), rich_help_panel=PANEL)]
Constraint = Annotated[Optional[str], O(help="Node features the cells need, e.g. 'a100|h100'.",
                                        rich_help_panel=PANEL)]
Slurm = Annotated[Optional[list[str]], O("--slurm", help="Any other sbatch option, KEY=VALUE (or KEY for a flag), "
                                                         "repeatable: --slurm reservation=paper --slurm exclusive.",
                                         metavar="KEY=VALUE", rich_help_panel=PANEL)]
Detach = Annotated[bool, O(help="Submit the cells and return at once; `kdprobe study status OUT` shows them and "
                                "the same command run again collects them and writes the report.",
                           rich_help_panel=PANEL)]


def flags(partition, account, qos, time, gpus_per_cell, cpus_per_cell, mem_per_cell, array_parallelism,
          constraint) -> dict:
    """The option flags as trainers.study_slurm.slurm_options takes them (None: not given)."""
    return dict(partition=partition, account=account, qos=qos, time=time, gpus_per_cell=gpus_per_cell,
                cpus_per_cell=cpus_per_cell, mem_per_cell=mem_per_cell, array_parallelism=array_parallelism,
                constraint=constraint)
