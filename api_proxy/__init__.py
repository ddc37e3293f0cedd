"""api_proxy: the WebDispatcher, dsbc's HTTP(S) API and self-care dispatcher (SPEC 7).

One entry point on the VIP serves the billing JSON API, the PortaSIP and CallControl
APIs and the self-care pages of every configured virtual host, and sends each request
to the system (``source`` or ``target``) that holds its customer or session.

- ``classify``: the pure classifier (request -> action, owner keys, credentials);
- ``apicall``: the billing API's request formats (form, multipart, JSON, query, bearer);
- ``calltypes``: the values both produce (``ApiCall``, ``Classified``, ``RouteKey``...);
- ``records``: session keys, twin admin sessions, created entities;
- ``plan``: the system the common request goes to unchanged (both paths ask it);
- ``router``: the ``Router`` protocol the host implements, settings, virtual hosts;
- ``errors``: errors that carry their fault (``Server.Dispatcher.<reason>``);
- ``h1`` / ``fastpool`` / ``fastpath``: the fast path for the common request (own
  HTTP/1.1 framing, raw keep-alive pools; hands anything else to aiohttp);
- ``upstream`` / ``forward`` / ``flows`` / ``server``: the aiohttp side.

This package never imports ``dsbc``; ``dsbc.api_service`` wires it to the store.
"""

from sip._pure import install

install()  # the compiled fast path (sip._pure.CORE_MODULES) or its source
