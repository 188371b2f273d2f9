"""Which sites approved the study: ask them, wait within a bound, sample only those.

A site with manual approval answers an unknown study with the refusal ``study-pending``
(and a decline with ``study-declined``, never why). Before the first round the coordinator
asks every connected site (message ``query.study``: the round config, nothing else; the
site reads no data and spends nothing), reports each pending or declined site once, and
waits up to ``experiment.approval_timeout`` seconds, polling the pending sites, until all
have decided. It then goes on with the approved sites if ``min_sites`` of them hold, else
stops naming the pending ones. At each round start it asks the still-pending sites again,
so a site approved mid-run joins the next round.

:class:`StudyGate` wraps the grid: ``get_node_ids`` lists only approved sites, so the
strategy's sampling, the statistics query, evaluation and an encrypted round's cohort
never include a site that has not approved the study.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from fedhealth.coordinator.exchange import send_and_receive
from fedhealth.errors import FederationError
from fedhealth.protocol import MessageKind, Record, Refusal, SiteKey, StudyKey

#: Longest pause between two polls of the pending sites while waiting (s).
POLL_SECONDS = 5.0
#: Rules of a site that has not (yet) approved the study.
PENDING, DECLINED = "study-pending", "study-declined"


class StudyGate:
    """A grid that lists only the sites that approved the study.

    Parameters
    ----------
    grid : Grid
        The real (or guarded) grid.
    config : callable
        ``round -> ConfigRecord``: the round config the coordinator sends (its spec is
        what the sites hash).
    min_sites : int
        Fewest approved sites the run needs.
    approval_timeout : float
        Seconds to wait for pending sites before the first round.
    reply_timeout : float
        Seconds to wait for the sites' answers to one ask.
    report : callable
        ``(Refusal) -> None``: called once per site and rule when a site is pending,
        declined or does not answer (the run's refusals and live display).
    """

    def __init__(
        self,
        grid: Any,
        config: Callable[[int], ConfigRecord],
        min_sites: int,
        approval_timeout: float,
        reply_timeout: float,
        report: Callable[[Refusal], None],
    ) -> None:
        self._grid = grid
        self._config = config
        self.min_sites = min_sites
        self.approval_timeout = approval_timeout
        self.reply_timeout = reply_timeout
        self._report = report
        self.approved: dict[int, str] = {}  # node id -> site
        self.study: str | None = None  # the hash the sites computed
        self.waiting: dict[int, Refusal] = {}  # node id -> its latest refusal
        self._reported: set[tuple[str, str]] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    # -- asking the sites ----------------------------------------------------------------------

    def ask(self, round_: int, node_ids: Iterable[int]) -> None:
        """Ask ``node_ids`` whether they approved the study; record their answers."""
        ids = [n for n in node_ids if n not in self.approved]
        if not ids:
            return
        msgs = [
            Message(
                RecordDict({Record.CONFIG: self._config(round_)}),
                dst_node_id=n,
                message_type=MessageKind.STUDY,
            )
            for n in ids
        ]
        unanswered = set(ids)
        for reply in send_and_receive(self._grid, msgs, self.reply_timeout):
            node = int(reply.metadata.src_node_id)
            unanswered.discard(node)
            if reply.has_error():
                ref = Refusal.decode(reply.error.reason, node=f"node {node}")
                ref.round = round_
                self.waiting[node] = ref
                self._once(ref)
            else:
                self.approved[node] = str(reply.content[Record.SITE][SiteKey.NAME])
                self.study = str(reply.content[Record.STUDY][StudyKey.HASH])
                self.waiting.pop(node, None)
        for node in unanswered:
            ref = Refusal(f"node {node}", "no-reply", "did not answer the study query", round_)
            self.waiting[node] = ref
            self._once(ref)

    def _once(self, ref: Refusal) -> None:
        if (ref.site, ref.rule) not in self._reported:
            self._reported.add((ref.site, ref.rule))
            self._report(ref)

    def pending(self) -> list[Refusal]:
        """Sites that have neither approved nor declined (pending, or no answer)."""
        return [r for r in self.waiting.values() if r.rule != DECLINED]

    def wait_for_approvals(self, say: Callable[[str], None] | None = None) -> None:
        """Before the first round: ask every site, wait (bounded) for the pending ones.

        Raises
        ------
        FederationError
            Fewer than ``min_sites`` sites approved when the wait ends; the message names
            the pending and declined sites.
        """
        self.ask(0, self._grid.get_node_ids())
        end = time.monotonic() + self.approval_timeout
        if self.pending() and self.approval_timeout > 0 and say is not None:
            names = ", ".join(sorted(r.site for r in self.pending()))
            say(f"waiting up to {self.approval_timeout:g} s for the study's approval at {names}")
        while self.pending() and time.monotonic() < end:
            time.sleep(min(POLL_SECONDS, max(end - time.monotonic(), 0.0)))
            self.ask(0, self._grid.get_node_ids())
        if len(self.approved) < self.min_sites:
            raise FederationError(self._shortfall())

    def _shortfall(self) -> str:
        by_rule: dict[str, list[str]] = {}
        for ref in self.waiting.values():
            by_rule.setdefault(ref.rule, []).append(ref.site)
        parts = [f"{rule}: {', '.join(sorted(sites))}" for rule, sites in sorted(by_rule.items())]
        waited = f" after waiting {self.approval_timeout:g} s" if self.approval_timeout else ""
        return (
            f"only {len(self.approved)} site(s) approved the study{waited} but min_sites is "
            f"{self.min_sites} ({'; '.join(parts) or 'no site answered'}). A site operator "
            "approves with `fedhealth site approve PROFILE STUDY_HASH` (the hash is in the "
            "site's refusal); raise `experiment.approval_timeout` to wait longer"
        )

    def round_start(self, round_: int) -> None:
        """Ask the sites still pending, and any newly connected one, again (no waiting)."""
        ids = [n for n in self._grid.get_node_ids() if n not in self.approved]
        self.ask(round_, [n for n in ids if self.waiting.get(n, None) is None or
                          self.waiting[n].rule != DECLINED])  # fmt: skip

    # -- the grid ------------------------------------------------------------------------------

    def get_node_ids(self) -> Iterable[int]:
        """Connected sites that approved the study: at least ``min_sites`` within
        ``reply_timeout`` (a reconnected site is asked again), else an error."""
        end = time.monotonic() + self.reply_timeout
        while True:
            connected = list(self._grid.get_node_ids())
            ids = [n for n in connected if n in self.approved]
            if len(ids) >= self.min_sites:
                return ids
            if time.monotonic() >= end:
                # Flower's sampler would wait forever for more nodes; say why instead.
                raise FederationError(
                    f"only {len(ids)} connected site(s) approved the study but min_sites is "
                    f"{self.min_sites}; " + self._shortfall()
                )
            self.ask(0, [n for n in connected if n not in self.waiting])
            time.sleep(1.0)
