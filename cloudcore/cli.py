"""`cloudcore`: the cloud side of edgeweave (reference: docs/reference/cloudcore.md)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import re
import signal
from collections.abc import Sequence
from pathlib import Path

from cloudcore.config import CloudcoreConfig
from edgeweave.cli import UserError, add_common, base_parser, run
from edgeweave.config import dump_yaml, load_config
from edgeweave.pki import (
    CA_CERT_FILE,
    PKI_SUBDIR,
    CertificateAuthority,
    PKIError,
    kubeconfig_document,
    node_identity,
    write_kubeconfig,
)

MESHD_SERVER_NAME = "meshd-server"
_DNS_NAME = re.compile(r"(\*\.)?[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    parser = base_parser("cloudcore", "The cloud side of edgeweave: the embedded "
                         "Kubernetes-compatible API and its controllers.")
    parser.add_argument("--data-dir", type=Path, help="state directory (config: dataDir)")
    parser.add_argument("--kubeconfig", type=Path,
                        help="use this cluster instead of the embedded API (config: kubeconfig)")
    parser.add_argument("--api-bind", help="API listen address (config: api.bind)")
    parser.add_argument("--api-port", type=int, help="API port, 0 = any (config: api.port)")
    parser.add_argument("--no-controllers", action="store_true",
                        help="serve the API only (config: controllers: false)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective configuration and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    certs = sub.add_parser("certs", help="mint certificates from cloudcore's CA")
    add_common(certs)
    certs_sub = certs.add_subparsers(dest="certs_command", required=True, metavar="KIND")
    node = certs_sub.add_parser("node", help="a node certificate and kubeconfig (lab use; "
                                "edges join with a token later)")
    add_common(node)
    node.add_argument("name", help="node name (certificate CN system:node:NAME)")
    node.add_argument("--out", type=Path, required=True, help="directory to write into")
    node.add_argument("--server", default="https://127.0.0.1:6443",
                      help="API URL written into the kubeconfig")
    meshd = certs_sub.add_parser("meshd-server", help="a serving certificate for meshd "
                                 "server's control channel")
    add_common(meshd)
    meshd.add_argument("--out", type=Path, required=True, help="directory to write into")
    meshd.add_argument("--address", action="append", required=True, metavar="IP_OR_DNS",
                       help="an IP address or DNS name agents dial (repeat for more)")
    meshd.add_argument("--name", default=MESHD_SERVER_NAME,
                       help=f"certificate CN and file name stem (default {MESHD_SERVER_NAME})")
    return parser


def effective_config(args: argparse.Namespace) -> CloudcoreConfig:
    """The config file (or defaults) with command-line flags applied on top."""
    config = load_config(CloudcoreConfig, args.config)
    api = config.api
    if args.api_bind is not None:
        api = dataclasses.replace(api, bind=args.api_bind)
    if args.api_port is not None:
        try:
            api = dataclasses.replace(api, port=args.api_port)
        except ValueError as exc:
            raise UserError(f"--api-port: {exc}") from None
    return dataclasses.replace(
        config,
        data_dir=args.data_dir or config.data_dir,
        kubeconfig=args.kubeconfig or config.kubeconfig,
        api=api,
        controllers=config.controllers and not args.no_controllers,
    )


def mint_node(config: CloudcoreConfig, name: str, out: Path, server: str) -> None:
    """Write `out/{name}.kubeconfig` (with the node's certificate) and `out/ca.crt`."""
    pki = config.data_dir / PKI_SUBDIR
    if not (pki / CA_CERT_FILE).exists():
        raise UserError(f"{pki}: no CA yet: start cloudcore once with --data-dir "
                        f"{config.data_dir}")
    ca = CertificateAuthority.load(pki)
    issued = ca.issue_client_cert(node_identity(name))
    out.mkdir(parents=True, exist_ok=True)
    (out / "ca.crt").write_bytes(ca.cert_pem())
    doc = kubeconfig_document(server=server, ca_cert_pem=ca.cert_pem(),
                              user=f"system:node:{name}", client=issued)
    write_kubeconfig(out / f"{name}.kubeconfig", doc)
    print(out / f"{name}.kubeconfig")


def mint_meshd_server(config: CloudcoreConfig, out: Path, addresses: Sequence[str],
                      name: str = MESHD_SERVER_NAME) -> None:
    """Write `out/{name}.crt` + `out/{name}.key` (serverAuth, SANs = `addresses`) and
    `out/ca.crt`: the TLS identity of `meshd server`'s control channel."""
    pki = config.data_dir / PKI_SUBDIR
    if not (pki / CA_CERT_FILE).exists():
        raise UserError(f"{pki}: no CA yet: start cloudcore once with --data-dir "
                        f"{config.data_dir}")
    ips: list[str] = []
    dns_names: list[str] = []
    for address in addresses:
        try:
            ips.append(str(ipaddress.ip_address(address)))
        except ValueError:
            if not _DNS_NAME.fullmatch(address):
                raise UserError(f"--address: {address!r} is neither an IP address nor a DNS "
                                "name") from None
            dns_names.append(address.lower())
    ca = CertificateAuthority.load(pki)
    issued = ca.issue_server_cert(name, ips=ips, dns_names=dns_names)
    out.mkdir(parents=True, exist_ok=True)
    issued.write(out / f"{name}.crt", out / f"{name}.key")
    (out / "ca.crt").write_bytes(ca.cert_pem())
    print(out / f"{name}.crt")


def _main(args: argparse.Namespace) -> int:
    config = effective_config(args)
    try:
        if args.command == "certs":
            if args.certs_command == "meshd-server":
                mint_meshd_server(config, args.out, args.address, args.name)
            else:
                mint_node(config, args.name, args.out, args.server)
            return 0
        if args.print_config:
            print(dump_yaml(config), end="")
            return 0
        asyncio.run(_serve(config))
    except PKIError as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        raise UserError(f"cannot serve: {exc.strerror or exc}") from None
    return 0


async def _serve(config: CloudcoreConfig) -> None:
    from cloudcore import daemon  # imported here: keeps --help and `certs` light

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await daemon.run(config, stop)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cloudcore` command."""
    return run(_main, build_parser(), argv)
