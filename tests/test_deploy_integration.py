"""The monitoring stack for real, on loopback: two `badexpert serve` replicas started with the compose
file's settings, the repository's nginx config in front of them, and a real Prometheus (Debian's
package) scraping both with the repository's rules. Traffic with a known share of flagged inputs goes
through the load balancer; then every PromQL query of the Grafana dashboard must return data, and
the rejection-rate queries (dashboard and recording rule) must equal the share the responses showed.

Only 127.0.0.1 is used; every process started here is stopped at the end.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from ci import ci_strict
from synthetic import fit, threshold_at

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
INSTALL_HINT = "run scripts/install-deploy-tools.sh"
CLASS_NAMES = ["red", "green", "blue"]
SIZE = 16
FLAGGED_PER_REQUEST, ACCEPTED_PER_REQUEST = 1, 2  # every request: one third flagged, whichever replica
REQUESTS = 24
SCRAPE_S = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = condition()
            if last:
                return last
        except Exception as error:  # noqa: BLE001 - keep polling until the deadline
            last = error
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


class Processes:
    """Starts processes in their own session and stops all of them (and only them) at the end."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.started: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                   start_new_session=True)
        log.close()
        self.started.append((name, process))
        return process

    def check_alive(self) -> None:
        for name, process in self.started:
            if process.poll() is not None:
                raise AssertionError(f"{name} exited with {process.returncode}:\n{self.tail(name)}")

    def tail(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def __enter__(self) -> "Processes":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """Stop them all; on a failure, print their logs first."""
        if error is not None:
            self.print_logs()
        self.stop_all()

    def print_logs(self) -> None:
        for name, _ in self.started:
            print(f"----- {name} log -----\n{self.tail(name)}")

    def stop_all(self) -> None:
        for _, process in self.started:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, process in self.started:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)


def prometheus_or_skip() -> str:
    """Debian's prometheus (its path), with PyYAML for its config; skips the test without them."""
    prometheus_bin = shutil.which("prometheus")
    if prometheus_bin is None:
        pytest.skip(f"Debian's prometheus is not installed ({INSTALL_HINT})")
    pytest.importorskip("yaml", reason=f"PyYAML is missing ({INSTALL_HINT})")
    return prometheus_bin


def start_prometheus(processes: Processes, prometheus_bin: str, tmp: Path, port: int, targets: list[str]) -> None:
    """A real Prometheus on loopback with the repository's config and rules (prometheus_test_config)."""
    config = prometheus_test_config(tmp, port, targets)
    processes.start("prometheus", [prometheus_bin, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h",
                                   "--log.level=warn"])


# ----------------------------------------------------------------------------------------------
# A tiny bundle whose tau splits a set of sample images into known flagged and accepted ones


def make_bundle_and_samples(root: Path):
    import torch

    from PIL import Image

    from defense.build import BuildConfig, build_guard
    from defense.bundle import load_bundle, save_bundle
    from defense.data import ImageSet
    from defense.models import create_model
    from defense.models.loading import ModelSpec
    from defense.preprocessing import Preprocessing

    generator = torch.Generator().manual_seed(7)
    torch.manual_seed(7)

    def images_of(count_per_class):
        images, labels = [], []
        for label in range(len(CLASS_NAMES)):
            base = torch.full((count_per_class, 3, SIZE, SIZE), 70.0)
            base[:, label] = 180.0
            noise = torch.randint(-60, 60, base.shape, generator=generator).float()
            images.append((base + noise).clamp(0, 255).to(torch.uint8))
            labels.append(torch.full((count_per_class,), label))
        return torch.cat(images), torch.cat(labels)

    preprocessing = Preprocessing(input_size=(SIZE, SIZE), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    images, labels = images_of(30)
    model = create_model("tiny_cnn", num_classes=len(CLASS_NAMES))
    normalizer = preprocessing.normalizer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    fit(model, images, labels, normalizer, optimizer, epochs=3, batch_size=15, generator=generator)
    clean = ImageSet(images, labels, CLASS_NAMES, [Path(f"{i}.png") for i in range(len(labels))])
    config = BuildConfig(calibration_fraction=0.5, fpr=0.1, threshold_rule="conformal", unlearn_lr=1e-3,
                         unlearn_batch_size=32, finetune_lr=0.01, finetune_epochs=1, finetune_milestones=(1,),
                         finetune_batch_size=32, progress=False, device="cpu",
                         # the expert's score alone: the samples' scores must spread wider than the engines'
                         # tolerance (1e-5), and this tiny model's feature signal sits on the expert's narrow scale
                         signals="expert")
    result = build_guard(model.eval(), clean, preprocessing, len(CLASS_NAMES), config, log=lambda *args: None)
    spec = ModelSpec("registry", "tiny_cnn", len(CLASS_NAMES))
    save_bundle(root / "calibrated", result.guard, spec, result.manifest_fields)

    # Sample files, scored offline by the bundle's own guard; tau goes in the widest gap between the
    # lowest third and the rest, so the server's decision on each sample is known beforehand.
    samples, _ = images_of(4)
    folder = root / "samples"
    folder.mkdir()
    files = []
    for index, image in enumerate(samples):
        path = folder / f"sample_{index:02d}.png"
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
        files.append(path)
    guard, _ = load_bundle(root / "calibrated", "cpu")
    scores = guard.score(torch.stack([guard.preprocessing.load(path) for path in files])).score.tolist()
    ranked = sorted(range(len(files)), key=lambda i: scores[i])
    cut = max(range(2, len(files) - 3), key=lambda k: scores[ranked[k]] - scores[ranked[k - 1]])
    low, high = scores[ranked[cut - 1]], scores[ranked[cut]]
    assert high - low > 1e-4, f"sample scores too close to split: {sorted(scores)}"
    tau = (low + high) / 2
    guard.rejection_threshold = tau
    fields = threshold_at(copy.deepcopy(result.manifest_fields), tau, scores)  # a record that places tau
    save_bundle(root / "bundle", guard, spec, fields)
    flagged = [files[i] for i in ranked[:cut]]
    accepted = [files[i] for i in ranked[cut:]]
    return root / "bundle", tau, fields["target_fpr"], flagged, accepted


# ----------------------------------------------------------------------------------------------
# Settings from the deployment files


def compose_guard(tmp_path: Path) -> dict:
    """The guard service as Compose resolves it (or, without docker-compose, with the ${VAR:-default}
    defaults filled in by hand)."""
    import yaml

    exe = shutil.which("docker-compose")
    if exe:
        empty = tmp_path / "empty.env"
        empty.write_text("")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BADEXPERT_", "GRAFANA_", "COMPOSE_"))}
        env["GRAFANA_ADMIN_PASSWORD"] = "unused"
        result = subprocess.run([exe, "--project-directory", str(REPO), "--env-file", str(empty), "-f",
                                 str(REPO / "docker-compose.yml"), "config"], env=env, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        return yaml.safe_load(result.stdout)["services"]["guard"]
    text = re.sub(r"\$\{(\w+):[-?]([^}]*)\}", lambda m: m.group(2), (REPO / "docker-compose.yml").read_text())
    return yaml.safe_load(text)["services"]["guard"]


def healthcheck_command() -> str:
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    match = re.search(r"^HEALTHCHECK\b.*?\bCMD\s+(.*)$", text, re.M)
    assert match, "no HEALTHCHECK in docker/Dockerfile"
    return match.group(1).strip()


def nginx_test_config(tmp: Path, listen_port: int, replicas: list[int]) -> Path:
    """The repository's nginx.conf with Docker's DNS name `guard` replaced by the loopback replicas
    (an upstream group of the same name the variable points at) and its pid file moved to tmp."""
    text = (DOCKER / "nginx" / "nginx.conf").read_text()
    for old, new in (("listen 8080;", f"listen 127.0.0.1:{listen_port};"),
                     ("set $guard_upstream http://guard:8000;", "set $guard_upstream http://guard_replicas;"),
                     ("pid /tmp/nginx.pid;", f"pid {tmp}/nginx.pid;")):
        assert old in text, old
        text = text.replace(old, new)
    upstream = "upstream guard_replicas {\n" + "".join(f"        server 127.0.0.1:{p};\n" for p in replicas) + "    }\n\n    server {"
    text = text.replace("server {", upstream, 1)
    path = tmp / "nginx.conf"
    path.write_text(text)
    return path


def prometheus_test_config(tmp: Path, port: int, targets: list[str]) -> Path:
    """The repository's prometheus.yml and rules, with the guard replicas as static loopback targets
    instead of Docker DNS, and 1 s scrape and rule intervals instead of 5 s and 15 s."""
    import yaml

    config = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    rules_dir = tmp / "rules"
    rules_dir.mkdir()
    for path in (DOCKER / "prometheus" / "rules").glob("*.yml"):
        rules = yaml.safe_load(path.read_text())
        for group in rules["groups"]:
            group["interval"] = f"{SCRAPE_S}s"
        (rules_dir / path.name).write_text(json.dumps(rules))
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    config["rule_files"] = [f"{rules_dir}/*.yml"]
    config["global"].update(scrape_interval=f"{SCRAPE_S}s", evaluation_interval=f"{SCRAPE_S}s")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    guard_job = jobs["badexpert-guard"]
    assert guard_job.pop("dns_sd_configs")
    guard_job["static_configs"] = [{"targets": targets}]
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    path = tmp / "prometheus.yml"
    path.write_text(json.dumps(config))
    return path


# ----------------------------------------------------------------------------------------------
# Dashboard queries


def dashboard_targets() -> list[dict]:
    board = json.loads((DOCKER / "grafana" / "dashboards" / "badexpert.json").read_text())
    targets = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                targets.append({"panel": panel["title"], "type": panel["type"], **target})
            walk(panel.get("panels", []))

    walk(board["panels"])
    return targets, board["templating"]["list"]


def substitute(expr: str, values: dict[str, str]) -> str:
    for name in sorted(values, key=len, reverse=True):  # $__rate_interval before $__range, ...
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    assert "$" not in expr, f"an unsubstituted variable is left in {expr!r}"
    return expr


class Prometheus:
    def __init__(self, client, base: str):
        self.client, self.base = client, base

    def get(self, path: str, **params):
        response = self.client.get(self.base + path, params=params, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float | None = None):
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self.get("/api/v1/query", **params)["result"]

    def scalar(self, expr: str, at: float | None = None) -> float:
        result = self.query(expr, at)
        assert len(result) == 1, f"{expr!r} returned {result}"
        return float(result[0]["value"][1])


def finite_values(result) -> list[float]:
    values = []
    for series in result:
        points = series.get("values") or ([series["value"]] if "value" in series else [])
        values += [float(v) for _, v in points if math.isfinite(float(v))]
    return values


# ----------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_dashboard_queries_return_data_from_real_prometheus_scraping_live_replicas(tmp_path):
    prometheus_bin = prometheus_or_skip()
    httpx = pytest.importorskip("httpx")
    nginx_bin = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if nginx_bin is None and ci_strict():
        pytest.fail(f"nginx is not installed ({INSTALL_HINT}): CI=true must exercise the load balancer")
    started = time.monotonic()

    bundle, tau, target_fpr, flagged_files, accepted_files = make_bundle_and_samples(tmp_path)
    guard_service = compose_guard(tmp_path)

    processes = Processes(tmp_path)
    try:
        # Two replicas, each started as the compose service starts it: its command and environment,
        # with container paths moved under tmp_path and the address moved to loopback. Both share
        # one audit volume, as the replicas of `docker compose up --scale guard=2` do.
        replica_ports = [free_port(), free_port()]
        volume_root = tmp_path / "volumes"
        argv = [sys.executable, "-m", "badexpert"]  # this checkout's command (an installed script may not be)
        assert guard_service["command"] == ["serve"]
        for index, port in enumerate(replica_ports):
            env = {k: v for k, v in os.environ.items() if not k.startswith("BADEXPERT_")}
            for name, value in guard_service["environment"].items():
                value = str(value)
                if name == "BADEXPERT_BUNDLE":
                    value = str(bundle)
                elif name == "BADEXPERT_HOST":
                    value = "127.0.0.1"
                elif name == "BADEXPERT_PORT":
                    value = str(port)
                elif value.startswith("/"):
                    value = str(volume_root / value.lstrip("/"))
                env[name] = value
            env["BADEXPERT_TORCH_THREADS"] = "1"  # two replicas on a small machine
            if index == 0:  # a candidate in shadow (the same bundle), for the dashboard's candidate panel
                env["BADEXPERT_SHADOW_BUNDLE"] = str(bundle)
            env["BADEXPERT_ACCESS_LOG"] = "false"
            processes.start(f"guard-{index}", argv + guard_service["command"], env)

        prometheus_port = free_port()
        replica_targets = [f"127.0.0.1:{p}" for p in replica_ports]
        start_prometheus(processes, prometheus_bin, tmp_path, prometheus_port, replica_targets)
        lb_port = None
        if nginx_bin:
            lb_port = free_port()
            conf = nginx_test_config(tmp_path, lb_port, replica_ports)
            processes.start("nginx", [nginx_bin, "-p", str(tmp_path), "-e", "stderr", "-c", str(conf),
                                      "-g", "daemon off;"])
        else:
            warnings.warn(f"nginx is not installed ({INSTALL_HINT}): traffic goes to the replicas in turn, "
                          "and the load balancer is not exercised")

        with httpx.Client() as client:
            prom = Prometheus(client, f"http://127.0.0.1:{prometheus_port}")

            def ready(port):
                processes.check_alive()
                return client.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200

            for port in replica_ports:
                wait_for(lambda: ready(port), 90, f"replica :{port} /readyz")
            wait_for(lambda: client.get(prom.base + "/-/ready", timeout=5).status_code == 200, 30, "Prometheus ready")
            # A first scrape of both replicas with every counter still at zero: rates start from it.
            wait_for(lambda: len(prom.query('badexpert_inputs_total == 0')) == 4
                     and len(prom.query('badexpert_score_count == 0')) == 2, 30, "a zero scrape of both replicas")

            # The Dockerfile's HEALTHCHECK, run as the container runs it (sh -c), against a replica.
            health_env = dict(os.environ, BADEXPERT_PORT=str(replica_ports[0]),
                              PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
            command = healthcheck_command()
            assert subprocess.run(["sh", "-c", command], env=health_env, timeout=30).returncode == 0
            health_env["BADEXPERT_PORT"] = str(free_port())
            assert subprocess.run(["sh", "-c", command], env=health_env, capture_output=True, timeout=30).returncode != 0

            # Traffic through the load balancer: every request holds one flagged image per two
            # accepted ones (by the offline scores), so each replica sees the same share.
            if lb_port:
                wait_for(lambda: client.get(f"http://127.0.0.1:{lb_port}/lb-health", timeout=5).text == "ok\n", 15,
                         "nginx")
                assert client.get(f"http://127.0.0.1:{lb_port}/metrics", timeout=5).status_code == 404
            bases = [f"http://127.0.0.1:{lb_port}"] if lb_port else [f"http://127.0.0.1:{p}" for p in replica_ports]
            total = flagged = 0
            for request in range(REQUESTS):
                scale = 1 + request % 2
                chosen = ([flagged_files[(request + k) % len(flagged_files)] for k in range(FLAGGED_PER_REQUEST * scale)]
                          + [accepted_files[(request + k) % len(accepted_files)] for k in range(ACCEPTED_PER_REQUEST * scale)])
                parts = [("file", (path.name, path.read_bytes(), "image/png")) for path in chosen]
                response = client.post(bases[request % len(bases)] + "/predict", files=parts, timeout=30)
                assert response.status_code == 200, response.text
                predictions = response.json()["predictions"]
                assert [p["flagged"] for p in predictions] == [path in flagged_files for path in chosen], \
                    "the server's decisions differ from the bundle's offline scores"
                assert all(p["rejected"] == p["flagged"] for p in predictions)  # enforce mode
                total += len(predictions)
                flagged += sum(p["rejected"] for p in predictions)
            # One bad request: a 4xx status, and no input counted.
            bad = client.post(bases[0] + "/predict", files=[("file", ("x.png", b"not an image", "image/png"))], timeout=30)
            assert 400 <= bad.status_code < 500
            expected = flagged / total
            assert expected == pytest.approx(1 / 3)

            # Prometheus has scraped the final counts of both replicas.
            wait_for(lambda: prom.scalar("sum(badexpert_inputs_total)") == total, 20, f"{total} inputs in Prometheus")
            per_replica = {s["metric"]["instance"]: float(s["value"][1])
                           for s in prom.query("sum by (instance) (badexpert_inputs_total)")}
            assert set(per_replica) == set(replica_targets)
            assert all(count > 0 for count in per_replica.values()), f"a replica got no traffic: {per_replica}"
            assert prom.scalar('sum(badexpert_inputs_total{decision="rejected"})') == flagged
            now = time.time()

            # The dashboard's variables, by their own queries.
            targets, variables = dashboard_targets()
            label_values = {}
            for variable in variables:
                match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["definition"])
                assert match, variable["definition"]
                selector = match.group(1).replace("$instance", ".*")
                series = prom.get("/api/v1/series", **{"match[]": selector, "start": f"{now - 600:.0f}"})
                # as Grafana's label_values(): series without the label (a replica scraped while it was
                # still loading its bundle exposes the info metric without labels) give no value
                label_values[variable["name"]] = sorted({s[match.group(2)] for s in series if match.group(2) in s})
            assert label_values["instance"] == sorted(replica_targets)
            assert label_values["tau"] == [repr(float(tau))]
            assert label_values["target_fpr"] == [repr(float(target_fpr))]

            # Every query of the dashboard, as Grafana would send it, with a window that covers the
            # whole test (so that each rate starts from the zero scrape).
            window = f"{math.ceil(time.monotonic() - started) + 30}s"
            values = {"__rate_interval": window, "__range": window, "__interval": f"{SCRAPE_S}s",
                      "instance": ".*", "tau": label_values["tau"][0], "target_fpr": label_values["target_fpr"][0]}
            start = now - (time.monotonic() - started) - 5
            empty = []

            def range_query(expr, end):
                return prom.get("/api/v1/query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}",
                                step=f"{SCRAPE_S}s")["result"]

            for target in targets:
                expr = substitute(target["expr"], values)
                wanted = 6 if target["type"] == "heatmap" else 1  # the heatmap: one series per score bucket

                def has_data(result, wanted=wanted):
                    return len(result) >= wanted and finite_values(result)

                if target.get("instant"):
                    result = prom.query(expr, at=now)
                else:
                    result = range_query(expr, now)
                    if not has_data(result):
                        # Seen in some runs: an empty range result just after the last scrape. Ask again
                        # with the range ending now, for up to 15 s.
                        def latest(expr=expr):
                            result = range_query(expr, time.time())
                            return result if has_data(result) else None

                        try:
                            result = wait_for(latest, 15, expr)
                        except AssertionError:
                            pass
                if not has_data(result):
                    empty.append(f"{target['panel']}: {expr} ({len(result)} series)")
            assert not empty, "dashboard queries without data:\n" + "\n".join(empty)

            # The rejection rate, in the dashboard's panels and in the recording rule the alert uses,
            # equals the share of flagged inputs in the responses.
            rate_targets = [t for t in targets if t["panel"].lower().startswith("rejection rate")
                            and "badexpert_inputs_total" in t["expr"]]
            assert len(rate_targets) == 2
            for target in rate_targets:
                for instance in [".*"] + replica_targets:
                    expr = substitute(target["expr"], {**values, "instance": instance})
                    assert prom.scalar(expr, at=now) == pytest.approx(expected, abs=1e-9), (target["panel"], instance)
            wait_for(lambda: abs(prom.scalar("badexpert:rejection_rate:ratio_rate5m") - expected) < 1e-9, 10,
                     "the recording rule to equal the flagged share")

            # Both replicas appended to the one audit log: one whole JSON line per flagged input.
            audit_log = volume_root / guard_service["environment"]["BADEXPERT_AUDIT_LOG"].lstrip("/")
            lines = audit_log.read_text().splitlines()
            assert len(lines) == flagged
            assert all(json.loads(line)["tau"] == pytest.approx(tau) for line in lines)
            quarantine = volume_root / guard_service["environment"]["BADEXPERT_QUARANTINE_DIR"].lstrip("/")
            assert len([p for p in quarantine.iterdir() if not p.name.startswith(".")]) == len(flagged_files)
            processes.check_alive()
    except BaseException:
        processes.print_logs()
        raise
    finally:
        processes.stop_all()
    assert time.monotonic() - started < 120
