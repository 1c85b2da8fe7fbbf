"""The deployment files, checked with the real tools that run here (no Docker engine does).

- docker-compose.yml (and docker/compose.gpu.yml): resolved by Compose (Debian's docker-compose),
  with and without profiles; the commands and BADEXPERT_* settings in it are the project's own.
- docker/Dockerfile: parsed by BuildKit's parser (PyPI `dockerfile`); .dockerignore applied by
  docker-py's implementation (the one Compose builds contexts with).
- docker/prometheus/: promtool check config, check rules, test rules (and the rule tests fail on a
  weakened rule); every dashboard query is valid PromQL (promtool) and uses only metrics the server
  exports.
- docker/grafana/: provisioning and dashboard JSON agree (datasource uid, paths), every panel has a
  query; docker/nginx/: nginx -t.
- docker/k8s/: every manifest against the Kubernetes JSON schemas (kubernetes-validate, strict, two
  Kubernetes versions), plus the references between them.

scripts/install-deploy-tools.sh installs the tools; a missing one skips its tests with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE_FILE = REPO / "docker-compose.yml"
GPU_OVERRIDE = DOCKER / "compose.gpu.yml"
PROMETHEUS_CONFIG = DOCKER / "prometheus" / "prometheus.yml"
RULES = DOCKER / "prometheus" / "rules" / "badexpert.yml"
RULE_TESTS = DOCKER / "prometheus" / "tests" / "badexpert_test.yml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "badexpert.json"
DATASOURCES = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DOCKER / "grafana" / "provisioning" / "dashboards" / "badexpert.yml"
NGINX_CONF = DOCKER / "nginx" / "nginx.conf"
K8S = DOCKER / "k8s"
DOCS = REPO / "docs" / "deploy.md"
INSTALL_HINT = "run scripts/install-deploy-tools.sh"
PASSWORD = "test-admin-password"

yaml = pytest.importorskip("yaml", reason=f"PyYAML is missing ({INSTALL_HINT})")


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.access(f"/usr/sbin/{name}", os.X_OK) else None)
    if path is None:
        pytest.skip(f"{name} is not installed ({INSTALL_HINT})")
    return path


def load_yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


# ----------------------------------------------------------------------------------------------
# Compose


def compose_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any setting that the compose file reads: the defaults show."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BADEXPERT_", "GRAFANA_", "PROMETHEUS_", "COMPOSE_", "DOCKER_"))}
    env["GRAFANA_ADMIN_PASSWORD"] = PASSWORD
    env.update(extra)
    return env


def run_compose(tmp_path: Path, *args: str, files=(COMPOSE_FILE,), env=None) -> subprocess.CompletedProcess:
    exe = tool("docker-compose")
    empty_env_file = tmp_path / "empty.env"  # a developer's own .env must not change the result
    empty_env_file.write_text("")
    command = [exe, "--project-directory", str(REPO), "--env-file", str(empty_env_file)]
    for path in files:
        command += ["-f", str(path)]
    return subprocess.run(command + list(args), cwd=REPO, env=env or compose_env(), capture_output=True,
                          text=True, timeout=120)


_RESOLVED: dict = {}


def resolved(tmp_path: Path, files=(COMPOSE_FILE,), **env: str) -> dict:
    """`docker-compose config`: the file as Compose resolves it (cached: Compose 1 starts slowly)."""
    key = (tuple(files), tuple(sorted(env.items())))
    if key not in _RESOLVED:
        result = run_compose(tmp_path, "config", files=files, env=compose_env(**env))
        assert result.returncode == 0, result.stderr
        _RESOLVED[key] = result.stdout
    return yaml.safe_load(_RESOLVED[key])


def compose_python() -> str:
    """The interpreter Debian's docker-compose runs on (its modules are importable there)."""
    first = Path(tool("docker-compose")).read_text(errors="replace").splitlines()[0]
    if not first.startswith("#!"):
        pytest.skip("docker-compose is not a Python script here; its modules cannot be used")
    return first[2:].strip().split()[0]


def volume_targets(service: dict) -> dict[str, dict]:
    return {v["target"]: v for v in (normalize_volume(v) for v in service.get("volumes", []))}


def normalize_volume(volume) -> dict:
    if isinstance(volume, dict):
        return volume
    parts = volume.split(":")
    return {"source": parts[0], "target": parts[1], "read_only": len(parts) > 2 and "ro" in parts[2].split(",")}


def normalize_port(port) -> dict:
    """Compose 1 prints "ip:published:target/proto", Compose 2 a mapping: one shape for both."""
    if isinstance(port, dict):
        return {"host_ip": port.get("host_ip", ""), "published": str(port.get("published", "")),
                "target": int(port["target"])}
    spec = str(port).split("/")[0]
    parts = spec.split(":")
    host_ip = parts[0] if len(parts) == 3 else ""
    return {"host_ip": host_ip, "published": parts[-2] if len(parts) > 1 else "", "target": int(parts[-1])}


def ports(service: dict) -> list[dict]:
    return [normalize_port(p) for p in service.get("ports", [])]


def test_compose_resolves_and_wires_the_services_together(tmp_path):
    config = resolved(tmp_path)
    services = config["services"]
    assert set(services) == {"guard", "build", "lb", "prometheus", "grafana"}

    guard = services["guard"]
    assert "ports" not in guard, "a fixed host port would break --scale guard=N: the lb publishes the port"
    assert [str(p) for p in guard["expose"]] == ["8000"]
    assert guard["environment"]["BADEXPERT_PORT"] == "8000" and guard["environment"]["BADEXPERT_HOST"] == "0.0.0.0"
    assert guard["environment"]["BADEXPERT_MODE"] == "enforce"
    assert guard["restart"] == "unless-stopped"
    assert guard["command"] == ["serve"]
    guard_volumes = volume_targets(guard)
    assert guard_volumes["/bundles"]["read_only"], "the guard must mount the bundle read-only"
    assert guard["environment"]["BADEXPERT_BUNDLE"] == "/bundles/current"
    audit = Path(guard["environment"]["BADEXPERT_AUDIT_LOG"])
    assert any(audit.is_relative_to(target) and not v["read_only"] for target, v in guard_volumes.items()), \
        "the audit log must be on a writable volume"
    assert guard["build"]["args"]["VARIANT"] == "cpu" and guard["image"].endswith(":cpu")
    assert (REPO / guard["build"]["dockerfile"]).is_file()

    # The offline job writes where the guard reads.
    build = services["build"]
    build_volumes = volume_targets(build)
    assert build["profiles"] == ["build"]
    assert not build_volumes["/bundles"]["read_only"]
    assert build_volumes["/bundles"]["source"] == guard_volumes["/bundles"]["source"] == "bundles"
    assert "bundles" in config["volumes"]
    assert build_volumes["/input/model"]["read_only"] and build_volumes["/input/clean"]["read_only"]

    # The load balancer publishes port 8000 and serves the nginx config of this repository.
    lb = services["lb"]
    assert any(p["published"] == "8000" and p["target"] == 8080 for p in ports(lb))
    assert all(p["host_ip"] == "127.0.0.1" for p in ports(lb)), "the API is published on loopback by default"
    assert volume_targets(lb)["/etc/nginx/nginx.conf"]["source"] == str(NGINX_CONF)

    prometheus = services["prometheus"]
    prometheus_volumes = volume_targets(prometheus)
    assert prometheus_volumes["/etc/prometheus/prometheus.yml"]["source"] == str(PROMETHEUS_CONFIG)
    assert prometheus_volumes["/etc/prometheus/rules"]["source"] == str(RULES.parent)
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert all(p["host_ip"] == "127.0.0.1" for p in ports(prometheus)), "Prometheus has no auth: loopback only"

    grafana = services["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == PASSWORD
    assert all(p["host_ip"] == "127.0.0.1" for p in ports(grafana)), "Grafana is published on loopback by default"
    grafana_volumes = volume_targets(grafana)
    assert grafana_volumes["/etc/grafana/provisioning"]["source"] == str(DOCKER / "grafana" / "provisioning")
    provider = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"][0]
    assert grafana_volumes[provider["options"]["path"]]["source"] == str(DASHBOARD.parent)
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home.parent == Path(provider["options"]["path"]) and (DASHBOARD.parent / home.name).is_file()


def test_compose_settings_come_from_the_environment(tmp_path):
    config = resolved(tmp_path, BADEXPERT_MODE="shadow", BADEXPERT_PORT="9000", BADEXPERT_BUNDLES="./bundles",
                      BADEXPERT_ARCH="tiny_cnn", BADEXPERT_WEIGHTS="suspect.safetensors",
                      BADEXPERT_BUILD_ARGS="--preset none --fpr 0.05")
    services = config["services"]
    assert services["guard"]["environment"]["BADEXPERT_MODE"] == "shadow"
    assert any(p["published"] == "9000" for p in ports(services["lb"]))
    exposed = resolved(tmp_path, BADEXPERT_BIND="0.0.0.0", GRAFANA_BIND="0.0.0.0")["services"]
    assert all(p["host_ip"] == "0.0.0.0" for p in ports(exposed["lb"]) + ports(exposed["grafana"]))
    assert volume_targets(services["guard"])["/bundles"]["source"] == str(REPO / "bundles")
    command = services["build"]["command"]
    argv = shlex.split(command) if isinstance(command, str) else command
    assert argv[argv.index("--model") + 1] == "tiny_cnn"
    assert argv[argv.index("--weights") + 1] == "/input/model/suspect.safetensors"
    assert argv[-4:] == ["--preset", "none", "--fpr", "0.05"]


def test_compose_refuses_to_start_grafana_without_an_admin_password(tmp_path):
    env = compose_env()
    del env["GRAFANA_ADMIN_PASSWORD"]
    result = run_compose(tmp_path, "config", env=env)
    assert result.returncode != 0
    assert "GRAFANA_ADMIN_PASSWORD" in result.stderr


def test_compose_profiles_select_the_build_job_only_when_asked(tmp_path):
    """Compose's own profile logic (compose.service.Service.enabled_for_profiles) on the loaded file."""
    script = textwrap.dedent("""
        import json, sys
        from compose.config import config
        from compose.config.environment import Environment
        from compose.service import Service
        project_dir, env_file, *files = sys.argv[1:]
        environment = Environment.from_env_file(project_dir, env_file)
        data = config.load(config.find(project_dir, files, environment))
        services = [Service(s['name'], **{k: v for k, v in s.items() if k != 'name'}) for s in data.services]
        print(json.dumps({name: sorted(s.name for s in services if s.enabled_for_profiles(profiles))
                          for name, profiles in {'default': [], 'build': ['build']}.items()}))
    """)
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.write_text("")
    for files in ([COMPOSE_FILE], [COMPOSE_FILE, GPU_OVERRIDE]):
        result = subprocess.run([compose_python(), "-c", script, str(REPO), str(empty_env_file), *map(str, files)],
                                env=compose_env(), capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        enabled = json.loads(result.stdout)
        assert enabled["default"] == ["grafana", "guard", "lb", "prometheus"]
        assert enabled["build"] == ["build", "grafana", "guard", "lb", "prometheus"]


def test_compose_gpu_override_reserves_an_nvidia_gpu(tmp_path):
    config = resolved(tmp_path, files=(COMPOSE_FILE, GPU_OVERRIDE))
    for name in ("guard", "build"):
        service = config["services"][name]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
        assert service["build"]["args"]["VARIANT"] == "cuda" and service["image"].endswith(":cuda")
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
    assert config["services"]["guard"]["environment"]["BADEXPERT_DEVICE"] == "cuda"
    argv = shlex.split(config["services"]["build"]["command"])
    assert argv[argv.index("--device") + 1] == "cuda"
    # Everything else is the CPU file's: the bundle mount, the lb, the monitoring.
    assert volume_targets(config["services"]["guard"])["/bundles"]["read_only"]
    assert set(config["services"]) == {"guard", "build", "lb", "prometheus", "grafana"}


def test_commands_in_compose_and_kubernetes_are_accepted_by_the_cli(tmp_path):
    from badexpert.main import build_parser

    parser = build_parser()
    commands = []
    for files in ((COMPOSE_FILE,), (COMPOSE_FILE, GPU_OVERRIDE)):
        services = resolved(tmp_path, files=files, BADEXPERT_BUILD_ARGS="--preset none --fpr 0.05")["services"]
        for name in ("guard", "build"):
            command = services[name]["command"]
            commands.append(shlex.split(command) if isinstance(command, str) else command)
    for path in K8S.rglob("*.yaml"):
        for doc in load_yaml_documents(path):
            for pod in pod_specs(doc):
                commands += [c.get("args", []) for c in pod["containers"]]
    assert any(c[0] == "serve" for c in commands) and any(c[0] == "build" for c in commands)
    for argv in commands:
        args = parser.parse_args(argv)  # argparse exits 2 on an unknown option or a bad value
        assert args.command == argv[0]


def server_setting_names() -> set[str]:
    from service.settings import ServiceSettings, env_name

    return {env_name(name) for name in ServiceSettings.model_fields}


def test_every_badexpert_variable_set_by_the_deployment_is_a_server_setting(tmp_path):
    """The server ignores unknown BADEXPERT_* variables: a typo here would silently do nothing."""
    known = server_setting_names()
    found: dict[str, str] = {}
    for files in ((COMPOSE_FILE,), (COMPOSE_FILE, GPU_OVERRIDE)):
        for name, value in resolved(tmp_path, files=files)["services"]["guard"]["environment"].items():
            found[name] = "compose"
    for line in (DOCKER / "Dockerfile").read_text().splitlines():
        found.update({name: "Dockerfile" for name in re.findall(r"\b(BADEXPERT_[A-Z_]+)=", line)})
    for path in K8S.rglob("*.yaml"):
        for doc in load_yaml_documents(path):
            for pod in pod_specs(doc):
                for container in pod["containers"]:
                    if container.get("args", [None])[0] == "serve":
                        found.update({e["name"]: str(path) for e in container.get("env", [])
                                      if e["name"].startswith("BADEXPERT_")})
    assert len(found) >= 8
    unknown = {name: where for name, where in found.items() if name not in known}
    assert not unknown, f"not server settings: {unknown}"


# ----------------------------------------------------------------------------------------------
# Dockerfile and build context


def dockerfile_commands():
    dockerfile = pytest.importorskip("dockerfile", reason=f"the BuildKit Dockerfile parser is missing ({INSTALL_HINT})")
    return dockerfile.parse_file(str(DOCKER / "Dockerfile"))


def stages(commands) -> dict[str, list]:
    result: dict[str, list] = {}
    current = None
    for command in commands:
        if command.cmd == "FROM":
            current = command.value[2].lower() if len(command.value) == 3 else f"stage{len(result)}"
            result[current] = []
        elif current is not None:
            result[current].append(command)
    return result


def pyproject_pins() -> dict[str, str]:
    """The exact pins (name==version) of pyproject.toml's dependencies."""
    return dict(re.findall(r'^\s*"([A-Za-z0-9_.-]+)==([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M))


def test_dockerfile_is_multistage_nonroot_with_healthcheck_and_no_compilers():
    commands = dockerfile_commands()
    global_args = {}
    for command in commands:
        if command.cmd == "FROM":
            break
        if command.cmd == "ARG":
            name, _, default = command.value[0].partition("=")
            global_args[name] = default
    assert global_args["VARIANT"] == "cpu"
    by_stage = stages(commands)
    assert list(by_stage) == ["builder", "runtime"]
    builder, runtime = by_stage["builder"], by_stage["runtime"]

    # The variant picks the PyTorch wheels; both pins are the project's own.
    builder_args = dict(c.value[0].partition("=")[::2] for c in builder if c.cmd == "ARG")
    pins = pyproject_pins()
    assert builder_args["TORCH_VERSION"] == pins["torch"] and builder_args["TORCHVISION_VERSION"] == pins["torchvision"]
    torch_run = next(c.value[0] for c in builder if c.cmd == "RUN" and "torch==" in c.value[0])
    assert re.search(r"cpu\)\s+pip install --index-url \"\$TORCH_CPU_INDEX\"", torch_run)
    assert re.search(r"cuda\)\s+pip install \"torch==", torch_run)
    assert "exit 2" in torch_run, "an unknown VARIANT must fail the build"
    assert builder_args["TORCH_CPU_INDEX"].endswith("/whl/cpu")
    assert any(c.cmd == "RUN" and re.search(r"\bpip install \.(\s|;|$)", c.value[0]) for c in builder)

    # Runtime: the builder's environment only, a non-root user, a health check on /healthz.
    copies = [c for c in runtime if c.cmd == "COPY"]
    assert [(c.flags, c.value) for c in copies] == [(("--from=builder",), ("/opt/badexpert", "/opt/badexpert"))]
    runtime_text = " ".join(" ".join(c.value) for c in runtime if c.cmd == "RUN")
    for compiler in ("gcc", "g++", "build-essential", "clang", "make ", "apt-get install", "pip install"):
        assert compiler not in runtime_text, f"the final stage must not install {compiler.strip()}"
    user = [c.value[0] for c in runtime if c.cmd == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root"), "the final stage must run as a non-root user"
    assert user[-1].split(":")[0].isdigit(), "a numeric uid lets Kubernetes check runAsNonRoot"
    assert f"--uid {user[-1].split(':')[0]}" in runtime_text
    health = [c for c in runtime if c.cmd == "HEALTHCHECK"]
    assert len(health) == 1 and health[0].value[0] == "CMD" and "/healthz" in health[0].value[1]
    assert [c.value for c in runtime if c.cmd == "ENTRYPOINT"] == [("badexpert",)]
    assert [c.value for c in runtime if c.cmd == "CMD"] == [("serve",)]
    assert [c.value for c in runtime if c.cmd == "EXPOSE"] == [("8000",)]
    env = {}
    for c in runtime:
        if c.cmd == "ENV":
            env.update(zip(c.value[::2], c.value[1::2]))
    assert env["BADEXPERT_PORT"] == "8000" and env["BADEXPERT_HOST"] == "0.0.0.0"
    assert env["BADEXPERT_DEVICE"] == "${VARIANT}"


def test_build_context_holds_what_the_dockerfile_copies_and_nothing_else(tmp_path):
    """.dockerignore applied by docker-py's exclude_paths (what Compose sends as the context)."""
    script = textwrap.dedent("""
        import json, sys
        from docker.utils.build import exclude_paths
        root = sys.argv[1]
        patterns = [l.strip() for l in open(root + '/.dockerignore') if l.strip() and not l.startswith('#')]
        print(json.dumps(sorted(exclude_paths(root, patterns, dockerfile='docker/Dockerfile'))))
    """)
    result = subprocess.run([compose_python(), "-c", script, str(REPO)], capture_output=True, text=True, timeout=60)
    if result.returncode != 0 and "No module named 'docker'" in result.stderr:
        pytest.skip(f"docker-py is missing ({INSTALL_HINT})")
    assert result.returncode == 0, result.stderr
    context = {p for p in json.loads(result.stdout) if (REPO / p).is_file()}
    sources = {p.relative_to(REPO).as_posix() for package in ("defense", "service", "badexpert")
               for p in (REPO / package).rglob("*.py") if "__pycache__" not in p.parts}
    assert {"pyproject.toml", "README.md"} | sources <= context
    assert "docker/Dockerfile" in context  # docker-py always keeps the Dockerfile
    unexpected = {p for p in context - sources - {"pyproject.toml", "README.md", "docker/Dockerfile", ".dockerignore"}
                  if not p.startswith(("defense/", "service/", "badexpert/"))}
    assert not unexpected, f"files in the build context that the image does not need: {sorted(unexpected)[:10]}"
    assert not any(p.endswith((".pyc", ".safetensors", ".pt")) or "__pycache__" in p for p in context)

    # pip builds the project from exactly that context (what `pip install .` in the builder sees).
    copy = tmp_path / "context"
    for relative in context:
        (copy / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / relative, copy / relative)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "--wheel-dir", str(tmp_path / "wheel"), str(copy)], capture_output=True, text=True,
                           timeout=120)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "wheel").glob("*.whl"))
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "service/app.py" in names and "badexpert/main.py" in names
    assert any(n.endswith("entry_points.txt") for n in names)


# ----------------------------------------------------------------------------------------------
# Prometheus


def test_promtool_checks_the_prometheus_config_with_its_rules(tmp_path):
    promtool = tool("promtool")
    # The config names the rules where the container mounts them; mirror that layout here.
    etc = tmp_path / "etc" / "prometheus"
    shutil.copytree(RULES.parent, etc / "rules")
    text = PROMETHEUS_CONFIG.read_text()
    assert "/etc/prometheus/rules/*.yml" in text
    (etc / "prometheus.yml").write_text(text.replace("/etc/prometheus/", f"{etc}/"))
    result = subprocess.run([promtool, "check", "config", str(etc / "prometheus.yml")], capture_output=True,
                            text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "SUCCESS" in output and f"{etc}/rules/badexpert.yml" in output and "rules found" in output

    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr

    # And promtool really reads them: a broken expression fails.
    broken = tmp_path / "broken.yml"
    broken.write_text(RULES.read_text().replace("sum(rate(badexpert_inputs_total[5m]))\n", "sum(rate(badexpert_inputs_total[5m])\n", 1))
    assert subprocess.run([promtool, "check", "rules", str(broken)], capture_output=True, timeout=60).returncode != 0


def test_prometheus_scrapes_every_guard_replica_by_dns():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "badexpert-guard")
    assert job["dns_sd_configs"] == [{"names": ["guard"], "type": "A", "port": 8000, "refresh_interval": "10s"}]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    assert "guard" in compose["services"] and "8000" in [str(p) for p in compose["services"]["guard"]["expose"]]


def test_alert_rule_unit_tests_pass_and_catch_a_weakened_rule(tmp_path):
    promtool = tool("promtool")
    result = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr

    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert {"BadExpertRejectionRateAboveBand", "BadExpertRejectionRateBelowBand", "BadExpertAttackConcentration",
            "BadExpertCleanScoreDrift"} <= set(alerts)
    tests_text = RULE_TESTS.read_text()
    assert all(f"alertname: {name}" in tests_text for name in alerts), "an alert without a promtool test"
    # The unit tests are sensitive: each weakened rule (the first occurrence replaced) fails them.
    for old, new in (("expected_at_high1h >= 10", "expected_at_high1h >= 1"),  # too few images to judge
                     ("+ 3.09 * sqrt", "+ 1 * sqrt"),  # a loose binomial limit: the 1.6% case fires
                     ("for: 5m", "for: 1m"), ("for: 10m", "for: 1m"),
                     ("flagged_share:ratio15m > 0.5", "flagged_share:ratio15m > 0.9"),
                     ("badexpert_clean_score_drift > 1", "badexpert_clean_score_drift > 5")):
        mutant_dir = tmp_path / re.sub(r"\W+", "_", f"{old}_{new}")
        (mutant_dir / "rules").mkdir(parents=True)
        (mutant_dir / "tests").mkdir()
        text = RULES.read_text()
        assert old in text
        (mutant_dir / "rules" / "badexpert.yml").write_text(text.replace(old, new, 1))
        shutil.copy(RULE_TESTS, mutant_dir / "tests" / RULE_TESTS.name)
        mutant = subprocess.run([promtool, "test", "rules", str(mutant_dir / "tests" / RULE_TESTS.name)],
                                capture_output=True, text=True, timeout=60)
        assert mutant.returncode != 0, f"the rule tests did not notice {old!r} -> {new!r}"


def test_alert_rules_carry_the_constants_of_the_python_checks():
    """service/live_checks.py (the bench, the unit tests) and the PromQL rules: one arithmetic."""
    from service import live_checks

    rules = yaml.safe_load(RULES.read_text())
    exprs = {r.get("alert") or r["record"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    for name in ("badexpert:bundle_rejected:upper_limit1h", "badexpert:bundle_rejected:lower_limit1h",
                 "badexpert:rejected_by_class:upper_limit15m"):
        assert re.findall(r"(\d+\.\d+) \* sqrt", exprs[name]) == [f"{live_checks.Z:g}"], name
    for name in ("BadExpertRejectionRateAboveBand", "BadExpertRejectionRateBelowBand"):
        assert f">= {live_checks.MIN_EXPECTED_REJECTIONS}\n" in exprs[name]
    concentration = exprs["BadExpertAttackConcentration"]
    assert f"> {live_checks.MAJORITY:g})" in concentration and f">= {live_checks.MIN_FLAGGED})" in concentration
    # No rule holds a fixed rejection percentage: every rate is compared with a bundle's band.
    assert not any(re.search(r"rejection_rate\S*\s*[<>]", expr) for expr in exprs.values())


# ----------------------------------------------------------------------------------------------
# Grafana


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict]) -> list[dict]:
    result = []
    for panel in panels:
        result.append(panel)
        result += all_panels(panel.get("panels", []))
    return result


def datasource_uid() -> str:
    sources = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert len(sources) == 1 and sources[0]["type"] == "prometheus"
    return sources[0]["uid"]


def substitute_for_promtool(expr: str) -> str:
    return (expr.replace("$__rate_interval", "1m").replace("$__range", "1h").replace("$__interval", "15s")
            .replace("$instance", ".*").replace("$tau", "0.5").replace("$target_fpr", "0.01"))


def test_dashboard_panels_all_query_the_provisioned_datasource():
    board = dashboard()
    uid = datasource_uid()
    sources = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert sources[0]["url"] == "http://prometheus:9090"  # the compose service and its port
    panels = [p for p in all_panels(board["panels"]) if p["type"] != "row"]
    assert len(panels) >= 10
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target.get("datasource", panel["datasource"])["uid"] == uid
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24
    for variable in board["templating"]["list"]:
        assert variable["datasource"]["uid"] == uid
    # The panels the issue asks for.
    titles = " | ".join(p["title"].lower() for p in panels)
    for words in ("rejection rate", "per predicted class", "score distribution", "request rate", "p50 / p95 / p99",
                  "batch size", "queue depth", "responses by status", "inside the bundle's fpr band",
                  "clean-score drift", "flagged share vs accepted share"):
        assert words in titles, words
    heatmap = next(p for p in panels if p["type"] == "heatmap")
    assert "tau" in heatmap["title"] and heatmap["targets"][0]["format"] == "heatmap"
    assert "badexpert_score_bucket" in heatmap["targets"][0]["expr"]
    quantiles = next(p for p in panels if p["title"].lower().startswith("latency"))
    assert sorted(t["expr"].split("(")[1].split(",")[0] for t in quantiles["targets"]) == ["0.5", "0.95", "0.99"]
    assert any("vector($tau)" in t["expr"] for p in panels for t in p["targets"]), "tau must be drawn"


def test_dashboard_json_is_what_its_program_generates(tmp_path):
    """docker/grafana/dashboard.py writes the JSON; the committed file must be its output."""
    pytest.importorskip("grafana_foundation_sdk", reason="grafana-foundation-sdk is missing (pip install -e .[test])")
    import importlib.util

    spec = importlib.util.spec_from_file_location("dashboard_program", DOCKER / "grafana" / "dashboard.py")
    program = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(program)
    assert program.OUTPUT == DASHBOARD
    assert program.render() == DASHBOARD.read_text(), "run python docker/grafana/dashboard.py"
    # --check says the same, and notices a hand edit.
    check = [sys.executable, str(DOCKER / "grafana" / "dashboard.py"), "--check"]
    assert subprocess.run(check, capture_output=True, timeout=120).returncode == 0
    program.OUTPUT = tmp_path / "edited.json"
    program.OUTPUT.write_text(DASHBOARD.read_text().replace("Rejection rate", "Rejection ratio", 1))
    assert program.main(["--check"]) == 1


def exported_metric_names() -> set[str]:
    """Every series name the server's registry exposes (with the _total/_bucket/... suffixes)."""
    from service.metrics import ServiceMetrics

    metrics = ServiceMetrics()
    metrics.bind_bundle("b", 0.5, 0.01, "enforce", ["a", "b"])
    metrics.count_status(200)
    metrics.record_inputs([0, 1], [0.1, 0.9], [True, False])
    metrics.record_candidate("b", [True, False], "c", [True, True])  # the shadow candidate's series
    from types import SimpleNamespace

    from service.monitoring import LiveMonitoring

    monitoring = LiveMonitoring(metrics.registry, drift_window=100, drift_blocks=2)
    manifest = SimpleNamespace(target_fpr=0.01, threshold={"fpr_range": [0.005, 0.015], "expected_fpr": 0.01},
                               calibration={"score_quantiles": {"0.5": 0.5, "0.9": 0.9}})
    monitoring.follow("live", "b", manifest)
    monitoring.record("live", "b", [0, 1], [0.1, 0.9], [True, False], ["a", "b"])
    names = set()
    for family in metrics.registry.collect():
        names |= {sample.name for sample in family.samples}
    return names


def dashboard_expressions() -> list[str]:
    board = dashboard()
    exprs = [t["expr"] for p in all_panels(board["panels"]) for t in p.get("targets", [])]
    return exprs


def test_every_dashboard_and_rule_query_is_valid_promql_on_exported_metrics(tmp_path):
    promtool = tool("promtool")
    exprs = dashboard_expressions()
    rules = yaml.safe_load(RULES.read_text())
    rule_exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    exported = exported_metric_names() | recorded | {"up", "ALERTS"}
    for expr in exprs + rule_exprs:
        for name in re.findall(r"\b(badexpert[_:][a-z0-9_:]*)", expr):
            assert name in exported, f"{name} in {expr!r} is not a series the server exports"
    # promtool parses every dashboard query (Grafana's variables replaced by concrete values).
    check = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query_{i}", "expr": substitute_for_promtool(e)}
                                                          for i, e in enumerate(exprs)]}]}
    (tmp_path / "dashboard_rules.yml").write_text(json.dumps(check))
    result = subprocess.run([promtool, "check", "rules", str(tmp_path / "dashboard_rules.yml")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_grafana_dashboard_provider_loads_the_dashboard_folder():
    provider = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())
    assert provider["apiVersion"] == 1
    (entry,) = provider["providers"]
    assert entry["type"] == "file" and entry["options"]["path"] == "/etc/grafana/dashboards"
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    names = [v["name"] for v in board["templating"]["list"]]
    assert {"instance", "tau", "target_fpr"} <= set(names)
    for expr in dashboard_expressions():
        for variable in re.findall(r"\$(\w+)", expr):
            assert variable in names or variable.startswith("__"), f"${variable} is not a dashboard variable"


# ----------------------------------------------------------------------------------------------
# nginx


def test_nginx_accepts_the_load_balancer_config(tmp_path):
    nginx = tool("nginx")
    result = subprocess.run([nginx, "-t", "-q", "-e", "stderr", "-p", str(tmp_path), "-c", str(NGINX_CONF)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    text = NGINX_CONF.read_text()
    assert re.search(r"^\s*listen 8080;", text, re.M)
    assert "resolver 127.0.0.11" in text  # Docker's DNS: one record per guard replica
    assert "set $guard_upstream http://guard:8000;" in text and "proxy_pass $guard_upstream;" in text
    # A broken file fails: nginx really parsed it.
    broken = tmp_path / "broken.conf"
    broken.write_text(text.replace("proxy_next_upstream_tries 3;", "proxy_next_upstream_tries;"))
    assert subprocess.run([nginx, "-t", "-q", "-e", "stderr", "-p", str(tmp_path), "-c", str(broken)],
                          capture_output=True, timeout=60).returncode != 0


# ----------------------------------------------------------------------------------------------
# Kubernetes


def pod_specs(doc: dict) -> list[dict]:
    kind = doc.get("kind")
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [doc["spec"]["template"]["spec"]]
    return []


def k8s_documents() -> list[tuple[Path, dict]]:
    """The built-in Kubernetes kinds (custom resources such as KServe's InferenceService have no schema
    in kubernetes-validate: tests/test_deploy_kserve.py checks those)."""
    docs = [(path, doc) for path in sorted(K8S.rglob("*.yaml")) for doc in load_yaml_documents(path)
            if not doc["apiVersion"].startswith("serving.kserve.io/")]
    assert docs
    return docs


def test_kubernetes_manifests_validate_against_the_schemas(tmp_path):
    kubernetes_validate = pytest.importorskip("kubernetes_validate",
                                              reason=f"kubernetes-validate is missing ({INSTALL_HINT})")
    versions = ["1.29.0", kubernetes_validate.latest_version()]
    for path, doc in k8s_documents():
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{path.relative_to(REPO)} ({doc['kind']}) against Kubernetes {version}: {error.message}")
    # The validator is strict: a misspelt field and a wrong type are refused.
    deployment = next(doc for _, doc in k8s_documents() if doc["kind"] == "Deployment")
    typo = json.loads(json.dumps(deployment))
    container = typo["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbes"] = container.pop("readinessProbe")
    wrong_type = json.loads(json.dumps(deployment))
    wrong_type["spec"]["replicas"] = "two"
    for bad in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, versions[-1], strict=True)


def test_kubernetes_manifests_reference_each_other():
    docs = k8s_documents()
    by_kind: dict[str, dict[str, dict]] = {}
    for _, doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    deployments = by_kind["Deployment"]
    assert set(deployments) == {"badexpert-guard", "badexpert-guard-gpu"}
    service = by_kind["Service"]["badexpert-guard"]
    claims = set(by_kind["PersistentVolumeClaim"])
    for name, deployment in deployments.items():
        template = deployment["spec"]["template"]
        labels = template["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert service["spec"]["selector"].items() <= labels.items(), f"the Service does not select {name}"
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
        (container,) = pod["containers"]
        assert container["args"] == ["serve"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        env = {e["name"]: e["value"] for e in container["env"]}
        assert ports["http"] == int(env["BADEXPERT_PORT"]) == 8000
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        bundle_volume = next(v for v in volumes.values() if "persistentVolumeClaim" in v)
        assert bundle_volume["persistentVolumeClaim"]["claimName"] in claims
        assert mounts[bundle_volume["name"]]["readOnly"] is True
        assert env["BADEXPERT_BUNDLE"].startswith(mounts[bundle_volume["name"]]["mountPath"] + "/")
        assert service["spec"]["ports"][0]["targetPort"] == "http"
    gpu = deployments["badexpert-guard-gpu"]["spec"]["template"]["spec"]["containers"][0]
    assert str(gpu["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert {e["name"]: e["value"] for e in gpu["env"]}["BADEXPERT_DEVICE"] == "cuda"
    assert gpu["image"].endswith(":cuda")
    cpu = deployments["badexpert-guard"]["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {}) and cpu["image"].endswith(":cpu")
    for hpa in by_kind["HorizontalPodAutoscaler"].values():
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment" and target["name"] in deployments
        assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    job = by_kind["Job"]["badexpert-build"]["spec"]["template"]["spec"]
    job_claims = {v["persistentVolumeClaim"]["claimName"] for v in job["volumes"] if "persistentVolumeClaim" in v}
    assert job_claims <= claims and "badexpert-bundles" in job_claims


# ----------------------------------------------------------------------------------------------
# The install script and the docs


def test_install_script_is_valid_bash_and_ci_runs_it_before_the_tests():
    script = REPO / "scripts" / "install-deploy-tools.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, timeout=30).returncode == 0
    assert os.access(script, os.X_OK)
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    install = next(i for i, line in enumerate(ci) if "scripts/install-deploy-tools.sh" in line)
    test = next(i for i, line in enumerate(ci) if line.strip() == "make test")
    assert install < test


def test_deploy_docs_name_only_files_and_settings_that_exist(tmp_path):
    if not DOCS.is_file():
        pytest.fail("docs/deploy.md is missing")
    text = DOCS.read_text()
    for path in set(re.findall(r"\b((?:docker|scripts|tests)/[\w./-]+\.(?:yml|yaml|json|conf|sh|py)|docker/Dockerfile)\b", text)):
        assert (REPO / path).exists(), f"docs/deploy.md names {path}, which does not exist"
    compose_text = COMPOSE_FILE.read_text() + GPU_OVERRIDE.read_text()
    compose_variables = set(re.findall(r"\$\{(\w+)", compose_text))
    settings = server_setting_names()
    for name in set(re.findall(r"\b((?:BADEXPERT|GRAFANA|PROMETHEUS)_[A-Z_]+)\b", text)):
        assert name in compose_variables or name in settings, f"docs/deploy.md names {name}, used nowhere"
    for name in {"GRAFANA_ADMIN_PASSWORD", "BADEXPERT_ARCH", "BADEXPERT_WEIGHTS"}:
        assert name in text
