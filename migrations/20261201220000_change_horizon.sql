-- Which transaction last wrote each job and runner row. The planner keeps
-- the queue and the live fleet in memory and, each pass, reads only the
-- rows written by transactions that had not finished when it last read
-- (PgStore's open ledger); the settle reads the jobs that started or
-- completed the same way. A pass then costs what changed, not what is
-- open, and no slow commit is missed. A trigger, so that no writer (an operator's manual UPDATE
-- included) can forget it. xid8 and pg_current_snapshot() need
-- PostgreSQL 13.
ALTER TABLE workflow_jobs ADD COLUMN changed_by xid8;
ALTER TABLE runners ADD COLUMN changed_by xid8;

CREATE FUNCTION record_changed_by() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.changed_by := pg_current_xact_id();
    RETURN NEW;
END
$$;

CREATE TRIGGER workflow_jobs_changed_by BEFORE INSERT OR UPDATE ON workflow_jobs
    FOR EACH ROW EXECUTE FUNCTION record_changed_by();
CREATE TRIGGER runners_changed_by BEFORE INSERT OR UPDATE ON runners
    FOR EACH ROW EXECUTE FUNCTION record_changed_by();

CREATE INDEX workflow_jobs_changed_by ON workflow_jobs (changed_by);
CREATE INDEX runners_changed_by ON runners (controller_id, changed_by);

-- The settle found its starts by time; it no longer does.
DROP INDEX IF EXISTS workflow_jobs_started;
