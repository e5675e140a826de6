"""``clp serve`` on a tiny fitted checkpoint: the JSON endpoint answers as ``clp steer`` does, refuses bad requests
with a clear message, bounds concurrency, and the page works in a real headless Chromium."""

import contextlib
import copy
import http.client
import json
import math
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import TINY_CONFIG, clp, write_config

from clp_lightning.serve import Limits, make_server
from clp_lightning.serve import app as serve_app
from clp_lightning.serve import backends as serve_backends
from clp_lightning.serve.backends import from_checkpoint, from_directory, read_report

PROMPT = "SUBREDDIT: r/cooking\n\nPOST: my soup is too salty, what can I add to fix it?\n\nTL;DR:"
MAX_NEW_TOKENS = 6
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run fitted for one step, with a grid evaluation: its config, ``last.ckpt`` and ``latest.json``."""
    tmp = tmp_path_factory.mktemp("serve")
    config = write_config(
        tmp / "config.yaml", max_steps=1, val_check_interval=1, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        limit_val_batches=1, default_root_dir=str(tmp),
        logger={"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp), "name": "run", "version": ""}},
        callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"save_last": True, "save_on_train_epoch_end": False}},
                   {"class_path": "clp_lightning.callbacks.GridEvaluation",
                    "init_args": {"grid_step": 0.25, "kl_samples": 0, "sample_prompts": 1,
                                  "generation": {"do_sample": False, "max_new_tokens": 4}}}])
    from clp_lightning.cli import main

    main(["fit", "--config", str(config)])
    ckpt = tmp / "run" / "checkpoints" / "last.ckpt"
    assert (tmp / "run" / "evaluation" / "latest.json").is_file()
    return config, ckpt


@pytest.fixture(scope="module")
def backend(run):
    config, ckpt = run
    return from_checkpoint([str(config)], str(ckpt), [], MAX_NEW_TOKENS)


@contextlib.contextmanager
def served(backend, **limits):
    """``backend`` served on a free loopback port in a thread; yields ``(host, port, server)``."""
    server = make_server(backend, "127.0.0.1", 0, Limits(max_new_tokens=MAX_NEW_TOKENS, **limits))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield (*server.server_address[:2], server)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def request(address, method, path, body=None, headers=None):
    """``(status, decoded JSON or text)`` of one HTTP request; ``body`` may be an object (sent as JSON) or bytes."""
    conn = http.client.HTTPConnection(*address[:2], timeout=60)
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})} if body is not None else headers or {}
    try:
        conn.request(method, path, body=body, headers=headers)
        reply = conn.getresponse()
        data = reply.read().decode()
        is_json = reply.getheader("Content-Type") == "application/json"
        return reply.status, json.loads(data) if is_json else data
    finally:
        conn.close()


def steered(run, tmp_path, weights):
    """``clp steer``'s row for PROMPT at ``weights``, from its own load of the checkpoint."""
    from clp_lightning.steer import steer

    config, ckpt = run
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT}) + "\n")
    [row] = steer(["--config", str(config), "--ckpt_path", str(ckpt), "--weights", ",".join(map(str, weights)),
                   "--prompts", str(prompts), "--max_new_tokens", str(MAX_NEW_TOKENS)])
    return row


# ------------------------------------------------------------------------------------------------- the endpoints

def test_generate_answers_as_clp_steer_does(run, backend, tmp_path, monkeypatch):
    from clp_lightning.conditioning.policy import ConditionalPolicy

    # the one-step policy answers alike at every weighting: the weighting it is given is read where it takes it
    given, encode = [], ConditionalPolicy.encode

    def record(self, prompts, weights=None, alpha=None):
        given.append(None if weights is None else weights.tolist())
        return encode(self, prompts, weights, alpha)

    monkeypatch.setattr(ConditionalPolicy, "encode", record)
    with served(backend) as address:
        status, info = request(address, "GET", "/api/info")
        assert status == 200 and info["objectives"] == ["brevity", "length"]
        assert info["max_new_tokens"] == MAX_NEW_TOKENS and info["max_prompt_chars"] == 4000 and info["has_front"]
        status, page = request(address, "GET", "/")
        assert status == 200 and "<title>clp serve</title>" in page
        status, front = request(address, "GET", "/api/front")
        report = json.loads((run[1].parent.parent / "evaluation" / "latest.json").read_text())
        assert status == 200 and front["grid"] == report["grid"] and front["rewards"] == report["rewards"]
        assert front["front_mask"] == report["front_mask"] and "samples" not in front  # only what the page draws
        status, out = request(address, "POST", "/generate", {"prompt": PROMPT, "weights": [0.25, 0.75]})
    assert status == 200, out
    weighted = [g for g in given if g is not None]  # the reference policy, if encoded, takes no weighting
    assert weighted and all(g == [[0.25, 0.75]] for g in weighted), given
    expected = steered(run, tmp_path, [0.25, 0.75])
    assert out == {"response": expected["response"], "rewards": expected["rewards"], "weights": [0.25, 0.75]}
    assert set(out["rewards"]) == {"brevity", "length"}


def test_an_exported_policy_answers_as_its_checkpoint_does(run, backend, tmp_path, monkeypatch):
    """``clp serve DIR`` on the directory ``clp export`` writes: the policy decodes itself, with the config's rewards
    when one is given, and the front is the directory's ``evaluation.json``."""
    from clp_lightning.conditioning.policy import ConditionalPolicy
    from clp_lightning.export import main as export

    # the one-step policy answers alike at every weighting: the weighting it is given is read where it takes it
    given, encode = [], ConditionalPolicy.encode

    def record(self, prompts, weights=None, alpha=None):
        given.append(None if weights is None else weights.tolist())
        return encode(self, prompts, weights, alpha)

    config, ckpt = run
    directory = tmp_path / "exported"
    export(["--config", str(config), "--ckpt_path", str(ckpt), "--out", str(directory)])
    scored = from_directory(str(directory), [str(config)], MAX_NEW_TOKENS)
    unscored = from_directory(str(directory), [], MAX_NEW_TOKENS)
    assert scored.objectives == unscored.objectives == ["brevity", "length"]  # from the config, from the directory
    w = torch.tensor([0.25, 0.75])
    monkeypatch.setattr(ConditionalPolicy, "encode", record)
    out = scored.generate(PROMPT, w)
    weighted = [g for g in given if g is not None]  # the reference policy, if encoded, takes no weighting
    assert weighted and all(g == [[0.25, 0.75]] for g in weighted), given
    assert out == backend.generate(PROMPT, w)
    assert unscored.generate(PROMPT, w) == {"response": backend.generate(PROMPT, w)["response"], "rewards": {}}
    with served(unscored) as address:
        assert request(address, "GET", "/api/front")[1]["grid"] == backend.front()["grid"]


def test_a_config_whose_rewards_are_not_the_exported_objectives_is_refused(run, tmp_path):
    """Weight i steers the policy's objective i: a config naming other rewards, or the same in another order, would
    label the sliders and score the responses wrongly."""
    from clp_lightning.export import main as export

    config, ckpt = run
    directory = tmp_path / "exported"
    export(["--config", str(config), "--ckpt_path", str(ckpt), "--out", str(directory)])
    import yaml

    swapped = yaml.safe_load(Path(config).read_text())
    swapped["model"]["init_args"]["rewards"].reverse()
    (tmp_path / "swapped.yaml").write_text(yaml.safe_dump(swapped))
    with pytest.raises(ValueError, match=r"the config's rewards \['length', 'brevity'\] are not the objectives "
                                         r"\['brevity', 'length'\]"):
        from_directory(str(directory), [str(tmp_path / "swapped.yaml")], MAX_NEW_TOKENS)


@pytest.fixture(scope="module")
def alpha_run(tmp_path_factory):
    """A tiny run of a policy conditioned on the KL strength (in its prompt), alpha in [0.05, 0.5]."""
    from clp_lightning.cli import main

    tmp = tmp_path_factory.mktemp("alpha")
    config = copy.deepcopy(TINY_CONFIG)
    config["model"]["init_args"]["policy"]["conditioning"].update(prompt=True, condition_on_alpha=True)
    config["model"]["init_args"]["alpha_range"] = [0.05, 0.5]
    config["model"]["init_args"]["kl_coef"] = 0.2  # not the range's low end: a default of kl_coef would show
    path = write_config(tmp / "config.yaml", config, default_root_dir=str(tmp), callbacks=[
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp / "checkpoints"), "save_last": True}}])
    main(["fit", "--config", str(path)])
    return path, tmp / "checkpoints" / "last.ckpt"


def test_an_alpha_conditioned_export_generates_at_the_alpha_its_checkpoint_does(alpha_run, tmp_path, monkeypatch):
    """Both paths give an alpha-conditioned policy the low end of its alpha_range (as grid evaluation does)."""
    from clp_lightning.conditioning.policy import ConditionalPolicy
    from clp_lightning.export import main as export

    # the one-step policy answers alike at every alpha: the alpha it is given is read where it takes it
    given, encode = [], ConditionalPolicy.encode

    def record(self, prompts, weights=None, alpha=None):
        if alpha is not None:
            given.append(torch.as_tensor(alpha).reshape(-1).tolist())
        return encode(self, prompts, weights, alpha)

    def alphas(generate, *args):
        given.clear()
        out = generate(PROMPT, *args)
        return out, sorted({a for row in given for a in row})

    monkeypatch.setattr(ConditionalPolicy, "encode", record)
    path, ckpt = alpha_run
    export(["--config", str(path), "--ckpt_path", str(ckpt), "--out", str(tmp_path / "exported")])
    exported = from_directory(str(tmp_path / "exported"), [str(path)], MAX_NEW_TOKENS)
    assert exported.alpha == 0.05
    checkpointed, w = from_checkpoint([str(path)], str(ckpt), [], MAX_NEW_TOKENS), torch.tensor([0.7, 0.3])
    (out, at), (want, want_at) = alphas(exported.generate, w), alphas(checkpointed.generate, w)
    assert out == want and at == want_at == [pytest.approx(0.05)]
    # a request may choose the KL strength within the trained range, through either path
    assert exported.alpha_range == checkpointed.alpha_range == (0.05, 0.5)
    (out, at), (want, want_at) = alphas(exported.generate, w, 0.3), alphas(checkpointed.generate, w, 0.3)
    assert out == want and at == want_at == [pytest.approx(0.3)]
    with served(checkpointed) as address:
        assert request(address, "GET", "/api/info")[1]["alpha_range"] == [0.05, 0.5]
        status, out = request(address, "POST", "/generate", {"prompt": PROMPT, "weights": [0.7, 0.3], "alpha": 0.3})
        assert status == 200 and out["alpha"] == 0.3
        assert out["response"] == checkpointed.generate(PROMPT, w, 0.3)["response"]
        assert request(address, "POST", "/generate", {"prompt": PROMPT, "weights": [0.7, 0.3]})[1]["alpha"] == 0.05
        for bad in (0.01, 2, "0.3", True):
            status, out = request(address, "POST", "/generate", {"prompt": PROMPT, "weights": [1, 0], "alpha": bad})
            assert status == 400 and "'alpha' must be a number in [0.05, 0.5]" in out["error"], (bad, out)


def test_an_exported_alpha_range_that_no_training_gives_is_refused(alpha_run, tmp_path, monkeypatch):
    """The directory is untrusted: its alpha_range is every request's default alpha and the page's slider, so one
    out of order, NaN or infinite would answer every request from an alpha no training gave (or break the page).
    It is refused before any model loads, as is a malformed clp_config.json (they used to be found after the reward
    models and the policy had loaded)."""
    from clp_lightning.conditioning.policy import ConditionalPolicy
    from clp_lightning.export import main as export

    path, ckpt = alpha_run
    directory = tmp_path / "exported"
    export(["--config", str(path), "--ckpt_path", str(ckpt), "--out", str(directory)])
    monkeypatch.setattr(ConditionalPolicy, "from_pretrained", lambda *a, **k: pytest.fail("loaded the policy"))
    monkeypatch.setattr(serve_backends, "rewards_from_config", lambda *a: pytest.fail("loaded the rewards"))
    record = json.loads((directory / "clp_config.json").read_text())
    for bad in ([0.5, 0.05], [float("nan"), 0.5], [0.05, float("inf")], [-1, 0.5]):
        record["metadata"]["alpha_range"] = bad
        (directory / "clp_config.json").write_text(json.dumps(record))
        with pytest.raises(ValueError, match="not KL strengths 0 <= low <= high"):
            from_directory(str(directory), [str(path)], MAX_NEW_TOKENS)
    (directory / "clp_config.json").write_text(json.dumps({**record, "objective_names": "brevity"}))
    with pytest.raises(ValueError, match="field 'objective_names' must be a list of 2 names"):
        from_directory(str(directory), [str(path)], MAX_NEW_TOKENS)


def test_a_directory_is_checked_before_loading(tmp_path, capsys, monkeypatch):
    from clp_lightning.conditioning.policy import ConditionalPolicy

    monkeypatch.setattr(ConditionalPolicy, "from_pretrained", lambda path: pytest.fail("loaded a bad directory"))
    code, err = clp(capsys, "serve", str(tmp_path / "missing"), "--port", "0")
    assert code == 2 and "is not a directory: expected one written by `clp export`" in err
    code, err = clp(capsys, "serve", str(tmp_path), "--port", "0")
    assert code == 2 and "has no clp_config.json" in err
    (tmp_path / "clp_config.json").write_text("{}")
    code, err = clp(capsys, "serve", str(tmp_path), "--config", str(tmp_path / "nope.yaml"), "--port", "0")
    assert code == 2 and "config '" in err and "not found" in err


def test_a_report_that_is_not_a_front_over_the_objectives_shows_no_front(run, tmp_path, caplog):
    report = json.loads((run[1].parent.parent / "evaluation" / "latest.json").read_text())
    assert read_report(tmp_path / "missing.json", ["brevity", "length"]) is None
    for name, content in [("swapped", {**report, "objectives": ["length", "brevity"]}),
                          ("ragged", {**report, "rewards": report["rewards"][:-1]}),
                          ("not numbers", {**report, "grid": [["a", "b"]] * len(report["grid"])}), ("list", [1])]:
        (tmp_path / "report.json").write_text(json.dumps(content))
        assert read_report(tmp_path / "report.json", ["brevity", "length"]) is None, name
    (tmp_path / "report.json").write_text("{not json")
    assert read_report(tmp_path / "report.json", ["brevity", "length"]) is None
    assert "is unreadable" in caplog.text and "is not a grid evaluation over ['brevity', 'length']" in caplog.text


def test_malformed_optional_parts_of_a_report_are_left_out_and_the_front_kept(run, tmp_path, caplog):
    """The report is untrusted: a reference of the wrong length made every axis of the page's plot NaN."""
    report = json.loads((run[1].parent.parent / "evaluation" / "latest.json").read_text())
    bad = {"reference_rewards": [0.5], "front_mask": "yes", "hypervolume": "big", "step": 1.5, "epoch": True}
    (tmp_path / "report.json").write_text(json.dumps({**report, **bad}))
    front = read_report(tmp_path / "report.json", ["brevity", "length"])
    assert front == {"objectives": ["brevity", "length"], "grid": report["grid"], "rewards": report["rewards"]}
    assert "leaving out front_mask, reference_rewards, hypervolume, epoch, step" in caplog.text
    good = read_report(run[1].parent.parent / "evaluation" / "latest.json", ["brevity", "length"])
    assert set(good) == set(serve_backends.FRONT_KEYS)


BAD_REQUESTS = {
    "not JSON": (b'{"prompt": "hi", ', "request body is not valid JSON (Expecting property name"),
    "not an object": ([1, 2], "request body must be a JSON object such as"),
    "no prompt": ({"weights": [0.5, 0.5]}, "'prompt' must be a string (the post or article), got nothing"),
    "prompt not text": ({"prompt": 3, "weights": [0.5, 0.5]}, "'prompt' must be a string (the post or article), got 3"),
    "empty prompt": ({"prompt": "  \n", "weights": [0.5, 0.5]}, "'prompt' is empty: write the post or article"),
    "long prompt": ({"prompt": "x" * 201, "weights": [0.5, 0.5]},
                    "'prompt' is 201 characters long, over the limit of 200 (the server's --max_prompt_chars)"),
    "lone surrogate": (b'{"prompt": "a\\ud800b", "weights": [0.5, 0.5]}',
                       "'prompt' has an unpaired UTF-16 surrogate at character 1 ('\\ud800'), which is not text"),
    "no weights": ({"prompt": "hi"}, "'weights' must be a list of 2 numbers, one per objective (brevity, length)"),
    "weights not numbers": ({"prompt": "hi", "weights": ["0.5", "0.5"]}, "'weights' must be a list of 2 numbers"),
    "weights wrong count": ({"prompt": "hi", "weights": [0.2, 0.3, 0.5]},
                            "'weights' [0.2, 0.3, 0.5] has 3 entries, expected 2 (one per objective)"),
    "negative weight": ({"prompt": "hi", "weights": [-0.5, 1.5]}, "has negative entries; weights must be >= 0"),
    "off the simplex": ({"prompt": "hi", "weights": [0.5, 0.6]},
                        "'weights' [0.5, 0.6] sums to 1.1, expected 1 (a point on the simplex) (objectives: brevity"),
    "huge weight": (b'{"prompt": "hi", "weights": [1' + b"0" * 400 + b', 0]}', "'weights' must be numbers in [0, 1]"),
    "NaN weight": (b'{"prompt": "hi", "weights": [NaN, 1]}', "contains NaN or infinite entries"),
    "unknown field": ({"prompt": "hi", "weights": [0.5, 0.5], "temperature": 2},
                      "unknown field(s) ['temperature']; expected only 'prompt', 'weights' and 'alpha'"),
    "alpha for a policy without": ({"prompt": "hi", "weights": [0.5, 0.5], "alpha": 0.1},
                                   "'alpha' 0.1 given, but this policy is not conditioned on the KL strength"),
    "body too large": (b" " * 7000, "request body is 7000 bytes, over the limit of 6496 bytes"),
    "not UTF-8": (b'{"prompt": "\xff"}', "request body is not UTF-8 text"),
}


def test_bad_requests_get_400_and_a_clear_message(backend):
    with served(backend, max_prompt_chars=200) as address:
        for case, (body, message) in BAD_REQUESTS.items():
            status, out = request(address, "POST", "/generate", body)
            assert status == 400 and message in out["error"], (case, status, out)
        status, out = request(address, "POST", "/generate", b"{}", {"Content-Type": "text/plain"})
        assert status == 400 and out["error"] == "Content-Type must be application/json, got 'text/plain'"
        assert request(address, "POST", "/predict", {})[0] == 404
        assert request(address, "GET", "/etc/passwd") == (404, {"error": "no page '/etc/passwd'; try / or /api/info"})
        # a body shorter than its Content-Length (the client stopped sending) is refused, not waited for
        conn = http.client.HTTPConnection(*address[:2], timeout=10)
        conn.putrequest("POST", "/generate")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", "100")
        conn.endheaders(b'{"prompt": "hi"')
        conn.sock.shutdown(socket.SHUT_WR)
        reply = conn.getresponse()
        error = json.loads(reply.read())["error"]
        assert reply.status == 400 and error == "request body ended after 15 of its 100 bytes (Content-Length)"
        conn.close()
        # the tolerance takes rounded numbers (a page's three decimals); the model gets them rescaled onto the simplex
        status, out = request(address, "POST", "/generate", {"prompt": "hi", "weights": [0.3333, 0.6666]})
        assert status == 200 and out["weights"] == [0.3333 / 0.9999, 0.6666 / 0.9999]


class Stub:
    """A backend whose generation waits until released, or fails."""

    objectives = ["a", "b"]
    alpha_range = None

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.entered, self.release = fail, threading.Event(), threading.Event()

    def generate(self, prompt, weights, alpha=None):
        if self.fail:
            raise RuntimeError("secret internal detail")
        self.entered.set()
        assert self.release.wait(30)
        return {"response": prompt.upper(), "rewards": {}}

    def front(self):
        return None


def test_requests_beyond_the_queue_get_503_busy():
    stub = Stub()
    with served(stub, max_waiting=1) as address:
        server = address[2]
        body = {"prompt": "hi", "weights": [0.5, 0.5]}
        results = []
        threads = [threading.Thread(target=lambda: results.append(request(address, "POST", "/generate", body)))
                   for _ in range(2)]
        threads[0].start()
        assert stub.entered.wait(10)  # the first one generates ...
        threads[1].start()
        deadline = time.monotonic() + 10
        while server.app.gate.inside < 2 and time.monotonic() < deadline:  # ... the second one waits behind it
            time.sleep(0.01)
        assert request(address, "POST", "/generate", body) == (503, {"error": "busy, try again: other requests "
                                                                              "are generating"})
        stub.release.set()
        for thread in threads:
            thread.join(10)
        assert [r[0] for r in results] == [200, 200] and server.app.gate.inside == 0


def test_connections_beyond_the_limit_are_answered_503_and_closed():
    """Each connection is a thread holding what it has read until its client finishes or goes quiet for 30 s: clients
    that opened many and sent slowly took threads and memory without bound."""
    stub = Stub()
    stub.release.set()

    def settles_at(server, count):
        deadline = time.monotonic() + 10
        while server.connections != count and time.monotonic() < deadline:
            time.sleep(0.01)
        return server.connections == count

    with served(stub) as (host, port, server):
        server.max_connections = 2
        idle = [socket.create_connection((host, port), timeout=10) for _ in range(2)]  # connected, sending nothing
        assert settles_at(server, 2)
        with socket.create_connection((host, port), timeout=10) as extra:
            reply = b"".join(iter(lambda: extra.recv(4096), b""))  # the server closes it at once
        assert reply.startswith(b"HTTP/1.0 503 ") and reply.endswith(b'"busy, try again: too many open connections"}')
        assert server.connections == 2
        for sock in idle:
            sock.close()
        assert settles_at(server, 0)  # a closed connection gives its place back
        assert request((host, port), "POST", "/generate", {"prompt": "hi", "weights": [0.5, 0.5]})[0] == 200
        assert settles_at(server, 0)


def test_malformed_requests_get_400_not_500():
    """Bodies and headers that Python's parsers refuse with errors other than JSONDecodeError are the client's fault."""
    stub = Stub()
    stub.alpha_range = (0.1, 1.0)
    stub.release.set()
    bodies = {
        "arrays nested too deep": (b"[" * 30000, "request body is not JSON that this server reads"),
        "an integer of 5000 digits": (b'{"prompt": "hi", "weights": [0.5, 0.5], "alpha": ' + b"9" * 5000 + b"}",
                                      "request body is not JSON that this server reads"),
        "an alpha beyond float range": (b'{"prompt": "hi", "weights": [0.5, 0.5], "alpha": 1' + b"0" * 400 + b"}",
                                        "'alpha' must be a number in [0.1, 1.0]"),
    }
    with served(stub, max_prompt_chars=4000) as address:
        for case, (body, message) in bodies.items():
            status, out = request(address, "POST", "/generate", body)
            assert status == 400 and message in out["error"], (case, status, out)
        conn = http.client.HTTPConnection(*address[:2], timeout=10)
        conn.putrequest("POST", "/generate")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", "\xb2")  # a digit to str.isdigit, not to int()
        conn.endheaders(b"{}")
        reply = conn.getresponse()
        assert reply.status == 400 and "Content-Length must be" in json.loads(reply.read())["error"]
        conn.close()


def test_an_alpha_a_rounding_error_past_the_range_is_taken_as_its_end():
    """The page's KL slider at its top sends low * (high / low) ** 1, which for [0.01, 0.7] is 0.7000000000000001:
    it was refused with 400, so the top of the slider never generated."""
    stub = Stub()
    stub.alpha_range = (0.01, 0.7)
    stub.release.set()
    seen = []
    stub.generate = lambda prompt, weights, alpha=None: seen.append(alpha) or {"response": "ok", "rewards": {}}
    top, bottom = 0.01 * (0.7 / 0.01) ** 1.0, math.nextafter(0.01, 0)
    assert top > 0.7  # what the page computes
    with served(stub) as address:
        for alpha, expected in ((top, 0.7), (bottom, 0.01), (0.7, 0.7), (0.3, 0.3)):
            status, out = request(address, "POST", "/generate", {"prompt": "hi", "weights": [0.5, 0.5], "alpha": alpha})
            assert status == 200 and out["alpha"] == expected, (alpha, status, out)
        assert seen == [0.7, 0.01, 0.7, 0.3]  # the backend gets a KL strength inside the range
        for alpha in (0.7001, 0.0099):
            status, out = request(address, "POST", "/generate", {"prompt": "hi", "weights": [0.5, 0.5], "alpha": alpha})
            assert status == 400 and "'alpha' must be a number in [0.01, 0.7]" in out["error"], (alpha, out)


def test_a_loopback_server_refuses_requests_that_name_another_host():
    """DNS rebinding: a web page whose name its owner re-points at 127.0.0.1 is the same origin to the browser, so it
    could read /api/front and generate with the local model; its requests name that host, and are refused."""
    stub = Stub()
    stub.release.set()
    body = {"prompt": "hi", "weights": [0.5, 0.5]}
    with served(stub) as address:
        port = address[1]
        for host in (f"evil.example:{port}", f"127.0.0.1.nip.io:{port}", "[bad"):
            for method, path, data in (("GET", "/api/info", None), ("GET", "/", None), ("POST", "/generate", body)):
                status, out = request(address, method, path, data, {"Host": host})
                assert status == 403 and f"Host {host!r} is not this machine" in out["error"], (host, path, out)
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}", "127.0.0.2"):
            assert request(address, "POST", "/generate", body, {"Host": host})[0] == 200, host
            assert request(address, "GET", "/api/info", None, {"Host": host})[0] == 200, host
    server = make_server(stub, "0.0.0.0", 0)  # reachable from other machines by any of their names: no check
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert request(("127.0.0.1", server.server_address[1]), "GET", "/api/info", None,
                       {"Host": "this-machine.example"})[0] == 200
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_an_internal_error_is_500_without_details(caplog):
    with served(Stub(fail=True)) as address:
        status, out = request(address, "POST", "/generate", {"prompt": "hi", "weights": [1, 0]})
        assert request(address, "GET", "/api/front") == (404, {"error": "no grid evaluation to show"})
        assert request(address, "GET", "/api/info")[1]["has_front"] is False  # the page does not ask for it
    assert status == 500 and out == {"error": "internal error while generating (details are in the server's log)"}
    assert "secret internal detail" in caplog.text  # logged with its traceback for whoever runs the server


def strict_loads(text):
    """``json.loads`` as a browser's ``JSON.parse`` reads: ``NaN`` and ``Infinity`` are not JSON."""
    def refuse(token):
        raise ValueError(f"{token} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_replies_are_strict_json_when_a_reward_or_the_report_is_not_finite():
    """Python writes a NaN reward as ``NaN``, which the page's ``JSON.parse`` refuses (it then showed "could not reach
    the server"); a non-finite number is sent as null."""
    stub = Stub()
    stub.release.set()
    stub.generate = lambda prompt, weights, alpha=None: {"response": "ok", "rewards": {"a": float("nan"),
                                                                                       "b": float("inf")}}
    front = {"objectives": ["a", "b"], "grid": [[1.0, 0.0], [0.0, 1.0]], "rewards": [[0.1, 0.2], [0.3, 0.4]],
             "hypervolume": float("nan"), "reference_rewards": [float("-inf"), 0.0]}
    stub.front = lambda: front
    with served(stub) as address:
        conn = http.client.HTTPConnection(*address[:2], timeout=10)
        conn.request("POST", "/generate", body=json.dumps({"prompt": "hi", "weights": [0.5, 0.5]}),
                     headers={"Content-Type": "application/json"})
        reply = conn.getresponse()
        assert reply.status == 200 and strict_loads(reply.read())["rewards"] == {"a": None, "b": None}
        conn.close()
        conn = http.client.HTTPConnection(*address[:2], timeout=10)
        conn.request("GET", "/api/front")
        out = strict_loads(conn.getresponse().read())
        assert out["hypervolume"] is None and out["reference_rewards"] == [None, 0.0]
        conn.close()


# ------------------------------------------------------------------------------------------------ the command line

def test_clp_serve_prints_its_url_serves_and_stops_on_ctrl_c(run):
    """The command as a user runs it: a free port, a warning for a non-loopback address, Ctrl-C exits cleanly."""
    config, ckpt = run
    # SIGINT as a terminal sends it (a child of a non-interactive shell may start with it ignored)
    server = subprocess.Popen(
        [sys.executable, "-m", "clp_lightning", "serve", "--config", str(config), "--ckpt_path", str(ckpt),
         "--port", "0", "--host", "0.0.0.0", "--max_new_tokens", str(MAX_NEW_TOKENS)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        warning, serving = server.stdout.readline(), server.stdout.readline()
        assert warning.startswith("warning: listening on 0.0.0.0, reachable from other machines"), warning
        url = re.fullmatch(r"serving brevity, length at http://0\.0\.0\.0:(\d+)/ \(Ctrl-C stops\)\n", serving)
        assert url and url[1] != "0", serving
        status, out = request(("127.0.0.1", int(url[1])), "POST", "/generate", {"prompt": PROMPT, "weights": [1, 0]})
        assert status == 200 and set(out["rewards"]) == {"brevity", "length"}
        server.send_signal(signal.SIGINT)
        rest, err = server.communicate(timeout=30)
    finally:
        server.kill()
    assert server.returncode == 0 and rest == "stopped\n" and "Traceback" not in err, err[-2000:]


def test_clp_serve_refuses_bad_arguments_before_loading(run, tmp_path, capsys, monkeypatch):
    config, ckpt = run
    monkeypatch.setattr(serve_app, "from_checkpoint", lambda *a: pytest.fail("loaded a model"))
    for argv, message in [
        ((), "give either an exported directory or --ckpt_path"),
        (("--ckpt_path", str(ckpt)), "--ckpt_path needs the run's --config"),
        (("--config", str(config), "--ckpt_path", str(ckpt), "--port", "70000"), "--port must be in [0, 65535]"),
        (("--config", str(config), "--ckpt_path", str(ckpt), "--max_new_tokens", "5000"),
         "--max_new_tokens must be in [1, 1024], got 5000"),
        ((str(ckpt.parent), "--set=--model.init_args.kl_coef=1"), "an exported directory takes none"),
    ]:
        code, err = clp(capsys, "serve", *argv)
        assert code == 2 and message in err, (argv, err)


def test_a_checkpoint_is_read_before_the_module_is_built(tmp_path, capsys, monkeypatch):
    from clp_lightning import steer

    monkeypatch.setattr(steer, "load_module", lambda *a: pytest.fail("built the module"))
    config = write_config(tmp_path / "config.yaml")
    (tmp_path / "bad.ckpt").write_text("not a checkpoint")
    code, err = clp(capsys, "serve", "--config", str(config), "--ckpt_path", str(tmp_path / "bad.ckpt"),
                    "--port", "0")
    assert code == 2 and "is not a checkpoint" in err
    code, err = clp(capsys, "serve", "--config", str(tmp_path / "nope.yaml"), "--ckpt_path", str(tmp_path / "x"),
                    "--port", "0")
    assert code == 2 and "config '" in err and "not found" in err


def test_a_config_of_another_conditioning_is_refused_before_the_module_is_built(run, capsys, monkeypatch):
    # the module build loads the policy and every reward model: a config that does not fit the checkpoint is found
    # from the parsed config first, as clp steer and clp export do
    from clp_lightning import steer

    monkeypatch.setattr(steer, "load_module", lambda *a: pytest.fail("built the module"))
    config, ckpt = run
    code, err = clp(capsys, "serve", "--config", str(config), "--ckpt_path", str(ckpt), "--port", "0",
                    "--set=--model.init_args.policy.conditioning.options={targets: attention}")
    assert code == 2 and "was trained with conditioning" in err, err[-2000:]


def test_a_port_in_use_is_a_clear_error_before_loading(run, capsys, monkeypatch):
    config, ckpt = run
    monkeypatch.setattr(serve_app, "from_checkpoint", lambda *a: pytest.fail("loaded a model"))
    with served(Stub()) as (host, port, _):
        code, err = clp(capsys, "serve", "--config", str(config), "--ckpt_path", str(ckpt), "--port", str(port))
    assert code == 2 and f"cannot listen on 127.0.0.1:{port} (Address already in use): choose another --port" in err


def test_a_host_that_is_not_this_machines_is_named_as_the_problem(run, capsys, monkeypatch):
    """The error used to advise another --port for an unknown host name or another machine's address."""
    config, ckpt = run
    monkeypatch.setattr(serve_app, "from_checkpoint", lambda *a: pytest.fail("loaded a model"))
    host = "192.0.2.1"  # TEST-NET-1 (RFC 5737): no machine's address (a name lookup would need a resolver)
    code, err = clp(capsys, "serve", "--config", str(config), "--ckpt_path", str(ckpt), "--host", host, "--port", "0")
    assert code == 2 and f"cannot listen on {host}:0 (" in err, err
    assert "--host must be an address or name of this machine" in err and "--port" not in err, err


def test_only_loopback_hosts_are_private():
    assert all(map(serve_app.is_loopback, ["127.0.0.1", "localhost", "::1", "127.0.0.2"]))
    assert not any(map(serve_app.is_loopback, ["0.0.0.0", "192.168.1.4", "example.org", "::"]))


# ----------------------------------------------------------------------------------------------- a real browser

def chromium(tmp_path):
    """Headless Chromium from the system's packages, driven by Selenium; skips, saying why, where one is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[browser-test]')")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).is_file():
            pytest.skip(f"{path} is missing (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with the driver's path, Selenium Manager never runs (it would download)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, to check for errors
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1280,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def open_page(driver, address):
    """Load the page served at ``address`` and wait until it has built itself; returns a 20-second waiter."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"http://127.0.0.1:{address[1]}/")
    wait = WebDriverWait(driver, 20)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    return wait


def test_the_page_steers_in_a_real_browser(backend, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = chromium(tmp_path)
    try:
        with served(backend) as address:
            wait = open_page(driver, address)
            shown = lambda: [float(d.text) for d in driver.find_elements(By.CSS_SELECTOR, "#sliders output")]  # noqa
            assert shown() == [0.5, 0.5]
            assert not driver.find_element(By.ID, "alpha-box").is_displayed()  # not conditioned on the KL strength
            assert driver.find_elements(By.CSS_SELECTOR, "#front-plot circle.ring[visibility=visible]")
            # a key press moves a slider as a user does; the other one takes up the rest
            sliders = driver.find_elements(By.CSS_SELECTOR, "#sliders input[type=range]")
            sliders[0].send_keys(Keys.HOME)
            assert shown() == [0.0, 1.0]
            # then a value set as a drag sets it, with its input event
            driver.execute_script("arguments[0].value = 300; arguments[0].dispatchEvent(new Event('input'))",
                                  sliders[0])
            assert shown() == [0.3, 0.7] and [int(s.get_attribute("value")) for s in sliders] == [300, 700]
            current = driver.find_element(By.CSS_SELECTOR, "#front-table tr.current td").get_attribute("textContent")
            assert current == "(0.25, 0.75)"  # the nearest point of the 0.25 grid
            driver.find_element(By.ID, "prompt").send_keys(PROMPT)
            button = driver.find_element(By.ID, "generate")
            button.click()
            wait.until(lambda d: d.find_element(By.ID, "response").get_attribute("data-weights"))
            wait.until(lambda d: button.is_enabled())
            weights = json.loads(driver.find_element(By.ID, "response").get_attribute("data-weights"))
            assert weights == pytest.approx([0.3, 0.7], abs=1e-12)
            rewards = {row.get_attribute("data-objective"): float(row.find_elements(By.TAG_NAME, "td")[1]
                                                                  .get_attribute("data-value"))
                       for row in driver.find_elements(By.CSS_SELECTOR, "#rewards tr[data-objective]")}
            status, out = request(address, "POST", "/generate", {"prompt": PROMPT, "weights": weights})
            assert status == 200 and driver.find_element(By.ID, "response").text == out["response"].strip()
            assert rewards == out["rewards"] and driver.find_element(By.ID, "error").text == ""
            assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]  # no script error
            # the server's message for a bad request shows in the page, and the button comes back
            driver.find_element(By.ID, "prompt").clear()
            button.click()
            wait.until(lambda d: d.find_element(By.ID, "error").text)
            assert driver.find_element(By.ID, "error").text == "'prompt' is empty: write the post or article to " \
                                                               "respond to"
            assert button.is_enabled()
    finally:
        driver.quit()




def test_the_page_steers_the_kl_strength_of_a_policy_conditioned_on_it(alpha_run, tmp_path):
    from selenium.webdriver.common.by import By

    backend = from_checkpoint([str(alpha_run[0])], str(alpha_run[1]), [], MAX_NEW_TOKENS)
    driver = chromium(tmp_path)
    try:
        with served(backend) as address:
            wait = open_page(driver, address)
            assert driver.find_element(By.ID, "alpha-box").is_displayed()
            assert float(driver.find_element(By.ID, "alpha-value").text) == 0.05  # the range's low end
            # halfway on the log scale: the geometric mean of the range
            driver.execute_script("const a = document.getElementById('alpha'); a.value = 500;"
                                  "a.dispatchEvent(new Event('input'))")
            assert float(driver.find_element(By.ID, "alpha-value").text) == pytest.approx(0.158, abs=1e-3)
            driver.find_element(By.ID, "prompt").send_keys(PROMPT)
            driver.find_element(By.ID, "generate").click()
            wait.until(lambda d: d.find_element(By.ID, "response").get_attribute("data-alpha"))
            alpha = float(driver.find_element(By.ID, "response").get_attribute("data-alpha"))
            assert alpha == pytest.approx(0.05 * 10 ** 0.5)
            body = {"prompt": PROMPT, "weights": [0.5, 0.5], "alpha": alpha}
            status, out = request(address, "POST", "/generate", body)
            assert status == 200 and driver.find_element(By.ID, "response").text == out["response"].strip()
    finally:
        driver.quit()


def test_the_page_shows_a_reward_that_is_not_a_number(tmp_path):
    from selenium.webdriver.common.by import By

    stub = Stub()
    stub.release.set()
    stub.generate = lambda prompt, weights, alpha=None: {"response": "ok", "rewards": {"a": float("nan"), "b": 0.5}}
    driver = chromium(tmp_path)
    try:
        with served(stub) as address:
            wait = open_page(driver, address)
            driver.find_element(By.ID, "prompt").send_keys("hi")
            driver.find_element(By.ID, "generate").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#rewards tr[data-objective]"))
            cells = [row.text for row in driver.find_elements(By.CSS_SELECTOR, "#rewards tr[data-objective]")]
            assert cells == ["a n/a", "b 0.500"] and driver.find_element(By.ID, "error").text == ""
            assert driver.find_element(By.ID, "response").text == "ok"
    finally:
        driver.quit()


def test_the_kl_slider_of_a_range_that_starts_at_zero_sends_the_alpha_it_shows(tmp_path):
    """alpha_range [0, high] is valid (prompt conditioning, uniform alpha); its log scale gave 0 * Infinity = NaN for
    every position but the first, so the page showed NaN and sent null, and the server answered at alpha 0."""
    from selenium.webdriver.common.by import By

    stub = Stub()
    stub.alpha_range = (0.0, 0.5)
    stub.release.set()
    driver = chromium(tmp_path)
    try:
        with served(stub) as address:
            wait = open_page(driver, address)
            assert float(driver.find_element(By.ID, "alpha-value").text) == 0.0
            assert driver.find_element(By.ID, "alpha-scale").text == "linear"
            driver.execute_script("const a = document.getElementById('alpha'); a.value = 500;"
                                  "a.dispatchEvent(new Event('input'))")
            assert driver.find_element(By.ID, "alpha-value").text == "0.250"
            driver.find_element(By.ID, "prompt").send_keys("hi")
            driver.find_element(By.ID, "generate").click()
            wait.until(lambda d: d.find_element(By.ID, "response").get_attribute("data-alpha"))
            assert float(driver.find_element(By.ID, "response").get_attribute("data-alpha")) == 0.25
    finally:
        driver.quit()


def test_a_policy_whose_longest_prompt_and_response_overflow_its_positions_is_not_served():
    # every long request would have ended in a 500 (an IndexError inside GPT-2's position table)
    from clp_lightning.conditioning.config import ConditioningConfig
    from clp_lightning.conditioning.policy import ConditionalPolicy

    policy = ConditionalPolicy.from_pretrained("tiny:gpt2", 2, ConditioningConfig(), max_prompt_length=500)
    with pytest.raises(ValueError, match=r"500 prompt tokens and up to 13 new tokens need 513 positions, .* lower "
                                         r"--max_new_tokens \(or the policy's max_prompt_length\)"):
        serve_backends.PolicyBackend(policy, ["a", "b"], [], max_new_tokens=13)
    assert serve_backends.PolicyBackend(policy, ["a", "b"], [], max_new_tokens=12).policy is policy
