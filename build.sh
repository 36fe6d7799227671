#!/usr/bin/env bash
# Build dist/cni-bridge.pyz, a zipapp that runs cni_bridge straight from the archive, and optionally install it.
#
#   ./build.sh [--python PATH [--python-version X.Y]]... [--every-python]   build
#   ./build.sh [--python PATH]... install DIR [--force]            build, then install into DIR (every plugin name)
#   ./build.sh [--python PATH]... verify [ARGS...]                 build, then run the walkthrough (root)
#
# The first --python (default /usr/bin/python3) is the interpreter the archive runs on the node.
# Each --python adds bytecode compiled for that interpreter, so one archive is fast under several
# (a node whose python3 was upgraded, say); the preamble picks the bytecode by magic number and
# compiles the source only when none matches.  A PATH that does not exist on this machine needs
# --python-version X.Y right after it: the bytecode is then compiled by a Python X.Y found here.
# --every-python adds bytecode for every other CPython 3.6 or later found on this machine
# (python3.X on PATH, in /usr/bin and /usr/local/bin, and pyenv's).
#
# The archive starts with a /bin/sh preamble (see PREAMBLE below) that answers VERSION itself and
# execs "PATH -E -s -S" on the archive for everything else, then holds __main__.py (shiv's
# template calling cni_bridge.main), cni_bridge.py and the compiled bytecode.
# No shiv bootstrap: nothing is extracted, no SHIV_* variable is read.  The output is byte-for-byte
# reproducible: fixed timestamps (SOURCE_DATE_EPOCH, default 1980-01-01), sorted stored entries, fixed modes.
# Needs python3 with shiv (installed with pip when missing).
set -euo pipefail

usage() {
    echo "usage: $0 [--python PATH [--python-version X.Y]]... [--every-python] [install DIR [--force] | verify [CONFIG] [--keep] [--json]]" >&2
    exit 2
}

pythons=()          # "PATH" or "PATH=X.Y", in the order given
every_python=
install_args=()
verify_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --python)
            [ $# -ge 2 ] || usage
            pythons+=("$2")
            shift 2
            ;;
        --every-python)
            every_python=1
            shift
            ;;
        --python-version)
            [ $# -ge 2 ] && [ ${#pythons[@]} -gt 0 ] || usage
            case "$2" in
                [0-9].[0-9]|[0-9].[0-9][0-9]) ;;
                *) echo "build.sh: --python-version takes a version like 3.11, not '$2'" >&2; exit 2 ;;
            esac
            pythons[${#pythons[@]}-1]="${pythons[${#pythons[@]}-1]}=$2"
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
[ ${#pythons[@]} -gt 0 ] || pythons=(/usr/bin/python3)
python=${pythons[0]%=*}

cd "$(dirname "$0")"
if ! python3 -c "import shiv" 2>/dev/null; then
    echo "build.sh: installing shiv (python3 -m pip install shiv)" >&2
    python3 -m pip install --quiet shiv
fi
mkdir -p dist
EVERY_PYTHON=$every_python python3 - cni_bridge.py dist/cni-bridge.pyz "${pythons[@]}" <<'EOF'
import glob
import os
import re
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

source, target = sys.argv[1:3]
targets = [(arg.rpartition("=")[0], arg.rpartition("=")[2]) if "=" in arg else (arg, None)
           for arg in sys.argv[3:]]


def fail(message):
    sys.stderr.write("build.sh: %s\n" % message)
    sys.exit(1)


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

# The archive starts as a shell script, so that:
# - VERSION, the call runtimes make most, is answered by /bin/sh alone when the program was
#   started under a plugin name: the answer is a constant (cni_bridge.version_answer), copied
#   here byte for byte.  stdin is drained in the background until its end, so a runtime writing
#   a config larger than a pipe holds never sees EPIPE, while an idle stdin kept open delays
#   nothing.  Under any other name the program is the operator tool, even for VERSION.
# - what Python cannot report, sh does, as one CNI error on stdout: an interpreter that is
#   missing, a stdin that is a directory (CPython dies before running any code).  A closed stdin
#   becomes an empty one (else the first file Python opens would take its place).  Python 3.6
#   aborts on a malformed PYTHONHASHSEED or PYTHONMALLOC despite -E: they are cleared.
# - the interpreter runs with -E -s -S (the environment's PYTHON* variables, the user site and
#   site are ignored; what -I does, but Python 2 accepts these too and so reaches the version
#   check below), and the working directory is taken off sys.path.
# - a zip given to python directly goes through runpy, which imports a dozen modules first and
#   doubles the start-up time: instead the code reads the bytecode compiled for its own
#   interpreter (picked by magic number) straight from its place in the archive (its distance
#   from the end, so that editing the preamble moves nothing, written in once the zip is laid
#   out) and runs it; without one it imports cni_bridge.py from the
#   archive, saying so on stderr.  Import failures (a module this Python lacks) become a CNI
#   error.  The cyclic garbage collector is switched off first: a call lives for milliseconds.
#   The compiled bytes are dropped once unmarshalled, which lowers the call's peak memory.
# The zip itself still has __main__.py, so `python3 cni-bridge.pyz` works too.
PREAMBLE = """#!/bin/sh
cni=
case ${{0##*/}} in
{answers}esac
if [ "$cni" = VERSION ]; then
    if [ ! -t 0 ] && {{ true 3<&0; }} 2>/dev/null; then
        exec 3<&0
        {{ while read -r _; do :; done; }} <&3 >/dev/null 2>&1 &
    fi
    printf '%s\\n' "$answer"
    exit 0
fi
fail() {{
    [ -z "$cni" ] || printf '{{"cniVersion": "{latest}", "code": %s, "msg": "%s", "details": "%s"}}\\n' "$1" "$2" "$3"
    printf '%s: %s\\n' "${{0##*/}}" "$2" >&2
    exit 1
}}
{{ true 3<&0; }} 2>/dev/null || exec </dev/null
if [ -d /proc/self/fd/0 ]; then
    [ -z "$cni" ] || fail 5 "error reading from stdin: Is a directory" "stdin must be the network configuration"
    exec </dev/null
fi
[ -x {python} ] || fail 999 {missing_msg} {missing_details}
unset PYTHONHASHSEED PYTHONMALLOC
exec {python} -E -s -S -c 'import gc, sys, marshal
gc.disable()
if sys.path[:1] == [""]:
    del sys.path[0]
cni, archive = sys.argv[1:3]
sys.argv = sys.argv[2:]
def fail(msg, details):
    if cni:
        text = lambda s: "".join(c if " " <= c <= "~" and c not in "\\\\\\"" else "\\\\u%04x" % min(ord(c), 65533) for c in s)
        sys.stdout.write("{{\\"cniVersion\\": \\"{latest}\\", \\"code\\": 999, \\"msg\\": \\"%s\\", \\"details\\": \\"%s\\"}}\\n" % (text(msg), text(details)))
    sys.stderr.write("%s: %s (%s)\\n" % (sys.argv[0].rpartition("/")[2], msg, details))
    sys.exit(1)
if sys.version_info < (3, 6):
    fail("Python %d.%d at %s cannot run the plugins" % (sys.version_info[0], sys.version_info[1], sys.executable), "they need Python 3.6 or later")
magic = sys.modules["_frozen_importlib_external"].MAGIC_NUMBER
try:
    for compiled_for, offset, length in ({table}):
        if compiled_for == magic:
            with open(archive, "rb") as f:
                f.seek(-offset, 2)
                pyc = f.read(length)
            module = sys.modules["cni_bridge"] = type(sys)("cni_bridge")
            module.__file__ = archive + "/cni_bridge.py"
            code = marshal.loads(memoryview(pyc)[16 if sys.version_info >= (3, 7) else 12:])
            del pyc
            exec(code, module.__dict__)
            del code
            break
    else:
        sys.stderr.write("cni-bridge: no bytecode for Python %d.%d in %s: compiling cni_bridge.py on every call (build.sh --python %s adds it)\\n" % (sys.version_info[0], sys.version_info[1], archive, sys.executable))
        sys.path.insert(0, archive)
        import cni_bridge as module
except ImportError as err:
    fail("Python %d.%d lacks the module %s" % (sys.version_info[0], sys.version_info[1], err.name), "Debian: install libpython%d.%d-stdlib" % sys.version_info[:2])
except Exception as err:
    fail("Python %d.%d cannot load cni_bridge: %s: %s" % (sys.version_info[0], sys.version_info[1], type(err).__name__, err), archive)
module.main()' "$cni" "$0" "$@"
"""
TABLE_ROW = '(bytes.fromhex("%s"), %10d, %10d), '


def probe_version(path):
    """(major, minor) of the Python at `path`, or the reason it is none."""
    try:
        proc = subprocess.run([path, "-E", "-s", "-S", "-c", "import sys; sys.stdout.write('%d.%d' % sys.version_info[:2])"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as err:
        return "cannot run it: %s" % err.strerror
    if proc.returncode != 0 or not re.match(r"^\d+\.\d+$", proc.stdout.decode("ascii", "replace")):
        return "not a working Python: %s" % proc.stderr.decode("utf-8", "replace").strip()[-300:]
    return tuple(int(n) for n in proc.stdout.decode().split("."))


def interpreter_version(path):
    """(major, minor) of the Python at `path`; fails the build clearly for anything else."""
    version = probe_version(path)
    if isinstance(version, str):
        fail("--python %s: %s" % (path, version))
    if version < (3, 6):
        fail("--python %s is Python %d.%d: the plugins need Python 3.6 or later" % ((path,) + version))
    return version


def local_interpreter(version):
    """A Python `version` ("3.11") on this machine to compile with, or None."""
    candidates = [shutil.which("python" + version), "/usr/bin/python" + version, "/usr/local/bin/python" + version]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/%s.*/bin/python%s" % (version, version))),
                         key=lambda p: [int(n) for n in re.findall(r"\d+", p.split("/versions/")[1].split("/")[0])])[::-1]
    wanted = tuple(int(n) for n in version.split("."))
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK) and probe_version(candidate) == wanted:
            return candidate
    return None


def every_python():
    """Every CPython 3.6 or later on this machine: (path, (major, minor)), one per version."""
    candidates = []
    for minor in range(6, 40):
        version = "3.%d" % minor
        candidates += [shutil.which("python" + version), "/usr/bin/python" + version,
                       "/usr/local/bin/python" + version]
        candidates += glob.glob(os.path.expanduser("~/.pyenv/versions/%s.*/bin/python%s" % (version, version)))
    found = {}
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK) and "/shims/" not in candidate:
            version = probe_version(candidate)
            if isinstance(version, tuple) and version >= (3, 6):
                found.setdefault(version, candidate)
    return sorted(found.items())


def compilers():
    """[(the target path, the interpreter that compiles its bytecode)] in the order given."""
    chosen = []
    for path, version in targets:
        if os.path.exists(path):
            found = interpreter_version(path)
            if version is not None and found != tuple(int(n) for n in version.split(".")):
                fail("--python %s is Python %d.%d, not %s" % ((path,) + found + (version,)))
            chosen.append((path, path))
        elif version is None:
            fail("--python %s does not exist on this machine: add --python-version X.Y (the version the "
                 "node has there) to build for it" % path)
        else:
            local = local_interpreter(version)
            if local is None:
                fail("--python %s --python-version %s: no Python %s on this machine to compile with "
                     "(install it, e.g. with pyenv, or build on a machine that has it)" % (path, version, version))
            interpreter_version(local)
            chosen.append((path, local))
    if os.environ.get("EVERY_PYTHON"):
        chosen += [(path, path) for _, path in every_python()]
    return chosen


def pyc_place(path, name):
    """(offset, length) of entry `name`'s bytes in the finished archive."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_length + extra_length, info.file_size


def plugin_facts(copy):
    """The plugin names (PLUGINS' keys) and the VERSION answer's bytes, from the module itself."""
    sys.dont_write_bytecode = True
    sys.path.insert(0, os.path.dirname(copy))
    import cni_bridge
    answers = {}            # VERSION answer -> the plugin names giving it
    for name in sorted(cni_bridge.PLUGINS):
        if not re.match(r"^[a-z0-9][a-z0-9_.-]*$", name):
            fail("plugin name %r cannot be matched by the sh preamble" % name)
        answer = cni_bridge.json_dumps(version_answer_of(cni_bridge, name))
        if "'" in answer or "\n" in answer:
            fail("the VERSION answer cannot be quoted for sh")
        answers.setdefault(answer, []).append(name)
    return answers, cni_bridge.LATEST_VERSION


def version_answer_of(module, plugin):
    """A plugin's VERSION answer, computed with stdin at its end (it is a constant; stdin is only
    drained)."""
    saved = os.dup(0)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    try:
        return module.version_answer(plugin)
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(null)


def sh_json(text):
    """A JSON string literal, quoted for sh."""
    return shlex.quote(text.replace("\\", "\\\\").replace('"', '\\"'))


epoch = max(int(os.environ.get("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH_DEFAULT)), SOURCE_DATE_EPOCH_DEFAULT)
date_time = time.gmtime(epoch)[:6]
entry_stat = os.stat_result((0o100644,) + (0,) * 9)  # regular file, mode 0644

chosen = compilers()
python = chosen[0][0]
with tempfile.TemporaryDirectory() as scratch:
    # Compile a copy, so that neither the checkout's mtime nor its __pycache__ is touched.
    copy = os.path.join(scratch, "cni_bridge.py")
    shutil.copyfile(source, copy)
    entries = {
        "__main__.py": MAIN_TEMPLATE.format(module="cni_bridge", fn="main").encode(),
        "cni_bridge.py": open(copy, "rb").read(),
    }
    compiled = []           # entry names, the target's first, one per magic number
    magics = set()
    for index, (path, compiler) in enumerate(chosen):
        pyc = os.path.join(scratch, "%d.pyc" % index)
        subprocess.run([compiler, "-IS", "-c", COMPILE, copy, pyc, str(epoch)], check=True)
        data = open(pyc, "rb").read()
        if data[:4] in magics:
            continue
        magics.add(data[:4])
        name = "cni_bridge.pyc" if not compiled else "cni_bridge.%s.pyc" % data[:4].hex()
        entries[name] = data
        compiled.append(name)
    answers, latest = plugin_facts(copy)


def preamble(places):
    table = "".join(TABLE_ROW % (entries[name][:4].hex(), offset, length)
                    for name, (offset, length) in zip(compiled, places))
    return PREAMBLE.format(
        answers="".join("%s)\n    cni=$CNI_COMMAND answer=%s;;\n" % ("|".join(names), shlex.quote(answer))
                        for answer, names in answers.items()),
        latest=latest,
        python=shlex.quote(python), table=table,
        missing_msg=sh_json("Python interpreter %s not found" % python),
        missing_details=sh_json("the archive was built for %s: install it, or rebuild with build.sh --python PATH" % python),
    ).encode()


temp = "%s.%d.tmp" % (target, os.getpid())
try:
    with open(temp, "wb") as out:
        # The numbers are fixed-width, so filling them in below moves nothing.
        out.write(preamble([(0, 0)] * len(compiled)))
        # Stored, not deflated: read in place at start-up, no dependence on the zlib version.
        with zipfile.ZipFile(out, "w") as archive:
            for name in sorted(entries):
                write_to_zipapp(archive, name, entries[name], date_time, zipfile.ZIP_STORED, stat=entry_stat)
    size = os.path.getsize(temp)
    places = [(size - offset, length) for offset, length in (pyc_place(temp, name) for name in compiled)]
    with open(temp, "r+b") as out:
        out.write(preamble(places))
    os.chmod(temp, 0o755)
    os.rename(temp, target)
except BaseException:
    os.unlink(temp)
    raise
print("built %s for %s" % (target, ", ".join(path for path, _ in chosen)))
EOF

if [ ${#install_args[@]} -gt 0 ]; then
    python3 -IS dist/cni-bridge.pyz "${install_args[@]}"     # any Python 3 copies it
fi
if [ ${#verify_args[@]} -gt 0 ]; then
    exec dist/cni-bridge.pyz "${verify_args[@]}"
fi
