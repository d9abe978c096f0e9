"""Build the tiny-MoE text corpus from Debian's ``python3.11-doc`` package, reproducibly.

Pipeline: .deb -> its ``data.tar.*`` -> the reST sources of the Python documentation
(``usr/share/doc/python3.11/html/_sources/**/*.rst.txt``) -> light markup clean-up -> split BY DOCUMENT
into train / valid / calibration / eval -> text files whose documents are separated by a line holding
only ``<|endoftext|>`` (the tokenizer's end-of-text token).

Licence: the Python documentation is under the PSF License Agreement (code examples also under the
Zero-Clause BSD licence); see ``gsq_torch/data/text/LICENSE-python-doc.txt``, copied from the package.

Usage::

    apt-get download python3.11-doc            # 3.11.2-6+deb12u9 was used for the shipped model
    python3 scripts/prepare_corpus.py --deb python3.11-doc_3.11.2-6+deb12u9_all.deb

writes ``carry/corpus/{train,valid,calibration,eval}.txt`` + ``manifest.json`` (the full corpus, not
committed), the byte-level BPE tokenizer trained on the train split (``carry/corpus/tokenizer/``) and the shipped ``gsq_torch/data/text/{eval,calibration}.txt``, ``SOURCES.json`` and licence.
The output depends only on the .deb's content (no randomness, no timestamps).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EOT = "<|endoftext|>"
PAD = "<|pad|>"
VOCAB_SIZE = 8192
MAX_LENGTH = 2048  # the model's max_position_embeddings
SOURCES_PREFIX = "usr/share/doc/python3.11/html/_sources/"
COPYRIGHT_PATH = "usr/share/doc/python3.11-doc/copyright"
LICENSE_SOURCE = SOURCES_PREFIX + "license.rst.txt"
# The package the shipped model was built from (Debian 12 security update of 2026-01).
REFERENCE_DEB = {
    "package": "python3.11-doc",
    "version": "3.11.2-6+deb12u9",
    "sha256": "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be",
}
# Split sizes in characters of cleaned text; documents are assigned whole, in a fixed hash order.
SPLIT_TARGETS = {"eval": 200_000, "calibration": 400_000, "valid": 200_000}
# Documents bigger than this stay in train so that one long page cannot make up a whole held-out split.
MAX_HELDOUT_DOC_CHARS = 40_000


# ---------------------------------------------------------------------------------------------------------
# .deb reading (ar archive holding data.tar.{xz,gz,zst}); pure Python so it works off Debian too.


def read_deb_members(deb: Path) -> dict[str, bytes]:
    """Return the ar members (``debian-binary``, ``control.tar.*``, ``data.tar.*``) of a .deb."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise ValueError(f"{deb} is not a Debian package (no ar magic)")
    members, pos = {}, 8
    while pos + 60 <= len(raw):
        header = raw[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        members[name] = raw[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)  # members are 2-byte aligned
    return members


def data_tar(deb: Path) -> tarfile.TarFile:
    """Open the .deb's data archive as a tarfile."""
    members = read_deb_members(deb)
    name = next((n for n in members if n.startswith("data.tar")), None)
    if name is None:
        raise ValueError(f"{deb} has no data.tar member")
    blob = members[name]
    if name.endswith(".xz"):
        blob = lzma.decompress(blob)
    elif name.endswith(".zst"):  # not used by bookworm; needs dpkg-deb
        blob = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, capture_output=True).stdout
    return tarfile.open(fileobj=io.BytesIO(blob), mode="r:*")


def deb_version(deb: Path) -> str:
    """Read ``Package`` and ``Version`` from the control file."""
    members = read_deb_members(deb)
    name = next(n for n in members if n.startswith("control.tar"))
    blob = lzma.decompress(members[name]) if name.endswith(".xz") else members[name]
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tf:
        control = tf.extractfile("./control").read().decode()
    fields = dict(line.split(": ", 1) for line in control.splitlines() if ": " in line and line[0] != " ")
    return f"{fields['Package']} {fields['Version']}"


# ---------------------------------------------------------------------------------------------------------
# reST clean-up: keep the prose and code, drop Sphinx plumbing, render roles the way Sphinx shows them.

_DROP_DIRECTIVES = {
    "index", "toctree", "highlight", "sectionauthor", "moduleauthor", "currentmodule", "include",
    "literalinclude", "tabularcolumns", "testsetup", "testcleanup", "raw", "only", "csv-table",
}
_TITLED_DIRECTIVES = {
    "note": "Note:", "warning": "Warning:", "seealso": "See also:", "important": "Important:",
    "impl-detail": "CPython implementation detail:", "tip": "Tip:", "caution": "Caution:",
    "attention": "Attention:", "hint": "Hint:", "danger": "Danger:", "admonition": "",
}
_VERSION_DIRECTIVES = {
    "versionadded": "New in version {}.", "versionchanged": "Changed in version {}:",
    "deprecated": "Deprecated since version {}:", "deprecated-removed": "Deprecated since version {}:",
}
_DIRECTIVE = re.compile(r"^(\s*)\.\. ([\w:-]+)::\s*(.*)$")
_COMMENT_OR_TARGET = re.compile(r"^(\s*)\.\.(\s|$)")
_ADORNMENT = re.compile(r"^([=\-~*^#\"'+`.:_])\1{2,}\s*$")
_OPTION = re.compile(r"^\s*:[\w-]+:(\s.*)?$")  # directive options such as ``:synopsis: ...``
_ROLE = re.compile(r":(?:[\w-]+:)?[\w-]+:`([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")


def _role_text(match: re.Match) -> str:
    text = match.group(1)
    explicit = re.match(r"^(.*?)\s*<[^<>]+>$", text, flags=re.DOTALL)
    if explicit and explicit.group(1):
        return explicit.group(1)
    text = text.lstrip("!")
    if text.startswith("~"):  # Sphinx shows only the last dotted component
        text = text[1:].split(".")[-1]
    return f"`{text}`"


def clean_rest(text: str) -> str:
    """Turn one reST source into readable plain text (deterministic)."""
    out: list[str] = []
    skip_indent: int | None = None  # inside a dropped block: skip lines indented deeper than this
    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not stripped or indent > skip_indent:
                continue
            skip_indent = None
        directive = _DIRECTIVE.match(line)
        if directive:
            lead, name, arg = directive.groups()
            base = name.split(":")[-1]
            if base in _DROP_DIRECTIVES:
                skip_indent = len(lead)
                continue
            if base in _VERSION_DIRECTIVES:
                out.append(lead + _VERSION_DIRECTIVES[base].format(arg.split()[0] if arg else "").strip())
            elif base in _TITLED_DIRECTIVES:
                title = " ".join(x for x in (_TITLED_DIRECTIVES[base], arg) if x)
                if title:
                    out.append(lead + title)
            elif arg and base not in {"code-block", "sourcecode", "code", "doctest", "testcode", "testoutput"}:
                out.append(lead + arg)  # function::, class::, method:: -> keep the signature
            continue
        if _COMMENT_OR_TARGET.match(line):  # comments, ``.. _label:`` targets, substitution definitions
            skip_indent = indent
            continue
        if _ADORNMENT.match(line) or _OPTION.match(line):
            continue
        if stripped == "::":
            continue
        line = _ROLE.sub(_role_text, line)
        line = _LITERAL.sub(r"`\1`", line)
        if line.endswith("::"):  # "for example::" renders as "for example:"
            line = line[:-1]
        out.append(line.rstrip())
    cleaned = "\n".join(out)
    cleaned = re.sub(r"\n{3,}", "\n\n", cleaned).strip()
    return cleaned.replace(EOT, "")  # the separator must never occur inside a document


# ---------------------------------------------------------------------------------------------------------


def load_documents(deb: Path) -> tuple[dict[str, str], bytes, bytes]:
    """Cleaned documents keyed by path under ``_sources/``, plus the copyright and license.rst bytes."""
    docs, copyright_text, license_rst = {}, b"", b""
    with data_tar(deb) as tf:
        for member in tf.getmembers():
            name = member.name.lstrip("./")
            if name == COPYRIGHT_PATH:
                copyright_text = tf.extractfile(member).read()
            if not (member.isfile() and name.startswith(SOURCES_PREFIX) and name.endswith(".rst.txt")):
                continue
            raw = tf.extractfile(member).read()
            if name == LICENSE_SOURCE:
                license_rst = raw
            text = clean_rest(raw.decode("utf-8"))
            if len(text) >= 200:  # skip stubs (tables of contents)
                docs[name[len(SOURCES_PREFIX) :]] = text
    if not docs or not copyright_text:
        raise ValueError(f"{deb} does not look like python3.11-doc (no _sources or no copyright file)")
    return docs, copyright_text, license_rst


def split_documents(docs: dict[str, str]) -> dict[str, list[str]]:
    """Assign whole documents to splits: a fixed sha256 order over paths fills eval, calibration and
    valid up to their targets; everything else is train."""
    order = sorted(docs, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    splits: dict[str, list[str]] = {"eval": [], "calibration": [], "valid": [], "train": []}
    sizes = dict.fromkeys(splits, 0)
    for path in order:
        n = len(docs[path])
        target = next(
            (s for s in SPLIT_TARGETS if sizes[s] < SPLIT_TARGETS[s] and n <= MAX_HELDOUT_DOC_CHARS), "train"
        )
        splits[target].append(path)
        sizes[target] += n
    return splits


def join_documents(docs: dict[str, str], paths: list[str]) -> str:
    return "".join(f"{docs[p]}\n{EOT}\n" for p in paths)


def train_tokenizer(train_text: str, out_dir: Path, vocab_size: int = VOCAB_SIZE) -> None:
    """Train a byte-level BPE on the training split and save it as a transformers ``Qwen3_5Tokenizer``.

    The normalizer (NFC), pre-tokenizer (Qwen's split regex, then byte-level) and decoder are exactly
    those ``Qwen3_5Tokenizer`` builds, so the tokenization is the same whichever class transformers
    picks (next to a ``qwen3_5_moe_text`` config.json, AutoTokenizer uses that class and rebuilds the
    pipeline from vocab + merges). Documents are fed one by one; ``<|endoftext|>`` (id 0) is BOS and
    EOS, never merged, and nothing is added automatically; ``<|pad|>`` (id 1) pads.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX, Qwen3_5Tokenizer

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    documents = [d for d in train_text.split(f"\n{EOT}\n") if d]
    tok.train_from_iterator(documents, trainer=trainer, length=len(documents))
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    fast = Qwen3_5Tokenizer(
        vocab=model["vocab"], merges=merges, unk_token=None, bos_token=EOT, eos_token=EOT, pad_token=PAD,
        model_max_length=MAX_LENGTH, clean_up_tokenization_spaces=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deb", type=Path, required=True, help="path to python3.11-doc_*.deb")
    parser.add_argument("--out", type=Path, default=REPO / "carry" / "corpus", help="full corpus (not shipped)")
    parser.add_argument("--package-text", type=Path, default=REPO / "gsq_torch" / "data" / "text")
    parser.add_argument("--no-tokenizer", action="store_true", help="skip training the tokenizer")
    args = parser.parse_args(argv)

    version = deb_version(args.deb)
    deb_sha = hashlib.sha256(args.deb.read_bytes()).hexdigest()
    if deb_sha != REFERENCE_DEB["sha256"]:
        print(f"warning: {args.deb.name} ({version}) is not the reference package "
              f"{REFERENCE_DEB['version']}; the corpus may differ from the shipped model's")
    docs, copyright_text, license_rst = load_documents(args.deb)
    splits = split_documents(docs)

    args.out.mkdir(parents=True, exist_ok=True)
    args.package_text.mkdir(parents=True, exist_ok=True)
    manifest = {"source": {"package": version, "deb_sha256": deb_sha, "sources": SOURCES_PREFIX},
                "separator": EOT, "splits": {}}
    for split, paths in splits.items():
        text = join_documents(docs, paths)
        (args.out / f"{split}.txt").write_text(text, encoding="utf-8")
        if split in ("eval", "calibration"):
            (args.package_text / f"{split}.txt").write_text(text, encoding="utf-8")
        manifest["splits"][split] = {
            "documents": len(paths), "chars": len(text), "bytes": len(text.encode()),
            "sha256": hashlib.sha256(text.encode()).hexdigest(), "paths": paths,
        }
        print(f"{split:12s} {len(paths):4d} documents {len(text.encode()) / 1e6:7.3f} MB")
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    shipped = {k: v for k, v in manifest.items() if k != "splits"}
    shipped["splits"] = {s: manifest["splits"][s] for s in ("eval", "calibration")}
    shipped["splits_not_shipped"] = {
        s: {k: v for k, v in manifest["splits"][s].items() if k != "paths"} for s in ("train", "valid")
    }
    shipped["licence"] = ("PSF License Agreement (Python documentation); code examples also Zero-Clause BSD. "
                          "See LICENSE-python-doc.txt.")
    (args.package_text / "SOURCES.json").write_text(json.dumps(shipped, indent=1) + "\n")
    (args.package_text / "LICENSE-python-doc.txt").write_bytes(
        b"Text in eval.txt and calibration.txt is taken from the reST sources of the Python 3.11\n"
        b"documentation as shipped in Debian's " + version.encode() + b" package.\n"
        b"Changes made (PSF License clause 3): Sphinx markup simplified to plain text by\n"
        b"scripts/prepare_corpus.py (directives, labels and index entries removed, roles rendered),\n"
        b"and whole documents selected into the eval and calibration splits.\n\n"
        b"Copyright (c) 2001-2023 Python Software Foundation; All Rights Reserved.\n\n"
        b"=== license.rst from the documentation ===\n\n" + license_rst
        + b"\n\n=== Debian copyright file of the package ===\n\n" + copyright_text
    )
    shutil.copyfile(args.package_text / "LICENSE-python-doc.txt", args.out / "LICENSE-python-doc.txt")
    if not args.no_tokenizer:
        # The tokenizer travels with the corpus; the training script copies it into the model directory.
        train_tokenizer(join_documents(docs, splits["train"]), args.out / "tokenizer")
        print(f"tokenizer ({VOCAB_SIZE} tokens) -> {args.out / 'tokenizer'}")


if __name__ == "__main__":
    main()
