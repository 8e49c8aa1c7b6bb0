"""Choosing torch's threads by the machine's load, and the heavy commands' --threads option."""

import pytest
import torch

from cones import threads
from cones.cli import build_parser, main


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    "cores, busy, expected",
    [(4, 0.0, 4), (4, 0.1, 4), (4, 1.0, 3), (4, 0.4, 3), (4, 4.0, 1), (8, 3.0, 5), (8, 0.2, 8)],
)
def test_busy_cores_are_left_out(monkeypatch, cores, busy, expected):
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    assert threads.choose_threads(busy) == expected


@pytest.mark.parametrize("cores", [1, 2])
def test_a_small_machine_gets_one_thread_whatever_its_load(monkeypatch, cores):
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    monkeypatch.setattr(threads, "busy_cores", lambda: pytest.fail("no need to measure"))
    assert threads.choose_threads() == 1 and threads.choose_threads(0.0) == 1


def test_unknown_load_uses_every_core(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.setattr(threads, "busy_cores", lambda: None)
    assert threads.choose_threads() == 4


def test_busy_cores_is_measured_on_linux():
    busy = threads.busy_cores(0.05)
    assert busy is None or 0.0 <= busy <= (threads.os.cpu_count() or 1)


def test_configure_sets_torch(keep_threads, monkeypatch):
    assert threads.configure(1) == 1 and torch.get_num_threads() == 1
    monkeypatch.setattr(threads, "choose_threads", lambda: 2)
    assert threads.configure(0) == 2 and torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="negative"):
        threads.configure(-1)


def test_heavy_commands_take_threads_and_light_ones_do_not():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for name in ("find", "generate", "demo", "refine", "evaluate"):
        assert "--threads" in sub[name].format_help(), name
    assert "--threads" not in sub["inspect"].format_help()
    assert sub["generate"].parse_args(["x", "--out", "o", "--threads", "3"]).threads == 3


def test_a_negative_thread_count_is_one_line(capsys, keep_threads, tmp_path):
    assert main(["generate", "a dog", "--out", str(tmp_path / "o"), "--threads", "-2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "negative" in err[0]
