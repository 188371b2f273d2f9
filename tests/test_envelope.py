"""A small message's records travel sealed as one record (fedhealth.envelope): the round
trip is exact, large content is left to Flower's chunks, and a broken or smuggling envelope
is refused by name — by the site (audited) and by the coordinator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dp_consortium import write_experiment, write_site
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from fedhealth.envelope import ENVELOPE, FORMAT, PAYLOAD, VERSION, open_envelope, seal
from fedhealth.protocol import REFUSAL_CODE, ProtocolError, Record, Refusal, RoundConfig


def _content(n: int = 3) -> RecordDict:
    rng = np.random.default_rng(0)
    return RecordDict(
        {
            "arrays": ArrayRecord(
                {
                    "w": Array(rng.normal(size=(n, 2)).astype(np.float32)),
                    "b": Array(np.arange(2, dtype=np.float64)),
                }
            ),
            "config": ConfigRecord(
                {"spec": "{}", "round": 3, "blob": b"\x00\xff", "xs": [1.5, 2.5]}
            ),
            "metrics": MetricRecord({"loss": 0.25, "n": 7}),
        }
    )


def _same(a: RecordDict, b: RecordDict) -> None:
    assert sorted(a) == sorted(b)
    for name, rec in a.items():
        other = b[name]
        assert type(rec) is type(other) and sorted(rec) == sorted(other)
        for key, value in rec.items():
            if isinstance(value, Array):
                assert np.array_equal(value.numpy(), other[key].numpy())
                assert value.numpy().dtype == other[key].numpy().dtype
            else:
                assert value == other[key]


def test_sealed_content_is_one_record_and_opens_to_the_same_records() -> None:
    content = _content()
    sealed = seal(content)
    assert list(sealed) == [ENVELOPE] and isinstance(sealed[ENVELOPE], ConfigRecord)
    _same(open_envelope(sealed), content)


def test_content_that_sealing_would_not_shrink_or_that_is_large_travels_as_it_is() -> None:
    single = RecordDict({"site": ConfigRecord({"name": "h1"})})
    assert seal(single) is single  # one object either way
    assert seal(RecordDict()) == RecordDict()
    large = _content(n=1000)
    assert seal(large, limit=1000) is large  # above the limit: Flower's own chunks
    assert list(seal(large)) == [ENVELOPE]  # 16 kB: far below Flower's 5 MiB chunk
    plain = _content()
    assert open_envelope(plain) is plain  # not sealed: untouched


def _envelope(**values) -> RecordDict:
    return RecordDict({ENVELOPE: ConfigRecord(values)})


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (_envelope(v=FORMAT, recorddict=b"\xff\xff\xff"), "not an encoded RecordDict"),
        (_envelope(v=2, recorddict=b""), "format 2"),
        (_envelope(v=FORMAT, recorddict="text"), "bytes"),
        (_envelope(v=FORMAT, recorddict=b"", extra=1), "only"),
        (RecordDict({ENVELOPE: MetricRecord({"v": 1})}), "ConfigRecord"),
        (RecordDict({**seal(_content()), "config": ConfigRecord({"spec": "{}"})}), "only record"),
    ],
)
def test_a_broken_or_smuggling_envelope_is_refused_by_name(content: RecordDict, says: str) -> None:
    with pytest.raises(ProtocolError, match=says) as err:
        open_envelope(content)
    assert err.value.field == ENVELOPE and err.value.rule == "protocol"


def test_an_envelope_inside_an_envelope_is_refused() -> None:
    inner = seal(_content())[ENVELOPE]
    smuggled = seal(RecordDict({ENVELOPE: inner, "b": ConfigRecord({"y": 2})}))
    assert list(smuggled) == [ENVELOPE] and smuggled[ENVELOPE][VERSION] == FORMAT
    assert isinstance(smuggled[ENVELOPE][PAYLOAD], bytes)
    with pytest.raises(ProtocolError, match="another envelope"):
        open_envelope(smuggled)


# -- the site: the real ClientApp with its envelope mod ----------------------------------------


@pytest.fixture
def site(tmp_path: Path) -> tuple[Path, Path]:
    profile = write_site(tmp_path, "h1", n=60, seed=0)
    return profile, write_experiment(tmp_path, [profile], min_sites=1)


def _context(profile: Path) -> Context:
    node = {"profile": str(profile), "site-index": 0}
    return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})


def _request(content: RecordDict) -> Message:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def test_the_site_opens_a_sealed_request_and_seals_its_reply(site: tuple[Path, Path]) -> None:
    from fedhealth.config.experiment import load_experiment
    from fedhealth.coordinator.federation import input_dim
    from fedhealth.models import build_model
    from fedhealth.site.client_app import app

    profile, experiment = site
    cfg = load_experiment(experiment)
    spec = cfg.task_spec()
    model = build_model(spec.model, input_dim(cfg), 2, cfg.experiment.seed)
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in model.state_dict().items()})
    config = RoundConfig(spec, 1).to_record()
    request = RecordDict({Record.CONFIG: ConfigRecord(config), Record.ARRAYS: arrays})
    reply = app(message=_request(seal(request)), context=_context(profile))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert list(reply.content) == [ENVELOPE]  # sealed on the way out
    opened = open_envelope(reply.content)
    assert {Record.ARRAYS, Record.METRICS, Record.SITE} <= set(opened)
    assert opened[Record.SITE]["name"] == "h1"
    assert set(opened[Record.ARRAYS]) == set(arrays)


def test_the_site_refuses_and_audits_a_request_whose_envelope_does_not_open(
    site: tuple[Path, Path],
) -> None:
    from fedhealth.config.site import load_site
    from fedhealth.site.audit import audit_path, read
    from fedhealth.site.client_app import app

    profile, _ = site
    broken = _envelope(v=FORMAT, recorddict=b"\x0a\xff\xff\xff\xff")
    reply = app(message=_request(broken), context=_context(profile))
    assert reply.has_error() and reply.error.code == REFUSAL_CODE
    ref = Refusal.decode(reply.error.reason)
    assert ref.site == "h1" and ref.rule == "protocol" and ENVELOPE in ref.message
    lines = list(read(audit_path(load_site(profile).workspace)))
    assert [r["event"] for r in lines] == ["received", "refused"]
    assert lines[1]["rule"] == "protocol" and ENVELOPE in lines[1]["message"]


# -- the coordinator: replies are opened, a broken one becomes that node's refusal --------------


class _Grid:
    """The two calls of Flower's Grid the exchange uses, answering like a site would."""

    def __init__(self, reply_content) -> None:
        self.reply_content = reply_content
        self.pushed: list[Message] = []

    def push_messages(self, messages):
        self.pushed = list(messages)
        for i, m in enumerate(self.pushed):
            m.metadata.__dict__["_message_id"] = f"m{i}"
        return [m.metadata.message_id for m in self.pushed]

    def pull_messages(self, ids):
        out = []
        for m in self.pushed:
            if m.metadata.message_id in ids:
                out.append(Message(self.reply_content(), reply_to=m))
        return out


def test_the_coordinator_seals_requests_and_opens_replies() -> None:
    from fedhealth.coordinator.exchange import send_and_receive

    grid = _Grid(lambda: seal(_content()))
    request = _request(_content())
    replies = send_and_receive(grid, [request], timeout=5)
    assert [list(m.content) for m in grid.pushed] == [[ENVELOPE]]  # sealed on the way out
    _same(request.content, _content())  # the coordinator's own message keeps its records
    assert grid.pushed[0].metadata.dst_node_id == request.metadata.dst_node_id
    assert len(replies) == 1 and not replies[0].has_error()
    _same(replies[0].content, _content())


def test_a_reply_whose_envelope_does_not_open_is_that_nodes_refusal() -> None:
    from fedhealth.coordinator.exchange import send_and_receive

    grid = _Grid(lambda: _envelope(v=FORMAT, recorddict=b"\xff"))
    (reply,) = send_and_receive(grid, [_request(_content())], timeout=5)
    assert reply.has_error() and reply.error.code == REFUSAL_CODE
    ref = Refusal.decode(reply.error.reason)
    # The reply comes from the request's destination, node 1: the refusal names it.
    assert ref.site == "node 1" and ref.rule == "protocol" and "malformed reply" in ref.message
    assert ENVELOPE in ref.message
