"""The operator's command line: `verify`, the cnitool-like `add/check/del`, and `leases`.

Each test runs the installed zipapp inside a node namespace it made (or lets `verify` make its
own throwaway namespaces, named under a prefix this session records so the suite's sweep covers
them) and reads the kernel and the files back.  The result cache is a temporary CNI_CACHE_DIR:
the node's /var/lib/cni/results is never written.
"""
import json
import os
import time

import pytest

from tests.helpers import REF_DIR, REPO, run, verify_namespaces

pytestmark = pytest.mark.kernel

def zipapp(ours_bin):
    return str(ours_bin / "cni-bridge.pyz")


def test_verify_runs_the_walkthrough_and_leaves_nothing(ours_bin, verify_env):
    """`verify` from the checkout uses conf/10-mynet.conf, passes every step and removes its
    namespaces and state."""
    prefix = verify_env["CNI_BRIDGE_VERIFY_PREFIX"]
    proc = run([zipapp(ours_bin), "verify", "--json"], cwd=str(REPO), check=False, timeout=120,
               env=verify_env)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["config"] == "conf/10-mynet.conf", report
    assert report["ok"] and [s["step"] for s in report["steps"]] == [
        "create namespaces", "ADD", "container interface read back from the kernel",
        "ping the gateway from the container", "CHECK",
        "map host port 8080, connect to it from outside the node", "DEL", "nothing left behind",
        "remove namespaces"]
    assert "answered" in report["steps"][3]["detail"]
    # conf/10-mynet.conf routes the container by default: the source it sees is the outside's.
    assert report["steps"][5]["detail"].endswith("in the container, from 192.0.2.2"), report["steps"][5]
    assert verify_namespaces(prefix) == set()
    assert not [d for d in os.listdir("/run") if d.startswith("cni-bridge-verify-")]


def test_verify_uses_its_builtin_config_away_from_a_checkout(ours_bin, tmp_path, verify_env):
    """Run from a directory without conf/, verify falls back to its built-in copy of the config."""
    proc = run([zipapp(ours_bin), "verify"], cwd=str(tmp_path), check=False, timeout=120, env=verify_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "built-in conf/10-mynet.conf" in proc.stdout
    assert "\u2713 ping the gateway from the container" in proc.stdout


@pytest.mark.unit
def test_builtin_config_is_the_checkouts_conf_10_mynet():
    """verify's built-in config (used away from a checkout) is conf/10-mynet.conf, key for key."""
    import cni_bridge as cb
    with open(str(REPO / "conf" / "10-mynet.conf")) as f:
        assert json.loads(cb.BUILTIN_CONFIG) == json.load(f)


def test_verify_keep_leaves_the_attachment_for_inspection(ours_bin, tmp_path, verify_env):
    """--keep stops before DEL and leaves both namespaces, with the container address in place."""
    prefix = verify_env["CNI_BRIDGE_VERIFY_PREFIX"]
    proc = run([zipapp(ours_bin), "verify", "--keep", "--json"], cwd=str(tmp_path), check=False, timeout=120,
               env=verify_env)
    kept = sorted(verify_namespaces(prefix))
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert len(kept) == 3       # node, container, and the outside namespace
        ctr = [n for n in kept if n.startswith(prefix + "ctr-")][0]
        addrs = json.loads(run(["ip", "-n", ctr, "-j", "addr", "show", "dev", "eth0"]).stdout)
        assert any(a["local"].startswith("172.19.0.") for a in addrs[0]["addr_info"])
    finally:
        for name in kept:
            run(["ip", "netns", "del", name], check=False)
        for d in os.listdir("/run"):
            if d.startswith("cni-bridge-verify-"):
                run(["rm", "-r", "/run/" + d])


def test_verify_fails_clearly_on_a_broken_config(ours_bin, tmp_path, verify_env):
    """A config the plugin refuses fails the ADD step, exit 1, and still removes the namespaces."""
    bad = tmp_path / "bad.conf"
    bad.write_text(json.dumps({"cniVersion": "1.0.0", "name": "bad", "type": "bridge", "vlan": 5000}))
    proc = run([zipapp(ours_bin), "verify", str(bad)], check=False, timeout=120, env=verify_env)
    assert proc.returncode == 1
    assert "\u2717 ADD" in proc.stdout and "invalid VLAN ID 5000" in proc.stdout
    assert verify_namespaces(verify_env["CNI_BRIDGE_VERIFY_PREFIX"]) == set()


@pytest.fixture
def portmap_network(tmp_path, ours_bin, data_dir):
    """A conflist of our bridge with the reference portmap, in a private NETCONFPATH."""
    if not (REF_DIR / "portmap").exists():
        pytest.skip("reference portmap not installed: apt-get install containernetworking-plugins")
    plugin_dir = tmp_path / "bin"
    plugin_dir.mkdir()
    for name in ("bridge", "host-local", "loopback", "cni-bridge.pyz"):
        (plugin_dir / name).symlink_to(ours_bin / name)
    (plugin_dir / "portmap").symlink_to(REF_DIR / "portmap")
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    name = "clinet%d" % os.getpid()
    (conf_dir / "10-cli.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": name,
        "plugins": [{"type": "bridge", "bridge": "cbt-cli0", "isGateway": True, "ipMasq": True,
                     "ipam": {"type": "host-local", "subnet": "10.123.0.0/24", "dataDir": str(data_dir),
                              "routes": [{"dst": "0.0.0.0/0"}]}},
                    {"type": "portmap", "capabilities": {"portMappings": True}}]}))
    return name, {"NETCONFPATH": str(conf_dir), "CNI_PATH": str(plugin_dir),
                  "CNI_CACHE_DIR": str(tmp_path / "cache")}


def cli(node, env, *args, check=True):
    return node.run("env", *["%s=%s" % kv for kv in env.items()], *args, check=check, timeout=60)


def results_dir(env):
    return os.path.join(env["CNI_CACHE_DIR"], "results")


def cache_entries(env, network):
    if not os.path.isdir(results_dir(env)):
        return []
    return [n for n in os.listdir(results_dir(env)) if n.startswith(network + "-")]


def test_cnitool_commands_drive_bridge_and_portmap(ours_bin, node, container, make_netns, portmap_network):
    """add/del run the chain as libcni does: the container gets its address, portmap's
    DNAT makes a container port reachable from another namespace, the result is cached in
    libcni's format, and del undoes it all."""
    network, env = portmap_network
    env = dict(env, CAP_ARGS=json.dumps({"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]}))
    pyz = str(ours_bin / "cni-bridge.pyz")
    result = json.loads(cli(node, env, pyz, "add", network, container.path).stdout)
    try:
        address = result["ips"][0]["address"].split("/")[0]
        assert ("inet", result["ips"][0]["address"]) in container.addrs("eth0")
        [entry] = cache_entries(env, network)
        cached = json.load(open(os.path.join(results_dir(env), entry)))
        assert cached["kind"] == "cniCacheV1" and cached["networkName"] == network
        assert cached["result"]["ips"] == result["ips"]
        assert any("DNAT" in line and "18080" in line for line in
                   node.run("iptables-save", "-t", "nat").stdout.splitlines())
        # A client in a third namespace reaches the container's port 80 through the node's 18080.
        client = make_netns("cli")
        run(["ip", "link", "add", "cbt-clia", "netns", node.name, "type", "veth", "peer", "name", "eth0",
             "netns", client.name])
        node.run("ip", "addr", "add", "192.0.2.1/24", "dev", "cbt-clia")
        node.run("ip", "link", "set", "cbt-clia", "up")
        client.run("ip", "addr", "add", "192.0.2.2/24", "dev", "eth0")
        client.run("ip", "link", "set", "eth0", "up")
        server = "import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);" \
                 "s.bind(('0.0.0.0',80));s.listen(1);s.settimeout(20);c,_=s.accept();c.sendall(b'hello');c.close()"
        import subprocess
        srv = subprocess.Popen(["ip", "netns", "exec", container.name, "python3", "-c", server])
        try:
            reply = ""
            for _ in range(50):
                proc = client.run("python3", "-c", "import socket;s=socket.create_connection(('192.0.2.1',18080),2);"
                                  "print(s.recv(10).decode())", check=False)
                reply = proc.stdout.strip()
                if reply:
                    break
                time.sleep(0.1)
            assert reply == "hello"
        finally:
            srv.kill()
            srv.wait()
    finally:
        cli(node, env, pyz, "del", network, container.path)
    assert "eth0" not in container.links()
    assert cache_entries(env, network) == []
    assert not [l for l in node.run("iptables-save", "-t", "nat").stdout.splitlines() if "18080" in l]


def test_leases_flags_and_collects_reservations_of_vanished_containers(ours_bin, node, make_netns, portmap_network, data_dir):
    """leases lists each reservation; once a container's namespace is deleted without DEL it is
    flagged, and --gc releases it while the live one stays."""
    network, env = portmap_network
    pyz = str(ours_bin / "cni-bridge.pyz")
    live, gone = make_netns("live"), make_netns("gone")
    for ns in (live, gone):
        cli(node, env, pyz, "add", network, ns.path)
    try:
        run(["ip", "netns", "del", gone.name])
        listing = run([pyz, "leases", "--data-dir", str(data_dir)], env=dict(os.environ, **env)).stdout
        rows = [line.split() for line in listing.splitlines()[1:]]
        assert sorted(r[-1] for r in rows) == ["gone", "ok"]
        run([pyz, "leases", "--data-dir", str(data_dir), "--gc"], env=dict(os.environ, **env))
        left = [n for n in os.listdir(str(data_dir / network)) if n[0].isdigit()]
        assert len(left) == 1
        assert "10.123.0." in left[0]
    finally:
        for ns in (live, gone):
            cli(node, env, pyz, "del", network, ns.path, check=False)
    assert cache_entries(env, network) == []
    assert [n for n in os.listdir(str(data_dir / network)) if n[0].isdigit()] == []
