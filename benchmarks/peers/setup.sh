#!/usr/bin/env bash
# Build one virtual environment per peer library for benchmarks/maml_peers.py and the other
# benchmarks/*_peers.py:
#
#   benchmarks/peers/envs/.venv-learn2learn   learn2learn 0.2.0 (built from its sdist, Cython < 3)
#   benchmarks/peers/envs/.venv-higher        higher 0.2.1
#   benchmarks/peers/envs/.venv-torchopt      TorchOpt 0.7.3
#   benchmarks/peers/envs/.venv-easyfsl       easyfsl 1.5.0 (protonet_peers.py)
#
# metalens itself runs in the project's own .venv (make install).
#
# Every environment gets the CPU build of torch first (TORCH, default torch==2.13.0, the
# wheel on local disk), then its library with --no-deps or under a constraints file that
# pins torch, so pip never resolves torch to a multi-GB CUDA build. benchmarks/peers/envs/
# is build output: keep it out of git.
#
# Usage: bash benchmarks/peers/setup.sh [learn2learn|higher|torchopt|easyfsl ...]   (default: all four)
# Environment: PYTHON (interpreter for the venvs, default python3), TORCH, ENVS (target folder).
# An environment that already imports its library is left as it is (delete it to rebuild).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ENVS="${ENVS:-$HERE/envs}"
PYTHON="${PYTHON:-python3}"
TORCH="${TORCH:-torch==2.13.0}"
L2L_VERSION=0.2.0
HIGHER_VERSION=0.2.1
TORCHOPT_VERSION=0.7.3
EASYFSL_VERSION=1.5.0

# a 2-core machine shared with others: build with one job
export MAX_JOBS=1 MAKEFLAGS=-j1 OMP_NUM_THREADS=1 PIP_DISABLE_PIP_VERSION_CHECK=1

mkdir -p "$ENVS"
CONSTRAINTS="$ENVS/constraints.txt"
printf '%s\n' "$TORCH" > "$CONSTRAINTS"  # every pip call below runs under -c: torch stays pinned

log() { printf '\n== %s\n' "$*"; }

new_venv() {  # new_venv NAME -> prints the venv's python; torch installed first
    local dir="$ENVS/.venv-$1"
    rm -rf "$dir"
    "$PYTHON" -m venv "$dir"
    "$dir/bin/python" -m pip install --quiet -c "$CONSTRAINTS" "$TORCH" >&2
}

has() {  # has NAME MODULE: the venv exists and imports MODULE
    [ -x "$ENVS/.venv-$1/bin/python" ] && "$ENVS/.venv-$1/bin/python" -c "import $2" >/dev/null 2>&1
}

check_torch() {  # the venv still has the pinned CPU torch
    "$1" - "$TORCH" <<'EOF'
import sys, torch
want = sys.argv[1].split("==")[-1]
assert torch.__version__.split("+")[0] == want, f"torch {torch.__version__} != {want}"
assert torch.version.cuda is None, f"a CUDA build of torch slipped in: {torch.__version__}"
print(f"   torch {torch.__version__} (CPU) ok")
EOF
}

write_torchvision_stub() {  # write_torchvision_stub PYTHON: a stand-in torchvision package in that venv
    # the PyPI wheels of torchvision do not load beside the CPU torch wheel ("operator
    # torchvision::nms does not exist"); learn2learn and easyfsl import it at import time for
    # their vision datasets / transforms / model zoo only. The stub answers those imports; using
    # any of its names raises ImportError. What is timed here uses torch only.
    local py="$1" site
    site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    mkdir -p "$site/torchvision"
    cat > "$site/torchvision/__init__.py" <<'EOF'
"""STUB written by metalens' benchmarks/peers/setup.sh -- not the real torchvision.

The real torchvision wheels do not load beside this environment's CPU torch build, and
learn2learn imports torchvision at import time for its vision datasets and transforms
only. This stub answers every ``import torchvision...`` / ``from torchvision... import X``;
each name is a placeholder class that can be subclassed but raises ImportError when used.
"""
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+stub"
STUB = True


def _placeholder(qualname):
    def _unavailable(self, *args, **kwargs):
        raise ImportError(f"{qualname}: torchvision is a stub in this environment (see torchvision/__init__.py)")
    return type(qualname.rsplit(".", 1)[-1], (), {"__init__": _unavailable, "__module__": qualname.rsplit(".", 1)[0]})


def _getattr_for(modname):
    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name[:1].islower():  # a submodule: torchvision.transforms, torchvision.datasets.folder, ...
            return importlib.import_module(f"{modname}.{name}")
        return _placeholder(f"{modname}.{name}")
    return __getattr__


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = types.ModuleType(spec.name)
        mod.__path__ = []
        mod.__getattr__ = _getattr_for(spec.name)
        return mod

    def exec_module(self, module):
        pass


import importlib  # noqa: E402

sys.meta_path.append(_Finder())
__getattr__ = _getattr_for(__name__)
EOF
}

build_higher() {
    if has higher higher; then log "higher: $ENVS/.venv-higher already there"; return; fi
    log "higher $HIGHER_VERSION"
    new_venv higher
    local py="$ENVS/.venv-higher/bin/python"
    "$py" -m pip install --quiet -c "$CONSTRAINTS" --no-deps "higher==$HIGHER_VERSION"  # it needs only torch
    "$py" -m pip install --quiet -c "$CONSTRAINTS" numpy  # torch warns at import without it (as in the other envs)
    check_torch "$py"
    "$py" -c "import higher; print('   higher $HIGHER_VERSION ok')"
}

build_torchopt() {
    if has torchopt torchopt; then log "torchopt: $ENVS/.venv-torchopt already there"; return; fi
    log "TorchOpt $TORCHOPT_VERSION"
    new_venv torchopt
    local py="$ENVS/.venv-torchopt/bin/python"
    # its declared deps besides torch: optree, numpy, graphviz (the Python package, for
    # torchopt.visual), typing-extensions; the wheel's C++ ops (_C, built for an older torch)
    # are optional: TorchOpt falls back to its Python implementation when they do not load
    "$py" -m pip install --quiet -c "$CONSTRAINTS" --no-deps "torchopt==$TORCHOPT_VERSION"
    "$py" -m pip install --quiet -c "$CONSTRAINTS" optree numpy graphviz typing-extensions
    check_torch "$py"
    "$py" -W ignore -c "import torchopt; print('   torchopt', torchopt.__version__, 'ok')"
}

build_learn2learn() {
    if has learn2learn learn2learn; then log "learn2learn: $ENVS/.venv-learn2learn already there"; return; fi
    log "learn2learn $L2L_VERSION"
    new_venv learn2learn
    local venv="$ENVS/.venv-learn2learn" py="$ENVS/.venv-learn2learn/bin/python"
    # 1. the sdist: its shipped .c files were generated by Cython 0.29.15 for Python 3.7 and do
    #    not compile for 3.11, so regenerate them from the .pyx sources with Cython < 3
    local src="$ENVS/src"
    rm -rf "$src" && mkdir -p "$src"
    "$py" -m pip download --quiet --no-binary :all: --no-deps -d "$src" "learn2learn==$L2L_VERSION"
    tar -xzf "$src/learn2learn-$L2L_VERSION.tar.gz" -C "$src"
    "$py" -m pip install --quiet -c "$CONSTRAINTS" "cython<3" setuptools wheel numpy
    (cd "$src/learn2learn-$L2L_VERSION" && rm -rf .eggs build \
        && "$venv/bin/cython" -3 --directive embedsignature=True \
            learn2learn/data/meta_dataset.pyx learn2learn/data/task_dataset.pyx learn2learn/data/transforms.pyx)
    # 2. build against the venv's own Cython/setuptools, no dependency resolution
    "$py" -m pip install --quiet -c "$CONSTRAINTS" --no-deps --no-build-isolation "$src/learn2learn-$L2L_VERSION"
    # 3. what `import learn2learn` really imports (its __init__ imports every subpackage):
    #    numpy, scipy (vision.models), Pillow (vision.datasets), requests, tqdm (data.utils),
    #    gym (learn2learn.gym registers its environments at import; pure Python, installed for
    #    real with its two small deps). Not installed: qpth, pandas, pytorch_lightning, which it
    #    imports lazily, and the rest of its install_requires (gsutil) that nothing imports.
    "$py" -m pip install --quiet -c "$CONSTRAINTS" numpy scipy pillow requests tqdm cloudpickle gym-notices
    "$py" -m pip install --quiet -c "$CONSTRAINTS" --no-deps "gym==0.26.2"
    # 4. torchvision: the PyPI wheels do not load beside the CPU torch wheel ("operator
    #    torchvision::nms does not exist"), and learn2learn imports it at import time only for
    #    its vision datasets / transforms. A stub package answers those imports; using any of
    #    its names raises ImportError. MAML (learn2learn.algorithms.maml, learn2learn.utils)
    #    uses torch only.
    write_torchvision_stub "$py"
    check_torch "$py"
    "$py" -W ignore -c "import learn2learn as l2l; from learn2learn.data import task_dataset
print('   learn2learn', l2l.__version__, 'ok (its compiled data extensions import)')"
}

build_easyfsl() {
    if has easyfsl easyfsl.methods; then log "easyfsl: $ENVS/.venv-easyfsl already there"; return; fi
    log "easyfsl $EASYFSL_VERSION"
    new_venv easyfsl
    local py="$ENVS/.venv-easyfsl/bin/python"
    # pure Python; declared deps besides torch: torchvision, pandas, matplotlib, tqdm. easyfsl.methods
    # (PrototypicalNetworks) needs torch only; its datasets (pandas, torchvision) and modules
    # (torchvision's ResNet) are not used here: pandas and matplotlib are left out, torchvision is
    # the same stub as for learn2learn
    "$py" -m pip install --quiet -c "$CONSTRAINTS" --no-deps "easyfsl==$EASYFSL_VERSION"
    "$py" -m pip install --quiet -c "$CONSTRAINTS" numpy tqdm
    write_torchvision_stub "$py"
    check_torch "$py"
    "$py" -W ignore -c "import easyfsl; from easyfsl.methods import PrototypicalNetworks
print('   easyfsl', easyfsl.__version__, 'ok')"
}

targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(learn2learn higher torchopt easyfsl)
for t in "${targets[@]}"; do
    case "$t" in
        learn2learn) build_learn2learn ;;
        higher) build_higher ;;
        torchopt) build_torchopt ;;
        easyfsl) build_easyfsl ;;
        *) echo "unknown peer: $t (learn2learn, higher, torchopt or easyfsl)" >&2; exit 2 ;;
    esac
done
log "done: $(ls -d "$ENVS"/.venv-* | tr '\n' ' ')"
