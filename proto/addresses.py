"""host:port addresses: parsing, formatting, and a bind check that fails the way users expect."""

from __future__ import annotations

import errno
import ipaddress
import socket

from nvpool.proto.errors import UsageError


def split_hostport(text: str, default_port: int = 0) -> tuple[str, int]:
    """'host:port', '[v6]:port', 'host' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or (host.count(":") and not host.startswith("[")):  # 'host' or a bare IPv6 address
        return text.strip("[]") or "127.0.0.1", default_port
    try:
        value = int(port)
    except ValueError:
        raise UsageError(f"invalid address {text!r}: expected HOST:PORT") from None
    if not 0 <= value <= 65535:
        raise UsageError(f"invalid address {text!r}: port {value} is outside 0-65535")
    return host.strip("[]") or "127.0.0.1", value


def join_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return host in ("", "*")


def check_bindable(address: str, what: str) -> None:
    """Refuse an address already in use, before a server library binds it (gRPC would share the port
    with SO_REUSEPORT, or print its own multi-line error). Port 0 is always fine."""
    host, port = split_hostport(address)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"cannot listen on {address} for the {what}: {exc.strerror}") from None
    for family, type_, proto, _, sockaddr in infos:
        with socket.socket(family, type_, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise UsageError(f"cannot listen on {address} for the {what}: the address is in use "
                                     "(is another nvpool daemon running there?)") from None
                raise UsageError(f"cannot listen on {address} for the {what}: {exc.strerror}") from None
