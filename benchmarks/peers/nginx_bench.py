"""nginx for the API benchmarks: the back end that answers fixed JSON, and the peer
reverse proxy (proxy_pass with a keep-alive upstream), each its own ``nginx`` with one
worker process, run in the foreground (``daemon off``) so its tree can be measured."""

from __future__ import annotations

import json
import os
import pwd
import time
from pathlib import Path
from typing import Self

from tests.peers.net import free_port, is_bound
from tests.peers.proc import PeerError, PeerProcess, find_binary

#: what the back end answers to every API call (a typical get_account_info)
ACCOUNT_INFO = {
    "account_info": {
        "i_account": 4242, "id": "1008484", "i_customer": 4242, "billing_model": 1,
        "balance": 12.5, "credit_limit": None, "blocked": "N", "bill_status": "O",
        "iso_4217": "USD", "i_product": 3, "product_name": "Residential VoIP",
        "activation_date": "2024-01-15", "expiration_date": None, "email": "user4242@example.com",
    }
}  # fmt: skip


def list_body(rows: int, key: str = "customer_list", first: int = 1) -> bytes:
    """A get_customer_list answer of ``rows`` rows with its total."""
    items = [
        {"i_customer": first + i, "name": f"Customer {first + i}", "balance": 10.0 + i % 97,
         "status": "active", "iso_4217": "USD", "i_parent": 0, "email": f"c{first + i}@example.com"}
        for i in range(rows)
    ]  # fmt: skip
    return json.dumps({key: items, "total": rows}).encode()


_COMMON = """
{user}
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
{servers}
}}
"""


class Nginx:
    def __init__(self, workdir: Path, name: str, servers: str, ports: list[int]) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.ports = ports
        # as root, nginx would hand the workers to "nobody", who cannot read a private tmp dir
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
        (self.workdir / "nginx.conf").write_text(
            _COMMON.format(dir=self.workdir, servers=servers, user=user)
        )
        self.proc: PeerProcess | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def url(self, i: int = 0) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    def start(self, timeout: float = 10.0) -> Self:
        binary = find_binary("nginx")
        if binary is None:
            raise PeerError("nginx not found")
        argv = [binary, "-p", str(self.workdir), "-c", str(self.workdir / "nginx.conf")]
        self.proc = PeerProcess(f"nginx-{self.name}", argv, self.workdir / "stderr.log")
        self.proc.start()
        deadline = time.monotonic() + timeout
        while not all(is_bound("127.0.0.1", p, "tcp") for p in self.ports):
            if not self.proc.alive() or time.monotonic() > deadline:
                raise PeerError(f"nginx {self.name} did not start:\n{self.proc.log_tail()}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(grace=3.0, sig=15)
            self.proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def backend(workdir: Path, list_rows: int = 1000) -> Nginx:
    """Two "systems" (two ports) answering every POST with fixed JSON; get_customer_list
    gets a list of ``list_rows`` rows (each system its own ids)."""
    workdir.mkdir(parents=True, exist_ok=True)
    ports = [free_port("tcp"), free_port("tcp")]
    servers = []
    for i, port in enumerate(ports):
        static = workdir / f"www{i}"
        static.mkdir(exist_ok=True)
        (static / "list.json").write_bytes(list_body(list_rows, first=1 + i * list_rows))
        info = json.dumps(ACCOUNT_INFO).replace("'", "\\'")
        servers.append(f"""
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location = /rest/Customer/get_customer_list {{
            # a POST to a static file is 405: the error page (a GET of the file) is the answer
            error_page 405 =200 /list.json;
            return 405;
        }}
        location = /list.json {{
            internal;
            root {static};
            default_type application/json;
        }}
        location / {{
            default_type application/json;
            return 200 '{info}';
        }}
    }}""")
    return Nginx(workdir, "backend", "\n".join(servers), ports)


def proxy(workdir: Path, upstream: str) -> Nginx:
    """The peer: nginx proxy_pass to ``upstream`` over a keep-alive pool, X-Forwarded-For
    added as dsbc adds it."""
    port = free_port("tcp")
    host_port = upstream.split("://", 1)[1]
    servers = f"""
    upstream backend {{
        server {host_port};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}"""
    return Nginx(workdir, "proxy", servers, [port])
