-- wrk script for every workload of bench/run.py:
--
--   wrk ... -s bench/workload.lua URL -- MODE COUNT SEED
--
--   one       the preloaded pair 0, over and over (warm get)
--   create    a new random pair every request
--   mixed     95% a preloaded pair drawn from the first COUNT, 5% a new pair
--   existing  a preloaded pair drawn from the first COUNT (scale)
--
-- Preloaded pair i is known_pair(i) below; bench/run.py makes the same ids.
-- done() prints one "WRK {json}" line that run.py reads.

local PATH = "/api/messaging/dm-channel?userId1=%s&userId2=%s"
local mode, count

local function known_pair(i)
  -- A multiplicative hash spreads the pairs over the index like random ids.
  local h = (i * 2654435761) % 4294967296
  return string.format("%08x-b0b0-4000-8000-%012x", h, i),
         string.format("%08x-b0b0-4000-9000-%012x", h, i)
end

local function random_user()
  local r = math.random
  return string.format("%04x%04x-%04x-4%03x-%04x-%04x%04x%04x",
    r(0, 0xffff), r(0, 0xffff), r(0, 0xffff), r(0, 0xfff),
    r(0x8000, 0xbfff), r(0, 0xffff), r(0, 0xffff), r(0, 0xffff))
end

local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("thread_number", threads)
end

function init(args)
  mode, count = args[1], tonumber(args[2])
  -- Each thread (and each run) its own sequence, so new pairs are really new.
  math.randomseed(tonumber(args[3]) + thread_number * 7919)
end

function request()
  local user1, user2
  if mode == "one" then
    user1, user2 = known_pair(0)
  elseif mode == "create" or (mode == "mixed" and math.random() < 0.05) then
    user1, user2 = random_user(), random_user()
  else -- existing, or mixed's 95%
    user1, user2 = known_pair(math.random(0, count - 1))
  end
  return wrk.format("GET", string.format(PATH, user1, user2))
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"non_2xx": %d, "socket_errors": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    -- wrk counts status >= 400 here; the service answers no 3xx.
    e.status, e.connect + e.read + e.write + e.timeout))
end
