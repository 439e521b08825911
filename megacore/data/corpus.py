"""The embedded default corpus: English prose that every Python installation already has.

``default_corpus()`` returns the docstrings of a fixed list of standard-library modules as a list
of documents (plain strings). Nothing is downloaded; the text is written by people (the CPython
documentation strings), so a small language model trained on it learns real English and Python
vocabulary: about 1 MB of text, ~950 documents (Python 3.11), parsed in 1-2 s, milliseconds
when cached.

The docstrings are read from the modules' source files with ``ast`` rather than from imported
objects: nothing is executed, the result does not depend on what the running process imported or
patched (under pytest, for one, ``typing``'s namespace differs), and ``python -OO`` (which strips
docstrings from imported code) makes no difference. Modules whose source cannot be found (C
extensions, stripped installations) are skipped. Given the Python installation the corpus is
deterministic: a fixed module order, source order within a module, ``inspect.cleandoc``
normalization. ``corpus_fingerprint`` names it for cache keys; with ``cache_dir`` the parsed
corpus is cached on disk.

Document boundaries: one unit per module docstring and per top-level function or class (a class
together with the docstrings of the methods it defines); a docstring seen before is dropped
(aliases, boilerplate); consecutive units of one module are merged until a document has at least
``MIN_DOCUMENT_CHARS`` characters, so documents are paragraph-sized rather than one-liners.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Optional, Union

from megacore.data.cache import atomic_write_bytes, ensure_dir, stable_hash

# Fixed and ordered: changing it changes the corpus (and every cache key derived from it).
STDLIB_MODULES: tuple[str, ...] = tuple("""
argparse ast asyncio.base_events asyncio.events asyncio.futures asyncio.locks asyncio.queues asyncio.streams
asyncio.subprocess asyncio.tasks base64 bdb bisect bz2 calendar cmd code codecs codeop collections
colorsys compileall concurrent.futures._base concurrent.futures.process concurrent.futures.thread configparser
contextlib contextvars copy copyreg cProfile csv dataclasses datetime dbm decimal difflib dis doctest
email.charset email.contentmanager email.feedparser email.generator email.header email.headerregistry
email.message email.parser email.policy email.utils enum filecmp fileinput fnmatch fractions ftplib
functools getopt getpass gettext glob graphlib gzip hashlib heapq hmac html html.parser http http.client
http.cookiejar http.cookies http.server imaplib importlib importlib.abc importlib.metadata
importlib.resources inspect io ipaddress json json.decoder json.encoder keyword linecache locale logging
logging.config logging.handlers lzma mailbox mimetypes modulefinder multiprocessing.connection
multiprocessing.managers multiprocessing.pool multiprocessing.process multiprocessing.queues
multiprocessing.shared_memory multiprocessing.synchronize netrc numbers opcode operator optparse os
pathlib pdb pickle pickletools pkgutil platform plistlib poplib posixpath pprint profile pstats py_compile
pydoc queue quopri random re reprlib rlcompleter runpy sched secrets selectors shelve shlex shutil
signal site smtplib socket socketserver sqlite3.dbapi2 ssl stat statistics string stringprep struct
subprocess symtable sysconfig tabnanny tarfile tempfile textwrap threading timeit token tokenize trace
traceback tracemalloc turtle types typing unittest.case unittest.loader unittest.mock unittest.result
unittest.runner unittest.suite urllib.error urllib.parse urllib.request urllib.response urllib.robotparser
uuid warnings wave weakref wsgiref.handlers wsgiref.headers wsgiref.simple_server wsgiref.util
wsgiref.validate xml.dom.minidom xml.dom.pulldom xml.etree.ElementTree xml.sax xml.sax.handler
xml.sax.saxutils xml.sax.xmlreader xmlrpc.client xmlrpc.server zipapp zipfile zipimport zoneinfo
""".split())

MIN_DOCUMENT_CHARS = 400
# Below this, the standard library sources are missing (a stripped install): fail loudly.
_MIN_CORPUS_CHARS = 100_000

_CORPUS_RECIPE = "stdlib-docstrings-v1"
_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _source_path(name: str) -> Optional[Path]:
    """The .py file of module ``name`` without importing it (parents of dotted names do import)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    candidates = [spec.origin, getattr(spec.loader_state, "filename", None)]  # frozen modules keep their path here
    for c in candidates:
        if isinstance(c, str) and c.endswith(".py") and Path(c).is_file():
            return Path(c)
    return None


def _module_units(path: Path, seen: set[str]) -> list[str]:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return []

    def fresh(node) -> Optional[str]:
        doc = ast.get_docstring(node, clean=True)
        doc = doc.strip() if doc else None
        if not doc or doc in seen:
            return None
        seen.add(doc)
        return doc

    units = []
    mod_doc = fresh(tree)
    if mod_doc:
        units.append(mod_doc)
    for node in tree.body:
        if not isinstance(node, _DEFS):
            continue
        parts = [fresh(node)]
        if isinstance(node, ast.ClassDef):
            parts += [fresh(sub) for sub in node.body if isinstance(sub, _DEFS)]
        parts = [p for p in parts if p]
        if parts:
            units.append("\n\n".join(parts))
    return units


def default_corpus(modules: tuple[str, ...] = STDLIB_MODULES, cache_dir: Optional[Union[str, Path]] = None) -> list[str]:
    """Return the embedded corpus as a list of documents (deterministic for a Python install).

    Parsing the sources takes 1-2 s; the result is memoized per process and, with ``cache_dir``,
    stored as ``<cache_dir>/corpus/stdlib-<key>.json`` keyed by the Python version and the path,
    size and mtime of every source file, so later runs load it in milliseconds.
    """
    sources = tuple((name, path) for name in modules if (path := _source_path(name)) is not None)
    if cache_dir is None:
        return list(_build_corpus(sources))
    stats = [(name, str(path), path.stat().st_size, path.stat().st_mtime_ns) for name, path in sources]
    key = stable_hash(_CORPUS_RECIPE, sys.version, MIN_DOCUMENT_CHARS, stats)
    cached = Path(cache_dir) / "corpus" / f"stdlib-{key}.json"
    if cached.is_file():
        try:
            documents = json.loads(cached.read_text(encoding="utf-8"))
            if isinstance(documents, list) and all(isinstance(d, str) for d in documents):
                return documents
        except (ValueError, OSError):
            pass  # unreadable entry: rebuild and overwrite it
    documents = list(_build_corpus(sources))
    ensure_dir(cached.parent)
    atomic_write_bytes(cached, json.dumps(documents).encode("utf-8"))
    return documents


@functools.lru_cache(maxsize=4)
def _build_corpus(sources: tuple[tuple[str, Path], ...]) -> tuple[str, ...]:
    documents: list[str] = []
    seen: set[str] = set()
    for _, path in sources:
        pending: list[str] = []
        for unit in _module_units(path, seen):
            pending.append(unit)
            if sum(len(p) for p in pending) >= MIN_DOCUMENT_CHARS:
                documents.append("\n\n".join(pending))
                pending = []
        if pending:
            documents.append("\n\n".join(pending))
    total = sum(len(d) for d in documents)
    if total < _MIN_CORPUS_CHARS:
        raise RuntimeError(
            f"the embedded corpus found only {total} characters of standard-library docstrings; this Python "
            "installation seems to lack the library's .py sources. Train on your own data instead: "
            "`megacore preprocess ...` then data.source=indexed data.paths=[PREFIX]")
    return tuple(documents)


def corpus_fingerprint(documents: list[str]) -> str:
    """sha256 hex digest of the documents (length-prefixed, so boundaries count)."""
    h = hashlib.sha256()
    for doc in documents:
        raw = doc.encode("utf-8")
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return h.hexdigest()
