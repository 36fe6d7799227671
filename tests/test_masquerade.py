"""ipMasq and macspoofchk over nf_tables netlink (issue 5), proved on the kernel.

Every test works in namespaces it makes: a "node" namespace acting as the host, where `bridge`
runs, container namespaces on its bridge and, for traffic, a "remote" namespace: an outside server
on its own link of the node (198.51.100.0/24, 2001:db8:51::/64).  What the plugin created is read
back with `nft -j list ruleset` (table and chain comments, which nft 1.0.6 leaves out of its JSON,
from `nft list ruleset`), `iptables -t nat -S`, `ip -j`, the dataDir, and real traffic.
"""
import hashlib
import ipaddress
import json
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from tests.helpers import (IP, REPO, cni_env, encode_conf, parse_output, reservations, run, run_cni,
                           skip_without_iptables, sources_seen)

pytestmark = pytest.mark.kernel

NET = "masqnet"
BRIDGE = "mq0"
SUBNETS = {4: "10.88.0.0/24", 6: "fd88::/64"}
GATEWAYS = {4: "10.88.0.1", 6: "fd88::1"}
# The remote link: the node's end (the address masquerading must show) and the server's end.
UPLINK = "uplink0"
UPLINK_NODE = {4: "198.51.100.1", 6: "2001:db8:51::1"}
UPLINK_REMOTE = {4: "198.51.100.2", 6: "2001:db8:51::2"}
UPLINK_PREFIX = {4: 24, 6: 64}
TIMEOUT = 60  # seconds for any one plugin call

# The reference's names, from github.com/containernetworking/plugins:
# pkg/ip/ipmasq_nftables_linux.go (the nftables ipMasq backend, via knftables): ipMasqTableName,
# ipMasqChainName, the table and chain comments, the base chain "postrouting" (type nat, hook
# postrouting, knftables.SNATPriority = 100) flushed and refilled with "ip daddr == 224.0.0.0/4
# return", "ip6 daddr == ff00::/8 return", "goto masq_checks"; commentForInstance and
# hashForInstance (16 hex digits of SHA-512 each, utils.MustFormatHashWithPrefix).
MASQ_TABLE = "cni_plugins_masquerade"
MASQ_CHAIN = "masq_checks"
POSTROUTING = "postrouting"
MASQ_TABLE_COMMENT = "Masquerading for plugins from github.com/containernetworking/plugins"
MASQ_CHAIN_COMMENT = "Masquerade traffic from certain IPs to any (non-multicast) IP outside their subnet"
# pkg/link/spoofcheck.go (via go-nft), with plugins/main/bridge/bridge.go passing
# refID = "<containerID>-<ifname>": table bridge "nat", base chain "PREROUTING" (type filter, hook
# prerouting, priority -300, policy accept), chains "cni-br-iface-<refID>" and "<that>-mac",
# every rule commented "macspoofchk-<refID>".
SPOOF_TABLE = "nat"
SPOOF_BASE_CHAIN = "PREROUTING"
# Rules whose order does not matter (each matches its own address or interface): compared as sets.
ORDER_FREE_CHAINS = {MASQ_CHAIN, SPOOF_BASE_CHAIN}

# --- names -------------------------------------------------------------------------------------

def h16(text):
    """The reference's 16-hex-digit hash of a string (first 16 hex digits of SHA-512)."""
    return hashlib.sha512(text.encode()).hexdigest()[:16]


def instance_hash(cid, ifname="eth0", network=NET):
    return "%s-%s" % (h16(network), h16(ifname + ":" + cid))


def masq_comment(cid, ifname="eth0", network=NET):
    """commentForInstance: the instance hash, then the names, cut at knftables.CommentLengthMax (128)."""
    return ("%s, net: %s, if: %s, id: %s" % (instance_hash(cid, ifname, network), network, ifname, cid))[:128]


def spoof_names(cid, ifname="eth0"):
    """(chain, its -mac chain, comment) of an attachment's MAC spoof check."""
    chain = "cni-br-iface-%s-%s" % (cid, ifname)
    return chain, chain + "-mac", "macspoofchk-%s-%s" % (cid, ifname)


def iptables_chain(cid, network=NET):
    """The reference's iptables chain: CNI- and 24 hex digits of SHA-512(network + containerID)."""
    return "CNI-" + hashlib.sha512((network + cid).encode()).hexdigest()[:24]


# --- configs and calls -------------------------------------------------------------------------

def make_conf(data_dir, version="1.0.0", dual_stack=False, **options):
    """A bridge config with a gateway, ipMasq and host-local IPAM (IPv4, or IPv4 and IPv6)."""
    families = (4, 6) if dual_stack else (4,)
    config = {"cniVersion": version, "name": NET, "type": "bridge", "bridge": BRIDGE,
              "isGateway": True, "ipMasq": True,
              "ipam": {"type": "host-local", "dataDir": str(data_dir),
                       "ranges": [[{"subnet": SUBNETS[f]}] for f in families],
                       "routes": [{"dst": "0.0.0.0/0" if f == 4 else "::/0"} for f in families]}}
    config.update(options)
    return config


def gc_conf(config, *valid_cids):
    """A GC request's config: `config` with cni.dev/valid-attachments naming eth0 of `valid_cids`."""
    return dict(config, **{"cni.dev/valid-attachments": [{"containerID": cid, "ifname": "eth0"}
                                                          for cid in valid_cids]})


def cni(bin_dir, command, config, node, netns, cid, **kwargs):
    """One call of `bridge` inside the node namespace."""
    return run_cni(bin_dir, "bridge", command, config, node=node, netns=netns, container_id=cid,
                   timeout=TIMEOUT, **kwargs)


def cni_ok(bin_dir, command, config, node, netns, cid, **kwargs):
    """One call that must succeed; returns its parsed result (None for DEL and CHECK)."""
    res = cni(bin_dir, command, config, node, netns, cid, **kwargs)
    assert res.returncode == 0, "%s %s failed (%d): %s %s" % (command, cid, res.returncode, res.stdout,
                                                              res.stderr)
    return res.json


def assert_cni_error(res, *words):
    """A failed call: non-zero exit, a CNI error object on stdout whose message names `words`."""
    assert res.returncode != 0, res.stdout
    assert isinstance(res.json, dict) and isinstance(res.json.get("code"), int), res.stdout + res.stderr
    assert "cniVersion" in res.json and "msg" in res.json, res.json
    for word in words:
        assert word in res.json["msg"], res.json


def addresses(result):
    """The CIDRs of an ADD result (container addresses with their prefix)."""
    return [ip["address"] for ip in result["ips"]]


def address_of(result, family=4):
    return [a.split("/")[0] for a in addresses(result) if (":" in a) == (family == 6)][0]


def host_veths(node):
    """The veth interfaces in the node namespace (the remote link excluded)."""
    return sorted(name for name, link in node.links().items()
                  if link.get("linkinfo", {}).get("info_kind") == "veth" and name != UPLINK)


# --- reading nf_tables -------------------------------------------------------------------------

def nft_entries(ns):
    return json.loads(ns.run("nft", "-j", "list", "ruleset").stdout)["nftables"]


def table_and_chain_comments(ns):
    """{(family, table): comment, (family, table, chain): comment} from `nft list ruleset`."""
    comments = {}
    table = chain = None
    for line in ns.run("nft", "list", "ruleset").stdout.splitlines():
        words = line.split()
        if line.startswith("table "):
            table, chain = (words[1], words[2]), None
        elif words[:1] == ["chain"]:
            chain = words[1]
        elif line == "}":
            table = None
        elif words == ["}"]:
            chain = None
        else:
            comment = re.fullmatch(r'\s*comment "(.*)"', line)
            if comment:
                comments[table + ((chain,) if chain else ())] = comment.group(1)
    return comments


def in_any_order(rules):
    """Rules of an ORDER_FREE_CHAINS chain in a canonical order."""
    return sorted(rules, key=lambda rule: json.dumps(rule, sort_keys=True))


def layout(ns):
    """Everything nf_tables holds in `ns`, as nft reads it back from the kernel:
    {"tables": {(family, name): comment}, "chains": {(family, table, name): {...}},
     "rules": {(family, table, chain): [{"expr": [...], "comment": ...}, ...]}} (no handles)."""
    comments = table_and_chain_comments(ns)
    tables, chains, rules = {}, {}, {}
    for entry in nft_entries(ns):
        if "table" in entry:
            key = (entry["table"]["family"], entry["table"]["name"])
            tables[key] = comments.get(key)
        elif "chain" in entry:
            chain = entry["chain"]
            key = (chain["family"], chain["table"], chain["name"])
            chains[key] = dict({k: chain[k] for k in ("type", "hook", "prio", "policy") if k in chain},
                               comment=comments.get(key))
            rules[key] = []
        elif "rule" in entry:
            rule = entry["rule"]
            rules[(rule["family"], rule["table"], rule["chain"])].append(
                {"expr": rule["expr"], "comment": rule.get("comment")})
    rules = {key: in_any_order(chain_rules) if key[2] in ORDER_FREE_CHAINS else chain_rules
             for key, chain_rules in rules.items()}
    return {"tables": tables, "chains": chains, "rules": rules}


def rules_of(ns, family, table, chain):
    """The rules of one chain with their handles, as `nft -j` lists them."""
    return [e["rule"] for e in nft_entries(ns) if "rule" in e and
            (e["rule"]["family"], e["rule"]["table"], e["rule"]["chain"]) == (family, table, chain)]


def delete_rule(ns, rule):
    """Delete by hand, with `nft`, a rule as rules_of lists it."""
    ns.run("nft", "delete", "rule", rule["family"], rule["table"], rule["chain"],
           "handle", str(rule["handle"]))


def match(left, op, right):
    return {"match": {"op": op, "left": left, "right": right}}


def payload(protocol, field):
    return {"payload": {"protocol": protocol, "field": field}}


def prefix(network):
    return {"prefix": {"addr": str(network.network_address), "len": network.prefixlen}}


def masq_rule(cidr, cid, ifname="eth0", network=NET):
    """`ip[6] saddr <ip> ip[6] daddr != <subnet> masquerade comment "<attachment's comment>"`."""
    iface = ipaddress.ip_interface(cidr)
    protocol = "ip" if iface.version == 4 else "ip6"
    return {"expr": [match(payload(protocol, "saddr"), "==", str(iface.ip)),
                     match(payload(protocol, "daddr"), "!=", prefix(iface.network)),
                     {"masquerade": None}],
            "comment": masq_comment(cid, ifname, network)}


def masq_layout(attachments):
    """The reference's masquerade table holding the rules of `attachments`: (cid, ifname, cidrs),
    optionally followed by the network's name when it is not NET."""
    table = ("inet", MASQ_TABLE)
    multicast = {"ip": ipaddress.ip_network("224.0.0.0/4"), "ip6": ipaddress.ip_network("ff00::/8")}
    masq_rules = [masq_rule(cidr, cid, ifname, *network)
                  for cid, ifname, cidrs, *network in attachments for cidr in cidrs]
    return {"tables": {table: MASQ_TABLE_COMMENT},
            "chains": {table + (MASQ_CHAIN,): {"comment": MASQ_CHAIN_COMMENT},
                       table + (POSTROUTING,): {"type": "nat", "hook": "postrouting", "prio": 100,
                                                "policy": "accept", "comment": None}},
            "rules": {table + (POSTROUTING,): [
                          {"expr": [match(payload(p, "daddr"), "==", prefix(multicast[p])), {"return": None}],
                           "comment": None} for p in ("ip", "ip6")]
                      + [{"expr": [{"goto": {"target": MASQ_CHAIN}}], "comment": None}],
                      table + (MASQ_CHAIN,): in_any_order(masq_rules)}}


def spoof_layout(attachments):
    """The reference's bridge nat table checking `attachments`: (cid, ifname, host veth, MAC)."""
    table = ("bridge", SPOOF_TABLE)
    chains = {table + (SPOOF_BASE_CHAIN,): {"type": "filter", "hook": "prerouting", "prio": -300,
                                            "policy": "accept", "comment": None}}
    jumps, rules = [], {}
    for cid, ifname, host_veth, mac in attachments:
        chain, mac_chain, comment = spoof_names(cid, ifname)
        chains[table + (chain,)] = chains[table + (mac_chain,)] = {"comment": None}
        jumps.append({"expr": [match({"meta": {"key": "iifname"}}, "==", host_veth),
                               {"jump": {"target": chain}}], "comment": comment})
        rules[table + (chain,)] = [{"expr": [{"jump": {"target": mac_chain}}], "comment": comment}]
        rules[table + (mac_chain,)] = [
            {"expr": [match(payload("ether", "saddr"), "==", mac), {"return": None}], "comment": comment},
            {"expr": [{"drop": None}], "comment": comment}]
    rules[table + (SPOOF_BASE_CHAIN,)] = in_any_order(jumps)
    return {"tables": {table: None}, "chains": chains, "rules": rules}


def merged(*layouts):
    """The layout of a namespace holding all of `layouts`."""
    return {part: {key: value for one in layouts for key, value in one[part].items()}
            for part in ("tables", "chains", "rules")}


def spoof_attachment(cid, result, ifname="eth0"):
    """(cid, ifname, host veth, container MAC) of an ADD result, for spoof_layout."""
    return cid, ifname, result["interfaces"][1]["name"], result["interfaces"][2]["mac"]


# --- iptables ------------------------------------------------------------------------------------

def iptables_lines(ns, cid, family):
    """`iptables -t nat -S` (ip6tables for IPv6) lines in `ns` naming the attachment's chain."""
    program = "iptables" if family == 4 else "ip6tables"
    chain = iptables_chain(cid)
    return {line for line in ns.run(program, "-t", "nat", "-S").stdout.splitlines() if chain in line}


def iptables_masq_lines(cid, cidr):
    """The reference's iptables masquerade of one address, as `iptables -t nat -S` prints it."""
    iface = ipaddress.ip_interface(cidr)
    chain = iptables_chain(cid)
    comment = '-m comment --comment "name: \\"%s\\" id: \\"%s\\""' % (NET, cid)
    multicast = "224.0.0.0/4" if iface.version == 4 else "ff00::/8"
    return {"-N %s" % chain,
            "-A POSTROUTING -s %s/%d %s -j %s" % (iface.ip, iface.max_prefixlen, comment, chain),
            "-A %s -d %s %s -j ACCEPT" % (chain, iface.network, comment),
            "-A %s ! -d %s %s -j MASQUERADE" % (chain, multicast, comment)}


# --- running without nft and iptables ----------------------------------------------------------

# Run in a private mount namespace ($0 = the node's netns path, then the plugin): empty tmpfs over
# the sbin directories, so no nft/iptables/ip6tables program exists (python3, sh and nsenter live
# in /usr/bin), then enter the node's network namespace only (the mount namespace stays ours).
HIDE_PROGRAMS = r"""
for dir in /usr/local/sbin /usr/sbin; do
    [ -d "$dir" ] && { mount -t tmpfs -o size=64k,mode=755 cbt-empty "$dir" || exit 96; }
done
for program in nft iptables ip6tables; do
    if command -v "$program" >/dev/null 2>&1; then echo "$program is still visible" >&2; exit 97; fi
done
exec nsenter --net="$0" "$@"
"""


def cni_without_programs(bin_dir, command, config, node, netns, cid):
    """One `bridge` call in the node namespace where `nft`, `iptables` and `ip6tables` do not exist.
    The hiding lives in a throwaway mount namespace; the test reads the ruleset from outside it."""
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", HIDE_PROGRAMS,
                           node.path, str(bin_dir / "bridge")],
                          input=encode_conf(config), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=TIMEOUT, env=cni_env(command, bin_dir, netns=netns, container_id=cid))
    res = parse_output(proc)
    assert res.returncode not in (96, 97), "hiding the programs failed: " + res.stderr
    return res


# --- traffic -----------------------------------------------------------------------------------

def connect_remote(node, make_netns):
    """A "remote" namespace on its own link of the node (no route back to the containers)."""
    remote = make_netns("remote")
    run([IP, "link", "add", UPLINK, "netns", node.name, "type", "veth", "peer", "name", "eth0",
         "netns", remote.name])
    for ns, name, ends in ((node, UPLINK, UPLINK_NODE), (remote, "eth0", UPLINK_REMOTE)):
        for family in (4, 6):
            ns.run(IP, "addr", "add", "%s/%d" % (ends[family], UPLINK_PREFIX[family]), "dev", name,
                   *(["nodad"] if family == 6 else []))
        ns.run(IP, "link", "set", name, "up")
    return remote


def pings(ns, address, attempts):
    """True when `address` answers one of `attempts` one-second pings from `ns`."""
    return any(ns.run("ping", "-c1", "-W1", address, check=False, timeout=10).returncode == 0
               for _ in range(attempts))


def flush_neighbours(*namespaces):
    for ns in namespaces:
        ns.run(IP, "neigh", "flush", "all")


@pytest.fixture
def cb(monkeypatch):
    """The plugin module itself, imported from the checkout (for unit-level tests)."""
    monkeypatch.syspath_prepend(str(REPO))
    import cni_bridge
    return cni_bridge


# --- the upstream reference's nftables code, replayed with `nft` --------------------------------

def upstream_add_script(cidrs, cid, ifname, host_veth, mac):
    """The `nft` input of upstream's ADD for one attachment: setupIPMasqNFTablesWithInterface per
    address (knftables transaction text), then SpoofChecker.Setup (go-nft, as text)."""
    chain, mac_chain, spoof_comment = spoof_names(cid, ifname)
    lines = ['add table inet %s { comment "%s" ; }' % (MASQ_TABLE, MASQ_TABLE_COMMENT),
             'add chain inet %s %s { comment "%s" ; }' % (MASQ_TABLE, MASQ_CHAIN, MASQ_CHAIN_COMMENT),
             "add chain inet %s %s { type nat hook postrouting priority 100 ; }" % (MASQ_TABLE, POSTROUTING),
             "flush chain inet %s %s" % (MASQ_TABLE, POSTROUTING),
             "add rule inet %s %s ip daddr == 224.0.0.0/4 return" % (MASQ_TABLE, POSTROUTING),
             "add rule inet %s %s ip6 daddr == ff00::/8 return" % (MASQ_TABLE, POSTROUTING),
             "add rule inet %s %s goto %s" % (MASQ_TABLE, POSTROUTING, MASQ_CHAIN)]
    for cidr in cidrs:
        iface = ipaddress.ip_interface(cidr)
        ip = "ip" if iface.version == 4 else "ip6"
        lines.append('add rule inet %s %s %s saddr == %s %s daddr != %s masquerade comment "%s"'
                     % (MASQ_TABLE, MASQ_CHAIN, ip, iface.ip, ip, iface.network, masq_comment(cid, ifname)))
    lines += ["add table bridge nat",
              "add chain bridge nat PREROUTING { type filter hook prerouting priority -300 ; policy accept ; }",
              "add chain bridge nat %s" % chain,
              "add chain bridge nat %s" % mac_chain,
              "flush chain bridge nat %s" % chain,
              "flush chain bridge nat %s" % mac_chain,
              'add rule bridge nat PREROUTING iifname "%s" jump %s comment "%s"'
              % (host_veth, chain, spoof_comment),
              'add rule bridge nat %s jump %s comment "%s"' % (chain, mac_chain, spoof_comment),
              'add rule bridge nat %s ether saddr %s return comment "%s"' % (mac_chain, mac, spoof_comment),
              'add rule bridge nat %s drop comment "%s"' % (mac_chain, spoof_comment)]
    return "\n".join(lines) + "\n"


def upstream_teardown(ns, cid, ifname):
    """Upstream's DEL of one attachment, with `nft`: teardownIPMasqNFTablesWithInterface (the
    masq_checks rules whose comment starts with the instance hash) and SpoofChecker.Teardown (the
    PREROUTING rule with the attachment's comment, then its two chains)."""
    chain, mac_chain, spoof_comment = spoof_names(cid, ifname)
    for rule in rules_of(ns, "inet", MASQ_TABLE, MASQ_CHAIN):
        if rule.get("comment", "").startswith(instance_hash(cid, ifname)):
            delete_rule(ns, rule)
    for rule in rules_of(ns, "bridge", SPOOF_TABLE, SPOOF_BASE_CHAIN):
        if rule.get("comment") == spoof_comment:
            delete_rule(ns, rule)
    for name in (chain, mac_chain):
        ns.run("nft", "delete", "chain", "bridge", SPOOF_TABLE, name)


# === masquerade: the ruleset ===================================================================

@pytest.mark.parametrize("dual_stack", [False, True], ids=["ipv4", "dual-stack"])
def test_add_writes_the_reference_masquerade_table(ours_bin, node, container, data_dir, dual_stack):
    """After ADD the node holds exactly the reference's table, chains (comments, nat hook at 100),
    base rules and one `saddr <ip> daddr != <subnet> masquerade` rule per container address,
    commented with the network and attachment hashes."""
    result = cni_ok(ours_bin, "ADD", make_conf(data_dir, dual_stack=dual_stack), node, container, "c1")
    assert len(addresses(result)) == (2 if dual_stack else 1)
    assert layout(node) == masq_layout([("c1", "eth0", addresses(result))])
    assert node.sysctl("net/ipv4/ip_forward") == "1"
    if dual_stack:
        assert node.sysctl("net/ipv6/conf/all/forwarding") == "1"


def test_upstream_nftables_backend_and_ours_are_interchangeable(ours_bin, node, make_netns, container,
                                                                data_dir):
    """Our ADD writes the same ruleset as the upstream nftables backend and spoof check would
    (their `nft` transactions replayed from pkg/ip/ipmasq_nftables_linux.go and pkg/link/spoofcheck.go);
    our DEL removes what upstream wrote, and upstream's teardown (rules by comment prefix, then the
    spoof-check chains) removes what we wrote."""
    config = make_conf(data_dir, dual_stack=True, macspoofchk=True)
    result = cni_ok(ours_bin, "ADD", config, node, container, "c1")
    attachment = spoof_attachment("c1", result)
    upstream = make_netns("upstream")
    upstream.run("nft", "-f", "-", input=upstream_add_script(addresses(result), *attachment))
    ours = layout(node)
    assert ours == layout(upstream)
    assert ours == merged(masq_layout([("c1", "eth0", addresses(result))]), spoof_layout([attachment]))

    upstream_data = data_dir.parent / "upstream-ipam"
    cni_ok(ours_bin, "DEL", make_conf(upstream_data, dual_stack=True, macspoofchk=True), upstream, None, "c1")
    assert layout(upstream) == merged(masq_layout([]), spoof_layout([]))

    upstream_teardown(node, "c1", "eth0")
    assert layout(node) == merged(masq_layout([]), spoof_layout([]))


def test_long_names_are_cut_like_the_reference(ours_bin, node, make_netns, data_dir):
    """A runtime's 64-hex-digit container ID and a long network name make the comment longer than
    128 bytes: it is cut there, as upstream's; ADD, CHECK, GC (listing it as valid) and DEL all
    still find the attachment's rules, spoof-check chains included."""
    network, cid = "podman-default-kube-network", hashlib.sha256(b"container").hexdigest()
    assert len("%s, net: %s, if: eth0, id: %s" % (instance_hash(cid, "eth0", network), network, cid)) > 128
    config = make_conf(data_dir, version="1.1.0", dual_stack=True, macspoofchk=True, name=network)
    result = cni_ok(ours_bin, "ADD", config, node, make_netns("ct"), cid)
    added = merged(masq_layout([(cid, "eth0", addresses(result), network)]),
                   spoof_layout([spoof_attachment(cid, result)]))
    assert layout(node) == added
    cni_ok(ours_bin, "CHECK", dict(config, prevResult=result), node, result["interfaces"][2]["sandbox"], cid)
    cni_ok(ours_bin, "GC", gc_conf(config, cid), node, None, None, ifname=None)
    assert layout(node) == added
    cni_ok(ours_bin, "DEL", config, node, None, cid)
    assert layout(node) == merged(masq_layout([]), spoof_layout([]))


# === masquerade: traffic =======================================================================

@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_masquerade_rewrites_the_source_of_traffic_leaving_the_subnet(ours_bin, node, make_netns, data_dir,
                                                                      family):
    """TCP and UDP from a container to a server in the remote namespace arrive from the node's
    address on that link (the remote has no route back, so only masqueraded traffic gets an
    answer); between two containers on the bridge the source stays the container's own."""
    remote = connect_remote(node, make_netns)
    one, two = make_netns("ct"), make_netns("ct")
    config = make_conf(data_dir, dual_stack=True)
    first = cni_ok(ours_bin, "ADD", config, node, one, "c1")
    second = cni_ok(ours_bin, "ADD", config, node, two, "c2")
    node_link = UPLINK_NODE[family]
    assert sources_seen(remote, one, family, UPLINK_REMOTE[family]) == {"tcp": node_link, "udp": node_link}
    own = address_of(first, family)
    assert sources_seen(two, one, family, address_of(second, family)) == {"tcp": own, "udp": own}


# === masquerade: re-ADD, DEL ===================================================================

@pytest.mark.parametrize("how", ["container interface removed", "sandbox recreated", "after DEL"])
def test_readd_of_an_attachment_replaces_its_rules(ours_bin, node, make_netns, data_dir, how):
    """A second ADD of the same container ID and ifname (a runtime retrying after the interface
    went away, a recreated sandbox, or an ADD after DEL) leaves one rule per address, not two."""
    config = make_conf(data_dir, dual_stack=True)
    container = make_netns("ct")
    cni_ok(ours_bin, "ADD", config, node, container, "c1")
    if how == "container interface removed":
        container.run(IP, "link", "del", "eth0")
    elif how == "sandbox recreated":            # the old sandbox is gone (issue 13 item 6)
        run([IP, "netns", "del", container.name])
        deadline = time.monotonic() + 10
        while host_veths(node) and time.monotonic() < deadline:    # destroyed asynchronously
            time.sleep(0.02)
        container = make_netns("ct")
    else:
        cni_ok(ours_bin, "DEL", config, node, container, "c1")
    again = cni_ok(ours_bin, "ADD", config, node, container, "c1")
    assert layout(node) == masq_layout([("c1", "eth0", addresses(again))])


def test_add_of_an_attached_interface_keeps_the_rules(ours_bin, node, container, data_dir):
    """ADD twice into the same namespace returns the first ADD's result (issue 13 item 6) and an
    ADD of another container ID onto the existing eth0 is an error; both leave the first ADD's
    rules, reservations and interfaces exactly as they were."""
    config = make_conf(data_dir, dual_stack=True)
    result = cni_ok(ours_bin, "ADD", config, node, container, "c1")

    def state():
        return rules_of(node, "inet", MASQ_TABLE, MASQ_CHAIN), reservations(data_dir / NET), host_veths(node)

    before = state()
    assert cni_ok(ours_bin, "ADD", config, node, container, "c1") == result
    assert state() == before
    assert_cni_error(cni(ours_bin, "ADD", config, node, container, "c2"))
    assert state() == before
    assert layout(node) == masq_layout([("c1", "eth0", addresses(result))])


def test_del_of_an_unknown_attachment_changes_nothing(ours_bin, node, container, data_dir):
    """DEL on a node without the tables succeeds and creates none; DEL of attachments that were
    never added (another container ID, another ifname) succeeds and leaves the existing
    attachment's rules alone; a repeated DEL succeeds too."""
    config = make_conf(data_dir, dual_stack=True)
    cni_ok(ours_bin, "DEL", config, node, container, "c1")
    assert layout(node)["tables"] == {}
    result = cni_ok(ours_bin, "ADD", config, node, container, "c1")
    cni_ok(ours_bin, "DEL", config, node, None, "other")
    cni_ok(ours_bin, "DEL", config, node, container, "c1", ifname="eth1")
    assert layout(node) == masq_layout([("c1", "eth0", addresses(result))])
    cni_ok(ours_bin, "DEL", config, node, container, "c1")
    cni_ok(ours_bin, "DEL", config, node, container, "c1")
    assert layout(node) == masq_layout([])


@pytest.mark.parametrize("how", ["netns deleted", "CNI_NETNS unset"])
def test_del_without_the_namespace_removes_the_rules(ours_bin, node, make_netns, data_dir, how):
    """DEL needs neither the container namespace nor its addresses: masquerade and spoof-check
    rules go (the tables keep only their base chains and rules), and so do the reservations."""
    config = make_conf(data_dir, dual_stack=True, macspoofchk=True)
    container = make_netns("ct")
    cni_ok(ours_bin, "ADD", config, node, container, "c1")
    if how == "netns deleted":
        run([IP, "netns", "del", container.name])
        cni_ok(ours_bin, "DEL", config, node, container, "c1")
    else:
        cni_ok(ours_bin, "DEL", config, node, None, "c1")
    assert layout(node) == merged(masq_layout([]), spoof_layout([]))
    assert reservations(data_dir / NET) == {}


def test_concurrent_adds_then_dels_leave_only_the_base_chains(ours_bin, node, make_netns, data_dir):
    """32 ADDs at once (distinct container IDs and namespaces) each get their own address and
    rules; 32 DELs at once then leave both tables with only their base chains and rules."""
    namespaces = [make_netns("ct") for _ in range(32)]
    config = make_conf(data_dir, macspoofchk=True)

    def all_at_once(command):
        with ThreadPoolExecutor(len(namespaces)) as pool:
            return list(pool.map(lambda i: cni(ours_bin, command, config, node, namespaces[i], "c%d" % i),
                                 range(len(namespaces))))

    adds = all_at_once("ADD")
    assert [r.returncode for r in adds] == [0] * 32, [r.stdout for r in adds if r.returncode]
    assert len({address_of(r.json) for r in adds}) == 32
    assert layout(node) == merged(
        masq_layout([("c%d" % i, "eth0", addresses(r.json)) for i, r in enumerate(adds)]),
        spoof_layout([spoof_attachment("c%d" % i, r.json) for i, r in enumerate(adds)]))
    dels = all_at_once("DEL")
    assert [r.returncode for r in dels] == [0] * 32, [r.stdout for r in dels if r.returncode]
    assert layout(node) == merged(masq_layout([]), spoof_layout([]))
    assert reservations(data_dir / NET) == {}
    assert host_veths(node) == []


# === masquerade: CHECK, GC =====================================================================

def test_check_fails_when_a_masquerade_rule_is_gone(ours_bin, node, container, data_dir):
    """CHECK with prevResult passes after ADD, and fails with a CNI error once one of the
    attachment's masquerade rules was deleted by hand."""
    config = make_conf(data_dir, dual_stack=True)
    result = cni_ok(ours_bin, "ADD", config, node, container, "c1")
    checked = dict(config, prevResult=result)
    cni_ok(ours_bin, "CHECK", checked, node, container, "c1")
    [ipv4_rule] = [r for r in rules_of(node, "inet", MASQ_TABLE, MASQ_CHAIN)
                   if r["expr"][0]["match"]["left"]["payload"]["protocol"] == "ip"]
    delete_rule(node, ipv4_rule)
    assert_cni_error(cni(ours_bin, "CHECK", checked, node, container, "c1"), "masquerade")


def test_gc_removes_the_rules_and_reservations_of_invalid_attachments(ours_bin, node, make_netns, data_dir):
    """GC (1.1.0) with cni.dev/valid-attachments naming one of two attachments removes the other's
    masquerade rules, spoof check and reservations, and keeps everything of the named one."""
    config = make_conf(data_dir, version="1.1.0", dual_stack=True, macspoofchk=True)
    keep = cni_ok(ours_bin, "ADD", config, node, make_netns("ct"), "keep")
    cni_ok(ours_bin, "ADD", config, node, make_netns("ct"), "stale")
    cni_ok(ours_bin, "GC", gc_conf(config, "keep"), node, None, None, ifname=None)
    assert layout(node) == merged(masq_layout([("keep", "eth0", addresses(keep))]),
                                  spoof_layout([spoof_attachment("keep", keep)]))
    kept = {a.split("/")[0]: "keep\r\neth0" for a in addresses(keep)}
    assert reservations(data_dir / NET) == kept
    assert host_veths(node) == [keep["interfaces"][1]["name"]]


# === interoperability with the reference's iptables masquerade ================================

def test_our_del_removes_the_reference_iptables_masquerade(ours_bin, ref_bin, node, container, data_dir):
    """Debian's reference bridge (1.1.1, iptables only) masquerades with chain CNI-<hash> and a
    POSTROUTING jump per address (IPv4 and IPv6); our DEL of the same attachment removes both,
    and the reference's lines are exactly the ones our iptables backend writes (tested below)."""
    skip_without_iptables(nf_tables_based=True)
    config = make_conf(data_dir, dual_stack=True)
    res = run_cni(ref_bin, "bridge", "ADD", config, node=node, netns=container, container_id="refc",
                  timeout=TIMEOUT)
    assert res.returncode == 0, res.stdout + res.stderr
    for cidr in addresses(res.json):
        family = ipaddress.ip_interface(cidr).version
        assert iptables_lines(node, "refc", family) == iptables_masq_lines("refc", cidr)
    cni_ok(ours_bin, "DEL", config, node, container, "refc")
    assert iptables_lines(node, "refc", 4) == set() and iptables_lines(node, "refc", 6) == set()
    assert reservations(data_dir / NET) == {}
    assert "eth0" not in container.links()


# === nothing but the kernel =====================================================================

def test_add_check_del_need_no_nft_or_iptables_program(ours_bin, node, container, data_dir):
    """With nft, iptables and ip6tables absent (hidden in a private mount namespace), ADD, CHECK
    and DEL with ipMasq and macspoofchk all work: the ruleset read from outside is the reference's
    after ADD and back to the base chains after DEL."""
    config = make_conf(data_dir, dual_stack=True, macspoofchk=True)
    res = cni_without_programs(ours_bin, "ADD", config, node, container, "c1")
    assert res.returncode == 0, res.stdout + res.stderr
    assert layout(node) == merged(masq_layout([("c1", "eth0", addresses(res.json))]),
                                  spoof_layout([spoof_attachment("c1", res.json)]))
    checked = dict(config, prevResult=res.json)
    res = cni_without_programs(ours_bin, "CHECK", checked, node, container, "c1")
    assert res.returncode == 0, res.stdout + res.stderr
    res = cni_without_programs(ours_bin, "DEL", checked, node, container, "c1")
    assert res.returncode == 0, res.stdout + res.stderr
    assert layout(node) == merged(masq_layout([]), spoof_layout([]))
    assert reservations(data_dir / NET) == {} and host_veths(node) == []


# === the iptables backend =======================================================================

def test_iptables_backend_on_request(ours_bin, node, container, data_dir):
    """ipMasqBackend "iptables" writes the reference's iptables chain and jumps (IPv4 and IPv6, read
    with iptables -S), no nftables masquerade rule; CHECK passes; DEL removes them."""
    skip_without_iptables()
    config = make_conf(data_dir, dual_stack=True, ipMasqBackend="iptables")
    result = cni_ok(ours_bin, "ADD", config, node, container, "c1")
    for cidr in addresses(result):
        family = ipaddress.ip_interface(cidr).version
        assert iptables_lines(node, "c1", family) == iptables_masq_lines("c1", cidr)
    assert rules_of(node, "inet", MASQ_TABLE, MASQ_CHAIN) == []
    cni_ok(ours_bin, "CHECK", dict(config, prevResult=result), node, container, "c1")
    cni_ok(ours_bin, "DEL", config, node, container, "c1")
    assert iptables_lines(node, "c1", 4) == set() and iptables_lines(node, "c1", 6) == set()


def test_iptables_backend_without_iptables_fails_clearly_and_leaves_nothing(ours_bin, node, container,
                                                                            data_dir):
    """ipMasqBackend "iptables" where the program does not exist: ADD fails with an error naming
    it, and leaves no veth, no container interface, no reservation, no rule."""
    config = make_conf(data_dir, ipMasqBackend="iptables")
    res = cni_without_programs(ours_bin, "ADD", config, node, container, "c1")
    assert_cni_error(res, "iptables")
    assert host_veths(node) == []
    assert "eth0" not in container.links()
    assert reservations(data_dir / NET) == {}
    assert rules_of(node, "inet", MASQ_TABLE, MASQ_CHAIN) == []


def test_unknown_backend_is_a_config_error(ours_bin, node, container, data_dir):
    """An ipMasqBackend other than nftables/iptables is refused as invalid config (code 7)
    before anything is made."""
    res = cni(ours_bin, "ADD", make_conf(data_dir, ipMasqBackend="pf"), node, container, "c1")
    assert_cni_error(res, "pf")
    assert res.json["code"] == 7
    assert host_veths(node) == [] and "eth0" not in container.links()
    assert reservations(data_dir / NET) == {} and layout(node)["tables"] == {}


# === macspoofchk ================================================================================

def test_macspoofchk_writes_the_reference_rules_and_del_removes_them(ours_bin, node, make_netns, data_dir):
    """With macspoofchk, each ADD adds the reference's PREROUTING jump for its host veth and its
    two chains (MAC return, then drop), all commented; each DEL removes exactly its own."""
    config = make_conf(data_dir, macspoofchk=True, ipMasq=False)
    first = cni_ok(ours_bin, "ADD", config, node, make_netns("ct"), "c1")
    second = cni_ok(ours_bin, "ADD", config, node, make_netns("ct"), "c2")
    assert layout(node) == spoof_layout([spoof_attachment("c1", first), spoof_attachment("c2", second)])
    cni_ok(ours_bin, "DEL", config, node, None, "c1")
    assert layout(node) == spoof_layout([spoof_attachment("c2", second)])
    cni_ok(ours_bin, "DEL", config, node, None, "c2")
    assert layout(node) == spoof_layout([])


@pytest.mark.parametrize("macspoofchk", [True, False], ids=["checked", "unchecked-control"])
def test_frames_with_a_spoofed_source_mac_are_dropped(ours_bin, node, make_netns, data_dir, macspoofchk):
    """A container that changes its MAC can no longer reach the gateway or another container;
    back on its own MAC it can.  The unchecked control shows the MAC change alone breaks nothing."""
    one, two = make_netns("ct"), make_netns("ct")
    config = make_conf(data_dir, macspoofchk=macspoofchk, ipMasq=False)
    first = cni_ok(ours_bin, "ADD", config, node, one, "c1")
    target = address_of(cni_ok(ours_bin, "ADD", config, node, two, "c2"))
    own_mac = first["interfaces"][2]["mac"]
    for peer in (target, GATEWAYS[4]):
        assert pings(one, peer, attempts=5), peer
    one.run(IP, "link", "set", "eth0", "address", "02:00:00:00:00:99")
    flush_neighbours(one, two, node)
    for peer in (target, GATEWAYS[4]):
        assert pings(one, peer, attempts=2 if macspoofchk else 5) != macspoofchk, peer
    one.run(IP, "link", "set", "eth0", "address", own_mac)
    flush_neighbours(one, two, node)
    for peer in (target, GATEWAYS[4]):
        assert pings(one, peer, attempts=5), peer


def test_check_fails_when_the_spoofchk_jump_is_gone(ours_bin, node, container, data_dir):
    """CHECK with prevResult passes after ADD with macspoofchk, and fails with a CNI error once the
    PREROUTING rule jumping to the attachment's chain was deleted by hand."""
    config = make_conf(data_dir, macspoofchk=True, ipMasq=False)
    result = cni_ok(ours_bin, "ADD", config, node, container, "c1")
    checked = dict(config, prevResult=result)
    cni_ok(ours_bin, "CHECK", checked, node, container, "c1")
    [jump] = rules_of(node, "bridge", SPOOF_TABLE, SPOOF_BASE_CHAIN)
    delete_rule(node, jump)
    assert_cni_error(cni(ours_bin, "CHECK", checked, node, container, "c1"), "macspoofchk")


# === unit level: the module's batches against the kernel's dump ===============================

def decoded_expressions(cb, raw):
    """[(expression name, its attributes decoded with the module's tables)] of an expression list."""
    elements = cb.decode_attrs(cb.NftListAttr, raw).get(cb.NftListAttr.NFTA_LIST_ELEM, [])
    return [(e[cb.NftExprAttr.NFTA_EXPR_NAME],
             cb.decode_attrs(cb.EXPRESSION_SPACES.get(e[cb.NftExprAttr.NFTA_EXPR_NAME], cb._NoAttr),
                             e.get(cb.NftExprAttr.NFTA_EXPR_DATA, b"")))
            for e in elements]


def encoded(cb, space, attrs):
    """The module's encoding of a request's attributes, decoded back: {Attr: value}."""
    return cb.decode_attrs(space, cb.encode_attrs(attrs))


def setup_masquerade_args(network, cid, cidrs):
    """The arguments of the module's setup_masquerade for an attachment of eth0 with `cidrs`."""
    return (SimpleNamespace(network=network, ip_masq_backend="nftables", ip_masq_exclude=None),
            SimpleNamespace(container_id=cid, ifname="eth0"), {"ips": [{"address": c} for c in cidrs]})


@pytest.fixture
def scratch_nftables(cb, make_netns, monkeypatch):
    """(namespace, module nf_tables socket in it): the module's node socket is redirected to a
    scratch namespace, and every request it sends is recorded in `socket.sent`."""
    scratch = make_netns("enc")
    with cb.Netns(scratch.path).entered():
        nl = cb.NetlinkSocket(cb.NETLINK_NETFILTER)
    nl.sent = []
    transact = nl.transact

    def recording(requests, what="", batch=None):
        nl.sent.extend(requests)
        return transact(requests, what, batch)

    nl.transact = recording
    monkeypatch.setattr(cb.PROCESS, "node_nftables", nl)
    yield scratch, nl
    nl.close()


def test_module_batches_are_what_the_kernel_stores(cb, scratch_nftables):
    """The module's masquerade and spoof-check batches, committed in a scratch namespace, come back
    in the kernel's dump as sent: the same rules per chain in order (expressions decoded with the
    module's codec), the same comment user data byte for byte, the same table and chain attributes;
    `nft -j` reads them as the reference's layout; the module's own listing finds them by comment
    and jump target, and its teardown leaves only the base chains."""
    scratch, nl = scratch_nftables
    cidrs = ["10.88.0.5/24", "fd88::5/64"]
    conf, request, result = setup_masquerade_args(NET, "enc1", cidrs)
    cb.setup_masquerade(conf, request, result)
    cb.setup_macspoofchk(conf, request, "vethcafe0001", "0a:58:0a:58:00:05")

    assert layout(scratch) == merged(masq_layout([("enc1", "eth0", cidrs)]),
                                     spoof_layout([("enc1", "eth0", "vethcafe0001", "0a:58:0a:58:00:05")]))

    R, C, T = cb.NftRuleAttr, cb.NftChainAttr, cb.NftTableAttr     # the attribute spaces
    sent_rules, sent_chains, sent_tables = {}, {}, {}
    for msg_type, _flags, header, attrs in nl.sent:
        family = header["family"]
        if msg_type == cb.NFT_MSG_NEWRULE:
            rule = encoded(cb, R, attrs)
            where = (family, rule[R.NFTA_RULE_TABLE], rule[R.NFTA_RULE_CHAIN])
            sent_rules.setdefault(where, []).append(
                (decoded_expressions(cb, rule[R.NFTA_RULE_EXPRESSIONS]), rule.get(R.NFTA_RULE_USERDATA)))
        elif msg_type == cb.NFT_MSG_NEWCHAIN:
            chain = encoded(cb, C, attrs)
            sent_chains[(family, chain[C.NFTA_CHAIN_TABLE], chain[C.NFTA_CHAIN_NAME])] = chain
        elif msg_type == cb.NFT_MSG_NEWTABLE:
            table = encoded(cb, T, attrs)
            sent_tables[(family, table[T.NFTA_TABLE_NAME])] = table
    assert set(sent_tables) == {(cb.NFPROTO_INET, MASQ_TABLE), (cb.NFPROTO_BRIDGE, SPOOF_TABLE)}

    kernel_rules, kernel_chains, kernel_tables = {}, {}, {}
    for family in (cb.NFPROTO_INET, cb.NFPROTO_BRIDGE):
        for msg in nl.dump(cb.NFT_MSG_GETRULE, {"family": family}):
            where = (family, msg.get(R.NFTA_RULE_TABLE), msg.get(R.NFTA_RULE_CHAIN))
            kernel_rules.setdefault(where, []).append(
                (decoded_expressions(cb, msg.get(R.NFTA_RULE_EXPRESSIONS)), msg.get(R.NFTA_RULE_USERDATA)))
        for msg in nl.dump(cb.NFT_MSG_GETCHAIN, {"family": family}):
            kernel_chains[(family, msg.get(C.NFTA_CHAIN_TABLE), msg.get(C.NFTA_CHAIN_NAME))] = msg.attrs
        for msg in nl.dump(cb.NFT_MSG_GETTABLE, {"family": family}):
            kernel_tables[(family, msg.get(T.NFTA_TABLE_NAME))] = msg.attrs
    assert kernel_rules == sent_rules
    assert set(kernel_chains) == set(sent_chains)
    for key, sent in sent_chains.items():
        assert {a: kernel_chains[key].get(a) for a in sent} == sent, key
    for key, sent in sent_tables.items():
        assert {a: kernel_tables[key].get(a) for a in sent} == sent, key
    comment = masq_comment("enc1")
    masq_table = sent_tables[(cb.NFPROTO_INET, MASQ_TABLE)]
    assert masq_table[T.NFTA_TABLE_USERDATA] == cb.udata_comment(MASQ_TABLE_COMMENT)
    assert [userdata for _, userdata in kernel_rules[(cb.NFPROTO_INET, MASQ_TABLE, MASQ_CHAIN)]] == \
        [cb.udata_comment(comment)] * 2

    listed = cb.list_rules(nl, cb.NFPROTO_INET, MASQ_TABLE, MASQ_CHAIN)
    assert [r.comment for r in listed] == [comment, comment]
    [jump] = cb.list_rules(nl, cb.NFPROTO_BRIDGE, SPOOF_TABLE, SPOOF_BASE_CHAIN)
    assert (jump.comment, jump.jump_target, jump.iifname) == (
        "macspoofchk-enc1-eth0", "cni-br-iface-enc1-eth0", "vethcafe0001")
    cb.teardown_attachment_rules(NET, "enc1", "eth0")
    assert layout(scratch) == merged(masq_layout([]), spoof_layout([]))


def test_a_refused_batch_changes_nothing(cb, scratch_nftables):
    """One nf_tables transaction is all or nothing: a batch whose last rule names a missing chain
    is refused (ENOENT) and its table is not created either."""
    scratch, nl = scratch_nftables
    batch = cb.NftBatch()
    batch.add_table(cb.NFPROTO_INET, "atomic", "made by a refused batch")
    batch.add_chain(cb.NFPROTO_INET, "atomic", "present")
    batch.add_rule(cb.NFPROTO_INET, "atomic", "absent", [cb.expr_verdict(cb.NF_ACCEPT)])
    with pytest.raises(cb.NetlinkError) as refused:
        batch.commit(nl, "test")
    assert refused.value.errno == 2
    assert layout(scratch)["tables"] == {}


def test_interleaved_first_adds_write_the_base_chain_once(cb, scratch_nftables, monkeypatch):
    """Two ADDs (of two networks: no IPAM lock orders them) that both find the masquerade table
    absent, the second committing between the first's look and its commit, as two plugin
    processes can: the base chain still holds its three rules once, and both attachments' rules."""
    scratch, _nl = scratch_nftables
    first = setup_masquerade_args(NET, "c1", ["10.88.0.2/24"])
    second = setup_masquerade_args("othernet", "c2", ["10.89.0.2/24"])
    list_rules = cb.list_rules
    interleaved = []

    def list_then_let_the_other_add_commit(nl, family, table, chain=None):
        rules = list_rules(nl, family, table, chain)
        if chain == POSTROUTING and not interleaved:
            interleaved.append(second)
            cb.setup_masquerade(*second)
        return rules

    monkeypatch.setattr(cb, "list_rules", list_then_let_the_other_add_commit)
    cb.setup_masquerade(*first)
    assert interleaved
    expected = masq_layout([("c1", "eth0", ["10.88.0.2/24"]), ("c2", "eth0", ["10.89.0.2/24"], "othernet")])
    found = layout(scratch)
    base_chain = ("inet", MASQ_TABLE, POSTROUTING)
    assert found["rules"][base_chain] == expected["rules"][base_chain], scratch.run(
        "nft", "list", "chain", *base_chain).stdout
    assert found == expected
