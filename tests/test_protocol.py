"""Black-box tests of the CNI protocol layer (cni-reference.md §1, §8) through the installed symlinks.

Every call runs inside a fresh "node" namespace made by the test, with CNI_NETNS pointing at a fresh
container namespace, so a plugin that acted despite bad input could only touch namespaces the test
owns — and each error test checks that nothing changed there.

Where the reference plugins in /usr/lib/cni agree with the spec, tests run against both (`impl`
fixture) to prove parity; where this project differs on purpose, the test runs on ours only and
says why.
"""

import json
import os
import subprocess
from collections import namedtuple

import pytest

from tests.helpers import REF_VERSIONS, VERSIONS, run_cni

pytestmark = pytest.mark.kernel

PLUGINS = ["bridge", "host-local", "loopback"]
NETWORK = "cbtnet"
SUBNET = "10.99.0.0/24"
BRIDGE = "cbt-br0"
# The CNI_* variables each command needs (the reference's skel table, cni-reference.md §1.2).
REQUIRED_ENV = {
    "ADD": ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"],
    "CHECK": ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"],
    "DEL": ["CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"],
}

Impl = namedtuple("Impl", "name bin versions ours")


@pytest.fixture(params=["ours", "ref"])
def impl(request):
    """The plugin set under test: ours (built zipapp) or the reference Go plugins (parity)."""
    if request.param == "ours":
        return Impl("ours", request.getfixturevalue("ours_bin"), VERSIONS, True)
    return Impl("ref", request.getfixturevalue("ref_bin"), REF_VERSIONS, False)


@pytest.fixture
def ours(ours_bin):
    """Our plugin set alone, for behaviour where the reference differs on purpose."""
    return Impl("ours", ours_bin, VERSIONS, True)


def network_config(plugin, data_dir, version="1.0.0", **extra):
    """A valid network configuration for `plugin` (IPAM state kept in the test's data_dir)."""
    conf = {"cniVersion": version, "name": NETWORK, "type": plugin}
    if plugin != "loopback":
        conf["ipam"] = {"type": "host-local", "subnet": SUBNET, "dataDir": str(data_dir)}
    if plugin == "bridge":
        conf.update(bridge=BRIDGE, isGateway=True)
    conf.update(extra)
    return conf


def single_json_object(text):
    """The one JSON object `text` holds (surrounding whitespace allowed, nothing else)."""
    stripped = text.strip()
    obj, end = json.JSONDecoder().raw_decode(stripped)
    assert stripped[end:].strip() == "", "more than one JSON value on stdout: %r" % text
    assert isinstance(obj, dict), obj
    return obj


def assert_no_traceback(res):
    assert "Traceback" not in res.stdout, res.stdout
    assert "Traceback" not in res.stderr, res.stderr


def assert_cni_error(res, code, ours):
    """The call failed the CNI way: exit 1, one error object on stdout with the right code."""
    assert_no_traceback(res)
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    error = single_json_object(res.stdout)
    assert type(error.get("code")) is int, error
    assert error["code"] == code, error
    assert isinstance(error.get("msg"), str) and error["msg"], error
    if ours:   # the spec's full shape; the reference omits cniVersion and empty details
        assert isinstance(error.get("cniVersion"), str), error
        assert isinstance(error.get("details"), str), error
    return error


def error_text(error):
    return error["msg"] + " " + error.get("details", "")


class Scene(object):
    """A node namespace to run the plugin in, a container namespace and an IPAM data_dir."""

    def __init__(self, node, container, data_dir):
        self.node = node
        self.container = container
        self.data_dir = data_dir

    def snapshot(self):
        """What a plugin that acted would have changed: links, lo state, reservation files."""
        files = sorted(os.path.relpath(os.path.join(d, f), str(self.data_dir))
                       for d, _, names in os.walk(str(self.data_dir)) for f in names)
        return {
            "node links": sorted(self.node.links()),
            "container links": {name: sorted(link["flags"])
                                for name, link in self.container.links().items()},
            "container addresses": self.container.addrs("lo"),
            "data files": files,
        }

    def run(self, impl, plugin, command, conf, **kwargs):
        kwargs.setdefault("netns", self.container)
        return run_cni(impl.bin, plugin, command, conf, node=self.node, **kwargs)

    def expect_error(self, impl, plugin, command, conf, code, **kwargs):
        """Run a call that must fail with `code` and change nothing; returns the error object."""
        before = self.snapshot()
        res = self.run(impl, plugin, command, conf, **kwargs)
        error = assert_cni_error(res, code, impl.ours)
        assert self.snapshot() == before
        return error


@pytest.fixture
def scene(node, container, data_dir):
    return Scene(node, container, data_dir)


# --- VERSION and the about text ------------------------------------------------------------------

NO_CNI_ENV = {"CNI_CONTAINERID": None, "CNI_NETNS": None, "CNI_IFNAME": None,
              "CNI_PATH": None, "CNI_ARGS": None}


@pytest.mark.parametrize("plugin", PLUGINS)
def test_version_needs_only_cni_command(impl, plugin, node):
    """VERSION works with CNI_COMMAND as the only CNI variable and lists every supported version."""
    res = run_cni(impl.bin, plugin, "VERSION", {"cniVersion": "0.4.0"}, node=node, env=NO_CNI_ENV)
    assert_no_traceback(res)
    assert res.returncode == 0, res
    answer = single_json_object(res.stdout)
    assert isinstance(answer["cniVersion"], str)
    assert len(answer["supportedVersions"]) == len(set(answer["supportedVersions"]))
    assert set(answer["supportedVersions"]) == set(impl.versions)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("plugin", PLUGINS)
def test_version_answer_is_constant(ours, plugin, version, node):
    """VERSION answers the same whatever the request's cniVersion, as the reference does (its
    library's version): the archive's sh preamble answers without reading stdin.  Ours only."""
    res = run_cni(ours.bin, plugin, "VERSION", {"cniVersion": version}, node=node, env=NO_CNI_ENV)
    assert res.returncode == 0, res
    answer = single_json_object(res.stdout)
    assert answer["cniVersion"] == "1.1.0"
    assert answer["supportedVersions"] == VERSIONS


@pytest.mark.parametrize("plugin", PLUGINS)
def test_version_does_not_wait_for_stdin(impl, plugin, node):
    """VERSION answers while stdin stays open and empty: it does not read a configuration."""
    argv = ["ip", "netns", "exec", node.name, "env", "-i", "CNI_COMMAND=VERSION",
            str(impl.bin / plugin)]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True)
    try:
        returncode = proc.wait(timeout=30)    # a hang guard, not a timing assertion
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    assert returncode == 0, (stdout, stderr)
    assert set(single_json_object(stdout)["supportedVersions"]) == set(impl.versions)


@pytest.mark.parametrize("plugin", PLUGINS)
def test_version_with_runtime_dummies_and_garbage_stdin(impl, plugin, node):
    """VERSION answers a libcni-style probe (dummy CNI_* values) even when stdin is not JSON."""
    res = run_cni(impl.bin, plugin, "VERSION", "this is not json", node=node, netns="dummy",
                  ifname="dummy", cni_path="dummy", container_id="dummy")
    assert_no_traceback(res)
    assert res.returncode == 0, res
    assert set(single_json_object(res.stdout)["supportedVersions"]) == set(impl.versions)


@pytest.mark.parametrize("command_env", [{"CNI_COMMAND": None}, {"CNI_COMMAND": ""}],
                         ids=["unset", "empty"])
@pytest.mark.parametrize("plugin", PLUGINS)
def test_about_text_without_command(impl, plugin, command_env, node):
    """Without CNI_COMMAND the plugin prints its about text on stderr, nothing on stdout, exit 0."""
    res = run_cni(impl.bin, plugin, "", "", node=node, env=command_env)
    assert_no_traceback(res)
    assert res.returncode == 0, res
    assert res.stdout == ""
    assert "CNI %s plugin" % plugin in res.stderr
    assert "CNI protocol versions supported: " + ", ".join(impl.versions) in res.stderr


# --- environment errors (§1.2, §1.3 step 2) --------------------------------------------------------

@pytest.mark.parametrize("blank", [None, ""], ids=["unset", "empty"])
@pytest.mark.parametrize("command", sorted(REQUIRED_ENV))
@pytest.mark.parametrize("plugin", PLUGINS)
def test_missing_env_reported_together(impl, plugin, command, blank, scene):
    """All missing required variables are named in one code-4 error; empty counts as missing."""
    required = REQUIRED_ENV[command]
    env = dict((name, blank) for name in required)
    if command == "DEL":
        env["CNI_NETNS"] = None        # optional for DEL, so never reported
    error = scene.expect_error(impl, plugin, command, network_config(plugin, scene.data_dir), 4,
                               env=env)
    for name in required:
        assert name in error["msg"], error
    if command == "DEL":
        assert "CNI_NETNS" not in error["msg"], error


@pytest.mark.parametrize("missing", REQUIRED_ENV["ADD"])
@pytest.mark.parametrize("plugin", PLUGINS)
def test_single_missing_env_named(impl, plugin, missing, scene):
    """A single missing variable for ADD is named, and only it."""
    error = scene.expect_error(impl, plugin, "ADD", network_config(plugin, scene.data_dir), 4,
                               env={missing: None})
    assert [name for name in REQUIRED_ENV["ADD"] if name in error["msg"]] == [missing], error


@pytest.mark.parametrize("command", ["GC", "STATUS"])
@pytest.mark.parametrize("plugin", PLUGINS)
def test_gc_status_need_cni_path(ours, plugin, command, scene):
    """GC and STATUS need CNI_PATH (code 4 naming it).

    Ours only: Debian's reference (1.1.1) predates STATUS and GC.
    """
    conf = network_config(plugin, scene.data_dir, "1.1.0")
    error = scene.expect_error(ours, plugin, command, conf, 4, env={"CNI_PATH": None})
    assert "CNI_PATH" in error["msg"]


@pytest.mark.parametrize("command", ["ADD", "DEL"])
@pytest.mark.parametrize("container_id", ["a b", "-ctr", "ctr/1", "ctr;1", ".ctr"])
@pytest.mark.parametrize("plugin", PLUGINS)
def test_invalid_container_id(impl, plugin, container_id, command, scene):
    """A container ID outside [A-Za-z0-9][A-Za-z0-9_.-]* is refused with code 4."""
    error = scene.expect_error(impl, plugin, command, network_config(plugin, scene.data_dir), 4,
                               container_id=container_id)
    assert "containerID" in error["msg"], error


@pytest.mark.parametrize("ifname", [
    "", "0123456789abcdef", "\u00e9" * 8, ".", "..", "eth/0", "eth:0", "eth 0", "eth\t0",
], ids=["empty", "16-bytes", "16-utf8-bytes", "dot", "dotdot", "slash", "colon", "space", "tab"])
@pytest.mark.parametrize("plugin", PLUGINS)
def test_invalid_ifname(impl, plugin, ifname, scene):
    """An interface name the kernel would refuse is refused with code 4 before anything happens."""
    scene.expect_error(impl, plugin, "ADD", network_config(plugin, scene.data_dir), 4,
                       ifname=ifname)


@pytest.mark.parametrize("command", ["FOO", "add", "VERSIONS"])
@pytest.mark.parametrize("plugin", PLUGINS)
def test_unknown_command(impl, plugin, command, scene):
    """An unknown CNI_COMMAND is code 4 and the message names it."""
    error = scene.expect_error(impl, plugin, command, network_config(plugin, scene.data_dir), 4)
    assert command in error["msg"], error


# --- stdin and config decoding (§1.3 steps 3-6) ----------------------------------------------------

@pytest.mark.parametrize("stdin", ["", "not json", "{", '{"name": "x",}', "\xff\xfe"],
                         ids=["empty", "text", "truncated", "trailing-comma", "not-utf8"])
@pytest.mark.parametrize("plugin", PLUGINS)
def test_undecodable_stdin(impl, plugin, stdin, scene):
    """stdin that is not JSON is a decoding error (code 6)."""
    raw = stdin.encode("latin-1")
    scene.expect_error(impl, plugin, "ADD", raw, 6)


@pytest.mark.parametrize("stdin", ["[1]", '"text"', "5", "true"])
@pytest.mark.parametrize("plugin", PLUGINS)
def test_stdin_not_an_object(impl, plugin, stdin, scene):
    """JSON that is not an object is a decoding error (code 6)."""
    scene.expect_error(impl, plugin, "ADD", stdin, 6)


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK"])
@pytest.mark.parametrize("plugin", PLUGINS)
def test_missing_network_name(impl, plugin, command, scene):
    """A config without `name` (or with an empty one) is an invalid config (code 7)."""
    conf = network_config(plugin, scene.data_dir)
    del conf["name"]
    scene.expect_error(impl, plugin, command, conf, 7)
    conf["name"] = ""
    scene.expect_error(impl, plugin, command, conf, 7)


@pytest.mark.parametrize("name", ["a/b", "..", "-x", "a b", "net:1"])
@pytest.mark.parametrize("plugin", PLUGINS)
def test_bad_network_name(impl, plugin, name, scene):
    """A network name outside [A-Za-z0-9][A-Za-z0-9_.-]* is code 7 and the error names it."""
    conf = network_config(plugin, scene.data_dir, name=name)
    error = scene.expect_error(impl, plugin, "ADD", conf, 7)
    assert name in error_text(error), error


@pytest.mark.parametrize("plugin", PLUGINS)
def test_network_name_wrong_type(impl, plugin, scene):
    """A `name` that is not a string is a decoding error (code 6)."""
    scene.expect_error(impl, plugin, "ADD", network_config(plugin, scene.data_dir, name=5), 6)


@pytest.mark.parametrize("version", [1, 1.0, ["1.0.0"], {"v": "1.0.0"}, True],
                         ids=["int", "float", "list", "object", "bool"])
@pytest.mark.parametrize("plugin", PLUGINS)
def test_cni_version_wrong_type(impl, plugin, version, scene):
    """A cniVersion that is not a string is a decoding error (code 6)."""
    conf = network_config(plugin, scene.data_dir, version)
    scene.expect_error(impl, plugin, "ADD", conf, 6)


@pytest.mark.parametrize("command", ["ADD", "DEL"])
@pytest.mark.parametrize("plugin", PLUGINS)
def test_unsupported_cni_version(impl, plugin, command, scene):
    """A cniVersion the plugin does not speak is code 1."""
    error = scene.expect_error(impl, plugin, command,
                               network_config(plugin, scene.data_dir, "9.9.9"), 1)
    assert "9.9.9" in error_text(error), error


@pytest.mark.parametrize("version", ["0.1.0", "0.2.0", "0.3.0", "0.3.1"])
@pytest.mark.parametrize("plugin", PLUGINS)
def test_check_needs_0_4_0(impl, plugin, version, scene):
    """CHECK with a config older than 0.4.0 is refused with code 1."""
    scene.expect_error(impl, plugin, "CHECK", network_config(plugin, scene.data_dir, version), 1)


@pytest.mark.parametrize("version", ["1.x", "a.b.c", "1.0.0.0"])
@pytest.mark.parametrize("plugin", PLUGINS)
def test_check_unparsable_version(impl, plugin, version, scene):
    """CHECK with a cniVersion that does not parse as a version is a decoding error (code 6)."""
    scene.expect_error(impl, plugin, "CHECK", network_config(plugin, scene.data_dir, version), 6)


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])
@pytest.mark.parametrize("command", ["GC", "STATUS"])
@pytest.mark.parametrize("plugin", PLUGINS)
def test_gc_status_need_1_1_0(ours, plugin, command, version, scene):
    """STATUS and GC with a config older than 1.1.0 are refused with code 1.

    Ours only: Debian's reference (1.1.1) predates STATUS and GC.
    """
    scene.expect_error(ours, plugin, command, network_config(plugin, scene.data_dir, version), 1)


# --- CNI_ARGS: lenient (§8 decision 1; the reference is strict, so these run on ours only) -------

@pytest.mark.parametrize("plugin", PLUGINS)
def test_cni_args_piece_without_equals(ours, plugin, scene):
    """A CNI_ARGS piece without "=" is code 4 and the error names the piece."""
    error = scene.expect_error(ours, plugin, "ADD", network_config(plugin, scene.data_dir), 4,
                               cni_args="IgnoreUnknown=1;brokenpiece;K8S_POD_NAME=p")
    assert "brokenpiece" in error_text(error), error


KUBERNETES_ARGS = ("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;"
                   "K8S_POD_INFRA_CONTAINER_ID=ctr1;K8S_POD_UID=1234;")


def test_cni_args_lenient_loopback(ours, scene):
    """loopback ignores unknown CNI_ARGS keys and a trailing ";"."""
    res = scene.run(ours, "loopback", "ADD", network_config("loopback", scene.data_dir),
                    cni_args=KUBERNETES_ARGS + "Unknown=x;")
    assert res.returncode == 0, res
    assert "UP" in scene.container.links()["lo"]["flags"]


def test_cni_args_lenient_host_local(ours, scene):
    """host-local ignores unknown keys and a trailing ";", and reads `IP` case-insensitively."""
    conf = network_config("host-local", scene.data_dir)
    res = scene.run(ours, "host-local", "ADD", conf, cni_args=KUBERNETES_ARGS + "ip=10.99.0.7;")
    assert res.returncode == 0, res
    assert [ip["address"] for ip in res.json["ips"]] == ["10.99.0.7/24"]
    assert (scene.data_dir / NETWORK / "10.99.0.7").is_file()
    res = scene.run(ours, "host-local", "DEL", conf, cni_args=KUBERNETES_ARGS + "ip=10.99.0.7;")
    assert res.returncode == 0, res
    assert not (scene.data_dir / NETWORK / "10.99.0.7").exists()


def test_cni_args_lenient_bridge(ours, scene):
    """bridge accepts IP and MAC together with unknown keys (the reference fails on this mix)."""
    conf = network_config("bridge", scene.data_dir)
    args = KUBERNETES_ARGS + "IP=10.99.0.9;MAC=0a:58:0a:63:00:09;"
    res = scene.run(ours, "bridge", "ADD", conf, cni_args=args)
    assert res.returncode == 0, res
    eth0 = scene.container.links()["eth0"]
    assert eth0["address"] == "0a:58:0a:63:00:09"
    assert ("inet", "10.99.0.9/24") in scene.container.addrs("eth0")
    res = scene.run(ours, "bridge", "DEL", conf, cni_args=args)
    assert res.returncode == 0, res
    assert "eth0" not in scene.container.links()


# --- CNI_NETNS checks -----------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["ADD", "CHECK", "DEL"])
@pytest.mark.parametrize("own_path", ["node-path", "proc-self"])
@pytest.mark.parametrize("plugin", PLUGINS)
def test_own_netns_refused_before_acting(ours, plugin, own_path, command, scene):
    """CNI_NETNS naming the plugin's own namespace: ADD and CHECK are code 8; DEL succeeds (it
    releases what lies outside the namespace, issue 13 item 5); nothing changes in the namespace.

    Ours only: the reference checks this after acting (upstream) or not at all (Debian 1.1.1).
    """
    conf = network_config(plugin, scene.data_dir)
    netns = scene.node.path if own_path == "node-path" else "/proc/self/ns/net"
    if command != "ADD":
        res = scene.run(ours, plugin, "ADD", conf)      # something a wrong DEL could undo
        assert res.returncode == 0, res
    links = scene.node.links()
    if command == "DEL":
        res = scene.run(ours, plugin, command, conf, netns=netns)
        assert res.returncode == 0 and res.stdout == "", res
    else:
        scene.expect_error(ours, plugin, command, conf, 8, netns=netns)
    after = scene.node.links()
    assert after["lo"]["flags"] == links["lo"]["flags"]
    assert set(after) <= set(links)


def test_own_netns_leaves_node_lo_down(ours, scene):
    """loopback ADD aimed at the node's own namespace does not bring the node's lo up."""
    scene.node.run("ip", "link", "set", "lo", "down")
    scene.expect_error(ours, "loopback", "ADD", network_config("loopback", scene.data_dir), 8,
                       netns=scene.node.path)
    assert "UP" not in scene.node.links()["lo"]["flags"]


@pytest.mark.parametrize("kind", ["file", "directory", "missing"])
@pytest.mark.parametrize("plugin", ["bridge", "loopback"])
def test_add_with_netns_not_a_namespace(impl, plugin, kind, scene, tmp_path):
    """ADD with CNI_NETNS at a regular file, a directory or nothing fails with a CNI error."""
    target = tmp_path / "not-a-netns"
    if kind == "file":
        target.write_text("")
    elif kind == "directory":
        target.mkdir()
    conf = network_config(plugin, scene.data_dir)
    before = scene.snapshot()
    res = scene.run(impl, plugin, "ADD", conf, netns=str(target))
    assert_no_traceback(res)
    assert res.returncode != 0, res
    error = single_json_object(res.stdout)
    assert type(error.get("code")) is int and isinstance(error.get("msg"), str), error
    if impl.ours:   # the reference bridge creates the bridge before opening the netns
        assert scene.snapshot() == before
