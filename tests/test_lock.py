"""The run directory's lock: a second process gets one line naming the holder; a dead holder's lock is free."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from selfplay.cli import main
from selfplay.config import UserError
from selfplay.run.lock import LOCK_FILE, RunLock

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


def test_a_second_train_on_a_locked_run_directory_names_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    with RunLock(run):
        assert main(["train", "--config", TINY, "--run-dir", str(run), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"pid {os.getpid()} on {socket.gethostname()}" in err and "in use by another selfplay process" in err
        assert not (run / "policy").exists()  # refused before any work
        with pytest.raises(UserError, match="in use"):
            RunLock(run).__enter__()
    with RunLock(run):  # released
        pass


def test_the_lock_of_a_killed_process_is_free(tmp_path):
    run = tmp_path / "run"
    code = f"from selfplay.run.lock import RunLock; import time; RunLock({str(run)!r}).__enter__(); print('held', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"held"
        with pytest.raises(UserError, match=f"pid {proc.pid}"):
            RunLock(run).__enter__()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (run / LOCK_FILE).is_file()  # the file stays; the kernel dropped the lock with its holder
    with RunLock(run):
        pass


def test_a_run_directory_that_cannot_be_made_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    assert main(["train", "--config", TINY, "--run-dir", str(tmp_path / "file" / "run"), "--no-progress"]) == 2
    assert f"cannot write in {tmp_path / 'file'}: Not a directory" in capsys.readouterr().err  # the run-directory probe
