"""An ADD whose cost does not grow with the bridge (issue 18, part 2), read back from the kernel.

The host-side veth is a bridge port without an IPv6 address of its own (addr_gen_mode none), so it
runs no duplicate address detection, sends no MLD report and adds no fe80::/64 route; settings are
read over netlink and /proc/sys is opened only to change what netlink cannot.  IPv6 containers on
the bridge keep working: ping between two of them and to the gateway, neighbour discovery, and
multicast to the bridge.
"""

import ipaddress
import re
import shutil
import subprocess
import time

import pytest

from tests.helpers import DEFAULT_PATH, cni_env, encode_conf, eventually, explain, parse_output, run_cni

pytestmark = pytest.mark.kernel

NETWORK = "cbtgrowth"
BRIDGE = "cbtg0"
SUBNET, GATEWAY = "10.89.0.0/24", "10.89.0.1"
SUBNET6, GATEWAY6 = "fd00:89::/64", "fd00:89::1"


def conf(data_dir, families=(4, 6), **options):
    """A gateway bridge network with a range set per family in `families`."""
    ranges = [[{"subnet": SUBNET if family == 4 else SUBNET6}] for family in families]
    config = {"cniVersion": "1.0.0", "name": NETWORK, "type": "bridge", "bridge": BRIDGE,
              "isGateway": True, "ipMasq": False,
              "ipam": {"type": "host-local", "dataDir": str(data_dir), "ranges": ranges}}
    config.update(options)
    return config


def add(bin_dir, config, node, container, container_id):
    res = run_cni(bin_dir, "bridge", "ADD", config, node=node, netns=container, container_id=container_id)
    assert res.returncode == 0 and isinstance(res.json, dict), explain(res)
    return res.json


def address_of(result, family):
    """The address (without prefix length) of `family` in an ADD result."""
    for ip in result["ips"]:
        address = ipaddress.ip_interface(ip["address"])
        if address.version == family:
            return str(address.ip)
    raise AssertionError("no IPv%d address in %r" % (family, result))


def host_veth(node, result):
    """The node's `ip -j -d link` entry of the ADD's host veth."""
    return node.links()[result["interfaces"][1]["name"]]


def link_local(ns, ifname):
    """The link-local IPv6 addresses on `ifname` in `ns`."""
    return [a["local"] for entry in ns.ip_json("-6", "addr", "show", "dev", ifname)
            for a in entry.get("addr_info", []) if a.get("scope") == "link"]


def wait_gateway_settled(node):
    """Wait until the bridge's IPv6 gateway address has passed DAD (about a second after the
    network's first ADD put it there)."""
    assert eventually(lambda: not [a for e in node.ip_json("-6", "addr", "show", "dev", BRIDGE)
                                 for a in e["addr_info"] if a.get("tentative")])


def test_host_veth_has_no_ipv6_address(ours_bin, node, container, data_dir):
    """The host veth is created with addr_gen_mode none: `ip -d link` says so, it holds no IPv6
    address (not even after the time DAD would take) and the node has no fe80::/64 route through it;
    the container's eth0 keeps its link-local address.  The bridge has accept_ra 0, written when it
    was made."""
    result = add(ours_bin, conf(data_dir), node, container, "c1")
    veth = host_veth(node, result)
    assert veth.get("inet6_addr_gen_mode") == "none", veth
    assert veth["master"] == BRIDGE and "UP" in veth["flags"], veth
    assert eventually(lambda: link_local(container, "eth0")), "the container's eth0 has no link-local address"
    time.sleep(1.0)     # longer than an address's DAD would take to finish
    assert [a for entry in node.ip_json("-6", "addr", "show", "dev", veth["ifname"])
            for a in entry.get("addr_info", [])] == []
    routes = node.ip_json("-6", "route", "show", "table", "all", "dev", veth["ifname"])
    assert [r for r in routes if r["dst"].startswith("fe80")] == [], routes
    assert node.sysctl("net/ipv6/conf/%s/accept_ra" % BRIDGE) == "0"
    assert container.links()["eth0"].get("inet6_addr_gen_mode") != "none"


def test_host_veth_of_a_network_without_ipv6_mtu(ours_bin, node, container, data_dir):
    """A network MTU below IPv6's minimum (1280) leaves the host veth without IPv6 at all: the ADD
    does not fail on turning its addresses off, and the container is reachable over IPv4."""
    result = add(ours_bin, conf(data_dir, families=(4,), mtu=1200), node, container, "c1")
    veth = host_veth(node, result)
    assert veth["mtu"] == 1200 and "UP" in veth["flags"], veth
    assert node.run("ping", "-c1", "-W2", address_of(result, 4), check=False).returncode == 0


def test_ipv6_containers_on_one_bridge(ours_bin, node, make_netns, data_dir):
    """Two dual-stack containers: each pings the other and the gateway over IPv6 (and IPv4),
    learns the other's and the gateway's MAC through neighbour discovery, and a ping to the
    all-nodes group ff02::1 is answered by the bridge and the other container (multicast through
    the bridge to the node) -- and by no host veth, which have no address to answer from."""
    one, two = make_netns("ct"), make_netns("ct")
    first = add(ours_bin, conf(data_dir), node, one, "c1")
    second = add(ours_bin, conf(data_dir), node, two, "c2")
    wait_gateway_settled(node)
    for ns, peer in ((one, second), (two, first)):
        for target in (address_of(peer, 6), GATEWAY6, address_of(peer, 4), GATEWAY):
            proc = ns.run("ping", "-c1", "-W2", target, check=False)
            assert proc.returncode == 0, "%s cannot reach %s: %s" % (ns.name, target, proc.stdout)
    neighbours = {n["dst"]: n.get("lladdr") for n in one.ip_json("-6", "neigh", "show", "dev", "eth0")}
    assert neighbours.get(address_of(second, 6)) == second["interfaces"][2]["mac"], neighbours
    assert neighbours.get(GATEWAY6) == node.links()[BRIDGE]["address"], neighbours

    assert eventually(lambda: link_local(node, BRIDGE) and link_local(two, "eth0"))
    expected = {link_local(node, BRIDGE)[0], link_local(two, "eth0")[0]}
    proc = one.run("ping", "-6", "-c3", "-i0.3", "-w3", "-I", "eth0", "ff02::1", check=False)
    answered = set(re.findall(r"bytes from ([0-9a-f:]+)", proc.stdout))
    assert expected <= answered, proc.stdout
    host_addresses = {a for name in (first["interfaces"][1]["name"], second["interfaces"][1]["name"])
                      for a in link_local(node, name)}
    assert host_addresses == set() and not answered - expected - set(link_local(one, "eth0")), proc.stdout


def proc_sys_opened(bin_dir, config, node, container, container_id, tmp_path):
    """The /proc/sys/net files (one tree per namespace, whose lookups grow with the namespaces) an
    ADD opened (strace), and its CNIRun."""
    trace = tmp_path / ("strace-%s.out" % container_id)
    argv = ["ip", "netns", "exec", node.name, "strace", "-f", "-qq", "-o", str(trace), "-e", "trace=openat,open",
            str(bin_dir / "bridge")]
    proc = subprocess.run(argv, input=encode_conf(config), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=60, env=cni_env("ADD", bin_dir, netns=container, container_id=container_id))
    res = parse_output(proc)
    assert res.returncode == 0, explain(res)
    return re.findall(r'"(/proc/sys/net/[^"]*)"', trace.read_text()), res


def test_add_opens_proc_sys_only_to_change_a_setting(ours_bin, node, make_netns, data_dir, tmp_path):
    """With the bridge made and forwarding on, an IPv4 ADD opens one /proc/sys/net file: the container's
    accept_dad, the one setting a new interface holds otherwise that netlink cannot write.  The
    first ADD also writes the new bridge's accept_ra and turns forwarding on; the others read it
    over netlink.  The kernel holds every value: accept_dad 0 and arp_notify 1 (set over netlink)
    in the container, forwarding on in the node."""
    if shutil.which("strace", path=DEFAULT_PATH) is None:
        pytest.skip("strace not installed (apt-get install strace)")
    node.run("sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward")
    first, second = make_netns("ct"), make_netns("ct")
    opened, _ = proc_sys_opened(ours_bin, conf(data_dir, families=(4,)), node, first, "c1", tmp_path)
    assert "/proc/sys/net/ipv6/conf/%s/accept_ra" % BRIDGE in opened, opened
    assert "/proc/sys/net/ipv4/ip_forward" in opened, opened
    opened, _ = proc_sys_opened(ours_bin, conf(data_dir, families=(4,)), node, second, "c2", tmp_path)
    assert opened == ["/proc/sys/net/ipv6/conf/eth0/accept_dad"], opened
    for ns in (first, second):
        assert ns.sysctl("net/ipv6/conf/eth0/accept_dad") == "0"
        assert ns.sysctl("net/ipv4/conf/eth0/arp_notify") == "1"
    assert node.sysctl("net/ipv4/ip_forward") == "1"


def test_dual_stack_add_changes_only_differing_settings(ours_bin, node, container, data_dir, tmp_path):
    """A dual-stack ADD into a namespace with IPv6 turned off on lo and by default: disable_ipv6 is
    written back to 0 on lo and eth0 (read over netlink first), keep_addr_on_down set to 1, and the
    container's IPv6 address works (the gateway answers)."""
    if shutil.which("strace", path=DEFAULT_PATH) is None:
        pytest.skip("strace not installed (apt-get install strace)")
    for key in ("net/ipv6/conf/lo/disable_ipv6", "net/ipv6/conf/default/disable_ipv6"):
        container.run("sh", "-c", "echo 1 > /proc/sys/" + key)
    opened, res = proc_sys_opened(ours_bin, conf(data_dir), node, container, "c1", tmp_path)
    for name in ("lo/disable_ipv6", "eth0/disable_ipv6", "eth0/keep_addr_on_down", "eth0/accept_dad"):
        assert opened.count("/proc/sys/net/ipv6/conf/" + name) == 1, opened
    for key, value in (("lo/disable_ipv6", "0"), ("eth0/disable_ipv6", "0"), ("eth0/keep_addr_on_down", "1"),
                       ("eth0/accept_dad", "0")):
        assert container.sysctl("net/ipv6/conf/" + key) == value, key
    wait_gateway_settled(node)
    assert container.run("ping", "-c1", "-W2", GATEWAY6, check=False).returncode == 0
    assert address_of(res.json, 6) in {a["local"] for e in container.ip_json("-6", "addr", "show", "dev", "eth0")
                                       for a in e["addr_info"]}


# --- host-local's owner index -----------------------------------------------------------------------

HL_NET = "cbtgrowthhl"


def hl_conf(data_dir, subnet="10.90.0.0/24"):
    return {"cniVersion": "1.0.0", "name": HL_NET, "type": "bridge",
            "ipam": {"type": "host-local", "dataDir": str(data_dir), "ranges": [[{"subnet": subnet}]]}}


def hl_call(bin_dir, command, data_dir, cid, node, container, trace=None):
    """host-local `command` for (cid, eth0); with `trace`, under strace writing its file opens there."""
    argv = [str(bin_dir / "host-local")]
    if trace is not None:
        argv = ["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=openat,open"] + argv
    proc = subprocess.run(["ip", "netns", "exec", node.name] + argv, input=encode_conf(hl_conf(data_dir)),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60,
                          env=cni_env(command, bin_dir, netns=container, container_id=cid))
    res = parse_output(proc)
    assert res.returncode == 0, explain(res)
    return res


def hl_add(bin_dir, data_dir, cid, node, container, trace=None):
    return address_of(hl_call(bin_dir, "ADD", data_dir, cid, node, container, trace).json, 4)


def reservation_files_opened(trace):
    """Reservation files (named by an IPv4 address) a traced call opened."""
    return re.findall(r'"(?:[^"]*/)?(\d+\.\d+\.\d+\.\d+)"', trace.read_text())


def test_owner_index_spares_reading_every_reservation(ours_bin, node, container, data_dir, tmp_path):
    """Once the lock file holds the owner index, an ADD of a new attachment opens no reservation
    file: 20 ADDs, then the 21st traced.  The directory holds no file for the index (the
    reservations, lock, last_reserved_ip.0, besides boot_id), and each reservation its owner."""
    if shutil.which("strace", path=DEFAULT_PATH) is None:
        pytest.skip("strace not installed (apt-get install strace)")
    addresses = [hl_add(ours_bin, data_dir, "c%d" % i, node, container) for i in range(20)]
    trace = tmp_path / "strace.out"
    addresses.append(hl_add(ours_bin, data_dir, "c20", node, container, trace))
    assert reservation_files_opened(trace) == [], trace.read_text()
    assert len(set(addresses)) == 21
    state = data_dir / HL_NET
    assert sorted(p.name for p in state.iterdir() if p.name != "boot_id") == \
        sorted(addresses + ["last_reserved_ip.0", "lock"])
    for i, address in enumerate(addresses):
        assert (state / address).read_bytes() == b"c%d\r\neth0" % i


def test_repeated_add_returns_its_address_after_changes_by_others(ours_bin, ref_bin, node, container,
                                                                  data_dir):
    """The index never hides a reservation: a repeated ADD of an attachment gets its address back
    when the index names it, when another program made its reservation after our last change (the
    reference plugin; a file written by hand, and one removed and made again under the same name at
    once), and when the lock file's index is torn."""
    state = data_dir / HL_NET
    first = hl_add(ours_bin, data_dir, "c1", node, container)
    assert hl_add(ours_bin, data_dir, "c1", node, container) == first          # named by the index
    theirs = address_of(run_cni(ref_bin, "host-local", "ADD", hl_conf(data_dir), node=node, netns=container,
                                container_id="r1").json, 4)
    assert hl_add(ours_bin, data_dir, "r1", node, container) == theirs         # made by the reference
    hl_add(ours_bin, data_dir, "c2", node, container)                          # index rewritten
    (state / "10.90.0.200").write_bytes(b"h1\r\neth0")                       # by hand
    assert hl_add(ours_bin, data_dir, "h1", node, container) == "10.90.0.200"
    hl_add(ours_bin, data_dir, "c3", node, container)
    (state / first).unlink()                                                   # same name, at once
    (state / first).write_bytes(b"h2\r\neth0")
    assert hl_add(ours_bin, data_dir, "h2", node, container) == first
    hl_add(ours_bin, data_dir, "c4", node, container)
    lock = state / "lock"
    lock.write_bytes(lock.read_bytes()[:40])                                   # torn
    assert hl_add(ours_bin, data_dir, "c4", node, container) == \
        next(p.name for p in state.iterdir() if p.read_bytes() == b"c4\r\neth0")
    owners = [p.read_bytes() for p in state.iterdir() if p.name[0].isdigit()]
    assert len(owners) == len(set(owners)) == 6, owners      # one address each (c1's went to h2)


def test_del_keeps_the_index(ours_bin, node, container, data_dir, tmp_path):
    """DEL with prevResult removes its line from the index, so the next ADD still opens no
    reservation file, and the released address is free again."""
    if shutil.which("strace", path=DEFAULT_PATH) is None:
        pytest.skip("strace not installed (apt-get install strace)")
    addresses = [hl_add(ours_bin, data_dir, "c%d" % i, node, container) for i in range(5)]
    config = dict(hl_conf(data_dir), prevResult={"cniVersion": "1.0.0",
                                                 "ips": [{"address": addresses[2] + "/24"}]})
    proc = subprocess.run(["ip", "netns", "exec", node.name, str(ours_bin / "host-local")],
                          input=encode_conf(config), stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60,
                          env=cni_env("DEL", ours_bin, netns=container, container_id="c2"))
    assert proc.returncode == 0, proc.stderr
    assert not (data_dir / HL_NET / addresses[2]).exists()
    trace = tmp_path / "strace.out"
    hl_add(ours_bin, data_dir, "c5", node, container, trace)
    assert reservation_files_opened(trace) == [], trace.read_text()
    assert hl_add(ours_bin, data_dir, "c2", node, container) not in addresses[:2] + addresses[3:]


def test_lock_file_is_empty_again_when_every_address_is_released(ours_bin, node, container, data_dir):
    """The index lives in the lock file only while the network holds reservations: after two ADDs it
    names both, after their DELs (with prevResult) the lock file is empty, as the reference keeps it."""
    lock = data_dir / HL_NET / "lock"
    addresses = {cid: hl_add(ours_bin, data_dir, cid, node, container) for cid in ("c1", "c2")}
    assert lock.read_bytes().startswith(b"cni-bridge owner index")
    for cid, address in addresses.items():
        config = dict(hl_conf(data_dir), prevResult={"cniVersion": "1.0.0", "ips": [{"address": address + "/24"}]})
        proc = subprocess.run(["ip", "netns", "exec", node.name, str(ours_bin / "host-local")],
                              input=encode_conf(config), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=60, env=cni_env("DEL", ours_bin, netns=container, container_id=cid))
        assert proc.returncode == 0, proc.stderr
    assert lock.read_bytes() == b""
    assert not [p.name for p in lock.parent.iterdir() if p.name[0].isdigit()]
