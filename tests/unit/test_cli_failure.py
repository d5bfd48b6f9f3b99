"""What the command line prints, and which exit status it returns, for what ended a command:
one line each, whatever the exception groups of the task group wrap it in."""

from __future__ import annotations

import logging

import pytest

from gateway.cli import report_failure
from gateway.errors import ConfigError, OutboxError, OutboxLocked

BUG = ZeroDivisionError("division by zero")
BUG_LINE = (
    "millwright: internal error: ZeroDivisionError: division by zero "
    "(the traceback is in the log above; please report it)"
)

CASES = [
    # (what ended it, exit status, the line on stderr)
    (ExceptionGroup("tasks", [OutboxError("outbox /x.db: cannot append: disk I/O error")]), 1,
     "millwright: outbox /x.db: cannot append: disk I/O error"),
    (ExceptionGroup("tasks", [ExceptionGroup("inner", [OutboxError("outbox /x.db: boom")])]), 1,
     "millwright: outbox /x.db: boom"),
    (OutboxError("outbox /x.db: cannot create its directory"), 1,
     "millwright: outbox /x.db: cannot create its directory"),
    (ExceptionGroup("tasks", [ConfigError("a.yaml", ["mqtt.ca: not a PEM certificate"])]), 2,
     "millwright: a.yaml: invalid configuration\n  mqtt.ca: not a PEM certificate"),
    (OutboxLocked("/x.db", 4242), 2,
     "millwright: outbox /x.db is in use by millwright (pid 4242): one gateway per outbox "
     "(stop the other one, or give this config its own outbox.path)"),
    (ExceptionGroup("tasks", [BUG]), 70, BUG_LINE),
    (ExceptionGroup("tasks", [OutboxError("outbox /x.db: first"), BUG]), 70, BUG_LINE),
    (ExceptionGroup("tasks", [ConfigError("a.yaml", ["x: bad"]), BUG]), 70, BUG_LINE),
    (ExceptionGroup("tasks", [OutboxError("outbox /x.db: first"), ConfigError("a.yaml", ["x: bad"])]), 2,
     "millwright: a.yaml: invalid configuration\n  x: bad"),
    (RuntimeError("no running event loop"), 70,
     "millwright: internal error: RuntimeError: no running event loop "
     "(the traceback is in the log above; please report it)"),
]  # fmt: skip


@pytest.mark.parametrize(("exc", "status", "line"), CASES)
def test_one_line_and_a_status(
    exc: BaseException, status: int, line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert report_failure(exc) == status
    assert capsys.readouterr().err == line + "\n"


def test_a_bug_leaves_its_traceback_in_the_log(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    try:
        raise BUG
    except ZeroDivisionError as exc:
        group = ExceptionGroup("unhandled errors in a TaskGroup", [exc])
    assert report_failure(group) == 70
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.exc_info is not None
    assert record.exc_info[1] is BUG
    assert capsys.readouterr().err == BUG_LINE + "\n"


def test_ctrl_c_inside_a_group_is_130(capsys: pytest.CaptureFixture[str]) -> None:
    assert report_failure(BaseExceptionGroup("tasks", [KeyboardInterrupt()])) == 130
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("code", "status", "err"), [(None, 0, ""), (0, 0, ""), (3, 3, ""), ("bye", 1, "bye\n")]
)
def test_sys_exit_keeps_its_status(
    code: object, status: int, err: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert report_failure(BaseExceptionGroup("tasks", [SystemExit(code)])) == status
    assert capsys.readouterr().err == err
