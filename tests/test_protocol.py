"""The wire protocol: canonical spec bytes, strict parsing, the refusal codec, and the real
ClientApp answering a malformed request with an error reply (never an exception)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from dp_consortium import write_experiment, write_site

from fedhealth.protocol import (
    PROTOCOL_VERSION,
    REFUSAL_CODE,
    ConfigKey,
    ProtocolError,
    Record,
    Refusal,
    RoundConfig,
    TaskSpec,
)


@pytest.fixture
def consortium(tmp_path: Path) -> tuple[Path, Path]:
    site = write_site(tmp_path, "h1", n=60, seed=0)
    return site, write_experiment(tmp_path, [site], min_sites=1)


@pytest.fixture
def spec(consortium: tuple[Path, Path]) -> TaskSpec:
    from fedhealth.config.experiment import load_experiment

    return load_experiment(consortium[1]).task_spec()


def _wire(spec: TaskSpec) -> dict:
    return json.loads(spec.canonical_bytes())


# -- canonical bytes and digest ---------------------------------------------------------------


def test_canonical_bytes_are_compact_sorted_ascii_and_stable(spec: TaskSpec) -> None:
    blob = spec.canonical_bytes()
    assert blob == spec.canonical_bytes()
    assert b" " not in blob.replace(b'" "', b"") and b"\n" not in blob
    assert blob.isascii()
    data = json.loads(blob)
    assert list(data) == sorted(data) and list(data["training"]) == sorted(data["training"])
    assert data["protocol_version"] == PROTOCOL_VERSION


def test_canonical_bytes_do_not_depend_on_key_order(spec: TaskSpec) -> None:
    data = _wire(spec)
    reordered = {k: data[k] for k in reversed(list(data))}
    reordered["training"] = {k: data["training"][k] for k in reversed(list(data["training"]))}
    again = TaskSpec.from_wire(json.dumps(reordered, indent=2))
    assert again.canonical_bytes() == spec.canonical_bytes()
    assert again.digest() == spec.digest()


def test_non_ascii_text_is_escaped(spec: TaskSpec) -> None:
    schema = spec.task.schema_.model_copy(update={"label": "Zielgröße"})
    spec2 = spec.model_copy(update={"task": spec.task.model_copy(update={"schema_": schema})})
    assert b"\\u00f6" in spec2.canonical_bytes() and spec2.canonical_bytes().isascii()


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("training", "learning_rate"), 0.051),
        (("training", "batch_size"), 33),
        (("training", "local_epochs"), 2),
        (("model", "name"), "mlp"),
        (("task", "split_seed"), 44),
        (("task", "test_fraction"), 0.3),
        (("dp", "delta"), 1e-6),
        (("seed",), 12345),
        (("rounds",), 7),
        (("experiment",), "other"),
    ],
)
def test_digest_changes_with_any_field(spec: TaskSpec, path: tuple[str, ...], value) -> None:
    data = _wire(spec)
    node = data
    for key in path[:-1]:
        node = node[key]
    assert node[path[-1]] != value
    node[path[-1]] = value
    changed = TaskSpec.from_wire(json.dumps(data))
    assert changed.digest() != spec.digest()


def test_round_config_round_trips(spec: TaskSpec) -> None:
    from fedhealth.protocol import HERound, NormStats

    he = HERound("e:run:x", 3, "nonce", 10.0, "num-examples", 2, ("a", "b"))
    cfg = RoundConfig(spec, 3, NormStats(mean=[0.0], std=[1.0]), "run", "model", he=he)
    assert RoundConfig.from_record(cfg.to_record()) == cfg


# -- strict parsing ---------------------------------------------------------------------------


def _refused(text: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as err:
        TaskSpec.from_wire(text)
    return err.value


def test_an_unknown_key_is_refused(spec: TaskSpec) -> None:
    data = _wire(spec)
    data["training"]["gpu_hours"] = 10
    err = _refused(json.dumps(data))
    assert err.field == "spec.training.gpu_hours" and "gpu_hours" in str(err)
    data = _wire(spec) | {"exfiltrate": True}
    assert _refused(json.dumps(data)).field == "spec.exfiltrate"


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("training", "learning_rate", -0.1),
        ("training", "learning_rate", 0),
        ("training", "batch_size", 0),
        ("training", "local_epochs", 0),
        ("training", "momentum", 1.5),
        ("task", "test_fraction", 1.0),
        ("task", "num_classes", 1),
        ("model", "hidden", [4096, 0]),
        ("model", "name", "evil_net"),
        ("dp", "delta", 2.0),
    ],
)
def test_a_malformed_value_is_refused_naming_the_field(
    spec: TaskSpec, section: str, key: str, value
) -> None:
    data = _wire(spec)
    data[section][key] = value
    err = _refused(json.dumps(data))
    if section == "model":  # a model's options are checked by its catalogue schema
        assert err.field == "spec.model" and (f"`{key}`" in str(err) or repr(value) in str(err))
        return
    assert err.field.startswith(f"spec.{section}.{key}"), err.field
    assert f"spec.{section}.{key}" in str(err)


def test_non_finite_numbers_and_bad_json_are_refused(spec: TaskSpec) -> None:
    lr = f'"learning_rate":{spec.training.learning_rate}'
    text = spec.canonical_bytes().decode().replace(lr, '"learning_rate":NaN')
    assert "NaN" in text
    assert _refused(text).field == "spec.training.learning_rate"
    text = text.replace("NaN", "Infinity")
    assert _refused(text).field == "spec.training.learning_rate"
    assert "malformed" in str(_refused("{not json"))


def test_a_missing_field_and_another_protocol_version_are_refused(spec: TaskSpec) -> None:
    data = _wire(spec)
    del data["training"]["learning_rate"]  # has a default: still valid
    TaskSpec.from_wire(json.dumps(data))
    del data["model"]
    assert _refused(json.dumps(data)).field == "spec.model"
    data = _wire(spec) | {"protocol_version": PROTOCOL_VERSION + 1}
    err = _refused(json.dumps(data))
    assert err.field == "spec.protocol_version" and "same fedhealth version" in str(err)


def test_round_config_names_malformed_keys(spec: TaskSpec) -> None:
    good = RoundConfig(spec, 1).to_record()
    for key, value in [
        (ConfigKey.SERVER_ROUND, "first"),
        (ConfigKey.PROXIMAL_MU, -1.0),
        (ConfigKey.WEIGHT_EXPONENT, float("nan")),
        (ConfigKey.NORM_STATS, '{"mean": [0.0], "std": [0.0]}'),
    ]:
        with pytest.raises(ProtocolError) as err:
            RoundConfig.from_record(good | {key: value})
        assert key in str(err.value)
    with pytest.raises(ProtocolError, match="`spec` is missing"):
        RoundConfig.from_record({ConfigKey.SERVER_ROUND: 1})
    with pytest.raises(ProtocolError) as err:
        RoundConfig.from_record(good | {ConfigKey.HE_ENABLED: True})
    assert err.value.rule == "he-round"


# -- the refusal codec ------------------------------------------------------------------------


def test_refusal_round_trips_through_the_error_reason() -> None:
    ref = Refusal(site="h1", rule="max_epsilon", message="ε [1.0] over the cap", round=4)
    assert Refusal.decode(ref.encode()) == ref
    assert json.loads(ref.encode()) == {
        "site": "h1", "rule": "max_epsilon", "message": "ε [1.0] over the cap", "round": 4,
    }  # fmt: skip


def test_a_crash_reason_decodes_as_an_error_of_its_node() -> None:
    ref = Refusal.decode("Traceback (most recent call last):\n  ...\nValueError: boom", node="n7")
    assert ref == Refusal("n7", "error", "ValueError: boom")
    assert Refusal.decode("", node="n7").message == "no reason given"
    assert Refusal.decode("[1, 2]", node="n7").rule == "error"


# -- the real ClientApp handler ---------------------------------------------------------------


def _train_message(config: dict):
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    content = RecordDict({Record.CONFIG: ConfigRecord(config)})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def _context(site: Path):
    from flwr.app import Context, RecordDict

    node = {"profile": str(site), "site-index": 0}
    return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d["training"].update(learning_rate=-1.0), "spec.training.learning_rate"),
        (lambda d: d["training"].update(batch_size=0), "spec.training.batch_size"),
        (lambda d: d["training"].pop("learning_rate") and d.pop("training"), "spec.training"),
        (lambda d: d.update(unknown=1), "spec.unknown"),
    ],
)
def test_a_malformed_spec_gets_an_error_reply_and_an_audit_line(
    consortium: tuple[Path, Path], spec: TaskSpec, mutate, field: str
) -> None:
    from fedhealth.config.site import load_site
    from fedhealth.site.audit import audit_path, read
    from fedhealth.site.client_app import evaluate, query, train

    site, _ = consortium
    data = _wire(spec)
    mutate(data)
    config = RoundConfig(spec, 2).to_record() | {ConfigKey.SPEC: json.dumps(data)}
    for handler in (train, evaluate, query):
        reply = handler(_train_message(config), _context(site))
        assert reply.has_error() and reply.error.code == REFUSAL_CODE
        ref = Refusal.decode(reply.error.reason)
        assert ref.site == "h1" and ref.rule == "protocol" and field in ref.message
    log = audit_path(load_site(site).workspace)
    refused = [r for r in read(log) if r["event"] == "refused"]
    assert len(refused) == 3 and all(field in r["message"] for r in refused)


def test_invalid_json_and_a_missing_config_get_error_replies(consortium: tuple[Path, Path]) -> None:
    from flwr.app import Message, MessageType, RecordDict

    from fedhealth.site.client_app import train

    site, _ = consortium
    reply = train(
        _train_message({ConfigKey.SPEC: "{oops", ConfigKey.SERVER_ROUND: 1}), _context(site)
    )
    assert reply.has_error() and "malformed task spec" in Refusal.decode(reply.error.reason).message
    bare = Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)
    reply = train(bare, _context(site))
    assert reply.has_error() and "`config`" in Refusal.decode(reply.error.reason).message


def test_a_valid_request_without_a_model_is_an_error_reply(
    consortium: tuple[Path, Path], spec: TaskSpec
) -> None:
    from fedhealth.site.client_app import train

    site, _ = consortium
    reply = train(_train_message(RoundConfig(spec, 1).to_record()), _context(site))
    assert reply.has_error() and "`arrays`" in Refusal.decode(reply.error.reason).message


def test_importing_the_protocol_loads_no_heavy_library() -> None:
    code = (
        "import sys, fedhealth.protocol\n"
        "heavy = ('torch', 'flwr', 'tenseal', 'numpy', 'mlflow', 'opacus')\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in heavy]\n"
        "own = [m for m in sys.modules if m.startswith('fedhealth.')]\n"
        "print(loaded, own)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] ['fedhealth.catalogue', 'fedhealth.protocol']"
