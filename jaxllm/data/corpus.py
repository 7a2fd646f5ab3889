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
import random
import re
import sysconfig
import warnings

# Imported for their docstrings. Only pure-stdlib modules that import without side effects
# (no tkinter, turtle, antigravity, this, idlelib, __main__ modules).
DOCSTRING_MODULES: tuple[str, ...] = tuple(
    sorted(
        """
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
""".split()
    )
)

# Read from disk as whole documents: well-commented pure-Python modules, one file each.
SOURCE_MODULES: tuple[str, ...] = tuple(
    sorted(
        """
    argparse ast bdb calendar configparser contextlib dataclasses datetime difflib dis doctest enum
    fractions ftplib gzip imaplib inspect ipaddress locale mailbox optparse pathlib pdb pickle
    pickletools platform pprint random shutil smtplib socketserver statistics subprocess tarfile
    tempfile textwrap threading tokenize trace traceback typing uuid zipfile
""".split()
    )
)

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
    return tuple(dict.fromkeys(doc for doc in docs if doc))  # exact duplicates dropped, first one kept


def _module_docstrings(name: str) -> list[str]:
    """Docstrings of a module, its public classes and functions, and their public methods."""
    out = []
    for _, obj in public_objects(name, with_module=True):
        doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
        if doc:
            doc = inspect.cleandoc(doc)
            if len(doc) >= MIN_DOCSTRING_CHARS:
                out.append(doc)
    return out


def public_objects(name: str, *, with_module: bool = False) -> list[tuple[str, object]]:
    """(dotted name, object) of a module's public classes and functions and their public methods and
    properties, in a fixed order; re-exports are left to their own module. [] if it cannot import."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module(name)
    except ImportError:  # optional C extensions (e.g. _ssl, _sqlite3) may be missing on a build
        return []
    prefix = "" if name == "builtins" else f"{name}."
    objects: list[tuple[str, object]] = [(name, module)] if with_module else []
    for attr in sorted(n for n in dir(module) if not n.startswith("_")):
        obj = getattr(module, attr, None)
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if name != "builtins" and getattr(obj, "__module__", None) != module.__name__:
            continue  # re-exported: its docstring belongs to (and is taken from) its own module
        objects.append((prefix + attr, obj))
        if inspect.isclass(obj):
            for member_name, member in sorted(vars(obj).items()):
                if member_name.startswith("_"):
                    continue
                member = getattr(member, "__func__", member)  # classmethod / staticmethod
                if inspect.isroutine(member) or isinstance(member, property):
                    objects.append((f"{prefix}{attr}.{member_name}", member))
    return objects


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


# --------------------------------------------------------------------------- chat fine-tuning pairs

# Modules whose public functions, classes and methods give one question each ("What does json.dumps do?").
SFT_MODULES: tuple[str, ...] = tuple(
    """
    builtins base64 binascii bisect calendar collections contextlib copy csv dataclasses datetime difflib
    fnmatch fractions functools glob gzip hashlib heapq html inspect io ipaddress itertools json keyword
    logging math operator os os.path pathlib pprint random re shlex shutil statistics string struct
    subprocess sys tempfile textwrap threading time traceback unicodedata urllib.parse uuid warnings
    zipfile zlib
""".split()
)
SFT_MAX_ANSWER_CHARS = 600  # answers are cut at a sentence end before this
_SFT_MIN_ANSWER_CHARS = 30  # shorter summaries ("Return x.") teach nothing
_HEADING = re.compile(r"^(.+)\n(?:=+|-+)\n", re.M)
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)(?:\s*->.*)?$|-->|^\w+ -> ", re.S)  # "S.join(iterable) -> str"


def embedded_sft_records() -> list[dict]:
    """Question/answer pairs about Python, as records holding every SFT format (a fresh list each call).

    Each record has `text` (Guanaco: `### Human: q### Assistant: a`), `messages` (user, assistant) and
    `prompt` / `completion` (prompt + completion == text), so any `data.format` can read it.
    """
    return [
        {
            "text": f"### Human: {q}### Assistant: {a}",
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            "prompt": f"### Human: {q}### Assistant:",
            "completion": f" {a}",
        }
        for q, a in _qa_pairs()
    ]


def embedded_preference_records() -> list[dict]:
    """The embedded_sft questions as preference pairs (a fresh list each call): `chosen` is the question's
    own answer, `rejected` the same words in a shuffled order (fixed per question), so a model learns to
    prefer the well-formed answer (a preference a 3M-parameter model can learn in a few dozen steps;
    another question's answer, a relevance preference, needs a model that understands the question).

    Each record has `prompt` / `chosen` / `rejected` text (Guanaco: `### Human: q### Assistant:`,
    ` a`), the conversational `prompt_messages` / `chosen_messages` / `rejected_messages`, and the chosen
    chat as SFT `text` / `messages` / `completion` (fine-tune on it first, then tune on the preferences).
    """
    pairs = _qa_pairs()
    out = []
    for i, (q, a) in enumerate(pairs):
        words = a.split(" ")
        b = a
        for attempt in range(8):  # a one-word answer cannot be shuffled: another question's answer then
            random.Random(f"{i}-{attempt}").shuffle(words)
            b = " ".join(words)
            if b != a:
                break
        if b == a:
            b = pairs[(i + len(pairs) // 2) % len(pairs)][1]
        out.append(
            {
                "prompt": f"### Human: {q}### Assistant:",
                "chosen": f" {a}",
                "rejected": f" {b}",
                "prompt_messages": [{"role": "user", "content": q}],
                "chosen_messages": [{"role": "assistant", "content": a}],
                "rejected_messages": [{"role": "assistant", "content": b}],
                "text": f"### Human: {q}### Assistant: {a}",
                "completion": f" {a}",
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            }
        )
    return out


@functools.cache
def _qa_pairs() -> tuple[tuple[str, str], ...]:
    """Reference-manual topics and their sections, then stdlib docstring summaries; first question wins."""
    from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top

    pairs: dict[str, str] = {}
    for name in sorted(topics):
        title, body = topics[name].strip().split("\n", 1)
        title = _code_quotes(title)
        parts = _HEADING.split(body.split("\n", 1)[1])  # [intro, heading, text, heading, text, ...]
        question = (
            f"What does {title[0].lower()}{title[1:]} do in Python?"
            if title.startswith("The ")
            else f"What does the Python reference manual say about {title}?"
        )
        pairs.setdefault(question, _answer(parts[0]))
        for heading, text in zip(parts[1::2], parts[2::2]):
            pairs.setdefault(
                f"What does the Python reference manual say about {_code_quotes(heading)} ({title})?", _answer(text)
            )
    for module in SFT_MODULES:
        for name, obj in public_objects(module):
            doc = getattr(obj, "__doc__", None)
            if not isinstance(doc, str) or isinstance(obj, property):
                continue
            question = f"What is {name} in Python?" if inspect.isclass(obj) else f"What does {name} do?"
            pairs.setdefault(question, _answer(inspect.cleandoc(doc), max_paragraphs=1))
    return tuple((q, a) for q, a in pairs.items() if len(a) >= _SFT_MIN_ANSWER_CHARS)


def _code_quotes(title: str) -> str:
    """'The "for" statement' -> 'The `for` statement'."""
    return re.sub(r'"([^"\n]+)"', r"`\1`", title.strip())


def _answer(text: str, max_paragraphs: int = 3) -> str:
    """The leading prose paragraphs of `text`, unwrapped, without grammar/code blocks or signatures,
    cut at a sentence end to at most SFT_MAX_ANSWER_CHARS."""
    paragraphs: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        block = block.strip("\n")
        if not block.strip():
            continue
        if block[0].isspace():  # grammar rule or example code: prose after it refers to it, so stop
            if paragraphs:
                if paragraphs[-1].endswith(":"):
                    paragraphs[-1] = paragraphs[-1][:-1] + "."
                elif not paragraphs[-1].endswith((".", "?", "!", ")")):
                    paragraphs.pop()  # "... is equivalent to" + code
                if paragraphs:
                    break
            continue
        prose = re.sub(r"\s*\[\d+\]", "", " ".join(block.split()))  # footnote marks
        if not paragraphs and _SIGNATURE.match(prose):
            continue
        paragraphs.append(prose)
        if len(paragraphs) == max_paragraphs or sum(map(len, paragraphs)) >= SFT_MAX_ANSWER_CHARS:
            break
    answer = " ".join(paragraphs).rstrip(":")
    if len(answer) > SFT_MAX_ANSWER_CHARS:
        cut = answer.rfind(". ", 0, SFT_MAX_ANSWER_CHARS)
        answer = answer[: cut + 1] if cut > 0 else answer[: answer.rfind(" ", 0, SFT_MAX_ANSWER_CHARS)]
    return answer
