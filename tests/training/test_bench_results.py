"""Tests of pneumo_tf.training.bench_results: every benchmark's JSON carries the machine and the date."""

import json

from pneumo_tf.training import bench_results


def test_save_writes_the_result_with_machine_and_date(tmp_path):
    path = bench_results.save("bench_x", {"speedup": 2.5}, tmp_path)
    saved = json.loads(path.read_text())
    assert path.parent == tmp_path and path.name.startswith("bench_x-")
    assert saved["benchmark"] == "bench_x" and saved["speedup"] == 2.5
    assert saved["date"].startswith("20") and saved["machine"]["cores"] >= 1
    assert saved["machine"]["cpu"] and isinstance(saved["machine"]["cpu_flags"], list)
    assert bench_results.latest("bench_x", tmp_path) == saved
    assert bench_results.latest("bench_y", tmp_path) is None


def test_machine_lists_the_flags_that_matter(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Test CPU 9000\nflags\t\t: fpu avx2 amx_bf16 sse\n")
    info = bench_results.machine(str(cpuinfo))
    assert info["cpu"] == "Test CPU 9000" and info["cpu_flags"] == ["avx2", "amx_bf16"]
