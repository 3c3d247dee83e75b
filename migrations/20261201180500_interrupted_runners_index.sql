-- Scale (issue 13, item 4): every launch's market choice counts the
-- profile's recent reclaims (the spot breaker). Ended runners pile up by the
-- million; reclaimed ones are few, so they get an index of their own.
-- `updated_at` bounds the scan: it is written with `terminated_at` and only
-- grows after, so `COALESCE(terminated_at, updated_at) > t` implies
-- `updated_at > t`, which the queries state too.
CREATE INDEX runners_interrupted ON runners (controller_id, updated_at)
    WHERE state = 'interrupted';
