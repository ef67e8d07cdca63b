-- How the customer of a case was checked when it was opened: 'verified' (the CRM answered),
-- 'cached' (the CRM was unreachable or its breaker open; the last known record was used) or
-- 'unverified' (no CRM, or nothing cached), with the name and email known at that time.
ALTER TABLE cases ADD COLUMN customer_check TEXT NOT NULL DEFAULT 'unverified';
ALTER TABLE cases ADD COLUMN customer_name TEXT;
ALTER TABLE cases ADD COLUMN customer_email TEXT;

-- The last record the CRM gave for each customer (translated to the domain's terms): the
-- fallback when the CRM is down.
CREATE TABLE crm_customers (
    customer_id  TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    email        TEXT NOT NULL,
    fetched_at   TEXT NOT NULL
);
