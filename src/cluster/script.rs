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
//!   an admission, a release or a lease refresh;
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

/// Max-min fair shares of the global count, by demand. `over_share(counts, cap, mine)` says
/// whether instance `me` (demand `mine`) is to leave the next slot to another: it holds its
/// share or more while another holds less than its own share and has clients waiting. The
/// shares fill like water: every instance gets its whole demand if that is no more than an
/// equal split of what is left, and the rest is split equally between the others (demands 30,
/// 5 and 5 under 20 give 10, 5 and 5). An instance with no demand on record is taken to want
/// what it holds. While nobody else waits, no share refuses anything.
const SHARES: &str = r#"
local function over_share(counts, cap, mine)
  local demands = {}
  local flat = redis.call('HGETALL', prefix .. 'd')
  for i = 1, #flat, 2 do demands[flat[i]] = tonumber(flat[i + 1]) end
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
redis.call('HSET', prefix .. 'd', me, ARGV[11])
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
redis.call('HSET', prefix .. 'd', me, ARGV[4])
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
  redis.call('HSET', prefix .. 'd', me, ARGV[5])
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
        Scripts {
            admit: redis::Script::new(&format!("{PRELUDE}{SHARES}{ADMIT}")),
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

#[cfg(test)]
pub(super) mod tests {
    //! The scripts against a real `redis-server`, in orders the instances can produce.

    use super::*;

    pub(in crate::cluster) struct Server(std::process::Child);

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn server() -> Option<(Server, redis::Connection)> {
        let (server, url) = server_url()?;
        let client = redis::Client::open(url).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Ok(c) = client.get_connection() {
                return Some((server, c));
            }
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// A fresh `redis-server` on a loopback port and its URL; `None` when it is not installed
    /// (outside CI). It may still be starting.
    pub(in crate::cluster) fn server_url() -> Option<(Server, String)> {
        let found = std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .is_ok();
        if !found {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "redis-server is required in CI"
            );
            eprintln!("SKIP: redis-server is not installed");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Some((Server(child), format!("redis://127.0.0.1:{port}/0")))
    }

    const P: &str = "mxgate:t:";

    fn register(c: &mut redis::Connection, token: &str, epoch: u64, counts: &[(&str, u64)]) -> i64 {
        let s = Scripts::new();
        let mut call = s.register.prepare_invoke();
        call.arg(P).arg("a").arg(10_000).arg(token).arg(epoch);
        for (k, n) in counts {
            call.arg(format!("{P}{k}")).arg(*n);
        }
        call.invoke::<(i64, u64, u64, u64)>(c).unwrap().0
    }

    fn admit(c: &mut redis::Connection, token: &str, epoch: u64, source: &str) -> i64 {
        admit_warming(c, token, epoch, source).0
    }

    /// The code and whether the copy is warming up.
    fn admit_warming(
        c: &mut redis::Connection,
        token: &str,
        epoch: u64,
        source: &str,
    ) -> (i64, bool) {
        let s = Scripts::new();
        let mut call = s.admit.prepare_invoke();
        call.arg(P)
            .arg("a")
            .arg(source)
            .arg(3)
            .arg("")
            .arg(0)
            .arg(10)
            .arg(1)
            .arg(token)
            .arg(epoch)
            .arg(1);
        let (code, _, warming) = call.invoke::<(i64, i64, i64)>(c).unwrap();
        (code, warming == 1)
    }

    fn global(c: &mut redis::Connection) -> i64 {
        let v: Vec<i64> = redis::cmd("HVALS").arg(format!("{P}g")).query(c).unwrap();
        v.iter().sum()
    }

    #[test]
    fn an_admission_that_overtakes_its_registration_is_kept() {
        let Some((_server, mut c)) = server() else {
            return;
        };
        assert_eq!(register(&mut c, "t1", 1, &[]), 0);
        assert_eq!(admit(&mut c, "t1", 1, "192.0.2.1/32"), 0);
        // The instance snapshots (1 session) for registration 2; a new admission, counted
        // after that snapshot, reaches Redis before the registration does.
        assert_eq!(admit(&mut c, "t1", 2, "192.0.2.2/32"), 0);
        assert_eq!(
            register(&mut c, "t1", 2, &[("g", 1), ("s:192.0.2.1/32", 1)]),
            0
        );
        assert_eq!(global(&mut c), 2, "the overtaking admission survives");
        // One counted before the snapshot, arriving after the registration: already in it.
        assert_eq!(
            register(
                &mut c,
                "t1",
                3,
                &[
                    ("g", 3),
                    ("s:192.0.2.1/32", 1),
                    ("s:192.0.2.2/32", 1),
                    ("s:192.0.2.3/32", 1)
                ]
            ),
            0
        );
        assert_eq!(admit(&mut c, "t1", 2, "192.0.2.3/32"), 0);
        assert_eq!(global(&mut c), 3, "not counted twice");
        // A registration that arrives late, after a newer one, is dropped.
        assert_eq!(register(&mut c, "t1", 2, &[]), -2);
        assert_eq!(global(&mut c), 3);
    }

    #[test]
    fn a_second_process_under_the_same_name_cannot_take_its_counts() {
        let Some((_server, mut c)) = server() else {
            return;
        };
        assert_eq!(register(&mut c, "first", 1, &[("g", 4)]), 0);
        assert_eq!(register(&mut c, "second", 1, &[]), -1);
        assert_eq!(admit(&mut c, "second", 1, "192.0.2.9/32"), -1);
        assert_eq!(global(&mut c), 4);
        // Nor can its releases (of sessions it admitted alone) take from the first's counts.
        let s = Scripts::new();
        let mut call = s.release.prepare_invoke();
        call.arg(P).arg("a").arg("second").arg(0);
        call.arg(format!("{P}g")).arg(format!("{P}g"));
        call.invoke::<i64>(&mut c).unwrap();
        assert_eq!(global(&mut c), 4);
    }

    #[test]
    fn a_copy_that_begins_empty_warms_up_for_one_lease_and_only_then() {
        let Some((_server, mut c)) = server() else {
            return;
        };
        // The first registration into a Redis with no copy starts the warm-up.
        assert_eq!(register(&mut c, "t1", 1, &[]), 0);
        let left: i64 = redis::cmd("PTTL")
            .arg(format!("{P}warm"))
            .query(&mut c)
            .unwrap();
        assert!(
            left > 9_000 && left <= 10_000,
            "one lease of 10 s: {left} ms"
        );
        assert_eq!(admit_warming(&mut c, "t1", 1, "192.0.2.1/32"), (0, true));
        // A later registration (another instance, or this one again) does not extend it.
        redis::cmd("PEXPIRE")
            .arg(format!("{P}warm"))
            .arg(1)
            .query::<i64>(&mut c)
            .unwrap();
        while redis::cmd("EXISTS")
            .arg(format!("{P}warm"))
            .query::<i64>(&mut c)
            .unwrap()
            == 1
        {
            std::thread::yield_now();
        }
        assert_eq!(
            register(&mut c, "t1", 2, &[("g", 1), ("s:192.0.2.1/32", 1)]),
            0
        );
        assert_eq!(admit_warming(&mut c, "t1", 2, "192.0.2.2/32"), (0, false));
        // Every lease ended while the copy stayed (Redis stalled, or away with persistence):
        // warms again.
        redis::cmd("ZADD")
            .arg(format!("{P}leases"))
            .arg(0)
            .arg("a")
            .query::<i64>(&mut c)
            .unwrap();
        assert_eq!(register(&mut c, "t1", 3, &[("g", 2)]), 0);
        assert_eq!(admit_warming(&mut c, "t1", 3, "192.0.2.3/32"), (0, true));
        // A warm-up made to last by hand ends at the next script.
        redis::cmd("PERSIST")
            .arg(format!("{P}warm"))
            .query::<i64>(&mut c)
            .unwrap();
        assert_eq!(admit_warming(&mut c, "t1", 3, "192.0.2.4/32"), (0, false));
        // The copy is lost (a restart without persistence): the next registration warms again.
        redis::cmd("FLUSHDB").query::<()>(&mut c).unwrap();
        assert_eq!(register(&mut c, "t1", 4, &[("g", 2)]), 0);
        assert_eq!(admit_warming(&mut c, "t1", 4, "192.0.2.5/32"), (0, true));
        assert_eq!(global(&mut c), 3);
    }
}
