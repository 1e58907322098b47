//! The server-side scripts: every change to the cluster's counts is one of these, run
//! atomically by Redis, so two instances deciding at the same moment never both take the last
//! slot.
//!
//! Layout, under the prefix `mxgate:{name}:`:
//! - `leases`: a sorted set, instance → the Redis clock (ms) at which its lease ends;
//! - `g`, `s:{source}`, `n:{block}`: one hash per count, instance → that instance's sessions;
//! - `k:{instance}`: the set of count keys the instance holds a field in, so its counts can be
//!   taken back whole (a clean stop, a re-registration, an expired lease);
//! - `token`, `epoch`: per instance, the process that holds the name (a random token, so two
//!   hosts given one name are caught) and the last registration Redis applied;
//! - `x:{instance}`: admissions that reached Redis before the registration they came after;
//! - `d`: a hash, instance → its demand (sessions and waiting clients), as it last said with
//!   an admission, a release or a lease refresh; a demand that fell is held at what it was for
//!   [`DEMAND_HOLD`] (see [`DEMAND`]);
//! - `warm`: present, with a time to live of one lease, after a registration that found no
//!   live lease at all (see `REGISTER`).
//!
//! A count is the sum of its hash's fields. Every script first takes back the counts of each
//! instance whose lease has ended, so a field only ever belongs to a live instance. Time is
//! Redis's own (`TIME`), never the instances' clocks.

/// What every script starts with: the clock, and taking back expired instances.
const PRELUDE: &str = r#"
if redis.replicate_commands then redis.replicate_commands() end
local prefix = ARGV[1]
local me = ARGV[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local leases = prefix .. 'leases'
local function reap(inst)
  local held = prefix .. 'k:' .. inst
  for _, key in ipairs(redis.call('SMEMBERS', held)) do
    redis.call('HDEL', key, inst)
  end
  redis.call('DEL', held, prefix .. 'x:' .. inst)
  redis.call('HDEL', prefix .. 'd', inst)
  redis.call('HDEL', prefix .. 'epoch', inst)
  redis.call('HDEL', prefix .. 'token', inst)
  redis.call('ZREM', leases, inst)
end
for _, inst in ipairs(redis.call('ZRANGEBYSCORE', leases, '-inf', now)) do
  reap(inst)
end
local function count(key)
  local n = 0
  for _, c in ipairs(redis.call('HVALS', key)) do n = n + tonumber(c) end
  return n
end
local function warm_left()
  local left = redis.call('PTTL', prefix .. 'warm')
  if left == -1 then
    -- Made to last (an operator's PERSIST): a warm-up never ends that way. It is over.
    redis.call('DEL', prefix .. 'warm')
  end
  if left < 0 then return 0 end
  return left
end
"#;

/// How long a host's demand that fell is still read at what it was: one pace of asks
/// (`pace::ASK_EVERY`). A session that ends here is most often followed at once by the same
/// client's next one (a sender with more mail), a millisecond later; without the hold, another
/// host's waiter, asking in that millisecond, would find this host under its demand no more,
/// take the freed slot, and leave this host's returning client to wait for the next session to
/// end anywhere (up to a session's length: measured, 736 ms). With it, the freed slot stays
/// this host's for one pace against another host's backlog; if its client does not come back,
/// the other host's next ask, one pace later, gets it.
pub const DEMAND_HOLD: std::time::Duration = super::pace::ASK_EVERY;

/// Publishing and reading a demand. A field of `d` is `demand`, or `demand held until` while a
/// demand that fell is held at `held` until the Redis clock reaches `until` (ms). A hold that
/// runs keeps its end: a demand falling step by step is held at its highest for one
/// `DEMAND_HOLD` from the first step, not for ever; a demand at or over the held one ends it.
/// Nothing here costs a round trip: the demand rides on the calls a host makes anyway.
const DEMAND: &str = r#"
local function read_demand(v)
  local d, held, till = string.match(v, '^(%d+) (%d+) (%d+)$')
  if not d then return tonumber(v) or 0, nil, nil end
  return tonumber(d), tonumber(held), tonumber(till)
end
local function demand_now(v, with_hold)
  local d, held, till = read_demand(v)
  if with_hold and held and till > now then return held end
  return d
end
local function publish(demand)
  demand = tonumber(demand)
  local key = prefix .. 'd'
  local v = tostring(demand)
  local was = redis.call('HGET', key, me)
  if was then
    local d, held, till = read_demand(was)
    if held and till > now then
      if held > demand then v = v .. ' ' .. held .. ' ' .. till end
    elseif d > demand then
      v = v .. ' ' .. d .. ' ' .. (now + HOLD_MS)
    end
  end
  redis.call('HSET', key, me, v)
end
"#;

/// Max-min fair shares of the global count, by demand. `over_share(counts, cap, mine)` says
/// whether instance `me` (demand `mine`) is to leave the next slot to another: it holds its
/// share or more while another holds less than its own share and has clients waiting. The
/// shares fill like water: every instance gets its whole demand if that is no more than an
/// equal split of what is left, and the rest is split equally between the others (demands 30,
/// 5 and 5 under 20 give 10, 5 and 5). An instance with no demand on record is taken to want
/// what it holds. Another's demand is read with its hold ([`DEMAND`]) only when `me` has
/// clients waiting behind the asking one: the hold keeps a freed slot from a backlog, while
/// one newcomer against another returning client is first come, first served (and a host
/// whose queue is off never waits, so it is never refused by a hold). While nobody else waits,
/// no share refuses anything.
const SHARES: &str = r#"
local function over_share(counts, cap, mine)
  local demands = {}
  local flat = redis.call('HGETALL', prefix .. 'd')
  local backlog = mine > (counts[me] or 0) + 1
  for i = 1, #flat, 2 do demands[flat[i]] = demand_now(flat[i + 1], backlog) end
  demands[me] = mine
  for inst, c in pairs(counts) do
    if (demands[inst] or 0) < c then demands[inst] = c end
  end
  local waiting = false
  for inst, d in pairs(demands) do
    if inst ~= me and d > (counts[inst] or 0) then waiting = true end
  end
  if not waiting then return false end
  local list = {}
  for inst, d in pairs(demands) do list[#list + 1] = {inst, d} end
  table.sort(list, function(a, b) return a[2] < b[2] end)
  local left, share = cap, {}
  for i, e in ipairs(list) do
    local s = math.min(e[2], left / (#list - i + 1))
    share[e[1]] = s
    left = left - s
  end
  if (counts[me] or 0) < share[me] then return false end
  for inst, d in pairs(demands) do
    local c = counts[inst] or 0
    if inst ~= me and c < share[inst] and d > c then return true end
  end
  return false
end
"#;

/// Admission. ARGV: prefix, instance, source key, source cap (-1: none), network key ('' for
/// none), network cap, global cap, enforce (1, or 0 for a dry run), token, epoch, demand
/// (this instance's sessions, the asking one included, and its waiting clients).
///
/// Under the global cap, an instance over its max-min share ([`SHARES`]) is refused as if the
/// cap were reached, while another instance under its own share has clients waiting: the
/// freed slot is left to that one, which asks within `pace::ASK_EVERY`.
///
/// The epoch is the registration the instance had made when it counted this session itself.
/// One older than the registration Redis holds was in that registration's snapshot already:
/// it is decided but not counted again. One newer than it came after a snapshot that has not
/// arrived yet: it is counted, and also noted in `x:{instance}`, so the registration adds it
/// back on top of its snapshot instead of wiping it.
///
/// Returns `{code, total, warming}`: code 0 admitted, 1 source limit, 2 network limit, 3
/// global limit or share (in a dry run the session is counted anyway), -1 this instance has no lease
/// (it must register again); total is the cluster's sessions after the decision; warming is 1
/// while the copy is younger than one lease (the instance must then also hold to its share).
const ADMIT: &str = r#"
if not redis.call('ZSCORE', leases, me) then return {-1, 0, 0} end
if redis.call('HGET', prefix .. 'token', me) ~= ARGV[9] then return {-1, 0, 0} end
local warming = 0
if warm_left() > 0 then warming = 1 end
local epoch = tonumber(ARGV[10])
local registered = tonumber(redis.call('HGET', prefix .. 'epoch', me) or '0')
local g = prefix .. 'g'
local s = prefix .. 's:' .. ARGV[3]
local reason = 0
local scap = tonumber(ARGV[4])
if scap >= 0 and count(s) >= scap then reason = 1 end
local n = false
if ARGV[5] ~= '' then
  n = prefix .. 'n:' .. ARGV[5]
  if reason == 0 and count(n) >= tonumber(ARGV[6]) then reason = 2 end
end
publish(ARGV[11])
local counts, total = {}, 0
local flat = redis.call('HGETALL', g)
for i = 1, #flat, 2 do
  local c = tonumber(flat[i + 1])
  counts[flat[i]] = c
  total = total + c
end
local cap = tonumber(ARGV[7])
if reason == 0 and total >= cap then reason = 3 end
if reason == 0 and ARGV[8] == '1' and over_share(counts, cap, tonumber(ARGV[11])) then
  reason = 3
end
if reason ~= 0 and ARGV[8] == '1' then return {reason, total, warming} end
if epoch < registered then return {reason, total, warming} end
local held = prefix .. 'k:' .. me
local keys = {g, s}
if n then keys[3] = n end
for _, key in ipairs(keys) do
  redis.call('HINCRBY', key, me, 1)
  redis.call('SADD', held, key)
  if epoch > registered then
    redis.call('HINCRBY', prefix .. 'x:' .. me, epoch .. '|' .. key, 1)
  end
end
return {reason, total + 1, warming}
"#;

/// Release. ARGV: prefix, instance, token, demand (as in `ADMIT`, after these releases), then
/// the full names of the count keys to take one from (a key may repeat, once per session;
/// none, to say the demand alone). A process whose token does not hold the name (a second
/// host given the same instance name) takes nothing from the holder's counts.
const RELEASE: &str = r#"
if redis.call('HGET', prefix .. 'token', me) ~= ARGV[3] then return 0 end
publish(ARGV[4])
local held = prefix .. 'k:' .. me
for i = 5, #ARGV do
  local key = ARGV[i]
  if redis.call('HINCRBY', key, me, -1) <= 0 then
    redis.call('HDEL', key, me)
    redis.call('SREM', held, key)
  end
end
return 0
"#;

/// Lease refresh. ARGV: prefix, instance, ttl (ms), token, demand (as in `ADMIT`). Returns `{held, total, instances,
/// warm}`: held is 0 when the lease had already ended, or belongs to another process with the
/// same instance name (the instance must register again; it is not renewed); warm is what is
/// left of the warm-up, in ms (0 when over).
const REFRESH: &str = r#"
local held = redis.call('ZSCORE', leases, me)
if redis.call('HGET', prefix .. 'token', me) ~= ARGV[4] then held = false end
if held then
  redis.call('ZADD', leases, now + tonumber(ARGV[3]), me)
  publish(ARGV[5])
end
return {held and 1 or 0, count(prefix .. 'g'), redis.call('ZCARD', leases), warm_left()}
"#;

/// Registration: this instance's counts replaced whole by its live sessions, under a new
/// lease. ARGV: prefix, instance, ttl (ms), token, epoch, then pairs of full count key and
/// count. Admissions counted after the snapshot that reached Redis first (`x:{instance}`,
/// this epoch) are added back on top. Returns `{0, total, instances, warm}` (warm as in
/// `REFRESH`); `{-1, ..}` when a live lease of the same name belongs to another process (two
/// hosts with one instance name), and `{-2, ..}` for a registration older than the one Redis
/// holds (it arrived late).
///
/// The warm-up: a registration that finds no live lease at all (this instance's own
/// included) comes to a Redis that has never seen this cluster, lost its copy (it restarted
/// without persistence, or was flushed), or was away or stalled so long that every lease
/// ended (even with persistence). Either way it cannot know the sessions of instances that
/// have not registered yet, and each live one does within one lease (its next refresh finds
/// no lease, and it registers whole). Until then, Redis's counts may be short, so for one
/// lease every instance also holds to its fallback share (`ADMIT`'s warming).
const REGISTER: &str = r#"
local token = ARGV[4]
local epoch = tonumber(ARGV[5])
local owner = redis.call('HGET', prefix .. 'token', me)
if owner and owner ~= token and redis.call('ZSCORE', leases, me) then
  return {-1, 0, 0, 0}
end
if owner == token and epoch <= tonumber(redis.call('HGET', prefix .. 'epoch', me) or '0') then
  return {-2, 0, 0, 0}
end
if redis.call('ZCARD', leases) == 0 then
  redis.call('SET', prefix .. 'warm', now, 'PX', tonumber(ARGV[3]), 'NX')
end
local early = redis.call('HGETALL', prefix .. 'x:' .. me)
reap(me)
local held = prefix .. 'k:' .. me
for i = 6, #ARGV, 2 do
  redis.call('HSET', ARGV[i], me, ARGV[i + 1])
  redis.call('SADD', held, ARGV[i])
end
local mine = epoch .. '|'
for i = 1, #early, 2 do
  if string.sub(early[i], 1, #mine) == mine then
    local key = string.sub(early[i], #mine + 1)
    redis.call('HINCRBY', key, me, tonumber(early[i + 1]))
    redis.call('SADD', held, key)
  end
end
redis.call('HSET', prefix .. 'token', me, token)
redis.call('HSET', prefix .. 'epoch', me, epoch)
redis.call('ZADD', leases, now + tonumber(ARGV[3]), me)
return {0, count(prefix .. 'g'), redis.call('ZCARD', leases), warm_left()}
"#;

/// A clean stop: every count of this instance given back, its lease ended. ARGV: prefix,
/// instance, token (another process's counts under the same name are left alone).
const LEAVE: &str = r#"
if redis.call('HGET', prefix .. 'token', me) == ARGV[3] then reap(me) end
return 0
"#;

/// The scripts, each loaded once (`EVALSHA`, with `EVAL` after a Redis restart).
pub struct Scripts {
    pub admit: redis::Script,
    pub release: redis::Script,
    pub refresh: redis::Script,
    pub register: redis::Script,
    pub leave: redis::Script,
}

impl Scripts {
    pub fn new() -> Scripts {
        let with = |body: &str| redis::Script::new(&format!("{PRELUDE}{body}"));
        let hold = DEMAND.replace("HOLD_MS", &DEMAND_HOLD.as_millis().to_string());
        Scripts {
            admit: with(&format!("{hold}{SHARES}{ADMIT}")),
            release: with(&format!("{hold}{RELEASE}")),
            refresh: with(&format!("{hold}{REFRESH}")),
            register: with(REGISTER),
            leave: with(LEAVE),
        }
    }
}

impl Default for Scripts {
    fn default() -> Self {
        Scripts::new()
    }
}

#[cfg(test)]
pub(super) mod tests;
