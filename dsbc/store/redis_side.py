"""The Redis store's shared side data: registrations dsbc relayed and API sessions.

Both are written by the dispatchers on their event loop, so they never wait for Redis:
while Redis is known to be away (the watcher says so) they are kept in memory (newest
per contact / session, bounded) and written when it returns.  API sessions are cached in
memory; another node's logout or change reaches this one on the ``<prefix>sessions``
channel, and a re-subscription drops the cache (a logout missed meanwhile cannot keep a
session alive).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import msgspec

from .base import ApiSession, Registration
from .memory import canon

if TYPE_CHECKING:
    from .redis_store import RedisStore

MAX_PENDING = 100_000  # registrations / sessions kept while Redis is away
MAX_CACHED_SESSIONS = 100_000  # sessions kept in memory beside Redis (the oldest go first)
PRUNE_ABOVE = 4  # contacts of a customer past which a new one makes the expired ones go

# One registration written: the field, the key's TTL (never shortened), and when the field
# is a new contact and the hash has grown past its mark, the contacts that expired.  The
# key lives as long as its newest binding, so without this a phone that registers from a
# new port or connection each time (NAT rebinding, a TCP phone) added a field for good.
# The mark (the field "", which no "account\ncontact" field can be) is set after each
# prune to twice what remained: a hash of many live phones (the accounts the store does
# not know share "reg:") is scanned once per doubling, not at every new contact.
REG_WRITE = """
local new = redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3], 'GT')
redis.call('EXPIRE', KEYS[1], ARGV[3], 'NX')
local floor = tonumber(ARGV[5])
if new == 1 and redis.call('HLEN', KEYS[1]) > math.max(floor, tonumber(redis.call('HGET', KEYS[1], '')) or 0) then
  local now, all, left = tonumber(ARGV[4]), redis.call('HGETALL', KEYS[1]), 0
  for i = 1, #all, 2 do
    if all[i] ~= '' then
      local ok, v = pcall(cjson.decode, all[i + 1])
      if ok and type(v) == 'table' and (tonumber(v[2]) or 0) <= now then
        redis.call('HDEL', KEYS[1], all[i])
      else
        left = left + 1
      end
    end
  end
  redis.call('HSET', KEYS[1], '', tostring(math.max(floor, 2 * left)))
end
return new
"""


class SideData:
    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.sessions: dict[str, ApiSession] = {}
        self.pending_sessions: dict[str, ApiSession | None] = {}
        self.pending_regs: dict[tuple[str, str], Registration] = {}
        self._last_purge = 0.0
        self._reg_write = store._r.register_script(REG_WRITE)

    def forget_sessions(self, keys: list[str], drop_all: bool) -> None:
        """Sessions changed or deleted (by any node: read again from Redis when next asked
        for); `drop_all`: every cached one not waiting to be written (after a
        re-subscription)."""
        for key in keys:
            if key not in self.pending_sessions:  # a newer copy of ours, not written yet
                self.sessions.pop(key, None)
        if drop_all:
            self.sessions = {k: s for k, s in self.sessions.items() if self.pending_sessions.get(k) is s}

    def record_registrations(self, regs: list[Registration], now: float | None = None) -> None:
        """Written at once; while Redis is away kept (newest per contact) and written later."""
        st = self.store
        now = time.time() if now is None else now
        for r in regs:
            if len(self.pending_regs) < MAX_PENDING or (r.account, r.contact) in self.pending_regs:
                self.pending_regs[(r.account, r.contact)] = r
        if st._mem is not None and not st._up:
            return  # no network call while Redis is known to be away
        self.flush_regs(now)

    def flush_regs(self, now: float) -> None:
        st = self.store
        if not self.pending_regs:
            return
        pending, self.pending_regs = self.pending_regs, {}
        pipe = st._r.pipeline(transaction=False)
        for (account, contact), r in pending.items():
            cid = r.customer_id or st._owner_id(f"account:{account}")
            key = f"{st.prefix}reg:{cid}"
            field = f"{account}\n{contact}"
            if r.expires_at <= now:
                pipe.hdel(key, field)
            else:
                value = json.dumps([canon(r.system), r.expires_at])
                self._reg_write(keys=[key], client=pipe,
                                args=[field, value, int(r.expires_at - now) + 60, now, PRUNE_ABOVE])
        self._send(pipe, pending, "pending_regs", "recording registrations")

    def registrations(
        self, customer_ids: list[str] | None = None, now: float | None = None
    ) -> list[Registration]:
        st = self.store
        now = time.time() if now is None else now
        out: list[Registration] = []
        #: recorded under no customer ("reg:"): the phone registered before its customer was
        #: imported, and may have registered again since, under its customer's key
        unowned: list[Registration] = []
        try:
            if customer_ids is None:
                keys = list(st._w.scan_iter(match=f"{st.prefix}reg:*", count=1000))
            else:
                keys = [f"{st.prefix}reg:{cid}" for cid in dict.fromkeys(customer_ids)]
                owners = {ident[8:]: cid for cid, c in st.customers(customer_ids).items()
                          for ident in c.identities if ident.startswith("account:")}
                if owners:
                    # a phone that registered before its customer was imported (store.unknown
                    # sent it on) was recorded under no customer: its account names the owner now
                    for field, raw in st._w.hscan_iter(f"{st.prefix}reg:", count=1000):
                        account, _, contact = field.partition("\n")
                        owner = owners.get(account)
                        if owner is not None:
                            system, expires_at = json.loads(raw)
                            if float(expires_at) > now:
                                unowned.append(Registration(account, contact, system, float(expires_at), owner))
            for start in range(0, len(keys), 500):
                part = keys[start : start + 500]
                pipe = st._w.pipeline(transaction=False)
                for k in part:
                    pipe.hgetall(k)
                expired = st._w.pipeline(transaction=False)
                for key, fields in zip(part, pipe.execute()):
                    cid = key[len(st.prefix) + 4 :]
                    for field, raw in fields.items():
                        if not field:
                            continue  # REG_WRITE's mark, no registration
                        account, _, contact = field.partition("\n")
                        system, expires_at = json.loads(raw)
                        if float(expires_at) > now:
                            (out if cid else unowned).append(
                                Registration(account, contact, system, float(expires_at), cid))
                        else:
                            expired.hdel(key, field)
                expired.execute()
        except st._errors as exc:
            raise st._unavailable("reading registrations", exc, writing=False) from None
        # one phone, one binding: the entry its customer's key holds is the newer (a phone
        # counted twice made `dsbc migrate --wait-registrations` wait for one that is not)
        owned = {(r.account, r.contact) for r in out}
        return out + [r for r in unowned if (r.account, r.contact) not in owned]

    def put_session(self, session: ApiSession) -> None:
        st = self.store
        self.sessions[session.key] = session
        self._purge_sessions()
        if len(self.pending_sessions) < MAX_PENDING:
            self.pending_sessions[session.key] = session
        if st._mem is not None and not st._up:
            return
        self.flush_sessions()

    def flush_sessions(self) -> None:
        st = self.store
        if not self.pending_sessions:
            return
        pending, self.pending_sessions = self.pending_sessions, {}
        now = time.time()
        pipe = st._r.pipeline(transaction=False)
        for key, s in pending.items():
            if s is None:
                pipe.delete(f"{st.prefix}sess:{key}")
            elif s.expires_at > now:
                pipe.set(f"{st.prefix}sess:{key}", msgspec.json.encode(s),
                         px=max(1, int((s.expires_at - now) * 1000)))
            else:
                continue
            # every node drops its cached copy: a logout, and a change (a refresh, the
            # context an admin set) made on another node, count at once everywhere
            pipe.publish(st.prefix + "sessions", key)
        self._send(pipe, pending, "pending_sessions", "saving a session")

    def _send(self, pipe: Any, pending: dict[Any, Any], keep: str, what: str) -> None:
        """Run `pipe`, which writes `pending`; if Redis fails, `pending` goes back into the
        dict attribute `keep` (what came meanwhile is newer and wins) to be written later:
        a loaded node marks Redis away, a `load=False` one raises StoreUnavailable."""
        st = self.store
        try:
            pipe.execute()
        except st._errors as exc:
            kept = getattr(self, keep)
            for k, v in pending.items():
                kept.setdefault(k, v)
            if st._mem is None:
                raise st._unavailable(what, exc) from None
            st._went_down(exc)

    def _cap_sessions(self) -> None:
        """Past MAX_CACHED_SESSIONS, the oldest quarter of the cache goes (read again from
        Redis when asked for), but never one still waiting to be written."""
        if len(self.sessions) <= MAX_CACHED_SESSIONS:
            return
        drop = len(self.sessions) - MAX_CACHED_SESSIONS * 3 // 4
        for key in [k for k in self.sessions if k not in self.pending_sessions][:drop]:
            del self.sessions[key]

    def _purge_sessions(self) -> None:
        self._cap_sessions()
        now = time.time()
        if now - self._last_purge > 60:
            self._last_purge = now
            for key in [k for k, s in self.sessions.items() if s.expires_at <= now]:
                del self.sessions[key]

    def get_session(self, key: str) -> ApiSession | None:
        """Memory first, then Redis (a session another node made a moment ago); None when
        neither has it or Redis is away."""
        st = self.store
        s = self.sessions.get(key)
        if s is None:
            if st._mem is not None and not st._up:
                return None
            try:
                raw = st._r.get(f"{st.prefix}sess:{key}")
            except st._errors as exc:
                if st._mem is not None:
                    st._went_down(exc)
                return None
            if raw is None:
                return None
            s = self.sessions[key] = msgspec.json.decode(raw, type=ApiSession)
            self._cap_sessions()
        if s.expires_at <= time.time():
            self.sessions.pop(key, None)
            return None
        return s

    def delete_session(self, key: str) -> None:
        st = self.store
        self.sessions.pop(key, None)
        self.pending_sessions[key] = None
        if st._mem is not None and not st._up:
            return
        self.flush_sessions()

    def flush_pending(self) -> None:
        """After a reconnect: what dispatchers recorded while Redis was away."""
        if self.pending_regs:
            self.flush_regs(time.time())
        if self.pending_sessions:
            self.flush_sessions()
