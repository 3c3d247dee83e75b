-- spot-runners schema. `instance_profiles` is a public interface: operators
-- edit its rows directly. The other tables are the service's own ledger.

-- Operators edit profiles by hand, so the constraints reject what would make
-- no sense rather than trusting every editor to know the rules.
CREATE TABLE instance_profiles (
    name                 text PRIMARY KEY
                         CONSTRAINT profile_name_format
                         CHECK (name ~ '^[a-z0-9][a-z0-9-]*$' AND length(name) <= 32),
    labels               text[] NOT NULL
                         CONSTRAINT labels_not_empty
                         CHECK (cardinality(labels) > 0 AND array_position(labels, NULL) IS NULL),
    instance_types       text[] NOT NULL
                         CONSTRAINT instance_types_not_empty
                         CHECK (cardinality(instance_types) > 0 AND array_position(instance_types, NULL) IS NULL),
    image_id             text NOT NULL CONSTRAINT image_id_not_blank CHECK (btrim(image_id) <> ''),
    -- Empty means "the region's default subnet", which is handy in a sandbox account.
    subnet_ids           text[] NOT NULL CONSTRAINT subnet_ids_no_nulls CHECK (array_position(subnet_ids, NULL) IS NULL),
    security_group_ids   text[] NOT NULL DEFAULT '{}',
    iam_instance_profile text NULL,
    market               text NOT NULL DEFAULT 'spot'
                         CONSTRAINT market_known CHECK (market IN ('spot', 'on-demand')),
    on_demand_fallback   boolean NOT NULL DEFAULT true,
    max_instances        integer NOT NULL DEFAULT 10 CONSTRAINT max_instances_positive CHECK (max_instances > 0),
    min_idle             integer NOT NULL DEFAULT 0 CONSTRAINT min_idle_not_negative CHECK (min_idle >= 0),
    idle_timeout_secs    integer NOT NULL DEFAULT 300 CONSTRAINT idle_timeout_positive CHECK (idle_timeout_secs > 0),
    boot_timeout_secs    integer NOT NULL DEFAULT 600 CONSTRAINT boot_timeout_positive CHECK (boot_timeout_secs > 0),
    max_lifetime_secs    integer NOT NULL DEFAULT 28800 CONSTRAINT max_lifetime_positive CHECK (max_lifetime_secs > 0),
    runner_group_id      bigint NOT NULL DEFAULT 1 CONSTRAINT runner_group_positive CHECK (runner_group_id > 0),
    root_volume_gb       integer NOT NULL DEFAULT 64 CONSTRAINT root_volume_range CHECK (root_volume_gb BETWEEN 1 AND 16384),
    repositories         text[] NULL,
    enabled              boolean NOT NULL DEFAULT true,
    priority             integer NOT NULL DEFAULT 0,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT min_idle_within_max CHECK (min_idle <= max_instances)
);

CREATE FUNCTION spot_runners_touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END $$;

CREATE TRIGGER instance_profiles_touch BEFORE UPDATE ON instance_profiles
    FOR EACH ROW EXECUTE FUNCTION spot_runners_touch_updated_at();

-- Every replica reloads its profiles on this notification, so an edit takes
-- effect without a restart.
CREATE FUNCTION spot_runners_notify_profiles() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('spot_runners_profiles', '');
    RETURN NULL;
END $$;

CREATE TRIGGER instance_profiles_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON instance_profiles FOR EACH STATEMENT EXECUTE FUNCTION spot_runners_notify_profiles();

-- Status order for "only move forward". IMMUTABLE so it can sit in indexes.
CREATE FUNCTION job_status_rank(status text) RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE status
        WHEN 'waiting' THEN 0
        WHEN 'queued' THEN 1
        WHEN 'in_progress' THEN 2
        WHEN 'completed' THEN 3
    END::smallint
$$;

-- One row per workflow job GitHub told us about.
CREATE TABLE workflow_jobs (
    id                bigint PRIMARY KEY,
    run_id            bigint NOT NULL,
    run_attempt       integer NOT NULL DEFAULT 1,
    name              text NOT NULL DEFAULT '',
    workflow_name     text NULL,
    repository        text NOT NULL,
    owner             text NOT NULL,
    -- NULL for a user-owned repository (runners are then repository-level).
    org               text NULL,
    installation_id   bigint NULL,
    html_url          text NULL,
    labels            text[] NOT NULL,
    status            text NOT NULL
                      CONSTRAINT job_status_known CHECK (job_status_rank(status) IS NOT NULL),
    conclusion        text NULL,
    -- The runner GitHub really gave the job (from in_progress/completed).
    runner_id         bigint NULL,
    runner_name       text NULL,
    -- The profile matched when the job arrived, or why none did.
    profile           text NULL,
    match_error       text NULL,
    github_created_at timestamptz NULL,
    waiting_at        timestamptz NULL,
    queued_at         timestamptz NULL,
    in_progress_at    timestamptz NULL,
    completed_at      timestamptz NULL,
    first_seen_at     timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    -- Last time the stale-job check asked GitHub about it.
    checked_at        timestamptz NULL,
    CONSTRAINT matched_or_explained CHECK (profile IS NULL OR match_error IS NULL)
);

-- Open demand is what every reconcile pass reads.
CREATE INDEX workflow_jobs_open ON workflow_jobs (profile, status)
    WHERE status IN ('waiting', 'queued', 'in_progress');
CREATE INDEX workflow_jobs_runner ON workflow_jobs (runner_name) WHERE runner_name IS NOT NULL;
CREATE INDEX workflow_jobs_completed_at ON workflow_jobs (completed_at) WHERE completed_at IS NOT NULL;

-- Delivery GUIDs seen, for de-duplication. Pruned after the retention period
-- (GitHub lets a delivery be redelivered for 3 days).
CREATE TABLE webhook_deliveries (
    delivery_id  text PRIMARY KEY,
    event        text NOT NULL,
    action       text NULL,
    job_id       bigint NULL,
    received_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_deliveries_received_at ON webhook_deliveries (received_at);

-- Runners this controller created. The row is written before anything is
-- created outside, so a crash at any step can be resumed or cleaned up.
CREATE TABLE runners (
    name              text PRIMARY KEY,
    controller_id     text NOT NULL,
    profile           text NOT NULL,
    state             text NOT NULL CONSTRAINT runner_state_known CHECK (state IN (
                          'requested', 'registered', 'launching', 'booting', 'idle', 'busy',
                          'done', 'terminating', 'terminated', 'launch_failed', 'boot_timeout',
                          'idle_timeout', 'interrupted', 'orphaned')),
    -- Where the runner is registered: an organization, or a repository for
    -- user-owned repositories.
    org               text NULL,
    repository        text NULL,
    github_runner_id  bigint NULL,
    instance_id       text NULL,
    instance_type     text NULL,
    subnet_id         text NULL,
    market            text NULL CONSTRAINT runner_market_known CHECK (market IN ('spot', 'on-demand')),
    job_id            bigint NULL,
    launch_attempts   integer NOT NULL DEFAULT 0,
    last_error_code   text NULL,
    last_error        text NULL,
    -- Why it ended (a final state's detail, e.g. Server.SpotInstanceTermination).
    reason            text NULL,
    -- When the demand it was launched for was first seen (launch latency).
    demand_since      timestamptz NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    registered_at     timestamptz NULL,
    launched_at       timestamptz NULL,
    booted_at         timestamptz NULL,
    online_at         timestamptz NULL,
    busy_at           timestamptz NULL,
    done_at           timestamptz NULL,
    terminating_at    timestamptz NULL,
    terminated_at     timestamptz NULL,
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX runners_live ON runners (profile, state)
    WHERE state NOT IN ('terminated', 'launch_failed', 'boot_timeout', 'idle_timeout', 'interrupted', 'orphaned');
CREATE INDEX runners_instance ON runners (instance_id) WHERE instance_id IS NOT NULL;
