"""Round checkpoints of a federated run, as MLflow artifacts of the run itself.

As soon as a round is aggregated the coordinator logs ``checkpoints/round-NNNN.npz``: the
global arrays and the federation's ``state_dict()``: the strategy's arrays (server-optimiser
moments such as FedAdam's ``m_t``/``v_t``, FedAvgM's momentum) and a JSON header (round,
consortium statistics, the sampler's random state, the privacy layers' ``state_dict()``:
each site's reported ε and the site-level accountant's history, the encrypted
aggregation's binding and per-round bookkeeping, and the refusals so far). This module
knows nothing of the federation beyond those dicts. When the sites have evaluated the new
model it logs ``checkpoints/round-NNNN.eval.json`` with their metrics.

``fedhealth run --resume RUN_ID`` restores the newest ``.npz``; if its evaluation is
missing it evaluates that round first, then continues with the next round in the same
MLflow run. Checkpointing right after aggregation (not after evaluation) matters under
encrypted aggregation: a site decrypts one aggregate per round, so a round whose sum was
already decrypted cannot be run again (:class:`~fedhealth.privacy.he.ledger.SiteLedger`).
"""

from __future__ import annotations

import io
import json
import random
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedhealth.errors import ConfigError, FederationError
from fedhealth.registry.retry import retrying

ARTIFACT_DIR = "checkpoints"


@dataclass
class Checkpoint:
    """What a run needs to continue after its last completed round."""

    round: int
    arrays: dict[str, np.ndarray]
    strategy_state: dict[str, Any]
    meta: dict[str, Any]


def _pack(ck: Checkpoint) -> bytes:
    arrays: dict[str, np.ndarray] = {f"g/{k}": v for k, v in ck.arrays.items()}
    layout: dict[str, Any] = {}
    for name, value in ck.strategy_state.items():
        if isinstance(value, np.ndarray):
            arrays[f"s/{name}"] = value
            layout[name] = "array"
        elif isinstance(value, dict):
            layout[name] = {"dict": list(value)}
            arrays.update({f"s/{name}/{k}": v for k, v in value.items()})
        else:
            layout[name] = {"list": len(value)}
            arrays.update({f"s/{name}/{i}": v for i, v in enumerate(value)})
    header = dict(ck.meta, round=ck.round, strategy_layout=layout, globals=list(ck.arrays))
    buf = io.BytesIO()
    head = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(buf, __header__=head, **arrays)  # type: ignore[arg-type]  # stub: keys may clash with allow_pickle
    return buf.getvalue()


def _unpack(blob: bytes) -> Checkpoint:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        header = json.loads(bytes(z["__header__"]).decode())
        arrays = {k: z[f"g/{k}"] for k in header.pop("globals")}
        state: dict[str, Any] = {}
        for name, how in header.pop("strategy_layout").items():
            if how == "array":
                state[name] = z[f"s/{name}"]
            elif "dict" in how:
                state[name] = {k: z[f"s/{name}/{k}"] for k in how["dict"]}
            else:
                state[name] = [z[f"s/{name}/{i}"] for i in range(how["list"])]
    return Checkpoint(int(header.pop("round")), arrays, state, header)


def save_checkpoint(client: Any, run_id: str, ck: Checkpoint) -> None:
    """Log ``ck`` as ``checkpoints/round-NNNN.npz`` of MLflow run ``run_id``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"round-{ck.round:04d}.npz"
        path.write_bytes(_pack(ck))
        retrying(client.log_artifact, run_id, str(path), ARTIFACT_DIR, what="log checkpoint")


def _listed(client: Any, run_id: str) -> set[str]:
    files = retrying(client.list_artifacts, run_id, ARTIFACT_DIR, what="list checkpoints")
    return {f.path for f in files}


def load_latest(client: Any, run_id: str, listed: set[str] | None = None) -> Checkpoint | None:
    """The newest readable checkpoint of MLflow run ``run_id`` (``None`` if it has none).

    A checkpoint whose upload a crash cut short is skipped for the one before it (the round
    after it then runs again). ``listed``: the run's checkpoint artifacts, if already listed.
    """
    listed = _listed(client, run_id) if listed is None else listed
    names = sorted(p for p in listed if p.endswith(".npz"))
    problems: list[str] = []
    for name in reversed(names):
        with tempfile.TemporaryDirectory() as tmp:
            local = retrying(
                client.download_artifacts, run_id, name, tmp, what="download checkpoint"
            )
            try:
                return _unpack(Path(local).read_bytes())
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
                problems.append(f"{name}: {exc}")
    if problems:
        raise FederationError(
            f"no checkpoint of MLflow run {run_id} is readable ({'; '.join(problems)}); "
            "start a new run instead of resuming"
        )
    return None


def random_state() -> list:
    """The sampler's random state, JSON-serialisable."""
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_random_state(state: list) -> None:
    """Restore :func:`random_state`."""
    random.setstate((state[0], tuple(state[1]), state[2]))


def save_round(
    recorder: Any, round_: int, arrays: Any, state: dict[str, Any], glob: dict, per_site: dict
) -> None:
    """Checkpoint an aggregated round.

    Parameters
    ----------
    recorder : RunRecorder
        The run's recorder (its MLflow client and run id).
    round_ : int
        The round just aggregated.
    arrays : ArrayRecord
        The new global arrays.
    state : dict
        The federation's ``state_dict()``: ``"strategy"`` holds the strategy's arrays
        (stored as arrays), every other entry is JSON (stored in the header).
    glob, per_site : dict
        The latest evaluation metrics (of the previous round).
    """
    meta = {k: v for k, v in state.items() if k != "strategy"}
    meta.update(random_state=random_state(), global_metrics=glob, site_metrics=per_site)
    arrs = {k: v.numpy() for k, v in arrays.items()}
    ck = Checkpoint(round_, arrs, dict(state.get("strategy", {})), meta)
    save_checkpoint(recorder.client, recorder.run_id, ck)


def save_evaluation(recorder: Any, round_: int, glob: dict, per_site: dict) -> None:
    """Record that round ``round_`` was evaluated, with its metrics
    (``checkpoints/round-NNNN.eval.json``)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"round-{round_:04d}.eval.json"
        path.write_text(json.dumps({"global_metrics": glob, "site_metrics": per_site}))
        retrying(
            recorder.client.log_artifact, recorder.run_id, str(path), ARTIFACT_DIR,
            what="log evaluation checkpoint",
        )  # fmt: skip


def _evaluation(client: Any, run_id: str, round_: int, listed: set[str]) -> dict | None:
    name = f"{ARTIFACT_DIR}/round-{round_:04d}.eval.json"
    if name not in listed:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = retrying(client.download_artifacts, run_id, name, tmp, what="download evaluation")
        return json.loads(Path(local).read_text())


@dataclass
class ResumePoint:
    """Where a run starts: round ``first`` with ``arrays``.

    ``evaluate`` names a restored round whose evaluation the crash interrupted (run it
    before round ``first``); ``global_metrics``/``site_metrics`` are the latest evaluation;
    ``state`` is what to pass to the federation's ``load_state_dict`` (``None``: a fresh
    start).
    """

    first: int
    arrays: Any
    global_metrics: dict[str, Any]
    site_metrics: dict[str, Any]
    evaluate: int | None = None
    state: dict[str, Any] | None = None


def resume_point(recorder: Any, config_hash: str, arrays: Any) -> ResumePoint:
    """Where a resumed run starts: after the last checkpoint of ``recorder``'s (reopened)
    MLflow run, or at round 1 with ``arrays`` if it has none. Restores the sampler's random
    state; the federation restores the rest from :attr:`ResumePoint.state`.

    Raises
    ------
    ConfigError
        The MLflow run ran another configuration (``config_hash`` differs).
    """
    from flwr.app import Array, ArrayRecord

    client, run_id = recorder.client, recorder.run_id
    run = retrying(client.get_run, run_id, what=f"read run {run_id}")
    ran = run.data.tags.get("fedhealth.config_hash")
    if ran and ran != config_hash:
        raise ConfigError(
            f"--resume {run_id}: that MLflow run ran another configuration of "
            f"{run.info.run_name or 'the experiment'!r} (config hash {ran}, "
            f"this file {config_hash}); resume with the file it ran, or start a new run"
        )
    listed = _listed(client, run_id)
    ck = load_latest(client, run_id, listed)
    if ck is None:
        return ResumePoint(1, arrays, {}, {})
    set_random_state(ck.meta.pop("random_state"))
    glob, per_site = ck.meta.pop("global_metrics", {}), ck.meta.pop("site_metrics", {})
    state = dict(ck.meta, strategy=ck.strategy_state)
    restored = ArrayRecord({k: Array(v) for k, v in ck.arrays.items()})
    evaluated = _evaluation(client, run_id, ck.round, listed)
    if evaluated is None:
        return ResumePoint(ck.round + 1, restored, glob, per_site, ck.round, state)
    return ResumePoint(
        ck.round + 1, restored, evaluated["global_metrics"], evaluated["site_metrics"], None, state
    )
