"""Preemption: stop at the next optimizer step on SIGTERM / SIGUSR2, save the position, exit 128 + signal.

The training loop (``engine.train.train_one_epoch``) polls :meth:`Preemption.requested` once per update and the run
driver (``engine.run.fit``) saves ``checkpoint-last.pth`` with the position inside the epoch before :meth:`exit`.
Under submitit, SIGUSR2 then goes on to submitit's own handler, which requeues the job with ``--auto_resume``
(``util.launch.Task.checkpoint``).
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any, NoReturn, Sequence

from util.launch import resume_command

logger = logging.getLogger("vitfreeze")


class Preemption:
    """Stop at the next optimizer step on SIGTERM or SIGUSR2 instead of dying mid-epoch.

    Schedulers and ``kill`` send SIGTERM (torchrun forwards it to every worker); SLURM sends SIGUSR2 before a
    job's time runs out (``slurm_signal_delay_s``). While active (a context manager), the handler only records the
    signal; the training loop polls :meth:`requested` once per update (the ranks agree through the loop's one
    all-reduce), the script saves ``checkpoint-last.pth`` with the position inside the epoch and calls
    :meth:`exit`, which logs how to resume and exits with status 128 + signal (143 for SIGTERM, 140 for SIGUSR2).
    Under submitit, SIGUSR2 then goes on to submitit's own handler, which requeues the job with ``--auto_resume``
    (``Task.checkpoint``); submitit ignores SIGTERM on purpose, so a SIGTERM handler already installed by it is
    left alone. Outside the main thread (no signals there) nothing is installed.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR2)

    def __init__(self, script: str, argv: Sequence[str] | None) -> None:
        self.script, self.argv = script, argv  # for the resume command
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in self.SIGNALS:
            current = signal.getsignal(signum)
            if signum == signal.SIGTERM and current not in (signal.SIG_DFL, None):
                continue  # submitit's (or the user's) SIGTERM policy
            self._previous[signum] = current
            signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _record(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            logger.warning("received %s: stopping after the current optimizer step", signal.Signals(signum).name)
        self.signum = signum

    def requested(self) -> bool:
        """A stop signal has arrived in this process."""
        return self.signum is not None

    def requested_anywhere(self, device: Any) -> bool:
        """:meth:`requested` on any rank (a collective: every rank calls it, e.g. at the end of an epoch)."""
        import torch

        from util.distributed import all_reduce_mean
        return all_reduce_mean(torch.tensor(float(self.requested()), device=device)).item() > 0

    def exit_if_stopped(self, progress: Any, *, steps_per_epoch: int, saved: Any) -> None:
        """After ``train_one_epoch``: when it stopped early (``progress.stopped``, on every rank together), wait for
        rank 0's checkpoint ``saved`` and :meth:`exit` naming the position inside the epoch."""
        if not progress.stopped:
            return
        from util.distributed import barrier
        barrier()
        self.exit(f"at step {progress.step} (update {progress.update} of {steps_per_epoch} in epoch {progress.epoch}); "
                  f"saved {saved}")

    def exit(self, where: str) -> NoReturn:
        """Log where the run stopped and how to resume it, hand SIGUSR2 to submitit, then exit 128 + signal."""
        signum = self.signum or signal.SIGTERM
        name = signal.Signals(signum).name
        logger.warning("stopped by %s %s. Resume with: %s", name, where, resume_command(self.script, self.argv))
        previous = self._previous.get(signum)
        self.__exit__()
        if callable(previous):  # submitit: checkpoint (requeue with --auto_resume) and exit
            previous(signum, None)
        raise SystemExit(128 + signum)
