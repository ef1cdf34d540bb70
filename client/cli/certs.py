"""`nvpool certs`: the pool's certificate authority and the certificates of its daemons and clients."""

from __future__ import annotations

import argparse
from typing import Any

from nvpool.client.cli.common import emit


def cmd_init(args: argparse.Namespace) -> int:
    from nvpool.proto import tls

    tls.init_ca(args.dir)
    emit(args, {"ca": f"{args.dir}/ca.pem"}, f"pool CA in {args.dir}/ca.pem (keep {args.dir}/ca.key on this machine)")
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    from nvpool.proto import tls

    files = tls.issue(args.dir, args.name, args.role, tuple(args.host))
    emit(args, {"ca": files.ca, "cert": files.cert, "key": files.key},
         f"issued {files.cert} and {files.key} ({args.role} {args.name}); give them with {files.ca} to "
         f"--tls-ca/--tls-cert/--tls-key" + (" (clients: NVPOOL_TLS=DIR with ca.pem, client.pem, client.key)"
                                            if args.role == "client" else ""))
    return 0


def register(sub: Any) -> None:
    c = sub.add_parser("certs", help="TLS: the pool's CA and certificates",
                       description="Make the pool's certificate authority and issue certificates for the metadata "
                                   "service, agents and clients (mutually authenticated TLS on both planes).")
    cs = c.add_subparsers(dest="certs_command", metavar="ACTION", required=True)
    i = cs.add_parser("init", help="create the pool CA in DIR (once)")
    i.add_argument("--dir", required=True, help="where ca.pem and ca.key go (keep ca.key off storage servers)")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=cmd_init)
    s = cs.add_parser("issue", help="issue NAME.pem and NAME.key signed by the CA in DIR")
    s.add_argument("--dir", required=True, help="the CA's directory (nvpool certs init)")
    s.add_argument("--name", required=True, help="certificate name (a server or client name)")
    s.add_argument("--role", required=True, choices=["meta", "agent", "client"])
    s.add_argument("--host", action="append", default=[], help="a host name or address to add (repeatable)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_issue)
