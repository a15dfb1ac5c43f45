"""The rating workbench's store and HTTP API (the browser tests: test_workbench_browser.py)."""

from __future__ import annotations

import http.client
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from rewards.ratings import export_ratings, ingest_ratings, read_ratings
from rewards.workbench.app import MAX_BODY, Background, is_loopback, serve
from rewards.workbench.store import Rater, Workbench, WorkbenchError
from tests.rewards.workbench_round import make_round


@pytest.fixture
def bench(tmp_path: Path) -> Workbench:
    return Workbench(tmp_path / "ratings.db", make_round(tmp_path, n=12), repeats=2)


def rate(bench: Workbench, rater: Rater, pos: int, rating: int, **kw) -> dict:
    item = bench.item(rater, pos)
    bench.submit(rater, item["item_id"], item["nonce"], rating, **kw)
    return item


def test_queues_are_per_rater_random_and_complete(bench: Workbench):
    for name in ("alice", "bob"):
        bench.invite(name)
    a, b = Rater("alice", "rater"), Rater("bob", "rater")
    qa = [bench.item(a, i) for i in range(bench.state(a)["total"])]
    qb = [bench.item(b, i) for i in range(bench.state(b)["total"])]
    assert len(qa) == len(qb) == 12 + 2
    # every image once, plus the repeats (same prompt again later in the queue)
    images = {bench.image_file(a, it["item_id"]).name for it in qa}
    assert len(images) == 12
    assert [it["prompt"] for it in qa] != [it["prompt"] for it in qb] or [
        bench.image_file(a, it["item_id"]).name for it in qa
    ] != [bench.image_file(b, it["item_id"]).name for it in qb]
    assert not {it["item_id"] for it in qa} & {it["item_id"] for it in qb}
    # the same rater gets the same queue back (resume)
    again = Workbench(bench.db, bench.round_dir)
    assert [again.item(a, i)["item_id"] for i in range(14)] == [it["item_id"] for it in qa]


def test_answer_is_stored_as_the_sheet_would_be_with_history(bench: Workbench, tmp_path):
    bench.invite("alice", expert_level="consultant")
    alice = Rater("alice", "rater", "consultant")
    item = rate(bench, alice, 0, 3, comment="sharp vessels")
    rate(bench, alice, 0, 1)  # changed: both kept, the latest counts
    frame = read_ratings(bench.db)
    assert list(frame["rating"]) == [3, 1]
    row = frame.iloc[-1]
    image = bench.image_file(alice, item["item_id"])
    key = bench.key["images"][f"images/{image.name}"]
    assert row["image_path"] == (image.relative_to(tmp_path)).as_posix()
    assert (row["generator_ckpt"], int(row["seed"]), row["round"]) == (
        key["generator_ckpt"], key["seed"], "round-1")  # fmt: skip
    assert (row["prompt"], row["rater_id"], row["expert_level"], row["modality"]) == (
        key["prompt"], "alice", "consultant", "fundus")  # fmt: skip
    assert bench.item(alice, 0)["answer"] == {"rating": 1, "aspects": {}, "comment": ""}
    assert bench.state(alice)["answered"] == 1
    assert bench.progress() == [
        {"rater": "alice", "total": 14, "answered": 1, "changes": 1, "last": row["timestamp"]}
    ]


def test_bad_answers_store_nothing(bench: Workbench):
    bench.invite("alice")
    bench.invite("bob")
    alice, bob = Rater("alice", "rater"), Rater("bob", "rater")
    item = bench.item(alice, 0)
    cases = [
        (dict(rating=4), 422, "rating 4"),
        (dict(rating=True), 422, "rating True"),
        (dict(rating=2, aspects={"clinical_realism": 5}), 422, "no aspects"),
        (dict(rating=2, comment="x" * 2001), 422, "comment"),
        (dict(rating=2, item_id="forged"), 404, "no item"),
        (dict(rating=2, nonce="stale"), 409, "not current"),
    ]
    for kw, status, words in cases:
        args = {"item_id": item["item_id"], "nonce": item["nonce"], **kw}
        with pytest.raises(WorkbenchError, match=words) as err:
            bench.submit(alice, args.pop("item_id"), args.pop("nonce"), **args)
        assert err.value.status == status
    with pytest.raises(WorkbenchError, match="another rater") as err:  # bob forges alice's item
        bench.submit(bob, item["item_id"], item["nonce"], 2)
    assert err.value.status == 403
    with pytest.raises(WorkbenchError, match="another rater"):
        bench.image_file(bob, item["item_id"])
    bench.submit(alice, item["item_id"], item["nonce"], 2)
    with pytest.raises(WorkbenchError, match="already stored") as err:  # replayed
        bench.submit(alice, item["item_id"], item["nonce"], 2)
    assert err.value.status == 409
    # two tabs on the same item: the second form's answer is refused, not silently stacked
    tab_a, tab_b = bench.item(alice, 1), bench.item(alice, 1)
    bench.submit(alice, tab_b["item_id"], tab_b["nonce"], 3)
    with pytest.raises(WorkbenchError, match="another tab"):
        bench.submit(alice, tab_a["item_id"], tab_a["nonce"], 1)
    assert len(read_ratings(bench.db)) == 2
    with pytest.raises(WorkbenchError, match="unknown or replaced"):
        bench.who("not-a-token")
    old = bench.invite("carol")
    bench.invite("carol")  # a new link replaces the old one
    with pytest.raises(WorkbenchError, match="unknown or replaced"):
        bench.who(old)


def test_aspects_protocol_and_protocol_fixed_at_first_serve(tmp_path: Path):
    round_dir = make_round(tmp_path, n=4)
    bench = Workbench(tmp_path / "r.db", round_dir, protocol="aspects", repeats=0)
    bench.invite("alice")
    alice = Rater("alice", "rater")
    item = bench.item(alice, 0)
    with pytest.raises(WorkbenchError, match="missing"):
        bench.submit(alice, item["item_id"], item["nonce"], 2, aspects={"clinical_realism": 4})
    aspects = dict.fromkeys(bench.state(alice)["aspects"], 7.5)
    with pytest.raises(WorkbenchError, match="0 to 10"):
        bench.submit(
            alice, item["item_id"], item["nonce"], 2, aspects={**aspects, "colour_contrast": 11}
        )
    bench.submit(alice, item["item_id"], item["nonce"], 2, aspects=aspects)
    row = read_ratings(bench.db).iloc[0]
    assert row["clinical_realism"] == 7.5 and row["confidence_of_use"] == 7.5
    with pytest.raises(ValueError, match="cannot change"):
        Workbench(tmp_path / "r.db", round_dir, protocol="cs787")
    with pytest.raises(ValueError, match="half the round"):  # repeats come from the first half
        Workbench(tmp_path / "other.db", round_dir, repeats=3)
    assert Workbench(tmp_path / "r.db", round_dir).protocol == "aspects"


def test_repeats_measure_self_agreement_and_stay_out_of_training(bench: Workbench):
    bench.invite("alice")
    alice = Rater("alice", "rater")
    total = bench.state(alice)["total"]
    for pos in range(total):
        rate(bench, alice, pos, 3 if pos % 2 else 1)
    assert bench.next_pos(alice, -1) is None
    assert len(read_ratings(bench.db)) == 12  # the 2 repeats are not training ratings
    (agree,) = bench.self_agreement()
    assert agree["rater"] == "alice" and agree["pairs"] == 2
    assert 0 <= agree["exact"] <= 1


def test_skip_comes_back_and_resume_starts_at_the_first_unanswered(bench: Workbench):
    bench.invite("alice")
    alice = Rater("alice", "rater")
    assert bench.state(alice)["resume"] == 0
    rate(bench, alice, 0, 2)
    assert bench.next_pos(alice, 0) == 1  # 1 skipped: next after 1 is 2
    assert bench.next_pos(alice, 1) == 2
    for pos in range(2, bench.state(alice)["total"]):
        rate(bench, alice, pos, 2)
    assert bench.next_pos(alice, 13) == 1  # wraps round to the skipped one
    assert Workbench(bench.db, bench.round_dir).state(alice)["resume"] == 1


def test_exported_csv_ingests_back_unchanged(bench: Workbench, tmp_path: Path):
    bench.invite("alice")
    bench.invite("bob")
    for name, offset in (("alice", 0), ("bob", 1)):
        for pos in range(6):
            rate(bench, Rater(name, "rater"), pos, 1 + (pos + offset) % 3)
    out = export_ratings(bench.db, tmp_path / "export.csv")
    fresh = tmp_path / "fresh" / "ratings.db"
    ingest_ratings(out, fresh)
    cols = ["image_path", "rating", "prompt", "rater_id", "timestamp", "generator_ckpt", "seed",
            "round"]  # fmt: skip
    a = read_ratings(bench.db)[cols].reset_index(drop=True)
    b = read_ratings(fresh)[cols].reset_index(drop=True)
    assert a.astype(str).equals(b.astype(str))


def test_two_raters_at_once_never_lose_or_duplicate(bench: Workbench):
    for name in ("alice", "bob", "carol"):
        bench.invite(name)
    errors: list[BaseException] = []

    def work(name: str) -> None:
        try:
            who = Rater(name, "rater")
            for pos in range(bench.state(who)["total"]):
                rate(bench, who, pos, 2)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in ("alice", "bob", "carol")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    frame = read_ratings(bench.db)
    assert len(frame) == 3 * 12
    assert not frame.duplicated(["image_path", "rater_id"]).any()


# --------------------------------------------------------------------------- HTTP


def call(url: str, method: str = "GET", body=None, cookie: str | None = None, header: bool = True,
         raw: bytes | None = None):  # fmt: skip
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, method=method, data=data)
    req.add_header("Content-Type", "application/json")
    if header:
        req.add_header("X-Medrl", "1")
    if cookie:
        req.add_header("Cookie", cookie)
    try:
        with urllib.request.urlopen(req, timeout=30) as res:
            return res.status, res.read(), res.headers
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers


def login(url: str, token: str) -> str:
    status, _, headers = call(url + "/api/login", "POST", {"token": token})
    assert status == 200
    return headers["set-cookie"].split(";")[0]


def test_http_refuses_what_it_must_and_leaks_nothing(bench: Workbench):
    alice_token = bench.invite("alice")
    bob_token = bench.invite("bob")
    admin_token = bench.invite("boss", role="admin")
    with Background(bench) as url:
        assert call(url + "/api/state")[0] == 401  # no token
        assert call(url + "/api/login", "POST", {"token": "wrong"})[0] == 401
        alice, bob = login(url, alice_token), login(url, bob_token)
        status, body, headers = call(url + "/api/item/0", cookie=alice)
        item = json.loads(body)
        assert status == 200 and "no-store" in headers["Cache-Control"]
        # blind: nothing names the generator, adapter, seed or file
        page = call(url + "/", cookie=alice)[1].decode() + body.decode()
        for secret in ("generator", "adapter", "seed", ".png", "runs/x"):
            assert secret not in page.replace("image_path", "")
        assert call(url + item["image"], cookie=alice)[0] == 200
        assert call(url + item["image"], cookie=bob)[0] == 403  # another rater's item
        answer = {"item_id": item["item_id"], "nonce": item["nonce"], "rating": 2}
        assert call(url + "/api/answer", "POST", answer, cookie=bob)[0] == 403
        assert call(url + "/api/answer", "POST", answer, cookie=alice, header=False)[0] == 403
        assert call(url + "/api/answer", "POST", {**answer, "rating": 0}, cookie=alice)[0] == 422
        assert call(url + "/api/answer", "POST", {**answer, "rating": "2"}, cookie=alice)[0] == 422
        status, body, _ = call(url + "/api/answer", "POST", {**answer, "extra": 1}, cookie=alice)
        assert status == 422 and b"extra" in body
        big = json.dumps({**answer, "comment": "x" * MAX_BODY}).encode()
        status, body, _ = call(url + "/api/answer", "POST", cookie=alice, raw=big)
        assert status == 413 and b"16384" in body
        host, port = url.removeprefix("http://").split(":")
        chunked = http.client.HTTPConnection(host, int(port), timeout=30)
        chunked.request("POST", "/api/answer", body=iter([json.dumps(answer).encode()]),
                        headers={"X-Medrl": "1", "Cookie": alice,
                                 "Content-Type": "application/json"})  # fmt: skip
        res = chunked.getresponse()
        assert res.status == 411 and b"Content-Length" in res.read()  # no declared length
        chunked.close()
        assert len(read_ratings(bench.db)) == 0  # nothing refused was stored
        assert call(url + "/api/answer", "POST", answer, cookie=alice)[0] == 200
        assert call(url + "/api/answer", "POST", answer, cookie=alice)[0] == 409  # replay
        assert call(url + "/api/progress", cookie=alice)[0] == 403
        admin = login(url, admin_token)
        status, body, _ = call(url + "/api/progress", cookie=admin)
        assert status == 200 and json.loads(body)["progress"][0]["answered"] == 1
        assert call(url + "/admin", cookie=admin)[0] == 200
        assert call(url + "/admin", cookie=alice)[0] == 403
        assert call(url + "/api/state", cookie=admin)[0] == 403  # an admin has no queue
    assert len(read_ratings(bench.db)) == 1


def test_serve_refuses_a_network_address_without_the_flag(bench: Workbench):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    with pytest.raises(ValueError, match="SSH tunnel"):
        serve(bench, host="0.0.0.0")


def test_cli_invite_serve_and_agreement_of_a_round(tmp_path: Path, capsys):
    from medrl.cli import main

    round_dir, db = make_round(tmp_path, n=6), tmp_path / "ratings.db"
    base = ["--round", str(round_dir), "--db", str(db)]
    assert main(["ratings", "invite", "dr-a", *base, "--expert-level", "consultant"]) == 0
    link = capsys.readouterr().out.split()[4]
    assert link.startswith("http://127.0.0.1:8787/#token=")
    token = link.split("=", 1)[1]
    # raters can be invited before the first serve; the serve fixes the protocol
    bench = Workbench(db, round_dir, protocol="cs787", repeats=1)
    who = bench.who(token)
    assert (who.rater_id, who.expert_level) == ("dr-a", "consultant")
    for pos in range(bench.state(who)["total"]):
        rate(bench, who, pos, 2)
    assert main(["ratings", "agreement", "--db", str(db), "--round", "round-1"]) == 0
    out = capsys.readouterr().out
    assert "6 ratings of 6" in out and "dr-a (round round-1): self-agreement 100%" in out
    assert main(["ratings", "serve", *base, "--host", "10.0.0.1"]) == 2
    assert "SSH tunnel" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ratings", "serve", *base, "--protocol", "likert"])
