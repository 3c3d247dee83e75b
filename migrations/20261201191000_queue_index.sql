-- A pass counts the queue by profile and scope and, for the runners it
-- creates, reads when the jobs they cover were first seen (a few rows at a
-- known place in the queue): both in queue order, by this index.
CREATE INDEX IF NOT EXISTS workflow_jobs_queue ON workflow_jobs (profile, first_seen_at, id)
    WHERE status = 'queued';
