"""The reward service over HTTP: :func:`serve_rewards` deploys :class:`RewardHTTPService`
on Ray Serve's proxy at 127.0.0.1 (by default) for callers outside Ray, images as base64
PNG (:func:`encode_image`, :func:`decode_image`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import ray
import torch
from PIL import Image

from generators.images import to_tensor, to_uint8
from rewards.config import RewardsConfig
from rewards.scorers import parse_spec, rewards_config
from rewards.scores import InvalidImage
from rewards.service import RewardService, share_gpus

log = logging.getLogger(__name__)


#: largest side of a PNG accepted by the HTTP endpoint
MAX_HTTP_SIDE = 4096
#: hosts the Serve endpoint binds without ``allow_public``
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")

# --------------------------------------------------------------------------- HTTP (Ray Serve)


def encode_image(image: torch.Tensor | np.ndarray) -> str:
    """(3, H, W) float in [-1, 1] (or uint8 (H, W, 3)) -> base64 PNG, for the HTTP endpoint."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        array = image
    else:
        array = to_uint8(torch.as_tensor(image))
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(item: Any) -> torch.Tensor | InvalidImage:
    """base64 PNG (or JPEG; a ``data:`` URL prefix is fine) -> (3, H, W) in [-1, 1]."""
    if not isinstance(item, str):
        return InvalidImage(f"image is a JSON {type(item).__name__}, not a base64 PNG string")
    text = item.split(",", 1)[1] if item.startswith("data:") else item
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        return InvalidImage(f"image is not valid base64 ({exc})")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if max(im.size) > MAX_HTTP_SIDE:
                return InvalidImage(
                    f"image is {im.size[0]}x{im.size[1]}; at most {MAX_HTTP_SIDE} a side"
                )
            im.load()
            array = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # PIL raises several types for broken data
        return InvalidImage(f"image does not decode as PNG ({type(exc).__name__}: {exc})")
    return to_tensor(array)


class RewardHTTPService(RewardService):
    """:class:`RewardService` behind Ray Serve's HTTP proxy.

    POST a JSON body ``{"ids": [...], "prompts": [...], "images": [base64 PNG, ...]}``:
    200 with ``{"scores": {id: {"reward", "quality", "alignment", "passed"}}, "errors":
    {id: message}}`` (an alignment of null means none: a simple reward); a body of the
    wrong form: 400 ``{"error": message}``. GET: the replica's :meth:`info`.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()  # one scoring call at a time per replica

    def score_json(self, payload: Any) -> dict[str, Any]:
        """``{"ids", "prompts", "images": [base64 PNG]}`` -> ``{"scores", "errors"}``.

        A PNG that does not decode is an error for its id; a body of the wrong form is a
        ValueError naming the key.
        """
        if not isinstance(payload, Mapping):
            raise ValueError(
                'the body must be a JSON object {"ids": [...], "prompts": [...], "images": [...]}'
            )
        missing = [k for k in ("ids", "prompts", "images") if k not in payload]
        if missing:
            raise ValueError(f"the body lacks key {missing[0]!r} (needs ids, prompts, images)")
        unknown = sorted(set(payload) - {"ids", "prompts", "images"})
        if unknown:
            raise ValueError(
                f"unknown key {unknown[0]!r} in the body (allowed: ids, prompts, images)"
            )
        for key in ("ids", "prompts", "images"):
            if not isinstance(payload[key], list):
                raise ValueError(f"{key!r} must be a JSON list, not {type(payload[key]).__name__}")
        images = [decode_image(item) for item in payload["images"]]
        return self.score(images, payload["prompts"], payload["ids"]).to_json()

    def _score_json_locked(self, payload: Any) -> dict[str, Any]:
        with self._lock:
            return self.score_json(payload)

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        if request.method == "GET":
            return JSONResponse(self.info())
        if request.method != "POST":
            return JSONResponse({"error": "use POST with a JSON body, or GET for info"}, 405)
        try:
            payload = await request.json()
        except Exception as exc:  # starlette raises JSONDecodeError / UnicodeDecodeError
            return JSONResponse({"error": f"the body is not JSON ({exc})"}, 400)
        try:
            # in a worker thread: the replica's event loop keeps answering health checks
            return JSONResponse(await asyncio.to_thread(self._score_json_locked, payload))
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, 400)


def check_host(host: str, allow_public: bool = False) -> None:
    """Refuse a non-loopback host unless ``allow_public`` (the security default)."""
    if host in LOCAL_HOSTS:
        if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" and not allow_public:
            raise ValueError(
                "RAY_SERVE_ENABLE_HA_PROXY=1 makes Ray Serve bind all interfaces whatever "
                "host is asked for; unset it, or pass allow_public=True (--allow-public)"
            )
        return
    if not allow_public:
        raise ValueError(
            f"refusing to serve rewards on host {host!r}: the reward service binds "
            f"127.0.0.1 (or localhost) unless allow_public=True (--allow-public) is given; "
            "anything that can reach the port can use it, so put authentication in front"
        )
    log.warning(
        "serving rewards on %s: reachable from other machines, without authentication", host
    )


def serve_rewards(
    spec: str,
    cfg: RewardsConfig | Mapping[str, Any] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    allow_public: bool = False,
    replicas: int | None = None,
    num_gpus: float | None = None,
    num_cpus: float = 1.0,
    device: str | None = None,
    route_prefix: str = "/score",
    name: str = "medrl-rewards",
    blocking: bool = False,
) -> str:
    """Deploy :class:`RewardHTTPService` on Ray Serve at ``http://host:port/score``.

    Starts Ray (``ray.init()``) if it is not running. Serve's HTTP options are cluster
    wide: if Serve already runs with another host or port, that is an error (shut it down
    with ``serve.shutdown()``). Returns the URL; ``blocking`` serves until Ctrl-C.
    """
    check_host(host, allow_public)
    cfg = rewards_config(cfg)
    parse_spec(spec)
    try:
        from ray import serve
    except ImportError as exc:
        raise RuntimeError(
            f"Ray Serve is not installed ({exc}); install it with: pip install 'ray[serve]'"
        ) from exc

    if not ray.is_initialized():
        ray.init()
    serve.start(http_options={"host": host, "port": int(port)})
    _check_serve_http(host, int(port))
    gpus, dev = share_gpus(cfg.service_num_gpus if num_gpus is None else num_gpus, device)
    app = serve.deployment(
        RewardHTTPService,
        name="RewardService",
        num_replicas=cfg.service_replicas if replicas is None else int(replicas),
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": gpus},
    ).bind(spec, cfg, dev)
    url_host = f"[{host}]" if ":" in host else host
    url = f"http://{url_host}:{int(port)}{route_prefix}"
    serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
    log.info("reward service %s on %s (%s)", spec, url, dev)
    if blocking:
        print(f"serving rewards ({spec}) on {url}; Ctrl-C stops", flush=True)
        _wait_for_interrupt()
        serve.delete(name)
        print("stopped", flush=True)
    return url


def _wait_for_interrupt() -> None:
    """Sleep until Ctrl-C or SIGTERM (so a killed server still takes its app down)."""
    import signal

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if main else None
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def _check_serve_http(host: str, port: int) -> None:
    """Serve keeps the HTTP options of its first start: make sure they are ours."""
    try:
        from ray.serve.context import _get_global_client

        config = _get_global_client().http_config
        actual = (config.host, int(config.port))
    except Exception as exc:  # a private API: if it moves, the check is skipped
        log.debug("could not read Serve's HTTP config: %s", exc)
        return
    if actual != (host, port):
        raise RuntimeError(
            f"Ray Serve is already running with HTTP host {actual[0]} port {actual[1]}, not "
            f"{host} port {port}; stop it first (serve.shutdown() or `serve shutdown`)"
        )
