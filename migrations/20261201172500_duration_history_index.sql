-- Scale (issue 13, item 4): the duration-aware market reads the last 20
-- runs of a job (repository + workflow + name) for each distinct queued
-- job of a profile with spot_max_job_minutes. Without this index each
-- lookup scanned the whole history: 27 s a launch with a million closed
-- jobs in the ledger.
CREATE INDEX workflow_jobs_duration_history
    ON workflow_jobs (repository, name, completed_at DESC)
    WHERE status = 'completed' AND interrupted_at IS NULL
      AND in_progress_at IS NOT NULL AND completed_at IS NOT NULL;
