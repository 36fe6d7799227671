"""Issue 20, a second look: each item's fix proved on the kernel and the disk.

Every test works in namespaces it makes (a "node" namespace where `bridge` runs, container
namespaces on its bridge) and a temporary dataDir; what the plugin did is read back with `ip -j`,
`iptables -S`, `/proc/sys` and the state files, never taken from the plugin's own answer.
"""
import json
import os
import shutil
import subprocess

import pytest

from tests.helpers import (IP, REF_DIR, REPO, cni_env, encode_conf, explain, ok, parse_output,
                           reservations, run, run_cni)

pytestmark = pytest.mark.kernel

NET = "slnet"
BRIDGE = "sl0"
SUBNETS = {4: "10.86.0.0/24", 6: "fd86::/64"}
TIMEOUT = 60


# --- configs, calls and read-backs ------------------------------------------------------------

def make_conf(data_dir, version="1.0.0", families=(4,), ipam=None, **options):
    """A gateway bridge with host-local IPAM on one range set per family; `ipam` keys override."""
    config = {"cniVersion": version, "name": NET, "type": "bridge", "bridge": BRIDGE, "isGateway": True,
              "ipam": {"type": "host-local", "dataDir": str(data_dir),
                       "ranges": [[{"subnet": SUBNETS[f]}] for f in families]}}
    config["ipam"].update(ipam or {})
    config.update(options)
    return config


def bridge(bin_dir, command, config, node, netns, cid="c1", **kwargs):
    """One `bridge` call inside the node namespace."""
    return run_cni(bin_dir, "bridge", command, config, node=node, netns=netns, container_id=cid,
                   timeout=TIMEOUT, **kwargs)


def cni_error(res, code):
    """The call failed the CNI way with `code`: non-zero exit, one error object, no traceback."""
    assert res.returncode != 0, explain(res)
    assert "Traceback" not in res.stdout + res.stderr, explain(res)
    assert isinstance(res.json, dict) and res.json.get("code") == code, explain(res)
    assert isinstance(res.json.get("msg"), str) and "cniVersion" in res.json, explain(res)
    return res.json


def node_links(node):
    """Names of the node namespace's links other than lo."""
    return sorted(name for name in node.links() if name != "lo")




# === item 7: make_directories ends ==============================================================

@pytest.mark.parametrize("plugin", ["host-local", "bridge"])
def test_data_dir_below_a_proc_entry_is_an_io_error(ours_bin, node, container, tmp_path, plugin):
    """A dataDir whose mkdir answers ENOENT although its parent exists (/proc/1/nonexist/x) is an
    I/O error (code 5) naming the directory, not an endless recursion (999)."""
    config = make_conf(tmp_path, ipam={"dataDir": "/proc/1/nonexist/x"})
    if plugin == "host-local":
        config = {"cniVersion": "1.0.0", "name": NET, "ipam": config["ipam"]}
        res = run_cni(ours_bin, "host-local", "ADD", config, node=node, netns=container, timeout=TIMEOUT)
    else:
        res = bridge(ours_bin, "ADD", config, node, container)
    error = cni_error(res, 5)
    assert "/proc/1/nonexist" in error["msg"] + error["details"], error
    assert not os.path.exists("/proc/1/nonexist")
    assert "eth0" not in container.links()


# === item 8: CHECK reads the bridge's MTU =========================================================

def test_check_notices_a_changed_bridge_mtu(ours_bin, node, container, data_dir):
    """With `mtu`, CHECK passes on what ADD made (bridge, host veth and container at 1400, read
    back) and fails once the bridge's MTU is changed, naming the bridge."""
    config = make_conf(data_dir, mtu=1400)
    result = ok(bridge(ours_bin, "ADD", config, node, container))
    host = result["interfaces"][1]["name"]
    assert [node.links()[name]["mtu"] for name in (BRIDGE, host)] == [1400, 1400]
    assert container.links()["eth0"]["mtu"] == 1400
    checked = dict(config, prevResult=result)
    ok(bridge(ours_bin, "CHECK", checked, node, container))
    run([IP, "-n", node.name, "link", "set", BRIDGE, "mtu", "1300"])
    assert node.links()[BRIDGE]["mtu"] == 1300
    assert node.links()[host]["mtu"] == 1400 and container.links()["eth0"]["mtu"] == 1400
    error = cni_error(bridge(ours_bin, "CHECK", checked, node, container), 999)
    assert BRIDGE in error["msg"] and "1300" in error["msg"], error
    run([IP, "-n", node.name, "link", "set", BRIDGE, "mtu", "1400"])
    ok(bridge(ours_bin, "CHECK", checked, node, container))


# === item 4: sysctls the reference does not need are best effort ===================================

# Run in a private mount namespace ($0 = the node's netns path, then the plugin): /proc/sys bound
# read-only over itself, a write refused as a proof, then the node's network namespace entered.
READ_ONLY_PROC_SYS = r"""
mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys || exit 96
if echo 1 2>/dev/null > /proc/sys/net/ipv4/conf/lo/arp_notify; then echo "/proc/sys is writable" >&2; exit 97; fi
exec nsenter --net="$0" "$@"
"""


def test_ipv6_add_works_where_proc_sys_is_read_only(ours_bin, node, container, data_dir):
    """A dual-stack ADD where /proc/sys is read-only (forwarding already on, as a hardened node has
    it) succeeds: keep_addr_on_down, which the reference never writes, is best effort.  The
    container's addresses and routes are read back, and keep_addr_on_down stayed 0 (the write
    really was refused)."""
    for key in ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"):
        node.run("sh", "-c", "echo 1 > /proc/sys/" + key)
    config = make_conf(data_dir, families=(4, 6), ipam={"routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]})
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", READ_ONLY_PROC_SYS,
                           node.path, str(ours_bin / "bridge")],
                          input=encode_conf(config), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=TIMEOUT, env=cni_env("ADD", ours_bin, netns=container, container_id="c1"))
    res = parse_output(proc)
    assert res.returncode not in (96, 97), "making /proc/sys read-only failed: " + res.stderr
    result = ok(res)
    expected = sorted(ip["address"] for ip in result["ips"])
    assert len(expected) == 2 and expected[0].startswith("10.86.0.") and expected[1].startswith("fd86::")
    held = sorted(addr for family, addr in container.addrs("eth0") if not addr.startswith("fe80:"))
    assert held == expected
    assert container.sysctl("net/ipv6/conf/eth0/keep_addr_on_down") == "0"
    routes = container.ip_json("-6", "route", "show", "default")
    assert [r["gateway"] for r in routes] == ["fd86::1"]


# === item 2: GC and the iptables backend ===========================================================

def iptables_chain(cid, network=NET):
    """The reference's iptables chain: CNI- and 24 hex digits of SHA-512(network + containerID)."""
    import hashlib
    return "CNI-" + hashlib.sha512((network + cid).encode()).hexdigest()[:24]


def iptables_lines(ns, cid, family):
    """`iptables -t nat -S` (ip6tables for IPv6) lines in `ns` naming the container's chain."""
    program = "iptables" if family == 4 else "ip6tables"
    return sorted(line for line in ns.run(program, "-t", "nat", "-S").stdout.splitlines()
                  if iptables_chain(cid) in line)


def test_gc_removes_iptables_backend_chains_in_both_families(ours_bin, node, make_netns, data_dir):
    """With ipMasqBackend iptables on a dual-stack network, GC naming one of two containers in
    cni.dev/valid-attachments removes the other's CNI- chain and POSTROUTING jumps from both
    iptables and ip6tables (read back with -S), its reservations and its veth, and keeps every
    line of the named one."""
    if shutil.which("iptables") is None or shutil.which("ip6tables") is None:
        pytest.skip("iptables/ip6tables are not installed")
    config = make_conf(data_dir, version="1.1.0", families=(4, 6), ipMasq=True, ipMasqBackend="iptables")
    keep = ok(bridge(ours_bin, "ADD", config, node, make_netns("ct"), "keep"))
    ok(bridge(ours_bin, "ADD", config, node, make_netns("ct"), "stale"))
    before = {(cid, family): iptables_lines(node, cid, family) for cid in ("keep", "stale") for family in (4, 6)}
    for (cid, family), lines in before.items():    # -N, the ACCEPT and MASQUERADE rules, one jump
        assert len(lines) == 4 and sum(line.startswith("-A POSTROUTING ") for line in lines) == 1, lines
    gc = dict(config, **{"cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"}]})
    ok(bridge(ours_bin, "GC", gc, node, None, None, ifname=None))
    assert iptables_lines(node, "stale", 4) == [] and iptables_lines(node, "stale", 6) == []
    assert [iptables_lines(node, "keep", family) for family in (4, 6)] == [before["keep", 4], before["keep", 6]]
    assert sorted(reservations(data_dir).values()) == ["keep\r\neth0", "keep\r\neth0"]
    assert [name for name in node_links(node) if name.startswith("veth")] == [keep["interfaces"][1]["name"]]
    ok(bridge(ours_bin, "DEL", config, node, None, "keep"))
    assert iptables_lines(node, "keep", 4) == [] and iptables_lines(node, "keep", 6) == []


# === item 5: a failed ADD leaves no bridge it made ==================================================

LATE_CONFIG_ERRORS = {
    # name: (ipam keys, other config keys, CNI_ARGS, expected code)
    "gateway outside the subnet": ({"ranges": [[{"subnet": "10.86.0.0/24", "gateway": "10.87.0.1"}]]}, {}, None, 7),
    "overlapping range sets": ({"ranges": [[{"subnet": "10.86.0.0/24"}], [{"subnet": "10.86.0.0/25"}]]}, {}, None, 7),
    "subnet /33": ({"ranges": [[{"subnet": "10.86.0.0/33"}]]}, {}, None, 7),
    "dataDir a file": ({"dataDir": "FILE"}, {}, None, 5),
    "multicast MAC": ({}, {"runtimeConfig": {"mac": "01:00:5e:00:00:01"}}, None, 7),
    "all-zero MAC": ({}, {"args": {"cni": {"mac": "00:00:00:00:00:00"}}}, None, 7),
    "IPAM type absent from CNI_PATH": ({"type": "no-such-ipam"}, {}, None, 7),
    "requested address outside the ranges": ({}, {}, "IP=10.99.0.5", 7),
    "requested address is the gateway": ({}, {}, "IP=10.86.0.1", 7),
    "CNI_IFNAME taken in the container": ({}, {}, None, 7),
}


@pytest.mark.parametrize("case", sorted(LATE_CONFIG_ERRORS))
def test_config_errors_are_found_before_the_bridge_is_made(ours_bin, node, container, data_dir, tmp_path,
                                                          case):
    """Each error the config or request holds is refused with its code before anything is made:
    the node keeps no bridge and no veth, the container no new interface, the dataDir no
    reservation (read back with ip -j and from the disk)."""
    ipam, options, cni_args, code = LATE_CONFIG_ERRORS[case]
    if ipam.get("dataDir") == "FILE":
        (tmp_path / "a-file").write_text("not a directory\n")
        ipam = dict(ipam, dataDir=str(tmp_path / "a-file"))
    if case == "CNI_IFNAME taken in the container":
        run([IP, "-n", container.name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"])
    config = make_conf(data_dir, ipam=ipam, **options)
    error = cni_error(bridge(ours_bin, "ADD", config, node, container, cni_args=cni_args), code)
    assert node_links(node) == [], (case, error)
    assert sorted(container.links()) == (["eth0", "eth0p", "lo"] if "CNI_IFNAME" in case else ["lo"]), (case, error)
    assert reservations(data_dir) == {}


def test_a_later_failure_leaves_at_most_the_bridge(ours_bin, node, make_netns, data_dir):
    """A failure found after the checks (here: no free address, code 11) removes the attachment's
    veth pair and makes no reservation; the bridge it made may stay, as README says, and the
    next ADD that has an address uses it."""
    config = make_conf(data_dir, ipam={"ranges": [[{"subnet": "10.86.0.0/24", "rangeStart": "10.86.0.2",
                                                    "rangeEnd": "10.86.0.2"}]]})
    first = make_netns("ct")
    ok(bridge(ours_bin, "ADD", config, node, first, "c1"))
    second = make_netns("ct")
    cni_error(bridge(ours_bin, "ADD", config, node, second, "c2"), 11)
    assert sorted(second.links()) == ["lo"]
    assert reservations(data_dir) == {"10.86.0.2": "c1\r\neth0"}
    ok(bridge(ours_bin, "DEL", config, node, first, "c1"))
    assert node_links(node) == [BRIDGE]
    ok(bridge(ours_bin, "ADD", config, node, second, "c2"))
    assert [a for _f, a in second.addrs("eth0") if a.startswith("10.")] == ["10.86.0.2/24"]


# === item 9: stdin that cannot be read ============================================================

def run_with_stdin(bin_dir, command, stdin_fd, netns):
    """`bridge` with fd 0 being `stdin_fd` (None: fd 0 closed), as a runtime might start it."""
    env = cni_env(command, bin_dir, netns=netns, container_id="c1")
    if stdin_fd is None:
        argv = ["sh", "-c", 'exec "$0" 0<&-', str(bin_dir / "bridge")]
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=TIMEOUT, env=env)
    else:
        proc = subprocess.run([str(bin_dir / "bridge")], stdin=stdin_fd, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=TIMEOUT, env=env)
    return parse_output(proc)


@pytest.mark.parametrize("stdin", ["write-only", "closed"])
def test_unreadable_stdin_is_code_5_and_closed_is_empty(ours_bin, container, tmp_path, stdin):
    """An ADD whose stdin is write-only is an I/O error (code 5, README's "stdin cannot be read",
    the reference's code); a closed stdin is an empty one (issue 14), so ADD finds no config
    (code 6).  Either way the container gets nothing; VERSION, which needs no config, still
    answers."""
    path = tmp_path / "stdin"
    path.write_text('{"cniVersion": "1.0.0", "name": "%s", "type": "bridge"}' % NET)
    fd = os.open(str(path), os.O_WRONLY) if stdin == "write-only" else None
    try:
        error = cni_error(run_with_stdin(ours_bin, "ADD", fd, container),
                          5 if stdin == "write-only" else 6)
        assert ("stdin" if stdin == "write-only" else "network config") in error["msg"], error
        assert sorted(container.links()) == ["lo"]
        version = ok(run_with_stdin(ours_bin, "VERSION", fd, container))
        assert "1.0.0" in version["supportedVersions"]
    finally:
        if fd is not None:
            os.close(fd)
    assert "stdin" in readme_error_codes()[5]


def readme_error_codes():
    """README's error table: {code: its "when" text}."""
    rows = {}
    for line in (REPO / "README.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 2 and cells[0].isdigit():
            rows[int(cells[0])] = cells[1]
    assert {1, 4, 5, 6, 7, 8, 11} <= set(rows), rows
    return rows


# === item 10: an unparsable cniVersion ============================================================

UNPARSABLE_VERSION_CODES = {"ADD": 1, "DEL": 1, "CHECK": 6, "STATUS": 6, "GC": 6}


@pytest.mark.parametrize("command", sorted(UNPARSABLE_VERSION_CODES))
def test_unparsable_cni_version_codes_match_readme_and_the_reference(ours_bin, container, command):
    """`"cniVersion": "abc"` is "incompatible" (1) on ADD and DEL, which only look the version up,
    and a decoding error (6) on CHECK, STATUS and GC, which compare it: the reference's codes
    (Debian's plugins answer ADD, DEL and CHECK; they predate STATUS and GC), and README's table
    says the same.  Nothing is made in the container."""
    config = {"cniVersion": "abc", "name": NET, "type": "bridge", "bridge": BRIDGE}
    code = UNPARSABLE_VERSION_CODES[command]
    error = cni_error(run_cni(ours_bin, "bridge", command, config, netns=container), code)
    assert "abc" in error["msg"] + error["details"], error
    assert sorted(container.links()) == ["lo"]
    if command in ("ADD", "DEL", "CHECK") and (REF_DIR / "bridge").is_file():
        reference = run_cni(REF_DIR, "bridge", command, config, netns=container)
        assert reference.returncode != 0 and reference.json["code"] == code, explain(reference)
    rows = readme_error_codes()
    assert "on ADD and DEL also one that cannot be parsed" in rows[1], rows[1]
    assert "for CHECK, STATUS and GC, which compare versions, a `cniVersion` that cannot be parsed" in rows[6]


# === item 11: environment errors answer in the config's version ==================================

ENVIRONMENT_ERRORS = {
    # name: (CNI_COMMAND, changed variables)
    "CNI_CONTAINERID missing": ("ADD", {"CNI_CONTAINERID": None}),
    "CNI_IFNAME missing": ("CHECK", {"CNI_IFNAME": None}),
    "CNI_PATH missing": ("DEL", {"CNI_PATH": None}),
    "container ID with a slash": ("ADD", {"CNI_CONTAINERID": "../c1"}),
    "interface name too long": ("ADD", {"CNI_IFNAME": "a-name-longer-than-15"}),
    "CNI_ARGS piece without =": ("ADD", {"CNI_ARGS": "IgnoreUnknown=1;garbage"}),
    "unknown command": ("FROB", {}),
}


@pytest.mark.parametrize("case", sorted(ENVIRONMENT_ERRORS))
def test_environment_errors_carry_the_configs_version(ours_bin, container, data_dir, case):
    """An error in the CNI_* variables, found before the config is read, is answered in the
    config's own cniVersion (0.4.0 here) when stdin holds a readable config, and in the latest
    version when it does not; the container is left alone."""
    command, changes = ENVIRONMENT_ERRORS[case]
    config = make_conf(data_dir, version="0.4.0")
    env = cni_env(command, ours_bin, netns=container, container_id="c1")
    env.update((k, v) for k, v in changes.items() if v is not None)
    for key in (k for k, v in changes.items() if v is None):
        del env[key]
    for stdin, version in ((encode_conf(config), "0.4.0"), (b"not json", "1.1.0"),
                           (encode_conf(dict(config, cniVersion="9.9.9")), "1.1.0")):
        proc = subprocess.run([str(ours_bin / "bridge")], input=stdin, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=TIMEOUT, env=env)
        error = cni_error(parse_output(proc), 4)
        assert error["cniVersion"] == version, (case, error)
    assert sorted(container.links()) == ["lo"]


# === item 12: README's claims about start-up, the archive and the bench ===========================

def readme_text():
    """README.md with its lines joined, so a claim may wrap."""
    return " ".join((REPO / "README.md").read_text().split())


def test_no_command_prints_the_version_on_stderr_and_exits_0(ours_bin):
    """With CNI_COMMAND unset, bridge prints its version text on stderr, nothing on stdout, and
    exits 0, as the reference does (where it is installed); README says so."""
    env = {"PATH": os.environ.get("PATH", ""), "CNI_CONTAINERID": "c1"}
    for directory in [ours_bin] + [REF_DIR] * (REF_DIR / "bridge").is_file():
        proc = subprocess.run([str(directory / "bridge")], input=b"{}", stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=TIMEOUT, env=env)
        assert (proc.returncode, proc.stdout) == (0, b""), (directory, proc)
        assert b"CNI protocol versions supported: 0.1.0, " in proc.stderr, (directory, proc.stderr)
    assert b"1.1.0" in subprocess.run([str(ours_bin / "bridge")], stdin=subprocess.DEVNULL, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE).stderr
    assert ("With `CNI_COMMAND` unset, a plugin prints its name, version and the CNI versions it "
            "supports on stderr, leaves stdout empty and exits 0") in readme_text()


def test_readme_describes_the_archives_first_two_lines(ours_bin):
    """The installed archive starts with `#!/bin/sh` and its interpreter line is the preamble's
    `exec` line; README says exactly that (the node needs /bin/sh)."""
    lines = (ours_bin / "cni-bridge.pyz").read_bytes().split(b"\n", 60)[:60]
    assert lines[0] == b"#!/bin/sh"
    assert any(line.startswith(b"exec /usr/bin/python3 -E -s -S ") for line in lines)
    text = readme_text()
    assert "**The first line is `#!/bin/sh`**: the node needs a POSIX `/bin/sh`" in text
    assert "The interpreter line is the `exec` line after the shell code, not the first line" in text


def bench_medians():
    """{workload: (ours, reference)} medians (ms) of bench/README.md's latest results table."""
    medians = {}
    for line in (REPO / "bench" / "README.md").read_text().splitlines():
        name, sep, rest = line.partition("|")
        cells = rest.split("|")
        if sep and len(cells) == 3 and cells[0].split() and cells[0].split()[0].replace(".", "").isdigit():
            medians[name.strip()] = (float(cells[0].split()[0]), float(cells[1].split()[0]))
    return medians


def test_readme_quotes_the_measured_gap_without_masquerade():
    """README's bench summary quotes the gaps bench/README.md's table shows for ADD, CHECK and
    DEL without ipMasq (ours minus the reference's median), not a round "about 11 ms"."""
    medians = bench_medians()
    def gaps(verb):
        values = [ours - ref for name, (ours, ref) in medians.items()
                  if name in ("%s 1.0.0" % verb, "%s 0.4.0" % verb)]
        assert len(values) == 2, medians
        return values
    add_check = gaps("ADD") + gaps("CHECK")
    delete = gaps("DEL")
    text = readme_text()
    assert ("put our ADD and CHECK %.1f to %.1f ms behind the reference's and our DEL %.1f to %.1f ms "
            "behind" % (min(add_check), max(add_check), min(delete), max(delete))) in text
    floor = [line for line in (REPO / "bench" / "README.md").read_text().splitlines()
             if line.strip().startswith("python -IS -c pass")]
    assert len(floor) == 1 and "starts in %.1f ms there" % float(floor[0].split()[4]) in text
    assert "about 11 ms" not in text
