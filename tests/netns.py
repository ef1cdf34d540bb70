"""Test hosts in network namespaces (the one seam to pyroute2 for tests and benchmarks).

``Fabric`` makes a bridge in the root namespace and, per host, a namespace joined to it by a veth
pair, with an address in 10.177.0.0/24, a private range that exists only inside this machine while
the fabric lives. A host's link can be rate-limited with a token bucket (``tbf``) on its egress, which
is what a storage server's NIC is to the clients reading from it. Everything is removed on
``close()`` (and stale leftovers of a crashed run are removed on start).

Traffic only ever flows between these namespaces; nothing is routed off the machine.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import Any, Optional

PREFIX = "nvt"
BRIDGE = f"{PREFIX}br0"
SUBNET = "10.177.0"
BRIDGE_ADDR = f"{SUBNET}.1"


def available() -> Optional[str]:
    """None if namespaces can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    try:
        import pyroute2  # noqa: F401
    except ImportError:
        return "pyroute2 is not installed"
    try:
        from pyroute2 import netns

        name = f"{PREFIX}probe{os.getpid()}"
        netns.create(name)
        netns.remove(name)
    except Exception as exc:  # noqa: BLE001 - any failure means "not here"
        return f"cannot create network namespaces: {exc}"
    return None


@dataclass
class Host:
    name: str  # namespace name
    address: str
    veth_root: str
    veth_ns: str
    rate: Optional[str] = None

    def exec_args(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.exec_args(argv), **kw)


class Fabric:
    def __init__(self) -> None:
        from pyroute2 import IPRoute

        self.ipr = IPRoute()
        self.hosts: dict[str, Host] = {}
        self.cleanup_stale()
        self.ipr.link("add", ifname=BRIDGE, kind="bridge")
        idx = self._index(BRIDGE)
        self.ipr.addr("add", index=idx, address=BRIDGE_ADDR, prefixlen=24)
        self.ipr.link("set", index=idx, state="up")

    def _index(self, ifname: str) -> int:
        found = self.ipr.link_lookup(ifname=ifname)
        if not found:
            raise RuntimeError(f"interface {ifname} not found")
        return int(found[0])

    def cleanup_stale(self) -> None:
        from pyroute2 import netns

        for ns in netns.listnetns():
            if ns.startswith(PREFIX):
                netns.remove(ns)
        from pyroute2.netlink.exceptions import NetlinkError

        for link in self.ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if name and name.startswith(PREFIX):
                try:
                    self.ipr.link("del", index=link["index"])
                except NetlinkError as exc:
                    if exc.code != 19:  # ENODEV: already gone with its peer
                        raise

    def add_host(self, label: str, rate: Optional[str] = None) -> Host:
        """A namespace on the bridge; ``rate`` (e.g. "400mbit") limits what it sends."""
        from pyroute2 import NetNS, netns

        i = len(self.hosts) + 10
        name = f"{PREFIX}{label}"
        host = Host(name, f"{SUBNET}.{i}", f"{PREFIX}v{i}", f"{PREFIX}p{i}", rate)
        netns.create(name)
        self.ipr.link("add", ifname=host.veth_root, kind="veth", peer=host.veth_ns)
        root_idx = self._index(host.veth_root)
        self.ipr.link("set", index=root_idx, master=self._index(BRIDGE), state="up")
        self.ipr.link("set", index=self._index(host.veth_ns), net_ns_fd=name)
        with NetNS(name) as ns:
            lo = ns.link_lookup(ifname="lo")[0]
            ns.link("set", index=lo, state="up")
            idx = ns.link_lookup(ifname=host.veth_ns)[0]
            ns.addr("add", index=idx, address=host.address, prefixlen=24)
            ns.link("set", index=idx, state="up")
        self.hosts[label] = host
        if rate:
            self.shape(label, rate)
        return host

    def shape(self, label: str, rate: str) -> None:
        """Token-bucket limit on the host's egress (its side of the veth)."""
        host = self.hosts[label]
        subprocess.run(
            ["ip", "netns", "exec", host.name, "tc", "qdisc", "replace", "dev", host.veth_ns, "root",
             "tbf", "rate", rate, "burst", "256kb", "latency", "100ms"],
            check=True, capture_output=True,
        )
        host.rate = rate

    def set_link(self, label: str, up: bool) -> None:
        """Cut (or restore) a host's link, as a pulled cable would."""
        self.ipr.link("set", index=self._index(self.hosts[label].veth_root), state="up" if up else "down")

    def close(self) -> None:
        from pyroute2 import netns

        for host in self.hosts.values():
            try:
                netns.remove(host.name)
            except OSError:
                pass
        from pyroute2.netlink.exceptions import NetlinkError

        for name in [h.veth_root for h in self.hosts.values()] + [BRIDGE]:
            found = self.ipr.link_lookup(ifname=name)
            if found:
                try:
                    self.ipr.link("del", index=found[0])
                except NetlinkError as exc:  # the namespace's removal took the veth pair with it
                    if exc.code != 19:  # ENODEV
                        raise
        self.hosts.clear()
        self.ipr.close()

    def __enter__(self) -> "Fabric":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
