"""Lua scripts that make publishing idempotent.

A PUBLISH that timed out may still happen: a frozen Redis runs the bytes already in its
socket once it resumes. Retrying a plain PUBLISH would then deliver twice. These scripts
pair the PUBLISH with a guard key in one atomic step, so a retry of the same message is a
no-op and callers see each chunk ``seq`` and each final result once, and no chunk after
the result.
"""

from __future__ import annotations

# KEYS[1] guard, KEYS[2] (optional) the request's idempotency record; ARGV: channel,
# message, ttl seconds, [record, record ttl]. Returns receivers, or -1 if done before. The
# record is stored with the result it holds, or not at all: a stalled worker whose result
# is dropped (another answered meanwhile) must not replace the stored answer with its own.
# The PUBLISH comes before the record: Redis does not undo a failed script's writes, and a
# record refused (Redis out of memory) must not leave the guard set and the result unsent.
PUBLISH_ONCE = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', tonumber(ARGV[3])) then
  local receivers = redis.call('PUBLISH', ARGV[1], ARGV[2])
  if KEYS[2] then
    redis.call('SET', KEYS[2], ARGV[4], 'EX', tonumber(ARGV[5]))
  end
  return receivers
end
return -1
"""

# KEYS[1] stream, KEYS[2] the request's result guard (PUBLISH_ONCE's KEYS[1]); ARGV: group,
# entry id. Acks only an entry whose result is out (now, or before a redelivery). A plain
# XACK after the result script runs even when the script failed: Redis at its maxmemory
# refuses the script's writes but not XACK, which takes no memory, and the entry was gone
# unanswered. Kept pending instead, it is answered once Redis takes writes again.
ACK_IF_ANSWERED = """
if redis.call('EXISTS', KEYS[2]) == 1 then
  return redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
end
return -3
"""

# KEYS[1] last seq, KEYS[2] the request's result guard (PUBLISH_ONCE's KEYS[1]); ARGV:
# channel, seq, message, ttl. Publishes only seq > last published, and nothing once the
# result is out: a sender that outlived its request (a cancel the Redis client swallowed,
# a worker frozen while another answered) cannot put a chunk after the final result.
PUBLISH_IN_ORDER = """
if redis.call('EXISTS', KEYS[2]) == 1 then
  return -2
end
local last = redis.call('GET', KEYS[1])
if (not last) or tonumber(last) < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[4]))
  return redis.call('PUBLISH', ARGV[1], ARGV[3])
end
return -1
"""

ANSWERED = -2  # PUBLISH_IN_ORDER's reply to a chunk of a request that has its result

# KEYS[1] a request's engine deaths (a set); ARGV: one more ('' to only count), ttl. A set
# of deaths, not a number: the same death told twice (a command retried after its reply
# was lost) counts once, and two workers' deaths both count.
DEATHS = """
if ARGV[1] ~= '' then
  redis.call('SADD', KEYS[1], ARGV[1])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
end
return redis.call('SCARD', KEYS[1])
"""

# KEYS[1] highest attempt; ARGV: floor, ttl. A number above every one given before, and at
# least the floor (so the unrecorded first attempt of a first delivery is never reused).
NEXT_ATTEMPT = """
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
local n = math.max(last + 1, tonumber(ARGV[1]))
redis.call('SET', KEYS[1], n, 'EX', tonumber(ARGV[2]))
return n
"""

# KEYS[1] dead-letter stream, KEYS[2] the entry's dead-letter guard; ARGV: guard ttl,
# max length (0: none), then the fields, name and value in turn. Adds the dead letter
# unless this entry has one: an XADD retried after a timeout, or an entry redelivered
# after its worker died between dead-lettering and acking it, wrote a second. Returns
# the new entry's id, or false.
DEAD_LETTER_ONCE = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', tonumber(ARGV[1])) then
  return false
end
local command = {'XADD', KEYS[1]}
if tonumber(ARGV[2]) > 0 then
  table.insert(command, 'MAXLEN')
  table.insert(command, '=')
  table.insert(command, ARGV[2])
end
table.insert(command, '*')
for i = 3, #ARGV do table.insert(command, ARGV[i]) end
return redis.call(unpack(command))
"""

# KEYS[1] the hosts index (``keys.HOSTS_INDEX``). Drops the members whose key is gone,
# each checked and removed in one step: a reader that saw a key missing and removed its
# member afterwards could drop one whose worker had just written it again.
PRUNE_HOSTS = """
local gone = 0
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', member) == 0 then
    redis.call('SREM', KEYS[1], member)
    gone = gone + 1
  end
end
return gone
"""
