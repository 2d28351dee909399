"""ray_cluster.yaml, validated offline: `ray up` has no dry run.

Two checks, both Ray's own: the JSON schema shipped inside the installed ray package, then
`prepare_config` (merge with the AWS defaults.yaml from the wheel) + `validate_config`.
What is *not* checked here: AWS bootstrap (`ray.autoscaler._private.aws.config.bootstrap_aws`
resolves IAM roles, subnets, security groups and the AMI through boto3), which needs
network and credentials.
"""
from __future__ import annotations

import copy
import json
import os
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO_ROOT / "ray_cluster.yaml"


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    import ray

    schema_path = Path(os.path.dirname(ray.__file__)) / "autoscaler" / "ray-schema.json"
    return json.loads(schema_path.read_text())


@pytest.fixture()
def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _ray_validate(config: dict) -> dict:
    """Ray's own offline path: fill defaults, merge setup commands, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_config_matches_rays_schema(cluster_config: dict, ray_schema: dict):
    jsonschema.validate(cluster_config, ray_schema)


def test_config_passes_rays_prepare_and_validate(cluster_config: dict):
    prepared = _ray_validate(cluster_config)
    assert prepared["cluster_name"] == "mmrec"
    assert prepared["provider"]["type"] == "aws"
    # prepare_config prepends the shared setup_commands to the head's and workers' lists.
    assert prepared["head_setup_commands"][: len(cluster_config["setup_commands"])] == cluster_config["setup_commands"]
    assert prepared["available_node_types"]["head"]["max_workers"] == 0


def test_promised_node_types(cluster_config: dict):
    node_types = cluster_config["available_node_types"]
    assert cluster_config["head_node_type"] == "head"
    assert set(node_types) == {"head", "gpu_worker", "cpu_worker"}

    gpu = node_types["gpu_worker"]
    assert gpu["resources"]["GPU"] == 1
    assert gpu["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p4", "p5"))
    assert (gpu["min_workers"], gpu["max_workers"]) == (0, 4)

    cpu = node_types["cpu_worker"]
    assert "GPU" not in cpu["resources"] and cpu["resources"]["CPU"] >= 8
    assert (cpu["min_workers"], cpu["max_workers"]) == (0, 8)

    per_type_max = sum(t.get("max_workers", 0) for name, t in node_types.items() if name != "head")
    assert per_type_max <= cluster_config["max_workers"]
    assert cluster_config["idle_timeout_minutes"] > 0


def test_install_and_start_commands(cluster_config: dict):
    assert cluster_config["file_mounts"]["~/mmrec"] == "."
    setup = cluster_config["setup_commands"]
    torch_step = next(i for i, c in enumerate(setup) if c.startswith("pip install torch"))
    project_step = next(i for i, c in enumerate(setup) if 'pip install -e ".[pretrained]"' in c)
    assert torch_step < project_step, "torch must be installed for the image's CUDA before the project"
    assert "cd ~/mmrec" in setup[project_step]

    head_start = " ".join(cluster_config["head_start_ray_commands"])
    for flag in ("--head", "--port=6379", "--autoscaling-config=~/ray_bootstrap_config.yaml"):
        assert flag in shlex.split(head_start.replace(";", " ")), flag
    # The head advertises no CPUs to the autoscaler, so it must also start with none.
    assert cluster_config["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert "--num-cpus=0" in head_start
    assert "--address=$RAY_HEAD_IP:6379" in " ".join(cluster_config["worker_start_ray_commands"])


def _start_words(commands: list[str]) -> list[list[str]]:
    """Each `ray start` invocation of a start-command list, as shell words (env assignments included)."""
    words = shlex.split(" ".join(commands).replace(";", " ; "))
    starts, current = [], []
    for word in words + [";"]:
        if word == ";":
            if "start" in current and "ray" in current:
                starts.append(current)
            current = []
        else:
            current.append(word)
    return starts


def test_job_server_binds_localhost_and_auth_fails_closed(cluster_config: dict):
    """No node starts without token auth, and the head's dashboard / job server is not on a public interface."""
    head = _start_words(cluster_config["head_start_ray_commands"])
    workers = _start_words(cluster_config["worker_start_ray_commands"])
    assert len(head) == 1 and len(workers) == 1
    for start in head + workers:
        # explicit token mode: Ray refuses to start a node in token mode without ~/.ray/auth_token
        assert "RAY_AUTH_MODE=token" in start[: start.index("ray")], start
    hosts = [w.split("=", 1)[1] for w in head[0] if w.startswith("--dashboard-host=")]
    assert hosts in ([], ["127.0.0.1"], ["localhost"]), f"dashboard bound to {hosts}: use the ray dashboard tunnel"
    assert "0.0.0.0" not in " ".join(cluster_config["head_start_ray_commands"])
    assert cluster_config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


def _typo_setup_command(config: dict) -> None:
    config["setup_command"] = config.pop("setup_commands")


def _typo_min_worker(config: dict) -> None:
    gpu_worker = config["available_node_types"]["gpu_worker"]
    gpu_worker["min_worker"] = gpu_worker.pop("min_workers")


def _fractional_gpu(config: dict) -> None:
    config["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5


def _no_provider(config: dict) -> None:
    del config["provider"]


BROKEN_COPIES = {
    "typo setup_command": _typo_setup_command,
    "typo min_worker": _typo_min_worker,
    "fractional GPU resource": _fractional_gpu,
    "missing provider": _no_provider,
}


@pytest.mark.parametrize("breakage", sorted(BROKEN_COPIES))
def test_broken_copies_are_rejected(cluster_config: dict, ray_schema: dict, breakage: str):
    broken = copy.deepcopy(cluster_config)
    BROKEN_COPIES[breakage](broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema)
    # Ray's path rejects it too (prepare_config may already fail, e.g. without a provider).
    with pytest.raises((jsonschema.ValidationError, KeyError, ValueError)):
        _ray_validate(broken)


def test_ray_validate_rejects_inconsistent_head_type(cluster_config: dict):
    # Schema-valid but wrong: only Ray's validate_config catches it.
    cluster_config["head_node_type"] = "ray.head.default"
    with pytest.raises(ValueError, match="head_node_type"):
        _ray_validate(cluster_config)
