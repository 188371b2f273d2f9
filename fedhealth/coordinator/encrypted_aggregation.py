"""The coordinator's side of encrypted aggregation: sum ciphertexts, get only the aggregate.

One encrypted round, as :class:`~fedhealth.coordinator.federation.Federation` drives it:

1. :meth:`EncryptedAggregation.announce` adds the round binding (run-unique experiment id,
   round, a fresh nonce from ``secrets``, the public weight scale) to the training config;
2. :meth:`~EncryptedAggregation.receive` pulls the sites' replies one at a time and adds each
   contribution to one running :class:`~fedhealth.privacy.he.encrypted_sum.EncryptedSum`
   as it arrives, then drops its ciphertexts: memory is one running sum plus one reply. A
   contribution that fails a check (unsigned, wrongly signed, another round or experiment,
   tampered, duplicated, not a valid ciphertext, plaintext weights) becomes a refusal of that
   site and the round goes on while ``min_sites`` contributions hold;
3. :meth:`~EncryptedAggregation.aggregate` sends the sum with the signed contributions it
   claims to ``quorum`` of the contributing sites (``query.decrypt``); each checks it and
   decrypts ``[sum_i w_i u_i, sum_i w_i]``; the answers must agree. It returns ONE reply
   carrying ``global + sum_i w_i u_i / sum_i w_i`` with the total weight, so every
   weighted-mean strategy (FedAvg, FedProx, FedAdam/Yogi/Adagrad, FedAvgM, BalancedFedAvg)
   aggregates it unchanged and server optimisers apply to the aggregate.

The coordinator loads only ``coordinator/he-public.ctx`` (a context without any key, refused
if it holds a secret key) and the registry. Costs go to MLflow per round under ``he/``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import secrets
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    MetricRecordValues,
    RecordDict,
)
from flwr.serverapp import Grid
from mlflow.entities import Param

from fedhealth.config.experiment import ExperimentConfig
from fedhealth.coordinator.exchange import FIRST_POLL, MAX_POLL, pull, push, send_and_receive
from fedhealth.errors import ConfigError, CryptoError, FederationError
from fedhealth.privacy.he.answers import answers_agree, split_aggregate
from fedhealth.privacy.he.binding import Announcement, model_hash
from fedhealth.privacy.he.ceremony import CoordinatorKeys, load_coordinator_keys
from fedhealth.privacy.he.ckks import FlatSpec, HEParams, flatten_state, unflatten
from fedhealth.privacy.he.encrypted_sum import EncryptedSum
from fedhealth.privacy.he.wire import read_contribution, request_record
from fedhealth.protocol import (
    ConfigKey,
    HEKey,
    HERound,
    MessageKind,
    Metric,
    Record,
    Refusal,
    SiteKey,
)
from fedhealth.registry.recorder import RunRecorder

#: Error code of a contribution the coordinator refused (a site's own refusal is 4100).
CONTRIBUTION_REFUSED_CODE = 4200

Split = Callable[[int, Iterable[Message]], list[Message]]

__all__ = ["CONTRIBUTION_REFUSED_CODE", "EncryptedAggregation", "describe_params"]


def describe_params(params: HEParams, quorum: int, weight_scale: float) -> str:
    """One line naming the HE parameters (model version tag, model card)."""
    primes = ",".join(str(b) for b in params.coeff_mod_bit_sizes)
    return (
        f"CKKS N={params.poly_modulus_degree} primes=[{primes}] scale=2^"
        f"{params.global_scale_bits} {'symmetric' if params.symmetric else 'public-key'} "
        f"hidden_tags={params.hidden_tags} quorum={quorum} weight_scale={weight_scale:g}"
    )


def _site(msg: Message) -> str:
    return str(msg.content[Record.SITE][SiteKey.NAME])


#: Longest poll interval of the decryption exchange: a site answers it in milliseconds
#: once its process runs.
DECRYPT_POLL_SECONDS = 0.05


def _exchange(grid: Grid, msgs: list[Message], timeout: float) -> list[Message]:
    """Send the decryption requests and collect the answers."""
    return send_and_receive(grid, msgs, timeout, max_poll=DECRYPT_POLL_SECONDS)


def _answer(round_: int, msg: Message) -> np.ndarray:
    """The decrypted aggregate in a site's answer; FederationError if it carries none."""
    try:
        answer = cast(ArrayRecord, msg.content[Record.HE_ANSWER])[HEKey.ANSWER_ARRAY]
        return np.asarray(answer.numpy(), dtype=np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise FederationError(
            f"round {round_}: site {_site(msg)!r} answered the decryption request without a "
            f"decrypted aggregate ({exc!r}); it runs another fedhealth version. The round is "
            "stopped; nothing was aggregated"
        ) from None


def _refused(reply: Message, site: str, rule: str, exc: Exception) -> Message:
    """An error reply standing for a contribution the coordinator refused."""
    reason = Refusal(site=site, rule=rule, message=str(exc)).encode()
    return Message(  # type: ignore[call-overload]  # Flower's overloads omit `metadata`
        error=Error(code=CONTRIBUTION_REFUSED_CODE, reason=reason),
        metadata=copy.deepcopy(reply.metadata),
    )


class EncryptedAggregation:
    """Encrypted aggregation for one run of an experiment.

    Parameters
    ----------
    cfg
        The experiment (``[privacy.he]`` enabled).
    weight_key
        The reply metric the strategy weights by (its ``weighted_by_key``).
    recorder
        The run's MLflow recorder (HE parameters and per-round costs are logged to it).
    split
        The federation's reply splitter: reports error replies as refusals, returns the
        others sorted by site.
    keys
        The coordinator's key-less context and registry (default: loaded from
        ``privacy.he.keys_dir``).

    Raises
    ------
    ConfigError, CryptoError
        Missing coordinator files, or a context that holds a secret key.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        weight_key: str,
        recorder: RunRecorder,
        split: Split,
        keys: CoordinatorKeys | None = None,
    ) -> None:
        he = cfg.privacy.he
        if not he.enabled or he.keys_dir is None:
            raise ConfigError(f"experiment {cfg.name!r}: privacy.he is not enabled")
        self.cfg = cfg
        self.he = he
        self.weight_key = weight_key
        self.recorder = recorder
        self.split = split
        self.keys = keys or load_coordinator_keys(he.keys_dir)
        self.params = self.keys.registry.params.validate()
        self.experiment_id: str | None = None
        self.round: HERound | None = None
        self._sum: EncryptedSum | None = None
        self._spec: FlatSpec | None = None
        self._names: list[str] = []
        self._nodes: dict[str, int] = {}
        self._costs: dict[str, Any] = {}
        self._site_of_node: dict[int, str] = {}  # for cohort binding
        self._spec_digest = cfg.task_spec().digest()  # what every site signs, with the round
        self._model_hash = ""
        # Bookkeeping that survives a coordinator restart (state_dict): which sites'
        # contributions each aggregated round summed, and which sites decrypted it.
        self.history: dict[int, dict[str, list[str]]] = {}
        self.attempt = 1  # 1 + the number of times this run was resumed

    @classmethod
    def for_experiment(
        cls, cfg: ExperimentConfig, strategy: Any, recorder: RunRecorder, split: Split
    ) -> EncryptedAggregation | None:
        """The run's encrypted aggregation, or ``None`` if ``privacy.he`` is off."""
        if not cfg.privacy.he.enabled:
            return None
        return cls(cfg, getattr(strategy, "weighted_by_key", Metric.NUM_EXAMPLES), recorder, split)

    # -- reporting ---------------------------------------------------------------------------

    def describe(self) -> str:
        """The HE parameters in one line."""
        return describe_params(self.params, self.he.quorum, self.he.weight_scale)

    def provenance(self) -> dict[str, Any]:
        """Provenance entries of the registered model version (tags and model card)."""
        return {
            "he": "on",
            "he_params": self.describe(),
            "he_consortium": self.keys.registry.consortium_id,
            "he_experiment_id": str(self.experiment_id),
            "he_rounds": {str(r): dict(h) for r, h in sorted(self.history.items())},
        }

    def state_dict(self) -> dict[str, Any]:
        """The run's HE bookkeeping, saved with every round checkpoint.

        ``experiment_id`` is the binding every contribution and decryption of the run is
        signed under; a resumed run keeps it, so the sites' ledgers keep refusing a second
        decryption of any round they already decrypted.
        """
        return {
            "experiment_id": self.experiment_id,
            "attempt": self.attempt,
            "history": {str(r): dict(h) for r, h in self.history.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a run after a coordinator restart (:meth:`state_dict`)."""
        self.experiment_id = state.get("experiment_id") or None
        self.attempt = int(state.get("attempt", 1)) + 1
        self.history = {int(r): dict(h) for r, h in state.get("history", {}).items()}

    def restore_binding(self) -> None:
        """On a resume without any checkpoint: take the experiment id the crashed attempt
        logged to MLflow (``he.experiment_id``), so its interrupted first round is re-run
        under the same binding (sites refuse a new id for the same round and global model)."""
        run_id = self.recorder.run_id
        if self.experiment_id is not None or run_id is None:
            return
        run = self.recorder.client.get_run(run_id)
        logged = run.data.params.get("he.experiment_id")
        if logged and logged != "None":
            self.experiment_id = logged

    def _log_setup(self) -> None:
        run_id = self.recorder.run_id
        if run_id is None:
            return
        params = {f"he.{k}": str(v) for k, v in self.params.to_dict().items()}
        params["he.consortium_id"] = self.keys.registry.consortium_id
        params["he.experiment_id"] = str(self.experiment_id)
        self.recorder.client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
        self.recorder.client.set_tag(run_id, "fedhealth.he", self.describe())

    # -- the round ---------------------------------------------------------------------------

    def announce(self, round_: int, arrays: ArrayRecord, config: ConfigRecord) -> None:
        """Start round ``round_``: fresh nonce and running sum; add the binding to ``config``."""
        if self.experiment_id is None:
            # Unique per run; a resumed run restores it from its checkpoint. A round the
            # crash interrupted is re-run under a fresh nonce, which a site accepts only if
            # it released no decryption for that round (SiteLedger.check_contribution).
            run = self.recorder.run_id or "no-run"
            self.experiment_id = f"{self.cfg.name}:{run}:{secrets.token_hex(4)}"
            self._log_setup()
        self.round = HERound(
            experiment_id=self.experiment_id,
            round=round_,
            nonce=secrets.token_hex(16),
            weight_scale=self.he.weight_scale,
            weight_key=self.weight_key,
            min_sites=self.cfg.experiment.min_sites,
        )
        for key, value in self.round.to_config().items():
            config[key] = value
        self._names = sorted(arrays)
        glob = {k: arrays[k].numpy() for k in self._names}
        _, self._spec = flatten_state(glob)
        self._model_hash = model_hash(glob)
        self._sum = EncryptedSum(
            self.keys.public_context,
            self.experiment_id,
            round_,
            self.round.nonce,
            self.keys.registry,
        )
        self._nodes = {}
        self._costs = {"bytes": {}, "add": 0.0, "refused": 0}

    def announcement(self) -> Announcement:
        """What every site of the current round is shown (their signed announcement)."""
        assert self.round is not None, "announce() first"
        return Announcement(
            spec_digest=self._spec_digest,
            model_hash=self._model_hash,
            weight_scale=self.round.weight_scale,
            weight_key=self.round.weight_key,
            min_sites=self.round.min_sites,
            cohort=self.round.cohort,
        )

    def reannounce(
        self, round_: int, arrays: ArrayRecord, msgs: list[Message]
    ) -> list[Message] | None:
        """After a drop-out in a cohort-bound round: the training messages of a re-run.

        A cohort-bound sum is decrypted only when every site of the cohort contributed. If
        some did not (a site dropped out, or its contribution was refused) but at least
        ``min_sites`` did, the round is announced again with those sites as the cohort and a
        fresh nonce, and they train and contribute again; a site accepts that only before it
        decrypted anything of the round, and only for a cohort with fewer sites
        (``SiteLedger.check_contribution``).

        Returns
        -------
        list of Message or None
            The messages to send again (to the contributing sites), or ``None`` when nothing
            is to be re-run (no cohort binding, a complete cohort, or too few contributions).
        """
        if self.round is None or self.round.cohort is None or self._sum is None:
            return None
        done = set(self._sum.sites)
        if done == set(self.round.cohort) or len(done) < self.cfg.experiment.min_sites:
            return None
        nodes = {self._nodes[s] for s in done}
        again = [m for m in msgs if m.metadata.dst_node_id in nodes]
        if not again:
            return None
        config = ConfigRecord(dict(cast(ConfigRecord, again[0].content[Record.CONFIG])))
        refused = self._costs.get("refused", 0)
        self.announce(round_, arrays, config)
        self._costs["refused"] = refused
        out = []
        for m in again:
            content = RecordDict({k: v for k, v in m.content.items() if k != Record.CONFIG})
            content[Record.CONFIG] = ConfigRecord(dict(config))
            out.append(
                Message(
                    content,
                    dst_node_id=m.metadata.dst_node_id,
                    message_type=m.metadata.message_type,
                )
            )
        return out

    def receive(
        self, grid: Grid, round_: int, msgs: Iterable[Message], timeout: float
    ) -> Iterator[Message]:
        """Send the round's training messages and yield the replies as they arrive.

        Each contribution is added to the running sum when it is pulled, and the reply is
        yielded without its ciphertexts; a refused contribution is yielded as an error
        reply naming the site and the check (rule ``he-contribution``).
        """
        msgs = list(msgs)
        if self.he.bind_cohort and msgs:
            self._bind_cohort(grid, round_, msgs)
        pending = push(grid, msgs)
        end = time.time() + timeout
        pause = FIRST_POLL
        while pending and time.time() < end:
            arrived = False
            for mid in list(pending):
                for reply in pull(grid, [mid]):
                    pending.remove(mid)
                    arrived = True
                    yield self._take(round_, reply)
            if pending:  # poll soon after a reply, back off while sites train
                pause = FIRST_POLL if arrived else min(pause * 2, MAX_POLL)
                time.sleep(min(pause, max(end - time.time(), 0.0)))

    def _bind_cohort(self, grid: Grid, round_: int, msgs: list[Message]) -> None:
        """Announce the names of the sampled sites in the round's (shared) config."""
        nodes = [m.metadata.dst_node_id for m in msgs]
        unknown = [n for n in nodes if n not in self._site_of_node]
        if unknown:
            asks = [
                Message(RecordDict(), dst_node_id=n, message_type=MessageKind.IDENTIFY)
                for n in unknown
            ]
            for reply in _exchange(grid, asks, self.cfg.experiment.round_timeout):
                if not reply.has_error():
                    self._site_of_node[reply.metadata.src_node_id] = _site(reply)
        missing = [n for n in nodes if n not in self._site_of_node]
        if len(nodes) - len(missing) < self.cfg.experiment.min_sites:
            raise FederationError(
                f"round {round_}: node(s) {missing} did not say which site they are, and "
                f"fewer than min_sites={self.cfg.experiment.min_sites} sites remain for the "
                "round's cohort (privacy.he.bind_cohort); start the missing sites"
            )
        # A node that does not answer has dropped out: the cohort is the sites that did.
        msgs[:] = [m for m in msgs if m.metadata.dst_node_id in self._site_of_node]
        nodes = [m.metadata.dst_node_id for m in msgs]
        cohort = tuple(sorted(self._site_of_node[n] for n in nodes))
        assert self.round is not None
        self.round = dataclasses.replace(self.round, cohort=cohort)
        for m in msgs:
            cast(ConfigRecord, m.content[Record.CONFIG])[ConfigKey.HE_COHORT] = json.dumps(
                list(cohort)
            )

    def _take(self, round_: int, reply: Message) -> Message:
        if reply.has_error():
            return reply
        try:
            site = _site(reply)
        except (KeyError, TypeError):
            return _refused(
                reply,
                f"node {reply.metadata.src_node_id}",
                Record.HE_CONTRIBUTION,
                CryptoError(f"round {round_}: a reply without a site record"),
            )
        assert self._sum is not None and self._spec is not None, "announce() first"
        where = f"site {site!r}, round {round_}"
        try:
            chunks, contribution = read_contribution(
                reply.content.get(Record.HE_CONTRIBUTION), where=where
            )
            if contribution.site != site:
                raise CryptoError(
                    f"{where} sent a contribution signed as site {contribution.site!r}; a site "
                    "may only send its own"
                )
            announced = self.round.cohort if self.round is not None else None
            if announced is not None and contribution.cohort != announced:
                raise CryptoError(
                    f"{where} signed the cohort {contribution.cohort}, not the announced "
                    f"{list(announced)}"
                )
            current = (self._sum.experiment_id, self._sum.round, self._sum.nonce)
            binding = (contribution.experiment_id, contribution.round, contribution.nonce)
            if binding == current and contribution.announcement != self.announcement().digest():
                raise CryptoError(
                    f"{where} signed another announcement of the round than the one sent "
                    "(spec, global model, weight scale or key, min_sites or cohort differ); "
                    "the site and the coordinator disagree on what the round is"
                )
            if contribution.n_values != self._spec.size:
                raise CryptoError(
                    f"{where} encrypted {contribution.n_values} values but the global model "
                    f"has {self._spec.size}; the site trained another model"
                )
            t0 = time.perf_counter()
            self._sum.add(chunks, contribution)
            self._costs["add"] += time.perf_counter() - t0
            self._costs["bytes"][site] = sum(map(len, chunks))
        except CryptoError as exc:
            self._costs["refused"] += 1
            return _refused(reply, site, Record.HE_CONTRIBUTION, exc)
        self._nodes[site] = reply.metadata.src_node_id
        # The reply travels on without its ciphertexts: only counts and metrics remain.
        light = RecordDict(
            {
                Record.METRICS: reply.content[Record.METRICS],
                Record.SITE: reply.content[Record.SITE],
            }
        )
        # Flower's overloads omit the `metadata` form its constructor accepts.
        return Message(content=light, metadata=copy.deepcopy(reply.metadata))  # type: ignore[call-overload]

    def aggregate(
        self,
        grid: Grid,
        round_: int,
        arrays: ArrayRecord,
        replies: list[Message],
    ) -> list[Message]:
        """Have a quorum decrypt the sum; return one reply with the weighted-mean weights.

        Parameters
        ----------
        grid
            Where to send the decryption requests.
        round_
            The round.
        arrays
            The round's global weights (the decrypted mean update is added to them).
        replies
            The accepted (light) replies of the round, from :meth:`receive`.

        Returns
        -------
        list of Message
            One synthetic reply: the new weights and ``{weight_key: total weight,
            "num-examples": total examples}``.

        Raises
        ------
        FederationError
            The quorum did not answer, refused, or disagreed; the round stops cleanly.
        """
        assert self._sum is not None and self._spec is not None and self.round is not None
        try:
            request = self._sum.decryption_request()
        except CryptoError as exc:
            raise FederationError(f"round {round_}: {exc}") from None
        sites = self._sum.sites
        k = min(self.he.quorum, len(sites))
        chosen = sorted(secrets.SystemRandom().sample(sorted(sites), k))
        record = request_record(request)
        config = ConfigRecord({ConfigKey.HE_MIN_SITES: self.cfg.experiment.min_sites})
        msgs = [
            Message(
                RecordDict({Record.HE_REQUEST: record, Record.CONFIG: config}),
                dst_node_id=self._nodes[s],
                message_type=MessageKind.DECRYPT,
            )
            for s in chosen
        ]
        t0 = time.perf_counter()
        answered = self.split(round_, _exchange(grid, msgs, self.cfg.experiment.round_timeout))
        roundtrip = time.perf_counter() - t0
        answers = {_site(m): _answer(round_, m) for m in answered}
        if len(answers) < k or set(answers) - set(chosen):
            missing = sorted(set(chosen) - set(answers))
            raise FederationError(
                f"round {round_}: the decryption quorum failed: {len(answers)} of {k} sites "
                f"({', '.join(chosen)}) decrypted the sum; no answer from {missing} (see their "
                "refusals). The round is stopped; nothing was aggregated"
            )
        try:
            answers_agree(answers, self.he.answer_tolerance)
        except CryptoError as exc:
            raise FederationError(f"round {round_}: {exc}; the round is stopped") from None
        aggregate = answers[chosen[0]]
        if aggregate.shape != (self._spec.size + 1,):
            raise FederationError(
                f"round {round_}: site {chosen[0]!r} returned {aggregate.size} values, "
                f"expected {self._spec.size + 1}"
            )
        weighted, total = split_aggregate(aggregate, self.round.weight_scale)
        if not total > 0:
            raise FederationError(f"round {round_}: the decrypted total weight is {total:g}")
        new = self._apply(arrays, weighted / total)
        examples = sum(
            float(cast(float, m.content[Record.METRICS].get(Metric.NUM_EXAMPLES, 0)))
            for m in replies
        )
        metrics: dict[str, MetricRecordValues] = {
            self.weight_key: total,
            Metric.NUM_EXAMPLES: examples,
        }
        self._log_costs(round_, replies, answered, roundtrip, request.sum_chunks)
        self.history[round_] = {"contributors": sorted(sites), "decrypted_by": chosen}
        content = RecordDict({Record.ARRAYS: new, Record.METRICS: MetricRecord(metrics)})
        meta = copy.deepcopy(replies[0].metadata)
        return [Message(content=content, metadata=meta)]  # type: ignore[call-overload]  # see _take

    def _apply(self, arrays: ArrayRecord, mean_update: np.ndarray) -> ArrayRecord:
        assert self._spec is not None
        glob = {k: arrays[k].numpy() for k in arrays}
        flat, _ = flatten_state({k: glob[k] for k in self._names})
        updated = unflatten(flat + mean_update, self._spec)
        return ArrayRecord({k: Array(np.asarray(updated.get(k, glob[k]))) for k in glob})

    def _log_costs(
        self,
        round_: int,
        replies: list[Message],
        answered: list[Message],
        roundtrip: float,
        sum_chunks: list[bytes],
    ) -> None:
        assert self._spec is not None
        sent = list(self._costs["bytes"].values())
        enc = [
            float(cast(float, m.content[Record.METRICS].get(Metric.HE_ENCRYPT_SECONDS, np.nan)))
            for m in replies
        ]
        dec = [
            float(cast(float, m.content[Record.METRICS].get(Metric.HE_DECRYPT_SECONDS, np.nan)))
            for m in answered
        ]
        per_site = statistics.median(sent) if sent else 0.0
        metrics = {
            "he/contributions": float(len(sent)),
            "he/refused_contributions": float(self._costs["refused"]),
            "he/bytes_per_site": float(per_site),
            "he/bytes_per_param_per_site": per_site / max(self._spec.size, 1),
            "he/encrypt_seconds": float(np.nanmedian(enc)) if enc else float("nan"),
            "he/aggregate_seconds": float(self._costs["add"]),
            "he/decrypt_seconds": float(np.nanmedian(dec)) if dec else float("nan"),
            "he/decrypt_roundtrip_seconds": roundtrip,
            "he/sum_chunks": float(len(sum_chunks)),
            # What each decrypting site downloads (the summed, unseeded ciphertexts).
            "he/request_bytes_per_param": sum(map(len, sum_chunks)) / max(self._spec.size, 1),
        }
        self._costs["last"] = metrics
        self.recorder.log_metrics(metrics, round_)

    @property
    def last_costs(self) -> dict[str, float]:
        """The costs logged for the last aggregated round (``he/...`` metrics)."""
        return dict(self._costs.get("last", {}))
