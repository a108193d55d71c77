"""The network as the other nodes see this one (no torch): which name and interface a node's processes must
advertise so that processes on other nodes reach them. dtrain launch --ft on several nodes (dtrain.ft_launch)
gives its replica groups these."""

from __future__ import annotations

import contextlib
import os
import socket

from .environment import LaunchError


def reachable(lighthouse_host: str) -> dict[str, str]:
    """What the groups of a launch on several nodes need so that the other nodes' groups reach them: on one
    node the group's store at 127.0.0.1 and gloo's default device are enough, not across nodes (found with
    tests/test_ft_nodes.py, two hosts in network namespaces):

    - MASTER_ADDR, this node's hostname: torchft's Manager advertises the group's store address (its
      MASTER_ADDR:MASTER_PORT) to the Lighthouse, and the other groups meet there to configure the quorum's
      process group; 127.0.0.1 sent them to their own node ("The client socket has timed out after 5000ms
      while trying to connect to (127.0.0.1, 53779)", every step not committed). The hostname is what torchft
      already advertises for the group's manager and for the checkpoint server a healing group reads from
      (socket.gethostname(), not settable), so it is one requirement, not a second one: each node's hostname
      resolves on every node to an address of it that they reach. The store listens on every interface.
    - GLOO_SOCKET_IFNAME (unless set): gloo binds and advertises the address the hostname resolves to on the
      node itself, which on many hosts is 127.0.1.1 (Debian's /etc/hosts), unreachable from the others;
      so the interface of this node's address on its route to the Lighthouse, or, where that is loopback
      (the Lighthouse's own node), on its default route. Not found (IPv6 only, no such route): gloo's own
      choice."""
    host = socket.gethostname()
    try:
        socket.getaddrinfo(host, None)
    except OSError:
        raise LaunchError(
            f"launch: --ft on several nodes needs this node's hostname {host!r} to resolve, here and on the "
            f"other nodes (torchft tells them to reach this node's groups by it); add it to DNS or /etc/hosts"
        ) from None
    env = {"MASTER_ADDR": host}
    if "GLOO_SOCKET_IFNAME" not in os.environ:
        for toward in (lighthouse_host, "192.0.2.1"):  # TEST-NET-1: only routed, no packet sent (UDP connect)
            name = _interface_of(_source_address(toward))
            if name:
                env["GLOO_SOCKET_IFNAME"] = name
                break
    return env


def _source_address(host: str) -> str | None:
    """This node's IPv4 address on its route to `host` (a UDP socket's connect sends nothing)."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))
        return s.getsockname()[0]
    return None


def _interface_of(address: str | None) -> str | None:
    """The network interface that holds IPv4 `address`, unless loopback (SIOCGIFADDR of each; Linux)."""
    import fcntl
    import struct

    if not address or address.startswith("127."):
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            with contextlib.suppress(OSError):
                got = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
                if socket.inet_ntoa(got[20:24]) == address:
                    return name
    return None
