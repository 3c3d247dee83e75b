-- A warm pool registers where its profile's latest job came from: one
-- index probe per profile instead of a sort over every job.
CREATE INDEX workflow_jobs_profile_recent ON workflow_jobs (profile, first_seen_at DESC)
    WHERE profile IS NOT NULL;
