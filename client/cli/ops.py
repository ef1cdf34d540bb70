"""`nvpool health` (the standard gRPC health check, for probes and scripts) and `nvpool completion`
(shell completion generated from the CLI's own parser)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from nvpool.client.cli.common import add_timeout, listen_address


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the service at ADDRESS reports SERVING, 3 when it answers otherwise, 1 when it
    cannot be reached (a container HEALTHCHECK or a Kubernetes exec probe)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from nvpool.proto import grpctls, tls

    files = tls.tls_files(args.tls_ca or "", args.tls_cert or "", args.tls_key or "") or tls.from_env()

    async def check() -> int:
        async with grpctls.aio_channel(args.address, files) as ch:
            r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""),
                                                            timeout=args.timeout or 5)
            return int(r.status)

    try:
        status = asyncio.run(check())
    except grpc.aio.AioRpcError as exc:
        control = _agent_control_address(args.address, files)
        if not control:
            print(f"nvpool: error: no health answer from {args.address}: {exc.code().name}", file=sys.stderr)
            return 1
        # the data-plane address every listing shows: the health service is on the agent's control port
        print(f"{args.address} is an agent's data plane; asking its control port {control}", file=sys.stderr)
        args.address = control
        try:
            status = asyncio.run(check())
        except grpc.aio.AioRpcError as exc2:
            print(f"nvpool: error: no health answer from {control}: {exc2.code().name}", file=sys.stderr)
            return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    if args.json:
        print(f'{{"address": "{args.address}", "status": "{name}"}}')
    else:
        print(f"{args.address}: {name}")
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 3


def _agent_control_address(address: str, files: Any) -> str:
    """The control address of the agent whose data-plane address is ``address``, asked from the metadata
    service ($NVPOOL_META, or the local pool's); "" when none is reachable or none matches."""
    from nvpool.client.cluster import read_meta_address
    from nvpool.client.metaclient import MetaClient

    meta = os.environ.get("NVPOOL_META") or read_meta_address(None)
    if not meta:
        return ""

    async def find() -> str:
        m = MetaClient(meta, timeout=5, tls=files)
        try:
            st = await m.pool_status()
            return next((a.control_address for a in st.agents if a.address == address and a.control_address), "")
        finally:
            await m.close()

    try:
        return asyncio.run(find())
    except Exception:  # noqa: BLE001 - only a better answer when it works
        return ""


def cmd_completion(args: argparse.Namespace) -> int:
    import shtab

    from nvpool.client.cli.main import build_parser

    print(shtab.complete(build_parser(), shell=args.shell))
    return 0


def cmd_man(args: argparse.Namespace) -> int:
    from build_manpages.manpage import Manpage

    from nvpool.client.cli.main import build_parser

    print(Manpage(build_parser()))
    return 0


def register(sub: Any) -> None:
    m = sub.add_parser("man", help="print the manual page (roff), made from this CLI's own help",
                       description="The man page, e.g. `nvpool man > /usr/local/share/man/man1/nvpool.1`.")
    m.set_defaults(func=cmd_man)
    h = sub.add_parser("health", help="ask a metadata service or agent whether it is serving (gRPC health)",
                       description="The standard gRPC health check against HOST:PORT (a metadata service, or an "
                                   "agent's control port; given an agent's data-plane address, the one listings show, it asks "
                                   "the metadata service ($NVPOOL_META) for the control port). Exit 0: SERVING; 3: "
                                   "answering but not serving; 1: no answer. Uses $NVPOOL_TLS when the pool uses TLS.")
    h.add_argument("address", type=listen_address, help="HOST:PORT")
    h.add_argument("--tls-ca", metavar="PEM", help="with --tls-cert/--tls-key: TLS material (default $NVPOOL_TLS; a "
                                                   "daemon's own certificate works, for its probes)")
    h.add_argument("--tls-cert", metavar="PEM")
    h.add_argument("--tls-key", metavar="PEM")
    add_timeout(h)
    h.add_argument("--json", action="store_true", help="machine-readable output")
    h.set_defaults(func=cmd_health)
    c = sub.add_parser("completion", help="print shell completion for nvpool (bash, zsh, tcsh)",
                       description='Shell completion, e.g. `nvpool completion bash > /etc/bash_completion.d/nvpool` '
                                   'or `eval "$(nvpool completion bash)"`.')
    c.add_argument("shell", choices=["bash", "zsh", "tcsh"], help="the shell")
    c.set_defaults(func=cmd_completion)
