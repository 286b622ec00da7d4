"""
The proxy's configuration: JSON in, frozen values out.

Every refusal of a configuration lives in this module, so that start-up and
(later) reload judge a file by exactly the same rules.  A refused file raises
L{ConfigError}, whose text is one paragraph naming the file, the app, the key
and the offending value: it is meant to be shown to a person as it is, never
with a traceback.

The accepted shape is the classic one, extended only by optional keys::

    {"BindAddress": "0.0.0.0",          # optional, where every port listens
     "DrainTimeout": 10,                # optional, seconds granted at shutdown
     "Apps": [{"Name": "five-thousand",
               "Ports": [5001, 5200],
               "Targets": ["127.0.0.1:6001", "backend.example:6002",
                           {"Address": "[::1]:6003", "Weight": 3,
                            "MaxConnections": 100, "Backup": false}],
               "Balance": "round-robin",  # optional, see tcpproxy.balancer
               "QueueTimeout": 0,       # optional, seconds waiting for a slot
               "SlowStart": 0,          # optional, seconds of weight ramp
               "ConnectTimeout": 5,     # optional, seconds per attempt
               "AccessLog": true,       # optional, a log line per connection
               "AccessLogFormat": "text",   # optional, or "json", or a template
               "AccessLogInterval": 60,     # optional, interim records (seconds)
               "TLS": {...},            # optional, see TLSConfig
               "TargetTLS": {...}}]}    # optional, see TargetTLSConfig

Resilience and limits (all optional, per app; a top-level C{"Defaults"}
object holds the same keys for every app, and an app's own value wins):
C{IdleTimeout}, C{HealthCheck}, C{MaxConnections}, C{MaxConnectionsPerClient},
C{BandwidthLimit}, C{Allow}, C{Deny}; and a top-level C{MaxConnections} for
the whole proxy.

The admin endpoint (optional, top level, off without it; see L{AdminConfig})::

    "Admin": {"Listen": "127.0.0.1:9901", "Allow": ["10.0.0.0/8"]}
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import hashlib
import ipaddress
import json
import math
import os
import re
from dataclasses import dataclass

from twisted.internet.abstract import isIPAddress, isIPv6Address

from tcpproxy.access import FORMAT_JSON, FORMAT_TEXT, checkTemplate
from tcpproxy.describe import hostPort

DEFAULT_DRAIN_TIMEOUT = 10.0
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_BIND_ADDRESS = "0.0.0.0"
DEFAULT_IDLE_TIMEOUT = 3600.0

IPV4 = "ipv4"
IPV6 = "ipv6"
HOSTNAME = "hostname"

_TOP_KEYS = (
    "Apps",
    "BindAddress",
    "DrainTimeout",
    "Defaults",
    "MaxConnections",
    "Admin",
    "Workers",
    "Resolvers",
)
_ADMIN_KEYS = ("Listen", "Allow")
_APP_KEYS = (
    "Name",
    "Ports",
    "Targets",
    "ConnectTimeout",
    "AccessLog",
    "AccessLogFormat",
    "AccessLogInterval",
    "IdleTimeout",
    "HealthCheck",
    "MaxConnections",
    "MaxConnectionsPerClient",
    "BandwidthLimit",
    "Allow",
    "Deny",
    "TLS",
    "TargetTLS",
    "AcceptProxy",
    "SendProxy",
    "Balance",
    "QueueTimeout",
    "SlowStart",
    "Resolve",
    "Refresh",
    "Hold",
    "Pool",
    "ScaleToZero",
)
# "Defaults" holds the settings common to apps; what names an app, and its
# certificates, stay the app's own.
_DEFAULTS_KEYS = tuple(
    key for key in _APP_KEYS if key not in ("Name", "Ports", "Targets", "TLS", "TargetTLS")
)
_HEALTH_KEYS = ("Interval", "Timeout", "Rise", "Fall")
_TLS_KEYS = ("Certificates", "MinVersion", "HandshakeTimeout", "ALPN", "MaxPendingHandshakes")
_CERTIFICATE_KEYS = ("Cert", "Key")
_TARGET_TLS_KEYS = ("CA", "ServerName", "Cert", "Key", "Verify")
_ACCEPT_PROXY_KEYS = ("From", "Required", "Timeout")
_TARGET_KEYS = ("Address", "SendProxy", "Weight", "MaxConnections", "Backup", "Start", "Stop")
_POOL_KEYS = ("Size", "MaxIdle")
_SCALE_KEYS = ("IdleAfter", "StartTimeout", "MinRunning")
DEFAULT_IDLE_AFTER = 300.0
DEFAULT_START_TIMEOUT = 30.0
COMMAND_FIELDS = ("address", "host", "port", "app")
DEFAULT_POOL_MAX_IDLE = 30.0
MAX_POOL_SIZE = 1000
SEND_PROXY_VERSIONS = {"v1": 1, "v2": 2}
DEFAULT_ACCEPT_PROXY_TIMEOUT = 3.0
BALANCE_POLICIES = ("round-robin", "least-connections", "power-of-two", "source-hash", "random")
"""
The values of C{"Balance"} (L{tcpproxy.balancer}); the first is the default.
"""
DEFAULT_BALANCE = BALANCE_POLICIES[0]
MAX_WEIGHT = 256
"""
The largest C{Weight} of a target (HAProxy's limit too): finer ratios than
1:256 say nothing a balancer can honour.
"""
TLS_VERSIONS = ("1.2", "1.3")
DEFAULT_MIN_TLS_VERSION = "1.2"
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_MAX_PENDING_HANDSHAKES = 1000

MIN_DURATION = 0.01
"""
The shortest duration (seconds) any key accepts, besides an C{IdleTimeout}
or C{DrainTimeout} of 0: a timer or check more frequent than this would only
keep a core busy.
"""
MIN_ACCESS_LOG_INTERVAL = 1.0
"""
The shortest C{AccessLogInterval} (seconds) besides 0 (off).
"""
MAX_DURATION = 604800.0
"""
The longest duration (seconds, one week) any key accepts.
"""
MIN_BANDWIDTH = 1.0
MAX_BANDWIDTH = 1e12
"""
The range of C{BandwidthLimit}, in bytes per second.
"""
MAX_DEPTH = 16
"""
How deeply objects and lists may nest in a configuration file; a valid one
needs 6 levels (top, "Apps", an app, "TLS", "Certificates", a certificate).
"""
SRV_PREFIX = "srv:"
RESOLVE_CONNECT = "connect"
RESOLVE_ALL = "all"
RESOLVE_MODES = (RESOLVE_CONNECT, RESOLVE_ALL)
DEFAULT_HOLD = 300.0
MIN_REFRESH = 1.0
MAX_REFRESH = 300.0
"""
The range a C{"Refresh"} taken from the records' TTL is kept within
(seconds): a TTL of 0 would ask the DNS server in a loop, and a day-long
one would leave a removed target in use for a day.
"""
_HOSTNAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._")


class ConfigError(Exception):
    """
    A configuration was refused.

    C{str()} of it is the whole message for the user: it already names the
    file, the app, the key and the value.
    """


@dataclass(frozen=True)
class Target:
    """
    One place an app's connections may be relayed to.

    @ivar host: a hostname or an IP literal, without brackets.
    @ivar port: the TCP port.
    @ivar kind: L{IPV4}, L{IPV6} or L{HOSTNAME}; it decides which client
        endpoint reaches the target (a hostname is resolved on each connect).
    @ivar weight: its share of new clients against its app's other targets
        (0 to L{MAX_WEIGHT}; 0 sends it none, as a drain does).
    @ivar maxConnections: connections open to it at most, or C{None}.
    @ivar backup: it gets clients only when no other target is usable.
    @ivar start: the argv that starts it when it is stopped (scale to
        zero, L{tcpproxy.scaling}), or C{None}.
    @ivar stop: the argv that stops it when idle, or C{None}.

    A target is its address: two targets are equal (and hash alike) when
    C{host}, C{port} and C{kind} are, whatever their weight, limit or
    backup flag, so that a reload that changes those keeps the target's
    health, counts and figures (they are keyed by it).  What else changed
    is seen in L{AppConfig.targetSettings} and L{AppConfig.targetCommands}.

    An SRV record's weight is the weight of the targets it gives
    (L{tcpproxy.discovery}).
    """

    host: str
    port: int
    kind: str
    weight: int = dataclasses.field(default=1, compare=False)
    maxConnections: int | None = dataclasses.field(default=None, compare=False)
    backup: bool = dataclasses.field(default=False, compare=False)
    start: tuple[str, ...] | None = dataclasses.field(default=None, compare=False)
    stop: tuple[str, ...] | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        # Targets key the per-target tables of a connection's path (counts,
        # health, figures, endpoints): hashed several times per connection,
        # so the hash is made once.
        object.__setattr__(self, "_hash", hash((self.host, self.port, self.kind)))

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        return hostPort(self.host, self.port)


@dataclass(frozen=True)
class DNSSource:
    """
    Targets an app discovers in DNS, asked again every C{"Refresh"} seconds
    (L{tcpproxy.discovery}).

    @ivar kind: C{"srv"} (C{"srv:_service._proto.name"}: every SRV record's
        C{host:port}, RFC 2782) or C{"all"} (C{"host:port"} with C{"Resolve":
        "all"}: every A and AAAA address of C{name}, each a target, as
        Envoy's C{STRICT_DNS} clusters do).
    @ivar name: the name asked, in its L{normalName} form.
    @ivar port: the targets' port for C{"all"}; 0 for C{"srv"} (each record
        has its own).
    """

    kind: str
    name: str
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "srv":
            return SRV_PREFIX + self.name
        return hostPort(self.name, self.port)


@dataclass(frozen=True)
class TLSConfig:
    """
    TLS terminated on the proxy for an app's clients (its C{"TLS"} key).

    Only paths are kept here (resolved against the configuration file's
    folder); L{tcpproxy.tls.loadAppTLS} reads and checks the files.

    @ivar certificates: C{(cert, key)} paths; the first is served to a
        client whose SNI name no certificate covers.
    @ivar minVersion: the lowest TLS version accepted, C{"1.2"} or C{"1.3"}.
    @ivar handshakeTimeout: seconds a client has to complete its handshake.
    @ivar alpn: the ALPN protocol names (RFC 7301) the proxy may select for
        a client, in the proxy's order of preference; empty to select none.
    @ivar maxPendingHandshakes: clients of the app whose handshake is under
        way at most (each holds some 60 KiB of TLS state).
    @ivar digest: the L{filesDigest} of every file, when the configuration
        was read: a certificate renewed in place changes the value, so a
        reload applies it.
    """

    certificates: tuple[tuple[str, str], ...]
    minVersion: str = DEFAULT_MIN_TLS_VERSION
    handshakeTimeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    alpn: tuple[str, ...] = ()
    maxPendingHandshakes: int = DEFAULT_MAX_PENDING_HANDSHAKES
    digest: str = ""


@dataclass(frozen=True)
class PoolConfig:
    """
    A warm pool of connections to each target (an app's C{"Pool"} key,
    L{tcpproxy.pool}).

    @ivar size: idle connections kept open to each usable target.
    @ivar maxIdle: seconds a pooled connection may wait for a client
        before it is closed and replaced (a target or a middlebox may
        drop a connection idle for long).
    """

    size: int
    maxIdle: float = DEFAULT_POOL_MAX_IDLE


@dataclass(frozen=True)
class ScaleToZeroConfig:
    """
    Stopping idle targets and waking them for a client (an app's
    C{"ScaleToZero"} key, L{tcpproxy.scaling}); only targets with a
    C{"Stop"} command are stopped, and with a C{"Start"} command woken.

    @ivar idleAfter: seconds a target must have had no connection before
        its C{Stop} is run.
    @ivar startTimeout: seconds a woken target has to accept a connection
        (and a command to finish) before its clients are refused.
    @ivar minRunning: targets that stay running whatever their idleness.
    """

    idleAfter: float = DEFAULT_IDLE_AFTER
    startTimeout: float = DEFAULT_START_TIMEOUT
    minRunning: int = 0


@dataclass(frozen=True)
class TargetTLSConfig:
    """
    TLS spoken by the proxy to an app's targets (its C{"TargetTLS"} key).

    @ivar ca: the CA certificates to verify targets with (path), or C{None}
        for the system's trust store.
    @ivar serverName: the name to send as SNI and verify, instead of each
        target's host.
    @ivar cert: a client certificate to present (path), with L{key}.
    @ivar verify: C{False} to skip verification (logged as a warning).
    @ivar digest: the L{filesDigest} of L{ca}, L{cert} and L{key}.
    """

    ca: str | None = None
    serverName: str | None = None
    cert: str | None = None
    key: str | None = None
    verify: bool = True
    digest: str = ""


@dataclass(frozen=True)
class AcceptProxyConfig:
    """
    PROXY protocol headers received from the app's clients (its
    C{"AcceptProxy"} key; L{tcpproxy.proxyaccept}).

    @ivar trusted: the networks of the peers (balancers) that may send a
        header; anyone else who sends one is refused.
    @ivar required: a trusted peer must send one (else it is refused), and
        a peer outside C{trusted} is refused; with C{False}, either is
        served with its own address.
    @ivar timeout: seconds a peer has to send a complete header.
    """

    trusted: tuple[Network, ...]
    required: bool = True
    timeout: float = DEFAULT_ACCEPT_PROXY_TIMEOUT


@dataclass(frozen=True)
class HealthCheckConfig:
    """
    Active health checks of an app's targets: a TCP connect every
    C{interval} seconds, failed if not answered within C{timeout}; C{fall}
    failures in a row take a target out, C{rise} successes bring it back.
    """

    interval: float = 5.0
    timeout: float = 2.0
    rise: int = 2
    fall: int = 3


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class AppConfig:
    """
    One app: the ports it listens on and the targets it relays to.

    @ivar accessLogFormat: C{"text"}, C{"json"} or a template of the
        access log (L{tcpproxy.access.formatFor}).
    @ivar accessLogInterval: seconds between interim records of an open
        connection; 0 turns them off (L{tcpproxy.access.InterimRecords}).
    @ivar idleTimeout: seconds without a byte either way that close a
        relayed pair; 0 turns it off.
    @ivar healthCheck: active checks, or C{None} for passive checks only.
    @ivar maxConnections: open connections the app takes at most.
    @ivar maxConnectionsPerClient: the same, per client IP address.
    @ivar bandwidthLimit: bytes per second per connection and direction.
    @ivar allow: a client must be in one of these networks, if any is given.
    @ivar deny: a client must be in none of these networks.
    @ivar acceptProxy: PROXY protocol headers received, or C{None}.
    @ivar sendProxy: the PROXY protocol version (1 or 2) sent to every
        target first, or C{None}.
    @ivar targetSendProxy: C{(target, version)} for each target written as
        an object with its own C{"SendProxy"}, which wins over the app's.
    @ivar balance: how a client's target is chosen, one of
        L{BALANCE_POLICIES} (L{tcpproxy.balancer}).
    @ivar queueTimeout: seconds a client may wait for a target below its
        C{MaxConnections}; 0 refuses it at once.
    @ivar slowStart: seconds over which a target that comes back up has
        its weight ramped from 10% to 100%; 0 for none.
    @ivar targetSettings: C{(weight, maxConnections, backup)} of each of
        L{targets}, in order (made from them): what a reload compares,
        since targets are equal by address alone (L{Target}).
    @ivar targetCommands: C{(start, stop)} of each of L{targets}, in
        order (made from them), for the same reason: a reload that changes
        only a command changes the app (L{tcpproxy.scaling} runs the new
        one).
    @ivar discover: the targets looked up in DNS (L{DNSSource}); they are
        not in L{targets}, which holds the targets written as addresses
        (and hostnames resolved per connect).  At run time the app's
        targets are both (L{tcpproxy.discovery}).
    @ivar refresh: seconds between two lookups of L{discover}, or C{None}
        for the records' TTL (kept within L{MIN_REFRESH}-L{MAX_REFRESH}).
    @ivar hold: seconds the last good answer is kept while lookups fail or
        come back empty.
    @ivar pool: the warm pool of target connections, or C{None}.
    """

    name: str
    ports: tuple[int, ...]
    targets: tuple[Target, ...]
    connectTimeout: float = DEFAULT_CONNECT_TIMEOUT
    accessLog: bool = True
    accessLogFormat: str = FORMAT_TEXT
    accessLogInterval: float = 0.0
    tls: TLSConfig | None = None
    targetTLS: TargetTLSConfig | None = None
    idleTimeout: float = DEFAULT_IDLE_TIMEOUT
    healthCheck: HealthCheckConfig | None = None
    maxConnections: int | None = None
    maxConnectionsPerClient: int | None = None
    bandwidthLimit: float | None = None
    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    acceptProxy: AcceptProxyConfig | None = None
    sendProxy: int | None = None
    targetSendProxy: tuple[tuple[Target, int], ...] = ()
    discover: tuple[DNSSource, ...] = ()
    refresh: float | None = None
    hold: float = DEFAULT_HOLD
    pool: PoolConfig | None = None
    scaleToZero: ScaleToZeroConfig | None = None

    @property
    def sendsProxy(self) -> bool:
        """
        Whether a PROXY header is sent to any target of the app.
        """
        return self.sendProxy is not None or bool(self.targetSendProxy)

    balance: str = DEFAULT_BALANCE
    queueTimeout: float = 0.0
    slowStart: float = 0.0
    targetSettings: tuple[tuple[int, int | None, bool], ...] = dataclasses.field(init=False, repr=False)
    targetCommands: tuple[tuple[tuple[str, ...] | None, tuple[str, ...] | None], ...] = dataclasses.field(
        init=False, repr=False
    )

    def __post_init__(self) -> None:
        settings = tuple((t.weight, t.maxConnections, t.backup) for t in self.targets)
        object.__setattr__(self, "targetSettings", settings)
        object.__setattr__(self, "targetCommands", tuple((t.start, t.stop) for t in self.targets))


LOOPBACK: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
"""
Who may use the admin endpoint when its C{Allow} is not given.
"""


@dataclass(frozen=True)
class AdminConfig:
    """
    The admin endpoint (the top-level C{"Admin"} key): metrics, status,
    readiness and runtime control over HTTP (L{tcpproxy.admin}).

    @ivar host: the address it listens on (an IPv4 or IPv6 literal).
    @ivar port: its port.
    @ivar allow: the networks whose clients may use it; others get 403.
    @ivar allowGiven: C{Allow} was written (else L{allow} is L{LOOPBACK}).
    """

    host: str
    port: int
    allow: tuple[Network, ...] = LOOPBACK
    allowGiven: bool = False

    def __str__(self) -> str:
        return hostPort(self.host, self.port)

    @property
    def loopback(self) -> bool:
        """
        Whether it listens on a loopback address only.
        """
        return ipaddress.ip_address(self.host).is_loopback


@dataclass(frozen=True)
class ProxyConfig:
    """
    A whole, valid configuration.

    @ivar source: where it was read from, for messages.
    """

    apps: tuple[AppConfig, ...]
    bindAddress: str = DEFAULT_BIND_ADDRESS
    drainTimeout: float = DEFAULT_DRAIN_TIMEOUT
    source: str = "<config>"
    maxConnections: int | None = None
    admin: AdminConfig | None = None
    workers: int = 1
    resolvers: tuple[tuple[str, int], ...] = ()
    """
    The name servers the apps' L{DNSSource}s are asked of, as C{(address,
    port)}; none for the system's (C{/etc/resolv.conf}).
    """

    def listeners(self) -> list[tuple[AppConfig, int]]:
        """
        Every (app, port) pair the proxy listens on, in configuration order.
        """
        return [(app, port) for app in self.apps for port in app.ports]


def _show(value: object) -> str:
    """
    Render a configuration value as the user wrote it (JSON), shortened.
    """
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Where:
    """
    The location an error is reported at: file, then app, then key.
    """

    def __init__(self, source: str, app: str | None = None, section: str | None = None) -> None:
        self.source = source
        self.app = app
        self.section = section

    def forApp(self, app: str) -> _Where:
        return _Where(self.source, app)

    def forDefaults(self) -> _Where:
        return _Where(self.source, section="Defaults")

    def error(self, key: str | None, message: str) -> ConfigError:
        parts = [self.source]
        if self.app is not None:
            parts.append(f"app {json.dumps(self.app)}")
        if self.section is not None:
            parts.append(json.dumps(self.section))
        if key is not None:
            parts.append(f"key {json.dumps(key)}")
        return ConfigError(": ".join(parts) + ": " + message)


class _JSONObject(dict):
    """
    A decoded JSON object that remembers keys written twice in it, so the
    refusal can say in which app they were.
    """

    duplicates: tuple[str, ...] = ()


def _checkKeys(where: _Where, obj: dict, allowed: tuple[str, ...], required: tuple[str, ...]) -> None:
    for key in getattr(obj, "duplicates", ()):
        raise where.error(key, "written twice in the same object; keep one")
    for key in obj:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            raise where.error(key, f"unknown key{hint}; known keys are {', '.join(allowed)}")
    for key in required:
        if key not in obj:
            raise where.error(key, "missing required key")


def _seconds(value: float) -> str:
    return f"{value:g}"


def _duration(where: _Where, key: str, value: object, positive: bool = False) -> float:
    """
    A number of seconds, from L{MIN_DURATION} to L{MAX_DURATION}; with
    C{positive} false, 0 is accepted too (it means "off" or "at once").

    An integer too large for a float is compared as the integer it is, so
    it is refused as out of range, not with an C{OverflowError}.

    @raise ConfigError: C{value} is not a number, or is out of range.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise where.error(key, f"{_show(value)} is not a number of seconds")
    if isinstance(value, float) and not math.isfinite(value):
        raise where.error(key, f"{_show(value)} is not a number of seconds")
    if value < 0 or (positive and value == 0):
        bound = "greater than 0" if positive else "0 or more"
        raise where.error(key, f"{_show(value)} must be {bound} seconds")
    if value == 0:
        return 0.0
    if value < MIN_DURATION or value > MAX_DURATION:
        zero = "" if positive else "0 or "
        raise where.error(
            key,
            f"{_show(value)} is outside the range {zero}{_seconds(MIN_DURATION)}-{_seconds(MAX_DURATION)}"
            " seconds (10 ms to one week)",
        )
    return float(value)


def _port(where: _Where, key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise where.error(key, f"{_show(value)} is not a port number (an integer 1-65535)")
    if not 1 <= value <= 65535:
        raise where.error(key, f"{_show(value)} is outside the port range 1-65535")
    return value


def normalName(name: str) -> str:
    """
    The one form of a DNS name the proxy works with: lower-case, without the
    trailing dot of a fully qualified name.

    Every name goes through here: targets' hosts and C{TargetTLS.ServerName}
    when the configuration is read (so resolution, the SNI sent to targets
    and the check of their certificates all see this form), and both sides
    of the comparison of a client's SNI with a certificate's names.

    Why this form: DNS names compare without regard to case (RFC 4343);
    SNI must be sent without the trailing dot (RFC 6066 section 3);
    certificates carry names without it (RFC 5280 section 4.2.1.6); and the
    system resolver does not find C{"localhost."} in C{/etc/hosts} though it
    finds C{"localhost"}.  A name with a dot inside is looked up as written
    first either way; only a single-label name written with a dot (to keep
    the resolver's search domains off it) loses that meaning.
    """
    return name[:-1].lower() if name.endswith(".") else name.lower()


_MAX_LABEL = 63
_MAX_NAME = 253


def dnsNameProblem(name: str) -> str | None:
    """
    What makes C{name} (a hostname in its L{normalName} form) no valid DNS
    name, or C{None}: RFC 1035 section 2.3.4 limits a label to 63 octets and
    a name to 255 octets on the wire, which is 253 characters written
    without the trailing dot; a label cannot be empty.  Such a name cannot
    be resolved (the resolver, and Python's C{idna} codec Twisted uses,
    refuse it), so the configuration refuses it first.
    """
    bare = name
    if len(bare) > _MAX_NAME:
        return f"it is {len(bare)} characters long (at most {_MAX_NAME})"
    for label in bare.split("."):
        if not label:
            return "it has an empty label (two dots in a row, or a dot first or last)"
        if len(label) > _MAX_LABEL:
            return f"its label {label[:20]!r}... is {len(label)} characters long (at most {_MAX_LABEL})"
    try:
        bare.encode("idna")
    except UnicodeError as e:
        return f"it cannot be encoded for DNS ({e})"
    return None


def canonicalIPv6(address: str) -> str:
    """
    The one text form of an IPv6 address (RFC 5952 section 4: lower-case,
    leading zeros dropped, the longest run of zero groups compressed;
    section 5: an IPv4-mapped address ends in its dotted IPv4 address), so
    that C{"[0:0::1]:80"} and C{"[::1]:80"} are one target, as
    C{"Backend.:80"} and C{"backend:80"} are (L{normalName}).

    @param address: an IPv6 address without zone id.
    """
    parsed = ipaddress.IPv6Address(address)
    mapped = parsed.ipv4_mapped
    return f"::ffff:{mapped}" if mapped is not None else parsed.compressed


def parseTarget(text: str) -> Target:
    """
    Parse C{"host:port"}, C{"1.2.3.4:port"} or C{"[::1]:port"}.

    A hostname is kept in its L{normalName} form, an IPv6 address in its
    L{canonicalIPv6} form.  Refused, because they
    cannot be dialled: an IPv6 address with a zone id (C{"[fe80::1%eth0]"}:
    the endpoints do not pass a scope on), and a name L{dnsNameProblem}
    finds fault with.

    @raise ValueError: with a message that says what is wrong with C{text}.
    """
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError("has no closing ']' after its IPv6 address")
        if not rest.startswith(":"):
            raise ValueError("has no port (write it as [address]:port)")
        portText = rest[1:]
        if not isIPv6Address(host):
            raise ValueError(f"has {host!r} in brackets, which is not an IPv6 address")
        if "%" in host:
            raise ValueError(
                f"has {host!r}, an IPv6 address with a zone id, which is not supported "
                "(give an address that needs no zone)"
            )
        host = canonicalIPv6(host)
        kind = IPV6
    else:
        written, sep, portText = text.rpartition(":")
        if not sep:
            raise ValueError("has no port (write it as host:port)")
        if ":" in written:
            raise ValueError("is an IPv6 address without brackets (write it as [address]:port)")
        host = normalName(written)
        if not host:
            raise ValueError("has no host before the ':'")
        if isIPAddress(host):
            kind = IPV4
        elif all(label.isdigit() for label in host.split(".")):
            raise ValueError(f"has {written!r}, which is not a valid IPv4 address")
        elif set(host) <= _HOSTNAME_CHARS and not host.startswith(("-", ".")) and ".." not in host:
            problem = dnsNameProblem(host)
            if problem is not None:
                raise ValueError(f"has {written!r}, which is not a valid DNS name: {problem}")
            kind = HOSTNAME
        else:
            raise ValueError(f"has {written!r}, which is neither a hostname nor an IP address")
    if not portText.isdigit() or not portText.isascii():
        raise ValueError(f"has {portText!r} as its port, which is not a number")
    port = int(portText)
    if not 1 <= port <= 65535:
        raise ValueError(f"has port {port}, outside the range 1-65535")
    return Target(host, port, kind)


def _nonEmptyList(where: _Where, key: str, value: object, what: str) -> list:
    if not isinstance(value, list):
        raise where.error(key, f"{_show(value)} is not a list of {what}")
    if not value:
        raise where.error(key, f"is empty; list at least one of {what}")
    return value


def _count(where: _Where, key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise where.error(key, f"{_show(value)} is not a whole number of 1 or more")
    return value


def _networks(where: _Where, key: str, value: object) -> tuple[Network, ...]:
    if not isinstance(value, list):
        raise where.error(key, f'{_show(value)} is not a list of networks (like "10.0.0.0/8" or "::1/128")')
    networks = []
    for item in value:
        if not isinstance(item, str):
            raise where.error(key, f"{_show(item)} is not a network written as a string")
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise where.error(
                key, f'{_show(item)} is not an IPv4 or IPv6 network (write it like "10.0.0.0/8" or "::1")'
            ) from None
    return tuple(networks)


def _healthCheck(where: _Where, value: object) -> HealthCheckConfig | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise where.error("HealthCheck", f'{_show(value)} is not an object like {{"Interval": 5}}')
    for key in getattr(value, "duplicates", ()):
        raise where.error(f"HealthCheck.{key}", "written twice in the same object; keep one")
    for key in value:
        if key not in _HEALTH_KEYS:
            raise where.error(
                "HealthCheck", f"unknown key {json.dumps(key)}; known keys are {', '.join(_HEALTH_KEYS)}"
            )
    check = HealthCheckConfig()
    values = {}
    for key, parse in (("Interval", _duration), ("Timeout", _duration)):
        if key in value:
            values[key.lower()] = parse(where, f"HealthCheck.{key}", value[key], positive=True)
    for key in ("Rise", "Fall"):
        if key in value:
            values[key.lower()] = _count(where, f"HealthCheck.{key}", value[key])
    return dataclasses.replace(check, **values)


def _parseSettings(where: _Where, obj: dict) -> dict:
    """
    The optional per-app settings in C{obj} (an app merged over
    C{"Defaults"}, or C{"Defaults"} itself), as L{AppConfig} keyword arguments.
    """
    settings: dict = {}
    if "ConnectTimeout" in obj:
        settings["connectTimeout"] = _duration(where, "ConnectTimeout", obj["ConnectTimeout"], positive=True)
    if "AccessLog" in obj:
        accessLog = obj["AccessLog"]
        if not isinstance(accessLog, bool):
            raise where.error("AccessLog", f"{_show(accessLog)} is not true or false")
        settings["accessLog"] = accessLog
    if "AccessLogFormat" in obj:
        settings["accessLogFormat"] = _accessLogFormat(where, obj["AccessLogFormat"])
    if "AccessLogInterval" in obj:
        interval = _duration(where, "AccessLogInterval", obj["AccessLogInterval"])
        if 0 < interval < MIN_ACCESS_LOG_INTERVAL:
            raise where.error(
                "AccessLogInterval",
                f"{_show(obj['AccessLogInterval'])} is less than {MIN_ACCESS_LOG_INTERVAL:g} second:"
                " interim records more often would flood the log (0 turns them off)",
            )
        settings["accessLogInterval"] = interval
    if "IdleTimeout" in obj:
        settings["idleTimeout"] = _duration(where, "IdleTimeout", obj["IdleTimeout"])
    if "HealthCheck" in obj:
        settings["healthCheck"] = _healthCheck(where, obj["HealthCheck"])
    for key, field in (
        ("MaxConnections", "maxConnections"),
        ("MaxConnectionsPerClient", "maxConnectionsPerClient"),
    ):
        if key in obj and obj[key] is not None:
            settings[field] = _count(where, key, obj[key])
    if "BandwidthLimit" in obj and obj["BandwidthLimit"] is not None:
        limit = obj["BandwidthLimit"]
        if (
            isinstance(limit, bool)
            or not isinstance(limit, (int, float))
            or (isinstance(limit, float) and not math.isfinite(limit))
            or limit < MIN_BANDWIDTH
        ):
            raise where.error(
                "BandwidthLimit", f"{_show(limit)} is not a number of bytes per second (1 or more)"
            )
        if limit > MAX_BANDWIDTH:
            raise where.error(
                "BandwidthLimit",
                f"{_show(limit)} is more than the largest limit, {MAX_BANDWIDTH:g} bytes per second",
            )
        settings["bandwidthLimit"] = float(limit)
    for key, field in (("Allow", "allow"), ("Deny", "deny")):
        if key in obj:
            settings[field] = _networks(where, key, obj[key])
    if "AcceptProxy" in obj and obj["AcceptProxy"] is not None:
        settings["acceptProxy"] = _parseAcceptProxy(where, obj["AcceptProxy"])
    if "SendProxy" in obj and obj["SendProxy"] is not None:
        settings["sendProxy"] = _sendProxyVersion(where, obj["SendProxy"])
    if "Balance" in obj:
        balance = obj["Balance"]
        if not isinstance(balance, str) or balance not in BALANCE_POLICIES:
            close = []
            if isinstance(balance, str):
                close = difflib.get_close_matches(balance, BALANCE_POLICIES, n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            raise where.error(
                "Balance",
                f"{_show(balance)} is not a balancing policy{hint}; use one of {', '.join(BALANCE_POLICIES)}",
            )
        settings["balance"] = balance
    if "QueueTimeout" in obj:
        settings["queueTimeout"] = _duration(where, "QueueTimeout", obj["QueueTimeout"])
    if "SlowStart" in obj:
        settings["slowStart"] = _duration(where, "SlowStart", obj["SlowStart"])
    _resolveMode(where, obj)
    if "Refresh" in obj and obj["Refresh"] is not None:
        refresh = _duration(where, "Refresh", obj["Refresh"], positive=True)
        if refresh < MIN_REFRESH:
            raise where.error(
                "Refresh",
                f"{_show(obj['Refresh'])} is less than {MIN_REFRESH:g} second:"
                " asking the DNS server more often would only load it",
            )
        settings["refresh"] = refresh
    if "Hold" in obj:
        settings["hold"] = _duration(where, "Hold", obj["Hold"])
    if "Pool" in obj and obj["Pool"] is not None:
        settings["pool"] = _parsePool(where, obj["Pool"])
    if "ScaleToZero" in obj and obj["ScaleToZero"] is not None:
        settings["scaleToZero"] = _parseScaleToZero(where, obj["ScaleToZero"])
    return settings


def _resolveMode(where: _Where, obj: dict) -> str:
    """
    The C{"Resolve"} key: C{"connect"} (a hostname target is resolved on
    each connect, the default) or C{"all"} (every address of it is a target,
    looked up every C{"Refresh"} seconds).
    """
    mode = obj.get("Resolve", RESOLVE_CONNECT)
    if not isinstance(mode, str) or mode not in RESOLVE_MODES:
        raise where.error(
            "Resolve",
            f'{_show(mode)} is not one of "{RESOLVE_CONNECT}" (resolve a hostname on each connect)'
            f' or "{RESOLVE_ALL}" (every A and AAAA address a target)',
        )
    return mode


def _srvSource(where: _Where, value: str) -> DNSSource:
    """
    C{"srv:_service._proto.name"} (RFC 2782): the targets are the SRV
    records of that name.
    """
    name = normalName(value.strip()[len(SRV_PREFIX) :])
    problem = None
    if not name:
        problem = "has no name after srv:"
    elif not set(name) <= _HOSTNAME_CHARS or name.startswith(("-", ".")) or ".." in name:
        problem = "is not a DNS name after srv:"
    else:
        detail = dnsNameProblem(name)
        if detail is not None:
            problem = f"is not a valid DNS name after srv: ({detail})"
    if problem is not None:
        raise where.error("Targets", f"{_show(value)} {problem} (write it as srv:_service._tcp.example.com)")
    return DNSSource("srv", name)


def _resolvers(where: _Where, value: object) -> tuple[tuple[str, int], ...]:
    """
    The top-level C{"Resolvers"}: name servers as C{"address"} or
    C{"address:port"} (C{"[v6]:port"}), port 53 if not given.
    """
    servers: list[tuple[str, int]] = []
    for entry in _nonEmptyList(where, "Resolvers", value, 'name servers ("127.0.0.1:8600")'):
        if isinstance(entry, str) and (isIPAddress(entry) or isIPv6Address(entry)):
            servers.append((entry, 53))
            continue
        try:
            if not isinstance(entry, str):
                raise ValueError("is not a string")
            address = parseTarget(entry)
            if address.kind == HOSTNAME:
                raise ValueError("is not an IP address (a name server is given by its address)")
        except ValueError as e:
            raise where.error("Resolvers", f"{_show(entry)} {e}") from None
        servers.append((address.host, address.port))
    return tuple(servers)


def _parsePool(where: _Where, value: object) -> PoolConfig:
    """
    The C{"Pool"} key: C{{"Size": 4, "MaxIdle": 30}}, C{Size} required.
    """
    if not isinstance(value, dict):
        raise where.error("Pool", f'{_show(value)} is not an object like {{"Size": 4, "MaxIdle": 30}}')
    within = _Within(where, "Pool")
    _checkKeys(within, value, _POOL_KEYS, ("Size",))
    size = _count(within, "Size", value["Size"])
    if size > MAX_POOL_SIZE:
        raise within.error("Size", f"{_show(size)} is more than {MAX_POOL_SIZE} idle connections per target")
    maxIdle = DEFAULT_POOL_MAX_IDLE
    if "MaxIdle" in value:
        maxIdle = _duration(within, "MaxIdle", value["MaxIdle"], positive=True)
    return PoolConfig(size, maxIdle)


def _parseScaleToZero(where: _Where, value: object) -> ScaleToZeroConfig:
    """
    The C{"ScaleToZero"} key: C{{"IdleAfter": 300, "StartTimeout": 30,
    "MinRunning": 0}}, every key optional.
    """
    if not isinstance(value, dict):
        raise where.error(
            "ScaleToZero",
            f'{_show(value)} is not an object like {{"IdleAfter": 300, "StartTimeout": 30, "MinRunning": 0}}',
        )
    within = _Within(where, "ScaleToZero")
    _checkKeys(within, value, _SCALE_KEYS, ())
    settings: dict = {}
    if "IdleAfter" in value:
        settings["idleAfter"] = _duration(within, "IdleAfter", value["IdleAfter"], positive=True)
    if "StartTimeout" in value:
        settings["startTimeout"] = _duration(within, "StartTimeout", value["StartTimeout"], positive=True)
    if "MinRunning" in value:
        running = value["MinRunning"]
        if isinstance(running, bool) or not isinstance(running, int) or running < 0:
            raise within.error("MinRunning", f"{_show(running)} is not a whole number of 0 or more")
        settings["minRunning"] = running
    return ScaleToZeroConfig(**settings)


def _command(where: _Where, key: str, value: object) -> tuple[str, ...]:
    """
    A target's C{"Start"} or C{"Stop"}: an argv list of strings, run
    without a shell; C{{address}}, C{{host}}, C{{port}} and C{{app}} in it
    are substituted (L{tcpproxy.scaling.commandFor}).
    """
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(word, str) and word and "\0" not in word for word in value)
    ):
        raise where.error(
            key, f'{_show(value)} is not a command as a list of words, like ["systemctl", "start", "app"]'
        )
    for word in value:
        try:
            word.format(**{field: "" for field in COMMAND_FIELDS})
        except (KeyError, IndexError, ValueError):
            raise where.error(
                key, f"{_show(word)} has a {{...}} other than {{address}}, {{host}}, {{port}} or {{app}}"
            ) from None
    return tuple(value)


def _sendProxyVersion(where: _Where, version: object) -> int:
    """
    A C{"SendProxy"} value, of an app or of a target: C{"v1"} or C{"v2"}.
    """
    if not isinstance(version, str) or version not in SEND_PROXY_VERSIONS:
        raise where.error("SendProxy", f'{_show(version)} is not a PROXY protocol version; use "v1" or "v2"')
    return SEND_PROXY_VERSIONS[version]


def _accessLogFormat(where: _Where, value: object) -> str:
    """
    An C{"AccessLogFormat"}: C{"text"}, C{"json"}, or a template of
    C{{field}} placeholders (L{tcpproxy.access.checkTemplate}).
    """
    if not isinstance(value, str):
        raise where.error(
            "AccessLogFormat",
            f'{_show(value)} is not "text", "json" or a template with {{field}} placeholders',
        )
    if value in (FORMAT_TEXT, FORMAT_JSON):
        return value
    try:
        checkTemplate(value)
    except ValueError as e:
        raise where.error("AccessLogFormat", f"{_show(value)} {e}") from None
    return value


def _parseAcceptProxy(where: _Where, value: object) -> AcceptProxyConfig:
    """
    The C{"AcceptProxy"} key: C{{"From": [networks], "Required": true,
    "Timeout": 3}}, C{From} required (no peer is trusted by default).
    """
    if not isinstance(value, dict):
        raise where.error(
            "AcceptProxy",
            f'{_show(value)} is not an object like {{"From": ["10.0.0.0/8"], "Required": true}}',
        )
    within = _Within(where, "AcceptProxy")
    _checkKeys(within, value, _ACCEPT_PROXY_KEYS, ("From",))
    trusted = _networks(within, "From", value["From"])
    if not trusted:
        raise within.error("From", "is empty; list the networks of the balancers that send PROXY headers")
    required = value.get("Required", True)
    if not isinstance(required, bool):
        raise within.error("Required", f"{_show(required)} is not true or false")
    timeout = DEFAULT_ACCEPT_PROXY_TIMEOUT
    if "Timeout" in value:
        timeout = _duration(within, "Timeout", value["Timeout"], positive=True)
    return AcceptProxyConfig(trusted, required, timeout)


def _parseDefaults(where: _Where, value: object) -> dict:
    where = where.forDefaults()
    if not isinstance(value, dict):
        raise where.error(None, f"{_show(value)} is not an object of per-app settings")
    _checkKeys(where, value, _DEFAULTS_KEYS, ())
    settings = _parseSettings(where, value)
    if settings.get("pool") is not None and settings.get("sendProxy") is not None:
        raise where.error("Pool", f"cannot be used with SendProxy: {_POOL_NO_PROXY}; remove one of the two")
    return dict(value)


_POOL_NO_PROXY = "the PROXY header names the client, who is not known when a pooled connection is opened"
"""
Why a warm pool and C{SendProxy} are refused together: the header cannot
be sent first on a connection made in advance.
"""


def _parseApp(where: _Where, index: int, obj: object, defaults: dict | None = None) -> AppConfig:
    if not isinstance(obj, dict):
        raise where.error("Apps", f"entry {index + 1} is {_show(obj)}, not an object")
    if "Name" not in obj:
        # Catch a misspelt "Name" as the typo it is, not as a missing key.
        _checkKeys(where, obj, _APP_KEYS, ())
    name = obj.get("Name")
    if "Name" not in obj:
        raise where.error("Name", f'missing required key in entry {index + 1} of "Apps"')
    if not isinstance(name, str) or not name.strip():
        raise where.error("Name", f'{_show(name)} in entry {index + 1} of "Apps" is not a non-empty string')
    where = where.forApp(name)
    _checkKeys(where, obj, _APP_KEYS, ("Ports", "Targets"))

    # Lists are checked in linear time: a set remembers what was seen.
    ports: dict[int, None] = {}
    for value in _nonEmptyList(where, "Ports", obj["Ports"], "ports"):
        port = _port(where, "Ports", value)
        if port in ports:
            raise where.error("Ports", f"{port} is listed twice")
        ports[port] = None

    targets: dict[Target, None] = {}
    targetSendProxy: list[tuple[Target, int]] = []
    discover: dict[DNSSource, None] = {}
    resolveAll = _resolveMode(where, {**(defaults or {}), **obj}) == RESOLVE_ALL
    for index, value in enumerate(_nonEmptyList(where, "Targets", obj["Targets"], '"host:port" targets')):
        if isinstance(value, str) and value.strip().lower().startswith(SRV_PREFIX):
            source = _srvSource(where, value)
            if source in discover:
                raise where.error("Targets", f"{_show(value)} is listed twice")
            discover[source] = None
            continue
        target, version = _parseTargetEntry(where, index, value)
        if resolveAll and target.kind == HOSTNAME:
            written = value["Address"] if isinstance(value, dict) else value
            source = DNSSource(RESOLVE_ALL, target.host, target.port)
            if source in discover:
                raise where.error("Targets", f"{_show(written)} is listed twice")
            settings = (target.weight, target.maxConnections, target.backup, target.start, target.stop)
            if version is not None or settings != (1, None, False, None, None):
                raise where.error(
                    "Targets",
                    f'{_show(written)} has settings of its own, which a hostname with "Resolve": "all"'
                    " cannot have (each of its addresses is a target with the app's settings)",
                )
            discover[source] = None
            continue
        if target in targets:
            written = value["Address"] if isinstance(value, dict) else value
            raise where.error("Targets", f"{_show(written)} is listed twice")
        targets[target] = None
        if version is not None:
            targetSendProxy.append((target, version))
    if not discover and all(target.backup for target in targets):
        raise where.error("Targets", "lists only backup targets; at least one must not be a backup")

    # "Defaults" was checked on its own, so a refusal here is the app's value.
    settings = _parseSettings(where, {**(defaults or {}), **obj})
    tls = _parseTLS(where, obj["TLS"]) if "TLS" in obj else None
    targetTLS = _parseTargetTLS(where, obj["TargetTLS"]) if "TargetTLS" in obj else None
    if targetSendProxy:
        settings["targetSendProxy"] = tuple(targetSendProxy)
    if discover:
        settings["discover"] = tuple(discover)
    if settings.get("pool") is not None and (settings.get("sendProxy") is not None or targetSendProxy):
        if "Pool" in obj:
            raise where.error(
                "Pool", f"cannot be used with SendProxy: {_POOL_NO_PROXY}; remove one of the two"
            )
        # The pool is the one of "Defaults": name what this app says.
        raise where.error(
            "SendProxy" if obj.get("SendProxy") is not None else "Targets",
            f'SendProxy cannot be used with the "Pool" of "Defaults": {_POOL_NO_PROXY};'
            ' give this app "Pool": null, or remove one of the two',
        )
    return AppConfig(name, tuple(ports), tuple(targets), tls=tls, targetTLS=targetTLS, **settings)


def _parseTargetEntry(where: _Where, index: int, value: object) -> tuple[Target, int | None]:
    """
    Entry C{index} (from 0) of C{"Targets"}: a C{"host:port"} string, or an
    object C{{"Address": "host:port", "SendProxy": "v2", "Weight": 3,
    "MaxConnections": 100, "Backup": false}}, only C{Address} required
    (HAProxy's C{send-proxy-v2}, C{weight}, C{maxconn} and C{backup}
    server options).

    @return: the target, with its weight, limit and backup flag, and its
        own C{SendProxy} version or C{None}.
    """
    version = None
    extra: dict = {}
    if isinstance(value, dict):
        within = _Within(where, f"Targets[{index + 1}]")
        _checkKeys(within, value, _TARGET_KEYS, ("Address",))
        if "SendProxy" in value and value["SendProxy"] is not None:
            version = _sendProxyVersion(within, value["SendProxy"])
        if "Weight" in value:
            weight = value["Weight"]
            if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= MAX_WEIGHT:
                raise within.error(
                    "Weight", f"{_show(weight)} is not a whole number from 0 (no new clients) to {MAX_WEIGHT}"
                )
            extra["weight"] = weight
        if value.get("MaxConnections") is not None:
            extra["maxConnections"] = _count(within, "MaxConnections", value["MaxConnections"])
        if "Backup" in value:
            backup = value["Backup"]
            if not isinstance(backup, bool):
                raise within.error("Backup", f"{_show(backup)} is not true or false")
            extra["backup"] = backup
        for key in ("Start", "Stop"):
            if value.get(key) is not None:
                extra[key.lower()] = _command(within, key, value[key])
        value = value["Address"]
    if not isinstance(value, str):
        raise where.error(
            "Targets", f'{_show(value)} is not a "host:port" string (or an object with "Address")'
        )
    try:
        target = parseTarget(value.strip())
    except ValueError as e:
        raise where.error("Targets", f"{_show(value)} {e}") from None
    return (dataclasses.replace(target, **extra) if extra else target), version


class _Within(_Where):
    """
    The location of a key inside an app's object key, such as
    C{"TLS"} then C{"MinVersion"}: reported as C{key "TLS.MinVersion"}.
    """

    def __init__(self, where: _Where, outer: str) -> None:
        _Where.__init__(self, where.source, where.app)
        self.outer = outer

    def error(self, key: str | None, message: str) -> ConfigError:
        return _Where.error(self, self.outer if key is None else f"{self.outer}.{key}", message)


def _path(where: _Where, key: str, value: object) -> str:
    """
    A file path, relative to the configuration file's folder.
    """
    if not isinstance(value, str) or not value.strip():
        raise where.error(key, f"{_show(value)} is not a file path")
    if "\0" in value:
        raise where.error(key, f"{_show(value)} holds a NUL character, which no file path can")
    if not _encodable(value):
        raise where.error(key, f"{_show(value)} holds a lone surrogate escape, which no file path can")
    base = os.path.dirname(os.path.abspath(where.source)) if where.source != "<config>" else os.getcwd()
    return os.path.join(base, os.path.expanduser(value))


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def filesDigest(paths: list[str | None]) -> str:
    """
    A digest of the contents of the files at C{paths} (C{None} skipped), as
    they are now: it changes when one of them is rewritten in place, so
    that a reload sees a renewed certificate as a change of its app.

    A file that cannot be read counts by the reason: it is
    L{tcpproxy.tls.loadAppTLS} that refuses it, with its message.

    @return: a hexadecimal SHA-256.
    """
    digest = hashlib.sha256()
    for path in paths:
        if path is None:
            continue
        digest.update(path.encode("utf-8") + b"\0")
        try:
            with open(path, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
        except OSError as e:
            digest.update(f"unreadable: {e.errno}".encode())
    return digest.hexdigest()


def _object(where: _Where, key: str, value: object, what: str) -> dict:
    if not isinstance(value, dict):
        raise where.error(key, f"{_show(value)} is not an object of {what}")
    return value


def _parseTLS(where: _Where, value: object) -> TLSConfig:
    obj = _object(where, "TLS", value, "TLS settings")
    within = _Within(where, "TLS")
    _checkKeys(within, obj, _TLS_KEYS, ("Certificates",))
    certificates = []
    for index, entry in enumerate(_nonEmptyList(within, "Certificates", obj["Certificates"], "certificates")):
        entryWhere = _Within(where, f"TLS.Certificates[{index + 1}]")
        entry = _object(entryWhere, None, entry, '"Cert" and "Key"')
        _checkKeys(entryWhere, entry, _CERTIFICATE_KEYS, _CERTIFICATE_KEYS)
        certificates.append(
            (_path(entryWhere, "Cert", entry["Cert"]), _path(entryWhere, "Key", entry["Key"]))
        )
    minVersion = obj.get("MinVersion", DEFAULT_MIN_TLS_VERSION)
    if minVersion not in TLS_VERSIONS or not isinstance(minVersion, str):
        raise within.error(
            "MinVersion", f'{_show(minVersion)} is not a TLS version this proxy accepts; use "1.2" or "1.3"'
        )
    handshakeTimeout = DEFAULT_HANDSHAKE_TIMEOUT
    if "HandshakeTimeout" in obj:
        handshakeTimeout = _duration(within, "HandshakeTimeout", obj["HandshakeTimeout"], positive=True)
    alpn = _alpn(within, obj["ALPN"]) if "ALPN" in obj else ()
    maxPending = DEFAULT_MAX_PENDING_HANDSHAKES
    if "MaxPendingHandshakes" in obj:
        maxPending = _count(within, "MaxPendingHandshakes", obj["MaxPendingHandshakes"])
    files = [path for pair in certificates for path in pair]
    return TLSConfig(
        tuple(certificates), minVersion, handshakeTimeout, alpn, maxPending, filesDigest(files)
    )


def _alpn(within: _Where, value: object) -> tuple[str, ...]:
    """
    The C{"ALPN"} list of a C{"TLS"} key: protocol names such as C{"h2"}
    and C{"http/1.1"}, in the order the proxy prefers them.

    RFC 7301 section 3.1: a protocol name is a non-empty string of at most
    255 bytes (its length travels in one byte); the names are the IANA
    registry's, printable ASCII in practice, so anything else is refused as
    a typo rather than sent as UTF-8.  A name written twice is refused: it
    says nothing and hides which place was meant.

    @raise ConfigError: naming the key and the offending name.
    """
    if not isinstance(value, list) or not value:
        raise within.error("ALPN", f'{_show(value)} is not a non-empty list of protocol names like "h2"')
    names: list[str] = []
    for name in value:
        if not isinstance(name, str) or not name:
            raise within.error("ALPN", f"{_show(name)} is not a protocol name (a non-empty string)")
        if not (name.isascii() and name.isprintable()):
            raise within.error("ALPN", f"{_show(name)} is not a protocol name (printable ASCII)")
        if len(name) > 255:
            raise within.error("ALPN", f"{_show(name)} is longer than 255 bytes (RFC 7301 section 3.1)")
        if name in names:
            raise within.error("ALPN", f"{_show(name)} is listed twice")
        names.append(name)
    return tuple(names)


def _parseTargetTLS(where: _Where, value: object) -> TargetTLSConfig:
    obj = _object(where, "TargetTLS", value, "TLS settings")
    within = _Within(where, "TargetTLS")
    _checkKeys(within, obj, _TARGET_TLS_KEYS, ())
    ca = _path(within, "CA", obj["CA"]) if "CA" in obj else None
    serverName = obj.get("ServerName")
    if "ServerName" in obj:
        try:
            parseTarget(f"{serverName}:1" if isinstance(serverName, str) and ":" not in serverName else "")
        except ValueError as e:
            raise within.error("ServerName", f"{_show(serverName)} is not a hostname ({e})") from None
        serverName = normalName(serverName)
    if ("Cert" in obj) != ("Key" in obj):
        missing = "Key" if "Cert" in obj else "Cert"
        raise within.error(
            missing, 'missing: "Cert" and "Key" go together (a client certificate and its key)'
        )
    cert = _path(within, "Cert", obj["Cert"]) if "Cert" in obj else None
    key = _path(within, "Key", obj["Key"]) if "Key" in obj else None
    verify = obj.get("Verify", True)
    if not isinstance(verify, bool):
        raise within.error("Verify", f"{_show(verify)} is not true or false")
    return TargetTLSConfig(ca, serverName, cert, key, verify, filesDigest([ca, cert, key]))


def parseConfig(document: object, source: str = "<config>") -> ProxyConfig:
    """
    Validate a decoded JSON document and build the configuration from it.

    @param document: what C{json.loads} returned.
    @param source: the file name, used in every message.
    @raise ConfigError: on the first thing wrong, described for a person.
    """
    where = _Where(source)
    if not isinstance(document, dict):
        raise where.error(None, f'the top level is {_show(document)}, not an object with an "Apps" list')
    _checkKeys(where, document, _TOP_KEYS, ("Apps",))
    appsValue = _nonEmptyList(where, "Apps", document["Apps"], "apps")
    defaults = _parseDefaults(where, document["Defaults"]) if "Defaults" in document else {}

    apps: list[AppConfig] = []
    owner: dict[int, str] = {}
    names: set[str] = set()
    for index, obj in enumerate(appsValue):
        app = _parseApp(where, index, obj, defaults)
        if app.name in names:
            raise where.forApp(app.name).error("Name", f"{_show(app.name)} is the name of another app too")
        for port in app.ports:
            if port in owner:
                raise where.forApp(app.name).error(
                    "Ports", f"{port} is already a port of app {json.dumps(owner[port])}"
                )
            owner[port] = app.name
        names.add(app.name)
        apps.append(app)
    _checkStoppedTargetsUnshared(where, apps)

    bindAddress = document.get("BindAddress", DEFAULT_BIND_ADDRESS)
    if not isinstance(bindAddress, str) or not (
        bindAddress == "" or isIPAddress(bindAddress) or isIPv6Address(bindAddress)
    ):
        raise where.error("BindAddress", f"{_show(bindAddress)} is not an IPv4 or IPv6 address")

    drainTimeout = DEFAULT_DRAIN_TIMEOUT
    if "DrainTimeout" in document:
        drainTimeout = _duration(where, "DrainTimeout", document["DrainTimeout"])

    maxConnections = None
    if document.get("MaxConnections") is not None:
        maxConnections = _count(where, "MaxConnections", document["MaxConnections"])

    admin = _parseAdmin(where, document["Admin"]) if document.get("Admin") is not None else None
    workers = parseWorkers(document["Workers"], where) if "Workers" in document else 1
    resolvers = _resolvers(where, document["Resolvers"]) if document.get("Resolvers") is not None else ()

    return ProxyConfig(
        tuple(apps),
        bindAddress or DEFAULT_BIND_ADDRESS,
        drainTimeout,
        source,
        maxConnections,
        admin,
        workers,
        resolvers,
    )


def _checkStoppedTargetsUnshared(where: _Where, apps: list[AppConfig]) -> None:
    """
    Refuse a target that an app scaling to zero may stop (it has a
    C{Stop}) if another app lists it too: an app counts only its own
    clients (L{tcpproxy.scaling}), and would run the C{Stop} while the
    other app's clients use the target.

    @raise ConfigError: naming the app, the target and the other app.
    """
    users: dict[Target, list[str]] = {}
    for app in apps:
        for target in app.targets:
            users.setdefault(target, []).append(app.name)
    for app in apps:
        if app.scaleToZero is None:
            continue
        for target in app.targets:
            others = [name for name in users[target] if name != app.name]
            if target.stop is not None and others:
                raise where.forApp(app.name).error(
                    "Targets",
                    f"{target} is a target of app {json.dumps(others[0])} too: this app scales to zero"
                    " and would run its Stop while that app's clients use it (each app counts only its"
                    " own); list it in one app only, or give it no Stop",
                )


MAX_WORKERS = 256
"""
Worker processes at most: far above any core count a proxy runs on, low
enough that a typo (C{1000}) is refused rather than forking a thousand
processes.
"""


def parseWorkers(value: object, where: _Where | None = None) -> int:
    """
    The C{"Workers"} key (or C{--workers}): a whole number of worker
    processes, or C{"auto"} for one per CPU this process may run on
    (C{os.sched_getaffinity}, as nginx's C{worker_processes auto}).

    @raise ConfigError: naming the file and the key (or the option, when
        C{where} is C{None}).
    """
    if value == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return os.cpu_count() or 1
    if isinstance(value, str) and where is None and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        message = f'{_show(value)} is not a whole number from 1 to {MAX_WORKERS}, or "auto"'
        if where is None:
            raise ConfigError(f"--workers: {message}")
        raise where.error("Workers", message)
    return value


def checkWorkers(config: ProxyConfig, workers: int) -> None:
    """
    Refuse what cannot run in C{workers} processes: C{ScaleToZero}, since
    each worker would count only its own clients' connections and stop a
    target another worker is using (L{tcpproxy.scaling}).  Checked at
    start-up and by each reload of the main process of workers.

    @raise ConfigError: naming the file, the first such app and the key.
    """
    scaled = [app.name for app in config.apps if app.scaleToZero is not None]
    if workers > 1 and scaled:
        raise ConfigError(
            f'{config.source}: app "{scaled[0]}": key "ScaleToZero": cannot be used with {workers} worker'
            " processes: each would stop and start the targets on its own, blind to the other workers'"
            " connections; run one process (no --workers)"
        )


def _parseAdmin(where: _Where, value: object) -> AdminConfig:
    """
    The C{"Admin"} object: C{"Listen": "host:port"} (an IP literal, IPv6 in
    brackets, as a target is written) and an optional C{"Allow"} list of
    networks.
    """
    within = _Within(where, "Admin")
    obj = _object(where, "Admin", value, 'admin endpoint settings, like {"Listen": "127.0.0.1:9901"}')
    _checkKeys(within, obj, _ADMIN_KEYS, ("Listen",))
    listen = obj["Listen"]
    try:
        if not isinstance(listen, str):
            raise ValueError("is not a string")
        address = parseTarget(listen)
    except ValueError:
        address = None
    if address is None or address.kind == HOSTNAME:
        raise within.error(
            "Listen", f'{_show(listen)} is not an IP address and port (like "127.0.0.1:9901" or "[::1]:9901")'
        )
    if "Allow" in obj:
        allow = _networks(within, "Allow", obj["Allow"])
        if not allow:
            # An endpoint that answers 403 to everyone is a mistake, not a
            # way to turn it off (leave out "Admin", or give it null).
            raise within.error(
                "Allow", "[] lets no client in (leave Allow out for loopback only, or list the networks)"
            )
        return AdminConfig(address.host, address.port, allow, True)
    return AdminConfig(address.host, address.port)


def _noteDuplicateKeys(pairs: list[tuple[str, object]]) -> _JSONObject:
    result = _JSONObject(pairs)
    if len(result) < len(pairs):
        seen: set[str] = set()
        result.duplicates = tuple(k for k, _ in pairs if k in seen or seen.add(k))
    return result


_TOKENS = re.compile(r'("(?:[^"\\]|\\.)*")\s*:|"(?:[^"\\]|\\.)*"|[\[\]{}]')
"""
What the nesting check of L{_checkDepth} looks at: a key (group 1), any
other string (skipped whole, so a bracket inside it does not count), or a
bracket.
"""


def _checkDepth(path: str, text: str) -> None:
    """
    Refuse a document nested deeper than L{MAX_DEPTH}, before it is decoded:
    Python's decoder would raise C{RecursionError} at about 1,000 levels,
    and anything deeper than a configuration can be is a mistake anyway.
    One pass over the text with a regular expression: linear in its size.

    @raise ConfigError: naming the top-level key under which it goes too
        deep, and where.
    """
    depth = 0
    topKey = None
    for match in _TOKENS.finditer(text):
        token = match.group()
        if match.group(1) is not None:
            if depth == 1:
                topKey = match.group(1)
        elif token in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                start = match.start()
                line = text.count("\n", 0, start) + 1
                column = start - text.rfind("\n", 0, start)
                key = f"key {_show(json.loads(topKey))}: " if topKey is not None else ""
                raise ConfigError(
                    f"{path}: {key}nested more than {MAX_DEPTH} levels deep (at line {line} column {column});"
                    " a configuration needs 6 at most"
                )
        elif token in "]}":
            depth -= 1


def loadConfig(path: str) -> ProxyConfig:
    """
    Read, decode and validate the configuration file at C{path}.

    A UTF-8 byte-order mark at the start of the file is ignored (RFC 8259
    allows a parser to).

    @raise ConfigError: if the file cannot be read, is not JSON, or is refused.
    """
    return parseConfigBytes(readConfigBytes(path), path)


def readConfigBytes(path: str) -> bytes:
    """
    The bytes of the configuration file at C{path}.

    @raise ConfigError: if the file cannot be read.
    """
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the configuration file: {e.strerror or e}") from None


def parseConfigBytes(raw: bytes, path: str) -> ProxyConfig:
    """
    Decode and validate the bytes of a configuration file read from C{path}
    (L{loadConfig} without the reading: the workers of C{--workers} get
    the very bytes their main process checked).

    @raise ConfigError: if the bytes are not JSON, or are refused.
    """
    bom = 3 if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        text = raw[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e.reason} at byte {e.start + bom}") from None
    _checkDepth(path, text)
    try:
        document = json.loads(text, object_pairs_hook=_noteDuplicateKeys)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"{path}: invalid JSON: {e}") from None
    return parseConfig(document, path)
