"""
What a configuration reload changes: two L{ProxyConfig} values in, a
L{ReloadPlan} out.

Pure functions on configuration values, with no socket and no reactor: the
service (L{tcpproxy.service.ProxyService.reload}) applies a plan, and these
decide it.  Keeping the two apart means the diff can be tested exhaustively
on plain values, and the service does only what the plan lists.

An app is known by its name: an app renamed is one app removed and another
added, and its ports move from the one to the other.  A port is known by its
number: the same number under another app is a move, which keeps the
listening socket (a client is never refused in between).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tcpproxy.config import AdminConfig, AppConfig, ProxyConfig
from tcpproxy.describe import quoted

_KEYS = {
    "ports": "Ports",
    "targets": "Targets",
    "targetSettings": "Targets",
    "targetCommands": "Targets",
    "connectTimeout": "ConnectTimeout",
    "tls": "TLS",
    "targetTLS": "TargetTLS",
    "targetSendProxy": "Targets",
    "discover": "Targets",
}
"""
The configuration key of each L{AppConfig} field, for messages.  A field
not listed here is named after itself with a capital first letter, which is
the convention of the file.
"""


def keyOf(field: str) -> str:
    """
    The configuration key an L{AppConfig} field is read from.
    """
    return _KEYS.get(field) or field[:1].upper() + field[1:]


@dataclass(frozen=True)
class AppChange:
    """
    An app in both configurations, with some settings different.

    @ivar keys: the configuration keys that differ, in the order of
        L{AppConfig}'s fields; C{"Ports"} counts only if the set of ports
        differs (their order means nothing).
    """

    old: AppConfig
    new: AppConfig
    keys: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.new.name

    @property
    def servesDifferently(self) -> bool:
        """
        Whether a new connection is handled differently (anything beyond
        which ports the app listens on): the app's factory must be
        reconfigured.
        """
        return any(key != "Ports" for key in self.keys)


@dataclass(frozen=True)
class PortMove:
    """
    A port that stays, listened on for another app.
    """

    port: int
    fromApp: str
    toApp: str


@dataclass(frozen=True)
class ReloadPlan:
    """
    Every difference between a running configuration and a new one.

    @ivar addedPorts: C{(port, app name)} to start listening on.
    @ivar removedPorts: C{(port, app name)} to stop listening on; their open
        connections go on.
    @ivar movedPorts: ports whose listener now hands new clients to another app.
    @ivar addedApps: apps new by name.
    @ivar removedApps: apps gone by name.
    @ivar changedApps: apps in both, with some setting changed.
    @ivar bindAddress: C{(old, new)} if C{BindAddress} changed, else C{None}.
    @ivar drainTimeout: C{(old, new)} if C{DrainTimeout} changed, else C{None}.
    @ivar admin: C{(old, new)} if C{Admin} changed (C{None} for off), else C{None}.
    """

    old: ProxyConfig
    new: ProxyConfig
    addedPorts: tuple[tuple[int, str], ...] = ()
    removedPorts: tuple[tuple[int, str], ...] = ()
    movedPorts: tuple[PortMove, ...] = ()
    addedApps: tuple[AppConfig, ...] = ()
    removedApps: tuple[AppConfig, ...] = ()
    changedApps: tuple[AppChange, ...] = ()
    bindAddress: tuple[str, str] | None = None
    drainTimeout: tuple[float, float] | None = None
    maxConnections: tuple[int | None, int | None] | None = None
    admin: tuple[AdminConfig | None, AdminConfig | None] | None = None

    def __bool__(self) -> bool:
        """
        Whether there is anything to change at all.
        """
        return any(
            (
                self.addedPorts,
                self.removedPorts,
                self.movedPorts,
                self.addedApps,
                self.removedApps,
                self.changedApps,
                self.bindAddress,
                self.drainTimeout,
                self.maxConnections,
                self.admin,
            )
        )

    def describe(self) -> list[str]:
        """
        The plan for a person, one fragment per kind of change, empty kinds
        left out; the service joins them into its one-line reload summary.
        """
        parts = []
        if self.addedPorts:
            parts.append("ports added: " + ", ".join(str(port) for port, _ in self.addedPorts))
        if self.removedPorts:
            parts.append("ports removed: " + ", ".join(str(port) for port, _ in self.removedPorts))
        if self.movedPorts:
            parts.append(
                "ports moved: "
                + ", ".join(f"{m.port} ({quoted(m.fromApp)} -> {quoted(m.toApp)})" for m in self.movedPorts)
            )
        if self.addedApps:
            parts.append("apps added: " + ", ".join(quoted(app.name) for app in self.addedApps))
        if self.removedApps:
            parts.append("apps removed: " + ", ".join(quoted(app.name) for app in self.removedApps))
        if self.changedApps:
            parts.append(
                "apps changed: "
                + ", ".join(f"{quoted(c.name)} ({', '.join(c.keys)})" for c in self.changedApps)
            )
        if self.bindAddress:
            parts.append("BindAddress: {} -> {}".format(*self.bindAddress))
        if self.drainTimeout:
            parts.append("DrainTimeout: {:g}s -> {:g}s".format(*self.drainTimeout))
        if self.maxConnections:
            parts.append(
                "MaxConnections: {} -> {}".format(*("none" if m is None else m for m in self.maxConnections))
            )
        if self.admin:
            before, after = self.admin
            if (
                before is not None
                and after is not None
                and (before.host, before.port) == (after.host, after.port)
            ):
                parts.append(f"Admin: Allow changed on {after}")
            else:
                parts.append("Admin: {} -> {}".format(*("off" if a is None else a for a in self.admin)))
        return parts


def _changedKeys(old: AppConfig, new: AppConfig) -> tuple[str, ...]:
    keys = []
    for field in dataclasses.fields(AppConfig):
        before, after = getattr(old, field.name), getattr(new, field.name)
        if field.name == "ports":
            before, after = set(before), set(after)
        if before != after and keyOf(field.name) not in keys:
            keys.append(keyOf(field.name))
    return tuple(keys)


def planReload(old: ProxyConfig, new: ProxyConfig) -> ReloadPlan:
    """
    Compare the running configuration C{old} with C{new}.

    Ports and apps are listed in the order of the configuration they come
    from (C{new} for what is added, changed or moved; C{old} for what is
    removed), so the summary reads like the file.
    """
    oldApps = {app.name: app for app in old.apps}
    newApps = {app.name: app for app in new.apps}
    oldOwner = {port: app.name for app, port in old.listeners()}
    newOwner = {port: app.name for app, port in new.listeners()}

    changed = []
    for app in new.apps:
        previous = oldApps.get(app.name)
        if previous is not None:
            keys = _changedKeys(previous, app)
            if keys:
                changed.append(AppChange(previous, app, keys))

    return ReloadPlan(
        old=old,
        new=new,
        addedPorts=tuple((port, name) for port, name in newOwner.items() if port not in oldOwner),
        removedPorts=tuple((port, name) for port, name in oldOwner.items() if port not in newOwner),
        movedPorts=tuple(
            PortMove(port, oldOwner[port], name)
            for port, name in newOwner.items()
            if port in oldOwner and oldOwner[port] != name
        ),
        addedApps=tuple(app for app in new.apps if app.name not in oldApps),
        removedApps=tuple(app for app in old.apps if app.name not in newApps),
        changedApps=tuple(changed),
        bindAddress=None if old.bindAddress == new.bindAddress else (old.bindAddress, new.bindAddress),
        drainTimeout=None if old.drainTimeout == new.drainTimeout else (old.drainTimeout, new.drainTimeout),
        maxConnections=None
        if old.maxConnections == new.maxConnections
        else (old.maxConnections, new.maxConnections),
        admin=None if old.admin == new.admin else (old.admin, new.admin),
    )


def withoutPorts(config: ProxyConfig, ports: set[int] | frozenset[int]) -> ProxyConfig:
    """
    C{config} with C{ports} taken out of their apps.

    After a reload in which some new ports could not be bound, this is the
    configuration that actually runs; the next reload, planned against it,
    lists those ports as added again and so tries them again.
    """
    if not ports:
        return config
    apps = tuple(
        dataclasses.replace(app, ports=tuple(p for p in app.ports if p not in ports)) for app in config.apps
    )
    return dataclasses.replace(config, apps=apps)
