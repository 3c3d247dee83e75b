-- Spot survival, continued (issue 12).
--
-- The AZ of an interruption: `workflow_jobs.interrupted_az` was created by
-- 20261201095512_spot_survival but never written; from now on it holds the
-- reclaimed instance's `Placement.AvailabilityZone`. IF NOT EXISTS keeps
-- this idempotent for databases that already have it (all of them).
ALTER TABLE workflow_jobs ADD COLUMN IF NOT EXISTS interrupted_az text NULL;

-- A terminal re-run outcome that is not a loss: GitHub reports the
-- interrupted job finished well (the reclaim came after it, or another
-- runner ran it), so there is nothing to re-run.
ALTER TABLE workflow_jobs DROP CONSTRAINT rerun_state_known;
ALTER TABLE workflow_jobs ADD CONSTRAINT rerun_state_known
    CHECK (rerun_state IN ('pending', 'requested', 'rerun', 'lost', 'not_needed'));
