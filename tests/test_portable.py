"""Portability (issues 14, 18 and 20 item 9): VERSION from the archive's /bin/sh preamble, no
traceback whatever the interpreter lacks, and the smallest Python a node can carry.

- VERSION under a plugin name is answered by sh alone (strace: no interpreter started), with the
  very bytes the Python path prints, stdin drained however large, whatever the environment.
- What Python cannot report the preamble does, as one CNI error: a missing interpreter, Python 2,
  a stdin that is a directory; a closed stdin is an empty one; import failures are CNI errors.
- build.sh: bytecode for several interpreters, --python for a path this machine lacks.
- python3-minimal: a root filesystem made of Debian's python3.11-minimal and
  libpython3.11-minimal (apt-get download, dpkg -x) plus the libraries they link and dash, the
  installed archive bind-mounted read-only, the walkthrough run in a chroot inside the test's
  namespaces.  For 3.12 and 3.13 (no minimal package for them in this machine's Debian release)
  the stand-in is pyenv's interpreter with lib-dynload cut down to MINIMAL_EXTENSIONS and the
  pure-Python library to libpython3.11-minimal's file list.
- The pure-Python JSON codec against the C one, on test_hostile's corpus.
"""
import glob
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import (IP, PLUGIN_NAMES, PYENV, PYTHON_MATRIX, archive_for, build_archive, cni_env, encode_conf,
                           parse_output, pyenv_interpreter)

pytestmark = pytest.mark.kernel

VERSION_ANSWER = (b'{"cniVersion": "1.1.0", "supportedVersions": ["0.1.0", "0.2.0", "0.3.0", "0.3.1", '
                  b'"0.4.0", "1.0.0", "1.1.0"]}\n')
STRACE = shutil.which("strace")
FIRST_VERSION = {"firewall": "0.4.0"}      # the reference firewall speaks 0.4.0 and later


def version_answer_of(plugin):
    """The VERSION answer bytes through `plugin`: every version from the plugin's first."""
    versions = ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
    supported = versions[versions.index(FIRST_VERSION.get(plugin, "0.1.0")):]
    return ('{"cniVersion": "1.1.0", "supportedVersions": %s}\n' % json.dumps(supported)).encode()


def build_copy(workdir, *args, check=True):
    proc, archive = build_archive(workdir, *args)
    if check:
        assert proc.returncode == 0, proc
    return proc, archive


def needs_pyenv(version):
    return pytest.mark.skipif(pyenv_interpreter(version) is None,
                              reason="Python %s not found under %s" % (version, PYENV))


def call(argv, command="VERSION", conf=b"", env=None, stdin=None, timeout=60, **cni):
    """Run argv with a CNI environment and `conf` on stdin (or the file object `stdin`)."""
    kwargs = {"stdin": stdin} if stdin is not None else {"input": encode_conf(conf)}
    proc = subprocess.run([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=timeout, env=cni_env(command, "/nonexistent", env=env, **cni), **kwargs)
    return proc


def assert_cni_error(proc, code):
    """One CNI error object on stdout, a non-zero exit, no traceback anywhere."""
    result = parse_output(proc)
    assert proc.returncode != 0, result
    assert isinstance(result.json, dict) and result.json["code"] == code, result
    assert proc.stdout.count(b"\n") == 1, result
    assert b"Traceback" not in proc.stderr and b"Fatal Python error" not in proc.stderr, result
    return result.json


@pytest.fixture(scope="session")
def installed_archive(ours_bin):
    return Path(os.path.realpath(str(ours_bin / "bridge")))


# --- VERSION from /bin/sh ------------------------------------------------------------------------

@pytest.mark.skipif(STRACE is None, reason="strace not installed (apt-get install strace)")
@pytest.mark.parametrize("plugin", PLUGIN_NAMES)
def test_version_starts_no_interpreter(ours_bin, plugin, tmp_path):
    """The only program executed for VERSION is the plugin itself (its #!/bin/sh)."""
    trace = tmp_path / "trace"
    proc = call([STRACE, "-f", "-qq", "-e", "trace=execve", "-o", trace, ours_bin / plugin],
                conf={"cniVersion": "1.0.0", "name": "n", "type": plugin})
    assert proc.returncode == 0, proc
    assert proc.stdout == version_answer_of(plugin)
    execs = [line for line in trace.read_text().splitlines() if "execve(" in line]
    assert len(execs) == 1 and str(ours_bin / plugin) in execs[0], execs
    assert "python" not in trace.read_text()


@pytest.mark.parametrize("stdin", [b"", b'{"cniVersion": "0.3.1"}', b'{"cniVersion": "9.9"}', b"not json",
                                   b'{"cniVersion": "1.0.0", "name": "n", "type": "bridge"}\n'])
@pytest.mark.parametrize("plugin", PLUGIN_NAMES)
def test_version_same_bytes_from_sh_and_python(ours_bin, plugin, stdin):
    """The preamble's answer and the module's (`python3 -IS <plugin>` runs the zip's __main__)."""
    from_sh = call([ours_bin / plugin], conf=stdin)
    from_python = call(["/usr/bin/python3", "-IS", ours_bin / plugin], conf=stdin)
    assert from_sh.returncode == from_python.returncode == 0, (from_sh, from_python)
    assert from_sh.stdout == from_python.stdout == version_answer_of(plugin)
    assert from_sh.stderr == b""


def test_version_drains_stdin_larger_than_a_pipe(ours_bin):
    """A runtime that writes 4 MiB of config, then waits: every byte is taken (no EPIPE), exit 0."""
    data = b'{"cniVersion": "1.0.0", "name": "big", "type": "bridge", "pad": "' + b"x" * (4 << 20) + b'"}'
    proc = subprocess.Popen([str(ours_bin / "bridge")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=cni_env("VERSION", ours_bin))
    try:
        written = 0
        while written < len(data):          # BrokenPipeError here would be the EPIPE a runtime sees
            written += os.write(proc.stdin.fileno(), data[written:written + (1 << 16)])
        proc.stdin.close()
        proc.wait(timeout=60)
        stdout, stderr = proc.stdout.read(), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert stdout == VERSION_ANSWER


def test_version_answer_ignores_the_environment(ours_bin):
    """Nothing a runtime or a caller sets changes the bytes or the status."""
    plain = call([ours_bin / "bridge"])
    steering = {"IFS": "{}\"", "PATH": "", "ENV": "/nonexistent/env", "LC_ALL": "tr_TR.ISO-8859-9", "LANG": "C",
                "PYTHONHASHSEED": "bogus", "PYTHONMALLOC": "bogus", "PYTHONPATH": "/tmp", "CNI_ARGS": ";;=",
                "CNI_NETNS": "dummy", "CNI_IFNAME": "dummy", "CNI_PATH": "dummy", "POSIXLY_CORRECT": "1",
                "BASH_ENV": "/nonexistent/bashenv", "CDPATH": "/", "PS4": "$(false)"}
    steered = call([ours_bin / "bridge"], env=steering)
    assert plain.returncode == steered.returncode == 0
    assert plain.stdout == steered.stdout == VERSION_ANSWER


def test_version_under_another_name_is_the_operator_tool(installed_archive):
    """Started as cni-bridge.pyz (or any name that is not a plugin's) VERSION is not answered:
    the program is the operator's command line."""
    proc = call([installed_archive])
    assert proc.stdout != VERSION_ANSWER
    assert b"usage:" in proc.stdout + proc.stderr


@pytest.mark.parametrize("shell", ["dash", "busybox sh", "bash --posix"])
def test_preamble_runs_under_posix_shells(ours_bin, shell):
    """The preamble is POSIX sh: dash, busybox's ash and bash in POSIX mode give the same answers."""
    argv = shell.split()
    if shutil.which(argv[0]) is None:
        pytest.skip("%s not installed" % argv[0])
    version = call(argv + [ours_bin / "loopback"], conf=b'{"cniVersion": "1.0.0"}')
    assert version.returncode == 0 and version.stdout == VERSION_ANSWER, version
    missing_env = call(argv + [ours_bin / "loopback"], command="ADD", container_id=None)
    assert_cni_error(missing_env, 4)


# --- no traceback: what Python cannot report ------------------------------------------------------

FULL_ENV = {"container_id": "ctr1", "netns": "/run/netns/cbt-none", "ifname": "eth0"}


@pytest.mark.parametrize("plugin", PLUGIN_NAMES)
def test_stdin_that_is_a_directory(ours_bin, plugin):
    """`bridge < /`: CPython would die initialising sys.stdin; the preamble answers code 5.
    VERSION does not read a config, so it still answers."""
    root = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        added = call([ours_bin / plugin], command="ADD", stdin=root, **FULL_ENV)
        error = assert_cni_error(added, 5)
        assert "directory" in error["msg"], error
        version = call([ours_bin / plugin], stdin=root)
    finally:
        os.close(root)
    assert version.returncode == 0 and version.stdout == version_answer_of(plugin)


@pytest.mark.parametrize("command", ["VERSION", "ADD"])
def test_closed_stdin_is_an_empty_stdin(ours_bin, command):
    """`bridge <&-` answers exactly as `bridge </dev/null` does (VERSION: the answer; ADD: the
    empty config's decode error)."""
    closed = call(["sh", "-c", 'exec "$0" <&-', ours_bin / "bridge"], command=command, stdin=subprocess.DEVNULL,
                  **FULL_ENV)
    empty = call([ours_bin / "bridge"], command=command, stdin=subprocess.DEVNULL, **FULL_ENV)
    assert (closed.returncode, closed.stdout) == (empty.returncode, empty.stdout)
    if command == "VERSION":
        assert closed.stdout == VERSION_ANSWER and closed.returncode == 0
    else:
        assert_cni_error(closed, 6)


def test_interpreter_that_does_not_exist(installed_archive, tmp_path):
    bin_dir = archive_for(installed_archive, tmp_path, "/nonexistent/bin/python3")
    error = assert_cni_error(call([bin_dir / "bridge"], command="ADD", **FULL_ENV), 999)
    assert error["msg"] == "Python interpreter /nonexistent/bin/python3 not found"
    assert call([bin_dir / "bridge"]).stdout == VERSION_ANSWER        # sh alone still answers


@needs_pyenv("2.7")
def test_python_2_at_the_interpreter_path(installed_archive, tmp_path):
    bin_dir = archive_for(installed_archive, tmp_path, pyenv_interpreter("2.7"))
    error = assert_cni_error(call([bin_dir / "loopback"], command="DEL", **FULL_ENV), 999)
    assert "Python 2.7" in error["msg"] and "3.6 or later" in error["details"], error


@needs_pyenv("3.12")
def test_another_interpreter_compiles_the_source_and_says_so_once(installed_archive, tmp_path):
    """An archive compiled for /usr/bin/python3 run by 3.12 (a node upgrade): correct answers,
    one line on stderr saying why it is slow."""
    bin_dir = archive_for(installed_archive, tmp_path, pyenv_interpreter("3.12"))
    proc = call([bin_dir / "bridge"], command="ADD", container_id=None)
    assert_cni_error(proc, 4)
    assert proc.stderr.count(b"no bytecode for Python 3.12") == 1, proc.stderr
    assert proc.stderr.count(b"\n") == 1, proc.stderr


# --- build.sh: several interpreters, an interpreter this machine lacks -------------------------------

def test_build_for_a_path_this_machine_lacks(tmp_path):
    """Without its version: a clear refusal.  With it: bytecode from a local Python of that
    version, and the preamble names the node's path."""
    refused, _ = build_copy(tmp_path / "a", "--python", "/opt/node/bin/python3", check=False)
    assert refused.returncode != 0
    assert b"--python-version" in refused.stderr and b"Traceback" not in refused.stderr, refused
    unknown, _ = build_copy(tmp_path / "b", "--python", "/opt/node/bin/python3", "--python-version", "3.4",
                            check=False)
    assert unknown.returncode != 0 and b"no Python 3.4 on this machine" in unknown.stderr, unknown
    assert b"Traceback" not in unknown.stderr
    _, archive = build_copy(tmp_path / "c", "--python", "/opt/node/bin/python3", "--python-version", "3.11")
    data = archive.read_bytes()
    assert b"\nexec /opt/node/bin/python3 -E -s -S -c " in data[:8192]
    import zipfile
    with zipfile.ZipFile(str(archive)) as zf:
        assert zf.read("cni_bridge.pyc")[:4] == subprocess.run(
            ["/usr/bin/python3", "-IS", "-c",
             "import importlib.util as u, sys; sys.stdout.buffer.write(u.MAGIC_NUMBER)"],
            stdout=subprocess.PIPE, check=True).stdout


@needs_pyenv("2.7")
def test_build_refuses_python_2(tmp_path):
    proc, _ = build_copy(tmp_path / "a", "--python", pyenv_interpreter("2.7"), check=False)
    assert proc.returncode != 0 and b"Python 2.7" in proc.stderr and b"Traceback" not in proc.stderr, proc


# --- python3-minimal nodes: a chroot per interpreter -------------------------------------------------

DEBIAN_MINIMAL = ("python3.11-minimal", "libpython3.11-minimal")
# The extension modules a minimal Python has: those Debian builds into python3.X-minimal's
# interpreter (sys.builtin_module_names of Debian 12's /usr/bin/python3.11) and the two that
# libpython3.X-minimal ships in lib-dynload (_hashlib, _ssl); 3.12 merged _sha256 and _sha512
# into _sha2.  Missing, as on such a node: _json, _ctypes, _decimal, _asyncio, ...
MINIMAL_EXTENSIONS = frozenset(
    "_bisect _blake2 _csv _datetime _elementtree _heapq _md5 _opcode _pickle _posixsubprocess _random "
    "_sha1 _sha2 _sha256 _sha3 _sha512 _socket _statistics _struct array binascii cmath fcntl grp math "
    "pyexpat select spwd syslog unicodedata zlib _hashlib _ssl".split())
# Runs "$@" chrooted into $1 with /proc, /run/netns (for CNI_NETNS) and /dev/null from the host and
# the archive $2 bind-mounted read-only at /opt/cni/bin/cni-bridge.pyz (all in a private mount
# namespace: nothing shows outside).
CHROOT = ('root=$1 archive=$2; shift 2; '
          'mount -t proc proc "$root/proc" && mount --rbind /run/netns "$root/run/netns" && '
          'mount --bind /dev/null "$root/dev/null" && '
          'mount --bind "$archive" "$root/opt/cni/bin/cni-bridge.pyz" && '
          'mount -o remount,bind,ro "$root/opt/cni/bin/cni-bridge.pyz" && exec chroot "$root" "$@"')


def copy_into(root, path):
    """Copy file `path` (symlinks resolved) to the same place under `root`."""
    target = root / str(path).lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        shutil.copy2(os.path.realpath(str(path)), str(target))


def copy_libraries(root, binary):
    """The shared libraries `binary` needs (ldd), from this machine, to their places under root."""
    out = subprocess.run(["ldd", str(binary)], stdout=subprocess.PIPE, universal_newlines=True).stdout
    for line in out.splitlines():
        words = line.split()
        path = words[2] if "=>" in words and len(words) > 2 else words[0]
        if path.startswith("/"):
            copy_into(root, path)


def finish_root(root, python):
    """dash as /bin/sh, python3 -> `python`, the mount points CHROOT uses, the plugin links."""
    copy_into(root, "/bin/dash")
    copy_libraries(root, "/bin/dash")
    (root / "bin" / "sh").symlink_to("dash")
    (root / "usr" / "bin" / "python3").symlink_to(python)
    for directory in ("proc", "run/netns", "dev", "opt/cni/bin", "state"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / "dev" / "null").touch()
    (root / "opt" / "cni" / "bin" / "cni-bridge.pyz").touch()
    for name in PLUGIN_NAMES:
        (root / "opt" / "cni" / "bin" / name).symlink_to("cni-bridge.pyz")
    for so in glob.glob(str(root / "usr/lib/python3*/lib-dynload/*.so")):
        copy_libraries(root, so)
    return root


@pytest.fixture(scope="session")
def debian_minimal(tmp_path_factory):
    """Debian's python3.11-minimal and libpython3.11-minimal, unpacked (skips when they cannot be
    fetched)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        pytest.skip("apt-get and dpkg are needed to fetch %s" % " and ".join(DEBIAN_MINIMAL))
    where = tmp_path_factory.mktemp("debs")
    try:
        proc = subprocess.run(["apt-get", "download"] + list(DEBIAN_MINIMAL), cwd=str(where), timeout=180,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    except subprocess.TimeoutExpired:
        pytest.skip("apt-get download %s timed out" % " ".join(DEBIAN_MINIMAL))
    debs = sorted(where.glob("*.deb"))
    if proc.returncode != 0 or len(debs) != len(DEBIAN_MINIMAL):
        pytest.skip("cannot fetch %s: %s" % (" ".join(DEBIAN_MINIMAL), proc.stderr.strip()[-300:]))
    unpacked = where / "root"
    for deb in debs:
        subprocess.run(["dpkg", "-x", str(deb), str(unpacked)], check=True, timeout=120)
    return unpacked


@pytest.fixture(scope="session")
def root_311(debian_minimal, tmp_path_factory):
    root = tmp_path_factory.mktemp("minimal311") / "root"
    shutil.copytree(str(debian_minimal), str(root), symlinks=True)
    copy_libraries(root, root / "usr/bin/python3.11")
    return finish_root(root, "python3.11")


def place(root, source, relative):
    """Copy file `source` (symlinks resolved) to `relative` under `root`."""
    target = root / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(os.path.realpath(str(source)), str(target))


def pyenv_minimal_root(debian_minimal, tmp_path_factory, version):
    """pyenv's `version` cut down to a python3-minimal: the interpreter and libpython at /usr,
    lib-dynload limited to MINIMAL_EXTENSIONS, the pure-Python files libpython3.11-minimal has."""
    python = pyenv_interpreter(version)
    if python is None:
        pytest.skip("Python %s not found under %s" % (version, PYENV))
    prefix = Path(python).parent.parent
    root = tmp_path_factory.mktemp("minimal" + version.replace(".", "")) / "root"
    place(root, python, "usr/bin/python" + version)
    library = "libpython%s.so.1.0" % version
    place(root, prefix / "lib" / library, "usr/lib/x86_64-linux-gnu/" + library)
    copy_libraries(root, python)
    shutil.rmtree(str(root / "root"), ignore_errors=True)        # pyenv's own libpython, placed above
    stdlib_311 = debian_minimal / "usr/lib/python3.11"
    stdlib = prefix / "lib" / ("python" + version)
    ours = "usr/lib/python" + version
    for path in stdlib_311.rglob("*.py"):
        relative = path.relative_to(stdlib_311)
        if (stdlib / relative).is_file():
            place(root, stdlib / relative, "%s/%s" % (ours, relative))
    for so in (stdlib / "lib-dynload").glob("*.so"):
        if so.name.split(".")[0] in MINIMAL_EXTENSIONS:
            place(root, so, "%s/lib-dynload/%s" % (ours, so.name))
    return finish_root(root, "python" + version)


def chroot_cni(root, archive, node, plugin, command, conf=b"", netns=None, args=(), **cni):
    """Run /opt/cni/bin/<plugin> in a chroot into `root`, inside `node`, as a runtime would
    (env -i style: CNI_* and PATH only, so the C locale)."""
    argv = [IP, "netns", "exec", node.name, "unshare", "--mount", "--propagation", "private",
            "sh", "-c", CHROOT, "sh", str(root), str(archive), "/opt/cni/bin/" + plugin] + list(args)
    env = cni_env(command, "/opt/cni/bin", netns=netns, **cni)
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    return subprocess.run(argv, input=encode_conf(conf), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=env, timeout=60)


def minimal_conf(data_dir, **extra):
    conf = {"cniVersion": "1.1.0", "name": "minnet", "type": "bridge", "bridge": "cbt-min0",
            "isGateway": True, "ipMasq": True,
            "ipam": {"type": "host-local", "subnet": "10.99.7.0/24", "dataDir": data_dir}}
    conf.update(extra)
    return conf


def ok(proc):
    assert proc.returncode == 0, parse_output(proc)
    assert b"Traceback" not in proc.stderr and b"no bytecode" not in proc.stderr, proc.stderr
    return parse_output(proc).json


def ruleset(node):
    return node.run("nft", "list", "ruleset").stdout


@pytest.mark.slow
def test_python311_minimal_node(root_311, installed_archive, node, container):
    """Debian's python3.11-minimal (no _json, no _ctypes, no os.setns): VERSION, host-local,
    STATUS, GC and DEL of a vanished namespace work; what needs a namespace says what is missing,
    before changing anything; the operator's verify says so too."""
    data_dir = "/state/%s-\u00e9t\u00e9" % node.name            # non-ASCII under the C locale
    on_disk = root_311 / data_dir.lstrip("/") / "minnet"
    cni = lambda *a, **k: chroot_cni(root_311, installed_archive, node, *a, **k)  # noqa: E731
    for name in PLUGIN_NAMES:
        assert ok(cni(name, "VERSION")) == json.loads(version_answer_of(name))
    conf = minimal_conf(data_dir)
    lo_conf = {"cniVersion": "1.1.0", "name": "lo", "type": "loopback"}
    for plugin, plugin_conf in (("bridge", conf), ("loopback", lo_conf)):
        error = assert_cni_error(cni(plugin, "ADD", plugin_conf, netns=container), 999)
        assert "_ctypes" in error["msg"] and "libpython3.11-stdlib" in error["msg"], error
    for plugin, command, plugin_conf in (("bridge", "CHECK", dict(conf, prevResult={"cniVersion": "1.1.0"})),
                                         ("loopback", "DEL", lo_conf), ("bridge", "DEL", conf)):
        error = assert_cni_error(cni(plugin, command, plugin_conf, netns=container), 999)
        assert "_ctypes" in error["msg"], (command, error)
    assert sorted(node.links()) == ["lo"] and sorted(container.links()) == ["lo"]
    assert not on_disk.exists()
    assert_cni_error(cni("bridge", "ADD", b'{"cniVersion": "1.1.0", "name": "minnet",', netns=container), 6)

    ipam_conf = {"cniVersion": "1.1.0", "name": "minnet", "ipam": conf["ipam"]}
    added = ok(cni("host-local", "ADD", ipam_conf, netns=container))
    assert added["ips"][0]["address"] == "10.99.7.2/24"
    assert (on_disk / "10.99.7.2").read_text().startswith("ctr1")
    ok(cni("host-local", "CHECK", dict(ipam_conf, prevResult=added), netns=container))
    ok(cni("host-local", "DEL", ipam_conf, netns=container))
    assert not (on_disk / "10.99.7.2").exists()
    ok(cni("bridge", "STATUS", conf))
    ok(cni("bridge", "GC", dict(conf, **{"cni.dev/valid-attachments": []})))
    ok(cni("bridge", "DEL", conf, netns="/run/netns/cbt-vanished-0"))

    verify = chroot_cni(root_311, installed_archive, node, "cni-bridge.pyz", "", args=["verify"])
    assert verify.returncode == 1 and b"Traceback" not in verify.stderr, verify
    assert b"_ctypes" in verify.stderr and b"libpython3.11-stdlib" in verify.stderr, verify.stderr
    assert ok(chroot_cni(root_311, installed_archive, node, "cni-bridge.pyz", "", args=["--version"])) is None
    leases = chroot_cni(root_311, installed_archive, node, "cni-bridge.pyz", "",
                        args=["leases", "--data-dir", "/state"])
    assert leases.returncode == 0 and b"Traceback" not in leases.stderr, leases


@pytest.mark.slow
@pytest.mark.parametrize("version", ["3.12", "3.13"])
def test_python312_plus_minimal_node(version, debian_minimal, tmp_path_factory, multi_archive, node, container):
    """A minimal 3.12+ (os.setns, _sha2; no _json, no _ctypes): the whole walkthrough, bridge
    with masquerade included, read back from the kernel; verify names what it lacks; a module
    missing from the interpreter is a CNI error."""
    root = pyenv_minimal_root(debian_minimal, tmp_path_factory, version)
    data_dir = "/state/%s-\u00e9t\u00e9" % node.name
    on_disk = root / data_dir.lstrip("/") / "minnet"
    cni = lambda *a, **k: chroot_cni(root, multi_archive, node, *a, **k)  # noqa: E731
    for name in PLUGIN_NAMES:
        assert cni(name, "VERSION").stdout == version_answer_of(name)
    conf = minimal_conf(data_dir)
    added = ok(cni("bridge", "ADD", conf, netns=container))
    assert added["ips"][0]["address"] == "10.99.7.2/24", added
    assert ("inet", "10.99.7.2/24") in container.addrs("eth0")
    assert (on_disk / "10.99.7.2").is_file()
    assert "masquerade" in ruleset(node)
    container.run("ping", "-c", "1", "-W", "2", "10.99.7.1")
    ok(cni("bridge", "CHECK", dict(conf, prevResult=added), netns=container))
    ok(cni("bridge", "STATUS", conf))
    ok(cni("bridge", "GC", dict(conf, **{"cni.dev/valid-attachments": [{"containerID": "ctr1", "ifname": "eth0"}]})))
    assert ("inet", "10.99.7.2/24") in container.addrs("eth0")
    container.run("ip", "link", "set", "lo", "down")
    lo_conf = {"cniVersion": "1.1.0", "name": "lo", "type": "loopback"}
    ok(cni("loopback", "ADD", lo_conf, netns=container))
    assert "UP" in container.links()["lo"]["flags"]
    ok(cni("bridge", "DEL", dict(conf, prevResult=added), netns=container))
    assert "eth0" not in container.links()
    assert not (on_disk / "10.99.7.2").exists()
    assert "10.99.7.2" not in ruleset(node)

    verify = chroot_cni(root, multi_archive, node, "cni-bridge.pyz", "", args=["verify"])
    assert verify.returncode == 1 and b"Traceback" not in verify.stderr, verify
    assert ("libpython%s-stdlib" % version).encode() in verify.stderr, verify.stderr
    for so in (root / "usr/lib" / ("python" + version) / "lib-dynload").glob("_struct.*"):
        so.unlink()
    error = assert_cni_error(cni("bridge", "ADD", conf, netns=container), 999)
    assert error["msg"] == "Python %s lacks the module _struct" % version, error


# --- STATUS only counts (issue 18, part 3) -----------------------------------------------------------

@pytest.mark.skipif(STRACE is None, reason="strace not installed (apt-get install strace)")
def test_status_only_counts(ours_bin, node, data_dir, tmp_path):
    """containerd 2.x sends STATUS every few seconds: with reservations present, bridge and
    host-local STATUS list the state directory once and open, lock, create or send nothing."""
    ipam = {"type": "host-local", "subnet": "10.97.5.0/24", "dataDir": str(data_dir)}
    for n in range(3):
        added = call([ours_bin / "host-local"], "ADD", {"cniVersion": "1.1.0", "name": "stat", "ipam": ipam},
                     netns="/run/netns/none", container_id="ctr%d" % n, env={"CNI_PATH": str(ours_bin)})
        assert added.returncode == 0, added
    for plugin in ("bridge", "host-local"):
        conf = {"cniVersion": "1.1.0", "name": "stat", "type": plugin, "bridge": "cbt-st0", "ipam": ipam}
        trace = tmp_path / ("trace-" + plugin)
        proc = call([STRACE, "-f", "-qq", "-e", "trace=openat,open,mkdir,mkdirat,flock,socket,unlink,rename",
                     "-o", trace, IP, "netns", "exec", node.name, ours_bin / plugin], "STATUS", conf,
                    env={"CNI_PATH": str(ours_bin)})
        assert proc.returncode == 0 and proc.stdout == b"", parse_output(proc)
        calls = [line for line in trace.read_text().splitlines() if str(data_dir) in line]
        assert len(calls) == 1 and "O_DIRECTORY" in calls[0], calls
        ours = trace.read_text().split(str(ours_bin / plugin), 1)[1]      # after ip's own work
        assert "socket(" not in ours and "flock(" not in ours and "mkdir" not in ours, ours


# --- a bridge that fills (issue 18, part 2) ---------------------------------------------------------

def test_bridge_ports_carry_no_ipv6_and_ipv6_containers_still_talk(ours_bin, node, make_netns, data_dir):
    """The host veth gets no IPv6 address (addr_gen_mode none: no DAD or MLD of its own at each
    ADD) and arp_notify goes over netlink; dual-stack containers still reach each other and the
    gateway over IPv6 and IPv4, and link-local multicast between them works."""
    from tests.helpers import run_cni
    containers = [make_netns("ct"), make_netns("ct")]
    conf = {"cniVersion": "1.1.0", "name": "v6net", "type": "bridge", "bridge": "cbt-v6br", "isGateway": True,
            "ipam": {"type": "host-local", "dataDir": str(data_dir),
                     "ranges": [[{"subnet": "10.96.8.0/24"}], [{"subnet": "fd96:8::/64"}]]}}
    results = []
    for n, container in enumerate(containers):
        added = run_cni(ours_bin, "bridge", "ADD", conf, node=node, netns=container, container_id="v6-%d" % n)
        assert added.returncode == 0, added
        results.append(added.json)
    links = node.links()
    ports = [name for name, link in links.items() if link.get("master") == "cbt-v6br"]
    assert len(ports) == 2, links
    for port in ports:
        assert [a for a in node.addrs(port) if a[0] == "inet6"] == [], node.addrs(port)
        assert links[port].get("inet6_addr_gen_mode") == "none", links[port]
    assert [a for a in node.addrs("cbt-v6br") if a[1] == "fd96:8::1/64"], node.addrs("cbt-v6br")
    v4 = [[ip["address"].split("/")[0] for ip in r["ips"] if ":" not in ip["address"]][0] for r in results]
    v6 = [[ip["address"].split("/")[0] for ip in r["ips"] if ":" in ip["address"]][0] for r in results]
    for container in containers:
        assert container.sysctl("net/ipv4/conf/eth0/arp_notify") == "1"
        assert [a for a in container.addrs("eth0") if a[1].startswith("fe80:")], container.addrs("eth0")
    first = containers[0]
    # The bridge's gateway address is new: it stays tentative for the node's DAD (about a second).
    import time
    deadline = time.monotonic() + 10
    while "tentative" in node.run(IP, "-6", "addr", "show", "dev", "cbt-v6br").stdout and time.monotonic() < deadline:
        time.sleep(0.2)
    first.run("ping", "-6", "-c", "1", "-W", "2", v6[1])
    first.run("ping", "-6", "-c", "1", "-W", "2", "fd96:8::1")
    first.run("ping", "-c", "1", "-W", "2", v4[1])
    other_ll = [a[1].split("/")[0] for a in containers[1].addrs("eth0") if a[1].startswith("fe80:")][0]
    first.run("ping", "-6", "-c", "1", "-W", "2", other_ll + "%eth0")
    multicast = first.run("ping", "-6", "-c", "2", "-i", "0.5", "-W", "2", "-I", "eth0", "ff02::1", check=False)
    assert other_ll in multicast.stdout, multicast.stdout
    for n, container in enumerate(containers):
        deleted = run_cni(ours_bin, "bridge", "DEL", dict(conf, prevResult=results[n]), node=node, netns=container,
                          container_id="v6-%d" % n)
        assert deleted.returncode == 0, deleted
    assert [name for name, link in node.links().items() if link.get("master") == "cbt-v6br"] == []


@pytest.mark.parametrize("version", [pytest.param(v, marks=needs_pyenv(v)) for v in ("3.11", "3.12", "3.13")])
def test_sha512_from_the_built_in_module(version):
    """Masquerade comments hash with the built-in SHA-512 (_sha512, or _sha2 from 3.12), never
    OpenSSL's _hashlib (3-5 ms and 3.5 MB more per call) nor hashlib."""
    from tests.helpers import REPO
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import cni_bridge as cb; h = cb.sha512_hex('n\\u00e9t'); "
            "print(h, sorted(m for m in ('_hashlib', 'hashlib', '_sha2', '_sha512') if m in sys.modules))")
    out = subprocess.run([pyenv_interpreter(version), "-IS", "-c", code, str(REPO)], stdout=subprocess.PIPE,
                         check=True, universal_newlines=True).stdout.split(" ", 1)
    import hashlib
    assert out[0] == hashlib.sha512("n\u00e9t".encode()).hexdigest()
    assert out[1].strip() == ("['_sha2']" if version != "3.11" else "['_sha512']")


def test_build_every_python_found(tmp_path):
    """--every-python: bytecode for each CPython 3.6+ on this machine, one entry per magic number."""
    import zipfile
    _, archive = build_copy(tmp_path / "a", "--every-python")
    with zipfile.ZipFile(str(archive)) as zf:
        magics = set(zf.read(name)[:4] for name in zf.namelist() if name.endswith(".pyc"))
        assert len(magics) == len([n for n in zf.namelist() if n.endswith(".pyc")])
    for version in PYTHON_MATRIX:
        python = pyenv_interpreter(version)
        if python:
            magic = subprocess.run([python, "-IS", "-c", "import importlib.util as u, sys; "
                                    "sys.stdout.buffer.write(u.MAGIC_NUMBER)"], stdout=subprocess.PIPE, check=True)
            assert magic.stdout in magics, version
