"""``ptmserve profile NAME``: measure a stored model's load groups, store the profile, print a table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ptmserve.errors import ModelNotFound, PtmError

if TYPE_CHECKING:
    from ptmserve.memory.placement import ModelProfile

DEFAULT_SHAPES = "1x16,8x64,32x128"  # engine.profiling.DEFAULT_SHAPES, spelled here to keep torch unimported


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    """``"1x16,8x64"`` -> ``((1, 16), (8, 64))``: inputs x tokens per input, each at least 1."""
    shapes = []
    for part in text.split(","):
        inputs, _, tokens = part.strip().lower().partition("x")
        if not (inputs.isdigit() and tokens.isdigit() and int(inputs) > 0 and int(tokens) > 0):
            raise argparse.ArgumentTypeError(
                f"invalid shapes {text!r}: expected INPUTSxTOKENS[,...] of positive integers, e.g. 1x16,8x64"
            )
        shapes.append((int(inputs), int(tokens)))
    return tuple(shapes)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``profile`` subcommand to the ``ptmserve`` parser's subcommands."""
    p = sub.add_parser(
        "profile",
        help="measure a model's load groups on the device and the host; store and print the profile",
        description="For each load group of NAME (embeddings, each layer, head): its bytes, its compute time "
        "on the device copy and on the host copy at a few batch shapes, and the cost of moving its "
        "activations. The profile is stored with the model in the repository; `serve --placement auto` "
        "leaves on the host the groups it says are cheaper there.",
    )
    p.add_argument("name", metavar="NAME", help="a model in the repository")
    p.add_argument("--repo", default="models", help="model repository folder (default %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device to compute on (default %(default)s)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="serve dtype, as `serve --dtype` (auto = bfloat16 where the device has bf16 matrix units)",
    )
    p.add_argument(
        "--shapes",
        type=parse_shapes,
        default=parse_shapes(DEFAULT_SHAPES),
        help=f"batch shapes, INPUTSxTOKENS separated by commas (default {DEFAULT_SHAPES})",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed runs per shape (default 5)")
    p.add_argument("--json", metavar="FILE", help="also write the profile to this JSON file")
    p.set_defaults(func=cmd_profile)


def cmd_profile(args: argparse.Namespace) -> int:
    """Measure, store and print; 1 with a message on stderr for an unknown model or another error."""
    try:
        return _profile(args)
    except ModelNotFound as exc:
        print(f"error: {exc.message} (see `ptmserve models --repo {args.repo}`)", file=sys.stderr)
    except PtmError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
    return 1


def _profile(args: argparse.Namespace) -> int:
    if not Path(args.repo).is_dir():
        raise PtmError(f"no model repository at {args.repo!r} (import a model there first, or pass --repo)")
    from ptmserve.engine.device import resolve_device, resolve_dtype
    from ptmserve.engine.profiling import profile_model
    from ptmserve.store.repository import Repository

    repo = Repository(args.repo, create=False)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    profile = profile_model(
        repo, args.name, device=device, dtype=dtype, shapes=args.shapes, repeats=args.repeats
    )
    repo.save_profile(args.name, profile.to_dict())
    print(format_profile(profile))
    if args.json:
        Path(args.json).write_text(json.dumps({**profile.to_dict(), "auto": _auto(profile)}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _auto(profile: ModelProfile) -> dict[str, object]:
    """What ``--placement auto`` does with ``profile``: the host groups, device bytes saved, time added."""
    from ptmserve.memory.placement import AUTO, host_groups

    chosen = host_groups(AUTO, [g.name for g in profile.groups], profile)
    groups = [g for g in profile.groups if g.name in chosen]
    saved = sum(g.saved_bytes for g in groups)
    total = sum(g.bytes for g in profile.groups)
    shapes = range(len(profile.shapes))
    added = [sum(g.extra_seconds(s) for g in groups) / max(profile.device_seconds(s), 1e-12) for s in shapes]
    return {
        "host_groups": [g.name for g in groups],
        "saved_bytes": saved,
        "saved_share": saved / total if total else 0.0,
        "added_time_share": max(added, default=0.0),
    }


def _ms(seconds: float) -> str:
    """Milliseconds with about four significant digits."""
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"


def format_profile(profile: ModelProfile) -> str:
    """The profile as a table: a row per group, milliseconds per shape, and what ``auto`` places."""
    from ptmserve.memory.sizes import format_size

    shapes = [f"{b}x{t}" for b, t in profile.shapes]
    width = max(8, *(len(s) + 2 for s in shapes))
    auto = _auto(profile)
    name_w = max(10, *(len(g.name) + 2 for g in profile.groups))

    def cells(values: tuple[float, ...]) -> str:
        return "".join(f"{_ms(v):>{width}}" for v in values)

    blocks = ("device ms", "host ms", "transfer ms")
    block_w = width * len(shapes)
    lines = [
        f"{profile.model} on {profile.device} in {profile.dtype} (weights {profile.weights_id}); "
        f"medians, ms per batch of INPUTSxTOKENS; * = on the host under --placement auto",
        f"{'':<{name_w}}{'':>9}{'':>9} " + " | ".join(f"{b:^{block_w}}" for b in blocks),
        f"{'group':<{name_w}}{'bytes':>9}{'shared':>9} "
        + " | ".join("".join(f"{s:>{width}}" for s in shapes) for _ in blocks),
    ]
    for g in profile.groups:
        mark = "*" if g.name in auto["host_groups"] else " "  # type: ignore[operator]
        lines.append(
            f"{mark}{g.name:<{name_w - 1}}{format_size(g.bytes):>9}{format_size(g.shared_bytes):>9} "
            + " | ".join(cells(t) for t in (g.device_seconds, g.host_seconds, g.transfer_seconds))
        )
    total = tuple(profile.device_seconds(s) for s in range(len(shapes)))
    lines.append(
        f"{'total':<{name_w}}{format_size(sum(g.bytes for g in profile.groups)):>9}{'':>9} {cells(total)}"
    )
    if auto["host_groups"]:
        lines.append(
            f"auto: {', '.join(auto['host_groups'])} on the host saves {format_size(auto['saved_bytes'])} "  # type: ignore[arg-type]
            f"of device memory ({auto['saved_share']:.1%} of the model), adding at most "
            f"{auto['added_time_share']:.1%} to a batch's time"
        )
    else:
        lines.append("auto: every group stays on the device")
    return "\n".join(lines)
