"""The `mmoe` entry point's logging, warnings and error recording, each in a process of its own
(the set-up is global to a process)."""
import json
import os
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \[rank (\S+)\] (\w+) (\S+): (.*)$")


def mmoe(args: list[str], env: dict[str, str] | None = None, setup: str = "") -> subprocess.CompletedProcess:
    """`python -m app ARGS`; `setup` (Python) runs first, e.g. to add a command to cli.COMMANDS."""
    code = f"from app import cli\n{setup}\ncli.main({args!r})"
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "TORCHELASTIC_ERROR_FILE")}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=120)


def test_log_lines_carry_utc_time_and_rank(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/a/loss": 0.5}\n{"step": 2, "tr\n')
    for env, rank in (({"RANK": "3"}, "3"), ({}, "-")):
        # a time zone far from UTC: local times would be off by hours
        result = mmoe(["report", str(tmp_path)], {**env, "TZ": "Asia/Kolkata"})
        assert result.returncode == 0, result.stderr
        lines = [LINE.match(line) for line in result.stderr.splitlines()]
        assert len(lines) == 1 and lines[0], result.stderr
        when, got_rank, level, logger, message = lines[0].groups()
        assert (got_rank, level, logger) == (rank, "WARNING", "app")
        assert message.endswith("metrics.jsonl:2: not JSON, skipped")
        age = datetime.now(timezone.utc) - datetime.strptime(when, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
        assert 0 <= age.total_seconds() < 120


WARN = '''
import warnings
def warn(argv):
    warnings.warn("something new to this run", UserWarning)
    warnings.warn("a deprecation nobody has seen yet", FutureWarning)
    warnings.warn("Please use DTensor instead and we are deprecating ShardedTensor.", FutureWarning)
    from torch.fx._symbolic_trace import is_fx_tracing
    is_fx_tracing()  # logs through torch's own handler, once
cli.COMMANDS["warn"] = warn
'''


def test_only_the_known_warnings_are_filtered():
    result = mmoe(["warn"], {"RANK": "1"}, WARN)
    assert result.returncode == 0, result.stderr
    err = result.stderr
    for shown in ("UserWarning: something new to this run", "FutureWarning: a deprecation nobody has seen yet"):
        line = next(line for line in err.splitlines() if shown in line)
        assert LINE.match(line).group(2, 3, 4) == ("1", "WARNING", "py.warnings")
    assert "ShardedTensor" not in err and "is_fx_tracing" not in err


FAIL = '''
from app.config import ConfigError
def fail(argv):
    raise {}("the cause, {}")
cli.COMMANDS["fail"] = fail
'''


def test_a_failed_rank_records_its_cause_for_torchrun(tmp_path):
    """torchrun names TORCHELASTIC_ERROR_FILE; its summary shows what the rank writes there."""
    for error in ("RuntimeError", "ConfigError"):  # unforeseen, and one `main` reports as `error: ...`
        path = tmp_path / f"{error}.json"
        result = mmoe(["fail"], {"TORCHELASTIC_ERROR_FILE": str(path)}, FAIL.format(error, error))
        assert result.returncode == 1
        message = json.loads(path.read_text())["message"]
        assert message["message"] == f"{error}: the cause, {error}"
        assert "in fail" in message["extraInfo"]["py_callstack"]
