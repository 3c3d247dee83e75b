-- Issue 14, items 8 and 9: an AMI chosen by name (the newest match of an
-- owner's images, so a rebuilt AMI needs no row edit), CPU options for
-- steady benchmark machines, and benchmark tuning on the profiles that ask.

-- image_id stays (rows that name an AMI keep working unchanged); a row may
-- name a filter instead, never both, never neither.
ALTER TABLE instance_profiles
    ALTER COLUMN image_id DROP NOT NULL,
    DROP CONSTRAINT image_id_not_blank,
    ADD CONSTRAINT image_id_not_blank CHECK (image_id IS NULL OR btrim(image_id) <> ''),
    -- `owner/name-pattern`: DescribeImages' Owners (an account id, self,
    -- amazon or aws-marketplace) and its name filter (wildcards * and ?).
    ADD COLUMN image_filter text NULL
        CONSTRAINT image_filter_format
        CHECK (image_filter ~ '^(self|amazon|aws-marketplace|[0-9]{12})/[^/ ].{0,127}$'),
    ADD CONSTRAINT one_image_source CHECK ((image_id IS NULL) <> (image_filter IS NULL)),
    -- CpuOptions.ThreadsPerCore at launch: 1 turns SMT off; NULL keeps the
    -- instance type's default.
    ADD COLUMN threads_per_core integer NULL
        CONSTRAINT threads_per_core_known CHECK (threads_per_core IN (1, 2)),
    -- The boot script applies the image's benchmark tuning (governor, turbo,
    -- C-states, THP, ASLR, perf_event_paranoid) only where this is true.
    ADD COLUMN benchmark_tuning boolean NOT NULL DEFAULT false;
