"""A live view of a simulated run: a progress bar over rounds and a table of site metrics.

When the output is not a terminal (CI, nohup, a redirect) a live display would print
nothing until the end, so a long run would look hung: then one plain line per round.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedhealth.coordinator.progress import Event
from fedhealth.protocol import Metric


class LiveRun:
    """Subscriber that renders progress events (use as a context manager)."""

    def __init__(self, console: Console, experiment: str, rounds: int) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn(f"[bold]{escape(experiment)}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("rounds"),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=console,
        )
        self.task = self.progress.add_task("starting sites…", total=rounds)
        self.rounds = rounds
        self.sites: dict[str, dict] = {}
        self.notes: list[str] = []
        self.plain = not console.is_terminal  # one line per round instead of a live display
        self.live = Live(self._render(), console=console, refresh_per_second=8, transient=True)

    def __enter__(self) -> LiveRun:
        if not self.plain:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.plain:
            self.live.update(self._render())
            self.live.__exit__(*exc)

    def _line(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

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
        parts: list[RenderableType] = [self.progress, table]
        parts += [f"[yellow]{escape(n)}[/]" for n in self.notes[-5:]]
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
            g = event.data["global_metrics"]
            acc = g.get("accuracy", float("nan"))
            self.progress.update(self.task, advance=1, description=f"accuracy {acc:.4f}")
            if self.plain:
                self._line(self._round_line(event.round, g))
        elif event.kind == "site-refused":
            d = event.data
            self.notes.append(
                f"round {event.round}: site {d['site']} refused ({d['rule']}): {d['message']}"
            )
            if self.plain:
                self._line(self.notes[-1])
        elif event.kind == "statistics-declined":
            self.progress.update(self.task, description="sites keep their statistics")
        elif event.kind == "statistics":
            self.progress.update(self.task, description="consortium statistics done")
        if not self.plain:
            self.live.update(self._render())

    def _round_line(self, round_: int, g: dict) -> str:
        """``round 3/5: accuracy 0.9123, loss 0.2345, 3 sites (ε 0.61-0.72)``."""
        parts = [f"round {round_}/{self.rounds}:"]
        parts.append(f"accuracy {g['accuracy']:.4f}," if "accuracy" in g else "accuracy -,")
        if "loss" in g:
            parts.append(f"loss {g['loss']:.4f},")
        parts.append(f"{len(self.sites)} sites")
        eps = [m["epsilon"] for m in self.sites.values() if "epsilon" in m]
        if eps:
            parts.append(f"(ε {min(eps):.4g}-{max(eps):.4g})")
        return " ".join(parts)
