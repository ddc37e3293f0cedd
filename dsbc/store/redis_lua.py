"""The Redis store's writes: one Lua script, so that every change is atomic in Redis.

Redis runs a script alone: no client sees half of a migration, and a script that
returns an error before its final `flush()` has written nothing (every customer read
and changed goes through an in-script overlay first).  The layout (prefix ``dsbc:``)::

    cust         hash  customer id -> JSON [system, state, group, batch_id, expires_cap, [keys]]
    ident        hash  "kind:value" -> customer id
    g:<group>    set   the group's members;  groups: set of group names with members
    counts       hash  "source.active", ..., "prepared": kept by flush()
    lastbatch    hash  customer id -> the batch that last moved it (unlock restores it)
    locks        hash  customer id -> the batch holding it locked: kept by flush()
    leases       hash  batch id -> until when its locks last (a dead migration's expire);
                       -1: rolled back, its migration may lock and flip no more
    seq          int   change sequence number, one per committed write
    log          stream  entry id "<seq>-1": {c: JSON [customer ids]} or {r: "1"} (reload all)
    audit        list  JSON [ts, who, customer_id, from, to, batch_id, note]
    ab:<batch>   list  the same entries, per batch (rollback, `audit(batch_id)`)
    bsum         hash  batch id -> JSON [first_ts, who, from, to, customers, note]
    batches      zset  batch id, scored by the position of its last audit entry
    epoch        str   made once per store; a node that sees another one reloads everything
    meta         hash  misc (flow secret ...)
    reg:<cid>    hash  "account\\ncontact" -> JSON [system, expires_at]
    sess:<key>   str   JSON session, with a TTL

and every committed change publishes its sequence number on channel ``<prefix>changes``.
Keys are built inside the script, so this needs a single Redis master (with Sentinel for
fail-over), not Redis Cluster.

cjson quirks handled by the Python side: an empty array comes back as ``{}``.
"""

from __future__ import annotations

LOG_MAXLEN = 10_000  # change-log entries kept; a node further behind reloads everything

SCRIPT = r"""
local P = ARGV[1]
local op = ARGV[2]
local arg = cjson.decode(ARGV[3])
local CUST, IDENT, COUNTS = P .. 'cust', P .. 'ident', P .. 'counts'

local cache, orig, order, dirty = {}, {}, {}, {}
local audit_rows = {}

local function get(cid)
  local r = cache[cid]
  if r == nil then
    local raw = redis.call('HGET', CUST, cid)
    if raw then
      r = cjson.decode(raw)
      if type(r[6]) ~= 'table' or next(r[6]) == nil then r[6] = {} end
      orig[cid] = {r[1], r[2], tonumber(r[5]) or 0}
    else
      r = false
      orig[cid] = false
    end
    cache[cid] = r
  end
  return r
end

local function put(cid, r)
  if cache[cid] == nil then get(cid) end
  cache[cid] = r
  if not dirty[cid] then
    dirty[cid] = true
    order[#order + 1] = cid
  end
end

local function copy(r)
  local ids = {}
  for i, k in ipairs(r[6]) do ids[i] = k end
  return {r[1], r[2], r[3], r[4], tonumber(r[5]) or 0, ids}
end

-- write the overlay back; mode 'changes' logs the changed ids, 'reload' logs "reload
-- everything", 'quiet' logs nothing (the earlier chunks of a bulk import)
local function flush(mode)
  for _, cid in ipairs(order) do
    local o, r = orig[cid], cache[cid]
    if o then
      redis.call('HINCRBY', COUNTS, o[1] .. '.' .. o[2], -1)
      if o[3] > 0 then redis.call('HINCRBY', COUNTS, 'prepared', -1) end
    end
    if r and r[2] == 'locked' then
      redis.call('HSET', P .. 'locks', cid, r[4])
    elseif o and o[2] == 'locked' then
      redis.call('HDEL', P .. 'locks', cid)
    end
    if r then
      redis.call('HSET', CUST, cid, cjson.encode(r))
      redis.call('HINCRBY', COUNTS, r[1] .. '.' .. r[2], 1)
      if r[5] > 0 then redis.call('HINCRBY', COUNTS, 'prepared', 1) end
    else
      redis.call('HDEL', CUST, cid)
    end
  end
  if #audit_rows > 0 then
    local sums = {}
    local sum_order = {}
    for _, e in ipairs(audit_rows) do
      local row = cjson.encode(e)
      local n = redis.call('RPUSH', P .. 'audit', row)
      redis.call('RPUSH', P .. 'ab:' .. e[6], row)
      redis.call('HSET', P .. 'lastbatch', e[3], e[6])
      local s = sums[e[6]]
      if not s then
        local raw = redis.call('HGET', P .. 'bsum', e[6])
        if raw then s = cjson.decode(raw) else s = {e[1], e[2], e[4], e[5], 0, e[7]} end
        sums[e[6]] = s
        sum_order[#sum_order + 1] = e[6]
      end
      s[2], s[3], s[4], s[6] = e[2], e[4], e[5], e[7]
      s[5] = s[5] + 1
      s.pos = n
    end
    for _, b in ipairs(sum_order) do
      local s = sums[b]
      redis.call('ZADD', P .. 'batches', s.pos, b)
      s.pos = nil
      redis.call('HSET', P .. 'bsum', b, cjson.encode(s))
    end
  end
  if mode == 'quiet' or (#order == 0 and mode ~= 'reload') then return 0 end
  local seq = redis.call('INCR', P .. 'seq')
  local id = tostring(seq) .. '-1'
  if mode == 'reload' then
    redis.call('XADD', P .. 'log', 'MAXLEN', '~', ARGV[4], id, 'r', '1')
  else
    redis.call('XADD', P .. 'log', 'MAXLEN', '~', ARGV[4], id, 'c', cjson.encode(order))
  end
  redis.call('PUBLISH', P .. 'changes', tostring(seq))
  return seq
end

local function result(tbl)
  -- cjson writes an empty table as {}: the Python side reads {} as []
  return cjson.encode(tbl)
end

local function set_group(cid, old, new)
  if old == new then return end
  if old ~= '' then
    redis.call('SREM', P .. 'g:' .. old, cid)
    if redis.call('SCARD', P .. 'g:' .. old) == 0 then redis.call('SREM', P .. 'groups', old) end
  end
  if new ~= '' then
    redis.call('SADD', P .. 'g:' .. new, cid)
    redis.call('SADD', P .. 'groups', new)
  end
end

-- back to active where it is, with the batch that last moved it
local function unlock_one(cid, r)
  local n = copy(r)
  n[2] = 'active'
  n[4] = redis.call('HGET', P .. 'lastbatch', cid) or ''
  put(cid, n)
end

-- customer id -> its customer record, of the customers `bid` holds locked
local function locked_by(bid)
  local held, all = {}, redis.call('HGETALL', P .. 'locks')
  for i = 1, #all, 2 do
    if all[i + 1] == bid then
      local r = get(all[i])
      if r and r[2] == 'locked' and r[4] == bid then held[#held + 1] = all[i] end
    end
  end
  table.sort(held)
  return held
end

-- migrate `ids` to `to` on the overlay; returns result or an error table
local function migrate_in(ids, to, who, bid, now, write, note)
  local inb, found, groups, glist = {}, {}, {}, {}
  for _, cid in ipairs(ids) do inb[cid] = true end
  for _, cid in ipairs(ids) do
    local r = get(cid)
    if r then
      found[cid] = r
      if r[3] ~= '' and not groups[r[3]] then
        groups[r[3]] = true
        glist[#glist + 1] = r[3]
      end
    end
  end
  table.sort(glist)
  for _, g in ipairs(glist) do
    local missing = {}
    for _, m in ipairs(redis.call('SMEMBERS', P .. 'g:' .. g)) do
      if not inb[m] then
        local r = get(m)
        if r and r[3] == g and r[1] ~= to then missing[#missing + 1] = m end
      end
    end
    if #missing > 0 then
      table.sort(missing)
      return nil, {err = 'group', group = g, missing = missing}
    end
  end
  local moved, already, unknown = {}, {}, {}
  for _, cid in ipairs(ids) do
    local r = found[cid]
    if not r then
      unknown[#unknown + 1] = cid
    elseif r[1] == to then
      already[#already + 1] = cid
      if write and (r[2] ~= 'active' or (tonumber(r[5]) or 0) ~= 0) then
        local n = copy(r)
        n[2], n[5] = 'active', 0
        put(cid, n)
      end
    else
      moved[#moved + 1] = cid
      if write then
        local n = copy(r)
        n[1], n[2], n[4], n[5] = to, 'active', bid, 0
        put(cid, n)
        audit_rows[#audit_rows + 1] = {now, who, cid, r[1], to, bid, note}
      end
    end
  end
  return {moved = moved, already = already, unknown = unknown}, nil
end

if op == 'import' then
  -- rows: [cid, [keys], system or '', group]; log: a flush() mode
  for _, row in ipairs(arg.rows) do
    local cid, keys, system, group = row[1], row[2], row[3], row[4]
    if type(keys) ~= 'table' then keys = {} end
    local r = get(cid)
    local n
    if r then
      n = copy(r)
      if system ~= '' then n[1] = system end
    else
      n = {system ~= '' and system or 'source', 'active', '', '', 0, {}}
    end
    local keep = {}
    for _, k in ipairs(keys) do keep[k] = true end
    for _, k in ipairs(n[6]) do
      if not keep[k] and redis.call('HGET', IDENT, k) == cid then redis.call('HDEL', IDENT, k) end
    end
    for _, k in ipairs(keys) do
      local prev = redis.call('HGET', IDENT, k)
      if prev and prev ~= cid then
        local p = get(prev)
        if p then
          local q = copy(p)
          local ids = {}
          for _, pk in ipairs(q[6]) do if pk ~= k then ids[#ids + 1] = pk end end
          q[6] = ids
          put(prev, q)
        end
      end
      redis.call('HSET', IDENT, k, cid)
    end
    local ids = {}
    for i, k in ipairs(keys) do ids[i] = k end
    n[6] = ids
    set_group(cid, r and r[3] or '', group)
    n[3] = group
    put(cid, n)
  end
  return result({seq = flush(arg.log)})
elseif op == 'reload' then
  return result({seq = flush('reload')})
elseif op == 'lock' then
  if redis.call('HGET', P .. 'leases', arg.batch) == '-1' then return result({err = 'cancelled'}) end
  -- the check and the lock in one script: of two batches locking the same customer at
  -- the same instant, one wins and the other is refused with nothing changed
  if not arg.force then
    local held, n = {}, 0
    for _, cid in ipairs(arg.ids) do
      local r = get(cid)
      if r and r[2] == 'locked' and r[4] ~= arg.batch then
        held[cid] = r[4]
        n = n + 1
      end
    end
    if n > 0 then return result({err = 'locked', locked = held}) end
  end
  local found = {}
  for _, cid in ipairs(arg.ids) do
    local r = get(cid)
    if r then
      local n = copy(r)
      n[2], n[4] = 'locked', arg.batch
      put(cid, n)
      found[#found + 1] = cid
    end
  end
  redis.call('HSET', P .. 'leases', arg.batch, tostring(arg['until']))
  return result({seq = flush('changes'), found = found})
elseif op == 'unlock' then
  for _, cid in ipairs(arg.ids) do
    local r = get(cid)
    if r and r[2] == 'locked' and (not arg.batch or r[4] == arg.batch) then unlock_one(cid, r) end
  end
  return result({seq = flush('changes')})
elseif op == 'release' then
  -- the locks of batches whose lease ran out (their migration died): unlocked where they are
  local batches, released, all = {}, {}, redis.call('HGETALL', P .. 'locks')
  for i = 2, #all, 2 do batches[all[i]] = true end
  for bid, _ in pairs(batches) do
    if (tonumber(redis.call('HGET', P .. 'leases', bid)) or 0) < arg.now then
      local held = locked_by(bid)
      for _, cid in ipairs(held) do unlock_one(cid, get(cid)) end
      redis.call('HDEL', P .. 'leases', bid)
      released[bid] = #held
    end
  end
  -- the leases of batches that ended (flipped or unlocked; one per batch ever run): a
  -- batch that still runs renews its own at its next lock; a rolled-back one's -1 stays
  local leases = redis.call('HGETALL', P .. 'leases')
  for i = 1, #leases, 2 do
    local untl = tonumber(leases[i + 1]) or 0
    if untl >= 0 and untl < arg.now and not batches[leases[i]] then
      redis.call('HDEL', P .. 'leases', leases[i])
    end
  end
  return result({seq = flush('changes'), released = released})
elseif op == 'prepare' then
  local cap = math.max(0, math.floor(tonumber(arg.expires) or 0))
  for _, cid in ipairs(arg.ids) do
    local r = get(cid)
    if r then
      local n = copy(r)
      n[5] = cap
      put(cid, n)
    end
  end
  return result({seq = flush('changes')})
elseif op == 'migrate' then
  if not arg.dry and arg.fresh and redis.call('EXISTS', P .. 'ab:' .. arg.batch) == 1 then
    return result({err = 'batch_exists'})
  end
  if not arg.dry and redis.call('HGET', P .. 'leases', arg.batch) == '-1' then
    return result({err = 'cancelled'})
  end
  local res, err = migrate_in(arg.ids, arg.to, arg.who, arg.batch, arg.now, not arg.dry, '')
  if err then return result(err) end
  if not arg.dry then res.seq = flush('changes') end
  return result(res)
elseif op == 'rollback' then
  local rows = redis.call('LRANGE', P .. 'ab:' .. arg.batch, 0, -1)
  -- what the batch still holds locked (it stopped before their flip): released
  local held = locked_by(arg.batch)
  if #rows == 0 and #held == 0 then return result({err = 'unknown_batch'}) end
  if redis.call('EXISTS', P .. 'ab:' .. arg.new) == 1 then return result({err = 'batch_exists'}) end
  local back, seen, systems = {}, {}, {}
  for _, raw in ipairs(rows) do
    local e = cjson.decode(raw)
    local frm, cid = e[4], e[3]
    if not back[frm] then back[frm] = {}; seen[frm] = {}; systems[#systems + 1] = frm end
    if not seen[frm][cid] then
      seen[frm][cid] = true
      back[frm][#back[frm] + 1] = cid
    end
  end
  for _, cid in ipairs(held) do
    local r = get(cid)
    if #rows == 0 and not back[r[1]] then back[r[1]] = {}; systems[#systems + 1] = r[1] end
    unlock_one(cid, r)
  end
  redis.call('HSET', P .. 'leases', arg.batch, '-1')  -- a migration of it still running stops
  table.sort(systems)
  local total = {moved = {}, already = {}, unknown = {}, to = table.concat(systems, ',')}
  for _, cid in ipairs(held) do total.already[#total.already + 1] = cid end
  for _, system in ipairs(systems) do
    local res, err = migrate_in(back[system], system, arg.who, arg.new, arg.now, true,
                                'rollback of ' .. arg.batch)
    if err then return result(err) end
    for _, k in ipairs({'moved', 'already', 'unknown'}) do
      for _, cid in ipairs(res[k]) do total[k][#total[k] + 1] = cid end
    end
  end
  total.seq = flush('changes')
  return result(total)
end
return result({err = 'bad_op', op = op})
"""
