#!/usr/bin/env bash
# Build dist/cni-bridge.pyz, a zipapp that runs cni_bridge straight from the archive, and optionally install it.
#
#   ./build.sh [--python PATH]                        build (runs "PATH -IS", default /usr/bin/python3)
#   ./build.sh [--python PATH] install DIR [--force]  build, then install into DIR (bridge, host-local, loopback, bandwidth)
#   ./build.sh [--python PATH] verify [ARGS...]       build, then run the walkthrough on throwaway namespaces (root)
#
# The archive starts with a two-line sh preamble that execs "PATH -IS" on it, then holds __main__.py
# (shiv's template calling cni_bridge.main), cni_bridge.py and cni_bridge.pyc compiled for the target
# interpreter (zipimport uses it when its magic number matches, the .py otherwise).
# No shiv bootstrap: nothing is extracted, no SHIV_* variable is read.  The output is byte-for-byte
# reproducible: fixed timestamps (SOURCE_DATE_EPOCH, default 1980-01-01), sorted stored entries, fixed modes.
# Needs python3 with shiv (installed with pip when missing).
set -euo pipefail

usage() {
    echo "usage: $0 [--python PATH] [install DIR [--force] | verify [CONFIG] [--keep] [--json]]" >&2
    exit 2
}

python=/usr/bin/python3
install_args=()
verify_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --python)
            [ $# -ge 2 ] || usage
            python=$2
            shift 2
            ;;
        verify)
            shift
            verify_args=(verify "$@")
            set --
            ;;
        install)
            [ $# -ge 2 ] || usage
            install_args=(install "$2")
            shift 2
            if [ "${1:-}" = --force ]; then
                install_args+=(--force)
                shift
            fi
            ;;
        *)
            usage
            ;;
    esac
done

cd "$(dirname "$0")"
if ! python3 -c "import shiv" 2>/dev/null; then
    echo "build.sh: installing shiv (python3 -m pip install shiv)" >&2
    python3 -m pip install --quiet shiv
fi
mkdir -p dist
python3 - "$python" cni_bridge.py dist/cni-bridge.pyz <<'EOF'
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

import shlex
import struct

from shiv.builder import MAIN_TEMPLATE, write_to_zipapp
from shiv.constants import SOURCE_DATE_EPOCH_DEFAULT

python, source, target = sys.argv[1:]

# Python >= 3.7: an unchecked hash-based pyc (no timestamp at all).  Older: a timestamp pyc whose
# mtime is the archive's fixed entry time (zipimport compares the two, reading the zip time as
# local time: the pyc is used on nodes running in UTC, the .py elsewhere).  Docstrings are left out
# (optimize=2): nothing reads them at run time, and every call unmarshals the module.
COMPILE = """
import os, py_compile, sys
source, cfile, mtime = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.utime(source, (mtime, mtime))
options = {}
if sys.version_info >= (3, 7):
    options["invalidation_mode"] = py_compile.PycInvalidationMode.UNCHECKED_HASH
py_compile.compile(source, cfile=cfile, dfile="cni_bridge.py", doraise=True, optimize=2, **options)
"""

# The archive starts as a shell script: a zip given to python directly goes through runpy, which
# imports a dozen modules first and doubles the start-up time of every plugin call.  Instead the
# interpreter reads the compiled module straight from its place in the archive (its offset and
# length are written into the preamble once the zip is laid out) and runs it; an interpreter of
# another version (the magic number differs) imports cni_bridge.py from the archive instead.  sh
# passes the name the program was started as ($0: bridge, host-local, loopback) as argv[0].  The
# cyclic garbage collector is switched off first: a call lives for milliseconds, and the collector
# would otherwise walk the freshly unmarshalled module several times over.  The compiled bytes are
# dropped once unmarshalled, which lowers the call's peak memory by their size.  The zip itself
# still has __main__.py, so `python3 cni-bridge.pyz` works too.
PREAMBLE = """#!/bin/sh
exec {python} -IS -c 'import gc, sys, marshal
gc.disable()
archive = sys.argv[1]
sys.argv = sys.argv[1:]
with open(archive, "rb") as f:
    f.seek({offset:10d})
    pyc = f.read({length:10d})
if pyc[:4] == sys.modules["_frozen_importlib_external"].MAGIC_NUMBER:
    module = sys.modules["cni_bridge"] = type(sys)("cni_bridge")
    module.__file__ = archive + "/cni_bridge.py"
    code = marshal.loads(memoryview(pyc)[16 if sys.version_info >= (3, 7) else 12:])
    del pyc
    exec(code, module.__dict__)
    del code
else:
    sys.path.insert(0, archive)
    import cni_bridge as module
module.main()' "$0" "$@"
"""


def pyc_place(path):
    """(offset, length) of cni_bridge.pyc's bytes in the finished archive."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("cni_bridge.pyc")
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_length + extra_length, info.file_size


epoch = max(int(os.environ.get("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH_DEFAULT)), SOURCE_DATE_EPOCH_DEFAULT)
date_time = time.gmtime(epoch)[:6]
entry_stat = os.stat_result((0o100644,) + (0,) * 9)  # regular file, mode 0644

with tempfile.TemporaryDirectory() as scratch:
    # Compile a copy, so that neither the checkout's mtime nor its __pycache__ is touched.
    copy = os.path.join(scratch, "cni_bridge.py")
    shutil.copyfile(source, copy)
    pyc = os.path.join(scratch, "cni_bridge.pyc")
    subprocess.run([python, "-IS", "-c", COMPILE, copy, pyc, str(epoch)], check=True)
    entries = {
        "__main__.py": MAIN_TEMPLATE.format(module="cni_bridge", fn="main").encode(),
        "cni_bridge.py": open(copy, "rb").read(),
        "cni_bridge.pyc": open(pyc, "rb").read(),
    }

temp = "%s.%d.tmp" % (target, os.getpid())
try:
    with open(temp, "wb") as out:
        # The numbers are fixed-width, so filling them in below moves nothing.
        out.write(PREAMBLE.format(python=shlex.quote(python), offset=0, length=0).encode())
        # Stored, not deflated: read in place at start-up, no dependence on the zlib version.
        with zipfile.ZipFile(out, "w") as archive:
            for name in sorted(entries):
                write_to_zipapp(archive, name, entries[name], date_time, zipfile.ZIP_STORED, stat=entry_stat)
    offset, length = pyc_place(temp)
    with open(temp, "r+b") as out:
        out.write(PREAMBLE.format(python=shlex.quote(python), offset=offset, length=length).encode())
    os.chmod(temp, 0o755)
    os.rename(temp, target)
except BaseException:
    os.unlink(temp)
    raise
print("built %s for %s" % (target, python))
EOF

if [ ${#install_args[@]} -gt 0 ]; then
    "$python" -IS dist/cni-bridge.pyz "${install_args[@]}"
fi
if [ ${#verify_args[@]} -gt 0 ]; then
    exec dist/cni-bridge.pyz "${verify_args[@]}"
fi
