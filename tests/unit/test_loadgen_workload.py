"""Load generator workloads: trace and JSONL readers, synthetic arrivals, shaping, SLO classes,
and prompts of exact length from the held-out corpus (pure Python: no NATS)."""

import json
import statistics
from pathlib import Path

import pytest

from loadgen.workload import (
    DEFAULT_SLO_CLASSES,
    PromptBuilder,
    RequestSpec,
    SloClass,
    cap_lengths,
    force_output,
    read_azure_trace,
    read_jsonl,
    read_workload,
    rescale,
    slo_for,
    synthetic,
)

SHIPPED_TRACE = (Path(__file__).resolve().parents[2] / "loadgen" / "traces"
                 / "AzureLLMInferenceTrace_code.csv")

AZURE_HEAD = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:17:03.9799600,4808,10
2023-11-16 18:17:04.0319600,3180,8
2023-11-16 18:17:04.0781490,110,27
2023-11-16 18:17:04.1206440,7433,14
"""


def write(tmp_path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- Azure trace ------------------------------------------------------------------------------
def test_azure_csv_parses_lengths_and_relative_arrivals(tmp_path):
    specs = read_azure_trace(write(tmp_path, "t.csv", AZURE_HEAD))
    assert [(s.index, s.prompt_tokens, s.output_tokens) for s in specs] == [
        (0, 4808, 10), (1, 3180, 8), (2, 110, 27), (3, 7433, 14)]
    assert [s.arrival_s for s in specs] == pytest.approx([0.0, 0.052, 0.098189, 0.140684])
    assert all(s.prompt_text is None and s.slo_class is None for s in specs)


def test_azure_start_and_max_requests_rebase_on_the_first_row_read(tmp_path):
    specs = read_azure_trace(write(tmp_path, "t.csv", AZURE_HEAD), start=1, max_requests=2)
    assert [(s.index, s.prompt_tokens) for s in specs] == [(0, 3180), (1, 110)]
    assert [s.arrival_s for s in specs] == pytest.approx([0.0, 0.046189])


def test_azure_header_with_spaces_blank_lines_and_zero_counts(tmp_path):
    text = ("TIMESTAMP, ContextTokens, GeneratedTokens\n"
            "2023-11-16 18:17:03.9799600, 12, 0\n\n")
    (spec,) = read_azure_trace(write(tmp_path, "t.csv", text))
    assert (spec.prompt_tokens, spec.output_tokens) == (12, 1)  # 0 generated -> one to time


@pytest.mark.parametrize(("row", "says"), [
    ("2023-11-16 18:17:04,abc,3", "ContextTokens 'abc' is not an integer"),
    ("2023-11-16 18:17:04,12,2.5", "GeneratedTokens '2.5' is not an integer"),
    ("2023-11-16 18:17:04,-4,3", "ContextTokens -4 is negative"),
    ("yesterday,12,3", "bad timestamp 'yesterday'"),
    ("2023-11-16 18:17:04,12", "2 column(s)"),
    ("2023-11-16 18:17:03,12,3", "goes backwards"),
])
def test_azure_malformed_row_names_file_and_line(tmp_path, row, says):
    path = write(tmp_path, "bad.csv", AZURE_HEAD + row + "\n")
    with pytest.raises(ValueError) as err:
        read_azure_trace(path)
    assert f"{path}:6:" in str(err.value) and says in str(err.value)


def test_azure_missing_column_in_header(tmp_path):
    path = write(tmp_path, "bad.csv", "TIMESTAMP,ContextTokens\n2023-11-16 18:17:04,12\n")
    with pytest.raises(ValueError, match=r"bad.csv:1: .*GeneratedTokens"):
        read_azure_trace(path)


def test_azure_rows_before_start_are_not_checked(tmp_path):
    path = write(tmp_path, "t.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\nx,y,z\n"
                 "2023-11-16 18:17:04,12,3\n")
    assert read_azure_trace(path, start=1)[0].prompt_tokens == 12


def test_shipped_azure_trace_slice():
    specs = read_workload(SHIPPED_TRACE, start=100, max_requests=500)
    assert len(specs) == 500 and specs[0].arrival_s == 0.0
    arrivals = [s.arrival_s for s in specs]
    assert arrivals == sorted(arrivals)
    rate = (len(specs) - 1) / arrivals[-1]
    assert 0.5 < rate < 20  # 8,818 requests over about an hour: ~2.4 rps on average
    assert all(s.prompt_tokens >= 1 and s.output_tokens >= 1 for s in specs)
    head = read_azure_trace(SHIPPED_TRACE, max_requests=4)
    assert [(s.prompt_tokens, s.output_tokens) for s in head] == [
        (4808, 10), (3180, 8), (110, 27), (7433, 14)]


# -- JSONL ------------------------------------------------------------------------------------
def test_jsonl_lengths_and_prompt_texts(tmp_path):
    lines = [
        {"arrival_s": 1.0, "prompt_tokens": 40, "output_tokens": 8, "slo_class": "batch"},
        {"arrival_s": 1.5, "prompt": "def f(x):", "output_tokens": 4.0, "device": "4g"},
        {"arrival_s": 2.0, "prompt": "héllo", "prompt_tokens": 3, "output_tokens": 2},
    ]
    path = write(tmp_path, "w.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    a, b, c = read_workload(path)
    assert [s.arrival_s for s in (a, b, c)] == [0.0, 0.5, 1.0]  # relative to the first
    assert (a.prompt_tokens, a.output_tokens, a.slo_class, a.prompt_text) == (40, 8, "batch", None)
    # A text without a length: its UTF-8 bytes bound its tokens from above.
    assert (b.prompt_text, b.prompt_tokens, b.output_tokens, b.device) == ("def f(x):", 9, 4, "4g")
    assert (c.prompt_text, c.prompt_tokens) == ("héllo", 3)
    assert len(read_jsonl(path, max_requests=2)) == 2
    assert [s.index for s in read_jsonl(path, start=1)] == [0, 1]


def test_jsonl_counts_text_tokens_with_a_tokenizer(tmp_path, tokenizer):
    path = write(tmp_path, "w.jsonl", json.dumps(
        {"arrival_s": 0, "prompt": "def fibonacci(n):", "output_tokens": 4}) + "\n")
    (spec,) = read_jsonl(path, tokenizer=tokenizer)
    assert spec.prompt_tokens == len(tokenizer.encode("def fibonacci(n):",
                                                      add_special_tokens=False))


def test_jsonl_iso_timestamps(tmp_path):
    lines = [{"timestamp": "2024-01-01T00:00:00Z", "prompt_tokens": 5, "output_tokens": 1},
             {"timestamp": "2024-01-01T00:00:02.250+00:00", "prompt_tokens": 5,
              "output_tokens": 1}]
    path = write(tmp_path, "w.json", "\n".join(json.dumps(x) for x in lines))
    assert [s.arrival_s for s in read_workload(path)] == [0.0, 2.25]


@pytest.mark.parametrize(("obj", "says"), [
    ({"arrival_s": 0, "prompt_tokens": 0, "output_tokens": 1}, "'prompt_tokens' must be"),
    ({"arrival_s": 0, "prompt_tokens": True, "output_tokens": 1}, "'prompt_tokens' must be"),
    ({"arrival_s": 0, "prompt_tokens": 5}, "'output_tokens' is missing"),
    ({"arrival_s": 0, "output_tokens": 5}, "'prompt_tokens' or 'prompt'"),
    ({"arrival_s": -1, "prompt_tokens": 5, "output_tokens": 1}, "'arrival_s' must be"),
    ({"prompt_tokens": 5, "output_tokens": 1}, "exactly one of"),
    ({"timestamp": "2024-01-01T00:00:00", "prompt_tokens": 5, "output_tokens": 1},
     "exactly one of"),
    ({"arrival_s": 0, "prompt_tokns": 5, "output_tokens": 1}, "unknown key(s) ['prompt_tokns']"),
    ({"arrival_s": 0, "prompt": "", "output_tokens": 1}, "'prompt' is empty"),
    ({"arrival_s": 0, "prompt_tokens": 5, "output_tokens": 1, "device": 3}, "'device' must be"),
    ({"arrival_s": 0.5, "prompt_tokens": 5, "output_tokens": 1}, "goes backwards"),
    ([1, 2], "expected a JSON object"),
])
def test_jsonl_errors_name_the_line(tmp_path, obj, says):
    first = json.dumps({"arrival_s": 1, "prompt_tokens": 5, "output_tokens": 1})
    path = write(tmp_path, "w.jsonl", f"{first}\n\n{json.dumps(obj)}\n")
    with pytest.raises(ValueError) as err:
        read_jsonl(path)
    assert f"{path}:3:" in str(err.value) and says in str(err.value)


def test_jsonl_not_json_names_the_line(tmp_path):
    path = write(tmp_path, "w.jsonl", '{"arrival_s": 0,\n')
    with pytest.raises(ValueError, match=r"w.jsonl:1: not JSON"):
        read_jsonl(path)


def test_unknown_suffix_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown workload format '.txt'"):
        read_workload(write(tmp_path, "w.txt", ""))


# -- synthetic --------------------------------------------------------------------------------
def gaps(specs: list[RequestSpec]) -> list[float]:
    return [b.arrival_s - a.arrival_s for a, b in zip(specs, specs[1:], strict=False)]


def test_poisson_mean_rate_and_unit_cv():
    specs = synthetic(20_001, rate_rps=8.0, seed=3)
    g = gaps(specs)
    assert specs[0].arrival_s == 0.0 and min(g) >= 0
    assert 1 / statistics.fmean(g) == pytest.approx(8.0, rel=0.03)
    assert statistics.pstdev(g) / statistics.fmean(g) == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("burstiness", [0.5, 1.0, 2.0, 3.0])
def test_gamma_burstiness_is_the_cv_of_gaps_at_the_same_mean_rate(burstiness):
    g = gaps(synthetic(20_001, rate_rps=4.0, arrivals="gamma", burstiness=burstiness, seed=1))
    assert 1 / statistics.fmean(g) == pytest.approx(4.0, rel=0.1)
    assert statistics.pstdev(g) / statistics.fmean(g) == pytest.approx(burstiness, rel=0.1)


def test_constant_arrivals():
    assert [s.arrival_s for s in synthetic(4, 2.0, arrivals="constant")] == [0, 0.5, 1.0, 1.5]


def test_synthetic_lengths_uniform_in_inclusive_ranges_and_labels():
    specs = synthetic(2000, 1.0, prompt_tokens=(3, 5), output_tokens=(7, 7), seed=2,
                      slo_class="interactive", device="wifi")
    assert {s.prompt_tokens for s in specs} == {3, 4, 5}
    assert {s.output_tokens for s in specs} == {7}
    assert {(s.slo_class, s.device) for s in specs} == {("interactive", "wifi")}
    assert [s.index for s in specs] == list(range(2000))


def test_synthetic_is_deterministic_by_seed():
    assert synthetic(50, 3.0, arrivals="gamma", burstiness=2, seed=7) == \
        synthetic(50, 3.0, arrivals="gamma", burstiness=2, seed=7)
    assert synthetic(50, 3.0, seed=7) != synthetic(50, 3.0, seed=8)
    # Lengths draw from their own stream: changing the arrival process keeps them.
    lengths = [(s.prompt_tokens, s.output_tokens) for s in synthetic(50, 3.0, seed=7)]
    assert lengths == [(s.prompt_tokens, s.output_tokens)
                       for s in synthetic(50, 3.0, arrivals="gamma", burstiness=2, seed=7)]


@pytest.mark.parametrize("kw", [
    {"arrivals": "poisson", "burstiness": 2.0}, {"arrivals": "gamma", "burstiness": 0.0},
    {"arrivals": "fractal"}, {"prompt_tokens": (0, 4)}, {"output_tokens": (9, 8)},
])
def test_synthetic_refuses_bad_arguments(kw):
    with pytest.raises(ValueError):
        synthetic(10, 1.0, **kw)
    with pytest.raises(ValueError):
        synthetic(10, 0.0)


# -- shaping ----------------------------------------------------------------------------------
def test_rescale_divides_the_timeline_and_composes():
    specs = synthetic(10, 1.0, arrivals="constant")
    assert [s.arrival_s for s in rescale(specs, rate_scale=2)] == [i / 2 for i in range(10)]
    both = rescale(specs, rate_scale=2, time_compression=5)
    assert [s.arrival_s for s in both] == pytest.approx([i / 10 for i in range(10)])
    assert [(s.prompt_tokens, s.output_tokens) for s in both] == \
        [(s.prompt_tokens, s.output_tokens) for s in specs]
    with pytest.raises(ValueError):
        rescale(specs, rate_scale=0)


def test_force_output():
    specs = synthetic(5, 1.0)
    assert force_output(specs, None) == specs
    assert {s.output_tokens for s in force_output(specs, 17)} == {17}
    with pytest.raises(ValueError):
        force_output(specs, 0)


def test_cap_lengths_cuts_output_first_and_counts():
    specs = [RequestSpec(0, 0.0, 100, 10), RequestSpec(1, 0.0, 5000, 10),
             RequestSpec(2, 0.0, 400, 200), RequestSpec(3, 0.0, 100, 900)]
    capped, n = cap_lengths(specs, max_prompt_tokens=450, max_output_tokens=500,
                            max_context=512)
    assert [(s.prompt_tokens, s.output_tokens) for s in capped] == [
        (100, 10), (450, 10), (400, 112), (100, 412)]
    assert n == 3
    # A prompt cap at the context still leaves one output token.
    capped, n = cap_lengths(specs, max_prompt_tokens=512, max_output_tokens=512, max_context=512)
    assert (capped[1].prompt_tokens, capped[1].output_tokens) == (511, 1) and n == 3


# -- SLO classes ------------------------------------------------------------------------------
def test_slo_for_uses_the_class_then_the_default():
    spec = RequestSpec(0, 0.0, 1, 1)
    assert slo_for(spec, DEFAULT_SLO_CLASSES, None) is None
    assert slo_for(spec, DEFAULT_SLO_CLASSES, "standard").ttft_ms == 3000
    labelled = RequestSpec(1, 0.0, 1, 1, slo_class="interactive")
    assert slo_for(labelled, DEFAULT_SLO_CLASSES, "batch") == \
        SloClass("interactive", 1000.0, 100.0)
    assert DEFAULT_SLO_CLASSES["batch"].to_slo().tpot_ms == 1000.0
    with pytest.raises(ValueError, match="unknown SLO class 'gold'"):
        slo_for(RequestSpec(2, 0.0, 1, 1, slo_class="gold"), DEFAULT_SLO_CLASSES, None)


def test_request_spec_validates():
    with pytest.raises(ValueError):
        RequestSpec(0, 0.0, 0, 1)
    with pytest.raises(ValueError):
        RequestSpec(0, -1.0, 1, 1)


# -- prompts ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from common.models.loading import DEFAULT_TARGET

    return AutoTokenizer.from_pretrained(DEFAULT_TARGET, local_files_only=True)


@pytest.fixture(scope="module")
def builder(tokenizer):
    return PromptBuilder(tokenizer, seed=0)


def test_prompts_have_exact_lengths_and_are_deterministic(builder, tokenizer):
    again = PromptBuilder(tokenizer, seed=0)  # a fresh builder (another process) agrees
    for n in (0, 1, 7, 128, 1000):
        for index in (0, 1, 99):
            ids = builder.build(n, index)
            assert len(ids) == n and ids == again.build(n, index)
    assert builder.build(64, 5) != PromptBuilder(tokenizer, seed=1).build(64, 5)
    assert all(0 <= t < len(tokenizer) for t in builder.build(500, 3))


def test_different_requests_get_different_text(builder):
    prompts = {tuple(builder.build(32, i)) for i in range(500)}
    assert len(prompts) == 500
    starts = [builder.start(i) for i in range(builder.corpus_tokens)]
    assert len(set(starts)) == builder.corpus_tokens  # the first L requests never share a start


def test_prompts_wrap_around_the_corpus(builder):
    n = builder.corpus_tokens
    ids = builder.build(2 * n + 10, 0)
    assert len(ids) == 2 * n + 10
    assert ids[:n + 10] == ids[n:]  # the ring repeats with period L
    assert sorted(ids[:n]) == sorted(builder.build(n, 1))  # any full window is the whole ring


def test_ids_for_uses_the_text_cut_to_its_end(builder, tokenizer):
    text = "def fibonacci(n):\n    return n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert builder.ids_for(RequestSpec(0, 0.0, 1000, 1, prompt_text=text)) == ids  # no padding
    assert builder.ids_for(RequestSpec(0, 0.0, 3, 1, prompt_text=text)) == ids[-3:]
    assert builder.ids_for(RequestSpec(4, 0.0, 9, 1)) == builder.build(9, 4)


def test_a_probe_window_keeps_its_length_at_every_load() -> None:
    from loadgen.workload import RequestSpec, rescale, window

    specs = [RequestSpec(index=i, arrival_s=float(i), prompt_tokens=8, output_tokens=4)
             for i in range(100)]
    assert [s.index for s in window(specs, 10.0)] == list(range(10))
    fast = rescale(specs, rate_scale=4.0)  # 4 a second: 40 arrive in the same 10 s
    assert len(window(fast, 10.0)) == 40
    slow = rescale(specs, rate_scale=0.25)  # one every 4 s: the floor of requests applies
    assert [s.index for s in window(slow, 10.0, min_requests=5)] == [0, 1, 2, 3, 4]
    assert len(window(specs[:3], 10.0, min_requests=5)) == 3  # all there are
    with pytest.raises(ValueError):
        window(specs, 0.0)


def test_a_windowed_probe_offers_its_requests_over_the_window_not_over_a_burst() -> None:
    from loadgen.job import offered_rps
    from loadgen.workload import RequestSpec, window

    # 30 requests in the first 3 s, then one every 10 s: a 15 s window catches the burst.
    arrivals = [i * 0.1 for i in range(30)] + [3.0 + 10.0 * i for i in range(1, 20)]
    specs = [RequestSpec(index=i, arrival_s=a, prompt_tokens=8, output_tokens=4)
             for i, a in enumerate(arrivals)]
    probe = window(specs, 15.0)
    assert len(probe) == 31
    assert offered_rps(probe) == pytest.approx(30 / 13.0)  # over the arrival span
    assert offered_rps(probe, 15.0) == pytest.approx(31 / 15.0)  # over the window
    floor = window(specs, 15.0, min_requests=40)  # the floor stretches it past 15 s
    assert offered_rps(floor, 15.0) == pytest.approx(40 / floor[-1].arrival_s)
