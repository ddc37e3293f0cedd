"""The SIP core: codec, framing, proxy logic (I/O free) and the asyncio transports."""

from ._pure import install

install()
