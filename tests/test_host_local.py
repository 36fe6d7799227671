"""Black-box tests of the host-local IPAM plugin (cni-reference.md §3 and §8, issue 3).

Every call runs the `host-local` symlink inside a fresh "node" namespace with CNI_NETNS naming a
container namespace (host-local touches neither), against a temporary dataDir.  What counts is the
state on disk: reservation files are read back byte for byte.  Tests parametrised with `impl_name`
run against ours and the reference Go plugin (/usr/lib/cni/host-local, cniVersion up to 1.0.0) to
prove parity; tests that take only `ours` say why the reference is left out.
"""

import ipaddress
import os
import random
import re
import signal
import stat
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import IP, REF_VERSIONS, VERSIONS, cni_env, encode_conf, is_address, reservations, run_cni

pytestmark = pytest.mark.kernel

NET = "cbtnet"
BOTH = pytest.mark.parametrize("impl_name", ["ours", "ref"])
LEGACY_VERSIONS = ["0.1.0", "0.2.0"]
IP_VERSION_FIELD_VERSIONS = ["0.3.0", "0.3.1", "0.4.0"]
CHECK_VERSIONS = ["0.4.0", "1.0.0", "1.1.0"]
V4_SUBNET = "10.10.0.0/24"
V6_SUBNET = "fd00:10::/64"
SLASH29 = "10.10.0.0/29"           # usable .2-.6 (gateway .1, broadcast .7)
SLASH29_SET = "10.10.0.1-10.10.0.6"  # its range set as the reference names it in messages
DUAL_STACK = [[{"subnet": V4_SUBNET}], [{"subnet": V6_SUBNET}]]
CURSOR_RE = re.compile(r"last_reserved_ip\.\d+")


def impls_with_versions(versions):
    """(implementation, version) pairs: ours for every version, the reference for those it speaks."""
    return [pytest.param(name, version, id="%s-%s" % (name, version))
            for name in ("ours", "ref") for version in versions
            if name == "ours" or version in REF_VERSIONS]


# ------------------------------------------------------------------------------------------------
# Calling the plugin and reading its state
# ------------------------------------------------------------------------------------------------

class HostLocal:
    """One host-local implementation, run inside `node` for containers in `container`, state in data_dir."""

    def __init__(self, bin_dir, node, container, data_dir, is_ours):
        self.bin = bin_dir
        self.is_ours = is_ours
        self.node = node
        self.container = container
        self.data_dir = data_dir
        self.state_dir = data_dir / NET

    def conf(self, version="1.0.0", top=None, **ipam):
        """The network config as bridge would pass it on: `ipam` keys (dataDir added) plus `top` keys."""
        conf = {"cniVersion": version, "name": NET, "type": "bridge",
                "ipam": dict({"type": "host-local", "dataDir": str(self.data_dir)}, **ipam)}
        conf.update(top or {})
        return conf

    def call(self, command, conf, cid="ctr1", ifname="eth0", **kwargs):
        """Any command for (cid, ifname); returns the CNIRun whatever the outcome."""
        return run_cni(self.bin, "host-local", command, conf, node=self.node, netns=self.container,
                       container_id=cid, ifname=ifname, **kwargs)

    def add(self, conf, cid="ctr1", ifname="eth0", **kwargs):
        """ADD that must succeed; returns the result object."""
        res = self.call("ADD", conf, cid, ifname, **kwargs)
        assert res.returncode == 0, (res.stdout, res.stderr)
        assert isinstance(res.json, dict), res.stdout
        return res.json

    def delete(self, conf, cid="ctr1", ifname="eth0"):
        """DEL that must succeed silently."""
        assert_ok_silent(self.call("DEL", conf, cid, ifname))

    def check(self, conf, cid="ctr1", ifname="eth0"):
        """CHECK; returns the CNIRun."""
        return self.call("CHECK", conf, cid, ifname)

    def runtime_call(self, command, conf):
        """GC or STATUS: only CNI_COMMAND and CNI_PATH are set, as libcni does."""
        return run_cni(self.bin, "host-local", command, conf, node=self.node, netns=None,
                       container_id=None, ifname=None)


@pytest.fixture
def ours(ours_bin, node, container, data_dir):
    return HostLocal(ours_bin, node, container, data_dir, is_ours=True)


@pytest.fixture
def ref(ref_bin, node, container, data_dir):
    return HostLocal(ref_bin, node, container, data_dir, is_ours=False)


@pytest.fixture
def hl(request, impl_name):
    """The implementation named by the test's `impl_name` parameter."""
    return request.getfixturevalue(impl_name)


def leftovers(state_dir):
    """Names in `state_dir` other than `lock`, `boot_id` (ours) and `last_reserved_ip.<N>`."""
    if not state_dir.is_dir():
        return set()
    return {name for name in os.listdir(state_dir)
            if name not in ("lock", "boot_id") and not CURSOR_RE.fullmatch(name)}


def owner(cid, ifname="eth0"):
    """Reservation file content in the reference's format."""
    return ("%s\r\n%s" % (cid, ifname)).encode()


def addresses(result):
    """Addresses of a 0.3.0+ result."""
    return [ip["address"] for ip in result["ips"]]


def assert_ok_silent(res):
    """Success with nothing on stdout (DEL, CHECK, GC, STATUS)."""
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert res.stdout.strip() == "", res.stdout


def assert_cni_error(res, code=None):
    """Failure the CNI way: non-zero exit, one error object with int `code` (== code if given) and `msg`."""
    assert res.returncode != 0, (res.stdout, res.stderr)
    assert isinstance(res.json, dict), (res.stdout, res.stderr)
    assert type(res.json.get("code")) is int and isinstance(res.json.get("msg"), str), res.json
    assert "Traceback" not in res.stdout + res.stderr
    if code is not None:
        assert res.json["code"] == code, res.json
    return res.json


# ------------------------------------------------------------------------------------------------
# Result shape
# ------------------------------------------------------------------------------------------------

RESOLV_CONF = """\
# a comment
; another comment

nameserver 10.0.0.53
nameserver fd00::53
domain example.test
search a.example b.example
options ndots:2 edns0
options timeout:1
sortlist 10.0.0.0
"""
EXPECTED_DNS = {"nameservers": ["10.0.0.53", "fd00::53"], "domain": "example.test",
                "search": ["a.example", "b.example"], "options": ["ndots:2", "edns0", "timeout:1"]}
V4_ROUTES = [{"dst": "0.0.0.0/0"}, {"dst": "192.168.0.0/16", "gw": "10.10.0.254"}]
V6_ROUTES = [{"dst": "::/0", "gw": "fd00:10::fe"}]


def expected_dual_stack_result(version):
    """First dual-stack allocation (.2 / ::2, gateways .1 / ::1) in `version`'s short IPAM form."""
    v4 = {"address": "10.10.0.2/24", "gateway": "10.10.0.1"}
    v6 = {"address": "fd00:10::2/64", "gateway": "fd00:10::1"}
    if version in LEGACY_VERSIONS:
        return {"cniVersion": version, "dns": EXPECTED_DNS,
                "ip4": {"ip": v4["address"], "gateway": v4["gateway"], "routes": V4_ROUTES},
                "ip6": {"ip": v6["address"], "gateway": v6["gateway"], "routes": V6_ROUTES}}
    if version in IP_VERSION_FIELD_VERSIONS:
        v4["version"], v6["version"] = "4", "6"
    return {"cniVersion": version, "ips": [v4, v6], "routes": V4_ROUTES + V6_ROUTES, "dns": EXPECTED_DNS}


@pytest.mark.parametrize("impl_name, version", impls_with_versions(VERSIONS))
def test_add_result_shape_per_version(hl, version, tmp_path):
    """ADD answers the short IPAM result (no interfaces, no interface index) in the config's version,
    with .2/::2 and gateways .1/::1, the config's routes and dns parsed from resolvConf."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(RESOLV_CONF)
    conf = hl.conf(version, ranges=DUAL_STACK, routes=V4_ROUTES + V6_ROUTES, resolvConf=str(resolv))
    assert hl.add(conf) == expected_dual_stack_result(version)


def test_route_fields_of_1_1_0_are_copied(ours):
    """1.1.0 route fields (mtu, advmss, priority, table, scope) reach the result unchanged.
    Ours only: the reference does not speak 1.1.0."""
    routes = [{"dst": "0.0.0.0/0", "gw": "10.10.0.1", "mtu": 1400, "advmss": 1360, "priority": 10,
               "table": 100, "scope": 0},
              {"dst": "10.20.0.0/16", "scope": 253}]
    result = ours.add(ours.conf("1.1.0", subnet=V4_SUBNET, routes=routes))
    assert result["routes"] == routes
    assert addresses(result) == ["10.10.0.2/24"]


# ------------------------------------------------------------------------------------------------
# State files
# ------------------------------------------------------------------------------------------------

@BOTH
def test_state_files_byte_for_byte(hl):
    """A reservation is `<ip>` holding b"<cid>\\r\\n<ifname>", the cursor `last_reserved_ip.0` the bare
    ip text, plus a `lock` file (and ours the boot the reservations belong to); the directory is
    0755 and no file is group/world writable."""
    hl.add(hl.conf(subnet=V4_SUBNET), cid="ctr-A.1_x", ifname="net1")
    bookkeeping = ["boot_id"] if hl.is_ours else []
    assert sorted(os.listdir(hl.state_dir)) == sorted(bookkeeping + ["10.10.0.2", "last_reserved_ip.0", "lock"])
    assert (hl.state_dir / "10.10.0.2").read_bytes() == b"ctr-A.1_x\r\nnet1"
    assert (hl.state_dir / "last_reserved_ip.0").read_bytes() == b"10.10.0.2"
    assert stat.S_IMODE(hl.state_dir.stat().st_mode) == 0o755
    for path in hl.state_dir.iterdir():
        mode = path.lstat().st_mode
        assert stat.S_ISREG(mode), path
        assert mode & 0o022 == 0, "%s is group/world writable: %o" % (path, mode)


@BOTH
def test_ipv6_file_names_are_canonical(hl):
    """IPv6 reservation and cursor use the canonical compressed text, whatever the config spelled."""
    conf = hl.conf(subnet="2001:DB8:0:0::/64", rangeStart="2001:0db8:0:0:0:0:0:a")
    assert addresses(hl.add(conf, cid="a")) == ["2001:db8::a/64"]
    assert addresses(hl.add(conf, cid="b")) == ["2001:db8::b/64"]
    assert reservations(hl.state_dir, raw=True) == {"2001:db8::a": owner("a"), "2001:db8::b": owner("b")}
    assert (hl.state_dir / "last_reserved_ip.0").read_bytes() == b"2001:db8::b"


# ------------------------------------------------------------------------------------------------
# Allocation
# ------------------------------------------------------------------------------------------------

@BOTH
def test_round_robin_continues_after_last_reserved(hl):
    """A just-released address is not handed out again: the next ADD continues after the cursor."""
    conf = hl.conf(subnet=V4_SUBNET)
    assert addresses(hl.add(conf, cid="a")) == ["10.10.0.2/24"]
    assert addresses(hl.add(conf, cid="b")) == ["10.10.0.3/24"]
    hl.delete(conf, cid="a")
    assert addresses(hl.add(conf, cid="c")) == ["10.10.0.4/24"]
    assert reservations(hl.state_dir, raw=True) == {"10.10.0.3": owner("b"), "10.10.0.4": owner("c")}


@BOTH
def test_allocation_wraps_to_range_start(hl):
    """After the range end the search wraps to its start (skipping the gateway) and finds the holes."""
    conf = hl.conf(subnet=SLASH29)
    for cid in "abcde":
        hl.add(conf, cid=cid)
    hl.delete(conf, cid="a")
    hl.delete(conf, cid="c")
    assert addresses(hl.add(conf, cid="f")) == ["10.10.0.2/29"]
    assert addresses(hl.add(conf, cid="g")) == ["10.10.0.4/29"]


@BOTH
def test_exhaustion_fails_and_reserves_nothing(hl):
    """A /29 gives .2-.6; the sixth ADD fails with an error naming the range set and reserves nothing."""
    conf = hl.conf(subnet=SLASH29)
    got = [addresses(hl.add(conf, cid="c%d" % i))[0] for i in range(5)]
    assert got == ["10.10.0.%d/29" % host for host in range(2, 7)]
    before = reservations(hl.state_dir, raw=True)
    error = assert_cni_error(hl.call("ADD", conf, cid="late"))
    assert SLASH29_SET in error["msg"], error
    assert reservations(hl.state_dir, raw=True) == before
    assert (hl.state_dir / "last_reserved_ip.0").read_bytes() == b"10.10.0.6"


@BOTH
def test_gateway_inside_range_is_skipped(hl):
    """A gateway in the middle of the range is never handed out."""
    conf = hl.conf(subnet=V4_SUBNET, gateway="10.10.0.3", rangeStart="10.10.0.2", rangeEnd="10.10.0.5")
    results = [hl.add(conf, cid=cid) for cid in "abc"]
    assert [addresses(r) for r in results] == [["10.10.0.2/24"], ["10.10.0.4/24"], ["10.10.0.5/24"]]
    assert all(r["ips"][0]["gateway"] == "10.10.0.3" for r in results)
    assert "10.10.0.2-10.10.0.5" in assert_cni_error(hl.call("ADD", conf, cid="d"))["msg"]


@BOTH
def test_range_start_and_end_bound_allocation(hl):
    """Only rangeStart..rangeEnd is handed out."""
    conf = hl.conf(subnet=V4_SUBNET, rangeStart="10.10.0.100", rangeEnd="10.10.0.102")
    got = [addresses(hl.add(conf, cid=cid))[0] for cid in "abc"]
    assert got == ["10.10.0.100/24", "10.10.0.101/24", "10.10.0.102/24"]
    assert "10.10.0.100-10.10.0.102" in assert_cni_error(hl.call("ADD", conf, cid="d"))["msg"]


@BOTH
def test_multiple_ranges_in_one_set(hl):
    """A set with several ranges moves on to the next range when one is full, each address carrying its
    own range's prefix and gateway, and wraps back to the first range."""
    ranges = [[{"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.10", "rangeEnd": "10.1.0.11"},
               {"subnet": "10.2.0.0/16", "rangeStart": "10.2.5.5", "rangeEnd": "10.2.5.5"}]]
    conf = hl.conf(ranges=ranges)
    got = [hl.add(conf, cid=cid)["ips"] for cid in "abc"]
    assert got == [[{"address": "10.1.0.10/24", "gateway": "10.1.0.1"}],
                   [{"address": "10.1.0.11/24", "gateway": "10.1.0.1"}],
                   [{"address": "10.2.5.5/16", "gateway": "10.2.0.1"}]]
    assert_cni_error(hl.call("ADD", conf, cid="d"))
    hl.delete(conf, cid="a")
    assert addresses(hl.add(conf, cid="e")) == ["10.1.0.10/24"]


@BOTH
def test_dual_stack_gives_one_address_per_set(hl):
    """Two range sets (v4 + v6) give two addresses, two reservations and one cursor per set."""
    result = hl.add(hl.conf(ranges=DUAL_STACK))
    assert addresses(result) == ["10.10.0.2/24", "fd00:10::2/64"]
    assert reservations(hl.state_dir, raw=True) == {"10.10.0.2": owner("ctr1"), "fd00:10::2": owner("ctr1")}
    assert (hl.state_dir / "last_reserved_ip.0").read_bytes() == b"10.10.0.2"
    assert (hl.state_dir / "last_reserved_ip.1").read_bytes() == b"fd00:10::2"


@BOTH
def test_runtime_ip_ranges_come_first(hl):
    """runtimeConfig.ipRanges are prepended: their address comes first and they own cursor index 0."""
    conf = hl.conf(ranges=[[{"subnet": V4_SUBNET}]],
                   top={"runtimeConfig": {"ipRanges": [[{"subnet": "10.50.0.0/24"}]]}})
    assert addresses(hl.add(conf)) == ["10.50.0.2/24", "10.10.0.2/24"]
    assert (hl.state_dir / "last_reserved_ip.0").read_bytes() == b"10.50.0.2"
    assert (hl.state_dir / "last_reserved_ip.1").read_bytes() == b"10.10.0.2"


def requested_ip_call(source, ip):
    """(top-level config keys, CNI_ARGS) that request `ip` through `source`."""
    if source == "cni-args":
        return {}, "IP=" + ip
    if source == "args":
        return {"args": {"cni": {"ips": [ip]}}}, None
    return {"runtimeConfig": {"ips": [ip]}}, None


@BOTH
@pytest.mark.parametrize("source", ["cni-args", "args", "runtime-config"])
@pytest.mark.parametrize("requested", ["10.10.0.7", "10.10.0.7/24"])
def test_requested_ip_is_honoured(hl, source, requested):
    """A requested address (CNI_ARGS IP=, args.cni.ips or runtimeConfig.ips, bare or with a prefix)
    is reserved and moves the cursor, so the next plain ADD continues after it."""
    top, cni_args = requested_ip_call(source, requested)
    requesting = hl.conf(subnet=V4_SUBNET, top=top)
    assert addresses(hl.add(requesting, cid="a", cni_args=cni_args)) == ["10.10.0.7/24"]
    assert reservations(hl.state_dir, raw=True) == {"10.10.0.7": owner("a")}
    assert (hl.state_dir / "last_reserved_ip.0").read_bytes() == b"10.10.0.7"
    assert addresses(hl.add(hl.conf(subnet=V4_SUBNET), cid="b")) == ["10.10.0.8/24"]


@BOTH
def test_requested_ip_taken_fails(hl):
    """Requesting an address another container holds fails and reserves nothing for the caller."""
    conf = hl.conf(subnet=V4_SUBNET)
    hl.add(conf, cid="a", cni_args="IP=10.10.0.7")
    assert_cni_error(hl.call("ADD", conf, cid="b", cni_args="IP=10.10.0.7"))
    assert reservations(hl.state_dir, raw=True) == {"10.10.0.7": owner("a")}


@BOTH
@pytest.mark.parametrize("requested", ["10.99.0.5", "10.10.0.1"], ids=["outside-ranges", "gateway"])
def test_unservable_requested_ip_fails(hl, requested):
    """Requesting an address outside every range, or the gateway, fails and reserves nothing."""
    res = hl.call("ADD", hl.conf(subnet=V4_SUBNET), cni_args="IP=" + requested)
    assert_cni_error(res)
    assert reservations(hl.state_dir, raw=True) == {}


@BOTH
@pytest.mark.parametrize("prefix", [64, 48])
def test_large_ipv6_ranges(hl, prefix):
    """/64 and /48 ranges allocate from ::2 on and accept a requested address far into the range."""
    subnet = "fd00:%d::/%d" % (prefix, prefix)
    conf = hl.conf(subnet=subnet)
    assert addresses(hl.add(conf, cid="a")) == ["fd00:%d::2/%d" % (prefix, prefix)]
    assert addresses(hl.add(conf, cid="b")) == ["fd00:%d::3/%d" % (prefix, prefix)]
    far = str(ipaddress.ip_network(subnet)[-2])
    assert addresses(hl.add(conf, cid="c", cni_args="IP=" + far)) == ["%s/%d" % (far, prefix)]
    assert reservations(hl.state_dir, raw=True)[far] == owner("c")


def test_repeated_add_returns_existing_reservation(ours):
    """Decision 2: a repeated ADD of the same (containerID, ifname) returns its reservation, leaking
    nothing; another ifname gets another address.  Ours only: the reference fails (next test)."""
    conf = ours.conf(ranges=DUAL_STACK)
    first = ours.add(conf)
    assert ours.add(conf) == first
    assert addresses(ours.add(conf, ifname="net1")) == ["10.10.0.3/24", "fd00:10::3/64"]
    assert reservations(ours.state_dir, raw=True) == {"10.10.0.2": owner("ctr1"), "fd00:10::2": owner("ctr1"),
                                            "10.10.0.3": owner("ctr1", "net1"),
                                            "fd00:10::3": owner("ctr1", "net1")}


def test_reference_refuses_repeated_add(ref):
    """Documents the deviation of decision 2: the reference answers a repeated ADD with an error."""
    conf = ref.conf(subnet=V4_SUBNET)
    ref.add(conf)
    assert "duplicate allocation" in assert_cni_error(ref.call("ADD", conf))["msg"]
    assert reservations(ref.state_dir, raw=True) == {"10.10.0.2": owner("ctr1")}


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------

INVALID_IPAM = [
    pytest.param("1.0.0", {"subnet": "10.10.0.5/24"}, id="host-bits-set"),
    pytest.param("1.0.0", {"subnet": "10.10.0.0/31"}, id="v4-subnet-too-small"),
    pytest.param("1.0.0", {"subnet": "fd00::/127"}, id="v6-subnet-too-small"),
    pytest.param("1.0.0", {"subnet": "garbage"}, id="subnet-not-a-cidr"),
    pytest.param("1.0.0", {"subnet": V4_SUBNET, "rangeStart": "10.11.0.5"}, id="range-start-outside"),
    pytest.param("1.0.0", {"subnet": V4_SUBNET, "rangeEnd": "10.11.0.5"}, id="range-end-outside"),
    pytest.param("1.0.0", {"ranges": [[{"subnet": V4_SUBNET}], [{"subnet": "10.10.0.0/25"}]]},
                 id="overlapping-range-sets"),
    pytest.param("1.0.0", {"ranges": [[{"subnet": V4_SUBNET}, {"subnet": "10.10.0.0/25"}]]},
                 id="overlapping-ranges-in-a-set"),
    pytest.param("1.0.0", {"ranges": [[{"subnet": V4_SUBNET}, {"subnet": V6_SUBNET}]]},
                 id="mixed-families-in-a-set"),
    pytest.param("0.2.0", {"ranges": [[{"subnet": V4_SUBNET}], [{"subnet": "10.20.0.0/24"}]]},
                 id="two-v4-sets-in-0.2.0"),
    pytest.param("1.0.0", None, id="missing-ipam"),
    pytest.param("1.0.0", {}, id="no-ranges"),
    pytest.param("1.0.0", {"ranges": [[]]}, id="empty-range-set"),
]


@BOTH
@pytest.mark.parametrize("version, ipam", INVALID_IPAM)
def test_invalid_config_is_refused(hl, version, ipam):
    """Bad range configs fail with a CNI error (ours: code 7; the reference uses 999) and reserve nothing."""
    conf = hl.conf(version, **(ipam or {}))
    if ipam is None:
        del conf["ipam"]
    assert_cni_error(hl.call("ADD", conf), code=7 if hl.is_ours else None)
    assert reservations(hl.state_dir, raw=True) == {}


def test_gateway_outside_subnet_is_refused(ours):
    """Issue 3 asks code 7 for a gateway outside its subnet.  Ours only: the reference accepts it."""
    res = ours.call("ADD", ours.conf(subnet=V4_SUBNET, gateway="10.11.0.1"))
    assert_cni_error(res, code=7)
    assert reservations(ours.state_dir, raw=True) == {}


# ------------------------------------------------------------------------------------------------
# DEL
# ------------------------------------------------------------------------------------------------

@BOTH
def test_del_releases_every_address_of_the_attachment_only(hl):
    """DEL frees all sets' addresses of (cid, ifname) and leaves other attachments and the cursors alone."""
    conf = hl.conf(ranges=DUAL_STACK)
    hl.add(conf, cid="a")
    hl.add(conf, cid="a", ifname="net1")
    hl.add(conf, cid="b")
    cursors = {name: (hl.state_dir / name).read_bytes() for name in ("last_reserved_ip.0", "last_reserved_ip.1")}
    hl.delete(conf, cid="a")
    assert reservations(hl.state_dir, raw=True) == {"10.10.0.3": owner("a", "net1"), "fd00:10::3": owner("a", "net1"),
                                          "10.10.0.4": owner("b"), "fd00:10::4": owner("b")}
    assert {name: (hl.state_dir / name).read_bytes() for name in cursors} == cursors


@BOTH
def test_del_of_unknown_container_succeeds(hl):
    """DEL of a container that holds nothing succeeds, in an empty and in a populated state dir."""
    conf = hl.conf(subnet=V4_SUBNET)
    hl.delete(conf, cid="nobody")
    hl.add(conf, cid="a")
    hl.delete(conf, cid="nobody")
    assert reservations(hl.state_dir, raw=True) == {"10.10.0.2": owner("a")}


@BOTH
def test_del_twice_succeeds(hl):
    """A repeated DEL succeeds and the state dir keeps only lock and cursor."""
    conf = hl.conf(subnet=V4_SUBNET)
    hl.add(conf)
    hl.delete(conf)
    hl.delete(conf)
    assert leftovers(hl.state_dir) == set()


@BOTH
def test_del_releases_legacy_id_only_reservation(hl):
    """A pre-ifname reservation (the file holds just the container ID) is released by that container's DEL."""
    hl.state_dir.mkdir(parents=True)
    (hl.state_dir / "10.10.0.7").write_bytes(b"legacy")
    (hl.state_dir / "10.10.0.8").write_bytes(b"other")
    hl.delete(hl.conf(subnet=V4_SUBNET), cid="legacy")
    assert reservations(hl.state_dir, raw=True) == {"10.10.0.8": b"other"}


@pytest.mark.parametrize("broken_ipam", [{"subnet": "garbage"}, {"subnet": "10.10.0.5/24"}, {}],
                         ids=["not-a-cidr", "host-bits-set", "no-ranges"])
def test_del_works_when_ranges_no_longer_validate(ours, broken_ipam):
    """Decision 9: DEL releases by (cid, ifname) even when the range config has become invalid.
    Ours only: the reference fails such a DEL and leaks the address."""
    ours.add(ours.conf(ranges=DUAL_STACK))
    ours.add(ours.conf(ranges=DUAL_STACK), cid="other")
    ours.delete(ours.conf(**broken_ipam))
    assert reservations(ours.state_dir, raw=True) == {"10.10.0.3": owner("other"), "fd00:10::3": owner("other")}


# ------------------------------------------------------------------------------------------------
# CHECK
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl_name, version", impls_with_versions(CHECK_VERSIONS))
def test_check_follows_the_reservation(hl, version):
    """CHECK succeeds after ADD and fails with a CNI error once the reservation file is gone."""
    conf = hl.conf(version, subnet=V4_SUBNET)
    result = hl.add(conf)
    conf["prevResult"] = result
    assert_ok_silent(hl.check(conf))
    (hl.state_dir / "10.10.0.2").unlink()
    assert_cni_error(hl.check(conf))


# ------------------------------------------------------------------------------------------------
# GC and STATUS (ours only: the reference speaks up to 1.0.0 and implements neither)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["cni.dev/valid-attachments", "cni.dev/attachments"])
def test_gc_releases_attachments_not_listed(ours, key):
    """GC keeps the reservations of listed (cid, ifname) pairs, releases all others, and leaves
    lock and cursors alone; the tagged-spec alias `cni.dev/attachments` works too."""
    conf = ours.conf("1.1.0", ranges=DUAL_STACK)
    ours.add(conf, cid="keep")
    ours.add(conf, cid="keep", ifname="net1")
    ours.add(conf, cid="stale")
    cursors = {name: (ours.state_dir / name).read_bytes() for name in ("last_reserved_ip.0", "last_reserved_ip.1")}
    gc_conf = dict(conf, **{key: [{"containerID": "keep", "ifname": "eth0"}]})
    assert_ok_silent(ours.runtime_call("GC", gc_conf))
    assert reservations(ours.state_dir, raw=True) == {"10.10.0.2": owner("keep"), "fd00:10::2": owner("keep")}
    assert (ours.state_dir / "lock").is_file()
    assert {name: (ours.state_dir / name).read_bytes() for name in cursors} == cursors


def test_gc_with_empty_list_releases_everything(ours):
    """An empty valid-attachments list means no attachment is valid: every reservation goes."""
    conf = ours.conf("1.1.0", subnet=V4_SUBNET)
    ours.add(conf, cid="a")
    ours.add(conf, cid="b")
    assert_ok_silent(ours.runtime_call("GC", dict(conf, **{"cni.dev/valid-attachments": []})))
    assert leftovers(ours.state_dir) == set()


def test_gc_without_attachment_key_releases_nothing(ours):
    """A GC config carrying neither key says nothing about validity, so nothing is released."""
    conf = ours.conf("1.1.0", subnet=V4_SUBNET)
    ours.add(conf, cid="a")
    assert_ok_silent(ours.runtime_call("GC", conf))
    assert reservations(ours.state_dir, raw=True) == {"10.10.0.2": owner("a")}


def test_status_reports_exhaustion_with_code_50(ours):
    """STATUS succeeds while addresses are free, fails with code 50 naming the range when the only
    set is exhausted, and succeeds again once an address is released."""
    conf = ours.conf("1.1.0", subnet=SLASH29)
    assert_ok_silent(ours.runtime_call("STATUS", conf))
    for i in range(5):
        ours.add(conf, cid="c%d" % i)
    error = assert_cni_error(ours.runtime_call("STATUS", conf), code=50)
    assert SLASH29_SET in error["msg"] or SLASH29 in error["msg"], error
    ours.delete(conf, cid="c3")
    assert_ok_silent(ours.runtime_call("STATUS", conf))


def test_status_succeeds_while_another_range_of_the_set_has_room(ours):
    """A full range does not make STATUS fail while another range of the same set has free addresses."""
    ranges = [[{"subnet": SLASH29}, {"subnet": "10.20.0.0/29"}]]
    conf = ours.conf("1.1.0", ranges=ranges)
    for i in range(5):
        ours.add(conf, cid="c%d" % i)
    assert_ok_silent(ours.runtime_call("STATUS", conf))


# ------------------------------------------------------------------------------------------------
# Interoperability: one state directory, both implementations
# ------------------------------------------------------------------------------------------------

def switch_implementations(first, second):
    """`first` reserves for a and b; `second` must CHECK them, DEL a, and continue after first's cursor."""
    conf = first.conf("1.0.0", ranges=DUAL_STACK)
    first.add(conf, cid="a")
    first.add(conf, cid="b")
    assert_ok_silent(second.check(conf, cid="a"))
    second.delete(conf, cid="a")
    assert addresses(second.add(conf, cid="c")) == ["10.10.0.4/24", "fd00:10::4/64"]
    assert_ok_silent(second.check(conf, cid="b"))
    assert reservations(first.state_dir, raw=True) == {"10.10.0.3": owner("b"), "fd00:10::3": owner("b"),
                                             "10.10.0.4": owner("c"), "fd00:10::4": owner("c")}


def test_reference_state_is_read_by_ours(ref, ours):
    """A node switching from the reference to ours: ours finds, releases and continues after ref's state."""
    switch_implementations(ref, ours)


def test_our_state_is_read_by_reference(ours, ref):
    """A node switching back from ours to the reference: the reference reads our state the same way."""
    switch_implementations(ours, ref)


# ------------------------------------------------------------------------------------------------
# Concurrency and crashes
# ------------------------------------------------------------------------------------------------

@BOTH
def test_concurrent_adds_and_dels(hl):
    """32 ADDs at once from a 40-address range get 32 distinct addresses, as the files say; 32 DELs at
    once then leave only lock and cursor."""
    conf = hl.conf(subnet=V4_SUBNET, rangeStart="10.10.0.10", rangeEnd="10.10.0.49")
    cids = ["ctr%02d" % i for i in range(32)]
    with ThreadPoolExecutor(len(cids)) as pool:
        added = list(pool.map(lambda cid: hl.call("ADD", conf, cid=cid), cids))
    for res in added:
        assert res.returncode == 0, (res.stdout, res.stderr)
    got = {cid: addresses(res.json)[0].split("/")[0] for cid, res in zip(cids, added)}
    assert len(set(got.values())) == len(cids)
    assert reservations(hl.state_dir, raw=True) == {ip: owner(cid) for cid, ip in got.items()}
    with ThreadPoolExecutor(len(cids)) as pool:
        deleted = list(pool.map(lambda cid: hl.call("DEL", conf, cid=cid), cids))
    for res in deleted:
        assert_ok_silent(res)
    assert leftovers(hl.state_dir) == set()


def start_add(hl, conf, cid):
    """Start an ADD for `cid` inside the node namespace without waiting (`ip netns exec` execs in place,
    so the pid is the plugin's own)."""
    proc = subprocess.Popen([IP, "netns", "exec", hl.node.name, str(hl.bin / "host-local")],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=cni_env("ADD", hl.bin, netns=hl.container, container_id=cid))
    proc.stdin.write(encode_conf(conf))
    proc.stdin.close()
    return proc


def test_sigkill_during_add_never_leaves_a_partial_reservation(ours):
    """ADDs killed with SIGKILL at random instants leave no empty, partial or duplicate reservation, and the
    runtime's DEL for each killed container then leaves a clean state dir (and the next ADD works).
    Kill delays are spread over the length of one whole ADD, measured first on this machine.
    Ours only: the reference can leave an empty file between its create and its write (§3.4)."""
    conf = ours.conf(subnet=V4_SUBNET)
    started = time.monotonic()
    assert start_add(ours, conf, "crash-calibration").wait(timeout=60) == 0
    add_duration = time.monotonic() - started
    rng = random.Random(20240601)
    complete = re.compile(rb"crash[-\w]*\r\neth0")
    cids = ["crash%d" % run for run in range(30)]
    for cid in cids:
        proc = start_add(ours, conf, cid)
        try:
            proc.wait(timeout=rng.uniform(0, 1.2 * add_duration))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        held = reservations(ours.state_dir, raw=True)
        assert all(complete.fullmatch(content) for content in held.values()), held
        assert len(set(held.values())) == len(held), held
    for cid in cids + ["crash-calibration"]:
        ours.delete(conf, cid=cid)
    assert leftovers(ours.state_dir) == set()
    ours.add(conf, cid="after")
    ours.delete(conf, cid="after")
    assert leftovers(ours.state_dir) == set()


# ------------------------------------------------------------------------------------------------
# Hostile input
# ------------------------------------------------------------------------------------------------

def tree(root):
    """Every path under `root`, relative, for before/after comparisons."""
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


@BOTH
@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "."])
def test_network_name_cannot_leave_data_dir(hl, tmp_path, name):
    """A network name with `/` or `..` is refused with code 7 before anything is created."""
    conf = hl.conf(subnet=V4_SUBNET)
    conf["name"] = name
    conf["ipam"]["dataDir"] = str(hl.data_dir / "inner")
    before = tree(tmp_path)
    assert_cni_error(hl.call("ADD", conf), code=7)
    assert tree(tmp_path) == before


@BOTH
def test_symlink_named_like_an_ip_is_not_followed(hl, tmp_path):
    """Symlinks planted in the state dir under the next IPs' names are never written through by ADD,
    and DEL leaves their targets alone."""
    missing_target = tmp_path / "outside-missing"
    kept_target = tmp_path / "outside-kept"
    kept_target.write_bytes(b"keep")
    hl.state_dir.mkdir(parents=True)
    (hl.state_dir / "10.10.0.2").symlink_to(missing_target)
    (hl.state_dir / "10.10.0.3").symlink_to(kept_target)
    conf = hl.conf(subnet=V4_SUBNET)
    hl.add(conf)
    assert not missing_target.exists()
    assert kept_target.read_bytes() == b"keep"
    assert list(reservations(hl.state_dir, raw=True).values()) == [owner("ctr1")]
    hl.delete(conf)
    assert not missing_target.exists()
    assert kept_target.read_bytes() == b"keep"


def test_symlink_to_a_matching_file_is_no_reservation(ours, tmp_path):
    """A symlink named like an IP whose outside target holds b"ctr1\r\neth0" is not taken for ctr1's
    reservation: ADD reserves a real file (and answers its address), DEL leaves the target alone.
    Ours only: the reference reads through the link and refuses the ADD as a duplicate allocation."""
    target = tmp_path / "outside"
    target.write_bytes(owner("ctr1"))
    ours.state_dir.mkdir(parents=True)
    (ours.state_dir / "10.10.0.2").symlink_to(target)
    conf = ours.conf(subnet=V4_SUBNET)
    result = ours.add(conf)
    assert reservations(ours.state_dir, raw=True) == {addresses(result)[0].split("/")[0]: owner("ctr1")}
    ours.delete(conf)
    assert target.read_bytes() == owner("ctr1")
    assert reservations(ours.state_dir, raw=True) == {}


@pytest.mark.parametrize("planted", ["lock", "last_reserved_ip.0"])
def test_symlinked_lock_or_cursor_is_not_followed(ours, tmp_path, planted):
    """A planted `lock` or cursor symlink never makes the plugin create or write its target; ADD either
    refuses with a CNI error or works without following it.  Ours only: the reference follows both."""
    target = tmp_path / "outside"
    ours.state_dir.mkdir(parents=True)
    (ours.state_dir / planted).symlink_to(target)
    res = ours.call("ADD", ours.conf(subnet=V4_SUBNET))
    if res.returncode != 0:
        assert_cni_error(res)
    assert not target.exists()
