"""Import hook of cgse-procman: ``egse.procman`` comes from this distribution, cgse-core's package stays behind it.

cgse-core ships ``egse/procman/`` (``__init__``, ``procman_cs``, ``procman_protocol``, ``procman_ui``,
``procman.yaml``). Installing our files into the same directory would overwrite theirs, and the next
``pip install cgse-core`` would silently put theirs back. So our package lives in a directory of its own
(``_cgse_procman/`` in site-packages), and ``cgse_procman_hook.pth`` runs :func:`install` at interpreter start
(the same mechanism as setuptools' ``distutils-precedence.pth``). The finder it puts first on ``sys.meta_path``
answers for ``egse.procman`` only, with a spec whose

* ``__init__`` is ours (``_cgse_procman/__init__.py``), and whose
* ``__path__`` is ``[<our directory>, <every other egse/procman directory on egse.__path__>]``.

Submodules are then found by the ordinary path finder in that order: ``egse.procman.procman_cs`` and
``egse.procman._native`` are ours; ``egse.procman.procman_ui`` and ``egse.procman.procman_protocol`` are
cgse-core's (they import our ``egse.procman``), and their ``Path(__file__).parent`` is still cgse-core's
directory, so ``procman.yaml`` is found.

``PROCMAN_USE_ORIGINAL=1`` (read at the first ``import egse.procman`` of a process) turns the finder off:
cgse-core's package is imported as if we were not installed. When our directory is gone (an uninstall that
left the ``.pth`` behind), the finder steps aside too. Nobody should import ``_cgse_procman`` by that name:
it would be a second copy of the package.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec, PathFinder
from importlib.util import spec_from_file_location
from types import ModuleType

#: The module this hook serves.
TARGET = "egse.procman"
#: Its parent, the namespace package the CGSE distributions share.
PARENT = "egse"
#: The directory (top-level package name) our ``egse.procman`` lives in.
PACKAGE = "_cgse_procman"
#: Set to ``1`` (or ``true``/``yes``) to import cgse-core's original ``egse.procman`` instead of ours.
ENV_USE_ORIGINAL = "PROCMAN_USE_ORIGINAL"


def use_original() -> bool:
    """True when the environment asks for cgse-core's original package."""
    return os.environ.get(ENV_USE_ORIGINAL, "").strip().lower() in ("1", "true", "yes", "on")


class ProcmanFinder:
    """Meta-path finder for ``egse.procman``: our ``__init__``, our directory first in ``__path__``."""

    @classmethod
    def find_spec(
        cls,
        fullname: str,
        path: Sequence[str] | None = None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        if fullname == PARENT:
            return cls._parent_spec()
        if fullname != TARGET or use_original():
            return None
        ours = PathFinder.find_spec(PACKAGE)  # locates the directory; imports nothing
        if ours is None or ours.origin is None or ours.submodule_search_locations is None:
            return None
        our_dirs = list(ours.submodule_search_locations)
        seen = {os.path.realpath(d) for d in our_dirs}
        others: list[str] = []
        for entry in path or ():  # egse.__path__: every egse/ directory, cgse-core's among them
            candidate = os.path.join(entry, "procman")
            real = os.path.realpath(candidate)
            if real not in seen and os.path.isdir(candidate):
                seen.add(real)
                others.append(candidate)
        return spec_from_file_location(TARGET, ours.origin, submodule_search_locations=[*our_dirs, *others])

    @staticmethod
    def _parent_spec() -> ModuleSpec | None:
        """``egse``: left to the path finder, unless no ``egse/`` directory exists (we are installed alone; our wheel
        has no ``egse/`` of its own), then an empty namespace package so that ``egse.procman`` can be imported."""
        if use_original() or PathFinder.find_spec(PARENT) is not None or PathFinder.find_spec(PACKAGE) is None:
            return None
        spec = ModuleSpec(PARENT, None, is_package=True)
        spec.submodule_search_locations = []
        return spec

    @classmethod
    def invalidate_caches(cls) -> None:
        """Nothing cached here (the path finder caches directory listings)."""


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(finder is ProcmanFinder for finder in sys.meta_path):
        sys.meta_path.insert(0, ProcmanFinder)
