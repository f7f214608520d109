"""Long natural documents for the real-model fidelity bench, each from a file that ships with a package or with
Python itself, never written for the bench:

- ``news``: the Lee corpus of Australian news articles (English prose; ``gensim/test/test_data/lee_background.cor``
  inside the gensim wheel, 300 articles, about 80K tokens);
- ``wiki``: Wikipedia articles as wikitext (``enwiki-latest-pages-articles1...-shortened.bz2`` in the same wheel;
  the XML and its entities unwrapped, the markup kept);
- ``code``: Python source, the standard library's own modules (``argparse``, ``typing``, ``inspect``, ...);
- ``docs``: technical documentation, the Python language reference's topics as ``help()`` prints them
  (``pydoc_data/topics.py``).

``python real_texts.py --gensim-wheel gensim-4.3.3-...whl --out DIR`` writes one ``<name>.txt`` each and
``manifest.json`` (source and SHA-256 per document): the bench reads the folder, so a GPU machine without the
wheel runs on the same bytes. Without ``--gensim-wheel`` only ``code`` and ``docs`` are written.
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import html
import json
import re
import sysconfig
import zipfile
from pathlib import Path

GENSIM_DATA = "gensim/test/test_data/"
NEWS_MEMBER = GENSIM_DATA + "lee_background.cor"
WIKI_MEMBER = GENSIM_DATA + "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CODE_MODULES = ("argparse", "typing", "inspect", "dataclasses", "pathlib", "subprocess", "logging/__init__",
                "tarfile", "zipfile/__init__", "ast")
DOCUMENTS = ("news", "wiki", "code", "docs")
MAX_CHARACTERS = 400_000  # about 100K tokens: enough for a 32K prompt and its continuation, small to carry
MANIFEST = "manifest.json"


def news(wheel: zipfile.ZipFile) -> str:
    return wheel.read(NEWS_MEMBER).decode("utf-8")


def wiki(wheel: zipfile.ZipFile) -> str:
    """The articles' wikitext: each ``<text>`` element's content, entities decoded."""
    xml = bz2.decompress(wheel.read(WIKI_MEMBER)).decode("utf-8")
    pages = re.findall(r"<text[^>]*>(.*?)</text>", xml, flags=re.S)
    articles = (html.unescape(p).strip() for p in pages)
    return "\n\n".join(a for a in articles if a and not a.upper().startswith("#REDIRECT"))


def code() -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for name in CODE_MODULES:
        path = stdlib / f"{name}.py"
        if path.is_file():
            parts.append(f"# ---- {name}.py\n{path.read_text(encoding='utf-8')}")
    return "\n".join(parts)


def docs() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(f"{name}\n{'=' * len(name)}\n{text.strip()}" for name, text in sorted(topics.items()))


def collect(out: Path, gensim_wheel: Path | None = None) -> dict[str, dict]:
    """Write the documents to ``out`` (``<name>.txt`` and the manifest); returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    texts = {"code": (code(), "Python's standard library: " + ", ".join(f"{m}.py" for m in CODE_MODULES)),
             "docs": (docs(), "Python's pydoc_data/topics.py (language reference topics)")}
    if gensim_wheel is not None:
        with zipfile.ZipFile(gensim_wheel) as wheel:
            texts["news"] = (news(wheel), f"{gensim_wheel.name}:{NEWS_MEMBER}")
            texts["wiki"] = (wiki(wheel), f"{gensim_wheel.name}:{WIKI_MEMBER}")
    entries = {}
    for name in DOCUMENTS:
        if name not in texts:
            continue
        text, source = texts[name]
        text = text[:MAX_CHARACTERS]
        (out / f"{name}.txt").write_text(text, encoding="utf-8")
        entries[name] = {"source": source, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                         "characters": len(text)}
    (out / MANIFEST).write_text(json.dumps(entries, indent=2) + "\n")
    return entries


def manifest(folder: Path) -> dict[str, dict]:
    """The manifest :func:`collect` wrote to ``folder``: per document its source, hash and size."""
    return json.loads((folder / MANIFEST).read_text())


def load(folder: Path) -> dict[str, str]:
    """``{name: text}`` of the documents :func:`collect` wrote to ``folder``, in ``DOCUMENTS`` order; a text
    whose bytes differ from the manifest's hash raises."""
    entries = manifest(folder)
    texts = {}
    for name in DOCUMENTS:
        if name in entries:
            text = (folder / f"{name}.txt").read_text(encoding="utf-8")
            if hashlib.sha256(text.encode("utf-8")).hexdigest() != entries[name]["sha256"]:
                raise ValueError(f"{folder / name}.txt differs from {MANIFEST}'s hash")
            texts[name] = text
    return texts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gensim-wheel", type=Path, help="a gensim wheel (pip download --no-deps gensim)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    for name, entry in collect(args.out, args.gensim_wheel).items():
        print(f"{name}: {entry['characters']} characters from {entry['source']}")


if __name__ == "__main__":
    main()
