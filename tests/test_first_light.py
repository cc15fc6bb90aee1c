"""bench/first_light.sh proves itself on CPU: its dry run executes every stage's CPU analogue,
checks that every smoke-list test id still exists, and packs a cut-proof result folder."""
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "first_light.sh"
STAGES = ("triton-smoke", "cuda-smoke", "kernels", "decode", "e2e")


def _run(args, out, env=None, timeout=400):
    return subprocess.run(["bash", str(SCRIPT), *args, str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_dry_run_every_stage_passes_and_packs(tmp_path):
    r = _run(["--dry-run"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = (tmp_path / "summary.txt").read_text()
    print(summary)
    for stage in STAGES:
        m = re.search(rf"^\[{stage}\] rc=(\d+)", summary, re.M)
        assert m, f"stage {stage} did not run:\n{summary}"
        assert m.group(1) == "0", f"stage {stage} failed:\n{summary}"
    assert "SKIPPED" not in summary
    # the smoke lists' ids all exist: pytest collected exactly as many tests as listed
    for stage, name in (("triton-smoke", "triton"), ("cuda-smoke", "cuda")):
        listed = [line for line in (ROOT / "bench" / f"first_light_{name}.txt").read_text().splitlines()
                  if line.strip() and not line.lstrip().startswith("#")]
        assert 15 <= len(listed) <= 30, f"{name} smoke list has {len(listed)} tests"
        m = re.search(rf"^\[{stage}\].*\n\s+(\d+) tests? collected", summary, re.M)
        assert m and int(m.group(1)) == len(listed), summary
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["results.tgz", "summary.txt"], files     # the device tool returns <= 8
    with tarfile.open(tmp_path / "results.tgz") as t:
        names = t.getnames()
    for stage in STAGES + ("probe",):
        assert f"./logs/{stage}.log" in names, names
    assert any(n.startswith("./json/e2e_") and n.endswith(".json") for n in names), names


def test_budget_skips_stages_that_no_longer_fit(tmp_path):
    # A 25 s budget with 20 s minimum per stage: the first stage may run, the rest are skipped
    # with a note, and the folder is still packed.
    env = dict(__import__("os").environ, FIRST_LIGHT_BUDGET_S="1", MIN_STAGE_S="20")
    r = _run(["--dry-run"], tmp_path, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = (tmp_path / "summary.txt").read_text()
    for stage in STAGES:
        assert re.search(rf"^\[{stage}\] SKIPPED", summary, re.M), summary
    assert (tmp_path / "results.tgz").stat().st_size > 0


def test_rerun_of_a_missing_id_is_reported(tmp_path):
    bad = tmp_path / "failed.txt"
    bad.write_text("tests/test_nonexistent_module.py::test_nothing\n")
    out = tmp_path / "out"
    r = _run(["--dry-run", "--rest", "--failed", str(bad)], out, timeout=120)
    assert r.returncode == 0
    summary = (out / "summary.txt").read_text()
    m = re.search(r"^\[rerun-failed\] rc=(\d+)", summary, re.M)
    assert m and m.group(1) != "0", summary
