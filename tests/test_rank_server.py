"""conftest's run_ranks (tests/rank_server.py), which most multi-rank tests run on: each rank sees what a
launched python would, a failed rank ends the others, and a run past its timeout fails the test."""

import json
import time

import pytest

from conftest import run_ranks

SCRIPT = """
import json, os, sys, time
# one write, line and newline: the ranks share the file, and unbuffered (PYTHONUNBUFFERED) print() writes
# the newline apart, so two ranks' lines could run together ('Extra data' in CI)
sys.stdout.write(json.dumps({"argv": sys.argv, "path0": sys.path[0], "cwd": os.getcwd(),
                             "rank": os.environ.get("RANK"), "world": os.environ.get("WORLD_SIZE"),
                             "slurm": os.environ.get("SLURM_PROCID"), "mine": os.environ.get("MINE"),
                             "name": __name__}) + "\\n")
sys.stdout.flush()
what = os.environ.get("WHAT", "")
if what == "fail" and os.environ.get("RANK") == "1":
    sys.exit(3)
if what in ("fail", "hang"):
    time.sleep(120)
"""


def test_each_rank_is_a_python_running_the_script(tmp_path):
    (tmp_path / "s.py").write_text(SCRIPT)
    for launcher in ("torchrun", "srun"):
        proc = run_ranks(2, ["a", "b"], tmp_path, script=tmp_path / "s.py", env={"MINE": "x"}, launcher=launcher)
        seen = sorted((json.loads(l) for l in proc.stdout.splitlines()), key=lambda r: r["rank"] or r["slurm"])
        assert [(r["rank"], r["world"], r["slurm"]) for r in seen] == (
            [("0", "2", None), ("1", "2", None)] if launcher == "torchrun" else [(None, None, "0"), (None, None, "1")]
        )
        assert all(
            r["argv"] == [str(tmp_path / "s.py"), "a", "b"]
            and r["path0"] == str(tmp_path)
            and r["cwd"] == str(tmp_path)
            and r["mine"] == "x"
            and r["name"] == "__main__"
            for r in seen
        )


def test_a_failed_rank_ends_the_others_and_a_run_past_its_timeout_fails(tmp_path):
    (tmp_path / "s.py").write_text(SCRIPT)
    t0 = time.monotonic()
    proc = run_ranks(2, [], tmp_path, script=tmp_path / "s.py", env={"WHAT": "fail"}, check=False)
    assert proc.returncode == 3 and time.monotonic() - t0 < 60  # rank 0 killed ~10 s after rank 1 failed
    with pytest.raises(pytest.fail.Exception, match="ran past 2 s"):
        run_ranks(2, [], tmp_path, script=tmp_path / "s.py", env={"WHAT": "hang"}, timeout=2)
