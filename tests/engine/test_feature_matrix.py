"""The refused half of docs/engine.md's feature matrix: every vLLM option that per-request LongRoPE cannot
run exactly is refused at start, in one message naming the option, why, and what to use instead; the
options that work are tested on the real engine in test_spec_decode.py (ngram, chunked prefill, prefix
caching, preemption, n > 1, logprobs, structured outputs) and the other engine tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.startup import REFUSED, UnsupportedOption, check_engine_options, speculative_method

FOLDER = Path(__file__).resolve().parents[2] / "factors" / "data" / "tiny-finetuned" / "model"


@pytest.mark.parametrize(
    "kwargs,method",
    [
        ({}, None),
        ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 4}}, "ngram"),
        ({"speculative_config": {"model": "[ngram]", "num_speculative_tokens": 4}}, "ngram"),
        ({"spec_method": "ngram", "spec_tokens": 3}, "ngram"),
        ({"speculative_config": {"model": "some/draft-model", "num_speculative_tokens": 4}}, "draft_model"),
        ({"speculative_config": {"model": "my_pkg.proposers.Mine"}}, "custom_class"),
        ({"speculative_config": {"method": "eagle3", "model": "x/y"}}, "eagle3"),
        ({"spec_method": "mtp", "spec_tokens": 1}, "mtp"),
        ({"speculative_config": {"method": "suffix"}}, "suffix"),
    ],
)
def test_speculative_method_is_resolved_as_vllm_does(kwargs, method) -> None:
    assert speculative_method(kwargs) == method


def test_ngram_and_plain_options_pass() -> None:
    check_engine_options({"speculative_config": {"method": "ngram", "num_speculative_tokens": 4}}, environ={})
    plain = {"enable_prefix_caching": True, "enable_chunked_prefill": True, "max_num_seqs": 4, "data_parallel_size": 1}
    check_engine_options({**plain, "enable_sleep_mode": False, "watermark_config": None}, environ={})
    check_engine_options({"kv_cache_dtype": "auto"}, environ={"VLLM_USE_V2_MODEL_RUNNER": "0"})


@pytest.mark.parametrize(
    "kwargs,environ,named",
    [
        ({"speculative_config": {"method": "draft_model", "model": "tiny"}}, {}, "method 'draft_model'"),
        ({"speculative_config": {"method": "eagle", "model": "x"}}, {}, "method 'eagle'"),
        ({"speculative_config": {"method": "mtp"}}, {}, "method 'mtp'"),
        ({"speculative_config": {"method": "suffix"}}, {}, "arctic-inference"),
        ({"speculative_config": {"method": "ngram_gpu"}}, {}, "method 'ngram_gpu'"),
        ({"watermark_config": {"key": 1}}, {}, "--watermark-config"),
        ({"attention_config": {"hisparse_config": {"topk": 8}}}, {}, "hisparse"),
        ({}, {"VLLM_USE_V2_MODEL_RUNNER": "1"}, "VLLM_USE_V2_MODEL_RUNNER =1"),
        ({"data_parallel_size": 2}, {}, "--data-parallel-size 2"),
        ({"enable_sleep_mode": True}, {}, "--enable-sleep-mode"),
        ({"pipeline_parallel_size": 2}, {}, "--pipeline-parallel-size 2"),
        ({"kv_transfer_config": {"kv_connector": "X"}}, {}, "--kv-transfer-config"),
        ({"enable_lora": True}, {}, "--enable-lora"),
        ({"kv_cache_dtype": "fp8"}, {}, "--kv-cache-dtype fp8"),
    ],
)
def test_refused_options_name_themselves_why_and_what_instead(kwargs, environ, named) -> None:
    with pytest.raises(UnsupportedOption) as err:
        check_engine_options(kwargs, environ=environ)
    message = str(err.value)
    assert named in message
    refusal = next(r for r in REFUSED if r.given(kwargs, environ) is not None)
    assert refusal.reason in message and refusal.instead in message


def test_several_refusals_come_in_one_message() -> None:
    with pytest.raises(UnsupportedOption) as err:
        check_engine_options({"data_parallel_size": 2, "enable_sleep_mode": True}, environ={})
    assert "--data-parallel-size" in str(err.value) and "--enable-sleep-mode" in str(err.value)


@pytest.mark.parametrize(
    "argv,named",
    [
        (["--speculative-config", '{"method": "eagle", "model": "x", "num_speculative_tokens": 2}'], "'eagle'"),
        (["--api-server-count", "2"], "--api-server-count 2"),
        (["--data-parallel-size", "2"], "--data-parallel-size 2"),
    ],
)
def test_longrope_serve_exits_2_before_starting_an_engine(argv, named, capsys) -> None:
    from server.app import main

    assert main(["--model", str(FOLDER), *argv]) == 2
    err = capsys.readouterr().err
    assert named in err and "error:" in err
