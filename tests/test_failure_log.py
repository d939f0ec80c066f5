"""tests/conftest.py's failure log: $METAKERNELS_FAILURE_LOG names each failure as it happens."""
from types import SimpleNamespace

from conftest import pytest_runtest_logreport


def _report(failed):
    return SimpleNamespace(failed=failed, nodeid="tests/test_x.py::test_y[cuda]", when="call", longreprtext="assert 1 == 2")


def test_failures_are_appended_as_they_happen(tmp_path, monkeypatch):
    log = tmp_path / "failures.txt"
    monkeypatch.setenv("METAKERNELS_FAILURE_LOG", str(log))
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    pytest_runtest_logreport(_report(failed=False))
    assert not log.exists()
    pytest_runtest_logreport(_report(failed=True))
    pytest_runtest_logreport(_report(failed=True))
    text = log.read_text(encoding="utf-8")
    assert text.count("FAILED tests/test_x.py::test_y[cuda] (call)\nassert 1 == 2") == 2


def test_xdist_workers_leave_the_log_to_the_controller(tmp_path, monkeypatch):
    log = tmp_path / "failures.txt"
    monkeypatch.setenv("METAKERNELS_FAILURE_LOG", str(log))
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    pytest_runtest_logreport(_report(failed=True))
    assert not log.exists()


def test_nothing_is_written_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("METAKERNELS_FAILURE_LOG", raising=False)
    monkeypatch.chdir(tmp_path)
    pytest_runtest_logreport(_report(failed=True))
    assert list(tmp_path.iterdir()) == []
