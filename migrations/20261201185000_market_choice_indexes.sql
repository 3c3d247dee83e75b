-- Scale (issue 13, item 4): each launch's market choice runs under its
-- profile's lock, so what it reads must not grow with the queue or the
-- fleet. Queued re-runs and live on-demand runners are few; 10,000 queued
-- jobs and 10,000 live runners made each choice read both in full (~8 ms a
-- launch, serialised per profile).
CREATE INDEX workflow_jobs_queued_reruns ON workflow_jobs (profile)
    WHERE status = 'queued' AND run_attempt > 1;
CREATE INDEX runners_live_on_demand ON runners (controller_id, profile)
    WHERE market = 'on-demand'
      AND state IN ('requested', 'registered', 'launching', 'booting', 'idle');
