"""The benchmark's smoke test: one tiny run through every method and every measurement, so it cannot rot.
No timing is asserted."""
import json

import pytest
import torch

from guided_swap.checks import benchmark


def test_benchmark_smoke(tmp_path):
    config = benchmark.Config(models=(("resnet18", "layer4", 32),), batches=(2,), rounds=1, warmup=0, rss_repeats=1,
                              rss_batch=2, rss_methods=("plain", "gs_all"), conversion=False)
    results = benchmark.run(config)
    row = results["rows"][0]
    assert set(row["methods"]) == set(benchmark.EAGER_METHODS)
    for name, entry in row["methods"].items():
        assert entry["median_s"] > 0 and ("peak_rss_mib" in entry) == (name in ("plain", "gs_all")), name
        assert entry["saved_bytes"] > 0 if name != "gs_exported" else entry["saved_bytes"] is None, name
    methods = row["methods"]
    assert methods["plain"]["time_ratio"] == 1.0 and methods["plain"]["deviation"] is None
    assert methods["gs_guided"]["saved_bytes"] == methods["plain"]["saved_bytes"]
    assert methods["gs_all"]["deviation"] <= 1e-5 and methods["gs_exported"]["deviation"] <= 1e-5
    assert methods["captum_gbp"]["deviation"] <= 1e-5  # resnet18's ReLUs are all modules: hooks work
    json_path, md_path = benchmark.write(results, str(tmp_path))
    assert json.load(open(json_path))["rows"][0]["model"] == "resnet18"
    assert "| resnet18 | 2 | gs_all |" in open(md_path).read()


def test_benchmark_compiled_methods_on_cpu(tmp_path):
    """The compiled methods and the first-call measure, traced with torch.compile's "eager" backend (no code
    generation, so it stays quick on a CPU)."""
    methods = ("plain", "plain_compiled", "gs_all_compiled")
    config = benchmark.Config(models=(("resnet18", "layer4", 32),), batches=(2,), methods=methods, rounds=1, warmup=1,
                              rss_repeats=0, conversion=False, compile_options={"backend": "eager"})
    row = benchmark.run(config)["rows"][0]
    for name in methods:
        entry = row["methods"][name]
        assert entry["median_s"] > 0 and entry["first_call_s"] > 0, name
        assert entry["saved_bytes"] is None if name.endswith("_compiled") else entry["saved_bytes"] > 0, name
    assert row["methods"]["gs_all_compiled"]["deviation"] <= 1e-5


def gpu_results():
    """A made-up GPU result (CI has no GPU): what the renderers and the writer receive from --device cuda."""
    entry = lambda ms, dev, peak: {"median_s": ms / 1000, "min_s": ms / 1000, "max_s": ms / 1000, "saved_bytes": None,
                                   "deviation": dev, "first_call_s": 1.0, "peak_cuda_mib": peak}
    methods = {"plain": entry(10.0, None, 100.0), "gs_all": entry(11.0, 0.0, 101.0),
               "plain_compiled": entry(3.8, None, 90.0), "gs_all_compiled": entry(4.0, 1e-7, 91.8),
               "captum_ggc": entry(20.0, 0.21, 200.0)}
    row = {"model": "densenet121", "layer": "features", "size": 224, "batch": 32, "methods": methods}
    benchmark._add_ratios(row)
    machine = dict(benchmark.machine(), gpu="NVIDIA H100 80GB HBM3", cuda="13.0", tf32=False)
    config = dict(vars(benchmark.Config(methods=tuple(methods), device="cuda",
                                        compile_options={"mode": "reduce-overhead"})))
    return {"machine": machine, "config": config, "rows": [row]}


def test_gpu_tables_name_the_gpu_and_torch_and_go_to_their_own_files(tmp_path):
    results = gpu_results()
    table = benchmark.readme_table(results)
    assert "NVIDIA H100 80GB HBM3" in table and f"torch {results['machine']['torch']}" in table
    assert ("| densenet121 | 32 | 10.0 | 1.10× | 0.38× | 0.40× | 2.00× **wrong (21%)** | 1.05× | 1.01× | 1.02× |"
            in table)
    assert "mode='reduce-overhead'" in table
    paths = benchmark.write(results, str(tmp_path))
    assert sorted(p.split("/")[-1] for p in paths) == ["readme_gpu.md", "results_gpu.json", "results_gpu.md"]
    assert "| densenet121 | 32 | gs_all_compiled | 4.0 |" in open(paths[1]).read()
    assert not (tmp_path / "results.md").exists()  # the CPU table is never overwritten by a GPU run


def test_device_defaults_and_a_missing_gpu_is_a_clear_error(monkeypatch):
    """--device picks the batches, methods, compile mode, warm-up and RSS defaults; asking for CUDA where torch
    sees none stops with a sentence naming the device and the torch version."""
    args = benchmark.argparse.Namespace(device="cpu", batches=None, methods=None, compile_mode=None, warmup=None,
                                        rss_repeats=None)
    benchmark._fill_device_defaults(args)
    assert (args.batches, args.methods, args.compile_mode, args.warmup, args.rss_repeats) == (
        [1, 16], list(benchmark.EAGER_METHODS), None, 1, 3)
    monkeypatch.setattr(benchmark.torch.cuda, "is_available", lambda: True)
    args = benchmark.argparse.Namespace(device="cuda:0", batches=None, methods=None, compile_mode=None, warmup=None,
                                        rss_repeats=None)
    benchmark._fill_device_defaults(args)
    assert (args.batches, args.methods, args.compile_mode, args.warmup, args.rss_repeats) == (
        [1, 32, 128], list(benchmark.ALL_METHODS), "reduce-overhead", 3, 0)
    monkeypatch.setattr(benchmark.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--device cuda.*sees no CUDA device"):
        benchmark.main(["--device", "cuda", "--models", "resnet18:layer4:32", "--no-conversion"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_benchmark_on_cuda(tmp_path):
    methods = ("plain", "gs_all", "plain_compiled", "gs_all_compiled")
    config = benchmark.Config(models=(("resnet18", "layer4", 32),), batches=(2,), methods=methods, rounds=1, warmup=3,
                              rss_repeats=0, conversion=False, device="cuda",
                              compile_options={"mode": "reduce-overhead"})
    results = benchmark.run(config)
    row = results["rows"][0]
    for name in methods:
        assert row["methods"][name]["peak_cuda_mib"] > 0, name
    assert row["methods"]["gs_all"]["deviation"] <= 1e-4 and row["methods"]["gs_all_compiled"]["deviation"] <= 1e-2
    assert results["machine"]["gpu"] and not results["machine"]["tf32"]
    assert "readme_gpu.md" in [p.split("/")[-1] for p in benchmark.write(results, str(tmp_path))]
