-- Scale (issue 13, item 4): interrupted jobs are a handful among millions.
-- Linking re-runs to the job they re-run starts from them, not from every
-- job in the ledger (1.0–1.7 s a re-run pass with a million closed jobs).
CREATE INDEX workflow_jobs_interrupted_run ON workflow_jobs (run_id, name)
    WHERE interrupted_at IS NOT NULL;
