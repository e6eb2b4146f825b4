"""The benchmark's smoke test: one tiny run through every method and every measurement, so it cannot rot.
No timing is asserted."""
import json

from guided_swap import benchmark


def test_benchmark_smoke(tmp_path):
    config = benchmark.Config(models=(("resnet18", "layer4", 32),), batches=(2,), rounds=1, warmup=0, rss_repeats=1,
                              rss_batch=2, rss_methods=("plain", "gs_all"), conversion=False)
    results = benchmark.run(config)
    row = results["rows"][0]
    assert set(row["methods"]) == set(benchmark.ALL_METHODS)
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
