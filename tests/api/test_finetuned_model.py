"""The shipped fine-tuned tiny model (``longrope-factors extend`` output) served as it is: ``longrope-serve
--model FOLDER`` with no --factors starts with the folder's own sets, text prompts are tokenised by its byte
tokenizer, each length lands on its tier, and greedy text equals Hugging Face's forward under that set."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from api.conftest import ADMIN_TOKEN, RunningServer, start_server

from factors.evaluation.corpus import stdlib_text
from factors.formats import load_json_set, model_set_files

pytestmark = pytest.mark.engine

FOLDER = Path(__file__).resolve().parents[2] / "factors" / "data" / "tiny-finetuned" / "model"
TIERS = {"longrope-short": 128, "longrope-1024": 1024, "longrope-8192": 8192}


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    srv = start_server(FOLDER, None, tmp_path_factory.mktemp("finetuned"))
    yield srv
    srv.stop()


def test_the_model_folder_brings_its_tiers(finetuned: RunningServer) -> None:
    listing = httpx.get(f"{finetuned.base}/admin/factors", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
    assert {s["name"]: s["max_len"] for s in listing["data"]} == TIERS
    assert sorted(load_json_set(p).name for p in model_set_files(FOLDER)) == sorted(TIERS)


@pytest.fixture(scope="module")
def reference():  # Hugging Face's forward on the same folder, built once for the module
    from engine_harness import TorchReference

    return TorchReference(str(FOLDER))


@pytest.mark.parametrize("length,tier", [(100, "longrope-short"), (700, "longrope-1024"), (3000, "longrope-8192")])
def test_text_prompts_land_on_their_tier_and_match_hf(
    finetuned: RunningServer, reference, length: int, tier: str
) -> None:
    text = stdlib_text("heldout", 20_000).encode()[5_000 : 5_000 + length].decode("ascii", errors="ignore")
    ids = list(text.encode())
    client = openai.OpenAI(base_url=f"{finetuned.base}/v1", api_key="unused", max_retries=0)
    raw = client.completions.with_raw_response.create(model="tiny", prompt=text, max_tokens=6, temperature=0)
    assert raw.headers["x-longrope-factor-set"] == f"{tier}@1"
    completion = raw.parse()
    assert completion.usage.prompt_tokens == len(ids)  # one token per byte, as the evaluator counts
    fs = load_json_set(FOLDER / "longrope-sets" / f"{tier}.json")
    want = reference.greedy(ids, 6, fs.factors, fs.n_hat, fs.resolved_mscale)
    assert completion.choices[0].text == bytes(want).decode("utf-8", errors="replace")
