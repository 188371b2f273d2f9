"""A site's HE ledger: what it contributed to and decrypted in each round, persisted.

It enforces one aggregate per (experiment id, round) at the site, one contribution per
(experiment name, round, global model) under any experiment id, and locks a round after a
forged request (see ``docs/security.md``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from fedhealth.errors import CryptoError
from fedhealth.privacy.he.binding import HERuleError, round_label
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
    models: dict[str, str] = field(default_factory=dict)  # (name, round, model) -> experiment id

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
                self.models = dict(d.get("models", {}))

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
                "models": self.models,
            }
            write_private_file(self.path, json.dumps(data, indent=1, sort_keys=True).encode())

    @staticmethod
    def model_key(experiment: str, round_: int, global_model: str) -> str:
        """Ledger key of one (experiment name, round, global model hash)."""
        return json.dumps([experiment, int(round_), global_model])

    def check_contribution(
        self,
        experiment_id: str,
        round_: int,
        token: str,
        *,
        experiment: str | None = None,
        global_model: str = "",
    ) -> None:
        """Refuse contributing to a round under another (nonce, cohort) token once this site
        decrypted an aggregate of that round (or locked it).

        Before any decryption a new token is accepted and replaces the old one: that is a
        coordinator re-running a round it lost in a crash. The site only ever decrypts sums
        bound to its *current* token, so the superseded ciphertexts can never be decrypted,
        and one decryption per round still holds. After a decryption, a re-run could pair
        two different sums of the same round (a differencing attack), so it is refused.
        Under cohort binding the re-announced cohort may differ from the first: fewer sites
        after a drop-out (``EncryptedAggregation.reannounce``), more after a resume brings a
        crashed site back. Either is safe for the same reason as above: no site decrypts an
        aggregate bound to a superseded token, and a site that decrypted anything of the round
        refuses the re-run, so no re-run cohort holding it completes. What a re-run may not
        do is switch cohort binding on or off (rule ``he-rerun-cohort``).

        Across experiment ids (rule ``he-one-contribution-per-model``): once this site
        contributed to round ``round_`` of experiment ``experiment`` from the global model
        ``global_model``, it refuses to do so again under any other experiment id (another run,
        or the same run re-announced under a new id), whether or not it decrypted: a new run
        from the same model would give the coordinator a second sum of nearly the same updates.
        The re-run above keeps its experiment id, so a resumed run is not affected.
        """
        if global_model:
            name = experiment if experiment is not None else experiment_id.split(":", 1)[0]
            first = self.models.get(self.model_key(name, round_, global_model))
            if first is not None and first != experiment_id:
                raise HERuleError(
                    f"refusing to contribute to {round_label(experiment_id, round_)}: this site "
                    f"already contributed to round {round_} of experiment {name!r} from the same "
                    f"global model under experiment id {first!r}; a second run from the same "
                    "model would let the coordinator difference two sums of nearly the same "
                    "updates. Resume that run (same experiment id) or start from another model "
                    "(another experiment name or seed)",
                    rule="he-one-contribution-per-model",
                )
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
        if (old_cohort is None) != (new_cohort is None):
            binding = "on" if new_cohort is not None else "off"
            raise HERuleError(
                f"refusing to contribute again to {round_label(experiment_id, round_)} with "
                f"cohort binding {binding} (first announced: cohort {old_cohort}): a re-run "
                "round keeps the binding it was first announced with",
                rule="he-rerun-cohort",
            )

    def record_contribution(
        self,
        experiment_id: str,
        round_: int,
        token: str,
        *,
        experiment: str | None = None,
        global_model: str = "",
    ) -> None:
        """Remember the (nonce, cohort, announcement) token a site contributes under (see
        :meth:`check_contribution` for when a new one replaces it) and the global model."""
        self.check_contribution(
            experiment_id, round_, token, experiment=experiment, global_model=global_model
        )
        k = self.key(experiment_id, round_)
        changed = self.contributed.get(k) != token
        self.contributed[k] = token
        if global_model:
            name = experiment if experiment is not None else experiment_id.split(":", 1)[0]
            mk = self.model_key(name, round_, global_model)
            changed = changed or self.models.get(mk) != experiment_id
            self.models[mk] = experiment_id
        if changed:
            self._save()

    def announcement(self, experiment_id: str, round_: int, nonce: str) -> str | None:
        """The announcement digest this site signed for the round under ``nonce``, or
        ``None`` if it did not contribute to it under that nonce."""
        token = self.contributed.get(self.key(experiment_id, round_))
        if token is None:
            return None
        entry = json.loads(token)
        if entry[0] != nonce:
            return None
        return str(entry[2]) if len(entry) > 2 else ""

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
