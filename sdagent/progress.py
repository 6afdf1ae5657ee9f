"""The live progress bar of ``sdagent submit --wait``, fed by the job's status events."""

from __future__ import annotations

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from sdagent.jobs import Status, StatusEvent


class ProgressView:
    """Shows one job's status and step progress on stderr; silent when disabled (``--json``)."""

    def __init__(self, enabled: bool = True) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            transient=True,
            disable=not enabled,
        )
        self._task = self._progress.add_task("queued", total=None)

    def __enter__(self) -> ProgressView:
        self._progress.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._progress.stop()

    def update(self, event: StatusEvent) -> None:
        if event.status is Status.PROGRESS and event.progress is not None:
            self._progress.update(
                self._task, description="generating", completed=event.progress.step, total=event.progress.steps
            )
        else:
            self._progress.update(self._task, description=event.status.value)

    @staticmethod
    def summary(event: StatusEvent) -> str:
        lines = [f"{event.job_id}: {event.status.value}"]
        if event.reason:
            lines.append(f"  reason: {event.reason}: {event.message}")
        lines += [f"  {output.url}" for output in event.outputs]
        if event.timings_ms:
            lines.append("  timings: " + ", ".join(f"{k}={v:.1f}" for k, v in event.timings_ms.items()))
        return "\n".join(lines)
