"""CPU kernels for the votes-sized passes of convolutional EM routing (kernels/em_votes.cc).

A convolutional capsule layer's votes V_gcn = P_gn W_nc (pose of child n of group g times
its weight for parent type c) are 16 times the size of the poses and weights they come
from. `capsules.em_routing` reads them several times per iteration; these kernels compute
each vote where it is used (routed sums, E-step distances, the gradient of poses and
weights), so no votes-sized tensor is stored or read. The results equal the stored-votes
formulation to float32 round-off (tests/test_em_kernels.py).

The C++ source is compiled on first use against the installed TensorFlow with the system's
C++ compiler (`$CXX`, else `c++`; about 20 s on a 2-core CPU), and cached per source,
TensorFlow version and CPU in `$CAPSULES_CACHE_DIR` (default `~/.cache/capsules`). Where
`available()` is False (no compiler, `CAPSULES_EM_KERNELS=0`, a GPU, an XLA-compiled
function) the routing stores its votes instead.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import tensorflow as tf
from absl import logging

# Where a graph is being built for XLA; TensorFlow's own test, which Keras 2 used too.
from tensorflow.python.ops import control_flow_util

SOURCE = Path(__file__).with_name("kernels") / "em_votes.cc"
# -march=native: the lanes of em_votes.cc become the CPU's widest vectors (the library is
# built on, and cached for, the CPU that runs it).
_FLAGS = ("-std=c++17", "-O3", "-march=native", "-shared", "-fPIC", "-w")


def available() -> bool:
    """Whether EM routing uses the kernels where it is traced or run: not switched off with
    CAPSULES_EM_KERNELS=0, no GPU visible (they are CPU kernels), not inside a function XLA
    compiles (`tf.function(jit_compile=True)`, `model.compile(jit_compile=True)`: XLA cannot
    compile them), and the library built and loaded (`load`)."""
    return (os.environ.get("CAPSULES_EM_KERNELS", "1") != "0"
            and not tf.config.list_logical_devices("GPU")
            and not control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())
            and load() is not None)


@functools.cache
def load():
    """The kernels' op library (`tf.load_op_library`), compiled if not cached; None where
    no compiler can build it (logged once, with the compiler's first error line)."""
    try:
        return tf.load_op_library(str(_build()))
    except (OSError, subprocess.CalledProcessError, tf.errors.NotFoundError) as error:
        reason = getattr(error, "stderr", "") or str(error)
        first = next((line for line in reason.splitlines() if "error" in line.lower()),
                     reason.splitlines()[0] if reason else type(error).__name__)
        logging.warning("capsules: EM routing kernels unavailable (%s); the routing stores "
                        "its votes instead", first.strip())
        return None


def _build() -> Path:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise OSError("no C++ compiler: set CXX or install g++")
    flags = [*_FLAGS, *tf.sysconfig.get_compile_flags()]
    links = tf.sysconfig.get_link_flags()
    key = hashlib.sha256("\n".join([
        SOURCE.read_text(), tf.__version__, compiler, *flags, *links, platform.machine(),
        _cpu_identity(),
    ]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("CAPSULES_CACHE_DIR", Path.home() / ".cache" / "capsules"))
    library = cache / f"em_votes-{key}.so"
    if library.exists():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    # One process builds (the workers of a job start at once); the others wait and load it.
    # Built under a temporary name, then renamed: a stopped build leaves no partial library.
    with open(cache / "em_votes.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not library.exists():
            logging.info("capsules: compiling the EM routing kernels into %s (once)", library)
            with tempfile.TemporaryDirectory(dir=cache) as scratch:
                built = Path(scratch) / library.name
                subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built), *links],
                               check=True, capture_output=True, text=True)
                os.replace(built, library)
    return library


def _cpu_identity() -> str:
    """The CPU's model and instruction-set flags (-march=native builds for them)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(sorted({line for line in lines
                             if line.startswith(("model name", "flags"))}))


def vote_sums(patches, kernel, center, routes):
    """sum_n routes_gcn [V_gcn, V_gcn^2] `[G, C, 32]` for V_gcn = P_gn W_nc - center_gc.

    patches `[G, N, 16]`, kernel `[N, C, 16]`, center `[G, C, 16]`, routes `[G, C, N]`.
    """
    return load().capsules_em_vote_sums(patches, kernel, center, routes)


def vote_distances(patches, kernel, center, weights):
    """[V_gcn, V_gcn^2] . weights_gc `[G, C, N]` for weights `[G, C, 32]`."""
    return load().capsules_em_vote_distances(patches, kernel, center, weights)


def vote_gradient(patches, kernel, center, lefts, rights):
    """(d patches `[G, N, 16]`, d kernel `[N, C, 16]`) from d[V, V^2] = sum_k lefts_k (x)
    rights_k, lefts `[K, G, C, N]`, rights `[K, G, C, 32]` (center: a constant)."""
    return load().capsules_em_vote_gradient(patches, kernel, center, lefts, rights)
