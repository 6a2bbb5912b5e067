"""The workdir's guarantees without training: one run at a time, a journal that keeps every
valid row, writes that never follow planted links, SIGINT/SIGTERM handling (docs/RELIABILITY.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import pytest

from vard_jax.training import faults
from vard_jax.training.metrics import MetricWriter, read_journal, read_rows
from vard_jax.training.workdir import WorkdirError, WorkdirLock, write_atomic

REPO = pathlib.Path(__file__).resolve().parents[1]


def digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO))


# --- one run per workdir ------------------------------------------------------------------------
def test_a_held_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    with WorkdirLock(tmp_path):
        with pytest.raises(WorkdirError) as error:
            WorkdirLock(tmp_path).acquire()
        message = str(error.value)
        assert "\n" not in message
        assert message.startswith(f"workdir {tmp_path} is in use by another run (pid "
                                  f"{os.getpid()} on "), message
        assert message.endswith("; wait for it to end, or use another --workdir")
    with WorkdirLock(tmp_path):  # released: free again
        pass
    assert not (tmp_path / ".lock").exists()  # a clean end leaves nothing


def test_a_dead_runs_lock_is_taken_over_with_a_line(tmp_path, caplog):
    """A process killed while holding the lock leaves its record but no lock (the kernel drops
    flocks of dead processes): the next run takes over and says so."""
    code = ("import os, sys; from vard_jax.training.workdir import WorkdirLock; "
            f"WorkdirLock({str(tmp_path)!r}).acquire(); os._exit(9)")  # dies holding it
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env()).returncode == 9
    record = json.loads((tmp_path / ".lock").read_text())
    with caplog.at_level(logging.WARNING):
        lock = WorkdirLock(tmp_path).acquire()
    lock.release()
    assert (f"took over the lock of a run that ended without releasing it (pid {record['pid']} "
            f"on {record['host']}") in caplog.text


def test_a_second_run_on_a_workdir_is_one_line_and_touches_nothing(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text('{"step": 0}\n')
    with WorkdirLock(workdir):  # this test process is "the first run"
        before = {p.name: digest(p) for p in workdir.iterdir()}
        result = subprocess.run(
            [sys.executable, "-m", "vard_jax.main", "--config=configs/shapes.py:tiny",
             f"--workdir={workdir}"], cwd=REPO, env=env(), capture_output=True, text=True,
            timeout=300)
        assert {p.name: digest(p) for p in workdir.iterdir()} == before
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith(("I1", "W1"))]
    assert lines == [f"error: workdir {workdir} is in use by another run (pid {os.getpid()} on "
                     f"{lines[0].split(' on ', 1)[1]}"], result.stderr
    assert "Traceback" not in result.stderr


def test_a_planted_link_as_lock_file_is_refused(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("precious")
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / ".lock").symlink_to(target)
    with pytest.raises(WorkdirError, match="is a symbolic link, not this program's lock file"):
        WorkdirLock(workdir).acquire()
    assert target.read_text() == "precious"


# --- the metrics journal --------------------------------------------------------------------------
def rows_text(steps) -> str:
    return "".join(json.dumps({"step": s, "reward_mean": s / 10, "wall_s": 10.0 * s}) + "\n"
                   for s in steps)


def test_a_garbled_middle_line_drops_only_itself_and_the_file_is_kept(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    lines = rows_text(range(4)).splitlines(keepends=True)
    lines[1] = '{"step": 1, "rew@@rd\n'
    path.write_text("".join(lines))
    original = digest(path)
    with caplog.at_level(logging.WARNING):
        writer = MetricWriter(tmp_path, resume_step=3)
    assert [r["step"] for r in read_rows(path)] == [0, 2, 3]
    assert writer.wall_offset == 30.0
    assert "1 unreadable line(s) dropped (line 2)" in caplog.text
    assert digest(tmp_path / "metrics.jsonl.unreadable-1") == original
    writer.write(4, {"reward_mean": 0.4})
    assert [r["step"] for r in read_rows(path)] == [0, 2, 3, 4]


def test_a_binary_journal_is_named_kept_and_replaced(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(bytes(range(256)) * 4)
    original = digest(path)
    with caplog.at_level(logging.WARNING):
        MetricWriter(tmp_path, resume_step=2)
    assert read_rows(path) == [] and path.read_text() == ""
    assert f"{path}: " in caplog.text and "unreadable line(s) dropped" in caplog.text
    assert digest(tmp_path / "metrics.jsonl.unreadable-1") == original


def test_only_a_torn_last_line_is_dropped_without_a_copy(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text(rows_text(range(3)) + '{"step": 3, "rew')
    journal = read_journal(path)
    assert journal.torn and journal.unreadable == [] and len(journal.rows) == 3
    with caplog.at_level(logging.WARNING):
        MetricWriter(tmp_path, resume_step=5)
    assert [r["step"] for r in read_rows(path)] == [0, 1, 2]
    assert "dropped a torn last line" in caplog.text
    assert not list(tmp_path.glob("*.unreadable-*"))


def test_repeated_steps_keep_the_last_row_of_each(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(rows_text([0, 0, 1, 1, 2]))
    MetricWriter(tmp_path, resume_step=2)
    assert [r["step"] for r in read_rows(path)] == [0, 1, 2]
    assert (tmp_path / "metrics.jsonl.unreadable-1").read_text() == rows_text([0, 0, 1, 1, 2])


# --- writes never follow planted links -----------------------------------------------------------
def test_planted_links_are_replaced_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    victims = {name: outside / name for name in ("a.txt", "b.txt", "c.txt")}
    for victim in victims.values():
        victim.write_text("precious")
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text(rows_text(range(2)))
    # The temporary names earlier versions used, and a destination that is itself a link.
    (workdir / "metrics.jsonl.tmp").symlink_to(victims["a.txt"])
    (workdir / "eval_step_2.json.tmp").symlink_to(victims["b.txt"])
    (workdir / "eval_step_2.json").symlink_to(victims["c.txt"])
    writer = MetricWriter(workdir, resume_step=1)
    writer.write(2, {"reward_mean": 0.2})
    from vard_jax.training.runs import write_json

    write_json(workdir / "eval_step_2.json", {"step": 2})
    assert all(v.read_text() == "precious" for v in victims.values())
    assert not (workdir / "eval_step_2.json").is_symlink()
    assert json.loads((workdir / "eval_step_2.json").read_text()) == {"step": 2}
    assert [r["step"] for r in read_rows(workdir / "metrics.jsonl")] == [0, 1, 2]
    # write_atomic leaves no temporary behind
    assert sorted(p.name for p in workdir.iterdir()) == [
        "eval_step_2.json", "eval_step_2.json.tmp", "metrics.jsonl", "metrics.jsonl.tmp"]


def test_an_appended_journal_that_became_a_link_is_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    writer = MetricWriter(tmp_path / "run", resume_step=None)
    (tmp_path / "run" / "metrics.jsonl").unlink()
    (tmp_path / "run" / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(OSError):
        writer.write(1, {"x": 1.0})
    assert victim.read_text() == "precious"
    write_atomic(tmp_path / "run" / "metrics.jsonl", "replaced\n")
    assert victim.read_text() == "precious"


# --- SIGINT and SIGTERM ---------------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_only_asks_to_stop(signum):
    """In a process of its own: a test process must not get a real Ctrl-C."""
    program = textwrap.dedent(f"""
        import os, signal
        from vard_jax.training import faults
        # (what the shell gave: a background job starts with SIGINT ignored)
        before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        with faults.Preemption() as preemption:
            os.kill(os.getpid(), {int(signum)})
            print(preemption.requested, preemption.stop_now(), preemption.signal_name)
        print(signal.getsignal(signal.SIGINT) == before[0],
              signal.getsignal(signal.SIGTERM) == before[1])
    """)
    result = subprocess.run([sys.executable, "-c", program], cwd=REPO, env=env(),
                            capture_output=True, text=True, timeout=120)
    name = signal.Signals(signum).name
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"True True {name}", "True True"]  # then restored
    assert result.stderr.splitlines() == [
        f"{name}: stopping after this epoch with a checkpoint (send it again to stop at once)"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_stops_at_once_with_one_line(signum):
    program = textwrap.dedent(f"""
        import os, time
        from vard_jax.training import faults
        with faults.Preemption():
            os.kill(os.getpid(), {int(signum)})
            os.kill(os.getpid(), {int(signum)})
            time.sleep(30)
        print("not reached")
    """)
    result = subprocess.run([sys.executable, "-c", program], cwd=REPO, env=env(),
                            capture_output=True, text=True, timeout=120)
    name = signal.Signals(signum).name
    assert result.returncode == 128 + signum, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{name}: stopping after this epoch with a checkpoint (send it again to stop at once)",
        f"error: second {name}: stopped at once, without saving this epoch; run the same "
        "command to resume from the latest checkpoint"], result.stderr
