"""gRPC channels and server ports with the pool's TLS material (``proto/tls.py``), or without.

One place for the choice every gRPC edge makes: with ``TlsFiles``, a mutually authenticated TLS
channel (the peer must hold a certificate of the pool's CA; its name is checked against
``tls.SERVER_NAME``, which every pool certificate carries), else a plaintext one.
"""

from __future__ import annotations

from typing import Any, Optional

import grpc

from nvpool.proto.tls import SERVER_NAME, TlsFiles


def aio_channel(address: str, tls: Optional[TlsFiles], options: tuple[tuple[str, Any], ...] = ()) -> Any:
    if tls is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    ca, cert, key = tls.read()
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return grpc.aio.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", SERVER_NAME),
                                                            *options])


def sync_channel(address: str, tls: Optional[TlsFiles]) -> Any:
    if tls is None:
        return grpc.insecure_channel(address)
    ca, cert, key = tls.read()
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", SERVER_NAME)])


def add_port(server: Any, address: str, tls: Optional[TlsFiles]) -> int:
    """Bind ``address`` (TLS with client certificates required, when ``tls``); 0 if it failed."""
    try:
        if tls is None:
            return int(server.add_insecure_port(address))
        ca, cert, key = tls.read()
        creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
        return int(server.add_secure_port(address, creds))
    except RuntimeError:
        return 0
