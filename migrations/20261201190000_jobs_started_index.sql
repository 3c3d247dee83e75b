-- A pass settles only the jobs that started or completed since the last
-- one: this index finds the starts (`workflow_jobs_completed_at` the
-- completions), so a pass no longer reads every running job.
CREATE INDEX IF NOT EXISTS workflow_jobs_started ON workflow_jobs (in_progress_at)
    WHERE status = 'in_progress';
