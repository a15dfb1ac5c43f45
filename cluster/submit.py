"""Submit a medrl subcommand to a Ray cluster as a Ray job (``medrl submit``).

The job runs ``medrl <args...>`` on the cluster's head node through the Ray Jobs API
(``ray.job_submission.JobSubmissionClient``), the same thing
``ray job submit --address ... -- medrl <args...>`` does. Clusters built from the
manifests in ``cluster/`` have Ray token authentication on, so every request carries
``Authorization: Bearer <token>``. The token is looked up the way Ray looks it up (Ray
2.52+): the ``RAY_AUTH_TOKEN`` environment variable, else the file named by
``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``. The header is built here rather than
left to Ray because Ray's client adds it only when ``RAY_AUTH_MODE=token`` is set in the
submitting process, and then fails with a 401 that does not say why.

The dashboard (and so the Jobs API) is bound to 127.0.0.1 on the head; reach it through
``ray dashboard cluster/ray-cluster.yaml`` (an SSH tunnel) or
``kubectl port-forward svc/<cluster>-head-svc 8265:8265``. The token is not sent over
plain http to a host other than this machine unless ``allow_insecure_token`` says so.
See docs/cluster.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
POLL_S = 2.0

HOW_TO_GET_A_TOKEN = (
    "Get the cluster's token and make it visible here, one of:\n"
    "  - launcher clusters (cluster/ray-cluster.yaml): the token is ~/.ray/auth_token of "
    "the machine that ran `ray up`; copy that file to ~/.ray/auth_token here (mode 0600)\n"
    "  - KubeRay: export RAY_AUTH_TOKEN=$(kubectl get secret medrl-ray-auth "
    "-o jsonpath='{.data.auth_token}' | base64 -d)\n"
    "  - a file anywhere: export RAY_AUTH_TOKEN_PATH=/path/to/token\n"
    "For a new cluster of your own, `ray get-auth-token --generate` writes a fresh token to "
    "~/.ray/auth_token (see docs/cluster.md)."
)


class SubmitError(RuntimeError):
    """The job could not be submitted or followed; the message says what to do."""


class JobFailed(SubmitError):
    """The job ended in a state other than SUCCEEDED (FAILED or STOPPED)."""

    def __init__(self, job_id: str, status: str, message: str = "") -> None:
        self.job_id = job_id
        self.status = status
        detail = f": {message}" if message else ""
        super().__init__(f"job {job_id} ended {status}{detail}")


class JobTimeout(SubmitError):
    """Waiting gave up after ``timeout_s``; the job itself keeps running."""

    def __init__(self, job_id: str, timeout_s: float, address: str) -> None:
        self.job_id = job_id
        super().__init__(
            f"job {job_id} still running after {timeout_s:g} s; it keeps running on the "
            f"cluster. Follow it with `RAY_AUTH_MODE=token ray job logs --follow --address "
            f"{address} {job_id}`, stop it with `RAY_AUTH_MODE=token ray job stop --address "
            f"{address} {job_id}`."
        )


# --------------------------------------------------------------------------- inputs


def default_address() -> str:
    """The Jobs API address: RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else local 8265.

    Same order as ``ray job submit``.
    """
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(var, "").strip()
        if value:
            return value
    return DEFAULT_ADDRESS


def _normalise_address(address: str) -> str:
    address = address.strip().rstrip("/")
    if address == "auto" or address.startswith("ray://"):
        raise SubmitError(
            f"address {address!r} is not a Jobs API address: give the dashboard's HTTP "
            f"address, e.g. {DEFAULT_ADDRESS} through a tunnel (see docs/cluster.md)"
        )
    if "://" not in address:
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise SubmitError(f"address {address!r}: only http:// and https:// are supported")
    try:
        _ = urlsplit(address).port  # a port out of range raises here, not inside requests
    except ValueError as exc:
        raise SubmitError(f"address {address!r}: {exc}") from None
    return address


def _is_loopback(address: str) -> bool:
    from rewards.workbench.app import is_loopback

    return is_loopback(urlsplit(address).hostname or "")


def find_token() -> str | None:
    """The Ray auth token, looked up in Ray's order; None when there is none.

    ``RAY_AUTH_TOKEN`` (the value), else ``RAY_AUTH_TOKEN_PATH`` (a file; set but
    unreadable or empty is an error, as in Ray), else ``~/.ray/auth_token``.
    """
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as exc:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read it ({exc})") from None
        if not token:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path}: the file is empty")
        return token
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file():
        token = default.read_text().strip()
        if token:
            return token
    return None


def auth_headers() -> dict[str, str]:
    """``{"Authorization": "Bearer <token>"}``; a missing token is an error.

    Only ``RAY_AUTH_MODE=disabled``, set on purpose, sends requests without a token.
    """
    token = find_token()
    if token:
        return {"Authorization": f"Bearer {token}"}
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled":
        log.warning("RAY_AUTH_MODE=disabled: submitting without a Ray auth token")
        return {}
    raise SubmitError(
        "no Ray auth token found (looked at RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH and "
        "~/.ray/auth_token); medrl's clusters run with token authentication on.\n"
        + HOW_TO_GET_A_TOKEN
    )


def load_runtime_env(path: str | os.PathLike) -> dict[str, Any]:
    """Read a runtime env YAML (``cluster/runtime_env.yaml``) into a dict."""
    from runfiles.config import ConfigError, read_yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"runtime env {path}: no such file")
    try:
        data = read_yaml(path) or {}
    except ConfigError as exc:
        raise ValueError(f"runtime env {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"runtime env {path}: expected a mapping, got {type(data).__name__}")
    return data


def entrypoint_for(entrypoint_args: Sequence[str]) -> str:
    """The shell command the job runs: ``medrl`` + the arguments, each quoted."""
    args = list(entrypoint_args)
    if args[:1] == ["medrl"]:
        args = args[1:]
    if not args:
        raise SubmitError("no medrl subcommand given, e.g. `rl train --config ...`")
    return "medrl " + shlex.join(args)


# --------------------------------------------------------------------------- client


def make_client(address: str | None = None, allow_insecure_token: bool = False):
    """A ``JobSubmissionClient`` for ``address`` carrying the auth header.

    Contacts the cluster once (Ray checks its version); errors say what to do. The token
    goes over plain http only to this machine (a tunnel's end), or elsewhere with
    ``allow_insecure_token``; otherwise this refuses before any connection is made.
    """
    import requests
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = _normalise_address(address or default_address())
    headers = auth_headers()
    if headers and address.startswith("http://") and not _is_loopback(address):
        if not allow_insecure_token:
            raise SubmitError(
                f"refusing to send the Ray auth token in clear text to {address}: reach the "
                "dashboard through an SSH tunnel or kubectl port-forward and submit to "
                f"{DEFAULT_ADDRESS}, or use https://; --allow-insecure-token sends it anyway"
            )
        log.warning("sending the Ray auth token in clear text to %s", address)
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as exc:
        raise SubmitError(_refused(address, str(exc))) from None
    except (ConnectionError, requests.ConnectionError, requests.Timeout) as exc:
        raise _unreachable(address, exc) from None
    except (RuntimeError, ValueError, requests.RequestException) as exc:
        raise SubmitError(
            f"the server at {address} did not answer as a Ray Jobs API ({_reason(exc)}); "
            f"--address is the dashboard's address, e.g. {DEFAULT_ADDRESS} through a tunnel"
        ) from None


def _reason(exc: BaseException) -> str:
    """The innermost cause of ``exc``, e.g. ``[Errno 111] Connection refused``."""
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    return str(exc).strip() or type(exc).__name__


def _unreachable(address: str, exc: BaseException) -> SubmitError:
    return SubmitError(
        f"cannot reach the Ray Jobs API at {address} ({_reason(exc)}). Start the cluster and "
        "open the tunnel first: `ray dashboard cluster/ray-cluster.yaml` (launcher) or "
        "`kubectl port-forward svc/medrl-head-svc 8265:8265` (KubeRay), or pass "
        "--address / set RAY_ADDRESS (see docs/cluster.md)"
    )


def _refused(address: str, detail: str) -> str:
    first = detail.strip().splitlines()[0] if detail.strip() else "refused"
    return (
        f"the Ray cluster at {address} refused the request ({first}): the token here is "
        "missing or is not this cluster's token.\n" + HOW_TO_GET_A_TOKEN
    )


# --------------------------------------------------------------------------- submit


def submit(
    entrypoint_args: Sequence[str],
    address: str | None = None,
    runtime_env: dict[str, Any] | None = None,
    wait: bool = True,
    timeout_s: float = 0.0,
    job_id: str | None = None,
    out: TextIO | None = None,
    allow_insecure_token: bool = False,
) -> str:
    """Submit ``medrl <entrypoint_args...>`` as a Ray job and return its job id.

    ``address``: the Jobs API (dashboard) address; default RAY_API_SERVER_ADDRESS or
    RAY_ADDRESS, else http://127.0.0.1:8265. ``runtime_env``: a Ray runtime env dict
    (``load_runtime_env("cluster/runtime_env.yaml")``). With ``wait`` the job's logs
    stream to ``out`` (stdout) until it ends; a job that does not succeed raises
    :class:`JobFailed`, and waiting longer than ``timeout_s`` (> 0) raises
    :class:`JobTimeout` (the job keeps running). Missing token, refused token, a token
    that would go over plain http to another host (unless ``allow_insecure_token``) and
    an unreachable cluster raise :class:`SubmitError` with the way out in the message.
    """
    import requests
    from ray.exceptions import AuthenticationError

    out = out or sys.stdout
    entrypoint = entrypoint_for(entrypoint_args)
    client = make_client(address, allow_insecure_token)
    address = client.get_address()
    try:
        submitted = client.submit_job(
            entrypoint=entrypoint,
            submission_id=job_id,
            runtime_env=runtime_env or None,
            metadata={"submitted_by": "medrl submit"},
        )
    except AuthenticationError as exc:
        raise SubmitError(_refused(address, str(exc))) from None
    except (ConnectionError, requests.ConnectionError, requests.Timeout) as exc:
        raise _unreachable(address, exc) from None
    except RuntimeError as exc:
        raise SubmitError(f"the cluster at {address} did not take the job: {exc}") from None
    print(f"submitted job {submitted}: {entrypoint}", file=out, flush=True)
    if not wait:
        print(
            f"follow it: RAY_AUTH_MODE=token ray job logs --follow --address {address} "
            f"{submitted}\n"
            f"status:    RAY_AUTH_MODE=token ray job status --address {address} {submitted}",
            file=out,
            flush=True,
        )
        return submitted
    _wait(client, submitted, out, timeout_s, address)
    return submitted


def _wait(client, job_id: str, out: TextIO, timeout_s: float, address: str) -> None:
    """Follow job ``job_id`` until it ends; raise unless it SUCCEEDED."""
    import requests

    deadline = time.monotonic() + timeout_s if timeout_s and timeout_s > 0 else None
    try:
        _follow(client, job_id, out, deadline, timeout_s, address)
        info = client.get_job_info(job_id)
    except KeyboardInterrupt:
        print(
            f"\nstopped following; job {job_id} keeps running. "
            f"Stop it with `RAY_AUTH_MODE=token ray job stop --address {address} {job_id}`.",
            file=out,
            flush=True,
        )
        raise
    except (ConnectionError, requests.ConnectionError, requests.Timeout) as exc:
        raise SubmitError(
            f"lost the Ray Jobs API at {address} while following job {job_id} "
            f"({_reason(exc)}); the job keeps running on the cluster. Follow it with "
            f"`RAY_AUTH_MODE=token ray job logs --follow --address {address} {job_id}`."
        ) from None
    status = str(getattr(info.status, "value", info.status))
    if status != "SUCCEEDED":
        first_line = (info.message or "").strip().splitlines()[:1]  # the logs were streamed
        raise JobFailed(job_id, status, first_line[0] if first_line else "")
    print(f"job {job_id} SUCCEEDED", file=out, flush=True)


def _follow(client, job_id: str, out: TextIO, deadline, timeout_s, address) -> None:
    """Stream the job's logs until it is terminal (websocket; polling as fallback)."""
    printed = 0

    async def tail() -> None:
        nonlocal printed
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()
            printed += len(chunk)

    try:
        if deadline is None:
            asyncio.run(tail())
        else:
            asyncio.run(asyncio.wait_for(tail(), max(0.1, deadline - time.monotonic())))
    except (asyncio.TimeoutError, TimeoutError):
        raise JobTimeout(job_id, timeout_s, address) from None
    except Exception as exc:  # a proxy without websockets, a dropped tunnel, ...
        log.warning("log stream broke (%s); polling the job instead", exc)

    # The websocket closes when the job ends; poll for the final status (and for
    # any log lines a broken stream missed).
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if len(logs) > printed:
            out.write(logs[printed:])
            out.flush()
            printed = len(logs)
        if status.is_terminal():
            return
        if deadline is not None and time.monotonic() > deadline:
            raise JobTimeout(job_id, timeout_s, address)
        time.sleep(POLL_S)
