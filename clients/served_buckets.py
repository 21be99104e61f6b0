"""The measurements of :mod:`clients.side_by_side`: one server's answers and prompt NLLs per length bucket
(:class:`Runner`), and the verdict across servers (:func:`summarise`). HTTP only (no torch)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from factors.evaluation.ruler import answer_budget
from factors.evaluation.tasks import TaskPrompt, is_correct
from server.protocol import POLICY_XARG

SERVERS = ("longrope-serve", "stock-long", "stock-short")
SERVED_NAME = "model"
NLL_TEXT_CHARS = 2_000_000
# Two servers applying the same angles differ only by fp32 rounding (float64 per-step cos/sin here, vLLM's
# cached fp32 table there): measured 8e-7 to 7e-6 nats per token on 65k-token buckets. Closer than this is equal.
NLL_TOLERANCE = 1e-4


@dataclass
class Cell:
    """One server's results in one bucket."""

    prompts: int = 0
    correct: int = 0
    refused: int = 0
    nll_sum: float = 0.0
    nll_tokens: int = 0
    nll_windows: int = 0
    nll_refused: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.prompts if self.prompts else float("nan")

    @property
    def nll(self) -> float | None:
        """Mean prompt NLL (nats per token) over the windows served; None if every one was refused."""
        return self.nll_sum / self.nll_tokens if self.nll_tokens and not self.nll_refused else None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy": self.accuracy, "nll": self.nll}


@dataclass
class Bucket:
    length: int
    in_window: bool
    cells: dict[str, Cell] = field(default_factory=dict)


# -- the workload ----------------------------------------------------------------------------------------


def nll_windows(token_ids: Sequence[int], length: int, count: int, seed: int) -> list[list[int]]:
    """``count`` windows of ``length`` token ids at seeded offsets (the same for every server)."""
    if len(token_ids) <= length:
        raise SystemExit(f"error: the NLL text has {len(token_ids)} tokens; a {length}-token window needs more")
    rng = random.Random(f"nll:{seed}:{length}")
    return [list(token_ids[s : s + length]) for s in (rng.randrange(len(token_ids) - length) for _ in range(count))]


def tokenize(url: str, text: str) -> list[int]:
    resp = httpx.post(f"{url}/tokenize", json={"model": SERVED_NAME, "prompt": text}, timeout=600)
    resp.raise_for_status()
    return resp.json()["tokens"]


def is_too_long(resp: httpx.Response) -> bool:
    """A 400 that says the request does not fit the server's window (stock-short on long prompts)."""
    return resp.status_code == 400 and any(w in resp.text for w in ("maximum context length", "too long", "window"))


class Runner:
    """Sends the workload to one server and fills its cells."""

    def __init__(self, url: str, ours: bool, concurrency: int, timeout: float) -> None:
        self.http = httpx.Client(base_url=url, timeout=timeout)
        self.ours = ours
        self.concurrency = concurrency

    def _post(self, body: dict[str, Any]) -> httpx.Response | None:
        if self.ours:
            body["vllm_xargs"] = {POLICY_XARG: "reserve"}
        resp = self.http.post("/v1/completions", json=body)
        if is_too_long(resp):
            return None
        if resp.status_code != 200:
            raise SystemExit(f"error: HTTP {resp.status_code} from {self.http.base_url}: {resp.text[:500]}")
        return resp

    def answer(self, p: TaskPrompt) -> bool | None:
        """Whether the greedy continuation starts with the answer (None: refused as too long)."""
        body = {"model": SERVED_NAME, "prompt": p.prompt, "max_tokens": answer_budget(p.answer), "temperature": 0.0}
        resp = self._post(body)
        return None if resp is None else is_correct(resp.json()["choices"][0]["text"], p.answer)

    def nll(self, ids: list[int]) -> tuple[float, int] | None:
        """Summed NLL of tokens 1… of a window and their count (None: refused as too long)."""
        body = {"model": SERVED_NAME, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}
        resp = self._post(body)
        if resp is None:
            return None
        rows = resp.json()["choices"][0]["prompt_logprobs"][1:]
        total = -sum(row[str(tok)]["logprob"] for row, tok in zip(rows, ids[1:], strict=True))
        return total, len(rows)

    def run(
        self,
        prompts: Sequence[TaskPrompt],
        windows: dict[int, list[list[int]]],
        buckets: list[Bucket],
        who: str,
        progress: Callable[[str], None],
    ) -> None:
        by_len = {b.length: b for b in buckets}
        for b in buckets:
            b.cells[who] = Cell()
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            for p, ok in zip(prompts, pool.map(self.answer, prompts), strict=True):
                cell = by_len[p.length].cells[who]
                cell.prompts += 1
                cell.correct += bool(ok)
                cell.refused += ok is None
            progress(f"{who}: {len(prompts)} task prompts")
            for length, wins in windows.items():
                cell = by_len[length].cells[who]
                for got in pool.map(self.nll, wins):
                    cell.nll_windows += 1
                    if got is None:
                        cell.nll_refused += 1
                    else:
                        cell.nll_sum += got[0]
                        cell.nll_tokens += got[1]
            progress(f"{who}: {sum(map(len, windows.values()))} NLL windows")


def summarise(buckets: list[Bucket]) -> dict[str, Any]:
    """Per bucket and stock configuration: accuracy and NLL differences (longrope-serve − stock) and whether
    longrope-serve is at least as good on both (NLL: lower, or equal within NLL_TOLERANCE; a stock NLL of None
    is a refusal)."""
    verdict: dict[str, Any] = {"ok": True, "nll_tolerance": NLL_TOLERANCE, "buckets": []}
    for b in buckets:
        ours = b.cells["longrope-serve"]
        row: dict[str, Any] = {"length": b.length, "in_window": b.in_window}
        for who in SERVERS[1:]:
            if who not in b.cells:
                continue
            st = b.cells[who]
            acc_gain = ours.accuracy - st.accuracy
            nll_gain = None if ours.nll is None or st.nll is None else st.nll - ours.nll
            ok = acc_gain >= 0 and ours.nll is not None and (st.nll is None or nll_gain >= -NLL_TOLERANCE)
            row[who] = {"accuracy_gain": acc_gain, "nll_gain": nll_gain, "ok": ok}
            verdict["ok"] &= ok
        verdict["buckets"].append(row)
    return verdict


def format_table(buckets: list[Bucket]) -> str:
    servers = [s for s in SERVERS if any(s in b.cells for b in buckets)]
    head = "| bucket | " + " | ".join(f"{s} acc | {s} NLL" for s in servers) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(servers)]
    for b in buckets:
        cells = []
        for s in servers:
            c = b.cells.get(s)
            if c is None:
                cells += ["", ""]
                continue
            acc = f"{c.accuracy:.3f} ({c.correct}/{c.prompts})" + (f", {c.refused} refused" if c.refused else "")
            nll = "refused" if c.nll is None else f"{c.nll:.4f}"
            cells += [acc, nll]
        tag = "in window" if b.in_window else "long"
        lines.append(f"| {b.length} ({tag}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)
