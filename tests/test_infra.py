"""The cluster definitions in infra/ parse, carry what a cluster needs, pin their images, keep credentials
out, and run entrypoints that the project's own CLI accepts. No cluster and no Ray instance needed."""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from pipeline.cli import build_parser
from pipeline.config import build_config, presets

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
LAUNCHER = INFRA / "cluster.yaml"
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
RAYJOB = INFRA / "kuberay" / "rayjob.yaml"
DOCKERFILE = INFRA / "Dockerfile"
CLUSTER_DOC = ROOT / "docs" / "cluster.md"

# Fields of the ray.io/v1 types in KubeRay 1.x (ray-operator/apis/ray/v1): a misspelt field is dropped
# silently by the API server, so the test names the ones it knows.
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend",
}  # fmt: skip
RAYCLUSTER_SPEC_FIELDS = {
    "headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
    "headServiceAnnotations", "suspend", "gcsFaultToleranceOptions", "managedBy",
}  # fmt: skip
HEAD_GROUP_FIELDS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP_FIELDS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams", "template",
    "scaleStrategy", "suspend", "idleTimeoutSeconds",
}  # fmt: skip
AUTOSCALER_FIELDS = {
    "resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts", "securityContext",
    "idleTimeoutSeconds", "upscalingMode", "version",
}  # fmt: skip


def load(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), f"{path.name}: not a YAML mapping"
    return doc


def pin(package: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and name.strip().lower() == package:
            return version.strip()
    raise AssertionError(f"constraints.txt pins no {package}")


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def cluster_specs() -> list[tuple[str, dict]]:
    return [
        ("raycluster.yaml", load(RAYCLUSTER)["spec"]),
        ("rayjob.yaml", load(RAYJOB)["spec"]["rayClusterSpec"]),
    ]


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def image_refs() -> dict[str, list[str]]:
    """Every image each file names."""
    launcher = load(LAUNCHER)
    docker = launcher.get("docker", {})
    refs = {"cluster.yaml": [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]}
    for node in launcher["available_node_types"].values():
        refs["cluster.yaml"] += [v for k, v in node.get("docker", {}).items() if k.endswith("image")]
    for name, spec in cluster_specs():
        refs[name] = [c["image"] for c in containers(spec)]
    refs["Dockerfile"] = re.findall(r"^FROM\s+(?:--platform=\S+\s+)?(\S+)", DOCKERFILE.read_text(), re.M)
    return refs


def split_image(ref: str) -> tuple[str, str, str]:
    """(repository, tag, digest) of an image reference; tag and digest may be empty."""
    rest, _, digest = ref.partition("@")
    last = rest.rsplit("/", 1)[-1]
    tag = last.partition(":")[2]
    return (rest[: len(rest) - len(tag) - 1] if tag else rest), tag, digest


# ---- Ray cluster launcher ------------------------------------------------------------------------------


def test_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(LAUNCHER)
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers"):
        assert key in config, f"cluster.yaml: no {key}"
    # What `ray up` does before it starts anything: defaults of the provider merged in, then the schema
    # that ships with the pinned ray and its cross-field checks (head type listed, min_workers <= max).
    validate_config(prepare_config(copy.deepcopy(config)))

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "cluster.yaml: no worker type with a GPU"
    for name, t in gpu_types.items():
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"] <= config["max_workers"], name
        assert t["max_workers"] >= 1, name
    assert config["provider"]["type"] == "aws"


def test_launcher_validation_rejects_a_misspelt_key():
    """The check above has teeth: the schema refuses a key that Ray would not read."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(LAUNCHER)
    config["max_worker"] = config.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(config))


def test_launcher_setup_installs_with_the_pins():
    config = load(LAUNCHER)
    commands = [*config.get("setup_commands", []), *config.get("worker_setup_commands", [])]
    installs = [c for c in commands if "pip install" in c]
    assert installs, "cluster.yaml: setup installs nothing"
    for c in installs:
        assert re.search(r"-c \S*constraints\.txt", c), f"not installed with constraints.txt: {c}"
    # The tree that setup installs is the one synced to each node.
    assert any(str(local).rstrip("/") in (".", "./") for local in config["file_mounts"].values())


# ---- KubeRay -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, kind", [(RAYCLUSTER, "RayCluster"), (RAYJOB, "RayJob")])
def test_kuberay_manifest_shape(path, kind):
    doc = load(path)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kind
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), "not a DNS-1123 name"
    assert isinstance(doc["spec"], dict)
    if kind == "RayJob":
        assert set(doc["spec"]) <= RAYJOB_SPEC_FIELDS, set(doc["spec"]) - RAYJOB_SPEC_FIELDS


@pytest.mark.parametrize("name, spec", cluster_specs(), ids=[n for n, _ in cluster_specs()])
def test_kuberay_cluster_spec(name, spec):
    assert set(spec) <= RAYCLUSTER_SPEC_FIELDS, set(spec) - RAYCLUSTER_SPEC_FIELDS
    assert set(spec["headGroupSpec"]) <= HEAD_GROUP_FIELDS, set(spec["headGroupSpec"]) - HEAD_GROUP_FIELDS
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_FIELDS
    # rayVersion must be the Ray in the image: KubeRay picks its commands and the autoscaler by it.
    assert spec["rayVersion"] == pin("ray")

    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_FIELDS, set(group) - WORKER_GROUP_FIELDS
        assert (
            0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        )
        limits = [c.get("resources", {}).get("limits", {}) for c in group["template"]["spec"]["containers"]]
        if any(int(lim.get("nvidia.com/gpu", 0)) >= 1 for lim in limits):
            gpu_groups.append(group["groupName"])
    assert gpu_groups, f"{name}: no worker group with an nvidia.com/gpu limit"
    for c in spec["headGroupSpec"]["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}), "the head is CPU-only"


def test_rayjob_runs_the_clean_job_and_shuts_down():
    spec = load(RAYJOB)["spec"]
    assert shlex.split(spec["entrypoint"])[:3] == ["python", "-m", "jobs.clean"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    # One cluster definition, not two that drift apart.
    assert spec["rayClusterSpec"] == load(RAYCLUSTER)["spec"]


@pytest.mark.parametrize("name, spec", cluster_specs(), ids=[n for n, _ in cluster_specs()])
def test_kuberay_credentials_come_from_a_secret(name, spec):
    for c in containers(spec):
        secrets = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
        assert secrets == ["cropclean-s3"], f"{name}/{c['name']}: S3 credentials not from the Secret"
        literal = [e["name"] for e in c.get("env", []) if "value" in e and e["name"].startswith("AWS_")]
        assert not literal, f"{name}/{c['name']}: AWS settings written into the manifest: {literal}"


def test_no_credentials_in_infra_files():
    key_id = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
    secret = re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{40}")
    for path in [p for p in INFRA.rglob("*") if p.is_file()]:
        text = path.read_text()
        assert not key_id.search(text), f"{path.relative_to(ROOT)}: an AWS access key id"
        assert not secret.search(text), f"{path.relative_to(ROOT)}: an AWS secret key"


# ---- images --------------------------------------------------------------------------------------------


def test_every_image_is_pinned_and_the_project_tag_is_one():
    refs = image_refs()
    assert all(refs.values()), f"a file names no image: {refs}"
    project_tags = set()
    for name, images in refs.items():
        for ref in images:
            repo, tag, digest = split_image(ref)
            assert tag or digest, f"{name}: {ref} has no tag"
            assert tag != "latest" and "nightly" not in tag, f"{name}: {ref} is not pinned"
            if repo.rsplit("/", 1)[-1] == "cropclean":
                project_tags.add(tag)
    assert project_tags == {project_version()}, f"project image tags {project_tags}, pyproject has another"
    # The launcher and both KubeRay manifests run the very same project image.
    project = {r for n, rs in refs.items() if n != "Dockerfile" for r in rs}
    assert len(project) == 1, project


def test_dockerfile_pins_its_base_and_installs_with_the_constraints():
    text = DOCKERFILE.read_text()
    (base,) = image_refs()["Dockerfile"]
    _, tag, digest = split_image(base)
    # A full release (python:3.11.14-..., rayproject/ray:2.58.0-...) or a digest, not a moving "3.11".
    assert digest or re.match(r"\d+\.\d+\.\d+", tag), f"base image {base} is not pinned to a release"
    if base.startswith("rayproject/ray:"):
        assert tag.startswith(pin("ray")), f"{base}: another Ray than constraints.txt's {pin('ray')}"

    lines = " ".join(text.replace("\\\n", " ").splitlines())
    installs = re.findall(r"pip install[^&;]*", lines)
    assert installs, "the Dockerfile installs nothing"
    for cmd in installs:
        assert "-c constraints.txt" in cmd, f"not installed with constraints.txt: {cmd}"
    assert re.search(r"pip install -c constraints\.txt '?\.\[s3\]", lines), "the project is not installed"
    copied = re.findall(r"^COPY\s+(.+)$", text, re.M)
    assert any("constraints.txt" in c.split() for c in copied), "constraints.txt is not copied in"
    assert (ROOT / ".dockerignore").exists()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


# ---- entrypoints ---------------------------------------------------------------------------------------


def join_inline_code(text: str) -> str:
    """Markdown inline code that a paragraph wraps onto its next line, put back on one line."""
    parts = text.split("`")
    for i in range(1, len(parts), 2):
        if not parts[i].startswith("\n"):  # a fenced block's body starts with a newline: left alone
            parts[i] = parts[i].replace("\n", " ")
    return "`".join(parts)


def job_commands() -> list[tuple[str, list[str]]]:
    """Every ``python -m jobs.<name> ...`` command in infra/ and docs/cluster.md, as argv lists."""
    found = []
    for path in [RAYJOB, RAYCLUSTER, LAUNCHER, CLUSTER_DOC]:
        text = re.sub(r"\\\n\s*(#\s*)?", " ", path.read_text())  # join continued lines, in comments too
        text = join_inline_code(text)
        for m in re.finditer(r"python -m jobs\.(\w+)([^`\n'\"]*)", text):
            found.append((f"{path.name}: {m.group(0).strip()}", [m.group(1), *shlex.split(m.group(2))]))
    return found


def test_job_commands_parse_with_the_cli():
    commands = job_commands()
    assert any(name.startswith("rayjob.yaml") for name, _ in commands)
    assert any(name.startswith("cluster.md") for name, _ in commands), "docs/cluster.md shows no job"
    parser = build_parser()
    for name, argv in commands:
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{name}: the CLI refuses these arguments")
        assert (ROOT / "jobs" / f"{argv[0]}.py").is_file(), f"{name}: no module jobs/{argv[0]}.py"
        if getattr(args, "preset", None):
            assert args.preset in presets(), f"{name}: no preset {args.preset!r}"


def test_rayjob_entrypoint_resolves_to_a_valid_config():
    argv = shlex.split(load(RAYJOB)["spec"]["entrypoint"])[3:]
    args = build_parser().parse_args(["clean", *argv])
    assert args.preset == "food101"
    assert args.out.startswith("s3://") and args.source.startswith("s3://")
    cfg = build_config(
        {"sources": [{"uri": args.source}], "out": args.out}, preset=args.preset, sets=args.sets
    )
    assert cfg.out == args.out
    assert [m.arch for m in cfg.train.members] == ["inception_v3", "resnet50", "vgg16_bn"]
