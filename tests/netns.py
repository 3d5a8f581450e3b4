"""Hosts made of network namespaces for the tests that cut networks: each host joined by a veth
pair to a router namespace, in a /29 of its own of TEST-NET-3 (203.0.113.0/24), so that nothing
leaves them. Needs root and iproute2 (CI has both)."""

from __future__ import annotations

import os
import shutil
import subprocess


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def unavailable() -> str | None:
    """Why namespaces cannot be made here, if they cannot."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "network namespaces need root and iproute2 (CI has both)"
    return None


class Network:
    """Hosts named by the test, around a router; `make()` builds them, `remove()` takes them down."""

    def __init__(self, hosts: list[str]) -> None:
        tag = f"{os.getpid() % 100000}"
        self.hosts = hosts
        self.router = f"zfr{tag}"
        self.ns = {host: f"zf{host}{tag}" for host in hosts}
        self.addr = {host: f"203.0.113.{8 * i + 1}" for i, host in enumerate(hosts)}
        self._gateway = {host: f"203.0.113.{8 * i + 6}" for i, host in enumerate(hosts)}
        self._dev = {host: f"zh{host}{tag}" for host in hosts}
        self._link = {host: f"zr{host}{tag}" for host in hosts}  # the router's end of each host's link

    def make(self) -> None:
        for ns in (*self.ns.values(), self.router):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        subprocess.run(
            ["ip", "netns", "exec", self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
            check=True,
            capture_output=True,
            timeout=10,
        )
        for host in self.hosts:
            dev, router_dev, ns = self._dev[host], self._link[host], self.ns[host]
            ip("link", "add", dev, "type", "veth", "peer", "name", router_dev)
            ip("link", "set", dev, "netns", ns)
            ip("link", "set", router_dev, "netns", self.router)
            ip("-n", ns, "addr", "add", f"{self.addr[host]}/29", "dev", dev)
            ip("-n", self.router, "addr", "add", f"{self._gateway[host]}/29", "dev", router_dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", self.router, "link", "set", router_dev, "up")
            ip("-n", ns, "route", "add", "default", "via", self._gateway[host])

    def remove(self) -> None:
        for ns in (*self.ns.values(), self.router):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)

    def on(self, host: str) -> tuple[str, ...]:
        """The prefix that runs a command on `host`."""
        return ("ip", "netns", "exec", self.ns[host])

    def link_down(self, host: str) -> None:
        """The host's link goes down at the router: nothing in or out, and no error at the host
        until its own timers run out."""
        ip("-n", self.router, "link", "set", self._link[host], "down")

    def link_up(self, host: str) -> None:
        ip("-n", self.router, "link", "set", self._link[host], "up")

    def blackhole(self, *hosts: str) -> None:
        """The router drops every packet to these hosts, silently: what a dead switch does.
        Neither end gets an error it could act on."""
        for host in hosts:
            ip("-n", self.router, "route", "add", "blackhole", f"{self.addr[host]}/32")

    def unblackhole(self, *hosts: str) -> None:
        for host in hosts:
            ip("-n", self.router, "route", "del", "blackhole", f"{self.addr[host]}/32")
