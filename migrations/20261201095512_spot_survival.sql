-- Spot survival (issue 12): the profile columns that say how an interrupted
-- job is re-run and when a profile stops trusting spot, the ledger columns
-- that attribute an interruption to a job and track its re-runs, and the
-- workflow runs whose completion a re-run waits for.

ALTER TABLE instance_profiles
    ADD COLUMN max_interruption_reruns integer NOT NULL DEFAULT 2
        CONSTRAINT max_interruption_reruns_range CHECK (max_interruption_reruns BETWEEN 0 AND 50),
    ADD COLUMN rerun_market text NOT NULL DEFAULT 'on-demand'
        CONSTRAINT rerun_market_known CHECK (rerun_market IN ('spot', 'on-demand')),
    -- Opt-in: also re-run jobs of the same run that failed on their own.
    ADD COLUMN rerun_own_failures boolean NOT NULL DEFAULT false,
    ADD COLUMN spot_breaker_interruptions integer NOT NULL DEFAULT 2
        CONSTRAINT spot_breaker_interruptions_positive CHECK (spot_breaker_interruptions > 0),
    ADD COLUMN spot_breaker_window_secs integer NOT NULL DEFAULT 900
        CONSTRAINT spot_breaker_window_positive CHECK (spot_breaker_window_secs > 0),
    ADD COLUMN spot_breaker_cooldown_secs integer NOT NULL DEFAULT 1800
        CONSTRAINT spot_breaker_cooldown_not_negative CHECK (spot_breaker_cooldown_secs >= 0),
    ADD COLUMN spot_max_job_minutes integer NULL
        CONSTRAINT spot_max_job_minutes_positive CHECK (spot_max_job_minutes IS NULL OR spot_max_job_minutes > 0);

ALTER TABLE workflow_jobs
    -- Attribution: the spot reclaim that killed this job, and where.
    ADD COLUMN interrupted_at timestamptz NULL,
    ADD COLUMN interrupted_runner text NULL,
    ADD COLUMN interrupted_instance_type text NULL,
    ADD COLUMN interrupted_subnet_id text NULL,
    ADD COLUMN interrupted_az text NULL,
    ADD COLUMN interrupted_market text NULL
        CONSTRAINT interrupted_market_known CHECK (interrupted_market IN ('spot', 'on-demand')),
    ADD COLUMN interrupted_after_secs integer NULL,
    -- Re-run tracking. `rerun_of` is the job of an earlier attempt this one
    -- re-runs; `rerun_count` how many re-runs its lineage had before it.
    ADD COLUMN rerun_of bigint NULL,
    ADD COLUMN rerun_count integer NOT NULL DEFAULT 0,
    ADD COLUMN rerun_state text NULL
        CONSTRAINT rerun_state_known CHECK (rerun_state IN ('pending', 'requested', 'rerun', 'lost')),
    ADD COLUMN rerun_reason text NULL,
    ADD COLUMN rerun_attempts integer NOT NULL DEFAULT 0,
    ADD COLUMN rerun_next_at timestamptz NULL,
    ADD COLUMN rerun_requested_at timestamptz NULL;

-- The re-run worker reads the interrupted jobs still waiting for a re-run.
CREATE INDEX workflow_jobs_rerun_pending ON workflow_jobs (rerun_next_at)
    WHERE rerun_state = 'pending';
-- A re-run's new job finds its predecessor by run and name.
CREATE INDEX workflow_jobs_run_name ON workflow_jobs (run_id, name);
-- Duration history per repository + workflow + job name.
CREATE INDEX workflow_jobs_history ON workflow_jobs (repository, workflow_name, name, completed_at DESC)
    WHERE status = 'completed';

-- Workflow runs: whether GitHub says they completed, from the
-- `workflow_run` webhook or from asking GitHub.
CREATE TABLE workflow_runs (
    id           bigint PRIMARY KEY,
    repository   text NOT NULL,
    run_attempt  integer NOT NULL DEFAULT 1,
    status       text NOT NULL,
    conclusion   text NULL,
    completed_at timestamptz NULL,
    -- Last time the re-run worker asked GitHub about it.
    checked_at   timestamptz NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- When a runner's market was not the profile's first choice, why.
ALTER TABLE runners ADD COLUMN market_reason text NULL;
