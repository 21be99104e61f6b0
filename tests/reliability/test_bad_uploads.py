"""A corpus of malformed factor uploads against a real server: each is refused with a 4xx and a message
saying what was wrong, and afterwards the listing, every registry file (byte for byte) and the greedy
outputs of one probe per live set are exactly what they were before."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from api.conftest import RunningServer
from reliability.common import (
    AUTH,
    PAIRS,
    assert_openai_error,
    listing,
    probe_outputs,
    registry_bytes,
    set_body,
)

pytestmark = pytest.mark.engine

TEN_MB = 10 * 1024 * 1024
GOOD_CSV = ",".join(f"{1.0 + i / (PAIRS - 1):.6f}" for i in range(PAIRS)) + "\n"


@dataclass
class Bad:
    """One malformed upload: how it is sent, and the status and message part it must get."""

    id: str
    status: int
    message: str
    json: Any = None  # serialised with allow_nan (NaN / Infinity literals)
    content: bytes | None = None
    content_type: str = "application/json"
    csv: bytes | None = None
    form: dict[str, str] = field(default_factory=dict)
    query: str = ""
    chunked: bool = False

    def send(self, client: httpx.Client, base: str) -> httpx.Response:
        url = f"{base}/admin/factors{self.query}"
        if self.csv is not None:
            return client.post(url, files={"file": ("bad.csv", self.csv, "text/csv")}, data=self.form, headers=AUTH)
        if self.form:
            return client.post(url, data=self.form, files={"other": ("x.txt", b"x", "text/plain")}, headers=AUTH)
        body = self.content if self.content is not None else json.dumps(self.json, allow_nan=True).encode()
        headers = {**AUTH, "Content-Type": self.content_type}
        if self.chunked:
            return client.post(
                url, content=iter([body[i : i + 65536] for i in range(0, len(body), 65536)]), headers=headers
            )
        return client.post(url, content=body, headers=headers)


def hf_config(**rope: Any) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "hidden_size": 128,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "num_hidden_layers": 2,
        "vocab_size": 49152,
        "max_position_embeddings": 1024,
        "rope_theta": 10000.0,
        "rope_scaling": {
            "rope_type": "longrope",
            "original_max_position_embeddings": 256,
            "short_factor": [1.0] * PAIRS,
            "long_factor": [2.0] * PAIRS,
            **rope,
        },
    }


ones = [1.0] * PAIRS
CORPUS = [
    Bad("length-31", 400, "factors: expected 32 values", json=set_body("bad", factors=ones[:-1])),
    Bad("length-33", 400, "factors: expected 32 values", json=set_body("bad", factors=ones + [1.0])),
    Bad("nan", 400, "every λ_i must be finite", json=set_body("bad", factors=ones[:-1] + [float("nan")])),
    Bad("inf", 400, "every λ_i must be finite", json=set_body("bad", factors=[float("inf")] + ones[1:])),
    Bad(
        "overflow-1e999",
        400,
        "every λ_i must be finite",
        content=json.dumps(set_body("bad")).replace('"factors": [1.0,', '"factors": [1e999,').encode(),
    ),
    Bad("negative", 400, "every λ_i must be > 0", json=set_body("bad", factors=[-2.0] + ones[1:])),
    Bad("zero", 400, "every λ_i must be > 0", json=set_body("bad", factors=ones[:5] + [0.0] + ones[6:])),
    Bad("below-one", 400, "must be ≥ 1", json=set_body("bad", factors=[0.5] + ones[1:])),
    Bad("strings", 400, "factors", json=set_body("bad", factors="1,2,3")),
    Bad(
        "non-monotone",
        400,
        "should be non-decreasing",
        json=set_body("bad", factors=[1.0 + (i % 2) for i in range(PAIRS)]),
        query="?monotone=reject",
    ),
    Bad("n-hat-at-window", 400, "n_hat: must be < max_len", json=set_body("bad", n_hat=512)),
    Bad("n-hat-negative", 400, "n_hat", json=set_body("bad", n_hat=-1)),
    Bad("window-beyond-engine", 400, "this engine serves at most 2048", json=set_body("bad", max_len=4096)),
    Bad("mscale-zero", 400, "mscale: must be a finite number > 0", json=set_body("bad", mscale=0.0)),
    Bad("mscale-nan", 400, "mscale: must be a finite number > 0", json=set_body("bad", mscale=float("nan"))),
    Bad("rope-theta", 400, "rope_theta: the set has 500000", json=set_body("bad", rope_theta=500000.0)),
    Bad("rotary-dim", 400, "rotary_dim: the set has 32", json=set_body("bad", rotary_dim=32, factors=[1.0] * 16)),
    Bad("rotary-dim-odd", 400, "rotary_dim: must be even", json=set_body("bad", rotary_dim=63)),
    Bad("original-window", 400, "original_max_len: the set has 512", json=set_body("bad", original_max_len=512)),
    Bad("fingerprint", 400, "model.hidden_size", json=set_body("bad", model={"hidden_size": 4096})),
    Bad("unknown-field", 400, "colour: unknown field", json=set_body("bad", colour="blue")),
    Bad("unknown-nested-field", 400, "provenance", json=set_body("bad", provenance={"colour": "blue"})),
    Bad("schema-version", 400, "unsupported schema_version 2", json=set_body("bad", schema_version=2)),
    Bad("name-path-traversal", 400, "name: must be 1-64 characters", json=set_body("../../etc/evil")),
    Bad("name-empty", 400, "name", json=set_body("")),
    Bad("version-zero", 400, "version", json=set_body("bad", version=0)),
    Bad("version-huge", 400, "version 9223372036854775808 is too large", json=set_body("bad", version=2**63)),
    Bad("duplicate-same-version", 400, "version 2 is not newer than version 2", json=set_body("corpus", version=2)),
    Bad("duplicate-lower-version", 400, "version 1 is not newer than version 2", json=set_body("corpus", version=1)),
    Bad("bad-json", 400, "body is not valid JSON", content=b'{"name": "bad", "factors": [1.0, '),
    Bad("json-array", 400, "expected a JSON object", json=[1, 2]),
    Bad("json-null", 400, "expected a JSON object", json=None),
    Bad("json-deep-nesting", 400, "nested too deeply", content=b"[" * 100_000),
    Bad("not-utf8", 400, "body is not valid JSON", content=b"\xff\xfe{\x00"),
    Bad("empty-body", 400, "empty body", content=b""),
    Bad("whitespace-body", 400, "empty body", content=b" \n\t "),
    Bad("body-10mb", 413, "larger than the 8388608 byte limit", content=b" " * TEN_MB),
    Bad("body-10mb-chunked", 413, "larger than the 8388608 byte limit", content=b" " * TEN_MB, chunked=True),
    Bad("hf-short-length", 400, "expected 32 values", json=hf_config(short_factor=[1.0] * 5)),
    Bad("hf-nan", 400, "must be finite", json=hf_config(long_factor=[float("nan")] * PAIRS)),
    Bad("hf-rope-scaling-not-object", 400, "rope", json={**hf_config(), "rope_scaling": 5}),
    Bad("csv-not-numbers", 400, "bad.csv", csv=b"1.0,abc,2.0\n", form={"name": "bad", "max_len": "300"}),
    Bad("csv-wrong-count", 400, "expected 32 values", csv=b"1.0,1.5,2.0\n", form={"name": "bad", "max_len": "300"}),
    Bad("csv-ragged-rows", 400, "row 2 differs", csv=b"1,2\n3\n", form={"name": "bad", "max_len": "300"}),
    Bad("csv-empty", 400, "no factors found", csv=b"", form={"name": "bad", "max_len": "300"}),
    Bad("csv-not-utf8", 400, "not UTF-8", csv=b"\xff\xfe1,2", form={"name": "bad", "max_len": "300"}),
    Bad(
        "csv-nan",
        400,
        "must be finite",
        csv=GOOD_CSV.replace("1.000000", "nan").encode(),
        form={"name": "bad", "max_len": "300"},
    ),
    Bad("csv-no-name", 400, "field name is required", csv=GOOD_CSV.encode(), form={"max_len": "300"}),
    Bad("csv-no-window", 400, "field max_len is required", csv=GOOD_CSV.encode(), form={"name": "bad"}),
    Bad(
        "csv-window-not-int",
        400,
        "max_len must be an integer",
        csv=GOOD_CSV.encode(),
        form={"name": "bad", "max_len": "3e2"},
    ),
    Bad(
        "csv-mscale-not-number",
        400,
        "mscale must be a number",
        csv=GOOD_CSV.encode(),
        form={"name": "bad", "max_len": "300", "mscale": "big"},
    ),
    Bad(
        "csv-name-traversal",
        400,
        "name: must be 1-64 characters",
        csv=GOOD_CSV.encode(),
        form={"name": "../x", "max_len": "300"},
    ),
    Bad(
        "csv-10mb",
        413,
        "larger than the 8388608 byte limit",
        csv=b"1.0," * (TEN_MB // 4),
        form={"name": "bad", "max_len": "300"},
    ),
    Bad("multipart-no-file", 400, "needs a 'file' part", form={"name": "bad", "max_len": "300"}),
    Bad("multipart-no-boundary", 400, "boundary", content=b"garbage", content_type="multipart/form-data"),
    Bad(
        "monotone-option", 400, "monotone must be warn, reject or ignore", json=set_body("bad"), query="?monotone=maybe"
    ),
]


@pytest.fixture(scope="module")
def baseline(rel_server: RunningServer) -> Iterator[dict[str, Any]]:
    """Two good versions of 'corpus' (so a lower and an equal version can be tried), then the state every
    rejected upload must leave untouched."""
    for scale in (1.5, 2.5):
        r = httpx.post(f"{rel_server.base}/admin/factors", json=set_body("corpus", scale), headers=AUTH, timeout=60)
        assert r.status_code == 201, r.text
    state = {
        "listing": listing(rel_server.base),
        "files": registry_bytes(rel_server.registry),
        "outputs": probe_outputs(rel_server.base),
        "log_size": rel_server.log.stat().st_size,
    }
    assert "corpus@2" in {s["label"] for s in state["listing"]["data"]}
    yield state
    r = httpx.delete(f"{rel_server.base}/admin/factors/corpus", headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("case", CORPUS, ids=[c.id for c in CORPUS])
def test_malformed_upload_is_refused_and_changes_nothing(
    rel_server: RunningServer, baseline: dict[str, Any], case: Bad
) -> None:
    with httpx.Client(timeout=120) as client:
        r = case.send(client, rel_server.base)
    assert_openai_error(r, case.status, case.message)
    assert listing(rel_server.base) == baseline["listing"]
    assert registry_bytes(rel_server.registry) == baseline["files"]
    assert probe_outputs(rel_server.base) == baseline["outputs"]


def test_corpus_left_no_traceback(rel_server: RunningServer, baseline: dict[str, Any]) -> None:
    """Every refusal above was handled, not crashed through: no traceback in the server log since."""
    with rel_server.log.open("rb") as fh:
        fh.seek(baseline["log_size"])
        text = fh.read().decode(errors="replace")
    assert "Traceback" not in text, text[-3000:]
    refused = re.findall(r'"POST /admin/factors(?:\?\S*)? HTTP/1.1" (4\d\d)', text)
    assert len(refused) >= len(CORPUS), refused
    assert not re.search(r'"POST /admin/factors\S* HTTP/1.1" 5\d\d', text)
