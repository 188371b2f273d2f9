"""Coordinator side: the streaming sum of signed encrypted contributions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fedhealth.errors import CryptoError
from fedhealth.privacy.he.binding import check_round_ids, round_label
from fedhealth.privacy.he.records import (
    Contribution,
    DecryptionRequest,
    check_round,
    chunks_digest,
    verify_signed,
)

if TYPE_CHECKING:
    from fedhealth.privacy.he.ceremony import Registry
    from fedhealth.privacy.he.ckks import CKKSContext

__all__ = ["EncryptedSum"]


class EncryptedSum:
    """Coordinator-side running sum of signed encrypted contributions.

    Memory: one running sum (``n_chunks`` full ciphertexts) plus the reply being added.

    Parameters
    ----------
    public_ctx
        The coordinator's key-less context.
    experiment_id, round, nonce
        The round binding this sum accepts.
    registry
        The consortium registry (site names and signing keys).
    """

    def __init__(
        self,
        public_ctx: CKKSContext,
        experiment_id: str,
        round: int,
        nonce: str,
        registry: Registry,
    ) -> None:
        check_round_ids(experiment_id, round, nonce)
        self.ctx = public_ctx
        self.experiment_id = experiment_id
        self.round = round
        self.nonce = nonce
        self.registry = registry
        self._acc: list[Any] | None = None
        self._contributions: list[Contribution] = []

    @property
    def sites(self) -> list[str]:
        """Sites whose contributions are in the sum, in order of arrival."""
        return [c.site for c in self._contributions]

    def add(self, chunks: Sequence[bytes], contribution: Contribution) -> None:
        """Verify one site's reply and add it to the running sum.

        Raises
        ------
        CryptoError
            Unknown site, unsigned or wrongly signed, replayed (other experiment, round or
            nonce), duplicate site, tampered chunks (digest mismatch), inconsistent shape, or
            chunks that are not valid fresh ciphertexts. The running sum is unchanged.
        """
        c = contribution
        who = f"contribution of site {c.site!r} ({round_label(self.experiment_id, self.round)})"
        verify_signed(c, self.registry, who)
        check_round(c, self.experiment_id, self.round, self.nonce, who)
        if len(self._contributions) >= self.ctx.params.max_sites:
            raise CryptoError(
                f"{who}: the sum already holds max_sites={self.ctx.params.max_sites} "
                "contributions; one more could wrap around the CKKS modulus"
            )
        if c.site in self.sites:
            raise CryptoError(
                f"{who} is a duplicate: this site's contribution is already in the sum"
            )
        if len(chunks) != c.n_chunks:
            raise CryptoError(
                f"{who} declares {c.n_chunks} chunks but {len(chunks)} arrived; resend"
            )
        if chunks_digest(chunks) != c.digest:
            raise CryptoError(
                f"{who}: the chunks do not match the signed digest (altered or corrupted in "
                "transit); ask the site to resend"
            )
        if self._contributions:
            first = self._contributions[0]
            if (c.n_chunks, c.n_values) != (first.n_chunks, first.n_values):
                raise CryptoError(
                    f"{who} has {c.n_values} values in {c.n_chunks} chunks, but site "
                    f"{first.site!r} sent {first.n_values} in {first.n_chunks}; the sites run "
                    "different models"
                )
            if c.cohort != first.cohort:
                raise CryptoError(f"{who} was made for cohort {c.cohort}, not {first.cohort}")
        if self._acc is None:
            self._acc = [self.ctx.load(b, what=f"{who}, chunk {i}") for i, b in enumerate(chunks)]
        else:
            done = 0
            try:
                for i, b in enumerate(chunks):
                    self.ctx.add_inplace(self._acc[i], self.ctx.load(b, what=f"{who}, chunk {i}"))
                    done = i + 1
            except BaseException:
                # Roll back (exact in Z_q) by re-loading what was added: the running sum stays
                # as it was, and no more than one reply's ciphertexts are ever held.
                for i in range(done):
                    self.ctx.sub_inplace(self._acc[i], self.ctx.load(chunks[i]))
                raise
        self._contributions.append(c)

    def decryption_request(self) -> DecryptionRequest:
        """Serialize the running sum with the contributions it claims.

        Raises
        ------
        CryptoError
            Nothing was added, or a bound cohort is incomplete.
        """
        if self._acc is None:
            raise CryptoError(
                f"no contribution was added for {round_label(self.experiment_id, self.round)}; "
                "nothing to decrypt"
            )
        cohort = self._contributions[0].cohort
        if cohort is not None and set(cohort) != set(self.sites):
            missing = sorted(set(cohort) - set(self.sites))
            raise CryptoError(
                f"cohort of {round_label(self.experiment_id, self.round)} is incomplete (missing "
                f"{missing}); sites will refuse a partial sum - restart as a new round"
            )
        return DecryptionRequest(
            self.experiment_id,
            self.round,
            self.nonce,
            list(self._contributions),
            [self.ctx.dump(ct) for ct in self._acc],
        )
