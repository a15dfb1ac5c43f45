"""Load check of the rating workbench: concurrent raters against the local server.

    python benchmarks/workbench_load.py                 # 20 raters, 60 s
    python benchmarks/workbench_load.py --raters 5 --seconds 10

Each simulated rater logs in with their own token and loops as the page does: ask for the
next unanswered position, fetch the item and its image, post an answer (when the queue
is done, it re-rates random positions, which are changes). Every request's latency is
recorded. At the end the store is checked against what the server acknowledged: every
acknowledged answer must be stored (``lost`` 0), nothing may be stored that the server did
not acknowledge (``unacknowledged`` 0), and the ratings table must hold exactly one row
per stored answer of a non-repeat item (each referenced by one answer). The answers log
cannot hold one form token twice (a UNIQUE column), so a stored answer is never doubled.
Prints p50/p99 latency per request kind, answers per second and the two counts.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rewards.workbench.app import Background  # noqa: E402
from rewards.workbench.store import Workbench  # noqa: E402
from tests.rewards.workbench_round import make_round  # noqa: E402


def request(url, method="GET", body=None, cookie=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, method=method, data=data)
    req.add_header("Content-Type", "application/json")
    req.add_header("X-Medrl", "1")
    if cookie:
        req.add_header("Cookie", cookie)
    with urllib.request.urlopen(req, timeout=60) as res:
        return res.read(), res.headers


def rater_loop(url, token, until, lat, acked, errors, seed):
    rng = np.random.default_rng(seed)
    try:
        _, headers = request(url + "/api/login", "POST", {"token": token})
        cookie = headers["set-cookie"].split(";")[0]
        total = json.loads(request(url + "/api/state", cookie=cookie)[0])["total"]
        after = -1
        while time.monotonic() < until:
            t = time.perf_counter()
            pos = json.loads(request(f"{url}/api/next?after={after}", cookie=cookie)[0])["pos"]
            lat["next"].append(time.perf_counter() - t)
            if pos is None:
                pos = int(rng.integers(total))  # done: change an earlier answer
            t = time.perf_counter()
            item = json.loads(request(f"{url}/api/item/{pos}", cookie=cookie)[0])
            lat["item"].append(time.perf_counter() - t)
            t = time.perf_counter()
            request(url + item["image"], cookie=cookie)
            lat["image"].append(time.perf_counter() - t)
            answer = {"item_id": item["item_id"], "nonce": item["nonce"],
                      "rating": int(rng.integers(1, 4))}  # fmt: skip
            t = time.perf_counter()
            request(url + "/api/answer", "POST", answer, cookie=cookie)
            lat["answer"].append(time.perf_counter() - t)
            acked.append(answer["nonce"])
            after = pos
    except Exception as exc:  # reported at the end
        errors.append(repr(exc))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--raters", type=int, default=20)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--images", type=int, default=120)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bench = Workbench(tmp / "ratings.db", make_round(tmp, n=args.images), repeats=5)
        tokens = [bench.invite(f"rater{i:02d}") for i in range(args.raters)]
        lat: dict[str, list[float]] = {"next": [], "item": [], "image": [], "answer": []}
        acked: list[str] = []
        errors: list[str] = []
        with Background(bench) as url:
            until = time.monotonic() + args.seconds
            threads = [
                threading.Thread(target=rater_loop, args=(url, t, until, lat, acked, errors, i))
                for i, t in enumerate(tokens)
            ]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
        conn = sqlite3.connect(tmp / "ratings.db")
        stored = [r[0] for r in conn.execute("SELECT nonce FROM workbench_answers")]
        ratings = conn.execute("SELECT COUNT(*) FROM ratings").fetchone()[0]
        expected_ratings = conn.execute(  # distinct ids: one ratings row per answer
            "SELECT COUNT(DISTINCT a.rating_id) FROM workbench_answers a JOIN workbench_queue q "
            "ON a.item_id = q.item_id WHERE q.repeat_of IS NULL"
        ).fetchone()[0]
        conn.close()
    lost = len(set(acked) - set(stored))
    unacknowledged = len(set(stored) - set(acked))
    print(f"{args.raters} raters for {wall:.0f} s against one local server, "
          f"{args.images} images (+5 repeats) each:")  # fmt: skip
    for kind, values in lat.items():
        if values:
            ms = np.array(values) * 1000
            print(f"  {kind:7s} {len(ms):6d} requests  p50 {np.percentile(ms, 50):7.1f} ms  "
                  f"p99 {np.percentile(ms, 99):7.1f} ms")  # fmt: skip
    print(f"  answers acknowledged {len(acked)} ({len(acked) / wall:.1f}/s), stored "
          f"{len(stored)}; lost {lost}, unacknowledged {unacknowledged}; ratings rows {ratings} "
          f"(expected {expected_ratings})")  # fmt: skip
    if errors:
        print(f"  {len(errors)} rater(s) stopped on an error, first: {errors[0]}")
    ok = not errors and lost == 0 and unacknowledged == 0 and ratings == expected_ratings
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
