"""Submitting an entry script to SLURM (or local processes) through submitit, preemption-safe.

Follows MAE's ``submitit_pretrain.py`` (same options: ``--nodes --ngpus --partition --timeout --job_dir --comment
--use_volta32 --exclude``; one task per GPU, 10 CPUs and 40 GB per GPU, signal 120 s before the end, up to 30
requeues) with its requeue bug fixed: MAE's hook resumes from ``checkpoint.pth``, a file that is never written,
so requeued jobs silently restart from scratch. Here the requeued job gets ``--auto_resume``, which loads the
``checkpoint-last.pth`` the run writes after every epoch and, on SIGUSR2 or SIGTERM, at the next optimizer step
(``engine.preemption.Preemption``).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

from util.args import dump_args, parse_args, positive_int, resolve_accum_iter, run_problems
from util.distributed import env_rank_and_world
from util.runtime import CommandLineError, command_line_error

logger = logging.getLogger("vitfreeze")

SLURM_DEFAULTS: dict[str, Any] = {"nodes": 1, "ngpus": 8, "partition": "", "timeout": 4320, "job_dir": "",
                                  "comment": "", "use_volta32": False, "exclude": ""}
LAUNCH_FLAGS = {"--launcher", *(f"--{name}" for name in SLURM_DEFAULTS)}


def add_launch_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("launch (SLURM via submitit)")
    group.add_argument("--launcher", default="none", choices=["none", "slurm", "local"],
                       help="slurm: submit this command as a SLURM job; local: submitit's local executor")
    group.add_argument("--nodes", default=1, type=positive_int, help="nodes to request")
    group.add_argument("--ngpus", default=8, type=positive_int, help="GPUs (= tasks) per node")
    group.add_argument("--partition", default="", help="SLURM partition")
    group.add_argument("--timeout", default=4320, type=positive_int, help="job duration in minutes")
    group.add_argument("--job_dir", default="", help="submitit logs (default: <output_dir>/submitit)")
    group.add_argument("--comment", default="", help="SLURM comment")
    group.add_argument("--use_volta32", action="store_true", help="request 32 GB V100s (constraint volta32gb)")
    group.add_argument("--exclude", default="", help="nodes to exclude")


def check_launch_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """A SLURM option without ``--launcher slurm|local`` is an error (it would be silently ignored)."""
    if args.launcher == "none":
        given = [f"--{name}" for name, default in SLURM_DEFAULTS.items() if getattr(args, name) != default]
        if given:
            command_line_error(f"{', '.join(given)} only apply with --launcher slurm (or local)")


def planned_world_size(args: argparse.Namespace) -> int:
    """Processes the run will have: ``--nodes x --ngpus`` for a SLURM job about to be submitted (one task for
    ``--launcher local``), else the ``WORLD_SIZE`` that torchrun (or a SLURM task, see ``Task``) put in the
    environment, else 1."""
    if args.launcher != "none":
        return args.nodes * args.ngpus if args.launcher == "slurm" else 1
    env = env_rank_and_world()
    return env[1] if env else 1


def strip_launch_args(argv: Sequence[str]) -> list[str]:
    """``argv`` without the launch options, i.e. the command each task runs."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        flag = token.split("=", 1)[0]
        if flag in LAUNCH_FLAGS:
            skip = "=" not in token and flag != "--use_volta32"
            continue
        out.append(token)
    return out


def resume_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` that continues the run from its own folder: ``--resume PATH`` dropped (it would start over from
    that file), ``--auto_resume`` added."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--resume":
            skip = True
        elif not token.startswith("--resume="):
            out.append(token)
    return out if "--auto_resume" in out else [*out, "--auto_resume"]


def resume_command(script: str, argv: Sequence[str] | None) -> str:
    """The shell command that resumes a run of ``script`` (``argv`` None: this process's own arguments)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", script, *resume_argv(args)])


class Task:
    """What every SLURM task runs: the entry script's ``main`` with the distributed environment set.

    submitit pickles this object; on preemption or time-out it calls :meth:`checkpoint`, which requeues the
    same command with ``--auto_resume``.
    """

    def __init__(self, module: str, argv: list[str]) -> None:
        self.module, self.argv = module, list(argv)

    def __call__(self) -> Any:
        import submitit

        env = submitit.JobEnvironment()
        argv = [a.replace("%j", str(env.job_id)) for a in self.argv]
        if env.num_tasks > 1:  # init_distributed reads these (env://)
            os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks),
                              LOCAL_RANK=str(env.local_rank), MASTER_ADDR=env.hostnames[0],
                              MASTER_PORT=os.environ.get("MASTER_PORT", str(29500 + int(env.job_id) % 20000)))
        return importlib.import_module(self.module).main(argv)

    def checkpoint(self) -> Any:
        import submitit

        argv = resume_argv(self.argv)
        logger.warning("job preempted or timed out: requeued to resume from checkpoint-last.pth")
        return submitit.helpers.DelayedSubmission(Task(self.module, argv))


def submit(module: str, argv: Sequence[str], args: argparse.Namespace) -> Any:
    """Submit ``module.main(argv minus launch options)``; prints the job id and where its logs are."""
    try:
        import submitit
    except ImportError as err:  # pragma: no cover - submitit is a dependency
        raise ImportError("--launcher slurm needs submitit: pip install submitit") from err
    job_dir = Path(args.job_dir or Path(args.output_dir) / "submitit")
    cluster = "local" if args.launcher == "local" else "slurm"
    if cluster == "slurm" and shutil.which("sbatch") is None:  # submitit would end in a traceback
        raise CommandLineError("--launcher slurm: SLURM was not found (no sbatch on PATH); to run on this machine "
                               "use --launcher local, or plain python (CPU / one GPU) or torchrun --nproc_per_node=N "
                               "with the same flags")
    executor = submitit.AutoExecutor(folder=job_dir / "%j", cluster=cluster, slurm_max_num_timeout=30)
    params: dict[str, Any] = {"timeout_min": args.timeout, "tasks_per_node": args.ngpus if cluster == "slurm" else 1,
                              "name": Path(args.output_dir).name or module}
    if cluster == "slurm":
        params.update(gpus_per_node=args.ngpus, nodes=args.nodes, cpus_per_task=10, mem_gb=40 * args.ngpus,
                      slurm_signal_delay_s=120, slurm_partition=args.partition or None)
        extra = {"comment": args.comment or None, "constraint": "volta32gb" if args.use_volta32 else None,
                 "exclude": args.exclude or None}
        params["slurm_additional_parameters"] = {k: v for k, v in extra.items() if v}
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    job = executor.submit(Task(module, strip_launch_args(argv)))
    print(f"submitted job {job.job_id}; logs: {job_dir / str(job.job_id)}")
    return job


def parse_or_dispatch(parser: argparse.ArgumentParser, argv: Sequence[str] | None, module: str, *,
                      models: Sequence[str] = ()) -> tuple[argparse.Namespace, dict | None]:
    """The start of every entry script: parse (recipe + command line), check the launch options, then either
    handle the run here (``--dry_run config`` prints the resolved configuration; ``--launcher`` submits a job) or
    not. A dry run also checks that the data, split file and checkpoints exist and that ``--model`` is one of
    ``models`` (``util.args.run_problems``), and prints on rank 0 only; ``--dry_run`` (the pre-flight,
    ``util.preflight``) then goes on in this process, building everything without training.

    Returns:
        ``(args, result)``: ``result`` is what ``main`` should return at once ({} after ``--dry_run config``, the
        job id after a submission), or None when the run (or the pre-flight) goes on in this process.
    """
    args = parse_args(parser, argv)
    check_launch_args(args, parser)
    world = planned_world_size(args)
    if getattr(args, "world_size", 1) not in (1, world):  # ViTFreeze's commands pass --world_size next to torchrun's count
        print(f"warning: --world_size {args.world_size} ignored: this run has {world} process(es)", file=sys.stderr)
    if hasattr(args, "accum_iter"):  # before anything starts: a recipe's effective batch must fit the job
        try:
            resolve_accum_iter(args, world)
        except ValueError as err:
            command_line_error(str(err))
    problems = run_problems(args, models=models, check_files=args.dry_run)
    if problems:
        command_line_error("; ".join(problems))
    if args.dry_run == "config":
        if (env_rank_and_world() or (0, 1))[0] == 0:  # once per job, not once per rank
            print(dump_args(args), end="")
        return args, {}
    if args.launcher != "none" and not args.dry_run:
        try:
            importlib.import_module("submitit")  # a dependency, but a trimmed environment may lack it
        except ImportError:
            command_line_error(f"--launcher {args.launcher} needs submitit: pip install submitit")
        return args, {"job_id": submit(module, sys.argv[1:] if argv is None else list(argv), args).job_id}
    return args, None
