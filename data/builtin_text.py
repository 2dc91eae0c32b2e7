"""`builtin:text`: an English corpus made of documentation that is already installed, so it needs no download.

Every document comes from files that any machine with this project's `.venv` has. In this order:

1. Python's reference manual: the topics of `pydoc_data.topics` (what `help("if")` shows), one document
   per topic, sorted by name (~0.45 MB on Python 3.11).
2. Docstrings of the standard library: the public modules of `sys.stdlib_module_names` and their public
   submodules, sorted by name; one document per module, class (with its methods' docstrings) and
   function, each headed by its qualified name (~1.4 MB).
3. Docstrings of numpy's public API (numpy is one of the project's requirements), likewise (~1.9 MB).
4. Documentation files in site-packages, sorted by path: `*.md`, `*.rst`, `*.txt` (licences, RECORD,
   entry points, top-level and requirements files excluded) and the long descriptions (package READMEs)
   in `*.dist-info/METADATA` (~0.9 MB; this part depends most on what is installed).

A document is kept only if it has at least 64 characters and is mostly English prose (at least 75% of
its characters are ASCII letters or spaces), and only once (exact duplicates are dropped). With Python 3.11 and requirements.txt that is
about 4.7 million characters in about 3,800 documents, gathered in about 2 seconds. The order is fixed, so one machine always gives
the same corpus; other Python or package versions give slightly different text.

Modules are imported in a child interpreter (`python -I`) whose output is discarded and which has no
display or browser, so importing them can neither print, open a window, nor change the state of the
calling process. Modules with import side effects (antigravity, this, tkinter, turtle, idlelib,
readline, ...), private modules, tests and `__main__` modules are skipped.
"""

import contextlib
import hashlib
import importlib
import inspect
import io
import itertools
import json
import logging
import os
import pkgutil
import re
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

BUILTIN_TEXT_NAME = "builtin:text"
MIN_PROSE_FRACTION = 0.75
MIN_DOCUMENT_CHARS = 64
PACKAGE_DOCSTRING_ROOTS = ("numpy",)
SKIPPED_MODULE_PARTS = frozenset({
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "readline", "rlcompleter",
    "lib2to3", "distutils", "ensurepip", "venv", "pydoc_data", "encodings", "xxlimited", "xxsubtype",
    "test", "tests", "conftest", "setup", "__main__",
})
DOC_SUFFIXES = (".md", ".rst", ".txt")
SKIPPED_FILE_NAMES = re.compile(
    r"^(licen[cs]e|copying|notice|record|entry_points|top_level|requirements|dependency_links|"
    r"namespace_packages|not-zip-safe|installer|requested|wheel|sources|authors)", re.IGNORECASE)
MAX_DOC_FILE_BYTES = 2_000_000
CHILD_TIMEOUT_S = 600


def iter_builtin_documents() -> Iterator[str]:
    """Yield the documents of the built-in corpus (see the module docstring), in a fixed order."""
    seen = set()
    sources = itertools.chain(_reference_topics(), _installed_docstrings(), _site_packages_docs())
    for text in sources:
        text = text.strip()
        key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if len(text) < MIN_DOCUMENT_CHARS or key in seen or not is_prose(text):
            continue
        seen.add(key)
        yield text


def is_prose(text: str, min_fraction: float = MIN_PROSE_FRACTION) -> bool:
    """Whether at least `min_fraction` of the characters of `text` are ASCII letters or spaces."""
    if not text:
        return False
    letters = sum(1 for char in text if char == " " or (char.isascii() and char.isalpha()))
    return letters / len(text) >= min_fraction


def _reference_topics() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]


def _installed_docstrings() -> Iterator[str]:
    """Docstrings of the standard library and of PACKAGE_DOCSTRING_ROOTS, gathered in a child process.

    The child is a fresh isolated interpreter (`python -I`) with no display or browser; its stdout goes to
    /dev/null and its stderr is only shown if it fails. It writes the documents to a JSON file.
    """
    roots = sorted(name for name in sys.stdlib_module_names if _is_public(name)) + list(PACKAGE_DOCSTRING_ROOTS)
    project_root = str(Path(__file__).resolve().parents[1])
    child_code = (f"import sys; sys.path.append({project_root!r}); "
                  "from data.builtin_text import _collect_docstrings; _collect_docstrings(sys.argv[1], sys.argv[2:])")
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER")}
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch, "docstrings.json")
        result = subprocess.run([sys.executable, "-I", "-c", child_code, str(output), *roots], cwd=scratch,
                                env=environment, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, timeout=CHILD_TIMEOUT_S)
        if result.returncode != 0:
            tail = result.stderr.decode("utf-8", errors="replace").strip().splitlines()[-1:]
            raise RuntimeError(f"builtin:text: gathering docstrings failed in a child process: {tail}")
        documents = json.loads(output.read_text(encoding="utf-8"))
    logger.info("builtin:text: %d docstring documents from %d root modules", len(documents), len(roots))
    yield from documents


def _is_public(module_name: str) -> bool:
    return not any(part.startswith("_") or part in SKIPPED_MODULE_PARTS for part in module_name.split("."))


def _collect_docstrings(output_path: str, roots: list[str]) -> None:
    """Run in the child process: import each root and its public submodules, write their docs as JSON."""
    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    documents, seen_objects = [], set()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        for root in roots:
            _collect_module(root, documents, seen_objects)
    Path(output_path).write_text(json.dumps(documents), encoding="utf-8")


def _collect_module(name: str, documents: list[str], seen_objects: set[int]) -> None:
    try:
        module = importlib.import_module(name)
    except (Exception, SystemExit):
        return
    if id(module) in seen_objects:
        return
    seen_objects.add(id(module))
    module_doc = _own_doc(module)
    if module_doc:
        documents.append(f"{name}\n\n{module_doc}")
    for attribute, value in sorted(vars(module).items()):
        if attribute.startswith("_") or id(value) in seen_objects or not _is_documented_member(value, name):
            continue
        seen_objects.add(id(value))
        document = _object_document(f"{name}.{attribute}", value)
        if document:
            documents.append(document)
    if hasattr(module, "__path__"):
        for info in sorted(pkgutil.iter_modules(module.__path__, name + "."), key=lambda info: info.name):
            if _is_public(info.name):
                _collect_module(info.name, documents, seen_objects)


def _is_documented_member(value, module_name: str) -> bool:
    """Classes, functions and numpy ufuncs defined in this module, or re-exported from a private one."""
    if not (inspect.isclass(value) or inspect.isroutine(value) or type(value).__name__ == "ufunc"):
        return False
    owner = getattr(value, "__module__", None)
    return isinstance(owner, str) and (owner == module_name or not _is_public(owner))


def _object_document(title: str, value) -> str:
    """`title` and the object's own docstring; for a class, followed by its public methods' docstrings."""
    sections = []
    doc = _own_doc(value)
    if doc:
        sections.append(f"{title}\n\n{doc}")
    if inspect.isclass(value):
        for attribute, member in sorted(vars(value).items()):
            if attribute.startswith("_") or not (inspect.isroutine(member) or isinstance(member, property)):
                continue
            member_doc = _own_doc(member)
            if member_doc:
                sections.append(f"{title}.{attribute}\n\n{member_doc}")
    return "\n\n".join(sections)


def _own_doc(value) -> str:
    """The object's own docstring, cleaned like `inspect.getdoc` but not inherited from a base class."""
    try:
        doc = getattr(value, "__doc__", None)
    except Exception:
        return ""
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def _site_packages_docs() -> Iterator[str]:
    roots = sorted({Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")})
    for root in roots:
        for path in _doc_files(root):
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if path.name == "METADATA":
                text = text.partition("\n\n")[2]
            yield text


def _doc_files(root: Path) -> Iterator[Path]:
    """Documentation files under `root`, sorted by path, skipping test folders and oversized files."""
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d not in ("test", "tests", "__pycache__"))
        for file_name in sorted(files):
            is_doc = file_name.lower().endswith(DOC_SUFFIXES) and not SKIPPED_FILE_NAMES.match(file_name)
            is_metadata = file_name == "METADATA" and directory.endswith(".dist-info")
            if not (is_doc or is_metadata):
                continue
            path = Path(directory, file_name)
            try:
                if path.stat().st_size <= MAX_DOC_FILE_BYTES:
                    yield path
            except OSError:
                continue
