"""The bridge's ipMasqExclude (issue 19) in process: the key's checks and the rules it makes."""
import pytest

import cni_bridge as cb

pytestmark = pytest.mark.unit


def bridge_conf(**keys):
    config = dict({"cniVersion": "1.0.0", "name": "kn", "type": "bridge", "ipMasq": True}, **keys)
    request = cb.Request("ADD", "ctr1", "/run/netns/x", "eth0", {}, "/opt/cni/bin", config,
                         config["cniVersion"])
    return cb.BridgeConfig(request)


def test_absent_or_null_key_means_the_reference_layout():
    assert bridge_conf().ip_masq_exclude is None
    assert bridge_conf(ipMasqExclude=None).ip_masq_exclude is None
    host = cb.Prefix.parse("10.244.1.5/24")
    assert len(cb.masquerade_rules(host, None)) == 1
    assert cb.iptables_masquerade_rules("CNI-x", host, None) == [
        ("CNI-x", ["-d", "10.244.1.5/24", "-j", "ACCEPT"]),
        ("CNI-x", ["!", "-d", "224.0.0.0/4", "-j", "MASQUERADE"]),
        ("POSTROUTING", ["-s", "10.244.1.5", "-j", "CNI-x"])]


def test_key_in_any_case_host_bits_cleared_duplicates_dropped_order_kept():
    conf = bridge_conf(IPMASQEXCLUDE=["10.244.7.7/16", "fd00:244::1/48", "10.244.0.0/16",
                                      "::ffff:192.168.0.0/112", "0.0.0.0/0"])
    assert [str(p) for p in conf.ip_masq_exclude] == ["10.244.0.0/16", "fd00:244::/48",
                                                      "192.168.0.0/16", "0.0.0.0/0"]
    assert bridge_conf(ipMasqExclude=[]).ip_masq_exclude == ()


@pytest.mark.parametrize("value, named", [
    (["10.244.0.0"], "'10.244.0.0'"), (["10.244.0.0/33"], "'10.244.0.0/33'"),
    (["fd00::/129"], "'fd00::/129'"), (["banana/8"], "'banana/8'"), ([""], "''"),
    ([16], "16"), ([None], "null"), ([["10.0.0.0/8"]], '["10.0.0.0/8"]'),
    (["10.0.0.0/8", "10.1.0.0/-1"], "'10.1.0.0/-1'")])
def test_malformed_cidr_is_code_7_naming_it(value, named):
    with pytest.raises(cb.CNIError) as err:
        bridge_conf(ipMasqExclude=value)
    assert err.value.code == cb.ERR_INVALID_CONFIG
    assert "ipMasqExclude" in err.value.msg and named in err.value.msg


@pytest.mark.parametrize("value", ["10.244.0.0/16", {"cidr": "10.244.0.0/16"}, True])
def test_not_a_list_is_code_7(value):
    with pytest.raises(cb.CNIError) as err:
        bridge_conf(ipMasqExclude=value)
    assert err.value.code == cb.ERR_INVALID_CONFIG
    assert "ipMasqExclude must be a list" in err.value.msg


def signatures(rules):
    return [cb.expressions_signature(cb.encode_attrs(exprs)) for exprs in rules]


def test_each_family_gets_its_own_exclusions_then_local_then_the_masquerade():
    exclusions = bridge_conf(ipMasqExclude=["10.244.0.0/16", "fd00:244::/48",
                                            "192.168.0.0/16"]).ip_masq_exclude
    v4, v6 = cb.Prefix.parse("10.244.1.5/24"), cb.Prefix.parse("fd00:244:1::5/64")
    source4 = cb.match_family(4) + cb.match_address("saddr", cb.Prefix.parse("10.244.1.5/32"))
    assert signatures(cb.masquerade_rules(v4, exclusions)) == signatures([
        source4 + cb.match_address("daddr", cb.Prefix.parse("10.244.0.0/16"))
        + [cb.expr_verdict(cb.NFT_RETURN)],
        source4 + cb.match_address("daddr", cb.Prefix.parse("192.168.0.0/16"))
        + [cb.expr_verdict(cb.NFT_RETURN)],
        source4 + cb.match_daddr_local() + [cb.expr_verdict(cb.NFT_RETURN)],
        source4 + cb.match_address("daddr", v4, negate=True) + [cb.expr_masquerade()]])
    # Without an IPv6 exclusion an IPv6 address still gets the local return.
    assert len(cb.masquerade_rules(v6, exclusions)) == 3
    assert len(cb.masquerade_rules(v6, exclusions[:1])) == 2
    # The reference's single rule is the last one, unchanged.
    assert signatures(cb.masquerade_rules(v4, exclusions))[-1] == signatures(
        cb.masquerade_rules(v4, None))[0]


def test_iptables_accepts_come_before_the_masquerade():
    exclusions = bridge_conf(ipMasqExclude=["10.244.0.0/16", "fd00:244::/48"]).ip_masq_exclude
    rules = cb.iptables_masquerade_rules("CNI-x", cb.Prefix.parse("fd00:244:1::5/64"), exclusions)
    assert rules == [("CNI-x", ["-d", "fd00:244:1::5/64", "-j", "ACCEPT"]),
                     ("CNI-x", ["-d", "fd00:244::/48", "-j", "ACCEPT"]),
                     ("CNI-x", ["-m", "addrtype", "--dst-type", "LOCAL", "-j", "ACCEPT"]),
                     ("CNI-x", ["!", "-d", "ff00::/8", "-j", "MASQUERADE"]),
                     ("POSTROUTING", ["-s", "fd00:244:1::5", "-j", "CNI-x"])]
