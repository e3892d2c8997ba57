#!/usr/bin/env python3
"""Checks the Helm chart without a cluster: Helm's own lint (strict) and an offline render
with the default values and with ci/all-features-values.yaml, then validates every rendered
manifest against the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields
are errors) for the oldest and newest Kubernetes the chart supports, and checks invariants
the schemas cannot see. Exits non-zero on any finding.

Needs `pip install helm-python-sdk kubernetes-validate` (Helm's library, offline rendering;
helm-sdkpy lints but cannot render without a cluster).
"""

import pathlib
import sys

import helm_python
import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "artifactd"
KUBERNETES = ["1.27.0", kubernetes_validate.latest_version()]
# Custom resources: no schema ships with kubernetes-validate; checked by hand below.
CUSTOM = {("monitoring.coreos.com/v1", "ServiceMonitor")}

problems = []


def problem(where, what):
    problems.append(f"{where}: {what}")


def lint(name, values):
    report = helm_python.lint(str(CHART), values, strict=True)
    for message in report.get("messages", []):
        if message.get("severity", 0) >= 2:
            problem(f"lint [{name}] {message.get('path')}", message.get("error"))
    for error in report.get("errors") or []:
        problem(f"lint [{name}]", error)


def render(name, values, upgrade):
    chart = helm_python.Chart.load(str(CHART))
    rendered = chart.render(
        values,
        name="ci",
        namespace="artifactd",
        is_install=not upgrade,
        is_upgrade=upgrade,
    )
    manifests = []
    for template, text in sorted(rendered.items()):
        if not template.endswith((".yaml", ".yml")):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                manifests.append((f"[{name}] {template}", document))
    return manifests


def validate(manifests):
    for where, manifest in manifests:
        key = (manifest.get("apiVersion"), manifest.get("kind"))
        if key in CUSTOM:
            continue
        for version in KUBERNETES:
            try:
                kubernetes_validate.validate(manifest, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = "/".join(str(p) for p in e.path)
                problem(f"{where} ({manifest['kind']}, k8s {version})", f"{path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                problem(f"{where} ({manifest['kind']})", f"no schema: {e}")


def by_kind(manifests, kind):
    return [m for _, m in manifests if m["kind"] == kind]


def invariants(name, manifests, values):
    deployment = by_kind(manifests, "Deployment")[0]
    service = by_kind(manifests, "Service")[0]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    selector = deployment["spec"]["selector"]["matchLabels"]
    if not selector.items() <= pod["metadata"]["labels"].items():
        problem(name, "the Deployment's selector does not match its pods")
    if service["spec"]["selector"] != selector:
        problem(name, "the Service does not select the Deployment's pods")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    if ports.get("grpc", {}).get("appProtocol") != "grpc":
        problem(name, "the Service's grpc port lacks appProtocol: grpc")
    security = container["securityContext"]
    if not (
        security.get("readOnlyRootFilesystem")
        and security.get("allowPrivilegeEscalation") is False
        and security.get("capabilities", {}).get("drop") == ["ALL"]
        and pod["spec"]["securityContext"].get("runAsNonRoot")
    ):
        problem(name, "the pod must be non-root, read-only, without capabilities")
    for probe in ("livenessProbe", "startupProbe"):
        if "grpc" not in container.get(probe, {}):
            problem(name, f"{probe} must be a gRPC health probe")
    if container.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
        problem(name, "the readiness probe must be GET /readyz")
    drain = int(values.get("config", {}).get("drainTimeoutSeconds", 30))
    if pod["spec"]["terminationGracePeriodSeconds"] <= 2 * drain:
        problem(name, "terminationGracePeriodSeconds must exceed twice the drain timeout")
    annotations = pod["metadata"].get("annotations", {})
    if "checksum/config" not in annotations:
        problem(name, "no checksum annotation: config changes would not roll the pods")
    config = by_kind(manifests, "ConfigMap")[0]["data"]
    if config.get("ARTIFACTD_DRAIN_TIMEOUT") != f"{drain}s":
        problem(name, "ARTIFACTD_DRAIN_TIMEOUT differs from drainTimeoutSeconds")
    # Hooks: the migration Job's Secret must exist before the Job runs.
    jobs = by_kind(manifests, "Job")
    secrets = {s["metadata"]["name"]: s for s in by_kind(manifests, "Secret")}
    for job in jobs:
        hook = job["metadata"].get("annotations", {})
        if "pre-install" not in hook.get("helm.sh/hook", ""):
            problem(name, "the migration Job is not a pre-install hook")
        env = job["spec"]["template"]["spec"]["containers"][0]["env"]
        ref = next(e for e in env if e["name"] == "DATABASE_URL")["valueFrom"]["secretKeyRef"]
        secret = secrets.get(ref["name"])
        existing = values.get("secrets", {}).get("existingSecret")
        if existing:
            if ref["name"] != existing:
                problem(name, "the migration Job must read the existing Secret")
        elif secret is None:
            problem(name, f"the migration Job reads Secret {ref['name']}, which the chart does not create")
        else:
            weight = int(secret["metadata"].get("annotations", {}).get("helm.sh/hook-weight", "0"))
            if "pre-install" not in secret["metadata"].get("annotations", {}).get("helm.sh/hook", ""):
                problem(name, "the migration Secret is not a hook: it would not exist at pre-install")
            if weight >= int(hook.get("helm.sh/hook-weight", "0")):
                problem(name, "the migration Secret must be created before the Job (lower weight)")
    for monitor in by_kind(manifests, "ServiceMonitor"):
        if monitor["spec"]["selector"]["matchLabels"].items() - service["metadata"]["labels"].items():
            problem(name, "the ServiceMonitor does not select the Service")
        for endpoint in monitor["spec"]["endpoints"]:
            if endpoint.get("port") not in ports or endpoint.get("path") != "/metrics":
                problem(name, "the ServiceMonitor must scrape the http port's /metrics")


def main():
    sets = {
        "default": {},
        "all-features": yaml.safe_load((CHART / "ci" / "all-features-values.yaml").read_text()),
    }
    kinds = {}
    for name, values in sets.items():
        lint(name, values)
        for upgrade in (False, True):
            manifests = render(name, values, upgrade)
            validate(manifests)
            invariants(name, manifests, values)
            kinds[name] = sorted({m["kind"] for _, m in manifests})
    for name, found in kinds.items():
        print(f"helm-check: {name}: {', '.join(found)}")
    if problems:
        for line in problems:
            print(f"helm-check: {line}", file=sys.stderr)
        sys.exit(1)
    print(f"helm-check: lint clean, every manifest valid for Kubernetes {' and '.join(KUBERNETES)}")


if __name__ == "__main__":
    main()
