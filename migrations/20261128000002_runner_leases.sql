-- Provisioning work is claimed with a lease, so a replica that crashes
-- mid-launch leaves rows another pass can resume once the lease runs out.
ALTER TABLE runners
    ADD COLUMN lease_owner text NULL,
    ADD COLUMN lease_until timestamptz NULL;

CREATE INDEX runners_provisioning ON runners (created_at)
    WHERE state IN ('requested', 'registered', 'launching');

-- Scope of a runner: exactly one of org or repository.
ALTER TABLE runners ADD CONSTRAINT runner_scope_one
    CHECK ((org IS NULL) <> (repository IS NULL));
