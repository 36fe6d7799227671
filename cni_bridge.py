"""cni-bridge: the CNI `bridge`, `host-local`, `loopback`, `portmap`, `tuning`, `firewall` and
`bandwidth` plugins in one stdlib-only module.

The program is exec'd by a container runtime at every container start and stop.  It picks the
plugin from the name it was started as (argv[0]), reads its parameters from CNI_* environment
variables and the network configuration from stdin, talks to the kernel over rtnetlink and
nf_tables netlink, and writes one JSON result or error to stdout (CNI spec 0.1.0 to 1.1.0).
Started under any other name it is a small command-line tool (`--help`).

Start-up cost is paid on every container start, so the module avoids the heavy standard
modules (`os`, `json`, `socket`, `ipaddress`, `hashlib`, `re`, `subprocess`) on the common paths:
it uses their C cores (`posix`, `_json`, `_socket`) directly and imports the rest only where one
path needs it (`os` costs a millisecond: it builds os.environ and imports `_collections_abc`).
VERSION, the call a runtime makes most, is answered by the archive's /bin/sh preamble (build.sh)
without starting Python; its Python path loads no socket module at all.

The plugin paths need only what Debian's python3-minimal carries: without `_json` a strict
pure-Python JSON codec takes over; without `_ctypes` (and os.setns, Python 3.12+) what must enter
a namespace says what is missing, and everything else still works.

Sections, in dependency order (each opens with a banner stating its invariants):
  CNI protocol and errors       errors, JSON, config keys, CNI_ARGS, results, per-process state
  Addresses                     IPv4/IPv6 addresses and prefixes without `ipaddress`
  Netlink codec                 Attr/AttrSpace/Header tables, one encoder/decoder, NetlinkSocket
  rtnetlink operations          links, addresses, routes, bridge ports and VLANs, traffic control
                                (tbf, ingress, u32 + mirred), /proc/sys
  nf_tables messages            nf_tables attribute spaces, expressions, NftBatch, NftRule
  nf_tables rule sets           what every rule-writing plugin shares: by name, by comment, GC
  Conntrack                     ctnetlink: the connection tracking entries of a port, deleted
  Namespaces                    setns, Netns, named namespaces
  IPAM store                    host-local's locked state directory and allocation
  The loopback plugin           `lo` up; no state
  The host-local plugin         HostLocalConfig lists its keys
  The bridge plugin             BridgeConfig lists its keys; masquerade and spoof check
  The portmap plugin            PortmapConfig lists its keys; host ports over nf_tables
  The tuning plugin             TuningConfig lists its keys; chained after the interface's maker
  The firewall plugin           FirewallConfig lists its keys; iptables' FORWARD layout
  The bandwidth plugin          BandwidthConfig lists its keys; token buckets, the IFB redirect
  Serving a CNI request         PLUGINS, the environment and stdin checks, run_plugin
  Operator tools: install       copy the zipapp, link every plugin name to it
  Operator tools: verify        the walkthrough, one Verifier method per step
  Operator tools: network commands   cnitool's add/check/del/status/gc
  Operator tools: leases
  Operator tools: mappings      portmap's host ports, read back from the kernel
  Entry point                   USAGE, the command line, main
"""

import errno     # built in: about 0.06 ms, for names instead of numbers
import posix
import sys
import time

import _struct as struct    # what struct.py re-exports, without looking that file up at each start

PROGRAM_VERSION = "0.1.0"
# The release of the reference plugins (github.com/containernetworking/plugins) whose behaviour
# these follow; runtimes read it from the plugins' no-command output (nerdctl: firewall >= 1.7.1
# for ingressPolicy "isolated").
REFERENCE_RELEASE = "1.9.1"


# ==============================================================================================
# CNI protocol and errors
# ==============================================================================================
# What every plugin shares with the runtime.  Every failure is a CNIError (code, msg, details)
# raised where it is understood; run_plugin turns it into the one error object on stdout.
# Config keys are read through conf_lookup alone (the case-insensitive key rule), config
# errors made by config_error alone; results are kept in one internal shape and converted to
# the request's version only on the way out.  Deadlines are on the monotonic clock (poll_until).

SUPPORTED_VERSIONS = ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = SUPPORTED_VERSIONS[-1]

# Error codes of the CNI spec (SPEC.md "Error") plus the reference library's 8 and 999.
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_INVALID_NETNS = 8
ERR_TRY_AGAIN = 11
ERR_NOT_AVAILABLE = 50
ERR_LIMITED_CONNECTIVITY = 51
ERR_INTERNAL = 999

# The reference's name rule for networks and container IDs (also keeps `/` and `..` out of paths).
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
DIGITS = frozenset("0123456789")


class CNIError(Exception):
    """A failure reported to the runtime as a CNI error object."""

    def __init__(self, code, msg, details=""):
        Exception.__init__(self, msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, version):
        """The error object of the CNI spec, in `version`."""
        return {"cniVersion": version, "code": self.code, "msg": self.msg,
                "details": self.details}


def poll_until(attempt, timeout, expired, delay=0.001, max_delay=0.1):
    """Call `attempt()` until it returns something other than None, and return that; sleep
    between calls, doubling `delay` up to `max_delay`.  After `timeout` seconds raise the
    CNIError `expired()` makes.  Deadlines are on the monotonic clock: the wall clock jumps when
    NTP steps it at boot, exactly when a node starts many containers."""
    deadline = time.monotonic() + timeout
    while True:
        value = attempt()
        if value is not None:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            raise expired()
        time.sleep(min(delay, left))
        delay = min(delay * 2, max_delay)


def parse_version(text):
    """Parse a CNI version string into a tuple of three ints ("" means 0.1.0, as in the spec)."""
    if text == "":
        return (0, 1, 0)
    parts = text.split(".")
    if len(parts) > 3 or not all(p and DIGITS.issuperset(p) for p in parts):
        raise CNIError(ERR_DECODE, "invalid version %r" % text,
                       "a CNI version has up to three dot-separated integers")
    numbers = [int(p) for p in parts] + [0, 0]
    return tuple(numbers[:3])


# --- JSON: the C accelerator where it exists, a strict pure-Python codec where it does not ------
# `import json` pulls in `re` and costs several milliseconds per container start; `_json` is the
# same C scanner and string encoder without that cost.  python3-minimal lacks `_json` (Debian
# ships it in libpython3.X-stdlib), so the pure-Python codec below accepts exactly what the C
# scanner accepts (strict: no control characters in strings, no NaN or Infinity, integers of at
# most 40 characters, finite floats) and encodes to the same bytes.  Errors always come from the
# pure decoder, which names the offset and the reason the same way on every interpreter.  Nesting
# is limited to JSON_MAX_DEPTH on both paths (the pure decoder recurses, and the C scanner's own
# limit differs between versions): a text with fewer brackets than that cannot be nested deeper,
# and the value of any other text is measured before it is accepted.

try:
    import _json
except ImportError:
    _json = None

JSON_MAX_DEPTH = 200
_JSON_SPACE = " \t\n\r"
_JSON_SHORT_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
                       "t": "\t"}
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_JSON_CONSTANTS = (("null", None), ("true", True), ("false", False))
_NON_FINITE = ("NaN", "Infinity", "-Infinity")


def _finite_float(text):
    """JSON number -> float, refusing the infinities (Go's decoder does too)."""
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number %s is out of range" % text[:30])
    return value


def _bounded_int(text):
    """JSON integer -> int, refusing digit strings long enough to cost quadratic time."""
    if len(text) > 40:          # converting a huge digit string costs quadratic time
        raise ValueError("number %s... is out of range" % text[:30])
    return int(text)


def _reject_constant(name):
    raise ValueError("%s is not valid JSON" % name)


class _ScannerContext(object):
    """The settings _json.make_scanner reads from a json.JSONDecoder, without json."""
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = staticmethod(_finite_float)
    parse_int = staticmethod(_bounded_int)
    parse_constant = staticmethod(_reject_constant)
    memo = {}


_scan_json = _json.make_scanner(_ScannerContext()) if _json is not None else None


class JSONSyntaxError(ValueError):
    """Malformed JSON: the offset in the text and what was found wrong there."""

    def __init__(self, offset, reason):
        ValueError.__init__(self, "invalid JSON at offset %d: %s" % (offset, reason))


class _PureDecoder(object):
    """A recursive-descent JSON decoder with the C scanner's grammar (Modules/_json.c)."""

    def __init__(self, text):
        self.text = text

    def skip_space(self, i):
        text = self.text
        while i < len(text) and text[i] in _JSON_SPACE:
            i += 1
        return i

    def value(self, i, depth):
        """(value, offset after it) of the JSON value starting at offset i."""
        text = self.text
        c = text[i:i + 1]
        if c == '"':
            return self.string(i + 1)
        if c == "{" or c == "[":
            if depth >= JSON_MAX_DEPTH:
                raise ValueError("JSON nested too deeply")
            return self.object(i + 1, depth + 1) if c == "{" else self.array(i + 1, depth + 1)
        for word, constant in _JSON_CONSTANTS:
            if text.startswith(word, i):
                return constant, i + len(word)
        for word in _NON_FINITE:
            if text.startswith(word, i):
                _reject_constant(word)
        return self.number(i)

    def number(self, start):
        text = self.text
        i = start
        if text[i:i + 1] == "-":
            i += 1
        if text[i:i + 1] == "0":
            i += 1
        elif "1" <= text[i:i + 1] <= "9":
            while i < len(text) and "0" <= text[i] <= "9":
                i += 1
        else:
            raise JSONSyntaxError(start, "expecting a value")
        is_float = False
        if text[i:i + 1] == "." and "0" <= text[i + 1:i + 2] <= "9":
            i += 1
            while i < len(text) and "0" <= text[i] <= "9":
                i += 1
            is_float = True
        if text[i:i + 1] in ("e", "E"):
            j = i + 1
            if text[j:j + 1] in ("+", "-"):
                j += 1
            digits = j
            while j < len(text) and "0" <= text[j] <= "9":
                j += 1
            if j > digits:
                i = j
                is_float = True
        number = text[start:i]
        return (_finite_float(number) if is_float else _bounded_int(number)), i

    def string(self, start):
        """A string whose opening quote is just before `start`."""
        text = self.text
        chunks = []
        i = start
        while True:
            j = i
            while j < len(text) and text[j] not in '"\\' and text[j] >= " ":
                j += 1
            chunks.append(text[i:j])
            if j >= len(text):
                raise JSONSyntaxError(start - 1, "unterminated string")
            c = text[j]
            if c == '"':
                return "".join(chunks), j + 1
            if c != "\\":
                raise JSONSyntaxError(j, "control character in a string")
            escape = text[j + 1:j + 2]
            if escape != "u":
                if escape not in _JSON_SHORT_ESCAPES:
                    if not escape:
                        raise JSONSyntaxError(start - 1, "unterminated string")
                    raise JSONSyntaxError(j, "invalid escape")
                chunks.append(_JSON_SHORT_ESCAPES[escape])
                i = j + 2
                continue
            code = self.hex4(j + 2)
            i = j + 6
            if 0xD800 <= code <= 0xDBFF and text[i:i + 2] == "\\u" and i + 6 < len(text):
                low = self.hex4(i + 2)
                if 0xDC00 <= low <= 0xDFFF:
                    code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                    i += 6
            chunks.append(chr(code))

    def hex4(self, i):
        digits = self.text[i:i + 4]
        if len(digits) < 4 or i + 4 >= len(self.text) or not _HEX_DIGITS.issuperset(digits):
            raise JSONSyntaxError(i - 2, "invalid \\uXXXX escape")
        return int(digits, 16)

    def array(self, i, depth):
        text = self.text
        items = []
        i = self.skip_space(i)
        if text[i:i + 1] == "]":
            return items, i + 1
        while True:
            item, i = self.value(i, depth)
            items.append(item)
            i = self.skip_space(i)
            c = text[i:i + 1]
            if c == "]":
                return items, i + 1
            if c != ",":
                raise JSONSyntaxError(i, "expecting ',' or ']'")
            i = self.skip_space(i + 1)

    def object(self, i, depth):
        text = self.text
        members = {}
        i = self.skip_space(i)
        if text[i:i + 1] == "}":
            return members, i + 1
        while True:
            if text[i:i + 1] != '"':
                raise JSONSyntaxError(i, "expecting a property name in double quotes")
            key, i = self.string(i + 1)
            i = self.skip_space(i)
            if text[i:i + 1] != ":":
                raise JSONSyntaxError(i, "expecting ':'")
            members[key], i = self.value(self.skip_space(i + 1), depth)
            i = self.skip_space(i)
            c = text[i:i + 1]
            if c == "}":
                return members, i + 1
            if c != ",":
                raise JSONSyntaxError(i, "expecting ',' or '}'")
            i = self.skip_space(i + 1)

    def document(self):
        start = self.skip_space(0)
        value, end = self.value(start, 0)
        end = self.skip_space(end)
        if end != len(self.text):
            raise JSONSyntaxError(end, "extra data after the JSON value")
        return value


def json_loads_pure(text):
    """Decode one JSON document without the C accelerator (the reference for every error)."""
    return _PureDecoder(text).document()


def json_depth(value):
    """How deeply lists and objects nest in a decoded value (0 for a scalar)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        elif not isinstance(item, list):
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in item)
    return deepest


def json_loads_accelerated(text):
    """Decode one JSON document with the C scanner: a 1-tuple of its value, or None when the
    scanner refuses the text or the value nests deeper than JSON_MAX_DEPTH."""
    start = 0
    while start < len(text) and text[start] in _JSON_SPACE:
        start += 1
    try:
        value, end = _scan_json(text, start)
    except (StopIteration, ValueError, RecursionError, SystemError):
        return None
    while end < len(text) and text[end] in _JSON_SPACE:
        end += 1
    if end != len(text):
        return None
    if text.count("[") + text.count("{") > JSON_MAX_DEPTH and json_depth(value) > JSON_MAX_DEPTH:
        return None
    return (value,)


def json_loads(text):
    """Decode one JSON document; raise ValueError with a position on malformed input."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    if _scan_json is not None:
        decoded = json_loads_accelerated(text)
        if decoded is not None:
            return decoded[0]
    return json_loads_pure(text)


_ASCII_ESCAPES = dict((chr(c), "\\u%04x" % c) for c in range(32))
_ASCII_ESCAPES.update({'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
                       "\t": "\\t", "\x7f": "\\u007f"})


def _escape_char(c):
    escaped = _ASCII_ESCAPES.get(c)
    if escaped is not None:
        return escaped
    code = ord(c)
    if code < 0x7f:
        return c
    if code < 0x10000:
        return "\\u%04x" % code
    code -= 0x10000
    return "\\u%04x\\u%04x" % (0xD800 | (code >> 10), 0xDC00 | (code & 0x3FF))


def json_string_pure(text):
    """A JSON string literal of `text` in ASCII, as _json.encode_basestring_ascii writes it."""
    return '"' + "".join([_escape_char(c) for c in text]) + '"'


json_string = _json.encode_basestring_ascii if _json is not None else json_string_pure


def json_dumps(value):
    """Encode plain JSON data (dict, list, str, int, float, bool, None) compactly."""
    if isinstance(value, str):
        return json_string(value)
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(json_string(str(k)) + ": " + json_dumps(v)
                               for k, v in value.items()) + "}"
    return "[" + ", ".join(json_dumps(v) for v in value) + "]"


# --- configuration values ---------------------------------------------------------------------

_JSON_TYPE_NAMES = {bool: "a boolean", int: "an integer", str: "a string", list: "a list",
                    dict: "an object", float: "a number"}


def config_error(msg, details=""):
    """The error for a configuration that does not hold together (code 7, the reference's text)."""
    return CNIError(ERR_INVALID_CONFIG, "invalid network config: " + msg, details)


def conf_lookup(obj, key):
    """The value of `key` in a config object, or None.  THE place of the key rule: matched
    case-insensitively when not spelt exactly, as Go's JSON decoder (the reference's) does."""
    value = obj.get(key)
    if value is None:
        folded = key.lower()
        for k, v in obj.items():
            if isinstance(k, str) and k.lower() == folded:
                return v
    return value


def conf_get(obj, key, kind=None, default=None, where=""):
    """Read `key` from a config object (conf_lookup's key rule).

    `kind` is the JSON type expected (bool, int, str, list, dict); a value of another type is
    an invalid network config (code 7) naming the key.  null counts as absent.
    """
    value = conf_lookup(obj, key)
    if value is None:
        return default
    if kind is not None and not (type(value) is kind or (kind is float and type(value) is int)):
        raise config_error("%s%s must be %s" % (where, key, _JSON_TYPE_NAMES[kind]),
                           "got %s" % json_dumps(value)[:200])
    return value


def conf_int(obj, key, low, high, default=0, where=""):
    """Read an integer key and check it lies within [low, high]."""
    value = conf_get(obj, key, int, default, where)
    if not low <= value <= high:
        raise config_error("%s%s must be between %d and %d" % (where, key, low, high),
                           "got %d" % value)
    return value


def check_name(value, what, code):
    """Apply the reference's network-name / container-ID rule: [A-Za-z0-9][A-Za-z0-9_.-]*."""
    if not value or value[0] not in ALNUM or not NAME_CHARS.issuperset(value):
        raise CNIError(code, "invalid characters found in %s" % what, value[:300])


def utf8_prefix(text, limit):
    """The longest start of `text` that fits in `limit` UTF-8 bytes (no character cut in two)."""
    return text.encode("utf-8", "surrogateescape")[:limit].decode("utf-8", "ignore")


def encodable(text):
    """Whether a string can reach the kernel or a file name: JSON's "\\ud800" escapes cannot."""
    try:
        text.encode("utf-8", "surrogateescape")
        return True
    except UnicodeEncodeError:
        return False


def check_ifname(name):
    """Apply the kernel's interface-name rule, with the reference's messages."""
    if name == "":
        raise CNIError(ERR_INVALID_ENV, "interface name is empty")
    if not encodable(name):
        raise CNIError(ERR_INVALID_ENV, "interface name is not valid UTF-8")
    if len(name.encode("utf-8", "surrogateescape")) > 15:
        raise CNIError(ERR_INVALID_ENV, "interface name is too long",
                       "interface name should be less than 16 characters")
    if name in (".", ".."):
        raise CNIError(ERR_INVALID_ENV, "interface name is . or ..")
    if "/" in name or ":" in name or any(c.isspace() for c in name):
        raise CNIError(ERR_INVALID_ENV, "interface name contains / or : or whitespace characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise CNIError(ERR_INVALID_ENV, "interface name contains control characters")
    # The kernel would rename or refuse these only after something was made: "%" makes the name
    # a template ("eth%d" becomes eth0, eth1 ...), and its isspace() counts byte 0xA0 (in the
    # UTF-8 of "à", say) as a space.
    if "%" in name:
        raise CNIError(ERR_INVALID_ENV, "interface name contains %",
                       "the kernel takes a name with %% as a template and picks another name")
    if b"\xa0" in name.encode("utf-8", "surrogateescape"):
        raise CNIError(ERR_INVALID_ENV, "interface name contains byte 0xA0, a space to the kernel")


# The CNI_ARGS keys these plugins read: host-local's IP, bridge's MAC (both reach both plugins,
# since bridge passes its environment to its IPAM), and the reference's IgnoreUnknown switch.
KNOWN_CNI_ARGS = ("IP", "MAC", "IGNOREUNKNOWN")


def parse_cni_args(text, warn=True):
    """Parse CNI_ARGS "K=V;K2=V2" leniently: empty pieces are skipped, keys are case-insensitive,
    unknown keys (Kubernetes' K8S_POD_*) are ignored, with a note on stderr when `warn`.

    Returns {upper-case key: value}; a piece without "=" is an error (code 4) naming it.
    """
    args = {}
    for piece in text.split(";"):
        if not piece:
            continue
        key, sep, value = piece.partition("=")
        if not sep or not key:
            raise CNIError(ERR_INVALID_ENV, "ARGS: invalid pair %r" % piece[:200],
                           "CNI_ARGS must be KEY=VALUE pairs separated by ';'")
        args[key.upper()] = value
    unknown = sorted(k for k in args if k not in KNOWN_CNI_ARGS)
    if unknown and warn:
        sys.stderr.write("CNI_ARGS: ignoring unknown keys %s\n" % " ".join(unknown)[:300])
    return args


class Request(object):
    """One plugin invocation: the CNI_* environment and the network configuration from stdin.

    `stdin` (the configuration's bytes) and `env` (the whole environment) are what a plugin
    executed on our behalf gets (exec_plugin)."""

    def __init__(self, command, container_id, netns, ifname, args, path, config, version,
                 stdin=b"", env=None):
        self.command = command
        self.container_id = container_id
        self.netns = netns
        self.ifname = ifname
        self.args = args
        self.path = path
        self.config = config
        self.version = version
        self.stdin = stdin
        self.env = env if env is not None else {}

    @property
    def network(self):
        """The network's name (checked by build_request)."""
        return conf_lookup(self.config, "name")

    def runtime_config(self):
        """The runtimeConfig object (capability arguments), {} when absent."""
        return conf_get(self.config, "runtimeConfig", dict, {})


def sha512_hex(text):
    """SHA-512 of a string, from the C module directly (hashlib costs 5 ms to import, and
    OpenSSL's _hashlib 3-5 ms and 3.5 MB more than the built-in one)."""
    try:
        from _sha512 import sha512                       # Python 3.6 to 3.11
    except ImportError:
        try:
            from _sha2 import sha512                     # Python 3.12 and later
        except ImportError:
            from hashlib import sha512
    return sha512(text.encode("utf-8", "surrogateescape")).hexdigest()


# --- per-process state --------------------------------------------------------------------------
# What a plugin process keeps open from one call to the next, all here so that a forked child
# that starts over in another namespace (verify's run_plugin_in) has one thing to reset.

class ProcessState(object):
    """Per-process caches, each filled on first use by the section that owns it."""

    def __init__(self):
        self.original_netns_fd = None   # the namespace the process started in (Namespaces)
        self.node_nftables = None       # nf_tables socket in that namespace (nf_tables rule sets)
        self.ticks_per_usec = None      # the packet scheduler's clock (rtnetlink: traffic control)

    def reset(self):
        """Forget everything (the fds stay open: a forked child shares them with its parent)."""
        self.__init__()


PROCESS = ProcessState()


# --- invoking other plugins ----------------------------------------------------------------------

def find_plugin(plugin_type, cni_path):
    """The executable of a plugin type: the first regular file of that name in CNI_PATH."""
    if not plugin_type:
        raise CNIError(ERR_INVALID_CONFIG, "no plugin name provided")
    if "/" in plugin_type or plugin_type in (".", ".."):
        raise CNIError(ERR_INVALID_CONFIG, "invalid plugin name %r" % plugin_type[:100])
    import os.path      # only this path (which execs a program anyway) needs os
    dirs = [d for d in cni_path.split(":") if d]
    for directory in dirs:
        candidate = os.path.join(directory, plugin_type)
        if os.path.isfile(candidate):
            return candidate
    raise CNIError(ERR_INVALID_CONFIG, "failed to find plugin %r in path %s" % (plugin_type, dirs))


def invoke_plugin(plugin_type, cni_path, env, stdin):
    """Execute a plugin as a runtime does; its JSON output (None when it printed nothing), or its
    error raised unchanged."""
    import subprocess
    path = find_plugin(plugin_type, cni_path)
    for attempt in range(6):
        try:
            proc = subprocess.run([path], input=stdin, env=env, stdout=subprocess.PIPE)
            break
        except OSError as err:
            if err.errno != errno.ETXTBSY or attempt == 5:    # the file is still being written
                raise CNIError(ERR_INTERNAL, "failed to execute %s: %s" % (path, err.strerror))
            time.sleep(1)
    output = proc.stdout.decode("utf-8", "replace").strip()
    try:
        parsed = json_loads(output) if output else None
    except ValueError:
        parsed = None
    if proc.returncode != 0:
        if isinstance(parsed, dict) and isinstance(parsed.get("code", 0), int):
            raise CNIError(parsed.get("code", 0), str(parsed.get("msg", "")),
                           str(parsed.get("details", "")))
        if not output:
            raise CNIError(ERR_INTERNAL, "netplugin failed with no error message: exit status %d"
                           % proc.returncode)
        raise CNIError(ERR_INTERNAL, "netplugin failed but error parsing its diagnostic message",
                       output[:1000])
    if output and parsed is None:
        raise CNIError(ERR_DECODE, "failed to parse the output of %s" % plugin_type, output[:1000])
    return parsed


# --- results -------------------------------------------------------------------------------------
# Results are held in the 1.1.0 shape ("interfaces", "ips", "routes", "dns") and converted to the
# configuration's version only when printed (spec "Version considerations", reference types/*).

def has_ip_version_field(version):
    """Whether results of `version` carry ips[].version (0.3.0 to 0.4.0)."""
    return version in ("0.3.0", "0.3.1", "0.4.0")


def is_legacy_version(version):
    """Whether `version` has the ip4/ip6 result shape (0.1.0, 0.2.0)."""
    return version in ("0.1.0", "0.2.0", "")


def address_family_of(cidr):
    """4 or 6, for an address or CIDR text already validated."""
    return 6 if ":" in cidr else 4


def encode_result(result, version):
    """Render an internal (1.1.0-shaped) result in the wire format of `version`."""
    dns = dict((k, v) for k, v in result.get("dns", {}).items() if v)
    if is_legacy_version(version):
        return _encode_legacy_result(result, version, dns)
    out = {"cniVersion": version}
    interfaces = result.get("interfaces") or []
    if interfaces:
        if version != "1.1.0":
            interfaces = [dict((k, v) for k, v in i.items() if k in ("name", "mac", "sandbox"))
                          for i in interfaces]
        out["interfaces"] = interfaces
    ips = result.get("ips") or []
    if ips:
        out["ips"] = []
        for ip in ips:
            entry = dict(ip)
            if has_ip_version_field(version):
                entry["version"] = str(address_family_of(ip["address"]))
            out["ips"].append(entry)
    if result.get("routes"):
        out["routes"] = result["routes"]
    if dns or has_ip_version_field(version):
        out["dns"] = dns
    return out


def _encode_legacy_result(result, version, dns):
    """0.1.0/0.2.0: the first IPv4 and IPv6 address, each with the routes of its family."""
    out = {"cniVersion": version}
    for family, key in ((4, "ip4"), (6, "ip6")):
        ip = next((i for i in result.get("ips") or [] if address_family_of(i["address"]) == family),
                  None)
        if ip is None:
            continue
        entry = {"ip": ip["address"]}
        if ip.get("gateway"):
            entry["gateway"] = ip["gateway"]
        routes = [dict((k, v) for k, v in r.items() if k in ("dst", "gw"))
                  for r in result.get("routes") or [] if address_family_of(r["dst"]) == family]
        if routes:
            entry["routes"] = routes
        out[key] = entry
    if "ip4" not in out and "ip6" not in out:
        raise CNIError(ERR_INCOMPATIBLE_VERSION, "cannot convert: no valid IP addresses",
                       "a cniVersion %s result must hold an IP address" % (version or "0.1.0"))
    out["dns"] = dns
    return out


def decode_result(obj, version):
    """Parse a result (prevResult or a delegated plugin's output) into the internal shape,
    checking every address and route destination (Prefix, in the next section)."""
    if not isinstance(obj, dict):
        raise CNIError(ERR_DECODE, "failed to parse result", "a result must be a JSON object")
    version = obj.get("cniVersion") or version
    try:
        interfaces, ips, routes = [], [], []
        if is_legacy_version(version):
            for key in ("ip4", "ip6"):
                entry = obj.get(key)
                if entry:
                    ip = {"address": entry["ip"]}
                    if entry.get("gateway"):
                        ip["gateway"] = entry["gateway"]
                    ips.append(ip)
                    routes.extend(entry.get("routes") or [])
        else:
            interfaces = list(obj.get("interfaces") or [])
            ips = [dict((k, v) for k, v in ip.items() if k != "version")
                   for ip in obj.get("ips") or []]
            routes = list(obj.get("routes") or [])
        dns = obj.get("dns") or {}
        if not isinstance(dns, dict) or not all(isinstance(i, dict) for i in interfaces):
            raise TypeError("dns and interfaces must be objects")
        for ip in ips:
            Prefix.parse(ip["address"])
            if ip.get("gateway") is not None:
                parse_ip(ip["gateway"])
        for route in routes:
            Prefix.parse(route["dst"])
            if route.get("gw") is not None:
                parse_ip(route["gw"])
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise CNIError(ERR_DECODE, "failed to parse result", "malformed result: %s" % err)
    result = {"ips": ips, "routes": routes, "dns": dns}
    if interfaces:
        result["interfaces"] = interfaces
    return result


def previous_result(request):
    """The prevResult of the configuration in internal shape, or None."""
    prev = conf_get(request.config, "prevResult", dict)
    return decode_result(prev, request.version) if prev is not None else None


def required_previous_result(request, details=""):
    """previous_result, for a verb that cannot work without it (the reference's error)."""
    previous = previous_result(request)
    if previous is None:
        raise CNIError(ERR_INVALID_CONFIG, "Required prevResult missing", details)
    return previous


# ==============================================================================================
# Addresses
# ==============================================================================================
# Addresses are (family, integer) pairs: family 4 or 6.  `ipaddress` would cost 7 ms per start.

IP_BITS = {4: 32, 6: 128}


def parse_ip(text):
    """Parse an IPv4 or IPv6 address; IPv4-mapped IPv6 addresses become IPv4 (as in the reference).

    IPv4 takes four decimal octets without leading zeros, as inet_pton and Go do.
    """
    if not isinstance(text, str):
        raise ValueError("not an IP address: %r" % (text,))
    if ":" in text:
        import _socket
        try:
            value = int.from_bytes(_socket.inet_pton(_socket.AF_INET6, text), "big")
        except (OSError, ValueError, UnicodeError):
            raise ValueError("not an IP address: %r" % text[:100])
        if value >> 32 == 0xFFFF:
            return 4, value & 0xFFFFFFFF
        return 6, value
    octets = text.split(".")
    if len(octets) == 4 and all(0 < len(o) <= 3 and DIGITS.issuperset(o)
                                and (o[0] != "0" or o == "0") for o in octets):
        a, b, c, d = [int(o) for o in octets]
        if a <= 255 and b <= 255 and c <= 255 and d <= 255:
            return 4, a << 24 | b << 16 | c << 8 | d
    raise ValueError("not an IP address: %r" % text[:100])


def ip_to_text(family, value):
    """Canonical text of an address (IPv6 compressed the way Go and RFC 5952 do it)."""
    if family == 4:
        return "%d.%d.%d.%d" % (value >> 24, (value >> 16) & 255, (value >> 8) & 255, value & 255)
    groups = [(value >> (112 - 16 * i)) & 0xFFFF for i in range(8)]
    best_start, best_len, start = -1, 1, None
    for i, group in enumerate(groups + [1]):
        if group == 0 and start is None:
            start = i
        elif group != 0 and start is not None:
            if i - start > best_len:
                best_start, best_len = start, i - start
            start = None
    text = [format(g, "x") for g in groups]
    if best_start < 0:
        return ":".join(text)
    return ":".join(text[:best_start]) + "::" + ":".join(text[best_start + best_len:])


def ip_bytes(family, value):
    """An address as the kernel takes it: 4 or 16 bytes, network order."""
    return value.to_bytes(IP_BITS[family] // 8, "big")


class Prefix(object):
    """An address with a prefix length, as in "10.1.2.3/24" (host bits kept)."""

    __slots__ = ("family", "ip", "length")

    def __init__(self, family, ip, length):
        self.family = family
        self.ip = ip
        self.length = length

    @classmethod
    def parse(cls, text):
        """A Prefix from "addr/len" text; ValueError when it is not one."""
        if not isinstance(text, str) or "/" not in text:
            raise ValueError("not a CIDR: %r" % (text if isinstance(text, str) else type(text)))
        addr, _, length = text.partition("/")
        family, ip = parse_ip(addr)
        if not (length and len(length) <= 3 and DIGITS.issuperset(length)):
            raise ValueError("bad prefix length in %r" % text[:100])
        length = int(length)
        if family == 4 and ":" in addr:  # an IPv4-mapped IPv6 prefix
            length -= 96
        if not 0 <= length <= IP_BITS[family]:
            raise ValueError("bad prefix length in %r" % text[:100])
        return cls(family, ip, length)

    @property
    def mask(self):
        """The netmask as an integer."""
        bits = IP_BITS[self.family]
        return ((1 << bits) - 1) ^ ((1 << (bits - self.length)) - 1)

    @property
    def network(self):
        """The network address (host bits cleared)."""
        return self.ip & self.mask

    @property
    def last(self):
        """The last address of the prefix (IPv4's broadcast)."""
        return self.network | (((1 << IP_BITS[self.family]) - 1) ^ self.mask)

    def contains(self, family, ip):
        """Whether address (family, ip) lies in the prefix."""
        return family == self.family and ip & self.mask == self.network

    def network_text(self):
        """"network/len" text."""
        return "%s/%d" % (ip_to_text(self.family, self.network), self.length)

    def __str__(self):
        return "%s/%d" % (ip_to_text(self.family, self.ip), self.length)

    def __eq__(self, other):
        return (isinstance(other, Prefix) and (self.family, self.ip, self.length)
                == (other.family, other.ip, other.length))

    def __hash__(self):
        return hash((self.family, self.ip, self.length))


HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def parse_mac(text):
    """Parse "aa:bb:cc:dd:ee:ff" into 6 bytes."""
    parts = text.split(":") if isinstance(text, str) else []
    if len(parts) != 6 or not all(len(p) == 2 and HEX_DIGITS.issuperset(p) for p in parts):
        raise ValueError("invalid MAC address %r" % (text[:50] if isinstance(text, str) else text,))
    return bytes(int(p, 16) for p in parts)


def mac_to_text(raw):
    """6 bytes as "aa:bb:cc:dd:ee:ff"."""
    return ":".join("%02x" % b for b in raw)


# ==============================================================================================
# Netlink codec
# ==============================================================================================
# One encoder and one decoder serve rtnetlink and nf_tables alike.  Messages are a netlink
# header, a fixed family header (ifinfomsg, ifaddrmsg, rtmsg, nfgenmsg) and attributes; the
# attributes of each family are described as data: an AttrSpace per attribute space, a table of
# `Attr(number, kind)` entries, so `LinkAttr.IFLA_MTU` is the attribute and its wire format.

NLMSG_HEADER = struct.Struct("=IHHII")        # length, type, flags, sequence, port id
NLA_HEADER = struct.Struct("=HH")             # length, type
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x01
NLM_F_ACK = 0x04
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_APPEND = 0x800
NLM_F_ACK_TLVS = 0x200                        # in an ACK: extended-ACK attributes follow
NLMSGERR_ATTR_MSG = 1

SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NETLINK_ROUTE = 0
NETLINK_NETFILTER = 12

# Refusals worth retrying (code 11): the kernel was busy or short of memory, not unwilling.
TRANSIENT_ERRNOS = (errno.EINTR, errno.EAGAIN, errno.EBUSY, errno.ENOBUFS, errno.ETIMEDOUT)

# Acknowledgements the kernel queues at once must fit the receive buffer (default 208 KiB): each
# takes up to ACK_TRUESIZE bytes of it, whatever its length.
ACKS_PER_DATAGRAM = 64
ACK_TRUESIZE = 1024
NETLINK_BUFFER_MIN = 1 << 16
SOL_SOCKET = 1
SO_SNDBUF, SO_RCVBUF, SO_SNDBUFFORCE, SO_RCVBUFFORCE = 7, 8, 32, 33
NETLINK_TIMEOUT = 5.0                         # seconds; a kernel that does not answer is code 11

# Attribute kinds: how a value is laid out on the wire.
U8, U16, U32, S32, U64, BE16, BE32, BE64 = "=B", "=H", "=I", "=i", "=Q", ">H", ">I", ">Q"
STR = "str"          # NUL-terminated string
BYTES = "bytes"      # raw bytes
FLAG = "flag"        # no payload
NEST = "nest"        # nested attributes of `space`
MSG = "msg"          # a family header followed by attributes of `space` (a veth peer)

_SCALARS = dict((kind, struct.Struct(kind)) for kind in (U8, U16, U32, S32, U64, BE16, BE32, BE64))


class Attr(object):
    """One attribute of an attribute space: its number, wire kind and, if nested, its space."""

    __slots__ = ("number", "kind", "space", "header", "repeated", "name")

    def __init__(self, number, kind, space=None, header=None, repeated=False):
        self.number = number
        self.kind = kind
        self.space = space
        self.header = header
        self.repeated = repeated
        self.name = None

    def __repr__(self):
        return self.name or "Attr(%d)" % self.number


class AttrSpace(object):
    """An attribute space: its Attrs as attributes, named after the keywords, and by number."""

    def __init__(self, **attrs):
        self.by_number = {}
        for name, attr in attrs.items():
            attr.name = name
            setattr(self, name, attr)
            self.by_number[attr.number] = attr


class Header(object):
    """A fixed family header such as ifinfomsg, described by a struct format and field names.

    Fields left out of `pack` are zero; a field name the header does not have is an error, so a
    misspelt one cannot silently become zero."""

    def __init__(self, fmt, fields):
        self.struct = struct.Struct(fmt)
        self.fields = fields

    def pack(self, values):
        """The header's bytes from {field: value}; absent fields are zero."""
        for name in values:
            if name not in self.fields:
                raise ValueError("header field %r is not one of %s"
                                 % (name, ", ".join(self.fields)))
        return self.struct.pack(*[values.get(f, 0) for f in self.fields])

    def unpack(self, data):
        """The field values of a header at the start of `data`."""
        return dict(zip(self.fields, self.struct.unpack_from(data)))


def _pad(length):
    """Netlink alignment: lengths round up to 4 bytes."""
    return (length + 3) & ~3


def encode_attrs(attrs):
    """Encode a sequence of (Attr, value) pairs; nested values are sequences of pairs again."""
    out = []
    for attr, value in attrs:
        kind = attr.kind
        if kind in _SCALARS:
            payload = _SCALARS[kind].pack(value)
        elif kind == STR:
            payload = value.encode("utf-8", "surrogateescape") + b"\0"
        elif kind == BYTES:
            payload = value
        elif kind == FLAG:
            payload = b""
        elif kind == NEST:
            payload = value if isinstance(value, bytes) else encode_attrs(value)
        else:  # MSG: (header values, attributes)
            payload = attr.header.pack(value[0]) + encode_attrs(value[1])
        number = attr.number | (NLA_F_NESTED if kind in (NEST, MSG) else 0)
        out.append(NLA_HEADER.pack(len(payload) + 4, number))
        out.append(payload)
        out.append(b"\0" * (_pad(len(payload)) - len(payload)))
    return b"".join(out)


def decode_attrs(space, data, offset=0):
    """Decode attributes of `space` into {Attr: value}; repeated ones into lists."""
    result = {}
    end = len(data)
    while offset + 4 <= end:
        length, number = NLA_HEADER.unpack_from(data, offset)
        if length < 4:
            break
        payload = data[offset + 4:offset + length]
        offset += _pad(length)
        attr = space.by_number.get(number & NLA_TYPE_MASK)
        if attr is None:
            continue
        kind = attr.kind
        if kind in _SCALARS:
            scalar = _SCALARS[kind]
            value = scalar.unpack_from(payload)[0] if len(payload) >= scalar.size else None
        elif kind == STR:
            value = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif kind == NEST and attr.space is not None:
            value = decode_attrs(attr.space, payload)
        elif kind == MSG:
            value = (attr.header.unpack(payload),
                     decode_attrs(attr.space, payload, attr.header.struct.size))
        else:
            value = payload
        if attr.repeated:
            result.setdefault(attr, []).append(value)
        else:
            result[attr] = value
    return result


class NetlinkRequest(tuple):
    """One request for NetlinkSocket.transact: message type, flags (NLM_F_REQUEST and NLM_F_ACK
    are added when sent), family header field values and (Attr, value) attributes.  A tuple, so
    it unpacks as (msg_type, flags, header, attrs) too."""

    __slots__ = ()

    def __new__(cls, msg_type, flags=0, header=None, attrs=()):
        return tuple.__new__(cls, (msg_type, flags, header or {}, attrs))

    msg_type = property(lambda self: self[0])
    flags = property(lambda self: self[1])
    header = property(lambda self: self[2])
    attrs = property(lambda self: self[3])


class BatchFrame(tuple):
    """The messages that open and close a transaction (nf_tables): begin type, end type, the
    family header values both carry, and attributes of the begin message (the generation the
    batch was planned against)."""

    __slots__ = ()

    def __new__(cls, begin, end, header, begin_attrs=()):
        return tuple.__new__(cls, (begin, end, header, begin_attrs))

    begin = property(lambda self: self[0])
    end = property(lambda self: self[1])
    header = property(lambda self: self[2])
    begin_attrs = property(lambda self: self[3])


class Message(object):
    """A decoded netlink message: type, flags, family header fields and attributes."""

    __slots__ = ("type", "flags", "header", "attrs")

    def __init__(self, msg_type, flags, header, attrs):
        self.type = msg_type
        self.flags = flags
        self.header = header
        self.attrs = attrs

    def get(self, attr, default=None):
        """The value of attribute `attr`, or `default`."""
        return self.attrs.get(attr, default)


# Message types of every protocol we speak: protocol -> {type -> (family header, attribute space)}.
# Filled in by the rtnetlink and nf_tables sections (their type numbers overlap).
MESSAGE_LAYOUTS = {}


def encode_message(layouts, msg_type, flags, seq, header_values, attrs):
    """One netlink message: header, family header `header_values`, attributes."""
    header, _space = layouts[msg_type]
    body = header.pack(header_values or {}) + encode_attrs(attrs)
    return NLMSG_HEADER.pack(NLMSG_HEADER.size + len(body), msg_type, flags, seq, 0) + body


def decode_messages(data):
    """Split a netlink datagram into (type, flags, seq, payload) tuples."""
    out = []
    offset = 0
    while offset + NLMSG_HEADER.size <= len(data):
        length, msg_type, flags, seq, _port = NLMSG_HEADER.unpack_from(data, offset)
        if length < NLMSG_HEADER.size:
            break
        out.append((msg_type, flags, seq, data[offset + NLMSG_HEADER.size:offset + length]))
        offset += _pad(length)
    return out


def decode_payload(layouts, msg_type, flags, payload):
    """A Message from the payload of one netlink message of a known type."""
    header, space = layouts[msg_type]
    return Message(msg_type, flags, header.unpack(payload),
                   decode_attrs(space, payload, header.struct.size))


class NetlinkError(CNIError):
    """The kernel refused a netlink request; `errno` says why."""

    def __init__(self, errno_value, what, reason=""):
        text = posix.strerror(errno_value)
        if reason:
            text = "%s (%s)" % (text, reason)
        transient = errno_value in TRANSIENT_ERRNOS
        CNIError.__init__(self, ERR_TRY_AGAIN if transient else ERR_INTERNAL,
                          "%s: %s" % (what, text) if what else text)
        self.errno = errno_value


def unless_exists(action, *args, **kwargs):
    """Run `action`; True when it made its object, False when that exists already (EEXIST:
    a concurrent plugin or an earlier ADD made it first, which is success for the caller)."""
    try:
        action(*args, **kwargs)
    except (OSError, NetlinkError) as err:
        if err.errno != errno.EEXIST:
            raise
        return False
    return True


def _ack_error(payload, flags):
    """(errno, kernel's extended-ACK message) of an NLMSG_ERROR payload."""
    errno_value = -struct.unpack_from("=i", payload)[0]
    reason = ""
    if flags & NLM_F_ACK_TLVS:
        # NETLINK_CAP_ACK: the echoed request is only its 16-byte header.
        tlvs = decode_attrs(_ExtAck, payload, 4 + NLMSG_HEADER.size)
        reason = tlvs.get(_ExtAck.NLMSGERR_ATTR_MSG, "")
    return errno_value, reason


_ExtAck = AttrSpace(
    NLMSGERR_ATTR_MSG=Attr(NLMSGERR_ATTR_MSG, STR),
)


class NetlinkSocket(object):
    """A netlink socket of one protocol, bound to the network namespace it was opened in."""

    def __init__(self, protocol=NETLINK_ROUTE):
        import _socket
        sock = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW | _socket.SOCK_CLOEXEC, protocol)
        try:
            sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)   # errors carry the kernel's reason
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)   # without echoing our request
        except OSError:
            pass
        sock.settimeout(NETLINK_TIMEOUT)
        sock.bind((0, 0))
        self.sock = sock
        self.layouts = MESSAGE_LAYOUTS[protocol]
        self.seq = int(time.time()) & 0xFFFFFF
        self.timeout_error = _socket.timeout

    def close(self):
        """Close the socket."""
        self.sock.close()

    def _next_seq(self):
        """The next request's sequence number (replies are matched by it)."""
        self.seq += 1
        return self.seq

    def _recv(self, what):
        """One datagram; a silent kernel is code 11 after NETLINK_TIMEOUT."""
        try:
            return self.sock.recv(1 << 17)
        except self.timeout_error:
            raise CNIError(ERR_TRY_AGAIN, "%s: the kernel did not answer within %g s"
                           % (what, NETLINK_TIMEOUT))
        except OSError as err:
            raise NetlinkError(err.errno or errno.EIO, what)

    def transact(self, requests, what="", batch=None):
        """Send requests and wait for every acknowledgement.

        `requests` are NetlinkRequests.  Returns the reply messages of each request (a list per
        request).  The kernel queues each acknowledgement in our receive buffer while it works
        through a datagram, so rtnetlink requests go ACKS_PER_DATAGRAM at a time, each group's
        acknowledgements read before the next is sent; the first refused request raises
        NetlinkError once its group is answered (the rest of the group was still processed,
        later groups are not sent).  A `batch` (a BatchFrame: nf_tables) is committed all or
        nothing, so it is one datagram, and the buffers are grown to hold it and its answers.
        """
        requests = [NetlinkRequest(*request) for request in requests]
        if batch is not None:
            return self._exchange(requests, what, batch)
        replies = []
        for start in range(0, len(requests), ACKS_PER_DATAGRAM):
            replies.extend(self._exchange(requests[start:start + ACKS_PER_DATAGRAM], what, None))
        return replies

    def _exchange(self, requests, what, batch):
        """One datagram of requests (framed by `batch`, if any) and every acknowledgement."""
        seqs = []
        chunks = []
        for request in requests:
            seq = self._next_seq()
            seqs.append(seq)
            chunks.append(encode_message(self.layouts, request.msg_type,
                                         request.flags | NLM_F_REQUEST | NLM_F_ACK, seq,
                                         request.header, request.attrs))
        begin_seq = None
        if batch is not None:
            begin_seq = self._next_seq()
            chunks.insert(0, encode_message(self.layouts, batch.begin, NLM_F_REQUEST,
                                            begin_seq, batch.header, batch.begin_attrs))
            chunks.append(encode_message(self.layouts, batch.end, NLM_F_REQUEST, self._next_seq(),
                                         batch.header, ()))
        datagram = b"".join(chunks)
        if len(seqs) > ACKS_PER_DATAGRAM or len(datagram) > NETLINK_BUFFER_MIN:
            self._grow_buffers(len(datagram) + NETLINK_BUFFER_MIN,
                               len(seqs) * ACK_TRUESIZE + NETLINK_BUFFER_MIN)
        self.sock.send(datagram)
        replies = dict((seq, []) for seq in seqs)
        pending = set(seqs)
        failure = None
        while pending:
            for msg_type, flags, seq, payload in decode_messages(self._recv(what)):
                if seq == begin_seq and msg_type == NLMSG_ERROR:
                    # The batch refused whole (a stale generation: ERESTART); nothing else answers.
                    errno_value, reason = _ack_error(payload, flags)
                    if errno_value:
                        raise NetlinkError(errno_value, what, reason)
                if seq not in pending:
                    continue
                if msg_type == NLMSG_ERROR:
                    pending.discard(seq)
                    errno_value, reason = _ack_error(payload, flags)
                    if errno_value and failure is None:
                        failure = NetlinkError(errno_value, what, reason)
                elif msg_type in self.layouts:
                    replies[seq].append(decode_payload(self.layouts, msg_type, flags, payload))
        if failure is not None:
            raise failure
        return [replies[seq] for seq in seqs]

    def _grow_buffers(self, send_bytes, receive_bytes):
        """Make room for a large batch and its acknowledgements (root may exceed the sysctl
        maximum with the FORCE options, as `nft` does; others get what the maximum allows)."""
        for force, plain, size in ((SO_SNDBUFFORCE, SO_SNDBUF, send_bytes),
                                   (SO_RCVBUFFORCE, SO_RCVBUF, receive_bytes)):
            try:
                self.sock.setsockopt(SOL_SOCKET, force, size)
            except OSError:
                self.sock.setsockopt(SOL_SOCKET, plain, size)

    def request(self, msg_type, flags=0, header=None, attrs=(), what=""):
        """One request with its acknowledgement; returns the replies (for a GET, the object)."""
        return self.transact([NetlinkRequest(msg_type, flags, header, attrs)], what)[0]

    def dump(self, msg_type, header=None, attrs=(), what="", containing=None):
        """A dump request; retried when the kernel flags it interrupted by a concurrent change.

        With `containing` (bytes), only the messages holding those bytes are decoded: a search
        for one object among thousands then costs a scan in C instead of thousands of decodings.
        """
        for _attempt in range(5):
            seq = self._next_seq()
            self.sock.send(encode_message(self.layouts, msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq,
                                          header, attrs))
            messages, interrupted, done = [], False, False
            while not done:
                for reply_type, flags, reply_seq, payload in decode_messages(self._recv(what)):
                    if reply_seq != seq:
                        continue
                    interrupted = interrupted or bool(flags & NLM_F_DUMP_INTR)
                    if reply_type == NLMSG_DONE:
                        done = True
                    elif reply_type == NLMSG_ERROR:
                        errno_value, reason = _ack_error(payload, flags)
                        raise NetlinkError(errno_value, what, reason)
                    elif reply_type in self.layouts and (containing is None
                                                         or containing in payload):
                        messages.append(decode_payload(self.layouts, reply_type, flags, payload))
            if not interrupted:
                return messages
        raise CNIError(ERR_TRY_AGAIN, "%s: netlink dump kept being interrupted" % what)


# ==============================================================================================
# rtnetlink operations
# ==============================================================================================
# Links, addresses, routes, bridge ports and traffic control (linux/rtnetlink.h, if_link.h,
# if_addr.h, if_bridge.h, pkt_sched.h, pkt_cls.h), and the /proc/sys switches the plugins flip.

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_SETLINK = 16, 17, 18, 19
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNETCONF, RTM_GETNETCONF = 80, 82

AF_UNSPEC, AF_INET, AF_BRIDGE, AF_INET6 = 0, 2, 7, 10
FAMILY_OF_AF = {AF_INET: 4, AF_INET6: 6}
AF_OF_FAMILY = {4: AF_INET, 6: AF_INET6}

IFF_UP = 0x1
IFF_PROMISC = 0x100
IFF_ALLMULTI = 0x200
IF_OPER_UP = 6
OPERSTATE_NAMES = {0: "unknown", 1: "notpresent", 2: "down", 3: "lowerlayerdown",
                   4: "testing", 5: "dormant", 6: "up"}
RTEXT_FILTER_BRVLAN = 1 << 1
RTEXT_FILTER_SKIP_STATS = 1 << 3
IFA_F_DADFAILED = 0x08
IFA_F_NODAD = 0x02
IFA_F_TENTATIVE = 0x40
RT_TABLE_MAIN = 254
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_HOST = 0, 253, 254
RTPROT_BOOT = 3
RTN_UNICAST = 1
BRIDGE_FLAGS_MASTER = 1
BRIDGE_VLAN_INFO_PVID = 2
BRIDGE_VLAN_INFO_UNTAGGED = 4
NETCONFA_IFINDEX_ALL = -1                     # a netconf request about the `all` settings
IN6_ADDR_GEN_MODE_NONE = 1                    # no link-local address of its own (if_link.h)
# Indexes in a device's IPv6 settings array (IFLA_INET6_CONF; linux/ipv6.h DEVCONF_*) and the
# IPv4 setting numbers of IFLA_INET_CONF (linux/ip.h IPV4_DEVCONF_*).
DEVCONF_DISABLE_IPV6, DEVCONF_ACCEPT_DAD = 26, 27
DEVCONF_KEEP_ADDR_ON_DOWN, DEVCONF_ENHANCED_DAD = 42, 46
IPV4_DEVCONF_ARP_NOTIFY = 22

IFINFOMSG = Header("=BxHiII", ("family", "type", "index", "flags", "change"))
IFADDRMSG = Header("=BBBBi", ("family", "prefixlen", "flags", "scope", "index"))
RTMSG = Header("=BBBBBBBBI", ("family", "dst_len", "src_len", "tos", "table", "protocol",
                              "scope", "type", "flags"))
NETCONFMSG = Header("=Bxxx", ("family",))    # netconfmsg, padded to 4 as the kernel parses it
BRIDGE_VLAN_INFO = struct.Struct("=HH")       # flags, vid
DEVCONF_VALUE = struct.Struct("=i")


BridgePortAttr = AttrSpace(
    IFLA_BRPORT_MODE=Attr(4, U8),             # hairpin
    IFLA_BRPORT_ISOLATED=Attr(33, U8),
)


LinkInfoAttr = AttrSpace(
    IFLA_INFO_KIND=Attr(1, STR),
    IFLA_INFO_DATA=Attr(2, NEST),             # layout depends on the kind: decoded by the caller
    IFLA_INFO_SLAVE_DATA=Attr(5, NEST, BridgePortAttr),    # when enslaved to a bridge
)


BridgeAttr = AttrSpace(
    IFLA_BR_VLAN_FILTERING=Attr(7, U8),
)


# IFLA_AF_SPEC holds one of two spaces, chosen by the message's family: a bridge port's VLANs in
# AF_BRIDGE messages, per-protocol device settings (one nest per address family) otherwise.
BridgeAfSpecAttr = AttrSpace(
    IFLA_BRIDGE_FLAGS=Attr(0, U16),
    IFLA_BRIDGE_VLAN_INFO=Attr(2, BYTES, repeated=True),
)


Ipv4DevconfAttr = AttrSpace(                  # written: one attribute per IPV4_DEVCONF_* number
    IPV4_DEVCONF_ARP_NOTIFY=Attr(IPV4_DEVCONF_ARP_NOTIFY, U32),
)


InetAfAttr = AttrSpace(
    IFLA_INET_CONF=Attr(1, NEST),             # read back as an array: not decoded
)


Inet6AfAttr = AttrSpace(
    IFLA_INET6_CONF=Attr(2, BYTES),           # read only: the DEVCONF_* array, s32 each
    IFLA_INET6_ADDR_GEN_MODE=Attr(8, U8),
)


LinkAfSpecAttr = AttrSpace(
    AF_INET=Attr(AF_INET, NEST, InetAfAttr),
    AF_INET6=Attr(AF_INET6, NEST, Inet6AfAttr),
)


LinkAttr = AttrSpace(
    IFLA_ADDRESS=Attr(1, BYTES),
    IFLA_IFNAME=Attr(3, STR),
    IFLA_MTU=Attr(4, U32),
    IFLA_LINK=Attr(5, U32),                   # a veth's peer index
    IFLA_MASTER=Attr(10, U32),
    IFLA_TXQLEN=Attr(13, U32),
    IFLA_PROTINFO=Attr(12, NEST, BridgePortAttr),
    IFLA_OPERSTATE=Attr(16, U8),
    IFLA_IFALIAS=Attr(20, STR),
    IFLA_LINKINFO=Attr(18, NEST, LinkInfoAttr),
    IFLA_AF_SPEC=Attr(26, NEST),              # BridgeAfSpecAttr or LinkAfSpecAttr: see above
    IFLA_NET_NS_FD=Attr(28, U32),
    IFLA_EXT_MASK=Attr(29, U32),
    IFLA_MIN_MTU=Attr(50, U32),               # the device's MTU bounds, where the kernel has them
    IFLA_MAX_MTU=Attr(51, U32),
    IFLA_LINK_NETNSID=Attr(37, S32),          # present when the peer lives in another namespace
)


VethAttr = AttrSpace(
    VETH_INFO_PEER=Attr(1, MSG, LinkAttr, IFINFOMSG),
)


AddrAttr = AttrSpace(
    IFA_ADDRESS=Attr(1, BYTES),
    IFA_LOCAL=Attr(2, BYTES),
    IFA_FLAGS=Attr(8, U32),
)


RouteMetricAttr = AttrSpace(
    RTAX_MTU=Attr(2, U32),
    RTAX_ADVMSS=Attr(8, U32),
)


RouteAttr = AttrSpace(
    RTA_DST=Attr(1, BYTES),
    RTA_OIF=Attr(4, U32),
    RTA_GATEWAY=Attr(5, BYTES),
    RTA_PRIORITY=Attr(6, U32),
    RTA_METRICS=Attr(8, NEST, RouteMetricAttr),
    RTA_TABLE=Attr(15, U32),
)


NetconfAttr = AttrSpace(
    NETCONFA_IFINDEX=Attr(1, S32),
    NETCONFA_FORWARDING=Attr(2, S32),
)


MESSAGE_LAYOUTS[NETLINK_ROUTE] = {}
for _types, _layout in (((RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_SETLINK),
                         (IFINFOMSG, LinkAttr)),
                        ((RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR), (IFADDRMSG, AddrAttr)),
                        ((RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE), (RTMSG, RouteAttr)),
                        ((RTM_NEWNETCONF, RTM_GETNETCONF), (NETCONFMSG, NetconfAttr))):
    for _type in _types:
        MESSAGE_LAYOUTS[NETLINK_ROUTE][_type] = _layout


class Link(object):
    """What the plugins need to know of a network interface."""

    __slots__ = ("index", "name", "kind", "mac", "mtu", "flags", "master", "operstate",
                 "peer_index", "peer_elsewhere", "alias", "port", "txqlen", "min_mtu",
                 "max_mtu", "af_spec")

    def __init__(self, msg):
        attrs = msg.attrs
        info = attrs.get(LinkAttr.IFLA_LINKINFO, {})
        self.index = msg.header["index"]
        self.flags = msg.header["flags"]
        self.name = attrs.get(LinkAttr.IFLA_IFNAME, "")
        self.kind = info.get(LinkInfoAttr.IFLA_INFO_KIND, "")
        raw_mac = attrs.get(LinkAttr.IFLA_ADDRESS, b"")
        self.mac = mac_to_text(raw_mac) if len(raw_mac) == 6 else ""
        self.mtu = attrs.get(LinkAttr.IFLA_MTU, 0)
        self.master = attrs.get(LinkAttr.IFLA_MASTER, 0)
        self.operstate = attrs.get(LinkAttr.IFLA_OPERSTATE, 0)
        self.peer_index = attrs.get(LinkAttr.IFLA_LINK, 0)
        self.peer_elsewhere = LinkAttr.IFLA_LINK_NETNSID in attrs     # else in this namespace
        self.alias = attrs.get(LinkAttr.IFLA_IFALIAS, "")
        self.port = info.get(LinkInfoAttr.IFLA_INFO_SLAVE_DATA, {})
        self.txqlen = attrs.get(LinkAttr.IFLA_TXQLEN, 0)
        self.min_mtu = attrs.get(LinkAttr.IFLA_MIN_MTU)
        self.max_mtu = attrs.get(LinkAttr.IFLA_MAX_MTU)
        self.af_spec = attrs.get(LinkAttr.IFLA_AF_SPEC, b"")

    @property
    def up(self):
        """Whether the link is administratively up."""
        return bool(self.flags & IFF_UP)

    def ipv6_setting(self, index):
        """The device's IPv6 setting DEVCONF_* `index` (what net/ipv6/conf/<name>/ shows), or
        None where it has no IPv6 (ipv6.disable=1, an MTU below 1280)."""
        inet6 = decode_attrs(LinkAfSpecAttr, self.af_spec).get(LinkAfSpecAttr.AF_INET6, {})
        values = inet6.get(Inet6AfAttr.IFLA_INET6_CONF, b"")
        if len(values) < DEVCONF_VALUE.size * (index + 1):
            return None
        return DEVCONF_VALUE.unpack_from(values, DEVCONF_VALUE.size * index)[0]


_LINK_QUERY = ((LinkAttr.IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS),)


def get_link(nl, name=None, index=0):
    """The link called `name` (or with `index`), or None when there is none."""
    attrs = _LINK_QUERY + (((LinkAttr.IFLA_IFNAME, name),) if name else ())
    try:
        replies = nl.request(RTM_GETLINK, 0, {"index": index}, attrs,
                             what="failed to look up link %s" % (name or index))
    except NetlinkError as err:
        if err.errno in (errno.ENODEV, errno.EINVAL):   # EINVAL: a name the kernel cannot hold
            return None
        raise
    return Link(replies[0]) if replies else None


def list_links(nl, master=0, alias=None):
    """Every link; with `master` only the ports of that bridge (the kernel filters the dump); with
    `alias` only the links of that alias."""
    attrs = _LINK_QUERY + (((LinkAttr.IFLA_MASTER, master),) if master else ())
    raw = alias.encode("utf-8", "surrogateescape") + b"\0" if alias else None
    links = [Link(m) for m in nl.dump(RTM_GETLINK, {}, attrs, what="failed to list links",
                                      containing=raw)]
    return [link for link in links if link.alias == alias] if alias else links


def link_change(index, up=None, promisc=None, master=None, mac=None, allmulti=None, extra=()):
    """A RTM_NEWLINK request (for transact) changing an existing link."""
    flags = change = 0
    for flag, wanted in ((IFF_UP, up), (IFF_PROMISC, promisc), (IFF_ALLMULTI, allmulti)):
        if wanted is not None:
            change |= flag
            flags |= flag if wanted else 0
    attrs = list(extra)
    if master is not None:
        attrs.append((LinkAttr.IFLA_MASTER, master))
    if mac is not None:
        attrs.append((LinkAttr.IFLA_ADDRESS, parse_mac(mac)))
    return NetlinkRequest(RTM_NEWLINK, header={"index": index, "flags": flags, "change": change},
                          attrs=attrs)


def arp_notify_change(index):
    """A request (for transact) setting the link's IPv4 arp_notify to 1 over netlink: the path
    /proc/sys/net/ipv4/conf/eth0 is looked up among the eth0 of every namespace on the node."""
    return link_change(index, extra=((LinkAttr.IFLA_AF_SPEC, (
        (LinkAfSpecAttr.AF_INET, ((InetAfAttr.IFLA_INET_CONF, (
            (Ipv4DevconfAttr.IPV4_DEVCONF_ARP_NOTIFY, 1),)),)),)),))


def without_ipv6_addresses(nl, link):
    """Give `link`, before it is first brought up, no IPv6 address of its own (addr_gen_mode none):
    no link-local address, so no duplicate address detection, MLD reports or fe80::/64 route for
    it.  The kernel takes this only for an existing device, not in the request creating it.  A
    device without IPv6 (ipv6.disable=1, an MTU below 1280) has nothing to turn off."""
    try:
        set_link(nl, link.index, "failed to turn off IPv6 addresses on %s" % link.name, extra=(
            (LinkAttr.IFLA_AF_SPEC, ((LinkAfSpecAttr.AF_INET6, (
                (Inet6AfAttr.IFLA_INET6_ADDR_GEN_MODE, IN6_ADDR_GEN_MODE_NONE),)),)),))
    except NetlinkError as err:
        if err.errno not in (errno.EAFNOSUPPORT, errno.EOPNOTSUPP, errno.EINVAL):
            raise


def set_link(nl, index, what, **changes):
    """Change one link (see link_change for `changes`) in its own transaction."""
    nl.transact([link_change(index, **changes)], what)


def forwarding_on(nl, family):
    """Whether forwarding is on for every interface of the socket's namespace (net/ipv4/ip_forward,
    net/ipv6/conf/all/forwarding), asked over netlink; None when the kernel cannot say (no IPv6)."""
    try:
        replies = nl.request(RTM_GETNETCONF, 0, {"family": AF_OF_FAMILY[family]},
                             ((NetconfAttr.NETCONFA_IFINDEX, NETCONFA_IFINDEX_ALL),),
                             what="failed to read the forwarding setting")
    except NetlinkError:
        return None
    for msg in replies:
        if msg.get(NetconfAttr.NETCONFA_FORWARDING) is not None:
            return msg.get(NetconfAttr.NETCONFA_FORWARDING) == 1
    return None


def create_bridge(nl, name, mtu=0, vlan_filtering=False):
    """Create a bridge; returns False when a link of that name already exists (EEXIST)."""
    data = ((BridgeAttr.IFLA_BR_VLAN_FILTERING, 1),) if vlan_filtering else ()
    attrs = [(LinkAttr.IFLA_IFNAME, name),
             (LinkAttr.IFLA_LINKINFO, ((LinkInfoAttr.IFLA_INFO_KIND, "bridge"),
                                       (LinkInfoAttr.IFLA_INFO_DATA, data)))]
    if mtu:
        attrs.append((LinkAttr.IFLA_MTU, mtu))
    return unless_exists(nl.request, RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, {}, attrs,
                         what="failed to create bridge %r" % name)


def create_veth(nl, name, peer_name, peer_netns_fd=None, mtu=0, mac=None):
    """Create a veth pair: `name` in the socket's namespace, `peer_name` in `peer_netns_fd` (by
    default the socket's namespace too)."""
    peer = [(LinkAttr.IFLA_IFNAME, peer_name)]
    if peer_netns_fd is not None:
        peer.append((LinkAttr.IFLA_NET_NS_FD, peer_netns_fd))
    attrs = [(LinkAttr.IFLA_IFNAME, name)]
    if mtu:
        peer.append((LinkAttr.IFLA_MTU, mtu))
        attrs.append((LinkAttr.IFLA_MTU, mtu))
    if mac:
        attrs.append((LinkAttr.IFLA_ADDRESS, parse_mac(mac)))
    attrs.append((LinkAttr.IFLA_LINKINFO, (
        (LinkInfoAttr.IFLA_INFO_KIND, "veth"),
        (LinkInfoAttr.IFLA_INFO_DATA, ((VethAttr.VETH_INFO_PEER, ({}, peer)),)))))
    nl.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, {}, attrs,
               what="failed to create veth pair %s/%s" % (name, peer_name))


def create_ifb(nl, name, mtu=0, alias=""):
    """Create an IFB device, up; returns False when a link of that name already exists (EEXIST).

    A new link ignores IFLA_IFALIAS, so the alias is set by name in the same datagram: the
    kernel handles both within one send, and no crash leaves the device without it.
    """
    attrs = [(LinkAttr.IFLA_IFNAME, name),
             (LinkAttr.IFLA_LINKINFO, ((LinkInfoAttr.IFLA_INFO_KIND, "ifb"),))]
    if mtu:
        attrs.append((LinkAttr.IFLA_MTU, mtu))
    requests = [NetlinkRequest(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL,
                               {"flags": IFF_UP, "change": IFF_UP}, attrs)]
    if alias:
        requests.append(NetlinkRequest(RTM_NEWLINK, attrs=((LinkAttr.IFLA_IFNAME, name),
                                                            (LinkAttr.IFLA_IFALIAS, alias))))
    return unless_exists(nl.transact, requests, "failed to create IFB device %s" % name)


def delete_link(nl, index, what=""):
    """Delete a link; a link that is already gone is not an error."""
    try:
        nl.request(RTM_DELLINK, 0, {"index": index}, (), what=what or "failed to delete link")
    except NetlinkError as err:
        if err.errno != errno.ENODEV:
            raise


def bridge_port_change(index, hairpin, isolated):
    """A request (for transact) setting a bridge port's hairpin and isolation flags."""
    return NetlinkRequest(RTM_SETLINK, header={"family": AF_BRIDGE, "index": index}, attrs=(
        (LinkAttr.IFLA_PROTINFO, ((BridgePortAttr.IFLA_BRPORT_MODE, int(hairpin)),
                                  (BridgePortAttr.IFLA_BRPORT_ISOLATED, int(isolated)))),))


def bridge_vlan_request(index, vid, flags, remove=False):
    """A request (for transact) adding or removing one VLAN on a bridge port."""
    return NetlinkRequest(
        RTM_DELLINK if remove else RTM_SETLINK, header={"family": AF_BRIDGE, "index": index},
        attrs=((LinkAttr.IFLA_AF_SPEC, ((BridgeAfSpecAttr.IFLA_BRIDGE_FLAGS, BRIDGE_FLAGS_MASTER),
                                        (BridgeAfSpecAttr.IFLA_BRIDGE_VLAN_INFO,
                                         BRIDGE_VLAN_INFO.pack(flags, vid)))),))


def port_vlans(nl, index):
    """{vid: flags} of the VLANs on bridge port `index` (none where the bridge does not filter)."""
    messages = nl.dump(RTM_GETLINK, {"family": AF_BRIDGE},
                       ((LinkAttr.IFLA_EXT_MASK, RTEXT_FILTER_BRVLAN),),
                       what="failed to list bridge VLANs")
    vlans = {}
    for msg in messages:
        if msg.header["index"] == index:
            spec = decode_attrs(BridgeAfSpecAttr, msg.get(LinkAttr.IFLA_AF_SPEC, b""))
            for raw in spec.get(BridgeAfSpecAttr.IFLA_BRIDGE_VLAN_INFO, ()):
                flags, vid = BRIDGE_VLAN_INFO.unpack_from(raw)
                vlans[vid] = flags
    return vlans


def vlan_changes(index, current, wanted):
    """Requests (for transact) taking port `index` from VLANs `current` to `wanted` ({vid:
    flags})."""
    requests = [bridge_vlan_request(index, vid, 0, remove=True)
                for vid in sorted(current) if vid not in wanted]
    requests.extend(bridge_vlan_request(index, vid, flags) for vid, flags in sorted(wanted.items()))
    return requests


class Address(object):
    """An address on an interface."""

    __slots__ = ("prefix", "flags", "index", "scope")

    def __init__(self, msg):
        family = FAMILY_OF_AF[msg.header["family"]]
        raw = msg.get(AddrAttr.IFA_LOCAL) or msg.get(AddrAttr.IFA_ADDRESS)
        self.prefix = Prefix(family, int.from_bytes(raw, "big"), msg.header["prefixlen"])
        self.flags = msg.get(AddrAttr.IFA_FLAGS, msg.header["flags"])
        self.index = msg.header["index"]
        self.scope = msg.header["scope"]


def list_addrs(nl, index=0, family=0):
    """Addresses of link `index` (all links when 0), of one family (4, 6) or both."""
    msgs = nl.dump(RTM_GETADDR, {"family": AF_OF_FAMILY.get(family, AF_UNSPEC), "index": index},
                   what="failed to list addresses")
    return [Address(m) for m in msgs
            if m.header["family"] in FAMILY_OF_AF and (not index or m.header["index"] == index)]


def addr_request(index, prefix, remove=False, nodad=False):
    """A request (for transact) adding or removing `prefix` on link `index`."""
    raw = ip_bytes(prefix.family, prefix.ip)
    attrs = [(AddrAttr.IFA_LOCAL, raw), (AddrAttr.IFA_ADDRESS, raw)]
    if nodad:
        attrs.append((AddrAttr.IFA_FLAGS, IFA_F_NODAD))
    return NetlinkRequest(
        RTM_DELADDR if remove else RTM_NEWADDR, 0 if remove else NLM_F_CREATE | NLM_F_EXCL,
        {"family": AF_OF_FAMILY[prefix.family], "prefixlen": prefix.length, "index": index}, attrs)


def route_request(dst, gateway, oif, priority=0, table=0, scope=None, mtu=0, advmss=0):
    """A request (for transact) adding a route; `gateway` is (family, ip) or None."""
    family = dst.family
    attrs = [(RouteAttr.RTA_OIF, oif)]
    if dst.length:
        attrs.append((RouteAttr.RTA_DST, ip_bytes(family, dst.network)))
    if gateway is not None:
        attrs.append((RouteAttr.RTA_GATEWAY, ip_bytes(*gateway)))
    if priority:
        attrs.append((RouteAttr.RTA_PRIORITY, priority))
    if table > 255:
        attrs.append((RouteAttr.RTA_TABLE, table))
    metrics = []
    if mtu:
        metrics.append((RouteMetricAttr.RTAX_MTU, mtu))
    if advmss:
        metrics.append((RouteMetricAttr.RTAX_ADVMSS, advmss))
    if metrics:
        attrs.append((RouteAttr.RTA_METRICS, metrics))
    if scope is None:
        scope = RT_SCOPE_UNIVERSE if gateway is not None else RT_SCOPE_LINK
    header = {"family": AF_OF_FAMILY[family], "dst_len": dst.length,
              "table": table if 0 < table <= 255 else RT_TABLE_MAIN, "protocol": RTPROT_BOOT,
              "scope": scope, "type": RTN_UNICAST}
    return NetlinkRequest(RTM_NEWROUTE, NLM_F_CREATE, header, attrs)


class Route(object):
    """A route as read back from the kernel."""

    __slots__ = ("dst", "gateway", "oif", "table")

    def __init__(self, msg):
        family = FAMILY_OF_AF[msg.header["family"]]
        raw_dst = msg.get(RouteAttr.RTA_DST)
        self.dst = Prefix(family, int.from_bytes(raw_dst, "big") if raw_dst else 0,
                          msg.header["dst_len"])
        raw_gw = msg.get(RouteAttr.RTA_GATEWAY)
        self.gateway = (family, int.from_bytes(raw_gw, "big")) if raw_gw else None
        self.oif = msg.get(RouteAttr.RTA_OIF, 0)
        self.table = msg.get(RouteAttr.RTA_TABLE, msg.header["table"])


def route_lookup(nl, family, ip):
    """The outgoing interface index of the route the kernel picks for `ip` (`ip route get`),
    or 0 when there is none."""
    try:
        header = {"family": AF_OF_FAMILY[family], "dst_len": IP_BITS[family]}
        replies = nl.request(RTM_GETROUTE, 0, header, ((RouteAttr.RTA_DST, ip_bytes(family, ip)),),
                             what="failed to look up the route to %s" % ip_to_text(family, ip))
    except NetlinkError as err:
        if err.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return 0
        raise
    return replies[0].get(RouteAttr.RTA_OIF, 0) if replies else 0


def list_routes(nl, family):
    """The routes of one family (4 or 6) in every table."""
    msgs = nl.dump(RTM_GETROUTE, {"family": AF_OF_FAMILY[family]}, what="failed to list routes")
    return [Route(m) for m in msgs if m.header["family"] == AF_OF_FAMILY[family]]


# --- traffic control ---------------------------------------------------------------------------
# Queueing disciplines and filters (linux/rtnetlink.h tcmsg, pkt_sched.h, pkt_cls.h,
# tc_act/tc_mirred.h), as the bandwidth plugin uses them: a token bucket (tbf) as a link's root
# qdisc, the ingress qdisc, and on it a match-everything u32 filter whose mirred action redirects
# what a link receives to another link (an IFB, whose own root tbf then shapes it).  A qdisc's and
# a filter's TCA_OPTIONS are laid out by their kind: the caller decodes them with the kind's space.

RTM_NEWQDISC, RTM_DELQDISC, RTM_GETQDISC = 36, 37, 38
RTM_NEWTFILTER, RTM_DELTFILTER, RTM_GETTFILTER = 44, 45, 46
NLM_F_REPLACE = 0x100
NLM_F_ECHO = 0x08               # a qdisc GET answers us only with it (else only the TC group)

TC_H_ROOT = 0xFFFFFFFF
TC_H_INGRESS = 0xFFFFFFF1
INGRESS_HANDLE = 0xFFFF0000                    # ffff:, the ingress qdisc's fixed handle
TBF_HANDLE = 0x10000                           # 1:, as the reference numbers its root tbf
# A qdisc or filter asked for that is not there: ENOENT, or ENODEV (no link), or EINVAL (no
# ingress qdisc to look in).
ALREADY_GONE = (errno.ENOENT, errno.ENODEV, errno.EINVAL)
ETH_P_ALL = 0x0003
TC_LINKLAYER_ETHERNET = 1
TC_U32_TERMINAL = 1
TCA_EGRESS_REDIR = 1                           # mirred: redirect to the target's egress
TC_ACT_STOLEN = 4                              # the action consumed the packet
TIME_UNITS_PER_SEC = 1000000                   # tc's time unit: the microsecond

TCMSG = Header("=BxxxiIII", ("family", "index", "handle", "parent", "info"))
# struct tc_tbf_qopt: rate and peak rate (struct tc_ratespec: cell_log, linklayer, overhead,
# cell_align, mpu, rate in bytes/s), limit in bytes, buffer in scheduler ticks, mtu.
TBF_QOPT = struct.Struct("=BBHhHI" "BBHhHI" "III")
# struct tc_u32_sel (flags, offshift, nkeys, offmask, off, offoff, hoff, hmask) and one
# struct tc_u32_key (mask, value, off, offmask): a key of mask 0 matches every packet.
U32_SEL_ONE_KEY = struct.Struct("=BBBxHHhhI" "IIii")
# struct tc_mirred: struct tc_gen (index, capab, action, refcnt, bindcnt), eaction, ifindex.
MIRRED_PARMS = struct.Struct("=IIiiiiI")


# No rate table (TCA_TBF_RTAB): given the link layer, the kernel computes packet times itself.
TbfAttr = AttrSpace(
    TCA_TBF_PARMS=Attr(1, BYTES),
    TCA_TBF_RATE64=Attr(4, U64),               # a rate of 2^32 bytes/s or more
)


MirredAttr = AttrSpace(
    TCA_MIRRED_PARMS=Attr(2, BYTES),
)


ActionAttr = AttrSpace(
    TCA_ACT_KIND=Attr(1, STR),
    TCA_ACT_OPTIONS=Attr(2, NEST, MirredAttr),
)


# A filter's actions are nested under their order (1, 2, ...); the first few are read back.
ActionListAttr = AttrSpace(**dict(("TCA_ACT_ORDER_%d" % n, Attr(n, NEST, ActionAttr))
                                  for n in range(1, 5)))


U32Attr = AttrSpace(
    TCA_U32_CLASSID=Attr(1, U32),
    TCA_U32_SEL=Attr(5, BYTES),
    TCA_U32_ACT=Attr(7, NEST, ActionListAttr),
)


TcAttr = AttrSpace(
    TCA_KIND=Attr(1, STR),
    TCA_OPTIONS=Attr(2, NEST),                 # layout depends on the kind: decoded by the caller
)


for _type in (RTM_NEWQDISC, RTM_DELQDISC, RTM_GETQDISC,
              RTM_NEWTFILTER, RTM_DELTFILTER, RTM_GETTFILTER):
    MESSAGE_LAYOUTS[NETLINK_ROUTE][_type] = (TCMSG, TcAttr)


class Qdisc(object):
    """A queueing discipline as read back: its link, kind, handle, parent and, for a tbf, its
    rate (bytes/s), limit (bytes) and buffer (ticks)."""

    __slots__ = ("index", "kind", "handle", "parent", "rate", "limit", "buffer")

    def __init__(self, msg):
        self.index = msg.header["index"]
        self.handle = msg.header["handle"]
        self.parent = msg.header["parent"]
        self.kind = msg.get(TcAttr.TCA_KIND, "")
        self.rate = self.limit = self.buffer = None
        if self.kind == "tbf":
            options = decode_attrs(TbfAttr, msg.get(TcAttr.TCA_OPTIONS, b""))
            parms = options.get(TbfAttr.TCA_TBF_PARMS, b"")
            if len(parms) >= TBF_QOPT.size:
                fields = TBF_QOPT.unpack_from(parms)
                self.rate = options.get(TbfAttr.TCA_TBF_RATE64, fields[5])
                self.limit, self.buffer = fields[12], fields[13]


def get_qdisc(nl, index, parent):
    """The qdisc of link `index` at `parent` (TC_H_ROOT or TC_H_INGRESS), or None."""
    try:
        replies = nl.request(RTM_GETQDISC, NLM_F_ECHO, {"index": index, "parent": parent}, (),
                             what="failed to read the qdiscs of link %d" % index)
    except NetlinkError as err:
        if err.errno in ALREADY_GONE:
            return None
        raise
    return Qdisc(replies[0]) if replies else None


def tbf_request(index, rate, limit, buffer):
    """A request (for transact) making or replacing link `index`'s root qdisc: tbf 1: with `rate`
    bytes/s, `limit` bytes queued at most and a bucket of `buffer` scheduler ticks."""
    parms = TBF_QOPT.pack(0, TC_LINKLAYER_ETHERNET, 0, 0, 0, min(rate, 0xFFFFFFFF),
                          0, 0, 0, 0, 0, 0, limit, buffer, 0)
    options = [(TbfAttr.TCA_TBF_PARMS, parms)]
    if rate > 0xFFFFFFFF:
        options.append((TbfAttr.TCA_TBF_RATE64, rate))
    return NetlinkRequest(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_REPLACE,
                          {"index": index, "handle": TBF_HANDLE, "parent": TC_H_ROOT},
                          ((TcAttr.TCA_KIND, "tbf"), (TcAttr.TCA_OPTIONS, options)))


def ingress_qdisc_request(index):
    """A request (for transact) giving link `index` the ingress qdisc (kept when it has one)."""
    return NetlinkRequest(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_REPLACE,
                          {"index": index, "handle": INGRESS_HANDLE, "parent": TC_H_INGRESS},
                          ((TcAttr.TCA_KIND, "ingress"),))


REDIRECT_FILTER_HANDLE = 0x80000800            # u32 800::800: fixed, so a repeated ADD replaces it
REDIRECT_FILTER_PRIORITY = 1
REDIRECT_CLASS = 0x10001                       # flowid 1:1, as the reference's filter says


def redirect_filter_request(index, target_index):
    """A request (for transact) making or replacing, on link `index`'s ingress qdisc, a filter that
    redirects every packet the link receives to link `target_index`'s egress."""
    selector = U32_SEL_ONE_KEY.pack(TC_U32_TERMINAL, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    mirred = MIRRED_PARMS.pack(0, 0, TC_ACT_STOLEN, 0, 0, TCA_EGRESS_REDIR, target_index)
    action = ((ActionAttr.TCA_ACT_KIND, "mirred"),
              (ActionAttr.TCA_ACT_OPTIONS, ((MirredAttr.TCA_MIRRED_PARMS, mirred),)))
    options = ((U32Attr.TCA_U32_CLASSID, REDIRECT_CLASS), (U32Attr.TCA_U32_SEL, selector),
               (U32Attr.TCA_U32_ACT, ((ActionListAttr.TCA_ACT_ORDER_1, action),)))
    protocol = (ETH_P_ALL & 0xFF) << 8 | ETH_P_ALL >> 8          # in network byte order
    info = REDIRECT_FILTER_PRIORITY << 16 | protocol
    return NetlinkRequest(RTM_NEWTFILTER, NLM_F_CREATE,
                          {"index": index, "handle": REDIRECT_FILTER_HANDLE,
                           "parent": INGRESS_HANDLE, "info": info},
                          ((TcAttr.TCA_KIND, "u32"), (TcAttr.TCA_OPTIONS, options)))


def redirect_targets(nl, index):
    """The links that link `index`'s ingress filters redirect packets to (mirred), in order."""
    try:
        messages = nl.dump(RTM_GETTFILTER, {"index": index, "parent": INGRESS_HANDLE},
                           what="failed to list the filters of link %d" % index)
    except NetlinkError as err:
        if err.errno in ALREADY_GONE:
            return []
        raise
    targets = []
    for msg in messages:
        if msg.get(TcAttr.TCA_KIND) != "u32":
            continue
        options = decode_attrs(U32Attr, msg.get(TcAttr.TCA_OPTIONS, b""))
        actions = options.get(U32Attr.TCA_U32_ACT, {})
        for order in sorted(actions, key=lambda attr: attr.number):
            action = actions[order]
            parms = action.get(ActionAttr.TCA_ACT_OPTIONS, {}).get(MirredAttr.TCA_MIRRED_PARMS, b"")
            if action.get(ActionAttr.TCA_ACT_KIND) == "mirred" and len(parms) >= MIRRED_PARMS.size:
                fields = MIRRED_PARMS.unpack_from(parms)
                if fields[5] == TCA_EGRESS_REDIR:
                    targets.append(fields[6])
    return targets


def qdisc_delete_request(index, handle, parent):
    """A request (for transact) removing link `index`'s qdisc `handle` at `parent`."""
    return NetlinkRequest(RTM_DELQDISC, header={"index": index, "handle": handle, "parent": parent})


def scheduler_ticks_per_usec():
    """The kernel packet scheduler's clock ticks per microsecond (/proc/net/psched), which tbf's
    buffer is counted in; 15.625 on every kernel since 2.6.x when the file cannot be read."""
    if PROCESS.ticks_per_usec is None:
        PROCESS.ticks_per_usec = _read_psched()
    return PROCESS.ticks_per_usec


def _read_psched():
    """/proc/net/psched read as the netlink library the reference uses reads it."""
    try:
        with open("/proc/net/psched", "rb") as f:
            fields = [int(v, 16) for v in f.read().split()[:3]]
        t2us, us2t, clock_res = fields
    except (OSError, ValueError):
        return 15.625
    if clock_res == 1000000000:       # a high-resolution clock: one tick per scheduler unit
        t2us = us2t
    return float(t2us) / us2t * (clock_res / float(TIME_UNITS_PER_SEC))


# --- /proc/sys --------------------------------------------------------------------------------
# Files under /proc/sys/net belong to the network namespace of the thread that opens them.  Each
# path lookup there compares against the entries of every namespace that has opened one (0.25 ms
# with 1,000 containers), so an ADD reads settings over netlink (Link.ipv6_setting,
# forwarding_on) and opens a file only to change what netlink cannot.

def read_sysctl(key):
    """Value of a sysctl such as "net/ipv4/ip_forward", or None when it does not exist."""
    try:
        with open("/proc/sys/" + key, "rb") as f:
            return f.read().decode().strip()
    except OSError:
        return None


def write_sysctl(key, value, required=False):
    """Set a sysctl unless it already holds `value`; missing IPv6 files are tolerated unless
    `required` (hosts booted with ipv6.disable=1 have none)."""
    if read_sysctl(key) != value:
        set_sysctl(key, value, required)


def set_sysctl(key, value, required=False):
    """Write a sysctl known to differ from `value` (no reading first); failures as write_sysctl."""
    try:
        with open("/proc/sys/" + key, "wb") as f:
            f.write(value.encode())
    except OSError as err:
        if required:
            raise CNIError(ERR_INTERNAL, "failed to set sysctl %s=%s: %s"
                           % (key.replace("/", "."), value, err.strerror))


# ==============================================================================================
# nf_tables messages
# ==============================================================================================
# nf_tables spoken over NETLINK_NETFILTER, so no `nft` or `iptables` program is needed: message
# types and attribute spaces (linux/netfilter/nf_tables.h), the user-data comment `nft` writes,
# the expressions rules are made of, one transaction (NftBatch) and rules as listed (NftRule).
# Nothing here knows a plugin's tables: that is the next section's and each plugin's business.

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
(NFT_MSG_NEWTABLE, NFT_MSG_GETTABLE, NFT_MSG_DELTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_GETCHAIN,
 NFT_MSG_DELCHAIN, NFT_MSG_NEWRULE, NFT_MSG_GETRULE, NFT_MSG_DELRULE) = [
    (NFNL_SUBSYS_NFTABLES << 8) | n for n in range(9)]

NFT_MSG_NEWGEN, NFT_MSG_GETGEN = (NFNL_SUBSYS_NFTABLES << 8) | 15, (NFNL_SUBSYS_NFTABLES << 8) | 16

NFPROTO_INET, NFPROTO_IPV4, NFPROTO_BRIDGE, NFPROTO_IPV6 = 1, 2, 7, 10
NF_INET_PRE_ROUTING, NF_INET_FORWARD, NF_INET_LOCAL_OUT, NF_INET_POST_ROUTING = 0, 2, 3, 4
NF_BR_PRE_ROUTING = 0
NF_ACCEPT, NF_DROP = 1, 0
NFT_JUMP, NFT_GOTO, NFT_RETURN = -3, -4, -5
NFT_REG_VERDICT, NFT_REG_1, NFT_REG_2 = 0, 1, 2
NFT_CMP_EQ, NFT_CMP_NEQ = 0, 1
NFT_META_IIFNAME, NFT_META_OIFNAME, NFT_META_NFPROTO, NFT_META_L4PROTO = 6, 7, 15, 16
NFT_PAYLOAD_LL_HEADER, NFT_PAYLOAD_NETWORK_HEADER, NFT_PAYLOAD_TRANSPORT_HEADER = 0, 1, 2
NFT_FIB_RESULT_ADDRTYPE, NFTA_FIB_F_DADDR = 3, 2
RTN_LOCAL = 2                                 # the address type `fib daddr type local` compares
NFT_NAT_DNAT = 1
NF_NAT_RANGE_MAP_IPS, NF_NAT_RANGE_PROTO_SPECIFIED = 1, 2
NFT_CT_STATUS = 2
IPS_DST_NAT = 0x20                            # conntrack status bit: the connection was DNATed
IPPROTO_NUMBERS = {"tcp": 6, "udp": 17, "sctp": 132}
NFTNL_UDATA_COMMENT = 0          # the comment TLV in table, chain and rule user data
BE32S = ">i"
_SCALARS[BE32S] = struct.Struct(BE32S)

NFGENMSG = Header("!BBH", ("family", "version", "res_id"))
NFT_BATCH = BatchFrame(NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END, {"res_id": NFNL_SUBSYS_NFTABLES})


NftVerdictAttr = AttrSpace(
    NFTA_VERDICT_CODE=Attr(1, BE32S),
    NFTA_VERDICT_CHAIN=Attr(2, STR),
)


NftDataAttr = AttrSpace(
    NFTA_DATA_VALUE=Attr(1, BYTES),
    NFTA_DATA_VERDICT=Attr(2, NEST, NftVerdictAttr),
)


NftMetaAttr = AttrSpace(
    NFTA_META_DREG=Attr(1, BE32),
    NFTA_META_KEY=Attr(2, BE32),
)


NftPayloadAttr = AttrSpace(
    NFTA_PAYLOAD_DREG=Attr(1, BE32),
    NFTA_PAYLOAD_BASE=Attr(2, BE32),
    NFTA_PAYLOAD_OFFSET=Attr(3, BE32),
    NFTA_PAYLOAD_LEN=Attr(4, BE32),
)


NftCmpAttr = AttrSpace(
    NFTA_CMP_SREG=Attr(1, BE32),
    NFTA_CMP_OP=Attr(2, BE32),
    NFTA_CMP_DATA=Attr(3, NEST, NftDataAttr),
)


NftBitwiseAttr = AttrSpace(
    NFTA_BITWISE_SREG=Attr(1, BE32),
    NFTA_BITWISE_DREG=Attr(2, BE32),
    NFTA_BITWISE_LEN=Attr(3, BE32),
    NFTA_BITWISE_MASK=Attr(4, NEST, NftDataAttr),
    NFTA_BITWISE_XOR=Attr(5, NEST, NftDataAttr),
)


NftImmediateAttr = AttrSpace(
    NFTA_IMMEDIATE_DREG=Attr(1, BE32),
    NFTA_IMMEDIATE_DATA=Attr(2, NEST, NftDataAttr),
)


NftCounterAttr = AttrSpace(
    NFTA_COUNTER_BYTES=Attr(1, BE64),
    NFTA_COUNTER_PACKETS=Attr(2, BE64),
)


NftFibAttr = AttrSpace(
    NFTA_FIB_DREG=Attr(1, BE32),
    NFTA_FIB_RESULT=Attr(2, BE32),
    NFTA_FIB_FLAGS=Attr(3, BE32),
)


NftNatAttr = AttrSpace(
    NFTA_NAT_TYPE=Attr(1, BE32),
    NFTA_NAT_FAMILY=Attr(2, BE32),
    NFTA_NAT_REG_ADDR_MIN=Attr(3, BE32),
    NFTA_NAT_REG_ADDR_MAX=Attr(4, BE32),
    NFTA_NAT_REG_PROTO_MIN=Attr(5, BE32),
    NFTA_NAT_REG_PROTO_MAX=Attr(6, BE32),
    NFTA_NAT_FLAGS=Attr(7, BE32),
)


NftCtAttr = AttrSpace(
    NFTA_CT_DREG=Attr(1, BE32),
    NFTA_CT_KEY=Attr(2, BE32),
)


NftMasqAttr = AttrSpace(
    NFTA_MASQ_FLAGS=Attr(1, BE32),
)


# An x_tables match run by nf_tables (nft_compat): how iptables-nft writes the matches it has no
# native form for (`-m comment`, `-m conntrack`); INFO is the match's own C struct.
NftMatchAttr = AttrSpace(
    NFTA_MATCH_NAME=Attr(1, STR),
    NFTA_MATCH_REV=Attr(2, BE32),
    NFTA_MATCH_INFO=Attr(3, BYTES),
)


# An expression's data is laid out by its name; these are the expressions the rules use.
EXPRESSION_SPACES = {"meta": NftMetaAttr, "payload": NftPayloadAttr, "cmp": NftCmpAttr,
                     "bitwise": NftBitwiseAttr, "immediate": NftImmediateAttr, "fib": NftFibAttr,
                     "nat": NftNatAttr, "ct": NftCtAttr, "masq": NftMasqAttr,
                     "counter": NftCounterAttr, "match": NftMatchAttr}


NftExprAttr = AttrSpace(
    NFTA_EXPR_NAME=Attr(1, STR),
    NFTA_EXPR_DATA=Attr(2, NEST),
)


NftListAttr = AttrSpace(
    NFTA_LIST_ELEM=Attr(1, NEST, NftExprAttr, repeated=True),
)


NftTableAttr = AttrSpace(
    NFTA_TABLE_NAME=Attr(1, STR),
    NFTA_TABLE_USERDATA=Attr(6, BYTES),
)


NftHookAttr = AttrSpace(
    NFTA_HOOK_HOOKNUM=Attr(1, BE32),
    NFTA_HOOK_PRIORITY=Attr(2, BE32S),
)


NftChainAttr = AttrSpace(
    NFTA_CHAIN_TABLE=Attr(1, STR),
    NFTA_CHAIN_NAME=Attr(3, STR),
    NFTA_CHAIN_HOOK=Attr(4, NEST, NftHookAttr),
    NFTA_CHAIN_POLICY=Attr(5, BE32),
    NFTA_CHAIN_TYPE=Attr(7, STR),
    NFTA_CHAIN_USERDATA=Attr(12, BYTES),
)


NftRuleAttr = AttrSpace(
    NFTA_RULE_TABLE=Attr(1, STR),
    NFTA_RULE_CHAIN=Attr(2, STR),
    NFTA_RULE_HANDLE=Attr(3, BE64),
    NFTA_RULE_EXPRESSIONS=Attr(4, NEST),      # decoded only when needed (NftRule.expressions)
    NFTA_RULE_USERDATA=Attr(7, BYTES),
)


NftGenAttr = AttrSpace(
    NFTA_GEN_ID=Attr(1, BE32),
)


# The batch-begin message may name the ruleset generation its changes were planned against: the
# kernel then refuses the whole batch with ERESTART if anyone changed the ruleset meanwhile.
NfnlBatchAttr = AttrSpace(
    NFNL_BATCH_GENID=Attr(1, BE32),
)


_NoAttr = AttrSpace()


for _type, _space in ((NFT_MSG_NEWTABLE, NftTableAttr), (NFT_MSG_GETTABLE, NftTableAttr),
                      (NFT_MSG_DELTABLE, NftTableAttr), (NFT_MSG_NEWCHAIN, NftChainAttr),
                      (NFT_MSG_GETCHAIN, NftChainAttr), (NFT_MSG_DELCHAIN, NftChainAttr),
                      (NFT_MSG_NEWRULE, NftRuleAttr), (NFT_MSG_GETRULE, NftRuleAttr),
                      (NFT_MSG_DELRULE, NftRuleAttr), (NFT_MSG_NEWGEN, NftGenAttr),
                      (NFT_MSG_GETGEN, NftGenAttr), (NFNL_MSG_BATCH_BEGIN, NfnlBatchAttr),
                      (NFNL_MSG_BATCH_END, _NoAttr)):
    MESSAGE_LAYOUTS.setdefault(NETLINK_NETFILTER, {})[_type] = (NFGENMSG, _space)


def udata_comment(text):
    """The user-data TLV that `nft` uses for a comment (NUL-terminated, at most 255 bytes)."""
    raw = text.encode("utf-8", "surrogateescape")[:254] + b"\0"
    return struct.pack("=BB", NFTNL_UDATA_COMMENT, len(raw)) + raw


def comment_of(udata):
    """The comment in a user-data blob, or ""."""
    offset = 0
    while udata and offset + 2 <= len(udata):
        kind, length = struct.unpack_from("=BB", udata, offset)
        if kind == NFTNL_UDATA_COMMENT:
            text = udata[offset + 2:offset + 2 + length].split(b"\0", 1)[0]
            return text.decode("utf-8", "replace")
        offset += 2 + length
    return ""


# --- expressions ---------------------------------------------------------------------------

def _expr(name, attrs):
    """One element of a rule's expression list: name and its attributes."""
    return (NftListAttr.NFTA_LIST_ELEM, ((NftExprAttr.NFTA_EXPR_NAME, name),
                                         (NftExprAttr.NFTA_EXPR_DATA, attrs)))


def _value(data):
    """Immediate data for a cmp, bitwise or immediate expression."""
    return ((NftDataAttr.NFTA_DATA_VALUE, data),)


def expr_meta(key):
    """Load meta key `key` (iifname, nfproto ...) into register 1."""
    return _expr("meta",
                 ((NftMetaAttr.NFTA_META_KEY, key), (NftMetaAttr.NFTA_META_DREG, NFT_REG_1)))


def expr_payload(base, offset, length):
    """Load `length` bytes at `offset` of header `base` into register 1."""
    return _expr("payload", ((NftPayloadAttr.NFTA_PAYLOAD_DREG, NFT_REG_1),
                             (NftPayloadAttr.NFTA_PAYLOAD_BASE, base),
                             (NftPayloadAttr.NFTA_PAYLOAD_OFFSET, offset),
                             (NftPayloadAttr.NFTA_PAYLOAD_LEN, length)))


def expr_cmp(op, data):
    """Compare register 1 with `data` (NFT_CMP_EQ, NFT_CMP_NEQ)."""
    return _expr("cmp", ((NftCmpAttr.NFTA_CMP_SREG, NFT_REG_1), (NftCmpAttr.NFTA_CMP_OP, op),
                         (NftCmpAttr.NFTA_CMP_DATA, _value(data))))


def expr_bitwise(mask):
    """AND register 1 with `mask` (a prefix match)."""
    return _expr("bitwise", ((NftBitwiseAttr.NFTA_BITWISE_SREG, NFT_REG_1),
                             (NftBitwiseAttr.NFTA_BITWISE_DREG, NFT_REG_1),
                             (NftBitwiseAttr.NFTA_BITWISE_LEN, len(mask)),
                             (NftBitwiseAttr.NFTA_BITWISE_MASK, _value(mask)),
                             (NftBitwiseAttr.NFTA_BITWISE_XOR, _value(b"\0" * len(mask)))))


def expr_verdict(code, chain=None):
    """A verdict: accept, drop, return, or jump/goto `chain`."""
    verdict = [(NftVerdictAttr.NFTA_VERDICT_CODE, code)]
    if chain:
        verdict.append((NftVerdictAttr.NFTA_VERDICT_CHAIN, chain))
    return _expr("immediate", ((NftImmediateAttr.NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT),
                               (NftImmediateAttr.NFTA_IMMEDIATE_DATA,
                                ((NftDataAttr.NFTA_DATA_VERDICT, verdict),))))


def expr_masquerade():
    """`masquerade`: source NAT to the outgoing interface's address."""
    return _expr("masq", ())


def expr_counter():
    """`counter`: packets and bytes, from zero (iptables-nft puts one in every rule)."""
    return _expr("counter", ((NftCounterAttr.NFTA_COUNTER_BYTES, 0),
                             (NftCounterAttr.NFTA_COUNTER_PACKETS, 0)))


def expr_xt_match(name, revision, info):
    """An x_tables match (nft_compat): its name, revision and C struct `info`."""
    return _expr("match", ((NftMatchAttr.NFTA_MATCH_NAME, name),
                           (NftMatchAttr.NFTA_MATCH_REV, revision),
                           (NftMatchAttr.NFTA_MATCH_INFO, info)))


# --- rules in iptables-nft's form -------------------------------------------------------------
# What iptables-nft 1.8 writes for an iptables rule, learnt by dumping its rules: -s/-d are native
# payload and cmp (no bitwise for a full-length prefix), -i/-o a `meta iifname/oifname` compared
# with the name and its NUL, `-m comment` and `-m conntrack` x_tables matches (revisions 0 and 3)
# in command-line order, then a counter, then the verdict.  It writes no rule user data.  Written
# this way, `iptables -S`, `iptables-save` and `iptables -D` treat our rules as their own.

XT_COMMENT_SIZE = 256                          # struct xt_comment_info: the comment and its NUL
XT_COMMENT_MAX = XT_COMMENT_SIZE - 1           # bytes of an iptables comment
# struct xt_conntrack_mtinfo3: eight address/mask unions, expires min/max, l4proto, four ports,
# match and invert flags, state and status masks, four high ports; padded to 8 bytes.
XT_CONNTRACK_INFO3 = struct.Struct("=128xIIHHHHHHHHHHHHH6x")
XT_CONNTRACK_STATE = 0x1                       # match_flags: --ctstate
CT_STATE_ESTABLISHED, CT_STATE_RELATED = 1 << 1, 1 << 2


def xt_comment(text):
    """`-m comment --comment text` (at most 255 bytes, as iptables allows)."""
    raw = text.encode("utf-8", "surrogateescape")[:XT_COMMENT_MAX]
    return expr_xt_match("comment", 0, raw.ljust(XT_COMMENT_SIZE, b"\0"))


def xt_ctstate(states):
    """`-m conntrack --ctstate ...` for a mask of CT_STATE_* bits."""
    info = XT_CONNTRACK_INFO3.pack(0, 0, 0, 0, 0, 0, 0, XT_CONNTRACK_STATE, 0, states,
                                   0, 0, 0, 0, 0)
    return expr_xt_match("conntrack", 3, info)


def ipt_interface(key, name, negate=False):
    """`[!] -i|-o name` (key NFT_META_IIFNAME or NFT_META_OIFNAME)."""
    return [expr_meta(key), expr_cmp(NFT_CMP_NEQ if negate else NFT_CMP_EQ,
                                     name.encode("utf-8", "surrogateescape") + b"\0")]


def ipt_host(field, family, ip):
    """`-s|-d ip/32` (or /128)."""
    return match_address(field, Prefix(family, ip, IP_BITS[family]))


def ipt_rule(matches, verdict):
    """A whole rule: its matches, iptables-nft's counter, the verdict."""
    return matches + [expr_counter(), verdict]


def expr_immediate(register, data):
    """Load constant bytes into a data register (a DNAT target's address or port)."""
    return _expr("immediate", ((NftImmediateAttr.NFTA_IMMEDIATE_DREG, register),
                               (NftImmediateAttr.NFTA_IMMEDIATE_DATA, _value(data))))


def expr_dnat(family, address_register, port_register):
    """`dnat to <address>:<port>` from the two registers (as nft encodes it, flags included, so
    the rule reads back as it was written)."""
    return _expr("nat", ((NftNatAttr.NFTA_NAT_TYPE, NFT_NAT_DNAT),
                         (NftNatAttr.NFTA_NAT_FAMILY, NFPROTO_IPV6 if family == 6 else
                          NFPROTO_IPV4),
                         (NftNatAttr.NFTA_NAT_REG_ADDR_MIN, address_register),
                         (NftNatAttr.NFTA_NAT_REG_ADDR_MAX, address_register),
                         (NftNatAttr.NFTA_NAT_REG_PROTO_MIN, port_register),
                         (NftNatAttr.NFTA_NAT_REG_PROTO_MAX, port_register),
                         (NftNatAttr.NFTA_NAT_FLAGS,
                          NF_NAT_RANGE_MAP_IPS | NF_NAT_RANGE_PROTO_SPECIFIED)))


def match_daddr_local():
    """`fib daddr type local`: the packet is addressed to one of this namespace's addresses."""
    return [_expr("fib", ((NftFibAttr.NFTA_FIB_DREG, NFT_REG_1),
                          (NftFibAttr.NFTA_FIB_RESULT, NFT_FIB_RESULT_ADDRTYPE),
                          (NftFibAttr.NFTA_FIB_FLAGS, NFTA_FIB_F_DADDR))),
            expr_cmp(NFT_CMP_EQ, struct.pack("=I", RTN_LOCAL))]


def match_ct_dnat():
    """`ct status dnat`: the connection's destination was rewritten (by a DNAT rule)."""
    return [_expr("ct", ((NftCtAttr.NFTA_CT_DREG, NFT_REG_1),
                         (NftCtAttr.NFTA_CT_KEY, NFT_CT_STATUS))),
            expr_bitwise(struct.pack("=I", IPS_DST_NAT)),
            expr_cmp(NFT_CMP_NEQ, b"\0\0\0\0")]


def match_dport(protocol, port):
    """`tcp|udp|sctp dport <port>`: the transport protocol, then its destination port."""
    return [expr_meta(NFT_META_L4PROTO),
            expr_cmp(NFT_CMP_EQ, struct.pack("=B", IPPROTO_NUMBERS[protocol])),
            expr_payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2),
            expr_cmp(NFT_CMP_EQ, struct.pack(">H", port))]


def match_ifname(key, name, negate=False):
    """`iifname|oifname [!=] "name"`; a name ending in `*` matches every name it begins."""
    raw = name.encode("utf-8", "surrogateescape")
    data = raw[:-1] if raw.endswith(b"*") else raw.ljust(16, b"\0")
    return [expr_meta(key), expr_cmp(NFT_CMP_NEQ if negate else NFT_CMP_EQ, data)]


def decode_expressions(blob):
    """A rule's expressions: (name, {Attr: value}) each, only the attributes EXPRESSION_SPACES
    knows (an expression of an unknown kind keeps its raw bytes)."""
    expressions = []
    for element in decode_attrs(NftListAttr, blob).get(NftListAttr.NFTA_LIST_ELEM, []):
        name = element.get(NftExprAttr.NFTA_EXPR_NAME)
        data = element.get(NftExprAttr.NFTA_EXPR_DATA, b"")
        space = EXPRESSION_SPACES.get(name)
        expressions.append((name, decode_attrs(space, data) if space else data))
    return expressions


def expressions_signature(blob):
    """What an encoded rule does, as comparable data: its expressions with only the attributes
    these rules use, so a rule we would write compares equal to the kernel's copy of it (the
    kernel adds attributes of its own, such as a bitwise operation), counters left out (their
    values are the traffic's)."""
    return [(name, sorted((attr.number, repr(value)) for attr, value in data.items())
             if isinstance(data, dict) else data)
            for name, data in decode_expressions(blob) if name != "counter"]


def expression_signature(exprs):
    """The signature of a rule we would write (expressions as built here), comparable with
    NftRule.signature."""
    return expressions_signature(encode_attrs(exprs))


# Offsets of the address fields in the IPv4 and IPv6 headers: (saddr, daddr, length).
IP_HEADER_FIELDS = {4: (12, 16, 4), 6: (8, 24, 16)}


def match_family(family):
    """`meta nfproto ipv4|ipv6`: what nft puts before an `ip`/`ip6` match in an inet table."""
    return [expr_meta(NFT_META_NFPROTO),
            expr_cmp(NFT_CMP_EQ, struct.pack("=B", NFPROTO_IPV4 if family == 4 else NFPROTO_IPV6))]


def match_address(field, prefix, negate=False):
    """`ip[6] saddr|daddr [!=] prefix` (the family already matched)."""
    saddr, daddr, length = IP_HEADER_FIELDS[prefix.family]
    exprs = [expr_payload(NFT_PAYLOAD_NETWORK_HEADER, saddr if field == "saddr" else daddr, length)]
    if prefix.length < IP_BITS[prefix.family]:
        exprs.append(expr_bitwise(ip_bytes(prefix.family, prefix.mask)))
    exprs.append(expr_cmp(NFT_CMP_NEQ if negate else NFT_CMP_EQ,
                          ip_bytes(prefix.family, prefix.network)))
    return exprs


# --- transactions --------------------------------------------------------------------------

class NftBatch(object):
    """The messages of one nf_tables transaction, committed all or nothing."""

    def __init__(self):
        self.requests = []

    def add(self, msg_type, family, attrs, flags=0):
        """Add one message of type `msg_type` for `family`."""
        self.requests.append(NetlinkRequest(msg_type, flags, {"family": family}, attrs))

    def add_table(self, family, table, comment=None):
        """Create a table (kept when it exists)."""
        attrs = [(NftTableAttr.NFTA_TABLE_NAME, table)]
        if comment:
            attrs.append((NftTableAttr.NFTA_TABLE_USERDATA, udata_comment(comment)))
        self.add(NFT_MSG_NEWTABLE, family, attrs, NLM_F_CREATE)

    def add_chain(self, family, table, chain, hook=None, comment=None, policy=NF_ACCEPT):
        """A chain (`hook` = (type, hook number, priority) makes it a base chain); kept if it
        exists.  A base chain gets `policy`; None leaves an existing chain's policy alone (a new
        one accepts)."""
        attrs = [(NftChainAttr.NFTA_CHAIN_TABLE, table), (NftChainAttr.NFTA_CHAIN_NAME, chain)]
        if hook is not None:
            chain_type, hooknum, priority = hook
            attrs.append((NftChainAttr.NFTA_CHAIN_HOOK,
                          ((NftHookAttr.NFTA_HOOK_HOOKNUM, hooknum),
                           (NftHookAttr.NFTA_HOOK_PRIORITY, priority))))
            if policy is not None:
                attrs.append((NftChainAttr.NFTA_CHAIN_POLICY, policy))
            attrs.append((NftChainAttr.NFTA_CHAIN_TYPE, chain_type))
        if comment:
            attrs.append((NftChainAttr.NFTA_CHAIN_USERDATA, udata_comment(comment)))
        self.add(NFT_MSG_NEWCHAIN, family, attrs, NLM_F_CREATE)

    def flush_chain(self, family, table, chain):
        """Remove every rule of a chain."""
        self.add(NFT_MSG_DELRULE, family, ((NftRuleAttr.NFTA_RULE_TABLE, table),
                                           (NftRuleAttr.NFTA_RULE_CHAIN, chain)))

    def delete_chain(self, family, table, chain):
        """Remove an (empty) chain."""
        self.add(NFT_MSG_DELCHAIN, family, ((NftChainAttr.NFTA_CHAIN_TABLE, table),
                                            (NftChainAttr.NFTA_CHAIN_NAME, chain)))

    def add_rule(self, family, table, chain, exprs, comment=None, first=False):
        """Append a rule to `chain`, or with `first` put it at the head (`iptables -I chain 1`)."""
        attrs = [(NftRuleAttr.NFTA_RULE_TABLE, table), (NftRuleAttr.NFTA_RULE_CHAIN, chain),
                 (NftRuleAttr.NFTA_RULE_EXPRESSIONS, exprs)]
        if comment:
            attrs.append((NftRuleAttr.NFTA_RULE_USERDATA, udata_comment(comment)))
        self.add(NFT_MSG_NEWRULE, family, attrs, NLM_F_CREATE | (0 if first else NLM_F_APPEND))

    def delete_rule(self, rule):
        """Remove a rule listed by list_rules (by handle)."""
        self.add(NFT_MSG_DELRULE, rule.family, ((NftRuleAttr.NFTA_RULE_TABLE, rule.table),
                                                (NftRuleAttr.NFTA_RULE_CHAIN, rule.chain),
                                                (NftRuleAttr.NFTA_RULE_HANDLE, rule.handle)))

    def commit(self, nl, what, generation=None):
        """Send the messages as one transaction (nothing when there are none); with
        `generation` (nft_generation()), only if the ruleset is still that one, else
        NetlinkError ERESTART."""
        if self.requests:
            batch = NFT_BATCH
            if generation is not None:
                batch = BatchFrame(batch.begin, batch.end, batch.header,
                                   ((NfnlBatchAttr.NFNL_BATCH_GENID, generation),))
            nl.transact(self.requests, what, batch=batch)


class NftRule(object):
    """A rule as listed by the kernel: where it is, its handle and its comment.  Its expressions
    are decoded only when asked for (a jump target, a matched input interface): listing a chain
    of a thousand masquerade rules must stay cheap."""

    __slots__ = ("family", "table", "chain", "handle", "comment", "_expressions", "_scanned",
                 "_signature")

    def __init__(self, msg):
        self.family = msg.header["family"]
        self.table = msg.get(NftRuleAttr.NFTA_RULE_TABLE, "")
        self.chain = msg.get(NftRuleAttr.NFTA_RULE_CHAIN, "")
        self.handle = msg.get(NftRuleAttr.NFTA_RULE_HANDLE, 0)
        self.comment = comment_of(msg.get(NftRuleAttr.NFTA_RULE_USERDATA, b""))
        self._expressions = msg.get(NftRuleAttr.NFTA_RULE_EXPRESSIONS, b"")
        self._scanned = None
        self._signature = None

    @property
    def expressions(self):
        """Its expressions as decode_expressions gives them."""
        return decode_expressions(self._expressions)

    @property
    def jump_target(self):
        """The chain this rule jumps or goes to, or None."""
        return self._scan()[0]

    @property
    def iifname(self):
        """The input interface this rule matches (`iifname "x"`), or None."""
        return self._scan()[1].get(NFT_META_IIFNAME)

    @property
    def oifname(self):
        """The output interface this rule matches (`oifname "x"`), or None."""
        return self._scan()[1].get(NFT_META_OIFNAME)

    @property
    def match_comment(self):
        """The text of the rule's x_tables comment match (iptables' `-m comment`), or ""."""
        return self._scan()[2]

    def mentions(self, data):
        """Whether the rule's encoded expressions hold `data` (a comment's bytes, say): a cheap
        test before decoding, for chains of thousands of rules."""
        return data in self._expressions

    @property
    def signature(self):
        """What the rule does (see expression_signature)."""
        if self._signature is None:
            self._signature = expressions_signature(self._expressions)
        return self._signature

    def _scan(self):
        """Decode the expressions once: (jump target, matched interfaces, x_tables comment)."""
        if self._scanned is None:
            target, interfaces, xt_comment_text = None, {}, ""
            loaded_name = None
            elements = decode_attrs(NftListAttr, self._expressions).get(
                NftListAttr.NFTA_LIST_ELEM, [])
            for element in elements:
                name = element.get(NftExprAttr.NFTA_EXPR_NAME)
                if name not in EXPRESSION_SPACES:
                    continue
                data = decode_attrs(EXPRESSION_SPACES[name],
                                    element.get(NftExprAttr.NFTA_EXPR_DATA, b""))
                if name == "immediate":
                    immediate = data.get(NftImmediateAttr.NFTA_IMMEDIATE_DATA, {})
                    verdict = immediate.get(NftDataAttr.NFTA_DATA_VERDICT, {})
                    target = verdict.get(NftVerdictAttr.NFTA_VERDICT_CHAIN, target)
                elif name == "meta":
                    loaded_name = data.get(NftMetaAttr.NFTA_META_KEY)
                elif name == "cmp" and loaded_name in (NFT_META_IIFNAME, NFT_META_OIFNAME):
                    compared = data.get(NftCmpAttr.NFTA_CMP_DATA, {})
                    raw = compared.get(NftDataAttr.NFTA_DATA_VALUE, b"")
                    name_bytes = raw.split(b"\0", 1)[0]
                    interfaces[loaded_name] = name_bytes.decode("utf-8", "surrogateescape")
                    loaded_name = None
                elif name == "match" and data.get(NftMatchAttr.NFTA_MATCH_NAME) == "comment":
                    raw = data.get(NftMatchAttr.NFTA_MATCH_INFO, b"")
                    xt_comment_text = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
            self._scanned = (target, interfaces, xt_comment_text)
        return self._scanned


# ==============================================================================================
# nf_tables rule sets
# ==============================================================================================
# The part of nf_tables every rule-writing plugin shares (the bridge's masquerade and MAC spoof
# check, portmap, firewall); each plugin keeps only its own names, layouts and comments.
# - Tables and chains are found by name, rules by their comment (the reference's, so each side
#   finds and removes the other's rules); no handle is remembered between two calls.
# - Every change is one NftBatch committed as one transaction: a crash leaves all or nothing.
#   A transaction built from a listing is rebuilt when the kernel refuses it because a rule it
#   lists vanished meanwhile (ENOENT: a concurrent DEL), see commit_rebuilt.
# - A table that is not ours (kube-proxy's, iptables-nft's) is never listed whole: chains are
#   looked up one by one before their rules are listed.
# - GC removes the rules whose comment names an attachment that is no longer valid.

def node_nftables():
    """The plugin's nf_tables socket in the node's namespace, kept open until the process exits.

    Closing an nf_tables socket right after a transaction that deleted rules waits for an RCU
    grace period (10-20 ms); kept open, that wait overlaps the rest of the plugin's work.
    """
    if PROCESS.node_nftables is None:
        PROCESS.node_nftables = NetlinkSocket(NETLINK_NETFILTER)
    return PROCESS.node_nftables


def nft_generation(nl):
    """The ruleset's generation id: read before planning a change that must see the ruleset as
    it was (see NftBatch.commit)."""
    replies = nl.request(NFT_MSG_GETGEN, 0, {"family": 0}, (),
                         what="failed to read the nf_tables generation")
    return replies[0].get(NftGenAttr.NFTA_GEN_ID, 0) if replies else 0


def chain_exists(nl, family, table, chain):
    """Whether `table` of `family` has `chain` (one lookup: the table is not listed)."""
    try:
        nl.request(NFT_MSG_GETCHAIN, 0, {"family": family},
                   ((NftChainAttr.NFTA_CHAIN_TABLE, table), (NftChainAttr.NFTA_CHAIN_NAME, chain)),
                   what="failed to look up chain %s" % chain)
    except NetlinkError as err:
        if err.errno == errno.ENOENT:      # no such table or chain
            return False
        raise
    return True


def list_rules(nl, family, table, chain=None):
    """Rules of a table (or one chain); an absent table or chain has none."""
    attrs = [(NftRuleAttr.NFTA_RULE_TABLE, table)]
    if chain:
        attrs.append((NftRuleAttr.NFTA_RULE_CHAIN, chain))
    try:
        msgs = nl.dump(NFT_MSG_GETRULE, {"family": family}, attrs,
                       what="failed to list nf_tables rules of %s" % table)
    except NetlinkError as err:
        if err.errno == errno.ENOENT:
            return []
        raise
    return [NftRule(m) for m in msgs if not chain or m.get(NftRuleAttr.NFTA_RULE_CHAIN) == chain]


def rules_commented(nl, family, table, chain, prefix):
    """The rules of a chain whose comment starts with `prefix` (an attachment's mark)."""
    return [r for r in list_rules(nl, family, table, chain) if r.comment.startswith(prefix)]


def remove_chains(batch, nl, family, table, base_chain, chains):
    """Add to `batch` the removal of regular chains, their rules and the rules of `base_chain`
    jumping to them.  Absent chains are looked up one by one, so a large table (kube-proxy's
    iptables rules, say) is never listed."""
    present = [c for c in chains if chain_exists(nl, family, table, c)]
    if not present:
        return
    for rule in list_rules(nl, family, table, base_chain):
        if rule.jump_target in present:
            batch.delete_rule(rule)
    for chain in present:
        batch.flush_chain(family, table, chain)
    for chain in present:
        batch.delete_chain(family, table, chain)


def commit_rebuilt(nl, build, what, attempts=3):
    """Commit the transaction `build(batch)` fills, rebuilding it (from fresh listings) when the
    kernel refuses it whole because something it lists was removed meanwhile (ENOENT)."""
    for attempt in range(attempts):
        batch = NftBatch()
        build(batch)
        try:
            batch.commit(nl, what)
            return
        except NetlinkError as err:
            if err.errno != errno.ENOENT or attempt == attempts - 1:
                raise


def remove_stale_rules(batch, nl, family, table, chain, owner_of, valid):
    """Add to `batch` the removal of the rules of a chain whose owner is no longer valid:
    `owner_of(rule)` names the attachment a rule belongs to (None: not one we manage)."""
    for rule in list_rules(nl, family, table, chain):
        owner = owner_of(rule)
        if owner is not None and owner not in valid:
            batch.delete_rule(rule)


# ==============================================================================================
# Conntrack
# ==============================================================================================
# The connection tracking table, over the same NETLINK_NETFILTER socket (subsystem CTNETLINK,
# linux/netfilter/nfnetlink_conntrack.h): entries are dumped per address family and deleted by
# their original tuple; an entry that expires between the two is not an error.

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = [(NFNL_SUBSYS_CTNETLINK << 8) | n
                                                              for n in range(3)]

CtIpAttr = AttrSpace(
    CTA_IP_V4_SRC=Attr(1, BYTES),
    CTA_IP_V4_DST=Attr(2, BYTES),
    CTA_IP_V6_SRC=Attr(3, BYTES),
    CTA_IP_V6_DST=Attr(4, BYTES),
)


CtProtoAttr = AttrSpace(
    CTA_PROTO_NUM=Attr(1, U8),
    CTA_PROTO_SRC_PORT=Attr(2, BE16),
    CTA_PROTO_DST_PORT=Attr(3, BE16),
)


CtTupleAttr = AttrSpace(
    CTA_TUPLE_IP=Attr(1, NEST, CtIpAttr),
    CTA_TUPLE_PROTO=Attr(2, NEST, CtProtoAttr),
    CTA_TUPLE_ZONE=Attr(3, BE16),
)


CtAttr = AttrSpace(
    CTA_TUPLE_ORIG=Attr(1, NEST, CtTupleAttr),
    CTA_ZONE=Attr(18, BE16),
)


for _type in (IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE):
    MESSAGE_LAYOUTS[NETLINK_NETFILTER][_type] = (NFGENMSG, CtAttr)


def delete_conntrack_entries(nl, families, protocol, dst_ports):
    """Delete the conntrack entries of the address `families` (4, 6) whose original direction
    goes to one of `dst_ports` over `protocol`; returns how many there were.

    The kernel walks its whole conntrack hash (every namespace's: about 10 ms at 256k buckets)
    for each dump, so both families are read in one dump, and none is made when this
    namespace tracks no connection at all.  An entry that expires meanwhile is not an error.
    """
    if read_sysctl("net/netfilter/nf_conntrack_count") == "0":
        return 0
    families = set(families)
    dump_af = AF_OF_FAMILY[list(families)[0]] if len(families) == 1 else AF_UNSPEC
    requests = []
    entries = nl.dump(IPCTNL_MSG_CT_GET, {"family": dump_af},
                      what="failed to list conntrack entries")
    for msg in entries:
        tuple_attrs = msg.get(CtAttr.CTA_TUPLE_ORIG) or {}
        proto = tuple_attrs.get(CtTupleAttr.CTA_TUPLE_PROTO) or {}
        af = msg.header["family"]
        if (FAMILY_OF_AF.get(af) not in families or proto.get(CtProtoAttr.CTA_PROTO_NUM) != protocol
                or proto.get(CtProtoAttr.CTA_PROTO_DST_PORT) not in dst_ports):
            continue
        ips = tuple_attrs.get(CtTupleAttr.CTA_TUPLE_IP) or {}
        attrs = [(CtAttr.CTA_TUPLE_ORIG, (
            (CtTupleAttr.CTA_TUPLE_IP, [(attr, value) for attr, value in ips.items()]),
            (CtTupleAttr.CTA_TUPLE_PROTO, [(attr, value) for attr, value in proto.items()])))]
        if msg.get(CtAttr.CTA_ZONE):
            attrs.append((CtAttr.CTA_ZONE, msg.get(CtAttr.CTA_ZONE)))
        requests.append((IPCTNL_MSG_CT_DELETE, 0, {"family": af}, attrs))
    for request in requests:
        try:
            nl.transact([request], "failed to delete a conntrack entry")
        except NetlinkError as err:
            if err.errno != errno.ENOENT:      # it expired meanwhile
                raise
    return len(requests)


# ==============================================================================================
# Namespaces
# ==============================================================================================
# A netlink socket belongs to the namespace it was opened in, so the plugins open one socket per
# namespace and only switch (setns) for the few things that follow the calling thread: opening
# sockets and writing /proc/sys.

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703                        # ioctl: which kind of namespace an fd refers to
OWN_NETNS_PATH = "/proc/self/ns/net"

MS_BIND = 4096
MNT_DETACH = 2

_libc_functions = {}        # libc function pointers: valid in a forked child too


def libc_call(name, *args):
    """Call a libc function (int arguments, bytes as char *, None as NULL); OSError on -1.

    Goes through _ctypes, the C core of ctypes: `import ctypes` costs about 6 ms of start-up,
    `_ctypes` a quarter of that, and these few calls need nothing more.  python3-minimal lacks
    _ctypes: the error names the call and the package that brings the module.
    """
    try:
        import _ctypes
    except ImportError:
        raise missing_ctypes(name)
    function = _libc_functions.get(name)
    if function is None:
        class CInt(_ctypes._SimpleCData):
            _type_ = "i"

        class LibcFunction(_ctypes.CFuncPtr):
            _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
            _restype_ = CInt
        function = LibcFunction(_ctypes.dlsym(_ctypes.dlopen(None, 2), name))   # RTLD_NOW
        _libc_functions[name] = function
    if function(*args) == -1:
        errno_value = _ctypes.get_errno()
        raise OSError(errno_value, "%s: %s" % (name, posix.strerror(errno_value)))


def missing_ctypes(function):
    """The error for a libc call this Python cannot make (python3-minimal has no _ctypes)."""
    version = sys.version_info[:2]
    also = " and os.setns (Python 3.12+)" if function == "setns" else ""
    return CNIError(ERR_INTERNAL, "this Python %d.%d cannot call %s(): it lacks the _ctypes "
                    "module%s (Debian, Ubuntu: libpython%d.%d-stdlib)"
                    % (version + (function, also) + version),
                    "install libpython%d.%d-stdlib, or the package of your distribution that holds "
                    "_ctypes, or run the plugins with Python 3.12 or later" % version)


def can_setns():
    """Whether this Python can enter a namespace: posix.setns (3.12+) or libc's through _ctypes."""
    if hasattr(posix, "setns"):
        return True
    try:
        import _ctypes      # noqa: F401  (only probed)
        return True
    except ImportError:
        return False


def setns(fd, nstype=CLONE_NEWNET):
    """Move this thread into the namespace `fd` (posix.setns from Python 3.12, else libc's)."""
    if hasattr(posix, "setns"):
        posix.setns(fd, nstype)
    else:
        libc_call("setns", fd, nstype)


def original_netns_fd():
    """An fd of the namespace the plugin was started in (the node's), opened before any switch."""
    if PROCESS.original_netns_fd is None:
        PROCESS.original_netns_fd = posix.open(OWN_NETNS_PATH, posix.O_RDONLY | posix.O_CLOEXEC)
    return PROCESS.original_netns_fd


class NetnsGone(CNIError):
    """CNI_NETNS names a path that does not exist (or is not a network namespace) any more."""


class NetnsIsOwn(CNIError):
    """CNI_NETNS resolves to the namespace the plugin runs in (a stale /proc/<pid>/ns/net, a
    swapped symlink): acting there would reconfigure the node."""


class Netns(object):
    """A network namespace held open by fd, entered only inside `with ns.entered():`.

    The path is opened once and the checks are made on the fd held: every later setns of the
    call uses that fd, so a path that changes meanwhile (a symlink swapped between a container's
    namespace and the node's) cannot steer the plugin into the node.
    """

    def __init__(self, path, allow_own=False):
        import fcntl
        self.path = path
        own_fd = original_netns_fd()
        try:
            self.fd = posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC | posix.O_NOCTTY
                                 | posix.O_NONBLOCK)
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ENOTDIR):
                raise NetnsGone(ERR_INVALID_NETNS, "failed to open netns %r: %s"
                                % (path, err.strerror), "the network namespace does not exist")
            raise CNIError(ERR_INVALID_NETNS, "failed to open netns %r: %s" % (path, err.strerror))
        try:
            nstype = fcntl.ioctl(self.fd, NS_GET_NSTYPE)
        except OSError:
            nstype = None
        if nstype != CLONE_NEWNET:
            posix.close(self.fd)
            raise NetnsGone(ERR_INVALID_NETNS, "failed to open netns %r: not a network namespace"
                            % path, "CNI_NETNS must name a network namespace (nsfs) file")
        mine, theirs = posix.fstat(own_fd), posix.fstat(self.fd)
        if not allow_own and (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino):
            posix.close(self.fd)
            raise NetnsIsOwn(ERR_INVALID_NETNS,
                             "plugin's netns and netns from CNI_NETNS should not be the same",
                             "CNI_NETNS %s is the namespace the plugin runs in" % path)
        if not can_setns():         # said before anything is changed, not halfway through
            posix.close(self.fd)
            raise missing_ctypes("setns")

    def close(self):
        """Close the namespace's fd."""
        posix.close(self.fd)

    def entered(self):
        """A context manager running its block inside the namespace."""
        return _InNetns(self.fd)

    def netlink(self, protocol=NETLINK_ROUTE):
        """A netlink socket that acts inside this namespace."""
        with self.entered():
            return NetlinkSocket(protocol)


def container_netns(request):
    """CNI_NETNS, opened once for the whole call.  The plugin's own namespace is refused unless
    the runtime sets CNI_NETNS_OVERRIDE (the reference library's escape hatch)."""
    override = request.env.get("CNI_NETNS_OVERRIDE", "").lower() in ("1", "true")
    return Netns(request.netns, allow_own=override)


class _InNetns(object):
    """Context manager: run the block inside namespace `fd`, always returning to the original."""

    def __init__(self, fd):
        self.fd = fd

    def __enter__(self):
        setns(self.fd)

    def __exit__(self, *exc):
        setns(original_netns_fd())
        return False


S_IFMT, S_IFDIR = 0o170000, 0o040000       # file type bits of st_mode (sys/stat.h)


def make_directories(path, mode=0o755):
    """Create `path` (str or bytes) and its missing parents, every one with `mode` (os.makedirs
    gives the parents 0777 less the umask: world-writable under the umask 000 a runtime may run
    us with)."""
    try:
        posix.mkdir(path, mode)
    except OSError as err:
        slash = b"/" if isinstance(path, bytes) else "/"
        parent = path.rstrip(slash).rpartition(slash)[0]
        # ENOENT with the parent present (/proc/<pid>/x/y, say) cannot be cured by making it.
        if err.errno == errno.ENOENT and parent and not is_directory(parent):   # parent missing
            make_directories(parent, mode)
            make_directories(path, mode)
        elif err.errno != errno.EEXIST or not is_directory(path):
            raise


def remove_tree(path):
    """Remove a directory and everything in it, following no symlink (shutil is not part of
    python3-minimal)."""
    for name in posix.listdir(path):
        child = path + "/" + name
        if posix.lstat(child).st_mode & S_IFMT == S_IFDIR:
            remove_tree(child)
        else:
            posix.unlink(child)
    posix.rmdir(path)


def is_directory(path, follow=True):
    """Whether `path` is a directory (a symlink to one only when `follow`); False when absent."""
    try:
        return posix.stat(path, follow_symlinks=follow).st_mode & S_IFMT == S_IFDIR
    except OSError:
        return False


def create_named_netns(path):
    """Make a new network namespace and bind-mount it at `path`, as `ip netns add` does."""
    make_directories(path.rpartition("/")[0])
    posix.close(posix.open(path, posix.O_RDONLY | posix.O_CREAT | posix.O_EXCL | posix.O_CLOEXEC,
                           0o444))
    pid = posix.fork()
    if pid == 0:
        status = 1
        try:
            libc_call("unshare", CLONE_NEWNET)
            libc_call("mount", OWN_NETNS_PATH.encode(), path.encode(), None, MS_BIND, None)
            status = 0
        finally:
            posix._exit(status)
    if posix.waitpid(pid, 0)[1] != 0:
        posix.unlink(path)
        raise CNIError(ERR_INTERNAL, "failed to create a network namespace at %s" % path)


def remove_named_netns(path):
    """Unmount and remove a namespace made by create_named_netns (it dies with its last user)."""
    try:
        libc_call("umount2", path.encode(), MNT_DETACH)
    except OSError as err:
        if err.errno not in (errno.ENOENT, errno.EINVAL):        # not there, or not a mount point
            raise
    posix.unlink(path)


# ==============================================================================================
# IPAM store
# ==============================================================================================
# host-local's state, in the reference's layout so a node can switch between the two:
#   <dataDir>/<network>/<ip>                  "<containerID>\r\n<ifname>" (older: "<containerID>")
#   <dataDir>/<network>/last_reserved_ip.<N>  the last address handed out from range set N
#   <dataDir>/<network>/lock                  flock'd around every allocation and release
#   <dataDir>/<network>/boot_id               the kernel boot the reservations belong to (ours;
#                                             the reference ignores names that are not addresses)
# No network namespace survives a reboot, so a reservation made before the current boot is
# stale: the first ADD, GC or STATUS of a boot releases them all, under the lock.  Boots are told
# apart by the kernel's boot ID, never by clocks (an RTC or NTP step must not age a reservation);
# a directory without a recorded boot ID (the reference's, or an older one) is not swept.
# Every file is reached through the directory's fd with O_NOFOLLOW, so a planted symlink is never
# followed, and a reservation appears atomically (written to a temporary name, then hard-linked
# into place), so a crash leaves either no reservation or a complete one.
#
# Finding an attachment's earlier reservation means reading every file (11 ms at 1,000).  So the
# lock file, which the reference leaves empty and never reads, holds an owner index: every
# reservation's address and owner, as the directory held them when we last changed it.  The
# index is trusted only while the directory's mtime is the stamp written in its first line: after
# writing it we set the directory's mtime to a time one second before the kernel's last change,
# which no later create, link, rename or unlink (anyone's, the reference's included) can set
# again.  A crash before the stamp is set, a torn write or a change by anyone else leaves the
# stamp unequal and the next allocation reads every file again and rewrites the index.  Files
# are only ever created and removed whole (an edit in place by hand is not seen), and an owner
# the index names is looked up the slow way, so a repeated ADD gets exactly what it got before.

DEFAULT_DATA_DIR = "/var/lib/cni/networks"
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
BOOT_ID_FILE = "boot_id"
LOCK_TIMEOUT = 10.0                           # seconds to wait for another plugin's lock
LAST_RESERVED_PREFIX = "last_reserved_ip."
TEMP_PREFIX = ".tmp-"
OWNER_INDEX_MAGIC = "cni-bridge owner index 1"


def os_error(err, what):
    """A CNIError for a failed file operation: a full disk is worth retrying, the rest is I/O."""
    code = ERR_TRY_AGAIN if err.errno in (errno.ENOSPC, errno.EDQUOT) else ERR_IO
    filename = getattr(err, "filename", "") or ""
    if isinstance(filename, bytes):                 # the state directory is opened by its bytes
        filename = filename.decode("utf-8", "surrogateescape")
    return CNIError(code, "%s: %s" % (what, err.strerror or err), filename)


class IPRange(object):
    """One range of a range set: a subnet and the addresses handed out from it."""

    __slots__ = ("subnet", "start", "end", "gateway")

    def __init__(self, subnet, start, end, gateway):
        self.subnet = subnet
        self.start = start
        self.end = end
        self.gateway = gateway

    @classmethod
    def parse(cls, obj, where):
        """A range from a range object (subnet, rangeStart, rangeEnd, gateway); `where`
        names it in errors."""
        if not isinstance(obj, dict):
            raise config_error("%s must be an object" % where)
        text = conf_get(obj, "subnet", str, None, where + ".")
        if text is None:
            raise config_error("%s.subnet is missing" % where)
        try:
            subnet = Prefix.parse(text)
        except ValueError as err:
            raise config_error("%s.subnet: %s" % (where, err))
        bits = IP_BITS[subnet.family]
        if subnet.length > bits - 2:
            raise CNIError(ERR_INVALID_CONFIG, "Network %s too small to allocate from" % text)
        if subnet.ip != subnet.network:
            raise CNIError(ERR_INVALID_CONFIG,
                           "Network has host bits set. For a subnet mask of length %d the network "
                           "address is %s" % (subnet.length,
                                              ip_to_text(subnet.family, subnet.network)))
        last_usable = subnet.last - 1 if subnet.family == 4 else subnet.last

        def address(key, default):
            value = conf_get(obj, key, str, None, where + ".")
            if value is None:
                return default
            try:
                family, ip = parse_ip(value)
            except ValueError as err:
                raise config_error("%s.%s: %s" % (where, key, err))
            if not subnet.contains(family, ip):
                raise CNIError(ERR_INVALID_CONFIG, "%s %s not in network %s"
                               % (key[0].upper() + key[1:], value, text))
            return ip

        start = address("rangeStart", subnet.network + 1)
        end = address("rangeEnd", last_usable)
        gateway = address("gateway", subnet.network + 1)
        if start > end:
            raise config_error("%s: rangeStart %s is after rangeEnd %s"
                               % (where, ip_to_text(subnet.family, start),
                                  ip_to_text(subnet.family, end)))
        made = cls(subnet, start, end, gateway)
        if made.capacity() <= 0:        # it could never hand out an address: not worth a retry
            raise config_error("%s: range %s holds no usable address" % (where, made),
                               "the network address, the IPv4 broadcast address and the gateway "
                               "are never handed out")
        return made

    @property
    def family(self):
        """4 or 6."""
        return self.subnet.family

    def usable(self, ip):
        """Whether `ip` may be handed out: inside the range, not network, broadcast or gateway."""
        return (self.start <= ip <= self.end and ip != self.gateway and ip != self.subnet.network
                and not (self.family == 4 and ip == self.subnet.last))

    def capacity(self):
        """How many addresses the range can hand out (computed, never counted)."""
        low, high = max(self.start, self.subnet.network + 1), self.end
        if self.family == 4:
            high = min(high, self.subnet.last - 1)
        size = high - low + 1
        return size - (1 if low <= self.gateway <= high else 0)

    def overlaps(self, other):
        """Whether the two ranges share an address."""
        return self.family == other.family and self.start <= other.end and other.start <= self.end

    def __str__(self):
        return "%s-%s" % (ip_to_text(self.family, self.start), ip_to_text(self.family, self.end))


class RangeSet(list):
    """Ranges of one family that together yield one address per container."""

    def __str__(self):
        return ",".join(str(r) for r in self)

    def find(self, family, ip):
        """The range holding `ip`, or None."""
        for r in self:
            if r.family == family and r.start <= ip <= r.end:
                return r
        return None

    def capacity(self):
        """How many addresses the set can hand out."""
        return sum(r.capacity() for r in self)


def parse_range_set(items, where):
    """A validated RangeSet from a list of range objects (one family, no overlap)."""
    if not isinstance(items, list):
        raise config_error("%s must be a list of ranges" % where)
    if not items:
        raise CNIError(ERR_INVALID_CONFIG, "invalid range set %s: empty range set" % where)
    ranges = RangeSet(IPRange.parse(item, "%s[%d]" % (where, i)) for i, item in enumerate(items))
    if len(set(r.family for r in ranges)) > 1:
        raise CNIError(ERR_INVALID_CONFIG, "invalid range set %s: mixed address families" % where)
    for i, a in enumerate(ranges):
        for b in ranges[i + 1:]:
            if a.overlaps(b):
                raise CNIError(ERR_INVALID_CONFIG, "invalid range set %s: subnets %s and %s overlap"
                               % (where, a, b))
    return ranges


def parse_resolv_conf(path):
    """The `dns` of a result from a resolv.conf file (nameserver, domain, search, options)."""
    dns = {"nameservers": [], "domain": "", "search": [], "options": []}
    try:
        with open(path) as f:
            lines = f.read(1 << 20).splitlines()
    except (OSError, ValueError) as err:
        raise CNIError(ERR_INVALID_CONFIG, "failed to read resolvConf %r: %s" % (path, err))
    for line in lines:
        fields = line.split()
        if len(fields) < 2 or fields[0].startswith(("#", ";")):
            continue
        if fields[0] == "nameserver":
            dns["nameservers"].append(fields[1])
        elif fields[0] == "domain":
            dns["domain"] = fields[1]
        elif fields[0] in ("search", "options"):
            dns[fields[0]].extend(fields[1:])
    return dns


def parse_routes(items, where):
    """Validate a `routes` list; routes are returned in canonical text form."""
    if not isinstance(items, list):
        raise config_error("%s must be a list" % where)
    routes = []
    for i, item in enumerate(items):
        here = "%s[%d]." % (where, i)
        if not isinstance(item, dict):
            raise config_error("%s must be an object" % here[:-1])
        try:
            dst = Prefix.parse(conf_get(item, "dst", str, None, here))
            route = {"dst": dst.network_text()}
            gw = conf_get(item, "gw", str, None, here)
            if gw:
                family, ip = parse_ip(gw)
                if family != dst.family:
                    raise ValueError("gateway %s is not of the family of %s" % (gw, route["dst"]))
                route["gw"] = ip_to_text(family, ip)
        except ValueError as err:
            raise config_error("%sdst: %s" % (here, err))
        for key, high in (("mtu", 65535), ("advmss", 65535), ("priority", 2 ** 32 - 1),
                          ("table", 2 ** 32 - 1), ("scope", 255)):
            if conf_get(item, key) is not None:
                route[key] = conf_int(item, key, 0, high, 0, here)
        routes.append(route)
    return routes


class Store(object):
    """The locked reservation directory of one network; use as `with Store(...) as store:`.
    `read_only` (a listing): the directory must exist, nothing is created, locked or removed."""

    def __init__(self, data_dir, network, read_only=False):
        self.data_dir = data_dir
        self.network = network
        self.read_only = read_only
        self.dir_fd = None
        self.lock_fd = None
        self.runtime_umask = None
        self.file_names = {}
        self.created = set()      # (family, ip) of the reservations made through this object

    def open_directory(self):
        """Make and open the state directory and its lock file, without locking (leave with
        __exit__)."""
        path = "%s/%s" % (self.data_dir.rstrip("/"), self.network)
        # The runtime's umask (077, say) would narrow the 0755 and 0644 that others read the
        # state with; the runtime's own is back once the store is left.
        self.runtime_umask = posix.umask(0o022)
        # As bytes: the config's UTF-8, whatever file name encoding the interpreter picked from
        # the locale (ASCII on Python 3.6 under `env -i`).
        fs_path = path.encode("utf-8", "surrogateescape")
        try:
            make_directories(fs_path)
            self.dir_fd = posix.open(fs_path, posix.O_RDONLY | posix.O_DIRECTORY | posix.O_NOFOLLOW
                                     | posix.O_CLOEXEC)
            try:
                self.lock_fd = posix.open("lock", posix.O_RDWR | posix.O_CREAT | posix.O_NOFOLLOW
                                          | posix.O_CLOEXEC, 0o644, dir_fd=self.dir_fd)
            except OSError as err:
                if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise
                # Locking needs no writing; then the owner index is only not kept.
                self.lock_fd = posix.open("lock", posix.O_RDONLY | posix.O_CREAT
                                          | posix.O_NOFOLLOW | posix.O_CLOEXEC, 0o644,
                                          dir_fd=self.dir_fd)
        except OSError as err:
            self.__exit__()
            raise os_error(err, "failed to open the IPAM state directory %s" % path)
        return path

    def __enter__(self):
        import fcntl
        if self.read_only:
            path = "%s/%s" % (self.data_dir.rstrip("/"), self.network)
            try:
                self.dir_fd = posix.open(path.encode("utf-8", "surrogateescape"),
                                         posix.O_RDONLY | posix.O_DIRECTORY | posix.O_NOFOLLOW
                                         | posix.O_CLOEXEC)
            except OSError as err:
                raise os_error(err, "failed to open the IPAM state directory %s" % path)
            return self
        path = self.open_directory()

        def try_lock():
            try:
                fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EINTR):
                    raise os_error(err, "failed to lock %s/lock" % path)
                return None

        def timed_out():
            return CNIError(ERR_TRY_AGAIN, "timed out after %g s waiting for the lock on %s"
                            % (LOCK_TIMEOUT, path), "another plugin holds it; try again later")
        try:
            return poll_until(try_lock, LOCK_TIMEOUT, timed_out, max_delay=0.02)
        except CNIError:
            self.__exit__()
            raise

    def __exit__(self, *exc):
        for fd in (self.lock_fd, self.dir_fd):
            if fd is not None:
                posix.close(fd)
        self.lock_fd = self.dir_fd = None
        if self.runtime_umask is not None:
            posix.umask(self.runtime_umask)
            self.runtime_umask = None
        return False

    def read(self, name):
        """Content of a state file, or None when it does not exist or is not a regular file."""
        try:
            fd = posix.open(name,
                            posix.O_RDONLY | posix.O_NOFOLLOW | posix.O_CLOEXEC | posix.O_NONBLOCK,
                            dir_fd=self.dir_fd)
        except OSError:
            return None
        try:
            chunks = []
            while True:         # read whole: an owner line may be any length (container IDs are)
                chunk = posix.read(fd, 1 << 16)
                if not chunk:
                    return b"".join(chunks).decode("utf-8", "surrogateescape")
                chunks.append(chunk)
        except OSError:
            return None
        finally:
            posix.close(fd)

    def reservations(self):
        """{(family, ip): owner text} of every reservation file (names that parse as addresses).

        Temporary files left by a plugin killed mid-write are removed on the way: whoever holds
        the lock is the only writer.
        """
        found = {}
        self.file_names = {}
        for name in posix.listdir(self.dir_fd):
            if name.startswith(TEMP_PREFIX):
                if not self.read_only:
                    self.remove(name)
                continue
            if name == "lock" or name.startswith(LAST_RESERVED_PREFIX):
                continue
            try:
                key = parse_ip(name)
            except ValueError:
                continue
            content = self.read(name)
            if content is not None:
                found[key] = content
                self.file_names[key] = name
        return found

    def remove_reservation(self, key):
        """Remove the reservation of (family, ip) under the file name it was found with (a file
        written by hand may spell the address differently)."""
        self.remove(self.file_names.get(key) or ip_to_text(*key))

    def index_body(self):
        """The lines of the owner index when it describes the directory as it is, else None."""
        try:
            stamp = posix.fstat(self.dir_fd).st_mtime_ns
            text = posix.pread(self.lock_fd, posix.fstat(self.lock_fd).st_size, 0).decode(
                "utf-8", "surrogateescape")
        except OSError:
            return None
        head, _, body = text.partition("\n")
        fields = head[len(OWNER_INDEX_MAGIC):].split()
        if (not head.startswith(OWNER_INDEX_MAGIC) or fields[:1] != [str(stamp)]
                or len(fields) != 2 or fields[1] != sha512_hex(body)[:32]):
            return None
        return body

    def indexed_reservations(self, owner):
        """{(family, ip): ""} of every reservation, from the owner index, and the index's lines,
        when the index describes the directory as it is and names no reservation of `owner`;
        (None, None) otherwise (then `reservations` must be read)."""
        body = self.index_body()
        if body is None or index_line_tail(owner) in body:
            return None, None
        reserved = {}
        for line in body.splitlines():
            family, ip = line.split("\t", 1)[0].split(" ")
            reserved[(int(family), int(ip))] = ""
        return reserved, body

    def write_index(self, body):
        """Store `body` (index_lines) as the owner index of the directory as it is now, and stamp
        the directory (see the section's comment).  With no reservation left, the lock file is
        left empty, as the reference keeps it: reading an empty directory costs nothing."""
        try:
            if not body:
                posix.ftruncate(self.lock_fd, 0)
                return
            before = posix.fstat(self.dir_fd)
            stamp = before.st_mtime_ns - 10 ** 9
            data = ("%s %d %s\n%s" % (OWNER_INDEX_MAGIC, stamp, sha512_hex(body)[:32], body)
                    ).encode("utf-8", "surrogateescape")
            posix.pwrite(self.lock_fd, data, 0)
            posix.ftruncate(self.lock_fd, len(data))
            posix.utime(self.dir_fd, ns=(before.st_atime_ns, stamp))
        except OSError:
            pass                # then the index is not trusted: the next allocation reads all

    def write_index_of(self, reserved):
        """Rebuild the owner index from {(family, ip): owner} read from every file, unless a file
        spells its address unusually (remove_reservation needs the name it was found with)."""
        if all(self.file_names.get(key, ip_to_text(*key)) == ip_to_text(*key) for key in reserved):
            self.write_index(index_lines(reserved.items()))

    def _write_temp(self, content):
        """Write `content` to a new temporary file in the directory; its name."""
        name = "%s%d" % (TEMP_PREFIX, posix.getpid())
        try:
            posix.unlink(name, dir_fd=self.dir_fd)      # a dead plugin's (the lock is ours)
        except OSError:
            pass                    # none there; or the write below reports the real cause
        try:
            fd = posix.open(name, posix.O_WRONLY | posix.O_CREAT | posix.O_EXCL | posix.O_NOFOLLOW
                            | posix.O_CLOEXEC, 0o644, dir_fd=self.dir_fd)
            try:
                posix.write(fd, content.encode("utf-8", "surrogateescape"))
            finally:
                posix.close(fd)
        except OSError as err:
            try:
                posix.unlink(name, dir_fd=self.dir_fd)
            except OSError:
                pass                # most likely never created: the error to report is `err`
            raise os_error(err, "failed to write in %s/%s" % (self.data_dir, self.network))
        return name

    def reserve(self, family, ip, owner):
        """Create the reservation file of an address; False when it is taken already."""
        temp = self._write_temp(owner)
        try:
            made = unless_exists(posix.link, temp, ip_to_text(family, ip), src_dir_fd=self.dir_fd,
                                 dst_dir_fd=self.dir_fd, follow_symlinks=False)
        except OSError as err:
            raise os_error(err, "failed to reserve %s" % ip_to_text(family, ip))
        finally:
            self.remove(temp)
        if made:
            self.created.add((family, ip))
        return made

    def remove(self, name):
        """Remove a state file; one that is already gone is not an error."""
        try:
            posix.unlink(name, dir_fd=self.dir_fd)
        except OSError as err:
            if err.errno != errno.ENOENT:
                raise os_error(err,
                               "failed to remove %s/%s/%s" % (self.data_dir, self.network, name))

    def replace_file(self, name, content):
        """Write a bookkeeping file atomically (a temporary file renamed over it)."""
        temp = self._write_temp(content)
        try:
            posix.rename(temp, name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        except OSError as err:
            self.remove(temp)
            raise os_error(err, "failed to write %s/%s/%s" % (self.data_dir, self.network, name))

    def recorded_boot(self):
        """The boot ID recorded with the reservations, or "" when none is."""
        return (self.read(BOOT_ID_FILE) or "").strip()

    def sweep_previous_boot(self):
        """Release every reservation made before the current boot; returns their keys.

        Reservations are made only after this ran in the same boot (ADD calls it first), so
        when the recorded boot is another one, every reservation present predates this boot.
        """
        boot = current_boot_id()
        recorded = self.recorded_boot()
        if not boot or recorded == boot:
            return []
        released = list(self.reservations()) if recorded else []
        for key in released:
            self.remove_reservation(key)
        self.replace_file(BOOT_ID_FILE, boot + "\n")
        return released

    def last_reserved(self, set_index):
        """The last address handed out from range set `set_index`, or None."""
        content = self.read(LAST_RESERVED_PREFIX + str(set_index))
        try:
            return parse_ip(content.strip()) if content else None
        except ValueError:
            return None

    def set_last_reserved(self, set_index, family, ip):
        """Record the last address handed out from range set `set_index` (atomically)."""
        self.replace_file(LAST_RESERVED_PREFIX + str(set_index), ip_to_text(family, ip))


def current_boot_id():
    """The kernel's ID of the running boot, or "" where /proc does not give it."""
    try:
        fd = posix.open(BOOT_ID_PATH, posix.O_RDONLY | posix.O_CLOEXEC)
    except OSError:
        return ""
    try:
        return posix.read(fd, 100).decode("ascii", "replace").strip()
    except OSError:
        return ""
    finally:
        posix.close(fd)


def owner_text(container_id, ifname):
    """The content of a reservation file: the reference's "<containerID>\r\n<ifname>"."""
    return "%s\r\n%s" % (container_id.strip(), ifname)


def index_line_tail(owner):
    """How an owner ends its lines of the owner index (backslash, CR, LF and tab escaped)."""
    return "\t%s\n" % (owner.strip().replace("\\", "\\\\").replace("\r", "\\r")
                        .replace("\n", "\\n").replace("\t", "\\t"))


def index_lines(items):
    """Owner index lines of ((family, ip), owner) pairs: "<family> <ip as integer>\t<owner>"."""
    return "".join("%d %d%s" % (key[0], key[1], index_line_tail(owner)) for key, owner in items)


def _candidates(ranges, last):
    """Addresses of a range set in allocation order: after `last`, wrapping round once.

    Lazy, so a large IPv6 range costs only the addresses actually tried.
    """
    count = len(ranges)
    index, ip = 0, ranges[0].start
    if last is not None:
        for i, r in enumerate(ranges):
            if r.family == last[0] and r.start <= last[1] <= r.end:
                index, ip = i, last[1] + 1
                break
    order = [(ranges[index], ip, ranges[index].end)]
    order.extend((ranges[(index + k) % count], ranges[(index + k) % count].start,
                  ranges[(index + k) % count].end) for k in range(1, count))
    order.append((ranges[index], ranges[index].start, ip - 1))
    for r, first, last_ip in order:
        for candidate in range(first, last_ip + 1):
            yield r, candidate


def allocate(store, config, container_id, ifname):
    """Reserve one address per range set for (container_id, ifname) and return them.

    A repeated ADD of the same attachment gets its existing reservations back.  On failure the
    reservations made by this call are removed again.
    """
    owner = owner_text(container_id, ifname)
    indexed, body = store.indexed_reservations(owner)
    reserved = store.reservations() if indexed is None else indexed
    requested = list(config.requested)
    made, result = [], []
    try:
        for set_index, ranges in enumerate(config.range_sets):
            result.append(_allocate_in_set(store, set_index, ranges, reserved, requested, owner,
                                           made))
        if requested:
            raise CNIError(ERR_INVALID_CONFIG, "failed to allocate all requested IPs: %s"
                           % " ".join(ip_to_text(*ip) for ip in requested),
                           "a requested address lies in no range set (or two lie in one)")
    except BaseException:
        for family, ip in made:
            store.remove(ip_to_text(family, ip))
        raise
    if indexed is None:
        reserved.update((key, owner) for key in made)
        store.write_index_of(reserved)
    elif made:
        store.write_index(body + index_lines((key, owner) for key in made))
    return result


def _allocate_in_set(store, set_index, ranges, reserved, requested, owner, made):
    """One address from one range set: the attachment's own, a requested one, or the next free."""
    family = ranges[0].family
    for (fam, ip), content in reserved.items():
        if content.strip() == owner and ranges.find(fam, ip):
            if (fam, ip) in requested:
                requested.remove((fam, ip))
            return ranges.find(fam, ip), fam, ip
    for fam, ip in requested:
        r = ranges.find(fam, ip)
        if r is None:
            continue
        requested.remove((fam, ip))
        text = ip_to_text(fam, ip)
        if ip == r.gateway:
            raise CNIError(ERR_INVALID_CONFIG, "requested ip %s is subnet's gateway" % text)
        if not r.usable(ip):
            raise CNIError(ERR_INVALID_CONFIG, "requested ip %s is not usable in range set %s"
                           % (text, ranges))
        if not store.reserve(fam, ip, owner):
            raise CNIError(ERR_INVALID_CONFIG, "requested IP address %s is not available in range "
                           "set %s" % (text, ranges),
                           "reserved by %r" % (store.read(text) or "")[:100])
        made.append((fam, ip))
        store.set_last_reserved(set_index, fam, ip)
        return r, fam, ip
    # Exhaustion is counted, never found by walking a range that may hold 2^64 addresses; the
    # count is only needed once there are as many reservations as the range set has addresses.
    capacity = ranges.capacity()
    full = len(reserved) >= capacity and capacity <= sum(
        1 for (fam, ip) in reserved if fam == family and any(r.usable(ip) for r in ranges))
    if not full:
        for r, ip in _candidates(ranges, store.last_reserved(set_index)):
            if (family, ip) in reserved or not r.usable(ip):
                continue
            if store.reserve(family, ip, owner):
                made.append((family, ip))
                store.set_last_reserved(set_index, family, ip)
                return r, family, ip
    raise CNIError(ERR_TRY_AGAIN, "no IP addresses available in range set: %s" % ranges,
                   "all %d addresses of range set %d are reserved" % (ranges.capacity(), set_index))


def release(store, container_id, ifname, known=()):
    """Remove every reservation of (container_id, ifname); legacy ID-only files when there are none.

    `known` are the attachment's addresses from prevResult: when each of them is reserved by it,
    they are all it holds (an attachment gets one address per range set, and a repeated ADD gets
    the same ones), so the directory is not walked.
    """
    owner = owner_text(container_id, ifname)
    if known and all((store.read(ip_to_text(*key)) or "").strip() == owner for key in known):
        body = store.index_body()
        for key in known:
            store.remove(ip_to_text(*key))
        if body is not None:
            doomed = set(index_lines([(key, owner)]) for key in known)
            store.write_index("".join(line for line in body.splitlines(True)
                                      if line not in doomed))
        return list(known)
    reserved = store.reservations()
    mine = [key for key, content in reserved.items() if content.strip() == owner]
    if not mine:
        mine = [key for key, content in reserved.items() if content.strip() == container_id.strip()]
    for key in mine:
        store.remove_reservation(key)
    return mine


def valid_attachments(config):
    """The (containerID, ifname) pairs of a GC request, or None when the request names none."""
    for key in ("cni.dev/valid-attachments", "cni.dev/attachments"):
        items = conf_lookup(config, key)
        if items is not None:
            if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
                raise config_error("%s must be a list of objects" % key)
            return set((str(conf_get(i, "containerID", None, "")),
                        str(conf_get(i, "ifname", None, "")))
                       for i in items)
    return None


def collect_garbage(store, valid):
    """Release reservations of attachments not in `valid`; returns the errors met on the way."""
    valid_ids = set(cid for cid, _ in valid)
    errors = []
    for key, content in store.reservations().items():
        cid, sep, ifname = content.strip().partition("\r\n")
        keep = (cid, ifname) in valid if sep else cid in valid_ids
        if not keep:
            try:
                store.remove_reservation(key)
            except CNIError as err:
                errors.append(err.msg)
    return errors


# ==============================================================================================
# The loopback plugin
# ==============================================================================================
# ADD brings `lo` up in the container, DEL sets it down (a namespace already gone is not an
# error); it keeps no state, so STATUS and GC have nothing to do.  Chained after another
# plugin, ADD passes prevResult on unchanged.

def loopback_add(request):
    """Bring `lo` up in the container (CNI_IFNAME is ignored: runtimes pass eth0 or lo)."""
    ns = container_netns(request)
    nl = ns.netlink()
    lo = get_link(nl, "lo")
    if lo is None:
        raise CNIError(ERR_INTERNAL, "the namespace %s has no loopback interface" % request.netns)
    set_link(nl, lo.index, "failed to set lo up", up=True)
    ips = []
    for family in (4, 6):
        addrs = [a.prefix for a in list_addrs(nl, lo.index, family)]
        for prefix in addrs:
            loopback_net = Prefix(4, 0x7F000000, 8) if family == 4 else Prefix(6, 1, 128)
            if not loopback_net.contains(prefix.family, prefix.ip):
                raise CNIError(ERR_INTERNAL, "loopback interface found with non-loopback address %r"
                               % str(prefix))
        if addrs:
            ips.append({"address": str(addrs[0]), "interface": 0})
    previous = previous_result(request)
    if previous is not None:
        return previous
    return {"interfaces": [{"name": "lo", "mac": "00:00:00:00:00:00", "sandbox": request.netns}],
            "ips": ips}


def loopback_del(request):
    """Take `lo` down; a namespace that is gone (or never given) has nothing left to undo."""
    if not request.netns:
        return None
    try:
        ns = container_netns(request)
    except (NetnsGone, NetnsIsOwn):
        return None             # nothing of a namespace that is gone, or the node's, is ours
    nl = ns.netlink()
    lo = get_link(nl, "lo")
    if lo is not None:
        set_link(nl, lo.index, "failed to set lo down", up=False)
    return None


def loopback_check(request):
    """CHECK: `lo` exists and is up in the container."""
    nl = container_netns(request).netlink()
    lo = get_link(nl, "lo")
    if lo is None or not lo.up:
        raise CNIError(ERR_INTERNAL, "loopback interface is down")
    return None


def nothing_to_do(request):
    """STATUS and GC of a plugin that keeps no state."""
    return None


# ==============================================================================================
# The host-local plugin
# ==============================================================================================
# Its keys are all read by HostLocalConfig (DEL and GC by IPAMLocation alone); the IPAM store
# section does the allocating.

class IPAMLocation(object):
    """Where a network's host-local state lives: all that DEL and GC read of the config, so a
    range configuration that no longer validates does not leak reservations (decision 9)."""

    def __init__(self, request):
        ipam = conf_get(request.config, "ipam", dict)
        if ipam is None:
            raise CNIError(ERR_INVALID_CONFIG, "IPAM config missing 'ipam' key")
        self.network = request.network
        self.data_dir = conf_get(ipam, "dataDir", str, DEFAULT_DATA_DIR, "ipam.")
        if (not self.data_dir.startswith("/") or "\0" in self.data_dir
                or not encodable(self.data_dir)):
            raise config_error("ipam.dataDir must be an absolute path", self.data_dir[:300])


class HostLocalConfig(IPAMLocation):
    """host-local's keys (the reference's names, matched case-insensitively), read here alone:

      ipam.dataDir          state directory (default /var/lib/cni/networks)        IPAMLocation
      ipam.subnet, ipam.rangeStart, ipam.rangeEnd, ipam.gateway
                            one range: the older single-range form                  IPRange.parse
      ipam.ranges           [[range, ...], ...]: range sets, one address from each  parse_range_set
      ipam.routes           [{dst, gw, mtu, advmss, priority, table, scope}]        parse_routes
      ipam.resolvConf       a resolv.conf file whose contents are the result's dns
      runtimeConfig.ipRanges  range sets from the runtime (capability "ipRanges"), first
      CNI_ARGS IP, args.cni.ips, runtimeConfig.ips   addresses asked for, in that order

    Everything ADD, CHECK and STATUS need, validated by the constructor.
    """

    def __init__(self, request):
        IPAMLocation.__init__(self, request)
        ipam = conf_get(request.config, "ipam", dict)
        self.range_sets = self._range_sets(request, ipam)
        self.routes = parse_routes(conf_get(ipam, "routes", list, [], "ipam."), "ipam.routes")
        resolv = conf_get(ipam, "resolvConf", str, "", "ipam.")
        self.dns = parse_resolv_conf(resolv) if resolv else {}
        self.requested = self._requested_ips(request)

    @staticmethod
    def _range_sets(request, ipam):
        """Range sets in the reference's order: the runtime's, ipam.subnet's, ipam.ranges."""
        sets = []
        for i, items in enumerate(conf_get(request.runtime_config(), "ipRanges", list, [])):
            sets.append(parse_range_set(items, "runtimeConfig.ipRanges[%d]" % i))
        if conf_get(ipam, "subnet") is not None:
            sets.append(parse_range_set([ipam], "ipam"))
        for i, items in enumerate(conf_get(ipam, "ranges", list, [], "ipam.")):
            sets.append(parse_range_set(items, "ipam.ranges[%d]" % i))
        if not sets:
            raise CNIError(ERR_INVALID_CONFIG, "no IP ranges specified")
        if is_legacy_version(request.version):
            for family in (4, 6):
                if sum(1 for s in sets if s[0].family == family) > 1:
                    raise CNIError(ERR_INVALID_CONFIG, "CNI version %s does not support more "
                                   "than 1 address per family" % request.version)
        for i, a in enumerate(sets):
            for j in range(i + 1, len(sets)):
                if any(x.overlaps(y) for x in a for y in sets[j]):
                    raise CNIError(ERR_INVALID_CONFIG, "range set %d overlaps with %d" % (i, j))
        return sets

    @staticmethod
    def _requested_ips(request):
        """Addresses asked for by CNI_ARGS IP, args.cni.ips and runtimeConfig.ips, in that order."""
        texts = []
        arg = request.args.get("IP")
        if arg:
            texts.extend(arg.split(","))
        cni = conf_get(conf_get(request.config, "args", dict, {}), "cni", dict, {})
        for where, items in (("args.cni.ips", conf_get(cni, "ips", list, [])),
                             ("runtimeConfig.ips",
                              conf_get(request.runtime_config(), "ips", list, []))):
            for item in items:
                if not isinstance(item, str):
                    raise config_error("%s must hold strings" % where)
                texts.append(item)
        requested = []
        for text in texts:
            try:
                ip = parse_ip(text.strip().split("/", 1)[0])
            except ValueError:
                raise CNIError(ERR_INVALID_CONFIG, "cannot understand ip: %r" % text[:100])
            if ip not in requested:
                requested.append(ip)
        return requested


def host_local_allocate(request):
    """Reserve one address per range set.  Returns the short IPAM result (no interfaces) and
    whether the attachment already held a reservation (a repeated ADD): the bridge plugin in
    this process asks, because only then can rules of an earlier ADD exist."""
    config = HostLocalConfig(request)
    with Store(config.data_dir, config.network) as store:
        store.sweep_previous_boot()
        allocations = allocate(store, config, request.container_id, request.ifname)
    ips = [{"address": "%s/%d" % (ip_to_text(family, ip), r.subnet.length),
            "gateway": ip_to_text(family, r.gateway)} for r, family, ip in allocations]
    reused = any((family, ip) not in store.created for _r, family, ip in allocations)
    return {"ips": ips, "routes": config.routes, "dns": config.dns}, reused


def host_local_add(request):
    """ADD: reserve one address per range set; the short IPAM result (no interfaces)."""
    return host_local_allocate(request)[0]


def host_local_check_add(request):
    """What an ADD of this config would refuse, found without reserving anything: the ranges,
    routes, resolvConf and requested addresses, and a state directory that cannot be made or
    opened.  The bridge plugin asks this before it makes anything."""
    config = HostLocalConfig(request)
    for family, ip in config.requested:
        ranges = [r for r in (s.find(family, ip) for s in config.range_sets) if r is not None]
        if not ranges:
            raise CNIError(ERR_INVALID_CONFIG, "failed to allocate all requested IPs: %s"
                           % ip_to_text(family, ip), "a requested address lies in no range set")
        if not ranges[0].usable(ip):
            raise CNIError(ERR_INVALID_CONFIG, "requested ip %s is not usable in its range"
                           % ip_to_text(family, ip),
                           "it is the network, broadcast or gateway address")
    store = Store(config.data_dir, config.network)
    try:
        store.open_directory()
    finally:
        store.__exit__()


def host_local_del(request):
    """Release the attachment's addresses; needs only the network name and dataDir, so a range
    configuration that no longer validates does not leak them (decision 9)."""
    config = IPAMLocation(request)
    try:
        known = [(p.family, p.ip) for p in (Prefix.parse(ip["address"])
                                             for ip in (previous_result(request) or {}).get(
                                                 "ips", []))]
    except CNIError:
        known = []              # a broken prevResult only costs the walk of the directory
    with Store(config.data_dir, config.network) as store:
        release(store, request.container_id, request.ifname, known)
    return None


def host_local_check(request):
    """CHECK: the attachment holds a reservation, and every prevResult address of our ranges."""
    config = HostLocalConfig(request)
    with Store(config.data_dir, config.network) as store:
        reserved = store.reservations()
    owner = owner_text(request.container_id, request.ifname)
    mine = set(key for key, content in reserved.items() if content.strip() == owner)
    if not mine:
        raise CNIError(ERR_INTERNAL, "host-local: Failed to find address added by container %s"
                       % request.container_id)
    previous = previous_result(request)
    for ip in (previous or {}).get("ips", []):
        try:
            prefix = Prefix.parse(ip["address"])
        except (ValueError, KeyError):
            continue
        key = (prefix.family, prefix.ip)
        if any(s.find(*key) for s in config.range_sets) and key not in mine:
            raise CNIError(ERR_INTERNAL, "host-local: address %s is not reserved for container %s"
                           % (ip["address"], request.container_id))
    return None


def host_local_gc(request):
    """Release the reservations of a previous boot and those whose attachment is not in
    cni.dev/valid-attachments."""
    valid = valid_attachments(request.config)
    config = IPAMLocation(request)
    with Store(config.data_dir, config.network) as store:
        store.sweep_previous_boot()
        errors = collect_garbage(store, valid) if valid is not None else []
    if errors:
        raise CNIError(ERR_IO, "host-local GC could not release every stale reservation",
                       "; ".join(errors))
    return None


def host_local_status(request):
    """Fail with code 50 when a range set has no free address (counted, never walked).

    containerd 2.x sends STATUS every few seconds: it counts the state directory's entries (an
    upper bound of the reservations) and reads reservations only when a set could be full; it
    creates and locks nothing.
    """
    config = HostLocalConfig(request)
    path = "%s/%s" % (config.data_dir.rstrip("/"), config.network)
    try:
        entries = len(posix.listdir(path.encode("utf-8", "surrogateescape")))
    except OSError as err:
        if err.errno == errno.ENOENT:
            return None                     # nothing was ever reserved on this network
        raise os_error(err, "failed to read the IPAM state directory %s" % path)
    if all(entries < ranges.capacity() for ranges in config.range_sets):
        return None
    with Store(config.data_dir, config.network) as store:
        store.sweep_previous_boot()
        reserved = list(store.reservations())
    for index, ranges in enumerate(config.range_sets):
        in_use = sum(1 for family, ip in reserved if any(r.family == family and r.usable(ip)
                                                        for r in ranges))
        if in_use >= ranges.capacity():
            raise CNIError(ERR_NOT_AVAILABLE, "no IP addresses available in range set: %s" % ranges,
                           "all %d addresses of range set %d are reserved"
                           % (ranges.capacity(), index))
    return None


# ==============================================================================================
# The bridge plugin
# ==============================================================================================
# Its keys are all read by BridgeConfig.  ADD makes what is missing and reuses what an earlier
# ADD of the same attachment made (the host veth is found by the name its attachment hashes
# to), and undoes its own work when it fails (rollback_add).  The masquerade and spoof-check
# rules carry the reference's comments, so DEL and GC find them by comment alone, with no netns
# or link needed; DEL is idempotent and best effort.

VLAN_MAX = 4094
PORT_UP_TIMEOUT = 2.5                          # seconds to wait for the host veth to come up
IPV6_SETTLE_TIMEOUT = 5.0                      # seconds to wait for duplicate address detection
HOST_VETH_PREFIX = "veth"
# Indexes in an ADD result's "interfaces" (bridge_add lists them in this order); its "ips"
# name the container's interface by index.
RESULT_BRIDGE, RESULT_HOST_VETH, RESULT_CONTAINER = 0, 1, 2


class BridgeConfig(object):
    """The bridge plugin's keys (reference names, matched case-insensitively)."""

    def __init__(self, request):
        c = request.config
        self.network = request.network
        self.bridge = conf_get(c, "bridge", str, "cni0")
        try:
            check_ifname(self.bridge)
        except CNIError as err:
            raise config_error("bridge: %s" % err.msg, self.bridge[:100])
        flag = lambda key: conf_get(c, key, bool, False)
        self.is_default_gateway = flag("isDefaultGateway")
        self.is_gateway = flag("isGateway") or self.is_default_gateway
        self.force_address = flag("forceAddress")
        self.ip_masq = flag("ipMasq")
        self.ip_masq_backend = conf_get(c, "ipMasqBackend", str, "nftables")
        if self.ip_masq_backend not in ("nftables", "iptables"):
            raise CNIError(ERR_INVALID_CONFIG,
                           "unknown ipmasq backend %r" % self.ip_masq_backend[:50],
                           'ipMasqBackend is "nftables" (the default) or "iptables"')
        exclude = conf_get(c, "ipMasqExclude", list)
        self.ip_masq_exclude = parse_masq_exclusions(exclude) if exclude is not None else None
        self.mtu = conf_int(c, "mtu", 0, 65535)
        if 0 < self.mtu < 68:
            raise config_error("mtu %d is below 68" % self.mtu)
        self.hairpin = flag("hairpinMode")
        self.promisc = flag("promiscMode")
        self.port_isolation = flag("portIsolation")
        self.macspoofchk = flag("macspoofchk")
        self.enable_dad = flag("enabledad")
        self.disable_container_interface = flag("disableContainerInterface")
        self.preserve_default_vlan = flag("preserveDefaultVlan")
        vlan = conf_get(c, "vlan", int, 0)
        if not 0 <= vlan <= VLAN_MAX:
            raise CNIError(ERR_INVALID_CONFIG,
                           "invalid VLAN ID %d (must be between 0 and 4094)" % vlan)
        self.vlan = vlan
        trunk = conf_get(c, "vlanTrunk", list)
        self.vlan_trunk = parse_vlan_trunk(trunk) if trunk is not None else None
        ipam = conf_get(c, "ipam", dict, {})
        self.ipam_type = conf_get(ipam, "type", str, "", "ipam.")
        dns = conf_get(c, "dns", dict, {})
        self.dns = dict((k, v) for k, v in dns.items() if v)
        self.mac = self._container_mac(request)
        if self.ipam_type and self.disable_container_interface:
            raise CNIError(ERR_INVALID_CONFIG,
                           "cannot use IPAM when DisableContainerInterface flag is set")
        if self.hairpin and self.promisc:
            raise CNIError(ERR_INVALID_CONFIG,
                           "cannot set hairpin mode and promiscuous mode at the same time")
        gateway_bytes = len(self.vlan_gateway.encode("utf-8", "surrogateescape"))
        if self.uses_vlan_gateway and gateway_bytes > 15:
            raise CNIError(ERR_INVALID_CONFIG,
                           "the VLAN gateway interface name %r is longer than 15 bytes"
                           % self.vlan_gateway, "isGateway with vlan %d puts the gateway addresses "
                           "on <bridge>.<vlan>: shorten the bridge name" % self.vlan)

    @property
    def vlan_filtering(self):
        """Whether the bridge filters VLANs (vlan or vlanTrunk set)."""
        return self.vlan != 0 or self.vlan_trunk is not None

    @property
    def uses_vlan_gateway(self):
        """An L3 gateway network on a VLAN keeps its gateway addresses on `<bridge>.<vlan>`."""
        return self.vlan != 0 and self.is_gateway and bool(self.ipam_type)

    @property
    def vlan_gateway(self):
        """The name of the VLAN gateway interface: <bridge>.<vlan>."""
        return "%s.%d" % (self.bridge, self.vlan)

    @staticmethod
    def _container_mac(request):
        """runtimeConfig.mac, else args.cni.mac, else CNI_ARGS MAC."""
        cni = conf_get(conf_get(request.config, "args", dict, {}), "cni", dict, {})
        for mac in (conf_get(request.runtime_config(), "mac", str), conf_get(cni, "mac", str),
                    request.args.get("MAC")):
            if mac:
                try:
                    raw = parse_mac(mac)
                except ValueError as err:
                    raise CNIError(ERR_INVALID_CONFIG, str(err))
                if raw[0] & 1 or raw == bytes(6):     # the kernel refuses both on an interface
                    raise config_error("MAC address %r is %s" % (
                        mac, "a multicast address" if raw[0] & 1 else "all zeros"),
                        "a container MAC must be a unicast address")
                return mac.lower()
        return None


def parse_masq_exclusions(items):
    """ipMasqExclude: its CIDRs as Prefixes with host bits cleared, duplicates dropped, in the
    order given.  Each applies to its own address family (an IPv6 CIDR on an IPv4-only network
    excludes nothing there and is no error)."""
    exclusions = []
    for item in items:
        try:
            prefix = Prefix.parse(item)
        except ValueError:
            raise config_error("ipMasqExclude: %s is not a CIDR"
                               % (json_dumps(item)[:100] if not isinstance(item, str)
                                  else repr(item[:100])),
                               'entries are "address/length" strings, such as "10.244.0.0/16"')
        network = Prefix(prefix.family, prefix.network, prefix.length)
        if network not in exclusions:
            exclusions.append(network)
    return tuple(exclusions)


def parse_vlan_trunk(items):
    """Sorted, de-duplicated VLAN ids of a vlanTrunk list of {id} or {minID, maxID} entries."""
    vids = set()
    for item in items:
        if not isinstance(item, dict):
            raise config_error("vlanTrunk entries are objects")
        low, high, one = (conf_get(item, k, int) for k in ("minID", "maxID", "id"))
        if low is not None or high is not None:
            if low is None:
                raise CNIError(ERR_INVALID_CONFIG,
                               "minID and maxID should be configured simultaneously, "
                               "minID is missing")
            if high is None:
                raise CNIError(ERR_INVALID_CONFIG,
                               "minID and maxID should be configured simultaneously, "
                               "maxID is missing")
            if not 1 <= low <= VLAN_MAX:
                raise CNIError(ERR_INVALID_CONFIG, "incorrect trunk minID parameter")
            if not 1 <= high <= VLAN_MAX:
                raise CNIError(ERR_INVALID_CONFIG, "incorrect trunk maxID parameter")
            if high < low:
                raise CNIError(ERR_INVALID_CONFIG, "minID is greater than maxID in trunk parameter")
            vids.update(range(low, high + 1))
        if one is not None:
            if not 1 <= one <= VLAN_MAX:
                raise CNIError(ERR_INVALID_CONFIG, "incorrect trunk id parameter")
            vids.add(one)
    return sorted(vids)


# --- IPAM delegation --------------------------------------------------------------------------

IPAM_IN_PROCESS = {}      # filled below: command -> host-local function, for ipam.type host-local


def ipam_call(request, ipam_type, command):
    """Run the IPAM plugin for `command`: host-local in this process, anything else from CNI_PATH.

    The in-process host-local functions take the bridge's request as it is: none of them reads
    its command."""
    if ipam_type == "host-local":
        return IPAM_IN_PROCESS[command](request)
    return exec_plugin(request, ipam_type, command)


def ipam_add(request, ipam_type):
    """The IPAM's ADD: its result, and whether the attachment held its addresses already (only
    host-local in this process can tell; for another IPAM a repeated ADD is assumed)."""
    if ipam_type == "host-local":
        return host_local_allocate(request)
    return exec_plugin(request, ipam_type, "ADD"), True


def exec_plugin(request, plugin_type, command):
    """Delegate `command` to a plugin from CNI_PATH: our environment with CNI_COMMAND replaced,
    our stdin.  Returns its ADD result in internal form."""
    env = dict(request.env, CNI_COMMAND=command)
    output = invoke_plugin(plugin_type, request.path, env, request.stdin)
    return decode_result(output, request.version) if command == "ADD" else None


# --- masquerade and MAC spoof checking ------------------------------------------------------------
# The reference's layouts.  nftables masquerade: table inet cni_plugins_masquerade, base chain
# `postrouting` (rewritten on every ADD) returning multicast and going to `masq_checks`, where each
# container address has `ip saddr <ip> ip daddr != <subnet> masquerade` with a comment that starts
# with the attachment's hash.  iptables masquerade: chain CNI-<hash of network and container> in
# table nat, jumped to from POSTROUTING.  MAC spoof checking: chains in table bridge nat.
# ipMasqExclude (ours alone) adds exclusions to the same places, as the attachment's own rules:
# `return` rules before its masquerade rule, ACCEPT rules before its chain's MASQUERADE (see
# masquerade_rules); without the key every rule is the reference's.

MASQ_TABLE = "cni_plugins_masquerade"
MASQ_CHAIN = "masq_checks"
MASQ_POSTROUTING = "postrouting"
MASQ_TABLE_COMMENT = "Masquerading for plugins from github.com/containernetworking/plugins"
MASQ_CHAIN_COMMENT = ("Masquerade traffic from certain IPs to any (non-multicast) IP outside "
                      "their subnet")
MULTICAST = {4: Prefix(4, 0xE0000000, 4), 6: Prefix(6, 0xFF << 120, 8)}
NF_PRIORITY_SRCNAT = 100
NF_BR_PRI_NAT_DST_BRIDGED = -300
COMMENT_MAX = 128                              # bytes, as the reference truncates


def masq_instance_hash(network, container_id, ifname):
    """The attachment's hash that starts its masquerade rules' comments."""
    return "%s-%s" % (sha512_hex(network)[:16], sha512_hex(ifname + ":" + container_id)[:16])


def masq_comment(network, container_id, ifname):
    """The comment of the attachment's masquerade rules, as the reference writes it."""
    text = "%s, net: %s, if: %s, id: %s" % (masq_instance_hash(network, container_id, ifname),
                                             network.replace('"', ""), ifname.replace('"', ""),
                                             container_id.replace('"', ""))
    return utf8_prefix(text, COMMENT_MAX)


def iptables_chain(network, container_id):
    """The reference's iptables chain name of an attachment (table nat)."""
    return "CNI-" + sha512_hex(network + container_id)[:24]


NFT_NAME_MAX = 255         # bytes of an nf_tables chain name (NFT_CHAIN_MAXNAMELEN less the NUL)


def iptables_comment(network, container_id):
    """The reference's comment, cut to what iptables accepts (names are ASCII: bytes are
    characters)."""
    return ('name: "%s" id: "%s"' % (network, container_id))[:XT_COMMENT_MAX]


def spoofchk_names(container_id, ifname):
    """(chain, its -mac chain, comment) of an attachment's MAC spoof check: the reference's names,
    or, where those would not fit an nf_tables chain name, the same with a digest of
    `<containerID>-<ifname>` (ADD, CHECK, DEL and GC all name through here)."""
    ref = "%s-%s" % (container_id, ifname)
    if len(("cni-br-iface-%s-mac" % ref).encode("utf-8", "surrogateescape")) > NFT_NAME_MAX:
        ref = "sha512-" + sha512_hex(ref)[:64]
    chain = "cni-br-iface-" + ref
    return chain, chain + "-mac", "macspoofchk-" + ref


def setup_masquerade(conf, request, result, replace_earlier=True):
    """Masquerade the attachment's addresses; with `replace_earlier`, rules an earlier ADD of the
    same attachment left are replaced (that costs a listing of every container's rule)."""
    prefixes = [Prefix.parse(ip["address"]) for ip in result["ips"]]
    if conf.ip_masq_backend == "iptables":
        for prefix in prefixes:
            iptables_setup_masquerade(conf.network, request.container_id, prefix,
                                      conf.ip_masq_exclude)
        return
    nl = node_nftables()
    stale = []
    if replace_earlier:
        instance = masq_instance_hash(conf.network, request.container_id, request.ifname)
        stale = rules_commented(nl, NFPROTO_INET, MASQ_TABLE, MASQ_CHAIN, instance)
    batch = NftBatch()
    # The reference rewrites the base chain on every ADD; here it is written only when it is not
    # as it should be, because deleting rules makes this process wait for an RCU grace period
    # (10-20 ms) when its nf_tables socket closes.
    base = list_rules(nl, NFPROTO_INET, MASQ_TABLE, MASQ_POSTROUTING)
    if [r.jump_target for r in base] != [None, None, MASQ_CHAIN]:
        batch.add_table(NFPROTO_INET, MASQ_TABLE, MASQ_TABLE_COMMENT)
        batch.add_chain(NFPROTO_INET, MASQ_TABLE, MASQ_CHAIN, comment=MASQ_CHAIN_COMMENT)
        batch.add_chain(NFPROTO_INET, MASQ_TABLE, MASQ_POSTROUTING,
                        hook=("nat", NF_INET_POST_ROUTING, NF_PRIORITY_SRCNAT))
        # Flushed even when it looked empty: another ADD may fill it between our look and commit.
        batch.flush_chain(NFPROTO_INET, MASQ_TABLE, MASQ_POSTROUTING)
        for family in (4, 6):
            batch.add_rule(NFPROTO_INET, MASQ_TABLE, MASQ_POSTROUTING, match_family(family)
                           + match_address("daddr", MULTICAST[family]) + [expr_verdict(NFT_RETURN)])
        batch.add_rule(NFPROTO_INET, MASQ_TABLE, MASQ_POSTROUTING,
                       [expr_verdict(NFT_GOTO, MASQ_CHAIN)])
    for rule in stale:
        batch.delete_rule(rule)
    comment = masq_comment(conf.network, request.container_id, request.ifname)
    for prefix in prefixes:
        for exprs in masquerade_rules(prefix, conf.ip_masq_exclude):
            batch.add_rule(NFPROTO_INET, MASQ_TABLE, MASQ_CHAIN, exprs, comment=comment)
    batch.commit(nl, "failed to set up masquerading for %s" % request.container_id)


def masquerade_rules(prefix, exclusions):
    """The nftables rules of one container address in `masq_checks`, in chain order: without
    ipMasqExclude (`exclusions` None) the reference's one rule, `ip saddr <ip> ip daddr !=
    <subnet> masquerade`; with it, first `ip saddr <ip> ip daddr <cidr> return` for each excluded
    CIDR of the address's family and `ip saddr <ip> fib daddr type local return` (the node's own
    addresses, as kubenet's `! --dst-type LOCAL`).  They all carry the attachment's comment, so
    DEL, CHECK and GC treat them as one; appended in one transaction, the returns always come
    before the masquerade they guard (and other attachments' rules never match this source)."""
    source = match_family(prefix.family) + match_address(
        "saddr", Prefix(prefix.family, prefix.ip, IP_BITS[prefix.family]))
    rules = []
    if exclusions is not None:
        rules.extend(source + match_address("daddr", excluded) + [expr_verdict(NFT_RETURN)]
                     for excluded in exclusions if excluded.family == prefix.family)
        rules.append(source + match_daddr_local() + [expr_verdict(NFT_RETURN)])
    rules.append(source + match_address("daddr", prefix, negate=True) + [expr_masquerade()])
    return rules


def setup_macspoofchk(conf, request, host_name, mac):
    """Only the container's MAC may enter the bridge from its host veth."""
    chain, mac_chain, comment = spoofchk_names(request.container_id, request.ifname)
    nl = node_nftables()
    batch = NftBatch()
    for rule in list_rules(nl, NFPROTO_BRIDGE, "nat", "PREROUTING"):
        if rule.comment == comment:            # a re-ADD replaces the jump instead of adding one
            batch.delete_rule(rule)
    batch.add_table(NFPROTO_BRIDGE, "nat")
    batch.add_chain(NFPROTO_BRIDGE, "nat", "PREROUTING",
                    hook=("filter", NF_BR_PRE_ROUTING, NF_BR_PRI_NAT_DST_BRIDGED))
    batch.add_chain(NFPROTO_BRIDGE, "nat", chain)
    batch.add_chain(NFPROTO_BRIDGE, "nat", mac_chain)
    batch.flush_chain(NFPROTO_BRIDGE, "nat", chain)
    batch.flush_chain(NFPROTO_BRIDGE, "nat", mac_chain)
    batch.add_rule(NFPROTO_BRIDGE, "nat", "PREROUTING",
                   [expr_meta(NFT_META_IIFNAME), expr_cmp(NFT_CMP_EQ, ifname_bytes(host_name)),
                    expr_verdict(NFT_JUMP, chain)], comment)
    batch.add_rule(NFPROTO_BRIDGE, "nat", chain, [expr_verdict(NFT_JUMP, mac_chain)], comment)
    batch.add_rule(NFPROTO_BRIDGE, "nat", mac_chain,
                   [expr_payload(NFT_PAYLOAD_LL_HEADER, 6, 6), expr_cmp(NFT_CMP_EQ, parse_mac(mac)),
                    expr_verdict(NFT_RETURN)], comment)
    batch.add_rule(NFPROTO_BRIDGE, "nat", mac_chain, [expr_verdict(NF_DROP)], comment)
    batch.commit(nl, "failed to set up macspoofchk on %s" % host_name)


def ifname_bytes(name):
    """An interface name as `meta iifname` compares it: NUL-padded to IFNAMSIZ."""
    return name.encode("utf-8", "surrogateescape").ljust(16, b"\0")


def teardown_attachment_rules(network, container_id, ifname, ipmasq_backend=None):
    """Remove every rule of an attachment, found by name and comment alone: needs no netns, link,
    address or prevResult.  Also removes the reference's iptables chain where iptables is
    nf_tables-based (then it is visible here); the iptables program is run only for a config
    that asks for that backend."""
    nl = node_nftables()
    instance = masq_instance_hash(network, container_id, ifname)

    def remove_all(batch):
        for rule in rules_commented(nl, NFPROTO_INET, MASQ_TABLE, MASQ_CHAIN, instance):
            batch.delete_rule(rule)
        remove_chains(batch, nl, NFPROTO_BRIDGE, "nat", "PREROUTING",
                      spoofchk_names(container_id, ifname)[:2])
        for family in (NFPROTO_IPV4, NFPROTO_IPV6):
            if owns_iptables_chain(nl, family, network, container_id):
                remove_chains(batch, nl, family, "nat", "POSTROUTING",
                              (iptables_chain(network, container_id),))
    commit_rebuilt(nl, remove_all, "failed to remove the rules of %s" % container_id)
    if ipmasq_backend == "iptables":
        iptables_teardown(network, container_id)


def owns_iptables_chain(nl, family, network, container_id, required_rules=False):
    """Whether the reference's iptables chain of the attachment exists and is its own (and, with
    `required_rules`, holds rules).  The chain's name hashes network and container ID run
    together ("hnet" + "xc1" = "hnetx" + "c1"), so it is the attachment's only when no rule in it
    carries another attachment's comment."""
    chain = iptables_chain(network, container_id)
    if not chain_exists(nl, family, "nat", chain):
        return False
    comment = iptables_comment(network, container_id)
    rules = list_rules(nl, family, "nat", chain)
    return (all(rule.match_comment == comment for rule in rules)
            and bool(rules or not required_rules))


def masquerade_in_place(conf, request, ips):
    """Whether nf_tables holds the attachment's masquerade: a rule per address in the nftables
    layout, or the reference's iptables chain of each address family (iptables-nft)."""
    nl = node_nftables()
    instance = masq_instance_hash(conf.network, request.container_id, request.ifname)
    if len(rules_commented(nl, NFPROTO_INET, MASQ_TABLE, MASQ_CHAIN, instance)) >= len(ips):
        return True
    families = set(address_family_of(ip["address"]) for ip in ips
                   if isinstance(ip, dict) and "address" in ip)
    return bool(families) and all(
        owns_iptables_chain(nl, NFPROTO_IPV4 if family == 4 else NFPROTO_IPV6, conf.network,
                            request.container_id, required_rules=True) for family in families)


def check_masquerade_exclusions(conf, request, ips):
    """CHECK with ipMasqExclude: the attachment's rules are exactly those ADD writes, in order
    (the reference never writes this layout, so none of its layouts is accepted)."""
    prefixes = [Prefix.parse(ip["address"]) for ip in ips
                if isinstance(ip, dict) and isinstance(ip.get("address"), str)]
    if conf.ip_masq_backend == "iptables":
        for prefix in prefixes:
            iptables_check_rules(conf.network, request.container_id, prefix, conf.ip_masq_exclude)
        return
    instance = masq_instance_hash(conf.network, request.container_id, request.ifname)
    found = [r.signature for r in
             rules_commented(node_nftables(), NFPROTO_INET, MASQ_TABLE, MASQ_CHAIN, instance)]
    expected = [expression_signature(exprs) for prefix in prefixes
                for exprs in masquerade_rules(prefix, conf.ip_masq_exclude)]
    if found != expected:
        excluded = ", ".join(str(p) for p in conf.ip_masq_exclude) or "none"
        raise CNIError(ERR_INTERNAL,
                       "masquerade rules of %s are missing or changed" % request.container_id,
                       "expected %d rules in chain inet %s %s (ipMasqExclude: %s, and the node's "
                       "own addresses), found %d that differ"
                       % (len(expected), MASQ_TABLE, MASQ_CHAIN, excluded, len(found)))


def check_attachment_rules(conf, request, previous):
    """CHECK: the masquerade and spoof-check rules this attachment needs are in place.  Either
    masquerade layout counts, whatever the config's backend: the nftables one (ours and the
    reference's nftables backend) or the reference's iptables chain (1.1.1 writes only that),
    so a node switched between the two plugins still passes CHECK.  With ipMasqExclude, only
    the exact rules ADD writes count."""
    if conf.ip_masq and conf.ip_masq_exclude is not None:
        check_masquerade_exclusions(conf, request, previous.get("ips") or [])
    elif conf.ip_masq and not masquerade_in_place(conf, request, previous.get("ips") or []):
        if conf.ip_masq_backend == "iptables":
            iptables_check(conf.network, request.container_id)      # legacy iptables: asked there
        else:
            raise CNIError(ERR_INTERNAL,
                           "masquerade rules of %s are missing" % request.container_id,
                           "expected %d in table inet %s, and no iptables chain %s"
                           % (len(previous.get("ips") or []), MASQ_TABLE,
                              iptables_chain(conf.network, request.container_id)))
    if conf.macspoofchk:
        chain, _mac_chain, comment = spoofchk_names(request.container_id, request.ifname)
        if not any(r.comment == comment and r.jump_target == chain
                   for r in list_rules(node_nftables(), NFPROTO_BRIDGE, "nat", "PREROUTING")):
            raise CNIError(ERR_INTERNAL,
                           "macspoofchk rules of %s are missing" % request.container_id)


def collect_stale_rules(network, valid):
    """GC: remove this network's masquerade rules (either layout) and spoof checks whose
    attachment is not in `valid`.  Spoof-check comments do not name the network, so only those
    of attachments whose host veth no longer exists are removed.  Returns the errors met."""
    nl = node_nftables()
    keep = set(masq_instance_hash(network, cid, ifname) for cid, ifname in valid)
    network_hash = sha512_hex(network)[:16] + "-"

    def masq_owner(rule):       # the attachment hash starting the comments of the network's rules
        return rule.comment.split(",", 1)[0] if rule.comment.startswith(network_hash) else None
    batch = NftBatch()
    remove_stale_rules(batch, nl, NFPROTO_INET, MASQ_TABLE, MASQ_CHAIN, masq_owner, keep)
    for family in (NFPROTO_IPV4, NFPROTO_IPV6):
        remove_chains(batch, nl, family, "nat", "POSTROUTING",
                      stale_iptables_chains(nl, family, network, set(cid for cid, _ in valid)))
    valid_chains = set(spoofchk_names(cid, ifname)[0] for cid, ifname in valid)
    ports = set(link.name for link in list_links(NetlinkSocket()))
    stale = []
    for rule in list_rules(nl, NFPROTO_BRIDGE, "nat", "PREROUTING"):
        target = rule.jump_target or ""
        if (rule.comment.startswith("macspoofchk-") and target not in valid_chains
                and rule.iifname not in ports):
            stale.extend((target, target + "-mac"))
    remove_chains(batch, nl, NFPROTO_BRIDGE, "nat", "PREROUTING", stale)
    try:
        batch.commit(nl, "failed to remove stale rules of network %s" % network)
    except CNIError as err:
        return [err.msg]
    return []


def stale_iptables_chains(nl, family, network, valid_ids):
    """The reference's iptables chains of `network` (as iptables-nft shows them in nf_tables)
    whose container is not in `valid_ids`: found by the comment of the POSTROUTING rules jumping
    to them, `name: "<network>" id: "<container>"`, and taken only when the whole chain is that
    attachment's (owns_iptables_chain).  A comment cut to iptables' limit names no container
    and is left alone."""
    prefix = iptables_comment(network, "")[:-1]
    stale = []
    for rule in list_rules(nl, family, "nat", "POSTROUTING"):
        comment = rule.match_comment
        if not (comment.startswith(prefix) and comment.endswith('"')):
            continue
        container_id = comment[len(prefix):-1]
        chain = iptables_chain(network, container_id)
        if (container_id not in valid_ids and rule.jump_target == chain
                and iptables_comment(network, container_id) == comment and chain not in stale
                and owns_iptables_chain(nl, family, network, container_id)):
            stale.append(chain)
    return stale


# --- the iptables backend (only when a config asks for it) ---------------------------------------

def run_iptables(family, args, check=True, table="nat"):
    """Run iptables or ip6tables on `table`; returns (exit status, output)."""
    import subprocess
    program = "iptables" if family == 4 else "ip6tables"
    try:
        proc = subprocess.run([program, "-w", "5", "-t", table] + args, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    except OSError as err:
        raise CNIError(ERR_INTERNAL, "the iptables backend needs the %s program: %s"
                       % (program, err.strerror), "install iptables or use the nftables backend")
    output = proc.stdout.decode("utf-8", "replace")
    if check and proc.returncode != 0:
        raise CNIError(ERR_INTERNAL, "%s -t %s %s failed: %s"
                       % (program, table, " ".join(args), output.strip()))
    return proc.returncode, output


def iptables_ensure_chain(family, chain, table="nat"):
    """Create `chain` unless it exists (portmap's and firewall's iptables forms)."""
    if run_iptables(family, ["-S", chain], check=False, table=table)[0] != 0:
        run_iptables(family, ["-N", chain], check=False, table=table)


def iptables_ensure_rule(family, chain, rule, first=False, table="nat"):
    """Add the rule (its arguments after the chain) unless `iptables -C` finds it; `first` puts
    it at the head of the chain."""
    if run_iptables(family, ["-C", chain] + rule, check=False, table=table)[0] != 0:
        run_iptables(family, (["-I", chain, "1"] if first else ["-A", chain]) + rule, table=table)


def iptables_masquerade_rules(chain, prefix, exclusions):
    """The reference's iptables rules of one container address, in order, as (chain, rule): the
    attachment's `chain` holds `-d <subnet> -j ACCEPT` and `! -d <multicast> -j MASQUERADE`,
    POSTROUTING jumps to it; with ipMasqExclude (`exclusions` not None), `-d <cidr> -j ACCEPT` for
    each excluded CIDR of the address's family and `-m addrtype --dst-type LOCAL -j ACCEPT` come
    before the MASQUERADE (the chain's own rules: its teardown removes them with it)."""
    family = prefix.family
    accepts = [["-d", str(prefix), "-j", "ACCEPT"]]
    if exclusions is not None:
        accepts.extend(["-d", excluded.network_text(), "-j", "ACCEPT"]
                       for excluded in exclusions if excluded.family == family)
        accepts.append(["-m", "addrtype", "--dst-type", "LOCAL", "-j", "ACCEPT"])
    return ([(chain, rule) for rule in accepts]
            + [(chain, ["!", "-d", MULTICAST[family].network_text(), "-j", "MASQUERADE"]),
               ("POSTROUTING", ["-s", ip_to_text(family, prefix.ip), "-j", chain])])


def iptables_setup_masquerade(network, container_id, prefix, exclusions=None):
    """The iptables rules of one container address (each added once).  The chain's rules are
    inserted at their place, so a rule missing from an existing chain lands before the
    MASQUERADE it must precede; on an empty chain that is the reference's order."""
    family = prefix.family
    chain = iptables_chain(network, container_id)
    comment = ["-m", "comment", "--comment", iptables_comment(network, container_id)]
    if run_iptables(family, ["-S", chain], check=False)[0] != 0:
        run_iptables(family, ["-N", chain])
    position = 0
    for target_chain, rule in iptables_masquerade_rules(chain, prefix, exclusions):
        if target_chain == chain:
            position += 1
            if run_iptables(family, ["-C", chain] + rule + comment, check=False)[0] != 0:
                run_iptables(family, ["-I", chain, str(position)] + rule + comment)
        elif run_iptables(family, ["-C", target_chain] + rule + comment, check=False)[0] != 0:
            run_iptables(family, ["-A", target_chain] + rule + comment)


def split_iptables_rule(line):
    """The arguments of one `iptables -S` line: words split on spaces, except inside double
    quotes, where a backslash escapes the next character (libxtables' quoting of comments)."""
    words = []
    word = None
    quoted = escaped = False
    for c in line:
        if escaped:
            word += c
            escaped = False
        elif quoted and c == "\\":
            escaped = True
        elif c == '"':
            quoted = not quoted
            word = word or ""
        elif c == " " and not quoted:
            if word is not None:
                words.append(word)
            word = None
        else:
            word = (word or "") + c
    if word is not None:
        words.append(word)
    return words


def iptables_teardown(network, container_id):
    """Remove the POSTROUTING jumps to the attachment's chain, then the chain (no address needed),
    when every rule in the chain carries the attachment's comment (the chain's name may be
    another attachment's: see owns_iptables_chain)."""
    chain = iptables_chain(network, container_id)
    comment = iptables_comment(network, container_id)
    for family in (4, 6):
        status, own_rules = run_iptables(family, ["-S", chain], check=False)
        if status != 0:
            continue
        comments = [words[words.index("--comment") + 1] if "--comment" in words[:-1] else None
                    for words in (split_iptables_rule(line) for line in own_rules.splitlines())
                    if words[:1] == ["-A"]]
        if any(c != comment for c in comments):
            continue
        status, rules = run_iptables(family, ["-S", "POSTROUTING"], check=False)
        for line in rules.splitlines() if status == 0 else ():
            if line.startswith("-A POSTROUTING ") and line.endswith(" -j " + chain):
                run_iptables(family, ["-D"] + split_iptables_rule(line)[1:], check=False)
        run_iptables(family, ["-F", chain], check=False)
        run_iptables(family, ["-X", chain], check=False)


def iptables_collect_stale(network, valid):
    """GC: remove the iptables-backend chains, and the POSTROUTING jumps to them, of this network's
    containers that have no valid attachment (a chain serves all interfaces of a container, as the
    reference's).  A rule is attributed by its comment only when the chain it names is the one
    that comment's container gets.  Returns the errors met."""
    valid_ids = set(cid for cid, _ifname in valid)
    prefix = iptables_comment(network, "")[:-1]          # name: "<network>" id: "
    errors = []
    for family in (4, 6):
        try:
            status, listing = run_iptables(family, ["-S"], check=False)
        except CNIError as err:
            return [err.msg]
        if status != 0:
            errors.append(listing.strip())
            continue
        stale = []
        for line in listing.splitlines():
            words = split_iptables_rule(line)
            if len(words) < 4 or words[0] != "-A" or "--comment" not in words[:-1]:
                continue
            comment = words[words.index("--comment") + 1]
            container_id = comment[len(prefix):-1]
            if not comment.startswith(prefix) or container_id in valid_ids:
                continue
            chain = iptables_chain(network, container_id)
            if words[1] == "POSTROUTING" and words[-2:] == ["-j", chain]:
                status, output = run_iptables(family, ["-D"] + words[1:], check=False)
                if status != 0:
                    errors.append(output.strip())
            if words[1] == chain and chain not in stale:
                stale.append(chain)
        for chain in stale:
            for action in ("-F", "-X"):
                status, output = run_iptables(family, [action, chain], check=False)
                if status != 0:
                    errors.append(output.strip())
    return errors


def iptables_check_rules(network, container_id, prefix, exclusions):
    """CHECK of the iptables backend with ipMasqExclude: every rule ADD writes for the address
    is there (iptables -C)."""
    chain = iptables_chain(network, container_id)
    comment = ["-m", "comment", "--comment", iptables_comment(network, container_id)]
    for target_chain, rule in iptables_masquerade_rules(chain, prefix, exclusions):
        status, output = run_iptables(prefix.family, ["-C", target_chain] + rule + comment,
                                      check=False)
        if status != 0:
            raise CNIError(ERR_INTERNAL, "masquerade rule of %s is missing: -A %s %s"
                           % (container_id, target_chain, " ".join(rule)),
                           output.strip())


def iptables_check(network, container_id):
    """The attachment's chain exists and holds rules (an empty one masquerades nothing)."""
    chain = iptables_chain(network, container_id)
    status, rules = run_iptables(4, ["-S", chain], check=False)
    if status != 0 or not any(line.startswith("-A ") for line in rules.splitlines()):
        raise CNIError(ERR_INTERNAL, "masquerade chain %s of %s is missing or empty"
                       % (chain, container_id))


# --- ADD ----------------------------------------------------------------------------------------

NO_VLAN_FILTERING = ("this kernel's bridge lacks VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING): "
                     "remove vlan and vlanTrunk from the config, or use a kernel that has it")


def ensure_bridge(nl, conf):
    """Create the bridge or reuse it (EEXIST is success: concurrent first ADDs race here)."""
    try:
        created = create_bridge(nl, conf.bridge, conf.mtu, conf.vlan_filtering)
    except NetlinkError as err:
        if conf.vlan_filtering and err.errno == errno.EOPNOTSUPP:
            raise CNIError(ERR_INTERNAL, err.msg, NO_VLAN_FILTERING)
        raise
    bridge = get_link(nl, conf.bridge)
    if bridge is None or bridge.kind != "bridge":
        raise CNIError(ERR_INVALID_CONFIG, "%r already exists but is not a bridge" % conf.bridge,
                       "choose another `bridge` name or remove the %s link"
                       % (bridge.kind if bridge else "other"))
    # A new bridge's MAC would follow its lowest port; pinning it keeps neighbours' ARP caches
    # valid.
    changes = {"up": True, "mac": bridge.mac if created else None,
               "promisc": True if conf.promisc else None}
    if created or not bridge.up:
        # Once, not at every ADD (a /proc/sys lookup grows with the containers): before the bridge
        # first goes up, so a first ADD killed in between leaves it down and the next one redoes it.
        write_sysctl("net/ipv6/conf/%s/accept_ra" % conf.bridge, "0")
    if created or not bridge.up or (conf.promisc and not bridge.flags & IFF_PROMISC):
        set_link(nl, bridge.index, "failed to set up bridge %s" % conf.bridge, **changes)
    return bridge


def random_veth_name():
    """A host veth name as the reference makes them: veth + 8 hex digits."""
    return HOST_VETH_PREFIX + posix.urandom(4).hex()


IFALIAS_MAX = 254          # bytes of an alias every kernel accepts (IFALIASZ - 2)


def attachment_alias(network, container_id, ifname):
    """The host veth's alias, which maps a port back to its attachment (GC, DEL without netns).

    `cni:<network>:<containerID>:<ifname>` when it fits; otherwise `cni#<h(network)>:<h(all)>`
    (SHA-512 digests).  Either way the whole alias is compared, never cut or parsed: a cut alias
    could name another attachment.  Names hold no ":", so the readable form is unambiguous.
    """
    alias = "cni:%s:%s:%s" % (network, container_id, ifname)
    if len(alias.encode("utf-8", "surrogateescape")) <= IFALIAS_MAX:
        return alias
    return "cni#%s:%s" % (sha512_hex(network)[:16], sha512_hex(alias)[:64])


def alias_network_prefixes(network):
    """The prefixes of the aliases `attachment_alias` gives the ports of `network`."""
    return ("cni:%s:" % network, "cni#%s:" % sha512_hex(network)[:16])


HOST_VETH_NAME_TRIES = 4    # names derived from the alias before a random one is taken


def host_veth_names(alias):
    """The names an attachment's host veth takes, in this order: `veth` + 8 hex digits of a
    digest of its alias (then of `alias#1`, ...: another attachment or a leftover may hold one),
    so that its port is found by name in one request instead of by listing every port."""
    return [HOST_VETH_PREFIX + sha512_hex(alias if k == 0 else "%s#%d" % (alias, k))[:8]
            for k in range(HOST_VETH_NAME_TRIES)]


def find_host_veth(nl, network, container_id, ifname, master=0, listing=True):
    """The host veth whose alias names this attachment (a port of `master` when given), or None.

    Its derived names are looked up first; only with `listing` are the links listed when none
    of them is it: a veth made with a random name (every derived one was taken, or an older
    release made it) is found only that way, at a cost that grows with the node's links."""
    alias = attachment_alias(network, container_id, ifname)
    for name in host_veth_names(alias):
        link = get_link(nl, name)
        if link is None:
            break               # names are taken in order: the later ones are free too
        if link.alias == alias and link.kind == "veth" and (not master or link.master == master):
            return link
    if not listing:
        return None
    for link in list_links(nl, master, alias):
        if link.kind == "veth":
            return link
    return None


def is_pair(container, host):
    """Whether two links (one seen in the container, one on the node) are the two ends of a veth."""
    return (container is not None and host is not None and container.kind == host.kind == "veth"
            and container.peer_index == host.index and host.peer_index == container.index)


def existing_attachment(host_nl, container_nl, conf, request):
    """The attachment's host veth and container interface when an earlier ADD left them intact in
    this namespace (that ADD's result is given back), else (None, None).  Refused before anything
    changes: the same container ID and interface alive in another namespace (a reused ID would
    get a second copy of the address on the bridge)."""
    bridge = get_link(host_nl, conf.bridge)
    if bridge is None:
        return None, None
    container = get_link(container_nl, request.ifname)
    # Listing the bridge's ports costs a millisecond per 50 of them: done only when the
    # container already has CNI_IFNAME (a repeated ADD of a veth with a random name).
    host = find_host_veth(host_nl, conf.network, request.container_id, request.ifname,
                          bridge.index, listing=container is not None)
    if host is None:
        return None, None
    if not is_pair(container, host):
        raise CNIError(ERR_INVALID_CONFIG, "container %s already has %s attached to network %s in "
                       "another namespace" % (request.container_id[:100], request.ifname,
                                              conf.network),
                       "host veth %s; DEL that attachment first (CNI_CONTAINERID reused?)"
                       % host.name)
    return host, container


def create_container_veth(container_nl, host_nl, request, conf):
    """The veth pair: CNI_IFNAME in the container, `veth` + 8 hex on the node (a name derived
    from the attachment, else a random one).  Returns both links."""
    alias = attachment_alias(conf.network, request.container_id, request.ifname)
    names = host_veth_names(alias) + [random_veth_name() for _ in range(6)]
    for host_name in names:
        try:
            create_veth(container_nl, request.ifname, host_name, original_netns_fd(), conf.mtu,
                        conf.mac)
            break
        except NetlinkError as err:
            if err.errno != errno.EEXIST:
                raise
            if get_link(container_nl, request.ifname) is not None:
                raise CNIError(ERR_INVALID_CONFIG, "container veth name %r already exists"
                               % request.ifname, "the container %s already has an interface of "
                               "that name" % request.container_id)
            if get_link(host_nl, host_name) is None:
                raise
    else:
        raise CNIError(ERR_TRY_AGAIN, "failed to find a free host veth name after %d attempts"
                       % len(names))
    container = get_link(container_nl, request.ifname)
    host = get_link(host_nl, host_name)
    if container is None or host is None:
        raise CNIError(ERR_INTERNAL,
                       "veth pair %s/%s vanished after creation" % (request.ifname, host_name))
    return container, host


def attach_host_veth(nl, conf, host, bridge, alias):
    """Enslave the host veth, set its port flags and bring it up (one transaction), then its
    VLANs.

    The port gets no IPv6 address (where the reference sets accept_ra=0 on it): the bridge takes
    every frame it receives, so its own IPv6 stack has nothing to do; without an address it sends
    no duplicate address detection or MLD report into the container and adds no fe80::/64 route
    per port to the node's table.
    """
    without_ipv6_addresses(nl, host)
    nl.transact([link_change(host.index, up=True, master=bridge.index,
                             extra=((LinkAttr.IFLA_IFALIAS, alias),)),
                 bridge_port_change(host.index, conf.hairpin, conf.port_isolation)],
                "failed to connect %r to bridge %s" % (host.name, conf.bridge))
    set_port_vlans(nl, host,
                   *port_vlan_plan(conf.vlan, conf.vlan_trunk, conf.preserve_default_vlan))


def port_vlan_plan(vlan, trunk, preserve_default_vlan):
    """The VLANs {vid: flags} a bridge port gets, and whether it loses every other one.

    As the reference: the access VLAN untagged and as PVID, the trunk's VLANs tagged (a trunk id
    equal to the access VLAN makes it tagged), VLAN 1 as the trunk's native VLAN when there is no
    access VLAN; the port's existing entries (the bridge's default PVID) go unless
    preserveDefaultVlan.
    """
    untagged = BRIDGE_VLAN_INFO_PVID | BRIDGE_VLAN_INFO_UNTAGGED
    wanted = {}
    if vlan:
        wanted[vlan] = untagged
    for vid in trunk or ():
        wanted[vid] = 0
    if not vlan and trunk:
        wanted[1] = untagged
    return wanted, bool(wanted) and not preserve_default_vlan


def set_port_vlans(nl, port, wanted, exclusive):
    """Give bridge port `port` the VLANs `wanted`; `exclusive` removes the others it has."""
    if not wanted:
        return
    current = port_vlans(nl, port.index) if exclusive else {}
    try:
        nl.transact(vlan_changes(port.index, current, wanted),
                    "failed to set the VLANs of %s" % port.name)
    except NetlinkError as err:
        if err.errno in (errno.EOPNOTSUPP, errno.EINVAL):           # the bridge does not filter
            raise CNIError(ERR_INTERNAL, err.msg, NO_VLAN_FILTERING)
        raise


def ensure_vlan_gateway(nl, conf, bridge):
    """The `<bridge>.<vlan>` interface that holds a VLAN network's gateway addresses, as the
    reference makes it: one end of a veth pair on the node whose other end is a bridge port with
    the VLAN untagged and as PVID.  Shared by the network's containers and never deleted.

    Concurrent first ADDs race to create it (EEXIST is success), and a pair left half set up by a
    killed ADD is completed here.
    """
    name = conf.vlan_gateway
    gateway = get_link(nl, name)
    if gateway is None:
        unless_exists(create_veth, nl, name, random_veth_name(), mtu=bridge.mtu)
        gateway = get_link(nl, name)
        if gateway is None:
            raise CNIError(ERR_TRY_AGAIN, "failed to create the VLAN gateway %s" % name,
                           "its peer's random name was taken")
    port = get_link(nl, index=gateway.peer_index) if gateway.kind == "veth" else None
    if port is None:
        raise CNIError(ERR_INVALID_CONFIG, "%r already exists but is not a veth pair" % name,
                       "the VLAN gateway of bridge %s: remove the %s link"
                       % (conf.bridge, gateway.kind or "other"))
    if port.master != bridge.index or not port.up:
        nl.transact([link_change(port.index, up=True, master=bridge.index),
                     bridge_port_change(port.index, False, False)],
                    "failed to connect %r to bridge %s" % (port.name, conf.bridge))
    untagged = BRIDGE_VLAN_INFO_PVID | BRIDGE_VLAN_INFO_UNTAGGED
    if port_vlans(nl, port.index).get(conf.vlan, 0) & untagged != untagged:
        # Also after an ADD killed between enslaving the port and giving it the VLAN.
        set_port_vlans(nl, port, *port_vlan_plan(conf.vlan, None, conf.preserve_default_vlan))
    if not gateway.up:
        set_link(nl, gateway.index, "failed to set %s up" % name, up=True)
    return gateway


def complete_gateways(conf, result):
    """Give every IP the container's interface and, for a gateway bridge, a gateway; add default
    routes.

    Returns the gateway prefixes to put on the bridge, per family.
    """
    bridge_addresses = {4: [], 6: []}
    routes = result.setdefault("routes", [])
    default_route_families = set(
        address_family_of(r["dst"]) for r in routes if r["dst"] in ("0.0.0.0/0", "::/0"))
    for ip in result["ips"]:
        ip["interface"] = RESULT_CONTAINER
        prefix = Prefix.parse(ip["address"])
        if not ip.get("gateway") and conf.is_gateway:
            ip["gateway"] = ip_to_text(prefix.family, prefix.network + 1)
        if not ip.get("gateway") or not conf.is_gateway:
            continue
        gateway = Prefix(prefix.family, parse_ip(ip["gateway"])[1], prefix.length)
        if gateway not in bridge_addresses[prefix.family]:
            bridge_addresses[prefix.family].append(gateway)
        if conf.is_default_gateway and prefix.family not in default_route_families:
            routes.append({"dst": "0.0.0.0/0" if prefix.family == 4 else "::/0",
                           "gw": ip["gateway"]})
            default_route_families.add(prefix.family)
    return bridge_addresses


def configure_container(ns, nl, conf, request, container, result):
    """Sysctls, addresses, link state and routes inside the container."""
    prefixes = [Prefix.parse(ip["address"]) for ip in result["ips"]]
    has_ipv6 = any(p.family == 6 for p in prefixes)
    # IPv6 settings as (link, DEVCONF_* index, file, wanted, required): a file is opened only
    # where netlink shows another value (a link without IPv6 shows none: then only a required
    # one is tried, to fail clearly).
    settings = []
    if conf.enable_dad:
        settings.append((container, DEVCONF_ENHANCED_DAD, "enhanced_dad", 1, False))
    settings.append((container, DEVCONF_ACCEPT_DAD, "accept_dad", int(conf.enable_dad), False))
    if has_ipv6:
        settings.extend([(get_link(nl, "lo"), DEVCONF_DISABLE_IPV6, "disable_ipv6", 0, True),
                         (container, DEVCONF_DISABLE_IPV6, "disable_ipv6", 0, True),
                         # Best effort, as every sysctl the reference does not need (/proc/sys
                         # may be read-only).
                         (container, DEVCONF_KEEP_ADDR_ON_DOWN, "keep_addr_on_down", 1, False)])
    changes = []
    for link, index, name, wanted, required in settings:
        current = link.ipv6_setting(index) if link else None
        if current != wanted and (current is not None or required):
            changes.append(("net/ipv6/conf/%s/%s" % (link.name if link else "lo", name),
                            str(wanted), required))
    if changes:
        with ns.entered():
            for key, value, required in changes:
                set_sysctl(key, value, required)
    # arp_notify over netlink, in a request before the one bringing the link up, as the
    # reference writes it before.
    requests = [arp_notify_change(container.index)]
    requests.extend(addr_request(container.index, p, nodad=not conf.enable_dad) for p in prefixes)
    requests.append(link_change(container.index, up=True))
    nl.transact(requests, "failed to configure %s in the container" % request.ifname)
    if has_ipv6 and conf.enable_dad:
        wait_ipv6_settled(nl, container.index)
    gateways = {}
    for ip in result["ips"]:
        if ip.get("gateway"):
            gateways.setdefault(address_family_of(ip["address"]), parse_ip(ip["gateway"]))
    route_requests = []
    for route in result.get("routes") or []:
        dst = Prefix.parse(route["dst"])
        gw = parse_ip(route["gw"]) if route.get("gw") else gateways.get(dst.family)
        route_requests.append(route_request(dst, gw, container.index, route.get("priority", 0),
                                            route.get("table", 0), route.get("scope"),
                                            route.get("mtu", 0), route.get("advmss", 0)))
    if route_requests:
        nl.transact(route_requests, "failed to add routes in the container")


def wait_ipv6_settled(nl, index):
    """Wait (bounded) until no IPv6 address of the link is tentative."""
    def settled():
        addrs = list_addrs(nl, index, 6)
        if any(a.flags & IFA_F_DADFAILED for a in addrs):
            raise CNIError(ERR_INTERNAL, "IPv6 duplicate address detection failed",
                           ", ".join(str(a.prefix) for a in addrs if a.flags & IFA_F_DADFAILED))
        return None if any(a.flags & IFA_F_TENTATIVE for a in addrs) else True

    def timed_out():
        return CNIError(ERR_TRY_AGAIN, "IPv6 addresses still tentative after %g s"
                        % IPV6_SETTLE_TIMEOUT)
    poll_until(settled, IPV6_SETTLE_TIMEOUT, timed_out, delay=0.05, max_delay=0.05)


def ensure_gateway_address(nl, conf, link, gateway):
    """Put a gateway address on the bridge (or VLAN gateway), tolerating it being there
    (concurrent ADDs)."""
    for addr in list_addrs(nl, link.index, gateway.family):
        if addr.prefix == gateway:
            return
        if addr.scope == RT_SCOPE_LINK:
            continue
        theirs = addr.prefix
        conflict = (gateway.family == 4 or theirs.contains(6, gateway.ip)
                    or gateway.contains(6, theirs.ip))
        if not conflict:
            continue
        if not conf.force_address:
            raise CNIError(ERR_INVALID_CONFIG, "%r already has an IP address different from %s"
                           % (link.name, gateway), "it holds %s; set forceAddress to replace it"
                           % theirs)
        nl.transact([addr_request(link.index, theirs, remove=True)],
                    "failed to remove %s from %s" % (theirs, link.name))
    unless_exists(nl.transact, [addr_request(link.index, gateway)],
                  "failed to add %s to %s" % (gateway, link.name))


def wait_port_up(nl, host):
    """Wait (bounded) for the host veth to report carrier, as the reference does."""
    def port():
        link = get_link(nl, index=host.index)
        if link is None:
            raise CNIError(ERR_INTERNAL, "host veth %s disappeared" % host.name)
        return link

    def timed_out():
        state = port().operstate
        return CNIError(ERR_TRY_AGAIN, "bridge port in error state: %s"
                        % OPERSTATE_NAMES.get(state, state))
    def carrier():
        link = port()
        return link if link.operstate == IF_OPER_UP else None
    return poll_until(carrier, PORT_UP_TIMEOUT, timed_out, delay=0.002)


def check_add_before_making(request, conf, host_nl, container_nl):
    """Refuse, before the bridge or anything else is made, what the ADD would fail on later
    because of the config or the request: the in-process IPAM's config and state directory, an
    IPAM type absent from CNI_PATH, a CNI_IFNAME the container has, a `<bridge>.<vlan>` that is
    not a veth."""
    if conf.ipam_type == "host-local":
        host_local_check_add(request)
    elif conf.ipam_type:
        find_plugin(conf.ipam_type, request.path)
    if get_link(container_nl, request.ifname) is not None:
        raise CNIError(ERR_INVALID_CONFIG, "container veth name %r already exists" % request.ifname,
                       "the container %s already has an interface of that name"
                       % request.container_id)
    if conf.uses_vlan_gateway:
        gateway = get_link(host_nl, conf.vlan_gateway)
        if gateway is not None and gateway.kind != "veth":
            raise CNIError(ERR_INVALID_CONFIG, "%r already exists but is not a veth pair"
                           % conf.vlan_gateway, "the VLAN gateway of bridge %s: remove the %s link"
                           % (conf.bridge, gateway.kind or "other"))


def bridge_add(request):
    """ADD: the bridge, a veth pair into the container, the IPAM's addresses, the gateway on the
    bridge, masquerade and spoof check; on any failure everything made is undone (rollback_add)."""
    conf = BridgeConfig(request)
    if not conf.ipam_type and is_legacy_version(request.version):
        # Refused before anything is made: the result could not be printed afterwards.
        raise CNIError(ERR_INCOMPATIBLE_VERSION, "cannot convert: no valid IP addresses",
                       "an L2 bridge (no ipam) has no result in cniVersion %s" % request.version)
    host_nl = NetlinkSocket()
    ns = container_netns(request)
    container_nl = ns.netlink()
    host, container = existing_attachment(host_nl, container_nl, conf, request)
    if host is not None:
        return repeated_add(request, conf, host_nl, container_nl, host, container)
    check_add_before_making(request, conf, host_nl, container_nl)
    bridge = ensure_bridge(host_nl, conf)
    container, host = create_container_veth(container_nl, host_nl, request, conf)
    ipam_done = False
    vlan_gateway = None
    try:
        attach_host_veth(host_nl, conf, host, bridge,
                         attachment_alias(conf.network, request.container_id, request.ifname))
        result = {"interfaces": [], "ips": [], "routes": [], "dns": {}}
        if conf.ipam_type:
            ipam_result, reused = ipam_add(request, conf.ipam_type)
            ipam_done = True
            result.update((k, ipam_result.get(k) or result[k]) for k in ("ips", "routes", "dns"))
            if not result["ips"]:
                raise CNIError(ERR_INTERNAL, "IPAM plugin returned missing IP config")
            gateways = complete_gateways(conf, result)
            configure_container(ns, container_nl, conf, request, container, result)
            if conf.uses_vlan_gateway and (gateways[4] or gateways[6]):
                vlan_gateway = ensure_vlan_gateway(host_nl, conf, bridge)
            for family in (4, 6):
                for gateway in gateways[family]:
                    ensure_gateway_address(host_nl, conf, vlan_gateway or bridge, gateway)
                if gateways[family]:
                    set_link(host_nl, bridge.index, "failed to pin the MAC of %s" % conf.bridge,
                             mac=get_link(host_nl, index=bridge.index).mac)
                    if not forwarding_on(host_nl, family):
                        write_sysctl("net/ipv4/ip_forward" if family == 4 else
                                     "net/ipv6/conf/all/forwarding", "1", required=True)
            if conf.ip_masq:
                # Rules of an earlier ADD of this attachment can only exist if it held its address.
                setup_masquerade(conf, request, result, replace_earlier=reused)
        elif not conf.disable_container_interface:
            set_link(container_nl, container.index, "failed to set %s up" % request.ifname, up=True)
        if conf.macspoofchk:
            setup_macspoofchk(conf, request, host.name, container.mac)
        if not conf.disable_container_interface:
            host = wait_port_up(host_nl, host)
        bridge = get_link(host_nl, index=bridge.index)
    except BaseException:
        rollback_add(request, conf, container_nl, container, ipam_done)
        raise
    return finish_result(conf, request, result, bridge, host, container, vlan_gateway)


def finish_result(conf, request, result, bridge, host, container, vlan_gateway):
    """The ADD result: the IPAM's addresses and routes with the interfaces as the kernel holds
    them, and the config's DNS."""
    # In the order RESULT_BRIDGE, RESULT_HOST_VETH, RESULT_CONTAINER name.
    result["interfaces"] = [{"name": bridge.name, "mac": bridge.mac},
                            {"name": host.name, "mac": host.mac},
                            {"name": container.name, "mac": container.mac,
                             "sandbox": request.netns}]
    if vlan_gateway is not None:
        result["interfaces"].append({"name": vlan_gateway.name, "mac": vlan_gateway.mac})
    if conf.dns:
        result["dns"] = conf.dns
    return result


def repeated_add(request, conf, host_nl, container_nl, host, container):
    """ADD of an attachment an earlier ADD left intact in this namespace: its result again (the
    IPAM gives the same addresses back), its rules made again.  Nothing is undone on failure:
    the attachment stays as it was."""
    result = {"interfaces": [], "ips": [], "routes": [], "dns": {}}
    if conf.ipam_type:
        ipam_result = ipam_call(request, conf.ipam_type, "ADD")
        result.update((k, ipam_result.get(k) or result[k]) for k in ("ips", "routes", "dns"))
        present = set(a.prefix for a in list_addrs(container_nl, container.index))
        missing = [ip["address"] for ip in result["ips"]
                   if Prefix.parse(ip["address"]) not in present]
        if missing or not result["ips"]:
            if not ipam_result.get("reused", True):
                ipam_call(request, conf.ipam_type, "DEL")      # a new reservation: not the old one
            raise CNIError(ERR_INVALID_CONFIG,
                           "container veth name %r already exists" % request.ifname,
                           "it is attached but lacks %s: DEL the attachment first"
                           % (" ".join(missing) or "its addresses"))
        complete_gateways(conf, result)
    try:
        check_attachment_rules(conf, request, result)
    except CNIError:                    # made again only when some are missing
        if conf.ip_masq and result["ips"]:
            setup_masquerade(conf, request, result, True)
        if conf.macspoofchk:
            setup_macspoofchk(conf, request, host.name, container.mac)
    vlan_gateway = get_link(host_nl, conf.vlan_gateway) if conf.uses_vlan_gateway else None
    bridge = get_link(host_nl, index=host.master)
    return finish_result(conf, request, result, bridge, host, container, vlan_gateway)


def rollback_add(request, conf, container_nl, container, ipam_done):
    """Undo a failed ADD so nothing is left even if the runtime never calls DEL."""
    try:
        delete_link(container_nl, container.index)
    except CNIError as err:
        sys.stderr.write("rollback: %s\n" % err.msg)
    if ipam_done:
        try:
            ipam_call(request, conf.ipam_type, "DEL")
        except CNIError as err:
            sys.stderr.write("rollback: IPAM DEL failed: %s\n" % err.msg)
    try:
        teardown_attachment_rules(conf.network, request.container_id, request.ifname,
                                  conf.ip_masq_backend)
    except CNIError as err:          # the error to report is the one that made the ADD fail
        sys.stderr.write("rollback: %s\n" % err.msg)


# --- DEL, CHECK, STATUS, GC ----------------------------------------------------------------------

def bridge_del(request):
    """Best effort and idempotent: the netns, the link, the config's IPAM ranges or prevResult
    may all be gone, and the reservation and rules are still released."""
    try:
        conf = BridgeConfig(request)
        ipam_type, backend = conf.ipam_type, conf.ip_masq_backend
    except CNIError as err:
        sys.stderr.write("DEL: the config does not validate (%s); cleaning up with what it says\n"
                         % err.msg)
        ipam = conf_lookup(request.config, "ipam")
        ipam_type = conf_lookup(ipam, "type") if isinstance(ipam, dict) else ""
        ipam_type = ipam_type if isinstance(ipam_type, str) else ""
        backend = conf_lookup(request.config, "ipMasqBackend")
    network = request.network
    ns = None
    if request.netns:
        try:
            ns = container_netns(request)       # opened before anything changes, used throughout
        except NetnsGone:
            pass
        except NetnsIsOwn:
            # A stale /proc/<pid>/ns/net now the node's: nothing inside it is ours to touch,
            # while the reservation, the rules and the host veth are still to be released.
            sys.stderr.write("DEL: CNI_NETNS %s is the node's own namespace; releasing what lies "
                             "outside it\n" % request.netns)
    host_nl = NetlinkSocket()
    container_nl = container = None
    if ns is not None:
        container_nl = ns.netlink()
        container = get_link(container_nl, request.ifname)
        host = None
        if container is not None and container.kind == "veth":
            host = get_link(host_nl, index=container.peer_index)
        alias = attachment_alias(network, request.container_id, request.ifname)
        mine = host is not None and host.alias == alias
        if not mine:
            elsewhere = find_host_veth(host_nl, network, request.container_id, request.ifname)
            if elsewhere is not None:
                # The same container ID and interface live in another namespace (a refused ADD
                # of a reused ID is being cleaned up): their reservation and rules are not ours.
                sys.stderr.write("DEL: %s of %s is attached in another namespace (host veth %s); "
                                 "nothing here to release\n"
                                 % (request.ifname, request.container_id[:100], elsewhere.name))
                return None
    # Rules first: their removal frees memory after an RCU grace period, which then passes
    # while the veth is deleted instead of at exit.
    teardown_attachment_rules(network, request.container_id, request.ifname, backend)
    if container is not None:
        delete_link(container_nl, container.index,
                    "failed to delete %s in the container" % request.ifname)
    elif ns is None:
        # Without the namespace the pair is reached from its host end (deleting it deletes both).
        host = find_host_veth(host_nl, network, request.container_id, request.ifname)
        if host is not None:
            delete_link(host_nl, host.index, "failed to delete the host veth %s" % host.name)
    if ipam_type:
        ipam_call(request, ipam_type, "DEL")
    return None


def bridge_check(request):
    """CHECK: the bridge, the veth pair, the port's flags and VLANs, the container's addresses
    and routes, and the attachment's rules are as the config and prevResult say."""
    conf = BridgeConfig(request)
    ns = container_netns(request)
    if conf.ipam_type:
        ipam_call(request, conf.ipam_type, "CHECK")
    previous = required_previous_result(request)
    host_nl = NetlinkSocket()
    container_nl = ns.netlink()
    bridge = get_link(host_nl, conf.bridge)
    if bridge is None or bridge.kind != "bridge":
        raise CNIError(ERR_INTERNAL, "bridge %s not found or not a bridge" % conf.bridge)
    if bool(bridge.flags & IFF_PROMISC) != conf.promisc:
        raise CNIError(ERR_INTERNAL, "bridge %s is %s, while the config's promiscMode is %s"
                       % (conf.bridge, "promiscuous" if bridge.flags & IFF_PROMISC
                          else "not promiscuous", "true" if conf.promisc else "false"))
    if conf.mtu and bridge.mtu != conf.mtu:
        raise CNIError(ERR_INTERNAL, "MTU of bridge %s is %d, the config says %d"
                       % (conf.bridge, bridge.mtu, conf.mtu))
    container = get_link(container_nl, request.ifname)
    if container is None or container.kind != "veth":
        raise CNIError(ERR_INTERNAL,
                       "container interface %s not found or not a veth" % request.ifname)
    entries = previous.get("interfaces") or []
    for entry in entries:
        if entry.get("name") == conf.bridge and entry.get("mac") and entry["mac"] != bridge.mac:
            raise CNIError(ERR_INTERNAL, "bridge %s MAC %s does not match prevResult %s"
                           % (conf.bridge, bridge.mac, entry["mac"]))
        if entry.get("name") == request.ifname and entry.get("sandbox"):
            if entry["sandbox"] != request.netns:
                raise CNIError(ERR_INTERNAL,
                               "Sandbox in prevResult %s doesn't match configured netns: %s"
                               % (entry["sandbox"], request.netns))
            if entry.get("mac") and entry["mac"] != container.mac:
                raise CNIError(ERR_INTERNAL, "interface %s MAC %s does not match prevResult %s"
                               % (request.ifname, container.mac, entry["mac"]))
    host = get_link(host_nl, index=container.peer_index)
    if host is None or host.master != bridge.index:
        raise CNIError(ERR_INTERNAL,
                       "the peer of %s is not a port of bridge %s" % (request.ifname, conf.bridge))
    check_port(conf, host, container)
    if conf.vlan_filtering:
        check_port_vlans(host_nl, host,
                         *port_vlan_plan(conf.vlan, conf.vlan_trunk, conf.preserve_default_vlan))
    check_container_addresses(container_nl, container, previous)
    check_attachment_rules(conf, request, previous)
    return None


def check_port(conf, host, container):
    """CHECK: hairpin, isolation and MTUs of the bridge port and the container interface."""
    expected = {"hairpin mode": (host.port.get(BridgePortAttr.IFLA_BRPORT_MODE), int(conf.hairpin)),
                "port isolation": (host.port.get(BridgePortAttr.IFLA_BRPORT_ISOLATED),
                                   int(conf.port_isolation))}
    if conf.mtu:
        expected["host veth MTU"] = (host.mtu, conf.mtu)
        expected["container MTU"] = (container.mtu, conf.mtu)
    for what, (actual, wanted) in sorted(expected.items()):
        if actual is not None and actual != wanted:
            raise CNIError(ERR_INTERNAL,
                           "%s of %s is %s, the config says %s" % (what, host.name, actual, wanted))


def check_port_vlans(nl, port, wanted, exclusive):
    """The port carries the config's VLANs with the right flags (and, when `exclusive`, no
    other)."""
    actual = port_vlans(nl, port.index)
    for vid, flags in sorted(wanted.items()):
        have = actual.get(vid)
        if have is None or have & (BRIDGE_VLAN_INFO_PVID | BRIDGE_VLAN_INFO_UNTAGGED) != flags:
            raise CNIError(ERR_INTERNAL, "VLAN %d of %s is %s, the config says %s"
                           % (vid, port.name, vlan_text(have), vlan_text(flags)))
    extra = sorted(set(actual) - set(wanted)) if exclusive else []
    if extra:
        raise CNIError(ERR_INTERNAL, "%s carries VLANs %s that the config does not give it"
                       % (port.name, ", ".join(map(str, extra))))


def vlan_text(flags):
    """A port VLAN's flags for messages ("untagged PVID", "tagged", "absent")."""
    if flags is None:
        return "absent"
    return " ".join(["untagged" if flags & BRIDGE_VLAN_INFO_UNTAGGED else "tagged"]
                    + (["PVID"] if flags & BRIDGE_VLAN_INFO_PVID else []))


def check_container_addresses(nl, container, previous):
    """CHECK: the container holds prevResult's addresses and routes."""
    present = set(a.prefix for a in list_addrs(nl, container.index))
    for ip in previous.get("ips") or []:
        prefix = Prefix.parse(ip["address"])
        if prefix not in present:
            raise CNIError(ERR_INTERNAL,
                           "address %s is missing from %s" % (ip["address"], container.name))
    routes = {}
    for route in previous.get("routes") or []:
        dst = Prefix.parse(route["dst"])
        gw = parse_ip(route["gw"]) if route.get("gw") else None
        if dst.family not in routes:
            routes[dst.family] = [r for r in list_routes(nl,
                                                         dst.family) if r.oif == container.index]
        found = any(r.dst.network == dst.network and r.dst.length == dst.length
                    and (gw is None or r.gateway == gw) for r in routes[dst.family])
        if not found:
            raise CNIError(ERR_INTERNAL, "route to %s%s is missing in the container"
                           % (route["dst"], " via " + route["gw"] if gw else ""))


def bridge_status(request):
    """STATUS: the IPAM's (a bridge keeps no state of its own)."""
    conf = BridgeConfig(request)
    if conf.ipam_type:
        ipam_call(request, conf.ipam_type, "STATUS")
    return None


def bridge_gc(request):
    """Forward GC to the IPAM, then remove rules and host veths of attachments no longer valid."""
    conf = BridgeConfig(request)
    valid = valid_attachments(request.config)
    errors = []
    if conf.ipam_type:
        try:
            ipam_call(request, conf.ipam_type, "GC")
        except CNIError as err:
            errors.append(err.msg)
    if valid is not None:
        nl = NetlinkSocket()
        bridge = get_link(nl, conf.bridge)
        prefixes = alias_network_prefixes(conf.network)
        keep = set(attachment_alias(conf.network, cid, ifname) for cid, ifname in valid)
        for link in list_links(nl, bridge.index) if bridge else ():
            if link.alias.startswith(prefixes) and link.alias not in keep:
                try:
                    delete_link(nl, link.index)
                except CNIError as err:
                    errors.append(err.msg)
        errors.extend(collect_stale_rules(conf.network, valid))
        if conf.ip_masq_backend == "iptables":
            errors.extend(iptables_collect_stale(conf.network, valid))
    if errors:
        raise CNIError(ERR_INTERNAL, "bridge GC could not remove everything", "; ".join(errors))
    return None


# ==============================================================================================
# The portmap plugin
# ==============================================================================================
# Host ports forwarded to a container (runtimeConfig.portMappings), chained after the plugin that
# gave the container its addresses; prevResult passes through unchanged.  The reference's
# nftables layout, written over nf_tables netlink in one transaction per ADD, DEL or GC:
#   table ip|ip6 cni_hostport
#     prerouting  (nat, dstnat)   fib daddr type local jump hostports_all
#     output      (nat, dstnat)   fib daddr type local jump hostports_all
#     hostports_all               jump hostip_hostports; jump hostports
#     hostip_hostports            kept empty (the reference keeps it for upgrades)
#     hostports                   per mapping: <conditions> [ip daddr HOSTIP] tcp dport N
#                                 dnat to CIP:P
#     masquerading (nat, srcnat)  per address, with snat: ct status dnat ip saddr SUBNET|127.0.0.1
#                                 ip daddr CIP masquerade
# The shared chains hold only constants, written when they are not as they should be, so no ADD
# rewrites another network's rules; a network's conditions are part of each of its own mapping
# rules.  Every rule of an attachment carries the comment `net:<network> id:<container> if:<ifname>`
# (a name too long for the comment is replaced by `#` and its hash), and DEL, CHECK and GC find
# rules by that comment alone: no netns, link or prevResult needed, nothing else ever touched.

PORTMAP_TABLE = "cni_hostport"
PORTMAP_TABLE_COMMENT = "CNI portmap plugin"
HOSTPORTS_ALL_CHAIN = "hostports_all"
HOSTIP_HOSTPORTS_CHAIN = "hostip_hostports"
HOSTPORTS_CHAIN = "hostports"
PORTMAP_MASQ_CHAIN = "masquerading"
PORTMAP_ENTRY_CHAINS = (("prerouting", NF_INET_PRE_ROUTING), ("output", NF_INET_LOCAL_OUT))
PORTMAP_RULE_CHAINS = (HOSTPORTS_CHAIN, HOSTIP_HOSTPORTS_CHAIN, PORTMAP_MASQ_CHAIN)
NF_PRIORITY_DSTNAT = -100
PORTMAP_FAMILIES = {4: NFPROTO_IPV4, 6: NFPROTO_IPV6}
DEFAULT_MARK_MASQ_BIT = 13
MAX_CONDITION_RULES = 64                       # rules one mapping may expand into (condition sets)
COMMENT_NETWORK_MAX, COMMENT_ID_MAX = 32, 64   # longer names are hashed: the comment stays < 128
LOCALHOST_V4 = Prefix(4, 0x7F000001, 32)
# The reference's iptables backend (ours runs it on request; DEL also removes its chains where
# iptables is nf_tables-based): its chains in table nat, and the attachment's own chain.
IPT_DNAT_CHAIN = "CNI-HOSTPORT-DNAT"
IPT_SETMARK_CHAIN = "CNI-HOSTPORT-SETMARK"
IPT_MASQ_CHAIN = "CNI-HOSTPORT-MASQ"
IPT_MULTIPORT_MAX = 15


def iptables_dnat_chain(network, container_id):
    """CNI-DN- and the hash of network and container, cut at 28 characters, as the reference."""
    return ("CNI-DN-" + sha512_hex(network + container_id))[:28]


class PortMapping(object):
    """One runtimeConfig.portMappings entry."""

    __slots__ = ("host_port", "container_port", "protocol", "host_family", "host_ip")

    def __init__(self, host_port, container_port, protocol, host_family=None, host_ip=None):
        self.host_port = host_port
        self.container_port = container_port
        self.protocol = protocol
        self.host_family = host_family      # None: both families; else only 4 or 6
        self.host_ip = host_ip              # None: every local address of the family

    def applies_to(self, family):
        """A mapping with a hostIP of the other family is skipped (as the reference does)."""
        return self.host_family is None or self.host_family == family


class PortmapConfig(object):
    """The portmap plugin's keys (reference names, matched case-insensitively):

    runtimeConfig.portMappings  [{hostPort, containerPort, protocol (tcp|udp|sctp), hostIP}]
    snat                        bool, default true: masquerade hairpin and localhost traffic
    masqAll                     bool: masquerade forwarded traffic from every source
    markMasqBit                 0..31, default 13 (iptables backend: the masquerade mark)
    externalSetMarkChain        iptables backend: a chain that marks for masquerade instead
    conditionsV4, conditionsV6  lists of nftables match text (iptables text for that backend)
    backend                     "nftables" (default) or "iptables"; iptables-only keys
                                without a backend choose iptables, as they would upstream
    """

    def __init__(self, request):
        c = request.config
        self.network = request.network
        self.snat = conf_get(c, "snat", bool, True)
        self.masq_all = conf_get(c, "masqAll", bool, False)
        mark_bit = conf_get(c, "markMasqBit", int)
        self.external_set_mark_chain = conf_get(c, "externalSetMarkChain", str)
        if mark_bit is not None and self.external_set_mark_chain is not None:
            raise config_error("cannot specify externalSetMarkChain and markMasqBit")
        self.mark_masq_bit = conf_int(c, "markMasqBit", 0, 31, DEFAULT_MARK_MASQ_BIT)
        raw_conditions = dict((family, conf_get(c, "conditionsV%d" % family, list, []))
                              for family in (4, 6))
        for family, items in raw_conditions.items():
            if not all(isinstance(i, str) for i in items):
                raise config_error("conditionsV%d must be a list of strings" % family)
        self.backend = self._backend(conf_get(c, "backend", str), raw_conditions)
        self.iptables_conditions = raw_conditions if self.backend == "iptables" else {4: [], 6: []}
        nftables = self.backend == "nftables"
        self.conditions = dict((family, parse_conditions(family, items if nftables else []))
                               for family, items in raw_conditions.items())
        self.mappings = parse_port_mappings(
            conf_get(request.runtime_config(), "portMappings", list, []))

    def _backend(self, requested, conditions):
        iptables_only = ["conditionsV%d" % f for f in (4, 6) if is_iptables_syntax(conditions[f])]
        if self.external_set_mark_chain is not None:
            iptables_only.insert(0, "externalSetMarkChain")
        nftables_only = ["conditionsV%d" % f for f in (4, 6)
                         if conditions[f] and not is_iptables_syntax(conditions[f])]
        backend = requested or ("iptables" if iptables_only else "nftables")
        if backend not in ("nftables", "iptables"):
            raise CNIError(ERR_INVALID_CONFIG, "unrecognized backend %r" % backend[:50],
                           'backend is "nftables" (the default) or "iptables"')
        wrong = iptables_only if backend == "nftables" else nftables_only
        if wrong:
            other = "iptables" if backend == "nftables" else "nftables"
            raise config_error("%s backend was requested but configuration contains %s-specific "
                               "options %s" % (backend, other, " ".join(wrong)))
        return backend


def is_iptables_syntax(conditions):
    """iptables conditions begin with an option ("-s") or a negation ("!"); nftables ones never
    do."""
    return bool(conditions) and conditions[0][:1] in ("-", "!")


def parse_port_mappings(items):
    """PortMappings of runtimeConfig.portMappings; a bad entry is a config error naming it."""
    mappings = []
    for i, item in enumerate(items):
        where = "runtimeConfig.portMappings[%d]." % i
        if not isinstance(item, dict):
            raise config_error("%s must be an object" % where[:-1])
        host_port = conf_get(item, "hostPort", int, 0, where)
        container_port = conf_get(item, "containerPort", int, 0, where)
        if not 0 < container_port <= 65535:
            raise CNIError(ERR_INVALID_CONFIG, "Invalid container port number: %d" % container_port)
        if not 0 < host_port <= 65535:
            raise CNIError(ERR_INVALID_CONFIG, "Invalid host port number: %d" % host_port)
        protocol = conf_get(item, "protocol", str, "", where).lower()
        if protocol not in IPPROTO_NUMBERS:
            raise config_error("%sprotocol %r is not tcp, udp or sctp" % (where, protocol[:20]))
        host_ip_text = conf_get(item, "hostIP", str, "", where)
        host_family = host_ip = None
        if host_ip_text:
            try:
                host_family, host_ip = parse_ip(host_ip_text)
            except ValueError:
                raise config_error("%shostIP %r is not an IP address" % (where, host_ip_text[:50]))
            host_ip = host_ip or None      # 0.0.0.0 or ::: every address of that family
        mappings.append(PortMapping(host_port, container_port, protocol, host_family, host_ip))
    return mappings


# --- conditions: the nftables match text of conditionsV4/V6 ------------------------------------
# Accepted: `[meta] iifname|oifname`, `ip saddr|daddr` (`ip6` in conditionsV6), each with an
# optional `==`/`eq` or `!=`/`ne` and a value or an anonymous set `{ a, b }`; names may be quoted
# and end in `*`.  A positive set becomes one rule per element, a negated one a rule that
# excludes every element.  Anything else is refused (code 7) naming the condition.

CONDITION_SUPPORTED = ("supported: [meta] iifname|oifname, ip saddr|daddr (ip6 in conditionsV6), "
                       "each with an optional == or != and a value or { set }")


def condition_tokens(text):
    """Split nft text into words, quoted strings (unquoted) and the set punctuation { } ,"""
    tokens, i = [], 0
    while i < len(text):
        char = text[i]
        if char.isspace():
            i += 1
        elif char in "{},":
            tokens.append(char)
            i += 1
        elif char == '"':
            end = text.find('"', i + 1)
            if end < 0:
                raise ValueError("unterminated string")
            tokens.append(text[i + 1:end])
            i = end + 1
        else:
            start = i
            while i < len(text) and not text[i].isspace() and text[i] not in '{},"':
                i += 1
            tokens.append(text[start:i])
    return tokens


def parse_conditions(family, items):
    """The rules' condition expressions: a list of alternatives, each a list of expressions that
    must all match ([[]]: no condition).  Raises code 7 naming what it cannot express."""
    key = "conditionsV%d" % family
    text = " ".join(items)
    try:
        tokens = condition_tokens(text)
    except ValueError as err:
        raise CNIError(ERR_INVALID_CONFIG, "%s: %s in %r" % (key, err, text[:200]))
    clauses, i = [], 0
    while i < len(tokens):
        start = i
        try:
            clause, i = _parse_condition(family, tokens, i)
        except (ValueError, IndexError) as err:
            raise CNIError(ERR_INVALID_CONFIG, "%s: unsupported condition %r"
                           % (key, " ".join(tokens[start:])[:200]),
                           "%s; %s" % (err, CONDITION_SUPPORTED))
        clauses.append(clause)
    alternatives = [[]]
    for clause in clauses:
        alternatives = [a + b for a in alternatives for b in clause]
        if len(alternatives) > MAX_CONDITION_RULES:
            raise CNIError(ERR_INVALID_CONFIG, "%s: its sets make more than %d rules per mapping"
                           % (key, MAX_CONDITION_RULES), text[:200])
    return alternatives


def _parse_condition(family, tokens, i):
    """One condition at tokens[i]: (its alternatives, the index after it)."""
    word = tokens[i]
    if word == "meta":
        i += 1
        word = tokens[i]
    if word in ("iifname", "oifname"):
        meta_key = NFT_META_IIFNAME if word == "iifname" else NFT_META_OIFNAME
        negate, values, i = _operator_and_values(tokens, i + 1)
        for name in values:
            if not 0 < len(name.rstrip("*").encode("utf-8", "surrogateescape")) <= 15:
                raise ValueError("%r is not an interface name" % name)
        matches = [match_ifname(meta_key, name, negate) for name in values]
    elif word in ("ip", "ip6"):
        if word != ("ip" if family == 4 else "ip6"):
            raise ValueError("%s matches the other address family" % word)
        field = tokens[i + 1]
        if field not in ("saddr", "daddr"):
            raise ValueError("%s %s is not an address match" % (word, field))
        negate, values, i = _operator_and_values(tokens, i + 2)
        matches = [match_address(field, _condition_prefix(family, value), negate)
                   for value in values]
    else:
        raise ValueError("%r cannot be expressed" % word)
    if negate:          # not any of them: every exclusion in one rule
        return [[expr for match in matches for expr in match]], i
    return matches, i


def _operator_and_values(tokens, i):
    """(negated, values, next index) of `[==|!=|eq|ne] value` or `[op] { v1, v2 }`."""
    negate = False
    if tokens[i] in ("==", "eq", "!=", "ne"):
        negate = tokens[i] in ("!=", "ne")
        i += 1
    if tokens[i] != "{":
        if tokens[i] in ("}", ","):
            raise ValueError("a value is missing")
        return negate, [tokens[i]], i + 1
    values, i = [], i + 1
    while tokens[i] != "}":
        if tokens[i] != ",":
            values.append(tokens[i])
        i += 1
    if not values:
        raise ValueError("an empty set")
    return negate, values, i + 1


def _condition_prefix(family, text):
    """A condition's address or prefix of `family` (an address alone is a host prefix)."""
    if "/" not in text:
        text += "/%d" % IP_BITS[family]
    prefix = Prefix.parse(text)
    if prefix.family != family:
        raise ValueError("%s is not an IPv%d address" % (text, family))
    return prefix


# --- the attachment's rules -----------------------------------------------------------------

def comment_name(name, limit):
    """A name as the comment holds it: itself, or `#` and a hash when longer than `limit` (names
    cannot contain `#`, so the two never meet)."""
    return name if len(name) <= limit else "#" + sha512_hex(name)[:16]


def portmap_comment(network, container_id, ifname):
    """The comment every rule of one attachment carries (at most 123 bytes: interface names have
    at most 15)."""
    return "net:%s id:%s if:%s" % (comment_name(network, COMMENT_NETWORK_MAX),
                                   comment_name(container_id, COMMENT_ID_MAX), ifname)


def parse_portmap_comment(comment):
    """(network, container ID, ifname) as a comment holds them, or None for anyone else's rule."""
    parts = comment.split(" ")
    if len(parts) != 3 or not all(p.startswith(k) for p, k in zip(parts, ("net:", "id:", "if:"))):
        return None
    return parts[0][4:], parts[1][3:], parts[2][3:]


def container_addresses(previous, ifname):
    """{family: Prefix}: per family, the first address of prevResult that belongs to the
    container's interface (an address pointing at another or a host-side interface is skipped)."""
    interfaces = previous.get("interfaces") or []
    found = {}
    for ip in previous.get("ips") or []:
        prefix = Prefix.parse(ip["address"])
        if prefix.family in found:
            continue
        index = ip.get("interface")
        if isinstance(index, int) and 0 <= index < len(interfaces):
            if interfaces[index].get("name") != ifname or not interfaces[index].get("sandbox"):
                continue
        found[prefix.family] = prefix
    return found


def portmap_rules(conf, family, address):
    """[(chain, expressions)] of one container address: a DNAT rule per mapping (and per
    condition alternative), then with snat the masquerade rules for hairpin and localhost
    traffic (every source with masqAll), each only for connections a DNAT rule rewrote."""
    rules = []
    target = [expr_immediate(NFT_REG_1, ip_bytes(family, address.ip))]
    host = Prefix(family, address.ip, IP_BITS[family])
    for mapping in conf.mappings:
        if not mapping.applies_to(family):
            continue
        destination = []
        if mapping.host_ip is not None:
            destination = match_address("daddr", Prefix(family, mapping.host_ip, IP_BITS[family]))
        dnat = (match_dport(mapping.protocol, mapping.host_port) + target
                + [expr_immediate(NFT_REG_2, struct.pack(">H", mapping.container_port)),
                   expr_dnat(family, NFT_REG_1, NFT_REG_2)])
        for condition in conf.conditions[family]:
            rules.append((HOSTPORTS_CHAIN, condition + destination + dnat))
    if conf.snat and rules:
        sources = [None] if conf.masq_all else [address] + ([LOCALHOST_V4] if family == 4 else [])
        for source in sources:
            rules.append((PORTMAP_MASQ_CHAIN, match_ct_dnat()
                          + (match_address("saddr", source) if source is not None else [])
                          + match_address("daddr", host) + [expr_masquerade()]))
    return rules


def entry_rule():
    """prerouting's and output's one rule: `fib daddr type local jump hostports_all`."""
    return match_daddr_local() + [expr_verdict(NFT_JUMP, HOSTPORTS_ALL_CHAIN)]


def portmap_skeleton_ok(rules):
    """Whether the shared chains of one family's table are as they should be (from its rules)."""
    by_chain = {}
    for rule in rules:
        by_chain.setdefault(rule.chain, []).append(rule)
    jumps = [r.jump_target for r in by_chain.get(HOSTPORTS_ALL_CHAIN, [])]
    if jumps != [HOSTIP_HOSTPORTS_CHAIN, HOSTPORTS_CHAIN]:
        return False
    entry = expression_signature(entry_rule())
    return all([r.signature for r in by_chain.get(chain, [])] == [entry]
               for chain, _hook in PORTMAP_ENTRY_CHAINS)


def add_portmap_skeleton(batch, nf_family, snat, rewrite):
    """The table and its chains (kept when they exist); with `rewrite`, the shared chains are
    flushed and refilled, in the same transaction, so nobody sees them half written."""
    batch.add_table(nf_family, PORTMAP_TABLE, PORTMAP_TABLE_COMMENT)
    for chain in (HOSTPORTS_CHAIN, HOSTIP_HOSTPORTS_CHAIN, HOSTPORTS_ALL_CHAIN):
        batch.add_chain(nf_family, PORTMAP_TABLE, chain)
    for chain, hook in PORTMAP_ENTRY_CHAINS:
        batch.add_chain(nf_family, PORTMAP_TABLE, chain, hook=("nat", hook, NF_PRIORITY_DSTNAT))
    if snat:
        batch.add_chain(nf_family, PORTMAP_TABLE, PORTMAP_MASQ_CHAIN,
                        hook=("nat", NF_INET_POST_ROUTING, NF_PRIORITY_SRCNAT))
    if rewrite:
        batch.flush_chain(nf_family, PORTMAP_TABLE, HOSTPORTS_ALL_CHAIN)
        for chain in (HOSTIP_HOSTPORTS_CHAIN, HOSTPORTS_CHAIN):
            batch.add_rule(nf_family, PORTMAP_TABLE, HOSTPORTS_ALL_CHAIN,
                           [expr_verdict(NFT_JUMP, chain)])
        for chain, _hook in PORTMAP_ENTRY_CHAINS:
            batch.flush_chain(nf_family, PORTMAP_TABLE, chain)
            batch.add_rule(nf_family, PORTMAP_TABLE, chain, entry_rule())


def forward_ports(conf, comment, addresses):
    """ADD over nf_tables: one transaction writes both families' rules, replacing those an
    earlier ADD of the attachment left, and repairing the shared chains if needed."""
    nl = node_nftables()

    def build(batch):
        for family, address in sorted(addresses.items()):
            rules = portmap_rules(conf, family, address)
            if not rules:
                continue
            nf_family = PORTMAP_FAMILIES[family]
            present = list_rules(nl, nf_family, PORTMAP_TABLE)
            add_portmap_skeleton(batch, nf_family, conf.snat, not portmap_skeleton_ok(present))
            for rule in present:
                if rule.comment == comment:
                    batch.delete_rule(rule)
            for chain, exprs in rules:
                batch.add_rule(nf_family, PORTMAP_TABLE, chain, exprs, comment)
    try:
        commit_rebuilt(nl, build, "failed to set up nftables rules for port mappings")
    except NetlinkError as err:
        if err.errno in (errno.ENOENT, errno.EOPNOTSUPP) and not err.details:
            err.details = ("if this persists, the kernel lacks an nf_tables feature the rules use: "
                           "nat chains, fib, ct or masquerade (modules nft_chain_nat, "
                           "nft_fib_ipv4, nft_fib_ipv6, nft_ct, nft_masq)")
        raise


def remove_attachment_mappings(network, container_id, comment):
    """Delete, in one transaction, every rule of both families' tables carrying the
    attachment's `comment` (one listing of each table), and the reference's iptables chain of
    the attachment where iptables is nf_tables-based (then it is visible here, in table nat),
    so a container mapped by the reference's iptables backend is unmapped by our DEL."""
    nl = node_nftables()

    def build(batch):
        for nf_family in (NFPROTO_IPV4, NFPROTO_IPV6):
            for rule in list_rules(nl, nf_family, PORTMAP_TABLE):
                if rule.chain in PORTMAP_RULE_CHAINS and rule.comment == comment:
                    batch.delete_rule(rule)
            remove_chains(batch, nl, nf_family, "nat", IPT_DNAT_CHAIN,
                          (iptables_dnat_chain(network, container_id),))
    commit_rebuilt(nl, build, "failed to remove the port mappings of %s" % container_id)


def delete_stale_udp_flows(conf, families):
    """Forget conntrack entries of the mapped UDP ports, so a flow that began before the mapping
    (and would keep its old destination) starts over through the new rule.  Failures are only
    reported: the mapping itself is in place."""
    ports = set(m.host_port for m in conf.mappings if m.protocol == "udp")
    if not ports or not families:
        return
    try:
        delete_conntrack_entries(node_nftables(), families, IPPROTO_NUMBERS["udp"], ports)
    except CNIError as err:
        sys.stderr.write("portmap: failed to delete stale UDP conntrack entries of ports %s: %s\n"
                         % (",".join(map(str, sorted(ports))), err.msg))


def enable_localnet_routing(address):
    """Let 127.0.0.1 cross into the container's interface (route_localnet on the node's
    interface toward it), so `127.0.0.1:hostPort` reaches the container."""
    nl = NetlinkSocket()
    index = route_lookup(nl, 4, address.ip)
    link = get_link(nl, index=index) if index else None
    if link is not None:
        write_sysctl("net/ipv4/conf/%s/route_localnet" % link.name, "1", required=True)


# --- verbs ----------------------------------------------------------------------------------

def portmap_add(request):
    """Forward the host ports to the container's addresses; prevResult passes through."""
    conf = PortmapConfig(request)
    previous = previous_result(request)
    if previous is None:
        raise CNIError(ERR_INVALID_CONFIG, "must be called as chained plugin",
                       "portmap needs prevResult")
    if not conf.mappings:
        return previous
    addresses = container_addresses(previous, request.ifname)
    comment = portmap_comment(conf.network, request.container_id, request.ifname)
    if conf.backend == "iptables":
        for family, address in sorted(addresses.items()):
            iptables_forward_ports(conf, request.container_id, family, address)
    else:
        forward_ports(conf, comment, addresses)
    delete_stale_udp_flows(conf, addresses)
    if conf.snat and 4 in addresses:
        enable_localnet_routing(addresses[4])
    return previous


def portmap_del(request):
    """Remove the attachment's rules, found by comment alone: works with the namespace gone,
    without prevResult, and twice."""
    try:
        backend = PortmapConfig(request).backend
    except CNIError as err:
        sys.stderr.write("DEL: the config does not validate (%s); cleaning up with what it says\n"
                         % err.msg)
        backend = conf_lookup(request.config, "backend")
    comment = portmap_comment(request.network, request.container_id, request.ifname)
    remove_attachment_mappings(request.network, request.container_id, comment)
    if backend == "iptables":
        iptables_unforward_ports(request.network, request.container_id)
    return None


def portmap_check(request):
    """The attachment's rules are all there, exactly as ADD writes them (addresses, ports,
    conditions), and the shared chains lead to them."""
    conf = PortmapConfig(request)
    previous = required_previous_result(request)
    if not conf.mappings:
        return None
    addresses = container_addresses(previous, request.ifname)
    if conf.backend == "iptables":
        for family in sorted(addresses):
            iptables_check_ports(conf, request.container_id, family)
        return None
    comment = portmap_comment(conf.network, request.container_id, request.ifname)
    for family, address in sorted(addresses.items()):
        expected = sorted(repr(expression_signature(exprs))
                          for _chain, exprs in portmap_rules(conf, family, address))
        if not expected:
            continue
        present = list_rules(node_nftables(), PORTMAP_FAMILIES[family], PORTMAP_TABLE)
        found = sorted(repr(r.signature) for r in present if r.comment == comment)
        table = "table %s %s" % ("ip" if family == 4 else "ip6", PORTMAP_TABLE)
        if found != expected:
            raise CNIError(ERR_INTERNAL, "port mapping rules of %s are missing or changed"
                           % request.container_id, "%s holds %d rules commented %r, %d expected"
                           % (table, len(found), comment, len(expected)))
        if not portmap_skeleton_ok(present):
            raise CNIError(ERR_INTERNAL, "the chains leading to the port mappings are missing or "
                           "changed", "%s: prerouting and output must jump to %s"
                           % (table, HOSTPORTS_ALL_CHAIN))
    return None


def portmap_gc(request):
    """Remove this network's rules whose attachment is not in cni.dev/valid-attachments.  Needs
    only the network's name: a config that no longer validates does not keep stale mappings."""
    valid = valid_attachments(request.config)
    if valid is None:
        return None
    network = comment_name(request.network, COMMENT_NETWORK_MAX)
    keep = set((comment_name(cid, COMMENT_ID_MAX), ifname) for cid, ifname in valid)
    nl = node_nftables()

    def owner_of(rule):         # (container ID, ifname) as the comment holds them
        owner = parse_portmap_comment(rule.comment)
        return owner[1:] if owner is not None and owner[0] == network else None

    def build(batch):
        for nf_family in (NFPROTO_IPV4, NFPROTO_IPV6):
            for chain in PORTMAP_RULE_CHAINS:
                remove_stale_rules(batch, nl, nf_family, PORTMAP_TABLE, chain, owner_of, keep)
    commit_rebuilt(nl, build, "failed to remove stale port mappings of network %s"
                   % request.network)
    return None


def portmap_status(request):
    """Ready whenever the config is valid: the rules need nothing that could run out."""
    PortmapConfig(request)
    return None


# --- the iptables backend (only when a config asks for it) -----------------------------------
# The reference's layout in table nat: PREROUTING and OUTPUT `-m addrtype --dst-type LOCAL -j
# CNI-HOSTPORT-DNAT`, which jumps per attachment (multiport, up to 15 ports a rule) to
# CNI-DN-<hash of network and container>; that chain marks hairpin and localhost traffic through
# CNI-HOSTPORT-SETMARK (or externalSetMarkChain) and DNATs; CNI-HOSTPORT-MASQ, jumped to first
# from POSTROUTING, masquerades what is marked.

def iptables_forward_ports(conf, container_id, family, address):
    """The reference's iptables layout for the attachment's mappings of `family` to `address`:
    the shared chains and jumps made if missing, the attachment's DNAT chain filled afresh."""
    mark = "%#x/%#x" % (1 << conf.mark_masq_bit, 1 << conf.mark_masq_bit)
    setmark = conf.external_set_mark_chain or IPT_SETMARK_CHAIN
    if conf.snat and conf.external_set_mark_chain is None:
        iptables_ensure_chain(family, IPT_SETMARK_CHAIN)
        iptables_ensure_rule(family, IPT_SETMARK_CHAIN, [
            "-m", "comment", "--comment", "CNI portfwd masquerade mark",
            "-j", "MARK", "--set-xmark", mark])
        iptables_ensure_chain(family, IPT_MASQ_CHAIN)
        iptables_ensure_rule(family, IPT_MASQ_CHAIN,
                             ["-m", "mark", "--mark", mark, "-j", "MASQUERADE"])
        iptables_ensure_rule(family, "POSTROUTING", [
            "-m", "comment", "--comment", "CNI portfwd requiring masquerade", "-j", IPT_MASQ_CHAIN],
            first=True)
    iptables_ensure_chain(family, IPT_DNAT_CHAIN)
    for entry in ("PREROUTING", "OUTPUT"):
        iptables_ensure_rule(family, entry, ["-m", "addrtype", "--dst-type", "LOCAL",
                                             "-j", IPT_DNAT_CHAIN])
    chain = iptables_dnat_chain(conf.network, container_id)
    iptables_ensure_chain(family, chain)
    run_iptables(family, ["-F", chain])
    mappings = [m for m in conf.mappings if m.applies_to(family)]
    for mapping in mappings:
        base = ["-p", mapping.protocol, "--dport", str(mapping.host_port)]
        if mapping.host_ip is not None:
            base += ["-d", ip_to_text(family, mapping.host_ip)]
        if conf.snat:
            sources = ["::/0" if family == 6 else "0.0.0.0/0"] if conf.masq_all else [str(address)]
            if family == 4 and not conf.masq_all:
                sources.append("127.0.0.1")
            for source in sources:
                run_iptables(family, ["-A", chain] + base + ["-s", source, "-j", setmark])
        target = ip_to_text(family, address.ip)
        target = "[%s]" % target if family == 6 else target
        run_iptables(family, ["-A", chain] + base + ["-j", "DNAT", "--to-destination",
                                                     "%s:%d" % (target, mapping.container_port)])
    comment = ("dnat name: \"%s\" id: \"%s\"" % (conf.network, container_id))[:XT_COMMENT_MAX]
    for protocol in sorted(set(m.protocol for m in mappings)):
        ports = [str(m.host_port) for m in mappings if m.protocol == protocol]
        for start in range(0, len(ports), IPT_MULTIPORT_MAX):
            selector = ["-m", "comment", "--comment", comment, "-m", "multiport", "-p", protocol,
                        "--destination-ports", ",".join(ports[start:start + IPT_MULTIPORT_MAX])]
            iptables_ensure_rule(family, IPT_DNAT_CHAIN,
                                 selector + conf.iptables_conditions[family] + ["-j", chain])


def iptables_unforward_ports(network, container_id):
    """Remove the jumps to the attachment's chain, then the chain, in both families."""
    chain = iptables_dnat_chain(network, container_id)
    for family in (4, 6):
        status, rules = run_iptables(family, ["-S", IPT_DNAT_CHAIN], check=False)
        for line in rules.splitlines() if status == 0 else ():
            if line.endswith(" -j " + chain):
                run_iptables(family, ["-D"] + split_iptables_rule(line)[1:], check=False)
        run_iptables(family, ["-F", chain], check=False)
        run_iptables(family, ["-X", chain], check=False)


def iptables_check_ports(conf, container_id, family):
    """CHECK of the iptables form: the attachment's DNAT chain exists and is jumped to."""
    chain = iptables_dnat_chain(conf.network, container_id)
    status, rules = run_iptables(family, ["-S", IPT_DNAT_CHAIN], check=False)
    if run_iptables(family, ["-S", chain], check=False)[0] != 0 or not any(
            line.endswith(" -j " + chain) for line in rules.splitlines()):
        raise CNIError(ERR_INTERNAL, "port mapping chain %s of %s is missing"
                       % (chain, container_id))


# ==============================================================================================
# The tuning plugin
# ==============================================================================================
# A chained plugin: it tunes the container interface CNI_IFNAME (MAC address, MTU, promiscuous
# and all-multicast modes, transmit queue length) and `net.*` sysctls inside the container's
# namespace, and passes prevResult on (with the new MAC on the interface it names).
# Invariants:
# - Nothing reaches the kernel before the whole request is checked: every key's type and range,
#   every sysctl resolved to an existing, writable file under /proc/sys/net of the container's
#   namespace (the path is built from checked parts only, never from the key's raw text), the
#   MTU against the device's own bounds.
# - The values an ADD replaces are saved before it changes anything, in the reference's place
#   and format (<dataDir>/<containerID>_<ifname>.json, dataDir /run/cni/tuning: a tmpfs, gone at
#   reboot with the interfaces it describes), so either side's DEL restores the other's ADD; our
#   extra keys ("sysctl", "network", "containerID", "ifname") are ignored by the reference.  A
#   repeated ADD keeps the values saved first.
# - A failed ADD puts back what it changed and leaves the saved file as it found it.
# - DEL restores the saved values and removes the file; a namespace or interface that is gone
#   has nothing left to restore, and its file is removed too.  Namespace-wide sysctls (not
#   naming CNI_IFNAME) are not restored, as in the reference: another attachment of the same
#   container may rely on them, and they die with the namespace.

TUNING_DATA_DIR = "/run/cni/tuning"
TUNING_ALLOWLIST = "/etc/cni/tuning/allowlist.conf"   # the reference's optional key filter
SYSCTL_ROOT = "/proc/sys/"
IFNAME_PLACEHOLDER = "IFNAME"                          # a key part standing for CNI_IFNAME
# /proc/sys/net/<a>/<b>/<entry>/...: directories with one entry per interface, besides the
# namespace-wide "all" and "default" entries.
PER_INTERFACE_SYSCTL_DIRS = frozenset([("ipv4", "conf"), ("ipv4", "neigh"), ("ipv6", "conf"),
                                       ("ipv6", "neigh"), ("mpls", "conf")])
NAMESPACE_WIDE_ENTRIES = ("all", "default")
SYSCTL_KEY_MAX = 256
SYSCTL_VALUE_MAX = 1024
MTU_MAX = 0x7FFFFFFF                          # the kernel's int; the device's bounds apply too
DEFAULT_MTU_BOUNDS = (68, 65535)              # Ethernet's, for kernels that report none
TXQLEN_MAX = 0xFFFFFFFF
STALE_TEMP_AGE = 60.0                         # seconds before GC removes a killed ADD's temp file
# The link attributes, by their key in the saved file, in the reference's order of setting them.
LINK_TUNABLES = ("mac", "promisc", "mtu", "allmulti", "txQLen")
LINK_RESTORE_ORDER = ("mtu", "mac", "promisc", "allmulti", "txQLen")
TUNABLE_NAMES = {"mac": "MAC address", "promisc": "promiscuous mode", "mtu": "MTU",
                 "allmulti": "all-multicast mode", "txQLen": "transmit queue length"}
TUNABLE_TYPES = {"mac": str, "promisc": bool, "mtu": int, "allmulti": bool, "txQLen": int}


class TuningConfig(object):
    """The tuning plugin's keys (reference names, matched case-insensitively):

      sysctl        {key: value}: net.* sysctls in the container's namespace; a key's parts are
                    separated by "." or, in a key holding a "/", by "/"; a part "IFNAME" stands
                    for CNI_IFNAME
      mac           MAC address of CNI_IFNAME (overridden, in this order, by CNI_ARGS MAC,
                    runtimeConfig.mac and args.cni.mac, as the reference does)
      promisc       promiscuous mode, true or false (absent: left as it is)
      allmulti      all-multicast mode, true or false (absent: left as it is)
      mtu           MTU (absent or 0: left as it is)
      txQLen        transmit queue length
      dataDir       where ADD saves the values DEL restores (default /run/cni/tuning)
      runtimeConfig.mac                                       the `mac` capability
      args.cni.{sysctl, mac, promisc, allmulti, mtu, txQLen}  per-container overrides
    """

    def __init__(self, request):
        c = request.config
        self.network = request.network
        self.data_dir = tuning_data_dir(c)
        cni = conf_get(conf_get(c, "args", dict, {}), "cni", dict, {})
        self.sysctl = dict(conf_get(c, "sysctl", dict, {}))
        self.sysctl.update(conf_get(cni, "sysctl", dict, {}, "args.cni."))
        if self.sysctl:
            refuse_duplicate_sysctl_keys(request.stdin)
            for key in list(self.sysctl):
                self.sysctl[key] = sysctl_value(key, self.sysctl[key])
        mac = conf_get(c, "mac", str)
        for override in (request.args.get("MAC"), conf_get(request.runtime_config(), "mac", str),
                         conf_get(cni, "mac", str, None, "args.cni.")):
            if override:
                mac = override
        self.mac = tuning_mac(mac) if mac else None
        pick = lambda key, kind: conf_get(cni, key, kind, conf_get(c, key, kind), "args.cni.")
        self.promisc = pick("promisc", bool)
        self.allmulti = pick("allmulti", bool)
        self.mtu = pick("mtu", int) or None
        self.txqlen = pick("txQLen", int)
        for key, value, low, high in (("mtu", self.mtu, 1, MTU_MAX),
                                      ("txQLen", self.txqlen, 0, TXQLEN_MAX)):
            if value is not None and not low <= value <= high:
                raise config_error("%s must be between %d and %d" % (key, low, high),
                                   "got %d" % value)
        if self.sysctl:
            check_sysctl_allowlist(self.sysctl)

    def link_settings(self):
        """{saved-file key: wanted value} of the link attributes the config sets."""
        wanted = {"mac": self.mac, "promisc": self.promisc, "mtu": self.mtu,
                  "allmulti": self.allmulti, "txQLen": self.txqlen}
        return dict((k, v) for k, v in wanted.items() if v is not None)


def tuning_data_dir(config):
    """The dataDir key: an absolute path (DEL and GC read only this key of the config)."""
    data_dir = conf_get(config, "dataDir", str, TUNING_DATA_DIR)
    if not data_dir.startswith("/") or not encodable(data_dir) or "\0" in data_dir:
        raise config_error("dataDir must be an absolute path", data_dir[:200])
    return data_dir


class _DuplicateKeys(dict):
    """A JSON object that spelled some key more than once (`duplicates`)."""


def _pairs_noting_duplicates(pairs):
    """The JSON decoder's object hook: a dict, or a _DuplicateKeys when a key came twice."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        obj = _DuplicateKeys(obj)
        seen = set()
        obj.duplicates = sorted(set(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


class _DuplicateNotingContext(_ScannerContext):
    """The module's JSON decoder settings, with objects built by _pairs_noting_duplicates."""

    object_pairs_hook = staticmethod(_pairs_noting_duplicates)


def refuse_duplicate_sysctl_keys(raw):
    """Refuse a sysctl object naming a key twice (which value would win is the parser's whim),
    as the reference does.  Only configs with sysctls pay for this second parse."""
    scan = _json.make_scanner(_DuplicateNotingContext())
    config = scan(raw.decode("utf-8", "surrogateescape"), 0)[0]
    args = conf_lookup(config, "args")
    cni = conf_lookup(args, "cni") if isinstance(args, dict) else None
    for where, obj in (("", config), ("args.cni.", cni if isinstance(cni, dict) else {})):
        sysctl = conf_lookup(obj, "sysctl")
        if isinstance(sysctl, _DuplicateKeys):
            raise config_error("%ssysctl names %s more than once"
                               % (where, ", ".join(sysctl.duplicates)[:200]),
                               "duplicated sysctl keys are not allowed")


def sysctl_value(key, value):
    """A sysctl value as the text written to its file: a string (or integer) of printable text."""
    if type(value) is int:
        value = str(value)
    if not isinstance(value, str):
        raise config_error("sysctl %s must be a string" % json_dumps(str(key)[:200]),
                           "got %s" % json_dumps(value)[:200])
    if (not value or len(value) > SYSCTL_VALUE_MAX or not encodable(value)
            or any(ord(ch) < 32 and ch != "\t" or ord(ch) == 127 for ch in value)):
        raise config_error("sysctl %s has an empty, overlong or non-printable value"
                           % json_dumps(key[:200]), json_dumps(value[:200]))
    return value


def tuning_mac(text):
    """A MAC for a unicast Ethernet interface ("aa:bb:..." or "aa-bb-..."), in lower case."""
    try:
        raw = parse_mac(text.replace("-", ":"))
    except ValueError as err:
        raise config_error(str(err))
    if raw[0] & 1 or raw == b"\0" * 6:
        raise config_error("MAC %s is not a unicast address" % text,
                           "an interface takes neither a multicast nor the all-zero address")
    return mac_to_text(raw)


def check_sysctl_allowlist(sysctl):
    """Apply the reference's optional allowlist: a regular expression per line; every key must
    match one (searched, as Go's MatchString does)."""
    try:
        with open(TUNING_ALLOWLIST, "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError as err:
        if err.errno == errno.ENOENT:      # no allowlist: every net.* key is allowed
            return
        raise os_error(err, "failed to read %s" % TUNING_ALLOWLIST)
    import re
    patterns = []
    for line in lines:
        if line.strip():
            try:
                patterns.append(re.compile(line.strip()))
            except re.error as err:
                raise CNIError(ERR_INVALID_CONFIG, "invalid pattern in %s: %s"
                               % (TUNING_ALLOWLIST, err), line.strip()[:200])
    for key in sorted(sysctl):
        if not any(p.search(key) for p in patterns):
            raise CNIError(ERR_INVALID_CONFIG, "sysctl %s is not allowed by %s"
                           % (key[:200], TUNING_ALLOWLIST),
                           "allowed: %s" % " ".join(p.pattern for p in patterns)[:500])


def resolve_sysctl(key, ifname):
    """(path under /proc/sys, whether it is CNI_IFNAME's own) of a tuning sysctl key.

    A key's parts are separated by "." (net.ipv4.ip_forward) or, when it holds a "/", by "/"
    only (net/ipv4/conf/eth0.100/forwarding: dots in interface names stay).  Refused with code 7:
    keys outside net., empty, "." or ".." parts, control characters, and per-interface entries of
    any interface but CNI_IFNAME.
    """
    def refuse(why):
        return CNIError(ERR_INVALID_CONFIG, "invalid sysctl key %s: %s"
                        % (json_dumps(key[:200]), why))
    if (not key or len(key) > SYSCTL_KEY_MAX or not encodable(key)
            or any(ord(ch) <= 32 or ord(ch) == 127 for ch in key)):
        raise refuse("empty, too long, or holding spaces or control characters")
    parts = key.split("/") if "/" in key else key.split(".")
    if "" in parts or "." in parts or ".." in parts:
        raise refuse("its parts, separated by '.' (or all by '/'), must not be empty, '.' or '..'")
    parts = [ifname if part == IFNAME_PLACEHOLDER else part for part in parts]
    if parts[0] != "net" or len(parts) < 2:
        raise refuse("only net.* sysctls can be set (in the container's namespace)")
    own = False
    if len(parts) >= 4 and (parts[1], parts[2]) in PER_INTERFACE_SYSCTL_DIRS:
        own = parts[3] == ifname
        if not own and parts[3] not in NAMESPACE_WIDE_ENTRIES:
            raise refuse("it names interface %s, but only CNI_IFNAME (%s; write IFNAME), all and "
                         "default can be tuned" % (parts[3], ifname))
    return "/".join(parts), own


def sysctl_file_error(err, path, writing):
    """The CNIError for a sysctl file that cannot be opened, read or written."""
    name = path.replace("/", ".")
    verb = "write" if writing else "read"
    if err.errno in (errno.ENOENT, errno.ENOTDIR):
        return CNIError(ERR_INVALID_CONFIG, "there is no sysctl %s in the container's namespace"
                        % name, "%s%s does not exist" % (SYSCTL_ROOT, path))
    if err.errno == errno.EISDIR:
        return CNIError(ERR_INVALID_CONFIG, "sysctl %s is a directory, not a setting" % name)
    if err.errno in (errno.EPERM, errno.EACCES):
        return CNIError(ERR_INVALID_CONFIG, "sysctl %s cannot be %s"
                        % (name, "written" if writing else "read"))
    if err.errno in (errno.EINVAL, errno.ERANGE):
        return CNIError(ERR_INVALID_CONFIG, "the kernel refused the value of sysctl %s: %s"
                        % (name, err.strerror))
    return CNIError(ERR_INTERNAL, "failed to %s sysctl %s: %s" % (verb, name, err.strerror))


def sysctl_read(path):
    """The value of /proc/sys/<path> (without its newline), or None for a write-only file.
    Call inside the container's namespace."""
    try:
        fd = posix.open(SYSCTL_ROOT + path, posix.O_RDONLY | posix.O_NOFOLLOW | posix.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.EACCES:      # write-only, such as route/flush
            return None
        raise sysctl_file_error(err, path, False)
    try:
        return posix.read(fd, 8192).decode("utf-8", "surrogateescape").rstrip("\n")
    except OSError as err:
        raise sysctl_file_error(err, path, False)
    finally:
        posix.close(fd)


def sysctl_check_writable(path):
    """Refuse a sysctl that does not exist or cannot be written, before anything is changed."""
    try:
        posix.close(posix.open(SYSCTL_ROOT + path,
                               posix.O_WRONLY | posix.O_NOFOLLOW | posix.O_CLOEXEC))
    except OSError as err:
        raise sysctl_file_error(err, path, True)


def sysctl_write(path, value):
    """Write /proc/sys/<path>.  Call inside the container's namespace."""
    try:
        fd = posix.open(SYSCTL_ROOT + path, posix.O_WRONLY | posix.O_NOFOLLOW | posix.O_CLOEXEC)
        try:
            posix.write(fd, value.encode("utf-8", "surrogateescape"))
        finally:
            posix.close(fd)
    except OSError as err:
        raise sysctl_file_error(err, path, True)


def same_sysctl_value(a, b):
    """Whether two sysctl texts say the same: the kernel prints multi-value settings with tabs."""
    return a.split() == b.split()


def link_tunables(link):
    """The tunable attributes of `link`, by their saved-file key."""
    return {"mac": link.mac, "promisc": bool(link.flags & IFF_PROMISC), "mtu": link.mtu,
            "allmulti": bool(link.flags & IFF_ALLMULTI), "txQLen": link.txqlen}


def set_link_tunable(nl, link, key, value):
    """Set one tunable attribute of `link` (a saved-file key and its value)."""
    if key == "mtu":
        change = link_change(link.index, extra=((LinkAttr.IFLA_MTU, value),))
    elif key == "txQLen":
        change = link_change(link.index, extra=((LinkAttr.IFLA_TXQLEN, value),))
    else:
        change = link_change(link.index, **{key: value})
    nl.transact([change], "failed to set the %s of %s to %s"
                % (TUNABLE_NAMES[key], link.name, json_dumps(value)))


def check_mtu_bounds(link, mtu):
    """Refuse an MTU outside the device's own bounds (IFLA_MIN_MTU, IFLA_MAX_MTU)."""
    low = link.min_mtu if link.min_mtu is not None else DEFAULT_MTU_BOUNDS[0]
    high = link.max_mtu if link.max_mtu is not None else DEFAULT_MTU_BOUNDS[1]
    if mtu < low or (high and mtu > high):     # a max of 0: the device sets no upper bound
        raise config_error("mtu %d is outside the range of %s" % (mtu, link.name),
                           "%s (%s) takes an MTU from %d to %s"
                           % (link.name, link.kind or "device", low, high or MTU_MAX))


def backup_name(container_id, ifname):
    """The saved file of an attachment, named as the reference names it."""
    return "%s_%s.json" % (container_id, ifname)


class TuningBackups(object):
    """The saved-values directory (dataDir), reached through its fd with O_NOFOLLOW."""

    def __init__(self, data_dir, create):
        self.data_dir = data_dir
        self.fd = None
        try:
            if create:
                make_directories(data_dir)
            self.fd = posix.open(data_dir, posix.O_RDONLY | posix.O_DIRECTORY | posix.O_NOFOLLOW
                                 | posix.O_CLOEXEC)
        except OSError as err:
            if create or err.errno not in (errno.ENOENT, errno.ENOTDIR):
                raise os_error(err, "failed to open the tuning dataDir %s" % data_dir)

    def close(self):
        """Close the directory (a no-op when it was never opened)."""
        if self.fd is not None:
            posix.close(self.fd)
            self.fd = None

    def names(self):
        """The names in the directory (none when it does not exist)."""
        return posix.listdir(self.fd) if self.fd is not None else []

    def read(self, name):
        """The saved values in file `name` ({} when the file is malformed), or None without one."""
        if self.fd is None:
            return None
        try:
            fd = posix.open(name, posix.O_RDONLY | posix.O_NOFOLLOW | posix.O_CLOEXEC
                            | posix.O_NONBLOCK, dir_fd=self.fd)
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ELOOP):     # ELOOP: a planted symlink
                return None
            raise os_error(err, "failed to open %s/%s" % (self.data_dir, name))
        try:
            data = json_loads(posix.read(fd, 1 << 16))
        except (OSError, ValueError, UnicodeError) as err:
            sys.stderr.write("tuning: ignoring unreadable %s/%s: %s\n" % (self.data_dir, name, err))
            data = {}
        finally:
            posix.close(fd)
        return data if isinstance(data, dict) else {}

    def write(self, name, data):
        """Replace file `name` atomically (a temporary file renamed into place)."""
        temp = "%s%d-%s" % (TEMP_PREFIX, posix.getpid(), name)
        try:
            fd = posix.open(temp, posix.O_WRONLY | posix.O_CREAT | posix.O_TRUNC | posix.O_NOFOLLOW
                            | posix.O_CLOEXEC, 0o600, dir_fd=self.fd)
            try:
                posix.write(fd, json_dumps(data).encode())
            finally:
                posix.close(fd)
            posix.rename(temp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except OSError as err:
            self.remove(temp)
            raise os_error(err, "failed to save the original values in %s/%s"
                           % (self.data_dir, name))

    def remove(self, name):
        """Remove file `name`; one that is not there is not an error."""
        if self.fd is None:
            return
        try:
            posix.unlink(name, dir_fd=self.fd)
        except OSError as err:
            if err.errno != errno.ENOENT:
                raise os_error(err, "failed to remove %s/%s" % (self.data_dir, name))


def saved_link_values(saved):
    """The well-formed link attributes of a saved file, by key (others are skipped with a note)."""
    values = {}
    for key in LINK_RESTORE_ORDER:
        value = saved.get(key)
        if value is None or (key == "mac" and value == "") or (key == "mtu" and value == 0):
            continue                        # the reference's "not saved" (its omitempty)
        if type(value) is not TUNABLE_TYPES[key] or (key == "mac" and not _is_mac(value)):
            sys.stderr.write("tuning: ignoring a malformed saved %s: %s\n"
                             % (key, json_dumps(value)[:100]))
            continue
        values[key] = value.lower() if key == "mac" else value
    return values


def _is_mac(text):
    """Whether `text` is a MAC address in the "aa:bb:cc:dd:ee:ff" form."""
    try:
        parse_mac(text)
        return True
    except ValueError:
        return False


def with_new_mac(result, ifname, mac):
    """prevResult with `mac` on the interface CNI_IFNAME (the one in a sandbox, when several share
    the name), as the reference reports it."""
    named = [i for i in result.get("interfaces") or [] if i.get("name") == ifname]
    for interface in [i for i in named if i.get("sandbox")] or named:
        interface["mac"] = mac
    return result


# --- ADD ------------------------------------------------------------------------------------------

def tuning_add(request):
    """ADD: check everything, save the values to be replaced, then set sysctls and the link's
    attributes; prevResult is the result (with the new MAC)."""
    conf = TuningConfig(request)
    result = required_previous_result(
        request, "tuning is a chained plugin: it runs after the one that makes the interface")
    ns = Netns(request.netns)
    wanted = conf.link_settings()
    nl = link = None
    if wanted:
        nl = ns.netlink()
        link = get_link(nl, request.ifname)
        if link is None:
            raise CNIError(ERR_INTERNAL, "failed to get %s: no such interface in the container's "
                           "namespace" % request.ifname, request.netns)
        if conf.mtu is not None:
            check_mtu_bounds(link, conf.mtu)
    sysctls = []                    # (path, own, wanted value, current value)
    with ns.entered():
        for key, value in sorted(conf.sysctl.items()):
            path, own = resolve_sysctl(key, request.ifname)
            sysctl_check_writable(path)
            sysctls.append((path, own, value, sysctl_read(path)))
    before = link_tunables(link) if link is not None else {}
    originals = dict((k, before[k]) for k in wanted)
    own_sysctls = dict((path, current) for path, own, _, current in sysctls
                       if own and current is not None)
    backups = None
    name = backup_name(request.container_id, request.ifname)
    earlier = None
    if originals or own_sysctls:
        backups = TuningBackups(conf.data_dir, create=True)
        earlier = backups.read(name)
        saved = dict(originals)
        saved["sysctl"] = own_sysctls
        if earlier:                 # a repeated ADD: what the first one saved is the original
            saved.update((k, v) for k, v in earlier.items() if k != "sysctl")
            earlier_sysctls = earlier.get("sysctl")
            saved["sysctl"].update(earlier_sysctls if isinstance(earlier_sysctls, dict) else {})
        saved.update(network=conf.network, containerID=request.container_id, ifname=request.ifname)
        if saved != earlier:
            backups.write(name, saved)
    changed_sysctls, changed_link = [], []
    try:
        with ns.entered():
            for path, _own, value, current in sysctls:
                if current is None or not same_sysctl_value(current, value):
                    sysctl_write(path, value)
                    changed_sysctls.append((path, current))
        for key in LINK_TUNABLES:
            if key in wanted and wanted[key] != before[key]:
                set_link_tunable(nl, link, key, wanted[key])
                changed_link.append(key)
    except BaseException:
        undo_tuning(ns, nl, link, before, changed_link, changed_sysctls)
        if backups is not None:
            try:
                if earlier is None:
                    backups.remove(name)
                elif saved != earlier:
                    backups.write(name, earlier)
            except CNIError as err:
                sys.stderr.write("rollback: %s\n" % err.msg)
        raise
    finally:
        if backups is not None:
            backups.close()
    if conf.mac is not None:
        with_new_mac(result, request.ifname, conf.mac)
    return result


def undo_tuning(ns, nl, link, before, changed_link, changed_sysctls):
    """Put back what a failed ADD changed (best effort: the ADD's own error is the one reported)."""
    for key in reversed(changed_link):
        try:
            set_link_tunable(nl, link, key, before[key])
        except CNIError as err:
            sys.stderr.write("rollback: %s\n" % err.msg)
    with ns.entered():
        for path, value in reversed(changed_sysctls):
            if value is not None:
                try:
                    sysctl_write(path, value)
                except CNIError as err:
                    sys.stderr.write("rollback: %s\n" % err.msg)


# --- DEL, CHECK, STATUS, GC ----------------------------------------------------------------------

def tuning_del(request):
    """Restore what ADD saved, then forget it.  Best effort and idempotent, as the reference: a
    value that cannot be restored is reported on stderr and its file kept for a later DEL."""
    data_dir = tuning_data_dir(request.config)
    backups = TuningBackups(data_dir, create=False)
    name = backup_name(request.container_id, request.ifname)
    try:
        saved = backups.read(name)
        if saved is None:
            return None
        failures = []
        ns = None
        if request.netns:
            try:
                ns = Netns(request.netns)
            except NetnsGone:
                ns = None
        if ns is not None:
            failures = restore_tuning(ns, request.ifname, saved)
        if failures:
            sys.stderr.write("tuning: could not restore %s; %s/%s kept for the next DEL\n"
                             % ("; ".join(failures), data_dir, name))
        else:
            backups.remove(name)
    finally:
        backups.close()
    return None


def restore_tuning(ns, ifname, saved):
    """Put the saved values back on `ifname` in namespace `ns`; the failures, as messages."""
    failures = []
    nl = ns.netlink()
    link = get_link(nl, ifname)
    if link is None:
        return failures                       # gone with everything it had
    current = link_tunables(link)
    for key, value in saved_link_values(saved).items():
        if current[key] != value:
            try:
                set_link_tunable(nl, link, key, value)
            except CNIError as err:
                failures.append(err.msg)
    sysctls = saved.get("sysctl")
    with ns.entered():
        for path, value in sorted(sysctls.items()) if isinstance(sysctls, dict) else ():
            try:
                path, own = resolve_sysctl(path, ifname)
                if not own or not isinstance(value, str):
                    raise CNIError(ERR_INVALID_CONFIG, "saved sysctl %s is not %s's own"
                                   % (path, ifname))
                sysctl_write(path, sysctl_value(path, value))
            except CNIError as err:
                failures.append(err.msg)
    return failures


def tuning_check(request):
    """CHECK: every configured sysctl and link attribute holds the configured value."""
    conf = TuningConfig(request)
    required_previous_result(request)
    ns = Netns(request.netns)
    with ns.entered():
        for key, value in sorted(conf.sysctl.items()):
            path, _own = resolve_sysctl(key, request.ifname)
            current = sysctl_read(path)
            if current is not None and not same_sysctl_value(current, value):
                raise CNIError(ERR_INTERNAL, "tuning: sysctl %s is %s, the config says %s"
                               % (path.replace("/", "."), json_dumps(current), json_dumps(value)))
    wanted = conf.link_settings()
    if wanted:
        link = get_link(ns.netlink(), request.ifname)
        if link is None:
            raise CNIError(ERR_INTERNAL, "Cannot find container link %s" % request.ifname)
        current = link_tunables(link)
        for key in LINK_TUNABLES:
            if key in wanted and current[key] != wanted[key]:
                raise CNIError(ERR_INTERNAL, "tuning: the %s of %s is %s, the config says %s"
                               % (TUNABLE_NAMES[key], request.ifname, json_dumps(current[key]),
                                  json_dumps(wanted[key])))
    return None


def tuning_status(request):
    """STATUS: ready whenever the config is valid (tuning needs no resource of its own)."""
    TuningConfig(request)
    return None


def tuning_gc(request):
    """Forget saved values of this network's attachments that are no longer valid (files the
    reference wrote name no network, so they are left alone), and temporary files of killed ADDs."""
    valid = valid_attachments(request.config)
    data_dir = tuning_data_dir(request.config)
    if valid is None:
        return None
    backups = TuningBackups(data_dir, create=False)
    errors = []
    try:
        now = time.time()
        for name in backups.names():
            try:
                if name.startswith(TEMP_PREFIX):
                    age = now - posix.stat(name, dir_fd=backups.fd, follow_symlinks=False).st_mtime
                    if age > STALE_TEMP_AGE:
                        backups.remove(name)
                    continue
                if not name.endswith(".json"):
                    continue
                saved = backups.read(name) or {}
                if saved.get("network") != request.network:
                    continue
                if (saved.get("containerID"), saved.get("ifname")) not in valid:
                    backups.remove(name)
            except OSError as err:
                errors.append("%s: %s" % (name, err.strerror))
            except CNIError as err:
                errors.append(err.msg)
    finally:
        backups.close()
    if errors:
        raise CNIError(ERR_IO, "tuning GC could not remove every stale file",
                       "; ".join(errors)[:1000])
    return None


# ==============================================================================================
# The firewall plugin
# ==============================================================================================
# A chained plugin: lets a container's traffic through a node whose forwarding is dropped by
# default (iptables FORWARD policy DROP, as Docker leaves it), and with ingressPolicy keeps other
# bridges out.  An accept in one nf_tables base chain does not overrule a drop in another, so the
# rules live where the drop is: table `filter`, chain FORWARD, in the reference's layout --
#   FORWARD      -m comment --comment "CNI firewall plugin rules" -j CNI-FORWARD       (first)
#   CNI-FORWARD  -m comment --comment "CNI firewall plugin admin overrides" -j CNI-ADMIN (first)
#                -d IP -m conntrack --ctstate RELATED,ESTABLISHED ... -j ACCEPT    (per address)
#                -s IP ... -j ACCEPT                                                (per address)
#   FORWARD      -j CNI-ISOLATION-STAGE-1 (first), stage 1: `-i BR ! -o BR -j STAGE-2`,
#                [isolated: `-i BR -o BR -j DROP`], RETURN; stage 2: `-o BR -j DROP`, RETURN.
# Where the node's iptables is nf_tables-based (or there is none yet) the rules are written over
# nf_tables netlink exactly as iptables-nft writes them, in one transaction planned against the
# ruleset generation it read (a concurrent change makes the kernel refuse it; it is planned
# again), so no program runs and `iptables` sees its own rules.  Where the node's filter table is
# a legacy x_tables one, the `iptables` program writes the same rules.
# Unlike the reference, the per-address rules carry their attachment in a comment, so DEL needs
# no prevResult, two attachments sharing an address keep their own rules, and GC finds leftovers.

FIREWALL_FORWARD_CHAIN = "CNI-FORWARD"
FIREWALL_ADMIN_CHAIN = "CNI-ADMIN"
FIREWALL_STAGE1_CHAIN = "CNI-ISOLATION-STAGE-1"
FIREWALL_STAGE2_CHAIN = "CNI-ISOLATION-STAGE-2"
FIREWALL_JUMP_COMMENT = "CNI firewall plugin rules"
FIREWALL_ADMIN_COMMENT = "CNI firewall plugin admin overrides"
FIREWALL_POLICY_COMMENT = "CNI firewall plugin rules (ingressPolicy: %s)"
FIREWALL_SHARED_COMMENT = "CNI firewall plugin rules (ingressPolicy: same-bridge|isolated)"
FIREWALL_ATTACHMENT_COMMENT = "CNI firewall plugin rules of "   # + attachment hash, names
INGRESS_POLICIES = ("open", "same-bridge", "isolated")
FILTER_TABLE = "filter"
FORWARD_CHAIN = "FORWARD"
NF_IP_PRI_FILTER = 0
IPT_CHAIN_MAX = 28                             # bytes: x_tables' XT_EXTENSION_MAXNAMELEN - 1
IPT_BUILTIN_NAMES = ("ACCEPT", "DROP", "QUEUE", "RETURN", "INPUT", "FORWARD", "OUTPUT",
                     "PREROUTING", "POSTROUTING")
NFPROTO_OF_FAMILY = {4: NFPROTO_IPV4, 6: NFPROTO_IPV6}
FIREWALL_PLAN_TIMEOUT = 10.0                   # seconds of re-planning while others change rules


class FirewallConfig(object):
    """The firewall plugin's keys (reference names, matched case-insensitively)."""

    def __init__(self, request):
        c = request.config
        self.network = request.network
        # "" (the reference: firewalld if it runs, else iptables) and "iptables" both mean the
        # iptables layout here; firewalld needs a D-Bus client this program does not have.
        self.backend = conf_get(c, "backend", str, "")
        self.admin_chain = conf_get(c, "iptablesAdminChainName", str, "") or FIREWALL_ADMIN_CHAIN
        self.firewalld_zone = conf_get(c, "firewalldZone", str, "trusted")   # firewalld only
        self.ingress_policy = conf_get(c, "ingressPolicy", str, "") or "open"
        if self.backend == "firewalld":
            raise config_error("the firewalld backend is not supported",
                               'it needs a D-Bus client; use "backend": "iptables" (the rules '
                               "then live in table filter, chain FORWARD) or the reference "
                               "firewall plugin")
        if self.backend not in ("", "iptables"):
            raise config_error("unknown firewall backend %s" % json_dumps(self.backend[:50]),
                               'backend is "iptables" (or "firewalld", not supported here)')
        if self.ingress_policy not in INGRESS_POLICIES:
            raise config_error("unknown ingress policy: %s"
                               % json_dumps(self.ingress_policy[:50]),
                               'ingressPolicy is "open", "same-bridge" or "isolated"')
        self._check_chain_name(self.admin_chain)
        self.previous = previous_result(request)
        # (family, ip) of every address of prevResult: the per-address rules' subjects.
        prefixes = [Prefix.parse(ip["address"]) for ip in (self.previous or {}).get("ips") or []]
        self.addresses = [(prefix.family, prefix.ip) for prefix in prefixes]

    @staticmethod
    def _check_chain_name(name):
        raw = name.encode("utf-8", "surrogateescape")
        if (len(raw) > IPT_CHAIN_MAX or name[0] in "-!" or name in IPT_BUILTIN_NAMES
                or any(c <= 32 or c >= 127 or c in b"\"'\\" for c in raw)):
            raise config_error("invalid iptablesAdminChainName %s" % json_dumps(name[:50]),
                               "an iptables chain name: at most %d printable ASCII characters "
                               "without quotes or spaces, not starting with - or !, not a "
                               "built-in name" % IPT_CHAIN_MAX)

    @property
    def isolates(self):
        return self.ingress_policy != "open"

    def bridge_name(self):
        """The bridge isolation is about: prevResult's first interface, as the reference
        takes it."""
        interfaces = (self.previous or {}).get("interfaces") or []
        if not interfaces:
            raise config_error("interface needs to be set for ingress policy %s, "
                               'make sure to chain "firewall" plugin with "bridge"'
                               % json_dumps(self.ingress_policy))
        name = interfaces[0].get("name")
        if not isinstance(name, str) or not name:
            raise config_error("got empty bridge name")
        try:
            check_ifname(name)
        except CNIError as err:
            raise config_error("invalid bridge name in prevResult: %s" % err.msg, name[:100])
        return name


# --- rules ----------------------------------------------------------------------------------------

class IptRule(object):
    """One iptables rule of the layout, rendered either as iptables-nft's expressions or as
    `iptables` arguments.  `src`/`dst` are (family, ip); `in_iface`/`out_iface` are (name,
    negated); `target` is ACCEPT, DROP, RETURN or a chain to jump to."""

    __slots__ = ("chain", "family", "src", "dst", "in_iface", "out_iface", "established",
                 "comment", "target")

    def __init__(self, chain, family, target, comment=None, src=None, dst=None, in_iface=None,
                 out_iface=None, established=False):
        self.chain = chain
        self.family = family
        self.target = target
        self.comment = comment
        self.src = src
        self.dst = dst
        self.in_iface = in_iface
        self.out_iface = out_iface
        self.established = established

    def expressions(self):
        """The rule as iptables-nft encodes it (see "rules in iptables-nft's form")."""
        exprs = []
        for key, iface in ((NFT_META_IIFNAME, self.in_iface), (NFT_META_OIFNAME, self.out_iface)):
            if iface is not None:
                exprs += ipt_interface(key, iface[0], negate=iface[1])
        for field, host in (("saddr", self.src), ("daddr", self.dst)):
            if host is not None:
                exprs += ipt_host(field, host[0], host[1])
        if self.established:
            exprs.append(xt_ctstate(CT_STATE_RELATED | CT_STATE_ESTABLISHED))
        if self.comment is not None:
            exprs.append(xt_comment(self.comment))
        verdicts = {"ACCEPT": (NF_ACCEPT,), "DROP": (NF_DROP,), "RETURN": (NFT_RETURN,)}
        return ipt_rule(exprs, expr_verdict(*verdicts.get(self.target, (NFT_JUMP, self.target))))

    def arguments(self):
        """The rule as `iptables -A CHAIN` arguments, in the order `iptables -S` prints them."""
        args = []
        for flag, iface in (("-i", self.in_iface), ("-o", self.out_iface)):
            if iface is not None:
                args += (["!"] if iface[1] else []) + [flag, iface[0]]
        for flag, host in (("-s", self.src), ("-d", self.dst)):
            if host is not None:
                args += [flag, "%s/%d" % (ip_to_text(host[0], host[1]), IP_BITS[host[0]])]
        if self.established:
            args += ["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED"]
        if self.comment is not None:
            args += ["-m", "comment", "--comment", self.comment]
        return args + ["-j", self.target]


def firewall_comment(network, container_id, ifname):
    """The comment of an attachment's per-address rules: its hash first (what DEL and GC match),
    then its names for people reading `iptables -S`; at most 255 bytes, as iptables allows."""
    text = "%s%s, net: %s, if: %s, id: %s" % (FIREWALL_ATTACHMENT_COMMENT,
                                             masq_instance_hash(network, container_id, ifname),
                                             network, ifname, container_id)
    text = text.replace('"', "")
    return utf8_prefix(text, XT_COMMENT_MAX)


def attachment_comment_prefix(network, container_id, ifname):
    """What every per-address rule comment of the attachment starts with."""
    return FIREWALL_ATTACHMENT_COMMENT + masq_instance_hash(network, container_id, ifname)


def address_rules(family, ip, comment):
    """The two rules of one container address: replies to it, and everything from it."""
    return [IptRule(FIREWALL_FORWARD_CHAIN, family, "ACCEPT", comment, dst=(family, ip),
                    established=True),
            IptRule(FIREWALL_FORWARD_CHAIN, family, "ACCEPT", comment, src=(family, ip))]


def shared_rules(conf, family):
    """(rule, first) of the chains every attachment shares, in the order the reference ensures
    them; `first` rules go to the head of their chain, the others to its end."""
    shared = FIREWALL_SHARED_COMMENT
    plan = [(IptRule(FORWARD_CHAIN, family, FIREWALL_FORWARD_CHAIN, FIREWALL_JUMP_COMMENT), True),
            (IptRule(FIREWALL_FORWARD_CHAIN, family, conf.admin_chain, FIREWALL_ADMIN_COMMENT),
             True)]
    if conf.isolates:
        bridge = conf.bridge_name()
        policy = FIREWALL_POLICY_COMMENT % conf.ingress_policy
        stage1, stage2 = FIREWALL_STAGE1_CHAIN, FIREWALL_STAGE2_CHAIN
        plan.append((IptRule(FORWARD_CHAIN, family, stage1, shared), True))
        plan.append((IptRule(stage1, family, stage2, policy, in_iface=(bridge, False),
                             out_iface=(bridge, True)), True))
        if conf.ingress_policy == "isolated":
            plan.append((IptRule(stage1, family, "DROP", policy, in_iface=(bridge, False),
                                 out_iface=(bridge, False)), True))
        plan.append((IptRule(stage1, family, "RETURN", shared), False))
        plan.append((IptRule(stage2, family, "DROP", shared, out_iface=(bridge, False)), True))
        plan.append((IptRule(stage2, family, "RETURN", shared), False))
    return plan


def shared_rule_forms(rule):
    """A shared rule as this and older references write it: before 1.7.0 the rules both
    policies share were commented "(ingressPolicy: same-bridge)"; such a rule counts as present
    rather than getting a twin."""
    forms = [rule]
    if rule.comment == FIREWALL_SHARED_COMMENT:
        forms.append(IptRule(rule.chain, rule.family, rule.target,
                             FIREWALL_POLICY_COMMENT % "same-bridge", in_iface=rule.in_iface,
                             out_iface=rule.out_iface))
    return forms


def nft_rule_present(listed, rule):
    """Whether the listed rules hold `rule` (a commented one: only rules holding its comment's
    bytes are decoded, so a FORWARD chain of a thousand other rules stays cheap)."""
    needle = (rule.comment or "").encode("utf-8", "surrogateescape") + b"\0"
    signature = expression_signature(rule.expressions())
    return any(r.mentions(needle) and r.signature == signature for r in listed)


def firewall_chains(conf):
    """The user chains the config's layout uses (the admin chain included)."""
    chains = [FIREWALL_FORWARD_CHAIN, conf.admin_chain]
    if conf.isolates:
        chains += [FIREWALL_STAGE1_CHAIN, FIREWALL_STAGE2_CHAIN]
    return chains


def filter_table_is_legacy(nl, family):
    """Whether `family`'s filter table is a legacy x_tables one (then the iptables program must
    write it): no nf_tables table `filter` of that family, but the kernel lists a legacy one.  A
    node with neither gets the nf_tables form, which is what iptables-nft would create."""
    try:
        nl.request(NFT_MSG_GETTABLE, 0, {"family": NFPROTO_OF_FAMILY[family]},
                   ((NftTableAttr.NFTA_TABLE_NAME, FILTER_TABLE),),
                   what="failed to look up table filter")
        return False
    except NetlinkError as err:
        if err.errno != errno.ENOENT:
            raise
    try:
        fd = posix.open("/proc/self/net/%s_tables_names" % ("ip" if family == 4 else "ip6"),
                        posix.O_RDONLY)
    except OSError:
        return False                          # no x_tables in this kernel, or not loaded
    try:
        names = posix.read(fd, 4096).decode("ascii", "replace").split()
    finally:
        posix.close(fd)
    return FILTER_TABLE in names


# --- nf_tables form -------------------------------------------------------------------------------

def nft_ensure_rules(nl, conf, family, wanted, owner_prefix, what):
    """Make `family`'s filter table hold the shared layout and exactly `wanted` as the rules of
    the attachment whose comments start with `owner_prefix`; rules already there are kept.  One
    transaction, planned against the generation it read and planned again if that changed."""
    nfproto = NFPROTO_OF_FAMILY[family]
    shared = shared_rules(conf, family)

    def attempt():
        generation = nft_generation(nl)
        chains = dict((chain, list_rules(nl, nfproto, FILTER_TABLE, chain))
                      for chain in [FORWARD_CHAIN] + firewall_chains(conf))
        batch = NftBatch()
        if not chains[FORWARD_CHAIN]:           # the table or its FORWARD chain may be missing
            batch.add_table(nfproto, FILTER_TABLE)
            batch.add_chain(nfproto, FILTER_TABLE, FORWARD_CHAIN, policy=None,
                            hook=("filter", NF_INET_FORWARD, NF_IP_PRI_FILTER))
        for chain in firewall_chains(conf):
            if not chains[chain]:               # missing or empty: creating it again is harmless
                batch.add_chain(nfproto, FILTER_TABLE, chain)
        for rule, first in shared:
            forms = shared_rule_forms(rule)
            if not any(nft_rule_present(chains[rule.chain], form) for form in forms):
                batch.add_rule(nfproto, FILTER_TABLE, rule.chain, rule.expressions(), first=first)
        wanted_signatures = [expression_signature(rule.expressions()) for rule in wanted]
        owner_bytes = owner_prefix.encode("utf-8", "surrogateescape")
        mine = [r for r in chains[FIREWALL_FORWARD_CHAIN]
                if r.mentions(owner_bytes) and r.match_comment.startswith(owner_prefix)]
        for rule in mine:
            if rule.signature not in wanted_signatures:
                batch.delete_rule(rule)
        present = [r.signature for r in mine]
        for rule, signature in zip(wanted, wanted_signatures):
            if signature not in present:
                batch.add_rule(nfproto, FILTER_TABLE, rule.chain, rule.expressions())
        batch.commit(nl, what, generation)
        return True

    retry_while_changing(attempt, what)


def retry_while_changing(attempt, what):
    """Run `attempt()` until it returns True, again (with growing pauses) whenever the ruleset
    changed under it: its batch refused as stale (ERESTART) or for a rule gone (ENOENT), or its
    listing interrupted by other writers again and again (many ADDs at once)."""
    def once():
        try:
            return attempt()
        except CNIError as err:
            if getattr(err, "errno", None) in (errno.ERESTART, errno.ENOENT) \
                    or err.code == ERR_TRY_AGAIN:
                return None
            raise

    poll_until(once, FIREWALL_PLAN_TIMEOUT,
               lambda: CNIError(ERR_TRY_AGAIN, "%s: the filter table kept changing" % what))


def nft_remove_rules(nl, family, chains, doomed, what):
    """Delete the rules of `chains` in table `filter` that `doomed(chain, rule)` picks, in one
    transaction (listed again if a rule went away meanwhile)."""
    nfproto = NFPROTO_OF_FAMILY[family]

    def attempt():
        batch = NftBatch()
        for chain in chains:
            for rule in list_rules(nl, nfproto, FILTER_TABLE, chain):
                if doomed(chain, rule):
                    batch.delete_rule(rule)
        batch.commit(nl, what)
        return True

    retry_while_changing(attempt, what)


# --- legacy form (the iptables program) --------------------------------------------------------

def ipt_ensure_rules(conf, family, wanted, owner_prefix):
    """nft_ensure_rules through the iptables program (a legacy node): each rule checked with -C
    and added when missing, the attachment's other rules deleted."""
    for chain in firewall_chains(conf):
        iptables_ensure_chain(family, chain, table=FILTER_TABLE)
    for rule, first in shared_rules(conf, family) + [(rule, False) for rule in wanted]:
        iptables_ensure_rule(family, rule.chain, rule.arguments(), first, table=FILTER_TABLE)
    wanted_args = [rule.arguments() for rule in wanted]
    for args in ipt_listed_rules(family, FIREWALL_FORWARD_CHAIN):
        if owner_prefix in " ".join(args) and args[2:] not in wanted_args:
            run_iptables(family, ["-D"] + args[1:], check=False, table=FILTER_TABLE)


def ipt_has_rule(family, rule):
    """`iptables -C`: whether the chain holds the rule."""
    args = ["-C", rule.chain] + rule.arguments()
    return run_iptables(family, args, check=False, table=FILTER_TABLE)[0] == 0


def ipt_listed_rules(family, chain):
    """The rules of `chain` as `iptables -S` prints them, split into arguments ("-A", chain,
    ...)."""
    status, output = run_iptables(family, ["-S", chain], check=False, table=FILTER_TABLE)
    if status != 0:
        return []
    return [split_iptables_rule(line) for line in output.splitlines() if line.startswith("-A ")]


def ipt_remove_rules(family, doomed):
    """Delete the rules of CNI-FORWARD that `doomed(chain, arguments)` picks."""
    for chain in (FIREWALL_FORWARD_CHAIN,):
        for args in ipt_listed_rules(family, chain):
            if doomed(chain, args):
                run_iptables(family, ["-D"] + args[1:], check=False, table=FILTER_TABLE)


# --- verbs ----------------------------------------------------------------------------------------

def firewall_families(conf):
    """The address families of prevResult's addresses: the tables ADD and CHECK touch."""
    return sorted(set(family for family, _ip in conf.addresses))


def attachment_rules(conf, family, comment):
    """The per-address rules of prevResult's addresses of `family` (comment None: the
    reference's form)."""
    return [rule for fam, ip in conf.addresses if fam == family
            for rule in address_rules(family, ip, comment)]


def firewall_add(request):
    """Put the shared layout and the attachment's per-address rules in place; returns
    prevResult."""
    conf = FirewallConfig(request)
    if conf.previous is None:
        raise config_error("missing prevResult from earlier plugin")
    if conf.isolates:
        conf.bridge_name()                    # refused before anything is written
    comment = firewall_comment(conf.network, request.container_id, request.ifname)
    owner = attachment_comment_prefix(conf.network, request.container_id, request.ifname)
    nl = node_nftables()
    for family in firewall_families(conf):
        wanted = attachment_rules(conf, family, comment)
        if filter_table_is_legacy(nl, family):
            ipt_ensure_rules(conf, family, wanted, owner)
        else:
            nft_ensure_rules(nl, conf, family, wanted, owner,
                             "failed to set up the firewall rules of %s" % request.container_id)
    return conf.previous


def firewall_del(request):
    """Remove the attachment's per-address rules, found by comment, and the reference's for
    prevResult's addresses (so an attachment the reference added is cleaned up too); needs no
    netns, and finds nothing the second time.  The shared chains stay, as with the reference:
    other attachments use them."""
    conf = FirewallConfig(request)
    owner = attachment_comment_prefix(conf.network, request.container_id, request.ifname)
    what = "failed to remove the firewall rules of %s" % request.container_id
    nl = node_nftables()
    for family in (4, 6):
        reference = attachment_rules(conf, family, None)
        if filter_table_is_legacy(nl, family):
            reference_args = [rule.arguments() for rule in reference]
            ipt_remove_rules(family, lambda chain, args: (
                owner in " ".join(args) or args[2:] in reference_args))
            continue
        signatures = [expression_signature(rule.expressions()) for rule in reference]
        addresses = [ip_bytes(family, ip) for fam, ip in conf.addresses if fam == family]
        owner_bytes = owner.encode("utf-8", "surrogateescape")

        def doomed(chain, rule):
            # Raw-byte tests first: only candidate rules are decoded.
            if rule.mentions(owner_bytes):
                return rule.match_comment.startswith(owner)
            return (any(rule.mentions(address) for address in addresses)
                    and not rule.match_comment and rule.signature in signatures)
        nft_remove_rules(nl, family, (FIREWALL_FORWARD_CHAIN,), doomed, what)
    return None


def firewall_check(request):
    """Every rule the attachment needs is in place (ours, or the reference's form of a
    per-address rule)."""
    conf = FirewallConfig(request)
    if conf.previous is None:
        raise config_error("missing prevResult from earlier plugin")
    comment = firewall_comment(conf.network, request.container_id, request.ifname)
    nl = node_nftables()
    for family in firewall_families(conf):
        # Each needed rule with the forms that count for it (older or the reference's).
        needed = [shared_rule_forms(rule) for rule, _first in shared_rules(conf, family)]
        needed += [list(forms) for forms in zip(attachment_rules(conf, family, comment),
                                                attachment_rules(conf, family, None))]
        if filter_table_is_legacy(nl, family):
            missing = [forms[0] for forms in needed
                       if not any(ipt_has_rule(family, r) for r in forms)]
        else:
            nfproto = NFPROTO_OF_FAMILY[family]
            if not chain_exists(nl, nfproto, FILTER_TABLE, conf.admin_chain):
                raise CNIError(ERR_INTERNAL,
                               "firewall admin chain %s is missing" % conf.admin_chain)
            chains = dict((chain, list_rules(nl, nfproto, FILTER_TABLE, chain))
                          for chain in [FORWARD_CHAIN] + firewall_chains(conf))
            missing = [forms[0] for forms in needed
                       if not any(nft_rule_present(chains[r.chain], r) for r in forms)]
        if missing:
            raise CNIError(ERR_INTERNAL, "firewall rules of %s are missing" % request.container_id,
                           "expected in chain %s: %s"
                           % (missing[0].chain, " ".join(missing[0].arguments())))
    return None


def firewall_status(request):
    """Ready whenever the config is valid: the rules need nothing that can run out."""
    FirewallConfig(request)
    return None


def firewall_gc(request):
    """Remove this network's per-address rules whose attachment is not valid, and isolation
    rules naming a bridge that no longer exists (the reference never removes those)."""
    conf = FirewallConfig(request)
    valid = valid_attachments(request.config)
    if valid is None:
        return None
    keep = set(attachment_comment_prefix(conf.network, cid, ifname) for cid, ifname in valid)
    network_prefix = FIREWALL_ATTACHMENT_COMMENT + sha512_hex(conf.network)[:16] + "-"
    owner_length = len(attachment_comment_prefix(conf.network, "", ""))
    policy_prefix = FIREWALL_POLICY_COMMENT.split("%")[0]
    links = set(link.name for link in list_links(NetlinkSocket()))

    def stale(comment):
        return comment.startswith(network_prefix) and comment[:owner_length] not in keep

    network_bytes = network_prefix.encode("utf-8", "surrogateescape")

    def doomed(chain, rule):
        if chain == FIREWALL_FORWARD_CHAIN:
            return rule.mentions(network_bytes) and stale(rule.match_comment)
        return rule.match_comment.startswith(policy_prefix) and any(
            name is not None and name not in links for name in (rule.iifname, rule.oifname))

    chains = (FIREWALL_FORWARD_CHAIN, FIREWALL_STAGE1_CHAIN, FIREWALL_STAGE2_CHAIN)
    nl = node_nftables()
    for family in (4, 6):
        if filter_table_is_legacy(nl, family):
            ipt_remove_rules(family, lambda chain, args: any(stale(a) for a in args))
        else:
            nft_remove_rules(nl, family, chains, doomed,
                             "failed to remove stale firewall rules of %s" % conf.network)
    return None


# ==============================================================================================
# The bandwidth plugin
# ==============================================================================================
# Chained after bridge, it shapes one attachment's traffic with token buckets, in the reference's
# layout (so either implementation CHECKs and DELs what the other made):
#   towards the container (ingressRate/ingressBurst): tbf 1: as the host veth's root qdisc;
#   from the container (egressRate/egressBurst): the host veth's ingress qdisc, on it a u32 filter
#   redirecting every packet (mirred) to an IFB device, bwp + 12 hex of SHA-512(network +
#   containerID), whose root tbf 1: shapes it.
# The config counts bits (rates in bits/s), the kernel bytes; the tbf arithmetic is the
# reference's, so the buffer and limit it checks are the ones we set.  The IFB is made with the
# attachment's alias in the same datagram (GC maps it back), and the qdiscs in one more, so an ADD
# killed anywhere leaves at most an IFB that DEL and GC remove; the host veth's qdiscs die with it.

BANDWIDTH_KEYS = ("ingressRate", "ingressBurst", "egressRate", "egressBurst")
IFB_PREFIX = "bwp"
TBF_LATENCY_USEC = 25000          # the reference's queue: 25 ms of traffic at the bucket's rate
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1


class TokenBucket(object):
    """One direction's shaping: `rate` bits/s and `burst` bits as configured, and the tbf
    parameters that say it to the kernel: rate in bytes/s, limit in bytes, buffer in ticks.

    The kernel counts the bucket in 32-bit scheduler ticks (about 274 s of traffic at the rate)
    and the queue in 32-bit bytes.  Runtimes exceed both: containerd asks for a burst of 2^32-1
    bits whatever the rate, which at 10 Mbit/s lasts 429 s.  Such a bucket or queue is clamped
    to the largest the kernel holds (the reference wraps it around to an arbitrary smaller one).
    """

    __slots__ = ("rate", "burst", "rate_bytes", "limit", "buffer")

    def __init__(self, rate, burst, direction, where):
        ticks_per_usec = scheduler_ticks_per_usec()
        self.rate, self.burst = rate, burst
        self.rate_bytes = rate // 8
        burst_bytes = burst // 8
        key = where + direction
        if self.rate_bytes == 0:
            raise config_error("%sRate must be at least 8 bits/s" % key,
                               "got %d: the kernel counts whole bytes" % rate)
        if burst_bytes == 0:
            raise config_error("%sBurst must be at least 8 bits" % key,
                               "got %d: the kernel counts whole bytes" % burst)
        if burst_bytes >= U32_MAX:
            raise config_error("%sBurst cannot be more than 4GB" % key, "got %d bits" % burst)
        # The reference's arithmetic, truncating as its conversions to uint32 do in range.
        usec = min(int(float(burst_bytes) * TIME_UNITS_PER_SEC / self.rate_bytes), U32_MAX)
        self.buffer = int(usec * ticks_per_usec)
        queued = int(float(self.rate_bytes) * TBF_LATENCY_USEC / TIME_UNITS_PER_SEC)
        self.limit = queued + burst_bytes
        if self.buffer == 0:
            raise config_error("%sBurst of %d bits passes in less than one tick of the kernel's "
                               "clock at %d bits/s" % (key, burst, rate),
                               "the kernel refuses an empty bucket: raise the burst")
        if self.buffer > U32_MAX:
            self.buffer = U32_MAX
            sys.stderr.write("bandwidth: %sBurst %d bits lasts longer at %d bits/s than the "
                             "kernel's token bucket holds: the bucket holds %.0f s\n"
                             % (key, burst, rate, U32_MAX / ticks_per_usec / TIME_UNITS_PER_SEC))
        if self.limit > U32_MAX:
            self.limit = U32_MAX
            sys.stderr.write("bandwidth: %sRate %d bits/s queues more than 4GB in %d ms: the queue "
                             "holds 4GB\n" % (key, rate, TBF_LATENCY_USEC // 1000))


class BandwidthConfig(object):
    """The bandwidth plugin's keys (reference names, matched case-insensitively).

    ingressRate, ingressBurst   bits/s and bits towards the container; 0 or absent: not shaped
    egressRate, egressBurst     bits/s and bits from the container; 0 or absent: not shaped
    runtimeConfig.bandwidth     the same four keys from the runtime (pod annotations through the
                                `bandwidth` capability); when present it replaces the four above
    """

    def __init__(self, request):
        c = request.config
        self.network = request.network
        entry = conf_get(request.runtime_config(), "bandwidth", dict)
        where = "runtimeConfig.bandwidth." if entry is not None else ""
        values = dict((key, conf_int(c if entry is None else entry, key, 0, U64_MAX, 0, where))
                      for key in BANDWIDTH_KEYS)
        self.ingress = self._bucket(values, "ingress", where)
        self.egress = self._bucket(values, "egress", where)

    @staticmethod
    def _bucket(values, direction, where):
        """The direction's TokenBucket, or None when neither its rate nor its burst is set."""
        rate, burst = values[direction + "Rate"], values[direction + "Burst"]
        if rate == 0 and burst == 0:
            return None
        if burst == 0 or rate == 0:
            given, missing = ("Rate", "Burst") if burst == 0 else ("Burst", "Rate")
            raise config_error("if %s%s%s is set, %s%s%s must also be set"
                               % (where, direction, given, where, direction, missing))
        return TokenBucket(rate, burst, direction, where)


def ifb_name(network, container_id):
    """The IFB device of a container on a network, named as the reference names it."""
    return (IFB_PREFIX + sha512_hex(network + container_id))[:15]


def node_interfaces(previous):
    """The names the prevResult gives to interfaces without a sandbox (bridge, host veth)."""
    return [i.get("name") for i in (previous or {}).get("interfaces") or ()
            if not i.get("sandbox") and isinstance(i.get("name"), str)]


def peer_of_container(host_nl, container_nl, ifname, listed):
    """The node's end of the container's veth `ifname`, or None when the container has no
    interface of that name.  A peer that the prevResult (`listed`) does not name is refused, as
    the reference refuses it: the chain made another interface than the one we would shape."""
    container = get_link(container_nl, ifname)
    if container is None:
        return None
    host = None
    if container.kind == "veth" and container.peer_elsewhere:
        host = get_link(host_nl, index=container.peer_index)
    if host is None or host.kind != "veth" or host.peer_index != container.index:
        raise CNIError(ERR_INVALID_CONFIG, "container interface %s has no veth peer on the node"
                       % ifname, "bandwidth shapes the veth pairs bridge makes")
    if listed and host.name not in listed:
        raise CNIError(ERR_INVALID_CONFIG, "the veth peer %s of container interface %s is not in "
                       "prevResult" % (host.name, ifname),
                       "prevResult lists %s" % ", ".join(listed))
    return host


def listed_port(host_nl, listed, alias):
    """The prevResult's interface that is a veth bridge port on the node (the one whose alias
    names the attachment, if several), or None."""
    ports = [link for link in (get_link(host_nl, name) for name in listed)
             if link is not None and link.kind == "veth" and link.master]
    ports.sort(key=lambda link: link.alias != alias)
    return ports[0] if ports else None


def ensure_ifb(nl, name, mtu, alias):
    """The IFB device `name`, up, with `mtu` and the attachment's alias; an existing one (a
    repeated ADD, an ADD killed after making it) is reused, a link of another kind refused."""
    ifb = get_link(nl, name)
    if ifb is None:
        create_ifb(nl, name, mtu, alias)
        ifb = get_link(nl, name)
    if ifb is None or ifb.kind != "ifb":
        raise CNIError(ERR_INVALID_CONFIG, "%r already exists but is not an IFB device" % name,
                       "it is a %s link: remove it" % (ifb.kind or "other") if ifb
                       else "it vanished")
    if not ifb.up or ifb.alias != alias or (mtu and ifb.mtu != mtu):
        nl.transact([link_change(ifb.index, up=True, extra=[(LinkAttr.IFLA_IFALIAS, alias)]
                                 + ([(LinkAttr.IFLA_MTU, mtu)] if mtu else []))],
                    "failed to set up IFB device %s" % name)
        ifb = get_link(nl, name)
    return ifb


def remove_shaping(nl, host, ifb):
    """Remove the attachment's qdiscs from `host` (when it is still there) and its IFB device
    `ifb` (a name); what is already gone is not an error."""
    if host is not None:
        for parent, handle, kind in ((TC_H_INGRESS, INGRESS_HANDLE, "ingress"),
                                     (TC_H_ROOT, TBF_HANDLE, "tbf")):
            qdisc = get_qdisc(nl, host.index, parent)
            if qdisc is None or qdisc.kind != kind or qdisc.handle != handle:
                continue
            try:
                nl.transact([qdisc_delete_request(host.index, handle, parent)],
                            "failed to remove the %s qdisc of %s" % (kind, host.name))
            except NetlinkError as err:
                if err.errno not in ALREADY_GONE:
                    raise
    link = get_link(nl, ifb)
    if link is not None and link.kind == "ifb":
        delete_link(nl, link.index, "failed to delete IFB device %s" % ifb)


def bandwidth_add(request):
    """Shape the attachment as the config says; the prevResult comes back with the IFB device
    appended (unchanged when nothing is shaped).  A failed ADD removes what it made."""
    conf = BandwidthConfig(request)
    previous = previous_result(request)
    if conf.ingress is None and conf.egress is None:
        return previous if previous is not None else {}
    if previous is None:
        raise CNIError(ERR_INVALID_CONFIG, "must be called as chained plugin",
                       "the config has no prevResult: list bandwidth after the plugin that makes "
                       "the interface")
    host_nl = NetlinkSocket()
    host = peer_of_container(host_nl, Netns(request.netns).netlink(), request.ifname,
                             node_interfaces(previous))
    if host is None:
        raise CNIError(ERR_INTERNAL, "container interface %s not found" % request.ifname)
    name = ifb_name(conf.network, request.container_id)
    ifb = None
    try:
        requests = []
        if conf.ingress is not None:
            requests.append(tbf_request(host.index, conf.ingress.rate_bytes, conf.ingress.limit,
                                        conf.ingress.buffer))
        if conf.egress is not None:
            ifb = ensure_ifb(host_nl, name, host.mtu,
                             attachment_alias(conf.network, request.container_id, request.ifname))
            requests += [tbf_request(ifb.index, conf.egress.rate_bytes, conf.egress.limit,
                                     conf.egress.buffer),
                         ingress_qdisc_request(host.index),
                         redirect_filter_request(host.index, ifb.index)]
        host_nl.transact(requests, "failed to shape the traffic of %s" % host.name)
    except BaseException:
        try:
            remove_shaping(host_nl, host, name)
        except CNIError as err:
            sys.stderr.write("rollback: %s\n" % err.msg)
        raise
    if ifb is not None:
        interfaces = [i for i in previous.get("interfaces") or () if i.get("name") != ifb.name]
        previous["interfaces"] = interfaces + [{"name": ifb.name, "mac": ifb.mac}]
    return previous


def bandwidth_del(request):
    """Best effort and idempotent: the namespace, the prevResult and the config's rates may all
    be gone or broken, and the IFB device and the host veth's qdiscs still go.

    The host veth is looked for where it costs least: the prevResult's bridge port (no
    namespace to enter), the container interface's peer, the bridge port with the attachment's
    alias.  When the namespace is gone, so is the veth pair, and only the IFB is left to remove.
    """
    network = request.network
    host_nl = NetlinkSocket()
    try:
        listed = node_interfaces(previous_result(request))
    except CNIError:
        listed = []
    alias = attachment_alias(network, request.container_id, request.ifname)
    host = listed_port(host_nl, listed, alias)
    if host is None and request.netns:
        try:
            host = peer_of_container(host_nl, Netns(request.netns).netlink(), request.ifname, ())
        except NetnsGone:
            pass
        except CNIError as err:
            sys.stderr.write("DEL: %s; removing the IFB device only\n" % err.msg)
    elif host is None:         # the bridge's port of the attachment, by its name or its alias
        host = find_host_veth(host_nl, network, request.container_id, request.ifname)
    remove_shaping(host_nl, host, ifb_name(network, request.container_id))
    return None


def bandwidth_check(request):
    """The qdiscs hold the config's rates: the host veth's tbf, the IFB (up) and its tbf, and the
    host veth's ingress filter redirecting to the IFB."""
    conf = BandwidthConfig(request)
    previous = previous_result(request)
    if previous is None:
        raise CNIError(ERR_INVALID_CONFIG, "must be called as a chained plugin",
                       "the config has no prevResult")
    host_nl = NetlinkSocket()
    host = peer_of_container(host_nl, Netns(request.netns).netlink(), request.ifname,
                             node_interfaces(previous))
    if host is None:
        raise CNIError(ERR_INTERNAL, "container interface %s not found" % request.ifname)
    if conf.ingress is not None:
        check_token_bucket(host_nl, host, conf.ingress, "ingress")
    if conf.egress is not None:
        name = ifb_name(conf.network, request.container_id)
        ifb = get_link(host_nl, name)
        if ifb is None or ifb.kind != "ifb":
            raise CNIError(ERR_INTERNAL, "IFB device %s of container %s not found"
                           % (name, request.container_id))
        if not ifb.up:
            raise CNIError(ERR_INTERNAL, "IFB device %s is down" % name)
        check_token_bucket(host_nl, ifb, conf.egress, "egress")
        if ifb.index not in redirect_targets(host_nl, host.index):
            raise CNIError(ERR_INTERNAL, "traffic from the container is not redirected to %s"
                           % name,
                           "%s has no ingress filter with a mirred redirect to it" % host.name)
    return None


def check_token_bucket(nl, link, bucket, direction):
    """The root qdisc of `link` is a tbf with the bucket's rate, limit and buffer."""
    qdisc = get_qdisc(nl, link.index, TC_H_ROOT)
    if qdisc is None or qdisc.kind != "tbf":
        raise CNIError(ERR_INTERNAL, "%s has no tbf qdisc for the %s rate" % (link.name, direction),
                       "its root qdisc is %s" % (qdisc.kind if qdisc else "absent"))
    for what, actual, wanted, unit in (("rate", qdisc.rate, bucket.rate_bytes, "bytes/s"),
                                       ("limit", qdisc.limit, bucket.limit, "bytes"),
                                       ("buffer", qdisc.buffer, bucket.buffer, "scheduler ticks")):
        if actual != wanted:
            raise CNIError(ERR_INTERNAL, "%s tbf %s of %s is %s %s, the config says %s"
                           % (direction, what, link.name, actual, unit, wanted),
                           "%sRate %d bits/s, %sBurst %d bits"
                           % (direction, bucket.rate, direction, bucket.burst))


def bandwidth_gc(request):
    """Remove the IFB devices of this network whose container is not among the valid attachments
    (their host veth, and its qdiscs, went with the container's namespace)."""
    valid = valid_attachments(request.config)
    if valid is None:
        return None
    # Whole aliases are compared, never parsed: a long identity's alias is a digest.
    keep = set(attachment_alias(request.network, cid, ifname) for cid, ifname in valid)
    prefixes = alias_network_prefixes(request.network)
    nl = NetlinkSocket()
    errors = []
    for link in list_links(nl):
        if link.kind == "ifb" and link.alias.startswith(prefixes):
            if link.alias not in keep:
                try:
                    delete_link(nl, link.index, "failed to delete IFB device %s" % link.name)
                except CNIError as err:
                    errors.append(err.msg)
    if errors:
        raise CNIError(ERR_INTERNAL, "bandwidth GC could not remove every stale IFB device",
                       "; ".join(errors))
    return None


# ==============================================================================================
# Serving a CNI request
# ==============================================================================================
# The plugins by name and the reference's checks of the environment and stdin, in its order.
# run_plugin is the one place where every failure becomes a CNI error JSON on stdout: no
# traceback ever reaches the runtime.  New plugins register in PLUGINS.

PLUGINS = {
    "bridge": {"ADD": bridge_add, "DEL": bridge_del, "CHECK": bridge_check,
               "STATUS": bridge_status, "GC": bridge_gc},
    "host-local": {"ADD": host_local_add, "DEL": host_local_del, "CHECK": host_local_check,
                   "STATUS": host_local_status, "GC": host_local_gc},
    "loopback": {"ADD": loopback_add, "DEL": loopback_del, "CHECK": loopback_check,
                 "STATUS": nothing_to_do, "GC": nothing_to_do},
    "portmap": {"ADD": portmap_add, "DEL": portmap_del, "CHECK": portmap_check,
                "STATUS": portmap_status, "GC": portmap_gc},
    "tuning": {"ADD": tuning_add, "DEL": tuning_del, "CHECK": tuning_check,
               "STATUS": tuning_status, "GC": tuning_gc},
    "firewall": {"ADD": firewall_add, "DEL": firewall_del, "CHECK": firewall_check,
                 "STATUS": firewall_status, "GC": firewall_gc},
    "bandwidth": {"ADD": bandwidth_add, "DEL": bandwidth_del, "CHECK": bandwidth_check,
                  "STATUS": nothing_to_do, "GC": bandwidth_gc},
}
# Plugins that speak only later spec versions (the reference firewall starts at 0.4.0).
FIRST_VERSION = {"firewall": "0.4.0"}
IPAM_IN_PROCESS.update(PLUGINS["host-local"])

# Which CNI_* variables each command needs (the reference's skel table).
REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "GC": ("CNI_PATH",),
    "STATUS": ("CNI_PATH",),
    "VERSION": (),
}
# The first config version that allows a command.
MIN_VERSION = {"CHECK": (0, 4, 0), "GC": (1, 1, 0), "STATUS": (1, 1, 0)}
MAX_STDIN = 64 << 20
STDIN_TIMEOUT = 10.0            # seconds for the runtime to write the config and close stdin


def read_stdin(wait_for_data):
    """All of stdin.  With `wait_for_data` false (VERSION) an idle stdin is not waited for long."""
    import select
    chunks = []
    size = 0
    if not wait_for_data:
        try:
            if posix.isatty(0) or not select.select([0], [], [], 1.0)[0]:
                return b""
        except (OSError, ValueError):     # stdin closed: VERSION needs no config
            return b""
    deadline = time.monotonic() + STDIN_TIMEOUT
    while True:
        try:
            ready = select.select([0], [], [], max(0.0, deadline - time.monotonic()))[0]
        except (OSError, ValueError):
            ready = True                # no pollable stdin: the read below says what it is
        if not ready:
            raise CNIError(ERR_TRY_AGAIN, "stdin was not closed within %g s" % STDIN_TIMEOUT,
                           "the runtime must write the network configuration and close stdin")
        try:
            chunk = posix.read(0, 1 << 16)
        except OSError as err:
            if err.errno == errno.EBADF and not wait_for_data:
                return b""
            closed = err.errno == errno.EBADF
            raise CNIError(ERR_IO, "error reading from stdin: %s" % err.strerror,
                           "stdin is closed or not open for reading" if closed else "")
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_STDIN:
            raise CNIError(ERR_IO, "error reading from stdin: more than %d bytes" % MAX_STDIN)
        chunks.append(chunk)


def plugin_versions(plugin):
    """The spec versions `plugin` speaks."""
    first = SUPPORTED_VERSIONS.index(FIRST_VERSION.get(plugin, SUPPORTED_VERSIONS[0]))
    return list(SUPPORTED_VERSIONS[first:])


def version_answer(plugin):
    """VERSION's answer: a constant per plugin, as the reference's is (its library's version,
    whatever stdin holds).  Being constant, it is also printed by the archive's /bin/sh preamble
    without starting Python (build.sh takes the bytes from here), and the two paths agree byte
    for byte.  stdin is still read, so that a runtime writing a large config sees no EPIPE."""
    try:
        read_stdin(False)
    except CNIError:
        pass
    return {"cniVersion": LATEST_VERSION, "supportedVersions": plugin_versions(plugin)}


def check_plugin_version(plugin, request):
    """Refuse a config version older than the plugin speaks, with the reference's words."""
    supported = plugin_versions(plugin)
    if request.version not in supported:
        raise CNIError(ERR_INCOMPATIBLE_VERSION, "incompatible CNI versions",
                       "config is %s, plugin supports %s"
                       % (json_dumps(request.version), json_dumps(supported)))


def build_request(command, env):
    """Validate the environment and stdin in the reference's order; the Request to act on."""
    try:
        container_id, ifname, args = checked_environment(command, env)
    except CNIError as err:
        raise in_config_version(err)
    raw = read_stdin(True)
    try:
        config = json_loads(raw)
    except (ValueError, UnicodeError) as err:
        raise CNIError(ERR_DECODE, "error unmarshall network config: %s" % err)
    if not isinstance(config, dict):
        raise CNIError(ERR_DECODE,
                       "error unmarshall network config: the configuration must be a JSON object")
    try:
        return _validated_request(command, env, container_id, ifname, args, raw, config)
    except CNIError as err:
        version = conf_lookup(config, "cniVersion")
        if version in SUPPORTED_VERSIONS:
            err.version = version                   # answer in the caller's version when known
        raise


def checked_environment(command, env):
    """The container ID, interface name and CNI_ARGS of a request, each checked."""
    required = REQUIRED_ENV[command]
    missing = [name for name in required if not env.get(name)]
    if missing:
        raise CNIError(ERR_INVALID_ENV, "required env variables [%s] missing" % ",".join(missing))
    container_id = env.get("CNI_CONTAINERID", "")
    ifname = env.get("CNI_IFNAME", "")
    if "CNI_CONTAINERID" in required:
        check_name(container_id, "containerID", ERR_INVALID_ENV)
        check_ifname(ifname)
    return container_id, ifname, parse_cni_args(env.get("CNI_ARGS", ""))


def in_config_version(err):
    """`err`, found before the config was read, to be answered in the config's own cniVersion
    when stdin holds a readable config (without waiting long for an idle stdin)."""
    try:
        config = json_loads(read_stdin(False))
    except (ValueError, UnicodeError, CNIError):
        return err
    if isinstance(config, dict) and config.get("cniVersion") in SUPPORTED_VERSIONS:
        err.version = config["cniVersion"]
    return err


def _validated_request(command, env, container_id, ifname, args, raw, config):
    """The Request, once the configuration's name and version pass the reference's checks."""
    name = conf_lookup(config, "name")
    if not name:
        raise CNIError(ERR_INVALID_CONFIG, "missing network name")
    if not isinstance(name, str):
        raise CNIError(ERR_DECODE, "error unmarshall network config: name must be a string")
    check_name(name, "network name", ERR_INVALID_CONFIG)
    version = conf_lookup(config, "cniVersion")
    version = "" if version is None else version
    if not isinstance(version, str):
        raise CNIError(ERR_DECODE, "error unmarshall network config: cniVersion must be a string")
    if command in MIN_VERSION:
        if parse_version(version) < MIN_VERSION[command]:
            raise CNIError(ERR_INCOMPATIBLE_VERSION, "config version does not allow %s" % command,
                           "%s needs cniVersion %s or later"
                           % (command, ".".join(map(str, MIN_VERSION[command]))))
    if (version or "0.1.0") not in SUPPORTED_VERSIONS:
        raise CNIError(ERR_INCOMPATIBLE_VERSION, "incompatible CNI versions",
                       "config is %s, plugin supports %s" % (json_dumps(version[:50]),
                                                             json_dumps(list(SUPPORTED_VERSIONS))))
    return Request(command, container_id, env.get("CNI_NETNS", ""), ifname, args,
                   env.get("CNI_PATH", ""), config, version or "0.1.0", stdin=raw, env=env)


def check_netns_target(request):
    """Refuse, before changing anything, an ADD or CHECK aimed at the plugin's own namespace (for
    every plugin, as the reference library does; those acting inside the namespace check again on
    the fd they then hold).  DEL goes on: it releases what lies outside the namespace."""
    if request.netns and request.command in ("ADD", "CHECK"):
        try:
            container_netns(request).close()
        except NetnsIsOwn:
            raise
        except CNIError:
            pass                # a missing or odd path is the plugin's to report


def write_json(obj):
    """Print one JSON document on stdout (unbuffered: the process may end with posix._exit)."""
    posix.write(1, (json_dumps(obj) + "\n").encode())


def run_plugin(plugin, env):
    """Serve one CNI request as `plugin` with environment `env`; returns the exit status."""
    command = env.get("CNI_COMMAND", "")
    if not command:
        # The reference's first line; nerdctl parses its version (semver) to pick firewall features.
        sys.stderr.write("CNI %s plugin v%s\ncni-bridge %s; CNI protocol versions supported: %s\n"
                         % (plugin, REFERENCE_RELEASE, PROGRAM_VERSION,
                            ", ".join(plugin_versions(plugin))))
        return 0
    error_version = LATEST_VERSION
    try:
        if command not in REQUIRED_ENV:
            raise in_config_version(CNIError(ERR_INVALID_ENV,
                                             "unknown CNI_COMMAND: %s" % command[:100]))
        if command == "VERSION":
            write_json(version_answer(plugin))
            return 0
        request = build_request(command, env)
        error_version = request.version
        check_plugin_version(plugin, request)
        check_netns_target(request)
        result = PLUGINS[plugin][command](request)
        if result is not None:
            write_json(encode_result(result, request.version))
        return 0
    except CNIError as err:
        write_json(err.to_json(getattr(err, "version", error_version)))
    except ImportError as err:    # python3-minimal: a module of libpython3.X-stdlib this path needs
        version = sys.version_info[:2]
        write_json(CNIError(ERR_INTERNAL, "this Python %d.%d lacks the module %s"
                            % (version + (err.name,)),
                            "install libpython%d.%d-stdlib (Debian, Ubuntu)" % version)
                   .to_json(error_version))
    except UnicodeError as err:   # a config string no file name or interface name can hold
        write_json(config_error("a string is not valid UTF-8",
                            str(err)[:200]).to_json(error_version))
    except Exception as err:  # a bug: still answer in CNI form, never with a traceback on stdout
        tb = err.__traceback__
        while tb.tb_next:
            tb = tb.tb_next
        sys.stderr.write("internal error: %s: %s (line %d)\n" % (type(err).__name__, err,
                                                                 tb.tb_lineno))
        write_json(CNIError(ERR_INTERNAL, "internal error: %s" % err).to_json(error_version))
    return 1


# ==============================================================================================
# Operator tools: install
# ==============================================================================================
# `install` copies the zipapp into a directory atomically and links every plugin name to it.

def archive_path():
    """The zipapp this module runs from, or None when it runs from a plain file."""
    import os
    archive = os.path.dirname(os.path.abspath(__file__))
    return archive if os.path.isfile(archive) else None


def install(directory, force):
    """Copy the zipapp into `directory` atomically and link every plugin name to it."""
    import os
    source = archive_path()
    if source is None:
        raise CNIError(ERR_INVALID_CONFIG,
                       "install works from the built zipapp: run ./build.sh first")
    target_name = os.path.basename(source)
    if not os.path.isdir(directory):
        make_directories(directory)
    for name in PLUGINS:
        path = os.path.join(directory, name)
        if is_directory(path, follow=False):        # rename() cannot put a link in its place
            raise CNIError(ERR_INVALID_CONFIG, "%s is a directory; remove it first (--force "
                           "replaces files and links, never a directory)" % path)
        if os.path.lexists(path) and not os.path.islink(path) and not force:
            raise CNIError(ERR_INVALID_CONFIG,
                           "%s exists and is not a symlink; use --force to replace it" % path)
    temp = os.path.join(directory, ".%s.%d" % (target_name, posix.getpid()))
    with open(source, "rb") as src, open(temp, "wb") as dst:
        dst.write(src.read())
    posix.chmod(temp, 0o755)
    posix.rename(temp, os.path.join(directory, target_name))
    for name in PLUGINS:
        link_temp = os.path.join(directory, ".%s.%d" % (name, posix.getpid()))
        posix.symlink(target_name, link_temp)
        try:
            posix.rename(link_temp, os.path.join(directory, name))
        except OSError:
            posix.unlink(link_temp)
            raise
    sys.stdout.write("installed %s with %s in %s\n" % (target_name, ", ".join(sorted(PLUGINS)),
                                                       directory))


# ==============================================================================================
# Operator tools: verify
# ==============================================================================================
# `verify` runs the README's walkthrough on throwaway namespaces: ADD, read back from the kernel,
# ping the gateway, CHECK, a host port mapped by portmap and reached from a third namespace
# outside the node, DEL, nothing left.  Each step is a Verifier method whose inputs are
# its arguments and whose outcome is its return value (a detail text and what later steps
# need), so each can be run and tested alone; `verify` only chains them.  The plugin runs in a
# forked child inside the node namespace, as a runtime would exec it there.

# conf/10-mynet.conf, for `verify` run away from a checkout.
BUILTIN_CONFIG = """{
  "cniVersion": "0.4.0", "name": "mynet", "type": "bridge", "bridge": "cni0",
  "isGateway": true, "ipMasq": true,
  "ipam": {"type": "host-local", "subnet": "172.19.0.0/24", "routes": [{"dst": "0.0.0.0/0"}]}
}"""
ICMP_ECHO = {4: (8, 0), 6: (128, 129)}         # family -> (request type, reply type)
VERIFY_NETNS_PREFIX = "cbv-"                   # the prefix of the throwaway namespaces' names
# The outside namespace's link to the node (TEST-NET-1), and the port verify maps.
VERIFY_OUTSIDE = {"node": Prefix(4, 0xC0000201, 24), "outside": Prefix(4, 0xC0000202, 24)}
VERIFY_HOST_PORT, VERIFY_CONTAINER_PORT = 8080, 80


def run_plugin_in(netns_fd, plugin, env, stdin):
    """Run `plugin` on one request in a child process inside namespace `netns_fd`, as a runtime
    would exec it; returns (exit status, stdout, stderr)."""
    pipes = [posix.pipe() for _ in range(3)]
    pid = posix.fork()
    if pid == 0:
        status = 1
        try:
            setns(netns_fd)
            PROCESS.reset()         # the child starts over in the node namespace
            for fd, (r, w) in enumerate(pipes):
                posix.dup2(r if fd == 0 else w, fd)
            for r, w in pipes:          # else stdin never reaches end of file
                posix.close(r)
                posix.close(w)
            status = run_plugin(plugin, env)
            sys.stderr.flush()
        finally:
            posix._exit(status)
    posix.close(pipes[0][0])
    posix.close(pipes[1][1])
    posix.close(pipes[2][1])
    posix.write(pipes[0][1], stdin)
    posix.close(pipes[0][1])
    outputs = []
    for fd in (pipes[1][0], pipes[2][0]):
        chunks = []
        while True:
            chunk = posix.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        posix.close(fd)
        outputs.append(b"".join(chunks).decode("utf-8", "replace"))
    status = posix.waitpid(pid, 0)[1]
    return (posix.WEXITSTATUS(status) if posix.WIFEXITED(status) else 128), outputs[0], outputs[1]


def icmp_checksum(data):
    """The Internet checksum (RFC 1071) of an ICMP message."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping(ns, family, address, timeout=5.0, interval=0.2):
    """Send ICMP echoes from inside `ns` to `address`, one every `interval` seconds until one is
    answered (a new IPv6 gateway answers only once its duplicate address detection is over);
    returns the round trip of the answered echo in ms."""
    request_type, reply_type = ICMP_ECHO[family]
    import _socket
    with ns.entered():
        sock = _socket.socket(AF_OF_FAMILY[family], _socket.SOCK_RAW,
                              _socket.IPPROTO_ICMP if family == 4 else _socket.IPPROTO_ICMPV6)
    try:
        ident = posix.getpid() & 0xFFFF
        deadline = time.monotonic() + timeout
        sequence = 0
        while time.monotonic() < deadline:
            sequence += 1
            body = struct.pack("!HH", ident, sequence) + b"cni-bridge verify"
            header = struct.pack("!BBH", request_type, 0, 0)
            packet = struct.pack("!BBH", request_type, 0, icmp_checksum(header + body)) + body
            sent = time.monotonic()
            try:
                sock.sendto(packet, (address, 0))
            except OSError:
                pass                    # no route yet: the next echo tries again
            until = min(sent + interval, deadline)
            while time.monotonic() < until:
                sock.settimeout(max(0.001, until - time.monotonic()))
                try:
                    data = sock.recv(2048)
                except _socket.timeout:
                    break
                if family == 4:
                    data = data[(data[0] & 0x0F) * 4:]     # raw IPv4 sockets include the IP header
                if data[0] == reply_type and struct.unpack("!HH", data[4:8]) == (ident, sequence):
                    return (time.monotonic() - sent) * 1000
        raise OSError(errno.ETIMEDOUT, "no echo reply within %g s" % timeout)
    finally:
        sock.close()


class PluginRunner(object):
    """How the walkthrough calls the plugin: `plugin` from the node namespace `node`, with the
    CNI environment `env` (CNI_COMMAND added per call)."""

    def __init__(self, node, plugin, env):
        self.node = node
        self.plugin = plugin
        self.env = env

    def call(self, command, stdin):
        """Run one command; its stdout, or a CNIError with what the plugin printed."""
        status, out, err = run_plugin_in(self.node.fd, self.plugin,
                                         dict(self.env, CNI_COMMAND=command), stdin)
        if status != 0:
            raise CNIError(ERR_INTERNAL, "%s failed (exit %d): %s%s"
                           % (command, status, out.strip(), err.strip()))
        return out.strip()


class Verifier(object):
    """The walkthrough's steps and the record of their outcomes.

    step() runs one step method and records its name, success, duration and detail.  Every step
    method returns (detail text, value for later steps) and raises CNIError or OSError on
    failure; its inputs are its arguments.
    """

    def __init__(self, as_json):
        self.as_json = as_json
        self.steps = []

    def say(self, text):
        """Print a line of the report (nothing in --json mode)."""
        if not self.as_json:
            posix.write(1, (text + "\n").encode("utf-8"))

    def step(self, name, action, *args):
        """Run action(*args); record the outcome.  The step's value, or None when it failed."""
        start = time.monotonic()
        try:
            detail, value = action(*args)
            ok = True
        except (CNIError, OSError) as err:
            detail, value, ok = getattr(err, "msg", None) or str(err), None, False
        elapsed = (time.monotonic() - start) * 1000
        self.steps.append({"step": name, "ok": ok, "ms": round(elapsed, 1), "detail": detail or ""})
        self.say("  %s %-58s %8.1f ms" % ("\u2713" if ok else "\u2717", name, elapsed))
        for line in (detail or "").splitlines():
            self.say("      " + line)
        return value

    @staticmethod
    def make_namespaces(node_path, ctr_path, outside_path):
        """The node, container and outside namespaces, lo up on the node, the outside one linked
        to the node (192.0.2.0/24); value (node, container, outside)."""
        for path in (node_path, ctr_path, outside_path):
            create_named_netns(path)
        node, ctr, outside = Netns(node_path), Netns(ctr_path), Netns(outside_path)
        nl, outside_nl = node.netlink(), outside.netlink()
        set_link(nl, get_link(nl, "lo").index, "failed to set lo up", up=True)
        create_veth(nl, "cbvout0", "out0", outside.fd)
        for link_nl, name, prefix in ((nl, "cbvout0", VERIFY_OUTSIDE["node"]),
                                      (outside_nl, "out0", VERIFY_OUTSIDE["outside"])):
            link = get_link(link_nl, name)
            link_nl.transact([addr_request(link.index, prefix, nodad=True),
                              link_change(link.index, up=True)], "failed to set up %s" % name)
        return ("node %s, container %s, outside %s" % (node_path, ctr_path, outside_path),
                (node, ctr, outside))

    @staticmethod
    def add(runner, stdin, version):
        """ADD; value (the result as printed, the result in internal form)."""
        result = json_loads(runner.call("ADD", stdin))
        return json_dumps(result), (result, decode_result(result, version))

    @staticmethod
    def read_back(ctr, ifname, expected):
        """The container interface is up and holds the `expected` addresses ("ip/len")."""
        nl = ctr.netlink()
        link = get_link(nl, ifname)
        if link is None:
            raise CNIError(ERR_INTERNAL, "the container has no %s" % ifname)
        addrs = [str(a.prefix) for a in list_addrs(nl, link.index) if a.scope != RT_SCOPE_LINK]
        missing = [a for a in expected if a not in addrs]
        if missing or not link.up:
            raise CNIError(ERR_INTERNAL, "%s is %s with %s; expected %s"
                           % (ifname, "up" if link.up else "down", addrs, expected))
        routes = ["%s via %s" % (r.dst.network_text(), ip_to_text(*r.gateway))
                  for family in (4, 6) for r in list_routes(nl, family)
                  if r.oif == link.index and r.gateway]
        return "%s %s up, mac %s, addresses %s%s" % (
            ifname, link.kind, link.mac, ", ".join(addrs),
            ("; routes " + ", ".join(routes)) if routes else ""), True

    @staticmethod
    def ping_gateway(ctr, ips):
        """The first gateway of the result's `ips` answers an echo from the container."""
        for ip in ips:
            if ip.get("gateway"):
                family, _ = parse_ip(ip["gateway"])
                return "%s answered in %.2f ms" % (ip["gateway"],
                                                   ping(ctr, family, ip["gateway"])), True
        return "no gateway in the result: nothing to ping", True

    @staticmethod
    def check(runner, config, version, result):
        """CHECK with the ADD's result as prevResult (where the version has CHECK)."""
        if parse_version(version) < MIN_VERSION["CHECK"]:
            return "cniVersion %s has no CHECK" % version, True
        runner.call("CHECK", json_dumps(dict(config, prevResult=result)).encode())
        return "", True

    @staticmethod
    def map_port(runner, ctr, outside, config, version, result):
        """portmap ADD (and CHECK) of VERIFY_HOST_PORT to the container, then a TCP connection
        from the outside namespace to the node's address reaches a listener in the container;
        value: the portmap config, for DEL.  Versions without prevResult skip it."""
        if is_legacy_version(version):
            return "cniVersion %s has no prevResult to chain portmap to" % version, None
        if config.get("type") == "loopback":
            return "loopback gives the container no address to map a port to", None
        container_ip = next((Prefix.parse(ip["address"]) for ip in result.get("ips") or []
                             if address_family_of(ip["address"]) == 4), None)
        if container_ip is None:
            return "no IPv4 address in the result: nothing to map", None
        # Without a default route the container cannot answer the outside: masquerade it all.
        routed = any(r.get("dst") == "0.0.0.0/0" for r in result.get("routes") or [])
        mapping = {"hostPort": VERIFY_HOST_PORT, "containerPort": VERIFY_CONTAINER_PORT,
                   "protocol": "tcp"}
        mapped = {"cniVersion": version, "name": config.get("name", ""), "type": "portmap",
                  "masqAll": not routed, "runtimeConfig": {"portMappings": [mapping]}}
        runner.call("ADD", json_dumps(dict(mapped, prevResult=result)).encode())
        if parse_version(version) >= MIN_VERSION["CHECK"]:
            runner.call("CHECK", json_dumps(dict(mapped, prevResult=result)).encode())
        import _socket
        with ctr.entered():
            listener = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        with outside.entered():
            client = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        try:
            listener.bind(("0.0.0.0", VERIFY_CONTAINER_PORT))
            listener.listen(1)
            listener.settimeout(3.0)
            client.settimeout(3.0)
            node_ip = ip_to_text(4, VERIFY_OUTSIDE["node"].ip)
            client.connect((node_ip, VERIFY_HOST_PORT))
            fd, peer = listener._accept()      # _socket's accept: a file descriptor
            conn = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM, 0, fd)
            conn.sendall(b"ok")
            conn.close()
            if client.recv(2) != b"ok":
                raise OSError(errno.ECONNRESET, "the connection through the mapping broke")
        except OSError as err:
            raise CNIError(ERR_INTERNAL, "connecting to %s:%d from outside the node failed: %s"
                           % (ip_to_text(4, VERIFY_OUTSIDE["node"].ip), VERIFY_HOST_PORT,
                              err.strerror or err))
        finally:
            listener.close()
            client.close()
        return ("%s -> %s:%d reached %s:%d in the container, from %s"
                % (ip_to_text(4, VERIFY_OUTSIDE["outside"].ip), node_ip, VERIFY_HOST_PORT,
                   ip_to_text(4, container_ip.ip), VERIFY_CONTAINER_PORT, peer[0])), mapped

    @staticmethod
    def delete(runner, config, result, portmap_runner=None, mapped=None):
        """DEL with the ADD's result as prevResult (portmap's first, as a runtime goes back)."""
        if mapped is not None:
            portmap_runner.call("DEL", json_dumps(dict(mapped, prevResult=result)).encode())
        runner.call("DEL", json_dumps(dict(config, prevResult=result)).encode())
        return "", True

    @staticmethod
    def nothing_left(node, ctr, attachment, host_veth, network_dir):
        """No container interface, host veth, reservation or masquerade rule is left.
        `attachment` is (network, container ID, ifname)."""
        network, container_id, ifname = attachment
        left = []
        link = get_link(ctr.netlink(), ifname)
        if link is not None and (ifname != "lo" or link.up):     # loopback's DEL takes lo down
            left.append("%s in the container" % ifname)
        if host_veth and get_link(node.netlink(), host_veth) is not None:
            left.append("host veth %s" % host_veth)
        if is_directory(network_dir):
            left.extend("reservation %s" % name for name in posix.listdir(network_dir)
                        if name not in ("lock", BOOT_ID_FILE)
                        and not name.startswith(LAST_RESERVED_PREFIX))
        nft = node.netlink(NETLINK_NETFILTER)
        instance = masq_instance_hash(network, container_id, ifname)
        left.extend("masquerade rule %d" % r.handle
                    for r in rules_commented(nft, NFPROTO_INET, MASQ_TABLE, MASQ_CHAIN, instance))
        mapping = portmap_comment(network, container_id, ifname)
        left.extend("port mapping rule %d" % r.handle for family in (NFPROTO_IPV4, NFPROTO_IPV6)
                    for r in list_rules(nft, family, PORTMAP_TABLE) if r.comment == mapping)
        if left:
            raise CNIError(ERR_INTERNAL, "left behind: " + ", ".join(left))
        return ("no %s, no host veth, no reservation, no masquerade or port mapping rule"
                % ifname), True

    @staticmethod
    def remove_namespaces(namespaces, paths, data_dir):
        """Close and remove the namespaces made, and the throwaway dataDir."""
        for ns in namespaces:
            ns.close()
        for path in paths:
            if posix.access(path, posix.F_OK):
                remove_named_netns(path)
        if is_directory(data_dir):
            remove_tree(data_dir)
        return "", True


def load_verify_config(config_path):
    """The config `verify` drives (a .conflist's first plugin) and where it came from."""
    if config_path is None and posix.access("conf/10-mynet.conf", posix.F_OK):
        config_path = "conf/10-mynet.conf"
    text = open(config_path).read() if config_path else BUILTIN_CONFIG
    config = json_loads(text)
    if not isinstance(config, dict):
        raise ValueError("the configuration must be a JSON object")
    if "plugins" in config:        # a .conflist: the walkthrough drives its first plugin
        plugins = config["plugins"]
        if not isinstance(plugins, list) or not plugins or not isinstance(plugins[0], dict):
            raise ValueError("`plugins` must be a non-empty list of plugin objects")
        plugin_config = dict(plugins[0])
        plugin_config.update(cniVersion=config.get("cniVersion", ""), name=config.get("name", ""))
        config = plugin_config
    return config, config_path


def verify(config_path, keep, as_json):
    """The walkthrough: namespaces, ADD, read back, ping, CHECK, DEL, nothing left."""
    import os
    try:
        import _ctypes      # noqa: F401  (the throwaway namespaces are mounted through libc)
    except ImportError:
        raise missing_ctypes("mount")
    try:
        config, config_path = load_verify_config(config_path)
    except (OSError, ValueError) as err:
        sys.stderr.write("verify: cannot read %s: %s\n" % (config_path, err))
        return 2
    if config.get("type") not in PLUGINS:
        sys.stderr.write("verify: type %s is not one of this program's plugins (%s)\n"
                         % (json_dumps(config.get("type")), ", ".join(sorted(PLUGINS))))
        return 2
    prefix = os.environ.get("CNI_BRIDGE_VERIFY_PREFIX", VERIFY_NETNS_PREFIX)
    tag = posix.urandom(4).hex()
    node_name, ctr_name = "%snode-%s" % (prefix, tag), "%sctr-%s" % (prefix, tag)
    outside_name = "%sout-%s" % (prefix, tag)
    node_path, ctr_path = "/run/netns/" + node_name, "/run/netns/" + ctr_name
    outside_path = "/run/netns/" + outside_name
    data_dir = "/run/cni-bridge-verify-" + tag
    if isinstance(config.get("ipam"), dict):
        config["ipam"] = dict(config["ipam"], dataDir=data_dir)
    version = config.get("cniVersion") or "0.1.0"
    # loopback brings up the namespace's `lo` whatever CNI_IFNAME says: that is what to read back.
    attachment = (config.get("name", ""), "verify-" + tag,
                  "lo" if config.get("type") == "loopback" else "eth0")
    env = {"CNI_CONTAINERID": attachment[1], "CNI_NETNS": ctr_path, "CNI_IFNAME": attachment[2],
           "CNI_PATH": os.path.dirname(archive_path() or os.path.abspath(__file__)),
           "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    v = Verifier(as_json)
    v.say("cni-bridge verify: %s (network %s, type %s, cniVersion %s)"
          % (config_path or "built-in conf/10-mynet.conf", config.get("name"), config.get("type"),
             version))
    namespaces = v.step("create namespaces", v.make_namespaces, node_path, ctr_path,
                        outside_path) or ()
    if namespaces:
        node, ctr, outside = namespaces
        runner = PluginRunner(node, config.get("type", ""), env)
        portmap_runner = PluginRunner(node, "portmap", env)
        added = v.step("ADD", v.add, runner, json_dumps(config).encode(), version)
        if added:
            result, internal = added
            interfaces = internal.get("interfaces") or []
            host_veth = (interfaces[RESULT_HOST_VETH]["name"]
                         if len(interfaces) > RESULT_HOST_VETH else None)
            done = (v.step("container interface read back from the kernel", v.read_back, ctr,
                           attachment[2], [ip["address"] for ip in internal["ips"]])
                    and v.step("ping the gateway from the container", v.ping_gateway, ctr,
                               internal["ips"])
                    and v.step("CHECK", v.check, runner, config, version, result))
            mapped = done and v.step("map host port %d, connect to it from outside the node"
                                     % VERIFY_HOST_PORT, v.map_port, portmap_runner, ctr, outside,
                                     config, version, internal)
            done = done and v.steps[-1]["ok"]
            if done and not keep and v.step("DEL", v.delete, runner, config, result,
                                            portmap_runner, mapped):
                v.step("nothing left behind", v.nothing_left, node, ctr, attachment, host_veth,
                       os.path.join(data_dir, attachment[0]))
    if keep:
        v.say("kept for inspection:\n  ip netns exec %s ip addr\n  ip netns exec %s ip addr\n"
              "  ip netns exec %s nft list ruleset\n"
              "remove with: ip netns del %s; ip netns del %s; ip netns del %s; rm -r %s"
              % (node_name, ctr_name, node_name, node_name, ctr_name, outside_name, data_dir))
    else:
        v.step("remove namespaces", v.remove_namespaces, namespaces,
               (node_path, ctr_path, outside_path), data_dir)
    failed = [s for s in v.steps if not s["ok"]]
    if as_json:
        write_json({"config": config_path or "built-in", "ok": not failed, "steps": v.steps,
                    "kept": [node_path, ctr_path, outside_path] if keep else []})
    else:
        v.say("verify: %s" % ("all %d steps passed" % len(v.steps) if not failed
                              else "FAILED at: " + failed[0]["step"]))
    return 1 if failed else 0


# ==============================================================================================
# Operator tools: network commands
# ==============================================================================================
# add, check, del, status and gc drive a network's plugin chain from the runtime's side, like
# the CNI project's cnitool: configs from NETCONFPATH, plugins from CNI_PATH, prevResult threaded
# through ADD, DEL in reverse order with the cached result, capability args from CAP_ARGS.
# Results are cached in libcni's format and place (CNI_CACHE_DIR, default /var/lib/cni), so
# attachments made here and by containerd or podman are interchangeable.  One function per
# command, over NetworkCall, which holds what every command needs.

DEFAULT_CACHE_DIR = "/var/lib/cni"


def results_cache_dir(env):
    """libcni's result cache: <cache dir>/results."""
    return env.get("CNI_CACHE_DIR", DEFAULT_CACHE_DIR).rstrip("/") + "/results"


def split_cni_args(text):
    """CNI_ARGS as the (key, value) pairs libcni records, keys as written; checked by
    parse_cni_args's rule (every piece KEY=VALUE)."""
    parse_cni_args(text, warn=False)
    return [list(piece.split("=", 1)) for piece in text.split(";") if piece]


def load_network_list(name, conf_dir):
    """The network `name` from `conf_dir` as libcni finds it: *.conflist files (sorted) first,
    then single-plugin *.conf/*.json files made into a list."""
    import os
    try:
        files = sorted(posix.listdir(conf_dir))
    except OSError as err:
        raise CNIError(ERR_INVALID_CONFIG,
                       "cannot read NETCONFPATH %s: %s" % (conf_dir, err.strerror))
    for suffixes in ((".conflist",), (".conf", ".json")):
        for filename in files:
            if not filename.endswith(suffixes):
                continue
            path = os.path.join(conf_dir, filename)
            try:
                with open(path, "rb") as f:
                    raw = f.read()
                conf = json_loads(raw)
            except (OSError, ValueError) as err:
                sys.stderr.write("skipping %s: %s\n" % (path, err))
                continue
            if not isinstance(conf, dict) or conf_lookup(conf, "name") != name:
                continue
            if "plugins" not in conf:
                conf = {"cniVersion": conf_lookup(conf, "cniVersion") or "", "name": name,
                        "plugins": [conf]}
            if not isinstance(conf["plugins"], list) or not conf["plugins"]:
                raise CNIError(ERR_INVALID_CONFIG, "%s: `plugins` must be a non-empty list" % path)
            return conf, raw
    raise CNIError(ERR_INVALID_CONFIG, "no network %r in %s" % (name, conf_dir))


def capability_args(text):
    """CAP_ARGS: a JSON object of capability arguments (cnitool's format)."""
    try:
        value = json_loads(text)
    except (ValueError, UnicodeError) as err:
        raise CNIError(ERR_DECODE, "CAP_ARGS is not valid JSON: %s" % err)
    if not isinstance(value, dict):
        raise CNIError(ERR_DECODE, "CAP_ARGS must be a JSON object, such as "
                       '{"portMappings": [...]}')
    return value


class NetworkCall(object):
    """What every network command needs, read from the environment `env` as cnitool does: the
    network's config list, the attachment (container ID derived from the netns path, CNI_IFNAME),
    CAP_ARGS, CNI_ARGS, CNI_PATH and the result cache."""

    def __init__(self, network, netns, env):
        self.network = network
        self.netns = netns
        self.env = env
        self.conf, self.raw = load_network_list(network, env.get("NETCONFPATH", "/etc/cni/net.d"))
        self.version = conf_lookup(self.conf, "cniVersion") or ""
        self.ifname = env.get("CNI_IFNAME", "eth0")
        self.container_id = "cnitool-" + sha512_hex(netns)[:20]
        self.capability_args = capability_args(env.get("CAP_ARGS") or "{}")
        self.cni_args = split_cni_args(env.get("CNI_ARGS", ""))
        self.cni_path = env.get("CNI_PATH", "/opt/cni/bin")
        self.cache_dir = results_cache_dir(env)

    @property
    def plugins(self):
        """The network's plugin configs, in chain order."""
        return self.conf["plugins"]

    def allows(self, command):
        """Whether the network's cniVersion has `command` (CHECK from 0.4.0, GC, STATUS 1.1.0)."""
        minimum = MIN_VERSION.get(command)
        return not minimum or parse_version(self.version) >= minimum

    def invoke(self, plugin, command, extra=None, attachment=True):
        """Run one plugin of the chain; its output.  `extra` keys go into its config (prevResult,
        cni.dev/valid-attachments); STATUS and GC concern no attachment."""
        config = dict(plugin, cniVersion=self.version, name=self.network)
        config.pop("capabilities", None)
        wanted = plugin.get("capabilities") or {}
        runtime = dict((k, v) for k, v in self.capability_args.items() if wanted.get(k))
        if runtime:
            config["runtimeConfig"] = runtime
        config.update(extra or {})
        env = dict(self.env, CNI_COMMAND=command, CNI_PATH=self.cni_path,
                   CNI_CONTAINERID=self.container_id if attachment else "",
                   CNI_NETNS=self.netns if attachment else "",
                   CNI_IFNAME=self.ifname if attachment else "")
        return invoke_plugin(plugin.get("type", ""), self.cni_path, env,
                             json_dumps(config).encode())

    def cache_path(self):
        """The attachment's file in the result cache."""
        return "%s/%s-%s-%s" % (self.cache_dir, self.network, self.container_id, self.ifname)

    def cached_result(self):
        """The result cached by `add`, or None."""
        try:
            with open(self.cache_path(), "rb") as f:
                entry = json_loads(f.read())
        except (OSError, ValueError):
            return None
        return entry.get("result") if isinstance(entry, dict) else None

    def store_result(self, result):
        """Cache the ADD result in libcni's cniCacheV1 format (atomically)."""
        import base64
        make_directories(self.cache_dir, 0o700)
        entry = {"kind": "cniCacheV1", "containerId": self.container_id,
                 "config": base64.b64encode(self.raw).decode(), "ifName": self.ifname,
                 "networkName": self.network, "netns": self.netns, "cniArgs": self.cni_args,
                 "capabilityArgs": self.capability_args, "result": result}
        path = self.cache_path()
        fd = posix.open(path + ".tmp", posix.O_WRONLY | posix.O_CREAT | posix.O_TRUNC
                        | posix.O_NOFOLLOW | posix.O_CLOEXEC, 0o644)
        try:
            posix.fchmod(fd, 0o644)         # whatever the umask (README: the cache is 0644)
            posix.write(fd, json_dumps(entry).encode("utf-8", "surrogateescape"))
        finally:
            posix.close(fd)
        posix.rename(path + ".tmp", path)

    def forget_result(self):
        """Remove the attachment's cached result (DEL)."""
        try:
            posix.unlink(self.cache_path())
        except OSError:
            pass


def network_add(call):
    """ADD through the chain, each plugin getting the previous one's result; cache and print it."""
    result = None
    for plugin in call.plugins:
        result = call.invoke(plugin, "ADD", {"prevResult": result} if result is not None else {})
    call.store_result(result)
    write_json(result)


def network_check(call):
    """CHECK through the chain with the cached ADD result."""
    result = call.cached_result()
    if result is None:
        raise CNIError(ERR_INVALID_CONFIG, "no cached result for %s on %s: was it added?"
                       % (call.network, call.netns))
    for plugin in call.plugins:
        call.invoke(plugin, "CHECK", {"prevResult": result})


def network_del(call):
    """DEL through the chain in reverse, with the cached result from 0.4.0 on; forget it."""
    result = call.cached_result()
    extra = {}
    if result is not None and parse_version(call.version) >= (0, 4, 0):
        extra["prevResult"] = result
    for plugin in reversed(call.plugins):
        call.invoke(plugin, "DEL", extra)
    call.forget_result()


def network_status(call):
    """STATUS of every plugin of the chain."""
    for plugin in call.plugins:
        call.invoke(plugin, "STATUS", attachment=False)


def network_gc(call):
    """GC through the chain; the valid attachments are those in the result cache."""
    valid = cached_attachments(call.cache_dir, call.network)
    for plugin in call.plugins:
        call.invoke(plugin, "GC", {"cni.dev/valid-attachments": valid}, attachment=False)


NETWORK_COMMANDS = {"add": network_add, "check": network_check, "del": network_del,
                    "status": network_status, "gc": network_gc}


def run_network_command(command, network, netns):
    """Run one network command; the exit status.  A command the network's version lacks is
    refused (and, for status and gc, a success with nothing to do)."""
    import os
    call = NetworkCall(network, netns, os.environ)
    if not call.allows(command.upper()):
        sys.stderr.write("network %s (cniVersion %s) does not support %s\n"
                         % (network, call.version, command))
        return 0 if command in ("status", "gc") else 1
    NETWORK_COMMANDS[command](call)
    return 0


def cached_results(cache_dir):
    """Every libcni result-cache entry in `cache_dir`."""
    entries = []
    try:
        names = sorted(posix.listdir(cache_dir))
    except OSError:
        return entries
    for name in names:
        try:
            with open("%s/%s" % (cache_dir, name), "rb") as f:
                entry = json_loads(f.read())
        except (OSError, ValueError):
            continue
        if isinstance(entry, dict) and entry.get("kind") == "cniCacheV1":
            entries.append(entry)
    return entries


def cached_attachments(cache_dir, network):
    """The attachments of `network` the result cache knows, as GC's valid-attachments."""
    return [{"containerID": e.get("containerId"), "ifname": e.get("ifName")}
            for e in cached_results(cache_dir) if e.get("networkName") == network]


# ==============================================================================================
# Operator tools: leases
# ==============================================================================================
# `leases` lists what host-local holds, flags reservations whose container namespace is gone
# (known from the runtime's result cache) and with --gc releases them.

LEASE_COLUMNS = ("NETWORK", "ADDRESS", "CONTAINER", "IFNAME", "AGE", "STATUS")


def attachment_netns(entry):
    """The namespace path of a cached attachment (its result's sandbox)."""
    for interface in (entry.get("result") or {}).get("interfaces") or []:
        if isinstance(interface, dict) and interface.get("sandbox"):
            return interface["sandbox"]
    return entry.get("netns")


def leases(data_dir, collect):
    """List every reservation under `data_dir`; flag those whose container namespace is gone
    (known from the runtime's result cache) and with `collect` release them.  A listing changes
    nothing: it takes no lock and creates no file; only the release locks a network."""
    import os
    netns_of = {}
    for entry in cached_results(results_cache_dir(os.environ)):
        netns_of[(entry.get("networkName"), entry.get("containerId"),
                  entry.get("ifName"))] = attachment_netns(entry)
    try:
        networks = sorted(posix.listdir(data_dir))
    except OSError as err:
        sys.stderr.write("leases: cannot read %s: %s\n" % (data_dir, err.strerror))
        return 1
    rows, released = [], 0
    for network in networks:
        if not is_directory(os.path.join(data_dir, network), follow=False):
            continue            # a file, or a symlink (never followed into another tree)
        try:
            found = network_leases(data_dir, network, netns_of)
        except CNIError as err:
            sys.stderr.write("leases: %s\n" % err.msg)
            continue
        rows.extend(row for row, _attachment in found)
        stale = set(attachment for row, attachment in found if row[-1] == "netns gone")
        if collect and stale:
            with Store(data_dir, network) as store:
                for container_id, ifname in sorted(stale):
                    released += len(release(store, container_id, ifname))
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(LEASE_COLUMNS)]
    for row in [LEASE_COLUMNS] + rows:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")
    if collect:
        sys.stdout.write("released %d stale reservation(s)\n" % released)
    return 0


def network_leases(data_dir, network, netns_of):
    """[(row, (containerID, ifname))] of one network's reservations, read without the lock."""
    import os
    now = time.time()
    found = []
    with Store(data_dir, network, read_only=True) as store:
        recorded = store.recorded_boot()
        previous_boot = bool(recorded) and recorded != current_boot_id()
        for key, content in sorted(store.reservations().items()):
            cid, _, ifname = content.strip().partition("\r\n")
            try:
                age = now - posix.stat(store.file_names[key], dir_fd=store.dir_fd,
                                       follow_symlinks=False).st_mtime
            except OSError:
                age = 0
            netns = netns_of.get((network, cid, ifname))
            gone = netns is not None and not os.path.exists(netns)
            status = "netns gone" if gone else ("ok" if netns else "unknown netns")
            if previous_boot:           # released by the next ADD, GC or STATUS of the network
                status = "previous boot"
            found.append(((network, ip_to_text(*key), cid, ifname,
                           "%dh%02dm" % (age // 3600, age % 3600 // 60), status), (cid, ifname)))
    return found


# ==============================================================================================
# Operator tools: mappings
# ==============================================================================================
# `mappings` lists the host ports portmap forwards on this node, read from the kernel's nf_tables
# rules (no `nft` program needed): one row per DNAT rule of table ip|ip6 cni_hostport, with the
# attachment its comment names.  Rules of the reference's nftables backend (commented with the
# container ID alone) are listed too, with an unknown network and interface.

MAPPING_COLUMNS = ("NETWORK", "CONTAINER", "IFNAME", "PROTO", "HOST", "TARGET", "CONDITIONS")
PROTOCOL_NAMES = dict((number, name) for name, number in IPPROTO_NUMBERS.items())


def describe_mapping(family, rule):
    """{protocol, host, target, conditions} of a DNAT rule of table ip|ip6 cni_hostport: what it
    matches, read from its expressions (a comparison right after the load of a field we know)."""
    _saddr, daddr, length = IP_HEADER_FIELDS[family]
    found = {"protocol": "?", "host_ip": "*", "host_port": "?", "target": [None, None],
             "conditions": 0}
    loaded = None
    for name, data in rule.expressions:
        if name in ("meta", "payload"):
            loaded = ((name, data.get(NftMetaAttr.NFTA_META_KEY)) if name == "meta" else
                      (name, data.get(NftPayloadAttr.NFTA_PAYLOAD_BASE),
                       data.get(NftPayloadAttr.NFTA_PAYLOAD_OFFSET),
                       data.get(NftPayloadAttr.NFTA_PAYLOAD_LEN)))
            continue
        if name == "cmp":
            value = data.get(NftCmpAttr.NFTA_CMP_DATA, {}).get(NftDataAttr.NFTA_DATA_VALUE, b"")
            equal = data.get(NftCmpAttr.NFTA_CMP_OP) == NFT_CMP_EQ
            if equal and loaded == ("meta", NFT_META_L4PROTO) and value:
                found["protocol"] = PROTOCOL_NAMES.get(value[0], str(value[0]))
            elif equal and loaded == ("payload", NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2):
                found["host_port"] = str(struct.unpack(">H", value)[0])
            elif equal and loaded == ("payload", NFT_PAYLOAD_NETWORK_HEADER, daddr, length):
                found["host_ip"] = ip_to_text(family, int.from_bytes(value, "big"))
            else:
                found["conditions"] += 1
        elif name == "immediate":
            register = data.get(NftImmediateAttr.NFTA_IMMEDIATE_DREG)
            value = data.get(NftImmediateAttr.NFTA_IMMEDIATE_DATA, {}).get(
                NftDataAttr.NFTA_DATA_VALUE)
            if register in (NFT_REG_1, NFT_REG_2) and value is not None:
                found["target"][register - 1] = value
        loaded = None
    address, port = found["target"]
    host = found["host_ip"] if family == 4 or found["host_ip"] == "*" else "[%s]" % found["host_ip"]
    target = "?"
    if address is not None and port is not None:
        text = ip_to_text(family, int.from_bytes(address[:IP_BITS[family] // 8], "big"))
        target = "%s:%d" % (text if family == 4 else "[%s]" % text,
                            struct.unpack(">H", port[:2])[0])
    return {"protocol": found["protocol"], "host": "%s:%s" % (host, found["host_port"]),
            "target": target, "conditions": found["conditions"]}


def list_mappings():
    """Every port mapping in this namespace's portmap tables, as rows of MAPPING_COLUMNS."""
    nl = NetlinkSocket(NETLINK_NETFILTER)
    rows = []
    for family, nf_family in sorted(PORTMAP_FAMILIES.items()):
        for rule in list_rules(nl, nf_family, PORTMAP_TABLE, HOSTPORTS_CHAIN):
            owner = parse_portmap_comment(rule.comment) or ("?", rule.comment or "?", "?")
            mapping = describe_mapping(family, rule)
            rows.append(owner + (mapping["protocol"], mapping["host"], mapping["target"],
                                 str(mapping["conditions"]) if mapping["conditions"] else "-"))
    nl.close()
    return rows


def mappings(as_json):
    """Print the port mappings as a table, or as JSON objects keyed by lower-case column."""
    rows = list_mappings()
    if as_json:
        write_json([dict(zip([c.lower() for c in MAPPING_COLUMNS], row)) for row in rows])
        return 0
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(MAPPING_COLUMNS)]
    for row in [MAPPING_COLUMNS] + rows:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")
    return 0


# ==============================================================================================
# Entry point
# ==============================================================================================
# Started under a plugin's name the program serves one CNI request; under any other name it is
# the operator's command line.

USAGE = """usage: %(prog)s COMMAND

cni-bridge %(version)s: the CNI plugins %(plugins)s in one program.
Installed under those names (symlinks) it is those plugins.

commands:
  verify [CONFIG] [--keep] [--json]
                          run the walkthrough on throwaway namespaces: ADD (default config
                          conf/10-mynet.conf), read back, ping the gateway, CHECK, DEL, and
                          show that nothing is left; --keep leaves it all for inspection
  add|check|del|status|gc NETWORK NETNS
                          run a network's plugin chain like the CNI project's cnitool: configs
                          from NETCONFPATH (/etc/cni/net.d), plugins from CNI_PATH (/opt/cni/bin),
                          CNI_IFNAME (eth0), CNI_ARGS, CAP_ARGS; results cached in
                          CNI_CACHE_DIR/results (/var/lib/cni/results) as libcni does
  leases [--data-dir DIR] [--gc]
                          list host-local reservations (default DIR /var/lib/cni/networks) and
                          flag those whose container namespace is gone; --gc releases them
  mappings [--json]       list the host ports portmap forwards here (from the kernel's rules):
                          network, container, interface, protocol, host address, target
  install DIR [--force]   copy this program into DIR and link the plugin names to it
                          (--force replaces regular files of those names)
  --version               print the program and CNI versions
  --help                  this text
"""


def run_cli(prog, argv):
    """The operator's command line, when started under a name that is not a plugin's."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE % {"prog": prog, "version": PROGRAM_VERSION,
                                    "plugins": ", ".join(PLUGINS)})
        return 0 if argv else 2
    if argv[0] == "--version":
        sys.stdout.write("cni-bridge %s\nCNI protocol versions supported: %s\n"
                         % (PROGRAM_VERSION, ", ".join(SUPPORTED_VERSIONS)))
        return 0
    try:
        if argv[0] == "install" and len(argv) in (2, 3) and argv[2:] in ([], ["--force"]):
            install(argv[1], force=argv[2:] == ["--force"])
            return 0
        if argv[0] in ("add", "check", "del", "status", "gc") and len(argv) == 3:
            return run_network_command(argv[0], argv[1], argv[2])
        if argv[0] == "leases":
            options = argv[1:]
            data_dir = DEFAULT_DATA_DIR
            if options[:1] == ["--data-dir"] and len(options) >= 2:
                data_dir, options = options[1], options[2:]
            if options in ([], ["--gc"]):
                return leases(data_dir, options == ["--gc"])
        if argv[0] == "mappings" and argv[1:] in ([], ["--json"]):
            return mappings(argv[1:] == ["--json"])
        if argv[0] == "verify":
            options = [a for a in argv[1:] if a.startswith("--")]
            paths = [a for a in argv[1:] if not a.startswith("--")]
            if set(options) <= {"--keep", "--json"} and len(paths) <= 1:
                return verify(paths[0] if paths else None, "--keep" in options, "--json" in options)
    except (CNIError, OSError) as err:
        sys.stderr.write("%s: %s\n" % (prog, getattr(err, "msg", None) or err))
        return 1
    except ImportError as err:      # python3-minimal: the module is in libpython3.X-stdlib
        sys.stderr.write("%s: %s cannot run on this Python %d.%d: it lacks the module %s "
                         "(Debian: install libpython%d.%d-stdlib)\n"
                         % ((prog, argv[0]) + sys.version_info[:2] + (err.name,)
                            + sys.version_info[:2]))
        return 1
    sys.stderr.write(USAGE % {"prog": prog, "version": PROGRAM_VERSION,
                              "plugins": ", ".join(PLUGINS)})
    return 2


def process_environment():
    """The environment as str, decoded as os.environ would (posix.environ holds bytes)."""
    encoding, errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
    return dict((key.decode(encoding, errors), value.decode(encoding, errors))
                for key, value in posix.environ.items())


def main():
    """Serve one CNI request as the plugin named by argv[0], or run the command line."""
    name = sys.argv[0].rpartition("/")[2]
    if name not in PLUGINS:
        sys.exit(run_cli(name, sys.argv[1:]))
    status = run_plugin(name, process_environment())
    # Exit without the interpreter's teardown, which would free this large module object by
    # object (3 ms, a fifth of a call).  stdout was written with posix.write; sockets, locks and
    # files are released by the kernel.
    sys.stderr.flush()
    posix._exit(status)


if __name__ == "__main__":
    main()
