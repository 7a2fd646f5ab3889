"""A few MB of real English-and-Python text that ships with CPython, so a run needs no download.

Three parts, in a fixed order so every run (and every host) sees the same documents:
1. every topic of the Python reference manual (`pydoc_data.topics`);
2. docstrings of `DOCSTRING_MODULES` and of their public classes, functions and methods;
3. the source files of `SOURCE_MODULES`, read from disk, never imported.
The two module lists are disjoint and exact duplicates are dropped, so no text sits in two documents
(which would leak training text into the validation split).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sysconfig
import warnings

# Imported for their docstrings. Only pure-stdlib modules that import without side effects
# (no tkinter, turtle, antigravity, this, idlelib, __main__ modules).
DOCSTRING_MODULES: tuple[str, ...] = tuple(sorted("""
    abc array asyncio asyncio.events asyncio.futures asyncio.locks asyncio.queues asyncio.streams
    asyncio.tasks base64 binascii bisect builtins bz2 cmath codecs collections collections.abc
    colorsys concurrent.futures contextvars copy copyreg csv email email.charset email.errors
    email.generator email.header email.headerregistry email.message email.mime.text email.parser
    email.policy email.utils errno filecmp fnmatch functools gc getopt gettext glob graphlib hashlib
    heapq hmac html html.parser http http.client http.cookiejar http.cookies http.server
    importlib importlib.abc importlib.machinery importlib.metadata importlib.resources importlib.util
    io itertools json json.decoder json.encoder keyword linecache logging logging.config
    logging.handlers lzma marshal math mimetypes multiprocessing multiprocessing.connection
    multiprocessing.managers multiprocessing.pool multiprocessing.queues multiprocessing.shared_memory
    multiprocessing.synchronize netrc numbers operator os os.path poplib posixpath queue quopri re
    reprlib sched secrets select selectors shelve shlex signal socket sqlite3 ssl stat string
    string.templatelib struct symtable sys sysconfig tabnanny time timeit token tomllib types
    unicodedata unittest unittest.case unittest.loader unittest.mock unittest.result unittest.runner
    unittest.suite urllib.error urllib.parse urllib.request urllib.response urllib.robotparser
    warnings wave weakref xml.dom xml.dom.minidom xml.dom.pulldom xml.etree.ElementTree
    xml.parsers.expat xml.sax xml.sax.handler xml.sax.saxutils zipimport zlib zoneinfo
""".split()))

# Read from disk as whole documents: well-commented pure-Python modules, one file each.
SOURCE_MODULES: tuple[str, ...] = tuple(sorted("""
    argparse ast bdb calendar configparser contextlib dataclasses datetime difflib dis doctest enum
    fractions ftplib gzip imaplib inspect ipaddress locale mailbox optparse pathlib pdb pickle
    pickletools platform pprint random shutil smtplib socketserver statistics subprocess tarfile
    tempfile textwrap threading tokenize trace traceback typing uuid zipfile
""".split()))

MIN_DOCSTRING_CHARS = 200  # shorter docstrings are mostly "Return x." one-liners: noise, not text


def embedded_documents() -> list[str]:
    """All documents of the embedded corpus, in a fixed order (a fresh list each call)."""
    return list(_documents())


@functools.cache
def _documents() -> tuple[str, ...]:
    from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top

    docs = [topics[name].strip() for name in sorted(topics)]
    for name in DOCSTRING_MODULES:
        docs.extend(_module_docstrings(name))
    docs.extend(_module_sources())
    seen: set[str] = set()
    unique = []
    for doc in docs:
        if doc and doc not in seen:
            seen.add(doc)
            unique.append(doc)
    return tuple(unique)


def _module_docstrings(name: str) -> list[str]:
    """Docstrings of a module, its public classes and functions, and their public methods."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module(name)
    except ImportError:  # optional C extensions (e.g. _ssl, _sqlite3) may be missing on a build
        return []
    objects: list[object] = [module]
    for attr in sorted(n for n in dir(module) if not n.startswith("_")):
        obj = getattr(module, attr, None)
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if name != "builtins" and getattr(obj, "__module__", None) != module.__name__:
            continue  # re-exported: its docstring belongs to (and is taken from) its own module
        objects.append(obj)
        if inspect.isclass(obj):
            for member_name, member in sorted(vars(obj).items()):
                if member_name.startswith("_"):
                    continue
                member = getattr(member, "__func__", member)  # classmethod / staticmethod
                if inspect.isroutine(member) or isinstance(member, property):
                    objects.append(member)
    out = []
    for obj in objects:
        doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
        if doc:
            doc = inspect.cleandoc(doc)
            if len(doc) >= MIN_DOCSTRING_CHARS:
                out.append(doc)
    return out


def _module_sources() -> list[str]:
    """Source text of SOURCE_MODULES, read from the stdlib folder (absent files are skipped)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    out = []
    for name in SOURCE_MODULES:
        path = os.path.join(stdlib, *name.split(".")) + ".py"
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                out.append(f.read())
    return out
