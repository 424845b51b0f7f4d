"""Which stages of a run start next: the ready set under the cluster's limits (pure Python).

The flow (``flows/pipeline.py``) asks ``next_to_start`` each time a stage ends and starts what it
returns as Prefect task runs side by side; this module only decides, so a unit test pins every
decision without Prefect or a worker.

- Ready: a stage whose parents in this run are all done. A parent outside the run is complete
  already (the plan brings every unfinished ancestor along), so it is never waited for.
- Limits (``ParallelSpec``, settings that never change a key): at most ``max_parallel_stages``
  run at once, and together they take at most ``device_budget`` devices. A stage takes its
  layout's world size if it trains (torchrun kinds), else 1; a cached stage (a check of its
  artifact.json) takes none. A stage larger than the whole budget starts alone, when nothing else
  runs, rather than never.
- Order: ready stages start in plan order (the DAG's topological order, the order a serial run
  takes). A ready stage that waits for devices keeps its place: nothing after it starts before
  it, so evaluations never starve the next training stage of its devices.
- Failure: after a stage fails, nothing new starts (``halted``); the stages already running
  finish (each is independent of the failure and its result stays valid and cached), then the
  run reports the first failure. Descendants of the failed stage are "not run" because of it,
  the rest because the run stopped starting new work (``why_not_run``).
- Signals: a SIGINT/SIGTERM to forge also halts the schedule; the running workers checkpoint and
  exit (``flows/launch.forward_stop_signals``), and ``forge resume`` continues every one of them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The stages of one run and what each needs: ``order`` (plan order), each stage's parents
    inside the run, its devices; the limits."""
    order: tuple[str, ...]
    parents: Mapping[str, tuple[str, ...]]
    devices: Mapping[str, int]
    max_stages: int = 1
    device_budget: int | None = None   # None: no limit on devices

    def __post_init__(self) -> None:
        if self.max_stages < 1:
            raise ValueError(f"max_stages must be >= 1, got {self.max_stages}")
        if self.device_budget is not None and self.device_budget < 1:
            raise ValueError(f"device_budget must be >= 1 or None, got {self.device_budget}")


def ready(schedule: Schedule, done: Iterable[str], started: Iterable[str]) -> list[str]:
    """Stages not started yet whose parents in the run are all done, in plan order."""
    done, started = set(done), set(started)
    return [n for n in schedule.order if n not in started
            and all(p in done for p in schedule.parents.get(n, ()))]


def next_to_start(schedule: Schedule, done: Iterable[str], running: Iterable[str],
                  finished: Iterable[str] = (), halted: bool = False) -> list[str]:
    """The stages to start now, given those ``done`` (successfully), ``running`` and otherwise
    ``finished`` (failed or stopped). None once the run is ``halted`` (a failure or a signal)."""
    if halted:
        return []
    done, running = set(done), list(running)
    started = done | set(running) | set(finished)
    slots = schedule.max_stages - len(running)
    in_use = sum(schedule.devices.get(n, 0) for n in running)
    budget = schedule.device_budget
    chosen: list[str] = []
    for name in ready(schedule, done, started):
        if slots <= 0:
            break
        need = schedule.devices.get(name, 0)
        if budget is not None and need and in_use + need > budget and (running or chosen):
            break   # waits for devices, and keeps its place in the order (alone, it may exceed)
        chosen.append(name)
        slots -= 1
        in_use += need
    return chosen


def why_not_run(schedule: Schedule, name: str, failed: str) -> str:
    """Why ``name`` was not started after ``failed`` failed."""
    if name in descendants_of(schedule, failed, inclusive=False):
        return f"upstream stage {failed} failed"
    return f"stage {failed} failed; after a failure the run starts no new stage"


def descendants_of(schedule: Schedule, name: str, inclusive: bool = True) -> set[str]:
    """``name`` and every stage of the run that depends on it, directly or not."""
    found = {name}
    for n in schedule.order:   # topological: parents come first
        if any(p in found for p in schedule.parents.get(n, ())):
            found.add(n)
    return found if inclusive else found - {name}


def stage_devices(step: Any, cluster: Any) -> int:
    """The devices a planned step takes while it runs: its layout's world size for a training
    (torchrun) kind, 1 for any other, 0 for a cached step (only its artifact.json is read)."""
    if step.action == "cached":
        return 0
    node = step.node
    if node.kind_cls.launcher != "torchrun":
        return 1
    return node.kind_cls.layout(node.config, cluster).world_size


def schedule_for(steps: Sequence[Any], cluster: Any) -> Schedule:
    """The schedule of a plan's steps (``flows/plan.Step``; those to skip are left out) on
    ``cluster`` (its ``max_parallel_stages`` and ``device_budget``)."""
    todo = [s for s in steps if s.action != "skip"]
    names = {s.name for s in todo}
    return Schedule(order=tuple(s.name for s in todo),
                    parents={s.name: tuple(p for p in s.node.parents if p in names) for s in todo},
                    devices={s.name: stage_devices(s, cluster) for s in todo},
                    max_stages=cluster.max_parallel_stages, device_budget=cluster.device_budget)
