"""bigbatch.bench.compile_speed --smoke: the eager-vs-compiled benchmark runs and reports (no time asserted)."""

from __future__ import annotations

import json
import statistics

from bigbatch.bench import compile_speed


def test_smoke_writes_json_markdown_and_plot_with_paired_ratios(tmp_path):
    report = compile_speed.main(["--smoke", "--plain", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "compile-cpu.json").read_text())
    assert saved == json.loads(json.dumps(report))
    r = saved["result"]
    assert (r["model"], r["backend"], r["batch"], r["samples_per_step"]) == ("bigbatch-tiny", "eager", "4 x 2", 8)
    assert len(r["eager_seconds"]) == len(r["compiled_seconds"]) == r["rounds"] == 1
    ratios = [e / c for e, c in zip(r["eager_seconds"], r["compiled_seconds"])]
    assert r["speedup"] == round(statistics.median(ratios), 3)
    assert r["compiled_samples_per_s"] == round(8 / statistics.median(r["compiled_seconds"]), 1)
    assert saved["environment"]["device"] and saved["environment"]["date"]
    # --plain: the same 8 samples as one micro-batch; accumulated/plain per mode, paired by round
    for mode in ("eager", "compiled"):
        plain, accumulated = r[f"plain_{mode}_seconds"], r[f"{mode}_seconds"]
        assert len(plain) == 1
        assert r[f"ratio_{mode}"] == round(statistics.median([p / a for p, a in zip(plain, accumulated)]), 3)
    markdown = (tmp_path / "compile-cpu.md").read_text()
    assert "| round | eager (s/step) | compiled (s/step) |" in markdown and "--smoke" in markdown
    assert f"| accumulated / plain | {r['ratio_eager']} | {r['ratio_compiled']} |" in markdown
    assert (tmp_path / "compile-cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
