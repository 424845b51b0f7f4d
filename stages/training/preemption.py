"""Stop a training run cleanly on SIGTERM or SIGINT: finish the step, checkpoint, exit ``128 + signal``.

Why: whoever stops a job asks before it kills. Slurm (scancel, preemption, the time limit),
Kubernetes (pod deletion, node drain), torchrun and forge's own orchestrator (``flows/launch.py``
passes on what it receives) send SIGTERM, then SIGKILL some seconds later (30 s by default:
Slurm's KillWait, Kubernetes' terminationGracePeriodSeconds, torchrun's shutdown timeout).
Python's default is to die at once and lose every step since the last periodic checkpoint; with
this handler the step in progress completes, a checkpoint is written, and running the stage again
resumes at exactly that step, bit for bit like any resume.

The handler only records the signal. After every step all ranks call ``StopSignals.agreed``: an
all-reduce (MAX) of the signal number, so every rank stops after the same step even when the
signal reaches them at different moments (the save is collective: a rank stopping alone would
leave the others waiting in it). On one process it is free; on gloo it is one tiny all-reduce per
step. No training numerics change. From the agreed stop to the exit, further SIGTERM/SIGINT are
ignored (torchrun SIGTERMs the ranks still exiting once one has ended); SIGKILL still ends a worker
that hangs.

Exit status ``128 + signal`` (143 for SIGTERM, 130 for SIGINT), the shell's convention, tells a
clean stop (checkpoint written) from a crash (1) or a kill (-9 in Python, 137 in a shell); under
torchrun the rank exits so and torchrun itself reports 1. A signal during start-up stops the run
after its first step; one during the final held-out evaluation is ignored (the run finishes).
"""
from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """The run stopped on a signal after a checkpoint; ``exit_code`` is what the worker returns."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        self.signum, self.step, self.exit_code = signum, step, 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}: saved "
                         f"{checkpoint}; run the stage again to resume from it (exit {self.exit_code})")


class StopSignals:
    """Record SIGTERM/SIGINT while installed (main thread only), ask every rank once per step."""

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict[int, object] = {}

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:  # nohup and friends: left ignored
                    self._previous[s] = signal.signal(s, self._record)
        return self

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _record(self, signum: int, frame) -> None:
        self.received = self.received or signum

    def agreed(self, device: str = "cpu") -> int:
        """The signal any rank received so far (0 if none); collective when a group is running."""
        import torch
        import torch.distributed as dist
        signum = self.received
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([signum], dtype=torch.int64, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        if signum:  # stopping: from here to the exit nothing may cut the save short (torchrun
            for s in self._previous:  # SIGTERMs ranks still exiting once one has ended, and
                signal.signal(s, signal.SIG_IGN)  # Python drops its handlers at exit): ignored
            self._previous.clear()
        return signum
