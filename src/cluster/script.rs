//! The server-side scripts: every change to the cluster's counts is one of these, run
//! atomically by Redis, so two instances deciding at the same moment never both take the last
//! slot.
//!
//! Layout, under the prefix `mxgate:{name}:`:
//! - `leases`: a sorted set, instance → the Redis clock (ms) at which its lease ends;
//! - `g`, `s:{source}`, `n:{block}`: one hash per count, instance → that instance's sessions;
//! - `k:{instance}`: the set of count keys the instance holds a field in, so its counts can be
//!   taken back whole (a clean stop, a re-registration, an expired lease).
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
  redis.call('DEL', held)
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
"#;

/// Admission. ARGV: prefix, instance, source key, source cap (-1: none), network key ('' for
/// none), network cap, global cap, enforce (1, or 0 for a dry run).
///
/// Returns `{code, total}`: code 0 admitted, 1 source limit, 2 network limit, 3 global limit
/// (in a dry run the session is counted anyway), -1 this instance has no lease (it must
/// register again); total is the cluster's sessions after the decision.
const ADMIT: &str = r#"
if not redis.call('ZSCORE', leases, me) then return {-1, 0} end
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
local total = count(g)
if reason == 0 and total >= tonumber(ARGV[7]) then reason = 3 end
if reason ~= 0 and ARGV[8] == '1' then return {reason, total} end
local held = prefix .. 'k:' .. me
local keys = {g, s}
if n then keys[3] = n end
for _, key in ipairs(keys) do
  redis.call('HINCRBY', key, me, 1)
  redis.call('SADD', held, key)
end
return {reason, total + 1}
"#;

/// Release. ARGV: prefix, instance, then the full names of the count keys to take one from
/// (a key may repeat, once per session).
const RELEASE: &str = r#"
local held = prefix .. 'k:' .. me
for i = 3, #ARGV do
  local key = ARGV[i]
  if redis.call('HINCRBY', key, me, -1) <= 0 then
    redis.call('HDEL', key, me)
    redis.call('SREM', held, key)
  end
end
return 0
"#;

/// Lease refresh. ARGV: prefix, instance, ttl (ms). Returns `{held, total, instances}`: held is
/// 0 when the lease had already ended (the instance must register again; it is not renewed).
const REFRESH: &str = r#"
local held = redis.call('ZSCORE', leases, me)
if held then redis.call('ZADD', leases, now + tonumber(ARGV[3]), me) end
return {held and 1 or 0, count(prefix .. 'g'), redis.call('ZCARD', leases)}
"#;

/// Registration: this instance's counts replaced whole by its live sessions, under a new
/// lease. ARGV: prefix, instance, ttl (ms), then pairs of full count key and count.
const REGISTER: &str = r#"
reap(me)
local held = prefix .. 'k:' .. me
for i = 4, #ARGV, 2 do
  redis.call('HSET', ARGV[i], me, ARGV[i + 1])
  redis.call('SADD', held, ARGV[i])
end
redis.call('ZADD', leases, now + tonumber(ARGV[3]), me)
return {count(prefix .. 'g'), redis.call('ZCARD', leases)}
"#;

/// A clean stop: every count of this instance given back, its lease ended. ARGV: prefix,
/// instance.
const LEAVE: &str = r#"
reap(me)
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
        Scripts {
            admit: with(ADMIT),
            release: with(RELEASE),
            refresh: with(REFRESH),
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
