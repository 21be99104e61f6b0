"""Admission without vLLM: a request is admitted once, at render time over HTTP, and ``generate`` claims that
admission; what never reached the engine is ended with its HTTP request; direct engine use admits itself; a
request naming its set gets it, pinned, either way."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from memory_catalogue import MemoryWorkers, make_catalogue

from server.admission import Admission
from server.policy import AdmissionPolicy, RequestTooLong, UnknownFactorSet


def _admission() -> Admission:
    return Admission(make_catalogue(MemoryWorkers()), AdmissionPolicy(default_reserve=16, default_policy="upgrade"))


def _params(max_tokens: int | None = 8, **extra: object) -> SimpleNamespace:
    return SimpleNamespace(max_tokens=max_tokens, extra_args=extra or None, n=1)


def test_generate_claims_the_render_time_admission_and_the_rest_ends_with_the_request() -> None:
    adm = _admission()
    cat = adm.catalogue
    short_prompt, long_prompt = list(range(100)), list(range(500))

    async def http_request() -> None:
        async with adm.http_request() as scope:
            adm.admit_prompts([short_prompt, long_prompt], 8, None, 1)
            assert [a.key for a in scope.admitted] == ["short@1", "long@1"]
            assert cat.in_flight == {"short@1": 1, "long@1": 1}
            # generate sees an equal copy of the long prompt: the same admission, not a second one
            claimed = adm.claim(list(long_prompt), _params(), "from-params")
            assert claimed is scope.admitted[1] and claimed.started
            assert cat.in_flight == {"short@1": 1, "long@1": 1} and cat.served["long@1"] == 1
            # the short prompt never reaches the engine
        assert cat.in_flight == {"long@1": 1}, "an unclaimed admission outlived its HTTP request"
        await cat.end_admission(claimed)
        assert cat.in_flight == {}

    asyncio.run(http_request())


def test_a_refused_prompt_ends_the_admissions_made_before_it() -> None:
    adm = _admission()

    async def http_request() -> None:
        async with adm.http_request() as scope:
            with pytest.raises(RequestTooLong):
                adm.admit_prompts([list(range(10)), list(range(5000))], None, None, 1)
            assert [a.key for a in scope.admitted] == ["short@1"]
        assert adm.catalogue.in_flight == {}

    asyncio.run(http_request())


def test_direct_engine_use_admits_in_generate_with_the_params_policy() -> None:
    adm = _admission()
    # no HTTP scope: the claim is the admission; max_tokens counts as asked for, the policy comes from extra_args
    a = adm.claim(list(range(100)), _params(100, longrope_policy="reserve"), "from-params")
    assert a.key == "long@1" and a.started and adm.catalogue.in_flight == {"long@1": 1}
    b = adm.claim(list(range(100)), _params(100), None)  # nothing asked for: the default reserve (16) fits short
    assert b.key == "short@1"
    with pytest.raises(ValueError, match="longrope_policy must be one of"):
        adm.claim([1, 2, 3], _params(4, longrope_policy="fastest"), "from-params")
    assert adm.catalogue.in_flight == {"long@1": 1, "short@1": 1}


def test_a_prompt_the_scope_never_saw_is_admitted_in_generate() -> None:
    adm = _admission()

    async def http_request() -> None:
        async with adm.http_request():
            adm.admit_prompts([list(range(100))], 8, None, 1)
            other = adm.claim(list(range(101)), _params(), "from-params")
            assert other.started and adm.catalogue.served["short@1"] == 2
        assert adm.catalogue.in_flight == {"short@1": 1}  # the unclaimed one ended, the running one counted

    asyncio.run(http_request())


def test_a_named_set_is_admitted_over_http_and_in_generate() -> None:
    adm = _admission()

    async def http_request() -> None:
        async with adm.http_request() as scope:
            adm.admit_prompts([list(range(100))], 8, None, 1, "long")  # auto routing would give short
            assert [(a.key, a.policy) for a in scope.admitted] == [("long@1", "pin")]
            with pytest.raises(UnknownFactorSet, match=r"'nope' is not a live factor set; live: short@1"):
                adm.admit_prompts([list(range(10))], 8, None, 1, "nope")
        assert adm.catalogue.in_flight == {}

    asyncio.run(http_request())
    direct = adm.claim(list(range(100)), _params(8, longrope_factor_set="long"), "from-params")
    assert direct.key == "long@1" and direct.policy == "pin" and direct.started
    with pytest.raises(RequestTooLong, match="exceeds the window of short@1"):
        adm.claim(list(range(100)), _params(100, longrope_factor_set="short"), "from-params")
    assert adm.catalogue.in_flight == {"long@1": 1}
