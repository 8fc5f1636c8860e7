-- Drop one request's reservation (it ended, or failed over). KEYS as in reserve.lua; ARGV[1] id.
return drop_reservation(KEYS[1], KEYS[2], KEYS[3], ARGV[1])
