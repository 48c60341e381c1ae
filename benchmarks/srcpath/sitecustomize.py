"""fastmim importable straight from this source tree, with no build and no install.

``PYTHONPATH=benchmarks/srcpath`` makes Python run this file at start-up (``sitecustomize``). It maps the three
packages pyproject.toml installs to their directories here: ``fastmim`` -> fastmim/, ``fastmim.kernels`` ->
kernels/, ``fastmim.recipes`` -> configs/ (what an editable install's finder does), ahead of any installed fastmim,
whatever the working directory. benchmarks/gpu_suite.sh falls back to it when ``pip install -e .`` cannot build
(setuptools < 68 fails with "invalid command 'bdist_wheel'"; no network on the GPU machine to fetch a newer one).
A ``sitecustomize`` this one shadows (e.g. Debian's) still runs, after it.
"""

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parents[1]
_PACKAGES = {"fastmim": "fastmim", "fastmim.kernels": "kernels", "fastmim.recipes": "configs"}


class _SourceTreeFinder:
    """A meta-path finder for the three packages; their submodules are found through the package's __path__."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        directory = _PACKAGES.get(name)
        if directory is None:
            return None
        init = _ROOT / directory / "__init__.py"
        return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])


sys.meta_path.insert(0, _SourceTreeFinder())

# Run the sitecustomize this file shadows, if any, as Python would have without it.
_others = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
_spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _others)
if _spec is not None and _spec.loader is not None:
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
