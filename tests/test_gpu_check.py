"""bench/gpu.sh, the device check, at its tiny CPU size (--cpu-smoke): every section writes its files and
its summary row, nothing is written into the repository, and a section that fails or runs past its
time limit is reported as such while the others still run."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("a-device", "b-smoke", "c-sampler", "d-attention", "e-train")


def gpu_sh(repo, *args):
    """Runs repo/bench/gpu.sh with this interpreter's folder first on PATH (its python3), one thread."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], OMP_NUM_THREADS="1")
    return subprocess.run(["bash", os.path.join(repo, "bench", "gpu.sh"), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600)


def snapshot(folder):
    """(path, size, mtime) of every file under folder, .git aside."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for f in filenames:
            st = os.stat(os.path.join(dirpath, f))
            out.add((os.path.relpath(os.path.join(dirpath, f), folder), st.st_size, st.st_mtime_ns))
    return out


def summary_rows(out):
    """section -> status from summary.md's table."""
    with open(os.path.join(out, "summary.md")) as f:
        rows = [line.split("|")[1:-1] for line in f
                if line.startswith("| ") and not line.startswith(("| section", "| ---"))]
    return {cells[0].strip(): cells[1].strip() for cells in rows}


@pytest.mark.slow
def test_cpu_smoke_runs_every_section_and_writes_nothing_into_the_repository(tmp_path):
    """About a minute on two quiet cores."""
    before = snapshot(ROOT)
    p = gpu_sh(ROOT, "--cpu-smoke", tmp_path / "out")
    assert p.returncode == 0, p.stderr
    assert snapshot(ROOT) == before  # not a byte, not a cache, not a bytecode file
    out = tmp_path / "out"
    for name in SECTIONS:
        for ext in ("md", "json", "headline", "log"):
            assert (out / f"{name}.{ext}").exists(), f"{name}.{ext}"
    assert summary_rows(out) == {name: "ok" for name in SECTIONS}
    assert "| b-smoke | ok |" in p.stdout and "7/7 runs ok" in p.stdout  # the summary is printed too
    smoke = (out / "b-smoke.md").read_text()
    for run in ("`sample`", "`sample --eta`", "`sample --compile`", "`train`", "`train --fsdp`", "`eval.harness`"):
        assert f"| {run} | ok |" in smoke
    assert "eager, top-p 0.99" in (out / "c-sampler.md").read_text()


def test_a_failing_and_a_hanging_section_are_reported_while_the_others_run(tmp_path):
    """In a copy of the repository, section d's script exits with 3 and section c's sleeps past
    `--limit c=3`: both are reported as such, and section a (first) still writes its files."""
    repo = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    for f in files:
        if os.path.exists(os.path.join(ROOT, f)):
            os.makedirs(repo / os.path.dirname(f), exist_ok=True)
            shutil.copy(os.path.join(ROOT, f), repo / f)
    (repo / "bench" / "gpu_attention.py").write_text("raise SystemExit(3)\n")
    (repo / "bench" / "gpu_sampler.py").write_text("import time\ntime.sleep(600)\n")
    p = gpu_sh(repo, "--cpu-smoke", "--only", "a,c,d", "--limit", "c=3", tmp_path / "out")
    assert p.returncode == 0, p.stderr
    rows = summary_rows(tmp_path / "out")
    assert rows == {"a-device": "ok", "c-sampler": "TIMED OUT at 3 s", "d-attention": "FAILED (exit 3)"}
    assert (tmp_path / "out" / "a-device.md").exists()
    assert "(no result line: see c-sampler.log)" in (tmp_path / "out" / "summary.md").read_text()


@pytest.mark.parametrize("args, message", [
    ([], "give the folder for the results"),
    (["--only", "x", "/tmp/unused"], "sections are the letters a to e"),
    (["--limit", "c", "/tmp/unused"], "--limit wants X=SECONDS"),
    ([os.path.join(ROOT, "out", "check")], "is inside the repository"),
])
def test_mistakes_are_one_line_and_write_nothing(args, message):
    before = snapshot(ROOT)
    p = gpu_sh(ROOT, *args)
    assert p.returncode == 2 and p.stderr.startswith("gpu.sh: error: ") and message in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and p.stdout == ""
    assert snapshot(ROOT) == before
