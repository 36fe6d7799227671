"""In-process unit tests of cni_bridge's address helpers and netlink codec, plus round trips
through a real kernel inside a namespace the test makes (never the machine's own)."""

import ipaddress
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import cni_bridge as cb

pytestmark = pytest.mark.unit


# --- addresses ------------------------------------------------------------------------------------

def random_ipv6_values(count, seed=5952):
    """Addresses rich in zero groups (single zeros, runs, ties) plus fully random ones."""
    rng = random.Random(seed)
    values = []
    for _ in range(count):
        if rng.random() < 0.2:
            values.append(rng.getrandbits(128))
            continue
        groups = [rng.choice((0, 0, 0, 1, 0xFFFF, rng.getrandbits(16))) for _ in range(8)]
        values.append(int.from_bytes(struct.pack(">8H", *groups), "big"))
    return values


def is_ipv4_mapped(value):
    return value >> 32 == 0xFFFF


@pytest.mark.parametrize("value, text", [
    (0, "::"),
    (1, "::1"),
    (0x20010DB8000000000000000000000001, "2001:db8::1"),
    (0x20010DB8000000010001000100010001, "2001:db8:0:1:1:1:1:1"),        # a single zero is kept
    (0x20010DB8000000000001000000000001, "2001:db8::1:0:0:1"),           # tie: the first run
    (0x20010000000000010000000000000001, "2001:0:0:1::1"),               # the longest run wins
    (0xFE800000000000000000000000000000, "fe80::"),
    (0x00010000000000000000000000000000, "1::"),
    (0x00000000000000000000000000010000, "::1:0"),
    ((1 << 128) - 1, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
    (0x00010002000300040005000600070008, "1:2:3:4:5:6:7:8"),
    (0x00010000000200000003000000040000, "1:0:2:0:3:0:4:0"),
])
def test_ipv6_text_known_cases(value, text):
    assert cb.ip_to_text(6, value) == text


def test_ipv6_text_matches_rfc5952_on_random_addresses():
    for value in random_ipv6_values(20000):
        if is_ipv4_mapped(value):
            continue
        expected = str(ipaddress.IPv6Address(value))
        assert cb.ip_to_text(6, value) == expected, hex(value)
        assert cb.parse_ip(expected) == (6, value)
        assert cb.parse_ip(ipaddress.IPv6Address(value).exploded) == (6, value)


def test_ipv4_text_and_parse():
    rng = random.Random(4)
    for _ in range(2000):
        value = rng.getrandbits(32)
        text = str(ipaddress.IPv4Address(value))
        assert cb.ip_to_text(4, value) == text
        assert cb.parse_ip(text) == (4, value)


@pytest.mark.parametrize("text, expected", [
    ("::ffff:1.2.3.4", (4, 0x01020304)),
    ("::FFFF:10.0.0.1", (4, 0x0A000001)),
    ("::ffff:a00:1", (4, 0x0A000001)),
    ("0:0:0:0:0:ffff:192.168.1.1", (4, 0xC0A80101)),
    ("2001:DB8::A", (6, 0x20010DB800000000000000000000000A)),
    ("::1.2.3.4", (6, 0x01020304)),           # IPv4-compatible is not IPv4-mapped
    ("0.0.0.0", (4, 0)),
    ("255.255.255.255", (4, 0xFFFFFFFF)),
])
def test_parse_ip_accepts(text, expected):
    assert cb.parse_ip(text) == expected


@pytest.mark.parametrize("text", [
    "", "1.2.3", "1.2.3.4.5", "01.2.3.4", "1.2.3.04", "001.2.3.4", "256.1.1.1", "1.2.3.-1",
    "0x1.2.3.4", "1.2.3.4 ", " 1.2.3.4", "1.2.3.4/24", "\u0661.2.3.4", "１.2.3.4", "a.b.c.d",
    "1:2:3:4:5:6:7:8:9", "1::2::3", ":::", "fe80::1%eth0", "::g", "12345::", "1.2.3.4\0",
    "localhost", "1", "::ffff:1.2.3",
])
def test_parse_ip_rejects_garbage(text):
    with pytest.raises(ValueError):
        cb.parse_ip(text)


@pytest.mark.parametrize("value", [None, 5, b"1.2.3.4", ["1.2.3.4"]])
def test_parse_ip_rejects_non_strings(value):
    with pytest.raises(ValueError):
        cb.parse_ip(value)


@pytest.mark.parametrize("text, family, ip, length", [
    ("10.1.2.3/24", 4, 0x0A010203, 24),
    ("0.0.0.0/0", 4, 0, 0),
    ("10.1.2.3/32", 4, 0x0A010203, 32),
    ("fd00::5/64", 6, 0xFD000000000000000000000000000005, 64),
    ("::/0", 6, 0, 0),
    ("::1/128", 6, 1, 128),
    ("::ffff:10.0.0.0/104", 4, 0x0A000000, 8),      # IPv4-mapped prefix becomes IPv4
    ("::ffff:10.0.0.0/128", 4, 0x0A000000, 32),
])
def test_prefix_parse(text, family, ip, length):
    prefix = cb.Prefix.parse(text)
    assert (prefix.family, prefix.ip, prefix.length) == (family, ip, length)


@pytest.mark.parametrize("text", [
    "10.1.2.3", "10.1.2.3/", "/24", "10.1.2.3/33", "10.1.2.3/-1", "10.1.2.3/+8", "10.1.2.3/ 8",
    "10.1.2.3/8 ", "10.1.2.3/1e1", "10.1.2.3/0x8", "::/129", "::/1000", "::ffff:10.0.0.0/95",
    "10.1.2/24", "01.1.2.3/24", "garbage/8", "10.1.2.3/24/8", "",
])
def test_prefix_parse_rejects(text):
    with pytest.raises(ValueError):
        cb.Prefix.parse(text)


@pytest.mark.parametrize("value", [None, 24, ["10.0.0.0/8"]])
def test_prefix_parse_rejects_non_strings(value):
    with pytest.raises(ValueError):
        cb.Prefix.parse(value)


def test_prefix_network_last_contains_and_text():
    prefix = cb.Prefix.parse("10.1.2.3/22")
    assert cb.ip_to_text(4, prefix.network) == "10.1.0.0"
    assert cb.ip_to_text(4, prefix.last) == "10.1.3.255"
    assert str(prefix) == "10.1.2.3/22"
    assert prefix.network_text() == "10.1.0.0/22"
    assert prefix.contains(*cb.parse_ip("10.1.3.200"))
    assert not prefix.contains(*cb.parse_ip("10.1.4.0"))
    assert not prefix.contains(6, 0x0A010203)
    v6 = cb.Prefix.parse("fd00:1:2:3:4::1/64")
    assert v6.network_text() == "fd00:1:2:3::/64"
    assert cb.ip_to_text(6, v6.last) == "fd00:1:2:3:ffff:ffff:ffff:ffff"
    assert cb.Prefix.parse("0.0.0.0/0").contains(4, 0xFFFFFFFF)
    assert cb.Prefix.parse("10.0.0.0/8") == cb.Prefix.parse("10.0.0.0/8")
    assert cb.Prefix.parse("10.0.0.0/8") != cb.Prefix.parse("10.0.0.0/9")
    assert len({cb.Prefix.parse("10.0.0.0/8"), cb.Prefix.parse("10.0.0.0/8")}) == 1


def test_prefix_agrees_with_ipaddress():
    rng = random.Random(7)
    for _ in range(2000):
        family = rng.choice((4, 6))
        bits = 32 if family == 4 else 128
        value, length = rng.getrandbits(bits), rng.randint(0, bits)
        if family == 6 and is_ipv4_mapped(value):
            continue
        text = "%s/%d" % (ipaddress.ip_address(value) if family == 4 else ipaddress.IPv6Address(value), length)
        prefix = cb.Prefix.parse(text)
        net = ipaddress.ip_interface(text).network
        assert prefix.network_text() == str(net)
        assert prefix.last == int(net.broadcast_address)


def test_mac_parse_and_text():
    assert cb.parse_mac("0A:58:0a:01:00:FF") == bytes([10, 0x58, 10, 1, 0, 0xFF])
    assert cb.mac_to_text(bytes([10, 0x58, 10, 1, 0, 0xFF])) == "0a:58:0a:01:00:ff"
    for bad in ("", "0a:58:0a:01:00", "0a:58:0a:01:00:ff:11", "0a-58-0a-01-00-ff", "0a:58:0a:01:00:fg",
                "a:58:0a:01:00:ff0", None, 5):
        with pytest.raises(ValueError):
            cb.parse_mac(bad)


# --- attribute codec ------------------------------------------------------------------------------

HEADER = cb.Header("=BxHi", ("family", "type", "index"))


Inner = cb.AttrSpace(
    IN_U32=cb.Attr(1, cb.U32),
    IN_STR=cb.Attr(2, cb.STR),
)


Sample = cb.AttrSpace(
    S_U8=cb.Attr(1, cb.U8),
    S_U16=cb.Attr(2, cb.U16),
    S_U32=cb.Attr(3, cb.U32),
    S_S32=cb.Attr(4, cb.S32),
    S_U64=cb.Attr(5, cb.U64),
    S_BE16=cb.Attr(6, cb.BE16),
    S_BE32=cb.Attr(7, cb.BE32),
    S_BE64=cb.Attr(8, cb.BE64),
    S_STR=cb.Attr(9, cb.STR),
    S_BYTES=cb.Attr(10, cb.BYTES),
    S_FLAG=cb.Attr(11, cb.FLAG),
    S_NEST=cb.Attr(12, cb.NEST, Inner),
    S_RAW_NEST=cb.Attr(13, cb.NEST),
    S_MSG=cb.Attr(14, cb.MSG, Inner, HEADER),
    S_LIST=cb.Attr(15, cb.U32, repeated=True),
)


def attrs_at(data):
    """(length, type, payload) of each top-level attribute, walking the raw bytes."""
    out, offset = [], 0
    while offset < len(data):
        length, number = struct.unpack_from("=HH", data, offset)
        out.append((length, number, data[offset + 4:offset + length]))
        offset += (length + 3) & ~3
    assert offset == len(data)
    return out


@pytest.mark.parametrize("attr, value, payload", [
    (Sample.S_U8, 0xAB, b"\xab"),
    (Sample.S_U16, 0x1234, struct.pack("=H", 0x1234)),
    (Sample.S_U32, 0xDEADBEEF, struct.pack("=I", 0xDEADBEEF)),
    (Sample.S_S32, -2, struct.pack("=i", -2)),
    (Sample.S_U64, 2 ** 64 - 1, b"\xff" * 8),
    (Sample.S_BE16, 0x1234, b"\x12\x34"),
    (Sample.S_BE32, 0x01020304, b"\x01\x02\x03\x04"),
    (Sample.S_BE64, 0x0102030405060708, bytes(range(1, 9))),
    (Sample.S_STR, "eth0", b"eth0\0"),
    (Sample.S_STR, "", b"\0"),
    (Sample.S_STR, "é", "é".encode() + b"\0"),
    (Sample.S_BYTES, b"\x01\x02\x03", b"\x01\x02\x03"),
    (Sample.S_BYTES, b"", b""),
])
def test_scalar_round_trip_and_wire_layout(attr, value, payload):
    data = cb.encode_attrs([(attr, value)])
    assert len(data) % 4 == 0
    assert len(data) == (4 + len(payload) + 3) & ~3
    [(length, number, raw)] = attrs_at(data)
    assert (length, number, raw) == (4 + len(payload), attr.number, payload)
    assert data[length:] == b"\0" * (len(data) - length)          # padding is zeros
    assert cb.decode_attrs(Sample, data) == {attr: value}


def test_flag_round_trip():
    data = cb.encode_attrs([(Sample.S_FLAG, True)])
    assert data == struct.pack("=HH", 4, Sample.S_FLAG.number)
    assert Sample.S_FLAG in cb.decode_attrs(Sample, data)


def test_nested_round_trip_sets_nla_f_nested():
    data = cb.encode_attrs([(Sample.S_NEST, ((Inner.IN_U32, 7), (Inner.IN_STR, "abcde")))])
    [(length, number, payload)] = attrs_at(data)
    assert number == Sample.S_NEST.number | cb.NLA_F_NESTED
    assert [(n, p) for _, n, p in attrs_at(payload)] == [(1, struct.pack("=I", 7)), (2, b"abcde\0")]
    assert cb.decode_attrs(Sample, data) == {Sample.S_NEST: {Inner.IN_U32: 7, Inner.IN_STR: "abcde"}}


def test_empty_and_raw_nests():
    data = cb.encode_attrs([(Sample.S_NEST, ()), (Sample.S_RAW_NEST, b"\x01\x00\x00\x00")])
    (_, n1, p1), (_, n2, p2) = attrs_at(data)
    assert (n1, p1) == (Sample.S_NEST.number | cb.NLA_F_NESTED, b"")
    assert (n2, p2) == (Sample.S_RAW_NEST.number | cb.NLA_F_NESTED, b"\x01\x00\x00\x00")
    assert cb.decode_attrs(Sample, data) == {Sample.S_NEST: {}, Sample.S_RAW_NEST: b"\x01\x00\x00\x00"}


def test_msg_round_trip():
    value = ({"family": 2, "type": 1, "index": -5}, ((Inner.IN_STR, "peer0"), (Inner.IN_U32, 9)))
    data = cb.encode_attrs([(Sample.S_MSG, value)])
    [(length, number, payload)] = attrs_at(data)
    assert number == Sample.S_MSG.number | cb.NLA_F_NESTED
    assert payload[:HEADER.struct.size] == struct.pack("=BxHi", 2, 1, -5)
    header, attrs = cb.decode_attrs(Sample, data)[Sample.S_MSG]
    assert header == {"family": 2, "type": 1, "index": -5}
    assert attrs == {Inner.IN_STR: "peer0", Inner.IN_U32: 9}


def test_header_pack_refuses_a_field_it_does_not_have():
    assert HEADER.pack({"index": 3}) != HEADER.pack({})
    with pytest.raises(ValueError, match="idx"):
        cb.IFINFOMSG.pack({"idx": 3})
    with pytest.raises(ValueError):
        cb.encode_message(cb.MESSAGE_LAYOUTS[cb.NETLINK_ROUTE], cb.RTM_GETLINK, 0, 1, {"idnex": 1}, ())


def test_netlink_request_names_its_parts():
    request = cb.NetlinkRequest(cb.RTM_GETLINK, header={"index": 4})
    assert (request.msg_type, request.flags, request.header, request.attrs) == (cb.RTM_GETLINK, 0,
                                                                                {"index": 4}, ())
    assert tuple(request) == (cb.RTM_GETLINK, 0, {"index": 4}, ())


def test_repeated_attrs_decode_into_a_list():
    data = cb.encode_attrs([(Sample.S_LIST, 1), (Sample.S_U8, 5), (Sample.S_LIST, 2), (Sample.S_LIST, 3)])
    assert cb.decode_attrs(Sample, data) == {Sample.S_LIST: [1, 2, 3], Sample.S_U8: 5}


def test_every_kind_together_with_alignment():
    pairs = [(Sample.S_U8, 1), (Sample.S_STR, "abc"), (Sample.S_U16, 2), (Sample.S_STR, "abcd"),
             (Sample.S_BYTES, b"\x01\x02\x03\x04\x05"), (Sample.S_U64, 3), (Sample.S_BE16, 4),
             (Sample.S_FLAG, True), (Sample.S_NEST, ((Inner.IN_STR, "x"),)), (Sample.S_BE64, 5),
             (Sample.S_MSG, ({"family": 7}, ())), (Sample.S_S32, -1), (Sample.S_BE32, 6),
             (Sample.S_U32, 7), (Sample.S_LIST, 8)]
    data = cb.encode_attrs(pairs)
    lengths = [length for length, _, _ in attrs_at(data)]
    assert lengths == [5, 8, 6, 9, 9, 12, 6, 4, 4 + 8, 12, 4 + 8, 8, 8, 8, 8]
    decoded = cb.decode_attrs(Sample, data)
    assert decoded[Sample.S_STR] == "abcd"                  # not repeated: the last one wins
    assert decoded[Sample.S_NEST] == {Inner.IN_STR: "x"}
    assert decoded[Sample.S_MSG] == ({"family": 7, "type": 0, "index": 0}, {})
    assert decoded[Sample.S_LIST] == [8]
    assert decoded[Sample.S_S32] == -1


def test_decode_skips_unknown_and_masks_flag_bits():
    data = (struct.pack("=HH", 8, 99) + b"\0" * 4
            + struct.pack("=HH", 8, Sample.S_U32.number | 0x4000) + struct.pack("=I", 42))
    assert cb.decode_attrs(Sample, data) == {Sample.S_U32: 42}


def test_decode_tolerates_truncation():
    good = cb.encode_attrs([(Sample.S_U8, 1)])
    assert cb.decode_attrs(Sample, good + b"\x00\x00") == {Sample.S_U8: 1}         # short tail
    assert cb.decode_attrs(Sample, good + struct.pack("=HH", 2, 1)) == {Sample.S_U8: 1}  # length < 4
    short = struct.pack("=HH", 6, Sample.S_U32.number) + b"\x01\x02"                  # u32 with 2 bytes
    assert cb.decode_attrs(Sample, short) == {Sample.S_U32: None}


def test_attr_space_names_and_indexes():
    assert Sample.by_number[3] is Sample.S_U32
    assert repr(Sample.S_U32) == "S_U32"
    assert cb.LinkAttr.by_number[3] is cb.LinkAttr.IFLA_IFNAME


# --- messages -------------------------------------------------------------------------------------

ROUTE = cb.MESSAGE_LAYOUTS[cb.NETLINK_ROUTE]


def test_encode_message_header_fields():
    attrs = [(cb.LinkAttr.IFLA_IFNAME, "br0"), (cb.LinkAttr.IFLA_MTU, 1400)]
    data = cb.encode_message(ROUTE, cb.RTM_NEWLINK, cb.NLM_F_REQUEST | cb.NLM_F_ACK | cb.NLM_F_CREATE, 4242,
                             {"family": cb.AF_BRIDGE, "index": 7, "flags": 1, "change": 1}, attrs)
    length, msg_type, flags, seq, port = struct.unpack_from("=IHHII", data)
    assert (length, msg_type, flags, seq, port) == (len(data), 16, 0x405, 4242, 0)
    assert data[16:32] == struct.pack("=BxHiII", 7, 0, 7, 1, 1)
    assert data[32:] == cb.encode_attrs(attrs)
    [(t, f, s, payload)] = cb.decode_messages(data)
    assert (t, f, s) == (16, 0x405, 4242)
    msg = cb.decode_payload(ROUTE, t, f, payload)
    assert msg.header == {"family": 7, "type": 0, "index": 7, "flags": 1, "change": 1}
    assert msg.get(cb.LinkAttr.IFLA_IFNAME) == "br0" and msg.get(cb.LinkAttr.IFLA_MTU) == 1400


def test_header_layout_sizes():
    assert cb.IFINFOMSG.struct.size == 16
    assert cb.IFADDRMSG.struct.size == 8
    assert cb.RTMSG.struct.size == 12
    assert cb.NLMSG_HEADER.size == 16


def test_decode_messages_splits_a_datagram():
    one = cb.encode_message(ROUTE, cb.RTM_NEWADDR, 2, 1, {"family": 2, "prefixlen": 24, "index": 3},
                            [(cb.AddrAttr.IFA_LOCAL, b"\x0a\0\0\x01")])
    two = cb.encode_message(ROUTE, cb.RTM_NEWROUTE, 2, 1, {"family": 10, "dst_len": 64, "table": 254}, [])
    done = struct.pack("=IHHII", 20, cb.NLMSG_DONE, 2, 1, 0) + b"\0" * 4
    messages = cb.decode_messages(one + two + done)
    assert [m[0] for m in messages] == [cb.RTM_NEWADDR, cb.RTM_NEWROUTE, cb.NLMSG_DONE]
    addr = cb.decode_payload(ROUTE, *messages[0][:2], messages[0][3])
    assert addr.header["prefixlen"] == 24 and addr.get(cb.AddrAttr.IFA_LOCAL) == b"\x0a\0\0\x01"
    route = cb.decode_payload(ROUTE, *messages[1][:2], messages[1][3])
    assert route.header["dst_len"] == 64 and route.header["table"] == 254


def test_veth_request_layout():
    """The veth peer travels as VETH_INFO_PEER: an ifinfomsg followed by link attributes."""
    peer = [(cb.LinkAttr.IFLA_IFNAME, "vethabc"), (cb.LinkAttr.IFLA_NET_NS_FD, 5)]
    data = cb.encode_attrs([(cb.LinkAttr.IFLA_LINKINFO, (
        (cb.LinkInfoAttr.IFLA_INFO_KIND, "veth"),
        (cb.LinkInfoAttr.IFLA_INFO_DATA, ((cb.VethAttr.VETH_INFO_PEER, ({}, peer)),))))])
    linkinfo = cb.decode_attrs(cb.LinkAttr, data)[cb.LinkAttr.IFLA_LINKINFO]
    assert linkinfo[cb.LinkInfoAttr.IFLA_INFO_KIND] == "veth"
    raw = linkinfo[cb.LinkInfoAttr.IFLA_INFO_DATA]
    header, attrs = cb.decode_attrs(cb.VethAttr, raw)[cb.VethAttr.VETH_INFO_PEER]
    assert header == {"family": 0, "type": 0, "index": 0, "flags": 0, "change": 0}
    assert attrs == {cb.LinkAttr.IFLA_IFNAME: "vethabc", cb.LinkAttr.IFLA_NET_NS_FD: 5}


def test_ack_error_with_extended_ack():
    echoed = struct.pack("=IHHII", 16, cb.RTM_NEWLINK, 5, 1, 0)
    payload = struct.pack("=i", -17) + echoed + cb.encode_attrs([(cb._ExtAck.NLMSGERR_ATTR_MSG, "File exists")])
    assert cb._ack_error(payload, cb.NLM_F_ACK_TLVS) == (17, "File exists")
    assert cb._ack_error(struct.pack("=i", 0) + echoed, 0) == (0, "")


def test_netlink_error_codes():
    assert cb.NetlinkError(17, "create").code == 999
    assert cb.NetlinkError(16, "create").code == 11
    err = cb.NetlinkError(1, "failed to add", "bad attribute")
    assert err.msg == "failed to add: %s (bad attribute)" % os.strerror(1)
    assert err.errno == 1


def test_requests_built_for_transact():
    prefix = cb.Prefix.parse("10.0.0.5/24")
    msg_type, flags, header, attrs = cb.addr_request(3, prefix, nodad=True)
    assert (msg_type, flags) == (cb.RTM_NEWADDR, cb.NLM_F_CREATE | cb.NLM_F_EXCL)
    assert header == {"family": cb.AF_INET, "prefixlen": 24, "index": 3}
    assert dict(attrs) == {cb.AddrAttr.IFA_LOCAL: b"\x0a\0\0\x05", cb.AddrAttr.IFA_ADDRESS: b"\x0a\0\0\x05",
                           cb.AddrAttr.IFA_FLAGS: cb.IFA_F_NODAD}
    assert cb.addr_request(3, prefix, remove=True)[:2] == (cb.RTM_DELADDR, 0)
    route = cb.route_request(cb.Prefix.parse("10.9.0.0/16"), (4, 0x0A000001), 3, table=1000, mtu=1400)
    assert route.msg_type == cb.RTM_NEWROUTE and route.flags == cb.NLM_F_CREATE
    header, attrs = route.header, dict(route.attrs)
    assert header["table"] == cb.RT_TABLE_MAIN and attrs[cb.RouteAttr.RTA_TABLE] == 1000
    assert header["scope"] == cb.RT_SCOPE_UNIVERSE
    assert attrs[cb.RouteAttr.RTA_METRICS] == [(cb.RouteMetricAttr.RTAX_MTU, 1400)]
    default = cb.route_request(cb.Prefix.parse("0.0.0.0/0"), None, 3)
    assert cb.RouteAttr.RTA_DST not in dict(default[3]) and default[2]["scope"] == cb.RT_SCOPE_LINK


# --- round trips through the kernel ---------------------------------------------------------------
# Everything below happens in a namespace made by conftest's make_netns; the plugin's Netns only
# switches this thread in to open a socket and back out.

def own_netns_id():
    st = os.stat("/proc/self/ns/net")
    return st.st_dev, st.st_ino


@pytest.fixture
def kernel(make_netns):
    """(conftest Netns, cni_bridge Netns, NetlinkSocket inside it); checks we end where we began."""
    if os.geteuid() != 0:
        pytest.skip("kernel round trips need root")
    before = own_netns_id()
    ns = make_netns("unit")
    plugin_ns = cb.Netns(ns.path)
    nl = plugin_ns.netlink()
    assert own_netns_id() == before
    try:
        yield ns, plugin_ns, nl
    finally:
        nl.close()
        plugin_ns.close()
        assert own_netns_id() == before


def link_json(ns, name):
    [entry] = ns.ip_json("-d", "link", "show", "dev", name)
    return entry


def not_on_the_machine(name):
    """The link must not exist in the machine's own namespace."""
    assert subprocess.run(["ip", "link", "show", "dev", name], capture_output=True).returncode != 0


def test_dump_links_decodes_lo(kernel):
    ns, _, nl = kernel
    links = cb.list_links(nl)
    assert [link.name for link in links] == ["lo"]
    lo = links[0]
    expected = link_json(ns, "lo")
    assert lo.index == expected["ifindex"]
    assert lo.mtu == expected["mtu"]
    assert lo.mac == expected["address"] == "00:00:00:00:00:00"
    assert lo.kind == ""
    assert lo.up == ("UP" in expected["flags"])
    assert cb.OPERSTATE_NAMES[lo.operstate].upper() == expected["operstate"]
    assert cb.get_link(nl, "lo").index == lo.index
    assert cb.get_link(nl, index=lo.index).name == "lo"
    assert cb.get_link(nl, "nosuchlink") is None


def test_create_bridge_read_back(kernel):
    ns, _, nl = kernel
    assert cb.create_bridge(nl, "cbtubr0", mtu=1400) is True
    assert cb.create_bridge(nl, "cbtubr0", mtu=1400) is False          # EEXIST tolerated
    entry = link_json(ns, "cbtubr0")
    assert entry["linkinfo"]["info_kind"] == "bridge"
    assert entry["mtu"] == 1400
    assert entry["linkinfo"]["info_data"]["vlan_filtering"] == 0
    bridge = cb.get_link(nl, "cbtubr0")
    assert (bridge.index, bridge.kind, bridge.mtu, bridge.mac) == \
        (entry["ifindex"], "bridge", 1400, entry["address"])
    assert not bridge.up
    cb.set_link(nl, bridge.index, "up", up=True, mac="0a:58:00:00:00:01", promisc=True)
    entry = link_json(ns, "cbtubr0")
    assert "UP" in entry["flags"] and "PROMISC" in entry["flags"] and entry["address"] == "0a:58:00:00:00:01"
    not_on_the_machine("cbtubr0")


def test_create_bridge_with_vlan_filtering(kernel):
    ns, _, nl = kernel
    try:
        cb.create_bridge(nl, "cbtubr1", vlan_filtering=True)
    except cb.NetlinkError as err:
        if err.errno == 95:
            pytest.skip("this kernel has no bridge VLAN filtering")
        raise
    assert link_json(ns, "cbtubr1")["linkinfo"]["info_data"]["vlan_filtering"] == 1


def test_address_round_trip(kernel):
    ns, _, nl = kernel
    cb.create_bridge(nl, "cbtubr0")
    index = cb.get_link(nl, "cbtubr0").index
    v4, v6 = cb.Prefix.parse("10.99.0.7/24"), cb.Prefix.parse("fd00:99:0:0::7/64")
    nl.transact([cb.addr_request(index, v4), cb.addr_request(index, v6, nodad=True)], "add")
    assert ns.addrs("cbtubr0") == [("inet", "10.99.0.7/24"), ("inet6", "fd00:99::7/64")]
    listed = dict((a.prefix.family, a) for a in cb.list_addrs(nl, index))
    assert listed[4].prefix == v4 and listed[6].prefix == v6
    assert listed[6].flags & cb.IFA_F_NODAD and not listed[6].flags & cb.IFA_F_TENTATIVE
    assert all(a.index == index for a in listed.values())
    assert [a.prefix for a in cb.list_addrs(nl, index, 6)] == [v6]
    with pytest.raises(cb.NetlinkError) as err:
        nl.request(*cb.addr_request(index, v4)[:4], what="again")
    assert err.value.errno == 17
    nl.transact([cb.addr_request(index, v4, remove=True)], "remove")
    assert ns.addrs("cbtubr0") == [("inet6", "fd00:99::7/64")]


def test_route_round_trip(kernel):
    ns, _, nl = kernel
    cb.create_bridge(nl, "cbtubr0")
    index = cb.get_link(nl, "cbtubr0").index
    cb.set_link(nl, index, "up", up=True)
    nl.transact([cb.addr_request(index, cb.Prefix.parse("10.99.0.1/24"))])
    gateway = cb.parse_ip("10.99.0.254")
    nl.transact([cb.route_request(cb.Prefix.parse("10.98.0.0/16"), gateway, index, priority=7)])
    routes = [r for r in cb.list_routes(nl, 4) if r.dst == cb.Prefix.parse("10.98.0.0/16")]
    assert [(r.gateway, r.oif, r.table) for r in routes] == [(gateway, index, cb.RT_TABLE_MAIN)]
    [kernel_route] = ns.ip_json("route", "show", "10.98.0.0/16")
    assert (kernel_route["gateway"], kernel_route["dev"], kernel_route["metric"]) == ("10.99.0.254", "cbtubr0", 7)


def test_veth_and_bridge_port_round_trip(kernel):
    ns, plugin_ns, nl = kernel
    cb.create_bridge(nl, "cbtubr0")
    cb.create_veth(nl, "cbtuv0", "cbtuv1", plugin_ns.fd, mtu=1400, mac="0a:58:00:00:00:02")
    v0, v1 = cb.get_link(nl, "cbtuv0"), cb.get_link(nl, "cbtuv1")
    assert (v0.kind, v1.kind) == ("veth", "veth")
    assert (v0.peer_index, v1.peer_index) == (v1.index, v0.index)
    assert (v0.mtu, v0.mac) == (1400, "0a:58:00:00:00:02")
    bridge = cb.get_link(nl, "cbtubr0")
    cb.set_link(nl, v0.index, "enslave", master=bridge.index)
    nl.transact([cb.bridge_port_change(v0.index, hairpin=True, isolated=True)])
    port = link_json(ns, "cbtuv0")
    assert port["master"] == "cbtubr0"
    assert port["linkinfo"]["info_slave_kind"] == "bridge"
    assert port["linkinfo"]["info_slave_data"]["hairpin"] is True
    assert port["linkinfo"]["info_slave_data"]["isolated"] is True
    v0 = cb.get_link(nl, "cbtuv0")
    assert v0.master == bridge.index
    assert v0.port == {cb.BridgePortAttr.IFLA_BRPORT_MODE: 1, cb.BridgePortAttr.IFLA_BRPORT_ISOLATED: 1}
    nl.transact([cb.bridge_port_change(v0.index, hairpin=False, isolated=False)])
    assert link_json(ns, "cbtuv0")["linkinfo"]["info_slave_data"]["hairpin"] is False
    cb.delete_link(nl, v0.index)
    cb.delete_link(nl, v0.index)                                    # already gone: no error
    assert cb.get_link(nl, "cbtuv1") is None
    not_on_the_machine("cbtuv0")


# --- bridge VLANs ---------------------------------------------------------------------------------
# This machine's kernel may lack bridge VLAN filtering, so the requests are checked on the wire
# format here and in the kernel by test_bridge.py where it has it.

PVID_UNTAGGED = cb.BRIDGE_VLAN_INFO_PVID | cb.BRIDGE_VLAN_INFO_UNTAGGED


@pytest.mark.parametrize("vlan, trunk, preserve, wanted, exclusive", [
    (0, None, False, {}, False),                            # no VLANs at all
    (0, [], False, {}, False),                              # `vlanTrunk: []`: filtering, no entries
    (100, None, False, {100: PVID_UNTAGGED}, True),         # access VLAN, default PVID removed
    (100, None, True, {100: PVID_UNTAGGED}, False),         # preserveDefaultVlan keeps it
    (0, [101, 200, 201], False, {1: PVID_UNTAGGED, 101: 0, 200: 0, 201: 0}, True),   # native VLAN 1
    (100, [200, 300], False, {100: PVID_UNTAGGED, 200: 0, 300: 0}, True),
    (100, [100, 200], False, {100: 0, 200: 0}, True),       # the reference lets the trunk win
])
def test_port_vlan_plan(vlan, trunk, preserve, wanted, exclusive):
    assert cb.port_vlan_plan(vlan, trunk, preserve) == (wanted, exclusive)


def decode_request(request):
    """A request tuple as the kernel receives it: encoded, then decoded by the one decoder."""
    msg_type, flags, header, attrs = request
    [(got_type, _flags, _seq, payload)] = cb.decode_messages(
        cb.encode_message(cb.MESSAGE_LAYOUTS[cb.NETLINK_ROUTE], msg_type, flags, 1, header, attrs))
    return cb.decode_payload(cb.MESSAGE_LAYOUTS[cb.NETLINK_ROUTE], got_type, flags, payload)


def test_vlan_changes_wire_format():
    """Removals of the VLANs the port should lose, then one add per wanted VLAN, each an AF_BRIDGE
    request for the port (RTM_DELLINK / RTM_SETLINK) with BRIDGE_FLAGS_MASTER and one vlan_info."""
    requests = cb.vlan_changes(7, {1: PVID_UNTAGGED, 200: 0}, {100: PVID_UNTAGGED, 200: 0})
    decoded = [decode_request(r) for r in requests]
    assert [m.type for m in decoded] == [cb.RTM_DELLINK, cb.RTM_SETLINK, cb.RTM_SETLINK]
    entries = []
    for msg in decoded:
        assert (msg.header["family"], msg.header["index"]) == (cb.AF_BRIDGE, 7)
        spec = cb.decode_attrs(cb.BridgeAfSpecAttr, msg.get(cb.LinkAttr.IFLA_AF_SPEC))
        assert spec[cb.BridgeAfSpecAttr.IFLA_BRIDGE_FLAGS] == cb.BRIDGE_FLAGS_MASTER
        [raw] = spec[cb.BridgeAfSpecAttr.IFLA_BRIDGE_VLAN_INFO]
        entries.append(struct.unpack("=HH", raw))          # struct bridge_vlan_info: flags, vid
    assert entries == [(0, 1), (PVID_UNTAGGED, 100), (0, 200)]


class RecordingNetlink(object):
    """Stands in for NetlinkSocket: answers dumps with given messages and records transactions."""

    def __init__(self, dump_replies=()):
        self.dump_replies = list(dump_replies)
        self.dumps, self.transactions = [], []

    def dump(self, msg_type, header=None, attrs=(), what=""):
        self.dumps.append((msg_type, header, list(attrs)))
        return self.dump_replies

    def transact(self, requests, what="", batch=None):
        self.transactions.append(list(requests))
        return [[] for _ in requests]


def kernel_vlan_message(index, vlans):
    """An RTM_NEWLINK of an AF_BRIDGE dump as the kernel sends it for a port with `vlans`."""
    spec = [(cb.BridgeAfSpecAttr.IFLA_BRIDGE_VLAN_INFO, struct.pack("=HH", flags, vid)) for vid, flags in vlans]
    return decode_request((cb.RTM_NEWLINK, 0, {"family": cb.AF_BRIDGE, "index": index},
                           [(cb.LinkAttr.IFLA_IFNAME, "veth%d" % index), (cb.LinkAttr.IFLA_MASTER, 3),
                            (cb.LinkAttr.IFLA_AF_SPEC, spec)]))


def test_port_vlans_reads_one_port_of_the_dump():
    nl = RecordingNetlink([kernel_vlan_message(5, [(1, PVID_UNTAGGED)]),
                           kernel_vlan_message(7, [(1, cb.BRIDGE_VLAN_INFO_UNTAGGED), (100, PVID_UNTAGGED)]),
                           kernel_vlan_message(9, [])])
    assert cb.port_vlans(nl, 7) == {1: cb.BRIDGE_VLAN_INFO_UNTAGGED, 100: PVID_UNTAGGED}
    assert cb.port_vlans(nl, 9) == {} and cb.port_vlans(nl, 4) == {}
    msg_type, header, attrs = nl.dumps[0]
    assert (msg_type, header) == (cb.RTM_GETLINK, {"family": cb.AF_BRIDGE})
    assert attrs == [(cb.LinkAttr.IFLA_EXT_MASK, cb.RTEXT_FILTER_BRVLAN)]


def test_set_port_vlans_removes_the_default_unless_preserved():
    port = type("Port", (), {"index": 7, "name": "veth7"})()
    nl = RecordingNetlink([kernel_vlan_message(7, [(1, PVID_UNTAGGED)])])
    cb.set_port_vlans(nl, port, *cb.port_vlan_plan(100, [200], False))
    [requests] = nl.transactions
    assert [(r[0], struct.unpack("=HH", dict(dict(r[3])[cb.LinkAttr.IFLA_AF_SPEC])[
        cb.BridgeAfSpecAttr.IFLA_BRIDGE_VLAN_INFO])) for r in requests] == \
        [(cb.RTM_DELLINK, (0, 1)), (cb.RTM_SETLINK, (PVID_UNTAGGED, 100)), (cb.RTM_SETLINK, (0, 200))]
    preserved = RecordingNetlink([kernel_vlan_message(7, [(1, PVID_UNTAGGED)])])
    cb.set_port_vlans(preserved, port, *cb.port_vlan_plan(100, None, True))
    assert preserved.dumps == [] and [r[0] for r in preserved.transactions[0]] == [cb.RTM_SETLINK]
    untouched = RecordingNetlink()
    cb.set_port_vlans(untouched, port, *cb.port_vlan_plan(0, [], False))
    assert untouched.dumps == untouched.transactions == []


def test_check_port_vlans_names_what_differs():
    port = type("Port", (), {"index": 7, "name": "veth7"})()
    good = RecordingNetlink([kernel_vlan_message(7, [(100, PVID_UNTAGGED), (200, 0)])])
    cb.check_port_vlans(good, port, *cb.port_vlan_plan(100, [200], False))
    tagged = RecordingNetlink([kernel_vlan_message(7, [(100, 0), (200, 0)])])
    with pytest.raises(cb.CNIError, match="VLAN 100 of veth7 is tagged, the config says untagged PVID"):
        cb.check_port_vlans(tagged, port, *cb.port_vlan_plan(100, [200], False))
    extra = RecordingNetlink([kernel_vlan_message(7, [(1, PVID_UNTAGGED), (100, PVID_UNTAGGED)])])
    with pytest.raises(cb.CNIError, match="carries VLANs 1 that"):
        cb.check_port_vlans(extra, port, *cb.port_vlan_plan(100, None, False))
    cb.check_port_vlans(extra, port, *cb.port_vlan_plan(100, None, True))     # preserved: allowed


def test_port_vlans_of_a_real_port(kernel):
    """The AF_BRIDGE dump parses on this kernel: a port of a bridge without filtering has none."""
    _, plugin_ns, nl = kernel
    cb.create_bridge(nl, "cbtubr0")
    cb.create_veth(nl, "cbtuv0", "cbtuv1")
    bridge, port = cb.get_link(nl, "cbtubr0"), cb.get_link(nl, "cbtuv0")
    cb.set_link(nl, port.index, "enslave", master=bridge.index)
    assert cb.port_vlans(nl, port.index) in ({}, {1: PVID_UNTAGGED})


def vlan_gateway_conf(bridge="cbtubr0", vlan=100):
    return type("Conf", (), {"bridge": bridge, "vlan": vlan, "vlan_gateway": "%s.%d" % (bridge, vlan),
                             "preserve_default_vlan": False})()


def test_ensure_vlan_gateway_in_the_kernel(kernel, monkeypatch):
    """`<bridge>.<vlan>` is a veth made on the node whose peer is an up port of the bridge with the
    VLAN as PVID; a second call reuses it, and a pair left half set up is completed.  The VLAN
    requests themselves are recorded (checked above), since this kernel may refuse them."""
    ns, _, nl = kernel
    vlan_calls, given = [], {}

    def record_vlans(nl, port, wanted, exclusive):
        vlan_calls.append((port.name, wanted, exclusive))
        given[port.index] = dict(wanted)

    monkeypatch.setattr(cb, "set_port_vlans", record_vlans)
    monkeypatch.setattr(cb, "port_vlans", lambda nl, index: given.get(index, {}))
    cb.create_bridge(nl, "cbtubr0", mtu=1400)
    bridge = cb.get_link(nl, "cbtubr0")
    gateway = cb.ensure_vlan_gateway(nl, vlan_gateway_conf(), bridge)
    entry = link_json(ns, "cbtubr0.100")
    assert entry["linkinfo"]["info_kind"] == "veth" and "UP" in entry["flags"] and entry["mtu"] == 1400
    port = cb.get_link(nl, index=gateway.peer_index)
    port_entry = link_json(ns, port.name)
    assert port_entry["master"] == "cbtubr0" and "UP" in port_entry["flags"]
    assert port.name.startswith("veth") and len(port.name) == 12
    assert vlan_calls == [(port.name, {100: PVID_UNTAGGED}, True)]
    assert cb.ensure_vlan_gateway(nl, vlan_gateway_conf(), bridge).index == gateway.index
    assert len(vlan_calls) == 1                                   # nothing to redo
    ns.run("ip", "link", "set", port.name, "nomaster")            # as if an ADD died half way
    given.clear()                                                 # a port leaving a bridge loses its VLANs
    assert cb.ensure_vlan_gateway(nl, vlan_gateway_conf(), bridge).index == gateway.index
    assert link_json(ns, port.name)["master"] == "cbtubr0" and len(vlan_calls) == 2
    given.clear()                                                 # enslaved, but killed before its VLAN
    assert cb.ensure_vlan_gateway(nl, vlan_gateway_conf(), bridge).index == gateway.index
    assert len(vlan_calls) == 3 and vlan_calls[-1] == (port.name, {100: PVID_UNTAGGED}, True)
    not_on_the_machine("cbtubr0.100")


def test_ensure_vlan_gateway_refuses_a_foreign_link(kernel):
    ns, _, nl = kernel
    cb.create_bridge(nl, "cbtubr0")
    cb.create_bridge(nl, "cbtubr0.7")
    with pytest.raises(cb.CNIError, match="'cbtubr0.7' already exists but is not a veth pair"):
        cb.ensure_vlan_gateway(nl, vlan_gateway_conf(vlan=7), cb.get_link(nl, "cbtubr0"))


# --- deadlines ------------------------------------------------------------------------------------
# A kernel that never answers and an IPv6 address that never leaves the tentative state both end
# in code 11 ("try again") instead of a hang.  The deadlines are shortened for the test.

def test_netlink_deadline_is_code_11(kernel, monkeypatch):
    """A request whose answer never comes: the socket's receive times out into code 11."""
    _, plugin_ns, _ = kernel
    monkeypatch.setattr(cb, "NETLINK_TIMEOUT", 0.2)
    nl = plugin_ns.netlink()
    try:
        with pytest.raises(cb.CNIError) as caught:
            nl._recv("waiting for an answer that was never asked for")
    finally:
        nl.close()
    assert caught.value.code == 11
    assert "did not answer within 0.2 s" in caught.value.msg


def test_ipv6_settle_deadline_is_code_11(kernel, monkeypatch):
    """An IPv6 address on a link without carrier stays tentative (DAD cannot run): waiting for it
    to settle ends in code 11 after the deadline, naming the wait."""
    ns, _, nl = kernel
    monkeypatch.setattr(cb, "IPV6_SETTLE_TIMEOUT", 0.3)
    cb.create_veth(nl, "cbtuv0", "cbtuv1")
    link = cb.get_link(nl, "cbtuv0")
    ns.run("sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/cbtuv0/accept_dad")
    cb.set_link(nl, link.index, "up", up=True)                     # its peer stays down: no carrier
    nl.transact([cb.addr_request(link.index, cb.Prefix.parse("fd00:99::5/64"))])
    [entry] = ns.ip_json("-6", "addr", "show", "dev", "cbtuv0", "scope", "global")
    assert entry["addr_info"][0].get("tentative") is True
    with pytest.raises(cb.CNIError) as caught:
        cb.wait_ipv6_settled(nl, link.index)
    assert caught.value.code == 11 and "still tentative after 0.3 s" in caught.value.msg


# --- nf_tables rule sets (shared by the rule-writing plugins) ---------------------------------------

def kernel_rule(handle, comment, chain="c"):
    """An NFT_MSG_NEWRULE of a rule dump as the kernel sends it."""
    return decode_request_nft((cb.NFT_MSG_NEWRULE, 0, {"family": cb.NFPROTO_INET},
                               [(cb.NftRuleAttr.NFTA_RULE_TABLE, "t"), (cb.NftRuleAttr.NFTA_RULE_CHAIN, chain),
                                (cb.NftRuleAttr.NFTA_RULE_HANDLE, handle),
                                (cb.NftRuleAttr.NFTA_RULE_USERDATA, cb.udata_comment(comment))]))


def decode_request_nft(request):
    data = cb.encode_message(cb.MESSAGE_LAYOUTS[cb.NETLINK_NETFILTER], request[0], request[1], 1,
                             request[2], request[3])
    [(msg_type, flags, _seq, payload)] = cb.decode_messages(data)
    return cb.decode_payload(cb.MESSAGE_LAYOUTS[cb.NETLINK_NETFILTER], msg_type, flags, payload)


def test_rules_are_found_by_comment_and_stale_ones_collected():
    nl = RecordingNetlink([kernel_rule(1, "aaaa, net: n"), kernel_rule(2, "bbbb, net: n"),
                           kernel_rule(3, "other rule")])
    assert [r.handle for r in cb.rules_commented(nl, cb.NFPROTO_INET, "t", "c", "bbbb")] == [2]
    batch = cb.NftBatch()
    owner = lambda rule: rule.comment.split(",")[0] if "net: n" in rule.comment else None
    cb.remove_stale_rules(batch, nl, cb.NFPROTO_INET, "t", "c", owner, {"aaaa"})
    removed = [dict(r.attrs)[cb.NftRuleAttr.NFTA_RULE_HANDLE] for r in batch.requests]
    assert removed == [2] and batch.requests[0].msg_type == cb.NFT_MSG_DELRULE


def test_commit_rebuilt_retries_a_transaction_refused_for_a_vanished_rule():
    class Refusing(RecordingNetlink):
        refusals = 2

        def transact(self, requests, what="", batch=None):
            assert batch == cb.NFT_BATCH
            RecordingNetlink.transact(self, requests, what, batch)
            if self.refusals:
                self.refusals -= 1
                raise cb.NetlinkError(cb.errno.ENOENT, what)
            return [[] for _ in requests]
    nl = Refusing()
    cb.commit_rebuilt(nl, lambda batch: batch.flush_chain(cb.NFPROTO_INET, "t", "c"), "flush")
    assert len(nl.transactions) == 3
    nl = Refusing()
    nl.refusals = 3
    with pytest.raises(cb.NetlinkError):
        cb.commit_rebuilt(nl, lambda batch: batch.flush_chain(cb.NFPROTO_INET, "t", "c"), "flush")


# --- traffic control (the bandwidth plugin's requests) ----------------------------------------------

def test_tc_requests_round_trip_through_the_codec():
    """The tc requests encode with the shared codec and decode back to what was asked: a tbf with
    a 64-bit rate, and a u32 filter whose one action is a mirred redirect."""
    layouts = cb.MESSAGE_LAYOUTS[cb.NETLINK_ROUTE]
    for rate in (1000000, 5 << 30):
        request = cb.tbf_request(7, rate, 12345, 678)
        wire = cb.encode_message(layouts, request.msg_type, request.flags, 1, request.header, request.attrs)
        (msg_type, flags, _seq, payload), = cb.decode_messages(wire)
        qdisc = cb.Qdisc(cb.decode_payload(layouts, msg_type, flags, payload))
        assert (qdisc.index, qdisc.kind, qdisc.handle, qdisc.parent) == (7, "tbf", 0x10000, 0xFFFFFFFF)
        assert (qdisc.rate, qdisc.limit, qdisc.buffer) == (rate, 12345, 678)
    request = cb.redirect_filter_request(7, 9)
    wire = cb.encode_message(layouts, request.msg_type, request.flags, 1, request.header, request.attrs)
    (msg_type, flags, _seq, payload), = cb.decode_messages(wire)
    msg = cb.decode_payload(layouts, msg_type, flags, payload)
    assert msg.header["info"] == (1 << 16) | 0x0300          # priority 1, ETH_P_ALL in network order
    options = cb.decode_attrs(cb.U32Attr, msg.get(cb.TcAttr.TCA_OPTIONS))
    assert options[cb.U32Attr.TCA_U32_CLASSID] == 0x10001
    actions = options[cb.U32Attr.TCA_U32_ACT]
    assert list(actions) == [cb.ActionListAttr.TCA_ACT_ORDER_1]
    action = actions[cb.ActionListAttr.TCA_ACT_ORDER_1]
    assert action[cb.ActionAttr.TCA_ACT_KIND] == "mirred"
    parms = cb.MIRRED_PARMS.unpack(action[cb.ActionAttr.TCA_ACT_OPTIONS][cb.MirredAttr.TCA_MIRRED_PARMS])
    assert parms[2] == 4 and parms[5:] == (1, 9)               # stolen; egress redirect to link 9


def bandwidth_request(**keys):
    config = dict({"cniVersion": "1.0.0", "name": "unit", "type": "bandwidth"}, **keys)
    return cb.Request("ADD", "ctr", "/run/netns/unit", "eth0", {}, "/opt/cni/bin", config, "1.0.0")


@pytest.mark.parametrize("rate, burst, rate_bytes, limit, buffer", [
    (8000000, 80000, 1000000, 35000, 156250),              # 10 ms of traffic: 10000 us, 15.625 ticks/us
    (16000000, 128000, 2000000, 66000, 125000),
    (8, 8, 1, 1, 15625000),                                # a byte per second, a one-byte bucket
    (10000000, (1 << 32) - 1, 1250000, 31250 + 536870911, (1 << 32) - 1),   # containerd's burst: clamped
    (10 ** 15, (1 << 32) - 1, 125 * 10 ** 12, (1 << 32) - 1, 62),     # 4 us of bucket; a 1 Pbit/s queue: clamped
])
def test_token_bucket_arithmetic(rate, burst, rate_bytes, limit, buffer):
    """Bits in the config, bytes and scheduler ticks in the kernel, with the reference's rounding;
    what the kernel cannot count is clamped to the largest it holds."""
    cb.PROCESS.ticks_per_usec = 15.625       # /proc/net/psched on every kernel since 2.6.x
    bucket = cb.TokenBucket(rate, burst, "ingress", "")
    assert (bucket.rate_bytes, bucket.limit, bucket.buffer) == (rate_bytes, limit, buffer)


def test_bandwidth_config_keys():
    """Keys in any case; runtimeConfig.bandwidth replaces the config's four; a rate without its
    burst, or a burst shorter than a clock tick, is code 7."""
    conf = cb.BandwidthConfig(bandwidth_request(INGRESSRATE=8000000, ingressburst=80000))
    assert (conf.ingress.rate, conf.ingress.burst, conf.egress) == (8000000, 80000, None)
    conf = cb.BandwidthConfig(bandwidth_request(ingressRate=8000000, ingressBurst=80000, runtimeConfig={
        "bandwidth": {"egressRate": 16000000, "egressBurst": 64000}}))
    assert conf.ingress is None and (conf.egress.rate, conf.egress.burst) == (16000000, 64000)
    for keys in ({"egressRate": 1000}, {"runtimeConfig": {"bandwidth": {"ingressBurst": 1000}}},
                 {"ingressRate": 10 ** 15, "ingressBurst": 8000}):
        with pytest.raises(cb.CNIError) as raised:
            cb.BandwidthConfig(bandwidth_request(**keys))
        assert raised.value.code == 7, keys
