"""A run cannot go green by skipping: with ``--fail-on-skip`` (``make test`` passes it), a test that
skips fails the run unless ``tests/allowed_skips.txt`` names it.

Skips hide missing tools (a Prometheus that was never installed skipped eight tests silently);
the allow-list holds only tests whose skip is a fact about the machine, each with its reason.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

ALLOW_LIST = Path(__file__).with_name("allowed_skips.txt")
# .ci/run looks for this line to know that the check ran.
SUMMARY = "skip gate: {skipped} skipped, {unexpected} not on the allow-list (tests/allowed_skips.txt)"


def allowed_patterns(path: Path = ALLOW_LIST) -> list[str]:
    """Node-id patterns (fnmatch), one a line; '#' starts a comment."""
    patterns = []
    for line in path.read_text(encoding="utf-8").splitlines():
        pattern = line.split("#", 1)[0].strip()
        if pattern:
            patterns.append(pattern)
    return patterns


def unexpected(skipped: dict[str, str], patterns: list[str]) -> dict[str, str]:
    return {
        node: reason
        for node, reason in skipped.items()
        if not any(fnmatch.fnmatchcase(node, pattern) for pattern in patterns)
    }


class SkipGate:
    def __init__(self, patterns: list[str]) -> None:
        self.patterns = patterns
        self.skipped: dict[str, str] = {}

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            self._record(report)

    @pytest.hookimpl
    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.skipped:  # a whole module skipped at import (importorskip, module-level skip)
            self._record(report)

    def _record(self, report: pytest.TestReport | pytest.CollectReport) -> None:
        longrepr = report.longrepr  # (file, line, reason) for a skip
        self.skipped[report.nodeid] = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        bad = unexpected(self.skipped, self.patterns)
        for node, reason in bad.items():
            terminalreporter.write_line(f"unexpected skip: {node}: {reason}", red=True)
        terminalreporter.write_line(SUMMARY.format(skipped=len(self.skipped), unexpected=len(bad)))

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if unexpected(self.skipped, self.patterns) and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fail-on-skip",
        action="store_true",
        help="fail the run when a test skips that tests/allowed_skips.txt does not name",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--fail-on-skip"):
        config.pluginmanager.register(SkipGate(allowed_patterns()), "skip_gate")
