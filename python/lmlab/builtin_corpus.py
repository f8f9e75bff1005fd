"""Built-in corpora: one shipped with the package, the others assembled offline from the running
Python's standard library.

`shakespeare` is tiny-shakespeare (about 40,000 lines of Shakespeare's plays, 1.1 MB; public
domain), the corpus of nanoGPT's CPU recipe, stored in this package as corpora/shakespeare.txt.

`python-docs` is English prose and code examples taken from the interpreter itself: the language
reference topics that `help()` shows (pydoc_data.topics), then the docstrings of the public modules,
classes, functions and methods of a fixed, sorted list of standard-library modules. Nothing is
downloaded, and for a given Python version the text is the same on every machine that runs it.

The modules are imported in a separate, isolated interpreter (no site-packages, fixed hash seed,
warnings silenced, an empty working directory), so their import-time side effects never touch the
caller's process and the caller's own imports cannot change the text. Results are cached under
`cache_dir()/corpora/`, keyed by the Python version and this builder's format version.

This file is also the script that the child interpreter runs (see `_child_main`); it therefore
imports nothing outside the standard library at module level.
"""

from __future__ import annotations

import os
import sys

# Bump when the assembled text changes for the same Python, so old caches are not reused.
FORMAT_VERSION = 1

BUILTIN_CORPORA = {
    "shakespeare": "tiny-shakespeare: ~40,000 lines of Shakespeare's plays, shipped with lmlab (1.1 MB)",
    "python-docs": "Python language reference topics and stdlib docstrings, from this interpreter (>= 1 MB)",
    "python-docs-small": "The first ~200 KB of python-docs, cut at a paragraph break (for quick tests)",
}

SMALL_CHARS = 200_000

# Corpora stored in the package (name -> file under this directory), read as they are.
SHIPPED = {"shakespeare": os.path.join("corpora", "shakespeare.txt")}

# Never imported: they open browsers or windows, print on import, start a REPL, need a display,
# change the terminal, or are test suites / deprecated tool packages with heavy side effects.
EXCLUDED_TOP_LEVEL = frozenset({
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3",
    "distutils", "ensurepip", "readline", "rlcompleter", "sitecustomize", "usercustomize",
    "pydoc_data", "xxsubtype", "xxlimited", "msilib", "winreg", "winsound", "msvcrt", "nt",
})
# Sub-packages skipped inside otherwise-documented packages (hundreds of near-identical codecs,
# test helpers, script entry points).
EXCLUDED_PARTS = frozenset({"__main__", "test", "tests", "idle_test"})
EXCLUDED_PREFIXES = ("encodings.", "ctypes.macholib", "email.mime.", "xml.dom.xmlbuilder")


def cache_dir() -> str:
    """The lmlab cache directory: $LMLAB_CACHE, else ~/.cache/lmlab (created on demand)."""
    return os.environ.get("LMLAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lmlab")


def corpus_cache_path(name: str, cache: str | None = None) -> str:
    v = sys.version_info
    impl = sys.implementation.name
    fname = f"{name}-{impl}{v.major}.{v.minor}.{v.micro}-f{FORMAT_VERSION}.txt"
    return os.path.join(cache or cache_dir(), "corpora", fname)


def build_builtin(name: str, cache: str | None = None) -> str:
    """Return the text of built-in corpus `name`, building and caching it on first use."""
    if name not in BUILTIN_CORPORA:
        known = ", ".join(f"builtin:{k}" for k in sorted(BUILTIN_CORPORA))
        raise ValueError(f"unknown built-in corpus {name!r}; known: {known}")
    if name in SHIPPED:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), SHIPPED[name]),
                  encoding="utf-8") as f:
            return f.read()
    path = corpus_cache_path(name, cache)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    if name == "python-docs":
        text = _assemble_in_child()
    else:  # python-docs-small
        full = build_builtin("python-docs", cache)
        cut = full.rfind("\n\n", 0, SMALL_CHARS)
        text = full[: cut + 1 if cut > 0 else SMALL_CHARS]
    from .files import atomic_write_text

    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, text)
    return text


def _assemble_in_child() -> str:
    import subprocess
    import tempfile

    with open(__file__, encoding="utf-8") as f:
        source = f.read()
    env = {"PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8", "LC_ALL": "C.UTF-8",
           "PATH": os.environ.get("PATH", "")}
    with tempfile.TemporaryDirectory(prefix="lmlab-corpus-") as tmp:
        out = os.path.join(tmp, "corpus.txt")
        # -S: no site-packages, so third-party modules cannot shadow or extend the stdlib text;
        # the empty cwd keeps stray local files (a user's json.py) off sys.path.
        try:
            proc = subprocess.run(
                [sys.executable, "-S", "-c", source, out], cwd=tmp, env=env,
                stdin=subprocess.DEVNULL, capture_output=True, timeout=300,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(f"building builtin:python-docs failed: could not run {sys.executable!r} ({e})") from None
        if proc.returncode != 0 or not os.path.exists(out):
            err = proc.stderr.decode("utf-8", "replace")[-2000:]
            raise RuntimeError(f"building builtin:python-docs failed (exit {proc.returncode}):\n{err}")
        with open(out, encoding="utf-8") as f:
            return f.read()


# ---------------------------------------------------------------------------------------------
# Everything below runs inside the isolated child interpreter.


def _stdlib_top_level() -> list[str]:
    names = getattr(sys, "stdlib_module_names", None)
    if names is None:  # Python < 3.10: scan the stdlib directory instead
        import pkgutil
        import sysconfig

        names = set(sys.builtin_module_names)
        names.update(m.name for m in pkgutil.iter_modules([sysconfig.get_paths()["stdlib"]]))
    return sorted(n for n in names if not n.startswith("_") and n not in EXCLUDED_TOP_LEVEL)


def _wanted(modname: str) -> bool:
    parts = modname.split(".")
    if any(p in EXCLUDED_PARTS or p.startswith("_") for p in parts[1:]):
        return False
    return not modname.startswith(EXCLUDED_PREFIXES)


def _import(modname: str):
    import importlib
    import io
    import contextlib

    # Some modules print or warn when imported; none of that belongs in the corpus or the log.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            return importlib.import_module(modname)
        except BaseException:  # ImportError, missing C extensions, SystemExit from odd modules
            return None


def _module_names() -> list[str]:
    import pkgutil

    out = []
    for top in _stdlib_top_level():
        mod = _import(top)
        if mod is None:
            continue
        out.append(top)
        path = getattr(mod, "__path__", None)
        if path is None:
            continue
        subs = sorted(m.name for m in pkgutil.walk_packages(path, prefix=top + ".", onerror=lambda n: None)
                      if _wanted(m.name))
        out.extend(s for s in subs if _import(s) is not None)
    return out


def _clean(doc: str | None) -> str | None:
    import inspect
    import re

    if not isinstance(doc, str) or not doc.strip():
        return None
    # Reprs of sentinel defaults carry memory addresses, which would make the text differ per run.
    return re.sub(r" at 0x[0-9a-fA-F]+", "", inspect.cleandoc(doc)).strip()


def _signature(name: str, obj) -> str:
    import inspect
    import re

    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return name
    return name + re.sub(r" at 0x[0-9a-fA-F]+", "", sig)


def _own_doc(obj) -> str | None:
    # __doc__ from the object's own namespace, so inherited docstrings are not repeated per subclass.
    d = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    return _clean(d)


def _document_module(modname: str, mod) -> list[str]:
    import inspect

    parts = []
    doc = _clean(getattr(mod, "__doc__", None))
    title = f"Module {modname}"
    parts.append(f"{title}\n{'=' * len(title)}\n\n" + (doc + "\n" if doc else ""))
    names = getattr(mod, "__all__", None)
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        names = [n for n in vars(mod) if not n.startswith("_")]
    for name in sorted(set(names)):
        obj = getattr(mod, name, None)
        if getattr(obj, "__module__", None) != modname:
            continue  # re-exported from elsewhere: documented in its home module
        if inspect.isclass(obj):
            cdoc = _own_doc(obj)
            if cdoc:
                parts.append(f"class {modname}.{_signature(name, obj)}\n{cdoc}\n")
            for mname in sorted(vars(obj)):
                if mname.startswith("_") and mname != "__init__":
                    continue
                member = vars(obj)[mname]
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if not callable(member) and not isinstance(member, property):
                    continue
                mdoc = _clean(getattr(member, "__doc__", None))
                if mdoc and not mdoc.startswith("Initialize self.  See help(type(self))"):
                    label = mname if isinstance(member, property) else _signature(mname, member)
                    parts.append(f"{modname}.{name}.{label}\n{mdoc}\n")
        elif inspect.isroutine(obj):
            fdoc = _clean(obj.__doc__)
            if fdoc:
                parts.append(f"{modname}.{_signature(name, obj)}\n{fdoc}\n")
    return parts


def _assemble() -> str:
    import warnings

    warnings.simplefilter("ignore")
    chunks = []
    try:
        from pydoc_data.topics import topics

        for key in sorted(topics):
            chunks.append(topics[key].strip("\n") + "\n")
    except ImportError:
        pass
    for modname in _module_names():
        mod = sys.modules.get(modname)
        if mod is not None:
            chunks.extend(_document_module(modname, mod))
    text = "\n".join(chunks)
    # Tabs and stray carriage returns only enlarge a character vocabulary.
    return text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(4)


def _child_main(out_path: str) -> None:
    text = _assemble()
    with open(out_path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


if __name__ == "__main__" and len(sys.argv) == 2 and sys.argv[0] == "-c":
    _child_main(sys.argv[1])
