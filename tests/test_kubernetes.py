"""contrib/kubernetes/fugue.yaml holds together with fugue's own options.

There is no Kubernetes here: the manifest is parsed (PyYAML) and its command is
parsed by fuguectl's own parser, its fugue.toml built by fugue's own config
code, and the probes, ports and timeouts are checked against what fugue does
with those options: /healthz on the status listener for readiness, /livez for
liveness, drain_delay instead of a preStop sleep, a grace period that outlasts
drain_delay + graceful_timeout + the kill margin, fugue itself as PID 1.
"""

import os
import tomllib

import pytest
import yaml

from conftest import ROOT

from fugue import config, ctlargs
from fugue.policy import KILL_MARGIN
from fugue.statushttp import parse_status_bind

MANIFEST = os.path.join(ROOT, "contrib", "kubernetes", "fugue.yaml")


@pytest.fixture(scope="module")
def docs():
    with open(MANIFEST) as f:
        items = [d for d in yaml.safe_load_all(f) if d]
    return {d["kind"]: d for d in items}


def fugue_setup(docs):
    """(the container, fuguectl's parsed args, the Config it starts with)."""
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container["command"] + container.get("args", [])
    args = ctlargs.build_parser().parse_args(command[1:])
    mount = next(m for m in container["volumeMounts"] if args.config.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    configmap = docs["ConfigMap"]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    toml = configmap["data"][os.path.relpath(args.config, mount["mountPath"])]
    options = tomllib.loads(toml)
    if args.version:
        options["version"] = args.version
    return pod, container, args, config.build(options, start_dir="/")


def port_number(container, port):
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p["name"] == port)


def test_fugue_is_pid_1_in_the_foreground(docs):
    pod, container, args, cfg = fugue_setup(docs)
    assert container["command"][0] == "fuguectl" and args.command == "start"  # exec form: no shell
    assert args.app and not cfg.daemonize
    assert "lifecycle" not in container  # no preStop sleep: drain_delay does it


def test_probes_reach_the_status_listener(docs):
    pod, container, args, cfg = fugue_setup(docs)
    host, status_port = parse_status_bind(cfg.status_bind)
    assert host in (None, "0.0.0.0", "::")  # the kubelet probes the pod's address, not loopback
    ready, live = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert ready["path"] == "/healthz" and live["path"] == "/livez"
    assert port_number(container, ready["port"]) == status_port == port_number(container, live["port"])
    assert "startupProbe" not in container or container["startupProbe"]["httpGet"]["port"] == ready["port"]


def test_the_service_reaches_the_app_listener(docs):
    pod, container, args, cfg = fugue_setup(docs)
    (bind,) = cfg.bind
    app_port = int(bind.rsplit(":", 1)[1])
    service = docs["Service"]
    assert service["spec"]["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]
    assert [port_number(container, p["targetPort"]) for p in service["spec"]["ports"]] == [app_port]
    assert app_port != parse_status_bind(cfg.status_bind)[1]


def test_timeouts_let_the_drain_finish(docs):
    pod, container, args, cfg = fugue_setup(docs)
    assert cfg.drain_delay > 0
    probe = container["readinessProbe"]
    # readiness fails within drain_delay of SIGTERM: the pod leaves the endpoints while it still serves
    assert probe["periodSeconds"] * probe["failureThreshold"] + probe["timeoutSeconds"] < cfg.drain_delay
    # the kubelet's SIGKILL comes only after the drain and the graceful stop (and fugue's kill margin)
    assert pod["terminationGracePeriodSeconds"] > cfg.drain_delay + cfg.graceful_timeout + KILL_MARGIN
    # liveness does not kill a pod whose master is merely busy: its loop answers /livez at once
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= cfg.timeout
    strategy = docs["Deployment"]["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0
