"""A site's HE ledger: what it contributed to and decrypted in each round, persisted.

It enforces one aggregate per (experiment, round) at the site and locks a round after a
forged request (see ``docs/security.md``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from fedhealth.errors import CryptoError
from fedhealth.privacy.he.binding import round_label
from fedhealth.privacy.he.keys import write_private_file

__all__ = ["SiteLedger"]


@dataclass
class SiteLedger:
    """A site's memory, per (experiment, round), of what it contributed and decrypted.

    Parameters
    ----------
    path
        JSON file (written ``0600``) to persist across restarts; ``None`` keeps it in memory.
    """

    path: Path | None = None
    contributed: dict[str, str] = field(default_factory=dict)
    decrypted: dict[str, str] = field(default_factory=dict)
    locked: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.path is not None:
            self.path = Path(self.path)
            if self.path.is_file():
                try:
                    d = json.loads(self.path.read_text())
                except (OSError, json.JSONDecodeError) as exc:
                    raise CryptoError(
                        f"HE ledger {self.path} is unreadable ({exc}); restore it from backup - "
                        "deleting it would let the coordinator ask for a second decryption"
                    ) from exc
                self.contributed = dict(d.get("contributed", {}))
                self.decrypted = dict(d.get("decrypted", {}))
                self.locked = dict(d.get("locked", {}))

    @staticmethod
    def key(experiment_id: str, round_: int) -> str:
        """Ledger key of one round."""
        return json.dumps([experiment_id, int(round_)])

    def _save(self) -> None:
        if self.path is not None:
            data = {
                "contributed": self.contributed,
                "decrypted": self.decrypted,
                "locked": self.locked,
            }
            write_private_file(self.path, json.dumps(data, indent=1, sort_keys=True).encode())

    def check_contribution(self, experiment_id: str, round_: int, token: str) -> None:
        """Refuse contributing to a round under another (nonce, cohort) token once this site
        decrypted an aggregate of that round (or locked it).

        Before any decryption a new token is accepted and replaces the old one: that is a
        coordinator re-running a round it lost in a crash. The site only ever decrypts sums
        bound to its *current* token, so the superseded ciphertexts can never be decrypted,
        and one decryption per round still holds. After a decryption, a re-run could pair
        two different sums of the same round (a differencing attack), so it is refused.
        Under cohort binding the new cohort must also keep every site of the old one: the
        sites that decrypted the old sum are among them and refuse, so no re-run cohort
        that could be differenced against the old sum can ever be completed.
        """
        k = self.key(experiment_id, round_)
        prev = self.contributed.get(k)
        if prev is None or prev == token:
            return
        if k in self.decrypted or k in self.locked:
            raise CryptoError(
                f"refusing to contribute again to {round_label(experiment_id, round_)} under a "
                "different nonce or cohort: this site already decrypted (or refused) an "
                "aggregate of that round, and one aggregate per round blocks differencing "
                "attacks; the round cannot be re-run - start a new run"
            )
        old_cohort, new_cohort = json.loads(prev)[1], json.loads(token)[1]
        if old_cohort is not None and not set(old_cohort) <= set(new_cohort or ()):
            dropped = sorted(set(old_cohort) - set(new_cohort or ()))
            raise CryptoError(
                f"refusing to contribute again to {round_label(experiment_id, round_)} under a "
                f"cohort without {dropped}: a re-run round keeps every site of its first "
                "cohort (cohort binding blocks differencing attacks); restart those sites or "
                "start a new run"
            )

    def record_contribution(self, experiment_id: str, round_: int, token: str) -> None:
        """Remember the (nonce, cohort) token a site contributes under (see
        :meth:`check_contribution` for when a new one replaces it)."""
        self.check_contribution(experiment_id, round_, token)
        k = self.key(experiment_id, round_)
        if self.contributed.get(k) != token:
            self.contributed[k] = token
            self._save()

    def check_decryption(self, experiment_id: str, round_: int, fingerprint: str) -> None:
        """Refuse a request if the round is locked or another request was answered."""
        k = self.key(experiment_id, round_)
        if k in self.locked:
            raise CryptoError(
                f"refusing to decrypt for {round_label(experiment_id, round_)}: this site "
                f"refused a forged aggregate in that round ({self.locked[k]}) and answers "
                "nothing more for it; start a new round"
            )
        prev = self.decrypted.get(k)
        if prev is not None and prev != fingerprint:
            raise CryptoError(
                "refusing a second, different decryption request for "
                f"{round_label(experiment_id, round_)}: "
                "this site already decrypted another aggregate in that round (one aggregate per "
                "round blocks differencing attacks); start a new round"
            )

    def record_decryption(self, experiment_id: str, round_: int, fingerprint: str) -> None:
        """Remember the request answered for a round."""
        self.decrypted[self.key(experiment_id, round_)] = fingerprint
        self._save()

    def lock(self, experiment_id: str, round_: int, reason: str) -> None:
        """Refuse everything further for a round."""
        self.locked[self.key(experiment_id, round_)] = reason
        self._save()
