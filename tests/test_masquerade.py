"""ipMasq and macspoofchk over nf_tables netlink, read back with `nft -j list ruleset` and proved
with traffic between namespaces the test makes: a node, containers on its bridge, and a "remote"
namespace on a separate link of the node."""
import hashlib
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import REF_DIR, REPO, run, run_cni

NET = "masqnet"
SUBNET, GATEWAY = "10.88.0.0/24", "10.88.0.1"
REMOTE_NODE_IP, REMOTE_IP = "198.51.100.1", "198.51.100.2"

# The upstream nftables backend's names (containernetworking/plugins pkg/ip/ipmasq_nftables_linux.go).
MASQ_TABLE = "cni_plugins_masquerade"
MASQ_CHAIN = "masq_checks"
POSTROUTING = "postrouting"


def h16(text):
    return hashlib.sha512(text.encode()).hexdigest()[:16]


def masq_comment(cid, ifname="eth0", network=NET):
    return "%s-%s, net: %s, if: %s, id: %s" % (h16(network), h16(ifname + ":" + cid), network, ifname, cid)


def conf(data_dir, version="1.0.0", **options):
    base = {"cniVersion": version, "name": NET, "type": "bridge", "bridge": "cbt-mq0", "isGateway": True,
            "ipMasq": True, "ipam": {"type": "host-local", "subnet": SUBNET, "dataDir": str(data_dir),
                                     "routes": [{"dst": "0.0.0.0/0"}]}}
    base.update(options)
    return base


def call(ours_bin, command, config, node, netns, cid, **kwargs):
    res = run_cni(ours_bin, "bridge", command, config, node=node, netns=netns, container_id=cid, **kwargs)
    assert res.returncode == 0, "%s failed: %s %s" % (command, res.stdout, res.stderr)
    return res.json


def ruleset(node):
    return json.loads(node.run("nft", "-j", "list", "ruleset").stdout)["nftables"]


def rules_of(node, family, table, chain):
    return [e["rule"] for e in ruleset(node) if "rule" in e and e["rule"]["family"] == family
            and e["rule"]["table"] == table and e["rule"]["chain"] == chain]


def masq_rules(node):
    return rules_of(node, "inet", MASQ_TABLE, MASQ_CHAIN)


def address_of(result):
    return result["ips"][0]["address"].split("/")[0]


def test_ruleset_matches_the_reference_layout(ours_bin, node, container, data_dir):
    """Table, chains, base-chain rules and the per-address rule with the reference's comment."""
    result = call(ours_bin, "ADD", conf(data_dir), node, container, "c1")
    entries = ruleset(node)
    [table] = [e["table"] for e in entries if "table" in e and e["table"]["name"] == MASQ_TABLE]
    assert table["family"] == "inet"
    chains = {e["chain"]["name"]: e["chain"] for e in entries if "chain" in e and e["chain"]["table"] == MASQ_TABLE}
    assert set(chains) == {MASQ_CHAIN, POSTROUTING}
    base = chains[POSTROUTING]
    assert (base["type"], base["hook"], base["prio"], base["policy"]) == ("nat", "postrouting", 100, "accept")
    post = rules_of(node, "inet", MASQ_TABLE, POSTROUTING)
    assert len(post) == 3
    assert post[0]["expr"][0]["match"]["right"] == {"prefix": {"addr": "224.0.0.0", "len": 4}}
    assert post[1]["expr"][0]["match"]["right"] == {"prefix": {"addr": "ff00::", "len": 8}}
    assert post[2]["expr"] == [{"goto": {"target": MASQ_CHAIN}}]
    [rule] = masq_rules(node)
    assert rule["comment"] == masq_comment("c1")
    expr = rule["expr"]
    assert expr[0]["match"] == {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                                "right": address_of(result)}
    assert expr[1]["match"] == {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                                "right": {"prefix": {"addr": "10.88.0.0", "len": 24}}}
    assert expr[2] == {"masquerade": None}


def test_dual_stack_gets_a_rule_per_address(ours_bin, node, container, data_dir):
    config = conf(data_dir)
    config["ipam"] = {"type": "host-local", "dataDir": str(data_dir),
                      "ranges": [[{"subnet": SUBNET}], [{"subnet": "fd88::/64"}]]}
    call(ours_bin, "ADD", config, node, container, "c6")
    rules = masq_rules(node)
    assert sorted(r["expr"][0]["match"]["left"]["payload"]["protocol"] for r in rules) == ["ip", "ip6"]
    assert {r["comment"] for r in rules} == {masq_comment("c6")}


def connect_remote(node, make_netns):
    """A third namespace on its own link of the node: the "outside world" of the containers."""
    remote = make_netns("rem")
    run(["ip", "link", "add", "cbt-rem0", "netns", node.name, "type", "veth", "peer", "name", "eth0",
         "netns", remote.name])
    node.run("ip", "addr", "add", REMOTE_NODE_IP + "/24", "dev", "cbt-rem0")
    node.run("ip", "link", "set", "cbt-rem0", "up")
    remote.run("ip", "addr", "add", REMOTE_IP + "/24", "dev", "eth0")
    remote.run("ip", "link", "set", "eth0", "up")
    return remote


def source_seen_by(server_ns, client_ns, address):
    """The source address a UDP server in `server_ns` sees for a datagram sent from `client_ns`."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", server_ns.name, "python3", "-c",
         "import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(('0.0.0.0',4789));"
         "s.settimeout(10);d,a=s.recvfrom(100);print(a[0])"], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(50):
            client_ns.run("python3", "-c", "import socket;socket.socket(socket.AF_INET,socket.SOCK_DGRAM)"
                          ".sendto(b'x',('%s',4789))" % address)
            try:
                return server.communicate(timeout=0.2)[0].strip()
            except subprocess.TimeoutExpired:
                continue
        return None
    finally:
        server.kill()
        server.wait()


def test_masquerade_rewrites_the_source_leaving_the_subnet_only(ours_bin, node, make_netns, data_dir):
    """Traffic to the remote namespace arrives from the node's address; traffic between two
    containers on the bridge keeps its own source."""
    one, two = make_netns("ct"), make_netns("ct")
    remote = connect_remote(node, make_netns)
    call(ours_bin, "ADD", conf(data_dir), node, one, "c1")
    second = call(ours_bin, "ADD", conf(data_dir), node, two, "c2")
    first_address = [a for f, a in one.addrs("eth0") if f == "inet"][0].split("/")[0]
    assert source_seen_by(remote, one, REMOTE_IP) == REMOTE_NODE_IP
    assert source_seen_by(two, one, address_of(second)) == first_address


def test_readd_replaces_instead_of_duplicating(ours_bin, node, container, data_dir):
    config = conf(data_dir)
    call(ours_bin, "ADD", config, node, container, "c1")
    node_rules = masq_rules(node)
    container.run("ip", "link", "del", "eth0")          # a runtime retrying ADD after a failure
    call(ours_bin, "ADD", config, node, container, "c1")
    assert [r["comment"] for r in masq_rules(node)] == [r["comment"] for r in node_rules]
    assert len(rules_of(node, "inet", MASQ_TABLE, POSTROUTING)) == 3


@pytest.mark.parametrize("how", ["netns deleted", "CNI_NETNS unset"])
def test_del_without_the_namespace_removes_the_rule(ours_bin, node, make_netns, data_dir, how):
    container = make_netns("ct")
    config = conf(data_dir)
    call(ours_bin, "ADD", config, node, container, "c1")
    if how == "netns deleted":
        run(["ip", "netns", "del", container.name])
        call(ours_bin, "DEL", config, node, container, "c1")
    else:
        call(ours_bin, "DEL", config, node, None, "c1")
    assert masq_rules(node) == []
    assert len(rules_of(node, "inet", MASQ_TABLE, POSTROUTING)) == 3


def test_concurrent_adds_and_dels_leave_only_the_base_chains(ours_bin, node, make_netns, data_dir):
    namespaces = [make_netns("ct") for _ in range(32)]
    config = conf(data_dir)

    def each(command):
        with ThreadPoolExecutor(32) as pool:
            return list(pool.map(lambda i: run_cni(ours_bin, "bridge", command, config, node=node,
                                                   netns=namespaces[i], container_id="c%d" % i), range(32)))
    adds = each("ADD")
    assert all(r.returncode == 0 for r in adds), [r.stdout for r in adds if r.returncode]
    assert len({address_of(r.json) for r in adds}) == 32
    assert len(masq_rules(node)) == 32
    dels = each("DEL")
    assert all(r.returncode == 0 for r in dels)
    assert masq_rules(node) == []
    assert len(rules_of(node, "inet", MASQ_TABLE, POSTROUTING)) == 3


def test_check_fails_when_the_rule_is_gone(ours_bin, node, container, data_dir):
    config = conf(data_dir)
    result = call(ours_bin, "ADD", config, node, container, "c1")
    checked = dict(config, prevResult=result)
    call(ours_bin, "CHECK", checked, node, container, "c1")
    [rule] = masq_rules(node)
    node.run("nft", "delete", "rule", "inet", MASQ_TABLE, MASQ_CHAIN, "handle", str(rule["handle"]))
    res = run_cni(ours_bin, "bridge", "CHECK", checked, node=node, netns=container, container_id="c1")
    assert res.returncode != 0 and "masquerade" in res.json["msg"]


def test_gc_removes_rules_of_attachments_no_longer_valid(ours_bin, node, make_netns, data_dir):
    one, two = make_netns("ct"), make_netns("ct")
    config = conf(data_dir, version="1.1.0")
    call(ours_bin, "ADD", config, node, one, "keep")
    call(ours_bin, "ADD", config, node, two, "stale")
    gc = dict(config, **{"cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"}]})
    call(ours_bin, "GC", gc, node, None, None, ifname=None)
    assert [r["comment"] for r in masq_rules(node)] == [masq_comment("keep")]
    reserved = [p.read_bytes() for p in (data_dir / NET).iterdir() if p.name[0].isdigit()]
    assert reserved == [b"keep\r\neth0"]


def test_reference_iptables_state_is_removed_by_our_del(ours_bin, ref_bin, node, container, data_dir):
    """Debian's reference (1.1.1) masquerades with iptables; our DEL removes its chain and jump."""
    if shutil.which("iptables") is None:
        pytest.skip("iptables is not installed")
    config = conf(data_dir, version="0.4.0")
    res = run_cni(ref_bin, "bridge", "ADD", config, node=node, netns=container, container_id="refc")
    assert res.returncode == 0, res.stdout
    chain = "CNI-" + hashlib.sha512((NET + "refc").encode()).hexdigest()[:24]
    assert chain in node.run("iptables", "-t", "nat", "-S").stdout
    call(ours_bin, "DEL", config, node, container, "refc")
    assert chain not in node.run("iptables", "-t", "nat", "-S").stdout


HIDE_BINARIES = ("for p in /usr/sbin/nft /usr/sbin/iptables /usr/sbin/ip6tables /usr/sbin/iptables-nft "
                 "/usr/sbin/xtables-nft-multi /usr/sbin/iptables-legacy; do "
                 "[ -e $p ] && mount --bind /dev/null $p; done; ")


def run_without_binaries(ours_bin, command, config, node, container, cid):
    """Run the plugin in a private mount namespace where nft and iptables are /dev/null."""
    env = " ".join("%s=%s" % kv for kv in {
        "CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": container.path, "CNI_IFNAME": "eth0",
        "CNI_PATH": str(ours_bin)}.items())
    script = HIDE_BINARIES + "exec ip netns exec %s env %s %s/bridge" % (node.name, env, ours_bin)
    return run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
               input=json.dumps(config), check=False)


def test_masquerade_needs_no_nft_or_iptables_program(ours_bin, node, container, data_dir):
    config = conf(data_dir)
    proc = run_without_binaries(ours_bin, "ADD", config, node, container, "c1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [r["comment"] for r in masq_rules(node)] == [masq_comment("c1")]
    checked = dict(config, prevResult=json.loads(proc.stdout))
    assert run_without_binaries(ours_bin, "CHECK", checked, node, container, "c1").returncode == 0
    assert run_without_binaries(ours_bin, "DEL", checked, node, container, "c1").returncode == 0
    assert masq_rules(node) == []


def test_iptables_backend_on_request(ours_bin, node, container, data_dir):
    if shutil.which("iptables") is None:
        pytest.skip("iptables is not installed")
    config = conf(data_dir, ipMasqBackend="iptables")
    call(ours_bin, "ADD", config, node, container, "c1")
    chain = "CNI-" + hashlib.sha512((NET + "c1").encode()).hexdigest()[:24]
    rules = node.run("iptables", "-t", "nat", "-S").stdout
    assert "-A POSTROUTING -s 10.88.0." in rules and "-j " + chain in rules and "MASQUERADE" in rules
    assert masq_rules(node) == []
    call(ours_bin, "DEL", config, node, container, "c1")
    assert chain not in node.run("iptables", "-t", "nat", "-S").stdout


def test_iptables_backend_without_iptables_fails_clearly_and_rolls_back(ours_bin, node, container, data_dir):
    config = conf(data_dir, ipMasqBackend="iptables")
    proc = run_without_binaries(ours_bin, "ADD", config, node, container, "c1")
    error = json.loads(proc.stdout)
    assert proc.returncode == 1 and "iptables" in error["msg"]
    assert "eth0" not in container.links()
    assert not [n for n in node.links() if n.startswith("veth")]
    assert [p.name for p in (data_dir / NET).iterdir() if p.name[0].isdigit()] == []


def test_unknown_backend_is_a_config_error(ours_bin, node, container, data_dir):
    res = run_cni(ours_bin, "bridge", "ADD", conf(data_dir, ipMasqBackend="pf"), node=node, netns=container)
    assert res.returncode == 1 and res.json["code"] == 7


def test_macspoofchk_drops_frames_with_a_foreign_mac(ours_bin, node, make_netns, data_dir):
    one, two = make_netns("ct"), make_netns("ct")
    config = conf(data_dir, macspoofchk=True, ipMasq=False)
    first = call(ours_bin, "ADD", config, node, one, "c1")
    second = call(ours_bin, "ADD", config, node, two, "c2")
    host_veth, mac = first["interfaces"][1]["name"], first["interfaces"][2]["mac"]
    chain = "cni-br-iface-c1-eth0"
    [jump] = [r for r in rules_of(node, "bridge", "nat", "PREROUTING") if r["comment"] == "macspoofchk-c1-eth0"]
    assert jump["expr"] == [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": host_veth}},
                            {"jump": {"target": chain}}]
    mac_rules = rules_of(node, "bridge", "nat", chain + "-mac")
    assert mac_rules[0]["expr"][0]["match"]["right"] == mac
    assert mac_rules[1]["expr"] == [{"drop": None}]
    target = address_of(second)
    assert one.run("ping", "-c1", "-W1", target, check=False).returncode == 0
    one.run("ip", "neigh", "flush", "all")
    one.run("ip", "link", "set", "eth0", "address", "02:00:00:00:00:99")
    assert one.run("ping", "-c1", "-W1", target, check=False).returncode != 0
    one.run("ip", "link", "set", "eth0", "address", mac)
    assert one.run("ping", "-c2", "-W1", target, check=False).returncode == 0
    checked = dict(config, prevResult=first)
    call(ours_bin, "CHECK", checked, node, one, "c1")
    node.run("nft", "delete", "rule", "bridge", "nat", "PREROUTING", "handle", str(jump["handle"]))
    res = run_cni(ours_bin, "bridge", "CHECK", checked, node=node, netns=one, container_id="c1")
    assert res.returncode != 0 and "macspoofchk" in res.json["msg"]
    call(ours_bin, "DEL", checked, node, one, "c1")
    chains = [e["chain"]["name"] for e in ruleset(node) if "chain" in e and e["chain"]["family"] == "bridge"]
    assert chain not in chains and chain + "-mac" not in chains


def test_rule_encoding_round_trips_through_the_kernel(make_netns):
    """The expressions we encode are what the kernel stores: create a masquerade rule with the
    module, dump it back over netlink, and compare the decoded expression lists."""
    sys.path.insert(0, str(REPO))
    import cni_bridge as cb
    ns = cb.Netns(make_netns("enc").path)
    with ns.entered():
        nl = cb.NetlinkSocket(cb.NETLINK_NETFILTER)
    prefix = cb.Prefix.parse("10.88.0.5/24")
    exprs = (cb.match_family(4) + cb.match_address("saddr", cb.Prefix(4, prefix.ip, 32))
             + cb.match_address("daddr", prefix, negate=True) + [cb.expr_masquerade()])
    batch = cb.NftBatch()
    batch.add_table(cb.NFPROTO_INET, "enc")
    batch.add_chain(cb.NFPROTO_INET, "enc", "c")
    batch.add_rule(cb.NFPROTO_INET, "enc", "c", exprs, comment="round trip")
    batch.commit(nl, "test")
    [msg] = nl.dump(cb.NFT_MSG_GETRULE, {"family": cb.NFPROTO_INET}, [(cb.NftRuleAttr.NFTA_RULE_TABLE, "enc")])

    def decoded(raw):
        elements = cb.decode_attrs(cb.NftListAttr, raw)[cb.NftListAttr.NFTA_LIST_ELEM]
        return [(e[cb.NftExprAttr.NFTA_EXPR_NAME],
                 cb.decode_attrs(cb.EXPRESSION_SPACES[e[cb.NftExprAttr.NFTA_EXPR_NAME]],
                                 e.get(cb.NftExprAttr.NFTA_EXPR_DATA, b""))
                 if e[cb.NftExprAttr.NFTA_EXPR_NAME] in cb.EXPRESSION_SPACES else {})
                for e in elements]
    ours = decoded(cb.encode_attrs(exprs))
    assert decoded(msg.get(cb.NftRuleAttr.NFTA_RULE_EXPRESSIONS)) == ours
    assert [name for name, _ in ours] == ["meta", "cmp", "payload", "cmp", "payload", "bitwise", "cmp", "masq"]
    assert cb.comment_of(msg.get(cb.NftRuleAttr.NFTA_RULE_USERDATA)) == "round trip"
    assert msg.get(cb.NftRuleAttr.NFTA_RULE_USERDATA) == cb.udata_comment("round trip")
