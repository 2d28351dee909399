"""deploy/: the nightly-retrain schedules (Kubernetes CronJob and a crontab line), checked offline.

Both must run `ray job submit ... -- python -m jobs.retrain` without overlapping runs. The
`ray job submit` arguments are parsed by Ray's own click command (`make_context` parses,
it does not run), so a misspelt or value-taking flag fails here, not at 03:00.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CRONJOB_YAML = REPO_ROOT / "deploy" / "retrain-cronjob.yaml"
CRONTAB_EXAMPLE = REPO_ROOT / "deploy" / "crontab.example"

# (low, high, names) per field of a 5-field cron expression; names map onto low..
_CRON_FIELDS = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")),
    ("day of week", 0, 7, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")),  # 0 and 7 are Sunday
)
_CRON_ITEM = re.compile(r"^(?P<range>\*|(?P<start>\w+)(?:-(?P<end>\w+))?)(?:/(?P<step>\d+))?$")


def _cron_value(token: str, low: int, high: int, names: tuple[str, ...]) -> int:
    value = names.index(token.lower()) + low if token.lower() in names else int(token)
    if not low <= value <= high:
        raise ValueError(f"{token} outside [{low}, {high}]")
    return value


def validate_cron(expression: str) -> None:
    """Raise ValueError unless `expression` is a standard 5-field cron schedule (no @macros)."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"expected 5 fields, got {len(fields)}: {expression!r}")
    for field, (name, low, high, names) in zip(fields, _CRON_FIELDS):
        for item in field.split(","):
            match = _CRON_ITEM.match(item)
            if match is None:
                raise ValueError(f"bad {name} item {item!r}")
            try:
                if match["step"] is not None and int(match["step"]) < 1:
                    raise ValueError("step must be >= 1")
                if match["start"] is not None:
                    start = _cron_value(match["start"], low, high, names)
                    if match["end"] is not None and _cron_value(match["end"], low, high, names) < start:
                        raise ValueError("range end before start")
            except ValueError as error:
                raise ValueError(f"bad {name} item {item!r}: {error}") from None


@pytest.mark.parametrize(
    "expression", ["0 3 * * *", "*/15 9-17 * * mon-fri", "30 2 1,15 jan-jun 0", "0 0 * * 7", "5-10/2 * * * *"]
)
def test_cron_validator_accepts(expression: str):
    validate_cron(expression)


@pytest.mark.parametrize(
    "expression",
    ["0 3 * *", "0 3 * * * *", "60 3 * * *", "0 24 * * *", "0 3 0 * *", "0 3 * 13 *", "0 3 * * 8",
     "0 3 * * funday", "*/0 * * * *", "10-5 * * * *", "@daily", "0 3 ? * *"],
)
def test_cron_validator_rejects(expression: str):
    with pytest.raises(ValueError):
        validate_cron(expression)


def _parse_ray_job_submit(argv: list[str]) -> dict:
    """argv after `ray job submit` -> the parsed options, via Ray's own CLI definition."""
    from ray.dashboard.modules.job.cli import submit

    return submit.make_context("submit", list(argv)).params


def test_submit_parser_catches_bad_flags():
    # The failure the parser is here for: --no-wait is a flag and takes no value.
    import click

    with pytest.raises(click.UsageError):
        _parse_ray_job_submit(["--no-wait=false", "--", "python", "-m", "jobs.retrain"])


# --------------------------------------------------------------------------- CronJob


@pytest.fixture(scope="module")
def cronjob() -> dict:
    return yaml.safe_load(CRONJOB_YAML.read_text())


def _container(cronjob: dict) -> dict:
    (container,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return container


def test_cronjob_schedule_and_policies(cronjob: dict):
    assert cronjob["apiVersion"] == "batch/v1"
    assert cronjob["kind"] == "CronJob"
    spec = cronjob["spec"]
    validate_cron(spec["schedule"])
    assert spec["schedule"].split()[2:] == ["*", "*", "*"], "nightly: every day of every month"
    assert spec["concurrencyPolicy"] == "Forbid"
    job_spec = spec["jobTemplate"]["spec"]
    assert job_spec["backoffLimit"] == 0
    assert job_spec["template"]["spec"]["restartPolicy"] == "Never"


def test_cronjob_submits_retrain_with_valid_ray_flags(cronjob: dict):
    container = _container(cronjob)
    argv = container["command"] + container.get("args", [])
    assert argv[:3] == ["ray", "job", "submit"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert {"RAY_ADDRESS", "MLFLOW_TRACKING_URI"} <= env.keys()
    assert env["RAY_ADDRESS"].endswith(":8265"), "the job server listens on the dashboard port"

    # Every $(VAR) Kubernetes must expand is defined in the container's env.
    referenced = set(re.findall(r"\$\((\w+)\)", " ".join(argv) + " " + " ".join(v or "" for v in env.values())))
    assert referenced <= env.keys(), referenced - env.keys()

    params = _parse_ray_job_submit(argv[3:])
    assert params["entrypoint"][:3] == ("python", "-m", "jobs.retrain")
    assert "--preset" in params["entrypoint"]
    assert params["no_wait"] is False, "the pod must wait so its exit code is the Ray job's"
    assert params["address"] == "$(RAY_ADDRESS)" and params["working_dir"]
    # The tracking URI reaches the job's driver on the cluster through its runtime_env.
    runtime_env = json.loads(params["runtime_env_json"].replace("$(MLFLOW_TRACKING_URI)", env["MLFLOW_TRACKING_URI"]))
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == env["MLFLOW_TRACKING_URI"]


# --------------------------------------------------------------------------- crontab


def _crontab_jobs() -> list[tuple[str, str]]:
    """-> [(schedule, command)] for every job line (comments, blanks, VAR=value lines skipped)."""
    jobs = []
    for line in CRONTAB_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or re.match(r"^\w+\s*=", line):
            continue
        fields = line.split(None, 5)
        assert len(fields) == 6, f"a job line needs 5 schedule fields and a command: {line!r}"
        jobs.append((" ".join(fields[:5]), fields[5]))
    return jobs


def test_crontab_line():
    jobs = _crontab_jobs()
    assert len(jobs) == 1
    schedule, command = jobs[0]
    validate_cron(schedule)
    assert "%" not in command, "cron turns an unescaped % into a newline"

    tokens = shlex.split(command)
    assert "jobs.retrain" in tokens
    assert tokens[tokens.index(">>") + 1].endswith(".log") and tokens[-1] == "2>&1"
    flock = next(i for i, token in enumerate(tokens) if token.endswith("flock"))
    assert tokens[flock + 1] == "-n", "flock -n: skip tonight's run if last night's still holds the lock"

    ray = next(i for i, token in enumerate(tokens) if token.endswith("/ray") or token == "ray")
    assert flock < ray and tokens[ray + 1 : ray + 3] == ["job", "submit"]
    params = _parse_ray_job_submit(tokens[ray + 3 : tokens.index(">>")])
    assert params["entrypoint"][:3] == ("python", "-m", "jobs.retrain")
    assert params["no_wait"] is False
    # No --address: `ray job submit` falls back to RAY_ADDRESS, which the line must set.
    assert params["address"] is not None or any(t.startswith("RAY_ADDRESS=http") for t in tokens[:ray])


def _expand_k8s_env(env_items: list[dict]) -> dict[str, str]:
    """Kubernetes' $(VAR) expansion of plain `value` env entries, in declaration order."""
    expanded: dict[str, str] = {}
    for item in env_items:
        if "value" in item:
            expanded[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: expanded[m[1]], item["value"])
    return expanded


def test_cronjob_address_resolves_to_the_job_server(cronjob: dict, monkeypatch: pytest.MonkeyPatch):
    # What the CLI will actually contact, resolved by Ray's own code with the pod's env.
    from ray.dashboard.utils import get_address_for_submission_client

    env = _expand_k8s_env(_container(cronjob)["env"])
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", env["RAY_ADDRESS"])
    resolved = get_address_for_submission_client(env["RAY_ADDRESS"])
    assert resolved == f"http://{env['RAY_HEAD']}:8265"
