"""Issue 5: evaluator, evolutionary search, resume, progressive chain, CLI and the shipped fixture.

Everything runs on the tiny byte-level Llama trained short (context 128) shipped in
factors/data/tiny-short/model, at 8× (1024 tokens), with small budgets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from factors.baselines import make_baseline
from factors.evaluation.corpus import stdlib_text
from factors.formats import check_compatible, load_json_set, read_model_rope, save_json_set
from factors.rope import cos_sin
from factors.search.evolution import LongRopeSearch, SearchConfig, SearchPlan, is_valid

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "factors" / "data" / "tiny-short"
MODEL = TINY / "model"
TARGET = 1024


@pytest.fixture(scope="module")
def ev():
    from factors.evaluation.evaluator import Evaluator

    torch.manual_seed(0)
    return Evaluator(MODEL, threads=1)


@pytest.fixture(scope="module")
def tokens(ev):
    return ev.tokenize(stdlib_text("search", 200_000))


def small_config(**over) -> SearchConfig:
    base = dict(target_len=TARGET, population=8, parents=4, mutations=4, crossovers=3, generations=3, seed=7)
    base.update(over)
    return SearchConfig(**base)


class Recorder:
    """Fitness wrapper that keeps every FactorSet the search asked about."""

    def __init__(self, ev, windows):
        self.ev, self.windows, self.seen = ev, windows, []

    def __call__(self, fs):
        self.seen.append(fs)
        return self.ev.perplexity(fs, self.windows)


@pytest.fixture(scope="module")
def windows(ev, tokens):
    return ev.windows(tokens, TARGET, 2, seed=0)


@pytest.fixture(scope="module")
def full_run(ev, windows, tmp_path_factory):
    """One uninterrupted small search (shared by the improvement, constraint and resume tests)."""
    rec = Recorder(ev, windows)
    ckpt = tmp_path_factory.mktemp("full") / "ckpt.json"
    search = LongRopeSearch(ev.rope.geometry, rec, small_config(), checkpoint=ckpt, progress=False)
    return search.run(), search, rec


def test_identity_set_gives_stock_hf_logits(ev, tokens):
    ids = ev.windows(tokens, 96, 2, seed=3)
    stock = ev.logits(ids, None)
    ours = ev.logits(ids, make_baseline("identity", ev.rope.geometry, 128))
    # HF computes the angle p·θ in fp32 (one ulp at 95 rad is 7.6e-6), factors.rope in float64 then
    # casts: the cos/sin rows differ by HF's angle rounding only, and the logits by float noise.
    pos = torch.arange(96).unsqueeze(0)
    hf_cos, hf_sin = ev.stock_rotary(torch.zeros(1), pos)
    our_cos, our_sin = ev.base.rotary_emb(torch.zeros(1), pos)
    assert (hf_cos - our_cos).abs().max() <= 1e-5 and (hf_sin - our_sin).abs().max() <= 1e-5
    tol = 5e-6 * float(stock.abs().max())
    assert torch.allclose(stock, ours, rtol=0, atol=tol), ((stock - ours).abs().max(), tol)
    changed = ev.logits(ids, make_baseline("pi", ev.rope.geometry, 1024))
    assert (stock - changed).abs().max() > 1e-2  # the patch really replaces the rotary


def test_rotary_rows_follow_n_hat_and_mscale(ev):
    from factors.evaluation.evaluator import FactorSetRotary

    fs = make_baseline("pi", ev.rope.geometry, 1024).with_updates(n_hat=16, mscale=1.3)
    rot = FactorSetRotary(fs, 64, torch.device("cpu"))
    pos = torch.tensor([[0, 5, 15, 16, 40]])
    c, s = rot(torch.zeros(1, dtype=torch.float32), pos)
    ref_c, ref_s = cos_sin(fs, pos[0], dtype=torch.float32)
    half = fs.rotary_dim // 2
    assert torch.equal(c[0, :, :half], ref_c) and torch.equal(c[0, :, half:], ref_c)
    assert torch.equal(s[0, :, half:], ref_s)
    plain = make_baseline("identity", ev.rope.geometry, 128).with_updates(mscale=1.3)
    early, _ = cos_sin(plain, [5, 15])
    assert torch.allclose(c[0, 1:3, :half], early)  # positions < n̂ keep the original angles


def test_search_improves_on_best_seed(full_run):
    fs, search, _ = full_run
    seeds = fs.provenance.metrics["seed_ppl"]
    assert set(seeds) == {"pi", "ntk", "yarn"}
    assert fs.provenance.metrics["ppl"] < min(seeds.values())
    assert fs.provenance.method == "longrope-search"
    assert fs.provenance.metrics["evaluations"] == len(search.evaluated())


def test_every_individual_is_monotone_and_within_bounds(full_run):
    _, search, rec = full_run
    low, high = search.low, search.high
    assert len(rec.seen) == len(search.evaluated()) > 8  # memoised: each genome evaluated once
    for fs in rec.seen:
        assert is_valid(fs.factors, fs.n_hat, low, high, search.choices), (fs.factors, fs.n_hat)
        assert fs.monotonicity_problem() is None


def test_resume_after_interruption_matches_uninterrupted(ev, windows, full_run, tmp_path):
    uninterrupted, _, _ = full_run
    ckpt = tmp_path / "ckpt.json"
    first = LongRopeSearch(ev.rope.geometry, Recorder(ev, windows), small_config(), checkpoint=ckpt, progress=False)
    first.run(stop_after=1)
    saved = json.loads(ckpt.read_text())
    assert saved["generation"] == 1
    rec = Recorder(ev, windows)
    resumed = LongRopeSearch(ev.rope.geometry, rec, small_config(), checkpoint=ckpt, progress=False)
    result = resumed.run(resume=True)
    assert len(rec.seen) < len(resumed.evaluated())  # the resumed run reused the checkpoint's evaluations
    assert result.factors == uninterrupted.factors
    assert result.n_hat == uninterrupted.n_hat
    assert result.provenance.metrics["ppl"] == uninterrupted.provenance.metrics["ppl"]
    assert result.provenance.metrics["history"] == uninterrupted.provenance.metrics["history"]


def test_resume_refuses_other_settings(ev, windows, tmp_path):
    ckpt = tmp_path / "ckpt.json"
    LongRopeSearch(ev.rope.geometry, Recorder(ev, windows), small_config(), checkpoint=ckpt, progress=False).run(
        stop_after=0
    )
    other = LongRopeSearch(
        ev.rope.geometry, Recorder(ev, windows), small_config(seed=8), checkpoint=ckpt, progress=False
    )
    with pytest.raises(ValueError, match="different settings"):
        other.run(resume=True)


def test_progressive_chain_and_short_readjustment(ev, tokens):
    from factors.search.progressive import progressive, short_readjust

    cfg = small_config(population=5, parents=3, mutations=2, crossovers=1, generations=1)
    plan = SearchPlan(long=cfg, stages=(512,), samples=1, short=cfg, short_samples=2, progress=False)
    chain = progressive(ev, tokens, plan)
    assert [fs.max_len for fs in chain] == [512, 1024]
    assert "from-512" in chain[1].provenance.metrics["seed_ppl"]  # stage 2 seeded from stage 1
    short = short_readjust(ev, tokens, chain[-1], plan)
    assert short.max_len == 128 and short.resolved_mscale == 1.0
    seeds = short.provenance.metrics["seed_ppl"]
    assert short.provenance.metrics["ppl"] <= seeds["identity"]  # never worse than the model's own


def test_search_output_loads_into_server_registry(full_run, tmp_path):
    from server.registry import Registry

    fs = full_run[0]
    path = tmp_path / "longrope.json"
    save_json_set(fs, path)
    loaded = load_json_set(path, monotone="reject")
    check_compatible(loaded, read_model_rope(MODEL))
    reg = Registry(tmp_path / "registry")
    versioned = loaded.with_updates(version=1)
    reg.save_version(versioned)
    assert reg.load_version(loaded.name, 1) == versioned


SHIPPED = {256: "longrope-256", 512: "longrope-512", 1024: "longrope", 2048: "longrope-2048"}


def test_shipped_searched_sets_beat_every_baseline_at_every_ratio_on_heldout_text(ev):
    """Without fine-tuning, at 2×, 4×, 8× and 16×, on text no search saw: the shipped set of that window beats
    the best of PI, NTK and YaRN built for it, and is ≤ 0.90 × YaRN at 8× (other windows than docs/search.md's)."""
    heldout = ev.tokenize(stdlib_text("heldout", 400_000))
    ratios = {}
    for length, stem in SHIPPED.items():
        searched = load_json_set(TINY / "sets" / f"{stem}.json")
        check_compatible(searched, ev.rope)
        assert searched.max_len == length and searched.provenance.method == "longrope-search"
        windows = ev.windows(heldout, length, 8, seed=1)
        baselines = {
            m: ev.perplexity(make_baseline(m, ev.rope.geometry, length), windows) for m in ("pi", "ntk", "yarn")
        }
        ppl = ev.perplexity(searched, windows)
        ratios[length] = (round(ppl, 3), {m: round(v, 3) for m, v in baselines.items()})
        assert ppl < min(baselines.values()), ratios
        if length == 1024:
            assert ppl <= 0.90 * baselines["yarn"], ratios
    print(ratios)


def test_cli_eval_json_records(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    sets = [TINY / "sets" / "yarn.json", TINY / "sets" / "longrope.json"]
    cmd = [sys.executable, "-m", "factors.cli.main", "eval", "--model", str(MODEL), "--text", "stdlib:heldout"]
    cmd += [a for s in sets for a in ("--set", str(s))] + ["--lengths", "128,512", "--samples", "2", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    names = [load_json_set(s).name for s in sets]
    assert [(r["set"], r["length"]) for r in records] == [(n, L) for L in (128, 512) for n in names]
    assert all(set(r) == {"set", "length", "ppl"} and r["ppl"] > 1 for r in records)


def test_cli_help_lists_search_commands():
    from factors.cli.main import build_parser

    text = build_parser().format_help()
    for cmd in ("search", "eval", "passkey", "plot-ppl"):
        assert cmd in text


def test_passkey_prompt_fits_the_length_and_hides_the_key(ev):
    from factors.evaluation.evaluator import passkey_prompt

    for depth in (0.0, 0.5, 1.0):
        prompt, answer = passkey_prompt(ev, 1024, depth, "12345")
        total = prompt.numel() + answer.numel()
        assert 1024 - 100 <= total <= 1024
        text = ev.detokenize(prompt.tolist())
        where = text.index("The pass key is 12345") / len(text)
        assert abs(where - depth) < 0.2 and text.endswith("The pass key is")
        assert ev.detokenize(answer.tolist()) == " 12345"
    results = ev.passkey(None, 512, depths=(0.5,), trials=2, seed=0)
    assert len(results) == 2 and all(r.tokens <= 512 and len(r.key) == 5 for r in results)
    # a window too small for the task line gets the compact prompt (filler, key line, question), the
    # tiny model's own window included; below what the key line and question need, it is refused
    prompt, answer = passkey_prompt(ev, 128, 0.5, "12345")
    text = ev.detokenize(prompt.tolist())
    assert prompt.numel() + answer.numel() <= 128 and "The pass key is 12345" in text and "important info" not in text
    assert "important info" in ev.detokenize(passkey_prompt(ev, 1024, 0.5, "12345")[0].tolist())
    assert all(0 <= r.key_nll < 20 for r in results)
    with pytest.raises(ValueError, match="too short"):
        passkey_prompt(ev, 64, 0.5, "12345")


def test_shipped_smollm2_sets_fit_the_default_model(default_model):
    folder = ROOT / "factors" / "data" / "smollm2-135m"
    rope = read_model_rope(default_model)
    long = load_json_set(folder / "longrope-16k.json", monotone="reject")
    short = load_json_set(folder / "longrope-short-8k.json", monotone="reject")
    for fs in (long, short):
        check_compatible(fs, rope)
    assert long.max_len == 2 * short.max_len == 16384
    metrics = long.provenance.metrics
    assert long.provenance.method == "longrope-search" and metrics["ppl"] <= metrics["seed_ppl"]["yarn"]
