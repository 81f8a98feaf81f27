"""infra/: the image and the KubeRay manifests agree with what the pipeline reads.

Parses infra/Dockerfile, .dockerignore and every YAML document under infra/k8s, and holds
them to pyproject.toml, jobs/ and the code itself: the CLI's parser, the spec loader, the
address resolution and remote-cluster rule of the driver, and MLflow's Host-header check.
"""

from __future__ import annotations

import configparser
import fnmatch
import re
import shlex
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from gen_models import registry
from pipelines import cli, config, storage, tracking
from pipelines.cluster import STOP_WAIT_S, resolve_address, target
from pipelines.pipeline import entrypoint_resources, stages_of

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
DOCKERFILE = ROOT / "infra" / "Dockerfile"
SECRET_LIKE = re.compile(r"KEY|SECRET|PASSWORD|TOKEN", re.IGNORECASE)
# The pins that make or break the image; the Dockerfile installs them before the package.
HEAVY_PINS = ("torch", "torchvision", "ray", "mlflow")
# The KubeRay operator pod's labels as its two installs set them: the Helm chart (release
# kuberay-operator, no nameOverride) and the kustomize manifests (ray-operator/config/manager).
OPERATOR_POD_LABELS = {
    "helm": {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay-operator",
             "app.kubernetes.io/component": "kuberay-operator"},
    "kustomize": {"app.kubernetes.io/name": "kuberay", "app.kubernetes.io/component": "kuberay-operator"},
}


# -- reading ---------------------------------------------------------------------------

def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def pins(text: str) -> dict[str, Requirement]:
    """Every `name==version` that a `pip install` in the Dockerfile asks for."""
    found = {}
    for word, args in instructions(text):
        if word == "RUN" and "pip install" in args:
            for token in shlex.split(args):
                if "==" in token:
                    req = Requirement(token)
                    found[canonicalize_name(req.name)] = req
    return found


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pin_drift(docker_text: str) -> list[str]:
    """How the Dockerfile's pins differ from pyproject.toml's; empty when they agree."""
    ours = {canonicalize_name(r.name): r for r in map(Requirement, project()["dependencies"])}
    theirs = pins(docker_text)
    drift = [f"{name}: Dockerfile does not pin it" for name in HEAVY_PINS if name not in theirs]
    for name, req in theirs.items():
        if name in ours and (req.specifier, req.extras) != (ours[name].specifier, ours[name].extras):
            drift.append(f"{name}: Dockerfile {req}, pyproject.toml {ours[name]}")
    return drift


@cache
def dockerfile() -> str:
    return DOCKERFILE.read_text()


def image_tag() -> str:
    """The tag the Dockerfile's header tells to build."""
    match = re.search(r"docker build -f infra/Dockerfile -t (\S+) \.", dockerfile())
    assert match, "the Dockerfile's header gives no `docker build ... -t TAG .` command"
    return match.group(1)


def workdir() -> str:
    return [args for word, args in instructions(dockerfile()) if word == "WORKDIR"][-1]


def base_image() -> str:
    """The image the final stage is built FROM, its ARG default filled in."""
    steps = instructions(dockerfile())
    args = dict(a.split("=", 1) for word, a in steps if word == "ARG" and "=" in a)
    image = [a.split()[0] for word, a in steps if word == "FROM"][-1]
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)


def runs_with(text: str) -> list[int]:
    """Indices (into instructions()) of the RUN instructions whose command holds TEXT."""
    return [i for i, (word, args) in enumerate(instructions(dockerfile())) if word == "RUN" and text in args]


@cache
def documents() -> tuple[tuple[str, dict], ...]:
    """(file name, document) of every YAML document under infra/k8s."""
    return tuple((path.name, doc) for path in sorted(K8S.glob("*.yaml"))
                 for doc in yaml.safe_load_all(path.read_text()) if doc is not None)


def objects(kind: str | None = None) -> list[dict]:
    return [doc for name, doc in documents() if name != "kustomization.yaml" and kind in (None, doc["kind"])]


def one(kind: str, name: str | None = None) -> dict:
    found = [o for o in objects(kind) if name in (None, o["metadata"].get("name"))]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def templates(obj: dict) -> list[tuple[str, dict]]:
    """(where, pod template) of every pod an object makes."""
    spec = obj.get("spec", {})
    if obj["kind"] == "RayCluster":
        return [("head", spec["headGroupSpec"]["template"])] + [
            (f"worker group {g['groupName']}", g["template"]) for g in spec["workerGroupSpecs"]]
    if obj["kind"] == "RayJob":
        return [("submitter", spec["submitterPodTemplate"])]
    return [("pod", spec["template"])] if "template" in spec else []


def containers(obj: dict) -> list[dict]:
    return [c for _, t in templates(obj) for c in t["spec"].get("initContainers", []) + t["spec"]["containers"]]


def every_container() -> list[tuple[str, dict]]:
    return [(f"{o['kind']}/{o['metadata'].get('name') or o['metadata']['generateName']}", c)
            for o in objects() for c in containers(o)]


def param_id(value: str | dict) -> str:
    return value if isinstance(value, str) else value["name"]


def env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def secret_ref(entry: dict) -> dict | None:
    return entry.get("valueFrom", {}).get("secretKeyRef")


def raycluster() -> dict:
    return one("RayCluster")


def rayjob() -> dict:
    return one("RayJob")


def head() -> dict:
    return raycluster()["spec"]["headGroupSpec"]["template"]


def workers() -> list[dict]:
    return raycluster()["spec"]["workerGroupSpecs"]


def ray_containers() -> list[tuple[str, dict]]:
    """The containers that run Ray: head, workers and the RayJob's submitter."""
    return [(f"{o['kind']} {where}", c) for o in (raycluster(), rayjob())
            for where, t in templates(o) for c in t["spec"]["containers"]]


def node_containers() -> list[tuple[str, dict]]:
    """The containers Ray nodes run in: the head's and the workers'."""
    return [(where, c) for where, c in ray_containers() if "submitter" not in where]


def port(container: dict, name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


def args_of(container: dict) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in container["args"])


def entrypoint_args():
    """The RayJob's entrypoint, read by the CLI's own parser."""
    argv = shlex.split(rayjob()["spec"]["entrypoint"])
    assert argv[0] == "genpipe", argv
    return cli.parser().parse_args(argv[1:])


def gpus(container: dict) -> int:
    res = container.get("resources", {})
    return int(res.get("limits", {}).get("nvidia.com/gpu") or res.get("requests", {}).get("nvidia.com/gpu") or 0)


def selects(selector: dict, pod_labels: dict) -> bool:
    assert "matchExpressions" not in selector, "the checks below read matchLabels only"
    return selector.get("matchLabels", {}).items() <= pod_labels.items()


def labels(template: dict) -> dict:
    return template["metadata"]["labels"]


def policies_for(template_labels: dict) -> list[dict]:
    return [p for p in objects("NetworkPolicy") if p["spec"]["podSelector"]
            and selects(p["spec"]["podSelector"], template_labels)]


def peer_admits(peer: dict, pod_labels: dict) -> bool:
    return "ipBlock" not in peer and "podSelector" in peer and selects(peer["podSelector"], pod_labels)


def mlflow_container() -> dict:
    return containers(one("Deployment", "mlflow"))[0]


def mounted_file(obj: dict, container: dict, path: str) -> str:
    """The text of the file at PATH in the container, given by a ConfigMap volume of the pod."""
    spec = templates(obj)[0][1]["spec"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(Path(path).parent))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    return one("ConfigMap", volume["configMap"]["name"])["data"][Path(path).name]


def mlflow_auth_ini() -> configparser.ConfigParser:
    ini = configparser.ConfigParser()
    ini.read_string(mounted_file(one("Deployment", "mlflow"), mlflow_container(),
                                 env(mlflow_container())["MLFLOW_AUTH_CONFIG_PATH"]["value"]))
    return ini


def postgres_container() -> dict:
    return containers(one("StatefulSet", "postgres"))[0]


# -- the image -------------------------------------------------------------------------

def test_image_tag_is_the_project_version():
    assert image_tag() == f"genpipe:{project()['version']}"


def test_dockerfile_pins_match_pyproject():
    assert pin_drift(dockerfile()) == []


def test_a_diverging_pin_is_caught():
    """The check above is real: a Dockerfile that pins another torch, or drops ray, fails it."""
    assert pin_drift(dockerfile().replace('"torch==2.14.1"', '"torch==2.14.0"')) == [
        "torch: Dockerfile torch==2.14.0, pyproject.toml torch==2.14.1"]
    assert "ray: Dockerfile does not pin it" in pin_drift(re.sub(r'"ray\[[^"]*"', "", dockerfile()))


def test_image_runs_as_a_numeric_non_root_user():
    user = [args for word, args in instructions(dockerfile()) if word == "USER"][-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, f"USER {user}: Kubernetes' runAsNonRoot needs a non-zero UID"
    for obj in objects():
        for where, t in templates(obj):
            sc = t["spec"].get("securityContext", {})
            assert sc.get("runAsNonRoot") is True, f"{obj['kind']} {where}"
            if all(c["image"] == image_tag() for c in t["spec"]["containers"]):
                assert sc.get("runAsUser") == int(user), f"{obj['kind']} {where} runs as another user than the image's"


def test_image_bakes_in_no_secret_and_copies_what_the_jobs_need():
    for word, args in instructions(dockerfile()):
        if word in ("ENV", "ARG"):
            for name in re.findall(r"(\w+)=", args):
                assert not SECRET_LIKE.search(name), f"{word} {name}: credentials come from the pod's Secrets"
    copies = [args.split() for word, args in instructions(dockerfile()) if word == "COPY" and "--from" not in args]
    assert ["jobs", "jobs"] in copies and workdir() == "/app", "the RayJob's --config is read from /app/jobs"


def test_image_runs_a_released_python_of_the_projects_version_and_a_current_pip():
    """The official Python image of the minor version the suite runs on (a CUDA base's distribution
    Python can be a release candidate: Ubuntu 22.04's python3.11), its pip upgraded before any install."""
    match = re.fullmatch(r"python:(\d+)\.(\d+)(\.\d+)?-slim-\w+", base_image())
    assert match, f"FROM {base_image()}: an official python:X.Y[.Z]-slim-<debian> image"
    assert (int(match.group(1)), int(match.group(2))) == sys.version_info[:2]
    assert not any(re.search(r"apt-get install.*\bpython3", args) for word, args in instructions(dockerfile())
                   if word == "RUN"), "Python comes from the base image, not the distribution"
    (upgrade,) = runs_with('pip install "pip==')
    assert upgrade < min(runs_with("pip install")[1:]), "pip is upgraded before anything else is installed"
    assert int(re.search(r'"pip==(\d+)', instructions(dockerfile())[upgrade][1]).group(1)) >= 24


def test_image_shows_no_gpu_to_pods_that_ask_for_none():
    """A CUDA base sets NVIDIA_VISIBLE_DEVICES=all, and the NVIDIA runtime then hands every GPU of a node to
    the head, MLflow and the submitter. Without it only the device plugin's pods get GPUs, and with
    `compute` the CUDA torch's wheels need from the driver."""
    assert not base_image().startswith("nvidia/")
    image_env = dict(kv.split("=", 1) for word, args in instructions(dockerfile()) if word == "ENV"
                     for kv in shlex.split(args))
    assert "NVIDIA_VISIBLE_DEVICES" not in image_env
    assert "compute" in image_env["NVIDIA_DRIVER_CAPABILITIES"].split(",")


def test_dependencies_install_before_the_sources_are_copied():
    """A code change rebuilds only the layers from the first source COPY on: every dependency is in a layer
    above it, read from pyproject.toml by the Dockerfile's own command, and the package installs without."""
    steps = instructions(dockerfile())
    first_source = min(i for i, (word, args) in enumerate(steps)
                       if word == "COPY" and args.split()[0] in ("gen_models", "pipelines", "jobs"))
    (deps,) = runs_with("-r /tmp/requirements.txt")
    assert deps < first_source
    command = shlex.split(steps[deps][1].split(">")[0])  # python -c "...": what writes the requirements
    assert command[:2] == ["python", "-c"]
    listed = subprocess.run([sys.executable, "-c", command[2]], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.splitlines()
    assert listed == project()["dependencies"]
    (package,) = [args for word, args in steps if word == "RUN" and re.search(r"pip install [-\w ]*\.( |$)", args)]
    assert "--no-deps" in package


def dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or a directory above it wins."""
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    parts, out = path.split("/"), False
    for pattern in patterns:
        keep = pattern.startswith("!")
        if any(fnmatch.fnmatch("/".join(parts[:i]), pattern.lstrip("!")) for i in range(1, len(parts) + 1)):
            out = not keep
    return out


def test_build_context_has_the_sources_and_nothing_private():
    for word, args in instructions(dockerfile()):
        if word == "COPY" and "--from" not in args:
            for source in args.split()[:-1]:
                assert not dockerignored(source), f"COPY {source}, but .dockerignore leaves it out"
    for private in (".venv/bin/python", ".git/config", ".genpipe/mlflow.db", "pipelines/__pycache__/cli.pyc"):
        assert dockerignored(private), private


# -- the manifests ---------------------------------------------------------------------

def test_every_manifest_parses_into_namespaced_objects():
    names = {p.name for p in K8S.glob("*.yaml")}
    assert {name for name, _ in documents()} == names, "a file under infra/k8s holds no document"
    for obj in objects():
        assert obj["apiVersion"] and obj["kind"], obj
        meta = obj["metadata"]
        assert meta.get("name") or meta.get("generateName"), meta
        assert meta.get("namespace") == ("genpipe" if obj["kind"] != "Namespace" else None), meta


def test_kustomization_applies_the_standing_parts_only():
    kustomization = next(doc for name, doc in documents() if name == "kustomization.yaml")
    listed = set(kustomization["resources"])
    assert all((K8S / r).is_file() for r in listed)
    apart = {"kustomization.yaml", "secrets.example.yaml", "rayjob.yaml"}
    assert listed == {p.name for p in K8S.glob("*.yaml")} - apart
    # kubectl create (not apply) then names every submission anew.
    assert "name" not in rayjob()["metadata"] and rayjob()["metadata"]["generateName"]


@pytest.mark.parametrize("where, container", every_container(), ids=param_id)
def test_every_container_runs_the_image(where, container):
    if where == "StatefulSet/postgres":
        assert re.fullmatch(r"postgres:\d+\.\d+[-\w]*", container["image"]), container["image"]
    else:
        assert container["image"] == image_tag()


@pytest.mark.parametrize("where, container", every_container(), ids=param_id)
def test_secret_looking_env_comes_from_a_secret(where, container):
    for name, entry in env(container).items():
        if SECRET_LIKE.search(name):
            assert "value" not in entry and secret_ref(entry), f"{where}: {name} must come from a secretKeyRef"
    assert not any("secretRef" in e or "configMapRef" in e for e in container.get("envFrom", []))


def test_secrets_template_covers_every_reference_with_placeholders_only():
    template = [doc for name, doc in documents() if name == "secrets.example.yaml"]
    assert template and all(doc["kind"] == "Secret" and "data" not in doc for doc in template)
    keys = {(doc["metadata"]["name"], key) for doc in template for key in doc["stringData"]}
    for doc in template:
        for key, value in doc["stringData"].items():
            assert re.fullmatch(r"<[^<>]+>", value), f"{key}: only <placeholders> belong in the template"
    for where, container in every_container():
        for name, entry in env(container).items():
            if ref := secret_ref(entry):
                assert (ref["name"], ref["key"]) in keys, f"{where} {name}: {ref} is not in secrets.example.yaml"
    assert {name for name, doc in documents() if doc.get("kind") == "Secret"} == {"secrets.example.yaml"}


@pytest.mark.parametrize("where, container", ray_containers(), ids=param_id)
def test_ray_runs_with_token_auth_from_the_secret(where, container):
    auth = raycluster()["spec"]["authOptions"]
    assert auth["mode"] == "token"
    e = env(container)
    assert e["RAY_AUTH_MODE"]["value"] == "token"
    assert secret_ref(e["RAY_AUTH_TOKEN"]) == {"name": auth["secretName"], "key": "auth_token"}


@pytest.mark.parametrize("container", [c for t in [head()] + [g["template"] for g in workers()]
                                       for c in t["spec"]["containers"]], ids=lambda c: c["name"])
def test_ray_nodes_have_what_the_stages_read(container):
    e = env(container)
    assert not tracking.is_local_uri(e["MLFLOW_TRACKING_URI"]["value"])
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert secret_ref(e[name])["name"] == "genpipe-s3", name
    assert secret_ref(e["AWS_ENDPOINT_URL"]).get("optional") is True  # only a non-AWS S3 needs it


def test_head_is_cpu_only_and_workers_have_gpus():
    assert all(gpus(c) == 0 for c in head()["spec"]["containers"])
    assert workers() and all(gpus(g["template"]["spec"]["containers"][0]) >= 1 for g in workers())


def test_head_offers_ray_no_cpu_and_no_gpu():
    """Ray counts what a node can see: a head that is shown GPUs (a node whose default runtime is nvidia)
    would offer Train GPUs that belong to worker pods. No CPUs either: Train workers and the prepare job
    stay off the head and its GCS."""
    params = raycluster()["spec"]["headGroupSpec"]["rayStartParams"]
    assert (params["num-cpus"], params["num-gpus"]) == ("0", "0")


@pytest.mark.parametrize("where, container", node_containers(), ids=param_id)
def test_ray_lets_a_stopped_driver_outlast_its_stage_jobs_stop(where, container):
    """Deleting a RayJob stops its driver: SIGTERM, then SIGKILL RAY_JOB_STOP_WAIT_TIME_S later (3 s by
    default). The driver marks its runs KILLED first, then waits up to STOP_WAIT_S for its stage job:
    all of that must fit. Every node has it: a job's stop is run where its driver is."""
    assert int(env(container)["RAY_JOB_STOP_WAIT_TIME_S"]["value"]) >= STOP_WAIT_S + 10


def test_dashboard_stays_inside_the_cluster():
    assert raycluster()["spec"]["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    assert not raycluster()["spec"].get("enableIngress")
    assert all(s["spec"].get("type", "ClusterIP") == "ClusterIP" for s in objects("Service"))
    assert not objects("Ingress") and not objects("Route")


# -- the RayJob, as the CLI reads it -----------------------------------------------------

def test_rayjob_entrypoint_is_genpipe_pipeline_on_the_head_service():
    a = entrypoint_args()
    assert a.command == "pipeline" and a.fn is cli.cmd_pipeline and a.until == "register"
    assert rayjob()["spec"]["clusterSelector"] == {"ray.io/cluster": raycluster()["metadata"]["name"]}
    url, local = resolve_address(a.address)  # what the driver does with --address (RAY_ADDRESS would be GCS's)
    parsed = urlparse(url)
    assert not local
    assert parsed.hostname == f"{raycluster()['metadata']['name']}-head-svc"  # KubeRay's head Service name
    assert parsed.port == port(head()["spec"]["containers"][0], "dashboard")


@pytest.mark.parametrize("family", list(registry.FAMILIES))
def test_rayjob_spec_loads_and_fits_the_cluster(family):
    """Each family's spec, swapped into the RayJob as README's sed does, loads as the driver
    loads it, meets the remote-cluster rule and fits the GPU worker group."""
    a = entrypoint_args()
    assert a.config == f"{workdir()}/jobs/dcgan.yaml", "README's sed swaps jobs/dcgan.yaml"
    swapped = a.config.replace("jobs/dcgan.yaml", f"jobs/{family}.yaml")
    spec = config.load(ROOT / Path(swapped).relative_to(workdir()), a.set or [])
    root = storage.validate(spec.storage)
    uri = env(head()["spec"]["containers"][0])["MLFLOW_TRACKING_URI"]["value"]
    assert storage.is_s3(root) and not tracking.is_local_uri(uri), "pipeline.py refuses a remote cluster otherwise"
    worker = [g for g in workers() if gpus(g["template"]["spec"]["containers"][0])]
    capacity = sum(g["replicas"] * gpus(g["template"]["spec"]["containers"][0]) for g in worker)
    assert spec.train.use_gpu and spec.train.num_workers <= capacity
    cpu = min(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]) for g in worker)
    assert spec.train.cpus_per_worker <= cpu
    # Each stage job's driver: what it reserves fits a worker, and prepare's lands on one (the head offers
    # no CPU), away from the GCS. The driver reads the cluster as remote, as the RayJob's --address makes it.
    local = target(a.address)[1]
    reserved = {stage: entrypoint_resources(spec, stage, local=local) for stage in stages_of(spec)}
    assert all(r["num_cpus"] <= cpu and r["num_gpus"] <= 1 for r in reserved.values())
    assert reserved["prepare"]["num_cpus"] > float(raycluster()["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"])
    assert reserved["evaluate"]["num_gpus"] == 1


def test_a_local_head_reserves_no_cpu_for_a_stage_job():
    """A local head is one machine: a CPU a stage job's driver reserves is one Train's workers lack."""
    spec = config.load(ROOT / "jobs" / "smoke.yaml", [])
    assert target(None)[1] and target("http://127.0.0.1:8265")[1]
    for stage in stages_of(spec):
        assert entrypoint_resources(spec, stage, local=True)["num_cpus"] == 0, stage


def test_finished_rayjobs_delete_themselves_and_leave_the_cluster():
    """KubeRay >= 1.6's deletionRules: only DeleteSelf (DeleteCluster and DeleteWorkers are refused with
    a clusterSelector, and the RayCluster stands for the next run), one status per condition, from the
    values its CRD admits, every way a RayJob can end covered, and an hour at least to read its log."""
    spec = rayjob()["spec"]
    assert not spec.get("shutdownAfterJobFinishes") and "ttlSecondsAfterFinished" not in spec  # not with rules
    rules = spec["deletionStrategy"]["deletionRules"]
    ended = set()
    for rule in rules:
        assert rule["policy"] == "DeleteSelf", rule
        (status, value), = [(k, v) for k, v in rule["condition"].items() if k != "ttlSeconds"]
        assert value in {"jobStatus": {"SUCCEEDED", "FAILED"}, "jobDeploymentStatus": {"Failed"}}[status], rule
        assert isinstance(rule["condition"]["ttlSeconds"], int) and rule["condition"]["ttlSeconds"] >= 3600, rule
        ended.add(value)
    assert ended == {"SUCCEEDED", "FAILED", "Failed"}


# -- MLflow and PostgreSQL ---------------------------------------------------------------

def test_tracking_uri_reaches_mlflow_and_passes_its_host_check():
    from mlflow.server.security_utils import is_allowed_host_header

    svc, deployment = one("Service", "mlflow"), one("Deployment", "mlflow")
    assert selects({"matchLabels": svc["spec"]["selector"]}, labels(deployment["spec"]["template"]))
    uri = urlparse(env(head()["spec"]["containers"][0])["MLFLOW_TRACKING_URI"]["value"])
    assert uri.hostname.split(".")[0] == svc["metadata"]["name"] and uri.port == svc["spec"]["ports"][0]["port"]
    args = args_of(mlflow_container())
    assert svc["spec"]["ports"][0]["targetPort"] == port(mlflow_container(), "http") == int(args["port"])
    assert args["host"] == "0.0.0.0"
    allowed = args["allowed-hosts"].split(",")
    for host in (uri.netloc, "127.0.0.1:5000", "localhost:5000"):  # Ray pods, and kubectl port-forward
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "attacker.example:5000")


def test_mlflow_stores_runs_in_postgres_and_artifacts_in_the_pipelines_bucket():
    args = args_of(mlflow_container())
    db = urlparse(args["backend-store-uri"])
    pg, pg_env = one("Service", "postgres"), env(postgres_container())
    assert db.scheme == "postgresql" and db.password is None, "the password comes from PGPASSWORD, not the URI"
    assert (db.hostname, db.port) == (pg["metadata"]["name"], pg["spec"]["ports"][0]["port"])
    assert (db.username, db.path) == (pg_env["POSTGRES_USER"]["value"], "/" + pg_env["POSTGRES_DB"]["value"])
    assert secret_ref(env(mlflow_container())["PGPASSWORD"]) == secret_ref(pg_env["POSTGRES_PASSWORD"])
    artifacts, storage_uri = args["artifacts-destination"], config.load(None, entrypoint_args().set or []).storage
    assert artifacts.startswith("s3://") and urlparse(artifacts).netloc == urlparse(storage_uri).netloc
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # the server proxies artifacts to S3
        assert secret_ref(env(mlflow_container())[name])["name"] == "genpipe-s3", name


def test_postgres_creates_every_database_the_manifests_name():
    """MLflow creates tables, never databases: each one a URI names is POSTGRES_DB or made by an init
    script (run by the image when it initialises an empty volume)."""
    named = {urlparse(args_of(mlflow_container())["backend-store-uri"]).path.lstrip("/"),
             urlparse(mlflow_auth_ini()["mlflow"]["database_uri"]).path.lstrip("/")}
    pg = one("StatefulSet", "postgres")
    created = {env(postgres_container())["POSTGRES_DB"]["value"]}
    mount = next(m for m in postgres_container()["volumeMounts"] if m["mountPath"] == "/docker-entrypoint-initdb.d")
    volume = next(v for v in pg["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    for name, script in one("ConfigMap", volume["configMap"]["name"])["data"].items():
        assert name.endswith(".sql"), name
        created |= set(re.findall(r"CREATE DATABASE (\w+);", script))
    assert named == {"mlflow", "mlflow_auth"} and named <= created, (named, created)


def test_mlflow_runs_with_basic_auth_and_the_ray_pods_log_in(tmp_path, monkeypatch):
    """The ini as MLflow's own reader reads it; the admin the server creates from the Secret is who the
    Ray pods log in as, and the UI's session key comes from a Secret too."""
    from mlflow.server.auth.config import read_auth_config

    assert args_of(mlflow_container())["app-name"] == "basic-auth"
    ini = tmp_path / "basic_auth.ini"
    with open(ini, "w") as f:
        mlflow_auth_ini().write(f)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    auth = read_auth_config()
    db = urlparse(auth.database_uri)
    assert db.scheme == "postgresql" and db.password is None, "libpq reads the password from PGPASSWORD"
    assert (db.hostname, db.port) == (one("Service", "postgres")["metadata"]["name"],
                                      one("Service", "postgres")["spec"]["ports"][0]["port"])
    assert auth.default_permission == "READ"
    server = env(mlflow_container())
    assert secret_ref(server["MLFLOW_FLASK_SERVER_SECRET_KEY"])
    assert {k: server[k]["value"] for k in tracking.SERVER_ENV} == tracking.SERVER_ENV  # as `genpipe ui` runs it
    for where, container in node_containers():  # the submitter only runs `ray job submit`
        e = env(container)
        assert secret_ref(e["MLFLOW_TRACKING_USERNAME"]) == secret_ref(server["MLFLOW_AUTH_ADMIN_USERNAME"]), where
        assert secret_ref(e["MLFLOW_TRACKING_PASSWORD"]) == secret_ref(server["MLFLOW_AUTH_ADMIN_PASSWORD"]), where


# -- NetworkPolicy -----------------------------------------------------------------------

def test_namespace_denies_by_default():
    deny = [p for p in objects("NetworkPolicy") if p["spec"]["podSelector"] == {}]
    assert len(deny) == 1 and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny[0]["spec"] and "egress" not in deny[0]["spec"]


def test_ray_pods_take_traffic_from_ray_pods_and_job_api_callers_only():
    ray = [labels(head())] + [labels(g["template"]) for g in workers()]
    policies = policies_for(ray[0])
    assert len(policies) == 1 and all(policies_for(lab) == policies for lab in ray)
    policy = policies[0]["spec"]
    assert {"Ingress", "Egress"} <= set(policy["policyTypes"])
    submitter = labels(rayjob()["spec"]["submitterPodTemplate"])
    dashboard = port(head()["spec"]["containers"][0], "dashboard")
    job_api_callers = 0
    for rule in policy["ingress"]:
        assert rule.get("from"), "an ingress rule without `from` admits everyone"
        for peer in rule["from"]:
            assert "ipBlock" not in peer, peer
            if peer_admits(peer, ray[0]):
                continue
            operator = all(peer_admits(peer, pod) for pod in OPERATOR_POD_LABELS.values())
            assert peer_admits(peer, submitter) or (operator and peer.get("namespaceSelector") == {}), peer
            assert peer["podSelector"].get("matchLabels"), "an empty podSelector admits every pod"
            assert [p["port"] for p in rule["ports"]] == [dashboard], "others may reach the job API only"
            job_api_callers += 1
    assert job_api_callers == 2, "the RayJob submitter and the KubeRay operator must reach the job API"
    mlflow_port = port(mlflow_container(), "http")
    assert any(any(peer_admits(peer, labels(one("Deployment", "mlflow")["spec"]["template"])) for peer in rule["to"])
               and [p["port"] for p in rule["ports"]] == [mlflow_port] for rule in policy["egress"])


@pytest.mark.parametrize("server, client, server_port", [
    ("Deployment/mlflow", "ray", 5000), ("StatefulSet/postgres", "Deployment/mlflow", 5432)])
def test_mlflow_and_postgres_take_traffic_from_their_one_client(server, client, server_port):
    def pod_labels(ref: str) -> dict:
        if ref == "ray":
            return labels(head())
        kind, name = ref.split("/")
        return labels(one(kind, name)["spec"]["template"])

    policies = policies_for(pod_labels(server))
    assert len(policies) == 1 and "Ingress" in policies[0]["spec"]["policyTypes"]
    rules = policies[0]["spec"]["ingress"]
    assert all(peer_admits(peer, pod_labels(client)) for rule in rules for peer in rule["from"])
    assert [p["port"] for rule in rules for p in rule["ports"]] == [server_port]
