"""``ptmserve serve --workers 2 --placement auto``: a real server process with two engine worker processes.

The repository holds ``enc-a`` (a tiny BERT embedding model: the one every worker warms up), ``enc-b``
(a tiny BERT with 512 positions, so a request of ``heavy_ids(256)`` keeps a worker busy) and ``gen`` (a
tiny LLaMA-style decoder with a chat template). One server serves the module; the tests run in file
order, the last two end it (SIGKILL of a worker, then SIGTERM of the server).

Which worker served what is read from ``/metrics``: every engine family carries a ``worker`` label, and
``ptmserve_worker_pid`` / ``ptmserve_worker_up`` / ``ptmserve_worker_restarts_total`` describe the workers.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import ROOT, ServeProcess, clean_env, heavy_ids, serve_process, wait_for

A, B, GEN = "enc-a", "enc-b", "gen"
MESSAGES = [{"role": "system", "content": "be short"}, {"role": "user", "content": "a new day"}]
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ptmserve.store.importer import import_checkpoint
    from ptmserve.store.repository import Repository
    from tests.models.tiny import make_tiny_checkpoint
    from tests.models.tiny_decoder import make_tiny_decoder

    root = tmp_path_factory.mktemp("workers")
    repository = Repository(root / "repo")
    src = root / "src"
    a = make_tiny_checkpoint(src, "bert", st_pooling="mean", normalize=True, seed=1, name="a")
    b = make_tiny_checkpoint(src, "bert", max_tokens=512, seed=3, name="b")
    import_checkpoint(repository, a, A)
    import_checkpoint(repository, b, B)
    folder, _ = make_tiny_decoder(src / "gen", "llama-gqa-untied", context=512)
    import_checkpoint(repository, folder, name=GEN)
    return root / "repo"


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    log = tmp_path_factory.mktemp("workers-log") / "serve.log"
    flags = ("--workers", "2", "--placement", "auto", "--dtype", "float32", "--kv-cache-memory", "4MiB")
    with serve_process(repo, log, *flags) as proc:
        yield proc


# ------------------------------------------------------------------------------------------ helpers


def samples(url: str, name: str, **labels: str) -> dict[str, float]:
    """worker -> the sum of the samples of ``name`` on /metrics whose labels include ``labels``."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == name and labels.items() <= s.labels.items():
                out[s.labels["worker"]] = out.get(s.labels["worker"], 0.0) + s.value
    return out


def served(url: str, model: str) -> dict[str, float]:
    """worker -> requests of ``model`` it answered successfully (since it started)."""
    counts = samples(url, "ptmserve_requests_total", model=model, outcome="success")
    return {w: counts.get(w, 0.0) for w in ("0", "1")}


def pids(url: str) -> dict[str, int]:
    return {w: int(v) for w, v in samples(url, "ptmserve_worker_pid").items()}


def embed(url: str, model: str, ids: list[list[int]] | None = None, timeout: float = 30) -> httpx.Response:
    body = {"model": model, "input": ids if ids is not None else [[5, 6, 7, 8]]}
    return httpx.post(f"{url}/v1/embeddings", json=body, timeout=timeout)


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {w: after[w] - before.get(w, 0.0) for w in after}


# -------------------------------------------------------------------------------------------- tests


def test_both_workers_serve_and_a_model_stays_with_the_worker_that_holds_it(server: ServeProcess) -> None:
    url = server.url
    assert samples(url, "ptmserve_worker_up") == {"0": 1.0, "1": 1.0}
    before_a, before_b = served(url, A), served(url, B)
    for _ in range(6):
        assert embed(url, B).status_code == 200
    b_counts = delta(served(url, B), before_b)
    holder = max(b_counts, key=lambda w: b_counts[w])
    other = "1" if holder == "0" else "0"
    assert b_counts == {holder: 6.0, other: 0.0}, "enc-b's requests went to more than one worker"
    # enc-a is on both devices (both workers warmed it up): it goes to the one with more room
    for _ in range(6):
        assert embed(url, A).status_code == 200
    assert delta(served(url, A), before_a) == {holder: 0.0, other: 6.0}


def test_the_workers_map_one_shared_copy_of_the_weights(server: ServeProcess) -> None:
    folder = re.search(r"host tier shared in (\S+)", server.output())
    assert folder is not None, "the server did not log its shared-memory folder"
    shared = Path(folder.group(1))
    for model in (A, B):  # both encoders into both workers' host tiers (one of them by affinity)
        assert embed(server.url, model).status_code == 200
    files = [p for p in shared.rglob("*") if p.is_file()]
    stored = sum(p.stat().st_blocks * 512 for p in files)  # in memory: whole pages on the tmpfs
    assert files and stored > 0, f"nothing in {shared}: the host tier is not in shared memory"
    workers = list(pids(server.url).values())
    mapped = {pid: shared_pss(pid, shared) for pid in [server.proc.pid, *workers]}
    assert all(mapped[pid] > 0 for pid in workers), f"a worker maps nothing in {shared}: {mapped}"
    total = sum(mapped.values())
    assert total <= 1.3 * stored, f"PSS {total} B of the shared files against {stored} B stored: not one copy"


def shared_pss(pid: int, folder: Path) -> int:
    """Bytes of ``pid``'s proportional set size (PSS) in mappings of files under ``folder``."""
    total, inside = 0, False
    prefix = str(folder) + "/"
    with open(f"/proc/{pid}/smaps", encoding="utf-8", errors="replace") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if "-" in head[0] and not head[0].endswith(":"):  # a mapping's header line
                inside = len(head) == 6 and head[5].strip().startswith(prefix)
            elif inside and head[0] == "Pss:":
                total += int(head[1]) * 1024
    return total


def test_a_chat_streams_through_a_worker(server: ServeProcess) -> None:
    oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    with oai:
        whole = oai.chat.completions.create(model=GEN, messages=MESSAGES, max_tokens=12, **GREEDY)
        chunks = list(
            oai.chat.completions.create(model=GEN, messages=MESSAGES, max_tokens=12, stream=True, **GREEDY)
        )
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert text == whole.choices[0].message.content and whole.usage.completion_tokens == 12
        completion = oai.completions.create(model=GEN, prompt="the man said hello", max_tokens=5, **GREEDY)
        assert completion.usage.completion_tokens == 5 and completion.choices[0].text


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("embeddings", {"model": "no-such-model", "input": "a"}, 404, "not in the repository"),
        ("embeddings", {"model": A, "input": [""]}, 400, "empty string"),
        ("embeddings", {"model": A, "input": [[5, 99999]]}, 400, "ids must be integers in"),
        ("embeddings", {"model": GEN, "input": "a"}, 400, "text generation model"),
        # refused by the worker's engine, which alone knows the context: rebuilt as the same 400
        ("completions", {"model": GEN, "prompt": "a", "max_tokens": 100000}, 400, "has a context of 512"),
    ],
)
def test_errors_are_answered_as_one_process_answers_them(
    server: ServeProcess, path: str, body: dict[str, Any], status: int, words: str
) -> None:
    r = httpx.post(f"{server.url}/v1/{path}", json=body, timeout=30)
    assert r.status_code == status and words in r.json()["error"]["message"], r.text


def test_sigkill_of_a_worker_fails_its_requests_with_503_and_the_other_keeps_answering(
    server: ServeProcess,
) -> None:
    url = server.url
    before = served(url, B)
    assert embed(url, B).status_code == 200
    victim = next(w for w, n in delta(served(url, B), before).items() if n == 1)
    survivor = "1" if victim == "0" else "0"
    victim_pid = pids(url)[victim]

    answers: list[httpx.Response] = []
    heavy = [
        threading.Thread(target=lambda: answers.append(embed(url, B, heavy_ids(256), 60))) for _ in range(3)
    ]
    for t in heavy:
        t.start()
    in_flight = lambda: samples(url, "ptmserve_worker_in_flight").get(victim, 0) == 3  # noqa: E731
    assert wait_for(in_flight, 20), "the heavy requests never reached the worker"
    served_before = served(url, A)[survivor]
    os.kill(victim_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    for t in heavy:
        t.join(30)
    assert len(answers) == 3 and all(r.status_code == 503 for r in answers), [r.text for r in answers]
    assert time.monotonic() - killed_at < 10, "the requests on the killed worker hung"
    message = answers[0].json()["error"]["message"]
    assert f"worker {victim} (pid {victim_pid}) was killed by SIGKILL" in message

    for _ in range(5):  # the other worker carries on, at once
        assert embed(url, A).status_code == 200
    assert served(url, A)[survivor] >= served_before + 5
    assert httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200

    def restarted() -> bool:
        current = pids(url)
        return (
            current.get(victim, victim_pid) != victim_pid and samples(url, "ptmserve_worker_up")[victim] == 1
        )

    assert wait_for(restarted, 60), f"worker {victim} was not restarted:\n{server.output()[-3000:]}"
    assert samples(url, "ptmserve_worker_restarts_total") == {victim: 1.0, survivor: 0.0}
    assert embed(url, B).status_code == 200  # a cold model goes to the fresh worker: it has the most room
    assert served(url, B)[victim] == 1.0  # counted by the new process


def test_sigterm_stops_the_workers_and_removes_the_shared_folder(server: ServeProcess) -> None:
    workers = list(pids(server.url).values())
    folder = re.search(r"host tier shared in (\S+)", server.output())
    assert folder is not None
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(timeout=60)
    assert not Path(folder.group(1)).exists()
    assert wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), 10)


def test_explicit_loads_reach_every_worker_and_a_restarted_one(repo: Path, tmp_path: Path) -> None:
    """Under explicit model control a load goes to every worker; a worker started after a SIGKILL loads
    the loaded models again before it takes requests."""
    flags = ("--workers", "2", "--model-control", "explicit", "--dtype", "float32")
    with serve_process(repo, tmp_path / "serve.log", *flags) as server:
        url = server.url

        def loaded(worker: str) -> bool:  # onto the device, by that worker's current process
            return samples(url, "ptmserve_model_loads_total", model=A).get(worker, 0) > 0

        def evicted(worker: str) -> bool:
            return samples(url, "ptmserve_model_evictions_total", model=A, tier="device").get(worker, 0) > 0

        r = embed(url, A)
        assert r.status_code == 503 and "not loaded" in r.json()["error"]["message"]
        assert httpx.post(f"{url}/v2/repository/models/{A}/load", timeout=60).status_code == 200
        assert embed(url, A).status_code == 200
        assert loaded("0") and loaded("1")

        killed = pids(url)["1"]
        os.kill(killed, signal.SIGKILL)
        assert wait_for(lambda: pids(url).get("1", killed) != killed, 60), server.output()[-3000:]
        assert wait_for(lambda: loaded("1"), 30), "the restarted worker did not load the loaded model"

        assert httpx.post(f"{url}/v2/repository/models/{A}/unload", timeout=60).status_code == 200
        r = embed(url, A)
        assert r.status_code == 503 and "not loaded" in r.json()["error"]["message"]
        assert evicted("0") and evicted("1")


def test_a_worker_that_cannot_start_stops_the_server_with_its_error(repo: Path) -> None:
    command = [sys.executable, "-m", "ptmserve.cli.main", "serve", "--repo", str(repo), "--workers", "2"]
    proc = subprocess.Popen(
        [*command, "--device", "no-such-device", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "error: unknown device 'no-such-device'" in err, err[-2000:]
    assert not list(Path("/dev/shm").glob(f"ptmserve-{proc.pid}-*")), "the shared folder was left behind"


def test_workers_must_be_at_least_one() -> None:
    from ptmserve.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", "--workers", "0"])
    assert exc.value.code == 2
