"""Defects found by trying to break the plugins (issue 13, and issue 20 items 1 and 3), each proved
fixed on the kernel and the disk: a raced own-namespace guard, identifiers longer than kernel names,
DEL outside the container's namespace, a reused container ID, interface-name templates, another
network's iptables chain, reservations that outlive a reboot.

Every test runs the plugins inside a node namespace it makes and reads back `ip -j`,
`nft -j list ruleset` and the state directory.
"""
import hashlib
import json
import os
import struct
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from tests.helpers import (IP, REPO, RELNET, RELNET_BRIDGE, RELNET_SUBNET, assert_masq_base_only,
                           assert_nothing_left, bridge, cni_error, eventually, explain, host_veths,
                           kernel_filters_vlans, masq_comments, ok, relnet_conf, reservations, run, run_cni,
                           skip_without_iptables, verify_namespaces)

pytestmark = pytest.mark.kernel

# The reliability network of tests.helpers.
NET, BRIDGE, SUBNET, conf = RELNET, RELNET_BRIDGE, RELNET_SUBNET, relnet_conf


# --- 1. the own-namespace guard holds against a path that changes under it ------------------------

FLIPPER = """
import os, sys
link, a, b = sys.argv[1:4]
tmp = link + ".new"
while True:
    for target in (a, b):
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.symlink(target, tmp)
        os.replace(tmp, link)
"""


def test_netns_symlink_flipping_to_the_node_never_touches_a_node_link(ours_bin, node, container, tmp_path):
    """CNI_NETNS is a symlink another process swaps in a loop between a container namespace and the
    node's: DEL (and ADD, CHECK) with CNI_IFNAME=victim0 never removes or creates the node's link
    victim0 or anything else of the node, however the race falls."""
    node.run(IP, "link", "add", "victim0", "type", "veth", "peer", "name", "victim1")
    node_links = sorted(node.links())
    link = str(tmp_path / "netns")
    os.symlink(container.path, link)
    flipper = subprocess.Popen([sys.executable, "-c", FLIPPER, link, container.path, node.path])
    config = {"cniVersion": "1.0.0", "name": NET, "type": "bridge", "bridge": BRIDGE}
    try:
        outcomes = set()
        for attempt in range(200):
            command = ("DEL", "DEL", "ADD", "CHECK")[attempt % 4]
            res = bridge(ours_bin, command, config, node, link, "flip", ifname="victim0")
            assert "Traceback" not in res.stdout + res.stderr, explain(res)
            outcomes.add((command, res.returncode, (res.json or {}).get("code")))
            if command == "ADD" and res.returncode == 0:
                ok(bridge(ours_bin, "DEL", config, node, container, "flip", ifname="victim0"))
            assert "victim0" in node.links(), "attempt %d (%s) removed the node's victim0" % (attempt, command)
    finally:
        flipper.kill()
        flipper.wait()
    assert sorted(set(node.links()) - {BRIDGE}) == node_links
    assert "victim0" not in container.links()
    # The race went both ways: some calls reached the container, some saw the node and refused.
    assert ("ADD", 0, None) in outcomes and ("ADD", 1, 8) in outcomes, outcomes


# --- 5 and issue 20 item 1: DEL outside the container's namespace ---------------------------------

@pytest.mark.parametrize("netns", ["empty", "node-process", "node-process-container-gone", "node-path"])
def test_del_without_the_container_namespace_releases_everything_outside(ours_bin, node, make_netns, data_dir,
                                                                         netns):
    """DEL with CNI_NETNS empty, or a stale /proc/<pid>/ns/net (or path) that now resolves to the node's
    own namespace: success, and the reservation, the masquerade rule and the veth pair (found by the
    host veth's alias) are gone, while the node's own `eth0` is untouched."""
    container = make_netns("ct")
    node.run(IP, "link", "add", "eth0", "type", "bridge")   # no dummy module here
    config = conf(data_dir)
    result = ok(bridge(ours_bin, "ADD", config, node, container, "c1"))
    assert reservations(data_dir) and masq_comments(node) and host_veths(node)
    node_process = subprocess.Popen([IP, "netns", "exec", node.name, "sleep", "60"])
    try:
        time.sleep(0.2)
        if netns == "node-process-container-gone":
            run([IP, "netns", "del", container.name])
        path = {"empty": None, "node-path": node.path}.get(netns, "/proc/%d/ns/net" % node_process.pid)
        res = bridge(ours_bin, "DEL", dict(config, prevResult=result), node, path, "c1")
        assert res.returncode == 0 and res.stdout == "", explain(res)
    finally:
        node_process.kill()
        node_process.wait()
    assert "eth0" in node.links() and "UP" not in node.links()["eth0"]["flags"]
    alive = [] if netns == "node-process-container-gone" else [container]
    assert_nothing_left(node, data_dir, alive, "after DEL with CNI_NETNS %s:" % netns)
    # A new container gets the released address (no stale veth holds it).
    fresh = make_netns("ct")
    address = result["ips"][0]["address"]
    again = ok(bridge(ours_bin, "ADD", config, node, fresh, "c2", cni_args="IP=" + address.split("/")[0]))
    assert again["ips"][0]["address"] == address


# --- 2 and issue 20 item 3: identifiers of any length ---------------------------------------------

def long_id(length, tail=""):
    """A container ID of `length` characters ending in `tail`."""
    return ("c" + "0123456789abcdef" * (length // 16 + 1))[:length - len(tail)] + tail


def all_reservations(data_dir):
    """{(network, address): owner text} of every reservation file under data_dir."""
    found = {}
    for network in os.listdir(str(data_dir)):
        for name in os.listdir(str(data_dir / network)):
            if name[0].isdigit():
                found[(network, name)] = (data_dir / network / name).read_bytes().decode()
    return found


def bridge_nat_chains(node):
    """Names of the chains of table bridge nat (MAC spoof checks)."""
    entries = json.loads(node.run("nft", "-j", "list", "ruleset").stdout)["nftables"]
    return sorted(e["chain"]["name"] for e in entries
                  if "chain" in e and e["chain"]["family"] == "bridge" and e["chain"]["table"] == "nat")


def gc_with(config, *attachments):
    return dict(config, **{"cni.dev/valid-attachments": [{"containerID": cid, "ifname": "eth0"}
                                                          for cid in attachments]})


@pytest.mark.parametrize("network_length, id_length", [(6, 1), (6, 64), (6, 233), (6, 234), (6, 255), (6, 1000),
                                                       (6, 100000), (186, 64), (60, 185), (200, 4000)])
def test_long_identifiers_through_add_check_gc_del(ours_bin, node, container, data_dir, network_length, id_length):
    """Container IDs and network names of any length (the spec sets none): ADD with ipMasq and
    macspoofchk, CHECK, a GC that names the attachment valid (nothing of it goes), a repeated ADD
    (its address back), then DEL leaves nothing; every name fits the kernel's limits."""
    network = ("n" + "etwork" * 40)[:network_length]
    cid = long_id(id_length)
    config = dict(conf(data_dir, "1.1.0"), name=network, macspoofchk=True)
    result = ok(bridge(ours_bin, "ADD", config, node, container, cid))
    address = result["ips"][0]["address"].split("/")[0]
    assert all_reservations(data_dir) == {(network, address): cid + "\r\neth0"}
    [veth] = host_veths(node).values()
    assert veth["master"] == BRIDGE and len(veth["ifalias"].encode()) <= 254, veth
    assert len(bridge_nat_chains(node)) == 3 and all(len(c) <= 255 for c in bridge_nat_chains(node))
    assert len(masq_comments(node)) == 1
    with_prev = dict(config, prevResult=result)
    ok(bridge(ours_bin, "CHECK", with_prev, node, container, cid))
    ok(run_gc(ours_bin, gc_with(config, cid), node))
    assert list(host_veths(node)) == [veth["ifname"]]
    assert all_reservations(data_dir) == {(network, address): cid + "\r\neth0"}
    assert len(bridge_nat_chains(node)) == 3 and len(masq_comments(node)) == 1
    ok(bridge(ours_bin, "CHECK", with_prev, node, container, cid))
    assert ok(bridge(ours_bin, "ADD", config, node, container, cid)) == result       # read whole
    assert all_reservations(data_dir) == {(network, address): cid + "\r\neth0"}
    ok(bridge(ours_bin, "DEL", with_prev, node, container, cid))
    assert all_reservations(data_dir) == {}
    assert host_veths(node) == {} and sorted(container.links()) == ["lo"]
    assert bridge_nat_chains(node) == ["PREROUTING"]
    assert_masq_base_only(node)


def run_gc(bin_dir, config, node):
    return bridge(bin_dir, "GC", config, node, None, None, ifname=None)


def test_gc_tells_long_attachments_apart(ours_bin, node, make_netns, data_dir):
    """Two attachments whose `cni:<network>:<id>:<ifname>` would be the same once cut to an alias's
    254 bytes (IDs differing only at the end), and a third on another network with the same IDs:
    GC naming one valid keeps exactly that one's veth, reservation and rules."""
    network = "n" + "etwork" * 10                       # 61 characters
    first, second = long_id(240, "-first"), long_id(240, "-second")
    config = dict(conf(data_dir, "1.1.0"), name=network, macspoofchk=True)
    other = dict(config, name=network + "x", isGateway=False, ipam=dict(config["ipam"], subnet="10.97.0.0/24"))
    namespaces = {}
    for cid, cfg in ((first, config), (second, config), (first, other)):
        ns = make_netns("ct")
        namespaces[cid, cfg["name"]] = ns
        ok(bridge(ours_bin, "ADD", cfg, node, ns, cid))
    assert len(host_veths(node)) == 3
    ok(run_gc(ours_bin, gc_with(config, first), node))
    assert sorted(namespaces[first, network].links()) == ["eth0", "lo"]
    assert sorted(namespaces[first, network + "x"].links()) == ["eth0", "lo"]
    assert sorted(namespaces[second, network].links()) == ["lo"]
    assert sorted(owner for owner in all_reservations(data_dir).values()) == [first + "\r\neth0"] * 2
    assert len(host_veths(node)) == 2 and len(masq_comments(node)) == 2


def test_long_identifiers_with_the_iptables_backend(ours_bin, node, container, data_dir):
    """ipMasqBackend iptables with a 1,000-character container ID: the comment is cut to what iptables
    accepts, CHECK finds the chain, DEL removes it."""
    skip_without_iptables()
    cid = long_id(1000)
    config = dict(conf(data_dir), ipMasqBackend="iptables")
    result = ok(bridge(ours_bin, "ADD", config, node, container, cid))
    chain = "CNI-" + hashlib.sha512((NET + cid).encode()).hexdigest()[:24]
    assert "-N " + chain in node.run("iptables", "-t", "nat", "-S").stdout.splitlines()
    ok(bridge(ours_bin, "CHECK", dict(config, prevResult=result), node, container, cid))
    ok(bridge(ours_bin, "DEL", dict(config, prevResult=result), node, container, cid))
    assert chain not in node.run("iptables", "-t", "nat", "-S").stdout
    assert all_reservations(data_dir) == {} and host_veths(node) == {}


# --- 6. a reused container ID --------------------------------------------------------------------

def node_state(node, data_dir):
    """What an ADD or DEL could change on the node: links, reservations, masquerade rules."""
    links = {name: (link.get("master"), link.get("ifalias")) for name, link in node.links().items()}
    return links, reservations(data_dir), masq_comments(node)


def test_reused_container_id_is_decided_from_the_kernel(ours_bin, node, make_netns, data_dir):
    """The same attachment ADDed again in its namespace gets its result back; the same container ID
    and interface in another namespace, while the first lives, are refused before anything changes,
    and a DEL for that namespace releases nothing of the first; once the first is dead its
    reservation is reused."""
    first, second = make_netns("ct"), make_netns("ct")
    config = conf(data_dir)
    result = ok(bridge(ours_bin, "ADD", config, node, first, "c1"))
    address = result["ips"][0]["address"]
    before = node_state(node, data_dir)
    again = ok(bridge(ours_bin, "ADD", config, node, first, "c1"))
    assert again == result
    assert node_state(node, data_dir) == before
    error = cni_error(bridge(ours_bin, "ADD", config, node, second, "c1"))
    assert error["code"] == 7 and "another namespace" in error["msg"], error
    assert sorted(second.links()) == ["lo"]
    assert node_state(node, data_dir) == before
    ok(bridge(ours_bin, "DEL", config, node, second, "c1"))
    assert node_state(node, data_dir) == before
    assert [a for a in first.addrs("eth0") if a[0] == "inet"] == [("inet", address)]
    assert first.run("ping", "-c1", "-W2", "10.92.0.1", check=False).returncode == 0
    ok(bridge(ours_bin, "CHECK", dict(config, prevResult=result), node, first, "c1"))
    run([IP, "netns", "del", first.name])             # the first attachment dies without a DEL
    assert eventually(lambda: host_veths(node) == {})  # the kernel destroys the pair asynchronously
    moved = ok(bridge(ours_bin, "ADD", config, node, second, "c1"))
    assert moved["ips"][0]["address"] == address
    assert [a for a in second.addrs("eth0") if a[0] == "inet"] == [("inet", address)]
    assert list(reservations(data_dir)) == [address.split("/")[0]]
    ok(bridge(ours_bin, "DEL", dict(config, prevResult=moved), node, second, "c1"))
    assert_nothing_left(node, data_dir, [second])


def derived_veth_names(network, cid, ifname="eth0", tries=4):
    """The host veth names an attachment takes, in order (veth + 8 hex of SHA-512 of its alias)."""
    alias = "cni:%s:%s:%s" % (network, cid, ifname)
    return ["veth" + hashlib.sha512((alias if k == 0 else "%s#%d" % (alias, k)).encode()).hexdigest()[:8]
            for k in range(tries)]


def test_host_veth_is_named_from_the_attachment_and_found_by_name(ours_bin, node, make_netns, data_dir):
    """The host veth takes the first name derived from its attachment that no link holds, so a
    repeated ADD, a reused ID and a DEL without the namespace find it by name: with the first name
    held by another link, the attachment takes the second and is still found every way."""
    first, second = make_netns("ct"), make_netns("ct")
    names = derived_veth_names(NET, "c1")
    node.run(IP, "link", "add", names[0], "type", "veth", "peer", "name", "cbt-other")
    config = conf(data_dir)
    result = ok(bridge(ours_bin, "ADD", config, node, first, "c1"))
    ports = [name for name, link in node.links().items() if link.get("master") == BRIDGE]
    assert ports == [names[1]], ports
    assert node.links()[names[1]].get("ifalias") == "cni:%s:c1:eth0" % NET
    assert ok(bridge(ours_bin, "ADD", config, node, first, "c1")) == result
    error = cni_error(bridge(ours_bin, "ADD", config, node, second, "c1"))
    assert error["code"] == 7 and "another namespace" in error["msg"], error
    ok(bridge(ours_bin, "DEL", config, node, None, "c1"))
    assert sorted(host_veths(node)) == sorted([names[0], "cbt-other"])
    assert sorted(first.links()) == ["lo"]
    assert reservations(data_dir) == {}


# --- 8. names the kernel would rename or refuse ---------------------------------------------------

@pytest.mark.parametrize("ifname", ["eth%d", "e%s%d", "eth\u00e0"])
def test_ifname_the_kernel_would_rename_is_refused_before_anything_is_made(ours_bin, node, container, data_dir,
                                                                           ifname):
    """CNI_IFNAME with "%" (a template to the kernel) or a byte the kernel counts as a space: code 4,
    twice over, and no veth, reservation or rule appears anywhere."""
    config = conf(data_dir)
    for _attempt in range(2):
        error = cni_error(bridge(ours_bin, "ADD", config, node, container, "c1", ifname=ifname))
        assert error["code"] == 4, error
    assert sorted(container.links()) == ["lo"]
    assert host_veths(node) == {} and reservations(data_dir) == {}
    assert_masq_base_only(node)


def test_bridge_name_template_is_a_config_error(ours_bin, node, container, data_dir):
    """A `bridge` name with "%" is code 7 and makes no link on the node."""
    before = sorted(node.links())
    error = cni_error(bridge(ours_bin, "ADD", dict(conf(data_dir), bridge="cbt%d"), node, container, "c1"))
    assert error["code"] == 7, error
    assert sorted(node.links()) == before and sorted(container.links()) == ["lo"]


# --- 7. another attachment's iptables chain under the same name -----------------------------------

def chain_lines(node, chain):
    return sorted(line for line in node.run("iptables", "-t", "nat", "-S").stdout.splitlines() if chain in line)


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_del_keeps_another_attachments_iptables_chain_of_the_same_name(ours_bin, ref_bin, node, make_netns,
                                                                       data_dir, backend):
    """The reference's ADD of network "hnet", container "xc1" (iptables masquerade) and our DEL of
    network "hnetx", container "c1" (whose chain name hashes the same "hnetxc1"), with and without
    ipMasq and either backend: the reference's chain and its four rules stay."""
    skip_without_iptables(nf_tables_based=True)
    theirs = make_netns("ct")
    ref_config = {"cniVersion": "0.4.0", "name": "hnet", "type": "bridge", "bridge": BRIDGE, "isGateway": True,
                  "ipMasq": True, "ipam": {"type": "host-local", "subnet": SUBNET, "dataDir": str(data_dir)}}
    ok(run_ref(ref_bin, ref_config, node, theirs))
    chain = "CNI-" + hashlib.sha512(b"hnetxc1").hexdigest()[:24]
    before = chain_lines(node, chain)
    assert len(before) == 4, before              # -N, the ACCEPT and MASQUERADE rules, the jump
    for masq in (False, True):
        ours = dict(conf(data_dir), name="hnetx", ipMasq=masq, ipMasqBackend=backend)
        ok(bridge(ours_bin, "DEL", ours, node, make_netns("ct"), "c1"))
        ok(bridge(ours_bin, "DEL", ours, node, None, "c1"))
        assert chain_lines(node, chain) == before
    # Our own attachment's chain (same backend) still goes with its DEL.
    mine = make_netns("ct")
    ours = dict(conf(data_dir), name="hnety", ipMasqBackend="iptables")
    result = ok(bridge(ours_bin, "ADD", ours, node, mine, "c1"))
    own_chain = "CNI-" + hashlib.sha512(b"hnetyc1").hexdigest()[:24]
    assert chain_lines(node, own_chain)
    ok(bridge(ours_bin, "DEL", dict(ours, ipMasqBackend=backend, prevResult=result), node, mine, "c1"))
    assert chain_lines(node, own_chain) == [] and chain_lines(node, chain) == before


def run_ref(ref_bin, config, node, netns, command="ADD", cid="xc1"):
    return run_cni(ref_bin, "bridge", command, config, node=node, netns=netns, container_id=cid)


# --- 10. reservations that outlive a reboot -------------------------------------------------------

RANGE = ["10.92.0.10", "10.92.0.11", "10.92.0.12", "10.92.0.13"]
PREVIOUS_BOOT = "00000000-0000-4000-8000-000000000000"


def boot_id():
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def simulate_reboot(data_dir):
    """The state a full range left by a previous boot: every address reserved, that boot recorded."""
    state = data_dir / NET
    state.mkdir(mode=0o755, exist_ok=True)
    for index, address in enumerate(RANGE):
        (state / address).write_bytes(b"old%d\r\neth0" % index)
    (state / "last_reserved_ip.0").write_bytes(RANGE[-1].encode())
    (state / "boot_id").write_text(PREVIOUS_BOOT + "\n")


@pytest.mark.parametrize("first", ["ADD", "STATUS", "GC"])
def test_reservations_of_a_previous_boot_are_released_once(ours_bin, ref_bin, node, make_netns, data_dir, first):
    """After a (simulated) reboot the range is full of the previous boot's reservations: `leases` says
    so, the first ADD, STATUS or GC releases them, reservations made in this boot are never released,
    and the reference host-local keeps working on the directory afterwards."""
    simulate_reboot(data_dir)
    config = conf(data_dir, "1.1.0", rangeStart=RANGE[0], rangeEnd=RANGE[-1])
    listing = run([ours_bin / "cni-bridge.pyz", "leases", "--data-dir", data_dir],
                  env=dict(os.environ, CNI_CACHE_DIR=str(data_dir.parent / "cache"))).stdout
    rows = [line.split() for line in listing.splitlines()[1:]]
    assert sorted((r[1], r[-2:]) for r in rows) == [(a, ["previous", "boot"]) for a in RANGE], listing
    if first == "ADD":
        ok(bridge(ours_bin, "ADD", config, node, make_netns("ct"), "c0"))
        assert list(reservations(data_dir).values()) == ["c0\r\neth0"]
    else:
        ok(bridge(ours_bin, first, config, node, None, None, ifname=None))
        assert reservations(data_dir) == {}
    assert (data_dir / NET / "boot_id").read_text().strip() == boot_id()
    containers = {}
    for index in range(len(RANGE) - (first == "ADD")):
        containers["c%d" % (index + 1)] = make_netns("ct")
        ok(bridge(ours_bin, "ADD", config, node, containers["c%d" % (index + 1)], "c%d" % (index + 1)))
    held = reservations(data_dir)
    assert sorted(held) == RANGE and not any(owner.startswith("old") for owner in held.values())
    error = cni_error(bridge(ours_bin, "ADD", config, node, make_netns("ct"), "late"))
    assert error["code"] == 11, error
    assert cni_error(bridge(ours_bin, "STATUS", config, node, None, None, ifname=None))["code"] == 50
    ok(bridge(ours_bin, "GC", config, node, None, None, ifname=None))
    assert reservations(data_dir) == held
    # The reference reads and writes the same directory: it releases c1 and hands its address out.
    ref_config = dict(config, cniVersion="1.0.0")
    address = next(a for a, owner in held.items() if owner == "c1\r\neth0")
    ok(run_cni(ref_bin, "host-local", "DEL", ref_config, node=node, netns=containers["c1"], container_id="c1"))
    again = ok(run_cni(ref_bin, "host-local", "ADD", ref_config, node=node, netns=make_netns("ct"), container_id="r1"))
    assert again["ips"][0]["address"] == address + "/24"
    assert reservations(data_dir)[address] == "r1\r\neth0"


# --- 4. switching with the reference, with ipMasq -------------------------------------------------

def ref_bridge_config(data_dir, network=NET):
    return {"cniVersion": "1.0.0", "name": network, "type": "bridge", "bridge": BRIDGE, "isGateway": True,
            "ipMasq": True, "ipam": {"type": "host-local", "subnet": SUBNET, "dataDir": str(data_dir)}}


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_our_check_accepts_the_reference_masquerade(ours_bin, ref_bin, node, container, data_dir, backend):
    """An attachment the reference 1.1.1 made with ipMasq (its iptables chain, seen through nf_tables
    where iptables is nf_tables-based) passes our CHECK with either backend; without that chain it
    fails."""
    skip_without_iptables(nf_tables_based=True)
    result = ok(run_ref(ref_bin, ref_bridge_config(data_dir), node, container, cid="c1"))
    config = dict(conf(data_dir), ipMasqBackend=backend, prevResult=result)
    ok(bridge(ours_bin, "CHECK", config, node, container, "c1"))
    chain = "CNI-" + hashlib.sha512((NET + "c1").encode()).hexdigest()[:24]
    jump = next(line for line in chain_lines(node, chain) if line.startswith("-A POSTROUTING"))
    node.run("iptables", "-t", "nat", "-D", *jump.split()[1:3], "-s", jump.split()[4], "-j", chain, check=False)
    node.run("iptables", "-t", "nat", "-F", chain)
    error = cni_error(bridge(ours_bin, "CHECK", config, node, container, "c1"))
    assert "masquerade" in error["msg"], error


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_reference_del_of_our_attachment(ours_bin, ref_bin, node, container, data_dir, backend):
    """README's note on switching back: the reference 1.1.1's DEL of an attachment we made with the
    iptables backend works; with the nftables backend it fails (its chain does not exist: the
    reference's limitation), and our DEL then releases everything."""
    skip_without_iptables(nf_tables_based=True)
    config = dict(conf(data_dir), ipMasqBackend=backend)
    result = ok(bridge(ours_bin, "ADD", config, node, container, "c1"))
    res = run_ref(ref_bin, dict(ref_bridge_config(data_dir), prevResult=result), node, container, "DEL", "c1")
    if backend == "iptables":
        ok(res)
    else:
        assert res.returncode != 0, explain(res)
        ok(bridge(ours_bin, "DEL", config, node, container, "c1"))
    assert_nothing_left(node, data_dir, [container])
    assert chain_lines(node, "CNI-" + hashlib.sha512((NET + "c1").encode()).hexdigest()[:24]) == []


# --- 3. requests larger than the netlink receive buffer -------------------------------------------

def test_three_thousand_routes(ours_bin, node, container, data_dir):
    """3,000 routes in ipam.routes: ADD installs every one (acknowledgements are read as they come,
    never overflowing the socket), CHECK finds them, DEL removes the interface."""
    routes = [{"dst": "172.16.%d.%d/32" % (i // 250, i % 250 + 1)} for i in range(3000)]
    config = conf(data_dir, routes=routes)
    result = ok(bridge(ours_bin, "ADD", config, node, container, "c1"))
    installed = container.ip_json("-4", "route", "show", "dev", "eth0")
    assert sum(1 for r in installed if r["dst"].startswith("172.16.")) == 3000
    ok(bridge(ours_bin, "CHECK", dict(config, prevResult=result), node, container, "c1"))
    ok(bridge(ours_bin, "DEL", dict(config, prevResult=result), node, container, "c1"))
    assert_nothing_left(node, data_dir, [container])


def test_vlan_trunk_of_every_vlan(ours_bin, node, container, data_dir):
    """A trunk of VLANs 1 to 4094 (one request per VLAN): ADD gives the host port all 4,094, CHECK
    reads them back, DEL leaves nothing."""
    if not kernel_filters_vlans(node):
        pytest.skip("this kernel's bridge cannot filter VLANs (CONFIG_BRIDGE_VLAN_FILTERING)")
    config = dict(conf(data_dir), vlanTrunk=[{"minID": 1, "maxID": 4094}])
    result = ok(bridge(ours_bin, "ADD", config, node, container, "c1"))
    [veth] = host_veths(node)
    [port] = json.loads(node.run("bridge", "-j", "vlan", "show", "dev", veth).stdout)
    vids = set()
    for entry in port["vlans"]:
        vids.update(range(entry["vlan"], entry.get("vlanEnd", entry["vlan"]) + 1))
    assert vids == set(range(1, 4095))
    ok(bridge(ours_bin, "CHECK", dict(config, prevResult=result), node, container, "c1"))
    ok(bridge(ours_bin, "DEL", dict(config, prevResult=result), node, container, "c1"))
    assert_nothing_left(node, data_dir, [container])


def test_gc_of_a_thousand_stale_masquerade_rules(ours_bin, node, tmp_path, data_dir):
    """1,000 masquerade rules of attachments that no longer exist: one GC removes them all (one
    transaction) and reports success; another network's rule stays."""
    def h16(text):
        return hashlib.sha512(text.encode()).hexdigest()[:16]
    lines = ["table inet cni_plugins_masquerade {", "chain masq_checks {"]
    for i in range(1000):
        cid = "gone%d" % i
        lines.append('ip saddr 10.92.%d.%d ip daddr != 10.92.0.0/16 masquerade comment "%s-%s, net: %s, if: eth0, '
                     'id: %s"' % (i // 250, i % 250 + 1, h16(NET), h16("eth0:" + cid), NET, cid))
    lines.append('ip saddr 10.99.0.2 ip daddr != 10.99.0.0/16 masquerade comment "%s-%s, net: other, if: eth0, '
                 'id: c1"' % (h16("other"), h16("eth0:c1")))
    lines += ["}", "}"]
    (tmp_path / "rules.nft").write_text("\n".join(lines) + "\n")
    node.run("nft", "-f", str(tmp_path / "rules.nft"))
    assert len(masq_comments(node)) == 1001
    config = dict(conf(data_dir, "1.1.0"), **{"cni.dev/valid-attachments": []})
    ok(bridge(ours_bin, "GC", config, node, None, None, ifname=None))
    assert masq_comments(node) == ['%s-%s, net: other, if: eth0, id: c1' % (h16("other"), h16("eth0:c1"))]


class FakeRtnetlink(object):
    """A kernel on the far side of a netlink socket, at the wire level: it works through a whole
    datagram when it is sent, queueing one acknowledgement per request in a receive buffer of the
    kernel's default size, each taking an skb's true size; a full buffer drops the acknowledgement
    and the next recv fails with ENOBUFS, as a real socket's does."""

    ACK_TRUESIZE = 768

    def __init__(self):
        self.rcvbuf = 212992
        self.queue = []
        self.overrun = False
        self.acked = []
        self.largest_datagram = 0

    def send(self, data):
        import cni_bridge as cb
        messages = cb.decode_messages(data)
        self.largest_datagram = max(self.largest_datagram, len(messages))
        for _type, flags, seq, _payload in messages:
            if not flags & cb.NLM_F_ACK:
                continue
            self.acked.append(seq)
            if (len(self.queue) + 1) * self.ACK_TRUESIZE > self.rcvbuf:
                self.overrun = True
                continue
            ack = struct.pack("=IHHIIi", 36, cb.NLMSG_ERROR, 0x100, seq, 0, 0) + bytes(16)
            self.queue.append(ack)
        return len(data)

    def recv(self, size):
        if self.overrun:
            self.overrun = False
            raise OSError(105, "No buffer space available")
        if not self.queue:
            raise TimeoutError("the fake kernel has nothing to say")
        return self.queue.pop(0)

    def setsockopt(self, level, option, value):
        if level == 1 and option in (8, 33):
            self.rcvbuf = value


@pytest.mark.unit
def test_vlan_trunk_of_every_vlan_at_the_wire_level():
    """The 4,094 requests of a trunk of every VLAN, against a kernel whose receive buffer holds the
    acknowledgements of about 270: all are sent, every one is acknowledged, none is lost."""
    import cni_bridge as cb
    nl = cb.NetlinkSocket()
    nl.sock.close()
    kernel = nl.sock = FakeRtnetlink()
    nl.timeout_error = TimeoutError
    port = SimpleNamespace(index=7, name="vethtrunk")
    cb.set_port_vlans(nl, port, *cb.port_vlan_plan(0, list(range(1, 4095)), True))
    assert len(kernel.acked) == 4094 and len(set(kernel.acked)) == 4094
    assert kernel.largest_datagram * FakeRtnetlink.ACK_TRUESIZE <= 212992
    assert kernel.queue == [] and not kernel.overrun


# --- 9. smaller defects, each a clear error ---------------------------------------------------------

def pyz(ours_bin):
    return str(ours_bin / "cni-bridge.pyz")


@pytest.mark.parametrize("name, config", [
    ("ipv6-only", {"cniVersion": "1.0.0", "name": "v6only", "type": "bridge", "bridge": "cni0", "isGateway": True,
                   "ipam": {"type": "host-local", "subnet": "fd00:19::/64"}}),
    ("loopback", None)])
def test_verify_walks_ipv6_only_and_loopback_configs(ours_bin, tmp_path, verify_env, name, config):
    """verify passes every step with an IPv6-only config (the gateway answers once its duplicate
    address detection is over) and with conf/99-loopback.conf (the namespace's lo is read back)."""
    path = tmp_path / "config.conf"
    if config is None:
        path.write_bytes((REPO / "conf" / "99-loopback.conf").read_bytes())
    else:
        path.write_text(json.dumps(config))
    proc = run([pyz(ours_bin), "verify", str(path), "--json"], check=False, timeout=120, env=verify_env)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["ok"], proc.stdout + proc.stderr
    assert [s["step"] for s in report["steps"] if not s["ok"]] == []
    assert verify_namespaces(verify_env["CNI_BRIDGE_VERIFY_PREFIX"]) == set()


@pytest.mark.parametrize("config, words", [
    ({"cniVersion": "1.0.0", "name": "x", "plugins": []}, "plugins"),
    ({"cniVersion": "1.0.0", "name": "x", "plugins": [1]}, "plugins"),
    ({"cniVersion": "1.0.0", "name": "x", "plugins": "bridge"}, "plugins"),
    ({"cniVersion": "1.0.0", "name": "x", "type": "ptp"}, '"ptp" is not one of'),
])
def test_verify_refuses_configs_it_cannot_walk(ours_bin, tmp_path, verify_env, config, words):
    """A .conflist without plugin objects, or a type this program does not implement: exit 2 and a
    message saying so, no traceback, no internal error, no namespace made."""
    path = tmp_path / "bad.conflist"
    path.write_text(json.dumps(config))
    proc = run([pyz(ours_bin), "verify", str(path)], check=False, timeout=60, env=verify_env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert words in proc.stderr and "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    assert verify_namespaces(verify_env["CNI_BRIDGE_VERIFY_PREFIX"]) == set()


@pytest.fixture
def loopback_network(tmp_path, ours_bin):
    """A NETCONFPATH holding one loopback network, and a private result cache."""
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    (conf_dir / "99-lo.conf").write_text(json.dumps({"cniVersion": "1.0.0", "name": "lonet",
                                                     "type": "loopback"}))
    return {"NETCONFPATH": str(conf_dir), "CNI_PATH": str(ours_bin), "CNI_CACHE_DIR": str(tmp_path / "cache")}


@pytest.mark.parametrize("cap_args", ["{bad", "[1]", "\"text\""])
def test_bad_cap_args_is_a_clear_error(ours_bin, node, container, loopback_network, tmp_path, cap_args):
    """CAP_ARGS that is not a JSON object: the command fails with a message naming CAP_ARGS,
    before any plugin runs (nothing is cached)."""
    env = dict(loopback_network, CAP_ARGS=cap_args)
    proc = node.run("env", *["%s=%s" % kv for kv in env.items()], pyz(ours_bin), "add", "lonet", container.path,
                    check=False)
    assert proc.returncode == 1 and "CAP_ARGS" in proc.stderr, proc
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "cache").exists()


def test_result_cache_is_0644_under_umask_000(ours_bin, node, container, loopback_network, tmp_path):
    """`add` under umask 000 writes the cached result 0644, as README says."""
    env = " ".join("%s=%s" % kv for kv in loopback_network.items())
    node.run("sh", "-c", "umask 000 && exec env %s %s add lonet %s" % (env, pyz(ours_bin), container.path))
    [entry] = (tmp_path / "cache" / "results").iterdir()
    assert oct(entry.stat().st_mode & 0o777) == oct(0o644)
    node.run("sh", "-c", "exec env %s %s del lonet %s" % (env, pyz(ours_bin), container.path))


def test_leases_reads_without_writing_and_skips_symlinked_networks(ours_bin, tmp_path):
    """`leases` over a dataDir with a symlinked network directory: the other networks are listed,
    the symlink is not followed, and nothing is written (no lock file appears)."""
    data_dir = tmp_path / "networks"
    (data_dir / "real").mkdir(parents=True)
    (data_dir / "real" / "10.1.0.2").write_bytes(b"c1\r\neth0")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "10.2.0.2").write_bytes(b"c2\r\neth0")
    (data_dir / "linked").symlink_to(elsewhere)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    proc = run([pyz(ours_bin), "leases", "--data-dir", data_dir], check=False,
               env=dict(os.environ, CNI_CACHE_DIR=str(tmp_path / "cache")))
    assert proc.returncode == 0, proc
    rows = [line.split() for line in proc.stdout.splitlines()[1:]]
    assert [r[:4] for r in rows] == [["real", "10.1.0.2", "c1", "eth0"]]
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_install_force_over_a_directory_fails_cleanly(ours_bin, tmp_path):
    """install --force into a directory where `bridge` is a directory: a clear error, and nothing
    is left (no temporary link, no partial install)."""
    target = tmp_path / "bin"
    (target / "bridge").mkdir(parents=True)
    proc = run([pyz(ours_bin), "install", target, "--force"], check=False)
    assert proc.returncode == 1 and "is a directory" in proc.stderr, proc
    assert sorted(os.listdir(str(target))) == ["bridge"]


@pytest.mark.parametrize("keys", [{"rangeStart": "10.92.0.255", "rangeEnd": "10.92.0.255"},
                                  {"rangeStart": "10.92.0.1", "rangeEnd": "10.92.0.1"}])
def test_range_without_a_usable_address_is_a_config_error(ours_bin, node, container, data_dir, keys):
    """A range holding only the broadcast address, or only the gateway, can never hand one out:
    code 7 (not 11, "try again"), and nothing is left."""
    error = cni_error(bridge(ours_bin, "ADD", conf(data_dir, **keys), node, container, "c1"))
    assert error["code"] == 7 and "no usable address" in error["msg"], error
    assert_nothing_left(node, data_dir, [container])


def test_check_names_promiscuous_mode_plainly(ours_bin, node, container, data_dir):
    """CHECK of a bridge made promiscuous behind the config's back says so in the config's terms."""
    config = conf(data_dir)
    result = ok(bridge(ours_bin, "ADD", config, node, container, "c1"))
    node.run(IP, "link", "set", BRIDGE, "promisc", "on")
    error = cni_error(bridge(ours_bin, "CHECK", dict(config, prevResult=result), node, container, "c1"))
    assert error["msg"] == "bridge %s is promiscuous, while the config's promiscMode is false" % BRIDGE, error


def test_stdin_never_closed_ends_with_code_11(tmp_path):
    """A runtime that never closes stdin: the plugin gives up after its deadline with code 11
    (the deadline shortened here; the plugin's is STDIN_TIMEOUT seconds)."""
    script = ("import sys; sys.path.insert(0, %r); import cni_bridge as cb; cb.STDIN_TIMEOUT = 0.5; "
              "sys.exit(cb.run_plugin('host-local', {'CNI_COMMAND': 'ADD', 'CNI_CONTAINERID': 'c1', "
              "'CNI_NETNS': '/nonexistent', 'CNI_IFNAME': 'eth0', 'CNI_PATH': '/nonexistent'}))" % str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdin.write(b'{"cniVersion": "1.0.0",')          # a partial config, and stdin stays open
    proc.stdin.flush()
    watchdog = threading.Timer(20, proc.kill)
    watchdog.start()
    try:
        out = proc.stdout.read()                            # until the plugin exits
        proc.wait()
    finally:
        watchdog.cancel()
        proc.stdin.close()
        proc.stderr.close()
    assert proc.returncode == 1, "killed by the watchdog: the plugin still waited for stdin"
    assert json.loads(out)["code"] == 11 and "stdin" in json.loads(out)["msg"]
