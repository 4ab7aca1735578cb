"""Offline checks of everything in infra/: it parses, agrees with itself, and runs our real commands.

Nothing here needs Kubernetes, AWS or Docker. The cluster-launcher YAML goes through Ray's own
config validation; every entrypoint and documented `splinter ...` line is parsed by the real typer
app (argument and option names, required arguments), so a renamed flag breaks this test, not a
GPU job at 3 a.m.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import ray
import typer.main
import yaml

from pipeline.cli import app
from pipeline.submit import validate_runtime_env

try:  # typer >= 0.20 ships its own copy of click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer on the real click
    from click.exceptions import UsageError

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
K8S = sorted((INFRA / "k8s").glob("*.yaml"))
RAY_VERSION = ray.__version__
KNOWN_RESOURCES = {"cpu", "memory", "nvidia.com/gpu", "ephemeral-storage"}


def load_all(path: Path) -> list[Any]:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert docs, f"{path} holds no YAML document"
    return docs


def dockerfile() -> str:
    return (INFRA / "Dockerfile").read_text()


def project_image() -> str:
    """The image every manifest must use: the Dockerfile's OCI ref-name label."""
    match = re.search(r'org\.opencontainers\.image\.ref\.name="([^"]+)"', dockerfile())
    assert match, "infra/Dockerfile lacks its org.opencontainers.image.ref.name label"
    return match.group(1)


def major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity (500m, 4, 16Gi, 8G) as a plain number."""
    text = str(value)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?", text)
    assert match, f"not a Kubernetes quantity: {text!r}"
    factor = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
              "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[match.group(2)]  # fmt: skip
    return float(match.group(1)) * factor


# ------------------------------------------------------------------------- checking our commands
def check_splinter_args(args: list[str]) -> Any:
    """Parse `splinter ARGS` with the real CLI (no callback runs); fail on unknown names or flags."""
    group = typer.main.get_command(app)
    assert args, "empty splinter command"
    name, rest = args[0], args[1:]
    commands = getattr(group, "commands", {})
    command = commands.get(name)
    assert command is not None, f"`splinter {name}` is not a command; known: {sorted(commands)}"
    try:
        ctx = command.make_context(name, list(rest))
    except UsageError as err:
        pytest.fail(f"`splinter {shlex.join(args)}` does not parse: {err.format_message()}")
    if name == "submit":  # the job itself rides after `--` and must be a real command too
        check_splinter_args(ctx.args)
    return ctx


def check_entrypoint(entrypoint: str) -> list[str]:
    """An entrypoint is `splinter ...`, `python -m pipeline.cli ...` or `python -m jobs.<name> ...`."""
    argv = shlex.split(entrypoint)
    if argv[0] == "splinter":
        check_splinter_args(argv[1:])
    elif argv[:3] == ["python", "-m", "pipeline.cli"]:
        check_splinter_args(argv[3:])
    elif argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."):
        assert importlib.util.find_spec(argv[2]) is not None, f"module {argv[2]} does not exist"
        result = subprocess.run(
            [sys.executable, "-m", argv[2], "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
        )
        assert result.returncode == 0, f"`python -m {argv[2]} --help` failed:\n{result.stderr}"
        # jobs.<name> takes exactly the arguments of `splinter <name>` (see jobs/*.py): parse them so.
        check_splinter_args([argv[2].removeprefix("jobs."), *argv[3:]])
    else:
        pytest.fail(f"entrypoint is not a command of this project: {entrypoint!r}")
    return argv


def test_check_entrypoint_catches_mistakes() -> None:
    """The checker itself must fail on a typo'd command, a bad flag and a missing argument."""
    for bad in (
        "splinter mien in out",
        "splinter mine in out --no-such-flag",
        "splinter extract only-input",
        "python -m jobs.no_such_job",
        "python -m jobs.extract in out --no-such-flag",
        "python train.py",
        "splinter submit --address http://h:8265 -- mine in out --bogus",
        "splinter submit -- pretrain mined out --num-workerz 2",
        "splinter pretrain only-mined",
    ):
        with pytest.raises((AssertionError, pytest.fail.Exception)):
            check_entrypoint(bad)
    check_entrypoint("splinter submit --address http://h:8265 --no-wait -- mine in out --seed 3")
    check_entrypoint("splinter submit -- pretrain mined out --from-bert /models/bert --num-workers 2 --use-gpu")


# ---------------------------------------------------------------------------------- the manifests
@pytest.mark.parametrize(
    "path", [*K8S, INFRA / "cluster-aws.yaml", INFRA / "runtime_env.yaml"], ids=lambda p: p.name
)
def test_every_manifest_parses(path: Path) -> None:
    for doc in load_all(path):
        assert isinstance(doc, dict)


def kuberay_docs() -> list[tuple[Path, dict]]:
    return [
        (path, doc)
        for path in K8S
        for doc in load_all(path)
        if doc.get("apiVersion", "").startswith("ray.io/")
    ]


def cluster_specs() -> list[tuple[str, dict]]:
    specs = []
    for path, doc in kuberay_docs():
        spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        specs.append((f"{path.name}:{doc['kind']}", spec))
    return specs


def test_kinds_and_api_versions() -> None:
    kinds = {}
    for path in K8S:
        for doc in load_all(path):
            assert {"apiVersion", "kind", "metadata", "spec"} <= set(doc), path
            if doc["kind"] in {"RayCluster", "RayJob"}:
                assert doc["apiVersion"] == "ray.io/v1", path
            else:
                assert doc["apiVersion"] == "v1" and doc["kind"] == "PersistentVolumeClaim", path
            kinds.setdefault(doc["kind"], []).append(doc["metadata"]["name"])
    assert len(kinds["RayCluster"]) == 1 and len(kinds["RayJob"]) == 3
    names = [n for group in kinds.values() for n in group]
    assert len(names) == len(set(names)), f"duplicate object names: {names}"


@pytest.mark.parametrize(("where", "spec"), cluster_specs(), ids=[w for w, _ in cluster_specs()])
def test_cluster_spec(where: str, spec: dict) -> None:
    assert major_minor(spec["rayVersion"]) == major_minor(RAY_VERSION), (
        f"{where}: rayVersion vs installed {RAY_VERSION}"
    )
    assert spec["authOptions"] == {"mode": "token"}, f"{where}: clusters must require a token"
    assert spec["enableInTreeAutoscaling"] is True

    head = spec["headGroupSpec"]
    groups = [("head", head, None), *((g["groupName"], g, g) for g in spec["workerGroupSpecs"])]
    assert head["rayStartParams"]["num-cpus"] == "0", f"{where}: the head must run no tasks"
    for name, group, worker in groups:
        params = group["rayStartParams"]
        # KubeRay's CRD types rayStartParams as map[string]string: a bare 0 is rejected.
        assert all(isinstance(v, str) for v in params.values()), (
            f"{where}/{name}: quote rayStartParams values"
        )
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            assert container["image"] == project_image(), (
                f"{where}/{name}: image differs from infra/Dockerfile"
            )
            limits, requests = container["resources"]["limits"], container["resources"].get("requests", {})
            assert set(limits) <= KNOWN_RESOURCES and set(requests) <= KNOWN_RESOURCES, f"{where}/{name}"
            assert {"cpu", "memory"} <= set(limits), f"{where}/{name}: set cpu and memory limits"
            for key, value in requests.items():
                assert quantity(value) <= quantity(limits[key]), f"{where}/{name}: request {key} > limit"
            memory = quantity(limits["memory"])
            if "object-store-memory" in params:
                store = int(params["object-store-memory"])
                assert 0 < store <= 0.5 * memory, (
                    f"{where}/{name}: object store must leave memory for workers"
                )
                shm = volumes.get("dshm", {}).get("emptyDir", {})
                assert shm.get("medium") == "Memory" and quantity(shm["sizeLimit"]) >= store, (
                    f"{where}/{name}: /dev/shm must hold the object store"
                )
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{where}/{name}: mounts undefined volume {mount['name']}"
            gpus = limits.get("nvidia.com/gpu")
            if gpus is not None:
                assert int(gpus) >= 1 and int(requests.get("nvidia.com/gpu", gpus)) == int(gpus)
                assert params.get("num-gpus", str(gpus)) == str(gpus), (
                    f"{where}/{name}: num-gpus vs GPU limit"
                )
                assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), (
                    f"{where}/{name}: GPU pods must tolerate the nvidia.com/gpu taint"
                )
        if worker is not None:
            low, start, high = worker["minReplicas"], worker["replicas"], worker["maxReplicas"]
            assert 0 <= low <= start <= high and high >= 1, (
                f"{where}/{name}: replicas {low} <= {start} <= {high}"
            )


def test_raycluster_has_an_autoscaling_gpu_group() -> None:
    (spec,) = [s for w, s in cluster_specs() if w.endswith("RayCluster")]
    gpu = [
        g
        for g in spec["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    assert gpu and all(g["minReplicas"] < g["maxReplicas"] for g in gpu)


def rayjobs() -> list[dict]:
    return [doc for _, doc in kuberay_docs() if doc["kind"] == "RayJob"]


@pytest.mark.parametrize("job", rayjobs(), ids=lambda j: j["metadata"]["name"])
def test_rayjob(job: dict) -> None:
    spec = job["spec"]
    argv = check_entrypoint(spec["entrypoint"])
    # The job env is the one `splinter submit --runtime-env infra/runtime_env.yaml` uses, and valid.
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env == yaml.safe_load((INFRA / "runtime_env.yaml").read_text())
    validate_runtime_env(runtime_env)
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    cluster = spec["rayClusterSpec"]
    for flag in ("--model", "--from-bert"):
        if flag not in argv:
            continue
        # The checkpoint must be mounted where the driver (head) and the model actors/workers (GPU pods) run.
        model = Path(argv[argv.index(flag) + 1])
        pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        for group in pods:
            mounts = [
                m["mountPath"]
                for c in group["template"]["spec"]["containers"]
                for m in c.get("volumeMounts", [])
            ]
            assert any(model.is_relative_to(m) for m in mounts), f"{model} is not mounted in every pod"
    gpus = sum(
        g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
        for g in cluster["workerGroupSpecs"]
    )
    if "--num-actors" in argv:
        actors = int(argv[argv.index("--num-actors") + 1])
        assert 1 <= actors <= gpus, f"{actors} model actors but at most {gpus} GPUs"
    if "--use-gpu" in argv:
        # Ray Train places every worker at once (a placement group): the GPUs must exist at start.
        workers = int(argv[argv.index("--num-workers") + 1]) if "--num-workers" in argv else 1
        ready = sum(
            g["minReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
            for g in cluster["workerGroupSpecs"]
        )
        assert 1 <= workers <= ready <= gpus, f"{workers} GPU workers, {ready} GPUs guaranteed at start"
        cpus = float(argv[argv.index("--cpus-per-worker") + 1]) if "--cpus-per-worker" in argv else 1.0
        for g in cluster["workerGroupSpecs"]:
            limit = quantity(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
            assert cpus < limit, f"--cpus-per-worker {cpus} leaves no CPU for reading data in a {limit}-CPU pod"


def test_rayjobs_cover_every_job() -> None:
    jobs = set()
    for job in rayjobs():
        argv = shlex.split(job["spec"]["entrypoint"])
        if argv[0] == "splinter":
            jobs.add(argv[1])
        elif argv[:3] == ["python", "-m", "pipeline.cli"]:
            jobs.add(argv[3])
        else:
            jobs.add(argv[2].removeprefix("jobs."))
    assert {"mine", "extract", "pretrain"} <= jobs


# ------------------------------------------------------------------------------ cluster launcher
def test_cluster_launcher_config() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((INFRA / "cluster-aws.yaml").read_text())
    config = prepare_config(raw)  # Ray's own defaults merge + schema validation, all offline
    validate_config(config)
    assert raw["provider"]["type"] == "aws"
    assert raw["docker"]["image"] == project_image()
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert any("--num-cpus=0" in cmd for cmd in raw["head_start_ray_commands"])
    for cmd in (*raw["head_start_ray_commands"][1:], *raw["worker_start_ray_commands"][1:]):
        assert "RAY_AUTH_MODE=token" in cmd, "every node must start in token mode"
    assert "~/.ray/auth_token" in raw["file_mounts"]
    gpu_types = {name: t for name, t in types.items() if t.get("resources", {}).get("GPU")}
    assert {t["node_config"]["InstanceType"].split(".")[0] for t in gpu_types.values()} == {"g5", "g6"}
    for name, node_type in types.items():
        if name == raw["head_node_type"]:
            continue
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= raw["max_workers"], name
    # The setup commands install and then smoke-test the project on every node.
    assert any("pip install" in cmd for cmd in raw["setup_commands"])
    assert any("splinter --help" in cmd for cmd in raw["setup_commands"])


# ---------------------------------------------------------------------------------- the image
def test_dockerfile_base_matches_installed_ray_and_python() -> None:
    text = dockerfile()
    base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\S+)$", text, re.M)
    assert base and re.search(r"^FROM \$\{RAY_IMAGE\}$", text, re.M)
    tag = base.group(1)  # e.g. 2.60.0-py311-gpu
    version, python, flavour = tag.split("-")
    assert major_minor(version) == major_minor(RAY_VERSION)
    assert python == f"py{sys.version_info.major}{sys.version_info.minor}"
    assert flavour.startswith("gpu") or flavour.startswith("cu")
    assert f'"ray[data,default]=={version}"' in text, "pin ray to the base image's version"
    assert version in project_image() and f"-t {project_image()} " in text


def test_dockerfile_copies_only_what_exists_and_is_not_ignored() -> None:
    text = dockerfile()
    sources = [s for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", text, re.M) for s in line.split()[:-1]]
    assert {"pyproject.toml", "splinter/", "pipeline/", "jobs/"} <= set(sources)
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().split()
    for source in sources:
        assert (ROOT / source).exists(), f"infra/Dockerfile copies {source}, which the repository lacks"
        assert f"!{source}" in ignore, (
            f"{source} is excluded from the build context by Dockerfile.dockerignore"
        )


def test_readme_commands_are_real() -> None:
    """Every `splinter ...` line in infra/README.md and in the manifests' comments parses."""
    texts = [(INFRA / "README.md").read_text(), *(p.read_text() for p in [*K8S, INFRA / "cluster-aws.yaml"])]
    texts = [re.sub(r"\\\n\s*", " ", text) for text in texts]  # join shell line continuations
    lines = [
        m
        for text in texts
        for m in re.findall(r"^\s*(?:#\s*)?(splinter (?:mine|extract|pretrain|submit)\b.*)$", text, re.M)
    ]
    assert len(lines) >= 4
    for line in lines:
        check_entrypoint(line.split(" #")[0].strip())
