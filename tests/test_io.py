"""Files of a scoring run (issue 15): output permissions, orphan temp files, the --out lock, result clean-up, JSON
without NaN, the per-member cache key."""

import fcntl
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lmsys_trl import io
from lmsys_trl.io import atomic_output, write_json


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077], ids=oct)
def test_atomic_outputs_get_the_permissions_of_a_plain_open(tmp_path, umask, mask):
    """safetensors writes its file 0600; through atomic_output it must end like open() would: 0666 & ~umask."""
    umask(mask)
    with atomic_output(str(tmp_path / "adapter_model.safetensors")) as tmp:
        save_file({"w": torch.zeros(2)}, tmp)
    write_json(str(tmp_path / "metrics.json"), {"a": 1})
    expected = 0o666 & ~mask
    assert mode(tmp_path / "adapter_model.safetensors") == expected
    assert mode(tmp_path / "metrics.json") == expected


def test_metrics_json_refuses_nan_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError):
        write_json(str(tmp_path / "metrics.json"), {"log_loss": float("nan")})
    assert os.listdir(tmp_path) == []
    write_json(str(tmp_path / "metrics.json"), {"log_loss": 0.5})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"log_loss": 0.5}


def dead_pid() -> int:
    """The pid of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_orphan_temp_files_of_dead_runs_are_cleaned(tmp_path):
    out = tmp_path / "out"
    (out / "members").mkdir(parents=True)
    dead, alive = dead_pid(), os.getppid()
    orphans = [out / f"submission.csv.tmp-{dead}", out / f"report.html.tmp-{dead}", out / f"confusion.png.tmp-{dead}",
               out / "members" / f"lora-data.parquet.tmp-{dead}"]
    kept = [out / f"submission.csv.tmp-{alive}",  # a live process's file
            out / f"notes.txt.tmp-{dead}",  # not a name this project writes
            out / "members" / f"lora-data.parquet.tmp-{alive}", out / "submission.csv.tmp-x"]
    for path in orphans + kept:
        path.write_text("partial")
    removed = io.clean_orphans(str(out))
    assert sorted(removed) == sorted(map(str, orphans))
    assert not any(p.exists() for p in orphans) and all(p.exists() for p in kept)


def test_output_lock_refuses_a_second_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with io.output_lock(str(out)):
        with pytest.raises(RuntimeError, match=f"{out} is in use by another run .*pid {os.getpid()}"):
            with io.output_lock(str(out)):
                pass
        # another process sees the lock too
        probe = (f"import fcntl; f = open({str(out / '.lock')!r}, 'a');\n"
                 "try:\n fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')\nexcept OSError: print('held')")
        assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "held"
    with io.output_lock(str(out)):  # released at the end of the run
        pass
    with open(out / ".lock") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_clear_results_removes_only_this_projects_result_files(tmp_path):
    ours = ["metrics.json", "predictions.parquet", "submission.csv", "report.html", "reliability.png",
            "confusion.png", "loss_by_length.png"]
    theirs = ["notes.md", "plot.png", "oof_metrics.json"]
    for name in ours + theirs:
        (tmp_path / name).write_text("x")
    (tmp_path / "members").mkdir()
    (tmp_path / "members" / "m-data.parquet").write_text("x")
    io.clear_results(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(theirs + ["members"])
    assert os.listdir(tmp_path / "members") == ["m-data.parquet"]  # the member cache stays


def test_final_probabilities_are_checked():
    good = np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    io.check_probabilities(good)
    for bad, why in [([[np.nan, 0.5, 0.5]], "not finite"), ([[1.2, -0.2, 0.0]], r"outside \[0, 1\]"),
                     ([[0.2, 0.2, 0.2]], "do not sum to 1")]:
        with pytest.raises(RuntimeError, match=why):
            io.check_probabilities(np.array(bad))


def test_a_forked_child_does_not_keep_the_output_locked(tmp_path):
    """Tokenisation workers are forked while eval holds `<out>/.lock`: once they close their inherited descriptor
    (`release_inherited_locks`, in each worker's initializer), the lock dies with the parent, not with the last
    worker (a killed eval's workers kept a --resume run out)."""
    import fcntl
    import os
    import signal
    import time

    from lmsys_trl.io import LOCK_FILE, output_lock, release_inherited_locks

    out = str(tmp_path)
    read, write = os.pipe()
    with output_lock(out):
        pid = os.fork()
        if pid == 0:  # the child: drop the inherited lock, then outlive the parent's hold
            release_inherited_locks()
            os.write(write, b"x")
            time.sleep(30)
            os._exit(0)
        os.read(read, 1)
    try:
        fd = os.open(os.path.join(out, LOCK_FILE), os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free although the child still runs
        finally:
            os.close(fd)
        with output_lock(out):
            pass
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
