"""The live view of a run prints one plain line per round when output is not a terminal."""

from __future__ import annotations

import io

from rich.console import Console

from fedhealth.cli.live import LiveRun
from fedhealth.coordinator.progress import Event


def feed(live: LiveRun) -> None:
    sites = {"h1": {"train-loss": 0.5, "epsilon": 0.25}, "h2": {"train-loss": 0.6, "epsilon": 0.3}}
    for r in (1, 2):
        live(Event("round-started", r))
        live(Event("train-done", r, {"sites": sites}))
        if r == 2:
            message = "site 'h2' has no [keys] table in its profile"
            live(Event("site-refused", r, {"site": "h2", "rule": "he-keys", "message": message}))
        metrics = {"accuracy": 0.5 + r / 10, "loss": 1.0 / r}
        live(Event("evaluate-done", r, {"sites": {"h1": metrics}, "global_metrics": metrics}))


def test_one_plain_line_per_round_when_not_a_terminal():
    out = io.StringIO()
    console = Console(file=out, width=100)
    assert not console.is_terminal
    with LiveRun(console, "study", rounds=2) as live:
        feed(live)
        assert "round 1/2: accuracy 0.6000, loss 1.0000, 2 sites (ε 0.25-0.3)" in out.getvalue()
    lines = out.getvalue().splitlines()
    assert lines == [
        "round 1/2: accuracy 0.6000, loss 1.0000, 2 sites (ε 0.25-0.3)",
        "round 2: site h2 refused (he-keys): site 'h2' has no [keys] table in its profile",
        "round 2/2: accuracy 0.7000, loss 0.5000, 2 sites (ε 0.25-0.3)",
    ]


def test_a_terminal_gets_the_live_display_not_the_lines():
    out = io.StringIO()
    console = Console(file=out, width=100, force_terminal=True)
    with LiveRun(console, "study", rounds=2) as live:
        feed(live)
    assert "round 1/2: accuracy" not in out.getvalue()
