"""cluster/: the runtime env, launcher and KubeRay manifests, and `medrl submit`.

The fast tests read the YAMLs (token auth on, nothing public) and check that submitting
without a token or without a cluster fails with a message that says what to do. The slow
test starts a real local head with token authentication, submits a medrl job through
``cluster.submit.submit`` and waits for it.

The head is stopped by killing the processes this test started, by their ids: ``ray stop``
would kill every Ray process on the machine, other people's included.
"""

from __future__ import annotations

import copy
import io
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from cluster.submit import (
    SubmitError,
    entrypoint_for,
    find_token,
    load_runtime_env,
    make_client,
    submit,
)

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
MANIFESTS = {
    "runtime_env": CLUSTER / "runtime_env.yaml",
    "launcher": CLUSTER / "ray-cluster.yaml",
    "raycluster": CLUSTER / "kuberay-raycluster.yaml",
    "rayjob": CLUSTER / "kuberay-rayjob.yaml",
}

# The medrl command the slow test runs on the local cluster (after `medrl `): one tiny RL
# iteration (samplers, reward service, a Ray Train learner) joining that cluster through
# the job's RAY_ADDRESS. The test appends run.root=<tmp>, rl.generator (a random 32 px
# generator) and rl.prompts_file, so nothing lands in the checkout.
RL_JOB_ARGS = [
    "rl",
    "train",
    "--config",
    "configs/demo.yaml",
    "run.name=cluster-test",
    "model.resolution=32",
    "sampling.num_steps=4",
    "rl.iterations=1",
    "rl.num_samplers=1",
    "rl.prompts_per_iteration=2",
    "rl.group_size=2",
    "rl.micro_batch=4",
    "rl.sampler_chunk=4",
    "rl.eval_prompts=2",
    "rl.inner_epochs=1",
    "rl.reward=spatial",
]
RL_JOB_LOG_MARK = "final held-out reward"


def _load(name: str) -> list:
    return [d for d in yaml.safe_load_all(MANIFESTS[name].read_text()) if d is not None]


def _strings(node):
    """Every string key and value anywhere in a parsed YAML document."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def _ray_cluster_spec(doc: dict) -> dict:
    assert doc["apiVersion"] == "ray.io/v1"
    if doc["kind"] == "RayCluster":
        return doc["spec"]
    assert doc["kind"] == "RayJob"
    return doc["spec"]["rayClusterSpec"]


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


@pytest.fixture()
def no_token(monkeypatch, tmp_path):
    """No Ray token anywhere: empty HOME, no RAY_AUTH_* variables."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the YAMLs


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_yaml_parses(name):
    docs = _load(name)
    assert docs and all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_nothing_public(name):
    """No 0.0.0.0 binding, no LoadBalancer/NodePort/Ingress, no token in any file."""
    for doc in _load(name):
        values = list(_strings(doc))
        assert not [v for v in values if "0.0.0.0" in v]
        assert not [v for v in values if v in ("LoadBalancer", "NodePort")]
        assert doc.get("kind") not in ("Ingress", "Service", "Secret")
        assert "RAY_AUTH_TOKEN" not in yaml.safe_dump(doc).replace("RAY_AUTH_TOKEN_PATH", "")


def test_runtime_env_valid_without_working_dir():
    from ray.runtime_env import RuntimeEnv

    (env,) = _load("runtime_env")
    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert "working_dir" not in env and "py_modules" not in env
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    assert env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    assert "OMP_NUM_THREADS" in env["env_vars"]
    assert {"runs/", "data/", ".venv/"} <= set(env["excludes"])
    assert not [k for k in env["env_vars"] if k.startswith("RAY_AUTH")]
    assert load_runtime_env(MANIFESTS["runtime_env"]) == env


def test_launcher_config_token_auth_and_loopback_dashboard():
    from ray.autoscaler._private.util import prepare_config, validate_config

    (cfg,) = _load("launcher")
    validate_config(prepare_config(copy.deepcopy(cfg)))  # Ray's launcher schema
    assert cfg["provider"]["type"] == "local"
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2
    assert all("RAY_AUTH_MODE=token" in c for c in ray_starts)
    head = next(c for c in cfg["head_start_ray_commands"] if "ray start" in c)
    assert "--head" in head and "--dashboard-host=127.0.0.1" in head
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "chmod 600 ~/.ray/auth_token" in cfg["setup_commands"]
    assert any("download.pytorch.org/whl/cu" in c for c in cfg["setup_commands"])


@pytest.mark.parametrize("name", ["raycluster", "rayjob"])
def test_kuberay_token_auth_and_cluster_ip(name):
    (doc,) = _load(name)
    spec = _ray_cluster_spec(doc)
    assert spec["authOptions"]["mode"] == "token"
    assert spec["authOptions"]["secretName"] == "medrl-ray-auth"
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"
    assert head.get("enableIngress", False) is False
    assert "headService" not in head
    for c in _containers(spec):
        modes = [e.get("value") for e in c.get("env", []) if e["name"] == "RAY_AUTH_MODE"]
        assert modes in ([], ["token"])
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
        if "nvidia.com/gpu" in c["resources"]["limits"]
    ]
    assert gpu_groups


def test_raycluster_dashboard_on_loopback():
    (doc,) = _load("raycluster")
    assert doc["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"


def test_rayjob_runs_medrl_rl_train():
    (doc,) = _load("rayjob")
    entry = doc["spec"]["entrypoint"]
    assert entry.startswith("medrl rl train --config configs/fundus-sd15.yaml run.name=")
    assert doc["spec"]["shutdownAfterJobFinishes"] is True
    # a failed run is retried twice, each on a new cluster; its driver resumes from latest
    assert doc["spec"]["backoffLimit"] == 2
    yaml.safe_load(doc["spec"]["runtimeEnvYAML"])


# --------------------------------------------------------------------------- medrl submit


def test_entrypoint_is_medrl_with_quoted_args():
    assert entrypoint_for(["rl", "train", "run.name=a b"]) == "medrl rl train 'run.name=a b'"
    assert entrypoint_for(["medrl", "config", "show"]) == "medrl config show"
    with pytest.raises(SubmitError):
        entrypoint_for([])


def test_token_lookup_follows_ray(no_token, monkeypatch, tmp_path):
    assert find_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert find_token() == "from-home"
    path = tmp_path / "tok"
    path.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert find_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert find_token() == "from-env"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    path.write_text("")
    with pytest.raises(SubmitError, match="empty"):
        find_token()


def test_submit_without_token_says_how_to_get_one(no_token, capsys):
    with pytest.raises(SubmitError) as err:
        submit(["config", "show"], address=f"http://127.0.0.1:{_free_port()}")
    msg = str(err.value)
    assert "no Ray auth token" in msg
    assert "ray get-auth-token --generate" in msg and "RAY_AUTH_TOKEN" in msg

    from medrl.cli import main

    assert main(["submit", "--", "config", "show"]) == 2
    assert "no Ray auth token" in capsys.readouterr().err


def test_submit_to_unreachable_cluster_says_open_the_tunnel(no_token, monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "some-token")
    address = f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    with pytest.raises(SubmitError) as err:
        submit(["config", "show"], address=address)
    assert str(err.value).startswith(f"cannot reach the Ray Jobs API at {address} (")
    assert "Connection refused" in str(err.value)

    from medrl.cli import main

    assert main(["submit", "--address", address, "--", "config", "show"]) == 2
    err = capsys.readouterr().err
    assert f"medrl submit: cannot reach the Ray Jobs API at {address}" in err
    assert "port-forward" in err and "Traceback" not in err
    assert main(["submit", "--address", "http://127.0.0.1:99999", "--", "config", "show"]) == 2
    assert "Port out of range" in capsys.readouterr().err
    assert time.monotonic() - started < 20


def test_submit_to_a_server_that_is_not_ray_says_so(no_token, monkeypatch):
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_error(404)

        def log_message(self, *args):
            pass

    monkeypatch.setenv("RAY_AUTH_TOKEN", "some-token")
    server = HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(SubmitError, match="did not answer as a Ray Jobs API"):
            submit(["config", "show"], address=address)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test; JobSubmissionClient is a fake that
    records the headers it was given."""
    import ray.job_submission

    def refuse(*args, **kwargs):
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    clients: list[dict] = []

    def fake_client(address, headers=None):
        clients.append({"address": address, "headers": headers})
        return _FakeClient("SUCCEEDED")

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", fake_client)
    return clients


def test_the_token_goes_in_clear_text_only_to_this_machine(no_token, monkeypatch, no_network):
    from medrl.cli import main

    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret-token")
    remote = "http://10.1.2.3:8265"
    with pytest.raises(SubmitError) as err:
        make_client(remote)
    assert str(err.value) == (
        f"refusing to send the Ray auth token in clear text to {remote}: reach the dashboard "
        "through an SSH tunnel or kubectl port-forward and submit to http://127.0.0.1:8265, "
        "or use https://; --allow-insecure-token sends it anyway"
    )
    assert main(["submit", "--address", remote, "--", "config", "show"]) == 2
    assert no_network == []  # refused before any client or connection

    for address in ("http://127.0.0.1:8265", "http://localhost:8265", "https://10.1.2.3:8265"):
        make_client(address)
    assert (
        main(["submit", "--allow-insecure-token", "--address", remote, "--", "config", "show"]) == 0
    )
    assert [c["address"] for c in no_network][-1] == remote
    assert no_network[-1]["headers"] == {"Authorization": "Bearer secret-token"}

    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # no token: nothing to protect
    make_client(remote)
    assert no_network[-1]["headers"] == {}


def test_a_connection_lost_while_following_says_the_job_keeps_running(monkeypatch, capsys):
    import requests

    import cluster.submit as cs
    from medrl.cli import main

    class Dropped(_FakeClient):
        async def tail_job_logs(self, job_id):
            raise requests.ConnectionError("the tunnel closed")
            yield ""

        def get_job_status(self, job_id):
            raise requests.ConnectionError("the tunnel closed")

    monkeypatch.setattr(cs, "make_client", lambda address=None, insecure=False: Dropped("RUNNING"))
    assert main(["submit", "--job-id", "j1", "--", "config", "show"]) == 2
    err = capsys.readouterr().err
    assert "lost the Ray Jobs API at http://127.0.0.1:8265 while following job j1" in err
    assert "(the tunnel closed); the job keeps running on the cluster" in err


def test_submit_rejects_a_bad_medrl_command_locally(no_token, capsys):
    from medrl.cli import main

    assert main(["submit", "--", "no-such-command"]) == 2
    assert main(["submit"]) == 2
    assert "after --" in capsys.readouterr().err


class _FakeClient:
    """Stands in for JobSubmissionClient: one job that ends with ``status``."""

    def __init__(self, status: str, logs: str = "line 1\nline 2\n") -> None:
        self.status, self.logs, self.submitted = status, logs, []

    def get_address(self) -> str:
        return "http://127.0.0.1:8265"

    def submit_job(self, **kw) -> str:
        self.submitted.append(kw)
        return kw.get("submission_id") or "raysubmit_fake"

    async def tail_job_logs(self, job_id):
        yield self.logs

    def get_job_status(self, job_id):
        from ray.job_submission import JobStatus

        return JobStatus(self.status)

    def get_job_logs(self, job_id) -> str:
        return self.logs

    def get_job_info(self, job_id):
        from types import SimpleNamespace

        return SimpleNamespace(status=self.get_job_status(job_id), message="exit code 1\nlogs")


@pytest.mark.parametrize(("status", "rc"), [("SUCCEEDED", 0), ("FAILED", 1), ("STOPPED", 1)])
def test_submit_waits_streams_and_maps_the_outcome(monkeypatch, capsys, status, rc):
    import cluster.submit as cs
    from medrl.cli import main

    fake = _FakeClient(status)
    monkeypatch.setattr(cs, "make_client", lambda address=None, insecure=False: fake)
    args = ["submit", "--job-id", "j1", "--", "medrl", "config", "show", "run.name=a b"]
    assert main(args) == rc
    (kw,) = fake.submitted
    assert kw["entrypoint"] == "medrl config show 'run.name=a b'"
    assert kw["submission_id"] == "j1" and kw["runtime_env"] is None
    captured = capsys.readouterr()
    assert "line 2" in captured.out  # the logs streamed once, not repeated
    assert captured.out.count("line 2") == 1
    if rc:
        assert f"ended {status}: exit code 1" in captured.err and "logs" not in captured.err


# --------------------------------------------------------------------------- a real head


def _stop_tree(proc: subprocess.Popen) -> None:
    """Stop `ray start --block` and every process under it, by pid, and wait for them."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    proc.terminate()  # `ray start --block` shuts its processes down on SIGTERM
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
    _, alive = psutil.wait_procs(tree, timeout=30)
    for p in alive:  # psutil checks the create time: a reused pid is not touched
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=30)


@pytest.fixture()
def ray_head():
    """A local Ray head with token auth, dashboard on 127.0.0.1, in its own temp dir.

    The token lives in a temp file (RAY_AUTH_TOKEN_PATH); ~/.ray is never touched.
    """
    ray_exe = Path(sys.executable).parent / "ray"
    if not ray_exe.exists():
        ray_exe = Path(shutil.which("ray") or "ray")
    # A short path: Ray's unix sockets live under the temp dir (107-byte limit).
    tmp = Path(tempfile.mkdtemp(prefix="medrl-ray-", dir="/tmp"))
    token_file = tmp / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    port, dash = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.pop("RAY_API_SERVER_ADDRESS", None)
    env.update(
        RAY_AUTH_MODE="token",  # deliberately on, as on every medrl cluster
        RAY_AUTH_TOKEN_PATH=str(token_file),
        # the job runs `medrl ...` from this virtualenv
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    cmd = [
        str(ray_exe),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--port={port}",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        "--num-cpus=4",  # logical: sampler, reward service and learner of the RL job
        "--disable-usage-stats",
        f"--temp-dir={tmp / 'ray'}",
        "--block",
    ]
    log_path = tmp / "head.log"
    address = f"http://127.0.0.1:{dash}"
    with open(log_path, "w") as log:
        # The head's cwd is the job's cwd: relative config paths resolve as in a checkout.
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        import requests

        headers = {"Authorization": f"Bearer {token_file.read_text()}"}
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{address}/api/version", headers=headers, timeout=5).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"head not up after 180 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield address, token_file
    finally:
        _stop_tree(proc)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_submit_job_to_local_head_with_token_auth(ray_head, monkeypatch, tmp_path):
    import requests
    from ray.job_submission import JobStatus

    address, token_file = ray_head
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)

    # Without the token, or with a wrong one, the cluster refuses.
    job = {"entrypoint": "echo must-not-run"}
    assert requests.post(f"{address}/api/jobs/", json=job, timeout=30).status_code == 401
    wrong = {"Authorization": "Bearer " + "0" * 64}
    r = requests.post(f"{address}/api/jobs/", json=job, headers=wrong, timeout=30)
    assert r.status_code == 403
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 64)
    with pytest.raises(SubmitError, match="refused"):
        submit(["config", "show"], address=address, wait=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN")

    # With the token (found through RAY_AUTH_TOKEN_PATH, as Ray looks for it) it runs.
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    runtime_env = load_runtime_env(MANIFESTS["runtime_env"])
    runtime_env["env_vars"].update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    args = [*RL_JOB_ARGS, f"run.root={tmp_path / 'runs'}", *_rl_job_inputs(tmp_path)]
    out = io.StringIO()
    job_id = submit(args, address=address, runtime_env=runtime_env, timeout_s=600, out=out)

    client = make_client(address)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED
    logs = client.get_job_logs(job_id)
    assert RL_JOB_LOG_MARK in logs
    assert RL_JOB_LOG_MARK in out.getvalue()  # streamed while waiting
    assert [j.submission_id for j in client.list_jobs()] == [job_id]  # nothing refused ran
    adapter = tmp_path / "runs" / "cluster-test" / "rl" / "adapter"
    assert (adapter / "pytorch_lora_weights.safetensors").is_file()


def _rl_job_inputs(tmp_path: Path) -> list[str]:
    """A random 32 px generator and a prompts file for the RL job (what it learns does
    not matter here, only that the job runs on the cluster)."""
    from generators.model import build_generator
    from medrl.config import load_config

    cfg = load_config("configs/demo.yaml", RL_JOB_ARGS[4:])
    gen = build_generator(cfg.model, seed=0).save(tmp_path / "generator")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("colour fundus photograph, left eye\ncolour fundus photograph, right eye\n")
    return [f"rl.generator={gen}", f"rl.prompts_file={prompts}"]
