-- Scale (issue 13): the sweep reads the repositories with jobs in the last
-- 15 minutes every minute (where lost `queued` deliveries are looked for);
-- without an index on first_seen_at that read scanned the whole ledger.
CREATE INDEX workflow_jobs_first_seen ON workflow_jobs (first_seen_at);
