"""The merged list's envelope as the billing API's methods really answer (no sockets).

Not every ``get_<x>_list`` answers under ``<x>_list`` (``Account/get_phonebook_list``
answers ``phonebook_rec_list``), and some list methods give no ``total``: the merge must
keep every row of both systems under the key the systems used, and need the source's
total only where the window arithmetic does."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import pytest

from api_proxy.errors import UpstreamFault
from api_proxy.listmerge import merge_lists

SRC, TGT = list(range(100, 103)), list(range(200, 204))


def fetcher(key: str, totals: bool) -> Any:
    async def fetch(system: str, p: dict[str, Any]) -> tuple[int, bytes]:
        rows = SRC if system == "source" else TGT
        off, lim = int(p.get("offset", 0)), int(p.get("limit", 0))
        page = rows[off : off + lim] if lim else rows[off:]
        doc: dict[str, Any] = {key: page}
        if totals and p.get("get_total"):
            doc["total"] = len(rows)
        return 200, json.dumps(doc).encode()

    return fetch


def test_rows_under_another_key_are_merged_under_it() -> None:
    async def main() -> None:
        fetch = fetcher("phonebook_rec_list", totals=True)
        whole = SRC + TGT
        for off, lim in itertools.product(range(9), range(9)):
            _, body = await merge_lists(
                fetch, {"offset": off, "limit": lim, "get_total": 1}, "phonebook_list"
            )
            doc = json.loads(body)
            assert doc == {
                "phonebook_rec_list": whole[off : off + lim] if lim else whole[off:],
                "total": 7,
            }, (off, lim)

    asyncio.run(main())


def test_a_list_without_totals_is_merged_where_the_window_allows() -> None:
    async def main() -> None:
        fetch = fetcher("product_list", totals=False)
        whole = SRC + TGT
        for off, lim in itertools.product(range(9), range(9)):
            if off > len(SRC):
                # the source's page is empty: how many rows it has is unknown
                with pytest.raises(UpstreamFault):
                    await merge_lists(fetch, {"offset": off, "limit": lim}, "product_list")
                continue
            _, body = await merge_lists(fetch, {"offset": off, "limit": lim}, "product_list")
            doc = json.loads(body)
            assert doc == {"product_list": whole[off : off + lim] if lim else whole[off:]}, (
                off,
                lim,
            )
        with pytest.raises(UpstreamFault):  # a total asked for and not given
            await merge_lists(fetch, {"get_total": 1}, "product_list")

    asyncio.run(main())
