"""The benchmark harness itself: statistics, the FLOP/byte model, the JSON schema, CLI parsing,
and a tiny end-to-end ``--suite quick`` run (device_check.sh: tests/test_device_check.py)."""

import json
from pathlib import Path

import pytest
import torch

from lora_triton.benchmark import cli, report
from lora_triton.benchmark.cases import Case, suite_cases
from lora_triton.benchmark.providers import build_single_providers
from lora_triton.benchmark.roofline import (
    Ceilings,
    base_linear_cost,
    lora_linear_cost,
    measure_ceilings,
    multi_lora_cost,
    roofline_seconds,
    unfused_extra_bytes,
)
from lora_triton.benchmark.runner import RunSettings, run_cases
from lora_triton.benchmark.shapes import MODELS, parse_models, serve_grid_points
from lora_triton.benchmark.stats import percentile, summarize
from lora_triton.benchmark.timing import measure_interleaved, saved_tensor_bytes

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


# --- statistics -------------------------------------------------------------------------------

def test_percentile_matches_linear_interpolation():
    samples = [float(v) for v in range(10, 0, -1)]  # unsorted on purpose
    assert percentile(samples, 50) == 5.5
    assert percentile(samples, 20) == pytest.approx(2.8)
    assert percentile(samples, 80) == pytest.approx(8.2)
    assert percentile([3.0], 80) == 3.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize_orders_statistics():
    s = summarize([0.3, 0.1, 0.2, 5.0, 0.25])
    assert s.n == 5 and s.min_s == 0.1 and s.max_s == 5.0 and s.median_s == 0.25
    assert s.min_s <= s.p20_s <= s.median_s <= s.p80_s <= s.max_s
    with pytest.raises(ValueError):
        summarize([])


def test_interleaved_timing_rotates_order_and_inputs():
    calls = []
    fns = {n: (lambda i, n=n: calls.append((n, i))) for n in ("a", "b", "c")}
    out = measure_interleaved(fns, CPU, repeats=3, warmup=1, n_sets=2)
    assert {k: len(v) for k, v in out.items()} == {"a": 3, "b": 3, "c": 3}
    timed = calls[3:]
    assert [n for n, _ in timed] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [i for _, i in timed] == [0, 0, 0, 1, 1, 1, 0, 0, 0]


# --- FLOP / byte model (REFERENCE.md §1, §4) ----------------------------------------------------

def test_lora_flops_formula_and_overhead():
    m, k, n, r = 8192, 4096, 4096, 16
    fwd = lora_linear_cost(m, k, n, r, 2, "fwd")
    assert fwd.flops == 2 * m * n * k + 2 * m * k * r + 2 * m * n * r
    train, base = lora_linear_cost(m, k, n, r, 2, "fwd+bwd"), base_linear_cost(m, k, n, 2, "fwd+bwd")
    assert base.flops == 4 * m * n * k
    assert train.flops / base.flops - 1 == pytest.approx(0.012, abs=0.001)  # "LoRA adds 1.2% FLOPs"
    h200 = Ceilings(flops_per_s=790e12, bytes_per_s=4.3e12, matmul_n=8192, copy_bytes=1 << 30)
    assert roofline_seconds(base, h200) == pytest.approx(696e-6, rel=0.01)  # "about 696 us at the roofline"
    assert base.bytes == 2 * 2 * (m * k + n * k + m * n)
    assert train.bytes > base.bytes
    with pytest.raises(ValueError):
        lora_linear_cost(m, k, n, r, 2, "bwd")


def test_unfused_traffic_exceeds_fused():
    m, k, n, r = 2048, 4096, 4096, 16
    extra0 = unfused_extra_bytes(m, k, n, r, 4, "fwd+bwd", 0.0)
    extra1 = unfused_extra_bytes(m, k, n, r, 4, "fwd+bwd", 0.1)
    assert 0 < extra0 < extra1
    assert unfused_extra_bytes(m, k, n, r, 4, "fwd", 0.0) == 4 * (6 * m * n + m * k)


def test_multi_lora_decode_bytes():
    """256 tokens on 256 adapters, hidden 4096, r=16, bf16: 73 MB to move, 17 us at 4.3 TB/s."""
    delta = multi_lora_cost(256, 4096, 4096, [16] * 256, [16] * 256, 2, include_base=False)
    assert delta.bytes == pytest.approx(73e6, rel=0.01)
    assert delta.bytes / 4.3e12 == pytest.approx(17e-6, rel=0.03)
    full = multi_lora_cost(256, 4096, 4096, [16] * 256, [16] * 256, 2, include_base=True)
    assert full.flops == pytest.approx(2 * 256 * 4096 * 4096 + 256 * 2 * 16 * 8192)
    assert full.bytes - delta.bytes == 2 * (4096 * 4096 - 256 * 4096)


def test_ceilings_measure_positive():
    c = measure_ceilings(CPU, torch.float32, repeats=2, matmul_n=128, copy_bytes=1 << 20)
    assert c.flops_per_s > 0 and c.bytes_per_s > 0 and c.matmul_n == 128


# --- shapes and cases --------------------------------------------------------------------------

def test_model_shapes_and_parsing():
    assert MODELS["llama-8b"].projection("up_proj") == (4096, 14336)
    assert MODELS["llama-70b"].projection("k_proj") == (8192, 1024)
    assert MODELS["qwen2.5-7b"].projection("down_proj") == (18944, 3584)
    assert [m.name for m in parse_models("llama-8b, mistral-7b")] == ["llama-8b", "mistral-7b"]
    assert "tiny" not in [m.name for m in parse_models("all")]
    with pytest.raises(ValueError, match="unknown model"):
        parse_models("gpt-5")
    assert all(a <= t for t, a, _ in serve_grid_points())


def test_suites_hold_the_reference_cases():
    llama = parse_models("llama-8b")
    cpu_train = [c for c in suite_cases("train", llama, cuda=False) if c.op == "lora_linear"]  # DoRA: test_dora_bench
    # Three square widths (the mask's share of the step shrinks with width) and the MLP's up_proj.
    train_keys = {(c.mode, c.tokens, c.in_features, c.out_features, c.rank, c.dropout_p, c.dtype) for c in cpu_train}
    assert train_keys == {("fwd+bwd", 2048, w, n, 16, p, "float32") for w, n in
                          ((1024, 1024), (2048, 2048), (4096, 4096), (4096, 14336)) for p in (0.0, 0.1)} | {
        ("fwd", 2048, 4096, 4096, 16, 0.0, "float32")}
    assert len({c.name for c in cpu_train}) == len(cpu_train)
    cpu_serve = suite_cases("serve", llama, cuda=False)
    assert {(c.batch, c.seq_len, c.adapters) for c in cpu_serve} == {(64, 1, 16), (256, 1, 16)}
    gpu = suite_cases("all", llama, cuda=True)
    keys = {(c.op, c.mode, c.tokens, c.out_features, c.rank, c.dropout_p, c.adapters) for c in gpu}
    assert ("lora_linear", "fwd+bwd", 8192, 4096, 16, 0.1, 1) in keys
    assert ("lora_linear", "fwd+bwd", 8192, 14336, 16, 0.1, 1) in keys
    assert ("lora_linear", "fwd+bwd", 8192, 4096, 64, 0.1, 1) in keys
    assert ("multi_lora_linear", "fwd", 256, 4096, 16, 0.0, 256) in keys
    assert any(c.tags == ("mixed",) and len(set(c.adapter_ranks)) == 4 for c in gpu)
    assert all(c.dtype == "bfloat16" for c in gpu)
    assert len({c.name for c in gpu}) == len(gpu)


def test_saved_for_backward_proxy():
    """PEFT's composition keeps D(x) and the mask per layer at p > 0; the fused op keeps U only."""
    case = Case("t", "lora_linear", "fwd+bwd", "t", 64, 128, 96, 4, "float32", dropout_p=0.1)
    providers, skipped = build_single_providers(case, CPU, ["lora_triton", "torch_unfused", "base"], 1)
    assert not skipped
    saved = {p.name: saved_tensor_bytes(p.fn, 0, p.exclude) for p in providers}
    assert saved["base"] == 0
    assert saved["lora_triton"] < 64 * 4 * 8  # U [64, 4] fp32 + the seed
    assert saved["torch_unfused"] >= 2 * 64 * 128 * 4  # D(x) and the dropout scale tensor


# --- CLI, JSON, end to end ---------------------------------------------------------------------

def test_cli_argument_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--suite", "nope"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["--repeats", "0"])
    assert cli.main(["--shapes", "gpt-5", "--list"]) == 2
    assert cli.main(["--providers", "bogus", "--shapes", "tiny", "--max-cases", "1", "--no-ceilings"]) == 2
    if not torch.cuda.is_available():
        assert cli.main(["--device", "cuda", "--shapes", "tiny"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_cli_list_and_defaults(capsys):
    args = cli.build_parser().parse_args([])
    assert (args.suite, args.device, args.shapes) == ("quick", "cpu", "llama-8b")
    assert cli.main(["--list", "--suite", "all", "--device", "cuda"]) == 0
    listed = capsys.readouterr().out.split()
    assert "train/llama-8b.q_proj/fwd+bwd/r16/p0.1/T8192" in listed
    assert cli.main(["--list", "--suite", "train", "--only", "up_proj,sq1024/fwd+bwd/r16/p0.1"]) == 0
    assert capsys.readouterr().out.split() == ["train/llama-8b.sq1024/fwd+bwd/r16/p0.1/T2048",
                                               "train/llama-8b.up_proj/fwd+bwd/r16/T2048",
                                               "train/llama-8b.up_proj/fwd+bwd/r16/p0.1/T2048"]


def test_only_exact_name_first_then_substrings_and_no_match_is_an_error(capsys):
    from lora_triton.benchmark.cases import select_cases
    from lora_triton.benchmark.kinds_bench import default_cases

    kinds = default_cases((1024,), None)
    names = [c.name for c in select_cases(kinds, "loha-conv2d")]
    assert names == ["loha-conv2d"]  # the exact name, not also "loha-conv2d-effective"
    assert [c.name for c in select_cases(kinds, "conv2d")] == ["lora-conv2d", "loha-conv2d", "loha-conv2d-effective"]
    assert select_cases(kinds, None) == kinds
    with pytest.raises(SystemExit, match="'nope' matches no case; the cases are: loha-linear-1024"):
        select_cases(kinds, "loha,nope")
    with pytest.raises(SystemExit, match="matches no case"):
        cli.main(["--list", "--suite", "train", "--only", "no_such_projection"])
    with pytest.raises(SystemExit, match="' , ' names no case"):
        select_cases(kinds, " , ")


def test_quick_suite_end_to_end(tmp_path, capsys):
    out_json, out_png = tmp_path / "q.json", tmp_path / "q.png"
    rc = cli.main(["--suite", "quick", "--shapes", "tiny", "--repeats", "3", "--small-ceilings",
                   "--json", str(out_json), "--plot", str(out_png)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "x base" in table and "lora_triton" in table
    doc = report.load_json(out_json)  # validates the schema
    assert doc["schema"] == report.SCHEMA and doc["device"]["type"] == "cpu" and "float32" in doc["ceilings"]
    assert doc["versions"]["torch"] == torch.__version__
    providers = {r["provider"] for r in doc["results"]}
    assert {"lora_triton", "torch_unfused", "base"} <= providers
    for r in doc["results"]:
        assert r["stats"]["n"] == 3 and r["tflops"] > 0 and r["roofline_fraction"] > 0
        if r["provider"] == "base":
            assert r["ratio_to_base"] == pytest.approx(1.0)
    assert any(r["op"] == "multi_lora_linear" for r in doc["results"])
    assert out_png.stat().st_size > 1000
    assert cli.main(["--from-json", str(out_json), "--compact"]) == 0


def test_schema_rejects_broken_documents(tmp_path):
    case = Case("t", "lora_linear", "fwd", "t", 8, 16, 16, 2, "float32")
    settings = RunSettings(device=CPU, repeats=2, warmup=0, providers=("torch_unfused", "base"), ceilings=False,
                           log=lambda s: None)
    records, skipped = run_cases([case], settings)
    doc = report.build_document("quick", {"date": "d", "command": "c", "git_revision": None, "device": {},
                                          "versions": {}}, {}, [case], records, skipped)
    bad = json.loads(json.dumps(doc))
    del bad["results"][0]["stats"]["p20_s"]
    bad["results"][1]["provider"] = 3
    with pytest.raises(ValueError, match=r"stats needs.*provider"):
        report.validate_document(bad)


def test_time_budget_skips_remaining_cases():
    case = Case("t", "lora_linear", "fwd", "t", 8, 16, 16, 2, "float32")
    settings = RunSettings(device=CPU, repeats=1, providers=("base",), ceilings=False, time_budget_s=-1.0,
                           log=lambda s: None)
    records, skipped = run_cases([case], settings)
    assert records == [] and skipped[0]["reason"].startswith("time budget")


def test_loaded_machine_warns_in_table_and_json():
    case = Case("t", "lora_linear", "fwd", "t", 8, 16, 16, 2, "float32")
    settings = RunSettings(device=CPU, repeats=3, warmup=0, providers=("lora_triton", "base"), ceilings=False,
                           log=lambda s: None)
    records, skipped = run_cases([case], settings)
    quiet = {"date": "d", "command": "c", "git_revision": None, "device": {"cpu_count": 2}, "versions": {},
             "load_average": [1.5, 1.0, 1.0], "load_average_end": [1.9, 1.2, 1.0]}
    for r in records:  # a tight spread; min/max widened so the stats stay ordered however close the samples were
        st = r["stats"]
        st.update(p20_s=st["median_s"] * 0.99, p80_s=st["median_s"] * 1.01)
        st.update(min_s=min(st["min_s"], st["p20_s"]), max_s=max(st["max_s"], st["median_s"] * 1.3))
    doc = report.build_document("quick", quiet, {}, [case], records, skipped)
    assert doc["warnings"] == [] and "WARNING" not in report.format_table(doc)
    records[0]["stats"]["p80_s"] = records[0]["stats"]["median_s"] * 1.3
    loaded = dict(quiet, load_average_end=[4.5, 2.0, 1.0])
    doc = report.build_document("quick", loaded, {}, [case], records, skipped)
    assert len(doc["warnings"]) == 2
    assert "at the end: 1-min load average 4.50 > 2 cores" in doc["warnings"][0]
    assert f"{records[0]['case']} {records[0]['provider']} (31%)" in doc["warnings"][1]
    table = report.format_table(json.loads(json.dumps(doc)))
    assert table.count("WARNING:") == 2 and "1.50/1.00/1.00 at start" in table


@pytest.mark.parametrize("cuda", [False, True])
def test_quick_suite_plots_curves(cuda):
    """Each quick series (one plot panel) sweeps at least two token counts."""
    tokens = {}
    for c in suite_cases("quick", parse_models("llama-8b"), cuda=cuda):
        tokens.setdefault(c.series, set()).add(c.tokens)
    assert len(tokens) == 4 and all(len(t) >= 2 for t in tokens.values()), tokens


def test_tiny_llama_step_benchmark_runs(tmp_path, capsys):
    pytest.importorskip("transformers", reason="the tiny Llama step needs transformers")
    from lora_triton.benchmark import tiny_llama

    out = tmp_path / "step.json"
    assert tiny_llama.main(["--hidden", "64", "--layers", "1", "--tokens", "8", "--repeats", "2",
                            "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert {"lora_triton", "base"} <= set(doc["stats"]) and doc["stats"]["lora_triton"]["n"] == 2
    assert "lora_dropout=0.05" in capsys.readouterr().out
