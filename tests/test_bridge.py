"""Black-box tests of the bridge plugin (cni-reference.md §2, §1.7, §8; issue 4) read back from the kernel.

Every call runs the plugin inside a "node" namespace made by the test, against container namespaces
made by the test, with host-local keeping its state in a temporary dataDir.  What the plugin did is
read back with `ip -j -d link/addr/route` in both namespaces, bridge port flags, /proc/sys and ping —
the plugin's own output is only compared with that.

`impl` runs a test against ours and the reference Go plugins in /usr/lib/cni where both should behave
the same (the reference speaks cniVersion up to 1.0.0 and predates portIsolation,
disableContainerInterface, vlanTrunk and preserveDefaultVlan); tests that only use `ours` say why.
Masquerade (ipMasq) and macspoofchk have their own tests: every config here has ipMasq false.
"""

import ipaddress
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from copy import deepcopy
from typing import NamedTuple

import pytest

from tests.helpers import (REF_DIR, REF_VERSIONS, REPO, VERSIONS, eventually, explain, global_addrs, host_veths,
                           kernel_filters_vlans, kind, reservations, run_cni)

pytestmark = pytest.mark.kernel

NETWORK = "cbtbridge"
BRIDGE = "cni0"
SUBNET = "10.88.0.0/24"
GATEWAY = "10.88.0.1"
SUBNET6 = "fd00:88::/64"
GATEWAY6 = "fd00:88::1"
WALKTHROUGH_CONF = REPO / "conf" / "10-mynet.conf"
HOST_VETH_NAME = re.compile(r"^veth[0-9a-f]{8}$")
LEGACY_VERSIONS = ("0.1.0", "0.2.0")                     # ip4/ip6 results, no interfaces
VERSIONS_BEFORE_PREV_RESULT = ("0.1.0", "0.2.0", "0.3.0", "0.3.1")  # runtimes send prevResult to DEL from 0.4.0


# --- which plugin set ---------------------------------------------------------------------------

class Impl(NamedTuple):
    """A plugin set under test: ours (the built zipapp) or the reference Go plugins."""
    name: str
    bin: object
    ours: bool

    def bridge(self, command, conf, node, netns=None, **kwargs):
        """Run this set's `bridge` inside `node` against `netns`."""
        return run_cni(self.bin, "bridge", command, conf, node=node, netns=netns, **kwargs)


@pytest.fixture(params=["ours", "ref"])
def impl(request):
    """Ours or the reference, for behaviour both must share."""
    if request.param == "ours":
        return Impl("ours", request.getfixturevalue("ours_bin"), True)
    return Impl("ref", request.getfixturevalue("ref_bin"), False)


@pytest.fixture
def ours(ours_bin):
    """Our plugin set alone, where the reference differs or lacks the feature."""
    return Impl("ours", ours_bin, True)


def impl_params(values, ours_only=()):
    """(impl, value) parameters: ours for every value, the reference for those not in `ours_only`."""
    return [pytest.param(name, value, id="%s-%s" % (name, value))
            for value in values for name in ("ours", "ref")
            if name == "ours" or value not in ours_only]


IMPL_VERSIONS = impl_params(VERSIONS, ours_only=[v for v in VERSIONS if v not in REF_VERSIONS])


# --- configurations -----------------------------------------------------------------------------

def host_local(data_dir, **keys):
    """A host-local IPAM section on SUBNET (override with keys) keeping its state in data_dir."""
    ipam = {"type": "host-local", "subnet": SUBNET, "dataDir": str(data_dir)}
    ipam.update(keys)
    return ipam


def dual_stack_ipam(data_dir):
    """host-local with a v4 (SUBNET) and a v6 (SUBNET6) range set."""
    return {"type": "host-local", "dataDir": str(data_dir),
            "ranges": [[{"subnet": SUBNET}], [{"subnet": SUBNET6}]]}


def bridge_conf(data_dir, version="1.0.0", ipam=None, **options):
    """A bridge network config: gateway on cni0, host-local IPAM (or `ipam`), no masquerade."""
    conf = {"cniVersion": version, "name": NETWORK, "type": "bridge", "bridge": BRIDGE,
            "isGateway": True, "ipMasq": False, "ipam": ipam or host_local(data_dir)}
    conf.update(options)
    return conf


def l2_conf(version="1.0.0", **options):
    """A bridge config without IPAM: the pure L2 mode."""
    conf = {"cniVersion": version, "name": NETWORK, "type": "bridge", "bridge": BRIDGE, "ipMasq": False}
    conf.update(options)
    return conf


def walkthrough_conf(data_dir, version):
    """conf/10-mynet.conf, the README walkthrough, at `version` with state in data_dir, no masquerade."""
    conf = json.loads(WALKTHROUGH_CONF.read_text())
    conf.update(cniVersion=version, ipMasq=False)
    conf["ipam"]["dataDir"] = str(data_dir)
    return conf


def with_prev(conf, result):
    """`conf` carrying `result` as prevResult, as a runtime sends it to DEL and CHECK."""
    return dict(conf, prevResult=result)


# --- plugin outcome -----------------------------------------------------------------------------

def expect_ok(res):
    """The call succeeded; returns its parsed stdout (None when it printed nothing)."""
    assert res.returncode == 0, explain(res)
    assert "Traceback" not in res.stderr, explain(res)
    return res.json


def expect_error(res):
    """The call failed the CNI way (non-zero exit, an error object on stdout); returns the object."""
    assert res.returncode != 0, explain(res)
    assert isinstance(res.json, dict), explain(res)
    assert isinstance(res.json.get("code"), int) and res.json.get("msg"), explain(res)
    assert "Traceback" not in res.stdout + res.stderr, explain(res)
    return res.json


def add(impl, conf, node, container, **kwargs):
    """ADD that must succeed; returns the result."""
    result = expect_ok(impl.bridge("ADD", conf, node, container, **kwargs))
    assert isinstance(result, dict), result
    return result


def delete(impl, conf, node, container=None, **kwargs):
    """DEL that must succeed and print nothing."""
    res = impl.bridge("DEL", conf, node, container, **kwargs)
    expect_ok(res)
    assert res.stdout.strip() == "", explain(res)


def result_addresses(result):
    """The container addresses of a result in any version ("addr/prefix")."""
    if "ips" in result:
        return [ip["address"] for ip in result["ips"]]
    return [result[key]["ip"] for key in ("ip4", "ip6") if key in result]


# --- kernel and disk state ----------------------------------------------------------------------

def set_sysctl(ns, key, value):
    """Write /proc/sys/<key> inside `ns` (a namespace the test made)."""
    ns.run("sh", "-c", "echo %s > /proc/sys/%s" % (value, key))


def peer_of(node, container, ifname="eth0"):
    """The node-side link entry of the container's veth `ifname`."""
    inside = container.links()[ifname]
    return next(link for link in node.links().values() if link["ifindex"] == inside["link_index"])


def port_flags(node, ifname):
    """The bridge-port attributes of `ifname` (hairpin, isolated, state ...)."""
    return node.links()[ifname]["linkinfo"]["info_slave_data"]


def default_routes(ns, family="-4"):
    """The default routes of `ns` (`ip -j <family> route show default`)."""
    return ns.ip_json(family, "route", "show", "default")


def ping(ns, address):
    """True when one echo from inside `ns` to `address` is answered."""
    return ns.run("ping", "-c1", "-W2", address, check=False).returncode == 0


def snapshot(data_dir, *namespaces):
    """What a failed call must leave as it found: links and global addresses per namespace, reservations."""
    state = {"reservations": reservations(data_dir)}
    for ns in namespaces:
        state[ns.name] = {link["ifname"]: sorted("%s/%d" % (a["local"], a["prefixlen"])
                                                 for a in link.get("addr_info", []) if a.get("scope") != "link")
                          for link in ns.ip_json("addr", "show")}
    return state


def assert_rolled_back(before, after):
    """A failed ADD left `after` as `before` was, except that the bridge it may have made first can
    stay (bridges are shared and never removed); no veth, no address, no reservation may remain."""
    for ns_name, links in after.items():
        if ns_name != "reservations" and BRIDGE in links and BRIDGE not in before[ns_name]:
            assert links[BRIDGE] == [], links
            after = dict(after, **{ns_name: {k: v for k, v in links.items() if k != BRIDGE}})
    assert after == before


def assert_attached(node, container, result, version, data_dir, cid, subnet=SUBNET, gateway=GATEWAY):
    """The kernel holds what ADD reported: eth0 with an address from `subnet` and a default route via
    `gateway`, its peer `veth<8 hex>` up on the bridge, the gateway on the bridge, ip_forward on, the
    reservation on disk; the result has the shape of `version`.  Returns (address, host veth name)."""
    eth0 = container.links()["eth0"]
    assert "UP" in eth0["flags"], eth0
    addresses = global_addrs(container, "eth0")
    assert len(addresses) == 1, addresses
    address = addresses[0]
    assert ipaddress.ip_interface(address).network == ipaddress.ip_network(subnet)
    assert [(r["gateway"], r["dev"]) for r in default_routes(container)] == [(gateway, "eth0")]

    bridge = node.links()[BRIDGE]
    assert kind(bridge) == "bridge" and "UP" in bridge["flags"], bridge
    prefix = ipaddress.ip_network(subnet).prefixlen
    assert "%s/%d" % (gateway, prefix) in global_addrs(node, BRIDGE)
    veth = peer_of(node, container)
    assert HOST_VETH_NAME.match(veth["ifname"]), veth["ifname"]
    assert veth["master"] == BRIDGE and "UP" in veth["flags"], veth
    assert veth["link_index"] == eth0["ifindex"]
    assert node.sysctl("net/ipv4/ip_forward") == "1"
    assert reservations(data_dir)[address.split("/")[0]] == "%s\r\neth0" % cid

    assert result["cniVersion"] == version
    if version in LEGACY_VERSIONS:
        assert set(result) <= {"cniVersion", "ip4", "ip6", "dns"}, result
        assert result["ip4"]["ip"] == address and result["ip4"]["gateway"] == gateway, result
    else:
        assert [i["name"] for i in result["interfaces"]] == [BRIDGE, veth["ifname"], "eth0"], result
        assert [i["mac"] for i in result["interfaces"]] == [bridge["address"], veth["address"], eth0["address"]]
        assert [i.get("sandbox") for i in result["interfaces"]] == [None, None, container.path]
        assert len(result["ips"]) == 1, result
        ip = result["ips"][0]
        assert (ip["interface"], ip["address"], ip["gateway"]) == (2, address, gateway), result
        if version.startswith("0."):
            assert ip["version"] == "4", result
        else:
            assert "version" not in ip, result
    return address, veth["ifname"]


# --- the walkthrough ----------------------------------------------------------------------------

@pytest.mark.parametrize("impl, version", IMPL_VERSIONS, indirect=["impl"])
def test_walkthrough(impl, version, node, make_netns, data_dir):
    """conf/10-mynet.conf end to end: two ADDs wire eth0 to cni0 with host-local addresses and a default
    route, the containers reach the gateway and each other; DEL removes one veth pair and its
    reservation and leaves the bridge and the other container alone."""
    conf = walkthrough_conf(data_dir, version)
    subnet, gateway = conf["ipam"]["subnet"], str(ipaddress.ip_network(conf["ipam"]["subnet"])[1])
    set_sysctl(node, "net/ipv4/ip_forward", 0)
    ct1, ct2 = make_netns(), make_netns()
    result1 = add(impl, conf, node, ct1, container_id="ctr1")
    result2 = add(impl, conf, node, ct2, container_id="ctr2")
    address1, veth1 = assert_attached(node, ct1, result1, version, data_dir, "ctr1", subnet, gateway)
    address2, veth2 = assert_attached(node, ct2, result2, version, data_dir, "ctr2", subnet, gateway)
    assert address1 != address2 and veth1 != veth2
    assert ping(ct1, gateway)
    assert ping(ct1, address2.split("/")[0])

    del_conf = conf if version in VERSIONS_BEFORE_PREV_RESULT else with_prev(conf, result1)
    delete(impl, del_conf, node, ct1, container_id="ctr1")
    assert veth1 not in node.links() and "eth0" not in ct1.links()
    assert list(reservations(data_dir)) == [address2.split("/")[0]]
    assert kind(node.links()[BRIDGE]) == "bridge"
    assert ping(ct2, gateway)


# --- options ------------------------------------------------------------------------------------

def test_mtu_on_both_veth_ends_and_new_bridge(impl, node, container, data_dir):
    """mtu applies to the bridge it creates and to both ends of the veth pair."""
    add(impl, bridge_conf(data_dir, mtu=1400), node, container)
    assert container.links()["eth0"]["mtu"] == 1400
    assert peer_of(node, container)["mtu"] == 1400
    assert node.links()[BRIDGE]["mtu"] == 1400


@pytest.mark.parametrize("promisc", [True, False])
def test_promisc_mode(impl, promisc, node, container, data_dir):
    """promiscMode puts the bridge in promiscuous mode; without it the bridge is left alone."""
    add(impl, bridge_conf(data_dir, promiscMode=promisc), node, container)
    assert ("PROMISC" in node.links()[BRIDGE]["flags"]) == promisc


@pytest.mark.parametrize("hairpin", [True, False])
def test_hairpin_mode(impl, hairpin, node, container, data_dir):
    """hairpinMode sets the hairpin flag of the host veth's bridge port (and leaves it off otherwise)."""
    add(impl, bridge_conf(data_dir, hairpinMode=hairpin), node, container)
    assert port_flags(node, peer_of(node, container)["ifname"])["hairpin"] is hairpin


def test_hairpin_with_promisc_is_refused(impl, node, container, data_dir):
    """hairpinMode and promiscMode together are a config error that creates nothing."""
    before = snapshot(data_dir, node, container)
    expect_error(impl.bridge("ADD", bridge_conf(data_dir, hairpinMode=True, promiscMode=True), node, container))
    assert snapshot(data_dir, node, container) == before


@pytest.mark.parametrize("isolated", [True, False])
def test_port_isolation(ours, isolated, node, container, data_dir):
    """portIsolation sets the isolated flag of the host veth's bridge port.

    Ours only: the reference (plugins 1.1.1) predates portIsolation."""
    add(ours, bridge_conf(data_dir, portIsolation=isolated), node, container)
    assert port_flags(node, peer_of(node, container)["ifname"])["isolated"] is isolated


@pytest.mark.parametrize("impl, ipam_routes", impl_params(
    ["none", "default-with-gw", "default-without-gw"], ours_only=["default-without-gw"]), indirect=["impl"])
def test_default_gateway_added_once(impl, ipam_routes, node, container, data_dir):
    """isDefaultGateway gives the container exactly one default route via the gateway, also when IPAM
    routes already hold a default route (decision 5).

    Ours only when IPAM's default route has no gw: the reference then adds the route a second time and
    fails with "file exists" (§2.10)."""
    routes = {"none": [], "default-with-gw": [{"dst": "0.0.0.0/0", "gw": GATEWAY}],
              "default-without-gw": [{"dst": "0.0.0.0/0"}]}[ipam_routes]
    conf = bridge_conf(data_dir, isGateway=False, isDefaultGateway=True, ipam=host_local(data_dir, routes=routes))
    result = add(impl, conf, node, container)
    assert [(r["gateway"], r["dev"]) for r in default_routes(container)] == [(GATEWAY, "eth0")]
    assert len([r for r in result["routes"] if r["dst"] == "0.0.0.0/0"]) == 1, result
    assert "%s/24" % GATEWAY in global_addrs(node, BRIDGE)   # isDefaultGateway implies isGateway
    assert ping(container, GATEWAY)


def add_conflicting_bridge(node, address="10.50.0.1/16"):
    """A bridge named BRIDGE that already holds an IPv4 address other than the gateway."""
    node.run("ip", "link", "add", BRIDGE, "type", "bridge")
    node.run("ip", "addr", "add", address, "dev", BRIDGE)


def test_conflicting_bridge_address_is_an_error(impl, node, container, data_dir):
    """Without forceAddress, a bridge holding another IPv4 address makes ADD fail: the old address
    stays and the reservation is released.  Ours also removes the veth pair it made; the reference
    leaves it to the runtime's DEL (§1.10)."""
    add_conflicting_bridge(node)
    before = snapshot(data_dir, node, container)
    error = expect_error(impl.bridge("ADD", bridge_conf(data_dir), node, container))
    assert "already has an IP address" in error["msg"], error
    assert global_addrs(node, BRIDGE) == ["10.50.0.1/16"]
    assert reservations(data_dir) == {}
    if impl.ours:
        assert_rolled_back(before, snapshot(data_dir, node, container))


def test_force_address_replaces_conflicting_address(impl, node, container, data_dir):
    """forceAddress replaces the bridge's conflicting IPv4 address with the gateway."""
    add_conflicting_bridge(node)
    add(impl, bridge_conf(data_dir, forceAddress=True), node, container)
    assert global_addrs(node, BRIDGE) == ["%s/24" % GATEWAY]
    assert ping(container, GATEWAY)


RUNTIME_MAC, ARGS_MAC, CNI_ARGS_MAC = "0a:58:0a:00:00:01", "0a:58:0a:00:00:02", "0a:58:0a:00:00:03"


@pytest.mark.parametrize("sources, expected", [
    (("runtimeConfig", "args", "CNI_ARGS"), RUNTIME_MAC),
    (("args", "CNI_ARGS"), ARGS_MAC),
    (("CNI_ARGS",), CNI_ARGS_MAC),
], ids=["runtimeConfig-wins", "args-over-CNI_ARGS", "CNI_ARGS"])
def test_container_mac_precedence(impl, sources, expected, node, container, data_dir):
    """The container MAC comes from runtimeConfig.mac, else args.cni.mac, else CNI_ARGS MAC; the
    result reports the MAC the kernel holds."""
    conf = bridge_conf(data_dir)
    if "runtimeConfig" in sources:
        conf["runtimeConfig"] = {"mac": RUNTIME_MAC}
    if "args" in sources:
        conf["args"] = {"cni": {"mac": ARGS_MAC}}
    result = add(impl, conf, node, container, cni_args="IgnoreUnknown=1;MAC=" + CNI_ARGS_MAC)
    assert container.links()["eth0"]["address"] == expected
    assert result["interfaces"][2]["mac"] == expected


@pytest.mark.parametrize("enabledad", [False, True])
def test_container_sysctls(impl, enabledad, node, container, data_dir):
    """enabledad false sets accept_dad=0 on the container interface, true keeps DAD on; arp_notify=1."""
    add(impl, bridge_conf(data_dir, enabledad=enabledad), node, container)
    assert container.sysctl("net/ipv6/conf/eth0/accept_dad") == ("1" if enabledad else "0")
    assert container.sysctl("net/ipv4/conf/eth0/arp_notify") == "1"


def test_l2_mode_gives_interfaces_only(impl, node, container, data_dir):
    """Without IPAM the container gets an UP eth0 on the bridge, no address, and the result lists the
    three interfaces and no IPs; nothing is reserved and the bridge gets no address."""
    result = add(impl, l2_conf(), node, container)
    assert "UP" in container.links()["eth0"]["flags"]
    assert global_addrs(container, "eth0") == [] and global_addrs(node, BRIDGE) == []
    veth = peer_of(node, container)
    assert veth["master"] == BRIDGE and "UP" in veth["flags"]
    assert [i["name"] for i in result["interfaces"]] == [BRIDGE, veth["ifname"], "eth0"]
    assert "ips" not in result and "routes" not in result, result


def test_l2_mode_cannot_answer_in_0_2_0(impl, node, container, data_dir):
    """An L2 result has no IP, which a 0.2.0 result cannot express: ADD fails.  Ours checks that before
    creating anything; the reference fails after wiring the container."""
    before = snapshot(data_dir, node, container)
    expect_error(impl.bridge("ADD", l2_conf("0.2.0"), node, container))
    if impl.ours:
        assert_rolled_back(before, snapshot(data_dir, node, container))


def test_disable_container_interface_leaves_it_down(ours, node, container):
    """disableContainerInterface (L2) creates the pair but leaves the container end down.

    Ours only: the reference (plugins 1.1.1) predates disableContainerInterface."""
    result = add(ours, l2_conf(disableContainerInterface=True), node, container)
    assert "UP" not in container.links()["eth0"]["flags"]
    veth = peer_of(node, container)
    assert veth["master"] == BRIDGE
    assert [i["name"] for i in result["interfaces"]] == [BRIDGE, veth["ifname"], "eth0"]


def test_disable_container_interface_with_ipam_is_refused(ours, node, container, data_dir):
    """disableContainerInterface with IPAM is a config error that creates nothing.

    Ours only: the reference (plugins 1.1.1) predates disableContainerInterface."""
    before = snapshot(data_dir, node, container)
    error = expect_error(ours.bridge("ADD", bridge_conf(data_dir, disableContainerInterface=True), node, container))
    assert "IPAM" in error["msg"], error
    assert snapshot(data_dir, node, container) == before


def resolv_conf_ipam(data_dir, tmp_path):
    """host-local whose resolvConf names 10.9.9.9 and search domain ipam.example."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 10.9.9.9\nsearch ipam.example\n")
    return host_local(data_dir, resolvConf=str(resolv))


def test_config_dns_overrides_ipam_dns(impl, node, container, data_dir, tmp_path):
    """A config dns section replaces the dns IPAM returned in the result."""
    config_dns = {"nameservers": ["10.1.1.1"], "domain": "conf.example", "search": ["conf.example"],
                  "options": ["ndots:2"]}
    result = add(impl, bridge_conf(data_dir, ipam=resolv_conf_ipam(data_dir, tmp_path), dns=config_dns),
                 node, container)
    assert result["dns"] == config_dns


def test_ipam_dns_passed_on(ours, node, container, data_dir, tmp_path):
    """Without a config dns section the result carries the dns IPAM returned (from resolvConf).

    Ours only: the reference (plugins 1.1.1) always overwrites it with the config's, even when empty."""
    result = add(ours, bridge_conf(data_dir, ipam=resolv_conf_ipam(data_dir, tmp_path)), node, container)
    assert result["dns"] == {"nameservers": ["10.9.9.9"], "search": ["ipam.example"]}


@pytest.mark.parametrize("enabledad", [False, True])
def test_dual_stack(impl, enabledad, node, container, data_dir):
    """v4 and v6 range sets: the container gets both addresses, the v6 one usable (not tentative) when
    ADD returns even with DAD on, both gateways sit on the bridge and forwarding is on for both."""
    set_sysctl(node, "net/ipv4/ip_forward", 0)
    set_sysctl(node, "net/ipv6/conf/all/forwarding", 0)
    result = add(impl, bridge_conf(data_dir, ipam=dual_stack_ipam(data_dir), enabledad=enabledad), node, container)
    addresses = global_addrs(container, "eth0")
    assert sorted(addresses) == sorted(result_addresses(result))
    assert [ipaddress.ip_interface(a).network for a in addresses] == \
        [ipaddress.ip_network(SUBNET), ipaddress.ip_network(SUBNET6)]
    v6_addrs = [a for link in container.ip_json("-6", "addr", "show", "dev", "eth0") for a in link["addr_info"]
                if a.get("scope") == "global"]
    assert v6_addrs and not any(a.get("tentative") or a.get("dadfailed") for a in v6_addrs), v6_addrs
    assert {"%s/24" % GATEWAY, "%s/64" % GATEWAY6} <= set(global_addrs(node, BRIDGE))
    assert node.sysctl("net/ipv4/ip_forward") == "1"
    assert node.sysctl("net/ipv6/conf/all/forwarding") == "1"


@pytest.mark.parametrize("impl, mode", impl_params(["gateway", "l2"], ours_only=["l2"]), indirect=["impl"])
def test_bridge_mac_is_pinned(impl, mode, node, make_netns, data_dir):
    """The bridge MAC does not follow its lowest port: adding a second container whose host veth has
    a lower MAC, and removing it, leave the bridge MAC as it was.

    L2 is ours only: the reference pins the MAC only when it puts a gateway address on the bridge."""
    conf = bridge_conf(data_dir) if mode == "gateway" else l2_conf()
    ct1, ct2 = make_netns(), make_netns()
    add(impl, conf, node, ct1, container_id="ctr1")
    mac = node.links()[BRIDGE]["address"]
    add(impl, conf, node, ct2, container_id="ctr2")
    node.run("ip", "link", "set", "dev", peer_of(node, ct2)["ifname"], "address", "00:00:00:00:00:01")
    assert node.links()[BRIDGE]["address"] == mac
    delete(impl, conf, node, ct2, container_id="ctr2")
    assert node.links()[BRIDGE]["address"] == mac


def test_existing_non_bridge_link_is_an_error(impl, node, container, data_dir):
    """A non-bridge link (here a veth) already named like the bridge makes ADD fail and create nothing."""
    node.run("ip", "link", "add", BRIDGE, "type", "veth", "peer", "name", "other0")
    before = snapshot(data_dir, node, container)
    error = expect_error(impl.bridge("ADD", bridge_conf(data_dir), node, container))
    assert "not a bridge" in error["msg"], error
    assert snapshot(data_dir, node, container) == before
    assert kind(node.links()[BRIDGE]) == "veth"


def test_existing_bridge_is_reused(impl, node, container, data_dir):
    """An existing bridge of that name is used as it is (same ifindex) and gets the port and gateway."""
    node.run("ip", "link", "add", BRIDGE, "type", "bridge")
    ifindex = node.links()[BRIDGE]["ifindex"]
    add(impl, bridge_conf(data_dir), node, container)
    assert node.links()[BRIDGE]["ifindex"] == ifindex
    assert peer_of(node, container)["master"] == BRIDGE
    assert ping(container, GATEWAY)


def test_existing_container_ifname_is_an_error(impl, node, container, data_dir):
    """ADD fails when CNI_IFNAME already exists in the container, leaving that link and everything else."""
    container.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "other0")
    existing = container.links()["eth0"]["ifindex"]
    before = snapshot(data_dir, node, container)
    expect_error(impl.bridge("ADD", bridge_conf(data_dir), node, container))
    assert container.links()["eth0"]["ifindex"] == existing
    after = snapshot(data_dir, node, container)
    # the bridge may have been made before the veth failed; no veth and no reservation may remain
    assert after["reservations"] == before["reservations"] == {}
    assert host_veths(node) == {}
    assert after[container.name] == before[container.name]


# --- VLANs --------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl, options", impl_params([
    '{"vlan": 5000}', '{"vlan": -1}',
    '{"vlanTrunk": [{"minID": 10, "maxID": 5}]}', '{"vlanTrunk": [{"minID": 10}]}',
    '{"vlanTrunk": [{"maxID": 10}]}', '{"vlanTrunk": [{"id": 5000}]}',
], ours_only=['{"vlanTrunk": [{"minID": 10, "maxID": 5}]}', '{"vlanTrunk": [{"minID": 10}]}',
              '{"vlanTrunk": [{"maxID": 10}]}', '{"vlanTrunk": [{"id": 5000}]}']), indirect=["impl"])
def test_vlan_config_errors(impl, options, node, container, data_dir):
    """VLAN ids outside 0..4094 and malformed trunks are config errors that create nothing, not even
    the bridge.  Trunk cases are ours only: the reference (plugins 1.1.1) predates vlanTrunk."""
    before = snapshot(data_dir, node, container)
    expect_error(impl.bridge("ADD", bridge_conf(data_dir, **json.loads(options)), node, container))
    assert snapshot(data_dir, node, container) == before


def skip_unless_kernel_filters_vlans(node):
    """Skip, before the plugin runs, where this kernel's bridge has no VLAN filtering (probed)."""
    if not kernel_filters_vlans(node):
        pytest.skip("this kernel's bridge cannot filter VLANs (CONFIG_BRIDGE_VLAN_FILTERING)")


def port_vlans(node, ifname):
    """{vid: sorted flags} of a bridge port, from `bridge -j vlan show`."""
    entries = json.loads(node.run("bridge", "-j", "vlan", "show", "dev", ifname).stdout or "[]")
    return {v["vlan"]: sorted(v.get("flags", [])) for entry in entries for v in entry.get("vlans", [])}


@pytest.mark.parametrize("impl, options", impl_params(
    ['{"vlan": 100}', '{"vlan": 100, "vlanTrunk": [{"minID": 200, "maxID": 201}, {"id": 300}]}',
     '{"vlan": 100, "preserveDefaultVlan": true}'],
    ours_only=['{"vlan": 100, "vlanTrunk": [{"minID": 200, "maxID": 201}, {"id": 300}]}',
               '{"vlan": 100, "preserveDefaultVlan": true}']), indirect=["impl"])
def test_vlan_port_entries(impl, options, node, container, data_dir):
    """vlan makes the host veth port's PVID untagged, trunk ids are added tagged, and the default VLAN 1
    is removed unless preserveDefaultVlan.  Trunk/preserve cases are ours only (reference predates them).
    Skipped where the kernel cannot filter VLANs (probed; test_vlan_on_a_kernel_without_vlan_filtering_says_so
    covers that case)."""
    skip_unless_kernel_filters_vlans(node)
    options = json.loads(options)
    res = impl.bridge("ADD", bridge_conf(data_dir, isGateway=False, **options), node, container)
    expect_ok(res)
    vlans = port_vlans(node, peer_of(node, container)["ifname"])
    assert vlans[100] == ["Egress Untagged", "PVID"]
    for vid in (200, 201, 300):
        assert (vid in vlans) == ("vlanTrunk" in options)
        if vid in vlans:
            assert vlans[vid] == []
    assert (1 in vlans) == bool(options.get("preserveDefaultVlan"))


@pytest.mark.parametrize("impl, options", impl_params(
    ['{}', '{"preserveDefaultVlan": true}'], ours_only=['{"preserveDefaultVlan": true}']), indirect=["impl"])
def test_vlan_gateway_interface(impl, options, node, make_netns, data_dir):
    """isGateway with vlan 100 puts the gateway address on `cni0.100`, a veth on the node whose peer
    is a bridge port with VLAN 100 untagged and as PVID; the result lists it as a fourth interface;
    two containers share it and reach the gateway and each other over the VLAN; CHECK passes; DEL
    leaves the shared gateway pair.  Skipped where the kernel refuses bridge VLAN filtering."""
    skip_unless_kernel_filters_vlans(node)
    conf = bridge_conf(data_dir, vlan=100, **json.loads(options))
    first, second = make_netns("ctr-a"), make_netns("ctr-b")
    res = impl.bridge("ADD", conf, node, first, container_id="vlan-a")
    result = expect_ok(res)
    gateway_name = BRIDGE + ".100"
    assert [i["name"] for i in result["interfaces"]][::3] == [BRIDGE, gateway_name]
    gateway_link = node.links()[gateway_name]
    assert kind(gateway_link) == "veth" and "UP" in gateway_link["flags"]
    assert result["interfaces"][3]["mac"] == gateway_link["address"]
    assert global_addrs(node, gateway_name) == [GATEWAY + "/24"]
    assert global_addrs(node, BRIDGE) == []
    gateway_port = next(link for link in node.links().values() if link["ifindex"] == gateway_link["link_index"])
    assert gateway_port["master"] == BRIDGE
    assert port_vlans(node, gateway_port["ifname"])[100] == ["Egress Untagged", "PVID"]
    second_result = add(impl, conf, node, second, container_id="vlan-b")
    assert len(second_result["interfaces"]) == 4 and second_result["interfaces"][3]["name"] == gateway_name
    assert [name for name, link in node.links().items() if name.startswith(BRIDGE + ".")] == [gateway_name]
    assert ping(first, GATEWAY)
    assert ping(first, result_addresses(second_result)[0].split("/")[0])
    expect_ok(impl.bridge("CHECK", with_prev(conf, result), node, first, container_id="vlan-a"))
    for ns, cid, res_ in ((first, "vlan-a", result), (second, "vlan-b", second_result)):
        delete(impl, with_prev(conf, res_), node, ns, container_id=cid)
    assert gateway_name in node.links() and reservations(data_dir) == {}


def test_check_notices_a_vlan_taken_off_the_port(ours, node, container, data_dir):
    """CHECK compares the port's VLANs with the config (the reference does not look).  Skipped where
    the kernel refuses bridge VLAN filtering."""
    skip_unless_kernel_filters_vlans(node)
    conf = bridge_conf(data_dir, isGateway=False, vlan=100)
    res = ours.bridge("ADD", conf, node, container)
    result = expect_ok(res)
    expect_ok(ours.bridge("CHECK", with_prev(conf, result), node, container))
    port = peer_of(node, container)["ifname"]
    node.run("bridge", "vlan", "add", "dev", port, "vid", "100")           # now tagged, no PVID
    err = expect_error(ours.bridge("CHECK", with_prev(conf, result), node, container))
    assert "VLAN 100 of %s is tagged" % port in err["msg"]


def test_vlan_gateway_name_must_fit(ours, node, container, data_dir):
    """`<bridge>.<vlan>` longer than 15 bytes is a config error before anything is made (the
    reference fails after creating the bridge and the container's veth)."""
    before = snapshot(data_dir, node, container)
    err = expect_error(ours.bridge("ADD", bridge_conf(data_dir, bridge="cbtbridge12", vlan=4094), node, container))
    assert err["code"] == 7 and "'cbtbridge12.4094' is longer than 15 bytes" in err["msg"]
    assert snapshot(data_dir, node, container) == before


def test_vlan_on_a_kernel_without_vlan_filtering_says_so(ours, node, container, data_dir):
    """Where the kernel has no bridge VLAN filtering, ADD names that cause and leaves nothing."""
    if kernel_filters_vlans(node):
        pytest.skip("this kernel's bridge filters VLANs")
    before = snapshot(data_dir, node, container)
    res = ours.bridge("ADD", bridge_conf(data_dir, vlan=100), node, container)
    err = expect_error(res)
    assert "CONFIG_BRIDGE_VLAN_FILTERING" in err.get("details", ""), err
    assert_rolled_back(before, snapshot(data_dir, node, container))


# --- DEL tolerance ------------------------------------------------------------------------------

# Each DEL case damages the attachment and returns (DEL config, CNI_NETNS, env overrides).

def gone_netns(container, conf, result):
    """The container namespace is deleted before DEL; CNI_NETNS names the vanished path."""
    subprocess.run(["ip", "netns", "del", container.name], check=True)
    return with_prev(conf, result), container.path, None


def empty_netns(container, conf, result):
    """CNI_NETNS is set but empty (libcni sends empty variables)."""
    return with_prev(conf, result), None, {"CNI_NETNS": ""}


def unset_netns(container, conf, result):
    """CNI_NETNS is not set at all."""
    return with_prev(conf, result), None, None


def link_removed(container, conf, result):
    """The container interface was removed already."""
    container.run("ip", "link", "del", "eth0")
    return with_prev(conf, result), container, None


def no_prev_result(container, conf, result):
    """DEL without prevResult (a runtime that lost its cache)."""
    return conf, container, None


def broken_ipam_config(container, conf, result):
    """The IPAM section no longer validates (subnet garbage)."""
    broken = with_prev(deepcopy(conf), result)
    broken["ipam"]["subnet"] = "garbage"
    return broken, container, None


DEL_CASES = {"netns-deleted": gone_netns, "CNI_NETNS-empty": empty_netns, "CNI_NETNS-unset": unset_netns,
             "link-removed": link_removed, "no-prevResult": no_prev_result, "ipam-broken": broken_ipam_config}


@pytest.mark.parametrize("impl, case", impl_params(list(DEL_CASES), ours_only=["ipam-broken"]),
                         indirect=["impl"])
def test_del_tolerates(impl, case, node, container, data_dir):
    """DEL succeeds and releases the reservation when the netns, CNI_NETNS, the link or prevResult is
    gone, and (ours only, decision 9: the reference needs a valid IPAM config) when the IPAM config is
    broken; a second DEL succeeds too."""
    conf = bridge_conf(data_dir)
    result = add(impl, conf, node, container)
    assert reservations(data_dir)
    del_conf, netns, env = DEL_CASES[case](container, conf, result)
    for _ in range(2):
        delete(impl, del_conf, node, netns, env=env)
        assert reservations(data_dir) == {}
    if case == "netns-deleted":   # the kernel tears a deleted namespace down asynchronously
        assert eventually(lambda: host_veths(node) == {})
    elif case in ("link-removed", "no-prevResult", "ipam-broken"):
        assert host_veths(node) == {}


def test_del_twice(impl, node, container, data_dir):
    """A normal DEL removes the pair and the reservation; repeating it succeeds."""
    conf = bridge_conf(data_dir)
    result = add(impl, conf, node, container)
    for _ in range(2):
        delete(impl, with_prev(conf, result), node, container)
        assert reservations(data_dir) == {} and host_veths(node) == {} and "eth0" not in container.links()


# --- CHECK --------------------------------------------------------------------------------------

CHECK_VERSIONS = impl_params(["0.4.0", "1.0.0", "1.1.0"], ours_only=["1.1.0"])


@pytest.mark.parametrize("impl, version", CHECK_VERSIONS, indirect=["impl"])
def test_check_passes_after_add(impl, version, node, container, data_dir):
    """CHECK with the ADD result as prevResult succeeds on an untouched attachment."""
    conf = bridge_conf(data_dir, version, hairpinMode=True, isDefaultGateway=True, mtu=1400)
    result = add(impl, conf, node, container)
    res = impl.bridge("CHECK", with_prev(conf, result), node, container)
    expect_ok(res)
    assert res.stdout.strip() == ""


def remove_container_address(node, container, result):
    """Delete the container's address by hand."""
    container.run("ip", "addr", "del", result["ips"][0]["address"], "dev", "eth0")


def delete_host_veth(node, container, result):
    """Delete the host veth (the container end goes with it)."""
    node.run("ip", "link", "del", result["interfaces"][1]["name"])


def hairpin_off(node, container, result):
    """Turn the host veth port's hairpin flag off by hand."""
    node.run("bridge", "link", "set", "dev", result["interfaces"][1]["name"], "hairpin", "off")


DAMAGE = {"address-removed": remove_container_address, "host-veth-deleted": delete_host_veth,
          "hairpin-off": hairpin_off}


@pytest.mark.parametrize("impl, damage", impl_params(list(DAMAGE), ours_only=["hairpin-off"]),
                         indirect=["impl"])
def test_check_fails_after_damage(impl, damage, node, container, data_dir):
    """CHECK fails once something ADD made is gone or changed: the container address, the host veth,
    or (ours only: the reference does not check port flags) the hairpin flag."""
    conf = bridge_conf(data_dir, hairpinMode=True)
    result = add(impl, conf, node, container)
    DAMAGE[damage](node, container, result)
    expect_error(impl.bridge("CHECK", with_prev(conf, result), node, container))


# --- rollback -----------------------------------------------------------------------------------

def test_rollback_when_range_is_exhausted(ours, node, make_netns, data_dir):
    """An ADD whose IPAM finds no free address fails and leaves no veth, no eth0 and no new reservation.

    Ours only: the reference leaves the veth pair to the runtime's DEL (§1.10)."""
    conf = bridge_conf(data_dir, ipam=host_local(data_dir, subnet="10.88.0.0/30"))
    ct1, ct2 = make_netns(), make_netns()
    add(ours, conf, node, ct1, container_id="ctr1")
    before = snapshot(data_dir, node, ct2)
    expect_error(ours.bridge("ADD", conf, node, ct2, container_id="ctr2"))
    assert_rolled_back(before, snapshot(data_dir, node, ct2))


FAILING_IPAM = """#!/bin/sh
echo '{"cniVersion": "1.0.0", "code": 11, "msg": "injected IPAM failure"}'
exit 1
"""


def test_rollback_when_ipam_fails(impl, node, container, data_dir, tmp_path):
    """An IPAM plugin that fails makes ADD fail with its error passed on unchanged; ours also leaves no
    veth pair behind (the reference leaves it to the runtime's DEL, §1.10)."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "failipam").write_text(FAILING_IPAM)
    (plugins / "failipam").chmod(0o755)
    before = snapshot(data_dir, node, container)
    res = impl.bridge("ADD", bridge_conf(data_dir, ipam={"type": "failipam"}), node, container,
                      cni_path="%s:%s" % (plugins, impl.bin))
    error = expect_error(res)
    assert (error["code"], error["msg"]) == (11, "injected IPAM failure"), error
    if impl.ours:
        assert_rolled_back(before, snapshot(data_dir, node, container))


# --- external IPAM ------------------------------------------------------------------------------

def test_external_static_ipam(impl, node, container, data_dir):
    """ipam.type "static" is found on CNI_PATH (after our own directory) and used end to end."""
    if not (REF_DIR / "static").is_file():
        pytest.skip("reference static IPAM not installed in %s" % REF_DIR)
    ipam = {"type": "static", "addresses": [{"address": "10.88.0.5/24", "gateway": GATEWAY}],
            "routes": [{"dst": "0.0.0.0/0"}]}
    conf = bridge_conf(data_dir, ipam=ipam)
    cni_path = "%s:%s" % (impl.bin, REF_DIR)
    result = add(impl, conf, node, container, cni_path=cni_path)
    assert result_addresses(result) == ["10.88.0.5/24"]
    assert global_addrs(container, "eth0") == ["10.88.0.5/24"]
    assert [r["gateway"] for r in default_routes(container)] == [GATEWAY]
    assert ping(container, GATEWAY)
    delete(impl, with_prev(conf, result), node, container, cni_path=cni_path)
    assert host_veths(node) == {} and "eth0" not in container.links()


# --- STATUS and GC (1.1.0, ours: the reference speaks up to 1.0.0 and its GC/STATUS are empty) ---

def test_status_ok_then_exhausted(ours, node, container, data_dir):
    """STATUS succeeds silently while addresses are free and fails with code 50 once the range is full."""
    conf = bridge_conf(data_dir, "1.1.0", ipam=host_local(data_dir, subnet="10.88.0.0/30"))
    status_env = {"netns": None, "ifname": None, "container_id": None}
    res = ours.bridge("STATUS", conf, node, **status_env)
    expect_ok(res)
    assert res.stdout.strip() == ""
    add(ours, conf, node, container)
    error = expect_error(ours.bridge("STATUS", conf, node, **status_env))
    assert error["code"] == 50, error


def test_gc_releases_invalid_attachments(ours, node, make_netns, data_dir):
    """GC keeps the valid attachment, releases every other reservation and removes the host veth of an
    attachment whose container namespace is gone from the runtime's view (unnamed, still held open)."""
    conf = bridge_conf(data_dir, "1.1.0")
    ct1, ct2 = make_netns(), make_netns()
    add(ours, conf, node, ct1, container_id="ctr1")
    add(ours, conf, node, ct2, container_id="ctr2")
    kept_veth, stale_veth = peer_of(node, ct1)["ifname"], peer_of(node, ct2)["ifname"]
    (data_dir / NETWORK / "10.88.0.77").write_text("ghost\r\neth0")
    holder = os.open(ct2.path, os.O_RDONLY)   # an open handle keeps the namespace alive, nameless
    try:
        subprocess.run(["ip", "netns", "del", ct2.name], check=True)
        assert stale_veth in node.links()
        gc_conf = dict(conf, **{"cni.dev/valid-attachments": [{"containerID": "ctr1", "ifname": "eth0"}]})
        expect_ok(ours.bridge("GC", gc_conf, node, netns=None, ifname=None, container_id=None))
        assert set(host_veths(node)) == {kept_veth}
        assert list(reservations(data_dir).values()) == ["ctr1\r\neth0"]
        assert ping(ct1, GATEWAY)
    finally:
        os.close(holder)


# --- concurrency --------------------------------------------------------------------------------

def test_concurrent_adds_on_a_new_bridge(impl, node, make_netns, data_dir):
    """20 ADDs at once on a node without the bridge: one bridge, one gateway address on it, 20 ports
    and 20 distinct container addresses, each reserved once."""
    conf = bridge_conf(data_dir)
    containers = [make_netns() for _ in range(20)]
    with ThreadPoolExecutor(max_workers=len(containers)) as pool:
        runs = list(pool.map(lambda i: impl.bridge("ADD", conf, node, containers[i], container_id="ctr%d" % i),
                             range(len(containers))))
    for res in runs:
        expect_ok(res)
    assert [name for name, link in node.links().items() if kind(link) == "bridge"] == [BRIDGE]
    assert global_addrs(node, BRIDGE) == ["%s/24" % GATEWAY]
    assert all(link.get("master") == BRIDGE for link in host_veths(node).values())
    assert len(host_veths(node)) == 20
    addresses = [global_addrs(ct, "eth0")[0] for ct in containers]
    assert len(set(addresses)) == 20
    assert sorted(reservations(data_dir)) == sorted(a.split("/")[0] for a in addresses)


# --- chaining -----------------------------------------------------------------------------------

PORTMAP_SERVER = """
import socket
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", 80))
server.listen(1)
conn, _ = server.accept()
conn.sendall(b"hello from the container")
conn.close()
"""

PORTMAP_CLIENT = """
import socket, sys, time
deadline = time.monotonic() + 10
while True:
    try:
        with socket.create_connection(("192.168.200.1", 8080), timeout=2) as conn:
            print(conn.recv(100).decode())
            break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
"""


def connect_client(node, client):
    """Wire `client` to the node over a veth pair: node 192.168.200.1, client .2 with default route."""
    node.run("ip", "link", "add", "uplink0", "type", "veth", "peer", "name", "eth0", "netns", client.name)
    node.run("ip", "addr", "add", "192.168.200.1/24", "dev", "uplink0")
    node.run("ip", "link", "set", "uplink0", "up")
    client.run("ip", "addr", "add", "192.168.200.2/24", "dev", "eth0")
    client.run("ip", "link", "set", "eth0", "up")
    client.run("ip", "route", "add", "default", "via", "192.168.200.1")


def test_chained_with_reference_portmap(impl, node, make_netns, data_dir):
    """Our result is a usable prevResult for the reference portmap: its ADD succeeds and a node port
    reaches a server in the container from a third namespace; DELs in reverse order succeed."""
    portmap = REF_DIR / "portmap"
    if not portmap.is_file():
        pytest.skip("reference portmap not installed in %s" % REF_DIR)
    container, client = make_netns(), make_netns("client")
    conf = bridge_conf(data_dir, isDefaultGateway=True)
    result = add(impl, conf, node, container)
    portmap_conf = {"cniVersion": "1.0.0", "name": NETWORK, "type": "portmap",
                    "capabilities": {"portMappings": True}, "prevResult": result,
                    "runtimeConfig": {"portMappings": [{"hostPort": 8080, "containerPort": 80,
                                                        "protocol": "tcp"}]}}
    cni_path = "%s:%s" % (impl.bin, REF_DIR)
    res = run_cni(REF_DIR, "portmap", "ADD", portmap_conf, node=node, netns=container, cni_path=cni_path)
    if res.returncode != 0 and "iptables" in res.stdout and "not found" in res.stdout:
        pytest.skip("reference portmap needs iptables: %s" % res.stdout)
    chained = expect_ok(res)
    assert chained["interfaces"] == result["interfaces"] and chained["ips"] == result["ips"]

    connect_client(node, client)
    server = subprocess.Popen(["ip", "netns", "exec", container.name, sys.executable, "-c", PORTMAP_SERVER])
    try:
        reply = client.run(sys.executable, "-c", PORTMAP_CLIENT, timeout=30)
        assert reply.stdout.strip() == "hello from the container"
    finally:
        server.kill()
        server.wait()

    expect_ok(run_cni(REF_DIR, "portmap", "DEL", with_prev(portmap_conf, chained), node=node, netns=container,
                      cni_path=cni_path))
    delete(impl, with_prev(conf, chained), node, container, cni_path=cni_path)
    assert set(host_veths(node)) == {"uplink0"} and reservations(data_dir) == {}


# --- differential: ours and the reference on the same scenario ----------------------------------

DIFFERENTIAL_CONFS = {
    "walkthrough": lambda data_dir, version: walkthrough_conf(data_dir, version),
    "default-gateway": lambda data_dir, version: bridge_conf(data_dir, version, isDefaultGateway=True,
                                                             hairpinMode=True, mtu=1400),
    "dual-stack": lambda data_dir, version: bridge_conf(data_dir, version, ipam=dual_stack_ipam(data_dir)),
    "dns": lambda data_dir, version: bridge_conf(data_dir, version, dns={"nameservers": ["10.1.1.1"]}),
    "l2": lambda data_dir, version: l2_conf(version),
}


def normalise(result, container):
    """`result` with what differs between runs replaced: MACs, host veth names, the sandbox path.
    An empty dns is dropped: the spec makes dns optional, and the reference prints `"dns": {}` always."""
    result = deepcopy(result)
    if result.get("dns") == {}:
        del result["dns"]
    for interface in result.get("interfaces", []):
        if "mac" in interface:
            interface["mac"] = "<mac>"
        if HOST_VETH_NAME.match(interface["name"]):
            interface["name"] = "<veth>"
        if interface.get("sandbox") == container.path:
            interface["sandbox"] = "<sandbox>"
    return result


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])
@pytest.mark.parametrize("scenario", list(DIFFERENTIAL_CONFS))
def test_differential_add_result(ours_bin, ref_bin, scenario, version, make_netns, tmp_path):
    """The same config and scenario on two fresh nodes give ours and the reference equal ADD results
    (after normalising MACs, veth names and sandbox paths), and both DELs leave no veth."""
    results = {}
    for impl in (Impl("ours", ours_bin, True), Impl("ref", ref_bin, False)):
        node, container = make_netns("node"), make_netns()
        data_dir = tmp_path / impl.name
        data_dir.mkdir()
        conf = DIFFERENTIAL_CONFS[scenario](data_dir, version)
        result = add(impl, conf, node, container)
        results[impl.name] = normalise(result, container)
        delete(impl, with_prev(conf, result), node, container)
        assert host_veths(node) == {} and reservations(data_dir) == {}
    assert results["ours"] == results["ref"]
