"""portmap's pure parts, in process: the config, conditions, the attachment comment, the rules."""
import hashlib

import pytest

import cni_bridge as cb

pytestmark = pytest.mark.unit


def request(config, command="ADD", cid="ctr1", ifname="eth0"):
    config = dict({"cniVersion": "1.0.0", "name": "net", "type": "portmap"}, **config)
    return cb.Request(command, cid, "/run/netns/x", ifname, {}, "/opt/cni/bin", config, config["cniVersion"])


def mappings(*entries):
    return {"runtimeConfig": {"portMappings": list(entries)}}


def test_defaults_and_keys_in_any_case():
    conf = cb.PortmapConfig(request(dict(mappings({"HostPort": 80, "containerport": 8080, "Protocol": "UDP"}),
                                         SNAT=False, masqall=True)))
    assert (conf.snat, conf.masq_all, conf.backend, conf.mark_masq_bit) == (False, True, "nftables", 13)
    (m,) = conf.mappings
    assert (m.host_port, m.container_port, m.protocol, m.host_family, m.host_ip) == (80, 8080, "udp", None, None)
    assert conf.conditions == {4: [[]], 6: [[]]}


@pytest.mark.parametrize("host_ip, family, ip", [("0.0.0.0", 4, None), ("::", 6, None),
                                                 ("198.51.100.1", 4, 0xC6336401), ("::ffff:1.2.3.4", 4, 0x01020304)])
def test_host_ip_family_and_unspecified(host_ip, family, ip):
    (m,) = cb.parse_port_mappings([{"hostPort": 1, "containerPort": 2, "protocol": "tcp", "hostIP": host_ip}])
    assert (m.host_family, m.host_ip) == (family, ip)
    assert m.applies_to(family) and not m.applies_to(10 - family)


def test_iptables_only_keys_choose_iptables_without_a_backend():
    conf = cb.PortmapConfig(request({"externalSetMarkChain": "KUBE-MARK-MASQ"}))
    assert conf.backend == "iptables"
    conf = cb.PortmapConfig(request({"conditionsV4": ["-s", "10.0.0.0/8"]}))
    assert conf.backend == "iptables" and conf.iptables_conditions[4] == ["-s", "10.0.0.0/8"]
    with pytest.raises(cb.CNIError) as err:
        cb.PortmapConfig(request({"conditionsV4": ["ip saddr 10.0.0.1"], "backend": "iptables"}))
    assert err.value.code == 7 and "nftables-specific options conditionsV4" in err.value.msg


def test_conditions_become_alternatives_of_expressions():
    assert cb.parse_conditions(4, []) == [[]]
    one = cb.parse_conditions(4, ["ip", "saddr", "10.0.0.0/8"])
    assert len(one) == 1 and len(one[0]) == 3            # payload, bitwise, cmp
    positive = cb.parse_conditions(4, ['iifname { "eth0", "ens*" } ip daddr != { 1.2.3.4, 5.6.7.8 }'])
    assert len(positive) == 2                            # one rule per interface ...
    assert all(len(alternative) == 2 + 2 * 2 for alternative in positive)   # ... excluding both
    assert len(cb.parse_conditions(6, ["meta oifname == lo", "ip6 saddr fd00::/8"])) == 1


@pytest.mark.parametrize("family, text, named", [
    (4, "tcp dport 22", "tcp dport 22"),
    (4, "ip6 saddr ::1", "ip6 saddr ::1"),
    (6, "ip saddr 1.2.3.4", "ip saddr 1.2.3.4"),
    (4, "ip saddr 1.2.3.4 counter", "counter"),
    (4, "ip saddr { 1.2.3.4", "ip saddr { 1.2.3.4"),
    (4, "ip saddr { }", "ip saddr { }"),
    (4, 'iifname "eth0', "unterminated"),
    (4, "iifname averyveryverylongname", "averyveryverylongname"),
    (4, "ip saddr 1.2.3.4/40", "1.2.3.4/40"),
    (4, "ip ttl 3", "ip ttl 3"),
])
def test_unsupported_conditions_are_code_7_naming_them(family, text, named):
    with pytest.raises(cb.CNIError) as err:
        cb.parse_conditions(family, [text])
    assert err.value.code == 7 and "conditionsV%d" % family in err.value.msg
    assert named in err.value.msg + err.value.details


def test_condition_sets_are_bounded():
    many = "ip saddr { %s }" % ", ".join("10.0.0.%d" % i for i in range(9))
    with pytest.raises(cb.CNIError) as err:
        cb.parse_conditions(4, [many, many.replace("saddr", "daddr")])
    assert err.value.code == 7 and "more than 64 rules" in err.value.msg


def test_comment_names_the_attachment_within_the_kernel_limit():
    assert cb.portmap_comment("net", "abc", "eth0") == "net:net id:abc if:eth0"
    assert cb.parse_portmap_comment("net:net id:abc if:eth0") == ("net", "abc", "eth0")
    assert cb.parse_portmap_comment("abc") is None       # the reference's comment: the container ID
    long_net, long_id = "n" * 33, "c" * 65
    text = cb.portmap_comment(long_net, long_id, "x" * 15)
    digest = lambda s: "#" + hashlib.sha512(s.encode()).hexdigest()[:16]
    assert text == "net:%s id:%s if:%s" % (digest(long_net), digest(long_id), "x" * 15)
    assert len(cb.portmap_comment("n" * 32, "c" * 64, "x" * 15).encode()) <= 128


def test_container_addresses_skip_other_interfaces():
    prev = {"interfaces": [{"name": "br"}, {"name": "eth0", "sandbox": "/x"}, {"name": "eth1", "sandbox": "/x"}],
            "ips": [{"address": "10.0.0.9/24", "interface": 0}, {"address": "10.0.1.9/24", "interface": 2},
                    {"address": "10.0.2.2/24", "interface": 1}, {"address": "fd00::2/64"}]}
    found = cb.container_addresses(prev, "eth0")
    assert [str(found[4]), str(found[6])] == ["10.0.2.2/24", "fd00::2/64"]


def test_rules_per_family_mapping_and_snat():
    conf = cb.PortmapConfig(request(mappings({"hostPort": 80, "containerPort": 8080, "protocol": "tcp"},
                                             {"hostPort": 81, "containerPort": 81, "protocol": "udp",
                                              "hostIP": "fd00::1"})))
    v4 = cb.portmap_rules(conf, 4, cb.Prefix.parse("10.0.0.2/24"))
    v6 = cb.portmap_rules(conf, 6, cb.Prefix.parse("fd00::2/64"))
    assert [chain for chain, _ in v4] == ["hostports", "masquerading", "masquerading"]   # hairpin, localhost
    assert [chain for chain, _ in v6] == ["hostports", "hostports", "masquerading"]
    conf.snat = False
    assert [chain for chain, _ in cb.portmap_rules(conf, 4, cb.Prefix.parse("10.0.0.2/24"))] == ["hostports"]


def test_a_rules_signature_is_stable_and_tells_targets_apart():
    conf = cb.PortmapConfig(request(mappings({"hostPort": 80, "containerPort": 8080, "protocol": "tcp"})))
    (_, first), _, _ = cb.portmap_rules(conf, 4, cb.Prefix.parse("10.0.0.2/24"))
    (_, again), _, _ = cb.portmap_rules(conf, 4, cb.Prefix.parse("10.0.0.2/24"))
    (_, other), _, _ = cb.portmap_rules(conf, 4, cb.Prefix.parse("10.0.0.3/24"))
    assert cb.expression_signature(first) == cb.expression_signature(again) != cb.expression_signature(other)


def test_verify_port_step_skips_versions_without_prev_result():
    class NoCalls(object):
        def call(self, command, stdin):
            raise AssertionError("called %s" % command)
    assert cb.Verifier.map_port(NoCalls(), None, None, {}, "0.2.0", {})[1] is None
    assert cb.Verifier.map_port(NoCalls(), None, None, {}, "1.0.0", {"ips": []})[0].startswith("no IPv4")


# --- hostile input, in process: a CNIError or a valid config, never another exception -----------------

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install hypothesis)")
from hypothesis import given, settings, strategies as st  # noqa: E402

WORDS = ["ip", "ip6", "saddr", "daddr", "iifname", "oifname", "meta", "==", "!=", "eq", "ne", "{", "}", ",",
         '"', "*", "10.0.0.1", "10.0.0.0/8", "fd00::1", "::/0", "eth0", "eth*", "tcp", "dport", "22", "-s",
         "!", "counter", "\ud800", "x" * 20, "1.2.3.4/33", ""]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(), st.text(max_size=12),
                    st.sampled_from(WORDS))
VALUES = st.recursive(SCALARS, lambda children: st.one_of(st.lists(children, max_size=3),
                                                         st.dictionaries(st.text(max_size=8), children,
                                                                         max_size=3)), max_leaves=8)
KEYS = ["snat", "masqAll", "markMasqBit", "externalSetMarkChain", "conditionsV4", "conditionsV6", "backend",
        "runtimeConfig", "SNAT", "Backend"]
ENTRY_KEYS = ["hostPort", "containerPort", "protocol", "hostIP", "HostPort"]


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(top=st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=4),
       entries=st.lists(st.dictionaries(st.sampled_from(ENTRY_KEYS), VALUES, max_size=5), max_size=3),
       conditions=st.lists(st.lists(st.sampled_from(WORDS), max_size=8).map(" ".join), max_size=3))
def test_generated_configs_are_accepted_or_refused_with_a_code(top, entries, conditions):
    config = dict(top, runtimeConfig=top.get("runtimeConfig", {"portMappings": entries}))
    if conditions and "conditionsV4" not in top:
        config["conditionsV4"] = conditions
    try:
        conf = cb.PortmapConfig(request(config))
    except cb.CNIError as err:
        assert err.code == 7, (err.code, err.msg)
        return
    for family, address in ((4, "10.0.0.2/24"), (6, "fd00::2/64")):
        for _chain, exprs in cb.portmap_rules(conf, family, cb.Prefix.parse(address)):
            cb.expression_signature(exprs)          # every rule encodes
