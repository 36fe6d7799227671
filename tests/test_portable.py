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
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import IP, PLUGIN_NAMES, REPO, cni_env, encode_conf, parse_output

VERSION_ANSWER = (b'{"cniVersion": "1.1.0", "supportedVersions": ["0.1.0", "0.2.0", "0.3.0", "0.3.1", '
                  b'"0.4.0", "1.0.0", "1.1.0"]}\n')
PYENV = "/root/.pyenv/versions"
STRACE = shutil.which("strace")


def pyenv_python(version):
    found = sorted(glob.glob("%s/%s.*/bin/python%s" % (PYENV, version, version)),
                   key=lambda p: [int(n) for n in p.split("/versions/")[1].split("/")[0].split(".")])
    return found[-1] if found else None


def needs_pyenv(version):
    return pytest.mark.skipif(pyenv_python(version) is None,
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


def archive_for(source, tmp_path, interpreter=None):
    """A copy of archive `source` (an installation's cni-bridge.pyz) whose preamble runs
    `interpreter` instead of /usr/bin/python3, with every plugin name linked to it."""
    data = Path(source).read_bytes()
    if interpreter is not None:
        data = data.replace(b"/usr/bin/python3", str(interpreter).encode())
    directory = tmp_path / "bin"
    directory.mkdir(exist_ok=True)
    archive = directory / "cni-bridge.pyz"
    archive.write_bytes(data)
    archive.chmod(0o755)
    for name in PLUGIN_NAMES:
        if not (directory / name).is_symlink():
            (directory / name).symlink_to("cni-bridge.pyz")
    return directory


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
    assert proc.stdout == VERSION_ANSWER
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
    assert from_sh.stdout == from_python.stdout == VERSION_ANSWER
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
    assert version.returncode == 0 and version.stdout == VERSION_ANSWER


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
    bin_dir = archive_for(installed_archive, tmp_path, pyenv_python("2.7"))
    error = assert_cni_error(call([bin_dir / "loopback"], command="DEL", **FULL_ENV), 999)
    assert "Python 2.7" in error["msg"] and "3.6 or later" in error["details"], error


@needs_pyenv("3.12")
def test_another_interpreter_compiles_the_source_and_says_so_once(installed_archive, tmp_path):
    """An archive compiled for /usr/bin/python3 run by 3.12 (a node upgrade): correct answers,
    one line on stderr saying why it is slow."""
    bin_dir = archive_for(installed_archive, tmp_path, pyenv_python("3.12"))
    proc = call([bin_dir / "bridge"], command="ADD", container_id=None)
    assert_cni_error(proc, 4)
    assert proc.stderr.count(b"no bytecode for Python 3.12") == 1, proc.stderr
    assert proc.stderr.count(b"\n") == 1, proc.stderr


# --- build.sh: several interpreters, an interpreter this machine lacks -------------------------------

def build_copy(workdir, *args, check=True):
    workdir.mkdir(exist_ok=True)
    for name in ("build.sh", "cni_bridge.py"):
        shutil.copy2(str(REPO / name), str(workdir / name))
    proc = subprocess.run([str(workdir / "build.sh")] + [str(a) for a in args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=300, cwd="/")
    if check:
        assert proc.returncode == 0, proc
    return proc, workdir / "dist" / "cni-bridge.pyz"


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
            ["/usr/bin/python3", "-IS", "-c", "import importlib.util as u, sys; sys.stdout.buffer.write(u.MAGIC_NUMBER)"],
            stdout=subprocess.PIPE, check=True).stdout


@needs_pyenv("2.7")
def test_build_refuses_python_2(tmp_path):
    proc, _ = build_copy(tmp_path / "a", "--python", pyenv_python("2.7"), check=False)
    assert proc.returncode != 0 and b"Python 2.7" in proc.stderr and b"Traceback" not in proc.stderr, proc
