"""Black-box tests of the built artefact: how build.sh builds it, how it installs, and how it starts.

The zipapp must run straight from the archive (no extraction, no shiv bootstrap), isolated from the
caller's environment, on a read-only root, under every CPython from 3.6 to 3.13.
"""
import calendar
import glob
import os
import shutil
import struct
import subprocess
import zipfile
from pathlib import Path

import pytest

from tests.helpers import (IP, PLUGIN_NAMES, REPO, VERSIONS, archive_for, cni_env, encode_conf, parse_output,
                           run, run_cni)

pytestmark = pytest.mark.kernel

ARCHIVE = "cni-bridge.pyz"
ENTRIES = ["__main__.py", "cni_bridge.py", "cni_bridge.pyc"]
LOOPBACK_CONF = {"cniVersion": "1.0.0", "name": "lo", "type": "loopback"}
MATRIX = ["3.6", "3.7", "3.8", "3.9", "3.10", "3.11", "3.12", "3.13"]
# Runs "$@" in a private mount namespace whose root is remounted read-only (the host's stays writable).
READ_ONLY_ROOT = 'mount -o remount,bind,ro / && ! touch /.cni-bridge-ro-probe 2>/dev/null && exec "$@"'


def pyenv_python(version):
    """The pyenv interpreter for `version` (e.g. "3.6"), or None when the machine lacks it."""
    found = sorted(glob.glob("/root/.pyenv/versions/%s.*/bin/python3" % version))
    return found[-1] if found else None


def matrix_params():
    """One pytest param per Python version; missing interpreters are skipped by name."""
    return [pytest.param(version, id="py" + version,
                         marks=pytest.mark.skipif(pyenv_python(version) is None,
                                                  reason="Python %s not found under /root/.pyenv/versions" % version))
            for version in MATRIX]


def call(argv, command, conf=b"", bin_dir="/nonexistent", cwd=None, **cni):
    """Run argv with a CNI environment (see conftest.cni_env) and `conf` on stdin; returns a CNIRun."""
    proc = subprocess.run([str(a) for a in argv], input=encode_conf(conf), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, cwd=cwd, timeout=60, env=cni_env(command, bin_dir, **cni))
    return parse_output(proc)


# Plugins that, like their reference, start at a later spec version.
FIRST_VERSION = {"firewall": "0.4.0"}


def assert_version_answer(result, plugin="bridge"):
    assert result.returncode == 0, result
    first = VERSIONS.index(FIRST_VERSION.get(plugin, VERSIONS[0]))
    assert result.json["supportedVersions"] == VERSIONS[first:], result


def lo_is_up(netns):
    return "UP" in netns.links()["lo"]["flags"]


def build_copy(workdir, *args):
    """Run build.sh from a copy of the source tree in `workdir`; returns the archive it built."""
    workdir.mkdir(exist_ok=True)
    for name in ("build.sh", "cni_bridge.py"):
        shutil.copy2(str(REPO / name), str(workdir / name))
    run([workdir / "build.sh", *args], timeout=300, cwd="/")
    return workdir / "dist" / ARCHIVE


def read_entry(archive, name):
    with zipfile.ZipFile(str(archive)) as zf:
        return zf.read(name)


def magic_of(python):
    return bytes.fromhex(run([python, "-IS", "-c", "import importlib.util as u; print(u.MAGIC_NUMBER.hex())"])
                         .stdout.strip())


def loaded_from(archive, python, env=None):
    """The file `python` loads cni_bridge from when importing it out of `archive` (.pyc or .py)."""
    code = "import sys; sys.path.insert(0, sys.argv[1]); import cni_bridge; print(cni_bridge.__file__)"
    return run([python, "-IS", "-c", code, archive], env=env).stdout.strip()


# --- build.sh -------------------------------------------------------------------------------------------

def test_archive_layout(tmp_path):
    archive = build_copy(tmp_path / "src")
    data = archive.read_bytes()
    assert data.startswith(b"#!/bin/sh\n")
    assert b"\nexec /usr/bin/python3 -E -s -S -c " in data[:4096]
    assert archive.stat().st_mode & 0o777 == 0o755
    assert os.listdir(str(archive.parent)) == [ARCHIVE]  # no temp file left behind
    with zipfile.ZipFile(str(archive)) as zf:
        infos = zf.infolist()
        assert [i.filename for i in infos] == ENTRIES
        assert zf.read("__main__.py").decode().splitlines()[1:] == ["import cni_bridge", "cni_bridge.main()"]
        assert zf.read("cni_bridge.py") == (tmp_path / "src" / "cni_bridge.py").read_bytes()
    for info in infos:
        assert info.external_attr >> 16 == 0o100644, info
        assert info.compress_type == zipfile.ZIP_STORED, info
        assert info.date_time == infos[0].date_time, info


def test_pyc_is_unchecked_hash_for_the_target_and_used(tmp_path):
    archive = build_copy(tmp_path / "src")
    pyc = read_entry(archive, "cni_bridge.pyc")
    assert pyc[:4] == magic_of("/usr/bin/python3")
    assert struct.unpack("<I", pyc[4:8]) == (0b01,)  # PEP 552 flags: hash-based, unchecked
    assert loaded_from(archive, "/usr/bin/python3").endswith("/cni_bridge.pyc")


@pytest.mark.parametrize("version", ["3.6", "3.13"])
def test_build_for_another_python(tmp_path, version):
    """--python selects the interpreter line and the pyc format (timestamp-based before 3.7)."""
    python = pyenv_python(version)
    if python is None:
        pytest.skip("Python %s not found under /root/.pyenv/versions" % version)
    archive = build_copy(tmp_path / "src", "--python", python)
    assert ("\nexec %s -E -s -S -c " % python).encode() in archive.read_bytes()[:4096]
    pyc = read_entry(archive, "cni_bridge.pyc")
    assert pyc[:4] == magic_of(python)
    if version == "3.6":  # magic, source mtime (the entries' fixed time, as UTC), source size
        with zipfile.ZipFile(str(archive)) as zf:
            entry_time = calendar.timegm(zf.getinfo("cni_bridge.py").date_time + (0, 0, -1))
        source_size = len(read_entry(archive, "cni_bridge.py"))
        assert struct.unpack("<II", pyc[4:12]) == (entry_time, source_size)
    else:
        assert struct.unpack("<I", pyc[4:8]) == (0b01,)
    # zipimport reads the entry's time as local time: in UTC it matches the pyc's timestamp.
    env = dict(os.environ, TZ="UTC0")
    assert loaded_from(archive, python, env=env).endswith("/cni_bridge.pyc")
    (tmp_path / "loopback").symlink_to(archive)  # executed through its shebang, as a plugin
    assert_version_answer(call([tmp_path / "loopback"], "VERSION", container_id=None, ifname=None))


def test_build_is_reproducible(tmp_path):
    """A second build of the same source, with another mtime, umask and directory, is identical."""
    first = build_copy(tmp_path / "a")
    again = tmp_path / "b"
    shutil.copytree(str(tmp_path / "a"), str(again), ignore=shutil.ignore_patterns("dist"))
    os.utime(str(again / "cni_bridge.py"), (1234567890, 1234567890))
    run(["sh", "-c", "umask 077 && exec ./build.sh"], cwd=again)
    assert (again / "dist" / ARCHIVE).read_bytes() == first.read_bytes()


def test_build_sh_install_refuses_then_forces(tmp_path):
    target = tmp_path / "bin"
    target.mkdir()
    (target / "bridge").write_text("not ours\n")
    build_copy(tmp_path / "src")
    refused = run([tmp_path / "src" / "build.sh", "install", target], check=False)
    assert refused.returncode != 0
    assert (target / "bridge").read_text() == "not ours\n"
    run([tmp_path / "src" / "build.sh", "install", target, "--force"])
    assert os.readlink(str(target / "bridge")) == ARCHIVE


# --- install ----------------------------------------------------------------------------------------------

def installed_archive(ours_bin):
    return Path(os.path.realpath(str(ours_bin / "bridge")))


def test_install_makes_symlinks(ours_bin, tmp_path):
    target = tmp_path / "new" / "bin"  # created by install
    source = installed_archive(ours_bin)
    for _ in range(2):  # installing again over our own installation is fine
        run([source, "install", target])
        assert (target / ARCHIVE).read_bytes() == source.read_bytes()
        assert (target / ARCHIVE).stat().st_mode & 0o777 == 0o755
        assert sorted(os.listdir(str(target))) == sorted((ARCHIVE,) + PLUGIN_NAMES)
        for name in PLUGIN_NAMES:
            assert os.readlink(str(target / name)) == ARCHIVE
            assert_version_answer(call([target / name], "VERSION", container_id=None, ifname=None), name)


def test_install_replaces_regular_file_only_with_force(ours_bin, tmp_path):
    (tmp_path / "bridge").write_text("someone else's bridge\n")
    source = installed_archive(ours_bin)
    refused = run([source, "install", tmp_path], check=False)
    assert refused.returncode != 0
    assert (tmp_path / "bridge").read_text() == "someone else's bridge\n"
    run([source, "install", tmp_path, "--force"])
    assert os.readlink(str(tmp_path / "bridge")) == ARCHIVE
    assert_version_answer(call([tmp_path / "bridge"], "VERSION", container_id=None, ifname=None))


# --- starting the installed plugins --------------------------------------------------------------------

@pytest.mark.parametrize("plugin", PLUGIN_NAMES)
def test_version_through_each_symlink_with_only_cni_command(ours_bin, plugin):
    """`env -i CNI_COMMAND=VERSION`: no HOME, no PATH, nothing else; with and without a config."""
    for conf in (b'{"cniVersion": "1.1.0"}', b""):
        proc = subprocess.run(["env", "-i", "CNI_COMMAND=VERSION", str(ours_bin / plugin)], input=conf,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        assert_version_answer(parse_output(proc), plugin)


def test_runs_without_home_from_root_directory(ours_bin, node, container):
    container.run("ip", "link", "set", "lo", "down")
    env = {"HOME": None}
    assert_version_answer(call([ours_bin / "loopback"], "VERSION", cwd="/", env=env))
    added = call([IP, "netns", "exec", node.name, ours_bin / "loopback"], "ADD", LOOPBACK_CONF, ours_bin,
                 cwd="/", netns=container, env=env)
    assert added.returncode == 0, added
    assert lo_is_up(container)


def test_runs_on_read_only_root(ours_bin, node, container, tmp_path):
    """Root remounted read-only in a private mount namespace; HOME on it (where shiv would extract)."""
    container.run("ip", "link", "set", "lo", "down")
    wrapper = [IP, "netns", "exec", node.name, "unshare", "--mount", "--propagation", "private",
               "sh", "-c", READ_ONLY_ROOT, "sh", ours_bin / "loopback"]
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home)}
    assert_version_answer(call(wrapper, "VERSION", env=env))
    added = call(wrapper, "ADD", LOOPBACK_CONF, ours_bin, netns=container, env=env)
    assert added.returncode == 0, added
    assert lo_is_up(container)
    deleted = call(wrapper, "DEL", LOOPBACK_CONF, ours_bin, netns=container, env=env)
    assert deleted.returncode == 0, deleted
    assert not lo_is_up(container)


def test_twenty_copies_at_once(ours_bin, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = cni_env("VERSION", ours_bin, env={"HOME": str(home)})
    procs = [subprocess.Popen([str(ours_bin / "bridge")], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env) for _ in range(20)]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 20, outputs
    assert len(set(outputs)) == 1, outputs
    assert os.listdir(str(home)) == []


def test_nothing_extracted(ours_bin, node, container, tmp_path):
    """Neither ~/.shiv nor any other directory is created: the code runs from the archive."""
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home)}
    for command in ("ADD", "DEL"):
        result = run_cni(ours_bin, "loopback", command, LOOPBACK_CONF, node=node, netns=container, env=env)
        assert result.returncode == 0, result
    assert os.listdir(str(home)) == []


def test_environment_cannot_steer_the_interpreter(ours_bin, node, container, tmp_path):
    """PYTHON* and SHIV_* variables and a hostile working directory change nothing."""
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    marker = tmp_path / "steered"
    payload = "open(%r, 'a').write(__name__ + '\\n')\nprint('{\"steered\": true}')\n" % str(marker)
    for module in ("cni_bridge", "sitecustomize", "usercustomize", "json", "startup", "hostile_entry"):
        (hostile / (module + ".py")).write_text(payload + "def main():\n    pass\n")
    steering = {
        "PYTHONPATH": str(hostile), "PYTHONSTARTUP": str(hostile / "startup.py"), "PYTHONINSPECT": "1",
        "PYTHONHOME": str(hostile), "PYTHONUSERBASE": str(hostile), "PYTHONVERBOSE": "1",
        "PYTHONWARNINGS": "error",
        "SHIV_ROOT": str(hostile / "shiv"), "SHIV_FORCE_EXTRACT": "1", "SHIV_INTERPRETER": "1",
        "SHIV_ENTRY_POINT": "hostile_entry:main", "SHIV_CONSOLE_SCRIPT": "hostile_entry",
        "SHIV_PREPEND_PYTHONPATH": "1", "SHIV_EXTEND_PYTHONPATH": str(hostile),
    }
    plugin = [IP, "netns", "exec", node.name, ours_bin / "loopback"]
    for command in ("VERSION", "ADD", "DEL"):
        clean = call(plugin, command, LOOPBACK_CONF, ours_bin, netns=container)
        steered = call(plugin, command, LOOPBACK_CONF, ours_bin, netns=container, cwd=hostile, env=steering)
        assert clean.returncode == 0, clean
        assert steered == clean
    assert not marker.exists()
    assert sorted(os.listdir(str(hostile))) == sorted(p + ".py" for p in (
        "cni_bridge", "sitecustomize", "usercustomize", "json", "startup", "hostile_entry"))


def test_failures_exit_non_zero_with_json_error(ours_bin, node):
    bogus = call([ours_bin / "bridge"], "BOGUS")
    assert bogus.returncode == 1, bogus
    assert bogus.json["code"] == 4, bogus
    failed_add = run_cni(ours_bin, "loopback", "ADD", LOOPBACK_CONF, node=node, netns="/nonexistent/netns")
    assert failed_add.returncode == 1, failed_add
    assert isinstance(failed_add.json["code"], int) and failed_add.json["msg"], failed_add


@pytest.mark.slow
@pytest.mark.parametrize("version", matrix_params())
def test_python_versions(multi_archive, node, container, data_dir, tmp_path, version):
    """The archive with bytecode for every interpreter (build.sh --python repeated), its preamble
    pointed at `version`, under `env -i` (C locale) with the PYTHONHASHSEED and PYTHONMALLOC that
    abort 3.6: VERSION, then the bridge walkthrough with masquerade on a non-ASCII dataDir (ADD,
    read back, ping, CHECK, DEL, nothing left) and loopback, checked in the kernel; no line on
    stderr (the bytecode for `version` is found)."""
    bin_dir = archive_for(multi_archive, tmp_path, pyenv_python(version))
    state = data_dir / "\u00e9t\u00e9"
    conf = {"cniVersion": "1.1.0", "name": "matrix", "type": "bridge", "bridge": "cbt-mx0", "isGateway": True,
            "ipMasq": True, "ipam": {"type": "host-local", "subnet": "10.98.3.0/24", "dataDir": str(state)}}

    def plugin(name, command, config):
        env = ["CNI_COMMAND=" + command, "CNI_CONTAINERID=ctr1", "CNI_NETNS=" + container.path, "CNI_IFNAME=eth0",
               "CNI_PATH=%s" % bin_dir, "PYTHONHASHSEED=bogus", "PYTHONMALLOC=bogus"]
        proc = subprocess.run([IP, "netns", "exec", node.name, "env", "-i"] + env + [str(bin_dir / name)],
                              input=encode_conf(config), stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        result = parse_output(proc)
        assert result.returncode == 0 and result.stderr == "", result
        return result.json

    assert plugin("bridge", "VERSION", b"")["supportedVersions"] == VERSIONS
    added = plugin("bridge", "ADD", conf)
    assert added["ips"][0]["address"] == "10.98.3.2/24", added
    assert ("inet", "10.98.3.2/24") in container.addrs("eth0")
    assert (state / "matrix" / "10.98.3.2").is_file()
    assert "masquerade" in node.run("nft", "list", "ruleset").stdout
    container.run("ping", "-c", "1", "-W", "2", "10.98.3.1")
    plugin("bridge", "CHECK", dict(conf, prevResult=added))
    plugin("bridge", "DEL", dict(conf, prevResult=added))
    assert "eth0" not in container.links()
    assert not (state / "matrix" / "10.98.3.2").exists()
    assert "10.98.3.2" not in node.run("nft", "list", "ruleset").stdout
    container.run("ip", "link", "set", "lo", "down")
    plugin("loopback", "ADD", LOOPBACK_CONF)
    assert lo_is_up(container)


def test_preamble_falls_back_to_the_source_for_another_interpreter(tmp_path):
    """The preamble runs the compiled module in place only when its magic number matches the
    interpreter; an archive whose interpreter was swapped (a node upgrade) imports the .py."""
    built, other = pyenv_python("3.13"), pyenv_python("3.6")
    if built is None or other is None:
        pytest.skip("needs Python 3.13 and 3.6 under /root/.pyenv/versions")
    archive = build_copy(tmp_path / "src", "--python", built)
    data = archive.read_bytes().replace(built.encode(), other.encode())
    swapped = tmp_path / "cni-bridge.pyz"
    swapped.write_bytes(data)
    swapped.chmod(0o755)
    (tmp_path / "loopback").symlink_to(swapped)
    started = call([tmp_path / "loopback"], "ADD", container_id=None, ifname=None)   # reaches Python
    assert started.returncode == 1 and started.json["code"] == 4, started
    assert started.stderr.count("no bytecode for Python 3.6") == 1, started


# --- start-up: what each plugin path imports ------------------------------------------------------------
# Every module a plugin imports is paid at each container start: the heavy standard modules stay out
# of the plugin paths (they load only in the operator tools and the paths that exec a program).

HEAVY = ("os", "json", "re", "socket", "subprocess", "ipaddress", "hashlib", "ctypes", "base64", "shutil")
RUN_AND_LIST_MODULES = (
    "import sys; sys.path.insert(0, sys.argv[1]); import cni_bridge as cb; "
    "status = cb.run_plugin(sys.argv[2], cb.process_environment()); "
    "sys.stderr.write('MODULES ' + ' '.join(sorted(sys.modules)) + '\\n'); sys.exit(status)")


def plugin_modules(ours_bin, plugin, command, conf, node=None, **cni):
    """(the parsed output, the modules loaded) after one request served by the archive under
    `python3 -I -S`, as the installed plugin runs (inside `node` when given)."""
    argv = ["/usr/bin/python3", "-IS", "-c", RUN_AND_LIST_MODULES, str(ours_bin / ARCHIVE), plugin]
    if node is not None:
        argv = [IP, "netns", "exec", node.name] + argv
    proc = subprocess.run(argv, input=encode_conf(conf), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=60, env=cni_env(command, ours_bin, **cni))
    result = parse_output(proc)
    assert result.returncode == 0, result
    line = [text for text in result.stderr.splitlines() if text.startswith("MODULES ")][-1]
    return result.json, set(line.split()[1:])


def test_version_imports_no_heavy_module_and_no_socket(ours_bin):
    _, loaded = plugin_modules(ours_bin, "bridge", "VERSION", {"cniVersion": "1.0.0"})
    assert loaded.isdisjoint(HEAVY + ("_socket",)), sorted(loaded & set(HEAVY + ("_socket",)))


def test_host_local_add_and_del_import_no_heavy_module(ours_bin, data_dir):
    conf = {"cniVersion": "1.0.0", "name": "imports", "type": "host-local",
            "ipam": {"type": "host-local", "subnet": "10.66.0.0/24", "dataDir": str(data_dir)}}
    for command in ("ADD", "DEL"):
        _, loaded = plugin_modules(ours_bin, "host-local", command, conf, netns="/nonexistent")
        assert loaded.isdisjoint(HEAVY), (command, sorted(loaded & set(HEAVY)))


def test_bridge_add_check_del_with_masquerade_import_no_heavy_module(ours_bin, node, container, data_dir):
    conf = {"cniVersion": "1.0.0", "name": "imports", "type": "bridge", "bridge": "cbt-imp0",
            "isGateway": True, "ipMasq": True,
            "ipam": {"type": "host-local", "subnet": "10.67.0.0/24", "dataDir": str(data_dir)}}
    added, loaded = plugin_modules(ours_bin, "bridge", "ADD", conf, node=node, netns=container)
    assert added["ips"] and loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))
    for command in ("CHECK", "DEL"):
        _, loaded = plugin_modules(ours_bin, "bridge", command, dict(conf, prevResult=added), node=node,
                                   netns=container)
        assert loaded.isdisjoint(HEAVY), (command, sorted(loaded & set(HEAVY)))


def test_portmap_add_check_gc_del_import_no_heavy_module(ours_bin, node, container):
    prev = {"cniVersion": "1.1.0", "ips": [{"address": "10.68.0.2/24"}, {"address": "fd68::2/64"}]}
    conf = {"cniVersion": "1.1.0", "name": "imports", "type": "portmap", "prevResult": prev,
            "runtimeConfig": {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
                                               {"hostPort": 8081, "containerPort": 81, "protocol": "udp"}]}}
    for command in ("ADD", "CHECK", "GC", "DEL"):
        request = dict(conf, **{"cni.dev/valid-attachments": []}) if command == "GC" else conf
        cni = {"container_id": None, "ifname": None} if command == "GC" else {"netns": container}
        _, loaded = plugin_modules(ours_bin, "portmap", command, request, node=node, **cni)
        assert loaded.isdisjoint(HEAVY), (command, sorted(loaded & set(HEAVY)))
