"""The Kubernetes manifests in deploy/, checked offline (no cluster).

Every overlay is rendered with ``kubectl kustomize``; each rendered object is validated against the
Kubernetes API schemas (kubernetes-validate, strict: unknown fields fail) of the versions below, the
sources and the rendered files pass yamllint, and checkov finds nothing (its suppressions are
pinned here and each carries its reason). Then the properties the server and the trainer rely on:
the kubelet's grace period outlasts the server's drain, the probes, one GPU per server pod,
non-root, autoscaling on the queue depth the server exports, and the training Job's rendezvous,
shared checkpoints and resume. The command lines are parsed by the real parsers (the server's,
the trainer's, torchrun's), so a renamed flag fails here and not on a cluster.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
# 1.34: the version we state (README: Kubernetes); 1.30: the oldest we support (the preStop sleep
# action is on by default from 1.30).
KUBERNETES_VERSIONS = ("1.30.0", "1.34.0")
SERVING = ("overlays/sd15", "overlays/sdxl")
TRAINING = ("training/overlays/sd15", "training/overlays/sdxl")
# Per-GPU batch of the README's training-memory table (and the training benchmark's rows).
TRAINING_BATCH = {"training/overlays/sd15": ("sd15", 8), "training/overlays/sdxl": ("sdxl", 2)}
# checkov findings we accept, each with the reason in the manifest's annotation.
ACCEPTED_SKIPS = {"CKV_K8S_43", "CKV_K8S_35"}
KILL_MARGIN_S = 10  # the server's --grace help: a stop timeout should exceed the drain by about 10 s


# -- rendering and lookups -----------------------------------------------------------------------------
@functools.cache
def _render(overlay: str) -> tuple[str, tuple[dict[str, Any], ...]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is missing: these tests render deploy/ with `kubectl kustomize` (our machines' image has"
                    " it; elsewhere install a recent one, checked with 1.32: https://kubernetes.io/docs/tasks/tools/)")
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY / overlay)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, f"kubectl kustomize deploy/{overlay} failed:\n{out.stderr}"
    return out.stdout, tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def _objects(overlay: str, kind: str) -> list[dict[str, Any]]:
    return [doc for doc in _render(overlay)[1] if doc["kind"] == kind]


def _one(overlay: str, kind: str) -> dict[str, Any]:
    found = _objects(overlay, kind)
    assert len(found) == 1, f"deploy/{overlay}: expected one {kind}, found {len(found)}"
    return found[0]


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def _expand(args: list[str], env: list[dict[str, Any]]) -> list[str]:
    """Kubernetes' $(VAR) expansion of a container's args from its literal env values."""
    values = {e["name"]: e["value"] for e in env if "value" in e}
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: values.get(m[1], m[0]), a) for a in args]


def _mount(workload: dict[str, Any], path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The volume mount holding ``path`` and its volume."""
    mounts = [m for m in _container(workload)["volumeMounts"]
              if (path + "/").startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"nothing is mounted at {path}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    (volume,) = [v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    return mount, volume


def _claim(overlay: str, volume: dict[str, Any]) -> dict[str, Any]:
    name = volume["persistentVolumeClaim"]["claimName"]
    (claim,) = [c for c in _objects(overlay, "PersistentVolumeClaim") if c["metadata"]["name"] == name]
    return claim


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _server_argv(deployment: dict[str, Any]) -> list[str]:
    """What the server's process gets: the image's ENTRYPOINT flags, then the container's args."""
    entry = re.search(r"^ENTRYPOINT\s+(\[.*\])", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert entry, "the Dockerfile has no exec-form ENTRYPOINT"
    entrypoint = json.loads(entry[1])
    assert entrypoint[:3] == ["python", "-m", "dmd2_serve"] and "command" not in _container(deployment)
    return entrypoint[3:] + _container(deployment)["args"]


def _queue_depth_metric() -> str:
    """The name under which the server exports its queue depth."""
    from dmd2_serve.server.metrics import QUEUE_DEPTH

    (family,) = QUEUE_DEPTH.describe()
    return family.name


def _checkov() -> str:
    """checkov pins networkx<2.7 and packaging<24, older than torch's stack wants, so it is not in the
    test extras: it lives in its own virtual environment (.ci/run makes build/checkov)."""
    for candidate in (os.environ.get("CHECKOV"), str(ROOT / "build" / "checkov" / "bin" / "checkov"),
                      shutil.which("checkov")):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail("checkov is missing; in its own venv: python -m venv build/checkov &&"
                " build/checkov/bin/pip install 'checkov>=3.2' (or set CHECKOV=/path/to/checkov)")


# -- every overlay renders, validates and lints ---------------------------------------------------------
def test_every_overlay_is_covered() -> None:
    found = {str(p.parent.relative_to(DEPLOY)) for p in DEPLOY.glob("**/overlays/*/kustomization.yaml")}
    assert found == set(SERVING + TRAINING)


@pytest.mark.parametrize("overlay", SERVING + TRAINING)
def test_rendered_objects_match_the_api_schemas(overlay: str) -> None:
    import kubernetes_validate

    docs = _render(overlay)[1]
    assert docs
    for doc in docs:
        assert doc["metadata"].get("namespace") == "dmd2", f"{doc['kind']} {doc['metadata']['name']}: no namespace"
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"deploy/{overlay}: {doc['kind']} {doc['metadata']['name']} is not valid Kubernetes"
                            f" {version}: {e.message}")


def test_yamllint_sources_and_rendered() -> None:
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    conf = YamlLintConfig(file=str(DEPLOY / ".yamllint"))
    texts = {str(p.relative_to(ROOT)): p.read_text() for p in sorted(DEPLOY.rglob("*.yaml"))}
    texts |= {f"rendered deploy/{o}": _render(o)[0] for o in SERVING + TRAINING}
    problems = [f"{name}:{p.line}:{p.column}: {p.desc} ({p.rule})"
                for name, text in texts.items() for p in linter.run(text, conf)]
    assert not problems, "\n".join(problems)


def test_checkov_finds_nothing(tmp_path: Path) -> None:
    checkov = _checkov()
    for overlay in SERVING + TRAINING:
        (tmp_path / (overlay.replace("/", "-") + ".yaml")).write_text(_render(overlay)[0])
    # One run over all of them (checkov takes seconds to start); --skip-download: no network.
    out = subprocess.run([checkov, "-d", str(tmp_path), "--framework", "kubernetes", "--skip-download", "-o", "json"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert out.stdout.strip(), f"checkov printed no report (exit {out.returncode}):\n{out.stderr[-3000:]}"
    report = json.loads(out.stdout)
    results, summary = report["results"], report["summary"]
    failed = [f"{c['check_id']} {c['check_name']} ({c['resource']}, {c['file_path']})"
              for c in results["failed_checks"]]
    assert not failed, "checkov failed checks:\n" + "\n".join(failed)
    assert summary["parsing_errors"] == 0 and summary["passed"] > 0, summary
    skipped = results["skipped_checks"]
    reasons = [c["check_result"].get("suppress_comment", "") for c in skipped]
    assert all(len(reason) > 20 for reason in reasons), f"a suppression without its reason: {reasons}"
    assert {c["check_id"] for c in skipped} <= ACCEPTED_SKIPS, "a new checkov suppression: justify it here"


# -- the server ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", SERVING)
def test_server_grace_period_outlasts_the_drain(overlay: str) -> None:
    from dmd2_serve.__main__ import _parser

    deployment = _one(overlay, "Deployment")
    args = _parser().parse_args(_server_argv(deployment))
    pre_stop = _container(deployment)["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace_period = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # preStop runs first, then SIGTERM starts the drain; the kubelet's SIGKILL comes at grace_period.
    assert grace_period >= pre_stop + args.grace + KILL_MARGIN_S, (grace_period, pre_stop, args.grace)
    assert pre_stop >= 5, "the load balancers need a few seconds to stop sending"


@pytest.mark.parametrize("overlay", SERVING)
def test_server_probes(overlay: str) -> None:
    from dmd2_serve.__main__ import _parser

    deployment = _one(overlay, "Deployment")
    container = _container(deployment)
    args = _parser().parse_args(_server_argv(deployment))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == args.port == 8000 and args.host == "0.0.0.0"
    readiness, liveness, startup = container["readinessProbe"], container["livenessProbe"], container["startupProbe"]
    assert readiness["httpGet"] == {"path": "/health", "port": "http"}
    # Liveness: not /health (503 while draining) and patient enough for a long batch.
    assert "tcpSocket" in liveness or liveness["httpGet"]["path"] != "/health"
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60 and liveness["timeoutSeconds"] >= 5
    # Nothing listens until the model is warm (compiled): the startup probe waits for it, minutes.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


@pytest.mark.parametrize("overlay", SERVING)
def test_server_gpu_volumes_and_security(overlay: str) -> None:
    from dmd2_serve.__main__ import _parser

    deployment = _one(overlay, "Deployment")
    container, pod = _container(deployment), deployment["spec"]["template"]["spec"]
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= resources["requests"].keys() and {"cpu", "memory"} <= resources["limits"].keys()
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"

    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] >= 10000
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"] and "add" not in security["capabilities"]
    assert pod["automountServiceAccountToken"] is False

    args = _parser().parse_args(_server_argv(deployment))
    (_, model_dir), = args.model  # one generator per pod: [(name or None, folder)]
    model_mount, model_volume = _mount(deployment, str(model_dir))
    assert model_mount.get("readOnly") is True and model_volume["persistentVolumeClaim"].get("readOnly") is True
    cache_mount, cache_volume = _mount(deployment, str(args.compile_cache))
    assert not cache_mount.get("readOnly") and "ReadWriteMany" in _claim(overlay, cache_volume)["spec"]["accessModes"]
    # A read-only root: HOME and temporary files (LitServe's manager, the metrics folder) need /tmp.
    tmp_mount, tmp_volume = _mount(deployment, "/tmp")
    assert "emptyDir" in tmp_volume and not tmp_mount.get("readOnly")

    # The API key comes from a Secret created on the cluster; none is in the repository.
    (key,) = [e for e in container["env"] if e["name"] == "DMD2_API_KEY"]
    assert key["valueFrom"]["secretKeyRef"]["name"] and "value" not in key
    assert "--api-key" not in _server_argv(deployment), "a key in the args is visible to anyone who can read the pod"
    assert not _objects(overlay, "Secret")


@pytest.mark.parametrize("overlay", SERVING)
def test_server_service_hpa_pdb_and_network_policy(overlay: str) -> None:
    deployment = _one(overlay, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _selects(deployment["spec"]["selector"]["matchLabels"], labels)

    service = _one(overlay, "Service")
    assert _selects(service["spec"]["selector"], labels)
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]

    hpa = _one(overlay, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "dmd2_queue_depth" == _queue_depth_metric()
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]

    pdb = _one(overlay, "PodDisruptionBudget")
    assert _selects(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"].get("maxUnavailable") == 1 and hpa["spec"]["minReplicas"] >= 2, "one pod keeps serving"

    policy = _one(overlay, "NetworkPolicy")
    assert _selects(policy["spec"]["podSelector"]["matchLabels"], labels)
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"} and policy["spec"]["egress"] == []
    for rule in policy["spec"]["ingress"]:  # only from named namespaces (the ingress controller, Prometheus)
        assert rule["from"] and all(set(peer) == {"namespaceSelector"} for peer in rule["from"])
        assert [p["port"] for p in rule["ports"]] == ["http"]


def test_prometheus_adapter_rule_serves_the_queue_depth() -> None:
    (rule,) = yaml.safe_load((DEPLOY / "prometheus-adapter-rule.yaml").read_text())["rules"]["custom"]
    name = _queue_depth_metric()
    assert rule["seriesQuery"].startswith(name + "{") and rule["name"]["as"] == name
    assert re.fullmatch(rule["name"]["matches"], name)
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


# -- training --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", TRAINING)
def test_training_job_rendezvous_and_resume(overlay: str) -> None:
    from torch.distributed.run import get_args_parser

    from dmd2_train.__main__ import _parser
    from dmd2_train.config import DISTILL_PRESETS, DistillConfig, build_config, given, parse_overrides

    job, service = _one(overlay, "Job"), _one(overlay, "Service")
    container, pod = _container(job), job["spec"]["template"]["spec"]
    args = _expand(container["args"], container["env"])
    assert not [a for a in args if "$(" in a], "an unresolved $(VAR) in the args"

    # sh -c 'exec torchrun --rdzv-conf=... "$@"' torchrun ARGS: torchrun with the rendezvous conf, then ARGS.
    shell, flag, script, zeroth = container["command"]
    assert (shell, flag, zeroth) == ("/bin/sh", "-c", "torchrun")
    torchrun = shlex.split(script.split("exec ", 1)[1])
    assert torchrun[0] == "torchrun" and torchrun[-1] == "$@"
    conf = re.sub(r"\$host", "1", torchrun[1])
    run = get_args_parser().parse_args([conf, *args])
    assert run.module and run.training_script == "dmd2_train"
    assert run.rdzv_backend == "c10d" and "join_timeout" in run.rdzv_conf

    # Rendezvous at pod 0 through the headless Service: <job>-0.<service>:<its port>.
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert pod["subdomain"] == service["metadata"]["name"]
    assert _selects(service["spec"]["selector"], job["spec"]["template"]["metadata"]["labels"])
    (port,) = service["spec"]["ports"]
    assert run.rdzv_endpoint == f"{job['metadata']['name']}-0.{service['metadata']['name']}:{port['port']}"
    nnodes = int(run.nnodes)
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == nnodes >= 2
    gpus = container["resources"]["requests"]["nvidia.com/gpu"]
    assert gpus == container["resources"]["limits"]["nvidia.com/gpu"] == int(run.nproc_per_node)

    # A failed container restarts in place, a lost pod comes back under its index; both resume.
    assert pod["restartPolicy"] == "OnFailure" and job["spec"]["backoffLimit"] >= 3 and run.max_restarts >= 1
    assert pod["terminationGracePeriodSeconds"] > run.shutdown_timeout, "the kubelet would kill a checkpoint write"

    trainer = _parser().parse_args(["distill", *run.training_script_args])
    assert trainer.resume, "a rescheduled pod must continue from the newest checkpoint"
    out_mount, out_volume = _mount(job, str(trainer.out))
    assert not out_mount.get("readOnly") and "ReadWriteMany" in _claim(overlay, out_volume)["spec"]["accessModes"]
    for path in (trainer.teacher, trainer.prompts, trainer.real_images):
        assert _mount(job, str(path))[0].get("readOnly") is True

    flags = {"teacher": trainer.teacher, "out": trainer.out, "prompts": trainer.prompts,
             "real_images": trainer.real_images}
    cfg = build_config(DistillConfig, DISTILL_PRESETS, trainer.preset, [given(flags), parse_overrides(trainer.overrides)])
    assert (trainer.preset, cfg.batch_size) == TRAINING_BATCH[overlay]
    if trainer.preset == "sdxl":  # batch 2 at 1024x1024 fits 80 GB only with the preset's levers
        assert cfg.gradient_checkpointing and cfg.offload_optimizer and cfg.sharding == "ddp"

    security = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True and security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
    policy = _one(overlay, "NetworkPolicy")
    assert _selects(policy["spec"]["podSelector"]["matchLabels"], job["spec"]["template"]["metadata"]["labels"])
