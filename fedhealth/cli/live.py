"""A live view of a simulated run: a progress bar over rounds and a table of site metrics."""

from __future__ import annotations

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedhealth.coordinator.progress import Event
from fedhealth.protocol import Metric


class LiveRun:
    """Subscriber that renders progress events (use as a context manager)."""

    def __init__(self, console: Console, experiment: str, rounds: int) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn(f"[bold]{experiment}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("rounds"),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=console,
        )
        self.task = self.progress.add_task("starting sites…", total=rounds)
        self.sites: dict[str, dict] = {}
        self.notes: list[str] = []
        self.live = Live(self._render(), console=console, refresh_per_second=8, transient=True)

    def __enter__(self) -> LiveRun:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.update(self._render())
        self.live.__exit__(*exc)

    def _render(self) -> Group:
        table = Table(box=None, pad_edge=False)
        dp = any("epsilon" in m for m in self.sites.values())
        cols = ("site", "train loss", "test accuracy", "test loss", "examples") + (
            ("ε",) if dp else ()
        )
        for col in cols:
            table.add_column(col, justify="right" if col != "site" else "left")
        for site, m in sorted(self.sites.items()):
            gone = "withheld" if m.get(Metric.WITHHELD) else "…"  # the site's policy
            row = [
                site,
                f"{m[Metric.TRAIN_LOSS]:.4f}" if Metric.TRAIN_LOSS in m else gone,
                f"{m[Metric.ACCURACY]:.4f}" if Metric.ACCURACY in m else gone,
                f"{m[Metric.LOSS]:.4f}" if Metric.LOSS in m else gone,
                str(int(m[Metric.NUM_EXAMPLES])) if Metric.NUM_EXAMPLES in m else "",
            ]
            if dp:
                row.append(f"{m[Metric.EPSILON]:.4g}" if Metric.EPSILON in m else "-")
            table.add_row(*row)
        parts = [self.progress, table] + [f"[yellow]{n}[/]" for n in self.notes[-5:]]
        return Group(*parts)

    def __call__(self, event: Event) -> None:
        """Handle one progress event."""
        if event.kind == "round-started":
            self.progress.update(self.task, description=f"round {event.round}: training")
        elif event.kind == "train-done":
            for site, m in event.data["sites"].items():
                row = self.sites.setdefault(site, {})
                if Metric.TRAIN_LOSS in m:
                    row[Metric.TRAIN_LOSS] = m[Metric.TRAIN_LOSS]
                if Metric.WITHHELD in m:
                    row[Metric.WITHHELD] = m[Metric.WITHHELD]
                if Metric.EPSILON in m:  # cumulative ε of the experiment at this site
                    row[Metric.EPSILON] = m[Metric.EPSILON]
            self.progress.update(self.task, description=f"round {event.round}: evaluating")
        elif event.kind == "evaluate-done":
            for site, m in event.data["sites"].items():
                self.sites.setdefault(site, {}).update(m)
            acc = event.data["global_metrics"].get("accuracy", float("nan"))
            self.progress.update(self.task, advance=1, description=f"accuracy {acc:.4f}")
        elif event.kind == "site-refused":
            d = event.data
            self.notes.append(
                f"round {event.round}: site {d['site']} refused ({d['rule']}): {d['message']}"
            )
        elif event.kind == "statistics":
            self.progress.update(self.task, description="consortium statistics done")
        self.live.update(self._render())
