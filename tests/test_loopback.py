"""Black-box tests of the loopback plugin (cni-reference.md §4) in real namespaces made by the test.

Every call runs inside a fresh "node" namespace; the container ("sandbox") is another fresh
namespace whose `lo` the test sets down first. State is read back from the kernel with `ip -j`.
Tests that take an `impl` run against ours and the reference Go plugin (each with the versions it
speaks) to prove parity.
"""

import copy
import subprocess
from collections import namedtuple

import pytest

from tests.helpers import REF_VERSIONS, VERSIONS, run_cni

pytestmark = pytest.mark.kernel

LEGACY_VERSIONS = ["0.1.0", "0.2.0"]
IP_VERSION_FIELD_VERSIONS = ["0.3.0", "0.3.1", "0.4.0"]
CHECK_VERSIONS = ["0.4.0", "1.0.0", "1.1.0"]
LOOPBACK_ADDRESSES = [("inet", "127.0.0.1/8"), ("inet6", "::1/128")]

Impl = namedtuple("Impl", "name bin versions ours")


@pytest.fixture
def ours(ours_bin):
    """Our loopback (built zipapp)."""
    return Impl("ours", ours_bin, VERSIONS, True)


@pytest.fixture
def ref(ref_bin):
    """The reference Go loopback; skips when it is not installed."""
    return Impl("ref", ref_bin, REF_VERSIONS, False)


def impl_versions(versions=VERSIONS):
    """(implementation, version) pairs: ours for `versions`, the reference for those it speaks."""
    return ([pytest.param("ours", v, id="ours-" + v) for v in versions] +
            [pytest.param("ref", v, id="ref-" + v) for v in versions if v in REF_VERSIONS])


@pytest.fixture
def impl(request, impl_name):
    """The implementation named by the test's `impl_name` parameter."""
    return request.getfixturevalue(impl_name)


@pytest.fixture
def sandbox(container):
    """A container namespace whose lo is down, as in a namespace a runtime just made."""
    container.run("ip", "link", "set", "lo", "down")
    return container


def loopback_config(version, **extra):
    conf = {"cniVersion": version, "name": "cbtlo", "type": "loopback"}
    conf.update(extra)
    return conf


def call(impl, command, conf, node, netns, **kwargs):
    """Run loopback `command` inside `node` against `netns` (a path, or None)."""
    return run_cni(impl.bin, "loopback", command, conf, node=node, netns=netns, **kwargs)


def assert_ok_silent(res):
    """Success with nothing on stdout (DEL, CHECK, STATUS, GC)."""
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert res.stdout.strip() == "", res.stdout
    assert "Traceback" not in res.stderr


def assert_cni_failure(res):
    """Failure the CNI way: non-zero exit and one error object with int code and str msg."""
    assert res.returncode != 0, (res.stdout, res.stderr)
    assert isinstance(res.json, dict), res.stdout
    assert type(res.json.get("code")) is int and isinstance(res.json.get("msg"), str), res.json
    assert "Traceback" not in res.stdout + res.stderr


def lo_is_up(ns):
    return "UP" in ns.links()["lo"]["flags"]


def assert_lo_up_with_addresses(ns):
    assert lo_is_up(ns), ns.links()["lo"]
    addrs = ns.addrs("lo")
    for address in LOOPBACK_ADDRESSES:
        assert address in addrs, addrs


def without_empty_dns(result):
    """`dns: {}` carries nothing; both implementations may print or omit it."""
    result = dict(result)
    if result.get("dns") == {}:
        del result["dns"]
    return result


def expected_add_result(version, sandbox):
    """The loopback ADD result in the wire format of `version` (§1.7, issue 2 point 6)."""
    if version in LEGACY_VERSIONS:
        return {"cniVersion": version, "ip4": {"ip": "127.0.0.1/8"}, "ip6": {"ip": "::1/128"}}
    ips = [{"interface": 0, "address": "127.0.0.1/8"}, {"interface": 0, "address": "::1/128"}]
    if version in IP_VERSION_FIELD_VERSIONS:
        ips[0]["version"], ips[1]["version"] = "4", "6"
    return {"cniVersion": version,
            "interfaces": [{"name": "lo", "mac": "00:00:00:00:00:00", "sandbox": sandbox}],
            "ips": ips}


# --- ADD ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ifname", ["eth0", "lo"])
@pytest.mark.parametrize("impl_name, version", impl_versions())
def test_add_brings_lo_up(impl, version, ifname, node, sandbox):
    """ADD brings the container's lo up with 127.0.0.1/8 and ::1/128, whatever CNI_IFNAME says."""
    assert not lo_is_up(sandbox)
    res = call(impl, "ADD", loopback_config(version), node, sandbox.path, ifname=ifname)
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert isinstance(res.json, dict), res.stdout
    assert_lo_up_with_addresses(sandbox)
    assert not [name for name in sandbox.links() if name != "lo"]


@pytest.mark.parametrize("version", VERSIONS)
def test_add_result_per_version(ours, version, node, sandbox):
    """Our ADD result is encoded in the config's version: ip4/ip6, ips[].version, or neither.

    Ours only: the reference prints the 1.x shape under every version label from 0.2.0 on.
    """
    res = call(ours, "ADD", loopback_config(version), node, sandbox.path)
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert without_empty_dns(res.json) == expected_add_result(version, sandbox.path)


@pytest.mark.parametrize("impl_name, version", impl_versions(["1.0.0"]))
def test_add_accepts_15_byte_ifname(impl, version, node, sandbox):
    """A 15-byte CNI_IFNAME (the kernel's limit) is accepted."""
    res = call(impl, "ADD", loopback_config(version), node, sandbox.path, ifname="0123456789abcde")
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert lo_is_up(sandbox)


@pytest.mark.parametrize("impl_name", ["ours", "ref"])
def test_missing_cni_version_means_0_1_0(impl, node, sandbox):
    """A config without cniVersion is served as 0.1.0: the legacy ip4/ip6 result."""
    conf = loopback_config("")
    del conf["cniVersion"]
    res = call(impl, "ADD", conf, node, sandbox.path)
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert without_empty_dns(res.json) == expected_add_result("0.1.0", sandbox.path)
    assert_lo_up_with_addresses(sandbox)


def prev_result_in(version):
    """A previous plugin's result (one container interface, v4 + v6, routes, dns) in `version`."""
    if version in LEGACY_VERSIONS:
        return {"cniVersion": version,
                "ip4": {"ip": "10.1.2.3/24", "gateway": "10.1.2.1",
                        "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.2.1"}]},
                "ip6": {"ip": "2001:db8::3/64", "gateway": "2001:db8::1"},
                "dns": {"nameservers": ["10.1.2.1"], "search": ["example.org"]}}
    ips = [{"interface": 0, "address": "10.1.2.3/24", "gateway": "10.1.2.1"},
           {"interface": 0, "address": "2001:db8::3/64", "gateway": "2001:db8::1"}]
    if version in IP_VERSION_FIELD_VERSIONS:
        ips[0]["version"], ips[1]["version"] = "4", "6"
    return {"cniVersion": version,
            "interfaces": [{"name": "eth0", "mac": "0a:58:0a:01:02:03", "sandbox": "/run/netns/x"}],
            "ips": ips,
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.2.1"}],
            "dns": {"nameservers": ["10.1.2.1"], "search": ["example.org"]}}


@pytest.mark.parametrize("version", VERSIONS)
def test_add_passes_prev_result_through(ours, version, node, sandbox):
    """With a prevResult in the config's version, ADD outputs it unchanged and still brings lo up."""
    prev = prev_result_in(version)
    res = call(ours, "ADD", loopback_config(version, prevResult=prev), node, sandbox.path)
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert res.json == prev
    assert_lo_up_with_addresses(sandbox)


@pytest.mark.parametrize("config_version, prev_version", [
    ("0.4.0", "1.0.0"), ("1.0.0", "0.4.0"), ("0.2.0", "1.0.0"), ("1.1.0", "0.2.0"),
])
def test_add_converts_prev_result(ours, config_version, prev_version, node, sandbox):
    """A prevResult in another version comes out converted to the config's version (§1.7)."""
    conf = loopback_config(config_version, prevResult=prev_result_in(prev_version))
    res = call(ours, "ADD", conf, node, sandbox.path)
    assert res.returncode == 0, (res.stdout, res.stderr)
    expected = prev_result_in(config_version)
    if prev_version in LEGACY_VERSIONS:    # a legacy result has no interfaces or ip indexes
        del expected["interfaces"]
        for ip in expected["ips"]:
            del ip["interface"]
        expected["routes"] = [{"dst": "0.0.0.0/0", "gw": "10.1.2.1"}]
    assert res.json == expected


# --- CHECK ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl_name, version", impl_versions(CHECK_VERSIONS))
def test_check_follows_lo_state(impl, version, node, sandbox):
    """CHECK succeeds while lo is up and fails with a CNI error once lo was set down."""
    conf = loopback_config(version)
    add = call(impl, "ADD", conf, node, sandbox.path)
    assert add.returncode == 0, (add.stdout, add.stderr)
    conf["prevResult"] = add.json
    assert_ok_silent(call(impl, "CHECK", conf, node, sandbox.path))
    sandbox.run("ip", "link", "set", "lo", "down")
    assert_cni_failure(call(impl, "CHECK", conf, node, sandbox.path))


# --- DEL ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl_name, version", impl_versions())
def test_del_brings_lo_down(impl, version, node, sandbox):
    """DEL after ADD takes the container's lo down and prints nothing."""
    conf = loopback_config(version)
    add = call(impl, "ADD", conf, node, sandbox.path)
    assert add.returncode == 0, (add.stdout, add.stderr)
    assert lo_is_up(sandbox)
    assert_ok_silent(call(impl, "DEL", conf, node, sandbox.path))
    assert not lo_is_up(sandbox)


@pytest.mark.parametrize("netns", ["unset", "empty", "deleted"])
@pytest.mark.parametrize("impl_name, version", impl_versions(["0.2.0", "0.4.0", "1.0.0", "1.1.0"]))
def test_del_without_usable_netns(impl, version, netns, node, make_netns):
    """DEL succeeds silently when CNI_NETNS is unset, empty or names a namespace already deleted."""
    env = {}
    if netns == "unset":
        env["CNI_NETNS"] = None
    elif netns == "empty":
        env["CNI_NETNS"] = ""
    else:
        gone = make_netns("gone")
        subprocess.run(["ip", "netns", "delete", gone.name], check=True)
        env["CNI_NETNS"] = gone.path
    assert_ok_silent(call(impl, "DEL", loopback_config(version), node, None, env=env))


# --- STATUS and GC (1.1.0; the Debian reference predates them) -------------------------------------

def test_status_succeeds(ours, node):
    """STATUS with a 1.1.0 config succeeds with no output."""
    env = {"CNI_CONTAINERID": None, "CNI_IFNAME": None, "CNI_NETNS": None}
    assert_ok_silent(call(ours, "STATUS", loopback_config("1.1.0"), node, None, env=env))


def test_gc_succeeds(ours, node):
    """GC with a 1.1.0 config and its attachment list succeeds with no output."""
    conf = loopback_config("1.1.0", **{
        "cni.dev/valid-attachments": [{"containerID": "ctr1", "ifname": "eth0"}],
        "cni.dev/attachments": [{"containerID": "ctr1", "ifname": "eth0"}]})
    env = {"CNI_CONTAINERID": None, "CNI_IFNAME": None, "CNI_NETNS": None}
    assert_ok_silent(call(ours, "GC", conf, node, None, env=env))


# --- differential ---------------------------------------------------------------------------------

def normalised(result, sandbox):
    """A result with the container-specific sandbox path replaced and empty dns dropped."""
    result = without_empty_dns(copy.deepcopy(result))
    for interface in result.get("interfaces", []):
        if interface.get("sandbox") == sandbox:
            interface["sandbox"] = "<sandbox>"
    return result


@pytest.mark.parametrize("with_prev_result", [False, True], ids=["plain", "prevResult"])
def test_same_result_as_reference(ours, ref, with_prev_result, node, make_netns):
    """At 1.0.0 ours and the reference print the same result and both bring lo up.

    Only 1.0.0 is compared: the reference mislabels its results for older versions.
    """
    extra = {"prevResult": prev_result_in("1.0.0")} if with_prev_result else {}
    results = {}
    for impl in (ours, ref):
        ct = make_netns("ct")
        ct.run("ip", "link", "set", "lo", "down")
        res = call(impl, "ADD", loopback_config("1.0.0", **extra), node, ct.path)
        assert res.returncode == 0, (impl.name, res.stdout, res.stderr)
        assert_lo_up_with_addresses(ct)
        results[impl.name] = normalised(res.json, ct.path)
    assert results["ours"] == results["ref"]
