"""Heartbeats and the lost-peer watch (comm/liveness.py), and the per-node task count under Slurm."""
import sys
import time

import helpers as testing
import pytest

from dist_sense.comm import liveness
from dist_sense.comm.env import local_world_size, slurm_tasks_per_node
from dist_sense.comm.liveness import Beat, Watch, neighbours


def peer_file(folder, rank: int, beat: Beat) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank-{rank:05d}").write_bytes(beat.encode())


def test_each_rank_watches_its_ring_neighbours():
    assert neighbours(0, 1) == []
    assert neighbours(0, 2) == [1] and neighbours(1, 2) == [0]
    assert neighbours(0, 5) == [1, 4] and neighbours(3, 5) == [2, 4]
    watchers = {r: [w for w in range(5) if r in neighbours(w, 5)] for r in range(5)}
    assert all(len(w) == 2 for w in watchers.values())  # every rank has two watchers


def test_a_record_survives_the_round_trip_and_a_torn_one_is_no_news():
    beat = Beat("abc", 7, "running", "node-3", 4242)
    data = beat.encode()
    assert len(data) == liveness.RECORD_BYTES and Beat.decode(data) == beat
    assert Beat.decode(data[:10]) is None and Beat.decode(b"") is None


def test_a_peer_whose_heartbeat_stops_is_lost_naming_its_rank_and_host(tmp_path):
    watch = Watch(tmp_path, rank=0, world=2, token="t1", timeout=5.0, host="dsn1")
    start = watch._started
    peer_file(tmp_path, 1, Beat("t1", 1, "running", "dsn2", 99))
    assert watch.check(now=start + 1) is None
    peer_file(tmp_path, 1, Beat("t1", 2, "running", "dsn2", 99))
    assert watch.check(now=start + 4) is None  # it moved at 4 s
    assert watch.check(now=start + 8.5) is None  # 4.5 s since
    found = watch.check(now=start + 9.5)
    assert found is not None
    message, code = found
    assert code == liveness.LOST_EXIT_CODE == 4
    assert message.startswith("lost rank 1 of 2 (host dsn2): no heartbeat for 6 s")
    assert "DIST_SENSE_PEER_TIMEOUT=5" in message and "resubmit" in message


def test_a_peer_that_never_beat_in_this_launch_is_lost_after_the_timeout(tmp_path):
    watch = Watch(tmp_path, rank=1, world=2, token="new", timeout=3.0)
    peer_file(tmp_path, 0, Beat("old", 50, "running", "dsn1", 1))  # left by an earlier launch
    assert watch.check(now=watch._started + 2) is None
    message, code = watch.check(now=watch._started + 3.5)
    assert "lost rank 0 of 2 (its host never wrote a heartbeat)" in message and "since this stage started" in message


def test_a_peer_that_ended_well_is_no_longer_watched_and_one_that_failed_ends_its_watchers(tmp_path):
    watch = Watch(tmp_path, rank=0, world=3, token="t", timeout=1.0)
    peer_file(tmp_path, 1, Beat("t", 3, "ended:0", "a", 1))
    peer_file(tmp_path, 2, Beat("t", 3, "running", "b", 2))
    assert watch.check(now=watch._started + 0.5) is None
    assert watch.watched == [2]
    peer_file(tmp_path, 2, Beat("t", 4, "ended:2", "b", 2))
    message, code = watch.check(now=watch._started + 0.6)
    assert code == 2 and "rank 2 of 3 (host b, pid 2) ended with exit code 2" in message


def test_two_live_watches_see_each_other_and_a_frozen_one_is_reported(tmp_path):
    reports = []
    a = Watch(tmp_path, 0, 2, "tok", timeout=1.0, on_peer_gone=lambda m, c: reports.append((m, c)), host="ha").start()
    b = Watch(tmp_path, 1, 2, "tok", timeout=1.0, on_peer_gone=lambda m, c: reports.append((m, c)), host="hb").start()
    time.sleep(1.6)
    assert reports == []  # both beating: nobody lost
    b._stop.set()  # b freezes without recording an end, as a killed process would
    b._thread.join()
    deadline = time.time() + 5
    while not reports and time.time() < deadline:
        time.sleep(0.05)
    a.stop(0)
    assert len(reports) == 1 and reports[0][1] == 4 and "lost rank 1 of 2 (host hb)" in reports[0][0]


def test_a_stopped_watch_records_its_exit_code(tmp_path):
    watch = Watch(tmp_path, 0, 2, "tok", timeout=30.0).start()
    watch.stop(3)
    assert Beat.decode((tmp_path / "rank-00000").read_bytes()).state == "ended:3"
    assert not watch._thread.is_alive()


@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan", "inf"])
def test_a_timeout_that_is_not_a_positive_number_is_refused_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(liveness.PEER_TIMEOUT_VAR, value)
    with pytest.raises(liveness.TimeoutSettingError, match=f"DIST_SENSE_PEER_TIMEOUT={value!r}"):
        liveness.peer_timeout()
    monkeypatch.setenv(liveness.COLLECTIVE_TIMEOUT_VAR, "90")
    assert liveness.collective_timeout() == 90.0


def test_a_bad_timeout_stops_a_stage_at_once_with_exit_code_2(tmp_path):
    config = tmp_path / "run.json"
    config.write_text('{"run_dir": "%s", "corpus": {"path": "%s"}}' % (tmp_path / "run", tmp_path / "none.jsonl"))
    done = testing.run_command([sys.executable, "launcher/build_dict.py", "--config", str(config)], check=False,
                               cwd=testing.REPO_ROOT, env=testing.launch_env({liveness.COLLECTIVE_TIMEOUT_VAR: "soon"}))
    assert done.returncode == 2
    assert "DIST_SENSE_COLLECTIVE_TIMEOUT='soon' is not a positive number of seconds" in done.stderr


def test_slurm_task_counts_per_node():
    assert slurm_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert slurm_tasks_per_node("4") == [4] and slurm_tasks_per_node("") == [] and slurm_tasks_per_node("x") == []
    uneven = {"SLURM_STEP_TASKS_PER_NODE": "2,1", "SLURM_NTASKS_PER_NODE": "2"}
    assert local_world_size({**uneven, "SLURM_NODEID": "0"}) == 2
    assert local_world_size({**uneven, "SLURM_NODEID": "1"}) == 1  # not the 2 that was asked for
    assert local_world_size({"LOCAL_WORLD_SIZE": "8", **uneven, "SLURM_NODEID": "1"}) == 8
    assert local_world_size({}) == 1
