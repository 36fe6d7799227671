"""The bandwidth plugin (issue 17): token buckets over rtnetlink, proved on the kernel.

Every test makes a "node" namespace where the plugins run, containers attached by our `bridge`
(host-local, gateway on the bridge), and for traffic an "outside" namespace on its own link of
the node (10.98.0.0/24, routed).  `bandwidth` runs chained after `bridge` with the bridge's result
as prevResult, as runtimes chain them.  What it did is read back with `tc -j qdisc/filter show`
and `ip -j -d link`; shaping is measured with a plain TCP sender and receiver written here,
bounded in time, at low rates (8-16 Mbit/s) so the machine's load does not matter.
The reference plugin (/usr/lib/cni/bandwidth, Debian's 1.1.1) is the differential: same qdisc
layout and rates, and each side CHECKs and DELs what the other made.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import (IP, REF_DIR, VERSIONS, cni_env, encode_conf, explain, kind, parse_output, run,
                           run_cni)

pytestmark = pytest.mark.kernel

NETWORK = "cbtbw"
BRIDGE = "cbt-bw0"
SUBNET = "10.97.0.0/24"
OUTSIDE_LINK = "cbt-out0"          # the node's end of the link to the outside namespace
OUTSIDE_NODE_IP = "10.98.0.1"
OUTSIDE_IP = "10.98.0.2"
PORT = 5201
INGRESS = (16000000, 128000)       # (rate bits/s, burst bits) towards the container
EGRESS = (8000000, 64000)          # from the container
TOLERANCE = 0.20
REF_BANDWIDTH = REF_DIR / "bandwidth"


# --- configurations and calls -----------------------------------------------------------------

def bridge_conf(data_dir, version="1.0.0"):
    return {"cniVersion": version, "name": NETWORK, "type": "bridge", "bridge": BRIDGE,
            "isGateway": True, "ipMasq": False,
            "ipam": {"type": "host-local", "subnet": SUBNET, "dataDir": str(data_dir),
                     "routes": [{"dst": "0.0.0.0/0"}]}}


def bw_conf(version="1.0.0", ingress=INGRESS, egress=EGRESS, **keys):
    """A bandwidth config; `ingress`/`egress` are (rate, burst) pairs or None."""
    conf = {"cniVersion": version, "name": NETWORK, "type": "bandwidth"}
    if ingress:
        conf.update(ingressRate=ingress[0], ingressBurst=ingress[1])
    if egress:
        conf.update(egressRate=egress[0], egressBurst=egress[1])
    conf.update(keys)
    return conf


def ok(res):
    assert res.returncode == 0, explain(res)
    assert "Traceback" not in res.stderr, explain(res)
    return res.json


def error(res, code):
    assert res.returncode != 0, explain(res)
    assert isinstance(res.json, dict) and res.json.get("code") == code and res.json.get("msg"), explain(res)
    assert "Traceback" not in res.stdout + res.stderr, explain(res)
    return res.json


def bandwidth(bin_dir, command, conf, node, container, cid, prev=None, **kwargs):
    """One bandwidth call inside `node`; `bin_dir` holds ours or is the reference's directory."""
    stdin = dict(conf, prevResult=prev) if prev is not None else conf
    return run_cni(bin_dir, "bandwidth", command, stdin, node=node, netns=container, container_id=cid, **kwargs)


def ifb_name(cid, network=NETWORK):
    """The reference's IFB name: bwp + SHA-512(network + containerID), 15 characters."""
    return ("bwp" + hashlib.sha512((network + cid).encode()).hexdigest())[:15]


# --- what the kernel holds --------------------------------------------------------------------

def tc_json(node, *args):
    out = run(["tc", "-n", node.name, "-j", *args]).stdout
    return json.loads(out) if out.strip() else []


def ifbs(node):
    """name -> `ip -j -d link` entry of every IFB device in the node."""
    return {name: link for name, link in node.links().items() if kind(link) == "ifb"}


def host_veth_of(node, container):
    """The node-side name of the container's eth0."""
    inside = container.links()["eth0"]
    return next(name for name, link in node.links().items() if link["ifindex"] == inside["link_index"])


def layout(node, dev):
    """What shapes `dev` (a host veth), normalised: its root qdisc, whether it has the ingress
    qdisc, the filters on it (kind, protocol, priority, flowid, actions), and the root qdisc of
    every device those redirect to.  tc reports rates and bursts in bytes, latency in us."""
    def root(name):
        for q in tc_json(node, "qdisc", "show", "dev", name):
            if q.get("root"):
                opts = q.get("options", {})
                return (q["kind"], q["handle"], opts.get("rate"), opts.get("burst"), opts.get("lat"))
        return None

    qdiscs = tc_json(node, "qdisc", "show", "dev", dev)
    has_ingress = any(q["kind"] == "ingress" and q["handle"] == "ffff:" for q in qdiscs)
    filters, targets = [], {}
    if has_ingress:
        for f in tc_json(node, "filter", "show", "dev", dev, "ingress"):
            opts = f.get("options", {})
            if "actions" not in opts:
                continue            # the u32 hash table entries tc lists first
            actions = [(a["kind"], a.get("mirred_action"), a.get("direction"), a.get("to_dev"))
                       for a in opts["actions"]]
            filters.append((f["kind"], f["protocol"], f["pref"], opts.get("flowid"), opts.get("match")))
            for _kind, _action, _direction, to_dev in actions:
                targets[to_dev] = root(to_dev)
            filters[-1] += (sorted(set(actions)),)
    return {"root": root(dev), "ingress": has_ingress, "filters": filters, "targets": targets}


def unshaped(node, dev):
    """`dev` carries nothing of ours: a default root qdisc and no ingress qdisc."""
    qdiscs = tc_json(node, "qdisc", "show", "dev", dev)
    return all(q["kind"] in ("noqueue", "pfifo_fast", "fq_codel", "mq") for q in qdiscs)


NO_ROOT = ("noqueue", "0:", None, None, None)      # a veth's own root qdisc


def expected_layout(dev_ifb, ingress=INGRESS, egress=EGRESS):
    lat = 25000
    out = {"root": ("tbf", "1:", ingress[0] // 8, ingress[1] // 8, lat) if ingress else NO_ROOT,
           "ingress": bool(egress), "filters": [], "targets": {}}
    if egress:
        out["filters"] = [("u32", "all", 1, "1:1", {"value": "0", "mask": "0", "offmask": "", "off": 0},
                           [("mirred", "redirect", "egress", dev_ifb)])]
        out["targets"] = {dev_ifb: ("tbf", "1:", egress[0] // 8, egress[1] // 8, lat)}
    return out


# --- the chain ------------------------------------------------------------------------------------

class Chain:
    """A node with our bridge network, an outside namespace routed from it, and containers."""

    def __init__(self, ours_bin, node, make_netns, data_dir):
        self.bin, self.node, self.make_netns, self.data_dir = ours_bin, node, make_netns, data_dir

    def attach(self, cid, version="1.0.0"):
        """A new container on the bridge; returns (namespace, bridge result)."""
        container = self.make_netns("ct")
        result = ok(run_cni(self.bin, "bridge", "ADD", bridge_conf(self.data_dir, version), node=self.node,
                            netns=container, container_id=cid))
        return container, result

    def connect_outside(self):
        """A namespace outside the node, on its own routed link; returns it."""
        outside = self.make_netns("out")
        node, out = self.node.name, outside.name
        run([IP, "-n", node, "link", "add", OUTSIDE_LINK, "type", "veth", "peer", "name", "eth0", "netns", out])
        run([IP, "-n", node, "addr", "add", OUTSIDE_NODE_IP + "/24", "dev", OUTSIDE_LINK])
        run([IP, "-n", node, "link", "set", OUTSIDE_LINK, "up"])
        run([IP, "-n", out, "addr", "add", OUTSIDE_IP + "/24", "dev", "eth0"])
        run([IP, "-n", out, "link", "set", "eth0", "up"])
        run([IP, "-n", out, "route", "add", SUBNET, "via", OUTSIDE_NODE_IP])
        return outside


@pytest.fixture
def chain(ours_bin, node, make_netns, data_dir):
    """Our plugins, a node and its bridge network (containers made on demand)."""
    return Chain(ours_bin, node, make_netns, data_dir)


@pytest.fixture
def ref_bandwidth():
    if not REF_BANDWIDTH.is_file():
        pytest.skip("reference bandwidth plugin not installed: apt-get install containernetworking-plugins")
    return REF_DIR


# --- throughput -------------------------------------------------------------------------------------

# Receiver: accepts one connection, skips `warmup` seconds after the first byte (slow start, the
# bucket's initial burst), then counts bytes for `window` seconds and prints bits/s.
RECEIVER = r"""
import socket, sys, time
port, warmup, window = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", port))
srv.listen(1)
srv.settimeout(15)
print("ready", flush=True)
conn, _ = srv.accept()
conn.settimeout(15)
first = mark = None
total = 0
while True:
    data = conn.recv(1 << 16)
    now = time.monotonic()
    if not data:
        break
    first = first or now
    total += len(data)
    if mark is None and now - first >= warmup:
        mark = (now, total)
    if mark is not None and now - mark[0] >= window:
        break
conn.close()
print("%.0f" % ((total - mark[1]) * 8 / (now - mark[0])) if mark and now > mark[0] else "nan")
"""

# Sender: connects (retrying while the receiver starts) and sends until the receiver closes or
# `limit` seconds pass.
SENDER = r"""
import socket, sys, time
host, port, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + limit
while True:
    try:
        s = socket.create_connection((host, port), timeout=2)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
chunk = b"x" * (1 << 16)
s.settimeout(5)
try:
    while time.monotonic() < deadline:
        s.sendall(chunk)
except OSError:
    pass
"""


def throughput(sender_ns, receiver_ns, address, warmup, window):
    """Bits/s a TCP stream from `sender_ns` to `address` in `receiver_ns` reaches (bounded)."""
    receiver = subprocess.Popen([IP, "netns", "exec", receiver_ns.name, sys.executable, "-c", RECEIVER,
                                 str(PORT), str(warmup), str(window)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout.readline().strip() == "ready", receiver.stderr.read()
        sender = subprocess.run([IP, "netns", "exec", sender_ns.name, sys.executable, "-c", SENDER, address,
                                 str(PORT), str(warmup + window + 5)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=30)
        out, err = receiver.communicate(timeout=30)
    finally:
        receiver.kill()
        receiver.wait()
    assert receiver.returncode == 0, err
    assert sender.returncode == 0, sender.stderr
    return float(out.strip())


def assert_rate(measured, configured, what):
    low, high = configured * (1 - TOLERANCE), configured * (1 + TOLERANCE)
    assert low <= measured <= high, "%s: %.2f Mbit/s measured, %.2f configured (+-%d%%)" % (
        what, measured / 1e6, configured / 1e6, TOLERANCE * 100)


def container_ip(result):
    return result["ips"][0]["address"].split("/")[0]


# --- tests --------------------------------------------------------------------------------------------

def test_throughput_is_shaped_each_way_and_unshaped_after_del(chain):
    """Towards the container the stream runs at ingressRate, from it at egressRate (within 20%),
    measured between the container and a namespace outside the node; after DEL both run free."""
    container, prev = chain.attach("tput")
    outside = chain.connect_outside()
    address = container_ip(prev)
    ok(bandwidth(chain.bin, "ADD", bw_conf(), chain.node, container, "tput", prev))
    assert_rate(throughput(outside, container, address, 0.5, 1.5), INGRESS[0], "towards the container")
    assert_rate(throughput(container, outside, OUTSIDE_IP, 0.5, 1.5), EGRESS[0], "from the container")
    res = bandwidth(chain.bin, "DEL", bw_conf(), chain.node, container, "tput", prev)
    ok(res)
    assert res.stdout.strip() == ""
    free_in = throughput(outside, container, address, 0.2, 0.5)
    free_out = throughput(container, outside, OUTSIDE_IP, 0.2, 0.5)
    assert free_in > 3 * INGRESS[0], "still shaped towards the container: %.1f Mbit/s" % (free_in / 1e6)
    assert free_out > 3 * EGRESS[0], "still shaped from the container: %.1f Mbit/s" % (free_out / 1e6)


@pytest.mark.parametrize("ingress, egress", [(INGRESS, EGRESS), (INGRESS, None), (None, EGRESS)],
                         ids=["both", "ingress-only", "egress-only"])
def test_layout_read_back_with_tc(chain, ingress, egress):
    """tbf 1: on the host veth for ingress; for egress the host veth's ingress qdisc with one u32
    match-all filter (protocol all, pref 1, flowid 1:1) redirecting to an IFB named as the
    reference names it, up, with the host veth's MTU and the attachment's alias, carrying tbf 1:.
    The result is the prevResult with the IFB appended."""
    container, prev = chain.attach("lay")
    host = host_veth_of(chain.node, container)
    result = ok(bandwidth(chain.bin, "ADD", bw_conf(ingress=ingress, egress=egress), chain.node, container,
                          "lay", prev))
    name = ifb_name("lay")
    assert layout(chain.node, host) == expected_layout(name, ingress, egress)
    devices = ifbs(chain.node)
    if egress:
        assert sorted(devices) == [name]
        ifb = devices[name]
        assert "UP" in ifb["flags"] and ifb["mtu"] == chain.node.links()[host]["mtu"]
        assert ifb["ifalias"] == "cni:%s:lay:eth0" % NETWORK
        assert result == dict(prev, interfaces=prev["interfaces"] + [{"name": name, "mac": ifb["address"]}])
    else:
        assert devices == {}
        assert result == prev
    ok(bandwidth(chain.bin, "CHECK", bw_conf(ingress=ingress, egress=egress), chain.node, container, "lay", result))
    ok(bandwidth(chain.bin, "DEL", bw_conf(ingress=ingress, egress=egress), chain.node, container, "lay", result))
    assert unshaped(chain.node, host) and ifbs(chain.node) == {}


def test_differential_against_the_reference(chain, ref_bandwidth):
    """Ours and the reference, same config on two containers of one node: the same qdiscs, rates,
    bursts, latency, filter and IFB naming; each CHECKs what the other made, and each DEL removes
    the other's IFB (ours also the qdiscs, which the reference leaves on the host veth)."""
    theirs_ct, theirs_prev = chain.attach("theirs")
    ours_ct, ours_prev = chain.attach("ours")
    conf = bw_conf()
    ref_result = ok(bandwidth(ref_bandwidth, "ADD", conf, chain.node, theirs_ct, "theirs", theirs_prev))
    our_result = ok(bandwidth(chain.bin, "ADD", conf, chain.node, ours_ct, "ours", ours_prev))
    theirs_host, ours_host = host_veth_of(chain.node, theirs_ct), host_veth_of(chain.node, ours_ct)
    ref_layout = layout(chain.node, theirs_host)
    # The reference's u32 filter carries its mirred redirect twice (RedirIndex and Actions both
    # set); the set of distinct actions is what both share.
    assert ref_layout == expected_layout(ifb_name("theirs"))
    assert layout(chain.node, ours_host) == expected_layout(ifb_name("ours"))
    devices = ifbs(chain.node)
    assert sorted(devices) == sorted([ifb_name("theirs"), ifb_name("ours")])
    for name, host in ((ifb_name("theirs"), theirs_host), (ifb_name("ours"), ours_host)):
        assert "UP" in devices[name]["flags"], devices[name]
        assert devices[name]["mtu"] == chain.node.links()[host]["mtu"], devices[name]
    assert [i["name"] for i in ref_result["interfaces"]] == [i["name"] for i in theirs_prev["interfaces"]] + [ifb_name("theirs")]
    assert [i["name"] for i in our_result["interfaces"]] == [i["name"] for i in ours_prev["interfaces"]] + [ifb_name("ours")]
    # Each CHECKs the other's work.
    ok(bandwidth(chain.bin, "CHECK", conf, chain.node, theirs_ct, "theirs", ref_result))
    ok(bandwidth(ref_bandwidth, "CHECK", conf, chain.node, ours_ct, "ours", our_result))
    # Each DELs the other's work.
    ok(bandwidth(ref_bandwidth, "DEL", conf, chain.node, ours_ct, "ours", our_result))
    ok(bandwidth(chain.bin, "DEL", conf, chain.node, theirs_ct, "theirs", ref_result))
    assert ifbs(chain.node) == {}
    assert unshaped(chain.node, theirs_host)


@pytest.mark.parametrize("ingress, egress", [
    ((8, 8), (8000, 800000)),                         # a byte per second; a 100 s bucket
    ((1000000, 12000), (100000000, 1000000)),
    ((40000000000, 4000000), (34359738368, 8000000)),  # 5 GB/s and 2^32 bytes/s: TCA_TBF_RATE64
], ids=["tiny", "common", "rate64"])
def test_rates_and_buffers_match_the_reference(chain, ref_bandwidth, ingress, egress):
    """For rates from a byte per second to beyond 32 bits of bytes per second, our qdiscs read back
    the same as the reference's (tc -j), and each side's CHECK (which compares rate, limit and
    buffer in the kernel's units) accepts the other's."""
    theirs_ct, theirs_prev = chain.attach("theirs")
    ours_ct, ours_prev = chain.attach("ours")
    conf = bw_conf(ingress=ingress, egress=egress)
    ref_result = ok(bandwidth(ref_bandwidth, "ADD", conf, chain.node, theirs_ct, "theirs", theirs_prev))
    our_result = ok(bandwidth(chain.bin, "ADD", conf, chain.node, ours_ct, "ours", ours_prev))
    theirs = layout(chain.node, host_veth_of(chain.node, theirs_ct))
    ours = layout(chain.node, host_veth_of(chain.node, ours_ct))
    assert ours["root"] == theirs["root"]
    assert list(ours["targets"].values()) == list(theirs["targets"].values())
    ok(bandwidth(chain.bin, "CHECK", conf, chain.node, theirs_ct, "theirs", ref_result))
    ok(bandwidth(ref_bandwidth, "CHECK", conf, chain.node, ours_ct, "ours", our_result))


def test_buckets_beyond_the_kernel_are_clamped_not_refused(chain, ref_bandwidth):
    """containerd asks for a burst of 2^32-1 bits whatever the rate (429 s at 10 Mbit/s, more than
    the kernel's 32-bit bucket of ticks holds), and Kubernetes allows rates up to 1 Pbit/s (a
    25 ms queue over 4 GB): the reference accepts both, so do we, with the bucket and the queue
    clamped to the largest the kernel holds; CHECK accepts the result."""
    containerd_burst = (1 << 32) - 1
    for cid, ingress, egress in (("clampa", (10000000, containerd_burst), (1000, containerd_burst)),
                                 ("clampb", (10 ** 15, containerd_burst), (10 ** 15, containerd_burst))):
        container, prev = chain.attach(cid)
        conf = bw_conf(ingress=ingress, egress=egress)
        ok(bandwidth(ref_bandwidth, "ADD", conf, chain.node, container, cid, prev))
        ok(bandwidth(ref_bandwidth, "DEL", conf, chain.node, container, cid, prev))
        res = bandwidth(chain.bin, "ADD", conf, chain.node, container, cid, prev)
        result = ok(res)
        assert "holds" in res.stderr, explain(res)
        ok(bandwidth(chain.bin, "CHECK", conf, chain.node, container, cid, result))
        shaped = layout(chain.node, host_veth_of(chain.node, container))
        assert shaped["root"][:3] == ("tbf", "1:", ingress[0] // 8)
        assert [t[:3] for t in shaped["targets"].values()] == [("tbf", "1:", egress[0] // 8)]


BAD_VALUES = [
    ("rate without burst", {"ingressRate": 1000000}),
    ("burst without rate", {"egressBurst": 100000}),
    ("negative rate", {"ingressRate": -8, "ingressBurst": 80000}),
    ("string rate", {"egressRate": "1M", "egressBurst": 80000}),
    ("fractional rate", {"ingressRate": 1000000.5, "ingressBurst": 80000}),
    ("boolean burst", {"egressRate": 1000000, "egressBurst": True}),
    ("rate under a byte", {"ingressRate": 7, "ingressBurst": 80000}),
    ("burst under a byte", {"egressRate": 1000000, "egressBurst": 7}),
    ("burst of 4GB", {"ingressRate": 1000000, "ingressBurst": 8 * (1 << 32)}),
    ("rate beyond uint64", {"ingressRate": 1 << 64, "ingressBurst": 80000}),
    ("burst shorter than a clock tick", {"egressRate": 10 ** 15, "egressBurst": 80000}),
    ("runtimeConfig without burst", {"runtimeConfig": {"bandwidth": {"ingressRate": 1000000}}}),
    ("runtimeConfig not an object", {"runtimeConfig": {"bandwidth": [1, 2]}}),
]


def test_bad_values_are_refused_before_anything_is_made(chain):
    """Every bad rate or burst is a config error (code 7) naming the key, at ADD, CHECK and DEL's
    siblings alike, and the node holds no IFB and no qdisc of ours afterwards; so is an ADD with
    rates but no prevResult."""
    container, prev = chain.attach("bad")
    host = host_veth_of(chain.node, container)
    for what, keys in BAD_VALUES:
        conf = dict(bw_conf(ingress=None, egress=None), **keys)
        for command in ("ADD", "CHECK"):
            err = error(bandwidth(chain.bin, command, conf, chain.node, container, "bad", prev), 7)
            assert "Rate" in err["msg"] or "Burst" in err["msg"] or "bandwidth" in err["msg"], (what, err)
        assert unshaped(chain.node, host) and ifbs(chain.node) == {}, what
    error(bandwidth(chain.bin, "ADD", bw_conf(), chain.node, container, "bad"), 7)
    assert unshaped(chain.node, host) and ifbs(chain.node) == {}


def test_runtime_config_replaces_the_config_keys(chain):
    """runtimeConfig.bandwidth (the pod annotations) wins over the config's own keys."""
    container, prev = chain.attach("rt")
    host = host_veth_of(chain.node, container)
    runtime = {"ingressRate": 24000000, "ingressBurst": 96000}
    conf = bw_conf(runtimeConfig={"bandwidth": runtime})
    result = ok(bandwidth(chain.bin, "ADD", conf, chain.node, container, "rt", prev))
    assert layout(chain.node, host) == expected_layout(None, ingress=(24000000, 96000), egress=None)
    assert ifbs(chain.node) == {} and result == prev
    ok(bandwidth(chain.bin, "CHECK", conf, chain.node, container, "rt", result))
    err = error(bandwidth(chain.bin, "CHECK", bw_conf(), chain.node, container, "rt", result), 999)
    assert "rate" in err["msg"], err


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_no_rates_passes_the_prev_result_through(chain, version):
    """Without rates nothing is shaped and the prevResult comes back in the request's version."""
    container, prev = chain.attach("pass", version)
    host = host_veth_of(chain.node, container)
    conf = bw_conf(version, ingress=None, egress=None, ingressRate=0, ingressBurst=0)
    assert ok(bandwidth(chain.bin, "ADD", conf, chain.node, container, "pass", prev)) == prev
    assert unshaped(chain.node, host) and ifbs(chain.node) == {}
    if version != "0.3.1":
        ok(bandwidth(chain.bin, "CHECK", conf, chain.node, container, "pass", prev))


def test_del_without_namespace_or_prev_result_twice(chain):
    """DEL with the namespace present but no prevResult removes qdiscs and IFB; with no CNI_NETNS
    the prevResult leads to the host veth; with the namespace gone and no prevResult the IFB goes;
    every DEL repeated succeeds and changes nothing."""
    conf = bw_conf()
    # namespace present, no prevResult
    container, prev = chain.attach("d1")
    host = host_veth_of(chain.node, container)
    ok(bandwidth(chain.bin, "ADD", conf, chain.node, container, "d1", prev))
    for _ in range(2):
        ok(bandwidth(chain.bin, "DEL", conf, chain.node, container, "d1"))
        assert unshaped(chain.node, host) and ifbs(chain.node) == {}
    # no CNI_NETNS: the prevResult names the host veth
    container, prev = chain.attach("d2")
    host = host_veth_of(chain.node, container)
    ok(bandwidth(chain.bin, "ADD", conf, chain.node, container, "d2", prev))
    for _ in range(2):
        ok(bandwidth(chain.bin, "DEL", conf, chain.node, None, "d2", prev))
        assert unshaped(chain.node, host) and ifbs(chain.node) == {}
    # no CNI_NETNS, no prevResult: the bridge port's alias names the attachment
    container, prev = chain.attach("d3")
    host = host_veth_of(chain.node, container)
    ok(bandwidth(chain.bin, "ADD", conf, chain.node, container, "d3", prev))
    ok(bandwidth(chain.bin, "DEL", conf, chain.node, None, "d3"))
    assert unshaped(chain.node, host) and ifbs(chain.node) == {}
    # the namespace gone, no prevResult
    container, prev = chain.attach("d4")
    ok(bandwidth(chain.bin, "ADD", conf, chain.node, container, "d4", prev))
    path = container.path
    run([IP, "netns", "del", container.name])
    for _ in range(2):
        ok(bandwidth(chain.bin, "DEL", conf, chain.node, path, "d4"))
        assert ifbs(chain.node) == {}
    # a config that no longer validates still lets DEL clean up
    container, prev = chain.attach("d5")
    ok(bandwidth(chain.bin, "ADD", conf, chain.node, container, "d5", prev))
    ok(bandwidth(chain.bin, "DEL", dict(conf, ingressBurst=0), chain.node, container, "d5", prev))
    assert ifbs(chain.node) == {}


def test_check_finds_drift_and_a_repeated_add_repairs_it(chain):
    """CHECK fails (999) when a rate was changed, the redirect filter removed or the IFB deleted;
    a repeated ADD restores the layout without duplicating anything, and CHECK passes again."""
    container, prev = chain.attach("chk")
    host = host_veth_of(chain.node, container)
    conf = bw_conf()
    result = ok(bandwidth(chain.bin, "ADD", conf, chain.node, container, "chk", prev))
    ok(bandwidth(chain.bin, "CHECK", conf, chain.node, container, "chk", result))
    name = ifb_name("chk")
    breakages = [
        (["tc", "qdisc", "change", "dev", host, "root", "handle", "1:", "tbf", "rate", "9mbit",
          "burst", "16000", "latency", "25ms"], "rate"),
        (["tc", "filter", "del", "dev", host, "ingress"], "redirect"),
        (["tc", "qdisc", "del", "dev", name, "root"], "tbf"),
        ([IP, "link", "del", name], "IFB"),
    ]
    for argv, word in breakages:
        chain.node.run(*argv)
        err = error(bandwidth(chain.bin, "CHECK", conf, chain.node, container, "chk", result), 999)
        assert word in err["msg"], (argv, err)
        result = ok(bandwidth(chain.bin, "ADD", conf, chain.node, container, "chk", prev))
        assert layout(chain.node, host) == expected_layout(name)
        ok(bandwidth(chain.bin, "CHECK", conf, chain.node, container, "chk", result))
    err = error(bandwidth(chain.bin, "CHECK", conf, chain.node, container, "chk"), 7)
    assert "chained" in err["msg"]


def test_gc_removes_ifb_devices_of_attachments_not_valid(chain):
    """GC (1.1.0) with one valid attachment removes the other containers' IFB devices of this
    network, keeps the valid one (CHECK still passes) and an IFB of another network."""
    conf = bw_conf("1.1.0")
    attached = {}
    for cid in ("gc0", "gc1", "gc2"):
        container, prev = chain.attach(cid, "1.1.0")
        attached[cid] = (container, ok(bandwidth(chain.bin, "ADD", conf, chain.node, container, cid, prev)))
    other = dict(conf, name="cbtother")
    container, prev = chain.attach("gcx", "1.1.0")
    ok(bandwidth(chain.bin, "ADD", dict(other, prevResult=prev), chain.node, container, "gcx"))
    assert len(ifbs(chain.node)) == 4
    gc = dict(conf, **{"cni.dev/valid-attachments": [{"containerID": "gc0", "ifname": "eth0"}]})
    ok(run_cni(chain.bin, "bandwidth", "GC", gc, node=chain.node, container_id=None, ifname=None))
    assert sorted(ifbs(chain.node)) == sorted([ifb_name("gc0"), ifb_name("gcx", "cbtother")])
    container, result = attached["gc0"]
    ok(bandwidth(chain.bin, "CHECK", conf, chain.node, container, "gc0", result))
    ok(run_cni(chain.bin, "bandwidth", "STATUS", conf, node=chain.node, container_id=None, ifname=None))


def test_gc_tells_long_identities_apart(chain):
    """A container ID too long for a readable alias (its IFB's alias is a digest): GC keeps its
    IFB while it is valid and removes it once it is not."""
    conf = bw_conf("1.1.0")
    long_id = "L" * 300
    container, prev = chain.attach(long_id, "1.1.0")
    ok(bandwidth(chain.bin, "ADD", conf, chain.node, container, long_id, prev))
    assert sorted(ifbs(chain.node)) == [ifb_name(long_id)]
    valid = dict(conf, **{"cni.dev/valid-attachments": [{"containerID": long_id, "ifname": "eth0"}]})
    ok(run_cni(chain.bin, "bandwidth", "GC", valid, node=chain.node, container_id=None, ifname=None))
    assert sorted(ifbs(chain.node)) == [ifb_name(long_id)]
    none = dict(conf, **{"cni.dev/valid-attachments": []})
    ok(run_cni(chain.bin, "bandwidth", "GC", none, node=chain.node, container_id=None, ifname=None))
    assert ifbs(chain.node) == {}


def test_concurrent_adds_and_dels(chain):
    """Eight bandwidth ADDs at once on eight containers each shape their own veth through their
    own IFB; eight DELs at once leave nothing."""
    cids = ["cc%d" % i for i in range(8)]
    attached = dict((cid, chain.attach(cid)) for cid in cids)
    conf = bw_conf()

    def call(command, cid):
        container, prev = attached[cid]
        return bandwidth(chain.bin, command, conf, chain.node, container, cid, prev)

    with ThreadPoolExecutor(len(cids)) as pool:
        for res in pool.map(lambda cid: call("ADD", cid), cids):
            ok(res)
    assert sorted(ifbs(chain.node)) == sorted(ifb_name(cid) for cid in cids)
    for cid in cids:
        assert layout(chain.node, host_veth_of(chain.node, attached[cid][0])) == expected_layout(ifb_name(cid))
    with ThreadPoolExecutor(len(cids)) as pool:
        for res in pool.map(lambda cid: call("DEL", cid), cids):
            ok(res)
    assert ifbs(chain.node) == {}
    assert all(unshaped(chain.node, host_veth_of(chain.node, attached[cid][0])) for cid in cids)


def kill_points(chain, container, cid, conf, prev, command, fractions):
    """Run `command` (on a shaped attachment for DEL) killed with SIGKILL at `fractions` of its
    shortest duration; yields each fraction and whether the kill landed before the call ended."""
    argv = [IP, "netns", "exec", chain.node.name, str(chain.bin / "bandwidth")]
    stdin = encode_conf(dict(conf, prevResult=prev))
    env = cni_env(command, chain.bin, netns=container, container_id=cid)
    durations = []
    for _ in range(3):
        if command == "DEL":
            ok(bandwidth(chain.bin, "ADD", conf, chain.node, container, cid, prev))
        started = time.monotonic()
        ok(parse_output(subprocess.run(argv, input=stdin, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       timeout=60)))
        durations.append(time.monotonic() - started)
        if command == "ADD":
            ok(bandwidth(chain.bin, "DEL", conf, chain.node, container, cid, prev))
    duration = min(durations)     # a load spike during calibration must not push the kills past the end
    for fraction in fractions:
        if command == "DEL":
            ok(bandwidth(chain.bin, "ADD", conf, chain.node, container, cid, prev))
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        proc.stdin.write(stdin)
        proc.stdin.close()
        time.sleep(duration * fraction)
        proc.send_signal(signal.SIGKILL)
        yield fraction, proc.wait(timeout=60) == -signal.SIGKILL


KILL_FRACTIONS = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["ADD", "DEL"])
def test_killed_at_a_few_instants_then_del_leaves_nothing(chain, command):
    """ADDs (DELs) killed with SIGKILL at fractions of one call's duration: a DEL then leaves no
    IFB and no qdisc; a final ADD completes with a layout CHECK accepts."""
    container, prev = chain.attach("kill")
    host = host_veth_of(chain.node, container)
    conf = bw_conf()
    killed = 0
    for fraction, was_killed in kill_points(chain, container, "kill", conf, prev, command, KILL_FRACTIONS):
        killed += was_killed
        ok(bandwidth(chain.bin, "DEL", conf, chain.node, container, "kill", prev))
        assert unshaped(chain.node, host) and ifbs(chain.node) == {}, "after a kill at %.1f" % fraction
    assert killed >= 3, "too few kills landed before the %s ended (a busy machine?)" % command
    result = ok(bandwidth(chain.bin, "ADD", conf, chain.node, container, "kill", prev))
    ok(bandwidth(chain.bin, "CHECK", conf, chain.node, container, "kill", result))
    assert layout(chain.node, host) == expected_layout(ifb_name("kill"))


def test_runs_no_program(chain, tmp_path):
    """Under `strace -f -e trace=execve`, ADD, CHECK and DEL execute only the plugin and the
    interpreter of its preamble, in one process: no `tc`, no `ip`."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (apt-get install strace)")
    container, prev = chain.attach("trace")
    archive = (chain.bin / "bandwidth").resolve()
    head = archive.read_bytes()[:8192].splitlines()     # the preamble's "exec /usr/bin/python3 -E -s -S ..."
    interpreter = [line.split()[1] for line in head if line.startswith(b"exec ") and b"python" in line][0].decode()
    conf = bw_conf()
    result = prev
    for command in ("ADD", "CHECK", "DEL"):
        trace = tmp_path / ("%s.trace" % command)
        proc = subprocess.run([IP, "netns", "exec", chain.node.name, strace, "-f", "-qq", "-e",
                               "trace=execve,execveat", "-o", str(trace), str(chain.bin / "bandwidth")],
                              input=encode_conf(dict(conf, prevResult=result)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=60,
                              env=cni_env(command, chain.bin, netns=container, container_id="trace"))
        result = ok(parse_output(proc)) or result
        calls = [line for line in trace.read_text().splitlines() if "execve" in line]
        programs = [line.split('("', 1)[1].split('"', 1)[0] for line in calls]
        assert programs == [str(chain.bin / "bandwidth"), interpreter], "%s executed %s" % (command, calls)
    assert ifbs(chain.node) == {}


HOSTILE_EXAMPLES = int(os.environ.get("CNI_BRIDGE_HOSTILE_EXAMPLES", "60")) // 2


@pytest.mark.slow
def test_hostile_rates_never_harm_the_node(chain):
    """Generated values (hypothesis) for the four keys, in the config or in runtimeConfig, in any
    letter case: ADD answers a result whose layout CHECK accepts, or one CNI error (6 or 7) with
    nothing made; DEL then always leaves nothing.  Examples: CNI_BRIDGE_HOSTILE_EXAMPLES / 2."""
    pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install hypothesis)")
    from hypothesis import HealthCheck, given, settings, strategies as st

    container, prev = chain.attach("hostile")
    host = host_veth_of(chain.node, container)
    keys = ["ingressRate", "ingressBurst", "egressRate", "egressBurst", "INGRESSRATE", "egressburst"]
    numbers = st.one_of(st.integers(-2, 2 ** 70), st.sampled_from([0, 7, 8, 2 ** 32, 2 ** 35, 2 ** 64, 8 * 2 ** 32]),
                        st.floats(allow_nan=False, allow_infinity=False))
    values = st.one_of(numbers, st.none(), st.booleans(), st.text(max_size=6), st.lists(st.integers(), max_size=2))

    @settings(max_examples=max(HOSTILE_EXAMPLES, 5), deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(st.dictionaries(st.sampled_from(keys), values, max_size=4), st.booleans())
    def run_one(entry, in_runtime):
        conf = bw_conf(ingress=None, egress=None)
        conf.update({"runtimeConfig": {"bandwidth": entry}} if in_runtime else entry)
        res = bandwidth(chain.bin, "ADD", conf, chain.node, container, "hostile", prev)
        assert "Traceback" not in res.stdout + res.stderr, explain(res)
        if res.returncode == 0:
            assert isinstance(res.json, dict) and res.json.get("interfaces"), explain(res)
            ok(bandwidth(chain.bin, "CHECK", conf, chain.node, container, "hostile", res.json))
        else:
            assert isinstance(res.json, dict) and res.json.get("code") in (6, 7), explain(res)
            assert unshaped(chain.node, host) and ifbs(chain.node) == {}, explain(res)
        ok(bandwidth(chain.bin, "DEL", conf, chain.node, container, "hostile", res.json if res.returncode == 0 else prev))
        assert unshaped(chain.node, host) and ifbs(chain.node) == {}

    run_one()


def test_version_and_bad_namespaces(chain):
    """VERSION through the `bandwidth` name lists every version; a CNI_NETNS that does not exist, or
    that is the node's own namespace, is code 8 with nothing made."""
    res = run_cni(chain.bin, "bandwidth", "VERSION", {"cniVersion": "1.1.0"}, container_id=None, ifname=None)
    assert ok(res) == {"cniVersion": "1.1.0", "supportedVersions": VERSIONS}
    container, prev = chain.attach("ns")
    host = host_veth_of(chain.node, container)
    for netns in ("/run/netns/cbt-does-not-exist", chain.node.path):
        error(bandwidth(chain.bin, "ADD", bw_conf(), chain.node, netns, "ns", prev), 8)
        assert unshaped(chain.node, host) and ifbs(chain.node) == {}


def test_chain_with_the_bandwidth_capability_through_the_network_commands(chain, tmp_path):
    """A conflist of bridge and bandwidth (`capabilities: {bandwidth: true}`), run by our
    cnitool-like `add`/`check`/`del` with CAP_ARGS as a runtime passes the pod's annotations:
    the rates reach the plugin as runtimeConfig.bandwidth, CHECK passes, del removes it all."""
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    plugins = [dict(bridge_conf(chain.data_dir), type="bridge"),
               {"type": "bandwidth", "capabilities": {"bandwidth": True}}]
    for plugin in plugins:
        plugin.pop("cniVersion", None)
        plugin.pop("name", None)
    (conf_dir / "10-bw.conflist").write_text(json.dumps({"cniVersion": "1.1.0", "name": NETWORK,
                                                         "plugins": plugins}))
    caps = {"bandwidth": {"ingressRate": INGRESS[0], "ingressBurst": INGRESS[1],
                          "egressRate": EGRESS[0], "egressBurst": EGRESS[1]}}
    env = {"NETCONFPATH": str(conf_dir), "CNI_PATH": str(chain.bin), "CNI_CACHE_DIR": str(tmp_path / "cache"),
           "CAP_ARGS": json.dumps(caps)}
    container = chain.make_netns("ct")
    tool = [str(chain.bin / "cni-bridge.pyz")]
    envs = ["%s=%s" % kv for kv in env.items()]
    result = json.loads(chain.node.run("env", *envs, *tool, "add", NETWORK, container.path, timeout=60).stdout)
    devices = [i["name"] for i in result["interfaces"] if i["name"].startswith("bwp")]
    assert devices == sorted(ifbs(chain.node)), result
    assert layout(chain.node, host_veth_of(chain.node, container)) == expected_layout(devices[0])
    chain.node.run("env", *envs, *tool, "check", NETWORK, container.path, timeout=60)
    chain.node.run("env", *envs, *tool, "del", NETWORK, container.path, timeout=60)
    assert ifbs(chain.node) == {} and "eth0" not in container.links()


def test_a_container_interface_without_a_peer_on_the_node_is_refused(chain):
    """A container interface whose veth peer is in the container itself (not on the node), or that
    is not in prevResult's node-side interfaces, is refused (code 7) with nothing made."""
    container, prev = chain.attach("peer")
    host = host_veth_of(chain.node, container)
    container.run(IP, "link", "add", "inner0", "type", "veth", "peer", "name", "inner1")
    err = error(bandwidth(chain.bin, "ADD", bw_conf(), chain.node, container, "peer", prev, ifname="inner0"), 7)
    assert "no veth peer" in err["msg"], err
    elsewhere = dict(prev, interfaces=[i for i in prev["interfaces"] if i["name"] != host])
    err = error(bandwidth(chain.bin, "ADD", bw_conf(), chain.node, container, "peer", elsewhere), 7)
    assert "not in prevResult" in err["msg"], err
    assert unshaped(chain.node, host) and ifbs(chain.node) == {}
